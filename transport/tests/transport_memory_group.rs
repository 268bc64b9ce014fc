//! Several workers sharing one `memory://` transport as a consumer group: cooperative
//! two-step rebalancing (revoke, confirm, assign), weights, co-partitioning, stickiness,
//! leaving and dropping, eviction after the rebalance timeout, and fenced commits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust_transport::{
    AssignmentEvent, CoreTransport, Error, Fence, JoinRequest, Membership, MemoryMembership, MemoryTransport, Result,
    TopicConfig, TopicPartition, Transport,
};
use futures_lite::future::block_on;

const GROUP: &str = "g";

fn join(topics: &[&str], weight: u32) -> JoinRequest {
    JoinRequest {
        topics: topics.iter().map(|t| t.to_string()).collect(),
        copartitioned: Vec::new(),
        weight,
        changelogs: Vec::new(),
    }
}

fn transport(topics: &[(&str, u32)]) -> MemoryTransport {
    let t = MemoryTransport::new();
    for &(name, partitions) in topics {
        t.create_topic_now(name, &TopicConfig::new(partitions)).expect("create topic");
    }
    t
}

/// The next event of `m`, or `None` if none comes within `wait`.
fn next_within(m: &mut MemoryMembership, wait: Duration) -> Option<Result<AssignmentEvent>> {
    block_on(futures_lite::future::or(async { Some(m.next_event().await) }, async {
        futures_timer::Delay::new(wait).await;
        None
    }))
}

/// The next event of `m`, which must come soon.
fn next(m: &mut MemoryMembership) -> AssignmentEvent {
    next_within(m, Duration::from_secs(5)).expect("an event within 5 s").expect("an event")
}

fn assigned(event: AssignmentEvent) -> (u64, Vec<TopicPartition>) {
    match event {
        AssignmentEvent::Assigned { generation, partitions } => (generation, partitions),
        other => panic!("expected an assignment, got {other:?}"),
    }
}

fn revoked(event: AssignmentEvent) -> (u64, Vec<TopicPartition>) {
    match event {
        AssignmentEvent::Revoked { generation, partitions } => (generation, partitions),
        other => panic!("expected a revoke, got {other:?}"),
    }
}

fn id(m: &MemoryMembership) -> String {
    m.member_id().expect("memory:// has groups").to_string()
}

fn fence(m: &MemoryMembership, generation: u64) -> Fence {
    Fence { member: m.member_id().expect("memory:// has groups"), generation }
}

type Owns = BTreeMap<String, BTreeSet<TopicPartition>>;

/// Reads every event queued for each member, confirming every revoke, until nothing is being
/// revoked; returns the partitions each ends up with, by member id.
fn settle(t: &MemoryTransport, members: &mut [&mut MemoryMembership]) -> Owns {
    settle_from(t, members, Owns::new())
}

/// [`settle`], for members that were told of `owns` before.
fn settle_from(t: &MemoryTransport, members: &mut [&mut MemoryMembership], mut owns: Owns) -> Owns {
    for _ in 0..10 {
        for m in members.iter_mut() {
            let mine = owns.entry(id(m)).or_default();
            while let Some(event) = next_within(m, Duration::from_millis(20)) {
                match event.expect("an event") {
                    AssignmentEvent::Assigned { partitions, .. } => mine.extend(partitions),
                    AssignmentEvent::Revoked { generation, partitions } => {
                        for tp in &partitions {
                            mine.remove(tp);
                        }
                        block_on(m.revoked(generation)).expect("confirm");
                    }
                    AssignmentEvent::Standbys { .. } => panic!("the memory transport places no standbys"),
                }
            }
        }
        if t.pending_revokes(GROUP) == 0 {
            break;
        }
    }
    assert_eq!(t.pending_revokes(GROUP), 0, "settled");
    let believed: BTreeMap<String, Vec<TopicPartition>> =
        owns.iter().map(|(m, tps)| (m.clone(), tps.iter().cloned().collect())).collect();
    assert_eq!(believed, t.group_assignment(GROUP), "what the members were told is what the group says");
    owns
}

#[test]
fn one_member_gets_every_partition_of_every_topic() {
    let t = transport(&[("a", 3), ("b", 2)]);
    let mut m = t.membership(GROUP, &join(&["a", "b"], 4)).expect("join");
    assert_eq!(m.member_id().as_deref(), Some("member-1"));
    let (generation, partitions) = assigned(next(&mut m));
    assert_eq!((generation, partitions.len()), (1, 5));
    assert_eq!(t.group_generation(GROUP), 1);
    assert_eq!(t.group_assignment(GROUP), BTreeMap::from([("member-1".to_string(), partitions)]));
    assert!(next_within(&mut m, Duration::from_millis(60)).is_none(), "nothing else happens");
}

#[test]
fn unknown_topics_are_refused() {
    let t = transport(&[("a", 3)]);
    let err = t.membership(GROUP, &join(&["a", "nope"], 1)).expect_err("nope does not exist");
    assert!(matches!(err, Error::UnknownTopic { ref topic } if topic == "nope"), "{err}");
    assert_eq!(t.group_generation(GROUP), 0, "nobody joined");
}

#[test]
fn a_second_member_gets_its_share_only_once_the_first_confirms() {
    let t = transport(&[("a", 8)]);
    let mut first = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    assert_eq!(assigned(next(&mut first)).1.len(), 8);

    let mut second = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    let (generation, moving) = revoked(next(&mut first));
    assert_eq!((generation, moving.len()), (2, 4));
    // The second is in, with nothing yet: the first still owns all 8 until it confirms.
    assert_eq!(assigned(next(&mut second)), (2, Vec::new()));
    assert!(next_within(&mut second, Duration::from_millis(100)).is_none());
    assert_eq!(t.group_assignment(GROUP)[&id(&first)].len(), 8);
    assert_eq!(t.group_assignment(GROUP)[&id(&second)], Vec::<TopicPartition>::new());
    assert_eq!(t.pending_revokes(GROUP), 4);

    // The first may still commit what it is giving up (its last offsets), fenced.
    block_on(t.commit(GROUP, Some(&fence(&first, 2)), &[(moving[0].clone(), 3)])).expect("still the owner");
    block_on(first.revoked(generation)).expect("confirm");
    assert_eq!(assigned(next(&mut second)), (2, moving.clone()));
    assert_eq!(t.pending_revokes(GROUP), 0);
    assert_eq!(t.group_assignment(GROUP)[&id(&first)].len(), 4);
    // Now only the second may commit them.
    let err = block_on(t.commit(GROUP, Some(&fence(&first, 2)), &[(moving[0].clone(), 9)])).expect_err("gone");
    assert!(matches!(err, Error::Fenced { tp: Some(ref tp), .. } if *tp == moving[0]), "{err}");
    block_on(t.commit(GROUP, Some(&fence(&second, 2)), &[(moving[0].clone(), 5)])).expect("the new owner");
    assert_eq!(block_on(t.committed(GROUP, &moving[..1])).expect("committed"), [Some(5)]);
}

#[test]
fn weights_give_proportional_shares() {
    let t = transport(&[("a", 12)]);
    let mut heavy = t.membership(GROUP, &join(&["a"], 2)).expect("join");
    let mut light = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    let owns = settle(&t, &mut [&mut heavy, &mut light]);
    assert_eq!((owns[&id(&heavy)].len(), owns[&id(&light)].len()), (8, 4));
}

#[test]
fn copartitioned_topics_stay_together() {
    let t = transport(&[("a", 6), ("a-changelog", 6), ("b", 4)]);
    let mut request = join(&["a", "a-changelog", "b"], 1);
    request.copartitioned = vec![vec!["a".to_string(), "a-changelog".to_string()]];
    let mut members: Vec<MemoryMembership> = (0..3).map(|_| t.membership(GROUP, &request).expect("join")).collect();
    let owns = settle(&t, &mut members.iter_mut().collect::<Vec<_>>());
    for tps in owns.values() {
        let numbers = |topic: &str| -> BTreeSet<u32> {
            tps.iter().filter(|tp| &*tp.topic == topic).map(|tp| tp.partition).collect()
        };
        assert_eq!(numbers("a"), numbers("a-changelog"), "{owns:?}");
        assert_eq!(numbers("a").len(), 2, "{owns:?}");
    }
}

#[test]
fn a_third_member_takes_only_its_share() {
    let t = transport(&[("a", 12)]);
    let mut a = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    let mut b = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    let before = settle(&t, &mut [&mut a, &mut b]);
    let mut c = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    let after = settle_from(&t, &mut [&mut a, &mut b, &mut c], before.clone());
    for m in [&a, &b] {
        assert_eq!(after[&id(m)].len(), 4);
        assert!(after[&id(m)].is_subset(&before[&id(m)]), "only what moves to c moves");
    }
    assert_eq!(after[&id(&c)].len(), 4);
}

#[test]
fn a_leaving_member_s_partitions_go_to_the_others_at_once() {
    let t = transport(&[("a", 6)]);
    let mut a = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    let mut b = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    let before = settle(&t, &mut [&mut a, &mut b]);
    let generation = t.group_generation(GROUP);
    block_on(b.leave()).expect("leave");
    block_on(b.leave()).expect("leaving twice does nothing");
    let (g, got) = assigned(next(&mut a));
    assert_eq!(g, generation + 1);
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), before[&id(&b)]);
    assert_eq!(t.pending_revokes(GROUP), 0);
    assert_eq!(t.group_assignment(GROUP).len(), 1);
    let err = block_on(b.next_event()).expect_err("b left");
    assert!(matches!(err, Error::Fenced { .. }), "{err}");
}

#[test]
fn dropping_a_membership_leaves_the_group() {
    let t = transport(&[("a", 6)]);
    let mut a = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    let mut b = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    let before = settle(&t, &mut [&mut a, &mut b]);
    let gone = id(&b);
    drop(b); // A crash.
    let got: BTreeSet<_> = assigned(next(&mut a)).1.into_iter().collect();
    assert_eq!(got, before[&gone]);
    assert_eq!(t.group_assignment(GROUP).keys().collect::<Vec<_>>(), [&id(&a)]);
}

#[test]
fn a_member_that_never_confirms_is_evicted_after_the_timeout() {
    let t = transport(&[("a", 4)]).with_rebalance_timeout(Duration::from_millis(200));
    let mut slow = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    let all = assigned(next(&mut slow)).1;
    let mut other = t.clone().membership(GROUP, &join(&["a"], 1)).expect("join");
    let (_, moving) = revoked(next(&mut slow));
    assert_eq!(assigned(next(&mut other)).1, Vec::<TopicPartition>::new());

    // `slow` never confirms. The other member, waiting, enforces the deadline itself.
    let start = Instant::now();
    let waiter = std::thread::spawn(move || {
        let event = next(&mut other);
        (other, event)
    });
    let (mut other, event) = waiter.join().expect("the waiter");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(150), "evicted after the timeout, not before ({waited:?})");
    assert!(waited < Duration::from_secs(3), "evicted soon after the timeout ({waited:?})");
    let (generation, got) = assigned(event);
    assert_eq!(generation, 3);
    assert_eq!(got, all, "everything, at once: the evicted member's partitions are free");
    assert_eq!(t.group_assignment(GROUP), BTreeMap::from([(id(&other), all.clone())]));

    let is_fenced = |r: Result<()>| matches!(r, Err(Error::Fenced { .. }));
    assert!(matches!(block_on(slow.next_event()), Err(Error::Fenced { .. })));
    assert!(is_fenced(block_on(slow.revoked(2))));
    let err = block_on(t.commit(GROUP, Some(&fence(&slow, 2)), &[(moving[0].clone(), 7)])).expect_err("fenced");
    assert!(matches!(err, Error::Fenced { ref reason, .. } if reason.contains("evicted")), "{err}");
    assert_eq!(block_on(t.committed(GROUP, &moving[..1])).expect("committed"), [None], "nothing written");
    assert!(is_fenced(block_on(slow.leave())), "leaving tells the evicted member it was evicted");
    assert!(next_within(&mut other, Duration::from_millis(60)).is_none());
}

#[test]
fn evict_forces_the_eviction_path() {
    let t = transport(&[("a", 2)]);
    let mut a = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    let mut b = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    settle(&t, &mut [&mut a, &mut b]);
    assert!(t.evict(GROUP, &id(&a)));
    assert!(!t.evict(GROUP, &id(&a)), "not a member any more");
    assert!(!t.evict("other", &id(&b)));
    let err = block_on(a.next_event()).expect_err("evicted");
    assert!(matches!(err, Error::Fenced { ref member, .. } if *member == id(&a)), "{err}");
    assert_eq!(assigned(next(&mut b)).1.len(), 1);
    assert_eq!(t.group_assignment(GROUP)[&id(&b)].len(), 2);
}

#[test]
fn a_fenced_commit_of_a_partition_not_owned_writes_nothing() {
    let t = transport(&[("a", 2)]);
    let mut a = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    let mut b = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    let owns = settle(&t, &mut [&mut a, &mut b]);
    let mine = owns[&id(&a)].first().expect("a owns one").clone();
    let theirs = owns[&id(&b)].first().expect("b owns one").clone();
    let generation = t.group_generation(GROUP);
    let offsets = [(mine.clone(), 10), (theirs.clone(), 20)];
    let err = block_on(t.commit(GROUP, Some(&fence(&a, generation)), &offsets)).expect_err("b's partition");
    assert!(matches!(err, Error::Fenced { tp: Some(ref tp), .. } if *tp == theirs), "{err}");
    assert_eq!(block_on(t.committed(GROUP, &[mine.clone(), theirs.clone()])).expect("committed"), [None, None]);
    // A fence from the wrong group, or an unknown member, is refused too; no fence is not.
    assert!(block_on(t.commit("other", Some(&fence(&a, generation)), &offsets[..1])).is_err());
    let stranger = Fence { member: Arc::from("member-99"), generation };
    assert!(block_on(t.commit(GROUP, Some(&stranger), &offsets[..1])).is_err());
    block_on(t.commit(GROUP, Some(&fence(&a, generation)), &offsets[..1])).expect("a's own partition");
    block_on(t.commit(GROUP, None, &offsets)).expect("unfenced");
    assert_eq!(block_on(t.committed(GROUP, &[mine, theirs])).expect("committed"), [Some(10), Some(20)]);
}

#[test]
fn close_ends_every_membership() {
    let t = transport(&[("a", 2)]);
    let mut a = t.membership(GROUP, &join(&["a"], 1)).expect("join");
    next(&mut a);
    let closer = {
        let t = t.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            t.close();
        })
    };
    assert!(matches!(next_within(&mut a, Duration::from_secs(5)), Some(Err(Error::Closed))));
    closer.join().expect("closer");
    assert!(matches!(t.membership(GROUP, &join(&["a"], 1)), Err(Error::Closed)));
}

/// Workers on their own threads join, process, commit with their fence and leave at various
/// times; no partition is ever held by two of them, and every commit of theirs is accepted.
#[test]
fn workers_on_threads_never_hold_a_partition_together() {
    let t = transport(&[("a", 12), ("a-changelog", 12)]);
    let mut request = join(&["a", "a-changelog"], 1);
    request.copartitioned = vec![vec!["a".to_string(), "a-changelog".to_string()]];
    let holders: Arc<Mutex<HashMap<TopicPartition, String>>> = Arc::default();

    let spawn = |weight: u32, stop: Arc<AtomicBool>| {
        let (t, holders) = (t.clone(), holders.clone());
        let request = JoinRequest { weight, ..request.clone() };
        std::thread::spawn(move || {
            let mut m = t.membership(GROUP, &request).expect("join");
            let me = id(&m);
            let (mut generation, mut mine) = (0, BTreeSet::new());
            while !stop.load(Ordering::Acquire) {
                let Some(event) = next_within(&mut m, Duration::from_millis(10)) else { continue };
                match event.expect("an event") {
                    AssignmentEvent::Assigned { generation: g, partitions } => {
                        generation = g;
                        let mut h = holders.lock().expect("holders");
                        for tp in &partitions {
                            if let Some(other) = h.insert(tp.clone(), me.clone()) {
                                panic!("{me} given {tp} while {other} holds it");
                            }
                        }
                        drop(h);
                        mine.extend(partitions.iter().cloned());
                        let offsets: Vec<_> = partitions.iter().map(|tp| (tp.clone(), 1)).collect();
                        block_on(t.commit(GROUP, Some(&fence(&m, g)), &offsets)).expect("commit the new ones");
                    }
                    AssignmentEvent::Revoked { generation: g, partitions } => {
                        generation = g;
                        // Stop, commit, release, confirm.
                        let offsets: Vec<_> = partitions.iter().map(|tp| (tp.clone(), 2)).collect();
                        block_on(t.commit(GROUP, Some(&fence(&m, g)), &offsets)).expect("commit the revoked");
                        let mut h = holders.lock().expect("holders");
                        for tp in &partitions {
                            assert_eq!(h.remove(tp).as_deref(), Some(me.as_str()));
                        }
                        drop(h);
                        for tp in &partitions {
                            mine.remove(tp);
                        }
                        block_on(m.revoked(g)).expect("confirm");
                    }
                    AssignmentEvent::Standbys { .. } => panic!("the memory transport places no standbys"),
                }
            }
            // Leave like a worker shutting down: commit, release, leave.
            // (Only what it was told of: an assignment not read yet is not its to commit.)
            let offsets: Vec<(TopicPartition, u64)> = mine.iter().map(|tp| (tp.clone(), 3)).collect();
            block_on(t.commit(GROUP, Some(&fence(&m, generation)), &offsets)).expect("final commit");
            holders.lock().expect("holders").retain(|_, holder| *holder != me);
            block_on(m.leave()).expect("leave");
        })
    };

    let stops: Vec<Arc<AtomicBool>> = (0..4).map(|_| Arc::default()).collect();
    let mut workers = Vec::new();
    for (i, stop) in stops.iter().enumerate() {
        workers.push(spawn(1 + i as u32 % 2, stop.clone()));
        std::thread::sleep(Duration::from_millis(30));
    }
    // Two leave; the other two end up with everything.
    for (stop, worker) in stops[..2].iter().zip(workers.drain(..2)) {
        stop.store(true, Ordering::Release);
        worker.join().expect("worker");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = holders.lock().expect("holders").len();
        if t.pending_revokes(GROUP) == 0 && held == 24 {
            break;
        }
        assert!(Instant::now() < deadline, "the group settles");
        std::thread::sleep(Duration::from_millis(10));
    }
    let assignment = t.group_assignment(GROUP);
    let held = holders.lock().expect("holders").clone();
    for (member, tps) in &assignment {
        for tp in tps {
            assert_eq!(&held[tp], member);
        }
    }
    assert_eq!(assignment.values().map(Vec::len).sum::<usize>(), 24);
    for (stop, worker) in stops[2..].iter().zip(workers) {
        stop.store(true, Ordering::Release);
        worker.join().expect("worker");
    }
    assert!(t.group_assignment(GROUP).is_empty());
}
