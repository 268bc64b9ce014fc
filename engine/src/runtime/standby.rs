//! Standby replicas: table partitions another worker owns, followed here so that taking one
//! over replays only the changelog records the standby had not read yet.
//!
//! The group's leader names, for each changelog partition, up to `table_standby_replicas`
//! workers other than its owner (first those that hold its state already). On each of those
//! workers a core keeps the partition's shard open — its store under the data directory, as
//! the owner would have it — and a background task brings it up to the *committed*
//! changelog offset every [`POLL`]: never further, so a standby never holds writes of a
//! commit that did not finish (those the next owner neutralizes), and its checkpoint, like an
//! owner's, never claims more than what was committed. When the partition is assigned to this
//! worker, the take promotes the standby's shard: recovery replays from where the standby
//! stands to the committed offset — the tail written since its last pass.
//!
//! A standby shard is never reachable from stream processing. A revoked partition's
//! suspended shard that becomes a standby is closed and its store opened again (so no cache
//! of the active shard outlives it); the standby starts from the store's checkpoint.

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use faust_transport::TopicPartition;

use crate::runtime::CoreRuntime;
use crate::runtime::sends::LogLimiter;
use crate::runtime::state::AnyShard;

/// How often standbys are brought up to the committed changelog offsets.
pub(crate) const POLL: Duration = Duration::from_millis(250);
/// Bytes asked for per fetch while catching up.
const FETCH_BYTES: usize = 4 << 20;

impl CoreRuntime {
    /// Makes `partitions` (changelog partitions) this core's standbys: drops the others,
    /// opens the new ones (or takes over their suspended shards).
    pub(crate) async fn set_standbys(&self, partitions: &[TopicPartition]) -> Result<(), String> {
        let Ok(_permit) = self.standby_lock.acquire_permit(1).await else { return Ok(()) };
        let wanted: HashSet<&TopicPartition> = partitions.iter().collect();
        self.standbys.borrow_mut().retain(|tp, _| wanted.contains(tp));
        for tp in partitions {
            if self.standbys.borrow().contains_key(tp) {
                continue;
            }
            let Some(table) = self.changelog_tables.get(&tp.topic).copied() else { continue };
            // A suspended shard of the partition is closed first: its cache holds values a
            // standby's replay (which writes the store) would leave stale. Its store, on disk
            // at its last checkpoint, is where the standby starts.
            drop(self.suspended.borrow_mut().remove(tp));
            let shard = self.open_store(table, tp.partition)?;
            self.standbys.borrow_mut().insert(tp.clone(), shard);
        }
        Ok(())
    }

    /// The standby shard of `tp`, taken out of the standbys (to be promoted), if this core
    /// follows it.
    pub(crate) async fn take_standby(&self, tp: &TopicPartition) -> Option<Rc<dyn AnyShard>> {
        let _permit = self.standby_lock.acquire_permit(1).await.ok()?;
        self.standbys.borrow_mut().remove(tp)
    }

    /// Drops the standby shard of `tp`, if any (it is followed or owned elsewhere now).
    pub(crate) async fn close_standby(&self, tp: &TopicPartition) -> bool {
        self.take_standby(tp).await.is_some()
    }

    /// One pass: every standby up to its committed changelog offset. Returns the records
    /// replayed.
    async fn catch_up(&self) -> Result<u64, String> {
        let Ok(_permit) = self.standby_lock.acquire_permit(1).await else { return Ok(0) };
        let tps: Vec<TopicPartition> = self.standbys.borrow().keys().cloned().collect();
        if tps.is_empty() {
            return Ok(0);
        }
        let committed = self
            .transport
            .committed(&self.group, &tps)
            .await
            .map_err(|e| format!("reading the committed offsets of the standbys: {e}"))?;
        let mut replayed = 0;
        for (tp, committed) in tps.iter().zip(committed) {
            let Some(shard) = self.standbys.borrow().get(tp).cloned() else { continue };
            replayed += self.catch_up_one(&shard, committed.unwrap_or(0)).await?;
        }
        Ok(replayed)
    }

    /// Replays `shard`'s changelog from where it stands to `committed`, then checkpoints.
    async fn catch_up_one(&self, shard: &Rc<dyn AnyShard>, committed: u64) -> Result<u64, String> {
        let tp = shard.changelog().clone();
        let mut from = shard.checkpointed_changelog();
        if committed < from {
            // The committed offset went back (the changelog was rebuilt, offsets reset by
            // hand): start over, as recovery does.
            tracing::warn!(core = self.index, changelog = %tp, standby_at = from, committed,
                "a standby is ahead of the committed changelog offset; rebuilding it");
            shard.clear().map_err(|e| e.to_string())?;
            from = 0;
            shard.advance_to(0);
        }
        let mut next = from;
        while next < committed {
            let fetched = self
                .transport
                .fetch(&tp, next, FETCH_BYTES, Duration::ZERO)
                .await
                .map_err(|e| format!("following {tp} as a standby: {e}"))?;
            if fetched.next_offset <= next {
                break; // Not there yet (a broker answering short): the next pass goes on.
            }
            shard.replay(&fetched.records, committed).map_err(|e| e.to_string())?;
            next = fetched.next_offset.min(committed);
            glommio::yield_if_needed().await;
        }
        if next == from {
            return Ok(0);
        }
        crate::runtime::commit::checkpoint(shard, next, Vec::new()).await.map_err(|e| e.to_string())?;
        shard.advance_to(next);
        shard.evict();
        self.stats.standby_records_applied.fetch_add(next - from, Ordering::Relaxed);
        Ok(next - from)
    }
}

/// The core's standby follower: a catch-up pass every [`POLL`] until the worker stops.
/// Failures (a broker away) are logged, rate-limited, and retried at the next pass.
pub(crate) async fn run_standbys(runtime: Rc<CoreRuntime>) {
    let failures = LogLimiter::default();
    while !runtime.stopping.is_cancelled() {
        futures_lite::future::or(glommio::timer::sleep(POLL), runtime.stopped()).await;
        if runtime.stopping.is_cancelled() {
            break;
        }
        if let Err(e) = runtime.catch_up().await
            && let Some(repeats) = failures.allow()
        {
            tracing::warn!(core = runtime.index, error = %e, repeats, "a standby could not catch up; retrying");
        }
    }
}
