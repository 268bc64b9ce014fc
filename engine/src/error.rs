//! The errors every layer returns: why a send failed, and what an agent fails with.

use faust_transport::TopicPartition;

use crate::codec::CodecError;

/// What an agent returns when it fails: any error.
pub type AgentError = Box<dyn std::error::Error + Send + Sync>;

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
