//! The per-core runtime: pinned executors (`executor`), and on each core the engine that
//! fetches (`consume`), queues (`queue`), hands events to agents and restarts them
//! (`supervise`), buffers sends (`sends`), commits (`commit`), recovers table shards
//! (`recovery`), applies assignment changes (`assignment`) and keeps its files bounded
//! (`upkeep`) — with `CoreRuntime`, the state one core keeps, private to this module: the
//! layers above (tables, streams, the worker) see its methods. `state` is the one contract
//! table shards implement.
//!
//! User work is given as a *factory*: a `Fn(CoreContext) -> Future` that is `Send + Sync`,
//! called once on each core's own thread; the future it returns stays on that core and need
//! not be `Send`.

pub(crate) mod assignment;
pub(crate) mod bad_record;
pub(crate) mod commit;
pub(crate) mod consume;
pub(crate) mod context;
mod crash;
mod executor;
pub(crate) mod mailbox;
pub(crate) mod queue;
pub(crate) mod recovery;
pub(crate) mod sends;
pub(crate) mod sensor;
pub(crate) mod signal;
pub(crate) mod standby;
pub(crate) mod state;
pub(crate) mod stats;
pub(crate) mod supervise;
pub(crate) mod txn;
pub(crate) mod upkeep;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_listener::Event;
use faust_transport::TopicPartition;

use crate::acks::AckTracker;
use crate::runtime::consume::LostData;
use crate::runtime::queue::{EventQueue, QueuedEvent};
use crate::runtime::sends::{LogLimiter, WriteTrouble};
use crate::runtime::state::{AnyShard, TableMeta, Token, same_topic};
use crate::transports::AnyCore;

pub(crate) use crash::{crash_point, fault_point, injected_produce_failure};
pub(crate) use executor::choose_cpus;
pub use executor::{
    CoreContext, RuntimeConfig, RuntimeError, StallHandler, run_on_cores, run_on_cores_with, usable_cpus,
};

/// The maps on the per-event path hash with foldhash (SipHash showed in profiles).
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Ack trackers by (agent, partition), looked up on every event without cloning the key.
type AckMap = hashbrown::HashMap<(usize, TopicPartition), AckTracker, foldhash::fast::RandomState>;

/// Table shards by table, then partition.
pub(crate) type ShardsByTable = Vec<Vec<Option<Rc<dyn AnyShard>>>>;

/// A borrowed `AckMap` key; hashes exactly as the owned one (same fields, same order).
#[derive(Hash)]
pub(crate) struct AckKey<'a>(usize, &'a TopicPartition);

impl hashbrown::Equivalent<(usize, TopicPartition)> for AckKey<'_> {
    fn equivalent(&self, key: &(usize, TopicPartition)) -> bool {
        self.0 == key.0 && *self.1 == key.1
    }
}

/// Everything one core needs, shared by its tasks.
pub(crate) struct CoreRuntime {
    index: usize,
    transport: AnyCore,
    group: String,
    /// `Settings::commit_every`, read on every ack.
    commit_every: u64,
    /// Partition counts of the topics the core knows: those declared, read at start, and any
    /// other a send named since ([`learn_partitions`](Self::learn_partitions)).
    partitions: RefCell<HashMap<Arc<str>, u32>>,
    /// Per agent (by index): its queue.
    queues: Vec<Rc<EventQueue>>,
    /// Per (agent, partition): what the agent acked.
    acks: RefCell<AckMap>,
    /// Offsets committed last, per partition.
    committed: RefCell<HashMap<TopicPartition, u64>>,
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
    channel_agents: HashMap<Arc<str>, Vec<usize>>,
    /// Numbers events delivered through channels.
    channel_seq: Cell<u64>,
    /// The app's stop signal (a core stops the worker when sends were lost).
    app_stop: Arc<crate::runtime::signal::StopSignal>,
    /// The table shards of this core, by table then partition.
    shards: RefCell<ShardsByTable>,
    /// Shards of revoked partitions, kept open in case they come back (by changelog
    /// partition).
    suspended: RefCell<HashMap<TopicPartition, crate::runtime::assignment::Suspended>>,
    /// Shards this core follows as a standby replica (by changelog partition): never reachable
    /// from stream processing, brought up to the committed changelog offset in the background.
    standbys: RefCell<HashMap<TopicPartition, Rc<dyn AnyShard>>>,
    /// Held by a standby catch-up pass, and by whoever takes a standby shard out of it.
    standby_lock: glommio::sync::Semaphore,
    /// The consumer of each source partition this core processes.
    consumers: RefCell<HashMap<TopicPartition, crate::runtime::assignment::Consumer>>,
    /// Who commits, for transports with groups.
    fence: RefCell<Option<faust_transport::Fence>>,
    /// One commit at a time: two interleaved commits could record offsets out of order.
    commit_lock: glommio::sync::Semaphore,
    /// The app's tables, and the table of each changelog topic.
    tables: Vec<Arc<dyn TableMeta>>,
    changelog_tables: HashMap<Arc<str>, usize>,
    /// The agents consuming each topic.
    agents_by_topic: HashMap<Arc<str>, Vec<usize>>,
    /// The app's settings.
    settings: Arc<crate::settings::Settings>,
    /// Topics the engine makes and can rebuild (changelogs, repartition topics).
    internal_topics: std::collections::HashSet<Arc<str>>,
    /// The app's sensors (usually none: then each hook is one check of an empty list).
    sensors: crate::runtime::sensor::Sensors,
    stats: Arc<crate::runtime::stats::Counters>,
    /// Shards whose undo logs hold writes of events not yet acked.
    written: RefCell<Vec<Rc<dyn AnyShard>>>,
    /// Commits in a row that waited because table state ran ahead of committable offsets.
    deferred_commits: Cell<u32>,
    /// Why applying an assignment failed on this core (the worker stops with it).
    failure: RefCell<Option<String>>,
    /// Partitions stopped at a bad record (`bad_record_policy = stop`): nothing more of them
    /// is handed out.
    halted: RefCell<Vec<TopicPartition>>,
    /// The dead-letter topic, with `bad_record_policy = dead-letter`.
    dead_letter: Option<Arc<str>>,
    /// The bad record that stopped the worker (`bad_record_policy = stop`), shared by the
    /// cores: [`App::run`](crate::App::run) returns it.
    stopped_at: Arc<Mutex<Option<crate::runtime::bad_record::BadRecord>>>,
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
    log_ends: RefCell<HashMap<TopicPartition, u64>>,
    /// The built-in monitor's latency histograms (commits, events), for the web server.
    monitor: crate::runtime::stats::Monitor,
    /// Time this core's executor spent running tasks and polling I/O, summed over the
    /// executor's stats as they were read (glommio hands out each interval once).
    busy: Cell<Duration>,
    /// Its transactions, under `processing_guarantee = exactly_once`.
    eos: Option<crate::runtime::txn::Eos>,
}

impl std::fmt::Debug for CoreRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreRuntime").field("index", &self.index).finish()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<CoreRuntime>>> = const { RefCell::new(None) };
}

/// What a core's runtime is made of, given by the worker when the core starts.
pub(crate) struct CoreSetup {
    pub(crate) index: usize,
    pub(crate) transport: AnyCore,
    pub(crate) settings: Arc<crate::settings::Settings>,
    /// Partition counts of the topics the core knows (declared, changelogs, dead letters).
    pub(crate) partitions: HashMap<Arc<str>, u32>,
    /// How many agents (with tasks and timers) the app has: one queue each.
    pub(crate) agents: usize,
    pub(crate) channel_agents: HashMap<Arc<str>, Vec<usize>>,
    pub(crate) app_stop: Arc<crate::runtime::signal::StopSignal>,
    pub(crate) tables: Vec<Arc<dyn TableMeta>>,
    pub(crate) agents_by_topic: HashMap<Arc<str>, Vec<usize>>,
    pub(crate) stats: Arc<crate::runtime::stats::Counters>,
    pub(crate) dead_letter: Option<Arc<str>>,
    pub(crate) stopped_at: Arc<Mutex<Option<crate::runtime::bad_record::BadRecord>>>,
    pub(crate) lost_data: LostData,
    pub(crate) internal_topics: std::collections::HashSet<Arc<str>>,
    pub(crate) sensors: crate::runtime::sensor::Sensors,
}

impl CoreRuntime {
    /// Makes the runtime of the core this thread runs, and installs it as the thread's current
    /// one ([`CoreRuntime::current`]) until [`CoreRuntime::close`].
    pub(crate) fn install(setup: CoreSetup) -> Rc<CoreRuntime> {
        let CoreSetup {
            index,
            transport,
            settings,
            partitions,
            agents,
            channel_agents,
            app_stop,
            tables,
            agents_by_topic,
            stats,
            dead_letter,
            stopped_at,
            lost_data,
            internal_topics,
            sensors,
        } = setup;
        let monitor = crate::runtime::stats::Monitor::new(settings.monitor_enabled);
        let changelog_tables = tables.iter().enumerate().map(|(i, t)| (t.changelog().clone(), i)).collect();
        let eos = match (&settings.processing_guarantee, &transport) {
            (crate::settings::ProcessingGuarantee::ExactlyOnce, AnyCore::Local(local)) => {
                Some(crate::runtime::txn::Eos::tagging(local.incarnation(), index))
            }
            (crate::settings::ProcessingGuarantee::ExactlyOnce, AnyCore::Kafka(_)) => {
                Some(crate::runtime::txn::Eos::kafka(index))
            }
            _ => None,
        };
        let runtime = Rc::new(CoreRuntime {
            index,
            transport,
            group: settings.id.clone(),
            commit_every: settings.commit_every.max(1),
            partitions: RefCell::new(partitions),
            queues: (0..agents).map(|_| Rc::new(EventQueue::new(settings.stream_buffer_maxsize))).collect(),
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
            app_stop,
            shards: RefCell::new(tables.iter().map(|_| Vec::new()).collect()),
            suspended: RefCell::new(HashMap::default()),
            standbys: RefCell::new(HashMap::default()),
            standby_lock: glommio::sync::Semaphore::new(1),
            consumers: RefCell::new(HashMap::default()),
            fence: RefCell::new(None),
            commit_lock: glommio::sync::Semaphore::new(1),
            tables,
            changelog_tables,
            agents_by_topic,
            settings,
            internal_topics,
            sensors,
            stats,
            failure: RefCell::new(None),
            halted: RefCell::new(Vec::new()),
            dead_letter,
            stopped_at,
            lost_data,
            written: RefCell::new(Vec::new()),
            deferred_commits: Cell::new(0),
            write_trouble: RefCell::new(None),
            writable: Event::new(),
            acked_since_commit: Cell::new(0),
            commit_soon: Event::new(),
            agent_acks: (0..agents).map(|_| Cell::new(0)).collect(),
            damage_logs: RefCell::new(HashMap::default()),
            log_ends: RefCell::new(HashMap::default()),
            monitor,
            busy: Cell::new(Duration::ZERO),
            eos,
        });
        CURRENT.with(|c| *c.borrow_mut() = Some(runtime.clone()));
        runtime
    }

    /// The queue of agent `agent`.
    pub(crate) fn queue(&self, agent: usize) -> Rc<EventQueue> {
        self.queues[agent].clone()
    }

    /// Whether this run of the worker hands `topic`'s events to `agent`.
    pub(crate) fn routes_to(&self, topic: &str, agent: usize) -> bool {
        self.agents_by_topic.get(topic).or_else(|| self.channel_agents.get(topic)).is_some_and(|a| a.contains(&agent))
    }

    /// The partitions of `topics` this core consumes now.
    pub(crate) fn consuming(&self, topics: &[Arc<str>]) -> Vec<TopicPartition> {
        let mut held: Vec<TopicPartition> = self
            .consumers
            .borrow()
            .keys()
            .filter(|tp| topics.iter().any(|t| same_topic(t, &tp.topic)))
            .cloned()
            .collect();
        held.sort();
        held
    }

    /// Starts winding the core down: its tasks see [`CoreRuntime::stopping`].
    pub(crate) fn begin_stop(&self) {
        self.stopping.cancel();
    }

    /// Stops every consumer (each ends within one fetch wait) and closes the agents' queues,
    /// so that agents finish what they were given.
    pub(crate) async fn stop_consumers(&self) {
        let consumers: Vec<crate::runtime::assignment::Consumer> =
            self.consumers.borrow_mut().drain().map(|(_, c)| c).collect();
        for c in consumers {
            c.cancel.cancel();
            c.task.await;
        }
        for q in &self.queues {
            q.close();
        }
    }

    /// Why applying an assignment failed on this core, if it did (the worker stops with it).
    pub(crate) fn take_failure(&self) -> Option<String> {
        self.failure.borrow_mut().take()
    }

    /// Uninstalls the runtime from its thread, closes its shards and shuts its transport down.
    /// Fails if a task still holds the runtime.
    pub(crate) async fn close(self: Rc<Self>) -> Result<(), String> {
        CURRENT.with(|c| *c.borrow_mut() = None);
        let runtime = Rc::try_unwrap(self).map_err(|_| "a task still holds the core's runtime".to_string())?;
        // Suspended shards were checkpointed when they were suspended: closing them is enough.
        drop(runtime.suspended);
        drop(runtime.standbys);
        drop(runtime.shards);
        runtime.transport.shutdown().await.map_err(|e| e.to_string())
    }

    /// The runtime of the core this thread runs, inside a worker.
    pub(crate) fn current() -> Option<Rc<CoreRuntime>> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Runs `f` with the runtime of the core this thread runs (borrowed: no reference count
    /// changes, for the per-event path).
    pub(crate) fn with_current<T>(f: impl FnOnce(Option<&CoreRuntime>) -> T) -> T {
        CURRENT.with(|c| f(c.borrow().as_deref()))
    }

    pub(crate) fn partitions(&self, topic: &str) -> Option<u32> {
        self.partitions.borrow().get(topic).copied()
    }

    /// Reads the partition count of a topic the core did not know (one created after the
    /// worker started, that a send names) from the transport; `None` when it does not exist.
    pub(crate) async fn learn_partitions(&self, topic: &str) -> Option<u32> {
        let meta = self.transport.topic_metadata(topic).await.ok().flatten()?;
        self.partitions.borrow_mut().insert(Arc::from(topic), meta.config.partitions);
        Some(meta.config.partitions)
    }

    pub(crate) fn round_robin(&self, partitions: u32) -> u32 {
        let n = self.rr.get();
        self.rr.set(n.wrapping_add(1));
        (n.wrapping_add(self.index as u32)) % partitions.max(1)
    }

    /// Acks `offset` of `tp` for `agent`, and applies the table writes made for that event.
    pub(crate) fn ack(&self, agent: usize, tp: &TopicPartition, offset: u64) {
        self.ack_many(agent, tp, &[offset]);
    }

    /// Acks several events of one partition at once (ascending `offsets`): what a batch of
    /// the `for_each` family processed, in one pass over the tracker and the undo logs.
    pub(crate) fn ack_many(&self, agent: usize, tp: &TopicPartition, offsets: &[u64]) {
        if offsets.is_empty() {
            return;
        }
        for sensor in self.sensors.iter() {
            for &offset in offsets {
                sensor.on_stream_event_out(tp, offset);
            }
        }
        if let Some(t) = self.acks.borrow_mut().get_mut(&AckKey(agent, tp)) {
            for &offset in offsets {
                t.ack(offset);
            }
            if let Some(sample) = t.take_finished_sample() {
                self.monitor.event_done(sample);
            }
        }
        let n = offsets.len() as u64;
        if let Some(count) = self.agent_acks.get(agent) {
            count.set(count.get() + n);
        }
        // `commit_every`: the committer is woken once, when the count reaches it.
        let before = self.acked_since_commit.get();
        self.acked_since_commit.set(before + n);
        if before < self.commit_every && before + n >= self.commit_every {
            self.commit_soon.notify(1);
        }
        if !self.written.borrow().is_empty() {
            // Shards do not call back into the core: the list stays borrowed.
            self.written.borrow_mut().retain(|shard| {
                shard.acked(agent, tp, offsets);
                shard.holds_writes_in_flight()
            });
        }
    }

    /// Whether `agent` acked the event at `offset` of `tp` (or it is no longer tracked: its
    /// partition was released).
    pub(crate) fn acked(&self, agent: usize, tp: &TopicPartition, offset: u64) -> bool {
        self.acks.borrow().get(&AckKey(agent, tp)).is_none_or(|t| t.is_acked(offset))
    }

    /// The app's sensors.
    pub(crate) fn sensors(&self) -> &crate::runtime::sensor::Sensors {
        &self.sensors
    }

    /// Events `agent` acked on this core so far (the supervisor tells a streak of failures
    /// from failures between successes).
    pub(crate) fn agent_acks(&self, agent: usize) -> u64 {
        self.agent_acks.get(agent).map_or(0, Cell::get)
    }

    /// Undoes the table writes of events `which` picks (of revoked partitions).
    pub(crate) fn undo_writes(&self, which: &dyn Fn(&Token) -> bool) {
        self.written.borrow_mut().retain(|shard| {
            shard.undo(which);
            shard.holds_writes_in_flight()
        });
    }

    /// Undoes the table writes of events an agent failed on (they will be processed again).
    pub(crate) fn discard_writes(&self, agent: usize, events: &[QueuedEvent]) {
        if self.written.borrow().is_empty() {
            return;
        }
        for e in events {
            self.undo_writes(&|t| t.matches(agent, &e.tp, e.record.offset));
        }
    }

    /// Notes that `shard`'s undo log now holds writes of events in flight, to settle when
    /// they are acked or fail.
    pub(crate) fn note_writes(&self, shard: Rc<dyn AnyShard>) {
        self.written.borrow_mut().push(shard);
    }

    /// Runs `f` with the shard of `table`'s `partition` if this core holds it (borrowed: the
    /// shards cannot change meanwhile, as `f` does not await).
    pub(crate) fn with_shard<T>(
        &self,
        table: usize,
        partition: u32,
        f: impl FnOnce(Option<&Rc<dyn AnyShard>>) -> T,
    ) -> T {
        let shards = self.shards.borrow();
        f(shards.get(table).and_then(|t| t.get(partition as usize)).and_then(Option::as_ref))
    }

    /// The shards of `table` this core holds.
    pub(crate) fn shards_of(&self, table: usize) -> Vec<Rc<dyn AnyShard>> {
        self.shards.borrow().get(table).map(|s| s.iter().flatten().cloned().collect()).unwrap_or_default()
    }

    /// Counts an event that came after its windows closed.
    pub(crate) fn count_late_event(&self) {
        self.stats.late_events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts windows closed.
    pub(crate) fn count_windows_closed(&self, n: u64) {
        self.stats.windows_closed.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn settings(&self) -> &crate::settings::Settings {
        &self.settings
    }

    /// This core's index, `0..cores`.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// This core's handle on the transport.
    pub(crate) fn transport(&self) -> &AnyCore {
        &self.transport
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

    pub(crate) async fn stopped(&self) {
        self.stopping.cancelled().await;
    }
}

/// The index (`0..cores`) of the worker core the caller runs on, or `None` outside a worker
/// (an agent can use it to keep per-core state, such as counters, without sharing).
pub fn current_core() -> Option<usize> {
    CoreRuntime::current().map(|core| core.index)
}

/// Lets the core's other tasks run if this one has used up its time slice, after writing the
/// core's buffered sends if they have grown past their bound. A task that loops without
/// awaiting anything else (a generator calling [`Topic::send_soon`](crate::Topic::send_soon)
/// in a tight loop) should await this now and then; agents need not, their streams do it.
pub async fn yield_if_needed() {
    if let Some(core) = CoreRuntime::current() {
        core.flush_if_full().await;
    }
    glommio::yield_if_needed().await;
}

/// Writes the calling core's buffered sends ([`Topic::send_soon`](crate::Topic::send_soon))
/// now and waits until they are durable (Faust's `producer.flush()`): a generator can record
/// its progress once what it sent so far is safe. Outside a worker there is nothing to flush.
/// On failure ([`SendError::NotYetWritten`](crate::SendError::NotYetWritten): a full disk, a
/// broker away) nothing is lost or reordered: the records stay buffered and are written once
/// the transport takes them.
pub async fn flush() -> Result<(), crate::SendError> {
    let Some(core) = CoreRuntime::current() else { return Ok(()) };
    core.flush().await.map_err(|e| match e {
        crate::runtime::sends::FlushError::Write { tp, message } => {
            crate::SendError::NotYetWritten { partition: Some(tp), message }
        }
        other => crate::SendError::NotYetWritten { partition: None, message: other.to_string() },
    })
}
