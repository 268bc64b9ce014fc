//! The worker: start-up, the per-core runtime (consumers, ack tracking, commits, agents),
//! and shutdown.
//!
//! On each core: one consumer task per assigned partition fetches records and hands them to
//! the queue of every agent subscribed to the topic. A full queue stops that partition's
//! fetching until the agent catches up (back-pressure, per partition). Agents ack an event
//! when they ask for the next one; a commit task commits, per partition, the offset below
//! which every delivered event was acked. An agent's sends are awaited before it moves on,
//! so an offset is only committed after the records produced for it are durable.

mod group;
mod outbox;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_listener::Event;
use faust_transport::{TopicConfig, TopicPartition};

use crate::app::{AgentSpec, App, TopicKind};
use crate::runtime::queue::Scope;
use crate::runtime::state::TableMeta;
use crate::runtime::supervise::AgentRun;
use crate::runtime::{CoreRuntime, CoreSetup};
use crate::runtime::{RuntimeConfig, RuntimeError, run_on_cores};
use crate::transports::{AnyCore, AnyTransport};
use crate::util::lock;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The runtime could not start.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The transport failed at start-up or shutdown.
    #[error(transparent)]
    Transport(#[from] faust_transport::Error),
    /// Start-up failed on a core.
    #[error("core {core}: {message}")]
    Core {
        /// The core.
        core: usize,
        /// What went wrong.
        message: String,
    },
    /// A bad record stopped the worker (`bad_record_policy = stop`); it is not committed, so
    /// a restart meets it again.
    #[error("{0} (bad_record_policy = stop; it stays uncommitted)")]
    BadRecord(crate::runtime::bad_record::BadRecord),
    /// The broker lost records the worker had already read: a partition's log ends before
    /// the worker's position in it (a broker restarted without its data, a topic deleted and
    /// created again, an unclean leader election). The worker commits nothing after seeing
    /// it, so neither offsets nor table state from the old log reach the new one; a restart
    /// follows the broker as it is now (see docs/engine.md, "Kafka").
    #[error(
        "the broker lost data of {tp}: the worker had read up to offset {position}, but {}; nothing was committed after that",
        match high_watermark { Some(end) => format!("the log now ends at {end}"), None => "the partition no longer exists".to_string() }
    )]
    BrokerLostData {
        /// The partition.
        tp: TopicPartition,
        /// The offset the worker was about to fetch.
        position: u64,
        /// Where the partition's log ends now, or `None` when the broker no longer has the
        /// partition (it kept answering that the topic or partition is unknown).
        high_watermark: Option<u64>,
    },
    /// The worker stopped because of its consumer group (joining failed, an assignment change
    /// could not be applied, ...).
    #[error("group `{group}`: {message}")]
    Group {
        /// The group (the app id).
        group: String,
        /// What went wrong.
        message: String,
    },
    /// The settings ask for something the transport cannot do.
    #[error("{setting}: {message}")]
    Unsupported {
        /// The setting.
        setting: &'static str,
        /// What cannot be done, and what to do instead.
        message: String,
    },
}

/// Topics grouped by partition count: each group is co-partitioned, as in Faust (a source,
/// its repartition topics and the changelogs of its tables have the same count), so
/// partition `p` of each lands on the same worker and core.
///
/// The `leader` topic (one partition) joins the group with the most partitions, where it
/// rides along with slot 0: leadership goes with partition 0 of the app's main topics
/// instead of counting as a partition of its own in the balance (which would give its holder
/// one source partition less than the others).
fn copartitioned(counts: &std::collections::BTreeMap<Arc<str>, u32>, leader: Option<&str>) -> Vec<Vec<Arc<str>>> {
    let mut by_count: std::collections::BTreeMap<u32, Vec<Arc<str>>> = std::collections::BTreeMap::new();
    let mut leader_topic = None;
    for (topic, count) in counts {
        if leader == Some(&**topic) {
            leader_topic = Some(topic.clone());
            continue;
        }
        by_count.entry(*count).or_default().push(topic.clone());
    }
    if let Some(topic) = leader_topic {
        match by_count.values_mut().next_back() {
            Some(largest) => largest.push(topic),
            None => {
                by_count.insert(1, vec![topic]);
            }
        }
    }
    by_count.into_values().collect()
}

/// Start-up state shared by the cores and the control thread.
struct Startup {
    topics_ready: AtomicBool,
    /// Cores that applied their first assignment (the worker is ready when all did).
    cores_ready: Arc<std::sync::atomic::AtomicUsize>,
    /// Cores past their final commit (or that ended early): a core keeps its transport (its
    /// appenders, which other cores' final commits may write through) until all are.
    cores_committed: std::sync::atomic::AtomicUsize,
    /// Partition counts of the topics whose partitions the worker takes (sources and
    /// changelogs), set with `topics_ready`.
    counts: Mutex<std::collections::BTreeMap<Arc<str>, u32>>,
    /// The app's agents as this run has them: set by core 0 with `topics_ready`, once it
    /// subscribed the agents with topic patterns to the topics that match.
    agents: Mutex<Arc<Vec<AgentSpec>>>,
    event: Event,
    /// The bad record that stopped the worker, if one did.
    stopped_at: Arc<Mutex<Option<crate::runtime::bad_record::BadRecord>>>,
    /// Where the broker was found to have lost data, if it was.
    lost_data: crate::runtime::consume::LostData,
}

/// Counts a core as past its final commit when dropped (also on an early return).
struct Committed<'a>(&'a Startup);

impl Drop for Committed<'_> {
    fn drop(&mut self) {
        self.0.cores_committed.fetch_add(1, Ordering::AcqRel);
        self.0.event.notify(usize::MAX);
    }
}

impl Startup {
    async fn wait_until(&self, ready: impl Fn() -> bool) {
        loop {
            let listener = self.event.listen();
            if ready() {
                return;
            }
            listener.await;
        }
    }
}

impl App {
    /// Runs the worker until [`StopSignal::stop`](crate::StopSignal::stop) is called: creates the declared topics,
    /// takes the partitions the transport assigns, places them on the cores and runs every
    /// agent on every core for its partitions.
    pub fn run(&self) -> Result<(), WorkerError> {
        run(self)
    }
}

pub(crate) fn run(app: &App) -> Result<(), WorkerError> {
    app.inner.services.worker_init();
    loop {
        let result = run_once(app);
        // A run ended to take on new subscriptions starts again at once; a failed one, or a
        // stop asked for meanwhile, ends the worker.
        if result.is_ok() && app.inner.stop.take_restart() {
            tracing::info!(app = %app.inner.settings.id, "starting the worker again with its new subscriptions");
            continue;
        }
        return result;
    }
}

/// One run of the worker: from joining its group to leaving it.
fn run_once(app: &App) -> Result<(), WorkerError> {
    let settings = app.inner.settings.clone();
    app.declare_leader_election();
    let leader_topic = crate::app::services::leader_topic(&settings);
    let cores = crate::runtime::choose_cpus(settings.cores, &crate::runtime::usable_cpus())?.len();
    // Only what is kept on disk needs the data directory (tests on memory:// leave none).
    if settings.broker_url().starts_with("local://") {
        std::fs::create_dir_all(&settings.datadir).map_err(|source| faust_transport::Error::Io {
            op: "create data directory",
            path: settings.datadir.clone(),
            source,
        })?;
    }
    let tables: Vec<Arc<dyn TableMeta>> = app.inner.tables.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let store_backed = settings.store != "memory://" && tables.iter().any(|t| !t.in_memory());
    if store_backed {
        std::fs::create_dir_all(&settings.datadir).map_err(|source| faust_transport::Error::Io {
            op: "create data directory",
            path: settings.datadir.clone(),
            source,
        })?;
    }
    let memory = app.inner.memory.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // Static partitions, as partitions of every topic the worker may consume (the group
    // joins only some of them; the transport keeps those).
    let partitions = settings.partitions.as_ref().map(|numbers| {
        let declared = app.inner.topics.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let names = declared.iter().filter(|t| t.kind == TopicKind::Log).map(|t| t.name.clone());
        let names: std::collections::BTreeSet<Arc<str>> =
            names.chain(tables.iter().map(|t| t.changelog().clone())).collect();
        names.iter().flat_map(|n| numbers.iter().map(move |&p| TopicPartition::new(n.clone(), p))).collect::<Vec<_>>()
    });
    // The CLI's commands reach a worker that keeps state in its data directory through a
    // socket there, and anyone through the web server; the cores answer both from their
    // inboxes.
    let inboxes: Vec<Arc<crate::control::Inbox>> = (0..cores).map(|_| Arc::default()).collect();
    let cores_ready = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let _web = if settings.web_enabled {
        let ready = {
            let cores_ready = cores_ready.clone();
            Arc::new(move || cores_ready.load(Ordering::Acquire) >= cores) as Arc<dyn Fn() -> bool + Send + Sync>
        };
        crate::control::web::WebServer::start(app, inboxes.clone(), ready)
            .map_err(|e| tracing::warn!(error = %e, "running without the web server"))
            .ok()
    } else {
        None
    };
    // Where others reach this worker: its web server, and its control socket for the CLI.
    let advertised = {
        let web = _web.as_ref().map(|w| format!("http://{}", w.addr()));
        let socket = std::path::absolute(settings.datadir.join(crate::control::SOCKET_NAME))
            .map(|p| format!("unix://{}", p.display()))
            .ok();
        web.into_iter().chain(socket).collect::<Vec<_>>().join(" ")
    };
    let kafka = faust_transport::KafkaOptions { partitions, advertised_url: advertised, ..settings.kafka_options() };
    let transport = AnyTransport::open(&settings.broker_url(), cores, memory.as_ref(), kafka, settings.segment_bytes)?;
    if settings.processing_guarantee == crate::settings::ProcessingGuarantee::ExactlyOnce
        && matches!(transport, AnyTransport::Memory(_))
    {
        return Err(WorkerError::Unsupported {
            setting: "processing_guarantee = exactly_once",
            message: format!(
                "exactly-once outputs work on local:// and kafka://, not on {} (use at_least_once: tables are exact either way)",
                settings.broker_url()
            ),
        });
    }
    let startup = Arc::new(Startup {
        topics_ready: AtomicBool::new(false),
        cores_ready,
        cores_committed: std::sync::atomic::AtomicUsize::new(0),
        counts: Mutex::new(std::collections::BTreeMap::new()),
        agents: Mutex::default(),
        event: Event::new(),
        stopped_at: Arc::default(),
        lost_data: Arc::default(),
    });
    let commands: Vec<Arc<crate::runtime::assignment::Commands>> = (0..cores).map(|_| Arc::default()).collect();
    // A control socket that cannot be opened is logged, not fatal.
    let _control_socket = if settings.broker_url().starts_with("local://") || store_backed {
        crate::control::ControlServer::start(&settings.datadir, app, inboxes.clone()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "running without a control socket: the CLI cannot reach this worker");
            None
        })
    } else {
        None
    };
    let cores_done = Arc::new(crate::runtime::signal::StopSignal::default());
    let group_failure: Arc<Mutex<Option<String>>> = Arc::default();

    // The control thread: membership and placement.
    let control = {
        let (transport, startup, stop) = (transport.clone(), startup.clone(), app.inner.stop.clone());
        let (commands, cores_done, counters) = (commands.clone(), cores_done.clone(), app.inner.stats.clone());
        let failure = group_failure.clone();
        let settings = settings.clone();
        let (services, leader_topic) = (app.inner.services.clone(), leader_topic.clone());
        let sensors: crate::runtime::sensor::Sensors =
            lock(&app.inner.sensors).iter().cloned().collect::<Vec<_>>().into();
        std::thread::Builder::new()
            .name(format!("{}-control", settings.id))
            .spawn(move || {
                futures_lite::future::block_on(async {
                    startup.wait_until(|| startup.topics_ready.load(Ordering::Acquire) || stop.is_stopped()).await;
                    if !startup.topics_ready.load(Ordering::Acquire) {
                        return;
                    }
                    let counts = startup.counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let groups = copartitioned(&counts, leader_topic.as_deref());
                    let join = faust_transport::JoinRequest {
                        topics: counts.keys().map(|t| t.to_string()).collect(),
                        copartitioned: groups.iter().map(|g| g.iter().map(|t| t.to_string()).collect()).collect(),
                        weight: cores as u32,
                        changelogs: tables.iter().map(|t| t.changelog().to_string()).collect(),
                    };
                    // A core releases within the shutdown timeout (agents finishing their
                    // events) plus a commit; the rest is margin for a loaded machine.
                    let timeout = settings.shutdown_timeout + Duration::from_secs(60);
                    let placement = group::Placement::new(transport.clone(), cores, groups, commands, timeout);
                    group::Control {
                        transport,
                        group: settings.id.clone(),
                        join,
                        placement,
                        stop,
                        cores_done,
                        counters,
                        failure,
                        first_wait: Duration::from_secs(1),
                        sensors,
                        services,
                        leader_topic,
                    }
                    .run()
                    .await;
                })
            })
            .map_err(|e| WorkerError::Core { core: 0, message: format!("starting the control thread: {e}") })?
    };

    app.inner.outbox.open();
    let config = RuntimeConfig {
        cores: Some(cores),
        name: settings.id.clone(),
        spin: settings.worker_spin,
        ..RuntimeConfig::default()
    };
    let results = {
        let (app, transport, startup, commands) = (app.clone(), transport.clone(), startup.clone(), commands.clone());
        let inboxes = inboxes.clone();
        run_on_cores(&config, move |ctx| {
            let (app, transport, startup) = (app.clone(), transport.clone(), startup.clone());
            let (commands, inbox) = (commands[ctx.index].clone(), inboxes[ctx.index].clone());
            let core = CoreMain { index: ctx.index, cores: ctx.cores, app, transport, startup, commands, inbox };
            async move { core_main(core).await }
        })
    };
    // Whatever happened, let the control thread finish: it leaves the group now that the
    // cores made their last commits.
    startup.topics_ready.store(true, Ordering::Release);
    let restarting = app.inner.stop.is_restarting();
    if !restarting {
        app.inner.stop.stop();
    }
    startup.event.notify(usize::MAX);
    for c in &commands {
        c.close();
    }
    cores_done.stop();
    let _ = control.join();
    transport.close();
    // Whoever still waits on the worker (sends from outside, test probes) hears it stopped;
    // across a restart they wait for the next run.
    let outbox = &app.inner.outbox;
    if !restarting {
        let topics = outbox.topics();
        for record in outbox.take(true).records {
            if let Some(reply) = record.reply {
                let topic = topics.get(record.topic).map_or_else(String::new, |t| t.name.to_string());
                reply.set(Err(crate::error::SendError::Stopped { topic }));
            }
        }
        for probe in outbox.take_probes() {
            probe.reply.set(Err(crate::error::SendError::Stopped { topic: probe.tp.topic.to_string() }));
        }
    }
    let results = results?;
    if let Some(bad) = lock(&startup.stopped_at).take() {
        return Err(WorkerError::BadRecord(bad));
    }
    if let Some((tp, position, high_watermark)) = lock(&startup.lost_data).take() {
        return Err(WorkerError::BrokerLostData { tp, position, high_watermark });
    }
    for (core, r) in results.into_iter().enumerate() {
        r.map_err(|message| WorkerError::Core { core, message })?;
    }
    match group_failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(message) => Err(WorkerError::Group { group: settings.id.clone(), message }),
        None => Ok(()),
    }
}

/// How long the changelog of a windowed table keeps the tombstone of an expired window.
const WINDOW_TOMBSTONE_RETENTION: std::time::Duration = std::time::Duration::from_secs(5);

/// Creates this worker's reply topic (`{id}-reply-{instance}`) and makes it where questions
/// asked in this process want their replies.
async fn create_reply_topic(core: &AnyCore, app: &App) -> Result<(), faust_transport::Error> {
    let settings = &app.inner.settings;
    let instance = transactional_instance(settings).map_err(|message| faust_transport::Error::Io {
        op: "read the worker's instance id",
        path: settings.datadir.clone(),
        source: std::io::Error::other(message),
    })?;
    let name = crate::app::rpc::reply_topic(&settings.id, &instance);
    core.create_topic(&name, &crate::app::rpc::reply_topic_config()).await?;
    app.inner.replies.set_topic(Some(Arc::from(name)));
    Ok(())
}

/// Creates the declared topics and the tables' changelogs (core 0, before anything else
/// runs); returns the partition count of every topic whose partitions the worker takes.
async fn create_topics(
    core: &AnyCore,
    settings: &crate::settings::Settings,
    declared: &[crate::app::TopicDecl],
    tables: &[Arc<dyn TableMeta>],
    sources: &[Arc<str>],
) -> Result<std::collections::BTreeMap<Arc<str>, u32>, faust_transport::Error> {
    let mut counts = std::collections::BTreeMap::new();
    let mut created: std::collections::BTreeMap<Arc<str>, u32> = std::collections::BTreeMap::new();
    for t in declared.iter().filter(|t| t.kind == TopicKind::Log) {
        // `topic_partitions` is the default for new topics: an existing topic declared
        // without a partition count keeps its own; an explicit count must match. A
        // repartition topic has its source's count.
        let existing = core.topic_metadata(&t.name).await?;
        let wanted = t.partitions.or_else(|| t.partitions_like.as_ref().and_then(|like| created.get(like).copied()));
        let count = match (existing, wanted) {
            (Some(meta), None) => meta.config.partitions,
            (_, wanted) => {
                let config = t.config(wanted.unwrap_or(settings.topic_partitions));
                core.create_topic(&t.name, &config).await?.config.partitions
            }
        };
        created.insert(t.name.clone(), count);
        if sources.contains(&t.name) {
            counts.insert(t.name.clone(), count);
        }
    }
    // The dead-letter topic, when bad records go to one.
    if let Some(topic) = settings.dead_letter_topic()
        && core.topic_metadata(&topic).await?.is_none()
    {
        core.create_topic(&topic, &TopicConfig::new(settings.topic_partitions)).await?;
    }
    // Changelogs: compacted; an existing one keeps its partition count unless the table
    // names another (then it must match). A new one takes the partition count of the topics
    // the agents consume when they all have the same (a table is co-partitioned with its
    // agent's topic: an existing topic with 4 partitions gets a 4-partition changelog even
    // though `topic_partitions` says 8), and `topic_partitions` otherwise.
    // (The leader topic's one partition says nothing about the app's data.)
    let leader = crate::app::services::leader_topic(settings);
    let source_counts: std::collections::BTreeSet<u32> =
        sources.iter().filter(|s| leader.as_deref() != Some(&***s)).filter_map(|s| created.get(s).copied()).collect();
    let default_count = match source_counts.iter().collect::<Vec<_>>()[..] {
        [&only] => only,
        _ => settings.topic_partitions,
    };
    for t in tables {
        let existing = core.topic_metadata(t.changelog()).await?;
        let wanted = t.partitions().or_else(|| t.partitions_like().and_then(|like| created.get(&like).copied()));
        let count = match (existing, wanted) {
            (Some(meta), None) => meta.config.partitions,
            (_, wanted) => {
                let config = TopicConfig {
                    compacted: true,
                    // An expired window's tombstone may go soon: a store that still holds the
                    // window (a stale one that missed the tombstone) finds it closed and past
                    // its expiry, and deletes it again (docs/windows.md, "Bounded state").
                    delete_retention: t.windowed().then_some(WINDOW_TOMBSTONE_RETENTION),
                    ..TopicConfig::new(wanted.unwrap_or(default_count))
                };
                core.create_topic(t.changelog(), &config).await?.config.partitions
            }
        };
        counts.insert(t.changelog().clone(), count);
    }
    Ok(counts)
}

/// Which agents get the events of which topic, by their index in the run's agents.
struct AgentRoutes {
    /// Channels, with the agents on each.
    channels: HashMap<Arc<str>, Vec<usize>>,
    /// Topics, with the agents consuming each (agents on several topics get the others'
    /// events in the same queue).
    by_topic: HashMap<Arc<str>, Vec<usize>>,
}

impl AgentRoutes {
    fn of(declared: &[crate::app::TopicDecl], specs: &[AgentSpec]) -> AgentRoutes {
        let mut channels: HashMap<Arc<str>, Vec<usize>> = HashMap::default();
        for t in declared.iter().filter(|t| t.kind == TopicKind::Channel) {
            let agents = specs.iter().enumerate().filter(|(_, s)| s.topic == t.name).map(|(i, _)| i).collect();
            channels.insert(t.name.clone(), agents);
        }
        let mut by_topic: HashMap<Arc<str>, Vec<usize>> = HashMap::default();
        for (i, spec) in specs.iter().enumerate() {
            if !spec.topic.is_empty() && !channels.contains_key(&spec.topic) {
                by_topic.entry(spec.topic.clone()).or_default().push(i);
            }
        }
        for (i, spec) in specs.iter().enumerate() {
            for topic in spec.also.iter().filter(|t| !channels.contains_key(*t)) {
                by_topic.entry(topic.clone()).or_default().push(i);
            }
        }
        AgentRoutes { channels, by_topic }
    }
}

/// What one core of the worker runs with.
struct CoreMain {
    index: usize,
    cores: usize,
    app: App,
    transport: AnyTransport,
    startup: Arc<Startup>,
    commands: Arc<crate::runtime::assignment::Commands>,
    inbox: Arc<crate::control::Inbox>,
}

async fn core_main(core_main: CoreMain) -> Result<(), String> {
    let CoreMain { index, cores, app, transport, startup, commands, inbox } = core_main;
    let settings = &app.inner.settings;
    let stop = app.inner.stop.clone();
    let committed_guard = Committed(&startup);
    let core = transport.attach_core(index, cores).await.map_err(|e| e.to_string())?;
    if settings.processing_guarantee == crate::settings::ProcessingGuarantee::ExactlyOnce
        && let AnyCore::Kafka(kafka) = &core
    {
        // A transactional producer per core; its id outlives restarts, so a new life of this
        // worker fences whatever an old one left in flight.
        let id = format!("{}-{}-{index}", settings.id, transactional_instance(settings)?);
        let timeout = (settings.commit_interval * 10).max(std::time::Duration::from_secs(60));
        kafka.init_transactions(&id, timeout).await.map_err(|e| format!("transactional id {id}: {e}"))?;
    }
    if index == 0 {
        // What this run consumes: the agents as they are now (agents that re-route their
        // streams, or whose patterns matched, added to them for this run), with the topics
        // their patterns match now.
        let subscribed = if crate::app::pattern::has_patterns(&app) {
            core.topic_names().await.map(|names| crate::app::pattern::subscribe_at_start(&app, names))
        } else {
            Ok(())
        };
        let agents = Arc::new(lock(&app.inner.agents).clone());
        *lock(&startup.agents) = agents.clone();
        let declared = lock(&app.inner.topics).clone();
        let tables: Vec<Arc<dyn TableMeta>> = lock(&app.inner.tables).clone();
        let sources: Vec<Arc<str>> = AgentRoutes::of(&declared, &agents).by_topic.keys().cloned().collect();
        let mut created = match subscribed {
            Ok(()) => create_topics(&core, settings, &declared, &tables, &sources).await,
            Err(e) => Err(e),
        };
        if created.is_ok()
            && app.inner.replies.wanted()
            && let Err(e) = create_reply_topic(&core, &app).await
        {
            created = Err(e);
        }
        if let Ok(counts) = &created {
            *startup.counts.lock().unwrap_or_else(|p| p.into_inner()) = counts.clone();
        }
        startup.topics_ready.store(true, Ordering::Release);
        startup.event.notify(usize::MAX);
        if let Err(e) = created {
            stop.stop();
            let _ = core.shutdown().await;
            return Err(format!("creating topics: {e}"));
        }
    }
    futures_lite::future::or(startup.wait_until(|| startup.topics_ready.load(Ordering::Acquire)), stop.wait()).await;
    let agents = lock(&startup.agents).clone();
    let specs = &*agents;
    let declared = lock(&app.inner.topics).clone();
    let tables: Vec<Arc<dyn TableMeta>> = lock(&app.inner.tables).clone();
    let AgentRoutes { channels: channel_agents, by_topic: agents_by_topic } = AgentRoutes::of(&declared, specs);
    let mut partitions = HashMap::default();
    let dead_letter: Option<Arc<str>> = settings.dead_letter_topic().map(Arc::from);
    // The tables' changelogs too: a table write checks that its changelog has as many
    // partitions as the topic of the event (co-partitioning).
    let known = declared
        .iter()
        .filter(|t| t.kind == TopicKind::Log)
        .map(|t| t.name.clone())
        .chain(dead_letter.clone())
        .chain(tables.iter().map(|t| t.changelog().clone()));
    for name in known {
        match core.topic_metadata(&name).await {
            Ok(Some(meta)) => {
                partitions.insert(name, meta.config.partitions);
            }
            Ok(None) => {}
            Err(e) => return Err(format!("reading topic {name}: {e}")),
        }
    }
    let changelog_tables: std::collections::HashSet<Arc<str>> = tables.iter().map(|t| t.changelog().clone()).collect();
    // The repartition topics: those a `group_by` declared (with their positions table).
    let repartition =
        app.inner.outbox.topics().into_iter().filter(|t| t.positions.get().is_some()).map(|t| t.name.clone());
    let leader = crate::app::services::leader_topic(settings).map(Arc::from);
    let internal_topics = changelog_tables.iter().cloned().chain(repartition).chain(leader).collect();
    let runtime = CoreRuntime::install(CoreSetup {
        index,
        transport: core,
        settings: Arc::new(settings.clone()),
        partitions,
        agents: specs.len(),
        channel_agents,
        app_stop: stop.clone(),
        tables,
        agents_by_topic,
        stats: app.inner.stats.clone(),
        dead_letter,
        stopped_at: startup.stopped_at.clone(),
        lost_data: startup.lost_data.clone(),
        internal_topics,
        sensors: lock(&app.inner.sensors).iter().cloned().collect::<Vec<_>>().into(),
    });

    // The first assignment, before any agent or task runs: table shards are recovered before
    // their partitions are consumed, and tasks send to partitions already placed.
    let first = futures_lite::future::or(commands.next(runtime.stopping()), async {
        stop.wait().await;
        None
    })
    .await;
    // Agents with isolated partitions: an actor per partition, started and stopped with
    // the core's assignment.
    let isolated: Rc<Vec<IsolatedAgent>> = Rc::new(
        specs
            .iter()
            .enumerate()
            .filter(|(_, spec)| spec.isolated && !spec.topic.is_empty())
            .map(|(agent, spec)| {
                // Each actor reads its own partition's lane: a new event wakes them all.
                runtime.queue(agent).isolate();
                IsolatedAgent {
                    agent,
                    topics: std::iter::once(spec.topic.clone()).chain(spec.also.iter().cloned()).collect(),
                    start: spec.start.clone(),
                    actors: RefCell::default(),
                    finished: RefCell::default(),
                }
            })
            .collect(),
    );
    if let Some(command) = first {
        runtime.apply(command).await;
    }
    for agent in isolated.iter() {
        agent.follow_assignment(&runtime);
    }
    if startup.cores_ready.fetch_add(1, Ordering::AcqRel) + 1 == cores && !stop.is_stopped() {
        let counts = startup.counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tracing::info!(app = %settings.id, cores, topics = counts.len(), partitions = counts.values().sum::<u32>(),
            "the worker is ready: its partitions are recovered and being processed");
        app.inner.services.startup_finished();
    }
    // Later assignment changes, one at a time.
    let control_task = {
        let (runtime, commands, isolated) = (runtime.clone(), commands.clone(), isolated.clone());
        glommio::spawn_local(async move {
            while let Some(command) = commands.next(runtime.stopping()).await {
                runtime.apply(command).await;
                for agent in isolated.iter() {
                    agent.follow_assignment(&runtime);
                }
            }
        })
    };

    // Agents on every core; tasks (no topic) on core 0 only, cancelled at shutdown.
    let mut agent_tasks = Vec::new();
    let mut background = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let run = || AgentRun {
            core: runtime.clone(),
            agent: i,
            queue: runtime.queue(i),
            current: Rc::new(RefCell::new(Vec::new())),
            scope: Scope::All,
        };
        if spec.topic.is_empty() {
            if index == 0 || spec.every_core {
                background.push(glommio::spawn_local((spec.start)(run())));
            }
            continue;
        }
        if spec.isolated {
            // Started per partition, above.
            continue;
        }
        tracing::debug!(agent = %spec.name, core = index, topic = %spec.topic, concurrency = spec.concurrency, "starting agent");
        // Instances share the queue; each has its own events in hand.
        for _ in 0..spec.concurrency {
            agent_tasks.push(glommio::spawn_local((spec.start)(run())));
        }
    }
    // Commits.
    let committer = glommio::spawn_local(crate::runtime::commit::run_commits(runtime.clone()));
    // Compaction and retention, so that the disk stays bounded.
    let upkeep = glommio::spawn_local(crate::runtime::upkeep::run_upkeep(runtime.clone()));
    // Standby replicas, brought up to the committed changelog offsets.
    let standbys = glommio::spawn_local(crate::runtime::standby::run_standbys(runtime.clone()));

    // Buffered sends.
    let flusher = glommio::spawn_local(crate::runtime::sends::flush_buffered(runtime.clone()));
    // Queries from the control socket.
    let queries = glommio::spawn_local(inbox.clone().serve(runtime.clone()));
    // Sends from outside the worker.
    let outbox = app.inner.outbox.clone();
    let outbox_task = (index == 0).then(|| glommio::spawn_local(outbox::serve_outbox(runtime.clone(), outbox.clone())));
    // Replies to this worker's questions to agents.
    let reply_reader = (index == 0).then(|| app.inner.replies.topic()).flatten().map(|topic| {
        glommio::spawn_local(crate::app::rpc::read_replies(runtime.clone(), topic, app.inner.replies.clone()))
    });

    // Topics created later that match an agent's pattern: the run restarts to consume them.
    let pattern_watch = (index == 0 && specs.iter().any(|spec| !spec.patterns.is_empty()))
        .then(|| glommio::spawn_local(crate::app::pattern::watch_for_new_matches(runtime.clone(), app.clone())));

    stop.wait().await;
    drop(pattern_watch);
    if index == 0 && !stop.is_restarting() {
        app.inner.services.before_shutdown();
        // Questions asked from now on fail at once instead of waiting for replies never read.
        app.inner.replies.set_topic(None);
    }
    drop(reply_reader);
    // Shutdown: stop fetching, let agents drain what they were given, commit, release.
    drop(background);
    runtime.begin_stop();
    commands.close();
    inbox.close();
    control_task.await;
    queries.await;
    runtime.stop_consumers().await;
    // The actors of isolated partitions finish with the other agents.
    for agent in isolated.iter() {
        agent_tasks.extend(std::mem::take(&mut *agent.actors.borrow_mut()).into_values());
        agent_tasks.append(&mut agent.finished.borrow_mut());
    }
    // Agents finish the events they were given; one that does not within the grace period is
    // cancelled (its unacked event will be processed again after a restart).
    let grace = settings.shutdown_timeout;
    let deadline = std::time::Instant::now() + grace;
    for (i, t) in agent_tasks.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let finished = futures_lite::future::or(
            async {
                t.await;
                true
            },
            async {
                glommio::timer::sleep(left).await;
                false
            },
        )
        .await;
        if !finished {
            tracing::error!(
                core = index,
                agent = i,
                grace_ms = grace.as_millis() as u64,
                "agent did not finish after stop; cancelled it"
            );
        }
    }
    committer.await;
    upkeep.await;
    standbys.await;
    flusher.await;
    if let Some(task) = outbox_task {
        task.await;
        // Whatever was sent from outside until now is still sent (and flushed below).
        // (Across a restart the outbox stays open: later sends wait for the next run.)
        outbox::take_outbound(&runtime, &outbox, outbox.take(!stop.is_restarting())).await;
    }
    // Cancelled tasks release the runtime when the executor drops them. Two references stay:
    // this one and the thread's `CURRENT`.
    let release_deadline = std::time::Instant::now() + Duration::from_secs(1);
    while Rc::strong_count(&runtime) > 2 && std::time::Instant::now() < release_deadline {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    let result = match runtime.commit_now().await {
        Ok(true) => Ok(()),
        Ok(false) => Err("final commit: table state ran ahead of the committable offsets".to_string()),
        Err(e) => Err(format!("final commit: {e}")),
    };
    let failure = runtime.take_failure();
    // Other cores' final commits may still write through this core's appenders: keep the
    // transport until every core committed (bounded: a core that hangs is logged and left).
    drop(committed_guard);
    // Checked every few milliseconds as well as on notification: the last core's notification
    // comes from another thread while this executor may be about to park.
    let barrier_deadline = std::time::Instant::now() + settings.shutdown_timeout + Duration::from_secs(30);
    let all_committed = loop {
        if startup.cores_committed.load(Ordering::Acquire) >= cores {
            break true;
        }
        if std::time::Instant::now() >= barrier_deadline {
            break false;
        }
        futures_lite::future::or(
            startup.wait_until(|| startup.cores_committed.load(Ordering::Acquire) >= cores),
            glommio::timer::sleep(Duration::from_millis(5)),
        )
        .await;
    };
    if !all_committed {
        tracing::error!(core = index, "other cores did not finish their final commits in time; shutting down anyway");
    }
    runtime.close().await?;
    match failure {
        Some(e) => Err(e),
        None => result,
    }
}

/// An agent with isolated partitions on one core (Faust's `isolated_partitions=True`): one
/// actor per partition of its topics the core holds, each with that partition's events
/// only, started when the partition is taken and ended when it is released.
struct IsolatedAgent {
    agent: usize,
    topics: Vec<Arc<str>>,
    start: crate::runtime::supervise::StartAgent,
    actors: RefCell<std::collections::BTreeMap<TopicPartition, glommio::Task<()>>>,
    /// Actors of released partitions, which end by themselves (awaited at shutdown).
    finished: RefCell<Vec<glommio::Task<()>>>,
}

impl IsolatedAgent {
    /// After an assignment change: ends the actors of partitions the core released (they
    /// finished their events before the release was done) and starts one for each partition
    /// taken.
    fn follow_assignment(&self, runtime: &Rc<CoreRuntime>) {
        let queue = runtime.queue(self.agent);
        let held = runtime.consuming(&self.topics);
        let mut actors = self.actors.borrow_mut();
        let released: Vec<TopicPartition> = actors.keys().filter(|tp| !held.contains(tp)).cloned().collect();
        for tp in released {
            queue.retire(&tp);
            if let Some(task) = actors.remove(&tp) {
                self.finished.borrow_mut().push(task);
            }
        }
        for tp in held {
            if actors.contains_key(&tp) {
                continue;
            }
            tracing::debug!(core = runtime.index(), agent = self.agent, partition = %tp, "starting the partition's actor");
            let run = AgentRun {
                core: runtime.clone(),
                agent: self.agent,
                queue: queue.clone(),
                current: Rc::default(),
                scope: queue.partition_scope(&tp),
            };
            actors.insert(tp, glommio::spawn_local((self.start)(run)));
        }
    }
}

/// What names this worker in its cores' transactional ids: its static membership id, or an
/// id kept in its data directory (made on the first start), so that each worker has its own
/// and keeps it across restarts.
fn transactional_instance(settings: &crate::settings::Settings) -> Result<String, String> {
    if let Some(id) = &settings.consumer_group_instance_id {
        return Ok(id.clone());
    }
    let path = settings.datadir.join("transactional.id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let id = format!("{:x}{:x}", nanos as u64, std::process::id());
    std::fs::create_dir_all(&settings.datadir).map_err(|e| format!("creating {}: {e}", settings.datadir.display()))?;
    std::fs::write(&path, &id).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(id)
}
