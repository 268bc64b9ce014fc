//! Re-routing a stream inside its agent: Faust's `stream.group_by(key)` and
//! `stream.through(topic)`.
//!
//! Both send each event of the agent's stream to another topic and go on with that topic's
//! events, as Faust's do: the agent reads its source, forwards what gets through its
//! processors (`filter`, `map`...), and is handed the other topic's events on the core that
//! owns their partition. A worker consumes a topic only once it subscribed to it when it
//! joined its group; so the first time an agent re-routes to a topic its run does not
//! consume, the app subscribes the agent to it and the worker restarts its run (Faust
//! rebalances for the same reason). Until then the new stream hands out nothing and the
//! source's events stay unacked, so nothing is lost: the next run processes them.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::Codec;
use crate::runtime::CoreRuntime;
use crate::runtime::bad_record::RecordPart;
use crate::runtime::queue::{QueuedEvent, Scope};
use crate::runtime::state::same_topic;
use crate::stream::{Rejected, Stage, Stream};
use crate::topic::{Topic, TopicInner};

/// What the agent's app does when its stream is re-routed.
pub(crate) trait Reroute: Send + Sync {
    /// The repartition topic of the agent's `group_by(.., name)` and the table of source
    /// positions that drops re-sent records, when this run of the worker routes the topic's
    /// events to the agent. Otherwise it subscribes the agent to the topic (declared now)
    /// and restarts the worker's run, and returns `None`.
    fn group_by(&self, core: &CoreRuntime, agent: usize, name: &str) -> Option<Repartition>;

    /// Whether this run routes `topic`'s events to the agent; otherwise it subscribes the
    /// agent to `topic`, restarts the worker's run, and returns `false`.
    fn through(&self, core: &CoreRuntime, agent: usize, topic: &Arc<str>) -> bool;
}

/// A repartition topic as a re-routed stream uses it.
pub(crate) struct Repartition {
    pub(crate) topic: Arc<TopicInner>,
    pub(crate) positions: crate::Table<u32, u64>,
}

impl<K: 'static, V: 'static> Stream<K, V> {
    /// Makes `reroute` what re-routes this agent's stream.
    pub(crate) fn rerouted_by(mut self, reroute: Arc<dyn Reroute>) -> Self {
        self.reroute = Some(reroute);
        self
    }

    /// The same stream handing out nothing: the worker restarts its run, and the events in
    /// the queue are left for the next one.
    fn parked<K2, V2>(self) -> Stream<K2, V2> {
        let mut parked = self.then(|_, _| Ok(None));
        parked.scope = Scope::Nothing;
        parked
    }

    /// The stream with `stage` in front of everything: it sees each record first, and is
    /// given the stream's processors for the records it passes on to them.
    fn routed<K2, V2>(
        self,
        positions: Option<crate::Table<u32, u64>>,
        stage: impl Fn(&QueuedEvent, &Stage<K, V>) -> Result<Option<(Option<K2>, V2)>, Rejected> + 'static,
    ) -> Stream<K2, V2> {
        // Forwarding is an effect: event by event, in order (no decoding ahead).
        self.restaged(positions, false, |previous| Box::new(move |queued: &QueuedEvent| stage(queued, &previous)))
    }
}

/// A key or value of a re-routed topic's record, decoded.
fn decode<T: DeserializeOwned>(codec: &Codec, bytes: &bytes::Bytes, part: RecordPart) -> Result<T, Rejected> {
    codec.decode_bytes(bytes).map_err(|e| Rejected::Bad(part, e.to_string()))
}

/// A record of the re-routed topic `topic`, decoded with its codecs (its key only when the
/// stream decodes keys); a null value is a bad record.
fn decode_record<K: DeserializeOwned, V: DeserializeOwned>(
    topic: &TopicInner,
    queued: &QueuedEvent,
    keys: bool,
) -> Result<(Option<K>, V), Rejected> {
    let key = match &queued.record.key {
        Some(k) if keys => Some(decode(&topic.key_codec, k, RecordPart::Key)?),
        _ => None,
    };
    let Some(value) = &queued.record.value else {
        return Err(Rejected::Bad(RecordPart::Value, "null".into()));
    };
    Ok((key, decode(&topic.value_codec, value, RecordPart::Value)?))
}

impl<K: 'static, V: Serialize + DeserializeOwned + 'static> Stream<K, V> {
    /// The stream re-keyed by `key_fn` of each value (Faust's `stream.group_by(key,
    /// name=...)`): each event goes through the repartition topic
    /// `{app}-{agent}-{topic}-{name}-repartition` (as many partitions as the agent's topic)
    /// to the core, and the worker, that owns its new key's partition, where the returned
    /// stream hands it out — so table writes for that key go to the shard there. Processors
    /// before it (`filter`, `map`) run before the re-keying; the value is encoded with the
    /// topic's value codec and the key with the app's key serializer, the event's timestamp
    /// and headers kept. A record the re-keying sends again after a crash is dropped, so
    /// counts downstream stay exact.
    ///
    /// The first run of a worker that meets a new `group_by` subscribes to the repartition
    /// topic and starts its run again (a rebalance in Faust); events are not lost or
    /// doubled by it. [`Topic::group_by`] declares the same with the agent, which saves that
    /// restart.
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
    /// let table = counts.clone();
    /// app.agent("count", &orders, move |stream| {
    ///     let counts = table.clone();
    ///     let mut by_account = stream.filter(|o| o.amount > 0).group_by(|o: &Order| o.account_id.clone(), "account_id");
    ///     async move {
    ///         while let Some(order) = by_account.next().await {
    ///             counts.update(&order.account_id, |n| *n += 1)?;
    ///         }
    ///         Ok(())
    ///     }
    /// });
    /// let test = app.test_context()?;
    /// for account in ["a", "b", "a"] {
    ///     test.put(&orders, Some(&format!("order-{account}")), &Order { account_id: account.into(), amount: 1 })?;
    /// }
    /// let table = test.table(&counts)?;
    /// assert_eq!((table["a"], table["b"]), (2, 1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn group_by<K2, F>(self, key_fn: F, name: &str) -> Stream<K2, V>
    where
        K2: Serialize + DeserializeOwned + 'static,
        F: Fn(&V) -> K2 + 'static,
    {
        self.regroup(move |v| Ok(key_fn(v)), name)
    }

    /// [`group_by`](Stream::group_by) on a field of the value, by its serde name, with the
    /// name Faust derives for `group_by(Model.field)`: `{Type}.{field}` (the value type's
    /// name without its path). A value without the field (or one of another type) is logged,
    /// counted and skipped.
    ///
    /// ```no_run
    /// # use faust::{App, Settings};
    /// # use serde::{Deserialize, Serialize};
    /// #[derive(Serialize, Deserialize)]
    /// struct Withdrawal { account: String, amount: f64 }
    ///
    /// # let app = App::new(Settings::new("bank"));
    /// let withdrawals = app.topic::<String, Withdrawal>("withdrawals");
    /// // Repartition topic: bank-large-withdrawals-Withdrawal.account-repartition
    /// app.agent("large", &withdrawals, |stream| {
    ///     let mut by_account = stream.group_by_field::<String>("account");
    ///     async move {
    ///         while let Some(w) = by_account.next().await {
    ///             println!("{} withdrew {}", w.account, w.amount);
    ///         }
    ///         Ok(())
    ///     }
    /// });
    /// ```
    pub fn group_by_field<K2>(self, field: &str) -> Stream<K2, V>
    where
        K2: Serialize + DeserializeOwned + 'static,
    {
        let type_name = std::any::type_name::<V>();
        let short = type_name.split('<').next().unwrap_or(type_name).rsplit("::").next().unwrap_or(type_name);
        let name = format!("{short}.{field}");
        let field = field.to_string();
        self.regroup(
            move |value| {
                let mut fields = serde_json::to_value(value).map_err(|e| e.to_string())?;
                let key =
                    fields.get_mut(&field).map(serde_json::Value::take).ok_or_else(|| format!("no field `{field}`"))?;
                serde_json::from_value(key).map_err(|e| format!("field `{field}`: {e}"))
            },
            &name,
        )
    }

    fn regroup<K2>(self, key_fn: impl Fn(&V) -> Result<K2, String> + 'static, name: &str) -> Stream<K2, V>
    where
        K2: Serialize + DeserializeOwned + 'static,
    {
        let Some(reroute) = self.reroute.clone() else {
            tracing::error!(name, "group_by on a stream that is not an agent's: it hands out nothing");
            return self.parked();
        };
        let Some(Repartition { topic, positions }) = reroute.group_by(&self.core, self.agent, name) else {
            return self.parked();
        };
        let target: Topic<K2, V> = Topic::of_inner(topic.clone());
        let (core, keys) = (self.core.clone(), self.keys.clone());
        let mut value_bytes = Vec::new();
        let value_bytes = std::cell::RefCell::new(std::mem::take(&mut value_bytes));
        self.routed(Some(positions), move |queued, previous| {
            if same_topic(&queued.tp.topic, &topic.name) {
                return decode_record(&topic, queued, keys.get()).map(Some);
            }
            let Some((_, value)) = previous(queued)? else { return Ok(None) };
            let key = key_fn(&value).map_err(Rejected::Failed)?;
            let mut bytes = value_bytes.borrow_mut();
            bytes.clear();
            topic.value_codec.encode(&value, &mut bytes).map_err(|e| Rejected::Failed(e.to_string()))?;
            crate::stream::repartition::with_position(
                &queued.record,
                queued.tp.partition,
                queued.record.offset,
                |headers| target.send_soon_keyed_raw(&core, Some(queued.record.timestamp), &key, &bytes, headers),
            )
            .map_err(|e| Rejected::Failed(e.to_string()))?;
            Ok(None)
        })
    }
}

impl<K: Serialize + DeserializeOwned + 'static, V: Serialize + DeserializeOwned + 'static> Stream<K, V> {
    /// Sends each event to `topic` and goes on with `topic`'s events (Faust's
    /// `stream.through(topic)`): what gets through the processors before it is sent, encoded
    /// with `topic`'s codecs, and the returned stream hands out `topic`'s events on the cores
    /// that own their partitions — to repartition by the record's own key, to move work to a
    /// topic with more partitions, or to keep an intermediate result durable. At least once,
    /// as in Faust: a crash between a send and its event's commit sends it again.
    ///
    /// As with [`group_by`](Stream::group_by), the first run that meets it subscribes the
    /// agent to `topic` and restarts. [`App::through`](crate::App::through) forwards a whole
    /// topic without an agent.
    ///
    /// ```no_run
    /// # use faust::{App, Settings};
    /// # let app = App::new(Settings::new("doc"));
    /// let raw = app.topic::<String, i64>("readings");
    /// let valid = app.topic::<String, i64>("readings-valid");
    /// app.agent("validate", &raw, move |stream| {
    ///     let mut valid_stream = stream.filter(|v| *v >= 0).through(&valid);
    ///     async move {
    ///         while let Some(v) = valid_stream.next().await {
    ///             println!("{v}");
    ///         }
    ///         Ok(())
    ///     }
    /// });
    /// ```
    pub fn through(self, topic: &Topic<K, V>) -> Stream<K, V> {
        let Some(reroute) = self.reroute.clone() else {
            tracing::error!(topic = %topic.inner.name, "through on a stream that is not an agent's: it hands out nothing");
            return self.parked();
        };
        if !reroute.through(&self.core, self.agent, &topic.inner.name) {
            return self.parked();
        }
        // The source's keys are sent on.
        self.keys.set(true);
        let (target, keys) = (topic.clone(), self.keys.clone());
        self.routed(None, move |queued, previous| {
            let inner = &target.inner;
            if same_topic(&queued.tp.topic, &inner.name) {
                return decode_record(inner, queued, keys.get()).map(Some);
            }
            let Some((key, value)) = previous(queued)? else { return Ok(None) };
            target.send_soon(key.as_ref(), &value).map_err(|e| Rejected::Failed(e.to_string()))?;
            Ok(None)
        })
    }
}
