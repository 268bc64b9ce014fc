//! Records sent from threads that are not worker cores, taken by core 0 in order.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use event_listener::Event;
use faust_transport::{Produced, TopicPartition};
use serde::Serialize;

use crate::error::SendError;
use crate::topic::TopicInner;
use crate::util::lock;

/// Whether the worker takes records from outside its cores (0: not started yet, records wait).
const OUTBOX_RUNNING: u8 = 1;

const OUTBOX_STOPPED: u8 = 2;

/// Records sent from threads that are not worker cores (a web handler, a test, a load
/// generator): core 0 takes them in turn. Sends made before the worker starts wait for it.
///
/// Records are encoded straight into one shared buffer and name their topic by number, so a
/// send from outside allocates nothing per record, and the core neither frees memory another
/// thread allocated nor touches reference counts another thread keeps writing (both showed
/// in profiles of a generator thread feeding a core).
#[derive(Default)]
pub(crate) struct Outbox {
    queue: Mutex<Outgoing>,
    /// Emptied buffers, handed back by core 0 for reuse.
    spare: Mutex<Option<Outgoing>>,
    /// Every topic handle's shared part, by number (append-only).
    topics: Mutex<Vec<Arc<TopicInner>>>,
    /// Questions from tests: "has every agent finished this event?"
    probes: Mutex<Vec<Probe>>,
    pub(crate) event: Event,
    /// 0 until a worker starts, then `OUTBOX_RUNNING`, then `OUTBOX_STOPPED`.
    state: std::sync::atomic::AtomicU8,
}

/// Records sent from outside the worker: their encoded keys and values, back to back.
#[derive(Default)]
pub(crate) struct Outgoing {
    pub(crate) records: Vec<Outbound>,
    pub(crate) bytes: Vec<u8>,
}

/// One record sent from outside the worker; `reply` is set for `send` (which waits), not for
/// `send_soon`.
pub(crate) struct Outbound {
    /// The topic's number in the outbox.
    pub(crate) topic: usize,
    /// Where the key and value are in `Outgoing::bytes`.
    pub(crate) key: Option<std::ops::Range<usize>>,
    pub(crate) value: std::ops::Range<usize>,
    pub(crate) reply: Option<Arc<Reply>>,
    /// A partition, timestamp or headers the sender chose (`send_with`).
    pub(crate) options: Option<Box<crate::topic::SendOptions>>,
}

/// Asks core 0 to answer once every agent of `tp`'s topic has finished the event at `offset`.
pub(crate) struct Probe {
    pub(crate) tp: TopicPartition,
    pub(crate) offset: u64,
    pub(crate) reply: Arc<Reply>,
    /// Commit (tables included) before answering.
    pub(crate) commit: bool,
}

impl Outbox {
    /// Numbers a topic handle.
    pub(crate) fn register(&self, topic: impl FnOnce(usize) -> TopicInner) -> Arc<TopicInner> {
        let mut topics = lock(&self.topics);
        let inner = Arc::new(topic(topics.len()));
        topics.push(inner.clone());
        inner
    }

    /// The topic handles, by number.
    pub(crate) fn topics(&self) -> Vec<Arc<TopicInner>> {
        lock(&self.topics).clone()
    }

    /// Encodes a record into the queue (nothing is queued when encoding fails).
    pub(crate) fn push<K: Serialize + 'static, V: Serialize + 'static>(
        &self,
        topic: &TopicInner,
        key: Option<&K>,
        value: &V,
        reply: Option<Arc<Reply>>,
        options: Option<Box<crate::topic::SendOptions>>,
    ) -> Result<(), SendError> {
        let mut queue = lock(&self.queue);
        if self.state.load(Ordering::Acquire) == OUTBOX_STOPPED {
            return Err(SendError::Stopped { topic: topic.name.to_string() });
        }
        let start = queue.bytes.len();
        let codec_err = |source| SendError::Codec { topic: topic.name.to_string(), source };
        let bytes = &mut queue.bytes;
        let encoded = (|| {
            let key = match key {
                Some(k) => {
                    topic.key_codec.encode_owned(k, bytes).map_err(codec_err)?;
                    Some(start..bytes.len())
                }
                None => None,
            };
            let value_start = bytes.len();
            topic.value_codec.encode_owned(value, bytes).map_err(codec_err)?;
            Ok((key, value_start..bytes.len()))
        })();
        let (key, value) = match encoded {
            Ok(ranges) => ranges,
            Err(e) => {
                queue.bytes.truncate(start);
                return Err(e);
            }
        };
        queue.records.push(Outbound { topic: topic.outbox_index, key, value, reply, options });
        drop(queue);
        self.event.notify(1);
        Ok(())
    }

    pub(crate) fn probe(&self, probe: Probe) {
        lock(&self.probes).push(probe);
        self.event.notify(1);
    }

    pub(crate) fn take_probes(&self) -> Vec<Probe> {
        std::mem::take(&mut *lock(&self.probes))
    }

    /// Opens the outbox for a worker that starts.
    pub(crate) fn open(&self) {
        self.state.store(OUTBOX_RUNNING, Ordering::Release);
    }

    /// Everything sent so far; with `close`, later sends fail with [`SendError::Stopped`].
    pub(crate) fn take(&self, close: bool) -> Outgoing {
        let spare = lock(&self.spare).take().unwrap_or_default();
        let mut queue = lock(&self.queue);
        if close {
            self.state.store(OUTBOX_STOPPED, Ordering::Release);
        }
        std::mem::replace(&mut *queue, spare)
    }

    /// Hands a processed batch's buffers back for reuse.
    pub(crate) fn recycle(&self, mut outgoing: Outgoing) {
        outgoing.records.clear();
        outgoing.bytes.clear();
        *lock(&self.spare) = Some(outgoing);
    }
}

/// The answer to a send made from outside the worker, or to a test's probe.
pub(crate) type Reply = crate::runtime::signal::Oneshot<Result<Produced, SendError>>;
