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
        if let Some(spec) = lock(&self.app.agents).get_mut(self.index) {
            spec.concurrency = n.max(1);
        }
        self
    }

    /// The topic (or channel) the agent consumes.
    pub fn topic(&self) -> &Topic<K, V> {
        &self.topic
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
