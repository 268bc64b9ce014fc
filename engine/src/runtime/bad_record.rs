//! Bad records: what a stream does with a record that does not decode or is too large.

use std::sync::atomic::Ordering;

use faust_transport::TopicPartition;

use crate::runtime::CoreRuntime;
use crate::runtime::queue::QueuedEvent;
use crate::util::lock;

/// Which part of a record is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordPart {
    /// The key does not decode.
    Key,
    /// The value does not decode (or is null).
    Value,
    /// The whole record is larger than `max_record_bytes`.
    Record,
}

impl std::fmt::Display for RecordPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecordPart::Key => "key",
            RecordPart::Value => "value",
            RecordPart::Record => "record",
        })
    }
}

/// A record a stream could not hand out: its key or value does not decode (malformed JSON, an
/// empty or null value, invalid UTF-8 for a string), or it is larger than `max_record_bytes`.
/// What happens to it is the `bad_record_policy`; under `stop`, [`App::run`](crate::App::run)
/// returns it as [`WorkerError::BadRecord`](crate::WorkerError::BadRecord).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad record in {topic} partition {partition} at offset {offset}: {part}: {reason} (starts {preview})")]
#[non_exhaustive]
pub struct BadRecord {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The record's offset.
    pub offset: u64,
    /// What is bad.
    pub part: RecordPart,
    /// Why: the codec's error, or the size.
    pub reason: String,
    /// The first bytes of the bad part (the value, for an oversized record), in hex.
    pub preview: String,
}

pub(crate) fn preview(bytes: &[u8]) -> String {
    crate::util::hex_preview(bytes, 32)
}

impl CoreRuntime {
    /// Applies the bad-record policy to `event` (logged and counted whatever the policy).
    /// Returns whether the stream moves past it (acks it); `false` after a stop.
    pub(crate) fn bad_record(&self, event: &QueuedEvent, part: RecordPart, reason: String) -> bool {
        use crate::settings::BadRecordPolicy;
        self.count_decode_error();
        self.stats.bad_records.fetch_add(1, Ordering::Relaxed);
        let (tp, record) = (&event.tp, &event.record);
        let raw = record.value.as_deref().unwrap_or_default();
        let shown = match part {
            RecordPart::Key => record.key.as_deref().unwrap_or_default(),
            _ => raw,
        };
        let bad = BadRecord {
            topic: tp.topic.to_string(),
            partition: tp.partition,
            offset: record.offset,
            part,
            reason,
            preview: preview(shown),
        };
        let (reason, value) = (format!("{}: {}", bad.part, bad.reason), &bad.preview);
        match &self.settings().bad_record_policy {
            BadRecordPolicy::Stop => {
                tracing::error!(topic = %tp.topic, partition = tp.partition, offset = record.offset, %reason, %value,
                    "bad record; stopping the worker (bad_record_policy = stop): it stays uncommitted");
                self.halted.borrow_mut().push(tp.clone());
                self.failure.borrow_mut().get_or_insert_with(|| format!("{bad} (bad_record_policy = stop)"));
                lock(&self.stopped_at).get_or_insert(bad);
                self.app_stop.stop();
                false
            }
            BadRecordPolicy::DeadLetter { .. } => {
                let Some(topic) = &self.dead_letter else { return true };
                let partitions = self.partitions(topic).unwrap_or(1).max(1);
                let source = format!("{tp}@{}", record.offset);
                let mut headers: Vec<faust_storage::Header<'_>> = record.headers().collect();
                headers.push((b"faust-error", Some(reason.as_bytes())));
                headers.push((b"faust-source", Some(source.as_bytes())));
                let to = TopicPartition::new(topic.clone(), tp.partition % partitions);
                // Buffered like any send: the bad record's offset is committed only once this
                // copy is durable.
                self.buffer(to, Some(record.timestamp), record.key.as_deref(), raw, &headers);
                tracing::warn!(topic = %tp.topic, partition = tp.partition, offset = record.offset, %reason, %value,
                    dead_letter = %topic, "bad record sent to the dead-letter topic");
                true
            }
            _ => {
                tracing::warn!(topic = %tp.topic, partition = tp.partition, offset = record.offset, %reason, %value,
                    "skipping a bad record");
                true
            }
        }
    }

    pub(crate) fn count_decode_error(&self) {
        self.decode_errors.set(self.decode_errors.get() + 1);
    }

    /// Whether an agent of this core consumes `topic` (a topic or a channel).
    pub(crate) fn is_consumed(&self, topic: &str) -> bool {
        [&self.agents_by_topic, &self.channel_agents]
            .iter()
            .any(|agents| agents.get(topic).is_some_and(|a| !a.is_empty()))
    }

    /// Whether `tp` stopped at a bad record.
    pub(crate) fn halted(&self, tp: &TopicPartition) -> bool {
        let halted = self.halted.borrow();
        !halted.is_empty() && halted.contains(tp)
    }
}
