//! Upkeep: what keeps the disk bounded. Every commit interval (at most [`UPKEEP_INTERVAL`]),
//! each core compacts the stores of its table shards (once a store's superseded records pass
//! its threshold) and asks the transport to keep the logs it owns in shape (on `local://`:
//! topics held to their retention, changelogs compacted below their committed ends — see
//! [`LocalCore::maintain`](faust_transport::LocalCore::maintain)). The work goes in steps of
//! about [`UPKEEP_STEP_BYTES`], and the core serves its other tasks between steps, so events
//! wait at most one step.

use std::rc::Rc;
use std::time::Duration;

use crate::runtime::CoreRuntime;
use crate::runtime::sends::LogLimiter;
use crate::runtime::state::AnyShard;

/// How often, at most, a core looks for upkeep to do (more often when commits are: each
/// commit moves the changelogs' compaction horizons and checkpoints the stores).
pub(crate) const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);
/// About this many bytes are read or written per step.
const UPKEEP_STEP_BYTES: usize = 1 << 20;

/// The core's upkeep, until the worker stops.
pub(crate) async fn run_upkeep(runtime: Rc<CoreRuntime>) {
    let failures = LogLimiter::default();
    let interval = runtime.settings().commit_interval.min(UPKEEP_INTERVAL);
    while !runtime.stopping.is_cancelled() {
        futures_lite::future::or(glommio::timer::sleep(interval), runtime.stopped()).await;
        if let Err(e) = runtime.upkeep().await
            && let Some(repeats) = failures.allow()
        {
            // Nothing is lost: the files only stay larger until a later round succeeds.
            tracing::warn!(core = runtime.index, error = %e, repeats, "upkeep (compaction, retention) failed; retried");
        }
    }
}

impl CoreRuntime {
    /// One round of upkeep: every shard's store, then the transport's logs, each until it
    /// has nothing more to do (or the worker stops).
    pub(crate) async fn upkeep(&self) -> Result<(), String> {
        let shards: Vec<Rc<dyn AnyShard>> = self.shards.borrow().iter().flatten().flatten().cloned().collect();
        let mut first_error = None;
        for shard in shards {
            while !self.stopping.is_cancelled() {
                match shard.compact_store(UPKEEP_STEP_BYTES) {
                    Ok(true) => futures_lite::future::yield_now().await,
                    Ok(false) => break,
                    Err(e) => {
                        first_error.get_or_insert(e.to_string());
                        break;
                    }
                }
            }
        }
        while !self.stopping.is_cancelled() {
            match self.transport.maintain(UPKEEP_STEP_BYTES) {
                Ok(true) => futures_lite::future::yield_now().await,
                Ok(false) => break,
                // The transport moves on to its next log at the next call.
                Err(e) => {
                    first_error.get_or_insert(e.to_string());
                    break;
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
