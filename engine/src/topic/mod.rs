//! Topics and channels: typed handles, routing by key, sends that wait and sends that are
//! buffered, and (`outbox`) the queue of sends made from outside the worker.

pub(crate) mod outbox;

use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use faust_transport::{Produced, TopicPartition};
use serde::Serialize;

use crate::codec::Codec;
use crate::error::SendError;
use crate::runtime::CoreRuntime;
use crate::topic::outbox::{Outbox, Reply};
use crate::util::lock;

/// What a send sets beyond its key and value (Faust's `topic.send(..., partition=,
/// timestamp=, headers=)`).
///
/// ```no_run
/// use faust::{App, SendOptions, Settings};
///
/// let app = App::new(Settings::new("orders"));
/// let orders = app.topic::<String, u64>("orders");
/// let options = SendOptions {
///     partition: Some(2),
///     timestamp: Some(1_700_000_000_000),
///     headers: vec![("source".into(), b"web".to_vec())],
/// };
/// # async {
/// orders.send_with(Some(&"order-1".to_string()), &42, &options).await?;
/// # Ok::<(), faust::SendError>(())
/// # };
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendOptions {
    /// The partition (default: Kafka's murmur2 of the key, or round-robin without one).
    pub partition: Option<u32>,
    /// The record's timestamp in milliseconds since the epoch (default: now).
    pub timestamp: Option<i64>,
    /// Headers, in order (names need not be unique).
    pub headers: Vec<(String, Vec<u8>)>,
}

impl SendOptions {
    /// The headers as the storage layer takes them.
    pub(crate) fn raw_headers(&self) -> Vec<faust_storage::Header<'_>> {
        self.headers.iter().map(|(n, v)| (n.as_bytes(), Some(&v[..]))).collect()
    }
}

/// Whether a topic lives in the transport or only in this process's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TopicKind {
    /// A topic of the transport: durable, partitioned, consumed by offset.
    Log,
    /// An in-memory channel (Faust's `app.channel()`): a send hands the event straight to
    /// the agents of the core it is sent from; nothing is durable or committed.
    Channel,
}

pub(crate) struct TopicInner {
    pub(crate) name: Arc<str>,
    pub(crate) key_codec: Codec,
    pub(crate) value_codec: Codec,
    pub(crate) kind: TopicKind,
    outbox: Arc<Outbox>,
    /// This handle's number in the outbox.
    outbox_index: usize,
    /// For a repartition topic: the table of the latest source offset taken per source
    /// partition, which drops records re-sent after a crash (see `group_by`).
    pub(crate) positions: std::sync::OnceLock<crate::Table<u32, u64>>,
    /// How each agent consuming the topic decodes a record: what the CLI's `send` checks, so
    /// that it refuses records the agents would only drop as bad records.
    checks: Mutex<Vec<RecordCheck>>,
}

/// Decodes an encoded key (when there is one and the agent decodes keys) and value as an
/// agent would; the reason when it would reject them.
pub(crate) type RecordCheck = Arc<dyn Fn(Option<&[u8]>, &[u8]) -> Result<(), String> + Send + Sync>;

impl TopicInner {
    /// Adds how one more agent consuming the topic decodes its records.
    pub(crate) fn add_check(&self, check: RecordCheck) {
        lock(&self.checks).push(check);
    }

    /// Whether every agent consuming the topic would take a record with this key and value.
    pub(crate) fn check(&self, key: Option<&[u8]>, value: &[u8]) -> Result<(), String> {
        lock(&self.checks).iter().try_for_each(|check| check(key, value))
    }
}

/// A typed handle on a topic: keys `K`, values `V`. Cheap to clone, usable from any core.
pub struct Topic<K, V> {
    pub(crate) inner: Arc<TopicInner>,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Clone for Topic<K, V> {
    fn clone(&self) -> Self {
        Topic { inner: self.inner.clone(), _types: PhantomData }
    }
}

impl<K, V> Topic<K, V> {
    /// A new handle on topic `name`, registered with the app's outbox (for sends from outside
    /// the worker).
    pub(crate) fn declared(
        outbox: &Arc<Outbox>,
        name: &str,
        key_codec: Codec,
        value_codec: Codec,
        kind: TopicKind,
    ) -> Self {
        let inner = outbox.register(|outbox_index| TopicInner {
            name: Arc::from(name),
            key_codec,
            value_codec,
            kind,
            outbox: outbox.clone(),
            outbox_index,
            positions: std::sync::OnceLock::new(),
            checks: Mutex::new(Vec::new()),
        });
        Topic { inner, _types: PhantomData }
    }

    /// A handle of these types on a topic already registered (a repartition topic declared
    /// while the worker runs, typed by the stream that uses it).
    pub(crate) fn of_inner(inner: Arc<TopicInner>) -> Self {
        Topic { inner, _types: PhantomData }
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }
}

impl<K, V> std::fmt::Debug for Topic<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic").field("name", &self.inner.name).finish()
    }
}

impl<K: Serialize + 'static, V> Topic<K, V> {
    /// Buffers an encoded value under `key`, encoded here (see [`Topic::send_soon`]).
    pub(crate) fn send_soon_keyed_raw(
        &self,
        core: &Rc<CoreRuntime>,
        timestamp: Option<i64>,
        key: &K,
        value: &[u8],
        headers: &[faust_storage::Header<'_>],
    ) -> Result<(), SendError> {
        SCRATCH.with(|scratch| {
            let (key_bytes, _) = &mut *scratch.borrow_mut();
            key_bytes.clear();
            let codec_err = |source| SendError::Codec { topic: self.name().to_string(), source };
            self.inner.key_codec.encode_owned(key, key_bytes).map_err(codec_err)?;
            self.inner.send_soon_raw(core, timestamp, Some(&key_bytes[..]), value, headers)
        })
    }
}

impl<K: Serialize + 'static, V: Serialize + 'static> Topic<K, V> {
    /// Sends one record and waits until the transport has it durably (appended on `local://`).
    /// The partition is Kafka's murmur2 of the encoded key, or round-robin for `None`.
    ///
    /// Works from anywhere: on a worker core the record goes straight to the transport; from
    /// another thread (a web handler, a test) it is handed to core 0, and a send made before
    /// the worker starts waits for it. On a channel, "durable" means handed to the agents.
    pub async fn send(&self, key: Option<&K>, value: &V) -> Result<Produced, SendError> {
        match CoreRuntime::current() {
            Some(core) => {
                let (key_bytes, value_bytes) = self.encode(key, value)?;
                self.inner.send_raw(&core, key_bytes.as_deref(), Some(&value_bytes), &[], None).await
            }
            None => {
                let reply = Arc::new(Reply::default());
                self.push_outside(key, value, Some(reply.clone()), None)?;
                reply.wait().await
            }
        }
    }

    /// [`Topic::send`] with a partition, a timestamp and headers of the caller's choosing
    /// ([`SendOptions`]). A partition the topic does not have is
    /// [`SendError::UnknownPartition`]. On a channel, only the key and value travel.
    pub async fn send_with(&self, key: Option<&K>, value: &V, options: &SendOptions) -> Result<Produced, SendError> {
        match CoreRuntime::current() {
            Some(core) => {
                let (key_bytes, value_bytes) = self.encode(key, value)?;
                let headers = options.raw_headers();
                self.inner.send_raw(&core, key_bytes.as_deref(), Some(&value_bytes), &headers, Some(options)).await
            }
            None => {
                let reply = Arc::new(Reply::default());
                let options = Box::new(options.clone());
                self.push_outside(key, value, Some(reply.clone()), Some(options))?;
                reply.wait().await
            }
        }
    }

    /// Sends one record without waiting (Faust's `send_soon`): it is buffered with the
    /// core's other sends and written in batches, at the latest before the offsets of the
    /// events being processed are committed, so a commit never covers an event whose sends
    /// could still be lost. Fails only if the record does not encode or the worker stopped.
    pub fn send_soon(&self, key: Option<&K>, value: &V) -> Result<(), SendError> {
        match CoreRuntime::current() {
            // Encoded into this thread's scratch buffers: no allocation per record.
            Some(core) => self.encode_scratch(key, value, |key_bytes, value_bytes| {
                self.inner.send_soon_raw(&core, None, key_bytes, value_bytes, &[])
            }),
            None => self.push_outside(key, value, None, None),
        }
    }

    /// Encodes into this thread's scratch buffers (no allocation per record) and hands the
    /// bytes to `then`; nothing is handed on when encoding fails.
    fn encode_scratch<T>(
        &self,
        key: Option<&K>,
        value: &V,
        then: impl FnOnce(Option<&[u8]>, &[u8]) -> Result<T, SendError>,
    ) -> Result<T, SendError> {
        SCRATCH.with(|scratch| {
            let (key_bytes, value_bytes) = &mut *scratch.borrow_mut();
            key_bytes.clear();
            value_bytes.clear();
            let has_key = self.encode_into(key, value, key_bytes, value_bytes)?;
            then(has_key.then_some(&key_bytes[..]), value_bytes)
        })
    }

    /// Queues a record sent from a thread that is not a worker core for core 0, encoded
    /// before the outbox is locked.
    fn push_outside(
        &self,
        key: Option<&K>,
        value: &V,
        reply: Option<Arc<Reply>>,
        options: Option<Box<SendOptions>>,
    ) -> Result<(), SendError> {
        let outbox = &self.inner.outbox;
        outbox.check_open(&self.inner)?;
        self.encode_scratch(key, value, |key_bytes, value_bytes| {
            outbox.push(&self.inner, key_bytes, value_bytes, reply, options)
        })
    }

    fn encode(&self, key: Option<&K>, value: &V) -> Result<(Option<Vec<u8>>, Vec<u8>), SendError> {
        let (mut key_bytes, mut value_bytes) = (Vec::new(), Vec::with_capacity(64));
        let has_key = self.encode_into(key, value, &mut key_bytes, &mut value_bytes)?;
        Ok((has_key.then_some(key_bytes), value_bytes))
    }

    /// Appends the encoded key and value; says whether there is a key.
    fn encode_into(
        &self,
        key: Option<&K>,
        value: &V,
        key_bytes: &mut Vec<u8>,
        value_bytes: &mut Vec<u8>,
    ) -> Result<bool, SendError> {
        let codec_err = |source| SendError::Codec { topic: self.name().to_string(), source };
        if let Some(k) = key {
            self.inner.key_codec.encode_owned(k, key_bytes).map_err(codec_err)?;
        }
        self.inner.value_codec.encode_owned(value, value_bytes).map_err(codec_err)?;
        Ok(key.is_some())
    }
}

impl TopicInner {
    /// The partition a record goes to: Kafka's murmur2 of the key, or round-robin for a null
    /// key.
    fn route(&self, core: &CoreRuntime, key: Option<&[u8]>) -> Result<TopicPartition, SendError> {
        self.route_to(core, key, None)
    }

    /// [`route`](TopicInner::route), unless the sender chose the partition.
    fn route_to(
        &self,
        core: &CoreRuntime,
        key: Option<&[u8]>,
        chosen: Option<u32>,
    ) -> Result<TopicPartition, SendError> {
        let partitions =
            core.partitions(&self.name).ok_or_else(|| SendError::UnknownTopic { topic: self.name.to_string() })?;
        let partition = match (chosen, key) {
            (Some(p), _) if p < partitions => p,
            (Some(partition), _) => {
                return Err(SendError::UnknownPartition { topic: self.name.to_string(), partition, partitions });
            }
            (None, Some(k)) => crate::partitioner::partition_for_key(k, partitions),
            (None, None) => core.round_robin(partitions),
        };
        Ok(TopicPartition::new(self.name.clone(), partition))
    }

    /// Sends already-encoded bytes; resolves once the transport has the record. `options`
    /// may choose its partition and timestamp (its headers are in `headers`).
    pub(crate) async fn send_raw(
        &self,
        core: &Rc<CoreRuntime>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[faust_storage::Header<'_>],
        options: Option<&SendOptions>,
    ) -> Result<Produced, SendError> {
        if self.kind == TopicKind::Channel {
            return core.deliver(&self.name, key, value).await;
        }
        let chosen = options.and_then(|o| o.partition);
        let tp = match self.route_to(core, key, chosen) {
            // A topic created since the worker started: its partitions, read once.
            Err(SendError::UnknownTopic { .. }) if core.learn_partitions(&self.name).await.is_some() => {
                self.route_to(core, key, chosen)?
            }
            routed => routed?,
        };
        core.wait_gate().await;
        // Records of a partition land in the order they were sent, buffered or not.
        if core.has_pending(&tp) {
            core.flush()
                .await
                .map_err(|e| SendError::Buffered { topic: self.name.to_string(), message: e.to_string() })?;
        }
        let size = key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len) + 128;
        let mut batch = faust_storage::BatchBuilder::with_capacity(size);
        let timestamp = options.and_then(|o| o.timestamp).unwrap_or_else(crate::util::now_ms);
        core.push_output(&mut batch, timestamp, key, value, headers);
        Ok(core.transport().produce(&tp, batch).await?)
    }

    /// Buffers already-encoded bytes on this core (see [`Topic::send_soon`]).
    pub(crate) fn send_soon_raw(
        &self,
        core: &Rc<CoreRuntime>,
        timestamp: Option<i64>,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[faust_storage::Header<'_>],
    ) -> Result<(), SendError> {
        if self.kind == TopicKind::Channel {
            core.deliver_now(&self.name, key, Some(value));
            return Ok(());
        }
        let tp = self.route(core, key)?;
        core.buffer(tp, timestamp, key, value, headers);
        Ok(())
    }
}

thread_local! {
    /// Where a thread encodes a record before copying it into a partition's batch (on a
    /// core) or into the outbox (outside the worker).
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl crate::runtime::context::CurrentEvent {
    /// Sends the event's record — key, value and headers as read — to `topic` (Faust's
    /// `event.forward`), and waits until it is durable.
    pub async fn forward<K, V>(&self, topic: &Topic<K, V>) -> Result<Produced, SendError> {
        let core = CoreRuntime::current().ok_or_else(|| SendError::Stopped { topic: topic.inner.name.to_string() })?;
        let Some(record) = self.record() else {
            return Err(SendError::NoRecord { topic: topic.inner.name.to_string() });
        };
        let headers: Vec<faust_storage::Header<'_>> = record.headers().collect();
        topic.inner.send_raw(&core, record.key.as_deref(), record.value.as_deref(), &headers, None).await
    }
}
