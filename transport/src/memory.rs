//! `memory://`: topics held in RAM, for tests. One instance is shared by every core of a
//! worker (and, later, by several workers of one test); it is not meant to be fast.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_listener::Event;
use faust_storage::{Batch, BatchBuilder, Record};

use crate::error::{Error, Result};
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

#[derive(Debug, Default)]
struct State {
    topics: HashMap<Arc<str>, Topic>,
    committed: HashMap<(String, TopicPartition), u64>,
    closed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Notified on every produce and on close, to wake fetches waiting for records.
    appended: Event,
}

/// The in-memory transport. Cloning gives another handle on the same topics.
///
/// ```
/// use faust_transport::{MemoryTransport, TopicConfig, TopicPartition};
///
/// let transport = MemoryTransport::new();
/// transport.create_topic_now("orders", &TopicConfig::new(4)).unwrap();
/// assert_eq!(transport.high_watermark(&TopicPartition::new("orders", 0)).unwrap(), 0);
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

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock can only come from a bug in this module; the state
        // is still consistent (every mutation is a single push or insert), so keep going.
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

    fn membership(&self, _group: &str, join: &JoinRequest) -> Result<MemoryMembership> {
        Ok(MemoryMembership { transport: self.clone(), topics: join.topics.clone(), assigned: false })
    }
}

/// Membership of a single worker: every partition of the subscribed topics, at once.
#[derive(Debug)]
pub struct MemoryMembership {
    transport: MemoryTransport,
    topics: Vec<String>,
    assigned: bool,
}

impl Membership for MemoryMembership {
    async fn next_event(&mut self) -> Result<AssignmentEvent> {
        if !self.assigned {
            self.assigned = true;
            let state = self.transport.lock();
            let mut partitions = Vec::new();
            for name in &self.topics {
                let topic =
                    state.topics.get(name.as_str()).ok_or_else(|| Error::UnknownTopic { topic: name.clone() })?;
                partitions.extend((0..topic.config.partitions).map(|p| TopicPartition::new(name.as_str(), p)));
            }
            return Ok(AssignmentEvent::Assigned { generation: 1, partitions });
        }
        // Nothing changes for a single worker: wait for the transport to close.
        loop {
            let listener = self.transport.shared.appended.listen();
            if self.transport.lock().closed {
                return Err(Error::Closed);
            }
            listener.await;
        }
    }

    async fn revoked(&mut self, _generation: u64) -> Result<()> {
        Ok(())
    }

    fn member_id(&self) -> Option<Arc<str>> {
        None
    }

    async fn leave(&mut self) -> Result<()> {
        Ok(())
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

    async fn commit(&self, group: &str, _fence: Option<&Fence>, offsets: &[(TopicPartition, u64)]) -> Result<()> {
        let mut state = self.lock();
        for (tp, offset) in offsets {
            partition(&state, tp)?;
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
    fn a_single_worker_is_assigned_every_partition_then_waits_for_close() {
        let t = MemoryTransport::new();
        t.create_topic_now("a", &TopicConfig::new(3)).unwrap();
        let join = JoinRequest { topics: vec!["a".to_string()], copartitioned: Vec::new(), weight: 1 };
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
