//! The commit protocol.
//!
//! **Invariant: after a crash at any point, a table shard holds exactly the effects of the
//! events below its partition's committed offset.** Writes of events in flight are in a
//! shard's cache in place, but its undo log holds, for each key they wrote, the value the
//! acked events left; a freeze takes that value for those keys and the cache's for the other
//! dirty ones, so freezing in the same instant as the committable offsets are read captures
//! exactly the effects of the acked events. A commit then writes them
//! once to the store and once to the changelog, waits until the changelog (and every buffered
//! send) is durable, commits the source offsets *and the changelog end offsets in one
//! transport commit*, and only then checkpoints the stores: the pair (source offset,
//! changelog offset) is committed atomically, and a store checkpoint never claims more than
//! what is committed. A commit that fails part way undoes nothing durable and loses nothing:
//! entries whose write failed are dirty again, and changelog records it wrote are committed
//! by the next commit that succeeds.
//!
//! No step blocks the core: the offsets file (`local://`) and the stores' checkpoint files
//! are written, renamed and synced on helper threads while the core goes on processing; the
//! commit lock keeps one commit at a time per core.

use std::rc::Rc;
use std::time::Duration;

use faust_transport::TopicPartition;

use faust_storage::{BatchBuilder, WriteBatch};

use crate::error::TableError;
use crate::runtime::sends::{FlushError, LogLimiter};
use crate::runtime::state::{AnyShard, CommitFailure, FrozenSet};
use crate::runtime::{CoreRuntime, HashMap};
use crate::transports::AnyCore;
use crate::util::lock;

/// Entries encoded per step of a commit, between which the core serves other tasks.
pub(crate) const FREEZE_CHUNK: usize = 4096;
/// Changelog records are produced in batches of about this many bytes.
const CHANGELOG_BATCH_BYTES: usize = 1 << 20;

/// Writes the frozen entries of `shard` to its store and produces them to its changelog;
/// returns the changelog's new end offset (or `None` when nothing was frozen). Every batch
/// that reaches the changelog moves the shard's [`written_end`](AnyShard::written_end), so a
/// commit that fails later (even in the middle of these batches) still has its records
/// committed by the next one. On failure the caller gives the frozen entries back
/// ([`AnyShard::restore`]).
pub(crate) async fn write_frozen(
    core: &AnyCore,
    shard: &Rc<dyn AnyShard>,
    frozen: &mut dyn FrozenSet,
) -> Result<Option<u64>, CommitFailure> {
    let mut end = None;
    let mut batch = BatchBuilder::with_capacity(64 * 1024);
    let mut store_batch = WriteBatch::new();
    loop {
        let left = frozen
            .encode(FREEZE_CHUNK, &mut batch, &mut store_batch, crate::util::now_ms())
            .map_err(CommitFailure::Table)?;
        crate::runtime::fault_point("commit:store")
            .map_err(|source| TableError::Store {
                table: shard.name().to_string(),
                partition: shard.partition(),
                source: faust_storage::Error::Io { op: "append to", path: "the shard's store".into(), source },
            })
            .and_then(|()| shard.write_store(&mut store_batch))
            .map_err(CommitFailure::Table)?;
        if (batch.encoded_len() >= CHANGELOG_BATCH_BYTES || left == 0) && !batch.is_empty() {
            let full = std::mem::replace(&mut batch, BatchBuilder::with_capacity(64 * 1024));
            let produced = match crate::runtime::fault_point("commit:changelog-write") {
                Ok(()) => core.produce(shard.changelog(), full).await,
                Err(e) => Err(crate::runtime::injected_produce_failure(shard.changelog(), full, e)),
            }
            .map_err(|source| CommitFailure::Changelog { tp: shard.changelog().clone(), source })?;
            end = Some(produced.last_offset + 1);
            shard.set_written_end(end);
            crate::runtime::crash_point("commit:changelog-batch");
        }
        if left == 0 {
            return Ok(end);
        }
        glommio::yield_if_needed().await;
    }
}

/// The least time between two commits of a core when `commit_every` brings them forward.
const COMMIT_EVERY_MIN_GAP: Duration = Duration::from_secs(1);

impl CoreRuntime {
    /// Commits, per partition, the lowest offset every agent may commit, once the sends
    /// buffered so far and the table state those events produced are durable (the protocol at
    /// the top of this file). Returns `false` when it had to wait: table state held writes
    /// of events acked out of order, past the committable offsets.
    ///
    /// A commit that fails part way undoes nothing that is durable and loses nothing that is
    /// not: entries whose changelog write failed are dirty again (the next commit writes their
    /// latest values), and changelog records that were written are committed by the next
    /// commit that succeeds (each shard keeps its [`written_end`](AnyShard::written_end)), even
    /// if nothing changed in it since. So a failed commit is simply retried, and the first
    /// one that succeeds commits the source offsets with exactly the state they produced.
    pub(crate) async fn commit_now(self: &Rc<Self>) -> Result<bool, FlushError> {
        let started = std::time::Instant::now();
        for sensor in self.sensors.iter() {
            sensor.on_commit_initiated(self.index);
        }
        let result = self.commit_once().await;
        for sensor in self.sensors.iter() {
            sensor.on_commit_completed(self.index, started.elapsed(), matches!(result, Ok(true)));
        }
        match &result {
            Ok(true) => {
                self.monitor.commit_done(started.elapsed());
                self.writes_succeeded()
            }
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
        let shards: Vec<Rc<dyn AnyShard>> = self.shards.borrow().iter().flatten().flatten().cloned().collect();
        // A worker the group dropped (it missed a rebalance deadline) must not write
        // changelog records its successor could later replay as committed: ask first (an
        // empty fenced commit checks membership and writes nothing). This narrows the window
        // to this commit's duration; closing it needs producer fencing. A core with nothing
        // to write (it holds no partition, or nothing changed) needs no membership to commit
        // nothing.
        let fence = self.fence.borrow().clone();
        let anything =
            !self.acks.borrow().is_empty() || shards.iter().any(|s| s.is_dirty() || s.written_end().is_some());
        if let Some(fence) = &fence
            && anything
        {
            self.transport.commit(&self.group, Some(fence), &[]).await?;
        }
        // Under exactly-once, nothing in flight from here until the transaction is closed
        // below (`txn.rs`): no await between the drain and the close.
        let drain = self.drain().await;
        if self.eos().is_some() && drain.is_none() {
            return Ok(false);
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
        // The transaction holding the sends of exactly these events; the fetches go on.
        let kafka_eos = self.eos().filter(|e| e.is_kafka());
        let txn = self.eos().filter(|e| !e.is_kafka()).and_then(|eos| eos.close());
        // On Kafka, the sends buffered so far are this transaction's; later ones wait behind
        // the gate until it has ended.
        let gate = kafka_eos.map(|eos| eos.close_gate());
        let sealed = gate.as_ref().map(|_| {
            self.pending_bytes.set(0);
            std::mem::take(&mut *self.pending.borrow_mut())
        });
        drop(drain);
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
            return Err(self.kafka_eos_failed(gate.is_some(), self.tables_failed(e)));
        }
        crate::runtime::crash_point("commit:changelog");
        // The offsets were read before the flush: every send made for the events they cover
        // was buffered by then, so it is in this flush (or an earlier one).
        if let Err(e) = self.flush_batches(sealed).await {
            return Err(self.kafka_eos_failed(gate.is_some(), e));
        }
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
        // With the offsets, in the same atomic commit: the transaction, now visible.
        offsets.extend(txn.map(|t| t.offsets_entry()));
        // On Kafka, the transaction ends here: its records and the offsets, together.
        if gate.is_some()
            && let Err(e) = self.transport.commit_transaction(&self.group, fence.as_ref(), &offsets).await
        {
            return Err(self.kafka_eos_failed(true, FlushError::Transport(e)));
        }
        if !offsets.is_empty() {
            let fence = self.fence.borrow().clone();
            crate::runtime::fault_point("commit:offsets").map_err(|source| faust_transport::Error::Io {
                op: "write (injected fault)",
                path: "the offsets file".into(),
                source,
            })?;
            if gate.is_none() {
                self.transport.commit(&self.group, fence.as_ref(), &offsets).await?;
            }
            let mut committed = self.committed.borrow_mut();
            for (tp, o) in offsets {
                committed.insert(tp, o);
            }
            if let (Some(eos), Some(t)) = (self.eos(), txn) {
                eos.committed(t);
            }
            // The changelogs may now be compacted up to their committed ends.
            for (shard, end) in &changelog_ends {
                self.transport.set_compaction_horizon(shard.changelog(), *end);
            }
        }
        drop(gate);
        crate::runtime::crash_point("commit:committed");
        // 4. Checkpoint the stores at what is now committed: a checkpoint never claims more.
        for (shard, end) in &changelog_ends {
            shard.set_written_end(None);
            let sources: Vec<(String, u32, u64)> = lowest
                .iter()
                .filter(|(tp, _)| tp.partition == shard.partition())
                .map(|(tp, o)| (tp.topic.to_string(), tp.partition, *o))
                .collect();
            let checkpointed = match crate::runtime::fault_point("commit:checkpoint") {
                Ok(()) => checkpoint(shard, *end, sources).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
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

    /// An exactly-once commit on Kafka that fails after its transaction took this commit's
    /// records stops the worker: the transaction is left to the coordinator to abort, and a
    /// restart resumes from the last committed one (what it held cannot be written again
    /// into a later transaction: its sends are gone from the buffer).
    fn kafka_eos_failed(&self, kafka: bool, error: FlushError) -> FlushError {
        if kafka {
            tracing::error!(core = self.index, error = %error,
                "an exactly-once commit failed: stopping the worker; a restart resumes from the last committed transaction");
            self.sends_lost.set(true);
            self.app_stop.stop();
        }
        error
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
}

/// Checkpoints `shard`'s store at `changelog_offset`. The state is taken on the core; the
/// file is replaced (a write and a rename, and `fsync`s under a durable policy) on a helper
/// thread, so the core goes on processing events meanwhile.
pub(crate) async fn checkpoint(
    shard: &Rc<dyn AnyShard>,
    changelog_offset: u64,
    sources: Vec<(String, u32, u64)>,
) -> Result<(), TableError> {
    let Some(pending) = shard.prepare_checkpoint(changelog_offset, sources)? else { return Ok(()) };
    let written = glommio::executor().spawn_blocking(move || pending.write().map(|()| pending)).await;
    match written {
        Ok(pending) => {
            shard.finish_checkpoint(pending);
            Ok(())
        }
        Err(source) => Err(TableError::Store { table: shard.name().to_string(), partition: shard.partition(), source }),
    }
}

/// The core's committer: commits every `commit_interval`, sooner once `commit_every` events
/// were acked, and every half second while writes fail (so the core resumes soon after they
/// succeed), until the worker stops.
pub(crate) async fn run_commits(runtime: Rc<CoreRuntime>) {
    let interval = runtime.settings().commit_interval;
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
            futures_lite::future::or(futures_lite::future::or(glommio::timer::sleep(wait), woken), runtime.stopped())
                .await;
        }
        // A commit syncs files (the offsets, on `local://`); back to back on a busy core they
        // would stall the disk that the core appends to. `commit_every` brings a commit
        // forward, but not closer than this to the previous one.
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
}
