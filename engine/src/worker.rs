//! The worker: start-up, the per-core runtime (consumers, ack tracking, commits, agents),
//! and shutdown.
//!
//! On each core: one consumer task per assigned partition fetches records and hands them to
//! the queue of every agent subscribed to the topic. A full queue stops that partition's
//! fetching until the agent catches up (back-pressure, per partition). Agents ack an event
//! when they ask for the next one; a commit task commits, per partition, the offset below
//! which every delivered event was acked. An agent's sends are awaited before it moves on,
//! so an offset is only committed after the records produced for it are durable.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_listener::{Event, IntoNotification};
use faust_storage::Record;
use faust_transport::{AutoOffsetReset, OffsetSpec, Produced, TopicConfig, TopicPartition};

use crate::acks::AckTracker;
use crate::app::{AgentError, AgentSpec, App, TopicKind, lock};
use crate::runtime::context::{InTask, TaskSlot};
use crate::runtime::state::{AnyShard, CommitFailure, TableMeta, Token};
use crate::runtime::{RuntimeConfig, RuntimeError, run_on_cores};
use crate::transports::{AnyCore, AnyTransport};
use crate::util::now_ms;

/// The maps on the per-event path hash with foldhash (SipHash showed in profiles).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Ack trackers by (agent, partition), looked up on every event without cloning the key.
type AckMap = hashbrown::HashMap<(usize, TopicPartition), AckTracker, foldhash::fast::RandomState>;

/// Table shards by table, then partition.
pub(crate) type ShardsByTable = Vec<Vec<Option<Rc<dyn AnyShard>>>>;

/// A borrowed `AckMap` key; hashes exactly as the owned one (same fields, same order).
#[derive(Hash)]
struct AckKey<'a>(usize, &'a TopicPartition);

impl hashbrown::Equivalent<(usize, TopicPartition)> for AckKey<'_> {
    fn equivalent(&self, key: &(usize, TopicPartition)) -> bool {
        self.0 == key.0 && *self.1 == key.1
    }
}

/// How many times an agent is restarted on the same event before the event is skipped.
const MAX_RESTARTS_PER_EVENT: u32 = 3;
/// Bytes asked for per fetch.
const FETCH_BYTES: usize = 1 << 20;
/// How long a fetch waits for new records before the consumer checks for a stop.
const FETCH_WAIT: Duration = Duration::from_millis(100);
/// Buffered sends (`send_soon`) past this many bytes are written before an agent takes its
/// next event: the buffer is bounded, and a busy agent feeds the log in large batches.
const PENDING_FLUSH_BYTES: usize = 1 << 20;

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The runtime could not start.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The transport failed at start-up or shutdown.
    #[error(transparent)]
    Transport(#[from] faust_transport::Error),
    /// Start-up failed on a core.
    #[error("core {core}: {message}")]
    Core {
        /// The core.
        core: usize,
        /// What went wrong.
        message: String,
    },
    /// A bad record stopped the worker (`bad_record_policy = stop`); it is not committed, so
    /// a restart meets it again.
    #[error("{0} (bad_record_policy = stop; it stays uncommitted)")]
    BadRecord(crate::stream::BadRecord),
    /// The broker lost records the worker had already read: a partition's log ends before
    /// the worker's position in it (a broker restarted without its data, a topic deleted and
    /// created again, an unclean leader election). The worker commits nothing after seeing
    /// it, so neither offsets nor table state from the old log reach the new one; a restart
    /// follows the broker as it is now (see docs/engine.md, "Kafka").
    #[error(
        "the broker lost data of {tp}: the worker had read up to offset {position}, but {}; nothing was committed after that",
        match high_watermark { Some(end) => format!("the log now ends at {end}"), None => "the partition no longer exists".to_string() }
    )]
    BrokerLostData {
        /// The partition.
        tp: TopicPartition,
        /// The offset the worker was about to fetch.
        position: u64,
        /// Where the partition's log ends now, or `None` when the broker no longer has the
        /// partition (it kept answering that the topic or partition is unknown).
        high_watermark: Option<u64>,
    },
    /// The worker stopped because of its consumer group (joining failed, an assignment change
    /// could not be applied, ...).
    #[error("group `{group}`: {message}")]
    Group {
        /// The group (the app id).
        group: String,
        /// What went wrong.
        message: String,
    },
}

/// Where a core found that the broker lost data: the partition, the position read up to and
/// the log's end now (`None`: the partition is gone). Shared by the cores.
type LostData = Arc<Mutex<Option<(TopicPartition, u64, Option<u64>)>>>;

/// Why buffered sends, or a commit that waits for them, failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FlushError {
    /// A batch could not be written; it is kept and written again by the next flush.
    #[error("writing buffered sends to {tp}: {message}")]
    Write { tp: TopicPartition, message: String },
    /// Buffered records were lost, so no offset may be committed any more.
    #[error("buffered sends were lost; offsets are no longer committed")]
    SendsLost,
    /// The transport refused the commit.
    #[error(transparent)]
    Transport(#[from] faust_transport::Error),
    /// The broker lost data the worker had read: nothing may be committed any more.
    #[error("the broker lost data; offsets are no longer committed")]
    BrokerLostData,
    /// A table's state could not be written (the commit is retried later, unless the failure
    /// cannot be mended by a retry: then the worker stops).
    #[error("writing table state: {0}")]
    Tables(String),
}

pub(crate) use crate::partitioner::partition_for_key;

/// An event waiting in an agent's queue: where it came from and the record.
#[derive(Debug, Clone)]
pub(crate) struct QueuedEvent {
    pub(crate) tp: TopicPartition,
    pub(crate) record: Record,
}

/// The queue between a core's consumers and one agent on that core: one bounded sub-queue
/// per partition, so back-pressure is per partition, and `pop` takes from the partitions in
/// turn, so one partition's backlog cannot starve the others (Faust round-robins the same
/// way).
#[derive(Debug)]
pub(crate) struct EventQueue {
    lanes: RefCell<Vec<Lane>>,
    /// The lane `pop` looks at first.
    next: Cell<usize>,
    capacity: usize,
    readable: Event,
    writable: Event,
    /// Readers (agent instances) and writers (consumers) waiting on the events above: a
    /// notification is only sent when someone waits, which keeps it off the per-event path.
    readers_waiting: Cell<usize>,
    writers_waiting: Cell<usize>,
    /// What was left in the lane of the event taken last.
    last_remaining: Cell<usize>,
    closed: Cell<bool>,
}

#[derive(Debug)]
struct Lane {
    tp: TopicPartition,
    events: VecDeque<QueuedEvent>,
}

impl EventQueue {
    fn new(capacity: usize) -> Self {
        EventQueue {
            lanes: RefCell::new(Vec::new()),
            next: Cell::new(0),
            capacity: capacity.max(1),
            readable: Event::new(),
            writable: Event::new(),
            readers_waiting: Cell::new(0),
            writers_waiting: Cell::new(0),
            last_remaining: Cell::new(0),
            closed: Cell::new(false),
        }
    }

    /// The lane of `tp`, created on first use.
    fn lane(&self, tp: &TopicPartition) -> usize {
        let mut lanes = self.lanes.borrow_mut();
        if let Some(i) = lanes.iter().position(|l| l.tp == *tp) {
            return i;
        }
        lanes.push(Lane { tp: tp.clone(), events: VecDeque::new() });
        lanes.len() - 1
    }

    fn push(&self, lane: usize, event: QueuedEvent) {
        if let Some(l) = self.lanes.borrow_mut().get_mut(lane) {
            l.events.push_back(event);
        }
    }

    /// Wakes readers for `pushed` new events: one more per event (instances of an agent with
    /// `concurrency` all wait here), even if some are woken and have not run yet. Called once
    /// per batch pushed, not per event, so the notification stays off the per-event path.
    fn wake(&self, pushed: usize) {
        let waiting = self.readers_waiting.get();
        if waiting > 0 && pushed > 0 {
            self.readable.notify(pushed.min(waiting).additional());
        }
    }

    /// Puts an event back at the front of its lane (an agent failed on it and is restarted),
    /// and makes its lane the next one served.
    pub(crate) fn push_front(&self, event: QueuedEvent) {
        let lane = self.lane(&event.tp);
        if let Some(l) = self.lanes.borrow_mut().get_mut(lane) {
            l.events.push_front(event);
        }
        self.next.set(lane);
        self.readable.notify(1);
    }

    fn take(&self) -> Option<QueuedEvent> {
        let mut lanes = self.lanes.borrow_mut();
        let n = lanes.len();
        for k in 0..n {
            let i = (self.next.get() + k) % n;
            if let Some(e) = lanes[i].events.pop_front() {
                self.next.set((i + 1) % n);
                self.last_remaining.set(lanes[i].events.len());
                return Some(e);
            }
        }
        None
    }

    /// Moves up to `max` waiting events into `batch`, taking from the partitions in turn as
    /// `pop` does; returns how many. Never waits.
    pub(crate) fn take_into(&self, batch: &mut VecDeque<QueuedEvent>, max: usize) -> usize {
        let mut taken = 0;
        while taken < max {
            match self.take() {
                Some(e) => batch.push_back(e),
                None => break,
            }
            taken += 1;
        }
        if taken > 0 {
            self.taken();
        }
        taken
    }

    /// The next event; `None` once the queue is closed and drained.
    pub(crate) async fn pop(&self) -> Option<QueuedEvent> {
        // The common case, an event waiting, without registering a listener.
        if let Some(e) = self.take() {
            self.taken();
            return Some(e);
        }
        loop {
            let listener = self.readable.listen();
            if let Some(e) = self.take() {
                self.taken();
                return Some(e);
            }
            if self.closed.get() {
                return None;
            }
            self.readers_waiting.set(self.readers_waiting.get() + 1);
            // Counted down however the wait ends (the future may be dropped while waiting).
            let _waiting = WaitGuard(&self.readers_waiting);
            listener.await;
        }
    }

    /// After an event was taken: wakes consumers waiting for room once the lane is half
    /// empty, so a consumer refills it with a whole fetch rather than one event at a time.
    fn taken(&self) {
        if self.writers_waiting.get() > 0 && self.last_remaining.get() <= self.capacity / 2 {
            self.writable.notify(usize::MAX);
        }
    }

    /// Waits until `lane` has room (or the queue is closed).
    async fn room(&self, lane: usize) {
        let has_room = || {
            let len = self.lanes.borrow().get(lane).map_or(0, |l| l.events.len());
            len < self.capacity || self.closed.get()
        };
        while !has_room() {
            let listener = self.writable.listen();
            if has_room() {
                return;
            }
            self.writers_waiting.set(self.writers_waiting.get() + 1);
            let _waiting = WaitGuard(&self.writers_waiting);
            listener.await;
        }
    }

    /// Drops the events of `tp` waiting in the queue (its partition was released): returns
    /// how many, and the first one's offset.
    pub(crate) fn purge(&self, tp: &TopicPartition) -> (usize, Option<u64>) {
        let mut lanes = self.lanes.borrow_mut();
        let Some(lane) = lanes.iter_mut().find(|l| l.tp == *tp) else { return (0, None) };
        let first = lane.events.front().map(|e| e.record.offset);
        let n = lane.events.len();
        lane.events.clear();
        (n, first)
    }

    fn close(&self) {
        self.closed.set(true);
        self.readable.notify(usize::MAX);
        self.writable.notify(usize::MAX);
    }
}

/// Counts a waiter down when its wait ends.
struct WaitGuard<'a>(&'a Cell<usize>);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// Everything one core needs, shared by its tasks.
pub(crate) struct CoreRuntime {
    pub(crate) index: usize,
    pub(crate) transport: AnyCore,
    pub(crate) group: String,
    /// `Settings::commit_every`, read on every ack.
    commit_every: u64,
    partitions: HashMap<Arc<str>, u32>,
    /// Per agent (by index): its queue.
    pub(crate) queues: Vec<Rc<EventQueue>>,
    /// Per (agent, partition): what the agent acked.
    pub(crate) acks: RefCell<AckMap>,
    /// Offsets committed last, per partition.
    pub(crate) committed: RefCell<HashMap<TopicPartition, u64>>,
    rr: Cell<u32>,
    /// Set when the worker stops (the core's tasks wind down).
    stopping: crate::runtime::signal::Cancel,
    decode_errors: Cell<u64>,
    /// Buffered sends (`send_soon`), one batch per partition, in send order.
    pending: RefCell<HashMap<TopicPartition, faust_storage::BatchBuilder>>,
    pending_bytes: Cell<usize>,
    /// Wakes the flusher when something is buffered.
    pending_event: Event,
    /// Batches whose write failed, to be written (in order) before anything newer.
    retry: RefCell<VecDeque<(TopicPartition, faust_storage::BatchBuilder)>>,
    /// One flush at a time, so batches of a partition reach the log in send order.
    flush_lock: glommio::sync::Semaphore,
    /// Set when buffered records were lost: nothing may be committed any more.
    sends_lost: Cell<bool>,
    /// Per channel: the queues of the agents that consume it.
    pub(crate) channel_agents: HashMap<Arc<str>, Vec<usize>>,
    /// Numbers events delivered through channels.
    channel_seq: Cell<u64>,
    /// The app's stop signal (a core stops the worker when sends were lost).
    app_stop: Arc<crate::app::StopSignal>,
    /// The table shards of this core, by table then partition.
    pub(crate) shards: RefCell<ShardsByTable>,
    /// Shards of revoked partitions, kept open in case they come back (by changelog
    /// partition).
    pub(crate) suspended: RefCell<HashMap<TopicPartition, crate::rebalance::Suspended>>,
    /// The consumer of each source partition this core processes.
    pub(crate) consumers: RefCell<HashMap<TopicPartition, crate::rebalance::Consumer>>,
    /// Who commits, for transports with groups.
    pub(crate) fence: RefCell<Option<faust_transport::Fence>>,
    /// One commit at a time: two interleaved commits could record offsets out of order.
    commit_lock: glommio::sync::Semaphore,
    /// The app's tables, and the table of each changelog topic.
    pub(crate) tables: Vec<Arc<dyn TableMeta>>,
    pub(crate) changelog_tables: HashMap<Arc<str>, usize>,
    /// The agents consuming each topic.
    pub(crate) agents_by_topic: HashMap<Arc<str>, Vec<usize>>,
    pub(crate) app: App,
    pub(crate) stats: Arc<crate::rebalance::Counters>,
    /// Shards holding writes of events not yet acked, by event.
    pub(crate) pending_writes: RefCell<Vec<(Token, Rc<dyn AnyShard>)>>,
    /// `settle_writes`' buffer, empty between calls.
    settling: Cell<Vec<(Token, Rc<dyn AnyShard>)>>,
    /// Commits in a row that waited because table state ran ahead of committable offsets.
    deferred_commits: Cell<u32>,
    /// Why applying an assignment failed on this core (the worker stops with it).
    pub(crate) failure: RefCell<Option<String>>,
    /// Partitions stopped at a bad record (`bad_record_policy = stop`): nothing more of them
    /// is handed out.
    halted: RefCell<Vec<TopicPartition>>,
    /// The dead-letter topic, with `bad_record_policy = dead-letter`.
    dead_letter: Option<Arc<str>>,
    /// The bad record that stopped the worker (`bad_record_policy = stop`), shared by the
    /// cores: [`App::run`](crate::App::run) returns it.
    stopped_at: Arc<Mutex<Option<crate::stream::BadRecord>>>,
    /// Where a core found that the broker lost data (partition, position, high-water mark),
    /// shared by the cores: once set, no core commits any more.
    lost_data: LostData,
    /// Set while this core's writes fail (see [`CoreRuntime::writes_failed`]).
    write_trouble: RefCell<Option<WriteTrouble>>,
    /// Notified when writes succeed again.
    writable: Event,
    /// Events acked since the last commit, and the committer's wake-up once they reach
    /// `commit_every`.
    acked_since_commit: Cell<u64>,
    commit_soon: Event,
    /// Per agent (by index): events acked on this core.
    agent_acks: Vec<Cell<u64>>,
    /// Damaged partitions of users' topics waiting for a repair, with their log limiter.
    damage_logs: RefCell<HashMap<TopicPartition, LogLimiter>>,
    /// Where each consumed partition's log ended at its last fetch (for the lag).
    pub(crate) log_ends: RefCell<HashMap<TopicPartition, u64>>,
}

/// Writes that keep failing on a core: since when, and the limiter of its log lines.
struct WriteTrouble {
    since: std::time::Instant,
    log: LogLimiter,
}

/// Lets a repeated message through at most once per [`LogLimiter::EVERY`], counting the
/// repeats it held back (one core: no atomics).
#[derive(Debug)]
pub(crate) struct LogLimiter {
    last: Cell<std::time::Instant>,
    held: Cell<u64>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter { last: Cell::new(std::time::Instant::now()), held: Cell::new(0) }
    }
}

impl LogLimiter {
    /// How often a repeated message is logged.
    pub(crate) const EVERY: Duration = Duration::from_secs(10);

    /// `Some(repeats held back since the last one)` when the message may be logged now.
    pub(crate) fn allow(&self) -> Option<u64> {
        if self.last.get().elapsed() < Self::EVERY {
            self.held.set(self.held.get() + 1);
            return None;
        }
        self.last.set(std::time::Instant::now());
        Some(self.held.replace(0))
    }
}

impl std::fmt::Debug for CoreRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreRuntime").field("index", &self.index).finish()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<CoreRuntime>>> = const { RefCell::new(None) };
}

impl CoreRuntime {
    /// The runtime of the core this thread runs, inside a worker.
    pub(crate) fn current() -> Option<Rc<CoreRuntime>> {
        CURRENT.with(|c| c.borrow().clone())
    }

    pub(crate) fn partitions(&self, topic: &str) -> Option<u32> {
        self.partitions.get(topic).copied()
    }

    pub(crate) fn round_robin(&self, partitions: u32) -> u32 {
        let n = self.rr.get();
        self.rr.set(n.wrapping_add(1));
        (n.wrapping_add(self.index as u32)) % partitions.max(1)
    }

    /// Acks `offset` of `tp` for `agent`, and applies the table writes made for that event.
    pub(crate) fn ack(&self, agent: usize, tp: &TopicPartition, offset: u64) {
        if let Some(t) = self.acks.borrow_mut().get_mut(&AckKey(agent, tp)) {
            t.ack(offset);
        }
        if let Some(n) = self.agent_acks.get(agent) {
            n.set(n.get() + 1);
        }
        // `commit_every`: the committer is woken once, when the count reaches it.
        let acked = self.acked_since_commit.get() + 1;
        self.acked_since_commit.set(acked);
        if acked == self.commit_every {
            self.commit_soon.notify(1);
        }
        if !self.pending_writes.borrow().is_empty() {
            self.settle_writes(agent, tp, offset, true);
        }
    }

    /// Whether `topic` is one the engine makes and can rebuild or do without (a table's
    /// changelog, a repartition topic), rather than a user's topic.
    pub(crate) fn is_internal(&self, topic: &str) -> bool {
        // A repartition topic is the one a `group_by` declared, with its positions table.
        self.changelog_tables.contains_key(topic)
            || self.app.inner.outbox.topics().iter().any(|t| &*t.name == topic && t.positions.get().is_some())
    }

    /// A log of `tp` is damaged below what was made durable (`error` says where). An internal
    /// topic's log is repaired at once: its damaged batches are dropped (and kept aside), the
    /// rest keeps its offsets, and the loss is logged and counted. A user's topic waits for
    /// the operator (`repair` on the command line), and says so in the log and in `stats`
    /// until then; the caller retries it now and then, and other partitions go on. `position`
    /// is where this core stands in the partition (records below it were taken already).
    pub(crate) fn on_damaged_log(
        &self,
        tp: &TopicPartition,
        error: &faust_transport::Error,
        position: Option<u64>,
    ) -> Option<faust_storage::RepairReport> {
        let place = tp.to_string();
        if !self.is_internal(&tp.topic) {
            let first = !self.damage_logs.borrow().contains_key(tp);
            let mut logs = self.damage_logs.borrow_mut();
            let limiter = logs.entry(tp.clone()).or_default();
            let repeats = if first { Some(0) } else { limiter.allow() };
            if let Some(repeats) = repeats {
                tracing::error!(partition = %tp, %error, repeats,
                    "a partition's log is damaged; it is not processed until it is repaired (the other partitions go on): run the `repair` command for it");
            }
            self.stats.set_problem(
                &place,
                Some(format!(
                    "damaged log, not processed until repaired (`repair {} --partition {}`): {error}",
                    tp.topic, tp.partition
                )),
            );
            return None;
        }
        let report = match self.transport.repair(tp)? {
            Ok(report) => report,
            Err(e) => {
                tracing::error!(partition = %tp, error = %e, "repairing a damaged log failed");
                self.stats.set_problem(&place, Some(format!("damaged log, and its repair failed: {e}")));
                return None;
            }
        };
        self.stats.set_problem(&place, None);
        self.stats.logs_repaired.fetch_add(1, Ordering::Relaxed);
        self.stats.offsets_lost_to_damage.fetch_add(report.lost_offsets(), Ordering::Relaxed);
        let unprocessed: u64 =
            position.map_or(0, |p| report.lost.iter().map(|r| r.end.saturating_sub(r.start.max(p))).sum());
        tracing::error!(partition = %tp, lost = %report.lost_ranges(), lost_offsets = report.lost_offsets(),
            not_yet_processed = unprocessed, quarantined = ?report.quarantined,
            "repaired a damaged internal log: its damaged batches were dropped, the rest keeps its offsets");
        Some(report)
    }

    /// Notes where `tp`'s log ends (at a fetch) and publishes this core's progress (events
    /// processed, lag) for the worker's stats.
    pub(crate) fn note_end(&self, tp: &TopicPartition, high_watermark: u64) {
        {
            let mut ends = self.log_ends.borrow_mut();
            match ends.get_mut(tp) {
                Some(end) => *end = high_watermark,
                None => {
                    ends.insert(tp.clone(), high_watermark);
                }
            }
        }
        self.publish_progress();
    }

    /// Publishes this core's events processed and lag (see [`WorkerStats`](crate::WorkerStats)).
    pub(crate) fn publish_progress(&self) {
        let acks = self.acks.borrow();
        let lag: u64 = self
            .log_ends
            .borrow()
            .iter()
            .map(|(tp, end)| {
                let done = acks.iter().filter(|((_, t), _)| t == tp).map(|(_, tracker)| tracker.committable()).min();
                end.saturating_sub(done.unwrap_or(*end))
            })
            .sum();
        let processed = self.agent_acks.iter().map(Cell::get).sum();
        self.stats.publish_progress(self.index, processed, lag);
    }

    /// Events `agent` acked on this core so far (the supervisor tells a streak of failures
    /// from failures between successes).
    pub(crate) fn agent_acks(&self, agent: usize) -> u64 {
        self.agent_acks.get(agent).map_or(0, Cell::get)
    }

    /// An agent failed in a way that is not about its event: stops the worker with that
    /// error, leaving the event (and everything after it) uncommitted, so that a restart after
    /// the cause is fixed processes it.
    pub(crate) fn agent_failed_for_good(&self, agent: &str, error: &str, reason: &str, event: Option<&QueuedEvent>) {
        let at = event.map_or_else(String::new, |e| format!(" at {}@{}", e.tp, e.record.offset));
        tracing::error!(agent, %error, reason, "stopping the worker: the agent's error is not about the event{at}, which stays uncommitted");
        self.failure.borrow_mut().get_or_insert_with(|| {
            format!("agent `{agent}` failed{at}: {error} ({reason}; the event stays uncommitted)")
        });
        self.app_stop.stop();
    }

    /// Applies (or drops) the pending table writes of one event.
    fn settle_writes(&self, agent: usize, tp: &TopicPartition, offset: u64, apply: bool) {
        // Moved into a buffer kept between calls (applying may register writes again, so
        // the list is not borrowed meanwhile): no allocation per event.
        let mut settled = self.settling.take();
        settled.extend(self.pending_writes.borrow_mut().extract_if(.., |(t, _)| t.matches(agent, tp, offset)));
        for (token, shard) in settled.drain(..) {
            if apply {
                shard.apply_pending(&token);
            } else {
                shard.discard_pending(&token);
            }
        }
        self.settling.set(settled);
    }

    /// Drops the table writes of events an agent failed on (they will be processed again).
    pub(crate) fn discard_writes(&self, agent: usize, events: &[QueuedEvent]) {
        if self.pending_writes.borrow().is_empty() {
            return;
        }
        for e in events {
            self.settle_writes(agent, &e.tp, e.record.offset, false);
        }
    }

    /// Notes that `shard` holds writes of the event of `token`, to apply when it is acked.
    pub(crate) fn register_pending(&self, token: Token, shard: Rc<dyn AnyShard>) {
        self.pending_writes.borrow_mut().push((token, shard));
    }

    /// The shard of `table`'s `partition`, if this core holds it.
    pub(crate) fn shard(&self, table: usize, partition: u32) -> Option<Rc<dyn AnyShard>> {
        self.shards.borrow().get(table)?.get(partition as usize)?.clone()
    }

    /// The shards of `table` this core holds.
    pub(crate) fn shards_of(&self, table: usize) -> Vec<Rc<dyn AnyShard>> {
        self.shards.borrow().get(table).map(|s| s.iter().flatten().cloned().collect()).unwrap_or_default()
    }

    pub(crate) fn settings(&self) -> &crate::settings::Settings {
        &self.app.inner.settings
    }

    /// Set when the worker stops (the core's tasks wind down).
    pub(crate) fn stopping(&self) -> &crate::runtime::signal::Cancel {
        &self.stopping
    }

    /// Whether every agent consuming `tp` on this core has finished the event at `offset`.
    pub(crate) fn processed(&self, tp: &TopicPartition, offset: u64) -> bool {
        let acks = self.acks.borrow();
        let mut trackers = acks.iter().filter(|((_, t), _)| t == tp).peekable();
        trackers.peek().is_some() && trackers.all(|(_, tracker)| tracker.committable() > offset)
    }

    pub(crate) fn count_decode_error(&self) {
        self.decode_errors.set(self.decode_errors.get() + 1);
    }

    /// Whether `tp` stopped at a bad record.
    pub(crate) fn halted(&self, tp: &TopicPartition) -> bool {
        let halted = self.halted.borrow();
        !halted.is_empty() && halted.contains(tp)
    }

    /// Applies the bad-record policy to `event` (logged and counted whatever the policy).
    /// Returns whether the stream moves past it (acks it); `false` after a stop.
    pub(crate) fn bad_record(&self, event: &QueuedEvent, part: crate::stream::RecordPart, reason: String) -> bool {
        use crate::settings::BadRecordPolicy;
        self.count_decode_error();
        self.stats.bad_records.fetch_add(1, Ordering::Relaxed);
        let (tp, record) = (&event.tp, &event.record);
        let raw = record.value.as_deref().unwrap_or_default();
        let shown = match part {
            crate::stream::RecordPart::Key => record.key.as_deref().unwrap_or_default(),
            _ => raw,
        };
        let bad = crate::stream::BadRecord {
            topic: tp.topic.to_string(),
            partition: tp.partition,
            offset: record.offset,
            part,
            reason,
            preview: crate::stream::preview(shown),
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

    /// Buffers a record for `tp` (`send_soon`) and wakes the flusher.
    pub(crate) fn buffer(
        &self,
        tp: TopicPartition,
        timestamp: Option<i64>,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[faust_storage::Header<'_>],
    ) {
        let mut pending = self.pending.borrow_mut();
        let batch = pending.entry(tp).or_insert_with(|| faust_storage::BatchBuilder::with_capacity(16 * 1024));
        batch.push(timestamp.unwrap_or_else(now_ms), key, Some(value), headers);
        self.pending_bytes.set(self.pending_bytes.get() + key.map_or(0, <[u8]>::len) + value.len() + 32);
        self.pending_event.notify(1);
    }

    /// Writes every buffered send (earlier failures first); resolves when they are durable.
    /// A batch whose write fails is kept, in order, and written again by the next flush (the
    /// offsets of the events behind it are not committed until then); a partition whose
    /// writes fail does not hold back the others. Only when the transport lost a batch (it did
    /// not hand it back) does this core refuse to commit and stop the worker.
    pub(crate) async fn flush(self: &Rc<Self>) -> Result<(), FlushError> {
        let Ok(_permit) = self.flush_lock.acquire_permit(1).await else {
            return Err(FlushError::Transport(faust_transport::Error::Closed));
        };
        let mut first_error = None;
        // Partitions whose write failed in this flush: their later batches wait behind.
        let mut failed: Vec<TopicPartition> = Vec::new();
        // Earlier failures first, one at a time, so a partition's records stay in order.
        let retries: VecDeque<_> = std::mem::take(&mut *self.retry.borrow_mut());
        for (tp, batch) in retries {
            if failed.contains(&tp) {
                self.retry.borrow_mut().push_back((tp, batch));
                continue;
            }
            if let Err(e) = self.produce_buffered(&tp, batch).await {
                failed.push(tp.clone());
                first_error.get_or_insert(self.keep_failed(tp, e));
            }
        }
        let mut batches: Vec<(TopicPartition, faust_storage::BatchBuilder)> =
            self.pending.borrow_mut().drain().collect();
        self.pending_bytes.set(0);
        // Behind an earlier batch of their partition that is still unwritten.
        batches.retain_mut(|(tp, batch)| {
            let behind = failed.contains(tp) || self.retry.borrow().iter().any(|(t, _)| t == tp);
            if behind {
                self.retry.borrow_mut().push_back((tp.clone(), std::mem::take(batch)));
            }
            !behind
        });
        // The partitions' batches are written concurrently (they may live on other cores).
        let writes: Vec<_> = batches
            .into_iter()
            .map(|(tp, batch)| {
                let core = self.clone();
                glommio::spawn_local(async move {
                    let result = core.produce_buffered(&tp, batch).await;
                    (tp, result)
                })
            })
            .collect();
        for write in writes {
            let (tp, result) = write.await;
            if let Err(e) = result {
                first_error.get_or_insert(self.keep_failed(tp, e));
            }
        }
        match first_error {
            Some(e) => {
                self.writes_failed(&e);
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// One buffered batch to the transport (with the `sends:flush` fault point).
    async fn produce_buffered(
        &self,
        tp: &TopicPartition,
        batch: faust_storage::BatchBuilder,
    ) -> Result<Produced, faust_transport::Error> {
        match crate::runtime::fault_point("sends:flush") {
            Ok(()) => self.transport.produce(tp, batch).await,
            Err(e) => Err(crate::runtime::injected_produce_failure(tp, batch, e)),
        }
    }

    /// Keeps the batch of a failed write for a retry, or marks the core's sends as lost.
    fn keep_failed(&self, tp: TopicPartition, error: faust_transport::Error) -> FlushError {
        let message = error.to_string();
        if error.damaged_log().is_some() {
            // An internal log is repaired now, so the retry finds it whole; a user's topic
            // waits for the operator (the sends stay buffered meanwhile).
            self.on_damaged_log(&tp, &error, None);
        }
        match error.into_batch() {
            Some(batch) => self.retry.borrow_mut().push_back((tp.clone(), batch)),
            None => {
                tracing::error!(topic = %tp.topic, partition = tp.partition, error = %message,
                    "buffered sends were lost; refusing to commit and stopping the worker");
                self.sends_lost.set(true);
                self.app_stop.stop();
            }
        }
        FlushError::Write { tp, message }
    }

    /// Notes that a write failed: the first failure stops this core from taking new events
    /// (its consumers pause, and agents wait once their buffered sends pass their bound), and
    /// says so in the log and in the worker's stats; repeats are logged at most every few
    /// seconds. The writes are retried until they succeed ([`CoreRuntime::writes_succeeded`]).
    pub(crate) fn writes_failed(&self, error: &dyn std::fmt::Display) {
        self.stats.write_failures.fetch_add(1, Ordering::Relaxed);
        let mut failing = self.write_trouble.borrow_mut();
        match failing.as_mut() {
            None => {
                *failing = Some(WriteTrouble { since: std::time::Instant::now(), log: LogLimiter::default() });
                self.stats.blocked_cores.fetch_add(1, Ordering::Relaxed);
                self.stats.set_problem(
                    &format!("core {} writes", self.index),
                    Some(format!("writes fail, new events are not taken until they succeed: {error}")),
                );
                tracing::error!(core = self.index, %error,
                    "writes fail; this core takes no new events until they succeed again (retrying)");
            }
            Some(trouble) => {
                if let Some(suppressed) = trouble.log.allow() {
                    let failing_for_s = trouble.since.elapsed().as_secs();
                    self.stats.set_problem(
                        &format!("core {} writes", self.index),
                        Some(format!("writes fail for {failing_for_s} s, new events are not taken: {error}")),
                    );
                    tracing::error!(core = self.index, %error, failing_for_s, repeats = suppressed,
                        "writes still fail; no new events are taken (retrying)");
                }
            }
        }
    }

    /// Notes that writes succeed again (after [`CoreRuntime::writes_failed`]): the core takes
    /// new events again.
    pub(crate) fn writes_succeeded(&self) {
        let Some(trouble) = self.write_trouble.borrow_mut().take() else { return };
        self.stats.blocked_cores.fetch_sub(1, Ordering::Relaxed);
        self.stats.set_problem(&format!("core {} writes", self.index), None);
        tracing::warn!(
            core = self.index,
            failing_for_ms = trouble.since.elapsed().as_millis() as u64,
            "writes succeed again; taking new events"
        );
        self.writable.notify(usize::MAX);
    }

    /// Waits while this core's writes fail (see [`CoreRuntime::writes_failed`]), or until
    /// `cancel` is set or the worker stops.
    pub(crate) async fn wait_writable(&self, cancel: Option<&crate::runtime::signal::Cancel>) {
        // The common case, writes that succeed, without registering a listener.
        while self.write_trouble.borrow().is_some() {
            let listener = self.writable.listen();
            let cancelled = cancel.is_some_and(|c| c.is_cancelled());
            if self.write_trouble.borrow().is_none() || cancelled || self.stopping.is_cancelled() {
                return;
            }
            // Woken when writes succeed; every 100 ms it also looks for a cancel or a stop.
            futures_lite::future::or(listener, glommio::timer::sleep(Duration::from_millis(100))).await;
        }
    }

    /// Whether sends to `tp` are buffered (or waiting for a retry).
    pub(crate) fn has_pending(&self, tp: &TopicPartition) -> bool {
        self.pending.borrow().contains_key(tp) || self.retry.borrow().iter().any(|(t, _)| t == tp)
    }

    /// Flushes when the buffer has grown past its bound. While writes fail, waits until they
    /// succeed again: the buffer stays bounded, and the agent (or task) that fills it is held
    /// back instead of buffering without end.
    pub(crate) async fn flush_if_full(self: &Rc<Self>) {
        if self.pending_bytes.get() < PENDING_FLUSH_BYTES {
            return;
        }
        if self.flush().await.is_err() {
            // The failure is logged (rate limited) by `writes_failed`; the flusher retries.
            self.wait_writable(None).await;
        }
    }

    /// Hands an event sent to channel `name` to the agents of this core that consume it,
    /// once their queues have room.
    pub(crate) async fn deliver(
        &self,
        name: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<Produced, crate::app::SendError> {
        let tp = TopicPartition::new(name, self.index as u32);
        for &a in self.channel_agents.get(name).map(Vec::as_slice).unwrap_or_default() {
            let lane = self.queues[a].lane(&tp);
            self.queues[a].room(lane).await;
        }
        let offset = self.deliver_now(name, key, value);
        Ok(Produced { partition: tp.partition, base_offset: offset, last_offset: offset })
    }

    /// Hands an event sent to channel `name` to this core's agents now; returns its number.
    pub(crate) fn deliver_now(&self, name: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> u64 {
        let offset = self.channel_seq.get();
        self.channel_seq.set(offset + 1);
        let tp = TopicPartition::new(name, self.index as u32);
        let record = Record::new(
            offset,
            now_ms(),
            key.map(bytes::Bytes::copy_from_slice),
            value.map(bytes::Bytes::copy_from_slice),
        );
        for &a in self.channel_agents.get(name).map(Vec::as_slice).unwrap_or_default() {
            // Tracked like a partition's events (so tests can wait for them), never committed.
            self.acks.borrow_mut().entry((a, tp.clone())).or_insert_with(|| AckTracker::new(offset)).delivered(offset);
            let lane = self.queues[a].lane(&tp);
            self.queues[a].push(lane, QueuedEvent { tp: tp.clone(), record: record.clone() });
            self.queues[a].wake(1);
        }
        offset
    }

    /// The broker lost data of `tp` this core had read up to `position`: stops the worker,
    /// and no core commits any more (`WorkerError::BrokerLostData`).
    fn lost_data(&self, tp: &TopicPartition, position: u64, high_watermark: Option<u64>) {
        tracing::error!(topic = %tp.topic, partition = tp.partition, position, ?high_watermark,
            "the broker lost data this worker had read; stopping the worker without committing");
        lock(&self.lost_data).get_or_insert((tp.clone(), position, high_watermark));
        self.failure.borrow_mut().get_or_insert_with(|| format!("the broker lost data of {tp}"));
        self.app_stop.stop();
    }

    /// Commits, per partition, the lowest offset every agent may commit, once the sends
    /// buffered so far and the table state those events produced are durable (the commit
    /// protocol of `table.rs`). Returns `false` when it had to wait: table state held writes
    /// of events acked out of order, past the committable offsets.
    ///
    /// A commit that fails part way undoes nothing that is durable and loses nothing that is
    /// not: entries whose changelog write failed are dirty again (the next commit writes their
    /// latest values), and changelog records that were written are committed by the next
    /// commit that succeeds (each shard keeps its [`written_end`](AnyShard::written_end)), even
    /// if nothing changed in it since. So a failed commit is simply retried, and the first
    /// one that succeeds commits the source offsets with exactly the state they produced.
    pub(crate) async fn commit_now(self: &Rc<Self>) -> Result<bool, FlushError> {
        let result = self.commit_once().await;
        match &result {
            Ok(true) => self.writes_succeeded(),
            Ok(false) => {}
            Err(FlushError::Write { .. }) => {} // `flush` noted it.
            Err(e @ (FlushError::Tables(_) | FlushError::Transport(_))) => self.writes_failed(e),
            Err(FlushError::SendsLost | FlushError::BrokerLostData) => {}
        }
        result
    }

    async fn commit_once(self: &Rc<Self>) -> Result<bool, FlushError> {
        let Ok(_permit) = self.commit_lock.acquire_permit(1).await else {
            return Err(FlushError::Transport(faust_transport::Error::Closed));
        };
        if self.sends_lost.get() {
            return Err(FlushError::SendsLost);
        }
        if lock(&self.lost_data).is_some() {
            return Err(FlushError::BrokerLostData);
        }
        // A worker the group dropped (it missed a rebalance deadline) must not write
        // changelog records its successor could later replay as committed: ask first (an
        // empty fenced commit checks membership and writes nothing). This narrows the window
        // to this commit's duration; closing it needs producer fencing.
        let fence = self.fence.borrow().clone();
        if let Some(fence) = &fence {
            self.transport.commit(&self.group, Some(fence), &[]).await?;
        }
        // Events acked from now on are the next commit's (`commit_every` counts them).
        self.acked_since_commit.set(0);
        let mut lowest: HashMap<TopicPartition, u64> = HashMap::default();
        for ((_, tp), tracker) in self.acks.borrow().iter() {
            if self.channel_agents.contains_key(&tp.topic) {
                continue;
            }
            let c = tracker.committable();
            lowest.entry(tp.clone()).and_modify(|v| *v = (*v).min(c)).or_insert(c);
        }
        // 1. Freeze the tables' dirty entries in the same instant as the offsets are read (no
        // await in between), so the frozen state holds exactly the effects of the events below
        // them: writes are applied when their event is acked, so only events acked out of
        // order (past the committable offset) could add more; then this commit waits.
        let shards: Vec<Rc<dyn AnyShard>> = self.shards.borrow().iter().flatten().flatten().cloned().collect();
        let committable = |tp: &TopicPartition| lowest.get(tp).copied();
        if shards.iter().any(|s| s.applied_beyond(&committable)) {
            let deferred = self.deferred_commits.get() + 1;
            self.deferred_commits.set(deferred);
            if deferred.is_multiple_of(100) {
                tracing::warn!(
                    core = self.index,
                    deferred,
                    "commits keep waiting: table writes of events acked out of order (concurrency > 1, or several agents on one topic) run ahead of the committable offsets"
                );
            }
            return Ok(false);
        }
        self.deferred_commits.set(0);
        let mut frozen: Vec<(Rc<dyn AnyShard>, Box<dyn crate::runtime::state::FrozenSet>)> =
            shards.iter().filter(|s| s.is_dirty()).map(|s| (s.clone(), s.freeze())).collect();
        crate::runtime::crash_point("commit:frozen");
        // 2. The changelog records and the buffered sends, durable. A failure gives the
        // entries not yet written back to their shards.
        let mut failure = None;
        for (shard, set) in frozen.drain(..) {
            let mut set = set;
            if failure.is_none()
                && let Err(e) = crate::runtime::commit::write_frozen(&self.transport, &shard, &mut *set).await
            {
                failure = Some(e);
            }
            if failure.is_some() {
                shard.restore(set);
            }
        }
        if let Some(e) = failure {
            return Err(self.tables_failed(e));
        }
        crate::runtime::crash_point("commit:changelog");
        // The offsets were read before the flush: every send made for the events they cover
        // was buffered by then, so it is in this flush (or an earlier one).
        self.flush().await?;
        if self.sends_lost.get() {
            return Err(FlushError::SendsLost);
        }
        crate::runtime::crash_point("commit:flushed");
        // 3. Source offsets and changelog ends, in one commit: recovery replays a changelog
        // exactly to the offset committed with the source offsets. Every shard with records
        // written past its committed offset is in it, also those a failed commit wrote.
        let changelog_ends: Vec<(Rc<dyn AnyShard>, u64)> = {
            let committed = self.committed.borrow();
            shards
                .iter()
                .filter_map(|s| s.written_end().map(|end| (s.clone(), end)))
                .filter(|(s, end)| committed.get(s.changelog()) != Some(end))
                .collect()
        };
        let mut offsets: Vec<(TopicPartition, u64)> = {
            let committed = self.committed.borrow();
            lowest.iter().filter(|(tp, o)| committed.get(*tp) != Some(*o)).map(|(tp, o)| (tp.clone(), *o)).collect()
        };
        offsets.extend(changelog_ends.iter().map(|(s, end)| (s.changelog().clone(), *end)));
        if !offsets.is_empty() {
            let fence = self.fence.borrow().clone();
            crate::runtime::fault_point("commit:offsets").map_err(|source| faust_transport::Error::Io {
                op: "write (injected fault)",
                path: "the offsets file".into(),
                source,
            })?;
            self.transport.commit(&self.group, fence.as_ref(), &offsets).await?;
            let mut committed = self.committed.borrow_mut();
            for (tp, o) in offsets {
                committed.insert(tp, o);
            }
        }
        crate::runtime::crash_point("commit:committed");
        // 4. Checkpoint the stores at what is now committed: a checkpoint never claims more.
        for (shard, end) in &changelog_ends {
            shard.set_written_end(None);
            let sources: Vec<(String, u32, u64)> = lowest
                .iter()
                .filter(|(tp, _)| tp.partition == shard.partition())
                .map(|(tp, o)| (tp.topic.to_string(), tp.partition, *o))
                .collect();
            let checkpointed = crate::runtime::fault_point("commit:checkpoint")
                .map_err(|e| e.to_string())
                .and_then(|()| shard.checkpoint(*end, sources).map_err(|e| e.to_string()));
            if let Err(e) = checkpointed {
                // The changelog has the state; the store's next open replays it.
                tracing::warn!(table = shard.name(), partition = shard.partition(), error = %e, "checkpoint failed");
            }
            shard.evict();
            crate::runtime::crash_point("commit:checkpoint");
        }
        Ok(true)
    }

    /// [`commit_now`](CoreRuntime::commit_now), tried again every 10 ms (up to 200 times)
    /// while it has to wait for out-of-order acks, rather than a whole commit interval later;
    /// `give_up` ends the retries early. `Ok(false)` if it still had to wait.
    pub(crate) async fn commit_retrying(self: &Rc<Self>, give_up: impl Fn() -> bool) -> Result<bool, FlushError> {
        for _ in 0..200 {
            if self.commit_now().await? {
                return Ok(true);
            }
            if give_up() {
                return Ok(false);
            }
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        self.commit_now().await
    }

    /// A table's frozen state could not be written. A failure that a retry can mend (a full
    /// disk, a broker away) fails this commit only: the entries are dirty again and the next
    /// commit writes them. One that no retry mends (a value that does not encode) stops the
    /// worker, committing nothing more.
    fn tables_failed(&self, error: CommitFailure) -> FlushError {
        if !error.is_retriable() {
            tracing::error!(error = %error, "writing table state failed; refusing to commit and stopping the worker");
            self.sends_lost.set(true);
            self.app_stop.stop();
        }
        FlushError::Tables(error.to_string())
    }

    /// Sleeps for `duration`; `false` when the worker stopped meanwhile.
    pub(crate) async fn sleep_unless_stopped(&self, duration: Duration) -> bool {
        futures_lite::future::or(
            async {
                glommio::timer::sleep(duration).await;
                true
            },
            async {
                self.stopped().await;
                false
            },
        )
        .await
            && !self.stopping.is_cancelled()
    }

    fn stop(&self) {
        self.stopping.cancel();
    }

    pub(crate) async fn stopped(&self) {
        self.stopping.cancelled().await;
    }
}

/// What an agent's supervisor gets on its core.
#[derive(Clone)]
pub(crate) struct AgentRun {
    pub(crate) core: Rc<CoreRuntime>,
    pub(crate) agent: usize,
    pub(crate) queue: Rc<EventQueue>,
    /// The events the agent holds (one, or a batch from `take`), shared with the supervisor
    /// so that what an agent failed on is handed to the restarted agent.
    pub(crate) current: Rc<RefCell<Vec<QueuedEvent>>>,
}

/// Runs an agent, restarting it when it fails: the event it failed on goes back to the front
/// of its queue (it was not acked), up to `MAX_RESTARTS_PER_EVENT` times; then the event is
/// logged and skipped (acked) and the agent restarted on the next one.
pub(crate) async fn supervise<F, Fut>(run: AgentRun, name: Arc<str>, make: F)
where
    F: Fn(&AgentRun) -> Fut,
    Fut: Future<Output = Result<(), AgentError>>,
{
    let slot = Rc::new(TaskSlot::for_agent(run.agent));
    let mut failures_on: Option<(TopicPartition, u64, u32)> = None;
    // Events skipped in a row with the same error: (the error, how many, the agent's acks
    // right after the last one). An event handled in between ends the streak.
    let mut streak: Option<(String, u32, u64)> = None;
    loop {
        let mut fatal: Option<&'static str> = None;
        let fut = make(&run);
        let outcome =
            InTask::new(slot.clone(), futures_lite::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(fut))).await;
        let error = match outcome {
            Ok(Ok(())) => {
                for e in run.current.borrow_mut().drain(..) {
                    run.core.ack(run.agent, &e.tp, e.record.offset);
                }
                return;
            }
            Ok(Err(e)) => {
                fatal = systemic(&*e);
                e.to_string()
            }
            Err(panic) => crate::util::panic_message(&*panic, "panic"),
        };
        let failed: Vec<QueuedEvent> = run.current.borrow_mut().drain(..).collect();
        // Whatever the agent wrote to tables for these events is undone: they are retried
        // (or skipped), and their writes must not count twice (or at all).
        run.core.discard_writes(run.agent, &failed);
        if let Some(reason) = &fatal {
            // Not about the record: every event would fail the same way, and skipping them
            // would commit their offsets with nothing done. Stop without acking them.
            run.core.agent_failed_for_good(&name, &error, reason, failed.first());
            return;
        }
        let Some(event) = failed.first().cloned() else {
            tracing::error!(agent = %name, %error, "agent failed outside an event; restarting it");
            if run.core.stopping.is_cancelled() {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (tp, offset) = (event.tp.clone(), event.record.offset);
        let attempts = match &failures_on {
            Some((t, o, n)) if *t == tp && *o == offset => n + 1,
            _ => 1,
        };
        if attempts > MAX_RESTARTS_PER_EVENT {
            let in_a_row = match &streak {
                Some((same, n, acks)) if *same == error && *acks == run.core.agent_acks(run.agent) => n + 1,
                _ => 1,
            };
            if in_a_row >= SKIPS_IN_A_ROW_FATAL {
                // The same error on several events in a row: not about one record.
                let reason = "the same error on several events in a row is not about one record";
                run.core.agent_failed_for_good(&name, &error, reason, Some(&event));
                return;
            }
            tracing::error!(agent = %name, topic = %tp.topic, partition = tp.partition, offset, events = failed.len(), %error,
                "agent failed {MAX_RESTARTS_PER_EVENT} times on these events; skipping them");
            for e in &failed {
                run.core.ack(run.agent, &e.tp, e.record.offset);
            }
            streak = Some((error, in_a_row, run.core.agent_acks(run.agent)));
            failures_on = None;
        } else {
            tracing::warn!(agent = %name, topic = %tp.topic, partition = tp.partition, offset, events = failed.len(),
                attempt = attempts, %error, "agent failed; restarting it on the same events");
            // Back in their original order, ahead of everything not yet handed out; events of
            // a partition released meanwhile are dropped (its next owner processes them).
            for e in failed.into_iter().rev() {
                if !run.core.released(&e.tp) {
                    run.queue.push_front(e);
                }
            }
            failures_on = Some((tp, offset, attempts));
        }
    }
}

/// The least time between two commits of a core when `commit_every` brings them forward.
const COMMIT_EVERY_MIN_GAP: Duration = Duration::from_secs(1);

/// How often a consumer asks again for a partition whose log is damaged (until the operator
/// repairs it).
const DAMAGED_RETRY: Duration = Duration::from_secs(2);

/// Events skipped in a row with the same error after which the worker stops instead: an
/// error that repeats for different records is not about the records.
const SKIPS_IN_A_ROW_FATAL: u32 = 3;

/// Why an agent's error is not about the event it failed on (then the worker stops rather
/// than skip events): a table whose shard is not on this core, whose changelog is not
/// co-partitioned with the event's topic, or whose store or transport failed.
fn systemic(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use crate::table::TableError;
    match error.downcast_ref::<TableError>()? {
        TableError::NotLocal { .. } => Some("a table shard is not on the core of the event's partition"),
        TableError::PartitionsMismatch { .. } => Some("a table is not co-partitioned with the agent's topic"),
        TableError::NotRunning { .. } | TableError::OutsideStream { .. } => Some("a table is used where it cannot be"),
        TableError::Store { .. } | TableError::Transport { .. } => Some("a table's storage failed"),
        _ => None,
    }
}

/// How long fetches must keep failing because the broker does not know the partition (each
/// after a metadata refresh) before the worker takes the partition as lost: longer than a
/// cluster takes to spread the metadata of a topic just created.
const LOST_AFTER_UNKNOWN: Duration = Duration::from_secs(10);

/// Fetches one partition and feeds the agents subscribed to its topic, until the worker
/// stops or `cancel` is set (the partition was released).
pub(crate) async fn consume(
    core: Rc<CoreRuntime>,
    tp: TopicPartition,
    agents: Vec<usize>,
    reset: AutoOffsetReset,
    cancel: Rc<crate::runtime::signal::Cancel>,
) {
    // A committed offset that cannot be read stops the worker: starting over from
    // `auto_offset_reset` would process again (or skip) what was committed.
    let committed = match core.transport.committed(&core.group, std::slice::from_ref(&tp)).await {
        Ok(c) => c.first().copied().flatten(),
        Err(e) => {
            tracing::error!(partition = %tp, error = %e, "reading the committed offset failed; stopping the worker");
            core.failure.borrow_mut().get_or_insert_with(|| format!("reading the committed offset of {tp}: {e}"));
            core.app_stop.stop();
            return;
        }
    };
    let mut next = match committed {
        Some(offset) => offset,
        None => {
            let spec = match reset {
                AutoOffsetReset::Earliest => OffsetSpec::Earliest,
                AutoOffsetReset::Latest => OffsetSpec::Latest,
            };
            loop {
                match core.transport.list_offset(&tp, spec).await {
                    Ok(offset) => break offset,
                    Err(e) if e.damaged_log().is_some() => {
                        if core.on_damaged_log(&tp, &e, None).is_none() {
                            futures_lite::future::or(glommio::timer::sleep(DAMAGED_RETRY), cancel.cancelled()).await;
                        }
                    }
                    Err(e) => {
                        tracing::error!(partition = %tp, error = %e, "looking up where to start failed; retrying");
                        futures_lite::future::or(glommio::timer::sleep(Duration::from_secs(1)), cancel.cancelled())
                            .await;
                    }
                }
                if core.stopping.is_cancelled() || cancel.is_cancelled() {
                    return;
                }
            }
        }
    };
    for &a in &agents {
        core.acks.borrow_mut().insert((a, tp.clone()), AckTracker::new(next));
    }
    let lanes: Vec<usize> = agents.iter().map(|&a| core.queues[a].lane(&tp)).collect();
    let mut failures = 0u32;
    // Since when fetches in a row found the partition unknown to the broker.
    let mut unknown_since: Option<std::time::Instant> = None;
    let running = || !core.stopping.is_cancelled() && !cancel.is_cancelled();
    while running() {
        for (&a, &lane) in agents.iter().zip(&lanes) {
            futures_lite::future::or(core.queues[a].room(lane), cancel.cancelled()).await;
        }
        // No new events while this core's writes fail (a full disk): they would only add to
        // what cannot be written.
        core.wait_writable(Some(&cancel)).await;
        if !running() {
            break;
        }
        match core.transport.fetch(&tp, next, FETCH_BYTES, FETCH_WAIT).await {
            Ok(fetched) => {
                (failures, unknown_since) = (0, None);
                if core.damage_logs.borrow_mut().remove(&tp).is_some() {
                    tracing::warn!(partition = %tp, "the damaged partition was repaired; processing it again");
                    core.stats.set_problem(&tp.to_string(), None);
                }
                let fetched_count = fetched.records.len();
                for record in fetched.records {
                    let mut record = Some(record);
                    for (i, (&a, &lane)) in agents.iter().zip(&lanes).enumerate() {
                        let Some(r) = record.as_ref() else { break };
                        if let Some(t) = core.acks.borrow_mut().get_mut(&AckKey(a, &tp)) {
                            t.delivered(r.offset);
                        }
                        // The last agent gets the record itself, the others a clone.
                        let r = if i + 1 == agents.len() { record.take() } else { record.clone() };
                        if let Some(r) = r {
                            core.queues[a].push(lane, QueuedEvent { tp: tp.clone(), record: r });
                        }
                    }
                }
                next = fetched.next_offset;
                for &a in &agents {
                    core.queues[a].wake(fetched_count);
                }
                core.note_end(&tp, fetched.high_watermark);
                glommio::yield_if_needed().await;
                for &a in &agents {
                    if let Some(t) = core.acks.borrow_mut().get_mut(&AckKey(a, &tp)) {
                        t.read_through(next);
                    }
                }
            }
            Err(faust_transport::Error::OffsetOutOfRange { high_watermark, .. }) if next > high_watermark => {
                // The log is shorter than what was read of it: whatever the broker holds now
                // is not the log the worker's offsets and tables stand on. Stop, committing
                // nothing more (resetting would count the new log on top of the old one).
                core.lost_data(&tp, next, Some(high_watermark));
                break;
            }
            Err(
                e @ (faust_transport::Error::UnknownTopic { .. } | faust_transport::Error::UnknownPartition { .. }),
            ) if unknown_since.is_some_and(|t| t.elapsed() >= LOST_AFTER_UNKNOWN) => {
                // The topic existed at start-up (core 0 created it) and the broker kept saying
                // it does not, each time after refreshing its metadata: it was lost.
                tracing::error!(topic = %tp.topic, partition = tp.partition, error = %e, "fetch failed");
                core.lost_data(&tp, next, None);
                break;
            }
            Err(faust_transport::Error::OffsetOutOfRange { earliest, high_watermark, .. }) => {
                let to = match reset {
                    AutoOffsetReset::Earliest => earliest,
                    AutoOffsetReset::Latest => high_watermark,
                };
                tracing::warn!(topic = %tp.topic, partition = tp.partition, offset = next, reset_to = to,
                    "offset out of range; resetting");
                next = to;
                for &a in &agents {
                    core.acks.borrow_mut().insert((a, tp.clone()), AckTracker::new(next));
                }
            }
            Err(faust_transport::Error::Closed) => break,
            Err(e) if e.damaged_log().is_some() => {
                // Repaired at once (internal topics: fetched again right away), or waiting for
                // the operator's repair (asked again every few seconds; the log and `stats`
                // say so; the other partitions go on).
                if core.on_damaged_log(&tp, &e, Some(next)).is_none() {
                    futures_lite::future::or(glommio::timer::sleep(DAMAGED_RETRY), cancel.cancelled()).await;
                }
            }
            Err(e) => {
                failures += 1;
                let gone = matches!(
                    e,
                    faust_transport::Error::UnknownTopic { .. } | faust_transport::Error::UnknownPartition { .. }
                );
                unknown_since = if gone { unknown_since.or_else(|| Some(std::time::Instant::now())) } else { None };
                let backoff = Duration::from_millis(50 * u64::from(failures.min(20)));
                tracing::error!(topic = %tp.topic, partition = tp.partition, offset = next, error = %e,
                    retry_in_ms = backoff.as_millis() as u64, "fetch failed");
                futures_lite::future::or(glommio::timer::sleep(backoff), core.stopped()).await;
            }
        }
    }
}

/// Writes buffered sends soon after they are made: waits until something is buffered, lets
/// the agents add to the batches once, then writes them.
async fn flush_buffered(core: Rc<CoreRuntime>) {
    let mut failures = 0u32;
    while !core.stopping.is_cancelled() {
        let listener = core.pending_event.listen();
        if core.pending.borrow().is_empty() && core.retry.borrow().is_empty() {
            futures_lite::future::or(listener, core.stopped()).await;
            continue;
        }
        futures_lite::future::yield_now().await;
        match core.flush().await {
            Ok(()) => failures = 0,
            Err(_) => {
                // Logged (rate limited) by `writes_failed`.
                failures += 1;
                let backoff = Duration::from_millis(50 * u64::from(failures.min(20)));
                futures_lite::future::or(glommio::timer::sleep(backoff), core.stopped()).await;
            }
        }
    }
}

/// Takes the records sent from outside the worker, on core 0, until the worker stops.
async fn serve_outbox(core: Rc<CoreRuntime>, outbox: Arc<crate::app::Outbox>) {
    while !core.stopping.is_cancelled() {
        let listener = outbox.event.listen();
        let records = outbox.take(false);
        let probes = outbox.take_probes();
        for probe in probes {
            let core = core.clone();
            if probe.commit {
                glommio::spawn_local(async move {
                    let mut result = Err(crate::app::SendError::Stopped { topic: probe.tp.topic.to_string() });
                    for _ in 0..500 {
                        match core.commit_now().await {
                            Ok(true) => {
                                result = Ok(Produced { partition: 0, base_offset: 0, last_offset: 0 });
                                break;
                            }
                            Ok(false) => glommio::timer::sleep(Duration::from_millis(2)).await,
                            Err(e) => {
                                tracing::error!(error = %e, "commit asked by a test failed");
                                break;
                            }
                        }
                    }
                    probe.reply.set(result);
                })
                .detach();
                continue;
            }
            // Nothing consumes the topic: nothing to wait for but the write.
            let consumed = [&core.agents_by_topic, &core.channel_agents]
                .iter()
                .any(|agents| agents.get(&probe.tp.topic).is_some_and(|a| !a.is_empty()));
            glommio::spawn_local(async move {
                // Polled: acks are the hot path and do not notify anyone.
                while consumed && !core.processed(&probe.tp, probe.offset) {
                    if core.stopping.is_cancelled() {
                        probe.reply.set(Err(crate::app::SendError::Stopped { topic: probe.tp.topic.to_string() }));
                        return;
                    }
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                // Whatever the agents sent for it is written before the answer.
                if let Err(e) = core.flush().await {
                    tracing::error!(error = %e, "writing buffered sends failed");
                }
                let (partition, offset) = (probe.tp.partition, probe.offset);
                probe.reply.set(Ok(Produced { partition, base_offset: offset, last_offset: offset }));
            })
            .detach();
        }
        if records.records.is_empty() {
            outbox.recycle(records);
            futures_lite::future::or(listener, core.stopped()).await;
            continue;
        }
        take_outbound(&core, &outbox, records).await;
        glommio::yield_if_needed().await;
    }
}

/// Sends records that came from outside the worker, in the order they were sent:
/// `send_soon`s join this core's buffer, `send`s are written (after what is buffered for
/// their partition) and answered.
async fn take_outbound(core: &Rc<CoreRuntime>, outbox: &crate::app::Outbox, mut outgoing: crate::app::Outgoing) {
    let topics = outbox.topics();
    let records = std::mem::take(&mut outgoing.records);
    for record in records {
        let Some(topic) = topics.get(record.topic) else { continue };
        let bytes = &outgoing.bytes;
        let key = record.key.map(|k| &bytes[k]);
        let value = &bytes[record.value];
        match record.reply {
            None => {
                if let Err(e) = topic.send_soon_raw(core, None, key, value, &[]) {
                    tracing::error!(topic = %topic.name, error = %e, "dropping a record sent from outside the worker");
                }
            }
            Some(reply) => reply.set(topic.send_raw(core, key, Some(value), &[]).await),
        }
    }
    outbox.recycle(outgoing);
}

/// Topics grouped by partition count: each group is co-partitioned, as in Faust (a source,
/// its repartition topics and the changelogs of its tables have the same count), so
/// partition `p` of each lands on the same worker and core.
fn copartitioned(counts: &std::collections::BTreeMap<Arc<str>, u32>) -> Vec<Vec<Arc<str>>> {
    let mut by_count: std::collections::BTreeMap<u32, Vec<Arc<str>>> = std::collections::BTreeMap::new();
    for (topic, count) in counts {
        by_count.entry(*count).or_default().push(topic.clone());
    }
    by_count.into_values().collect()
}

/// Start-up state shared by the cores and the control thread.
struct Startup {
    topics_ready: AtomicBool,
    /// Cores that applied their first assignment (the worker is ready when all did).
    cores_ready: std::sync::atomic::AtomicUsize,
    /// Cores past their final commit (or that ended early): a core keeps its transport (its
    /// appenders, which other cores' final commits may write through) until all are.
    cores_committed: std::sync::atomic::AtomicUsize,
    /// Partition counts of the topics whose partitions the worker takes (sources and
    /// changelogs), set with `topics_ready`.
    counts: Mutex<std::collections::BTreeMap<Arc<str>, u32>>,
    event: Event,
    /// The bad record that stopped the worker, if one did.
    stopped_at: Arc<Mutex<Option<crate::stream::BadRecord>>>,
    /// Where the broker was found to have lost data, if it was.
    lost_data: LostData,
}

/// Counts a core as past its final commit when dropped (also on an early return).
struct Committed<'a>(&'a Startup);

impl Drop for Committed<'_> {
    fn drop(&mut self) {
        self.0.cores_committed.fetch_add(1, Ordering::AcqRel);
        self.0.event.notify(usize::MAX);
    }
}

impl Startup {
    async fn wait_until(&self, ready: impl Fn() -> bool) {
        loop {
            let listener = self.event.listen();
            if ready() {
                return;
            }
            listener.await;
        }
    }
}

pub(crate) fn run(app: &App) -> Result<(), WorkerError> {
    let settings = app.inner.settings.clone();
    let cores = crate::runtime::choose_cpus(settings.cores, &crate::runtime::usable_cpus())?.len();
    // Only what is kept on disk needs the data directory (tests on memory:// leave none).
    if settings.broker_url().starts_with("local://") {
        std::fs::create_dir_all(&settings.datadir).map_err(|source| faust_transport::Error::Io {
            op: "create data directory",
            path: settings.datadir.clone(),
            source,
        })?;
    }
    let tables: Vec<Arc<dyn TableMeta>> = app.inner.tables.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let store_backed = settings.store != "memory://" && tables.iter().any(|t| !t.in_memory());
    if store_backed {
        std::fs::create_dir_all(&settings.datadir).map_err(|source| faust_transport::Error::Io {
            op: "create data directory",
            path: settings.datadir.clone(),
            source,
        })?;
    }
    let memory = app.inner.memory.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // Static partitions, as partitions of every topic the worker may consume (the group
    // joins only some of them; the transport keeps those).
    let partitions = settings.partitions.as_ref().map(|numbers| {
        let declared = app.inner.topics.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let names = declared.iter().filter(|t| t.kind == TopicKind::Log).map(|t| t.name.clone());
        let names: std::collections::BTreeSet<Arc<str>> =
            names.chain(tables.iter().map(|t| t.changelog().clone())).collect();
        names.iter().flat_map(|n| numbers.iter().map(move |&p| TopicPartition::new(n.clone(), p))).collect::<Vec<_>>()
    });
    let transport = AnyTransport::open(&settings.broker_url(), cores, memory.as_ref(), partitions)?;
    let startup = Arc::new(Startup {
        topics_ready: AtomicBool::new(false),
        cores_ready: std::sync::atomic::AtomicUsize::new(0),
        cores_committed: std::sync::atomic::AtomicUsize::new(0),
        counts: Mutex::new(std::collections::BTreeMap::new()),
        event: Event::new(),
        stopped_at: Arc::default(),
        lost_data: Arc::default(),
    });
    let commands: Vec<Arc<crate::rebalance::Commands>> = (0..cores).map(|_| Arc::default()).collect();
    // The CLI's commands reach a worker that keeps state in its data directory through a
    // socket there; a socket that cannot be opened is logged, not fatal.
    let inboxes: Vec<Arc<crate::control::Inbox>> = (0..cores).map(|_| Arc::default()).collect();
    let _control_socket = if settings.broker_url().starts_with("local://") || store_backed {
        crate::control::ControlServer::start(&settings.datadir, app, inboxes.clone()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "running without a control socket: the CLI cannot reach this worker");
            None
        })
    } else {
        None
    };
    let cores_done = Arc::new(crate::app::StopSignal::default());
    let group_failure: Arc<Mutex<Option<String>>> = Arc::default();

    // The control thread: membership and placement.
    let control = {
        let (transport, startup, stop) = (transport.clone(), startup.clone(), app.inner.stop.clone());
        let (commands, cores_done, counters) = (commands.clone(), cores_done.clone(), app.inner.stats.clone());
        let failure = group_failure.clone();
        let settings = settings.clone();
        std::thread::Builder::new()
            .name(format!("{}-control", settings.id))
            .spawn(move || {
                futures_lite::future::block_on(async {
                    startup.wait_until(|| startup.topics_ready.load(Ordering::Acquire) || stop.is_stopped()).await;
                    if !startup.topics_ready.load(Ordering::Acquire) {
                        return;
                    }
                    let counts = startup.counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let groups = copartitioned(&counts);
                    let join = faust_transport::JoinRequest {
                        topics: counts.keys().map(|t| t.to_string()).collect(),
                        copartitioned: groups.iter().map(|g| g.iter().map(|t| t.to_string()).collect()).collect(),
                        weight: cores as u32,
                    };
                    // A core releases within the shutdown timeout (agents finishing their
                    // events) plus a commit; the rest is margin for a loaded machine.
                    let timeout = settings.shutdown_timeout + Duration::from_secs(60);
                    let placement =
                        crate::rebalance::Placement::new(transport.clone(), cores, groups, commands, timeout);
                    crate::rebalance::Control {
                        transport,
                        group: settings.id.clone(),
                        join,
                        placement,
                        stop,
                        cores_done,
                        counters,
                        failure,
                        first_wait: Duration::from_secs(1),
                    }
                    .run()
                    .await;
                })
            })
            .map_err(|e| WorkerError::Core { core: 0, message: format!("starting the control thread: {e}") })?
    };

    app.inner.outbox.open();
    let config = RuntimeConfig { cores: Some(cores), name: settings.id.clone(), ..RuntimeConfig::default() };
    let results = {
        let (app, transport, startup, commands) = (app.clone(), transport.clone(), startup.clone(), commands.clone());
        let inboxes = inboxes.clone();
        run_on_cores(&config, move |ctx| {
            let (app, transport, startup) = (app.clone(), transport.clone(), startup.clone());
            let (commands, inbox) = (commands[ctx.index].clone(), inboxes[ctx.index].clone());
            async move { core_main(ctx.index, ctx.cores, app, transport, startup, commands, inbox).await }
        })
    };
    // Whatever happened, let the control thread finish: it leaves the group now that the
    // cores made their last commits.
    startup.topics_ready.store(true, Ordering::Release);
    app.inner.stop.stop();
    startup.event.notify(usize::MAX);
    for c in &commands {
        c.close();
    }
    cores_done.stop();
    let _ = control.join();
    transport.close();
    // Whoever still waits on the worker (sends from outside, test probes) hears it stopped.
    let outbox = &app.inner.outbox;
    let topics = outbox.topics();
    for record in outbox.take(true).records {
        if let Some(reply) = record.reply {
            let topic = topics.get(record.topic).map_or_else(String::new, |t| t.name.to_string());
            reply.set(Err(crate::app::SendError::Stopped { topic }));
        }
    }
    for probe in outbox.take_probes() {
        probe.reply.set(Err(crate::app::SendError::Stopped { topic: probe.tp.topic.to_string() }));
    }
    let results = results?;
    if let Some(bad) = lock(&startup.stopped_at).take() {
        return Err(WorkerError::BadRecord(bad));
    }
    if let Some((tp, position, high_watermark)) = lock(&startup.lost_data).take() {
        return Err(WorkerError::BrokerLostData { tp, position, high_watermark });
    }
    for (core, r) in results.into_iter().enumerate() {
        r.map_err(|message| WorkerError::Core { core, message })?;
    }
    match group_failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(message) => Err(WorkerError::Group { group: settings.id.clone(), message }),
        None => Ok(()),
    }
}

/// Creates the declared topics and the tables' changelogs (core 0, before anything else
/// runs); returns the partition count of every topic whose partitions the worker takes.
async fn create_topics(
    core: &AnyCore,
    settings: &crate::settings::Settings,
    declared: &[crate::app::TopicDecl],
    tables: &[Arc<dyn TableMeta>],
    sources: &[Arc<str>],
) -> Result<std::collections::BTreeMap<Arc<str>, u32>, faust_transport::Error> {
    let mut counts = std::collections::BTreeMap::new();
    let mut created: std::collections::BTreeMap<Arc<str>, u32> = std::collections::BTreeMap::new();
    for t in declared.iter().filter(|t| t.kind == TopicKind::Log) {
        // `topic_partitions` is the default for new topics: an existing topic declared
        // without a partition count keeps its own; an explicit count must match. A
        // repartition topic has its source's count.
        let existing = core.topic_metadata(&t.name).await?;
        let wanted = t.partitions.or_else(|| t.partitions_like.as_ref().and_then(|like| created.get(like).copied()));
        let count = match (existing, wanted) {
            (Some(meta), None) => meta.config.partitions,
            (_, wanted) => {
                core.create_topic(&t.name, &TopicConfig::new(wanted.unwrap_or(settings.topic_partitions)))
                    .await?
                    .config
                    .partitions
            }
        };
        created.insert(t.name.clone(), count);
        if sources.contains(&t.name) {
            counts.insert(t.name.clone(), count);
        }
    }
    // The dead-letter topic, when bad records go to one.
    if let Some(topic) = settings.dead_letter_topic()
        && core.topic_metadata(&topic).await?.is_none()
    {
        core.create_topic(&topic, &TopicConfig::new(settings.topic_partitions)).await?;
    }
    // Changelogs: compacted; an existing one keeps its partition count unless the table
    // names another (then it must match). A new one takes the partition count of the topics
    // the agents consume when they all have the same (a table is co-partitioned with its
    // agent's topic: an existing topic with 4 partitions gets a 4-partition changelog even
    // though `topic_partitions` says 8), and `topic_partitions` otherwise.
    let source_counts: std::collections::BTreeSet<u32> =
        sources.iter().filter_map(|s| created.get(s).copied()).collect();
    let default_count = match source_counts.iter().collect::<Vec<_>>()[..] {
        [&only] => only,
        _ => settings.topic_partitions,
    };
    for t in tables {
        let existing = core.topic_metadata(t.changelog()).await?;
        let wanted = t.partitions().or_else(|| t.partitions_like().and_then(|like| created.get(&like).copied()));
        let count = match (existing, wanted) {
            (Some(meta), None) => meta.config.partitions,
            (_, wanted) => {
                let config = TopicConfig { compacted: true, ..TopicConfig::new(wanted.unwrap_or(default_count)) };
                core.create_topic(t.changelog(), &config).await?.config.partitions
            }
        };
        counts.insert(t.changelog().clone(), count);
    }
    Ok(counts)
}

async fn core_main(
    index: usize,
    cores: usize,
    app: App,
    transport: AnyTransport,
    startup: Arc<Startup>,
    commands: Arc<crate::rebalance::Commands>,
    inbox: Arc<crate::control::Inbox>,
) -> Result<(), String> {
    let settings = &app.inner.settings;
    let stop = app.inner.stop.clone();
    let committed_guard = Committed(&startup);
    let core = transport.attach_core(index, cores).await.map_err(|e| e.to_string())?;
    let declared = app.inner.topics.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let tables: Vec<Arc<dyn TableMeta>> = app.inner.tables.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let specs: Vec<(String, Arc<str>, crate::app::StartAgent, usize, bool)> = app
        .inner
        .agents
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|a: &AgentSpec| (a.name.clone(), a.topic.clone(), a.start.clone(), a.concurrency, a.every_core))
        .collect();
    let mut channel_agents: HashMap<Arc<str>, Vec<usize>> = HashMap::default();
    for t in declared.iter().filter(|t| t.kind == TopicKind::Channel) {
        let agents = specs.iter().enumerate().filter(|(_, s)| s.1 == t.name).map(|(i, _)| i).collect();
        channel_agents.insert(t.name.clone(), agents);
    }
    let mut agents_by_topic: HashMap<Arc<str>, Vec<usize>> = HashMap::default();
    for (i, spec) in specs.iter().enumerate() {
        if !spec.1.is_empty() && !channel_agents.contains_key(&spec.1) {
            agents_by_topic.entry(spec.1.clone()).or_default().push(i);
        }
    }
    if index == 0 {
        let sources: Vec<Arc<str>> = agents_by_topic.keys().cloned().collect();
        let created = create_topics(&core, settings, &declared, &tables, &sources).await;
        if let Ok(counts) = &created {
            *startup.counts.lock().unwrap_or_else(|p| p.into_inner()) = counts.clone();
        }
        startup.topics_ready.store(true, Ordering::Release);
        startup.event.notify(usize::MAX);
        if let Err(e) = created {
            stop.stop();
            let _ = core.shutdown().await;
            return Err(format!("creating topics: {e}"));
        }
    }
    futures_lite::future::or(startup.wait_until(|| startup.topics_ready.load(Ordering::Acquire)), stop.wait()).await;
    let mut partitions = HashMap::default();
    let dead_letter: Option<Arc<str>> = settings.dead_letter_topic().map(Arc::from);
    // The tables' changelogs too: a table write checks that its changelog has as many
    // partitions as the topic of the event (co-partitioning).
    let known = declared
        .iter()
        .filter(|t| t.kind == TopicKind::Log)
        .map(|t| t.name.clone())
        .chain(dead_letter.clone())
        .chain(tables.iter().map(|t| t.changelog().clone()));
    for name in known {
        match core.topic_metadata(&name).await {
            Ok(Some(meta)) => {
                partitions.insert(name, meta.config.partitions);
            }
            Ok(None) => {}
            Err(e) => return Err(format!("reading topic {name}: {e}")),
        }
    }
    let changelog_tables: HashMap<Arc<str>, usize> =
        tables.iter().enumerate().map(|(i, t)| (t.changelog().clone(), i)).collect();
    let runtime = Rc::new(CoreRuntime {
        index,
        transport: core,
        group: settings.id.clone(),
        commit_every: settings.commit_every.max(1),
        partitions,
        queues: specs.iter().map(|_| Rc::new(EventQueue::new(settings.stream_buffer_maxsize))).collect(),
        acks: RefCell::new(AckMap::default()),
        committed: RefCell::new(HashMap::default()),
        rr: Cell::new(0),
        stopping: crate::runtime::signal::Cancel::default(),
        decode_errors: Cell::new(0),
        pending: RefCell::new(HashMap::default()),
        pending_bytes: Cell::new(0),
        pending_event: Event::new(),
        retry: RefCell::new(VecDeque::new()),
        flush_lock: glommio::sync::Semaphore::new(1),
        sends_lost: Cell::new(false),
        channel_agents,
        channel_seq: Cell::new(0),
        app_stop: stop.clone(),
        shards: RefCell::new(tables.iter().map(|_| Vec::new()).collect()),
        suspended: RefCell::new(HashMap::default()),
        consumers: RefCell::new(HashMap::default()),
        fence: RefCell::new(None),
        commit_lock: glommio::sync::Semaphore::new(1),
        tables,
        changelog_tables,
        agents_by_topic,
        app: app.clone(),
        stats: app.inner.stats.clone(),
        failure: RefCell::new(None),
        halted: RefCell::new(Vec::new()),
        dead_letter,
        stopped_at: startup.stopped_at.clone(),
        lost_data: startup.lost_data.clone(),
        pending_writes: RefCell::new(Vec::new()),
        settling: Cell::new(Vec::new()),
        deferred_commits: Cell::new(0),
        write_trouble: RefCell::new(None),
        writable: Event::new(),
        acked_since_commit: Cell::new(0),
        commit_soon: Event::new(),
        agent_acks: specs.iter().map(|_| Cell::new(0)).collect(),
        damage_logs: RefCell::new(HashMap::default()),
        log_ends: RefCell::new(HashMap::default()),
    });
    CURRENT.with(|c| *c.borrow_mut() = Some(runtime.clone()));

    // The first assignment, before any agent or task runs: table shards are recovered before
    // their partitions are consumed, and tasks send to partitions already placed.
    let first = futures_lite::future::or(commands.next(&runtime), async {
        stop.wait().await;
        None
    })
    .await;
    if let Some(command) = first {
        runtime.apply(command).await;
    }
    if startup.cores_ready.fetch_add(1, Ordering::AcqRel) + 1 == cores && !stop.is_stopped() {
        let counts = startup.counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tracing::info!(app = %settings.id, cores, topics = counts.len(), partitions = counts.values().sum::<u32>(),
            "the worker is ready: its partitions are recovered and being processed");
    }
    // Later assignment changes, one at a time.
    let control_task = {
        let (runtime, commands) = (runtime.clone(), commands.clone());
        glommio::spawn_local(async move {
            while let Some(command) = commands.next(&runtime).await {
                runtime.apply(command).await;
            }
        })
    };

    // Agents on every core; tasks (no topic) on core 0 only, cancelled at shutdown.
    let mut agent_tasks = Vec::new();
    let mut background = Vec::new();
    for (i, (name, topic, start, concurrency, every_core)) in specs.iter().enumerate() {
        let run = || AgentRun {
            core: runtime.clone(),
            agent: i,
            queue: runtime.queues[i].clone(),
            current: Rc::new(RefCell::new(Vec::new())),
        };
        if topic.is_empty() {
            if index == 0 || *every_core {
                background.push(glommio::spawn_local(start(run())));
            }
            continue;
        }
        tracing::debug!(agent = %name, core = index, topic = %topic, concurrency, "starting agent");
        // Instances share the queue; each has its own events in hand.
        for _ in 0..*concurrency {
            agent_tasks.push(glommio::spawn_local(start(run())));
        }
    }
    // Commits: every `commit_interval`, sooner once `commit_every` events were acked, and
    // every half second while writes fail (so the core resumes soon after they succeed).
    let committer = {
        let (runtime, interval) = (runtime.clone(), settings.commit_interval);
        glommio::spawn_local(async move {
            let failures = LogLimiter::default();
            let mut last_commit = std::time::Instant::now();
            while !runtime.stopping.is_cancelled() {
                runtime.publish_progress();
                let woken = runtime.commit_soon.listen();
                let wait = match runtime.write_trouble.borrow().is_some() {
                    true => interval.min(Duration::from_millis(500)),
                    false => interval,
                };
                if runtime.acked_since_commit.get() < runtime.commit_every {
                    futures_lite::future::or(
                        futures_lite::future::or(glommio::timer::sleep(wait), woken),
                        runtime.stopped(),
                    )
                    .await;
                }
                // A commit syncs files (the offsets, on `local://`); back to back on a busy
                // core they would stall the disk that the core appends to. `commit_every`
                // brings a commit forward, but not closer than this to the previous one.
                let gap = interval.min(COMMIT_EVERY_MIN_GAP).saturating_sub(last_commit.elapsed());
                if !gap.is_zero() {
                    futures_lite::future::or(glommio::timer::sleep(gap), runtime.stopped()).await;
                }
                last_commit = std::time::Instant::now();
                if let Err(e) = runtime.commit_retrying(|| runtime.stopping.is_cancelled()).await {
                    if let Some(repeats) = failures.allow() {
                        tracing::error!(core = runtime.index, error = %e, repeats, "commit failed; it is retried");
                    }
                    let pause = interval.min(Duration::from_millis(500));
                    futures_lite::future::or(glommio::timer::sleep(pause), runtime.stopped()).await;
                }
            }
        })
    };

    // Buffered sends.
    let flusher = glommio::spawn_local(flush_buffered(runtime.clone()));
    // Queries from the control socket.
    let queries = glommio::spawn_local(inbox.clone().serve(runtime.clone()));
    // Sends from outside the worker.
    let outbox = app.inner.outbox.clone();
    let outbox_task = (index == 0).then(|| glommio::spawn_local(serve_outbox(runtime.clone(), outbox.clone())));

    stop.wait().await;
    // Shutdown: stop fetching, let agents drain what they were given, commit, release.
    drop(background);
    runtime.stop();
    commands.close();
    inbox.close();
    control_task.await;
    queries.await;
    let consumers: Vec<crate::rebalance::Consumer> = runtime.consumers.borrow_mut().drain().map(|(_, c)| c).collect();
    for c in consumers {
        c.cancel.cancel();
        c.task.await;
    }
    for q in &runtime.queues {
        q.close();
    }
    // Agents finish the events they were given; one that does not within the grace period is
    // cancelled (its unacked event will be processed again after a restart).
    let grace = settings.shutdown_timeout;
    let deadline = std::time::Instant::now() + grace;
    for (i, t) in agent_tasks.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let finished = futures_lite::future::or(
            async {
                t.await;
                true
            },
            async {
                glommio::timer::sleep(left).await;
                false
            },
        )
        .await;
        if !finished {
            tracing::error!(
                core = index,
                agent = i,
                grace_ms = grace.as_millis() as u64,
                "agent did not finish after stop; cancelled it"
            );
        }
    }
    committer.await;
    flusher.await;
    if let Some(task) = outbox_task {
        task.await;
        // Whatever was sent from outside until now is still sent (and flushed below).
        take_outbound(&runtime, &outbox, outbox.take(true)).await;
    }
    // Cancelled tasks release the runtime when the executor drops them. Two references stay:
    // this one and the thread's `CURRENT`.
    let release_deadline = std::time::Instant::now() + Duration::from_secs(1);
    while Rc::strong_count(&runtime) > 2 && std::time::Instant::now() < release_deadline {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    let result = match runtime.commit_now().await {
        Ok(true) => Ok(()),
        Ok(false) => Err("final commit: table state ran ahead of the committable offsets".to_string()),
        Err(e) => Err(format!("final commit: {e}")),
    };
    let failure = runtime.failure.borrow_mut().take();
    // Other cores' final commits may still write through this core's appenders: keep the
    // transport until every core committed (bounded: a core that hangs is logged and left).
    drop(committed_guard);
    // Checked every few milliseconds as well as on notification: the last core's notification
    // comes from another thread while this executor may be about to park.
    let barrier_deadline = std::time::Instant::now() + settings.shutdown_timeout + Duration::from_secs(30);
    let all_committed = loop {
        if startup.cores_committed.load(Ordering::Acquire) >= cores {
            break true;
        }
        if std::time::Instant::now() >= barrier_deadline {
            break false;
        }
        futures_lite::future::or(
            startup.wait_until(|| startup.cores_committed.load(Ordering::Acquire) >= cores),
            glommio::timer::sleep(Duration::from_millis(5)),
        )
        .await;
    };
    if !all_committed {
        tracing::error!(core = index, "other cores did not finish their final commits in time; shutting down anyway");
    }
    CURRENT.with(|c| *c.borrow_mut() = None);
    let runtime = Rc::try_unwrap(runtime).map_err(|_| "a task still holds the core's runtime".to_string())?;
    // Suspended shards were checkpointed when they were suspended: closing them is enough.
    drop(runtime.suspended);
    drop(runtime.shards);
    runtime.transport.shutdown().await.map_err(|e| e.to_string())?;
    match failure {
        Some(e) => Err(e),
        None => result,
    }
}
