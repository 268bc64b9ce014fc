//! `memory://`: topics held in RAM, for tests. One instance is shared by every core of a
//! worker, and by several workers of one test: its clones are one in-process broker, with
//! consumer groups the workers join. It is not meant to be fast.
//!
//! # Consumer groups
//!
//! [`Transport::membership`] makes the worker a member of a group (the coordinator, in
//! `group.rs`, documents the protocol in full). Every join, leave and eviction is a
//! rebalance: the generation goes up and [`assign`](crate::assign()) computes a sticky,
//! weighted, co-partition-aware target over the members. Partitions that must move are first
//! revoked from their owner ([`AssignmentEvent::Revoked`]); the owner keeps them until it
//! confirms with [`Membership::revoked`], and only then does the new owner get them
//! ([`AssignmentEvent::Assigned`]). Free partitions are assigned at once. A member that does
//! not confirm a revoke within the rebalance timeout
//! ([`MemoryTransport::set_rebalance_timeout`], 30 s by default) is evicted: its partitions
//! are reassigned, and its requests and fenced commits fail with [`Error::Fenced`].
//!
//! There is no background thread: deadlines are enforced whenever anyone calls into a group
//! (joins, events, confirmations, fenced commits, the inspection helpers), and a member waiting
//! in [`Membership::next_event`] wakes up at least every 50 ms to do so.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_listener::Event;
use faust_storage::{Batch, BatchBuilder, Record};

use crate::error::{Error, Result};
use crate::group::Group;
use crate::types::{
    AssignmentEvent, Fence, Fetched, JoinRequest, OffsetSpec, Produced, TopicConfig, TopicMetadata, TopicPartition,
};
use crate::{CoreTransport, Membership, Transport};

#[derive(Debug, Default)]
struct Partition {
    /// Records in offset order; `records[i].offset == earliest + i` until retention or
    /// compaction exist here (they do not: tests keep everything).
    records: Vec<Record>,
    next_offset: u64,
}

#[derive(Debug)]
struct Topic {
    config: TopicConfig,
    partitions: Vec<Partition>,
}

/// The rebalance timeout of a new transport.
const DEFAULT_REBALANCE_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest a member waiting for an event sleeps before checking the groups' deadlines
/// again (there is no background thread to do it).
const DEADLINE_TICK: Duration = Duration::from_millis(50);

#[derive(Debug)]
struct State {
    topics: HashMap<Arc<str>, Topic>,
    committed: HashMap<(String, TopicPartition), u64>,
    closed: bool,
    /// The consumer groups, by name.
    groups: HashMap<String, Group>,
    /// The number of the next member id (`member-{n}`): ids are never reused, so a removed
    /// member's handle can never be mistaken for a new member.
    next_member: u64,
    /// How long a member has to confirm a revoke before it is evicted. Here, not in each
    /// handle, so that setting it on one clone sets it for all.
    rebalance_timeout: Duration,
}

impl Default for State {
    fn default() -> Self {
        State {
            topics: HashMap::new(),
            committed: HashMap::new(),
            closed: false,
            groups: HashMap::new(),
            next_member: 1,
            rebalance_timeout: DEFAULT_REBALANCE_TIMEOUT,
        }
    }
}

impl State {
    /// `group`, after evicting its members whose deadline has passed. Returns whether an
    /// eviction changed the group (the caller then wakes the waiting members).
    fn group_now(&mut self, group: &str, now: Instant) -> (&mut Group, bool) {
        let timeout = self.rebalance_timeout;
        let g = self.groups.entry(group.to_string()).or_default();
        let changed = g.expire(now, timeout);
        (g, changed)
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Notified on every produce and on close, to wake fetches waiting for records.
    appended: Event,
    /// Notified on every change of a group (events queued, members removed) and on close, to
    /// wake members waiting for an event.
    group_changed: Event,
}

/// The in-memory transport. Cloning gives another handle on the same topics and groups.
///
/// ```
/// use faust_transport::{MemoryTransport, TopicConfig, TopicPartition};
///
/// let transport = MemoryTransport::new();
/// transport.create_topic_now("orders", &TopicConfig::new(4)).unwrap();
/// assert_eq!(transport.high_watermark(&TopicPartition::new("orders", 0)).unwrap(), 0);
/// ```
///
/// Two workers sharing it as a consumer group: the second gets its half once the first has
/// released it.
///
/// ```
/// use faust_transport::{AssignmentEvent, JoinRequest, Membership, MemoryTransport, TopicConfig, Transport};
/// use futures_lite::future::block_on;
///
/// let transport = MemoryTransport::new();
/// transport.create_topic_now("orders", &TopicConfig::new(4)).unwrap();
/// let join = JoinRequest { topics: vec!["orders".into()], copartitioned: vec![], weight: 1, changelogs: vec![] };
/// let mut first = transport.membership("app", &join).unwrap();
/// let mut second = transport.clone().membership("app", &join).unwrap();
/// block_on(async {
///     // The first got everything (generation 1), then is asked to give half back (2).
///     assert!(matches!(first.next_event().await.unwrap(), AssignmentEvent::Assigned { generation: 1, .. }));
///     let AssignmentEvent::Revoked { generation, partitions } = first.next_event().await.unwrap() else {
///         unreachable!()
///     };
///     // The second is in, with nothing until the first confirms.
///     let empty = AssignmentEvent::Assigned { generation: 2, partitions: vec![] };
///     assert_eq!(second.next_event().await.unwrap(), empty);
///     first.revoked(generation).await.unwrap();
///     assert_eq!(second.next_event().await.unwrap(), AssignmentEvent::Assigned { generation: 2, partitions });
/// });
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryTransport {
    shared: Arc<Shared>,
}

impl MemoryTransport {
    /// An empty transport.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same transport, with `timeout` as its rebalance timeout (see
    /// [`set_rebalance_timeout`](MemoryTransport::set_rebalance_timeout)).
    pub fn with_rebalance_timeout(self, timeout: Duration) -> Self {
        self.set_rebalance_timeout(timeout);
        self
    }

    /// Sets how long a group member has to confirm a revoke ([`Membership::revoked`]) before
    /// it is evicted (30 s by default). It applies to every clone of this transport, and to the
    /// revokes started from now on (a revoke's deadline is set when it starts).
    pub fn set_rebalance_timeout(&self, timeout: Duration) {
        self.lock().rebalance_timeout = timeout;
    }

    /// The members of `group` with the partitions each owns now, sorted, including those being
    /// revoked (still owned by the member revoking them until it confirms). A member owning
    /// nothing is listed with no partition; an unknown group gives an empty map.
    pub fn group_assignment(&self, group: &str) -> BTreeMap<String, Vec<TopicPartition>> {
        self.inspect(group, |g| g.assignment())
    }

    /// The generation of `group`: the number of rebalances so far (0 for an unknown group; a
    /// lone worker's join makes it 1).
    pub fn group_generation(&self, group: &str) -> u64 {
        self.inspect(group, |g| g.generation())
    }

    /// How many partitions of `group` are being revoked: their owners were told to release
    /// them and have not confirmed yet.
    pub fn pending_revokes(&self, group: &str) -> usize {
        self.inspect(group, |g| g.pending_revokes())
    }

    /// Evicts `member` from `group` as if it had missed the rebalance deadline: its
    /// partitions go to the others at once, and its requests and fenced commits fail with
    /// [`Error::Fenced`] from then on. Returns whether it was a member.
    pub fn evict(&self, group: &str, member: &str) -> bool {
        let mut state = self.lock();
        let timeout = state.rebalance_timeout;
        let evicted = state
            .groups
            .get_mut(group)
            .is_some_and(|g| g.evict(member, "evicted by MemoryTransport::evict".to_string(), Instant::now(), timeout));
        drop(state);
        if evicted {
            self.shared.group_changed.notify(usize::MAX);
        }
        evicted
    }

    /// Runs `f` on `group` (a default, empty group if unknown) after enforcing its deadlines.
    fn inspect<T>(&self, group: &str, f: impl FnOnce(&Group) -> T) -> T {
        let mut state = self.lock();
        if !state.groups.contains_key(group) {
            return f(&Group::default());
        }
        let (g, changed) = state.group_now(group, Instant::now());
        let out = f(g);
        drop(state);
        if changed {
            self.shared.group_changed.notify(usize::MAX);
        }
        out
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock can only come from a bug in this module; the state
        // is still consistent (every topic mutation is a single push or insert, and a group
        // update can only panic in `assign`, before it changes anything), so keep going.
        self.shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Creates a topic (see [`CoreTransport::create_topic`]), callable from any thread.
    pub fn create_topic_now(&self, name: &str, config: &TopicConfig) -> Result<TopicMetadata> {
        let mut state = self.lock();
        if let Some(t) = state.topics.get(name) {
            if t.config.partitions != config.partitions {
                return Err(Error::PartitionMismatch {
                    topic: name.to_string(),
                    existing: t.config.partitions,
                    requested: config.partitions,
                });
            }
            return Ok(TopicMetadata { name: Arc::from(name), config: t.config.clone() });
        }
        let name: Arc<str> = Arc::from(name);
        let partitions = (0..config.partitions).map(|_| Partition::default()).collect();
        state.topics.insert(name.clone(), Topic { config: config.clone(), partitions });
        Ok(TopicMetadata { name, config: config.clone() })
    }

    /// The high-water mark of `tp`.
    pub fn high_watermark(&self, tp: &TopicPartition) -> Result<u64> {
        let state = self.lock();
        Ok(partition(&state, tp)?.next_offset)
    }

    /// Every record of `tp`, for test assertions.
    pub fn records(&self, tp: &TopicPartition) -> Result<Vec<Record>> {
        let state = self.lock();
        Ok(partition(&state, tp)?.records.clone())
    }

    /// Fails every pending and later request with [`Error::Closed`].
    pub fn close(&self) {
        self.lock().closed = true;
        self.shared.appended.notify(usize::MAX);
        self.shared.group_changed.notify(usize::MAX);
    }

    fn produce_now(&self, tp: &TopicPartition, mut batch: BatchBuilder) -> Result<Produced> {
        let mut state = self.lock();
        if state.closed {
            return Err(Error::Produce { tp: tp.clone(), batch: Box::new(batch), source: Box::new(Error::Closed) });
        }
        let part = match partition_mut(&mut state, tp) {
            Ok(p) => p,
            Err(e) => return Err(Error::Produce { tp: tp.clone(), batch: Box::new(batch), source: Box::new(e) }),
        };
        if batch.is_empty() {
            return Ok(Produced {
                partition: tp.partition,
                base_offset: part.next_offset,
                last_offset: part.next_offset.wrapping_sub(1),
            });
        }
        let base = part.next_offset;
        let sealed = Batch::from_builder(&mut batch, base);
        part.records.extend(sealed.records());
        part.next_offset = sealed.last_offset() + 1;
        let produced = Produced { partition: tp.partition, base_offset: base, last_offset: sealed.last_offset() };
        drop(state);
        self.shared.appended.notify(usize::MAX);
        Ok(produced)
    }

    fn fetch_now(&self, tp: &TopicPartition, offset: u64, max_bytes: usize) -> Result<Option<Fetched>> {
        let state = self.lock();
        if state.closed {
            return Err(Error::Closed);
        }
        let part = partition(&state, tp)?;
        let earliest = part.records.first().map(|r| r.offset).unwrap_or(part.next_offset);
        if offset > part.next_offset || offset < earliest {
            return Err(Error::OffsetOutOfRange {
                tp: tp.clone(),
                requested: offset,
                earliest,
                high_watermark: part.next_offset,
            });
        }
        if offset == part.next_offset {
            return Ok(None);
        }
        let start = part.records.partition_point(|r| r.offset < offset);
        let mut bytes = 0usize;
        let mut records = Vec::new();
        for r in &part.records[start..] {
            if bytes >= max_bytes && !records.is_empty() {
                break;
            }
            bytes += r.key.as_ref().map_or(0, |k| k.len()) + r.value.as_ref().map_or(0, |v| v.len()) + 16;
            records.push(r.clone());
        }
        let next_offset = records.last().map(|r| r.offset + 1).unwrap_or(offset);
        Ok(Some(Fetched { records, next_offset, high_watermark: part.next_offset }))
    }
}

fn partition<'a>(state: &'a State, tp: &TopicPartition) -> Result<&'a Partition> {
    let topic = state.topics.get(&tp.topic).ok_or_else(|| Error::UnknownTopic { topic: tp.topic.to_string() })?;
    topic.partitions.get(tp.partition as usize).ok_or_else(|| Error::UnknownPartition { tp: tp.clone() })
}

fn partition_mut<'a>(state: &'a mut State, tp: &TopicPartition) -> Result<&'a mut Partition> {
    let topic = state.topics.get_mut(&tp.topic).ok_or_else(|| Error::UnknownTopic { topic: tp.topic.to_string() })?;
    topic.partitions.get_mut(tp.partition as usize).ok_or_else(|| Error::UnknownPartition { tp: tp.clone() })
}

impl Transport for MemoryTransport {
    type Core = MemoryTransport;
    type Membership = MemoryMembership;

    async fn attach_core(&self, _core: usize, _cores: usize) -> Result<MemoryTransport> {
        Ok(self.clone())
    }

    /// Joins `group` as a new member `member-{n}` and rebalances (see the module
    /// documentation). Every topic of `join.topics` must exist ([`Error::UnknownTopic`]); a
    /// weight of 0 counts as 1. The group shares out the union of its members' topics, with the
    /// union of their co-partitioned groups. The member's first event is an
    /// [`AssignmentEvent::Assigned`] of its join's generation, possibly empty when what it is
    /// due is still being revoked from others.
    fn membership(&self, group: &str, join: &JoinRequest) -> Result<MemoryMembership> {
        let mut state = self.lock();
        if state.closed {
            return Err(Error::Closed);
        }
        let mut partitions = Vec::new();
        for name in &join.topics {
            let topic = state.topics.get(name.as_str()).ok_or_else(|| Error::UnknownTopic { topic: name.clone() })?;
            let name: Arc<str> = Arc::from(name.as_str());
            partitions.extend((0..topic.config.partitions).map(|p| TopicPartition::new(name.clone(), p)));
        }
        let copartitioned: Vec<Vec<Arc<str>>> =
            join.copartitioned.iter().map(|g| g.iter().map(|t| Arc::from(t.as_str())).collect()).collect();
        let id: Arc<str> = Arc::from(format!("member-{}", state.next_member));
        state.next_member += 1;
        let timeout = state.rebalance_timeout;
        let now = Instant::now();
        let (g, _) = state.group_now(group, now);
        g.join(id.clone(), join.weight, partitions, copartitioned, now, timeout);
        drop(state);
        self.shared.group_changed.notify(usize::MAX);
        Ok(MemoryMembership { transport: self.clone(), group: group.to_string(), id, left: false })
    }
}

/// A worker's membership of a consumer group of a [`MemoryTransport`].
///
/// Dropping it without [`leave`](Membership::leave) also removes the member from the group (a
/// test can simulate a crash that way), and so gives its partitions to the others at once.
#[derive(Debug)]
pub struct MemoryMembership {
    transport: MemoryTransport,
    group: String,
    id: Arc<str>,
    /// Set once `leave` removed the member, so that dropping the handle does not again.
    left: bool,
}

impl MemoryMembership {
    fn fenced(&self, tp: Option<TopicPartition>, reason: String) -> Error {
        Error::Fenced { group: self.group.clone(), member: self.id.to_string(), tp, reason }
    }

    /// Runs `f` on this member's group after enforcing its deadlines, and wakes the waiting
    /// members if the group changed (by an eviction, or by `f` when it returns `true`).
    fn with_group<T>(&self, f: impl FnOnce(&mut Group) -> (T, bool)) -> Result<T> {
        let mut state = self.transport.lock();
        if state.closed {
            return Err(Error::Closed);
        }
        let (g, expired) = state.group_now(&self.group, Instant::now());
        let (out, changed) = f(g);
        drop(state);
        if expired || changed {
            self.transport.shared.group_changed.notify(usize::MAX);
        }
        Ok(out)
    }
}

impl Membership for MemoryMembership {
    async fn next_event(&mut self) -> Result<AssignmentEvent> {
        loop {
            // Listen before looking, so a change between the look and the wait still wakes us.
            let listener = self.transport.shared.group_changed.listen();
            let looked = self.with_group(|g| {
                let event = g.next_event(&self.id);
                (event.map(|e| (e, g.next_deadline())), false)
            })?;
            let deadline = match looked {
                Ok((Some(event), _)) => return Ok(event),
                Ok((None, deadline)) => deadline,
                Err(not) => return Err(self.fenced(None, not.reason)),
            };
            // Wake up at the next deadline of the group, or after a tick at the latest, to
            // evict whoever missed it (the timer works on any executor).
            let wait = deadline
                .map(|d| d.saturating_duration_since(Instant::now()).min(DEADLINE_TICK))
                .unwrap_or(DEADLINE_TICK);
            futures_lite::future::or(listener, futures_timer::Delay::new(wait)).await;
        }
    }

    async fn revoked(&mut self, generation: u64) -> Result<()> {
        self.with_group(|g| (g.confirm(&self.id, generation), true))?.map_err(|not| self.fenced(None, not.reason))
    }

    fn member_id(&self) -> Option<Arc<str>> {
        Some(self.id.clone())
    }

    /// Leaves the group: the partitions go to the others at once. Leaving again does nothing;
    /// a member that was evicted gets [`Error::Fenced`] (its last commits may have been
    /// refused). Works on a closed transport too.
    async fn leave(&mut self) -> Result<()> {
        if self.left {
            return Ok(());
        }
        self.left = true;
        let mut state = self.transport.lock();
        let timeout = state.rebalance_timeout;
        let (g, _) = state.group_now(&self.group, Instant::now());
        let result = if g.leave(&self.id, Instant::now(), timeout) {
            Ok(())
        } else {
            let reason = g.not_member(&self.id).reason;
            g.forget(&self.id);
            Err(self.fenced(None, reason))
        };
        drop(state);
        self.transport.shared.group_changed.notify(usize::MAX);
        result
    }
}

impl Drop for MemoryMembership {
    fn drop(&mut self) {
        if self.left {
            return;
        }
        let mut state = self.transport.lock();
        let timeout = state.rebalance_timeout;
        if let Some(g) = state.groups.get_mut(&self.group) {
            g.leave(&self.id, Instant::now(), timeout);
            g.forget(&self.id);
        }
        drop(state);
        self.transport.shared.group_changed.notify(usize::MAX);
    }
}

impl CoreTransport for MemoryTransport {
    async fn create_topic(&self, name: &str, config: &TopicConfig) -> Result<TopicMetadata> {
        self.create_topic_now(name, config)
    }

    async fn topic_metadata(&self, name: &str) -> Result<Option<TopicMetadata>> {
        let state = self.lock();
        Ok(state.topics.get(name).map(|t| TopicMetadata { name: Arc::from(name), config: t.config.clone() }))
    }

    /// The topics in the shared state: every topic any clone of this transport created.
    async fn topic_names(&self) -> Result<Vec<String>> {
        let state = self.lock();
        let mut names: Vec<String> =
            state.topics.keys().filter(|name| !crate::is_internal_topic(name)).map(|name| name.to_string()).collect();
        names.sort_unstable();
        Ok(names)
    }

    async fn produce(&self, tp: &TopicPartition, batch: BatchBuilder) -> Result<Produced> {
        self.produce_now(tp, batch)
    }

    async fn fetch(&self, tp: &TopicPartition, offset: u64, max_bytes: usize, max_wait: Duration) -> Result<Fetched> {
        let deadline = Instant::now() + max_wait;
        loop {
            // Listen before looking, so a produce between the look and the wait still wakes us.
            let listener = self.shared.appended.listen();
            if let Some(f) = self.fetch_now(tp, offset, max_bytes)? {
                return Ok(f);
            }
            let now = Instant::now();
            if now >= deadline {
                let hw = self.high_watermark(tp)?;
                return Ok(Fetched { records: Vec::new(), next_offset: offset, high_watermark: hw });
            }
            // Wake at the deadline even if nothing is produced (the timer is runtime-agnostic,
            // so this works on any executor).
            let timeout = futures_timer::Delay::new(deadline - now);
            futures_lite::future::or(listener, timeout).await;
        }
    }

    async fn list_offset(&self, tp: &TopicPartition, spec: OffsetSpec) -> Result<u64> {
        let state = self.lock();
        let part = partition(&state, tp)?;
        let earliest = part.records.first().map(|r| r.offset).unwrap_or(part.next_offset);
        Ok(match spec {
            OffsetSpec::Earliest => earliest,
            OffsetSpec::Latest => part.next_offset,
            OffsetSpec::Timestamp(ts) => {
                part.records.iter().find(|r| r.timestamp >= ts).map(|r| r.offset).unwrap_or(part.next_offset)
            }
        })
    }

    /// Records `offsets` for `group`. With a `fence`, the member must be in the group and own
    /// every partition (being revoked counts: it owns them until it confirms), given to it at
    /// the fence's generation or earlier; otherwise [`Error::Fenced`]. All or nothing: a
    /// refused commit (fenced, or naming an unknown partition) writes no offset.
    async fn commit(&self, group: &str, fence: Option<&Fence>, offsets: &[(TopicPartition, u64)]) -> Result<()> {
        let mut state = self.lock();
        for (tp, _) in offsets {
            partition(&state, tp)?;
        }
        if let Some(fence) = fence {
            let fenced =
                |tp, reason| Error::Fenced { group: group.to_string(), member: fence.member.to_string(), tp, reason };
            if !state.groups.contains_key(group) {
                let tp = offsets.first().map(|(tp, _)| tp.clone());
                return Err(fenced(tp, "not a member of the group (no such group)".to_string()));
            }
            let (g, expired) = state.group_now(group, Instant::now());
            let checked = g.check_commit(&fence.member, fence.generation, offsets.iter().map(|(tp, _)| tp));
            if expired {
                self.shared.group_changed.notify(usize::MAX);
            }
            checked.map_err(|refused| fenced(refused.tp, refused.reason))?;
        }
        for (tp, offset) in offsets {
            state.committed.insert((group.to_string(), tp.clone()), *offset);
        }
        Ok(())
    }

    async fn committed(&self, group: &str, partitions: &[TopicPartition]) -> Result<Vec<Option<u64>>> {
        let state = self.lock();
        Ok(partitions.iter().map(|tp| state.committed.get(&(group.to_string(), tp.clone())).copied()).collect())
    }

    async fn shutdown(self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    fn batch(values: &[&str]) -> BatchBuilder {
        let mut b = BatchBuilder::new();
        for v in values {
            b.push(7, Some(b"k"), Some(v.as_bytes()), &[(b"h", Some(b"x"))]);
        }
        b
    }

    #[test]
    fn produce_then_fetch_from_any_offset() {
        let t = MemoryTransport::new();
        let tp = TopicPartition::new("a", 1);
        block_on(async {
            t.create_topic("a", &TopicConfig::new(2)).await.unwrap();
            let p = t.produce(&tp, batch(&["x", "y", "z"])).await.unwrap();
            assert_eq!((p.base_offset, p.last_offset), (0, 2));
            let f = t.fetch(&tp, 1, 1 << 20, Duration::ZERO).await.unwrap();
            let values: Vec<_> = f.records.iter().map(|r| r.value.clone().unwrap()).collect();
            assert_eq!(values, vec!["y", "z"]);
            assert_eq!((f.next_offset, f.high_watermark), (3, 3));
            assert_eq!(f.records[0].headers().collect::<Vec<_>>(), vec![(&b"h"[..], Some(&b"x"[..]))]);
            let err = t.fetch(&tp, 4, 1 << 20, Duration::ZERO).await.unwrap_err();
            assert!(matches!(err, Error::OffsetOutOfRange { requested: 4, .. }));
        });
    }

    #[test]
    fn fetch_waits_for_a_produce_from_another_thread() {
        let t = MemoryTransport::new();
        t.create_topic_now("a", &TopicConfig::new(1)).unwrap();
        let tp = TopicPartition::new("a", 0);
        let producer = {
            let (t, tp) = (t.clone(), tp.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                block_on(t.produce(&tp, batch(&["late"]))).unwrap();
            })
        };
        let start = Instant::now();
        let f = block_on(t.fetch(&tp, 0, 1 << 20, Duration::from_secs(10))).unwrap();
        assert_eq!(f.records.len(), 1);
        assert!(start.elapsed() < Duration::from_secs(5));
        producer.join().unwrap();
        // With nothing to fetch, the wait ends at max_wait with no record.
        let start = Instant::now();
        let f = block_on(t.fetch(&tp, 1, 1 << 20, Duration::from_millis(30))).unwrap();
        assert!(f.records.is_empty());
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn commits_and_partition_checks() {
        let t = MemoryTransport::new();
        block_on(async {
            t.create_topic("a", &TopicConfig::new(2)).await.unwrap();
            let err = t.create_topic("a", &TopicConfig::new(3)).await.unwrap_err();
            assert!(matches!(err, Error::PartitionMismatch { existing: 2, requested: 3, .. }));
            let tps = [TopicPartition::new("a", 0), TopicPartition::new("a", 1)];
            t.commit("g", None, &[(tps[1].clone(), 5)]).await.unwrap();
            assert_eq!(t.committed("g", &tps).await.unwrap(), vec![None, Some(5)]);
            assert_eq!(t.committed("other", &tps).await.unwrap(), vec![None, None]);
            let err = t.produce(&TopicPartition::new("nope", 0), batch(&["x"])).await.unwrap_err();
            assert_eq!(err.into_batch().map(|b| b.len()), Some(1), "a failed produce hands the batch back");
        });
    }

    #[test]
    fn topic_names_are_sorted_and_leave_internal_topics_out() {
        let t = MemoryTransport::new();
        block_on(async {
            assert!(t.topic_names().await.unwrap().is_empty());
            t.create_topic("orders-us", &TopicConfig::new(1)).await.unwrap();
            t.create_topic("__consumer_offsets", &TopicConfig::new(1)).await.unwrap();
            // Created through another handle on the same broker.
            t.clone().create_topic_now("orders-eu", &TopicConfig::new(2)).unwrap();
            assert_eq!(t.topic_names().await.unwrap(), ["orders-eu", "orders-us"]);
        });
    }

    #[test]
    fn a_single_worker_is_assigned_every_partition_then_waits_for_close() {
        let t = MemoryTransport::new();
        t.create_topic_now("a", &TopicConfig::new(3)).unwrap();
        let join =
            JoinRequest { topics: vec!["a".to_string()], copartitioned: Vec::new(), weight: 1, changelogs: Vec::new() };
        let mut m = t.membership("g", &join).unwrap();
        let event = block_on(m.next_event()).unwrap();
        let AssignmentEvent::Assigned { generation, partitions } = event else { panic!("{event:?}") };
        assert_eq!(generation, 1);
        assert_eq!(partitions.len(), 3);
        let closer = {
            let t = t.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                t.close();
            })
        };
        assert!(matches!(block_on(m.next_event()), Err(Error::Closed)));
        closer.join().unwrap();
    }
}
