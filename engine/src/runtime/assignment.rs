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

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use faust_transport::{Fence, TopicPartition};

use crate::runtime::CoreRuntime;
use crate::runtime::mailbox::Mailbox;
use crate::runtime::signal::Cancel;
use crate::runtime::state::AnyShard;

/// How often a long wait says what it waits for.
pub(crate) const WAIT_LOG_EVERY: Duration = Duration::from_secs(1);

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
    /// With `Some`, the changelog partitions this core follows as standbys from now on (all
    /// of them).
    pub(crate) standbys: Option<Vec<TopicPartition>>,
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
    pub(crate) fn push(&self, command: Command) {
        if let Err(command) = self.mailbox.push(command) {
            command.done.set(Err("the core has stopped".into()));
        }
    }

    /// The next command, or `None` once `core` stops.
    pub(crate) async fn next(&self, stopping: &Cancel) -> Option<Command> {
        self.mailbox.next(stopping).await
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
        let Command { fence, release, close, take, standbys, lost, done } = command;
        if fence.is_some() {
            *self.fence.borrow_mut() = fence;
        }
        let mut report = Report::default();
        if !release.is_empty() {
            report.suspended = self.release(&release, lost).await;
        }
        for tp in &close {
            if self.suspended.borrow_mut().remove(tp).is_some() || self.close_standby(tp).await {
                tracing::debug!(core = self.index, changelog = %tp, "closed a suspended or standby shard (moved elsewhere)");
            }
        }
        if let Some(standbys) = standbys
            && let Err(e) = self.set_standbys(&standbys).await
        {
            // A standby is an optimisation: without it, a takeover replays the whole changelog.
            tracing::warn!(core = self.index, error = %e, "opening standby shards failed");
        }
        match self.take(&take).await {
            Ok(()) => done.set(Ok(report)),
            Err(e) => {
                tracing::error!(core = self.index, error = %e, "taking assigned partitions failed; stopping the worker");
                *self.failure.borrow_mut() = Some(e.clone());
                self.app_stop.stop();
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
        self.undo_writes(&|token| {
            sources.iter().any(|tp| token.partition == tp.partition && *token.topic == *tp.topic)
        });
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
                None => match self.take_standby(tp).await {
                    Some(standby) => {
                        self.stats.standbys_promoted.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(core = self.index, changelog = %tp, at = standby.checkpointed_changelog(),
                            "promoting a standby shard");
                        self.recover_shard(standby).await?
                    }
                    None => self.recover_shard(self.open_store(table, tp.partition)?).await?,
                },
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
            let task = glommio::spawn_local(crate::runtime::consume::consume(
                self.clone(),
                tp.clone(),
                agents,
                reset,
                cancel.clone(),
            ));
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
        self.transport.set_compaction_horizon(tp, now);
        self.stats.shards_resumed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(core = self.index, changelog = %tp, "resumed a suspended shard in place");
        Ok(Some(suspended.shard))
    }

    /// Opens the shard of `table`'s `partition` (its store as it is on disk, not recovered).
    pub(crate) fn open_store(&self, table: usize, partition: u32) -> Result<Rc<dyn AnyShard>, String> {
        let settings = self.settings();
        let meta = self.tables.get(table).ok_or_else(|| format!("no table #{table}"))?;
        let dir = (settings.store != "memory://" && !meta.in_memory())
            .then(|| settings.table_dir().join(&**meta.name()).join(partition.to_string()));
        meta.open(crate::runtime::state::ShardArgs { partition, dir, segment_bytes: settings.segment_bytes })
            .map_err(|e| e.to_string())
    }

    /// Recovers `shard` from its changelog, from where it stands to the committed offset.
    async fn recover_shard(&self, shard: Rc<dyn AnyShard>) -> Result<Rc<dyn AnyShard>, String> {
        let fence = self.fence.borrow().clone();
        let recovered =
            crate::runtime::recovery::recover(&self.transport, &self.group, fence.as_ref(), &shard, &self.sensors)
                .await
                .map_err(|e| e.to_string())?;
        self.committed.borrow_mut().insert(shard.changelog().clone(), recovered.end);
        self.transport.set_compaction_horizon(shard.changelog(), recovered.end);
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
