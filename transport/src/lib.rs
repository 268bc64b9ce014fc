//! Transports for the faust engine: where topics live and how records move.
//!
//! A [`Transport`] serves one worker process. It hands each of the worker's cores a
//! [`CoreTransport`] — a handle that lives on that core's thread (it need not be `Send`) and
//! produces, fetches and commits for the partitions that core owns — and tells the worker
//! which partitions are its own through [`Membership`] events.
//!
//! Implementations are chosen by URL: `local://PATH` (segment logs on disk, the default),
//! `memory://` (in RAM, for tests: one in-process broker that several workers can share as a
//! consumer group) and `kafka://host:port[,host:port]` (our own Kafka client on glommio
//! sockets, with Kafka's consumer groups and our assignor on the group's leader).
//!
//! Records cross the API in the storage crate's formats: a produce takes a
//! [`BatchBuilder`] (encoded once by the engine; the embedded
//! transport appends those very bytes), and a fetch returns zero-copy
//! [`Record`]s whose keys and values are slices of the fetched buffer.

mod assign;
mod checked_file;
mod closing;
mod error;
mod group;
mod kafka;
mod local;
mod memory;
mod txn;
mod types;

use std::sync::Arc;
use std::time::Duration;

pub use crate::assign::{AssignError, AssignInput, assign};
pub use crate::error::{Error, Result};
pub use crate::kafka::{
    Acks, Compression, KafkaCore, KafkaMembership, KafkaOptions, KafkaStats, KafkaTransport, SaslMechanism,
    SaslOptions, TlsOptions,
};
pub use crate::local::{LocalCore, LocalMembership, LocalOptions, LocalTransport, validate_topic_name};
pub use crate::memory::{MemoryMembership, MemoryTransport};
pub use crate::txn::{TXN_HEADER, TXN_OFFSETS_PREFIX, TxnTag};
pub use crate::types::{
    AssignmentEvent, AutoOffsetReset, Fence, Fetched, JoinRequest, OffsetSpec, Produced, TopicConfig, TopicMetadata,
    TopicPartition,
};
pub use faust_storage::{BatchBuilder, Record};

/// Whether `name` is an internal topic, which [`CoreTransport::topic_names`] leaves out:
/// Kafka names its own (`__consumer_offsets`, `__transaction_state`) with a `__` prefix.
pub(crate) fn is_internal_topic(name: &str) -> bool {
    name.starts_with("__")
}

/// A transport for one worker process.
///
/// `attach_core` is called once on each core's own thread when the worker starts, by all
/// cores at about the same time (a transport may set up channels between cores, which needs
/// every core to join).
#[allow(async_fn_in_trait)] // The futures run on one core's executor and need not be `Send`.
pub trait Transport: Send + Sync + 'static {
    /// The handle one core uses.
    type Core: CoreTransport;
    /// The source of assignment events.
    type Membership: Membership;

    /// Sets up core `core` of `cores`.
    async fn attach_core(&self, core: usize, cores: usize) -> Result<Self::Core>;

    /// Joins the consumer group `group` with `join` (the topics whose partitions the worker
    /// takes, how they are co-partitioned, the worker's weight).
    fn membership(&self, group: &str, join: &JoinRequest) -> Result<Self::Membership>;
}

/// Assignment and revocation of partitions for this worker, as a stream of events.
///
/// A partition moves between workers in two steps: its owner gets
/// [`AssignmentEvent::Revoked`], stops processing it, commits, and confirms with
/// [`revoked`](Membership::revoked); only then does the new owner get it in an
/// [`AssignmentEvent::Assigned`]. So two workers never process a partition at once, and the
/// new owner starts from what the old one committed. A transport with standby replicas also
/// names the changelog partitions the worker follows ([`AssignmentEvent::Standbys`]).
#[allow(async_fn_in_trait)]
pub trait Membership: 'static {
    /// The next change. Pending until there is one; `Err(Error::Closed)` once the transport
    /// shuts down, `Err(Error::Fenced)` once this member was removed from the group.
    async fn next_event(&mut self) -> Result<AssignmentEvent>;

    /// Confirms that the partitions revoked in `generation` are released: nothing more of
    /// them will be processed, and their offsets are committed.
    async fn revoked(&mut self, generation: u64) -> Result<()>;

    /// This member's id in the group, when the transport has groups (commits then carry a
    /// [`Fence`]).
    fn member_id(&self) -> Option<Arc<str>>;

    /// Leaves the group (on shutdown), so others take the partitions over at once.
    async fn leave(&mut self) -> Result<()>;
}

/// What one core needs from a log: topics, produce, fetch, offsets and commits.
///
/// Produce and fetch are batch-oriented. A produce resolves once the records are durable in
/// the transport's sense (appended to the log on `local://`; acknowledged by the in-sync
/// replicas on Kafka): only then may the source offsets of the events behind it be committed.
#[allow(async_fn_in_trait)]
pub trait CoreTransport: 'static {
    /// Creates `name` with `config`, or checks that an existing topic has the same partition
    /// count ([`Error::PartitionMismatch`] otherwise).
    async fn create_topic(&self, name: &str, config: &TopicConfig) -> Result<TopicMetadata>;

    /// What the transport knows about `name`, or `None` if it does not exist.
    async fn topic_metadata(&self, name: &str) -> Result<Option<TopicMetadata>>;

    /// The names of every topic that exists now, sorted, for subscriptions by pattern
    /// (`app.topic(pattern="^orders-.*")`). Internal topics, whose names start with `__`
    /// (Kafka's `__consumer_offsets` and `__transaction_state`), are left out on every
    /// transport: they hold the broker's own bookkeeping, and a pattern such as `.*` must not
    /// subscribe the app to them.
    ///
    /// The list is a snapshot: a topic created a moment later is not in it, so a caller that
    /// follows a pattern asks again from time to time.
    async fn topic_names(&self) -> Result<Vec<String>>;

    /// Appends `batch` to `tp`. On failure the batch comes back in the error
    /// ([`Error::into_batch`]).
    async fn produce(&self, tp: &TopicPartition, batch: BatchBuilder) -> Result<Produced>;

    /// Records of `tp` from `offset` on, about `max_bytes` of them; waits up to `max_wait` for
    /// records when there are none yet. Reading at the high-water mark returns no record.
    async fn fetch(&self, tp: &TopicPartition, offset: u64, max_bytes: usize, max_wait: Duration) -> Result<Fetched>;

    /// Looks an offset of `tp` up.
    async fn list_offset(&self, tp: &TopicPartition, spec: OffsetSpec) -> Result<u64>;

    /// Records `offsets` (the next offset to process, per partition) as committed for `group`.
    /// With a `fence`, the commit is refused ([`Error::Fenced`]) unless that member owns every
    /// partition in it.
    async fn commit(&self, group: &str, fence: Option<&Fence>, offsets: &[(TopicPartition, u64)]) -> Result<()>;

    /// The committed offsets of `group` for `partitions` (`None` where nothing was committed).
    async fn committed(&self, group: &str, partitions: &[TopicPartition]) -> Result<Vec<Option<u64>>>;

    /// Stops this core's part of the transport and releases what it holds (open logs,
    /// connections, background tasks). Called on the core's own thread when the worker stops;
    /// requests from other cores fail with [`Error::Closed`] afterwards.
    async fn shutdown(self) -> Result<()>
    where
        Self: Sized;
}
