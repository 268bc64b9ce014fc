//! The errors every layer returns: why a send failed, what an agent fails with, and why a
//! table operation failed (the runtime's commit and recovery return it too).

use faust_transport::TopicPartition;

use crate::codec::CodecError;

/// What an agent returns when it fails: any error.
pub type AgentError = Box<dyn std::error::Error + Send + Sync>;

/// Why a question to an agent ([`Agent::ask`](crate::Agent::ask), `map`, `join`) got no
/// answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AskError {
    /// The worker is not running, or the app has no agent that can reply (one registered with
    /// [`App::agent_with_sinks`](crate::App::agent_with_sinks)): replies come back through
    /// the running worker's reply topic.
    #[error("cannot ask agent `{agent}`: {reason}")]
    NotRunning {
        /// The agent.
        agent: String,
        /// Why.
        reason: &'static str,
    },
    /// Sending the question failed.
    #[error("asking agent `{agent}`: {source}")]
    Send {
        /// The agent.
        agent: String,
        /// The send's error.
        #[source]
        source: Box<SendError>,
    },
    /// No reply came in time.
    #[error("agent `{agent}` did not reply within {after:?}")]
    Timeout {
        /// The agent.
        agent: String,
        /// How long the asker waited.
        after: std::time::Duration,
    },
    /// The reply does not decode as the type asked for.
    #[error("the reply of agent `{agent}` does not decode: {source}")]
    Decode {
        /// The agent.
        agent: String,
        /// The codec's error.
        #[source]
        source: CodecError,
    },
}

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The worker has stopped: nothing takes records any more.
    #[error("cannot send to `{topic}`: the worker has stopped")]
    Stopped {
        /// The topic.
        topic: String,
    },
    /// The key or value could not be encoded.
    #[error("encoding a record for `{topic}`: {source}")]
    Codec {
        /// The topic.
        topic: String,
        /// The codec's error.
        #[source]
        source: CodecError,
    },
    /// A send named a partition the topic does not have.
    #[error("`{topic}` has {partitions} partitions: there is no partition {partition} to send to")]
    UnknownPartition {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
        /// How many partitions the topic has.
        partitions: u32,
    },
    /// The event to forward is no longer held by the agent (it was acked, or the call was
    /// made outside the agent's task).
    #[error("cannot forward to `{topic}`: the event's record is no longer held by the agent")]
    NoRecord {
        /// The topic.
        topic: String,
    },
    /// The topic is not known to the worker (declare it with `app.topic` before `run`).
    #[error("unknown topic `{topic}`: declare it with app.topic() before the worker starts")]
    UnknownTopic {
        /// The topic.
        topic: String,
    },
    /// Records sent earlier to the partition with `send_soon` could not be written, so this
    /// one was not sent either (it would have overtaken them).
    #[error("sending to `{topic}`: earlier buffered sends failed: {message}")]
    Buffered {
        /// The topic.
        topic: String,
        /// Why the buffered sends failed.
        message: String,
    },
    /// Buffered sends ([`Topic::send_soon`](crate::Topic::send_soon)) could not be written yet: a
    /// [`flush`](crate::runtime::flush) failed. Nothing is lost: they stay buffered, in
    /// order, and are written once the transport takes them (the offsets of the events that
    /// made them are not committed before).
    #[error("buffered sends{} are not written yet: {message}; they stay buffered and are written once the transport takes them", partition.as_ref().map(|tp| format!(" to {tp}")).unwrap_or_default())]
    NotYetWritten {
        /// The first partition whose write failed, if one did.
        partition: Option<TopicPartition>,
        /// Why.
        message: String,
    },
    /// The transport refused the records.
    #[error(transparent)]
    Transport(#[from] faust_transport::Error),
}

/// Why a table operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TableError {
    /// The table was used outside stream processing without naming a partition.
    #[error(
        "table `{table}`: no current event to take the partition from; use table.partition(p) outside stream processing"
    )]
    OutsideStream {
        /// The table.
        table: String,
    },
    /// The table was used outside a running worker.
    #[error("table `{table}`: not inside a running worker")]
    NotRunning {
        /// The table.
        table: String,
    },
    /// The shard of this partition lives on another core (or worker).
    #[error("table `{table}` partition {partition} is not on this core (core {core})")]
    NotLocal {
        /// The table.
        table: String,
        /// The partition.
        partition: u32,
        /// The calling core.
        core: usize,
    },
    /// `update` on a missing key of a table without a default.
    #[error("table `{table}` has no value for the key and no default (set one with Table::with_default)")]
    NoDefault {
        /// The table.
        table: String,
    },
    /// A key or value could not be encoded or decoded. A stored value that no longer decodes
    /// (the value type changed) fails here unless the table resets such values.
    #[error("table `{table}` partition {partition}: {what}: {source}")]
    Codec {
        /// The table.
        table: String,
        /// The partition.
        partition: u32,
        /// What failed: "key", "value" or "stored value (key 6b6579…)".
        what: String,
        /// The codec's error.
        #[source]
        source: CodecError,
    },
    /// The shard's store failed.
    #[error("table `{table}` partition {partition}: {source}")]
    Store {
        /// The table.
        table: String,
        /// The partition.
        partition: u32,
        /// The store's error.
        #[source]
        source: faust_storage::Error,
    },
    /// [`WindowedTable::update_from`](crate::WindowedTable::update_from) or `value_from` was
    /// given a value of another type than `relative_to_field` was set for (or it was not set).
    #[error(
        "windowed table `{table}`: no time field for a value of type {given} (relative_to_field was set for {expected:?})"
    )]
    FieldTime {
        /// The table.
        table: String,
        /// The type of the value given.
        given: &'static str,
        /// The type `relative_to_field` was set for, if it was.
        expected: Option<&'static str>,
    },
    /// Sending a closed window's final result ([`WindowedTable::emit_final`](crate::WindowedTable::emit_final))
    /// failed.
    #[error("table `{table}`: sending the final result of window {window}: {source}")]
    FinalResult {
        /// The table.
        table: String,
        /// The window, `[start, end)`.
        window: String,
        /// The send's error.
        #[source]
        source: Box<SendError>,
    },
    /// The table's changelog does not have as many partitions as the topic of the event
    /// that uses it: the table is not co-partitioned with the agent's topic, so the shard of
    /// the event's partition would hold keys of another partition (Faust's
    /// `PartitionsMismatch`).
    #[error(
        "table `{table}`: its changelog `{changelog}` has {changelog_partitions} partitions, but the event comes from `{topic}`, which has {topic_partitions}: a table must have as many partitions as the topic its agent consumes. Declare it with `.with_partitions({topic_partitions})` (an existing changelog keeps its count: delete the changelog topic to create it again), or give the topic {changelog_partitions} partitions"
    )]
    PartitionsMismatch {
        /// The table.
        table: String,
        /// Its changelog topic.
        changelog: String,
        /// The changelog's partitions.
        changelog_partitions: u32,
        /// The event's topic.
        topic: String,
        /// Its partitions.
        topic_partitions: u32,
    },
    /// The changelog was damaged, and its repair lost records that recovery needs (they are
    /// above the store's checkpoint, or the table keeps no store): the table cannot be
    /// rebuilt exactly.
    #[error(
        "table `{table}` partition {partition}: its changelog `{changelog}` was damaged and its repair lost offsets {lost}, which recovery needs (it replays {from}..{committed}); the table cannot be rebuilt exactly. Restore the partition's log files (the damaged originals are in its `damaged/` directory), or start the app over from its sources (`reset --all`)"
    )]
    ChangelogDamaged {
        /// The table.
        table: String,
        /// The partition.
        partition: u32,
        /// The changelog topic.
        changelog: String,
        /// The lost offset ranges recovery needs.
        lost: String,
        /// Where the replay starts (the store's checkpoint).
        from: u64,
        /// Where it ends (the committed changelog offset).
        committed: u64,
    },
    /// The changelog lost records recovery needs (retention removed them).
    #[error(
        "table `{table}` partition {partition}: recovery needs changelog `{changelog}` from offset {needed}, but it starts at {earliest} (records were removed by retention); delete the table's data directory to rebuild from what is left"
    )]
    ChangelogTruncated {
        /// The table.
        table: String,
        /// The partition.
        partition: u32,
        /// The changelog topic.
        changelog: String,
        /// The first offset recovery needs.
        needed: u64,
        /// The changelog's first offset.
        earliest: u64,
    },
    /// The changelog ends before the offset committed for it.
    #[error(
        "table `{table}` partition {partition}: changelog `{changelog}` ends at {end}, before its committed offset {committed} (was the topic deleted?)"
    )]
    ChangelogShort {
        /// The table.
        table: String,
        /// The partition.
        partition: u32,
        /// The changelog topic.
        changelog: String,
        /// Where it ends.
        end: u64,
        /// What was committed for it.
        committed: u64,
    },
    /// The transport failed while recovering or committing the table.
    #[error("table `{table}` partition {partition}: {source}")]
    Transport {
        /// The table.
        table: String,
        /// The partition.
        partition: u32,
        /// The transport's error.
        #[source]
        source: faust_transport::Error,
    },
}
