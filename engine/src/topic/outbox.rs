//! Records sent from threads that are not worker cores, taken by core 0 in order.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use event_listener::Event;
use faust_transport::{Produced, TopicPartition};

use crate::error::SendError;
use crate::topic::TopicInner;
use crate::util::lock;

/// Whether the worker takes records from outside its cores (0: not started yet, records wait).
const OUTBOX_RUNNING: u8 = 1;

const OUTBOX_STOPPED: u8 = 2;

/// Bytes of records queued from outside past which a sender waits for core 0 to take them
/// (a sender faster than the worker would otherwise grow the queue without end, and core 0
/// would then take it in pieces too large to keep up with: in a benchmark offered 1.2 times
/// what the worker could do, its cost per event went from 2.3 to 5.6 µs).
const OUTBOX_MAX_BYTES: usize = 8 << 20;

/// Records sent from threads that are not worker cores (a web handler, a test, a load
/// generator): core 0 takes them in turn. Sends made before the worker starts wait for it.
///
/// Records are encoded in the sender's scratch buffers, copied into one shared buffer and
/// name their topic by number, so a send from outside allocates nothing per record, and the core neither frees memory another
/// thread allocated nor touches reference counts another thread keeps writing (both showed
/// in profiles of a generator thread feeding a core).
#[derive(Default)]
pub(crate) struct Outbox {
    queue: Mutex<Outgoing>,
    /// Signalled when core 0 took the queue, or the outbox closed: senders waiting for room
    /// go on.
    taken: std::sync::Condvar,
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

    /// Fails with [`SendError::Stopped`] once the worker has stopped.
    pub(crate) fn check_open(&self, topic: &TopicInner) -> Result<(), SendError> {
        match self.state.load(Ordering::Acquire) {
            OUTBOX_STOPPED => Err(SendError::Stopped { topic: topic.name.to_string() }),
            _ => Ok(()),
        }
    }

    /// Queues an encoded record.
    ///
    /// The sender encodes before calling, so the lock is held only for the copy: core 0
    /// takes the queue while senders keep sending, and a lock held through an encoding kept
    /// it spinning (3 % of its time in a profile of a generator thread feeding it 400,000
    /// orders a second).
    pub(crate) fn push(
        &self,
        topic: &TopicInner,
        key: Option<&[u8]>,
        value: &[u8],
        reply: Option<Arc<Reply>>,
        options: Option<Box<crate::topic::SendOptions>>,
    ) -> Result<(), SendError> {
        let mut queue = lock(&self.queue);
        // Back-pressure, as a Kafka producer blocks on a full buffer: only while a worker runs
        // (before it starts, and between the runs of a restart, records wait in the queue),
        // and in steps, so that a worker that ends is noticed.
        while queue.bytes.len() >= OUTBOX_MAX_BYTES && self.state.load(Ordering::Acquire) == OUTBOX_RUNNING {
            queue = match self.taken.wait_timeout(queue, std::time::Duration::from_millis(50)) {
                Ok((queue, _)) => queue,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        self.check_open(topic)?;
        let bytes = &mut queue.bytes;
        let key = key.map(|k| {
            let start = bytes.len();
            bytes.extend_from_slice(k);
            start..bytes.len()
        });
        let value_start = bytes.len();
        bytes.extend_from_slice(value);
        let value = value_start..bytes.len();
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
        let outgoing = std::mem::replace(&mut *queue, spare);
        drop(queue);
        self.taken.notify_all();
        outgoing
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
