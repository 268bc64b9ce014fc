//! The app: settings, topics and agents, and the worker that runs them.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use event_listener::Event;
use faust_transport::{MemoryTransport, Produced, TopicPartition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::Codec;
pub use crate::error::{AgentError, SendError};
pub use crate::runtime::signal::StopSignal;

/// The answer to a send made from outside the worker, or to a test's probe.
pub(crate) type Reply = crate::runtime::signal::Oneshot<Result<Produced, SendError>>;
use crate::runtime::CoreRuntime;
use crate::runtime::supervise::AgentRun;
use crate::settings::Settings;
use crate::stream::Stream;
pub(crate) use crate::util::lock;

pub(crate) type StartAgent = Arc<dyn Fn(AgentRun) -> Pin<Box<dyn Future<Output = ()>>> + Send + Sync>;

/// A registered agent.
#[derive(Clone)]
pub(crate) struct AgentSpec {
    pub(crate) name: String,
    pub(crate) topic: Arc<str>,
    pub(crate) start: StartAgent,
    /// Instances per core, sharing the core's events of the topic.
    pub(crate) concurrency: usize,
    /// For work without a topic: runs on every core (timers) rather than on core 0 (tasks).
    pub(crate) every_core: bool,
}

/// A topic declared by the app.
#[derive(Debug, Clone)]
pub(crate) struct TopicDecl {
    pub(crate) name: Arc<str>,
    pub(crate) partitions: Option<u32>,
    /// Created with the partition count of this (earlier declared) topic: a repartition
    /// topic has its source's.
    pub(crate) partitions_like: Option<Arc<str>>,
    pub(crate) kind: TopicKind,
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

/// Whether the worker takes records from outside its cores (0: not started yet, records wait).
const OUTBOX_RUNNING: u8 = 1;
const OUTBOX_STOPPED: u8 = 2;

/// Records sent from threads that are not worker cores (a web handler, a test, a load
/// generator): core 0 takes them in turn. Sends made before the worker starts wait for it.
///
/// Records are encoded straight into one shared buffer and name their topic by number, so a
/// send from outside allocates nothing per record, and the core neither frees memory another
/// thread allocated nor touches reference counts another thread keeps writing (both showed
/// in profiles of a generator thread feeding a core).
#[derive(Default)]
pub(crate) struct Outbox {
    queue: Mutex<Outgoing>,
    /// Emptied buffers, handed back by core 0 for reuse.
    spare: Mutex<Option<Outgoing>>,
    /// Every topic handle's shared part, by number (append-only).
    topics: Mutex<Vec<Arc<TopicInner>>>,
    /// Questions from tests: "has every agent finished this event?"
    probes: Mutex<Vec<Probe>>,
    pub(crate) event: Event,
    /// 0 until a worker starts, then `OUTBOX_RUNNING`, then `OUTBOX_STOPPED`.
    state: std::sync::atomic::AtomicU8,
}

/// Records sent from outside the worker: their encoded keys and values, back to back.
#[derive(Default)]
pub(crate) struct Outgoing {
    pub(crate) records: Vec<Outbound>,
    pub(crate) bytes: Vec<u8>,
}

/// One record sent from outside the worker; `reply` is set for `send` (which waits), not for
/// `send_soon`.
pub(crate) struct Outbound {
    /// The topic's number in the outbox.
    pub(crate) topic: usize,
    /// Where the key and value are in `Outgoing::bytes`.
    pub(crate) key: Option<std::ops::Range<usize>>,
    pub(crate) value: std::ops::Range<usize>,
    pub(crate) reply: Option<Arc<Reply>>,
}

/// Asks core 0 to answer once every agent of `tp`'s topic has finished the event at `offset`.
pub(crate) struct Probe {
    pub(crate) tp: TopicPartition,
    pub(crate) offset: u64,
    pub(crate) reply: Arc<Reply>,
    /// Commit (tables included) before answering.
    pub(crate) commit: bool,
}

impl Outbox {
    /// Numbers a topic handle.
    fn register(&self, topic: impl FnOnce(usize) -> TopicInner) -> Arc<TopicInner> {
        let mut topics = lock(&self.topics);
        let inner = Arc::new(topic(topics.len()));
        topics.push(inner.clone());
        inner
    }

    /// The topic handles, by number.
    pub(crate) fn topics(&self) -> Vec<Arc<TopicInner>> {
        lock(&self.topics).clone()
    }

    /// Encodes a record into the queue (nothing is queued when encoding fails).
    fn push<K: Serialize + 'static, V: Serialize + 'static>(
        &self,
        topic: &TopicInner,
        key: Option<&K>,
        value: &V,
        reply: Option<Arc<Reply>>,
    ) -> Result<(), SendError> {
        let mut queue = lock(&self.queue);
        if self.state.load(Ordering::Acquire) == OUTBOX_STOPPED {
            return Err(SendError::Stopped { topic: topic.name.to_string() });
        }
        let start = queue.bytes.len();
        let codec_err = |source| SendError::Codec { topic: topic.name.to_string(), source };
        let bytes = &mut queue.bytes;
        let encoded = (|| {
            let key = match key {
                Some(k) => {
                    topic.key_codec.encode_owned(k, bytes).map_err(codec_err)?;
                    Some(start..bytes.len())
                }
                None => None,
            };
            let value_start = bytes.len();
            topic.value_codec.encode_owned(value, bytes).map_err(codec_err)?;
            Ok((key, value_start..bytes.len()))
        })();
        let (key, value) = match encoded {
            Ok(ranges) => ranges,
            Err(e) => {
                queue.bytes.truncate(start);
                return Err(e);
            }
        };
        queue.records.push(Outbound { topic: topic.outbox_index, key, value, reply });
        drop(queue);
        self.event.notify(1);
        Ok(())
    }

    pub(crate) fn probe(&self, probe: Probe) {
        lock(&self.probes).push(probe);
        self.event.notify(1);
    }

    pub(crate) fn take_probes(&self) -> Vec<Probe> {
        std::mem::take(&mut *lock(&self.probes))
    }

    /// Opens the outbox for a worker that starts.
    pub(crate) fn open(&self) {
        self.state.store(OUTBOX_RUNNING, Ordering::Release);
    }

    /// Everything sent so far; with `close`, later sends fail with [`SendError::Stopped`].
    pub(crate) fn take(&self, close: bool) -> Outgoing {
        let spare = lock(&self.spare).take().unwrap_or_default();
        let mut queue = lock(&self.queue);
        if close {
            self.state.store(OUTBOX_STOPPED, Ordering::Release);
        }
        std::mem::replace(&mut *queue, spare)
    }

    /// Hands a processed batch's buffers back for reuse.
    pub(crate) fn recycle(&self, mut outgoing: Outgoing) {
        outgoing.records.clear();
        outgoing.bytes.clear();
        *lock(&self.spare) = Some(outgoing);
    }
}

pub(crate) struct AppInner {
    pub(crate) settings: Settings,
    pub(crate) topics: Mutex<Vec<TopicDecl>>,
    pub(crate) agents: Mutex<Vec<AgentSpec>>,
    pub(crate) tables: Mutex<Vec<Arc<dyn crate::runtime::state::TableMeta>>>,
    pub(crate) memory: Mutex<Option<MemoryTransport>>,
    pub(crate) stop: Arc<StopSignal>,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) stats: Arc<crate::runtime::stats::Counters>,
    /// The app's own commands for its command line.
    pub(crate) commands: Mutex<Vec<crate::cli::UserCommand>>,
}

thread_local! {
    /// Where a core encodes a buffered send before copying it into the partition's batch.
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
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
                tables: Mutex::new(Vec::new()),
                memory: Mutex::new(None),
                stop: Arc::new(StopSignal::default()),
                outbox: Arc::new(Outbox::default()),
                stats: Arc::default(),
                commands: Mutex::new(Vec::new()),
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
                topics: Mutex::new(lock(&inner.topics).clone()),
                agents: Mutex::new(lock(&inner.agents).clone()),
                tables: Mutex::new(lock(&inner.tables).clone()),
                memory: Mutex::new(lock(&inner.memory).clone()),
                stop: inner.stop.clone(),
                outbox: inner.outbox.clone(),
                stats: inner.stats.clone(),
                commands: Mutex::new(lock(&inner.commands).clone()),
            }),
        }
    }

    /// Runs the app's command line (Faust's `app.main()`) on the process's arguments and
    /// returns the exit code, for `fn main() -> ExitCode { app.main() }`.
    ///
    /// | command | what it does |
    /// |---|---|
    /// | `worker [--cores N] [--web-port P] [--partitions 0-3,6]` | runs the worker until Ctrl-C / SIGTERM (graceful; a second signal exits at once); `--partitions` (kafka:// only) takes only those partitions of each topic |
    /// | `send TOPIC [VALUE] [--key K] [--partition P] [--repeat N]` | sends records through the running worker; without VALUE, one per line of stdin |
    /// | `table get TABLE KEY`, `table dump TABLE` | reads a table of the running worker |
    /// | `agents`, `tables`, `topics` | lists what the app declares (`topics` adds record counts when a worker runs) |
    /// | `stats` | the running worker's counters ([`WorkerStats`](crate::WorkerStats)) |
    /// | `reset [--all] [--yes]` | deletes the table stores (with `--all`, the whole data directory), never under a running worker |
    /// | `completions SHELL` | prints a shell completion script |
    /// | the app's own | see [`App::command`] |
    ///
    /// Options for every command: `--datadir DIR`, `--broker URL`, `--log-level LEVEL` (logs go
    /// to stderr through `tracing`; default `info` for the worker and `warn` otherwise, or
    /// `RUST_LOG`), `--json` (results and listings as JSON). A worker that keeps state in its
    /// data directory listens on `{datadir}/control.sock`; `send` and `table` reach it there
    /// (on `local://` the worker owns the log).
    ///
    /// Exit codes: 0 done; 1 failed (the worker stopped with an error, a request failed);
    /// 2 usage or bad input (a value that is not valid JSON for a JSON topic, a partition out
    /// of range); 3 no worker is running for the data directory; 4 no such topic, table or
    /// key; 130 / 143 a second SIGINT / SIGTERM during a graceful stop.
    ///
    /// ```no_run
    /// use faust::{App, Settings};
    ///
    /// fn main() -> std::process::ExitCode {
    ///     let app = App::new(Settings::new("greetings"));
    ///     let greetings = app.topic::<String, String>("greetings");
    ///     app.agent("print", &greetings, |mut stream| async move {
    ///         while let Some(greeting) = stream.next().await {
    ///             println!("{greeting}");
    ///         }
    ///         Ok(())
    ///     });
    ///     app.main()
    /// }
    /// ```
    pub fn main(&self) -> std::process::ExitCode {
        // Arguments as the OS gave them: one that is not UTF-8 is a usage error or a binary
        // key or value, never a panic.
        self.main_from(std::env::args_os())
    }

    /// [`App::main`] on these arguments (the program's name first).
    pub fn main_from<I, T>(&self, args: I) -> std::process::ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString>,
    {
        crate::cli::main(self, args.into_iter().map(Into::into).collect())
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
        commands.push(crate::cli::UserCommand { name: name.to_string(), about: about.to_string(), run: Arc::new(run) });
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
        self.inner.stats.snapshot()
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
    pub fn channel<K, V>(&self, name: &str) -> Topic<K, V> {
        self.declare(name, Codec::JSON, Codec::JSON, TopicKind::Channel)
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
            topics.push(TopicDecl { name: Arc::from(name), partitions: None, partitions_like: None, kind });
        }
        let outbox = self.inner.outbox.clone();
        let inner = self.inner.outbox.register(|outbox_index| TopicInner {
            name: Arc::from(name),
            key_codec,
            value_codec,
            kind,
            outbox,
            outbox_index,
            positions: std::sync::OnceLock::new(),
            checks: Mutex::new(Vec::new()),
        });
        Topic { inner, _types: PhantomData }
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
        S: crate::group_by::Source<K, V>,
        F: Fn(Stream<K, V>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        let topic = source.consumed_by(self, name);
        self.agent_on(name, &topic, true, f)
    }

    /// Registers an agent on `topic` itself (see [`App::agent`]).
    /// Registers an agent on `topic`; `decodes_key` says whether its stream decodes keys (the
    /// re-keying agent of a `group_by` does not).
    pub(crate) fn agent_on<K, V, F, Fut>(&self, name: &str, topic: &Topic<K, V>, decodes_key: bool, f: F) -> Agent<K, V>
    where
        K: DeserializeOwned + 'static,
        V: DeserializeOwned + 'static,
        F: Fn(Stream<K, V>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        let (key_codec, value_codec) = (topic.inner.key_codec.clone(), topic.inner.value_codec.clone());
        lock(&topic.inner.checks).push(Arc::new(move |key, value| {
            if decodes_key && let Some(key) = key {
                key_codec.decode::<K>(key).map(drop).map_err(|e| format!("key: {e}"))?;
            }
            value_codec.decode::<V>(value).map(drop).map_err(|e| format!("value: {e}"))
        }));
        let topic_inner = topic.inner.clone();
        let f = Arc::new(f);
        let agent_name: Arc<str> = Arc::from(name);
        let start: StartAgent = Arc::new(move |run: AgentRun| {
            let (f, topic, name) = (f.clone(), topic_inner.clone(), agent_name.clone());
            Box::pin(crate::runtime::supervise::supervise(run, name, move |run: &AgentRun| {
                f(Stream::new(run, topic.key_codec.clone(), topic.value_codec.clone())
                    .deduplicated_by(topic.positions.get().cloned()))
            }))
        });
        let mut agents = lock(&self.inner.agents);
        agents.push(AgentSpec {
            name: name.to_string(),
            topic: topic.inner.name.clone(),
            start,
            concurrency: 1,
            every_core: false,
        });
        Agent { app: self.inner.clone(), index: agents.len() - 1, topic: topic.clone() }
    }

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
        let mut tables = lock(&self.inner.tables);
        let table = crate::Table::new(name, &settings.id, tables.len(), key, value);
        tables.push(table.shared.clone());
        table
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
            concurrency: 1,
            every_core: false,
        });
    }

    /// Registers `f` to run every `interval` on every core, from one interval after start-up
    /// until the worker stops (Faust's `@app.timer`, which runs once per worker: here each core
    /// runs it, and a table read in it sees that core's shards). A failing run is logged.
    pub fn timer<F, Fut>(&self, interval: std::time::Duration, f: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        let f = Arc::new(f);
        lock(&self.inner.agents).push(AgentSpec {
            name: "timer".to_string(),
            topic: Arc::from(""),
            start: Arc::new(move |run: AgentRun| {
                let f = f.clone();
                Box::pin(async move {
                    loop {
                        if !run.core.sleep_unless_stopped(interval).await {
                            return;
                        }
                        if let Err(e) = f().await {
                            tracing::error!(error = %e, "timer failed");
                        }
                    }
                })
            }),
            concurrency: 1,
            every_core: true,
        });
    }

    /// Runs the worker until [`StopSignal::stop`] is called: creates the declared topics,
    /// takes the partitions the transport assigns, places them on the cores and runs every
    /// agent on every core for its partitions.
    pub fn run(&self) -> Result<(), crate::worker::WorkerError> {
        crate::worker::run(self)
    }
}

/// A registered agent: sends to it, and its settings.
pub struct Agent<K, V> {
    app: Arc<AppInner>,
    index: usize,
    topic: Topic<K, V>,
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
type RecordCheck = Arc<dyn Fn(Option<&[u8]>, &[u8]) -> Result<(), String> + Send + Sync>;

impl TopicInner {
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
                self.inner.send_raw(&core, key_bytes.as_deref(), Some(&value_bytes), &[]).await
            }
            None => {
                let reply = Arc::new(Reply::default());
                self.inner.outbox.push(&self.inner, key, value, Some(reply.clone()))?;
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
            Some(core) => SCRATCH.with(|scratch| {
                let (key_bytes, value_bytes) = &mut *scratch.borrow_mut();
                key_bytes.clear();
                value_bytes.clear();
                let has_key = self.encode_into(key, value, key_bytes, value_bytes)?;
                self.inner.send_soon_raw(&core, None, has_key.then_some(&key_bytes[..]), value_bytes, &[])
            }),
            None => self.inner.outbox.push(&self.inner, key, value, None),
        }
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
        let partitions =
            core.partitions(&self.name).ok_or_else(|| SendError::UnknownTopic { topic: self.name.to_string() })?;
        let partition = match key {
            Some(k) => crate::partitioner::partition_for_key(k, partitions),
            None => core.round_robin(partitions),
        };
        Ok(TopicPartition::new(self.name.clone(), partition))
    }

    /// Sends already-encoded bytes; resolves once the transport has the record.
    pub(crate) async fn send_raw(
        &self,
        core: &Rc<CoreRuntime>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[faust_storage::Header<'_>],
    ) -> Result<Produced, SendError> {
        if self.kind == TopicKind::Channel {
            return core.deliver(&self.name, key, value).await;
        }
        let tp = self.route(core, key)?;
        // Records of a partition land in the order they were sent, buffered or not.
        if core.has_pending(&tp) {
            core.flush()
                .await
                .map_err(|e| SendError::Buffered { topic: self.name.to_string(), message: e.to_string() })?;
        }
        let size = key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len) + 128;
        let mut batch = faust_storage::BatchBuilder::with_capacity(size);
        batch.push(crate::util::now_ms(), key, value, headers);
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
