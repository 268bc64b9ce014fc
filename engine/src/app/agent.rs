//! The handle of a registered agent.

use std::sync::Arc;

use faust_transport::Produced;
use serde::Serialize;

use crate::app::AppInner;
use crate::error::SendError;
use crate::topic::Topic;
use crate::util::lock;

/// A registered agent: sends to it, and its settings.
pub struct Agent<K, V> {
    pub(super) app: Arc<AppInner>,
    pub(super) index: usize,
    pub(super) topic: Topic<K, V>,
}

impl<K, V> Clone for Agent<K, V> {
    fn clone(&self) -> Self {
        Agent { app: self.app.clone(), index: self.index, topic: self.topic.clone() }
    }
}

impl<K, V> std::fmt::Debug for Agent<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("index", &self.index).field("topic", &self.topic.inner.name).finish()
    }
}

impl<K, V> Agent<K, V> {
    /// Runs `n` instances of the agent on every core (Faust's `concurrency`), taking events
    /// from the same per-core queue: events of one partition may then finish out of order,
    /// and an offset is committed only once every event below it is done. Set it before
    /// the worker starts.
    pub fn concurrency(self, n: usize) -> Self {
        if let Some(spec) = lock(&self.app.agents).get_mut(self.index)
            && !spec.isolated
        {
            spec.concurrency = n.max(1);
        }
        self
    }

    /// Runs one instance of the agent per partition (Faust's `isolated_partitions=True`):
    /// each gets the events of its partition alone, starts when the worker takes the
    /// partition and ends (its stream returns `None`) when the worker releases it, after the
    /// events it was given are done — state kept in the agent's body is per partition, and
    /// never sees another partition's events. Instead of [`concurrency`](Agent::concurrency).
    /// Set it before the worker starts.
    ///
    /// ```
    /// use faust::{App, Settings};
    ///
    /// let app = App::new(Settings::new("meters"));
    /// let readings = app.topic::<String, u64>("readings");
    /// app.agent("running_total", &readings, |mut stream| async move {
    ///     // One total per partition: the actor never sees another partition's readings.
    ///     let mut total = 0;
    ///     while let Some(reading) = stream.next().await {
    ///         total += reading;
    ///         println!("partition {:?}: {total}", faust::current_event().map(|e| e.partition));
    ///     }
    ///     Ok(())
    /// })
    /// .isolated_partitions();
    /// ```
    pub fn isolated_partitions(self) -> Self {
        if let Some(spec) = lock(&self.app.agents).get_mut(self.index) {
            spec.isolated = true;
            spec.concurrency = 1;
        }
        self
    }

    /// The topic (or channel) the agent consumes.
    pub fn topic(&self) -> &Topic<K, V> {
        &self.topic
    }

    /// What happens when the agent fails on an event (Faust's `supervisor_strategy`): see
    /// [`Supervisor`](crate::Supervisor). Set it before the worker starts.
    ///
    /// ```
    /// use faust::{App, Settings, Supervisor};
    ///
    /// let app = App::new(Settings::new("strict"));
    /// let payments = app.topic::<String, u64>("payments");
    /// // A failure is a bug to fix, not an event to skip: stop, leaving it uncommitted.
    /// app.agent("pay", &payments, |mut stream| async move {
    ///     while let Some(cents) = stream.next().await {
    ///         if cents == 0 {
    ///             return Err("a payment of nothing".into());
    ///         }
    ///     }
    ///     Ok(())
    /// })
    /// .supervisor(Supervisor::Crash);
    /// ```
    pub fn supervisor(self, strategy: crate::Supervisor) -> Self {
        self.with_supervision(|s| s.strategy = strategy);
        self
    }

    /// Calls `f` each time the agent fails (an error or a panic), on the core where it
    /// failed, before the supervisor restarts it, skips the event or stops the worker.
    pub fn on_error(self, f: impl Fn(&crate::AgentFailure) + Send + Sync + 'static) -> Self {
        let f: crate::runtime::supervise::OnError = Arc::new(f);
        self.with_supervision(|s| s.on_error = Some(f.clone()));
        self
    }

    fn with_supervision(&self, change: impl Fn(&mut crate::runtime::supervise::SupervisorOptions)) {
        if let Some(supervision) = lock(&self.app.agents).get(self.index).and_then(|a| a.supervision.clone()) {
            change(&mut lock(&supervision));
        }
    }
}

impl<K: Serialize + 'static, V: Serialize + 'static> Agent<K, V> {
    /// Sends a record to the agent's topic and waits until it is durable (Faust's
    /// `agent.send`). For an agent on a [`Topic::group_by`], that is the repartition topic:
    /// `key` is then the grouping key.
    pub async fn send(&self, key: Option<&K>, value: &V) -> Result<Produced, SendError> {
        self.topic.send(key, value).await
    }

    /// Sends a record to the agent's topic without waiting (Faust's `agent.cast`); see
    /// [`Topic::send_soon`].
    pub fn cast(&self, key: Option<&K>, value: &V) -> Result<(), SendError> {
        self.topic.send_soon(key, value)
    }
}
