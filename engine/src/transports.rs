//! The transport a worker runs on, chosen by URL, as an enum over the concrete transports (so
//! the engine's per-core futures need no boxing).

use std::path::PathBuf;
use std::time::Duration;

use faust_transport::{
    AssignmentEvent, BatchBuilder, CoreTransport, Fence, Fetched, JoinRequest, KafkaCore, KafkaMembership,
    KafkaOptions, KafkaTransport, LocalCore, LocalMembership, LocalOptions, LocalTransport, Membership,
    MemoryMembership, MemoryTransport, OffsetSpec, Produced, Result, TopicConfig, TopicMetadata, TopicPartition,
    Transport,
};

/// A worker's transport.
#[derive(Debug, Clone)]
pub(crate) enum AnyTransport {
    Local(LocalTransport),
    Memory(MemoryTransport),
    Kafka(KafkaTransport),
}

/// One core's handle on it.
#[derive(Debug)]
pub(crate) enum AnyCore {
    Local(LocalCore),
    Memory(MemoryTransport),
    Kafka(KafkaCore),
}

pub(crate) enum AnyMembership {
    Local(LocalMembership),
    Memory(MemoryMembership),
    Kafka(KafkaMembership),
}

/// Every group member's advertised URL with the partitions an assignment heads to it.
pub(crate) type Owners = Vec<(String, Vec<TopicPartition>)>;

impl AnyTransport {
    /// Opens the transport named by `url` for `cores` cores. `memory` serves `memory://`;
    /// `kafka` configures `kafka://`. Its `partitions` (`Settings::partitions`, expanded over
    /// the topics the worker may consume) is the static assignment on Kafka; the other
    /// transports refuse it.
    pub(crate) fn open(
        url: &str,
        cores: usize,
        memory: Option<&MemoryTransport>,
        kafka: KafkaOptions,
        segment_bytes: u64,
    ) -> Result<AnyTransport> {
        if url.starts_with("kafka://") {
            return Ok(AnyTransport::Kafka(KafkaTransport::open(url, kafka)?));
        }
        // Faust's name for the same transport.
        if let Some(rest) = url.strip_prefix("aiokafka://") {
            return Ok(AnyTransport::Kafka(KafkaTransport::open(&format!("kafka://{rest}"), kafka)?));
        }
        if kafka.partitions.is_some() && (url.starts_with("local://") || url.starts_with("memory://")) {
            let reason = "the worker's partitions (--partitions, WORKER_PARTITIONS) can only be chosen on kafka://; \
                          local:// has one worker, which takes every partition, and memory:// splits them itself"
                .to_string();
            return Err(faust_transport::Error::InvalidUrl { url: url.to_string(), reason });
        }
        if let Some(path) = url.strip_prefix("local://") {
            let options = LocalOptions { segment_bytes };
            return Ok(AnyTransport::Local(LocalTransport::open_with(PathBuf::from(path), cores, options)?));
        }
        if url.starts_with("memory://") {
            return Ok(AnyTransport::Memory(memory.cloned().unwrap_or_default()));
        }
        let reason = "use local://PATH, memory:// or kafka://HOST:PORT".to_string();
        Err(faust_transport::Error::InvalidUrl { url: url.to_string(), reason })
    }

    pub(crate) async fn attach_core(&self, core: usize, cores: usize) -> Result<AnyCore> {
        Ok(match self {
            AnyTransport::Local(t) => AnyCore::Local(t.attach_core(core, cores).await?),
            AnyTransport::Memory(t) => AnyCore::Memory(t.attach_core(core, cores).await?),
            AnyTransport::Kafka(t) => AnyCore::Kafka(t.attach_core(core, cores).await?),
        })
    }

    pub(crate) fn membership(&self, group: &str, join: &JoinRequest) -> Result<AnyMembership> {
        Ok(match self {
            AnyTransport::Local(t) => AnyMembership::Local(t.membership(group, join)?),
            AnyTransport::Memory(t) => AnyMembership::Memory(t.membership(group, join)?),
            AnyTransport::Kafka(t) => AnyMembership::Kafka(t.membership(group, join)?),
        })
    }

    /// Tells the transport which core processes which partition.
    pub(crate) fn set_owners(&self, owners: &[(TopicPartition, usize)]) {
        if let AnyTransport::Local(t) = self {
            t.set_owners(owners.iter().cloned());
        }
    }

    pub(crate) fn close(&self) {
        match self {
            AnyTransport::Local(t) => t.close(),
            AnyTransport::Memory(_) => {}
            AnyTransport::Kafka(t) => t.close(),
        }
    }
}

impl AnyMembership {
    pub(crate) async fn next_event(&mut self) -> Result<AssignmentEvent> {
        match self {
            AnyMembership::Local(m) => m.next_event().await,
            AnyMembership::Memory(m) => m.next_event().await,
            AnyMembership::Kafka(m) => m.next_event().await,
        }
    }

    pub(crate) async fn revoked(&mut self, generation: u64) -> Result<()> {
        match self {
            AnyMembership::Local(m) => m.revoked(generation).await,
            AnyMembership::Memory(m) => m.revoked(generation).await,
            AnyMembership::Kafka(m) => m.revoked(generation).await,
        }
    }

    pub(crate) fn member_id(&self) -> Option<std::sync::Arc<str>> {
        match self {
            AnyMembership::Local(m) => m.member_id(),
            AnyMembership::Memory(m) => m.member_id(),
            AnyMembership::Kafka(m) => m.member_id(),
        }
    }

    pub(crate) async fn leave(&mut self) -> Result<()> {
        match self {
            AnyMembership::Local(m) => m.leave().await,
            AnyMembership::Memory(m) => m.leave().await,
            AnyMembership::Kafka(m) => m.leave().await,
        }
    }
}

macro_rules! dispatch {
    ($self:expr, $t:ident => $call:expr) => {
        match $self {
            AnyCore::Local($t) => $call,
            AnyCore::Memory($t) => $call,
            AnyCore::Kafka($t) => $call,
        }
    };
}

impl AnyCore {
    pub(crate) async fn create_topic(&self, name: &str, config: &TopicConfig) -> Result<TopicMetadata> {
        dispatch!(self, t => t.create_topic(name, config).await)
    }

    /// On Kafka with a consumer group: every member's advertised URL with the partitions the
    /// latest assignment heads to it, and this worker's own URL.
    pub(crate) fn group_owners(&self, group: &str) -> Option<(Owners, String)> {
        match self {
            AnyCore::Kafka(k) => Some((k.group_owners(group), k.advertised_url().to_string())),
            _ => None,
        }
    }

    pub(crate) async fn topic_metadata(&self, name: &str) -> Result<Option<TopicMetadata>> {
        dispatch!(self, t => t.topic_metadata(name).await)
    }

    /// Every topic's name, sorted, internal ones left out (see `CoreTransport::topic_names`):
    /// what a pattern subscription matches against.
    pub(crate) async fn topic_names(&self) -> Result<Vec<String>> {
        dispatch!(self, t => t.topic_names().await)
    }

    pub(crate) async fn produce(&self, tp: &TopicPartition, batch: BatchBuilder) -> Result<Produced> {
        dispatch!(self, t => t.produce(tp, batch).await)
    }

    pub(crate) async fn fetch(
        &self,
        tp: &TopicPartition,
        offset: u64,
        max_bytes: usize,
        max_wait: Duration,
    ) -> Result<Fetched> {
        dispatch!(self, t => t.fetch(tp, offset, max_bytes, max_wait).await)
    }

    pub(crate) async fn list_offset(&self, tp: &TopicPartition, spec: OffsetSpec) -> Result<u64> {
        dispatch!(self, t => t.list_offset(tp, spec).await)
    }

    pub(crate) async fn commit(
        &self,
        group: &str,
        fence: Option<&Fence>,
        offsets: &[(TopicPartition, u64)],
    ) -> Result<()> {
        dispatch!(self, t => t.commit(group, fence, offsets).await)
    }

    /// Exactly-once on Kafka: puts `offsets` into the open transaction and commits it (one is
    /// opened for the offsets if nothing was produced). Other transports have no transactions.
    pub(crate) async fn commit_transaction(
        &self,
        group: &str,
        fence: Option<&Fence>,
        offsets: &[(TopicPartition, u64)],
    ) -> Result<()> {
        let AnyCore::Kafka(k) = self else {
            return Err(faust_transport::Error::KafkaProtocol {
                broker: String::new(),
                api: "EndTxn",
                topic: None,
                partition: None,
                reason: "only kafka:// has transactions".into(),
            });
        };
        if !offsets.is_empty() {
            if !k.transaction_open() {
                k.begin_transaction()?;
            }
            k.send_offsets_to_transaction(group, fence, offsets).await?;
        }
        if k.transaction_open() {
            k.commit_transaction().await?;
        }
        Ok(())
    }

    pub(crate) async fn committed(&self, group: &str, partitions: &[TopicPartition]) -> Result<Vec<Option<u64>>> {
        dispatch!(self, t => t.committed(group, partitions).await)
    }

    /// Repairs the damaged log of `tp` (see [`LocalCore::repair`]); `None` where the transport
    /// keeps no logs of its own (a Kafka broker repairs its own).
    pub(crate) fn repair(&self, tp: &TopicPartition) -> Option<Result<faust_storage::RepairReport>> {
        match self {
            AnyCore::Local(t) => Some(t.repair(tp)),
            AnyCore::Memory(_) | AnyCore::Kafka(_) => None,
        }
    }

    /// Records of `tp` at or past `offset` take no part in its compaction (see
    /// [`LocalCore::set_compaction_horizon`]); a Kafka broker compacts on its own, and
    /// `memory://` keeps no files.
    pub(crate) fn set_compaction_horizon(&self, tp: &TopicPartition, offset: u64) {
        if let AnyCore::Local(t) = self {
            t.set_compaction_horizon(tp, offset);
        }
    }

    /// Deletes the records of `tp` below `offset`, whole segments at a time (see
    /// [`LocalCore::delete_records_below`]); `Ok(0)` where the transport keeps no files of
    /// its own.
    pub(crate) fn delete_records_below(&self, tp: &TopicPartition, offset: u64) -> Result<u64> {
        match self {
            AnyCore::Local(t) => t.delete_records_below(tp, offset),
            AnyCore::Memory(_) | AnyCore::Kafka(_) => Ok(0),
        }
    }

    /// A bounded step of upkeep on the logs this core owns (see [`LocalCore::maintain`]);
    /// whether more is waiting.
    pub(crate) fn maintain(&self, budget_bytes: usize) -> Result<bool> {
        match self {
            AnyCore::Local(t) => t.maintain(budget_bytes),
            AnyCore::Memory(_) | AnyCore::Kafka(_) => Ok(false),
        }
    }

    pub(crate) async fn shutdown(self) -> Result<()> {
        dispatch!(self, t => t.shutdown().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Static partitions are Kafka's; the other transports refuse them by name.
    #[test]
    fn only_kafka_takes_static_partitions() {
        let some = || Some(vec![TopicPartition::new("t", 0)]);
        let kafka = || KafkaOptions { partitions: some(), ..KafkaOptions::default() };
        let dir = tempfile::tempdir().unwrap();
        let local = format!("local://{}", dir.path().display());
        for url in [local.as_str(), "memory://"] {
            match AnyTransport::open(url, 1, None, kafka(), 64 << 20) {
                Err(faust_transport::Error::InvalidUrl { reason, .. }) => {
                    assert!(reason.contains("kafka://"), "{reason}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        match AnyTransport::open("kafka://127.0.0.1:9092", 1, None, kafka(), 64 << 20) {
            Ok(AnyTransport::Kafka(t)) => assert_eq!(t.options().partitions, some()),
            other => panic!("{other:?}"),
        }
        let none = KafkaOptions::default();
        assert!(matches!(AnyTransport::open("memory://", 1, None, none, 64 << 20), Ok(AnyTransport::Memory(_))));
    }
}
