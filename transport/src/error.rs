//! Typed transport errors, each naming the topic and partition (and broker or path) it is
//! about. A failed produce hands the batch back.

use std::path::PathBuf;

use faust_storage::BatchBuilder;

use crate::types::TopicPartition;

/// An error from a transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The transport URL cannot be used.
    #[error("invalid transport URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Another process holds the data directory of an embedded transport.
    #[error(
        "{path} is in use by another worker (pid {holder}); stop it first, or give this worker its own data directory"
    )]
    DirectoryInUse {
        /// The data directory.
        path: PathBuf,
        /// The process id recorded by the holder, if known.
        holder: String,
    },
    /// The topic does not exist and may not be created.
    #[error("unknown topic `{topic}`")]
    UnknownTopic {
        /// The topic.
        topic: String,
    },
    /// The partition does not exist.
    #[error("unknown partition {tp}")]
    UnknownPartition {
        /// The partition.
        tp: TopicPartition,
    },
    /// An existing topic does not have the settings asked for.
    #[error("topic `{topic}` exists with {existing} partitions, but {requested} were asked for")]
    PartitionMismatch {
        /// The topic.
        topic: String,
        /// Its partition count.
        existing: u32,
        /// The partition count asked for.
        requested: u32,
    },
    /// A fetch asked for an offset the partition does not hold.
    #[error("offset {requested} out of range for {tp} (earliest {earliest}, high-water mark {high_watermark})")]
    OffsetOutOfRange {
        /// The partition.
        tp: TopicPartition,
        /// The offset asked for.
        requested: u64,
        /// Its earliest offset.
        earliest: u64,
        /// Its high-water mark.
        high_watermark: u64,
    },
    /// A produce failed; the batch is handed back so it can be retried or reported.
    #[error("produce to {tp} failed: {source}")]
    Produce {
        /// The partition.
        tp: TopicPartition,
        /// The records that were not written.
        batch: Box<BatchBuilder>,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// The storage under an embedded transport failed.
    #[error("storage of {tp}: {source}")]
    Storage {
        /// The partition.
        tp: TopicPartition,
        /// The storage error.
        #[source]
        source: faust_storage::Error,
    },
    /// An I/O operation on the transport's own files failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file the transport trusts (committed offsets, a topic's settings) is damaged: its
    /// checksum does not match, it is cut short, or it does not parse.
    #[error("{path} is damaged ({reason}); {remedy}")]
    DamagedFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// What the operator can do.
        remedy: &'static str,
    },
    /// A topic name Kafka would refuse (1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`).
    #[error("invalid topic name `{name}`: use 1 to 249 characters of a-z, A-Z, 0-9, `.`, `_` and `-`")]
    InvalidTopicName {
        /// The name as given.
        name: String,
    },
    /// A consumer group name the embedded transport cannot store (same rules as topics).
    #[error("invalid group name `{group}`: use 1 to 249 characters of a-z, A-Z, 0-9, `.`, `_` and `-`")]
    InvalidGroupName {
        /// The name as given.
        group: String,
    },
    /// A core read a partition another core owns (embedded transport: one core per partition).
    #[error("{tp} is owned by core {owner}, not by core {core}")]
    NotOwner {
        /// The partition.
        tp: TopicPartition,
        /// The core that asked.
        core: usize,
        /// The core that owns it.
        owner: usize,
    },
    /// A group member's commit or membership request was refused: it does not own the
    /// partition (any more), or it was removed from the group (left, or presumed dead after
    /// missing the rebalance deadline).
    #[error("group `{group}`: member {member} was fenced{}: {reason}", tp.as_ref().map(|t| format!(" on {t}")).unwrap_or_default())]
    Fenced {
        /// The consumer group.
        group: String,
        /// The member's id.
        member: String,
        /// The partition concerned, if one.
        tp: Option<TopicPartition>,
        /// Why.
        reason: String,
    },
    /// A Kafka broker could not be reached, or its connection failed.
    #[error("kafka broker {broker}: {op}: {source}")]
    KafkaConnection {
        /// The broker's address (`host:port`).
        broker: String,
        /// What was being done (`connect`, `read`, `write`).
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A TLS connection to a Kafka broker failed: the handshake (its certificate does not
    /// verify, it refused ours, no common protocol) or a record that does not decrypt.
    /// Not retried.
    #[error("kafka broker {broker}: TLS: {reason}")]
    KafkaTls {
        /// The broker's address.
        broker: String,
        /// What rustls reported.
        reason: String,
    },
    /// A Kafka broker refused to authenticate this client (SASL). Not retried.
    #[error("kafka broker {broker}: SASL {mechanism} authentication of user `{username}` failed: {reason}")]
    KafkaAuth {
        /// The broker's address.
        broker: String,
        /// The mechanism (`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`).
        mechanism: &'static str,
        /// The user.
        username: String,
        /// Why: the broker's answer, or what in it failed to verify.
        reason: String,
    },
    /// A transactional producer was fenced: another producer took its transactional id (a
    /// newer instance of it, after a takeover). Never retried: the fenced one must stop.
    #[error(
        "kafka broker {broker}: the producer of transactional id `{transactional_id}` was fenced by a newer one (error {code})"
    )]
    ProducerFenced {
        /// The broker's address.
        broker: String,
        /// The transactional id.
        transactional_id: String,
        /// The Kafka error code (`PRODUCER_FENCED` or `INVALID_PRODUCER_EPOCH`).
        code: i16,
    },
    /// The TLS settings cannot be used: a certificate or key file is missing or unreadable.
    #[error("TLS settings: {reason}")]
    TlsConfig {
        /// What is wrong, naming the file.
        reason: String,
    },
    /// A Kafka broker did not answer in time.
    #[error("kafka broker {broker}: no answer to {api}{} within {timeout:?}", tp_suffix(topic, *partition))]
    KafkaTimeout {
        /// The broker's address.
        broker: String,
        /// The request (`Produce`, `Fetch`, ...).
        api: &'static str,
        /// The topic concerned, if one.
        topic: Option<std::sync::Arc<str>>,
        /// The partition concerned, if one.
        partition: Option<u32>,
        /// How long the client waited.
        timeout: std::time::Duration,
    },
    /// A Kafka broker answered with an error code.
    #[error("kafka broker {broker}: {api}{} failed: {} (error {code}){}", tp_suffix(topic, *partition), crate::kafka::code_name(*code), message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
    KafkaBroker {
        /// The broker's address.
        broker: String,
        /// The request.
        api: &'static str,
        /// The topic concerned, if one.
        topic: Option<std::sync::Arc<str>>,
        /// The partition concerned, if one.
        partition: Option<u32>,
        /// The Kafka error code (its name, such as `NotLeaderOrFollower`, is in the message).
        code: i16,
        /// The broker's message, when it sent one.
        message: Option<Box<str>>,
    },
    /// A Kafka broker's answer could not be used: it does not speak a version this client
    /// needs, or it sent bytes this client cannot decode (corrupt or compressed batches).
    #[error("kafka broker {broker}: {api}{}: {reason}", tp_suffix(topic, *partition))]
    KafkaProtocol {
        /// The broker's address.
        broker: String,
        /// The request.
        api: &'static str,
        /// The topic concerned, if one.
        topic: Option<std::sync::Arc<str>>,
        /// The partition concerned, if one.
        partition: Option<u32>,
        /// What is wrong.
        reason: String,
    },
    /// A topic the worker consumes is gone from the broker although the worker's group had
    /// it: it was deleted, or the broker lost its data.
    #[error(
        "the broker lost data of {topic}: the topic existed when this worker joined its group and is gone (deleted, or the broker lost its data)"
    )]
    TopicVanished {
        /// The topic.
        topic: String,
    },
    /// The transport was shut down while the request was in flight.
    #[error("the transport is shut down")]
    Closed,
}

impl Error {
    /// The partition whose log is damaged, when this error reports damaged data of a log (an
    /// open or a read of the embedded transport found corrupt or inconsistent data below what
    /// was made durable). Such a log needs a repair
    /// ([`LocalCore::repair`](crate::LocalCore::repair)); retrying does not help.
    pub fn damaged_log(&self) -> Option<&TopicPartition> {
        match self {
            Error::Storage { tp, source } if source.is_corruption() => Some(tp),
            Error::Produce { source, .. } => source.damaged_log(),
            _ => None,
        }
    }

    /// The error behind a failed produce (this error itself otherwise).
    pub fn cause(&self) -> &Error {
        match self {
            Error::Produce { source, .. } => source.cause(),
            other => other,
        }
    }

    /// Takes the batch back out of a failed produce.
    pub fn into_batch(self) -> Option<BatchBuilder> {
        match self {
            Error::Produce { batch, .. } => Some(*batch),
            _ => None,
        }
    }
}

fn tp_suffix(topic: &Option<std::sync::Arc<str>>, partition: Option<u32>) -> String {
    match (topic, partition) {
        (Some(t), Some(p)) => format!(" for {t}/{p}"),
        (Some(t), None) => format!(" for `{t}`"),
        _ => String::new(),
    }
}

/// The transport crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
#[cfg(test)]
mod tests {
    /// The engine's errors embed this one and are returned by value; past 96 bytes clippy's
    /// `result_large_err` fails the engine. Keep context in `Arc<str>`/`Box<str>`.
    #[test]
    fn error_stays_small() {
        assert!(std::mem::size_of::<super::Error>() <= 96, "{}", std::mem::size_of::<super::Error>());
    }
}
