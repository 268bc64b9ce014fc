//! Plain data shared by every transport: topic names and partitions, topic settings, offsets
//! and assignments.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// One partition of one topic. Cheap to clone (the name is shared).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// The topic's name.
    pub topic: Arc<str>,
    /// The partition number, from 0.
    pub partition: u32,
}

impl TopicPartition {
    /// The partition `partition` of `topic`.
    pub fn new(topic: impl Into<Arc<str>>, partition: u32) -> Self {
        TopicPartition { topic: topic.into(), partition }
    }
}

impl fmt::Debug for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// How a topic is created: Faust's `partitions`, `retention`, `compacting` and friends.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicConfig {
    /// Number of partitions.
    pub partitions: u32,
    /// Keep only the latest record per key (table changelogs).
    pub compacted: bool,
    /// Delete records older than this (`retention.ms`).
    pub retention: Option<Duration>,
    /// Delete the oldest records while a partition is larger than this (`retention.bytes`).
    pub retention_bytes: Option<u64>,
    /// In a compacted topic, how long a tombstone stays once the key's earlier records are
    /// gone (`delete.retention.ms`; default one day).
    pub delete_retention: Option<Duration>,
    /// On Kafka: the replication factor, instead of the transport's
    /// ([`KafkaOptions::replication_factor`](crate::KafkaOptions)).
    pub replicas: Option<i16>,
    /// On Kafka: more topic configuration, as the broker names it (`min.insync.replicas`,
    /// `segment.bytes`...), sent when the topic is created; an entry here wins over the one
    /// the fields above would send. Other transports read the fields only.
    pub broker_config: Vec<(String, String)>,
}

impl TopicConfig {
    /// A plain topic with `partitions` partitions and no retention limit.
    pub fn new(partitions: u32) -> Self {
        TopicConfig {
            partitions,
            compacted: false,
            retention: None,
            retention_bytes: None,
            delete_retention: None,
            replicas: None,
            broker_config: Vec::new(),
        }
    }

    /// The same topic, compacted.
    pub fn compacted(mut self) -> Self {
        self.compacted = true;
        self
    }
}

/// What a transport knows about an existing topic.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicMetadata {
    /// The topic's name.
    pub name: Arc<str>,
    /// Its settings.
    pub config: TopicConfig,
}

/// Which offset of a partition to look up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The earliest offset still held.
    Earliest,
    /// The high-water mark: the offset the next record will get.
    Latest,
    /// The earliest offset whose record's timestamp is at least this (milliseconds).
    Timestamp(i64),
}

/// Where a consumer starts in a partition that has no committed offset (Faust's
/// `consumer_auto_offset_reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoOffsetReset {
    /// From the earliest offset still held (Faust's default).
    #[default]
    Earliest,
    /// From the high-water mark: only records produced from now on.
    Latest,
}

impl std::str::FromStr for AutoOffsetReset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "earliest" => Ok(AutoOffsetReset::Earliest),
            "latest" => Ok(AutoOffsetReset::Latest),
            other => Err(format!("auto offset reset must be `earliest` or `latest`, not `{other}`")),
        }
    }
}

/// A change in the partitions this worker processes. Each carries the group generation it
/// belongs to: work fetched under an older generation must not be processed or committed
/// after a newer one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignmentEvent {
    /// These partitions are now this worker's.
    Assigned {
        /// The group generation.
        generation: u64,
        /// The partitions added.
        partitions: Vec<TopicPartition>,
    },
    /// These partitions are no longer this worker's: stop, commit, suspend.
    Revoked {
        /// The group generation.
        generation: u64,
        /// The partitions taken away.
        partitions: Vec<TopicPartition>,
    },
    /// The changelog partitions this worker follows as a standby replica from now on (all of
    /// them: the list replaces the previous one). A standby keeps a local copy of another
    /// worker's table partition up to date, so that taking it over replays only the tail.
    Standbys {
        /// The group generation.
        generation: u64,
        /// The changelog partitions to follow.
        partitions: Vec<TopicPartition>,
    },
}

/// What a worker tells its group when it joins: which partitions it can take and how much.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JoinRequest {
    /// The topics whose partitions are shared out among the group's workers: the sources the
    /// worker consumes, and the changelogs of its tables (whose partition *p* holds the state
    /// of partition *p* of the sources it is co-partitioned with).
    pub topics: Vec<String>,
    /// Topics whose partition *p* must go to the same worker, as groups (a source, its
    /// repartition topics, the changelogs of the tables it updates). A topic in no group is
    /// placed on its own.
    pub copartitioned: Vec<Vec<String>>,
    /// The worker's share of the work relative to the others: its number of cores.
    pub weight: u32,
    /// Which of `topics` are table changelogs: a group can place standby replicas of them.
    pub changelogs: Vec<String>,
}

/// Who commits: a member of a consumer group and the generation it was last told of. A
/// transport with groups refuses a commit from a member that no longer owns a partition in
/// it ([`Error::Fenced`](crate::Error::Fenced)), so a worker that was presumed dead cannot
/// overwrite the offsets of the worker that took over.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The member's id in the group.
    pub member: Arc<str>,
    /// The generation of its latest assignment event.
    pub generation: u64,
}

/// The result of a fetch.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    /// Records at or after the requested offset, in offset order (offsets may have gaps).
    pub records: Vec<faust_storage::Record>,
    /// The offset to fetch next.
    pub next_offset: u64,
    /// The partition's high-water mark when the fetch was served.
    pub high_watermark: u64,
}

/// Where a produced batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    /// The partition it was written to.
    pub partition: u32,
    /// Offset of the batch's first record.
    pub base_offset: u64,
    /// Offset of its last record.
    pub last_offset: u64,
}
