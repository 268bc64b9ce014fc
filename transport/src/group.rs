//! The consumer-group coordinator behind `memory://`: members, the generation, who owns which
//! partition, and the two-step (cooperative) hand-over of partitions between members.
//!
//! This is a plain state machine: no locking, no waiting, no clock of its own (every call that
//! can start a deadline or enforce one is given `now`). The transport wraps it in its lock and
//! wakes waiting members when it changes.
//!
//! # Protocol
//!
//! Every change of membership (a join, a leave, an eviction) is a *rebalance*: the generation
//! goes up by one and a new *target* is computed with [`assign`](crate::assign) over the present
//! members (weighted), the union of their partitions and co-partitioned groups, and where each
//! partition is now (so the target is sticky). Then, for each partition:
//!
//! - owned by its target member: nothing happens;
//! - owned by another member (or by a member while the target gives it to no one) and not yet
//!   being revoked: a revoke starts — the owner is sent [`AssignmentEvent::Revoked`] and keeps
//!   owning the partition until it confirms ([`Group::confirm`]) or its deadline passes;
//! - owned by no one: it goes to its target member at once, in an
//!   [`AssignmentEvent::Assigned`].
//!
//! When the owner confirms the revokes of generation `g` and earlier, those partitions leave
//! it and go to the member the *latest* target names (in an `Assigned` of the current
//! generation). A member that leaves gives its partitions up at once (it committed before
//! leaving); a member whose revoke misses its deadline is evicted: removed like a leave, and
//! from then on refused as fenced.
//!
//! # Invariants
//!
//! - A partition has at most one owner, and a partition being revoked is still owned by the
//!   member revoking it: it is handed to another only after the confirmation. So two members
//!   are never told they own the same partition at once.
//! - Targets only name present members (every membership change recomputes the target).
//! - With no revoke pending, the ownership is exactly the latest target, which is `assign`'s
//!   balanced result (and a fixpoint of it).
//! - A member's first event is always an `Assigned` of its join's generation, possibly empty
//!   (its partitions may all be being revoked elsewhere), so a worker can wait for "I am in";
//!   every later event is non-empty.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::assign::{AssignInput, assign};
use crate::types::{AssignmentEvent, TopicPartition};

/// Who owns one partition, and whether it is being taken away.
#[derive(Debug, Clone)]
struct Owner {
    /// The owning member.
    member: Arc<str>,
    /// The generation at which the member was given the partition (a commit fenced with an
    /// older generation is refused).
    since: u64,
    /// The revoke under way, if any.
    revoke: Option<Revoke>,
}

/// A revoke sent to the owner and not yet confirmed.
#[derive(Debug, Clone, Copy)]
struct Revoke {
    /// The generation of the `Revoked` event.
    generation: u64,
    /// When the owner is evicted if it has not confirmed (`None`: never, the timeout being too
    /// large to represent).
    deadline: Option<Instant>,
}

/// One member of the group.
#[derive(Debug)]
struct Member {
    /// Its share of the work, at least 1.
    weight: u32,
    /// Every partition of the topics it subscribes.
    partitions: Vec<TopicPartition>,
    /// Its co-partitioned groups of topics.
    copartitioned: Vec<Vec<Arc<str>>>,
    /// Events not yet taken by the member, oldest first.
    events: VecDeque<AssignmentEvent>,
}

/// Why a request from a member was refused: it is not (or no longer) in the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotMember {
    /// Why, in words (left, evicted after a missed deadline, …).
    pub(crate) reason: String,
}

/// Why a fenced commit was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    /// The partition concerned, if the refusal is about one.
    pub(crate) tp: Option<TopicPartition>,
    /// Why, in words.
    pub(crate) reason: String,
}

/// One consumer group.
#[derive(Debug, Default)]
pub(crate) struct Group {
    /// Bumped by every rebalance; 0 before the first member joins.
    generation: u64,
    /// The present members.
    members: BTreeMap<Arc<str>, Member>,
    /// The owner of every owned partition, including those being revoked.
    owners: BTreeMap<TopicPartition, Owner>,
    /// Where the latest rebalance wants each partition (only present members).
    target: HashMap<TopicPartition, Arc<str>>,
    /// Members removed by eviction, with the reason (to tell them why they are fenced). An
    /// entry is dropped when the member's handle is ([`Group::forget`]).
    evicted: HashMap<Arc<str>, String>,
}

impl Group {
    /// The current generation.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Adds member `id` (not present before) and rebalances. `weight` 0 counts as 1.
    pub(crate) fn join(
        &mut self,
        id: Arc<str>,
        weight: u32,
        partitions: Vec<TopicPartition>,
        copartitioned: Vec<Vec<Arc<str>>>,
        now: Instant,
        timeout: Duration,
    ) {
        let member = Member { weight: weight.max(1), partitions, copartitioned, events: VecDeque::new() };
        self.members.insert(id.clone(), member);
        self.rebalance(now, timeout, Some(&id));
    }

    /// Removes member `id`, freeing its partitions at once (it committed before leaving), and
    /// rebalances. `false` if it was not a member.
    pub(crate) fn leave(&mut self, id: &str, now: Instant, timeout: Duration) -> bool {
        if self.remove(id) {
            self.rebalance(now, timeout, None);
            true
        } else {
            false
        }
    }

    /// Removes member `id` like [`leave`](Group::leave), and refuses it from then on with
    /// `reason`. `false` if it was not a member.
    pub(crate) fn evict(&mut self, id: &str, reason: String, now: Instant, timeout: Duration) -> bool {
        let Some((key, _)) = self.members.get_key_value(id) else { return false };
        let key = key.clone();
        self.remove(id);
        self.evicted.insert(key, reason);
        self.rebalance(now, timeout, None);
        true
    }

    /// Forgets why `id` was evicted (its handle is gone, nobody will ask again).
    pub(crate) fn forget(&mut self, id: &str) {
        self.evicted.remove(id);
    }

    /// Evicts every member with a revoke whose deadline is at or before `now`. Returns whether
    /// anyone was evicted.
    pub(crate) fn expire(&mut self, now: Instant, timeout: Duration) -> bool {
        let mut changed = false;
        // An eviction rebalances, which may start revokes, but their deadlines are later than
        // `now` (timeout > 0) or at `now` (timeout 0: then the loop goes on, and ends because
        // each round removes a member).
        while let Some((member, generation)) = self.overdue(now) {
            let reason = format!("did not confirm the revoke of generation {generation} within {timeout:?}");
            self.evict(&member, reason, now, timeout);
            changed = true;
        }
        changed
    }

    /// The earliest deadline of a revoke under way.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.owners.values().filter_map(|o| o.revoke.and_then(|r| r.deadline)).min()
    }

    /// The member's oldest event not yet taken, `Ok(None)` if there is none.
    pub(crate) fn next_event(&mut self, id: &str) -> Result<Option<AssignmentEvent>, NotMember> {
        match self.members.get_mut(id) {
            Some(member) => Ok(member.events.pop_front()),
            None => Err(self.not_member(id)),
        }
    }

    /// Member `id` confirms the revokes of generation `generation` and earlier: those
    /// partitions leave it and go to their owners in the latest target. Confirming when
    /// nothing is being revoked does nothing.
    pub(crate) fn confirm(&mut self, id: &str, generation: u64) -> Result<(), NotMember> {
        if !self.members.contains_key(id) {
            return Err(self.not_member(id));
        }
        let released: Vec<TopicPartition> = self
            .owners
            .iter()
            .filter(|(_, o)| &*o.member == id && o.revoke.is_some_and(|r| r.generation <= generation))
            .map(|(tp, _)| tp.clone())
            .collect();
        let mut assigned: BTreeMap<Arc<str>, Vec<TopicPartition>> = BTreeMap::new();
        for tp in released {
            self.owners.remove(&tp);
            // The latest target, not the one of the revoke: rebalances may have happened since.
            if let Some(to) = self.target.get(&tp).cloned() {
                self.owners.insert(tp.clone(), Owner { member: to.clone(), since: self.generation, revoke: None });
                assigned.entry(to).or_default().push(tp);
            }
        }
        for (to, partitions) in assigned {
            if let Some(member) = self.members.get_mut(&to) {
                member.events.push_back(AssignmentEvent::Assigned { generation: self.generation, partitions });
            }
        }
        Ok(())
    }

    /// Checks a commit of `partitions` fenced by member `id` at `generation`: the member must
    /// be present and own every partition (being revoked counts: it still owns it until it
    /// confirms), given to it at `generation` or earlier.
    pub(crate) fn check_commit<'a>(
        &self,
        id: &str,
        generation: u64,
        partitions: impl IntoIterator<Item = &'a TopicPartition>,
    ) -> Result<(), Refused> {
        let mut partitions = partitions.into_iter().peekable();
        if !self.members.contains_key(id) {
            let tp = partitions.peek().map(|tp| (*tp).clone());
            return Err(Refused { tp, reason: self.not_member(id).reason });
        }
        for tp in partitions {
            match self.owners.get(tp) {
                Some(o) if &*o.member == id && o.since <= generation => {}
                Some(o) if &*o.member == id => {
                    return Err(Refused {
                        tp: Some(tp.clone()),
                        reason: format!(
                            "the fence's generation {generation} is older than generation {}, when the member was given the partition",
                            o.since
                        ),
                    });
                }
                Some(_) => {
                    return Err(Refused { tp: Some(tp.clone()), reason: "another member owns the partition".into() });
                }
                None => {
                    return Err(Refused {
                        tp: Some(tp.clone()),
                        reason: "the member does not own the partition".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Every present member with the partitions it owns, including those being revoked.
    pub(crate) fn assignment(&self) -> BTreeMap<String, Vec<TopicPartition>> {
        let mut out: BTreeMap<String, Vec<TopicPartition>> =
            self.members.keys().map(|m| (m.to_string(), Vec::new())).collect();
        // `owners` is sorted, so each member's list is too.
        for (tp, o) in &self.owners {
            out.entry(o.member.to_string()).or_default().push(tp.clone());
        }
        out
    }

    /// How many partitions are being revoked.
    pub(crate) fn pending_revokes(&self) -> usize {
        self.owners.values().filter(|o| o.revoke.is_some()).count()
    }

    /// Removes member `id` and its partitions. `false` if it was not a member.
    fn remove(&mut self, id: &str) -> bool {
        if self.members.remove(id).is_none() {
            return false;
        }
        self.owners.retain(|_, o| &*o.member != id);
        true
    }

    /// Why `id` is not a member (meaningful only when it is not).
    pub(crate) fn not_member(&self, id: &str) -> NotMember {
        let reason = match self.evicted.get(id) {
            Some(reason) => format!("evicted from the group: {reason}"),
            None => "not a member of the group (it left)".to_string(),
        };
        NotMember { reason }
    }

    /// A member with a revoke due at or before `now`, and that revoke's generation.
    fn overdue(&self, now: Instant) -> Option<(Arc<str>, u64)> {
        self.owners.values().find_map(|o| {
            let r = o.revoke?;
            r.deadline.filter(|&d| d <= now).map(|_| (o.member.clone(), r.generation))
        })
    }

    /// A new generation: computes the target and starts the moves towards it (see the module
    /// documentation). `joined` always gets an `Assigned` event, possibly empty.
    fn rebalance(&mut self, now: Instant, timeout: Duration, joined: Option<&Arc<str>>) {
        // The target first: it is the one step that could panic (see `compute_target`), and
        // nothing is changed before it.
        self.target = self.compute_target();
        self.generation += 1;
        let generation = self.generation;

        let mut revoked: BTreeMap<Arc<str>, Vec<TopicPartition>> = BTreeMap::new();
        for (tp, o) in self.owners.iter_mut() {
            let stays = self.target.get(tp).is_some_and(|to| *to == o.member);
            if !stays && o.revoke.is_none() {
                o.revoke = Some(Revoke { generation, deadline: now.checked_add(timeout) });
                revoked.entry(o.member.clone()).or_default().push(tp.clone());
            }
        }
        let mut assigned: BTreeMap<Arc<str>, Vec<TopicPartition>> = BTreeMap::new();
        if let Some(id) = joined {
            assigned.insert(id.clone(), Vec::new());
        }
        let mut free: Vec<(&TopicPartition, &Arc<str>)> =
            self.target.iter().filter(|(tp, _)| !self.owners.contains_key(*tp)).collect();
        free.sort();
        for (tp, to) in free {
            assigned.entry(to.clone()).or_default().push(tp.clone());
        }
        for (to, partitions) in &assigned {
            for tp in partitions {
                self.owners.insert(tp.clone(), Owner { member: to.clone(), since: generation, revoke: None });
            }
        }

        for (id, partitions) in revoked {
            if let Some(member) = self.members.get_mut(&id) {
                member.events.push_back(AssignmentEvent::Revoked { generation, partitions });
            }
        }
        for (id, partitions) in assigned {
            if let Some(member) = self.members.get_mut(&id) {
                member.events.push_back(AssignmentEvent::Assigned { generation, partitions });
            }
        }
    }

    /// The balanced, sticky target for the present members: empty when there are none.
    fn compute_target(&self) -> HashMap<TopicPartition, Arc<str>> {
        if self.members.is_empty() {
            return HashMap::new();
        }
        let members: Vec<(Arc<str>, u32)> = self.members.iter().map(|(id, m)| (id.clone(), m.weight)).collect();
        let mut groups: Vec<Vec<Arc<str>>> = self.members.values().flat_map(|m| m.copartitioned.clone()).collect();
        groups.sort();
        groups.dedup();
        let mut partitions: Vec<TopicPartition> = self.members.values().flat_map(|m| m.partitions.clone()).collect();
        partitions.sort();
        partitions.dedup();
        // Stickiness: where a partition is now, or, while it is being revoked, where it is
        // already heading (it is leaving its owner anyway, so aiming it elsewhere again would
        // only move it twice).
        let previous: HashMap<TopicPartition, Arc<str>> = self
            .owners
            .iter()
            .map(|(tp, o)| {
                let heading = o.revoke.and_then(|_| self.target.get(tp)).filter(|to| self.members.contains_key(*to));
                (tp.clone(), heading.unwrap_or(&o.member).clone())
            })
            .collect();
        let placed =
            assign(&AssignInput { members: &members, groups: &groups, partitions: &partitions, previous: &previous })
                // The members come from a map (distinct), are not empty (checked above) and have
                // weights of at least 1 (clamped in `join`): `assign` cannot fail.
                .expect("distinct members of weight >= 1");
        placed.into_iter().flat_map(|(m, tps)| tps.into_iter().map(move |tp| (tp, m.clone()))).collect()
    }

    /// Checks the invariants of the module documentation that the structure does not enforce.
    #[cfg(test)]
    pub(crate) fn check(&self) {
        for (tp, o) in &self.owners {
            assert!(self.members.contains_key(&o.member), "{tp} owned by absent {}", o.member);
            assert!(o.since <= self.generation);
            if o.revoke.is_none() {
                assert_eq!(self.target.get(tp), Some(&o.member), "{tp} owned outside the target, not being revoked");
            }
        }
        for (tp, to) in &self.target {
            assert!(self.members.contains_key(to), "{tp} targeted at absent {to}");
        }
        if self.pending_revokes() == 0 {
            let owners: HashMap<TopicPartition, Arc<str>> =
                self.owners.iter().map(|(tp, o)| (tp.clone(), o.member.clone())).collect();
            assert_eq!(owners, self.target, "with nothing being revoked, ownership is the target");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(100);

    fn tps(topic: &str, n: u32) -> Vec<TopicPartition> {
        (0..n).map(|p| TopicPartition::new(topic, p)).collect()
    }

    fn take(g: &mut Group, id: &str) -> Vec<AssignmentEvent> {
        std::iter::from_fn(|| g.next_event(id).expect("a member")).collect()
    }

    #[test]
    fn a_lone_member_gets_everything_in_generation_1() {
        let mut g = Group::default();
        let now = Instant::now();
        g.join("a".into(), 1, tps("t", 4), Vec::new(), now, TIMEOUT);
        assert_eq!(take(&mut g, "a"), [AssignmentEvent::Assigned { generation: 1, partitions: tps("t", 4) }]);
        g.check();
        // Nothing moves: confirming, with nothing being revoked, changes nothing.
        g.confirm("a", 1).expect("a member");
        assert!(take(&mut g, "a").is_empty());
    }

    #[test]
    fn a_hand_over_waits_for_the_confirmation_and_uses_the_latest_target() {
        let mut g = Group::default();
        let now = Instant::now();
        g.join("a".into(), 1, tps("t", 6), Vec::new(), now, TIMEOUT);
        take(&mut g, "a");
        g.join("b".into(), 1, tps("t", 6), Vec::new(), now, TIMEOUT);
        let [AssignmentEvent::Revoked { generation: 2, partitions: to_b }] = &take(&mut g, "a")[..] else {
            panic!("a revoke for a")
        };
        assert_eq!(to_b.len(), 3);
        assert_eq!(take(&mut g, "b"), [AssignmentEvent::Assigned { generation: 2, partitions: Vec::new() }]);
        // A third joins before a confirms: some of what was heading to b now heads to c.
        g.join("c".into(), 1, tps("t", 6), Vec::new(), now, TIMEOUT);
        g.check();
        let a_revoked_again = take(&mut g, "a");
        assert_eq!(take(&mut g, "c"), [AssignmentEvent::Assigned { generation: 3, partitions: Vec::new() }]);
        assert_eq!(g.assignment()["a"].len(), 6, "a still owns everything until it confirms");
        g.confirm("a", 2).expect("a member");
        g.check();
        // Only the generation-2 revokes are released, to the latest target.
        let b: Vec<_> = take(&mut g, "b");
        let c: Vec<_> = take(&mut g, "c");
        let got = |events: &[AssignmentEvent]| -> usize {
            events
                .iter()
                .map(|e| match e {
                    AssignmentEvent::Assigned { generation: 3, partitions } => partitions.len(),
                    other => panic!("{other:?}"),
                })
                .sum()
        };
        assert_eq!(got(&b) + got(&c), 3);
        g.confirm("a", 3).expect("a member");
        take(&mut g, "b");
        take(&mut g, "c");
        assert_eq!(g.pending_revokes(), 0);
        assert!(g.assignment().values().all(|tps| tps.len() == 2), "{:?} ({a_revoked_again:?})", g.assignment());
        g.check();
    }

    #[test]
    fn a_fenced_commit_needs_ownership_and_a_recent_enough_generation() {
        let mut g = Group::default();
        let now = Instant::now();
        g.join("a".into(), 1, tps("t", 2), Vec::new(), now, TIMEOUT);
        g.join("b".into(), 1, tps("t", 2), Vec::new(), now, TIMEOUT);
        let t0 = TopicPartition::new("t", 0);
        let t1 = TopicPartition::new("t", 1);
        // a owns both (one being revoked) until it confirms.
        g.check_commit("a", 1, [&t0, &t1]).expect("a owns both");
        assert!(g.check_commit("b", 2, [&t0]).is_err());
        g.confirm("a", 2).expect("a member");
        let moved = if g.assignment()["b"] == [t0.clone()] { &t0 } else { &t1 };
        let refused = g.check_commit("a", 2, [moved]).expect_err("a gave it up");
        assert_eq!(refused.tp.as_ref(), Some(moved));
        // b got it at generation 2: a fence of generation 1 is too old.
        assert!(g.check_commit("b", 1, [moved]).is_err());
        g.check_commit("b", 2, [moved]).expect("b owns it since generation 2");
        g.leave("b", now, TIMEOUT);
        let refused = g.check_commit("b", 3, [moved]).expect_err("b left");
        assert!(refused.reason.contains("left"), "{refused:?}");
    }

    #[test]
    fn a_missed_deadline_evicts_the_member() {
        let mut g = Group::default();
        let now = Instant::now();
        g.join("a".into(), 1, tps("t", 4), Vec::new(), now, TIMEOUT);
        g.join("b".into(), 1, tps("t", 4), Vec::new(), now, TIMEOUT);
        assert!(!g.expire(now + TIMEOUT / 2, TIMEOUT));
        assert_eq!(g.next_deadline(), Some(now + TIMEOUT));
        assert!(g.expire(now + TIMEOUT, TIMEOUT));
        g.check();
        let err = g.next_event("a").expect_err("evicted");
        assert!(err.reason.contains("evicted"), "{err:?}");
        assert_eq!(g.assignment(), BTreeMap::from([("b".to_string(), tps("t", 4))]));
        assert_eq!(g.generation(), 3);
    }

    /// One step of a random run.
    #[derive(Debug, Clone)]
    enum Op {
        /// A new member of this weight joins.
        Join(u32),
        /// The member at this index (modulo the members) leaves.
        Leave(usize),
        /// The member at this index reads all its events.
        Read(usize),
        /// The member at this index confirms the revokes it has read.
        Confirm(usize),
        /// Time passes (milliseconds); overdue members are evicted.
        Wait(u64),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (1u32..=3).prop_map(Op::Join),
            1 => any::<usize>().prop_map(Op::Leave),
            4 => any::<usize>().prop_map(Op::Read),
            3 => any::<usize>().prop_map(Op::Confirm),
            1 => (0u64..80).prop_map(Op::Wait),
        ]
    }

    /// What a worker believes, from the events it has read.
    #[derive(Debug, Default)]
    struct Worker {
        /// Partitions it was given and has not released.
        owns: BTreeSet<TopicPartition>,
        /// Revokes read and not yet confirmed: generation, partitions.
        revoking: Vec<(u64, Vec<TopicPartition>)>,
    }

    /// No partition is believed owned by two workers, and each worker's belief is within what
    /// the coordinator says it owns.
    fn check_beliefs(g: &Group, workers: &BTreeMap<Arc<str>, Worker>) {
        let assignment = g.assignment();
        let mut seen: BTreeMap<&TopicPartition, &str> = BTreeMap::new();
        for (id, w) in workers {
            let owned: BTreeSet<&TopicPartition> = assignment[&**id].iter().collect();
            for tp in &w.owns {
                assert!(owned.contains(tp), "{id} believes it owns {tp}, the group says {owned:?}");
                if let Some(other) = seen.insert(tp, id) {
                    panic!("{tp} believed owned by {other} and {id}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn random_joins_leaves_and_confirms_never_give_a_partition_two_owners(
            ops in prop::collection::vec(arb_op(), 1..60),
            copartitioned in any::<bool>(),
        ) {
            let start = Instant::now();
            let mut now = start;
            let mut g = Group::default();
            let mut workers: BTreeMap<Arc<str>, Worker> = BTreeMap::new();
            let mut next = 0;
            let partitions: Vec<TopicPartition> = [tps("a", 5), tps("b", 3), tps("a-changelog", 5)].concat();
            let groups: Vec<Vec<Arc<str>>> =
                if copartitioned { vec![vec![Arc::from("a"), Arc::from("a-changelog")]] } else { Vec::new() };
            let pick = |workers: &BTreeMap<Arc<str>, Worker>, i: usize| workers.keys().nth(i % workers.len().max(1)).cloned();
            for op in ops {
                match op {
                    Op::Join(weight) => {
                        let id: Arc<str> = Arc::from(format!("m{next}"));
                        next += 1;
                        g.join(id.clone(), weight, partitions.clone(), groups.clone(), now, TIMEOUT);
                        workers.insert(id, Worker::default());
                    }
                    Op::Leave(i) => {
                        if let Some(id) = pick(&workers, i) {
                            prop_assert!(g.leave(&id, now, TIMEOUT));
                            workers.remove(&id);
                        }
                    }
                    Op::Read(i) => {
                        if let Some(id) = pick(&workers, i) {
                            let w = workers.get_mut(&id).expect("picked");
                            for event in take(&mut g, &id) {
                                match event {
                                    AssignmentEvent::Assigned { partitions, .. } => w.owns.extend(partitions),
                                    AssignmentEvent::Revoked { generation, partitions } => {
                                        w.revoking.push((generation, partitions))
                                    }
                                    // The memory coordinator places no standbys.
                                    AssignmentEvent::Standbys { .. } => {}
                                }
                            }
                        }
                    }
                    Op::Confirm(i) => {
                        if let Some(id) = pick(&workers, i) {
                            let w = workers.get_mut(&id).expect("picked");
                            if let Some(&(generation, _)) = w.revoking.last() {
                                for (_, tps) in w.revoking.drain(..) {
                                    for tp in tps {
                                        w.owns.remove(&tp);
                                    }
                                }
                                g.confirm(&id, generation).expect("a member");
                            }
                        }
                    }
                    Op::Wait(ms) => {
                        now += Duration::from_millis(ms);
                        g.expire(now, TIMEOUT);
                        // The evicted are dead: they believe nothing any more.
                        workers.retain(|id, _| g.members.contains_key(id));
                    }
                }
                g.check();
                check_beliefs(&g, &workers);
            }

            // Settle: every worker reads and confirms until nothing is being revoked.
            for _ in 0..10 {
                let ids: Vec<Arc<str>> = workers.keys().cloned().collect();
                for id in ids {
                    let w = workers.get_mut(&id).expect("present");
                    for event in take(&mut g, &id) {
                        match event {
                            AssignmentEvent::Assigned { partitions, .. } => w.owns.extend(partitions),
                            AssignmentEvent::Revoked { partitions, .. } => {
                                for tp in partitions {
                                    w.owns.remove(&tp);
                                }
                            }
                            AssignmentEvent::Standbys { .. } => {}
                        }
                    }
                    // Revokes read earlier and not yet confirmed are confirmed too.
                    for (_, tps) in w.revoking.drain(..) {
                        for tp in tps {
                            w.owns.remove(&tp);
                        }
                    }
                    g.confirm(&id, g.generation()).expect("a member");
                    check_beliefs(&g, &workers);
                }
            }
            prop_assert_eq!(g.pending_revokes(), 0);
            g.check();
            if workers.is_empty() {
                prop_assert!(g.assignment().is_empty());
                return Ok(());
            }
            // Every partition owned by exactly one member, as the workers believe.
            let assignment = g.assignment();
            let mut all: Vec<TopicPartition> = assignment.values().flatten().cloned().collect();
            all.sort();
            let mut want = partitions.clone();
            want.sort();
            prop_assert_eq!(&all, &want);
            for (id, w) in &workers {
                prop_assert_eq!(w.owns.iter().cloned().collect::<Vec<_>>(), assignment[&**id].clone());
            }
            // And it is assign's balanced result for these members (a fixpoint of it).
            let members: Vec<(Arc<str>, u32)> = g.members.iter().map(|(id, m)| (id.clone(), m.weight)).collect();
            let previous: HashMap<TopicPartition, Arc<str>> = assignment
                .iter()
                .flat_map(|(m, tps)| tps.iter().map(move |tp| (tp.clone(), Arc::from(m.as_str()))))
                .collect();
            let balanced = assign(&AssignInput { members: &members, groups: &groups, partitions: &partitions, previous: &previous })
                .expect("valid members");
            let balanced: BTreeMap<String, Vec<TopicPartition>> =
                balanced.into_iter().map(|(m, tps)| (m.to_string(), tps)).collect();
            prop_assert_eq!(balanced, assignment);
        }
    }
}
