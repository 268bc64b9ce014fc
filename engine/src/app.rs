//! The app: settings, topics and agents, and the worker that runs them.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use event_listener::Event;
use faust_transport::{MemoryTransport, Produced, TopicPartition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{Codec, CodecError};
use crate::settings::Settings;
use crate::stream::Stream;
use crate::worker::{AgentRun, CoreRuntime};

/// What an agent returns when it fails: any error.
pub type AgentError = Box<dyn std::error::Error + Send + Sync>;

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// Sends go through the worker's cores: call `send` from an agent (or other code running
    /// on a worker core).
    #[error("`{topic}`.send() was called outside a worker core; send from an agent")]
    NotOnWorker {
        /// The topic.
        topic: String,
    },
    /// The key or value could not be encoded.
    #[error("encoding a record for `{topic}`: {source}")]
    Codec {
        /// The topic.
        topic: String,
        /// The codec's error.
        #[source]
        source: CodecError,
    },
    /// The topic is not known to the worker (declare it with `app.topic` before `run`).
    #[error("unknown topic `{topic}`: declare it with app.topic() before the worker starts")]
    UnknownTopic {
        /// The topic.
        topic: String,
    },
    /// The transport refused the records.
    #[error(transparent)]
    Transport(#[from] faust_transport::Error),
}

pub(crate) type StartAgent = Arc<dyn Fn(AgentRun) -> Pin<Box<dyn Future<Output = ()>>> + Send + Sync>;

/// A registered agent.
pub(crate) struct AgentSpec {
    pub(crate) name: String,
    pub(crate) topic: Arc<str>,
    pub(crate) start: StartAgent,
}

/// A topic declared by the app.
#[derive(Debug, Clone)]
pub(crate) struct TopicDecl {
    pub(crate) name: Arc<str>,
    pub(crate) partitions: Option<u32>,
}

pub(crate) struct AppInner {
    pub(crate) settings: Settings,
    pub(crate) topics: Mutex<Vec<TopicDecl>>,
    pub(crate) agents: Mutex<Vec<AgentSpec>>,
    pub(crate) memory: Mutex<Option<MemoryTransport>>,
    pub(crate) stop: Arc<StopSignal>,
}

/// Tells a running worker to stop; cheap to clone and usable from any thread.
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    event: Event,
}

impl StopSignal {
    /// Asks the worker to stop: fetching stops, agents finish their current event, offsets are
    /// committed, and `App::run` returns.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.event.notify(usize::MAX);
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Resolves once a stop is asked for.
    pub async fn wait(&self) {
        loop {
            let listener = self.event.listen();
            if self.is_stopped() {
                return;
            }
            listener.await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A stream-processing app: topics, agents that process them, and the worker that runs the
/// agents on every core for that core's partitions.
///
/// ```
/// use faust::{App, Settings};
///
/// let dir = tempfile::tempdir()?;
/// let mut settings = Settings::new("greetings");
/// settings.datadir = dir.path().join("data");
/// settings.topic_partitions = 2;
/// let app = App::new(settings);
/// let greetings = app.topic::<String, String>("greetings");
/// let stop = app.stop_signal();
/// app.agent("print", &greetings, move |mut stream| {
///     let stop = stop.clone();
///     async move {
///         while let Some(greeting) = stream.next().await {
///             println!("{greeting}");
///             stop.stop();
///         }
///         Ok(())
///     }
/// });
/// app.task(move || {
///     let greetings = greetings.clone();
///     async move {
///         greetings.send(Some(&"k".to_string()), &"hello".to_string()).await?;
///         Ok(())
///     }
/// });
/// app.run()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct App {
    pub(crate) inner: Arc<AppInner>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("id", &self.inner.settings.id).finish()
    }
}

impl App {
    /// An app with these settings.
    pub fn new(settings: Settings) -> App {
        App {
            inner: Arc::new(AppInner {
                settings,
                topics: Mutex::new(Vec::new()),
                agents: Mutex::new(Vec::new()),
                memory: Mutex::new(None),
                stop: Arc::new(StopSignal::default()),
            }),
        }
    }

    /// The app's settings.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Runs `memory://` on this in-memory transport (tests share one between an app and
    /// their assertions).
    pub fn with_memory_transport(self, transport: MemoryTransport) -> App {
        *lock(&self.inner.memory) = Some(transport);
        self
    }

    /// A handle that stops the running worker.
    pub fn stop_signal(&self) -> Arc<StopSignal> {
        self.inner.stop.clone()
    }

    /// Declares a topic with keys `K` and values `V`, encoded with the app's default codecs
    /// (`key_serializer`, `value_serializer`). It is created with `topic_partitions`
    /// partitions when the worker starts, unless it exists.
    pub fn topic<K, V>(&self, name: &str) -> Topic<K, V> {
        let settings = &self.inner.settings;
        let key = settings.key_serializer.parse().unwrap_or(Codec::Raw);
        let value = settings.value_serializer.parse().unwrap_or(Codec::Json);
        self.topic_with(name, key, value)
    }

    /// Declares a topic with explicit codecs.
    pub fn topic_with<K, V>(&self, name: &str, key_codec: Codec, value_codec: Codec) -> Topic<K, V> {
        let mut topics = lock(&self.inner.topics);
        if !topics.iter().any(|t| &*t.name == name) {
            topics.push(TopicDecl { name: Arc::from(name), partitions: None });
        }
        Topic { inner: Arc::new(TopicInner { name: Arc::from(name), key_codec, value_codec }), _types: PhantomData }
    }

    /// Registers an agent: `f` is called on every core with a stream of that core's events of
    /// `topic`, and its future runs there. When it fails, it is restarted with the event it
    /// failed on (up to 3 times for one event, after which the event is logged and skipped).
    pub fn agent<K, V, F, Fut>(&self, name: &str, topic: &Topic<K, V>, f: F)
    where
        K: DeserializeOwned + 'static,
        V: DeserializeOwned + 'static,
        F: Fn(Stream<K, V>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        let topic_inner = topic.inner.clone();
        let f = Arc::new(f);
        let agent_name: Arc<str> = Arc::from(name);
        let start: StartAgent = Arc::new(move |run: AgentRun| {
            let (f, topic, name) = (f.clone(), topic_inner.clone(), agent_name.clone());
            Box::pin(crate::worker::supervise(run, name, move |run: &AgentRun| {
                f(Stream::new(run, topic.key_codec, topic.value_codec))
            }))
        });
        lock(&self.inner.agents).push(AgentSpec { name: name.to_string(), topic: topic.inner.name.clone(), start });
    }

    /// Registers work that runs once on core 0 when the worker starts (Faust's `@app.task`).
    pub fn task<F, Fut>(&self, f: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        let f = Arc::new(f);
        lock(&self.inner.agents).push(AgentSpec {
            name: "task".to_string(),
            topic: Arc::from(""),
            start: Arc::new(move |_run: AgentRun| {
                let f = f.clone();
                Box::pin(async move {
                    if let Err(e) = f().await {
                        tracing::error!(error = %e, "task failed");
                    }
                })
            }),
        });
    }

    /// Runs the worker until [`StopSignal::stop`] is called: creates the declared topics,
    /// takes the partitions the transport assigns, places them on the cores and runs every
    /// agent on every core for its partitions.
    pub fn run(&self) -> Result<(), crate::worker::WorkerError> {
        crate::worker::run(self)
    }
}

pub(crate) struct TopicInner {
    pub(crate) name: Arc<str>,
    pub(crate) key_codec: Codec,
    pub(crate) value_codec: Codec,
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

impl<K, V> std::fmt::Debug for Topic<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic").field("name", &self.inner.name).finish()
    }
}

impl<K: Serialize, V: Serialize> Topic<K, V> {
    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Sends one record and waits until the transport has it durably (appended on `local://`).
    /// The partition is Kafka's murmur2 of the encoded key, or round-robin for `None`.
    pub async fn send(&self, key: Option<&K>, value: &V) -> Result<Produced, SendError> {
        let core = CoreRuntime::current().ok_or_else(|| SendError::NotOnWorker { topic: self.name().to_string() })?;
        let codec_err = |source| SendError::Codec { topic: self.name().to_string(), source };
        let mut key_bytes = Vec::new();
        if let Some(k) = key {
            self.inner.key_codec.encode(k, &mut key_bytes).map_err(codec_err)?;
        }
        let mut value_bytes = Vec::new();
        self.inner.value_codec.encode(value, &mut value_bytes).map_err(codec_err)?;
        self.inner.send_raw(&core, key.map(|_| &key_bytes[..]), Some(&value_bytes), &[]).await
    }
}

impl TopicInner {
    /// Sends already-encoded bytes: partition by Kafka's murmur2 of the key, or round-robin
    /// for a null key; resolves once the transport has the record.
    pub(crate) async fn send_raw(
        &self,
        core: &crate::worker::CoreRuntime,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[faust_storage::Header<'_>],
    ) -> Result<Produced, SendError> {
        let partitions =
            core.partitions(&self.name).ok_or_else(|| SendError::UnknownTopic { topic: self.name.to_string() })?;
        let partition = match key {
            Some(k) => crate::worker::partition_for_key(k, partitions),
            None => core.round_robin(partitions),
        };
        let size = key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len) + 128;
        let mut batch = faust_storage::BatchBuilder::with_capacity(size);
        batch.push(crate::worker::now_ms(), key, value, headers);
        let tp = TopicPartition::new(self.name.clone(), partition);
        Ok(core.transport.produce(&tp, batch).await?)
    }
}
