//! Per-task context: which event a task is processing, so a table write lands in the shard
//! of that event's partition.
//!
//! Agents interleave on one core, so "the current event" cannot be a thread-local set when an
//! event is handed out: another task may run before this one touches a table. Instead each
//! task owns a slot, and the [`InTask`] wrapper installs the task's slot as the thread's
//! current one for the duration of every poll and restores the previous one afterwards.
//! Whatever runs inside a poll sees its own task's slot, whatever else ran in between.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::runtime::queue::QueuedEvent;
use crate::runtime::state::Token;

/// The event an agent is processing ([`current_event`], Faust's `faust.current_event()`):
/// where it came from, its record as read (key, value and headers, undecoded), and what
/// Faust's event does with it — [`ack`](CurrentEvent::ack) and
/// [`forward`](CurrentEvent::forward).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentEvent {
    /// The topic.
    pub topic: std::sync::Arc<str>,
    /// The partition.
    pub partition: u32,
    /// The offset.
    pub offset: u64,
    /// The event's timestamp (milliseconds).
    pub timestamp: i64,
    /// The record as read (`None` only for a task's own writes outside any record).
    record: Option<faust_storage::Record>,
    agent: usize,
}

/// The former name of [`CurrentEvent`].
pub type EventPosition = CurrentEvent;

impl CurrentEvent {
    /// The record's key as read (`None` for a null key).
    pub fn key_bytes(&self) -> Option<&[u8]> {
        self.record.as_ref().and_then(|r| r.key.as_deref())
    }

    /// The record's value as read.
    pub fn value_bytes(&self) -> Option<&[u8]> {
        self.record.as_ref().and_then(|r| r.value.as_deref())
    }

    /// The record's headers, in order.
    pub fn headers(&self) -> Vec<(&[u8], Option<&[u8]>)> {
        self.record.as_ref().map(|r| r.headers().collect()).unwrap_or_default()
    }

    /// The key decoded with the app's key codec (`key_serializer`); decode
    /// [`key_bytes`](CurrentEvent::key_bytes) yourself for a topic with another codec.
    pub fn key<K: serde::de::DeserializeOwned>(&self) -> Result<Option<K>, crate::codec::CodecError> {
        let Some(key) = self.record.as_ref().and_then(|r| r.key.as_ref()) else { return Ok(None) };
        let codec = crate::runtime::CoreRuntime::with_current(|c| c.map(|c| c.settings().key_serializer.clone()));
        codec.unwrap_or(crate::codec::Codec::RAW).decode_bytes(key).map(Some)
    }

    /// The value decoded with the app's value codec (`value_serializer`).
    pub fn value<V: serde::de::DeserializeOwned>(&self) -> Result<Option<V>, crate::codec::CodecError> {
        let Some(value) = self.record.as_ref().and_then(|r| r.value.as_ref()) else { return Ok(None) };
        let codec = crate::runtime::CoreRuntime::with_current(|c| c.map(|c| c.settings().value_serializer.clone()));
        codec.unwrap_or(crate::codec::Codec::JSON).decode_bytes(value).map(Some)
    }

    /// Acks the event now (Faust's `event.ack()`), as [`Event::ack`](crate::Event::ack) does.
    /// Sending it on unchanged is [`forward`](CurrentEvent::forward).
    pub fn ack(&self) {
        let tp = faust_transport::TopicPartition::new(self.topic.clone(), self.partition);
        crate::runtime::CoreRuntime::with_current(|core| {
            if let Some(core) = core {
                core.ack(self.agent, &tp, self.offset);
            }
        });
        if let Some(slot) = current_slot() {
            slot.clear_if(&tp, self.offset);
        }
    }

    /// The record as read, to send it on unchanged.
    pub(crate) fn record(&self) -> Option<&faust_storage::Record> {
        self.record.as_ref()
    }
}

/// The header of an asked event ([`Agent::ask`](crate::Agent::ask)) naming the topic its
/// replies go to.
pub(crate) const REPLY_TO_HEADER: &[u8] = b"faust-reply-to";
/// The header of an asked event and of its replies: which question a reply answers.
pub(crate) const CORRELATION_HEADER: &[u8] = b"faust-correlation-id";

/// Where the replies to an asked event go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReplyTo {
    /// The asking worker's reply topic (one partition).
    pub(crate) topic: Arc<str>,
    /// The question's id, as the asker wrote it.
    pub(crate) correlation: Vec<u8>,
}

impl ReplyTo {
    /// The reply address `record` carries, if it was asked.
    pub(crate) fn of(record: &faust_storage::Record) -> Option<ReplyTo> {
        if !record.has_headers() {
            return None;
        }
        let (mut topic, mut correlation) = (None, None);
        for (name, value) in record.headers() {
            if name == REPLY_TO_HEADER {
                topic = value.and_then(|v| std::str::from_utf8(v).ok()).map(Arc::from);
            } else if name == CORRELATION_HEADER {
                correlation = value.map(<[u8]>::to_vec);
            }
        }
        Some(ReplyTo { topic: topic?, correlation: correlation? })
    }
}

/// One task's slot.
#[derive(Debug, Default)]
pub(crate) struct TaskSlot {
    /// The event the task processes, as the token its table writes are tagged with.
    current: RefCell<Option<Token>>,
    /// The agent the task runs (its index), which owns the acks of its events.
    agent: std::cell::Cell<usize>,
    /// Where replies to the current event go, when it was asked.
    reply: RefCell<Option<ReplyTo>>,
    /// Where the current event's record is: the events the agent holds (the supervisor's
    /// list), or the front of the batch a `for_each` is going through.
    held: Option<Rc<RefCell<Vec<QueuedEvent>>>>,
    batch: RefCell<Option<Rc<RefCell<std::collections::VecDeque<QueuedEvent>>>>>,
    /// The agent's name (`None` for a slot that is not an agent's).
    name: Option<Arc<str>>,
}

impl TaskSlot {
    /// The slot of agent `name`'s task; `held` is its supervisor's list of events in hand.
    pub(crate) fn for_agent(agent: usize, name: Arc<str>, held: Rc<RefCell<Vec<QueuedEvent>>>) -> Self {
        TaskSlot {
            current: RefCell::new(None),
            agent: std::cell::Cell::new(agent),
            reply: RefCell::new(None),
            held: Some(held),
            batch: RefCell::new(None),
            name: Some(name),
        }
    }

    /// The batch a `for_each` goes through: its front is the event being processed.
    pub(crate) fn show_batch(&self, batch: Rc<RefCell<std::collections::VecDeque<QueuedEvent>>>) {
        *self.batch.borrow_mut() = Some(batch);
    }

    /// The record of the event at `offset` of `topic`/`partition`, if the task holds it.
    fn record_of(&self, topic: &str, partition: u32, offset: u64) -> Option<faust_storage::Record> {
        let is = |e: &QueuedEvent| e.record.offset == offset && e.tp.partition == partition && *e.tp.topic == *topic;
        if let Some(batch) = self.batch.borrow().as_ref()
            && let Ok(batch) = batch.try_borrow()
            && let Some(front) = batch.front().filter(|e| is(e))
        {
            return Some(front.record.clone());
        }
        let held = self.held.as_ref()?.try_borrow().ok()?;
        held.iter().rev().find(|e| is(e)).map(|e| e.record.clone())
    }

    /// Notes where the replies to the event just made current go (`record`'s reply headers;
    /// nothing for the common event without headers once none is noted).
    pub(crate) fn note_reply(&self, record: &faust_storage::Record) {
        if record.has_headers() {
            *self.reply.borrow_mut() = ReplyTo::of(record);
        } else if self.reply.borrow().is_some() {
            *self.reply.borrow_mut() = None;
        }
    }

    /// Makes the event at `offset` of `topic`/`partition` the task's current one. The token
    /// is updated in place when the topic is the same (no reference count per event).
    pub(crate) fn set_at(&self, topic: &Arc<str>, partition: u32, offset: u64, timestamp: i64) {
        let agent = self.agent.get();
        let mut current = self.current.borrow_mut();
        match current.as_mut() {
            Some(t) if Arc::ptr_eq(&t.topic, topic) => {
                (t.agent, t.partition, t.offset, t.timestamp) = (agent, partition, offset, timestamp);
            }
            _ => *current = Some(Token { agent, topic: topic.clone(), partition, offset, timestamp }),
        }
    }

    /// The task processes no event (until the next one is handed out).
    pub(crate) fn clear(&self) {
        *self.current.borrow_mut() = None;
        if self.reply.borrow().is_some() {
            *self.reply.borrow_mut() = None;
        }
    }

    /// Clears the current event if it is the one at `offset` of `tp` (it was acked).
    pub(crate) fn clear_if(&self, tp: &faust_transport::TopicPartition, offset: u64) {
        let mut current = self.current.borrow_mut();
        if current.as_ref().is_some_and(|t| t.offset == offset && t.partition == tp.partition && *t.topic == *tp.topic)
        {
            *current = None;
        }
    }
}

/// Runs `f` with the event the calling task is processing, with its agent: what table writes
/// are tagged with until the event is acked. Borrowed: `f` must not hand the task another
/// event (table operations do not).
pub(crate) fn with_current_token<T>(f: impl FnOnce(Option<&Token>) -> T) -> T {
    POLLING.with(|p| {
        let slot = p.borrow();
        match slot.as_ref() {
            Some(slot) => f(slot.current.borrow().as_ref()),
            None => f(None),
        }
    })
}

thread_local! {
    /// The slot of the task being polled on this thread, if it runs inside `InTask`.
    static POLLING: RefCell<Option<Rc<TaskSlot>>> = const { RefCell::new(None) };
}

/// The event the calling agent is processing (Faust's `current_event()`): the one its stream
/// handed out last, with its record. `None` outside an agent, or before its first event.
pub fn current_event() -> Option<CurrentEvent> {
    POLLING.with(|p| {
        let slot = p.borrow();
        let slot = slot.as_ref()?;
        let token = slot.current.borrow();
        let t = token.as_ref()?;
        Some(CurrentEvent {
            topic: t.topic.clone(),
            partition: t.partition,
            offset: t.offset,
            timestamp: t.timestamp,
            record: slot.record_of(&t.topic, t.partition, t.offset),
            agent: t.agent,
        })
    })
}

/// The partition and offset of the event the calling agent is processing: what
/// [`current_event`] says of its position, without copying the event's topic name and record
/// (a per-event read, e.g. for an event time derived from the offset). `None` where
/// [`current_event`] is.
///
/// ```
/// // Outside an agent there is no current event.
/// assert_eq!(faust::current_offset(), None);
/// ```
pub fn current_offset() -> Option<(u32, u64)> {
    POLLING.with(|p| {
        let slot = p.borrow();
        let token = slot.as_ref()?.current.borrow();
        token.as_ref().map(|t| (t.partition, t.offset))
    })
}

/// The name of the agent whose task calls this (Faust's `current_agent()`); `None` outside
/// an agent (a timer, a task, another thread).
pub fn current_agent() -> Option<Arc<str>> {
    POLLING.with(|p| p.borrow().as_ref().and_then(|slot| slot.name.clone()))
}

/// Where the replies to the calling agent's current event go, if it was asked.
pub(crate) fn current_reply() -> Option<ReplyTo> {
    POLLING.with(|p| p.borrow().as_ref().and_then(|slot| slot.reply.borrow().clone()))
}

/// The slot of the task being polled, for code that hands this task an event.
pub(crate) fn current_slot() -> Option<Rc<TaskSlot>> {
    POLLING.with(|p| p.borrow().clone())
}

/// Runs `inner` with `slot` installed as the current task's slot on every poll.
pub(crate) struct InTask<F> {
    slot: Rc<TaskSlot>,
    inner: Pin<Box<F>>,
}

impl<F: Future> InTask<F> {
    pub(crate) fn new(slot: Rc<TaskSlot>, inner: F) -> Self {
        InTask { slot, inner: Box::pin(inner) }
    }
}

impl<F: Future> Future for InTask<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let previous = POLLING.with(|p| p.replace(Some(self.slot.clone())));
        // Restore the previous slot even if the inner future panics.
        struct Restore(Option<Rc<TaskSlot>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let previous = self.0.take();
                POLLING.with(|p| *p.borrow_mut() = previous);
            }
        }
        let _restore = Restore(previous);
        self.inner.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Makes the event at `offset` (of topic `t`) the slot's current one.
    fn set_at(slot: &TaskSlot, offset: u64) {
        slot.set_at(&Arc::from("t"), (offset % 2) as u32, offset, 0);
    }

    #[test]
    fn interleaved_tasks_each_see_their_own_event() {
        let seen = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(|| async {
                let log = Rc::new(RefCell::new(Vec::new()));
                let mut tasks = Vec::new();
                for id in 0..3u64 {
                    let slot = Rc::new(TaskSlot::default());
                    let log = log.clone();
                    let task = InTask::new(slot.clone(), async move {
                        for round in 0..4u64 {
                            let offset = id * 100 + round;
                            // What a stream does when it hands this task its next event.
                            set_at(&current_slot().expect("inside InTask"), offset);
                            // Yield: the other tasks run and set their own events.
                            glommio::timer::sleep(Duration::from_millis(1 + id)).await;
                            let seen = current_event().expect("an event");
                            log.borrow_mut().push((id, seen.offset == offset));
                        }
                    });
                    tasks.push(glommio::spawn_local(task));
                }
                for t in tasks {
                    t.await;
                }
                assert_eq!(current_event(), None, "nothing leaks outside the tasks");
                Rc::try_unwrap(log).expect("tasks done").into_inner()
            })
            .expect("executor")
            .join()
            .expect("join");
        assert_eq!(seen.len(), 12);
        assert!(seen.iter().all(|&(_, ok)| ok), "{seen:?}");
    }

    #[test]
    fn nested_and_panicking_polls_restore_the_outer_slot() {
        let outer = Rc::new(TaskSlot::default());
        set_at(&outer, 1);
        let inner = Rc::new(TaskSlot::default());
        set_at(&inner, 2);
        let result = futures_lite::future::block_on(InTask::new(outer, async move {
            let nested = InTask::new(inner, async { current_event().map(|e| e.offset) }).await;
            let caught = futures_lite::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(InTask::new(
                Rc::new(TaskSlot::default()),
                async { panic!("agent failed") },
            )))
            .await;
            (nested, caught.is_err(), current_event().map(|e| e.offset))
        }));
        assert_eq!(result, (Some(2), true, Some(1)));
        assert_eq!(current_event(), None);
    }
}
