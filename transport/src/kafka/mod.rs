//! `kafka://host:port[,host:port]`: our own Kafka client, on the `kafka-protocol` crate's
//! message codecs over glommio's io_uring sockets.
//!
//! Each core keeps its own connections and its own metadata cache; nothing is shared between
//! cores but the options. A broker serves one connection's requests one at a time, so a core
//! has one connection per broker for produce, offsets, metadata and commits, and one per
//! fetched partition, whose long polls then delay nothing else (see `Lane`). A connection negotiates API
//! versions when it opens (the highest version both sides speak, capped by
//! `protocol::VERSIONS`), pipelines requests, and is replaced when it fails or a request times
//! out. Metadata is refreshed when a leader is unknown, a broker answers
//! `NOT_LEADER_OR_FOLLOWER`/`UNKNOWN_TOPIC_OR_PARTITION`/`LEADER_NOT_AVAILABLE`, or a
//! connection fails. Retriable failures are retried `retries` times with exponential backoff;
//! every request has a deadline, so nothing waits forever.
//!
//! Batches are produced uncompressed or with any of Kafka's codecs ([`Compression`]), and
//! fetched batches of any codec are read. Workers share an app through Kafka's consumer
//! groups, with our assignor on the group's leader (see [`KafkaMembership`]). Connections
//! may use TLS and SASL ([`TlsOptions`], [`SaslOptions`]; `security.rs`), and produces are
//! idempotent by default (`producer.rs`). Not yet: transactional producing.

mod assignor;
mod blocking;
mod connection;
mod fetch;
mod group;
mod metadata;
mod producer;
mod protocol;
mod records;
mod sasl;
mod security;
mod transaction;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use event_listener::Event;
use kafka_protocol::messages::{
    ApiKey, FindCoordinatorRequest, GroupId, MetadataRequest, OffsetCommitRequest, OffsetFetchRequest, TopicName,
    metadata_request::MetadataRequestTopic,
    offset_commit_request::{OffsetCommitRequestPartition, OffsetCommitRequestTopic},
    offset_fetch_request::OffsetFetchRequestTopic,
};
use kafka_protocol::protocol::StrBytes;

use self::connection::{About, Connection};
use self::metadata::Cluster;
pub(crate) use self::protocol::code_name;
pub use self::sasl::SaslMechanism;
pub use self::security::{SaslOptions, TlsOptions};
use crate::closing::Closing;
use crate::error::{Error, Result};
use crate::types::{
    AssignmentEvent, Fence, Fetched, JoinRequest, OffsetSpec, Produced, TopicConfig, TopicMetadata, TopicPartition,
};
use crate::{BatchBuilder, CoreTransport, Membership, Transport};

/// How many in-sync replicas must have a produced batch before the broker acknowledges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// Every in-sync replica (`acks=-1`, the default): what makes committing the source
    /// offsets behind the batch safe.
    #[default]
    All,
    /// The leader only (`acks=1`).
    Leader,
}

/// How produced batches are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Not at all (the default).
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy, in the framing of Kafka's Java client.
    Snappy,
    /// LZ4 frames.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// Kafka's attribute bits for the codec.
    pub(crate) fn codec(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }
}

/// Settings of the Kafka client.
///
/// ```
/// use std::time::Duration;
/// use faust_transport::KafkaOptions;
///
/// let options = KafkaOptions { request_timeout: Duration::from_secs(5), ..KafkaOptions::default() };
/// assert_eq!(options.retries, 5);
/// ```
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// The client id sent with every request (`faust-rs`).
    pub client_id: String,
    /// The longest any one request may take, connecting included (30 s). A fetch may take
    /// its `max_wait` on top.
    pub request_timeout: Duration,
    /// How long a produce waits for produces to other partitions of the same broker, to
    /// send them all in one request (0, the default: each `produce` is sent at once, since it
    /// already carries a whole batch from the engine).
    pub linger: Duration,
    /// The largest Kafka record batch written (1 MiB); a larger produce is split into several
    /// batches of one request, which the broker appends together.
    pub max_batch_bytes: usize,
    /// Acknowledgement level of produces ([`Acks::All`]).
    pub acks: Acks,
    /// Compression of produced batches ([`Compression::None`]). Fetches read every codec.
    pub compression: Compression,
    /// How often a request failing with a retriable error is retried (5).
    pub retries: u32,
    /// The wait before the first retry (100 ms); it doubles with each retry, up to 1 s.
    pub retry_backoff: Duration,
    /// With `Some`, [`KafkaMembership`] does not join a consumer group: it assigns only these
    /// partitions (of the topics joined), so that several workers can split a topic by hand.
    pub partitions: Option<Vec<TopicPartition>>,
    /// How long the group coordinator waits for a heartbeat before it drops a member and
    /// gives its partitions to others (Faust's `broker_session_timeout`, 60 s). A takeover
    /// after a crash takes about this long.
    pub session_timeout: Duration,
    /// How often a member heartbeats (Faust's `broker_heartbeat_interval`, 3 s; at most a
    /// third of the session timeout is used).
    pub heartbeat_interval: Duration,
    /// How long the coordinator waits for members to rejoin when the group rebalances
    /// (Faust's `broker_rebalance_timeout`, 60 s).
    pub rebalance_timeout: Duration,
    /// Static membership (KIP-345; Faust's `consumer_group_instance_id`): a worker restarted
    /// with the same id within the session timeout gets its partitions back without a
    /// rebalance. Each worker of a group needs its own. A static member does not leave the
    /// group when it stops (its partitions wait for it up to the session timeout).
    pub group_instance_id: Option<String>,
    /// Standby replicas per changelog partition the group's leader assigns (Faust's
    /// `table_standby_replicas`, 1).
    pub standby_replicas: u32,
    /// Where other workers reach this one (its web or control address), told to the group.
    pub advertised_url: String,
    /// TLS to the brokers (`None`: plain text).
    pub tls: Option<TlsOptions>,
    /// SASL authentication (`None`: none), over plain text or TLS.
    pub sasl: Option<SaslOptions>,
    /// Idempotent producing (true, the default): each core is a producer with an id from the
    /// broker and numbers its batches per partition, so a produce retried after a lost answer
    /// is written once, in order. Off, a retry may write a batch twice.
    pub idempotent: bool,
    /// The replication factor of the topics this client creates (Faust's
    /// `topic_replication_factor`, 1).
    pub replication_factor: i16,
    /// Kafka's `isolation.level=read_committed` (false, the default: `read_uncommitted`):
    /// fetches stop at the last stable offset and skip the records of aborted transactions,
    /// so an upstream transactional producer's aborted writes are never processed.
    pub read_committed: bool,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        KafkaOptions {
            client_id: "faust-rs".to_string(),
            request_timeout: Duration::from_secs(30),
            linger: Duration::ZERO,
            max_batch_bytes: 1 << 20,
            acks: Acks::All,
            compression: Compression::None,
            retries: 5,
            retry_backoff: Duration::from_millis(100),
            partitions: None,
            session_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(3),
            rebalance_timeout: Duration::from_secs(60),
            group_instance_id: None,
            standby_replicas: 1,
            advertised_url: String::new(),
            tls: None,
            sasl: None,
            idempotent: true,
            read_committed: false,
            replication_factor: 1,
        }
    }
}

struct Shared {
    url: String,
    bootstrap: Vec<Arc<str>>,
    options: KafkaOptions,
    client_id: Arc<str>,
    /// TLS configuration and SASL credentials every connection uses.
    security: security::Security,
    closing: Closing,
    /// This process's group members, for the cores' commits.
    live: group::Live,
}

/// The Kafka transport (`kafka://host:port[,host:port]`).
///
/// ```no_run
/// use faust_transport::{KafkaOptions, KafkaTransport};
///
/// let transport = KafkaTransport::open("kafka://127.0.0.1:9092", KafkaOptions::default())?;
/// // The engine then calls `attach_core` on each core's executor.
/// # Ok::<(), faust_transport::Error>(())
/// ```
#[derive(Clone)]
pub struct KafkaTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport").field("bootstrap", &self.shared.bootstrap).finish()
    }
}

impl KafkaTransport {
    /// A transport for the brokers of `url` (`kafka://host:port[,host:port]`). Nothing is
    /// contacted until a core attaches.
    pub fn open(url: &str, options: KafkaOptions) -> Result<KafkaTransport> {
        let bad = |reason: &str| Error::InvalidUrl { url: url.to_string(), reason: reason.to_string() };
        let rest = url.strip_prefix("kafka://").ok_or_else(|| bad("a Kafka URL starts with kafka://"))?;
        let rest = rest.trim_end_matches('/');
        let mut bootstrap = Vec::new();
        // Faust separates brokers with `;` as well as `,`.
        for hp in rest.split([',', ';']).map(str::trim).filter(|s| !s.is_empty()) {
            let (host, port) = hp.rsplit_once(':').ok_or_else(|| bad("each broker is host:port"))?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad("each broker is host:port, with a port from 1 to 65535"));
            }
            bootstrap.push(Arc::from(hp));
        }
        if bootstrap.is_empty() {
            return Err(bad("name at least one broker, as kafka://host:port"));
        }
        if options.replication_factor < 1 {
            return Err(bad("the replication factor must be at least 1"));
        }
        if options.request_timeout.is_zero() {
            return Err(bad("the request timeout must be more than zero"));
        }
        if options.session_timeout < Duration::from_millis(100) {
            return Err(bad("the session timeout must be at least 100 ms"));
        }
        let client_id = Arc::from(options.client_id.as_str());
        let security = security::Security::new(options.tls.as_ref(), options.sasl.as_ref())?;
        Ok(KafkaTransport {
            shared: Arc::new(Shared {
                url: url.to_string(),
                bootstrap,
                options,
                client_id,
                security,
                closing: Closing::default(),
                live: group::Live::default(),
            }),
        })
    }

    /// The brokers the transport starts from.
    pub fn bootstrap(&self) -> &[Arc<str>] {
        &self.shared.bootstrap
    }

    /// The options it was opened with.
    pub fn options(&self) -> &KafkaOptions {
        &self.shared.options
    }

    /// Fails every later request with [`Error::Closed`] and ends membership.
    pub fn close(&self) {
        self.shared.closing.close();
    }

    /// A core handle for the calling glommio executor, outside a worker (tests, tools).
    pub fn core(&self) -> KafkaCore {
        KafkaCore {
            shared: self.shared.clone(),
            st: Box::new(CoreState {
                conns: RefCell::new(HashMap::new()),
                connecting: RefCell::new(HashSet::new()),
                connected: Event::new(),
                cluster: RefCell::new(Cluster::default()),
                coordinators: RefCell::new(HashMap::new()),
                lingering: RefCell::new(HashMap::new()),
                turns: RefCell::new(HashMap::new()),
                producer: Cell::new(None),
                producer_turn: glommio::sync::Semaphore::new(1),
                producer_sessions: Cell::new(0),
                transactions: RefCell::new(None),
                transaction_ended: Event::new(),
                stats: Cell::new(KafkaStats::default()),
            }),
            closed: Rc::new(Cell::new(false)),
        }
    }
}

impl Transport for KafkaTransport {
    type Core = KafkaCore;
    type Membership = KafkaMembership;

    async fn attach_core(&self, _core: usize, _cores: usize) -> Result<KafkaCore> {
        Ok(self.core())
    }

    fn membership(&self, group: &str, join: &JoinRequest) -> Result<KafkaMembership> {
        let mode = match self.shared.options.partitions {
            Some(_) => Mode::Static { topics: join.topics.clone(), assigned: false },
            None => Mode::Group(group::GroupMember::start(self.shared.clone(), group, join)?),
        };
        Ok(KafkaMembership { transport: self.clone(), mode })
    }
}

/// One core's handle on a Kafka cluster: its connections and metadata. Lives on the core's
/// thread (not `Send`).
pub struct KafkaCore {
    shared: Arc<Shared>,
    /// Boxed: the engine keeps cores of every transport in one enum.
    st: Box<CoreState>,
    closed: Rc<Cell<bool>>,
}

/// What a core knows and holds.
struct CoreState {
    /// Connections by broker address and lane; dead ones are replaced on next use.
    conns: RefCell<Conns>,
    /// Connections being opened, and the event that tells their waiters it is done.
    connecting: RefCell<HashSet<(Arc<str>, Lane)>>,
    connected: Event,
    cluster: RefCell<Cluster>,
    /// Group coordinators by group.
    coordinators: RefCell<HashMap<String, Arc<str>>>,
    /// Per broker, the produces lingering to go out in one request.
    lingering: RefCell<HashMap<Arc<str>, Rc<RefCell<producer::Queue>>>>,
    /// Per partition produced to, its turn and its sequence numbers.
    turns: RefCell<HashMap<TopicPartition, Rc<producer::PartitionTurn>>>,
    /// This core's idempotent producer id, once the broker gave one.
    producer: Cell<Option<producer::ProducerId>>,
    /// Held while asking for a producer id.
    producer_turn: glommio::sync::Semaphore,
    /// Producer ids this core was given so far.
    producer_sessions: Cell<u64>,
    /// This core's transactional producer, once `init_transactions` made it one.
    transactions: RefCell<Option<transaction::Transactions>>,
    /// Notified when a transaction ended (produces waiting for it go on).
    transaction_ended: Event,
    stats: Cell<KafkaStats>,
}

/// Counters of one core's Kafka client, since it was attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KafkaStats {
    /// Connections opened (ApiVersions negotiated), reconnections included.
    pub connections_opened: u64,
    /// Produce requests sent (one may carry several partitions' batches, with a linger).
    pub produce_requests: u64,
    /// Fetch requests sent.
    pub fetch_requests: u64,
}

impl std::fmt::Debug for KafkaCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaCore").field("bootstrap", &self.shared.bootstrap).finish()
    }
}

/// Which of its connections to a broker a request travels on. A broker serves the requests
/// of one connection one at a time, in order, and a fetch may wait `max_wait` for records:
/// so each fetched partition has a connection of its own (a long poll delays nothing else),
/// and every other request (produce, offsets, metadata, commits) shares one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Lane {
    /// Produce, ListOffsets, Metadata, CreateTopics, group requests.
    Main,
    /// Fetches of this partition.
    Fetch(TopicPartition),
}

/// Marks a connection as being opened while it lives.
struct Connecting<'a> {
    core: &'a KafkaCore,
    key: (Arc<str>, Lane),
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        self.core.st.connecting.borrow_mut().remove(&self.key);
        self.core.st.connected.notify(usize::MAX);
    }
}

/// A core's connections, by broker address and lane.
type Conns = HashMap<(Arc<str>, Lane), Rc<Connection>>;

/// Whether a failed request may succeed if retried.
fn retriable(e: &Error) -> bool {
    match e {
        Error::KafkaConnection { .. } | Error::KafkaTimeout { .. } => true,
        Error::KafkaBroker { code, .. } => {
            protocol::code_is_retriable(*code)
                || protocol::code_needs_metadata(*code)
                || protocol::code_needs_coordinator(*code)
        }
        _ => false,
    }
}

impl KafkaCore {
    /// The members of `group` in this process's view: each one's advertised URL
    /// ([`KafkaOptions::advertised_url`]) with the partitions the latest assignment heads to
    /// it. Empty before the first assignment, or without a group.
    pub fn group_owners(&self, group: &str) -> Vec<(String, Vec<TopicPartition>)> {
        self.shared.live.owners(group)
    }

    /// This worker's advertised URL.
    pub fn advertised_url(&self) -> &str {
        &self.shared.options.advertised_url
    }

    /// This core's counters.
    pub fn stats(&self) -> KafkaStats {
        self.st.stats.get()
    }

    fn count(&self, f: impl FnOnce(&mut KafkaStats)) {
        let mut s = self.st.stats.get();
        f(&mut s);
        self.st.stats.set(s);
    }

    fn options(&self) -> &KafkaOptions {
        &self.shared.options
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.get() { Err(Error::Closed) } else { self.shared.closing.check() }
    }

    /// A live connection to `broker` on `lane`, opened if needed. Requests that need one
    /// while it is being opened wait for it rather than open another (so requests made in
    /// order travel on one connection, in order).
    async fn connection(&self, broker: &Arc<str>, lane: &Lane) -> Result<Rc<Connection>> {
        let key = (broker.clone(), lane.clone());
        loop {
            self.check_open()?;
            if let Some(c) = self.st.conns.borrow().get(&key)
                && c.is_alive()
            {
                return Ok(c.clone());
            }
            if !self.st.connecting.borrow().contains(&key) {
                break;
            }
            let listener = self.st.connected.listen();
            if self.st.connecting.borrow().contains(&key) {
                listener.await;
            }
        }
        self.st.connecting.borrow_mut().insert(key.clone());
        // Clears the mark however the connect ends (failure, or this future dropped).
        let _guard = Connecting { core: self, key: key.clone() };
        let c = Rc::new(
            Connection::connect(
                broker.clone(),
                self.shared.client_id.clone(),
                self.options().request_timeout,
                &self.shared.security,
            )
            .await?,
        );
        self.count(|s| s.connections_opened += 1);
        self.check_open()?;
        self.st.conns.borrow_mut().insert(key, c.clone());
        Ok(c)
    }

    /// A connection to any broker: a live one if there is one, else the known brokers and
    /// then the bootstrap list, in order.
    async fn any_connection(&self) -> Result<Rc<Connection>> {
        self.check_open()?;
        if let Some(c) = self.st.conns.borrow().iter().find(|((_, lane), c)| *lane == Lane::Main && c.is_alive()) {
            return Ok(c.1.clone());
        }
        let mut candidates: Vec<Arc<str>> = self.st.cluster.borrow().brokers().cloned().collect();
        for b in &self.shared.bootstrap {
            if !candidates.contains(b) {
                candidates.push(b.clone());
            }
        }
        let mut last = None;
        for b in &candidates {
            match self.connection(b, &Lane::Main).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(Error::Closed))
    }

    /// Runs `attempt` until it succeeds, fails with an error that is not retriable, or has
    /// failed `retries + 1` times; between attempts, waits with exponential backoff and
    /// forgets metadata (or the group coordinator) the error says is stale.
    async fn retrying<T, F, Fut>(&self, group: Option<&str>, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut backoff = self.options().retry_backoff;
        let mut tries = 0;
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) if tries < self.options().retries && retriable(&e) => {
                    tries += 1;
                    self.check_open()?;
                    tracing::info!(error = %e, tries, ?backoff, "a retriable error: trying again");
                    match &e {
                        Error::KafkaBroker { code, .. } if protocol::code_needs_coordinator(*code) => {
                            if let Some(g) = group {
                                self.st.coordinators.borrow_mut().remove(g);
                            }
                        }
                        Error::KafkaBroker { code, .. } if !protocol::code_needs_metadata(*code) => {}
                        _ => {
                            self.st.cluster.borrow_mut().invalidate();
                            if let Some(g) = group {
                                self.st.coordinators.borrow_mut().remove(g);
                            }
                        }
                    }
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A connection to `group`'s coordinator, found with FindCoordinator if not known.
    async fn coordinator(&self, group: &str) -> Result<Rc<Connection>> {
        self.coordinator_of(group, group, 0).await
    }

    /// A connection to the coordinator of `key` (key type 0: a group, 1: a transactional
    /// id), cached under `cache_key`.
    async fn coordinator_of(&self, cache_key: &str, key: &str, key_type: i8) -> Result<Rc<Connection>> {
        let known = self.st.coordinators.borrow().get(cache_key).cloned();
        if let Some(addr) = known {
            return self.connection(&addr, &Lane::Main).await;
        }
        let conn = self.any_connection().await?;
        let req =
            FindCoordinatorRequest::default().with_key(StrBytes::from_string(key.to_string())).with_key_type(key_type);
        let (_, resp) =
            conn.request(ApiKey::FindCoordinator, &req, self.options().request_timeout, About::default()).await?;
        if resp.error_code != 0 {
            return Err(conn.broker_error(
                ApiKey::FindCoordinator,
                About::default(),
                resp.error_code,
                resp.error_message.map(|m| m.to_string()),
            ));
        }
        let addr: Arc<str> = Arc::from(format!("{}:{}", resp.host.as_str(), resp.port));
        self.st.coordinators.borrow_mut().insert(cache_key.to_string(), addr.clone());
        self.connection(&addr, &Lane::Main).await
    }

    /// One OffsetCommit: as `member` of the group's current generation, or, without one, as
    /// a client outside the group (generation -1, no member id).
    async fn commit_once(
        &self,
        group: &str,
        member: Option<&group::LiveMember>,
        offsets: &[(TopicPartition, u64)],
    ) -> Result<()> {
        let conn = self.coordinator(group).await?;
        let topics: Vec<OffsetCommitRequestTopic> = by_topic(offsets.iter().map(|(tp, offset)| {
            let p = OffsetCommitRequestPartition::default()
                .with_partition_index(tp.partition as i32)
                .with_committed_offset(*offset as i64)
                .with_committed_leader_epoch(-1)
                .with_committed_metadata(None);
            (tp, p)
        }))
        .into_iter()
        .map(|(topic, partitions)| OffsetCommitRequestTopic::default().with_name(topic).with_partitions(partitions))
        .collect();
        let mut req = OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
            .with_generation_id_or_member_epoch(member.map_or(-1, |m| m.generation))
            .with_member_id(StrBytes::from_string(member.map(|m| m.member_id.clone()).unwrap_or_default()))
            .with_retention_time_ms(-1)
            .with_topics(topics);
        if conn.version(ApiKey::OffsetCommit, About::default())? >= 7 {
            req.group_instance_id = member.and_then(|m| m.instance_id.clone()).map(StrBytes::from_string);
        }
        let (_, resp) =
            conn.request(ApiKey::OffsetCommit, &req, self.options().request_timeout, About::default()).await?;
        for t in &resp.topics {
            for p in &t.partitions {
                if p.error_code != 0 {
                    let about = About::partition(t.name.0.as_str(), p.partition_index.max(0) as u32);
                    return Err(conn.broker_error(ApiKey::OffsetCommit, about, p.error_code, None));
                }
            }
        }
        Ok(())
    }

    async fn committed_once(&self, group: &str, partitions: &[TopicPartition]) -> Result<Vec<Option<u64>>> {
        let conn = self.coordinator(group).await?;
        let mut topics: Vec<OffsetFetchRequestTopic> = Vec::new();
        for tp in partitions {
            match topics.iter_mut().find(|t| t.name.0.as_str() == &*tp.topic) {
                Some(t) => t.partition_indexes.push(tp.partition as i32),
                None => topics.push(
                    OffsetFetchRequestTopic::default()
                        .with_name(topic_name(&tp.topic))
                        .with_partition_indexes(vec![tp.partition as i32]),
                ),
            }
        }
        let req = OffsetFetchRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
            .with_topics(Some(topics));
        let (_, resp) =
            conn.request(ApiKey::OffsetFetch, &req, self.options().request_timeout, About::default()).await?;
        if resp.error_code != 0 {
            return Err(conn.broker_error(ApiKey::OffsetFetch, About::default(), resp.error_code, None));
        }
        let mut out = Vec::with_capacity(partitions.len());
        for tp in partitions {
            let found = resp
                .topics
                .iter()
                .filter(|t| t.name.0.as_str() == &*tp.topic)
                .flat_map(|t| t.partitions.iter())
                .find(|p| p.partition_index == tp.partition as i32);
            match found {
                Some(p) if p.error_code != 0 && p.error_code != protocol::code::UNKNOWN_TOPIC_OR_PARTITION => {
                    let about = About::partition(&tp.topic, tp.partition);
                    return Err(conn.broker_error(ApiKey::OffsetFetch, about, p.error_code, None));
                }
                Some(p) if p.committed_offset >= 0 => out.push(Some(p.committed_offset as u64)),
                _ => out.push(None),
            }
        }
        Ok(out)
    }
}

/// `items` grouped by topic, in the order topics first appear: a request names each topic
/// once, with its partitions.
pub(crate) fn by_topic<'a, P>(items: impl IntoIterator<Item = (&'a TopicPartition, P)>) -> Vec<(TopicName, Vec<P>)> {
    let mut out: Vec<(TopicName, Vec<P>)> = Vec::new();
    for (tp, p) in items {
        match out.iter_mut().find(|(t, _)| t.0.as_str() == &*tp.topic) {
            Some((_, ps)) => ps.push(p),
            None => out.push((topic_name(&tp.topic), vec![p])),
        }
    }
    out
}

pub(crate) fn topic_name(name: &str) -> TopicName {
    TopicName(StrBytes::from_string(name.to_string()))
}

impl CoreTransport for KafkaCore {
    /// Creates the topic with [`KafkaOptions::replication_factor`] (`cleanup.policy=compact` when compacted,
    /// `retention.ms`/`retention.bytes` when set), or checks the partition count of an existing
    /// one. The other settings of an existing topic are not compared.
    async fn create_topic(&self, name: &str, config: &TopicConfig) -> Result<TopicMetadata> {
        crate::validate_topic_name(name)?;
        if config.partitions == 0 || config.partitions > i32::MAX as u32 {
            return Err(Error::PartitionMismatch {
                topic: name.to_string(),
                existing: 0,
                requested: config.partitions,
            });
        }
        self.retrying(None, || self.create_topic_once(name, config)).await
    }

    /// The partition count comes from the cluster's metadata; compaction and retention are
    /// reported as unset (they are not read back from the broker yet).
    async fn topic_metadata(&self, name: &str) -> Result<Option<TopicMetadata>> {
        let partitions = self.retrying(None, || self.partition_count(name, true)).await?;
        Ok(partitions.map(|p| TopicMetadata { name: Arc::from(name), config: TopicConfig::new(p) }))
    }

    /// Asks the cluster for all its topics (retried like other requests); see
    /// `KafkaCore::topic_names_once` for which are left out.
    async fn topic_names(&self) -> Result<Vec<String>> {
        self.retrying(None, || self.topic_names_once()).await
    }

    async fn produce(&self, tp: &TopicPartition, batch: BatchBuilder) -> Result<Produced> {
        self.produce_batch(tp, batch).await
    }

    async fn fetch(&self, tp: &TopicPartition, offset: u64, max_bytes: usize, max_wait: Duration) -> Result<Fetched> {
        let lane = Lane::Fetch(tp.clone());
        self.retrying(None, || self.fetch_once(tp, offset, max_bytes, max_wait, &lane)).await
    }

    async fn list_offset(&self, tp: &TopicPartition, spec: OffsetSpec) -> Result<u64> {
        self.retrying(None, || self.list_offset_once(tp, spec)).await
    }

    /// Without a `fence`, commits as a client outside any group generation (generation -1, no
    /// member id: static membership). With one, commits as that member of the group, with the
    /// member id and generation it holds now; refused with [`Error::Fenced`] once the group went
    /// on without it. A commit the coordinator refuses while the member is still in (a
    /// rebalance under way, a generation formed that the member has not synced yet) is tried
    /// again until the member's thread settles it (up to the rebalance timeout): synced, the
    /// commit goes through; dropped from the group, it fails fenced.
    async fn commit(&self, group: &str, fence: Option<&Fence>, offsets: &[(TopicPartition, u64)]) -> Result<()> {
        let Some(fence) = fence else {
            if offsets.is_empty() {
                return Ok(());
            }
            return self.retrying(Some(group), || self.commit_once(group, None, offsets)).await;
        };
        let deadline = std::time::Instant::now() + self.options().rebalance_timeout;
        loop {
            let member = match self.shared.live.member(group, &fence.member) {
                Ok(member) => member,
                // The lease ran out while the member's thread is still trying: wait for it.
                Err(refusal) if refusal.for_now && std::time::Instant::now() < deadline => {
                    glommio::timer::sleep(self.options().retry_backoff).await;
                    continue;
                }
                Err(refusal) => {
                    return Err(Error::Fenced {
                        group: group.to_string(),
                        member: fence.member.to_string(),
                        tp: None,
                        reason: refusal.reason,
                    });
                }
            };
            if offsets.is_empty() {
                return Ok(());
            }
            let result = self.retrying(Some(group), || self.commit_once(group, Some(&member), offsets)).await;
            let code = match &result {
                Err(Error::KafkaBroker { code, .. }) => *code,
                _ => return result,
            };
            let retry = group::code_means_rebalancing(code) || group::code_means_lost(code);
            if retry && std::time::Instant::now() < deadline {
                glommio::timer::sleep(self.options().retry_backoff).await;
                continue;
            }
            if group::code_means_lost(code) {
                return Err(Error::Fenced {
                    group: group.to_string(),
                    member: fence.member.to_string(),
                    tp: offsets.first().map(|(tp, _)| tp.clone()),
                    reason: result.err().map(|e| e.to_string()).unwrap_or_default(),
                });
            }
            return result;
        }
    }

    async fn committed(&self, group: &str, partitions: &[TopicPartition]) -> Result<Vec<Option<u64>>> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        self.retrying(Some(group), || self.committed_once(group, partitions)).await
    }

    /// Closes this core's connections; later requests fail with [`Error::Closed`].
    async fn shutdown(self) -> Result<()> {
        self.closed.set(true);
        self.st.conns.borrow_mut().clear();
        Ok(())
    }
}

/// A worker's membership on Kafka.
///
/// By default the worker joins the app's consumer group (the app id) with Kafka's classic
/// group protocol, and the group's leader assigns partitions with our assignor: balanced by
/// the workers' core counts, sticky, co-partitioned, never leaving a rejoining worker empty.
/// A partition moves in two steps, as on the other transports: its owner is told
/// [`AssignmentEvent::Revoked`], commits and confirms, and only then does the group grant it
/// to its new owner. Heartbeats run on a thread of the membership's own. See
/// [`KafkaOptions`] for the session, heartbeat and rebalance timeouts and static membership.
///
/// With [`KafkaOptions::partitions`] it joins no group: the worker gets those partitions of
/// the topics it joins (a listed partition a topic does not have is skipped, and fails with
/// [`Error::UnknownPartition`] if no joined topic has its number) once, in generation 1, and
/// keeps them.
#[derive(Debug)]
pub struct KafkaMembership {
    transport: KafkaTransport,
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    /// Partitions chosen by hand.
    Static { topics: Vec<String>, assigned: bool },
    /// A member of the consumer group.
    Group(group::GroupMember),
}

impl KafkaMembership {
    /// The partition counts of `topics`, read with a blocking Metadata request from the calling
    /// thread (the worker's control thread, which is not a glommio executor), bounded by the
    /// request timeout and retried like other requests.
    fn partition_counts(&self, topics: &[String]) -> Result<HashMap<String, u32>> {
        let shared = &self.transport.shared;
        let opts = &shared.options;
        let req = MetadataRequest::default()
            .with_topics(Some(
                topics.iter().map(|t| MetadataRequestTopic::default().with_name(Some(topic_name(t)))).collect(),
            ))
            .with_allow_auto_topic_creation(false);
        let mut backoff = opts.retry_backoff;
        let mut last = None;
        for _ in 0..=opts.retries {
            for broker in &shared.bootstrap {
                let answer =
                    blocking::BlockingConn::connect(broker, &shared.client_id, opts.request_timeout, &shared.security)
                        .and_then(|mut conn| conn.request(ApiKey::Metadata, &req, opts.request_timeout));
                match answer {
                    Ok((_, resp)) => {
                        let mut counts = HashMap::new();
                        for t in resp.topics {
                            if let Some(name) = t.name
                                && t.error_code == 0
                            {
                                counts.insert(name.0.to_string(), t.partitions.len() as u32);
                            }
                        }
                        return Ok(counts);
                    }
                    Err(e) => last = Some(e),
                }
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        Err(last.unwrap_or(Error::Closed))
    }

    /// The static assignment: the listed partitions of the joined topics.
    fn static_assignment(&self, topics: &[String]) -> Result<Vec<TopicPartition>> {
        let counts = self.partition_counts(topics)?;
        let mut partitions = Vec::new();
        for name in topics {
            let n = *counts.get(name).ok_or_else(|| Error::UnknownTopic { topic: name.clone() })?;
            partitions.extend((0..n).map(|p| TopicPartition::new(name.as_str(), p)));
        }
        if let Some(list) = &self.transport.shared.options.partitions {
            // Of the listed partitions, those the joined topics have; one that none of
            // them has is a mistake (a typo, or a topic with fewer partitions).
            let joined: Vec<&TopicPartition> =
                list.iter().filter(|tp| topics.iter().any(|t| **t == *tp.topic)).collect();
            if let Some(missing) =
                joined.iter().find(|tp| !joined.iter().any(|o| o.partition == tp.partition && partitions.contains(o)))
            {
                return Err(Error::UnknownPartition { tp: (*missing).clone() });
            }
            partitions.retain(|tp| joined.contains(&tp));
        }
        Ok(partitions)
    }
}

impl Membership for KafkaMembership {
    async fn next_event(&mut self) -> Result<AssignmentEvent> {
        let shared = self.transport.shared.clone();
        let topics = match &mut self.mode {
            Mode::Group(member) => return member.next_event().await,
            Mode::Static { assigned: true, .. } => {
                shared.closing.wait().await;
                return Err(Error::Closed);
            }
            Mode::Static { topics, .. } => topics.clone(),
        };
        shared.closing.check()?;
        let partitions = self.static_assignment(&topics)?;
        if let Mode::Static { assigned, .. } = &mut self.mode {
            *assigned = true;
        }
        Ok(AssignmentEvent::Assigned { generation: 1, partitions })
    }

    async fn revoked(&mut self, generation: u64) -> Result<()> {
        match &self.mode {
            Mode::Group(member) => member.confirm(generation),
            Mode::Static { .. } => Ok(()),
        }
    }

    fn member_id(&self) -> Option<Arc<str>> {
        match &self.mode {
            Mode::Group(member) => Some(member.handle().clone()),
            Mode::Static { .. } => None,
        }
    }

    async fn leave(&mut self) -> Result<()> {
        match &mut self.mode {
            Mode::Group(member) => member.leave(),
            Mode::Static { .. } => Ok(()),
        }
    }
}

impl KafkaTransport {
    /// The URL the transport was opened with.
    pub fn url(&self) -> &str {
        &self.shared.url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core's handle holds `Rc`s and stays on its core; the transport crosses threads.
    #[test]
    fn auto_traits() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<KafkaTransport>();
        send_sync::<KafkaOptions>();
        // KafkaCore is !Send: this would not compile.
        // fn send<T: Send>() {} send::<KafkaCore>();
    }

    #[test]
    fn urls_are_checked() {
        let ok = KafkaTransport::open("kafka://a:9092, b:9093/", KafkaOptions::default()).unwrap();
        assert_eq!(ok.bootstrap().iter().map(|b| &**b).collect::<Vec<_>>(), vec!["a:9092", "b:9093"]);
        for bad in ["kafka://", "kafka://host", "kafka://host:port", "kafka://:9092", "local://x", "kafka://h:70000"] {
            assert!(
                matches!(KafkaTransport::open(bad, KafkaOptions::default()), Err(Error::InvalidUrl { .. })),
                "{bad}"
            );
        }
        let zero = KafkaOptions { request_timeout: Duration::ZERO, ..KafkaOptions::default() };
        assert!(KafkaTransport::open("kafka://h:1", zero).is_err());
    }

    #[test]
    fn retriable_errors() {
        let broker = |code| Error::KafkaBroker {
            broker: "b:1".into(),
            api: "Produce",
            topic: None,
            partition: None,
            code,
            message: None,
        };
        assert!(retriable(&broker(protocol::code::NOT_LEADER_OR_FOLLOWER)));
        assert!(retriable(&broker(protocol::code::NOT_COORDINATOR)));
        assert!(!retriable(&broker(protocol::code::TOPIC_ALREADY_EXISTS)));
        assert!(!retriable(&Error::UnknownTopic { topic: "t".into() }));
        assert!(broker(6).to_string().contains("NotLeaderOrFollower"), "{}", broker(6));
    }

    #[test]
    fn broker_lists_take_fausts_separators_too() {
        let t = KafkaTransport::open("kafka://a:1;b:2, c:3", KafkaOptions::default()).unwrap();
        assert_eq!(t.bootstrap().iter().map(|b| &**b).collect::<Vec<_>>(), ["a:1", "b:2", "c:3"]);
        let none = KafkaOptions { replication_factor: 0, ..KafkaOptions::default() };
        assert!(KafkaTransport::open("kafka://a:1", none).is_err());
    }
}
