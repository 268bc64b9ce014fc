//! Assignment changes: partitions moving onto and off this worker and between its cores.
//!
//! The control thread follows the group's [`AssignmentEvent`]s and keeps the placement of the
//! worker's partitions on its cores (sticky and balanced, with the same assignor the group
//! uses for workers). Each change becomes one [`Command`] per core, applied in two phases so
//! a partition is released everywhere before anyone opens it:
//!
//! 1. **Release** (revoked partitions, and those moving to another core): the core stops
//!    their consumers, drops the events no agent has taken yet (*abandoned*: the next owner
//!    fetches them again from the committed offset), waits a bounded time for the events the
//!    agents hold, commits, then suspends the table shards of those partitions — kept open
//!    with their cache, so that if the partitions come back they resume in place, without
//!    replaying the changelog. A shard whose state could not be committed, or that moves to
//!    another core, is closed instead.
//! 2. **Take** (assigned partitions): the core resumes the suspended shard if nobody
//!    committed to its changelog meanwhile, or opens and recovers it, and only then starts
//!    fetching from the committed offset.
//!
//! Only after every core released does the control thread confirm a revocation to the group,
//! which then hands the partitions to their new owner. Events of a released partition are
//! never processed or committed afterwards: its consumer is gone, its queued events are
//! dropped, its ack trackers removed (late acks are ignored), the writes its events left
//! pending are discarded, and its shard is no longer reachable from stream processing. Every
//! wait is bounded and logs what it waits for.

use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust_transport::{AssignmentEvent, Fence, JoinRequest, TopicPartition};

use crate::runtime::mailbox::Mailbox;
use crate::runtime::signal::Cancel;
use crate::runtime::state::AnyShard;
use crate::transports::AnyTransport;
use crate::util::lock;
use crate::worker::CoreRuntime;

/// How often a long wait says what it waits for.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(1);

/// What the worker did about assignment changes since the app was created, for monitoring
/// and tests: see [`App::stats`](crate::App::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Assignment changes applied (each `Assigned` or `Revoked` from the group).
    pub rebalances: u64,
    /// Source partitions this worker started consuming.
    pub partitions_assigned: u64,
    /// Source partitions it stopped consuming (revoked, or moved between its cores).
    pub partitions_revoked: u64,
    /// Table shards opened and recovered from their changelog.
    pub shards_recovered: u64,
    /// Suspended table shards resumed in place, without replaying their changelog.
    pub shards_resumed: u64,
    /// Changelog records replayed while recovering shards.
    pub changelog_records_replayed: u64,
    /// Fetched events dropped unprocessed when their partition was revoked (the next owner
    /// fetches them again from the committed offset).
    pub events_abandoned: u64,
    /// Bad records met (see [`BadRecordPolicy`](crate::BadRecordPolicy)).
    pub bad_records: u64,
    /// Writes that failed (buffered sends, changelogs, stores, committed offsets) and are
    /// retried: a full disk, a broker away. See [`App::problems`](crate::App::problems) for
    /// the current ones.
    pub write_failures: u64,
    /// Whether some core takes no new events now because its writes fail (it resumes by
    /// itself once they succeed).
    pub writes_blocked: bool,
    /// Damaged logs of internal topics (changelogs, repartition topics) repaired by the
    /// worker (see `docs/engine.md`, "Faults").
    pub logs_repaired: u64,
    /// Offsets whose records were dropped by those repairs.
    pub offsets_lost_to_damage: u64,
    /// Events the agents finished (acked), over all cores (an event two agents consume
    /// counts twice). Updated as cores fetch and commit, so it may lag a moment behind.
    pub events_processed: u64,
    /// Records in the consumed partitions not processed yet: the log's end at the last fetch
    /// minus where processing stands, summed over partitions. 0 once the worker caught up.
    pub lag: u64,
}

/// The counters behind [`WorkerStats`], shared by the cores and the control thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) rebalances: AtomicU64,
    pub(crate) partitions_assigned: AtomicU64,
    pub(crate) partitions_revoked: AtomicU64,
    pub(crate) shards_recovered: AtomicU64,
    pub(crate) shards_resumed: AtomicU64,
    pub(crate) changelog_records_replayed: AtomicU64,
    pub(crate) events_abandoned: AtomicU64,
    pub(crate) bad_records: AtomicU64,
    pub(crate) write_failures: AtomicU64,
    pub(crate) logs_repaired: AtomicU64,
    pub(crate) offsets_lost_to_damage: AtomicU64,
    /// Cores whose writes fail now.
    pub(crate) blocked_cores: AtomicU64,
    /// What is wrong now, by where (`core 0 writes`, `orders/6`): shown by `stats`.
    problems: Mutex<std::collections::BTreeMap<String, String>>,
    /// Per core: (events processed, lag), as the core last published them.
    progress: Mutex<std::collections::BTreeMap<usize, (u64, u64)>>,
    /// Whether the worker was caught up (lag 0 everywhere) at the last publication.
    caught_up: std::sync::atomic::AtomicBool,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> WorkerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (events_processed, lag) = lock(&self.progress).values().fold((0, 0), |(n, l), (pn, pl)| (n + pn, l + pl));
        WorkerStats {
            rebalances: get(&self.rebalances),
            partitions_assigned: get(&self.partitions_assigned),
            partitions_revoked: get(&self.partitions_revoked),
            shards_recovered: get(&self.shards_recovered),
            shards_resumed: get(&self.shards_resumed),
            changelog_records_replayed: get(&self.changelog_records_replayed),
            events_abandoned: get(&self.events_abandoned),
            bad_records: get(&self.bad_records),
            write_failures: get(&self.write_failures),
            writes_blocked: get(&self.blocked_cores) > 0,
            logs_repaired: get(&self.logs_repaired),
            offsets_lost_to_damage: get(&self.offsets_lost_to_damage),
            events_processed,
            lag,
        }
    }

    /// Publishes core `core`'s events processed and lag; logs when the whole worker catches
    /// up (its lag falls to 0) and when it falls behind again after that.
    pub(crate) fn publish_progress(&self, core: usize, processed: u64, lag: u64) {
        let (total_lag, processed_all) = {
            let mut progress = lock(&self.progress);
            progress.insert(core, (processed, lag));
            (progress.values().map(|(_, l)| l).sum::<u64>(), progress.values().map(|(n, _)| n).sum::<u64>())
        };
        let now = total_lag == 0;
        if self.caught_up.swap(now, Ordering::Relaxed) != now && now {
            tracing::info!(
                events_processed = processed_all,
                "caught up: every consumed partition is processed to its end"
            );
        }
    }

    /// Records (`Some`) or clears (`None`) the current problem of `place`.
    pub(crate) fn set_problem(&self, place: &str, problem: Option<String>) {
        let mut problems = lock(&self.problems);
        match problem {
            Some(p) => {
                problems.insert(place.to_string(), p);
            }
            None => {
                problems.remove(place);
            }
        }
    }

    /// The current problems, as `place: problem`.
    pub(crate) fn problems(&self) -> Vec<String> {
        lock(&self.problems).iter().map(|(place, p)| format!("{place}: {p}")).collect()
    }
}

/// One partition's consumer on a core.
pub(crate) struct Consumer {
    pub(crate) cancel: Rc<Cancel>,
    pub(crate) task: glommio::Task<()>,
}

/// A shard kept open after its partition was revoked, with the changelog offset committed
/// for it then: if the committed offset is still that when the partition returns, nobody
/// changed the table partition meanwhile and the shard resumes as it is.
pub(crate) struct Suspended {
    pub(crate) shard: Rc<dyn AnyShard>,
    pub(crate) committed_end: u64,
}

/// What one core is told to do for one assignment change.
#[derive(Debug, Default)]
pub(crate) struct Command {
    /// The fence for commits from now on.
    pub(crate) fence: Option<Fence>,
    /// Partitions to stop processing (sources) or to suspend (changelogs).
    pub(crate) release: Vec<TopicPartition>,
    /// Changelog partitions whose suspended shards are to be closed (they go elsewhere).
    pub(crate) close: Vec<TopicPartition>,
    /// Partitions to start processing (sources) or to open (changelogs).
    pub(crate) take: Vec<TopicPartition>,
    /// The released partitions were lost (the group dropped this worker): nothing of them
    /// is committed (the commit would be refused) and their shards are closed.
    pub(crate) lost: bool,
    pub(crate) done: Arc<Done>,
}

/// What a core reports when it applied a command.
#[derive(Debug, Clone, Default)]
pub(crate) struct Report {
    /// Changelog partitions whose shards it now holds suspended.
    pub(crate) suspended: Vec<TopicPartition>,
}

/// A core's answer to a command, awaited on the control thread.
pub(crate) type Done = crate::runtime::signal::Oneshot<Result<Report, String>>;

/// The commands waiting for one core, pushed by the control thread. Once the core stopped,
/// a command is answered at once with an error.
#[derive(Debug, Default)]
pub(crate) struct Commands {
    mailbox: Mailbox<Command>,
}

impl Commands {
    fn push(&self, command: Command) {
        if let Err(command) = self.mailbox.push(command) {
            command.done.set(Err("the core has stopped".into()));
        }
    }

    /// The next command, or `None` once `core` stops.
    pub(crate) async fn next(&self, core: &CoreRuntime) -> Option<Command> {
        self.mailbox.next(core.stopping()).await
    }

    /// Refuses later commands and answers the queued ones (the core stopped).
    pub(crate) fn close(&self) {
        for command in self.mailbox.close() {
            command.done.set(Err("the core has stopped".into()));
        }
    }
}

impl CoreRuntime {
    /// Applies one command: release, close, take. Answers it, also on failure.
    pub(crate) async fn apply(self: &Rc<Self>, command: Command) {
        let Command { fence, release, close, take, lost, done } = command;
        if fence.is_some() {
            *self.fence.borrow_mut() = fence;
        }
        let mut report = Report::default();
        if !release.is_empty() {
            report.suspended = self.release(&release, lost).await;
        }
        for tp in &close {
            if self.suspended.borrow_mut().remove(tp).is_some() {
                tracing::debug!(core = self.index, changelog = %tp, "closed a suspended shard (moved elsewhere)");
            }
        }
        match self.take(&take).await {
            Ok(()) => done.set(Ok(report)),
            Err(e) => {
                tracing::error!(core = self.index, error = %e, "taking assigned partitions failed; stopping the worker");
                *self.failure.borrow_mut() = Some(e.clone());
                self.app.stop_signal().stop();
                done.set(Err(e));
            }
        }
    }

    fn is_changelog(&self, tp: &TopicPartition) -> Option<usize> {
        self.changelog_tables.get(&tp.topic).copied()
    }

    /// Stops processing `partitions` (sources) and suspends or closes their shards
    /// (changelogs). Returns the changelog partitions whose shards are now suspended. With
    /// `lost`, nothing is waited for or committed, and every shard is closed.
    async fn release(self: &Rc<Self>, partitions: &[TopicPartition], lost: bool) -> Vec<TopicPartition> {
        let (changelogs, sources): (Vec<TopicPartition>, Vec<TopicPartition>) =
            partitions.iter().cloned().partition(|tp| self.is_changelog(tp).is_some());
        // 1. Stop fetching. A consumer ends within one fetch wait (its waits for queue room
        // end at once when cancelled).
        let stopping: Vec<(TopicPartition, Consumer)> =
            sources.iter().filter_map(|tp| self.consumers.borrow_mut().remove(tp).map(|c| (tp.clone(), c))).collect();
        for (_, c) in &stopping {
            c.cancel.cancel();
        }
        let grace = self.settings().shutdown_timeout;
        for (tp, c) in stopping {
            let started = Instant::now();
            let mut task = std::pin::pin!(c.task);
            loop {
                if started.elapsed() >= grace {
                    // Dropped below, which cancels it: what it fetched is not processed.
                    tracing::error!(core = self.index, partition = %tp, grace_ms = grace.as_millis() as u64,
                        "the consumer of a revoked partition did not stop in time; cancelling it");
                    break;
                }
                let finished = futures_lite::future::or(
                    async {
                        (&mut task).await;
                        true
                    },
                    async {
                        glommio::timer::sleep(WAIT_LOG_EVERY).await;
                        false
                    },
                )
                .await;
                if finished {
                    break;
                }
                tracing::warn!(core = self.index, partition = %tp, waited_ms = started.elapsed().as_millis() as u64,
                    "waiting for the consumer of a revoked partition to stop");
            }
        }
        // 2. Abandon what no agent has taken: fetched again by the next owner.
        let mut boundaries: Vec<(usize, TopicPartition, u64)> = Vec::new();
        let mut abandoned = 0u64;
        for (agent, queue) in self.queues.iter().enumerate() {
            for tp in &sources {
                let Some(position) = self.acks.borrow().get(&(agent, tp.clone())).map(|t| t.position()) else {
                    continue;
                };
                let (n, first) = queue.purge(tp);
                abandoned += n as u64;
                boundaries.push((agent, tp.clone(), first.unwrap_or(position)));
            }
        }
        // 3. Let the agents finish the events they hold (everything below the first abandoned
        // offset), for at most the shutdown timeout. Lost partitions wait for nothing.
        let started = Instant::now();
        let mut last_log = Instant::now();
        if lost {
            boundaries.clear();
        }
        loop {
            let holding: Vec<String> = boundaries
                .iter()
                .filter(|(agent, tp, boundary)| {
                    self.acks.borrow().get(&(*agent, tp.clone())).is_some_and(|t| t.committable() < *boundary)
                })
                .map(|(agent, tp, _)| format!("{tp} (agent #{agent})"))
                .collect();
            if holding.is_empty() {
                break;
            }
            if started.elapsed() >= grace {
                tracing::error!(core = self.index, partitions = ?holding, grace_ms = grace.as_millis() as u64,
                    "agents did not finish the events of revoked partitions in time; abandoning them (the next owner processes them again)");
                break;
            }
            if last_log.elapsed() >= WAIT_LOG_EVERY {
                last_log = Instant::now();
                tracing::warn!(core = self.index, partitions = ?holding, waited_ms = started.elapsed().as_millis() as u64,
                    "waiting for agents to finish the events of revoked partitions");
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        // 4. Commit what was processed (a lost partition's commit would be refused: its events
        // are processed again by its new owner).
        let committed = if lost { None } else { self.commit_for_release().await };
        // 5. Release, with no await from here on: a commit that starts later no longer sees
        // these partitions, and nothing of them is processed any more.
        {
            let mut acks = self.acks.borrow_mut();
            acks.retain(|(_, tp), _| !sources.contains(tp));
            self.log_ends.borrow_mut().retain(|tp, _| !sources.contains(tp));
        }
        {
            let mut committed_offsets = self.committed.borrow_mut();
            for tp in sources.iter().chain(&changelogs) {
                committed_offsets.remove(tp);
            }
        }
        let discarded: Vec<_> = self
            .pending_writes
            .borrow_mut()
            .extract_if(.., |(token, _)| {
                sources.iter().any(|tp| token.partition == tp.partition && *token.topic == *tp.topic)
            })
            .collect();
        for (token, shard) in discarded {
            shard.discard_pending(&token);
        }
        let mut suspended = Vec::new();
        for tp in &changelogs {
            let Some(table) = self.is_changelog(tp) else { continue };
            let shard = {
                let mut shards = self.shards.borrow_mut();
                shards.get_mut(table).and_then(|list| list.get_mut(tp.partition as usize)).and_then(Option::take)
            };
            let Some(shard) = shard else { continue };
            match committed.as_ref().and_then(|ends| ends.get(tp).copied()) {
                Some(end) if !shard.is_dirty() => {
                    self.suspended.borrow_mut().insert(tp.clone(), Suspended { shard, committed_end: end });
                    suspended.push(tp.clone());
                }
                _ if lost => {}
                _ => {
                    tracing::warn!(core = self.index, changelog = %tp,
                        "closing the shard of a revoked partition: its latest state was not committed");
                }
            }
        }
        let stats = &self.stats;
        stats.partitions_revoked.fetch_add(sources.len() as u64, Ordering::Relaxed);
        stats.events_abandoned.fetch_add(abandoned, Ordering::Relaxed);
        tracing::info!(core = self.index, revoked = ?sources, suspended = suspended.len(), abandoned,
            elapsed_ms = started.elapsed().as_millis() as u64, "released partitions");
        suspended
    }

    /// The commit of a release, retried while table state runs ahead of the committable
    /// offsets (bounded). Returns the changelog ends committed (by partition), or `None`
    /// when the commit failed: then the shards are closed, and the next owner starts from the
    /// previous commit.
    async fn commit_for_release(self: &Rc<Self>) -> Option<HashMap<TopicPartition, u64>> {
        match self.commit_retrying(|| false).await {
            Ok(true) => Some(self.committed.borrow().iter().map(|(tp, o)| (tp.clone(), *o)).collect()),
            Ok(false) => {
                tracing::error!(
                    core = self.index,
                    "commit before releasing partitions kept waiting for out-of-order acks"
                );
                None
            }
            Err(e) => {
                tracing::error!(core = self.index, error = %e, "commit before releasing partitions failed");
                None
            }
        }
    }

    /// Opens (or resumes) the shards of the changelog partitions in `partitions`, then
    /// starts consuming its source partitions.
    async fn take(self: &Rc<Self>, partitions: &[TopicPartition]) -> Result<(), String> {
        let (changelogs, sources): (Vec<TopicPartition>, Vec<TopicPartition>) =
            partitions.iter().cloned().partition(|tp| self.is_changelog(tp).is_some());
        for tp in &changelogs {
            let Some(table) = self.is_changelog(tp) else { continue };
            let shard = match self.resume(tp).await? {
                Some(shard) => shard,
                None => self.open_shard(table, tp.partition).await?,
            };
            let mut shards = self.shards.borrow_mut();
            let list = &mut shards[table];
            if list.len() <= tp.partition as usize {
                list.resize(tp.partition as usize + 1, None);
            }
            list[tp.partition as usize] = Some(shard);
        }
        for tp in sources {
            if self.consumers.borrow().contains_key(&tp) {
                continue;
            }
            let agents = self.agents_by_topic.get(&tp.topic).cloned().unwrap_or_default();
            if agents.is_empty() {
                continue;
            }
            let cancel = Rc::new(Cancel::default());
            let reset = self.settings().auto_offset_reset;
            let task =
                glommio::spawn_local(crate::worker::consume(self.clone(), tp.clone(), agents, reset, cancel.clone()));
            self.consumers.borrow_mut().insert(tp, Consumer { cancel, task });
            self.stats.partitions_assigned.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The suspended shard of `tp`, if it can resume as it is: nobody committed to its
    /// changelog since it was suspended. A stale one is closed.
    async fn resume(&self, tp: &TopicPartition) -> Result<Option<Rc<dyn AnyShard>>, String> {
        let Some(suspended) = self.suspended.borrow_mut().remove(tp) else { return Ok(None) };
        let now = self
            .transport
            .committed(&self.group, std::slice::from_ref(tp))
            .await
            .map_err(|e| format!("reading the committed offset of {tp}: {e}"))?;
        let now = now.first().copied().flatten().unwrap_or(0);
        if now != suspended.committed_end {
            tracing::info!(core = self.index, changelog = %tp, suspended_at = suspended.committed_end, committed = now,
                "the changelog moved on while the shard was suspended; reopening it");
            return Ok(None);
        }
        self.committed.borrow_mut().insert(tp.clone(), now);
        self.stats.shards_resumed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(core = self.index, changelog = %tp, "resumed a suspended shard in place");
        Ok(Some(suspended.shard))
    }

    /// Opens the shard of `table`'s `partition` and recovers it from its changelog.
    async fn open_shard(&self, table: usize, partition: u32) -> Result<Rc<dyn AnyShard>, String> {
        let settings = self.settings();
        let meta = self.tables.get(table).ok_or_else(|| format!("no table #{table}"))?;
        let dir = (settings.store != "memory://" && !meta.in_memory())
            .then(|| settings.datadir.join("tables").join(&**meta.name()).join(partition.to_string()));
        let shard = meta.open(crate::runtime::state::ShardArgs { partition, dir }).map_err(|e| e.to_string())?;
        let fence = self.fence.borrow().clone();
        let recovered = crate::runtime::recovery::recover(&self.transport, &self.group, fence.as_ref(), &shard)
            .await
            .map_err(|e| e.to_string())?;
        self.committed.borrow_mut().insert(shard.changelog().clone(), recovered.end);
        if let Some(report) = recovered.repaired.filter(|r| !r.is_clean()) {
            self.stats.logs_repaired.fetch_add(1, Ordering::Relaxed);
            self.stats.offsets_lost_to_damage.fetch_add(report.lost_offsets(), Ordering::Relaxed);
        }
        self.stats.shards_recovered.fetch_add(1, Ordering::Relaxed);
        self.stats.changelog_records_replayed.fetch_add(recovered.replayed, Ordering::Relaxed);
        Ok(shard)
    }

    /// Whether the events of `tp` are no longer this core's to process (its partition was
    /// released): a failed event of it is dropped rather than retried.
    pub(crate) fn released(&self, tp: &TopicPartition) -> bool {
        !self.channel_agents.contains_key(&tp.topic) && !self.consumers.borrow().contains_key(tp)
    }
}

/// The control thread's view of where this worker's partitions are.
pub(crate) struct Placement {
    transport: AnyTransport,
    cores: usize,
    /// Co-partitioned groups of topics: partition p of each goes to the same core.
    groups: Vec<Vec<Arc<str>>>,
    commands: Vec<Arc<Commands>>,
    /// The core processing each partition this worker owns.
    placed: HashMap<TopicPartition, usize>,
    /// The core holding the suspended shard of each changelog partition.
    suspended: HashMap<TopicPartition, usize>,
    /// How long a core may take to apply a command before the worker gives up.
    timeout: Duration,
}

impl Placement {
    pub(crate) fn new(
        transport: AnyTransport,
        cores: usize,
        groups: Vec<Vec<Arc<str>>>,
        commands: Vec<Arc<Commands>>,
        timeout: Duration,
    ) -> Placement {
        Placement { transport, cores, groups, commands, placed: HashMap::new(), suspended: HashMap::new(), timeout }
    }

    /// Where each of `owned` goes: sticky (to its core, or to the core holding its suspended
    /// shard) and balanced over the cores, co-partitioned groups together.
    pub(crate) fn target(&self, owned: &BTreeSet<TopicPartition>) -> HashMap<TopicPartition, usize> {
        let members: Vec<(usize, u32)> = (0..self.cores.max(1)).map(|c| (c, 1)).collect();
        let partitions: Vec<TopicPartition> = owned.iter().cloned().collect();
        let mut previous = self.suspended.clone();
        previous.extend(self.placed.iter().map(|(tp, c)| (tp.clone(), *c)));
        let input = faust_transport::AssignInput {
            members: &members,
            groups: &self.groups,
            partitions: &partitions,
            previous: &previous,
        };
        match faust_transport::assign(&input) {
            Ok(placed) => {
                placed.into_iter().flat_map(|(core, tps)| tps.into_iter().map(move |tp| (tp, core))).collect()
            }
            // Unreachable with at least one member of weight 1; fall back to core 0.
            Err(e) => {
                tracing::error!(error = %e, "placing partitions on cores failed; using core 0");
                partitions.into_iter().map(|tp| (tp, 0)).collect()
            }
        }
    }

    /// Moves the worker to `target`: releases what leaves a core, then takes what arrives.
    /// Every core gets a command (with the new fence) even when nothing changes for it.
    pub(crate) async fn apply(
        &mut self,
        target: &HashMap<TopicPartition, usize>,
        fence: Option<Fence>,
    ) -> Result<(), String> {
        let n = self.cores.max(1);
        let mut release: Vec<Vec<TopicPartition>> = vec![Vec::new(); n];
        let mut close: Vec<Vec<TopicPartition>> = vec![Vec::new(); n];
        let mut take: Vec<Vec<TopicPartition>> = vec![Vec::new(); n];
        for (tp, &core) in &self.placed {
            if target.get(tp) != Some(&core) {
                release[core].push(tp.clone());
                if target.contains_key(tp) {
                    // Moves to another core: its shard must be closed here before it opens there.
                    close[core].push(tp.clone());
                }
            }
        }
        for (tp, &core) in &self.suspended {
            if target.get(tp).is_some_and(|&c| c != core) {
                close[core].push(tp.clone());
            }
        }
        for (tp, &core) in target {
            if self.placed.get(tp) != Some(&core) {
                take[core].push(tp.clone());
            }
        }
        for list in release.iter_mut().chain(close.iter_mut()).chain(take.iter_mut()) {
            list.sort();
        }
        // Phase 1: release and close.
        let busy: Vec<usize> = (0..n).filter(|&c| !release[c].is_empty() || !close[c].is_empty()).collect();
        let phase1: Vec<(usize, Arc<Done>)> = busy
            .into_iter()
            .map(|c| {
                let command = Command {
                    fence: fence.clone(),
                    release: std::mem::take(&mut release[c]),
                    close: close[c].clone(),
                    ..Command::default()
                };
                self.send(c, command)
            })
            .collect();
        for (core, report) in self.wait_all(phase1, "release revoked partitions").await? {
            for tp in report.suspended {
                self.suspended.insert(tp, core);
            }
        }
        for (core, list) in close.iter().enumerate() {
            for tp in list {
                if self.suspended.get(tp) == Some(&core) {
                    self.suspended.remove(tp);
                }
            }
        }
        self.placed.retain(|tp, core| target.get(tp) == Some(core));
        // Phase 2: take (every core, for the fence). The embedded transport learns first which
        // core appends and reads each partition.
        let owners: Vec<(TopicPartition, usize)> = target.iter().map(|(tp, c)| (tp.clone(), *c)).collect();
        self.transport.set_owners(&owners);
        let phase2: Vec<(usize, Arc<Done>)> = (0..n)
            .map(|c| {
                self.send(c, Command { fence: fence.clone(), take: std::mem::take(&mut take[c]), ..Command::default() })
            })
            .collect();
        self.wait_all(phase2, "take assigned partitions").await?;
        for (tp, &core) in target {
            self.placed.insert(tp.clone(), core);
            if self.suspended.get(tp) == Some(&core) {
                self.suspended.remove(tp);
            }
        }
        Ok(())
    }

    /// Drops every partition and suspended shard at once, committing nothing: the group
    /// dropped this worker, so others own them already.
    pub(crate) async fn lose_everything(&mut self) -> Result<(), String> {
        let n = self.cores.max(1);
        let mut release: Vec<Vec<TopicPartition>> = vec![Vec::new(); n];
        let mut close: Vec<Vec<TopicPartition>> = vec![Vec::new(); n];
        for (tp, &core) in &self.placed {
            release[core].push(tp.clone());
            close[core].push(tp.clone());
        }
        for (tp, &core) in &self.suspended {
            close[core].push(tp.clone());
        }
        let pending: Vec<(usize, Arc<Done>)> = (0..n)
            .map(|c| {
                let command = Command {
                    release: std::mem::take(&mut release[c]),
                    close: std::mem::take(&mut close[c]),
                    lost: true,
                    ..Command::default()
                };
                self.send(c, command)
            })
            .collect();
        let result = self.wait_all(pending, "drop lost partitions").await.map(|_| ());
        self.placed.clear();
        self.suspended.clear();
        result
    }

    /// Queues `command` for `core`; returns what to wait on.
    fn send(&self, core: usize, command: Command) -> (usize, Arc<Done>) {
        let done = command.done.clone();
        self.commands[core].push(command);
        (core, done)
    }

    /// The cores' answers, each awaited for at most the timeout (logging while it waits).
    async fn wait_all(&self, pending: Vec<(usize, Arc<Done>)>, what: &str) -> Result<Vec<(usize, Report)>, String> {
        let mut out = Vec::new();
        for (core, done) in pending {
            let started = Instant::now();
            loop {
                match done.wait_for(WAIT_LOG_EVERY).await {
                    Some(Ok(report)) => {
                        out.push((core, report));
                        break;
                    }
                    Some(Err(e)) => return Err(format!("core {core} could not {what}: {e}")),
                    None if started.elapsed() >= self.timeout => {
                        return Err(format!("core {core} did not {what} within {} ms", self.timeout.as_millis()));
                    }
                    None => tracing::warn!(
                        core,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "waiting for a core to {what}"
                    ),
                }
            }
        }
        Ok(out)
    }
}

/// Follows the group for the worker: joins with `join`, applies each assignment change to
/// the cores, confirms revocations, and leaves once the cores have finished (`cores_done`).
pub(crate) struct Control {
    pub(crate) transport: AnyTransport,
    pub(crate) group: String,
    pub(crate) join: JoinRequest,
    pub(crate) placement: Placement,
    pub(crate) stop: Arc<crate::app::StopSignal>,
    pub(crate) cores_done: Arc<crate::app::StopSignal>,
    pub(crate) counters: Arc<Counters>,
    /// Why the control thread stopped the worker, if it did.
    pub(crate) failure: Arc<Mutex<Option<String>>>,
    /// How long to wait for the first assignment before letting the cores start without
    /// partitions (a worker joining a busy group gets its share only after others release it).
    pub(crate) first_wait: Duration,
}

impl Control {
    pub(crate) async fn run(mut self) {
        let mut membership = match self.transport.membership(&self.group, &self.join) {
            Ok(m) => m,
            Err(e) => {
                self.fail(&format!("joining the group: {e}"));
                return;
            }
        };
        let mut member = membership.member_id();
        let mut owned: BTreeSet<TopicPartition> = BTreeSet::new();
        let mut generation = 0;
        // The first assignment, so that the cores start with their partitions placed.
        let first = futures_lite::future::or(async { Some(membership.next_event().await) }, async {
            futures_timer::Delay::new(self.first_wait).await;
            None
        })
        .await;
        let mut next = match first {
            Some(event) => Some(event),
            None => {
                let fence = member.clone().map(|member| Fence { member, generation });
                if let Err(e) = self.placement.apply(&HashMap::new(), fence).await
                    && !self.stop.is_stopped()
                {
                    self.fail(&e);
                }
                None
            }
        };
        while !self.stop.is_stopped() {
            let event = match next.take() {
                Some(event) => event,
                None => {
                    let stop = self.stop.clone();
                    let event = futures_lite::future::or(async { Some(membership.next_event().await) }, async {
                        stop.wait().await;
                        None
                    })
                    .await;
                    match event {
                        Some(event) => event,
                        None => break,
                    }
                }
            };
            let event = match event {
                Ok(event) => event,
                Err(faust_transport::Error::Closed) => break,
                Err(e @ faust_transport::Error::Fenced { .. }) => {
                    // Kafka's "partitions lost": drop everything uncommitted, then join again.
                    tracing::warn!(group = %self.group, error = %e,
                        "the group dropped this worker; dropping its partitions without committing and joining again");
                    if let Err(e) = self.placement.lose_everything().await {
                        if !self.stop.is_stopped() {
                            self.fail(&e);
                        }
                        break;
                    }
                    owned.clear();
                    match self.transport.membership(&self.group, &self.join) {
                        Ok(m) => {
                            membership = m;
                            member = membership.member_id();
                            continue;
                        }
                        Err(e) => {
                            self.fail(&format!("joining the group again: {e}"));
                            break;
                        }
                    }
                }
                Err(e) => {
                    self.fail(&format!("the group failed: {e}"));
                    break;
                }
            };
            let (g, revoked) = match &event {
                AssignmentEvent::Assigned { generation, partitions } => {
                    owned.extend(partitions.iter().cloned());
                    (*generation, false)
                }
                AssignmentEvent::Revoked { generation, partitions } => {
                    for tp in partitions {
                        owned.remove(tp);
                    }
                    (*generation, true)
                }
            };
            generation = generation.max(g);
            tracing::debug!(group = %self.group, ?event, "assignment change");
            let target = self.placement.target(&owned);
            let fence = member.clone().map(|member| Fence { member, generation });
            if let Err(e) = self.placement.apply(&target, fence).await {
                // A stop asked for meanwhile ends the cores' commands: not a failure.
                if !self.stop.is_stopped() {
                    self.fail(&e);
                }
                break;
            }
            self.counters.rebalances.fetch_add(1, Ordering::Relaxed);
            if revoked && let Err(e) = membership.revoked(g).await {
                if matches!(e, faust_transport::Error::Fenced { .. }) {
                    // Too late: the group dropped this worker meanwhile; the next event says so.
                    tracing::warn!(group = %self.group, error = %e, "confirming a revocation was refused");
                    continue;
                }
                self.fail(&format!("confirming the revocation of generation {g}: {e}"));
                break;
            }
        }
        // Leave once the cores committed their last offsets, so others take over from there.
        self.cores_done.wait().await;
        if let Err(e) = membership.leave().await {
            tracing::warn!(group = %self.group, error = %e, "leaving the group failed");
        }
    }

    fn fail(&self, message: &str) {
        tracing::error!(group = %self.group, "{message}; stopping the worker");
        lock(&self.failure).get_or_insert_with(|| message.to_string());
        self.stop.stop();
    }
}
