//! The contract between the runtime and table shards: what the commit protocol, recovery
//! and assignment changes need of a shard, whatever its types, and the token that tags a
//! write with the event it belongs to. Tables implement it (`table/`); windowed tables,
//! global tables and standbys would be more implementors.

use std::any::Any;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use faust_storage::{BatchBuilder, Record, WriteBatch};
use faust_transport::TopicPartition;

use crate::codec::Codec;
use crate::error::TableError;

/// What the worker needs of a table, whatever its types.
pub(crate) trait TableMeta: Send + Sync {
    fn name(&self) -> &Arc<str>;
    fn changelog(&self) -> &Arc<str>;
    fn partitions(&self) -> Option<u32>;
    fn partitions_like(&self) -> Option<Arc<str>>;
    fn in_memory(&self) -> bool;
    /// Whether the table is the windows of a windowed table (keys `{key, start, end}`).
    fn windowed(&self) -> bool;
    /// The key and value codecs.
    fn codecs(&self) -> (Codec, Codec);
    fn open(&self, args: ShardArgs) -> Result<Rc<dyn AnyShard>, TableError>;
}

/// Where a shard is opened.
pub(crate) struct ShardArgs {
    pub(crate) partition: u32,
    /// The store's directory; `None` keeps the shard in memory.
    pub(crate) dir: Option<PathBuf>,
    /// The size of the store's segment files.
    pub(crate) segment_bytes: u64,
}

/// Identifies the event a table write belongs to: the agent and the event's position.
#[derive(Debug, Clone, Eq)]
pub(crate) struct Token {
    pub(crate) agent: usize,
    pub(crate) topic: Arc<str>,
    pub(crate) partition: u32,
    pub(crate) offset: u64,
    pub(crate) timestamp: i64,
}

/// Whether `a` and `b` name the same topic: the same `Arc` nearly always (every record of a
/// partition shares its name), the same text otherwise.
#[inline]
pub(crate) fn same_topic(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

impl PartialEq for Token {
    fn eq(&self, other: &Token) -> bool {
        self.offset == other.offset
            && self.partition == other.partition
            && self.agent == other.agent
            && self.timestamp == other.timestamp
            && same_topic(&self.topic, &other.topic)
    }
}

impl Token {
    pub(crate) fn matches(&self, agent: usize, tp: &TopicPartition, offset: u64) -> bool {
        self.offset == offset
            && self.partition == tp.partition
            && self.agent == agent
            && same_topic(&self.topic, &tp.topic)
    }
}

/// A shard as the worker sees it, whatever its types.
pub(crate) trait AnyShard {
    fn as_any(&self) -> &dyn Any;
    fn name(&self) -> &str;
    /// The committed value of an encoded key, as JSON (`None`: absent), for the control
    /// socket's `table get`.
    fn lookup_json(&self, key: &[u8]) -> Result<Option<serde_json::Value>, TableError>;
    /// Every committed key and value, as JSON, for `table dump`.
    fn items_json(&self) -> Result<Vec<(serde_json::Value, serde_json::Value)>, TableError>;
    fn partition(&self) -> u32;
    fn changelog(&self) -> &TopicPartition;
    /// The events at `offsets` (ascending) of `tp` were acked by `agent`: their writes (in
    /// place already) stand, and their undo entries go.
    fn acked(&self, agent: usize, tp: &TopicPartition, offsets: &[u64]);
    /// The agent failed on the events `which` picks, or they were abandoned: every key they
    /// wrote gets back exactly its previous value.
    fn undo(&self, which: &dyn Fn(&Token) -> bool);
    /// Whether the undo log holds writes of events in flight (the core settles the shard at
    /// their ack).
    fn holds_writes_in_flight(&self) -> bool;
    /// Whether writes of an event at or past the committable offset of its partition were
    /// acked since the last freeze (events acked out of order): such a state cannot be
    /// committed with those offsets.
    fn applied_beyond(&self, committable: &dyn Fn(&TopicPartition) -> Option<u64>) -> bool;
    fn is_dirty(&self) -> bool;
    /// Takes the dirty entries, to be written by the commit under way.
    fn freeze(&self) -> Box<dyn FrozenSet>;
    /// Gives back the entries of a commit that failed before they were all durable: they are
    /// dirty again (a key written since keeps its newer value), so the next commit writes
    /// them.
    fn restore(&self, frozen: Box<dyn FrozenSet>);
    /// The changelog end a commit wrote that is not committed yet (it failed after writing):
    /// the next commit commits it even if nothing else changed.
    fn written_end(&self) -> Option<u64>;
    fn set_written_end(&self, end: Option<u64>);
    fn write_store(&self, batch: &mut WriteBatch) -> Result<(), TableError>;
    /// Takes a checkpoint of the store saying that the state is the changelog's up to
    /// `changelog_offset` (`None` for a shard without a store); its file is written off the
    /// core ([`PendingCheckpoint::write`](faust_storage::PendingCheckpoint::write)), then
    /// [`finish_checkpoint`](AnyShard::finish_checkpoint) puts it in force.
    fn prepare_checkpoint(
        &self,
        changelog_offset: u64,
        sources: Vec<(String, u32, u64)>,
    ) -> Result<Option<faust_storage::PendingCheckpoint>, TableError>;
    /// Puts a written checkpoint in force.
    fn finish_checkpoint(&self, pending: faust_storage::PendingCheckpoint);
    /// Drops clean cache entries past the cache's bound.
    fn evict(&self);
    /// A bounded step (about `budget_bytes`) of compaction of the shard's store, once its
    /// superseded records pass the store's threshold; whether more is waiting.
    fn compact_store(&self, budget_bytes: usize) -> Result<bool, TableError>;
    /// The changelog offset the shard's state stands at without any replay: the store's
    /// checkpoint when it opened, or as far as a standby replayed since.
    fn checkpointed_changelog(&self) -> u64;
    /// A standby replayed the changelog up to `changelog_offset` (and checkpointed there).
    fn advance_to(&self, changelog_offset: u64);
    /// Applies changelog records during recovery.
    fn replay(&self, records: &[Record], end: u64) -> Result<(), TableError>;
    /// The shard was recovered: its state is the changelog's, and its events come next.
    fn recovered(&self) {}
    /// The encoded current value of an encoded key (`None`: absent), for recovery.
    fn current_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, TableError>;
    /// Every key the shard holds, encoded (for rewriting a repaired changelog).
    fn keys_raw(&self) -> Result<Vec<bytes::Bytes>, TableError>;
    /// Forgets the state (recovery found the store ahead of the committed changelog).
    fn clear(&self) -> Result<(), TableError>;
}

/// The entries a commit took from a shard, encoded a chunk at a time.
pub(crate) trait FrozenSet: Any {
    /// For [`AnyShard::restore`], which knows the concrete type.
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
    /// Encodes up to `max` entries into `changelog` and `store`; returns how many were left.
    fn encode(
        &mut self,
        max: usize,
        changelog: &mut BatchBuilder,
        store: &mut WriteBatch,
        now_ms: i64,
    ) -> Result<usize, TableError>;
}

/// Why a commit could not write a table's state.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitFailure {
    #[error(transparent)]
    Table(TableError),
    #[error("writing changelog {tp}: {source}")]
    Changelog { tp: TopicPartition, source: faust_transport::Error },
}

impl CommitFailure {
    /// Whether trying again later can succeed (a full disk, a broker away), as opposed to a
    /// value that does not encode, which no retry mends.
    pub(crate) fn is_retriable(&self) -> bool {
        !matches!(self, CommitFailure::Table(TableError::Codec { .. }))
    }
}
