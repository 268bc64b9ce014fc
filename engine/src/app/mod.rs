//! The app: what it declares (`spec`), its topics and channels, agents (`agent`), tables,
//! tasks and timers, `group_by` and sinks. The worker (`worker/`) runs it; the command line
//! (`cli/`) drives it.

mod agent;
pub(crate) mod global_table;
pub(crate) mod group_by;
pub(crate) mod join;
pub(crate) mod page;
pub(crate) mod pattern;
pub(crate) mod rpc;
pub(crate) mod services;
pub(crate) mod set_table;
pub(crate) mod sink;
mod spec;

use std::future::Future;
use std::sync::{Arc, Mutex};

use faust_transport::MemoryTransport;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::Codec;
pub(crate) use crate::error::{AgentError, SendError};
pub(crate) use crate::runtime::signal::StopSignal;
pub(crate) use crate::topic::Topic;
pub(crate) use crate::topic::outbox::{Outbox, Outgoing, Probe, Reply};
pub(crate) use crate::topic::{TopicInner, TopicKind};
pub use agent::Agent;
pub(crate) use spec::{AgentSpec, AppInner, TopicDecl, UserCommand};

use crate::runtime::supervise::{AgentRun, StartAgent};
use crate::settings::Settings;
use crate::stream::Stream;
pub(crate) use crate::util::lock;

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
    /// An app with these settings (its id made from `id_format` when `version` is above 1).
    pub fn new(settings: Settings) -> App {
        App {
            inner: Arc::new(AppInner {
                settings: settings.versioned(),
                topics: Arc::default(),
                agents: Arc::default(),
                tables: Arc::default(),
                memory: Mutex::new(None),
                stop: Arc::new(StopSignal::default()),
                outbox: Arc::new(Outbox::default()),
                stats: Arc::default(),
                commands: Mutex::new(Vec::new()),
                pages: Mutex::new(Vec::new()),
                sensors: Mutex::new(Vec::new()),
                web_addr: Mutex::new(None),
                services: Arc::default(),
                replies: Arc::default(),
                models: Arc::default(),
            }),
        }
    }

    /// The same app — topics, agents, tables, stop signal, outbox — with other settings (the
    /// command line's options, a test's transport).
    pub(crate) fn with_settings(&self, settings: Settings) -> App {
        let inner = &self.inner;
        App {
            inner: Arc::new(AppInner {
                settings,
                topics: inner.topics.clone(),
                agents: inner.agents.clone(),
                tables: inner.tables.clone(),
                memory: Mutex::new(lock(&inner.memory).clone()),
                stop: inner.stop.clone(),
                outbox: inner.outbox.clone(),
                stats: inner.stats.clone(),
                commands: Mutex::new(lock(&inner.commands).clone()),
                pages: Mutex::new(lock(&inner.pages).clone()),
                sensors: Mutex::new(lock(&inner.sensors).clone()),
                web_addr: Mutex::new(None),
                services: inner.services.clone(),
                replies: inner.replies.clone(),
                models: inner.models.clone(),
            }),
        }
    }

    /// Registers a Faust record model (Faust's model registry): the command line's `models`
    /// lists it, and [`App::models`] decodes records by their namespace with it.
    pub fn model<T: crate::FaustRecord + Send + 'static>(&self) -> &App {
        lock(&self.inner.models).register::<T>();
        self
    }

    /// The models registered with [`App::model`], to decode a record by its namespace.
    pub fn models(&self) -> crate::Models {
        lock(&self.inner.models).clone()
    }

    /// Adds a command to the app's command line (Faust's `@app.command`): `name ARGS...` calls
    /// `run` with the app (its settings changed by `--datadir`, `--broker`) and the
    /// arguments after the name, which `run` may parse as it likes (with clap, say). An error
    /// is printed and exits with 1.
    ///
    /// ```
    /// use faust::{App, Settings};
    ///
    /// let app = App::new(Settings::new("shop"));
    /// app.command("greet", "Prints a greeting", |app, args| {
    ///     println!("hello {} from {}", args.join(" "), app.settings().id);
    ///     Ok(())
    /// });
    /// assert_eq!(app.main_from(["shop", "greet", "world"]), std::process::ExitCode::SUCCESS);
    /// ```
    pub fn command<F>(&self, name: &str, about: &str, run: F)
    where
        F: Fn(&App, &[String]) -> Result<(), AgentError> + Send + Sync + 'static,
    {
        let mut commands = lock(&self.inner.commands);
        commands.retain(|c| c.name != name);
        commands.push(UserCommand { name: name.to_string(), about: about.to_string(), run: Arc::new(run) });
    }

    /// Adds a page to the worker's web server (Faust's `@app.page`): a `GET` of `path` (exact,
    /// without the query) is answered by `handler`, on the web server's threads (not on the
    /// cores). A path the engine serves itself (`/health`, `/table/...`) cannot be replaced.
    ///
    /// ```
    /// use faust::{App, Settings, WebResponse};
    ///
    /// let app = App::new(Settings::new("shop"));
    /// app.page("/hello", |request| WebResponse::json(200, &serde_json::json!({ "path": request.path })));
    /// ```
    pub fn page<F>(&self, path: &str, handler: F)
    where
        F: Fn(&crate::WebRequest) -> crate::WebResponse + Send + Sync + 'static,
    {
        let mut pages = lock(&self.inner.pages);
        pages.retain(|(p, _)| p != path);
        pages.push((path.to_string(), Arc::new(handler)));
    }

    /// Adds a sensor (Faust's `app.monitor` sensors): the worker calls its hooks as events,
    /// table operations, commits, sends, rebalances and recoveries happen (see [`Sensor`]).
    /// Add sensors before the worker runs.
    ///
    /// [`Sensor`]: crate::Sensor
    pub fn sensor(&self, sensor: Arc<dyn crate::runtime::sensor::Sensor>) {
        lock(&self.inner.sensors).push(sensor);
    }

    /// Where the running worker's web server listens (`None` before it does, or with
    /// `web_enabled` off, or when its port was taken).
    pub fn web_addr(&self) -> Option<std::net::SocketAddr> {
        *lock(&self.inner.web_addr)
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

    /// What the worker did about assignment changes so far (partitions taken and released,
    /// shards recovered or resumed in place), counted over every run of this app.
    pub fn stats(&self) -> crate::WorkerStats {
        crate::WorkerStats { leader: self.inner.services.is_leader(), ..self.inner.stats.snapshot() }
    }

    /// What is wrong with the running worker now, one line each (`core 0 writes: ...` while a
    /// core's writes fail, a damaged partition waiting for a repair, ...); empty when all is
    /// well. The CLI's `stats` shows these too.
    pub fn problems(&self) -> Vec<String> {
        self.inner.stats.problems()
    }

    /// Makes SIGINT and SIGTERM stop the worker gracefully, as Faust's worker does: the first
    /// signal asks for a stop (fetching stops, agents finish the events they hold within
    /// `shutdown_timeout`, offsets are committed and stores checkpointed, the worker leaves its
    /// group, [`App::run`] returns); a second one, while that is under way, exits the process
    /// at once with status 128 + the signal. Call it before [`App::run`]; it applies to the
    /// whole process, so a library embedding the engine may prefer its own handling and
    /// [`App::stop_signal`].
    ///
    /// ```no_run
    /// # use faust::{App, Settings};
    /// let app = App::new(Settings::new("shop"));
    /// app.stop_on_signals()?;
    /// app.run()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stop_on_signals(&self) -> std::io::Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        let stop = self.inner.stop.clone();
        std::thread::Builder::new().name(format!("{}-signals", self.inner.settings.id)).spawn(move || {
            let mut received = 0;
            for signal in signals.forever() {
                received += 1;
                if received == 1 {
                    tracing::warn!(
                        signal,
                        "stopping: finishing in-flight events and committing (a second signal exits at once)"
                    );
                    stop.stop();
                } else {
                    tracing::error!(signal, "second signal: exiting now without committing");
                    std::process::exit(128 + signal);
                }
            }
        })?;
        Ok(())
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
        self.topic_with(name, settings.key_serializer.clone(), settings.value_serializer.clone())
    }

    /// Declares a topic with explicit codecs.
    pub fn topic_with<K, V>(&self, name: &str, key_codec: Codec, value_codec: Codec) -> Topic<K, V> {
        self.declare(name, key_codec, value_codec, TopicKind::Log)
    }

    /// Declares an in-memory channel (Faust's `app.channel()`): agents consume it like a
    /// topic, but a send hands the event to the agents on the core it is sent from (core 0
    /// for sends from outside the worker), without a log: nothing is durable, events still
    /// queued when the worker stops are dropped, and there is nothing to commit.
    ///
    /// Keys and values are encoded with the app's codecs (`key_serializer`,
    /// `value_serializer`), as Faust's channels are; [`App::channel_with`] names others.
    pub fn channel<K, V>(&self, name: &str) -> Topic<K, V> {
        let settings = &self.inner.settings;
        self.channel_with(name, settings.key_serializer.clone(), settings.value_serializer.clone())
    }

    /// Declares an in-memory channel with explicit codecs.
    pub fn channel_with<K, V>(&self, name: &str, key_codec: Codec, value_codec: Codec) -> Topic<K, V> {
        self.declare(name, key_codec, value_codec, TopicKind::Channel)
    }

    /// Limits how much of the declared topic `name` is kept (Faust's `retention` argument of
    /// `app.topic`; Kafka's `retention.ms` and `retention.bytes`): records older than `age`,
    /// and the oldest records of a partition larger than `bytes`, are deleted — whole
    /// segments at a time (see `segment_bytes` in [`Settings`](crate::Settings)), so a
    /// partition keeps up to one segment more. Applies when the worker creates the topic; an
    /// existing topic keeps its own. `local://` deletes them in the worker's upkeep, about
    /// once a second; a Kafka broker in its own.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let app = faust::App::new(faust::Settings::new("clicks"));
    /// let clicks = app.topic::<String, u64>("clicks");
    /// app.topic_retention(clicks.name(), Some(Duration::from_secs(24 * 3600)), Some(1 << 30));
    /// ```
    pub fn topic_retention(&self, name: &str, age: Option<std::time::Duration>, bytes: Option<u64>) {
        if let Some(t) = lock(&self.inner.topics).iter_mut().find(|t| &*t.name == name) {
            t.retention = age;
            t.retention_bytes = bytes;
        }
    }

    /// Sets how the worker creates the declared topic `name` (Faust's `partitions=`,
    /// `replicas=`, `retention=`, `compacting=` and `config=` arguments of `app.topic`): see
    /// [`TopicOptions`]. Applies when the worker creates the topic; an existing topic keeps its
    /// settings, except that an explicit partition count must match its own (the worker
    /// refuses to start otherwise).
    ///
    /// ```
    /// use std::time::Duration;
    /// use faust::{App, Settings, TopicOptions};
    ///
    /// let app = App::new(Settings::new("shop"));
    /// let orders = app.topic::<String, u64>("orders");
    /// app.configure_topic(
    ///     orders.name(),
    ///     TopicOptions::new().partitions(12).replicas(3).retention(Duration::from_secs(7 * 86_400))
    ///         .broker_config("min.insync.replicas", "2"),
    /// );
    /// ```
    pub fn configure_topic(&self, name: &str, options: TopicOptions) {
        if let Some(t) = lock(&self.inner.topics).iter_mut().find(|t| &*t.name == name) {
            let TopicOptions { partitions, replicas, retention, retention_bytes, compacting, broker_config } = options;
            t.partitions = partitions.or(t.partitions);
            t.replicas = replicas.or(t.replicas);
            t.retention = retention.or(t.retention);
            t.retention_bytes = retention_bytes.or(t.retention_bytes);
            t.compacting |= compacting;
            t.broker_config.extend(broker_config);
        }
    }

    /// Makes the declared topic `name` take the partition count of `like` when created.
    pub(crate) fn copartition_with(&self, name: &str, like: &Arc<str>) {
        if let Some(t) = lock(&self.inner.topics).iter_mut().find(|t| &*t.name == name) {
            t.partitions_like = Some(like.clone());
        }
    }

    pub(crate) fn declare<K, V>(
        &self,
        name: &str,
        key_codec: Codec,
        value_codec: Codec,
        kind: TopicKind,
    ) -> Topic<K, V> {
        let mut topics = lock(&self.inner.topics);
        if !topics.iter().any(|t| &*t.name == name) {
            topics.push(TopicDecl {
                name: Arc::from(name),
                partitions: None,
                partitions_like: None,
                kind,
                retention: None,
                retention_bytes: None,
                compacting: false,
                replicas: None,
                broker_config: Vec::new(),
            });
        }
        Topic::declared(&self.inner.outbox, name, key_codec, value_codec, kind)
    }

    /// Registers an agent: `f` is called on every core with a stream of that core's events of
    /// `topic`, and its future runs there. When it fails, it is restarted with the event it
    /// failed on (up to 3 times for one event, after which the event is logged and skipped).
    ///
    /// The returned handle sends to the agent ([`Agent::send`], [`Agent::cast`]) and sets
    /// its [`concurrency`](Agent::concurrency).
    ///
    /// `source` is a [`Topic`] (or channel), or a re-keyed one from [`Topic::group_by`].
    pub fn agent<K, V, S, F, Fut>(&self, name: &str, source: &S, f: F) -> Agent<K, V>
    where
        K: DeserializeOwned + 'static,
        V: DeserializeOwned + 'static,
        S: crate::app::group_by::Source<K, V>,
        F: Fn(Stream<K, V>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        let topic = source.consumed_by(self, name);
        let agent = self.agent_on(name, &topic, true, f);
        source.subscribe(self, agent.index);
        agent
    }

    /// Registers an agent on several topics at once: its stream holds the events of all of
    /// them, each from the core that owns its partition (what Faust's `app.topic('a', 'b')`
    /// and `stream.combine` promise; Faust's iterates only the first). The topics share the
    /// key and value types, and are decoded with the first one's codecs; a record of another
    /// topic that does not decode with them is a bad record. The handle sends to the first.
    ///
    /// ```no_run
    /// # use faust::{App, Settings};
    /// # let app = App::new(Settings::new("doc"));
    /// let web = app.topic::<String, String>("clicks-web");
    /// let mobile = app.topic::<String, String>("clicks-mobile");
    /// app.agent_on_topics("clicks", &[&web, &mobile], |mut stream| async move {
    ///     while let Some(event) = stream.next_event().await {
    ///         println!("{} from {}", event.value, event.tp.topic);
    ///     }
    ///     Ok(())
    /// });
    /// ```
    pub fn agent_on_topics<K, V, F, Fut>(&self, name: &str, topics: &[&Topic<K, V>], f: F) -> Agent<K, V>
    where
        K: DeserializeOwned + 'static,
        V: DeserializeOwned + 'static,
        F: Fn(Stream<K, V>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        let Some((first, rest)) = topics.split_first() else {
            // No topic: an agent of its own topic, as Faust makes for `@app.agent()`.
            return self.agent_with_own_topic(name, f);
        };
        let agent = self.agent_on(name, first, true, f);
        for topic in rest {
            if (&topic.inner.key_codec, &topic.inner.value_codec) != (&first.inner.key_codec, &first.inner.value_codec)
            {
                tracing::warn!(agent = name, first = %first.inner.name, topic = %topic.inner.name,
                    "the agent decodes every topic with the first one's codecs, and this one's differ");
            }
            topic.inner.add_check(decode_check::<K, V>(&first.inner.key_codec, &first.inner.value_codec, true));
        }
        if let Some(spec) = lock(&self.inner.agents).get_mut(agent.index) {
            spec.also = rest.iter().map(|t| t.inner.name.clone()).collect();
        }
        agent
    }

    /// Registers an agent without a topic of the caller's (Faust's `@app.agent()` with no
    /// channel): it consumes the topic `{id}-{name}`, declared with the app's codecs, which
    /// [`Agent::send`] and [`Agent::ask`] reach.
    ///
    /// ```
    /// use faust::{App, Settings};
    ///
    /// let app = App::new(Settings::new("shop"));
    /// let audit = app.agent_with_own_topic::<String, String, _, _>("audit", |mut stream| async move {
    ///     while let Some(line) = stream.next().await {
    ///         println!("{line}");
    ///     }
    ///     Ok(())
    /// });
    /// assert_eq!(audit.topic().name(), "shop-audit");
    /// ```
    pub fn agent_with_own_topic<K, V, F, Fut>(&self, name: &str, f: F) -> Agent<K, V>
    where
        K: DeserializeOwned + 'static,
        V: DeserializeOwned + 'static,
        F: Fn(Stream<K, V>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        let topic = self.topic::<K, V>(&format!("{}-{name}", self.inner.settings.id));
        self.agent(name, &topic, f)
    }

    /// A channel named `name` that the worker fills with `values` when it starts (Faust's
    /// `app.stream(iterable)`): give it to [`App::agent`] to process a fixed set of values —
    /// a test's input, a backfill read from a file — with the same agent code as a topic.
    /// The values are taken from the iterator one at a time, as the agent's queue has room,
    /// on core 0 (where its agent instance gets them), once: a worker that runs again (or
    /// restarts its run for a new subscription) goes on with the values not yet taken. Like
    /// any channel, nothing is durable: values in the agent's queue when a run ends are lost.
    ///
    /// ```
    /// use faust::{App, Settings};
    ///
    /// let app = App::new(Settings::new("backfill"));
    /// let history = app.stream_of("history", (1..=3u64).map(|n| n * 100));
    /// app.agent("replay", &history, |mut stream| async move {
    ///     while let Some(cents) = stream.next().await {
    ///         println!("{cents}");
    ///     }
    ///     Ok(())
    /// });
    /// ```
    pub fn stream_of<V, I>(&self, name: &str, values: I) -> Topic<(), V>
    where
        V: Serialize + 'static,
        I: IntoIterator<Item = V>,
        I::IntoIter: Send + 'static,
    {
        let channel = self.channel::<(), V>(name);
        let values = Arc::new(Mutex::new(values.into_iter()));
        let target = channel.clone();
        self.task(move || {
            let (values, target) = (values.clone(), target.clone());
            async move {
                // One at a time from the shared iterator: what a run did not take, the next
                // run takes.
                loop {
                    let next = lock(&values).next();
                    let Some(value) = next else { return Ok(()) };
                    target.send(None, &value).await?;
                }
            }
        });
        channel
    }

    /// Registers an agent on `topic`; `decodes_key` says whether its stream decodes keys (the
    /// re-keying agent of a `group_by` does not).
    pub(crate) fn agent_on<K, V, F, Fut>(&self, name: &str, topic: &Topic<K, V>, decodes_key: bool, f: F) -> Agent<K, V>
    where
        K: DeserializeOwned + 'static,
        V: DeserializeOwned + 'static,
        F: Fn(Stream<K, V>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        topic.inner.add_check(decode_check::<K, V>(&topic.inner.key_codec, &topic.inner.value_codec, decodes_key));
        let topic_inner = topic.inner.clone();
        let f = Arc::new(f);
        let agent_name: Arc<str> = Arc::from(name);
        let routes: Arc<dyn crate::stream::reroute::Reroute> = Arc::new(crate::app::group_by::AgentRoutes {
            app: Arc::downgrade(&self.inner),
            agent: agent_name.clone(),
            source: topic.inner.name.clone(),
            value_codec: topic.inner.value_codec.clone(),
        });
        // Set on the handle ([`Agent::supervisor`], [`Agent::on_error`]) before the worker starts.
        let supervision: Arc<Mutex<crate::runtime::supervise::SupervisorOptions>> = Arc::default();
        let options = supervision.clone();
        let start: StartAgent = Arc::new(move |run: AgentRun| {
            let (f, topic, name, routes) = (f.clone(), topic_inner.clone(), agent_name.clone(), routes.clone());
            let options = lock(&options).clone();
            Box::pin(crate::runtime::supervise::supervise(run, name, options, move |run: &AgentRun| {
                f(Stream::new(run, topic.key_codec.clone(), topic.value_codec.clone())
                    .deduplicated_by(topic.positions.get().cloned())
                    .rerouted_by(routes.clone()))
            }))
        });
        let mut agents = lock(&self.inner.agents);
        agents.push(AgentSpec {
            name: name.to_string(),
            topic: topic.inner.name.clone(),
            start,
            also: Vec::new(),
            concurrency: 1,
            every_core: false,
            isolated: false,
            patterns: Vec::new(),
            supervision: Some(supervision),
        });
        Agent { app: self.inner.clone(), index: agents.len() - 1, topic: topic.clone() }
    }
}

/// Decodes a record's key (when `decodes_key`) and value as an agent of `K` and `V` with
/// these codecs would; what [`TopicInner::check`](crate::topic::TopicInner::check) runs.
pub(crate) fn decode_check<K, V>(key_codec: &Codec, value_codec: &Codec, decodes_key: bool) -> crate::topic::RecordCheck
where
    K: DeserializeOwned + 'static,
    V: DeserializeOwned + 'static,
{
    let (key_codec, value_codec) = (key_codec.clone(), value_codec.clone());
    Arc::new(move |key, value| {
        if decodes_key && let Some(key) = key {
            key_codec.decode::<K>(key).map(drop).map_err(|e| format!("key: {e}"))?;
        }
        value_codec.decode::<V>(value).map(drop).map_err(|e| format!("value: {e}"))
    })
}

impl App {
    /// Declares a table (Faust's `app.Table`) with keys `K` and values `V`, encoded with the
    /// app's default codecs; see [`Table`](crate::Table). Its changelog topic,
    /// `{app}-{name}-changelog`, is created (compacted) when the worker starts.
    pub fn table<K, V>(&self, name: &str) -> crate::Table<K, V>
    where
        K: Serialize + DeserializeOwned + std::hash::Hash + Eq + Clone + 'static,
        V: Serialize + DeserializeOwned + Clone + 'static,
    {
        let settings = &self.inner.settings;
        let (key, value) = (settings.key_serializer.clone(), settings.value_serializer.clone());
        crate::Table::declare(&self.inner.tables, name, &settings.id, key, value)
    }
}

/// How the worker creates a topic the app declared: [`App::configure_topic`]. Unset options
/// keep the app's defaults (`topic_partitions`, `topic_replication_factor`, no retention).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopicOptions {
    partitions: Option<u32>,
    replicas: Option<i16>,
    retention: Option<std::time::Duration>,
    retention_bytes: Option<u64>,
    compacting: bool,
    broker_config: Vec<(String, String)>,
}

impl TopicOptions {
    /// No options set.
    pub fn new() -> TopicOptions {
        TopicOptions::default()
    }

    /// Its partition count (Faust's `partitions=`).
    pub fn partitions(mut self, n: u32) -> TopicOptions {
        self.partitions = Some(n.max(1));
        self
    }

    /// Its replication factor on Kafka (Faust's `replicas=`).
    pub fn replicas(mut self, n: i16) -> TopicOptions {
        self.replicas = Some(n);
        self
    }

    /// Records older than this are deleted (Faust's `retention=`; Kafka's `retention.ms`).
    pub fn retention(mut self, age: std::time::Duration) -> TopicOptions {
        self.retention = Some(age);
        self
    }

    /// The oldest records are deleted while a partition is larger than this
    /// (`retention.bytes`).
    pub fn retention_bytes(mut self, bytes: u64) -> TopicOptions {
        self.retention_bytes = Some(bytes);
        self
    }

    /// Only the latest record of each key is kept (Faust's `compacting=True`; Kafka's
    /// `cleanup.policy=compact`).
    pub fn compacting(mut self) -> TopicOptions {
        self.compacting = true;
        self
    }

    /// More of the topic's configuration on Kafka, by the broker's name (Faust's `config=`):
    /// `min.insync.replicas`, `segment.bytes`... An entry for `cleanup.policy`,
    /// `retention.ms`, `retention.bytes` or `delete.retention.ms` applies on every transport
    /// (and wins over the options above); the others go to Kafka only.
    pub fn broker_config(mut self, name: &str, value: &str) -> TopicOptions {
        self.broker_config.push((name.to_string(), value.to_string()));
        self
    }
}
