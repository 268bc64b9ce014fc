//! `group_by`: re-keying a stream through a repartition topic, so that each key meets its
//! table shard on the core (and worker) that owns the key's partition.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::app::{App, Topic, TopicKind};
use crate::codec::Codec;

pub(crate) mod sealed {
    pub trait Sealed {}
}

/// What an agent consumes: a [`Topic`] (or channel), a topic re-keyed by
/// [`Topic::group_by`], or the topics matching a pattern
/// ([`App::topics_matching`](crate::App::topics_matching)). Implemented by those three only.
pub trait Source<K, V>: sealed::Sealed {
    /// Declares what `agent` of `app` needs to consume this source; returns the topic whose
    /// events it gets.
    #[doc(hidden)]
    fn consumed_by(&self, app: &App, agent: &str) -> Topic<K, V>;

    /// Records what else the agent registered at `agent` (its index) subscribes to, once it
    /// is registered.
    #[doc(hidden)]
    fn subscribe(&self, _app: &App, _agent: usize) {}
}

impl<K, V> sealed::Sealed for Topic<K, V> {}

impl<K, V> Source<K, V> for Topic<K, V> {
    fn consumed_by(&self, _app: &App, _agent: &str) -> Topic<K, V> {
        self.clone()
    }
}

/// Registers the agent that re-keys the source into the repartition topic.
type Register<K, V> = Arc<dyn Fn(&App, &str, &Topic<K, V>) + Send + Sync>;

/// A topic's events re-keyed by a function of their value (Faust's
/// `stream.group_by(key, name=...)`): give it to [`App::agent`] instead of the topic. See
/// [`Topic::group_by`].
pub struct GroupBy<K, V> {
    source: Arc<str>,
    name: String,
    value_codec: Codec,
    register: Register<K, V>,
}

impl<K, V> std::fmt::Debug for GroupBy<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupBy").field("source", &self.source).field("name", &self.name).finish()
    }
}

impl<K, V> sealed::Sealed for GroupBy<K, V> {}

impl<K: 'static, V: 'static> Source<K, V> for GroupBy<K, V> {
    fn consumed_by(&self, app: &App, agent: &str) -> Topic<K, V> {
        let topic = declare_repartition::<K, V>(app, agent, &self.source, &self.name, &self.value_codec);
        (self.register)(app, agent, &topic);
        topic
    }
}

/// Declares the repartition topic of `group_by` `name` of `source` for `agent` (named as
/// Faust names it, co-partitioned with `source`, keys in the app's key serializer) and its
/// positions table: the latest source position taken, per repartition partition and source
/// partition, committed with the repartition topic's offsets, so a record the re-keying sends
/// again after a crash is recognised and dropped (exact counts downstream).
fn declare_repartition<K, V>(
    app: &App,
    agent: &str,
    source: &Arc<str>,
    name: &str,
    value_codec: &Codec,
) -> Topic<K, V> {
    let topic_name = crate::runtime::upkeep::repartition_topic(&app.settings().id, agent, source, name);
    let key_codec = app.settings().key_serializer.clone();
    let topic = app.declare::<K, V>(&topic_name, key_codec, value_codec.clone(), TopicKind::Log);
    app.copartition_with(&topic_name, source);
    let positions = app
        .table::<u32, u64>(&format!("{agent}-{source}-{name}-positions"))
        .with_codecs(Codec::JSON, Codec::JSON)
        .with_partitions_like(Arc::from(topic_name.as_str()));
    let _ = topic.inner.positions.set(positions);
    topic
}

impl<K, V> Topic<K, V>
where
    K: DeserializeOwned + 'static,
    V: DeserializeOwned + 'static,
{
    /// This topic's events re-keyed by `key_fn` of their value (Faust's
    /// `stream.group_by(Order.account_id)`): an agent given the result gets each event on the
    /// core that owns its new key's partition, so its table writes for that key go to the
    /// shard there — also when that core belongs to another worker.
    ///
    /// The events travel through the repartition topic
    /// `{app}-{agent}-{topic}-{name}-repartition`, created with this topic's partition
    /// count (so it is co-partitioned with it and with the tables of the same count), value
    /// bytes and headers as read (not re-encoded), the event's timestamp kept, the new key
    /// encoded with the app's key serializer. Offsets of this topic are committed only once the
    /// re-keyed records are durable. Declared with the agent, the worker consumes the
    /// repartition topic from its start; [`Stream::group_by`](crate::Stream::group_by) does
    /// the same inside the agent's body, at the cost of one restart of the worker's run the
    /// first time.
    ///
    /// ```
    /// use faust::{App, Settings};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Order { account_id: String, amount: u32 }
    ///
    /// let app = App::new(Settings::new("shop"));
    /// let orders = app.topic::<String, Order>("orders");
    /// let counts = app.table::<String, u64>("order_count").with_default(|| 0);
    /// let by_account = orders.group_by(|o: &Order| o.account_id.clone(), "account_id");
    /// let table = counts.clone();
    /// app.agent("count", &by_account, move |mut orders| {
    ///     let counts = table.clone();
    ///     async move {
    ///         while let Some(order) = orders.next().await {
    ///             counts.update(&order.account_id, |n| *n += 1)?;
    ///         }
    ///         Ok(())
    ///     }
    /// });
    /// let test = app.test_context()?;
    /// for account in ["a", "b", "a"] {
    ///     // Keyed by order, not by account: group_by moves each to its account's partition.
    ///     test.put(&orders, Some(&format!("order-{account}")), &Order { account_id: account.into(), amount: 1 })?;
    /// }
    /// let table = test.table(&counts)?;
    /// assert_eq!((table["a"], table["b"]), (2, 1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn group_by<K2, F>(&self, key_fn: F, name: &str) -> GroupBy<K2, V>
    where
        K2: Serialize + 'static,
        F: Fn(&V) -> K2 + Send + Sync + 'static,
    {
        let source = self.clone();
        let key_fn = Arc::new(key_fn);
        let group = name.to_string();
        let register: Register<K2, V> = Arc::new(move |app: &App, agent: &str, target: &Topic<K2, V>| {
            let (key_fn, target) = (key_fn.clone(), target.clone());
            app.agent_on(&format!("{agent}:group_by:{group}"), &source, false, move |mut stream| {
                let (key_fn, target) = (key_fn.clone(), target.clone());
                async move {
                    // The source's key is never used: not decoded.
                    while let Some(event) = stream.next_event_keyless().await {
                        event.forward_keyed_soon(&target, &key_fn(&event.value))?;
                    }
                    Ok(())
                }
            });
        });
        GroupBy {
            source: self.inner.name.clone(),
            name: name.to_string(),
            value_codec: self.inner.value_codec.clone(),
            register,
        }
    }
}

/// What re-routes the stream of one agent inside its body ([`Stream::group_by`],
/// [`Stream::through`]): declares what the worker must consume for it and restarts the run
/// that does not yet.
///
/// [`Stream::group_by`]: crate::Stream::group_by
/// [`Stream::through`]: crate::Stream::through
pub(crate) struct AgentRoutes {
    /// The app (not kept alive by its agents' streams).
    pub(crate) app: std::sync::Weak<crate::app::AppInner>,
    /// The agent's name and topic, which name its repartition topics.
    pub(crate) agent: Arc<str>,
    pub(crate) source: Arc<str>,
    pub(crate) value_codec: Codec,
}

impl AgentRoutes {
    /// Subscribes agent `index` to `topic` from the next run on, and ends this run for it.
    /// A topic the agent was subscribed to already but that this run does not route to it
    /// (a channel) is an error: restarting again would not help.
    fn subscribe(&self, app: &App, agents: &mut [crate::app::AgentSpec], index: usize, topic: &Arc<str>) {
        let Some(spec) = agents.get_mut(index) else { return };
        if spec.also.contains(topic) || spec.topic == *topic {
            tracing::error!(agent = %self.agent, %topic, "the agent's stream is routed to a topic the worker cannot consume for it (a channel?); it hands out nothing");
            return;
        }
        spec.also.push(topic.clone());
        tracing::info!(agent = %self.agent, %topic,
            "the agent's stream is routed to a new topic: the worker restarts its run to subscribe to it");
        app.inner.stop.restart();
    }
}

impl crate::stream::reroute::Reroute for AgentRoutes {
    fn group_by(
        &self,
        core: &crate::runtime::CoreRuntime,
        agent: usize,
        name: &str,
    ) -> Option<crate::stream::reroute::Repartition> {
        let app = App { inner: self.app.upgrade()? };
        let topic_name: Arc<str> =
            crate::runtime::upkeep::repartition_topic(&app.settings().id, &self.agent, &self.source, name).into();
        // Under the agents' lock: cores of this worker meeting the same group_by at once
        // declare it once.
        let agents = app.inner.agents.clone();
        let mut agents = crate::util::lock(&agents);
        let known = app.inner.outbox.topics().into_iter().find(|t| t.name == topic_name && t.positions.get().is_some());
        let topic = match known {
            Some(topic) => topic,
            None => declare_repartition::<(), ()>(&app, &self.agent, &self.source, name, &self.value_codec).inner,
        };
        if core.routes_to(&topic_name, agent) {
            let positions = topic.positions.get()?.clone();
            return Some(crate::stream::reroute::Repartition { topic, positions });
        }
        self.subscribe(&app, &mut agents, agent, &topic_name);
        None
    }

    fn through(&self, core: &crate::runtime::CoreRuntime, agent: usize, topic: &Arc<str>) -> bool {
        if core.routes_to(topic, agent) {
            return true;
        }
        let Some(inner) = self.app.upgrade() else { return false };
        let app = App { inner };
        let agents = app.inner.agents.clone();
        self.subscribe(&app, &mut crate::util::lock(&agents), agent, topic);
        false
    }
}
