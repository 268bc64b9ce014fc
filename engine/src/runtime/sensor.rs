//! Sensors (Faust's `Sensor`): hooks the engine calls as events, table operations, commits,
//! sends, rebalances and recoveries happen, for an app's own monitoring. With no sensor
//! added, a hook costs one check of an empty list.

use std::sync::Arc;
use std::time::Duration;

use faust_transport::TopicPartition;

/// What an app watches (Faust's `faust.Sensor`). Every hook has a default that does nothing;
/// implement those you need. Hooks run on the thread where the thing happens — a core's, for
/// events, tables, commits and sends; the control thread, for rebalances — so they must be
/// quick: count, don't block.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// use faust::{App, Sensor, Settings, TopicPartition};
///
/// #[derive(Default)]
/// struct Counting {
///     events_in: AtomicU64,
/// }
///
/// impl Sensor for Counting {
///     fn on_message_in(&self, _tp: &TopicPartition, _offset: u64) {
///         self.events_in.fetch_add(1, Ordering::Relaxed);
///     }
/// }
///
/// let app = App::new(Settings::new("watched"));
/// let counting = Arc::new(Counting::default());
/// app.sensor(counting.clone());
/// ```
#[allow(unused_variables)] // The defaults ignore their arguments.
pub trait Sensor: Send + Sync + 'static {
    /// A record of `tp` at `offset` was fetched and queued for the agents.
    fn on_message_in(&self, tp: &TopicPartition, offset: u64) {}
    /// An agent finished (acked) the event of `tp` at `offset`.
    fn on_stream_event_out(&self, tp: &TopicPartition, offset: u64) {}
    /// A key of `table` was read by an agent.
    fn on_table_get(&self, table: &str) {}
    /// A key of `table` was written (set, updated or deleted) by an agent.
    fn on_table_set(&self, table: &str) {}
    /// Core `core` starts a commit.
    fn on_commit_initiated(&self, core: usize) {}
    /// Core `core`'s commit ended after `took`: `committed` unless it failed or had to wait.
    fn on_commit_completed(&self, core: usize, took: Duration, committed: bool) {}
    /// `records` buffered sends to `tp` were written (acknowledged by the log).
    fn on_send_completed(&self, tp: &TopicPartition, records: usize) {}
    /// Writing buffered sends to `tp` failed (they are retried).
    fn on_send_error(&self, tp: &TopicPartition, error: &str) {}
    /// The worker starts applying an assignment change of `generation`.
    fn on_rebalance_start(&self, generation: u64) {}
    /// The worker applied it, in `took`.
    fn on_rebalance_end(&self, generation: u64, took: Duration) {}
    /// Recovery of `table`'s `partition`: `done` of `total` changelog records replayed.
    fn on_recovery_progress(&self, table: &str, partition: u32, done: u64, total: u64) {}
}

/// The app's sensors, as the cores and the control thread hold them.
pub(crate) type Sensors = Arc<[Arc<dyn Sensor>]>;
