//! Streams and events: what an agent iterates.

use std::rc::Rc;

use faust_transport::TopicPartition;
use serde::Serialize;
use serde::de::DeserializeOwned;

use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

pub(crate) mod repartition;
pub(crate) mod reroute;

use crate::codec::{Codec, Fixed};
use crate::error::{AgentError, SendError};
use crate::runtime::CoreRuntime;
use crate::runtime::bad_record::RecordPart;
use crate::runtime::bad_record::preview;
use crate::runtime::context::{TaskSlot, current_slot};
use crate::runtime::queue::{EventQueue, QueuedEvent, Scope};
use crate::runtime::state::same_topic;
use crate::runtime::supervise::AgentRun;
use crate::topic::Topic;
use faust_transport::Produced;

/// What a stream's processors (decode, `filter`, `map`, `enumerate`, `echo`) make of one
/// record: `Ok(Some(..))` to hand out, `Ok(None)` to ack and skip (filtered), `Err` when it
/// cannot be processed.
type Stage<K, V> = Box<dyn Fn(&QueuedEvent) -> Result<Option<(Option<K>, V)>, Rejected>>;

/// Why a stage did not hand a record out.
enum Rejected {
    /// The record is bad (its key or value does not decode): the bad-record policy decides.
    Bad(RecordPart, String),
    /// A processor failed on it (an `echo` send): logged, counted, acked and skipped.
    Failed(String),
}

/// The events of one agent on one core: the core's partitions of the agent's topic.
///
/// As in Faust, asking for the next event acks the previous one: an event counts as
/// processed once the agent moves past it, and only then may its offset be committed
/// ([`noack`](Stream::noack) leaves acking to the agent). A key
/// or value that does not decode is logged (topic, partition, offset and a hex preview),
/// counted and skipped. Keys are decoded only once something can see them: a stream read
/// with [`next`](Stream::next) or [`take`](Stream::take) alone hands out values and leaves
/// keys as they are.
pub struct Stream<K, V> {
    core: Rc<CoreRuntime>,
    agent: usize,
    queue: Rc<EventQueue>,
    current: Rc<std::cell::RefCell<Vec<QueuedEvent>>>,
    stage: Stage<K, V>,
    /// On a repartition topic: drops records the re-keying agent sent again after a crash.
    positions: Option<crate::Table<u32, u64>>,
    /// Records larger than this (key and value) are bad records.
    max_record_bytes: usize,
    /// Whether keys are decoded: from the first call that can show one (`next_event`,
    /// `next_item`, `take_events`, or an `echo` stage); an agent that only ever asks for
    /// values (`next`, `take`) never pays for decoding keys.
    keys: Rc<std::cell::Cell<bool>>,
    /// Whether the stream's values are the topic's records as they are: no processor added
    /// and a `raw` value codec without transforms, so a fixed-layout value can be read in
    /// the fetched buffer itself ([`for_each_in_place`](Stream::for_each_in_place)).
    in_place: bool,
    /// Whether the `for_each` family may decode a batch before processing it: not once a
    /// processor has effects (`echo` sends), which must happen event by event, so that an
    /// agent failing on an event has not yet sent for the events after it.
    decode_ahead: bool,
    /// Events are acked by the agent ([`Event::ack`]), not when it moves on ([`Stream::noack`]).
    manual_ack: bool,
    /// Which of the queue's events are this stream's: all, one partition's (an isolated
    /// partition's actor), or none (parked until the worker restarts its run).
    scope: Scope,
    /// What re-routes the stream inside the agent ([`Stream::group_by`], [`Stream::through`]).
    reroute: Option<std::sync::Arc<dyn reroute::Reroute>>,
}

impl<K, V> std::fmt::Debug for Stream<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("core", &self.core.index()).field("agent", &self.agent).finish()
    }
}

/// One event: the decoded key and value with where they came from.
#[derive(Debug, Clone)]
pub struct Event<K, V> {
    /// The key, or `None` for a null key.
    pub key: Option<K>,
    /// The value.
    pub value: V,
    /// The topic and partition it was read from.
    pub tp: TopicPartition,
    /// Its offset.
    pub offset: u64,
    /// Its timestamp (milliseconds).
    pub timestamp: i64,
    headers: faust_storage::Record,
    core: Rc<CoreRuntime>,
    agent: usize,
}

impl<K, V> Event<K, V> {
    /// The event of `queued` for `agent`, with its decoded key and value.
    fn of(queued: &QueuedEvent, key: Option<K>, value: V, core: &Rc<CoreRuntime>, agent: usize) -> Self {
        Event {
            key,
            value,
            tp: queued.tp.clone(),
            offset: queued.record.offset,
            timestamp: queued.record.timestamp,
            headers: queued.record.clone(),
            core: core.clone(),
            agent,
        }
    }

    /// The record's headers.
    pub fn headers(&self) -> faust_storage::Headers<'_> {
        self.headers.headers()
    }

    /// Acks the event now, before the agent asks for the next one. Acking twice is harmless.
    pub fn ack(&self) {
        self.core.ack(self.agent, &self.tp, self.offset);
        // Table writes made after this belong to no event: it is done.
        if let Some(slot) = current_slot() {
            slot.clear_if(&self.tp, self.offset);
        }
    }

    /// Sends the event's raw key, value and headers, as they were read, to `topic` (Faust's
    /// `event.forward`): nothing is decoded or encoded again.
    pub async fn forward<K2, V2>(&self, topic: &Topic<K2, V2>) -> Result<Produced, SendError> {
        let record = &self.headers;
        let headers: Vec<faust_storage::Header<'_>> = record.headers().collect();
        topic.inner.send_raw(&self.core, record.key.as_deref(), record.value.as_deref(), &headers, None).await
    }

    /// [`forward`](Event::forward) without waiting: buffered like
    /// [`Topic::send_soon`](crate::Topic::send_soon), durable before this event's offset is
    /// committed. A record with a null value (a tombstone) is not forwarded.
    pub fn forward_soon<K2, V2>(&self, topic: &Topic<K2, V2>) -> Result<(), SendError> {
        let record = &self.headers;
        let Some(value) = record.value.as_deref() else { return Ok(()) };
        let headers: Vec<faust_storage::Header<'_>> = record.headers().collect();
        topic.inner.send_soon_raw(&self.core, None, record.key.as_deref(), value, &headers)
    }
}

impl<K, V> Event<K, V> {
    /// Sends the event's raw value and headers, with `key` instead of its key and with its
    /// timestamp, to `topic` without waiting (the re-keying of `group_by`).
    pub(crate) fn forward_keyed_soon<K2: Serialize + 'static, V2>(
        &self,
        topic: &Topic<K2, V2>,
        key: &K2,
    ) -> Result<(), SendError> {
        let record = &self.headers;
        let Some(value) = record.value.as_deref() else { return Ok(()) };
        crate::stream::repartition::with_position(record, self.tp.partition, self.offset, |headers| {
            topic.send_soon_keyed_raw(&self.core, Some(self.timestamp), key, value, headers)
        })
    }
}

impl<K: Serialize + 'static, V: Serialize + 'static> Event<K, V> {
    /// Sends the event's decoded key and value to `topic`, encoded with that topic's codecs
    /// (Faust's `event.send`).
    pub async fn send(&self, topic: &Topic<K, V>) -> Result<Produced, SendError> {
        topic.send(self.key.as_ref(), &self.value).await
    }
}

impl<K: DeserializeOwned + 'static, V: DeserializeOwned + 'static> Stream<K, V> {
    pub(crate) fn new(run: &AgentRun, key_codec: Codec, value_codec: Codec) -> Self {
        let keys = Rc::new(std::cell::Cell::new(false));
        let decode_keys = keys.clone();
        let in_place = value_codec.is_plain_raw();
        Stream {
            in_place,
            decode_ahead: true,
            manual_ack: false,
            scope: run.scope.clone(),
            reroute: None,
            core: run.core.clone(),
            agent: run.agent,
            queue: run.queue.clone(),
            current: run.current.clone(),
            positions: None,
            max_record_bytes: run.core.settings().max_record_bytes,
            keys,
            stage: Box::new(move |queued: &QueuedEvent| {
                let key = match &queued.record.key {
                    Some(k) if decode_keys.get() => {
                        Some(key_codec.decode_bytes(k).map_err(|e| Rejected::Bad(RecordPart::Key, e.to_string()))?)
                    }
                    _ => None,
                };
                let value = match &queued.record.value {
                    Some(v) => {
                        value_codec.decode_bytes(v).map_err(|e| Rejected::Bad(RecordPart::Value, e.to_string()))?
                    }
                    None => return Err(Rejected::Bad(RecordPart::Value, "null".into())),
                };
                Ok(Some((key, value)))
            }),
        }
    }
}

/// Says once per repartition partition and core (at `info`) that records were dropped as
/// sent again: expected after a crash or restart of the re-keying agent, and the first thing
/// to look at when counts downstream of a `group_by` come out short.
fn note_dropped_resend(queued: &QueuedEvent, source_partition: u32, source_offset: u64) {
    thread_local! {
        static NOTED: std::cell::RefCell<std::collections::HashSet<(std::sync::Arc<str>, u32)>> = std::cell::RefCell::default();
    }
    let first = NOTED.with(|noted| noted.borrow_mut().insert((queued.tp.topic.clone(), queued.tp.partition)));
    if first {
        tracing::info!(topic = %queued.tp.topic, partition = queued.tp.partition, offset = queued.record.offset,
            source_partition, source_offset,
            "dropping repartitioned records already taken (sent again by the re-keying agent); further drops on this partition are not logged");
    }
}

impl<K: 'static, V: 'static> Stream<K, V> {
    pub(crate) fn deduplicated_by(mut self, positions: Option<crate::Table<u32, u64>>) -> Self {
        self.positions = positions;
        self
    }

    /// Whether a record of a repartition topic is new: its source position (stamped by the
    /// re-keying agent) is past the latest one taken from that source partition. A re-keying
    /// agent restarted after a crash sends again what it sent since its last commit, in the
    /// same order, so anything at or below the latest position was taken already. The
    /// position is a table write of the event, committed with its offset.
    fn admit(&self, positions: &crate::Table<u32, u64>, queued: &QueuedEvent) -> bool {
        let Some((partition, offset)) = crate::stream::repartition::source_position(&queued.record) else {
            return true;
        };
        let admitted = positions.advance(partition, offset).unwrap_or_else(|e| {
            tracing::warn!(topic = %queued.tp.topic, partition = queued.tp.partition, offset = queued.record.offset,
                error = %e, "checking a repartitioned record's source position failed; taking the record");
            true
        });
        if !admitted {
            note_dropped_resend(queued, partition, offset);
        }
        admitted
    }

    /// The same stream with another last processor.
    fn then<K2, V2>(
        self,
        next: impl Fn(Option<K>, V) -> Result<Option<(Option<K2>, V2)>, String> + 'static,
    ) -> Stream<K2, V2> {
        self.then_queued(move |_, k, v| next(k, v).map_err(Rejected::Failed))
    }

    /// [`then`](Stream::then) for a processor that also looks at where the record came from.
    fn then_queued<K2, V2>(
        mut self,
        next: impl Fn(&QueuedEvent, Option<K>, V) -> Result<Option<(Option<K2>, V2)>, Rejected> + 'static,
    ) -> Stream<K2, V2> {
        let (positions, decode_ahead) = (self.positions.take(), self.decode_ahead);
        self.restaged(positions, decode_ahead, |previous| {
            Box::new(move |queued: &QueuedEvent| match previous(queued)? {
                Some((k, v)) => next(queued, k, v),
                None => Ok(None),
            })
        })
    }

    /// The stream with the stage `build` makes of the current one (and these positions and
    /// read-ahead); everything else carried over. Its records are owned values from now on.
    fn restaged<K2, V2>(
        self,
        positions: Option<crate::Table<u32, u64>>,
        decode_ahead: bool,
        build: impl FnOnce(Stage<K, V>) -> Stage<K2, V2>,
    ) -> Stream<K2, V2> {
        Stream {
            core: self.core,
            agent: self.agent,
            queue: self.queue,
            current: self.current,
            positions,
            max_record_bytes: self.max_record_bytes,
            keys: self.keys,
            in_place: false,
            decode_ahead,
            manual_ack: self.manual_ack,
            scope: self.scope,
            reroute: self.reroute,
            stage: build(self.stage),
        }
    }

    /// Only the events whose value satisfies `predicate`; the others are acked and skipped
    /// (as Faust's `filter`), so they never hold a commit back.
    pub fn filter(self, predicate: impl Fn(&V) -> bool + 'static) -> Self {
        self.then(move |k, v| Ok(predicate(&v).then_some((k, v))))
    }

    /// Each value turned into another by `f` (Faust's processors / `map`); keys, positions,
    /// acks and `forward` (which sends the record as read) are unchanged.
    ///
    /// ```no_run
    /// # use faust::{App, Settings};
    /// # let app = App::new(Settings::new("doc"));
    /// let orders = app.topic::<String, u64>("orders");
    /// app.agent("double", &orders, |stream| async move {
    ///     let mut doubled = stream.filter(|cents| *cents > 0).map(|cents| cents * 2);
    ///     while let Some(cents) = doubled.next().await {
    ///         println!("{cents}");
    ///     }
    ///     Ok(())
    /// });
    /// ```
    pub fn map<W: 'static>(self, f: impl Fn(V) -> W + 'static) -> Stream<K, W> {
        self.then(move |k, v| Ok(Some((k, f(v)))))
    }

    /// Each value with the value of its key in `table` (a stream-table join, inner: Kafka
    /// Streams' `join`; Faust's is a stub): an event whose key the table does not hold, or
    /// without a key, is acked and skipped. The table must be co-partitioned with the stream's
    /// topic (the same partition count, and keys partitioned alike), so the lookup is local:
    /// the shard of the event's own partition, on its own core. The table is read as the event
    /// reaches the agent, after the writes of the events before it.
    ///
    /// ```no_run
    /// # use faust::{App, Settings};
    /// # let app = App::new(Settings::new("doc"));
    /// let clicks = app.topic::<String, String>("clicks"); // keyed by user
    /// let users = app.table::<String, String>("user_names");
    /// app.agent("named", &clicks, move |stream| {
    ///     let mut named = stream.join(&users);
    ///     async move {
    ///         while let Some((page, name)) = named.next().await {
    ///             println!("{name} clicked {page}");
    ///         }
    ///         Ok(())
    ///     }
    /// });
    /// ```
    pub fn join<T>(self, table: &crate::Table<K, T>) -> Stream<K, (V, T)>
    where
        K: Serialize + DeserializeOwned + std::hash::Hash + Eq + Clone,
        T: Serialize + DeserializeOwned + Clone + 'static,
    {
        self.with_table(table, |value, found| found.map(|t| (value, t)))
    }

    /// [`join`](Stream::join), left: every event, with the value of its key in `table` if the
    /// table holds one (Kafka Streams' `leftJoin`).
    pub fn left_join<T>(self, table: &crate::Table<K, T>) -> Stream<K, (V, Option<T>)>
    where
        K: Serialize + DeserializeOwned + std::hash::Hash + Eq + Clone,
        T: Serialize + DeserializeOwned + Clone + 'static,
    {
        self.with_table(table, |value, found| Some((value, found)))
    }

    fn with_table<T, W: 'static>(
        self,
        table: &crate::Table<K, T>,
        combine: impl Fn(V, Option<T>) -> Option<W> + 'static,
    ) -> Stream<K, W>
    where
        K: Serialize + DeserializeOwned + std::hash::Hash + Eq + Clone,
        T: Serialize + DeserializeOwned + Clone + 'static,
    {
        self.keys.set(true);
        let table = table.clone();
        let mut stream = self.then_queued(move |queued, key, value| {
            let found = match &key {
                Some(k) => table
                    .join_lookup(&queued.tp.topic, queued.tp.partition, k)
                    .map_err(|e| Rejected::Failed(format!("join with table `{}`: {e}", table.name())))?,
                None => None,
            };
            Ok(combine(value, found).map(|w| (key, w)))
        });
        // Read in turn, after the writes of the events before it (not ahead with the batch).
        stream.decode_ahead = false;
        stream
    }

    /// Each value with its position in this stream, counting from 0 (Faust's `enumerate`).
    /// The count is per stream instance: an agent runs one per core, and a restarted agent
    /// starts again from 0.
    pub fn enumerate(self) -> Stream<K, (u64, V)> {
        let count = std::cell::Cell::new(0u64);
        self.then(move |k, v| {
            let n = count.get();
            count.set(n + 1);
            Ok(Some((k, (n, v))))
        })
    }

    /// Sends every key and value that passes to `topic` as well (Faust's `echo`), with
    /// [`Topic::send_soon`]: buffered, and durable before the offsets of the events behind
    /// them are committed.
    pub fn echo(self, topic: &Topic<K, V>) -> Self
    where
        K: Serialize,
        V: Serialize,
    {
        let topic = topic.clone();
        self.keys.set(true);
        let mut stream = self.then(move |k, v| {
            topic.send_soon(k.as_ref(), &v).map_err(|e| format!("echo to `{}`: {e}", topic.name()))?;
            Ok(Some((k, v)))
        });
        stream.decode_ahead = false;
        stream
    }

    /// The same stream, without acking an event when the agent asks for the next one
    /// (Faust's `stream.noack()`): the agent acks each with [`Event::ack`] when it is done
    /// with it — after an asynchronous step, say, or once a batch it belongs to is written
    /// elsewhere. Until then the event's offset, and every later one of its partition, is not
    /// committed, and its table writes stay undoable: an agent that fails gets the events it
    /// has not acked again (their writes undone), as it gets the event it failed on. Events
    /// still unacked when the agent returns are acked then. Filtered and bad records are
    /// acked by the stream, as without `noack`.
    ///
    /// ```no_run
    /// # use faust::{App, Settings};
    /// # let app = App::new(Settings::new("doc"));
    /// let orders = app.topic::<String, u64>("orders");
    /// app.agent("batches", &orders, |stream| async move {
    ///     let mut stream = stream.noack();
    ///     let mut pending = Vec::new();
    ///     while let Some(event) = stream.next_event().await {
    ///         pending.push(event);
    ///         if pending.len() == 100 {
    ///             // ... write the hundred somewhere, then:
    ///             pending.drain(..).for_each(|e| e.ack());
    ///         }
    ///     }
    ///     Ok(())
    /// });
    /// ```
    pub fn noack(mut self) -> Self {
        self.manual_ack = true;
        self
    }

    fn ack_current(&mut self) {
        if self.manual_ack {
            // Events stay in hand until the agent acks them: a failure hands them back.
            let (core, agent) = (&self.core, self.agent);
            self.current.borrow_mut().retain(|e| !core.acked(agent, &e.tp, e.record.offset));
        } else {
            for e in self.current.borrow_mut().drain(..) {
                self.core.ack(self.agent, &e.tp, e.record.offset);
            }
        }
        // Until the next event is handed out, the task processes none (table writes then
        // need an explicit partition).
        if let Some(slot) = current_slot() {
            slot.clear();
        }
    }

    /// The next event, acking the previous one; `None` when the worker stops.
    pub async fn next_event(&mut self) -> Option<Event<K, V>> {
        self.keys.set(true);
        self.next_event_keyless().await
    }

    /// [`next_event`](Stream::next_event) for callers that never look at the key (it is
    /// `None` unless something else asked for keys).
    pub(crate) async fn next_event_keyless(&mut self) -> Option<Event<K, V>> {
        self.ack_current();
        self.pull(None, None).await
    }

    /// The next event's key and value, acking the previous event: [`next_event`](Stream::next_event) without
    /// building the [`Event`] (its topic, headers and core are not looked at).
    async fn next_pair(&mut self) -> Option<(Option<K>, V)> {
        self.ack_current();
        self.pull_as(None, None, |_, key, value| (key, value)).await
    }

    /// The next event that gets through the stream's processors, added to the events in
    /// hand. With a deadline, gives up (returning `None`) when it passes. With `before`, a
    /// record it refuses (by what can be seen undecoded, such as its timestamp) is put back
    /// at the front of the queue, untouched, and `None` returned.
    async fn pull(
        &mut self,
        deadline: Option<std::time::Instant>,
        before: Option<&dyn Fn(&QueuedEvent) -> bool>,
    ) -> Option<Event<K, V>> {
        let (core, agent) = (self.core.clone(), self.agent);
        self.pull_as(deadline, before, |queued, key, value| Event::of(queued, key, value, &core, agent)).await
    }

    /// [`pull`](Stream::pull), handing out what `make` makes of the event's record, key and
    /// value.
    async fn pull_as<T>(
        &mut self,
        deadline: Option<std::time::Instant>,
        before: Option<&dyn Fn(&QueuedEvent) -> bool>,
        make: impl Fn(&QueuedEvent, Option<K>, V) -> T,
    ) -> Option<T> {
        // An agent whose events and sends are all ready would never give the core back: let
        // the commit task and the other partitions' consumers run when its time slice is up.
        glommio::yield_if_needed().await;
        // Buffered sends past their limit are written before more events are taken.
        self.core.flush_if_full().await;
        loop {
            let queued = match deadline {
                None => self.queue.pop(&self.scope).await?,
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    futures_lite::future::or(self.queue.pop(&self.scope), async {
                        glommio::timer::sleep(left).await;
                        None
                    })
                    .await?
                }
            };
            // A partition stopped at a bad record hands nothing more out (not acked either:
            // the worker is stopping, and its offset stays at the bad record).
            if self.core.halted(&queued.tp) {
                continue;
            }
            if let Some(before) = before
                && !before(&queued)
            {
                self.queue.push_front(queued);
                return None;
            }
            let outcome = self.outcome(&queued, &Self::decode);
            if let Some((key, value)) = self.hand_out(current_slot().as_deref(), &queued, outcome) {
                let made = make(&queued, key, value);
                self.current.borrow_mut().push(queued);
                return Some(made);
            }
        }
    }

    /// What the stream does with a record's `outcome` before handing it out. A record the
    /// processors filtered out is acked; a bad one goes to the bad-record policy; one a
    /// processor failed on is logged and skipped. Otherwise the record becomes the task's
    /// current event (in `slot`) and its value is returned, unless the repartition positions
    /// say it was taken already: then it is acked and dropped.
    fn hand_out<D>(
        &self,
        slot: Option<&TaskSlot>,
        queued: &QueuedEvent,
        outcome: Result<Option<D>, Rejected>,
    ) -> Option<D> {
        let (tp, offset) = (&queued.tp, queued.record.offset);
        match outcome {
            Ok(Some(value)) => {
                if let Some(slot) = slot {
                    slot.set_at(&tp.topic, tp.partition, offset, queued.record.timestamp);
                    slot.note_reply(&queued.record);
                }
                if let Some(positions) = &self.positions
                    && !self.admit(positions, queued)
                {
                    self.core.ack(self.agent, tp, offset);
                    if let Some(slot) = slot {
                        slot.clear();
                    }
                    return None;
                }
                return Some(value);
            }
            Ok(None) => self.core.ack(self.agent, tp, offset),
            Err(Rejected::Bad(part, reason)) => {
                if self.core.bad_record(queued, part, reason) {
                    self.core.ack(self.agent, tp, offset);
                }
            }
            Err(Rejected::Failed(reason)) => self.skip_failed(queued, &reason),
        }
        None
    }

    /// The next value, acking the previous event; `None` when the worker stops.
    pub async fn next(&mut self) -> Option<V> {
        self.next_pair().await.map(|(_, value)| value)
    }

    /// The next key and value, acking the previous event.
    pub async fn next_item(&mut self) -> Option<(Option<K>, V)> {
        self.keys.set(true);
        self.next_pair().await
    }

    /// Up to `max` events, waiting at most `within` after the first for the rest (Faust's
    /// `take_events`). The batch is acked when the agent asks for more; an agent that fails
    /// gets the whole batch again. Empty only when the worker stops.
    pub async fn take_events(&mut self, max: usize, within: std::time::Duration) -> Vec<Event<K, V>> {
        self.keys.set(true);
        self.take_events_keyless(max, within).await
    }

    async fn take_events_keyless(&mut self, max: usize, within: std::time::Duration) -> Vec<Event<K, V>> {
        self.ack_current();
        let mut batch = Vec::new();
        let Some(first) = self.pull(None, None).await else { return batch };
        batch.push(first);
        let deadline = std::time::Instant::now() + within;
        while batch.len() < max.max(1) {
            match self.pull(Some(deadline), None).await {
                Some(e) => batch.push(e),
                None => break,
            }
        }
        batch
    }

    /// Up to `max` events that lie within `within` of event time (Faust's
    /// `take_with_timestamp`): the batch ends before the first event whose timestamp is
    /// `within` or more after the first event's (that event opens the next batch), at `max`
    /// events, or when `within` of wall-clock time passed since the first arrived, whichever
    /// comes first — so a batch is never held up by a quiet stream. Acked as
    /// [`take_events`](Stream::take_events) batches are. Empty only when the worker stops.
    pub async fn take_with_timestamp(&mut self, max: usize, within: std::time::Duration) -> Vec<Event<K, V>> {
        self.keys.set(true);
        self.ack_current();
        let mut batch = Vec::new();
        let Some(first) = self.pull(None, None).await else { return batch };
        let end = first.timestamp.saturating_add(i64::try_from(within.as_millis()).unwrap_or(i64::MAX));
        batch.push(first);
        let deadline = std::time::Instant::now() + within;
        let in_window = move |queued: &QueuedEvent| queued.record.timestamp < end;
        while batch.len() < max.max(1) {
            match self.pull(Some(deadline), Some(&in_window)).await {
                Some(e) => batch.push(e),
                None => break,
            }
        }
        batch
    }

    /// Up to `max` values, waiting at most `within` after the first for the rest (Faust's
    /// `take`); see [`Stream::take_events`].
    pub async fn take(&mut self, max: usize, within: std::time::Duration) -> Vec<V> {
        self.take_events_keyless(max, within).await.into_iter().map(|e| e.value).collect()
    }

    /// Runs `f` on every value until the worker stops (Kafka Streams' `foreach`): the fast
    /// way to process a stream whose work per event is synchronous, as table updates and
    /// [`Topic::send_soon`] are. The events waiting are taken a batch at a time and handed to
    /// `f` one after the other, without the per-event wake-up of [`next`](Stream::next); each
    /// is acked when `f` returns `Ok`, so commits, table writes and the bad-record policy
    /// behave as with `next`. When `f` fails (or panics) the agent fails on that event alone,
    /// as with `next`: the restarted agent gets it again, then the events after it (and skips
    /// it after 3 failures).
    ///
    /// ```no_run
    /// # use faust::{App, Settings};
    /// # let app = App::new(Settings::new("doc"));
    /// let orders = app.topic::<String, u64>("orders");
    /// let totals = app.table::<String, u64>("totals").with_default(|| 0);
    /// app.agent("total", &orders, move |stream| {
    ///     let totals = totals.clone();
    ///     stream.for_each(move |cents| {
    ///         totals.update(&"all".to_string(), |t| *t += cents)?;
    ///         Ok(())
    ///     })
    /// });
    /// ```
    pub async fn for_each(mut self, mut f: impl FnMut(V) -> Result<(), AgentError>) -> Result<(), AgentError> {
        self.drive(Self::decode, |(_, value), _| f(value)).await
    }

    /// [`for_each`](Stream::for_each) with keys and values (as [`next_item`](Stream::next_item)
    /// hands them out; Kafka Streams' `foreach((key, value) -> ...)`).
    pub async fn for_each_item(
        mut self,
        mut f: impl FnMut(Option<K>, V) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        self.keys.set(true);
        self.drive(Self::decode, |(key, value), _| f(key, value)).await
    }

    /// [`for_each`](Stream::for_each) with whole events: the key, the value and where they
    /// came from.
    pub async fn for_each_event(
        mut self,
        mut f: impl FnMut(&Event<K, V>) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        self.keys.set(true);
        let (core, agent) = (self.core.clone(), self.agent);
        self.drive(Self::decode, |(key, value), queued: &QueuedEvent| f(&Event::of(queued, key, value, &core, agent)))
            .await
    }

    /// The stream's processors on one record: the key (when asked for) and the value, or why
    /// not.
    fn decode(&self, queued: &QueuedEvent) -> Result<Option<(Option<K>, V)>, Rejected> {
        (self.stage)(queued)
    }

    /// The batch loop of the `for_each` family. Takes the events waiting (up to
    /// [`BATCH`]) and, for each one: drops it if its partition halted, rejects it if it is
    /// oversized, `decode`s it (a rejected record goes to the bad-record policy, a filtered
    /// one is acked), makes it the task's current event, drops it if the repartition
    /// positions say it was taken already, and `call`s the agent's function on it, acking
    /// it when that returns `Ok`. Between batches it lets the core's other tasks run and
    /// writes buffered sends past their limit, as `next` does between events.
    ///
    /// The batch is held in an [`InHand`]: on an error or a panic in `call`, the event is
    /// handed to the supervisor, which gives it to the restarted agent, and those after it go
    /// back to the queue.
    async fn drive<D>(
        &mut self,
        decode: impl Fn(&Self, &QueuedEvent) -> Result<Option<D>, Rejected>,
        mut call: impl FnMut(D, &QueuedEvent) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        self.ack_current();
        let slot = current_slot();
        let hand = InHand {
            current: self.current.clone(),
            queue: self.queue.clone(),
            core: self.core.clone(),
            batch: Rc::default(),
        };
        // `current_event()` finds the event being processed at the front of the batch.
        if let Some(slot) = &slot {
            slot.show_batch(hand.batch.clone());
        }
        let mut decoded: Vec<Result<Option<D>, Rejected>> = Vec::with_capacity(BATCH);
        let mut acks = BatchAcks { core: self.core.clone(), agent: self.agent, tp: None, offsets: Vec::new() };
        loop {
            glommio::yield_if_needed().await;
            self.core.flush_if_full().await;
            match self.queue.pop(&self.scope).await {
                Some(first) => hand.batch.borrow_mut().push_back(first),
                None => return Ok(()),
            }
            self.queue.take_into(&mut hand.batch.borrow_mut(), BATCH - 1, &self.scope);
            // The whole batch is decoded first, then processed: each loop keeps its code and
            // data in the caches. Decoding reads nothing the processing writes; processors
            // with effects turn it off (`decode_ahead`).
            if self.decode_ahead {
                decoded.extend(hand.batch.borrow().iter().map(|queued| self.outcome(queued, &decode)));
            }
            let mut ahead = decoded.drain(..);
            loop {
                // Shared while the agent's function runs (`current_event()` reads the front).
                let batch = hand.batch.borrow();
                let Some(queued) = batch.front() else { break };
                let decoded_ahead = ahead.next();
                // A partition stopped at a bad record hands nothing more out (not acked
                // either: the worker is stopping, and its offset stays at the bad record).
                if self.core.halted(&queued.tp) {
                    drop(batch);
                    hand.batch.borrow_mut().pop_front();
                    continue;
                }
                let outcome = match decoded_ahead {
                    Some(outcome) => outcome,
                    None => self.outcome(queued, &decode),
                };
                if let Some(value) = self.hand_out(slot.as_deref(), queued, outcome) {
                    // On an error the event stays in hand; `hand` passes it on. The events
                    // before it were processed: they are acked first.
                    if let Err(e) = call(value, queued) {
                        acks.flush();
                        return Err(e);
                    }
                    if self.manual_ack {
                        self.current.borrow_mut().push(queued.clone());
                    } else {
                        acks.push(&queued.tp, queued.record.offset);
                    }
                }
                drop(batch);
                hand.batch.borrow_mut().pop_front();
            }
            // Before the core's other tasks run (a commit reads the acks).
            acks.flush();
            if self.manual_ack {
                let (core, agent) = (&self.core, self.agent);
                self.current.borrow_mut().retain(|e| !core.acked(agent, &e.tp, e.record.offset));
            }
            if let Some(slot) = &slot {
                slot.clear();
            }
        }
    }

    /// What `decode` makes of `queued`, unless it is oversized.
    fn outcome<D>(
        &self,
        queued: &QueuedEvent,
        decode: &impl Fn(&Self, &QueuedEvent) -> Result<Option<D>, Rejected>,
    ) -> Result<Option<D>, Rejected> {
        match self.oversized(queued) {
            Some(rejected) => Err(rejected),
            None => decode(self, queued),
        }
    }

    /// Why `queued` is a bad record before it is even decoded: its key and value are larger
    /// than `max_record_bytes`.
    fn oversized(&self, queued: &QueuedEvent) -> Option<Rejected> {
        let size =
            queued.record.key.as_ref().map_or(0, |k| k.len()) + queued.record.value.as_ref().map_or(0, |v| v.len());
        (size > self.max_record_bytes).then(|| {
            Rejected::Bad(
                RecordPart::Record,
                format!("{size} bytes, over max_record_bytes ({})", self.max_record_bytes),
            )
        })
    }

    /// Logs, counts, acks and skips a record a processor failed on.
    fn skip_failed(&self, queued: &QueuedEvent, reason: &str) {
        let raw = queued.record.value.as_deref().unwrap_or_default();
        tracing::warn!(
            topic = %queued.tp.topic, partition = queued.tp.partition, offset = queued.record.offset,
            %reason, value = %preview(raw), "skipping a record that cannot be processed"
        );
        self.core.count_decode_error();
        self.core.ack(self.agent, &queued.tp, queued.record.offset);
    }
}

/// Events the `for_each` family takes from the queue at a time: enough that the wake-up and
/// yield between batches cost little per event, few enough that a batch is done in well
/// under a task's time slice.
const BATCH: usize = 256;

/// The acks of a batch's processed events, gathered per run of one partition and given to
/// the core at once ([`CoreRuntime::ack_many`]): at the end of the batch, when the partition
/// changes, before an error leaves the loop, and when dropped (a panic in the agent's
/// function must not leave the events it processed before unacked).
struct BatchAcks {
    core: Rc<CoreRuntime>,
    agent: usize,
    tp: Option<TopicPartition>,
    /// Ascending.
    offsets: Vec<u64>,
}

impl BatchAcks {
    fn push(&mut self, tp: &TopicPartition, offset: u64) {
        let same_run = self.offsets.last().is_some_and(|&last| last < offset)
            && self.tp.as_ref().is_some_and(|t| t.partition == tp.partition && same_topic(&t.topic, &tp.topic));
        if !same_run {
            self.flush();
            self.tp = Some(tp.clone());
        }
        self.offsets.push(offset);
    }

    fn flush(&mut self) {
        if let Some(tp) = &self.tp
            && !self.offsets.is_empty()
        {
            self.core.ack_many(self.agent, tp, &self.offsets);
        }
        self.offsets.clear();
    }
}

impl Drop for BatchAcks {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A batch of events taken from an agent's queue and not yet acked. Dropped early (the
/// agent's function failed or panicked on the first of them), it hands that event to the
/// supervisor's list of events in hand, which gives it to the restarted agent (or skips it
/// after too many failures), and puts the others back at the front of the queue, in their
/// order, as if never taken: they were not handed out, so they are not part of the failure.
/// Those of a partition released meanwhile are dropped, as the supervisor drops the failed
/// ones (the partition's next owner processes them).
struct InHand {
    current: Rc<std::cell::RefCell<Vec<QueuedEvent>>>,
    queue: Rc<EventQueue>,
    core: Rc<CoreRuntime>,
    batch: Rc<std::cell::RefCell<std::collections::VecDeque<QueuedEvent>>>,
}

impl Drop for InHand {
    fn drop(&mut self) {
        // Taken out first: a panic may unwind past a borrow of the batch.
        let mut batch = std::mem::take(&mut *self.batch.borrow_mut());
        let Some(failed) = batch.pop_front() else { return };
        self.current.borrow_mut().push(failed);
        while let Some(e) = batch.pop_back() {
            if !self.core.released(&e.tp) {
                self.queue.push_front(e);
            }
        }
    }
}

impl<K: 'static, R: FromBytes + KnownLayout + Immutable + Unaligned + 'static> Stream<K, Fixed<R>> {
    /// [`for_each`](Stream::for_each) for fixed-layout records, read in place: `f` gets a
    /// `&R` in the fetched buffer itself, with no copy, no allocation and no reference count
    /// taken on the buffer ([`Codec::view`]). A record that is not one `R` is a bad record.
    /// On a stream with processors (`filter`, `map`...) or a value codec other than `raw`,
    /// the values are the processors' `Fixed<R>`, and `f` gets what they hold.
    ///
    /// ```no_run
    /// # use faust::{App, Fixed, Settings};
    /// use zerocopy::little_endian::U64;
    /// use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};
    ///
    /// #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
    /// #[repr(C)]
    /// struct Reading {
    ///     sensor: U64,
    ///     micros: U64,
    /// }
    ///
    /// # let app = App::new(Settings::new("doc"));
    /// let readings = app.topic_with::<u64, Fixed<Reading>>("readings", faust::Codec::JSON, faust::Codec::RAW);
    /// app.agent("slow", &readings, |stream| {
    ///     stream.for_each_in_place(|reading: &Reading| {
    ///         if reading.micros.get() > 1_000 {
    ///             println!("sensor {} is slow", reading.sensor.get());
    ///         }
    ///         Ok(())
    ///     })
    /// });
    /// ```
    pub async fn for_each_in_place(
        mut self,
        mut f: impl FnMut(&R) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        if !self.in_place {
            return self.drive(Self::decode, |(_, value), _| f(&value)).await;
        }
        self.drive(
            |_, queued| match &queued.record.value {
                Some(v) => crate::codec::view_fixed::<R>(v)
                    .map(|_| Some(()))
                    .map_err(|e| Rejected::Bad(RecordPart::Value, e.to_string())),
                None => Err(Rejected::Bad(RecordPart::Value, "null".into())),
            },
            |(), queued| match queued.record.value.as_deref().map(crate::codec::view_fixed::<R>) {
                Some(Ok(record)) => f(record),
                // `decode` checked the record just before.
                _ => Err("a record read in place changed under the stream".into()),
            },
        )
        .await
    }
}
