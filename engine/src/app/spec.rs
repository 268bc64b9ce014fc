//! What an app declares, as the worker and the command line read it: its settings, topics,
//! agents, tables and commands.

use std::sync::{Arc, Mutex};

use faust_transport::MemoryTransport;

use crate::error::AgentError;
use crate::runtime::signal::StopSignal;
use crate::runtime::supervise::StartAgent;
use crate::settings::Settings;
use crate::topic::TopicKind;
use crate::topic::outbox::Outbox;

/// A registered agent.
#[derive(Clone)]
pub(crate) struct AgentSpec {
    pub(crate) name: String,
    pub(crate) topic: Arc<str>,
    pub(crate) start: StartAgent,
    /// More topics whose events the agent gets in the same stream ([`App::agent_on_topics`](crate::App::agent_on_topics)).
    pub(crate) also: Vec<Arc<str>>,
    /// Instances per core, sharing the core's events of the topic.
    pub(crate) concurrency: usize,
    /// For work without a topic: runs on every core (timers) rather than on core 0 (tasks).
    pub(crate) every_core: bool,
    /// One instance per partition, started and stopped with the assignment
    /// ([`Agent::isolated_partitions`](crate::Agent::isolated_partitions)).
    pub(crate) isolated: bool,
    /// Topic patterns: every topic whose name matches one is added to `also` when the
    /// worker starts or finds it later ([`App::topics_matching`](crate::App::topics_matching)).
    pub(crate) patterns: Vec<crate::app::pattern::Subscription>,
    /// An agent's supervision, which its handle may change until the worker starts.
    pub(crate) supervision: Option<Arc<Mutex<crate::runtime::supervise::SupervisorOptions>>>,
}

impl AgentSpec {
    /// The agent's topics, as listings show them (`a,b` for an agent on several).
    pub(crate) fn topics(&self) -> String {
        std::iter::once(&self.topic).chain(&self.also).map(|t| &**t).collect::<Vec<_>>().join(",")
    }
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
    /// Records older than this are deleted (`retention.ms`), when the worker creates the topic.
    pub(crate) retention: Option<std::time::Duration>,
    /// The oldest records are deleted while a partition is larger (`retention.bytes`).
    pub(crate) retention_bytes: Option<u64>,
    /// Created compacted (`cleanup.policy=compact`).
    pub(crate) compacting: bool,
    /// On Kafka, the replication factor instead of `topic_replication_factor`.
    pub(crate) replicas: Option<i16>,
    /// On Kafka, more of the topic's configuration, by the broker's names.
    pub(crate) broker_config: Vec<(String, String)>,
}

impl TopicDecl {
    /// What a declared topic is created with (by the worker, or a send without one): its
    /// options, with the broker settings every transport understands read into their fields
    /// (a bad value is left to the broker).
    pub(crate) fn config(&self, partitions: u32) -> faust_transport::TopicConfig {
        let mut config = faust_transport::TopicConfig {
            compacted: self.compacting,
            retention: self.retention,
            retention_bytes: self.retention_bytes,
            replicas: self.replicas,
            broker_config: self.broker_config.clone(),
            ..faust_transport::TopicConfig::new(partitions)
        };
        let millis = |v: &str| v.trim().parse::<u64>().ok().map(std::time::Duration::from_millis);
        for (name, value) in &self.broker_config {
            match name.as_str() {
                "cleanup.policy" => config.compacted = value.split(',').any(|p| p.trim() == "compact"),
                // -1: no limit.
                "retention.ms" => config.retention = millis(value),
                "retention.bytes" => config.retention_bytes = value.trim().parse().ok(),
                "delete.retention.ms" => config.delete_retention = millis(value),
                _ => {}
            }
        }
        config
    }
}

/// What an [`App`](crate::App) holds: its settings and everything it declared.
pub(crate) struct AppInner {
    pub(crate) settings: Settings,
    /// Shared with the copies a worker runs ([`App::with_settings`](crate::App)): what an
    /// agent declares while it runs (`Stream::group_by`) reaches the next run.
    pub(crate) topics: Arc<Mutex<Vec<TopicDecl>>>,
    pub(crate) agents: Arc<Mutex<Vec<AgentSpec>>>,
    /// Shared with each table, so that a table can declare itself again (as a windowed one).
    pub(crate) tables: crate::table::TableList,
    pub(crate) memory: Mutex<Option<MemoryTransport>>,
    pub(crate) stop: Arc<StopSignal>,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) stats: Arc<crate::runtime::stats::Counters>,
    /// The app's own commands for its command line.
    pub(crate) commands: Mutex<Vec<UserCommand>>,
    /// The app's own web pages, by path.
    pub(crate) pages: Mutex<Vec<(String, PageHandler)>>,
    /// The app's sensors ([`App::sensor`](crate::App::sensor)).
    pub(crate) sensors: Mutex<Vec<Arc<dyn crate::runtime::sensor::Sensor>>>,
    /// Where the running worker's web server listens, once it does.
    pub(crate) web_addr: Mutex<Option<std::net::SocketAddr>>,
    /// Leadership and lifecycle hooks, shared with the worker's cores and control thread.
    pub(crate) services: Arc<crate::app::services::Services>,
    /// Questions to agents waiting for replies ([`Agent::ask`](crate::Agent::ask)).
    pub(crate) replies: Arc<crate::app::rpc::Replies>,
    /// The Faust record models the app registered ([`App::model`](crate::App::model)).
    pub(crate) models: Arc<Mutex<crate::codec::record::Models>>,
}

/// What answers one of the app's own web pages ([`App::page`](crate::App::page)).
pub(crate) type PageHandler = Arc<dyn Fn(&crate::app::page::WebRequest) -> crate::app::page::WebResponse + Send + Sync>;

/// What runs a user command: the app and the arguments after the command's name.
pub(crate) type RunCommand = Arc<dyn Fn(&crate::App, &[String]) -> Result<(), AgentError> + Send + Sync>;

/// A command the app adds to its command line ([`App::command`](crate::App::command)).
pub(crate) struct UserCommand {
    pub(crate) name: String,
    pub(crate) about: String,
    pub(crate) run: RunCommand,
}

impl Clone for UserCommand {
    fn clone(&self) -> Self {
        UserCommand { name: self.name.clone(), about: self.about.clone(), run: self.run.clone() }
    }
}
