//! Upkeep: what keeps the disk bounded. Every commit interval (at most [`UPKEEP_INTERVAL`]),
//! each core compacts the stores of its table shards (once a store's superseded records pass
//! its threshold), deletes what it committed past in the app's repartition topics, and asks
//! the transport to keep the logs it owns in shape (on `local://`: topics held to their
//! retention, changelogs compacted below their committed ends — see
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
        runtime.sample_rates();
        if let Err(e) = runtime.upkeep().await
            && let Some(repeats) = failures.allow()
        {
            // Nothing is lost: the files only stay larger until a later round succeeds.
            tracing::warn!(core = runtime.index, error = %e, repeats, "upkeep (compaction, retention) failed; retried");
        }
    }
}

/// The name of the repartition topic of `group_by` `name` of `source`, consumed by `agent`
/// of app `app_id`.
pub(crate) fn repartition_topic(app_id: &str, agent: &str, source: &str, name: &str) -> String {
    format!("{app_id}-{agent}-{source}-{name}{REPARTITION_SUFFIX}")
}

const REPARTITION_SUFFIX: &str = "-repartition";

/// Whether `topic` is one of app `app_id`'s repartition topics: internal, read only by the
/// app's own agents, so that what they committed past can go.
fn is_repartition_topic(app_id: &str, topic: &str) -> bool {
    topic.len() > app_id.len() + 1
        && topic.starts_with(app_id)
        && topic.as_bytes()[app_id.len()] == b'-'
        && topic.ends_with(REPARTITION_SUFFIX)
}

impl CoreRuntime {
    /// One round of upkeep: the repartition topics lose what this core committed past (as
    /// Kafka Streams purges them), then every shard's store and the transport's logs are
    /// compacted in steps until nothing is left to do (or the worker stops).
    pub(crate) async fn upkeep(&self) -> Result<(), String> {
        let mut first_error = None;
        let app_id = self.settings().id.clone();
        let purgeable: Vec<(faust_transport::TopicPartition, u64)> = self
            .committed
            .borrow()
            .iter()
            .filter(|(tp, _)| is_repartition_topic(&app_id, &tp.topic))
            .map(|(tp, offset)| (tp.clone(), *offset))
            .collect();
        for (tp, offset) in purgeable {
            match self.transport.delete_records_below(&tp, offset) {
                // Another core owns the log (it purges it after its own commits).
                Ok(_) | Err(faust_transport::Error::NotOwner { .. }) => {}
                Err(e) => {
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        let shards: Vec<Rc<dyn AnyShard>> = self.shards.borrow().iter().flatten().flatten().cloned().collect();
        for shard in shards {
            let compacted = self.in_steps(|| shard.compact_store(UPKEEP_STEP_BYTES).map_err(|e| e.to_string())).await;
            if let Err(e) = compacted {
                first_error.get_or_insert(e);
            }
        }
        // After an error the transport moves on to its next log at the next call.
        let maintained = self.in_steps(|| self.transport.maintain(UPKEEP_STEP_BYTES).map_err(|e| e.to_string())).await;
        if let Err(e) = maintained {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Calls `step` until it says nothing more is waiting, it fails, or the worker stops,
    /// letting the core's other tasks run between steps.
    async fn in_steps(&self, mut step: impl FnMut() -> Result<bool, String>) -> Result<(), String> {
        while !self.stopping.is_cancelled() && step()? {
            futures_lite::future::yield_now().await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repartition_topics_are_told_by_name() {
        let name = repartition_topic("orders", "count", "orders", "account_id");
        assert_eq!(name, "orders-count-orders-account_id-repartition");
        assert!(is_repartition_topic("orders", &name));
        assert!(!is_repartition_topic("order", &name), "another app's prefix");
        assert!(!is_repartition_topic("orders", "orders"));
        assert!(!is_repartition_topic("orders", "orders-count-changelog"));
        assert!(!is_repartition_topic("orders", "-repartition"));
    }
}
