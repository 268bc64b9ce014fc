//! The app's settings: Faust's core settings with Faust's defaults where they apply, each
//! overridable from the environment under Faust's variable names.

use std::path::PathBuf;
use std::time::Duration;

use faust_transport::AutoOffsetReset;

use crate::codec::Codec;

/// A setting from the environment that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {variable}={value:?}: {reason}")]
pub struct SettingsError {
    /// The variable, with its prefix.
    pub variable: String,
    /// Its value.
    pub value: String,
    /// What a valid value looks like.
    pub reason: String,
}

/// How a worker runs. Build with [`Settings::new`], adjust fields, then apply the environment
/// with [`Settings::from_env`] (the environment wins, as in Faust).
///
/// | field | default | environment variable |
/// |---|---|---|
/// | `id` | as given to [`Settings::new`] | `APP_ID` |
/// | `broker` | `local://` (under `datadir`) | `BROKER_URL` |
/// | `datadir` | `{id}-data` | `APP_DATADIR` |
/// | `topic_partitions` | 8 | `TOPIC_PARTITIONS` |
/// | `commit_interval` | 2.8 s | `BROKER_COMMIT_INTERVAL` (seconds) |
/// | `commit_every` | 10,000 events | `BROKER_COMMIT_EVERY` |
/// | `stream_buffer_maxsize` | 4,096 | `STREAM_BUFFER_MAXSIZE` |
/// | `key_serializer` | `raw` | `APP_KEY_SERIALIZER` (a codec name, e.g. `json\|binary`) |
/// | `value_serializer` | `json` | `APP_VALUE_SERIALIZER` |
/// | `auto_offset_reset` | earliest | `CONSUMER_AUTO_OFFSET_RESET` |
/// | `cores` | every usable CPU | `WORKER_CORES` |
/// | `worker_spin` | 0 s (sleep at once) | `WORKER_SPIN` (seconds, e.g. `0.0002`) |
/// | `web_port` | 6066 (0: any free port) | `WEB_PORT` |
/// | `web_bind` | 127.0.0.1 | `WEB_BIND` |
/// | `web_enabled` | true | `WEB_ENABLED` |
/// | `monitor_enabled` | true | `MONITOR_ENABLED` |
/// | `store` | `mmap://` (table shards in stores under `datadir/tables`) | `STORE` (`mmap://` or `memory://`) |
/// | `bad_record_policy` | skip (and count) | `BAD_RECORD_POLICY` (`skip`, `stop`, `dead-letter`, `dead-letter:TOPIC`) |
/// | `max_record_bytes` | 1 MiB | `MAX_RECORD_BYTES` |
/// | `segment_bytes` | 64 MiB | `SEGMENT_BYTES` |
/// | `partitions` | all (Kafka only) | `WORKER_PARTITIONS` (e.g. `0-3,6`) |
/// | `broker_session_timeout` | 60 s | `BROKER_SESSION_TIMEOUT` (seconds) |
/// | `broker_heartbeat_interval` | 3 s | `BROKER_HEARTBEAT_INTERVAL` (seconds) |
/// | `broker_rebalance_timeout` | 60 s | `BROKER_REBALANCE_TIMEOUT` (seconds) |
/// | `consumer_group_instance_id` | none | `CONSUMER_GROUP_INSTANCE_ID` |
/// | `table_standby_replicas` | 1 | `TABLE_STANDBY_REPLICAS` |
/// | `ssl_context` | none (plain text) | `BROKER_SSL` (`true`: system roots), `BROKER_SSL_CAFILE`, `BROKER_SSL_CERTFILE` and `BROKER_SSL_KEYFILE` (PEM files), `BROKER_SSL_SERVER_NAME` |
/// | `broker_credentials` | none | `BROKER_SASL_MECHANISM` (`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`), `BROKER_SASL_USERNAME`, `BROKER_SASL_PASSWORD` |
/// | `producer_idempotence` | true | `PRODUCER_IDEMPOTENCE` |
/// | `processing_guarantee` | at least once | `PROCESSING_GUARANTEE` (`at_least_once`, `exactly_once`) |
/// | `broker_client_id` | `faust-rs` | `BROKER_CLIENT_ID` |
/// | `broker_request_timeout` | 30 s | `BROKER_REQUEST_TIMEOUT` (seconds) |
/// | `producer_acks` | all | `PRODUCER_ACKS` (`-1`/`all`, `1`) |
/// | `producer_compression_type` | none | `PRODUCER_COMPRESSION_TYPE` (`gzip`, `snappy`, `lz4`, `zstd`, `none`) |
/// | `producer_linger` | 0 s | `PRODUCER_LINGER` (seconds), or Faust's older `PRODUCER_LINGER_MS` |
/// | `producer_max_batch_size` | 1 MiB | `PRODUCER_MAX_BATCH_SIZE` (bytes) |
/// | `topic_replication_factor` | 1 | `TOPIC_REPLICATION_FACTOR` |
/// | `timezone` | UTC | `TIMEZONE` (an IANA name: the default time zone of crontabs) |
/// | `topic_disable_leader` | false | `TOPIC_DISABLE_LEADER` (no leader topic, no leader) |
/// | `topic_pattern_refresh` | 10 s | `TOPIC_PATTERN_REFRESH` (seconds) |
/// | `version` | 1 | `APP_VERSION` |
/// | `id_format` | `{id}-v{version}` | `APP_ID_FORMAT` |
///
/// Faust's `APP_STORE` names the store too (`memory://`; `rocksdb://` means this engine's
/// persistent store, `mmap://`), and Faust's `;` between brokers is understood.
///
/// With `APP_ENV_PREFIX=X`, every variable is read as `X_NAME` instead (Faust's `env_prefix`).
///
/// ```
/// use faust::Settings;
///
/// let settings = Settings::new("orders").from_vars([("TOPIC_PARTITIONS", "4")])?;
/// assert_eq!(settings.topic_partitions, 4);
/// assert_eq!(settings.datadir, std::path::PathBuf::from("orders-data"));
/// assert_eq!(settings.broker_url(), "local://orders-data/topics");
/// # Ok::<(), faust::SettingsError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Settings {
    /// The app's id: names its consumer group, internal topics and data directory.
    pub id: String,
    /// Transport URL: `local://PATH` (empty path: `{datadir}/topics`), `memory://`, or
    /// `kafka://host:port[,host:port]`.
    pub broker: String,
    /// Where the worker keeps its state (table stores, the embedded log, the control socket).
    pub datadir: PathBuf,
    /// Partitions of the topics the app creates.
    pub topic_partitions: u32,
    /// How often acked offsets are committed.
    pub commit_interval: Duration,
    /// Commit sooner once this many events were acked since the last commit (but not sooner
    /// than a second after the previous commit: a commit syncs files).
    pub commit_every: u64,
    /// Events buffered per stream before the partitions feeding it are paused.
    pub stream_buffer_maxsize: usize,
    /// Codec of keys unless a topic or table says otherwise.
    pub key_serializer: Codec,
    /// Codec of values unless a topic or table says otherwise.
    pub value_serializer: Codec,
    /// Where consumption starts in a partition with no committed offset.
    pub auto_offset_reset: AutoOffsetReset,
    /// Cores to run on; `None` means every CPU the process may use.
    pub cores: Option<usize>,
    /// How long a core with nothing to do keeps polling for work before its thread sleeps.
    /// Zero (the default) sleeps at once, which leaves an idle core's CPU to other processes.
    /// On CPUs given to the worker alone, a spin of a few hundred microseconds saves the
    /// sleep and the wake-up between events that come that close together (each costs tens
    /// of microseconds on a virtual machine); the core's CPU then reads busy even when
    /// little arrives.
    pub worker_spin: Duration,
    /// Port of the worker's web server (0: any free port; [`App::web_addr`](crate::App::web_addr)
    /// tells which).
    pub web_port: u16,
    /// The address the web server listens on (Faust's `web_bind`; ours defaults to loopback).
    pub web_bind: String,
    /// Whether the worker runs a web server (Faust's `web_enabled`).
    pub web_enabled: bool,
    /// Whether the built-in monitor samples event latencies (one event per partition at a
    /// time, from its fetch to its ack) for the web server's status and metrics. Counters,
    /// busy time and commit latencies are kept either way.
    pub monitor_enabled: bool,
    /// Where table shards keep their state: `mmap://` (a log-structured store per shard under
    /// `{datadir}/tables`) or `memory://` (rebuilt from the changelog at every start).
    pub store: String,
    /// After a stop, how long agents may take to finish their current events before they are
    /// cancelled (their unacked events are processed again after a restart).
    pub shutdown_timeout: Duration,
    /// What happens to a record whose key or value does not decode, or that is larger than
    /// `max_record_bytes`.
    pub bad_record_policy: BadRecordPolicy,
    /// Records (key and value) larger than this are bad records.
    pub max_record_bytes: usize,
    /// Size of the segment files of the embedded log's partitions (`local://`) and of the
    /// tables' stores (Kafka's `log.segment.bytes`). Retention deletes and compaction
    /// rewrites whole sealed segments, so smaller ones give disk space back sooner; 4 KiB to
    /// 1 GiB.
    pub segment_bytes: u64,
    /// On `kafka://` only: the partition numbers this worker takes of every topic it
    /// consumes (the agents' sources, repartition topics and the tables' changelogs), without
    /// joining the app's consumer group: several workers of one app can split a topic by hand.
    /// `None` (the default) joins the group, which shares the partitions out among the
    /// workers. Numbers a topic does not have are skipped for that topic; a number no consumed
    /// topic has stops the worker at start-up. Faust has no such setting. Other transports
    /// refuse it: `local://` has one worker, and `memory://` splits partitions among its
    /// workers itself.
    pub partitions: Option<Vec<u32>>,
    /// On `kafka://`: how long the group waits for a worker's heartbeat before it gives the
    /// worker's partitions to others. A takeover after a crash takes about this long.
    pub broker_session_timeout: Duration,
    /// On `kafka://`: how often a worker heartbeats (at most a third of the session timeout is
    /// used).
    pub broker_heartbeat_interval: Duration,
    /// On `kafka://`: how long the group waits for its workers to rejoin when it rebalances.
    pub broker_rebalance_timeout: Duration,
    /// On `kafka://`: static membership. A worker restarted with the same id within the
    /// session timeout gets its partitions back without a rebalance; each worker needs its
    /// own, and a static worker does not leave the group when it stops.
    pub consumer_group_instance_id: Option<String>,
    /// On `kafka://`: how many other workers follow each table partition's changelog as a
    /// standby, so that a takeover replays only what the standby has not read yet.
    pub table_standby_replicas: u32,
    /// On `kafka://`: TLS to the brokers (Faust's `ssl_context`, and the `SSL` half of
    /// `SASL_SSL`). `None` (the default) speaks plain text.
    pub ssl_context: Option<faust_transport::TlsOptions>,
    /// On `kafka://`: SASL authentication (Faust's `broker_credentials` with
    /// `SASLCredentials`), over plain text or, with `ssl_context`, over TLS.
    pub broker_credentials: Option<faust_transport::SaslOptions>,
    /// On `kafka://`: idempotent producing (on by default): a produce retried after a lost
    /// answer is written once and in order.
    pub producer_idempotence: bool,
    /// What the app's outputs guarantee (Faust's `processing_guarantee`). Tables are exact
    /// either way.
    pub processing_guarantee: ProcessingGuarantee,
    /// On `kafka://`: the client id sent with every request.
    pub broker_client_id: String,
    /// On `kafka://`: the longest one request may take.
    pub broker_request_timeout: Duration,
    /// On `kafka://`: how many replicas acknowledge a produce.
    pub producer_acks: faust_transport::Acks,
    /// On `kafka://`: how produced batches are compressed.
    pub producer_compression_type: faust_transport::Compression,
    /// On `kafka://`: how long a produce waits for others to the same broker, to share a
    /// request.
    pub producer_linger: Duration,
    /// On `kafka://`: the largest record batch written, in bytes.
    pub producer_max_batch_size: usize,
    /// On `kafka://`: the replication factor of the topics the app creates.
    pub topic_replication_factor: i16,
    /// The time zone of crontabs that name none (an IANA name such as `Europe/Paris`).
    pub timezone: String,
    /// Declares no leader topic (`{id}-__assignor-__leader`): no worker is the leader, and
    /// leader-only timers and crontabs never run.
    pub topic_disable_leader: bool,
    /// How often a worker whose agents subscribe to topic patterns
    /// ([`App::topics_matching`](crate::App::topics_matching)) looks for new matching topics
    /// (Kafka's `metadata.max.age.ms` for pattern subscriptions).
    pub topic_pattern_refresh: Duration,
    /// The app's version (Faust's `version`): above 1, [`App::new`](crate::App::new) makes
    /// the id `id_format` of `id` and `version`, so a new version is a new app — a new
    /// consumer group, new internal topics (changelogs start empty), table stores under
    /// `{datadir}/v{version}` — that reads the same source topics from the start. The
    /// command line's `clean-versions` deletes the stores of other versions.
    pub version: u32,
    /// The id of a version above 1: `{id}` and `{version}` are replaced (Faust's
    /// `{self.version}` is understood too).
    pub id_format: String,
    /// The id before `version` was applied to it, once [`App::new`](crate::App::new) did.
    base_id: Option<String>,
}

/// What an app's outputs guarantee (Faust's `processing_guarantee`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ProcessingGuarantee {
    /// Every output of an event is written at least once: events processed again after a
    /// crash send again (the default).
    #[default]
    AtLeastOnce,
    /// Every output of an event is seen by readers exactly once: records become visible with
    /// the commit of the events that made them, and those of events processed again after a
    /// crash never do. Outputs reach readers at commit time (`commit_interval`). On
    /// `local://` only, for now.
    ExactlyOnce,
}

impl std::str::FromStr for ProcessingGuarantee {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "at_least_once" => Ok(ProcessingGuarantee::AtLeastOnce),
            "exactly_once" => Ok(ProcessingGuarantee::ExactlyOnce),
            _ => Err("expected at_least_once or exactly_once".to_string()),
        }
    }
}

/// What a stream does with a bad record: one whose key or value does not decode (malformed
/// JSON, an empty or null value, invalid UTF-8 for a string), or that is larger than
/// `max_record_bytes`. Whatever the policy, the record is logged with its topic, partition,
/// offset and a hex preview, and counted ([`WorkerStats::bad_records`](crate::WorkerStats)).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BadRecordPolicy {
    /// Skip it (its offset is committed like any other): the default.
    #[default]
    Skip,
    /// Send it, as it was read, to a dead-letter topic (`{id}-dead-letter` unless named),
    /// with `faust-error` and `faust-source` (`topic/partition@offset`) headers, then skip
    /// it; its offset is committed only once the dead-letter copy is durable.
    DeadLetter {
        /// The topic, or `None` for `{id}-dead-letter`.
        topic: Option<String>,
    },
    /// Stop the worker with an error naming the record; it is not committed, so a restart
    /// meets it again (nothing after it is lost).
    Stop,
}

impl std::str::FromStr for BadRecordPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "skip" => Ok(BadRecordPolicy::Skip),
            "stop" => Ok(BadRecordPolicy::Stop),
            "dead-letter" => Ok(BadRecordPolicy::DeadLetter { topic: None }),
            other => match other.strip_prefix("dead-letter:") {
                Some(topic) if !topic.is_empty() => Ok(BadRecordPolicy::DeadLetter { topic: Some(topic.to_string()) }),
                _ => Err("expected skip, stop, dead-letter or dead-letter:TOPIC".to_string()),
            },
        }
    }
}

impl Settings {
    /// Faust's defaults for an app named `id`.
    pub fn new(id: impl Into<String>) -> Settings {
        let id = id.into();
        Settings {
            datadir: PathBuf::from(format!("{id}-data")),
            id,
            broker: "local://".to_string(),
            topic_partitions: 8,
            commit_interval: Duration::from_millis(2800),
            commit_every: 10_000,
            stream_buffer_maxsize: 4096,
            key_serializer: Codec::RAW,
            value_serializer: Codec::JSON,
            auto_offset_reset: AutoOffsetReset::Earliest,
            cores: None,
            web_port: 6066,
            web_bind: "127.0.0.1".to_string(),
            web_enabled: true,
            monitor_enabled: true,
            store: "mmap://".to_string(),
            shutdown_timeout: Duration::from_secs(10),
            bad_record_policy: BadRecordPolicy::Skip,
            max_record_bytes: 1 << 20,
            segment_bytes: 64 << 20,
            partitions: None,
            broker_session_timeout: Duration::from_secs(60),
            broker_heartbeat_interval: Duration::from_secs(3),
            broker_rebalance_timeout: Duration::from_secs(60),
            consumer_group_instance_id: None,
            table_standby_replicas: 1,
            ssl_context: None,
            broker_credentials: None,
            producer_idempotence: true,
            processing_guarantee: ProcessingGuarantee::AtLeastOnce,
            broker_client_id: "faust-rs".to_string(),
            broker_request_timeout: Duration::from_secs(30),
            producer_acks: faust_transport::Acks::All,
            producer_compression_type: faust_transport::Compression::None,
            producer_linger: Duration::ZERO,
            producer_max_batch_size: 1 << 20,
            topic_replication_factor: 1,
            timezone: "UTC".to_string(),
            topic_disable_leader: false,
            topic_pattern_refresh: Duration::from_secs(10),
            worker_spin: Duration::ZERO,
            version: 1,
            id_format: "{id}-v{version}".to_string(),
            base_id: None,
        }
    }

    /// These settings with `version` applied to the id (once): for a version above 1, the id
    /// is `id_format` of the id and the version.
    pub(crate) fn versioned(mut self) -> Settings {
        if self.version > 1 && self.base_id.is_none() {
            let id = self
                .id_format
                .replace("{id}", &self.id)
                .replace("{self.version}", &self.version.to_string())
                .replace("{version}", &self.version.to_string());
            self.base_id = Some(std::mem::replace(&mut self.id, id));
        }
        self
    }

    /// Where the table stores are: `{datadir}/tables` for version 1, `{datadir}/v{version}/tables`
    /// for a later one (Faust's `tabledir` under `appdir`).
    pub(crate) fn table_dir(&self) -> PathBuf {
        match self.version {
            0 | 1 => self.datadir.join("tables"),
            version => self.datadir.join(format!("v{version}")).join("tables"),
        }
    }

    /// The Kafka client's options that follow from these settings; the worker adds what
    /// only it knows (membership, its advertised address).
    pub(crate) fn kafka_options(&self) -> faust_transport::KafkaOptions {
        faust_transport::KafkaOptions {
            session_timeout: self.broker_session_timeout,
            heartbeat_interval: self.broker_heartbeat_interval,
            rebalance_timeout: self.broker_rebalance_timeout,
            group_instance_id: self.consumer_group_instance_id.clone(),
            standby_replicas: self.table_standby_replicas,
            tls: self.ssl_context.clone(),
            sasl: self.broker_credentials.clone(),
            idempotent: self.producer_idempotence,
            // Exactly-once reads only what committed transactions wrote.
            read_committed: self.processing_guarantee == ProcessingGuarantee::ExactlyOnce,
            client_id: self.broker_client_id.clone(),
            request_timeout: self.broker_request_timeout,
            acks: self.producer_acks,
            compression: self.producer_compression_type,
            linger: self.producer_linger,
            max_batch_bytes: self.producer_max_batch_size,
            replication_factor: self.topic_replication_factor,
            ..faust_transport::KafkaOptions::default()
        }
    }

    /// The Kafka client's tuning, under Faust's names.
    fn apply_kafka_vars(
        &mut self,
        get: &dyn Fn(&str) -> Option<(String, String)>,
        seconds: &dyn Fn((String, String)) -> Result<Duration, SettingsError>,
    ) -> Result<(), SettingsError> {
        let refuse = |(variable, value): (String, String), reason: &str| SettingsError {
            variable,
            value,
            reason: reason.to_string(),
        };
        if let Some((_, v)) = get("BROKER_CLIENT_ID") {
            self.broker_client_id = v.trim().to_string();
        }
        if let Some(kv) = get("BROKER_REQUEST_TIMEOUT") {
            self.broker_request_timeout = seconds(kv)?;
        }
        if let Some(kv) = get("PRODUCER_ACKS") {
            self.producer_acks = match kv.1.trim().to_ascii_lowercase().as_str() {
                "-1" | "all" => faust_transport::Acks::All,
                "1" => faust_transport::Acks::Leader,
                "0" => {
                    return Err(refuse(
                        kv,
                        "acks=0 is not offered: a commit must know its sends are durable; use 1 or all",
                    ));
                }
                _ => return Err(refuse(kv, "expected -1 (all) or 1")),
            };
        }
        if let Some(kv) = get("PRODUCER_COMPRESSION_TYPE") {
            self.producer_compression_type = match kv.1.trim().to_ascii_lowercase().as_str() {
                "" | "none" => faust_transport::Compression::None,
                "gzip" => faust_transport::Compression::Gzip,
                "snappy" => faust_transport::Compression::Snappy,
                "lz4" => faust_transport::Compression::Lz4,
                "zstd" => faust_transport::Compression::Zstd,
                _ => return Err(refuse(kv, "expected gzip, snappy, lz4, zstd or none")),
            };
        }
        if let Some(kv) = get("PRODUCER_LINGER_MS") {
            let ms: u64 = kv.1.trim().parse().map_err(|_| refuse(kv.clone(), "expected milliseconds"))?;
            self.producer_linger = Duration::from_millis(ms);
        }
        if let Some(kv) = get("PRODUCER_LINGER") {
            let secs: f64 = kv.1.trim().parse().map_err(|_| refuse(kv.clone(), "expected seconds, e.g. 0.005"))?;
            if !(secs.is_finite() && (0.0..3600.0).contains(&secs)) {
                return Err(refuse(kv, "expected seconds from 0 to 3600"));
            }
            self.producer_linger = Duration::from_secs_f64(secs);
        }
        if let Some(kv) = get("PRODUCER_MAX_BATCH_SIZE") {
            let bytes: usize = kv.1.trim().parse().map_err(|_| refuse(kv.clone(), "expected bytes"))?;
            if bytes == 0 {
                return Err(refuse(kv, "expected at least 1 byte"));
            }
            self.producer_max_batch_size = bytes;
        }
        if let Some(kv) = get("TOPIC_REPLICATION_FACTOR") {
            self.topic_replication_factor = match kv.1.trim().parse::<i16>() {
                Ok(n) if n >= 1 => n,
                _ => return Err(refuse(kv, "expected a replication factor of at least 1")),
            };
        }
        Ok(())
    }

    /// TLS and SASL from the environment: any `BROKER_SSL_*` variable (or `BROKER_SSL=true`)
    /// turns TLS on; the three SASL variables go together.
    fn apply_security_vars(&mut self, get: &dyn Fn(&str) -> Option<(String, String)>) -> Result<(), SettingsError> {
        let path = |name: &str| get(name).map(|(_, v)| PathBuf::from(v.trim())).filter(|p| !p.as_os_str().is_empty());
        let ca_file = path("BROKER_SSL_CAFILE");
        let cert = path("BROKER_SSL_CERTFILE");
        let key = path("BROKER_SSL_KEYFILE");
        let server_name = get("BROKER_SSL_SERVER_NAME").map(|(_, v)| v.trim().to_string()).filter(|v| !v.is_empty());
        let on = match get("BROKER_SSL") {
            Some((variable, value)) => match value.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Some(true),
                "0" | "false" | "no" | "off" => Some(false),
                _ => return Err(SettingsError { variable, value, reason: "expected true or false".into() }),
            },
            None => None,
        };
        let any_file = ca_file.is_some() || cert.is_some() || key.is_some() || server_name.is_some();
        if on == Some(false) {
            self.ssl_context = None;
        } else if on == Some(true) || any_file {
            let client_cert = match (cert, key) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                (cert, _) => {
                    let (variable, missing) = if cert.is_some() {
                        ("BROKER_SSL_CERTFILE", "BROKER_SSL_KEYFILE")
                    } else {
                        ("BROKER_SSL_KEYFILE", "BROKER_SSL_CERTFILE")
                    };
                    return Err(SettingsError {
                        variable: variable.into(),
                        value: String::new(),
                        reason: format!("a client certificate needs both files: set {missing} too"),
                    });
                }
            };
            self.ssl_context = Some(faust_transport::TlsOptions { ca_file, client_cert, server_name });
        }
        let mechanism = get("BROKER_SASL_MECHANISM");
        let username = get("BROKER_SASL_USERNAME");
        let password = get("BROKER_SASL_PASSWORD");
        if mechanism.is_some() || username.is_some() || password.is_some() {
            let mechanism = match mechanism {
                Some((variable, value)) => value
                    .parse::<faust_transport::SaslMechanism>()
                    .map_err(|reason| SettingsError { variable, value, reason })?,
                None => faust_transport::SaslMechanism::Plain,
            };
            let (Some((_, username)), Some((_, password))) = (username, password) else {
                return Err(SettingsError {
                    variable: "BROKER_SASL_USERNAME".into(),
                    value: String::new(),
                    reason: "SASL needs both BROKER_SASL_USERNAME and BROKER_SASL_PASSWORD".into(),
                });
            };
            self.broker_credentials = Some(faust_transport::SaslOptions { mechanism, username, password });
        }
        Ok(())
    }

    /// The dead-letter topic, when the policy has one.
    pub(crate) fn dead_letter_topic(&self) -> Option<String> {
        match &self.bad_record_policy {
            BadRecordPolicy::DeadLetter { topic } => {
                Some(topic.clone().unwrap_or_else(|| format!("{}-dead-letter", self.id)))
            }
            _ => None,
        }
    }

    /// Applies the process environment (see the table above).
    pub fn from_env(self) -> Result<Settings, SettingsError> {
        self.from_vars(std::env::vars())
    }

    /// Applies variables from `vars` as if they were the environment.
    pub fn from_vars<K, V>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Result<Settings, SettingsError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let vars: Vec<(String, String)> =
            vars.into_iter().map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string())).collect();
        let prefix = vars.iter().find(|(k, _)| k == "APP_ENV_PREFIX").map(|(_, v)| format!("{v}_")).unwrap_or_default();
        let get = |name: &str| {
            let full = format!("{prefix}{name}");
            vars.iter().find(|(k, _)| *k == full).map(|(_, v)| (full, v.clone()))
        };
        fn parse<T: std::str::FromStr>((variable, value): (String, String), what: &str) -> Result<T, SettingsError> {
            value.trim().parse().map_err(|_| SettingsError { variable, value, reason: format!("expected {what}") })
        }
        fn parse_bool((variable, value): (String, String)) -> Result<bool, SettingsError> {
            match value.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(SettingsError { variable, value, reason: "expected true or false".into() }),
            }
        }
        if let Some((variable, value)) = get("APP_ID") {
            if faust_transport::validate_topic_name(&value).is_err() {
                return Err(SettingsError {
                    variable,
                    value,
                    reason: "expected 1 to 249 characters of a-z, A-Z, 0-9, `.`, `_` and `-` (it names topics)".into(),
                });
            }
            // The data directory follows the id unless it was set.
            if self.datadir.as_os_str() == format!("{}-data", self.id).as_str() {
                self.datadir = PathBuf::from(format!("{value}-data"));
            }
            self.id = value;
        }
        if let Some(kv) = get("APP_VERSION") {
            let version: u32 = parse(kv.clone(), "a version number, 1 or more")?;
            if version == 0 {
                return Err(SettingsError {
                    variable: kv.0,
                    value: kv.1,
                    reason: "expected a version number, 1 or more".into(),
                });
            }
            self.version = version;
        }
        if let Some((variable, value)) = get("APP_ID_FORMAT") {
            if !value.contains("{id}") {
                return Err(SettingsError { variable, value, reason: "expected a template with `{id}`".into() });
            }
            self.id_format = value;
        }
        if let Some((_, v)) = get("BROKER_URL") {
            self.broker = v;
        }
        if let Some((_, v)) = get("APP_DATADIR") {
            self.datadir = PathBuf::from(v);
        }
        if let Some(kv) = get("TOPIC_PARTITIONS") {
            let n: u32 = parse(kv.clone(), "a positive number of partitions")?;
            if n == 0 {
                return Err(SettingsError {
                    variable: kv.0,
                    value: kv.1,
                    reason: "expected at least 1 partition".into(),
                });
            }
            self.topic_partitions = n;
        }
        let seconds = |kv: (String, String)| -> Result<Duration, SettingsError> {
            let secs: f64 = parse(kv.clone(), "seconds, e.g. 2.8")?;
            if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
                return Err(SettingsError {
                    variable: kv.0,
                    value: kv.1,
                    reason: "expected a positive duration".into(),
                });
            }
            Ok(Duration::from_secs_f64(secs))
        };
        if let Some(kv) = get("BROKER_COMMIT_INTERVAL") {
            self.commit_interval = seconds(kv)?;
        }
        if let Some(kv) = get("TOPIC_PATTERN_REFRESH") {
            self.topic_pattern_refresh = seconds(kv)?;
        }
        if let Some(kv) = get("BROKER_SESSION_TIMEOUT") {
            self.broker_session_timeout = seconds(kv)?;
        }
        if let Some(kv) = get("BROKER_HEARTBEAT_INTERVAL") {
            self.broker_heartbeat_interval = seconds(kv)?;
        }
        if let Some(kv) = get("BROKER_REBALANCE_TIMEOUT") {
            self.broker_rebalance_timeout = seconds(kv)?;
        }
        if let Some((_, v)) = get("CONSUMER_GROUP_INSTANCE_ID") {
            self.consumer_group_instance_id = Some(v).filter(|v| !v.trim().is_empty());
        }
        if let Some(kv) = get("TABLE_STANDBY_REPLICAS") {
            self.table_standby_replicas = parse(kv, "a number of replicas")?;
        }
        if let Some(kv) = get("PRODUCER_IDEMPOTENCE") {
            self.producer_idempotence = parse_bool(kv)?;
        }
        if let Some((variable, value)) = get("PROCESSING_GUARANTEE") {
            self.processing_guarantee = value.parse().map_err(|reason| SettingsError { variable, value, reason })?;
        }
        self.apply_security_vars(&get)?;
        if let Some(kv) = get("BROKER_COMMIT_EVERY") {
            self.commit_every = parse(kv, "a number of events")?;
        }
        if let Some(kv) = get("STREAM_BUFFER_MAXSIZE") {
            self.stream_buffer_maxsize = parse(kv, "a number of events")?;
        }
        // Codec names are looked up now: transforms must be registered before the
        // environment is read (as Faust's codecs are registered at import).
        let codec = |(variable, value): (String, String)| {
            value.parse::<Codec>().map_err(|e| SettingsError { variable, value: value.clone(), reason: e.to_string() })
        };
        if let Some(kv) = get("APP_KEY_SERIALIZER") {
            self.key_serializer = codec(kv)?;
        }
        if let Some(kv) = get("APP_VALUE_SERIALIZER") {
            self.value_serializer = codec(kv)?;
        }
        if let Some((variable, value)) = get("CONSUMER_AUTO_OFFSET_RESET") {
            self.auto_offset_reset =
                value.parse().map_err(|reason| SettingsError { variable, value: value.clone(), reason })?;
        }
        if let Some(kv) = get("WORKER_CORES") {
            let n: usize = parse(kv.clone(), "a number of cores")?;
            if n == 0 {
                return Err(SettingsError { variable: kv.0, value: kv.1, reason: "expected at least 1 core".into() });
            }
            self.cores = Some(n);
        }
        if let Some(kv) = get("WORKER_SPIN") {
            let secs: f64 = parse(kv.clone(), "seconds, e.g. 0.0002")?;
            if !(secs.is_finite() && (0.0..=1.0).contains(&secs)) {
                return Err(SettingsError {
                    variable: kv.0,
                    value: kv.1,
                    reason: "expected seconds from 0 to 1".into(),
                });
            }
            self.worker_spin = Duration::from_secs_f64(secs);
        }
        for name in ["APP_STORE", "STORE"] {
            if let Some((variable, value)) = get(name) {
                self.store = match value.trim() {
                    "mmap://" | "memory://" => value.trim().to_string(),
                    // Faust's persistent store: ours is the mmap'd one.
                    "rocksdb://" => "mmap://".to_string(),
                    _ => {
                        return Err(SettingsError {
                            variable,
                            value,
                            reason: "expected mmap:// (rocksdb:// is taken for it) or memory://".into(),
                        });
                    }
                };
            }
        }
        self.apply_kafka_vars(&get, &seconds)?;
        if let Some(kv) = get("WEB_PORT") {
            self.web_port = parse(kv, "a TCP port")?;
        }
        if let Some((_, v)) = get("WEB_BIND") {
            self.web_bind = v.trim().to_string();
        }
        if let Some(kv) = get("WEB_ENABLED") {
            self.web_enabled = parse_bool(kv)?;
        }
        if let Some((variable, value)) = get("TIMEZONE") {
            crate::cron::time_zone(value.trim()).map_err(|e| SettingsError {
                variable,
                value: value.clone(),
                reason: e.to_string(),
            })?;
            self.timezone = value.trim().to_string();
        }
        if let Some(kv) = get("TOPIC_DISABLE_LEADER") {
            self.topic_disable_leader = parse_bool(kv)?;
        }
        if let Some(kv) = get("MONITOR_ENABLED") {
            self.monitor_enabled = parse_bool(kv)?;
        }
        if let Some((variable, value)) = get("BAD_RECORD_POLICY") {
            self.bad_record_policy =
                value.parse().map_err(|reason| SettingsError { variable, value: value.clone(), reason })?;
        }
        if let Some(kv) = get("MAX_RECORD_BYTES") {
            self.max_record_bytes = parse(kv, "a number of bytes")?;
        }
        if let Some(kv) = get("SEGMENT_BYTES") {
            let bytes: u64 = parse(kv.clone(), "a number of bytes")?;
            if !(4096..=faust_storage::MAX_SEGMENT_BYTES).contains(&bytes) {
                return Err(SettingsError {
                    variable: kv.0,
                    value: kv.1,
                    reason: format!("expected 4096 to {} bytes", faust_storage::MAX_SEGMENT_BYTES),
                });
            }
            self.segment_bytes = bytes;
        }
        if let Some((variable, value)) = get("WORKER_PARTITIONS") {
            self.partitions = Some(parse_partitions(&value).map_err(|reason| SettingsError {
                variable,
                value: value.clone(),
                reason,
            })?);
        }
        Ok(self)
    }

    /// The transport URL with the embedded default's path filled in.
    pub fn broker_url(&self) -> String {
        match self.broker.strip_prefix("local://") {
            Some("") => format!("local://{}", self.datadir.join("topics").display()),
            _ => self.broker.clone(),
        }
    }
}

/// Parses a list of partition numbers and ranges, such as `0-3,6` (sorted, without
/// repeats). What is wrong is told in words, for [`SettingsError::reason`] and the CLI.
///
/// ```
/// assert_eq!(faust::parse_partitions("0-3, 6").unwrap(), vec![0, 1, 2, 3, 6]);
/// assert!(faust::parse_partitions("3-1").is_err());
/// ```
pub fn parse_partitions(text: &str) -> Result<Vec<u32>, String> {
    const WHAT: &str = "expected partition numbers and ranges, such as 0-3,6";
    let number = |s: &str| s.trim().parse::<u32>().map_err(|_| format!("{WHAT}; `{}` is not a partition", s.trim()));
    let mut out = std::collections::BTreeSet::new();
    for part in text.split(',') {
        if part.trim().is_empty() {
            return Err(format!("{WHAT}; an empty item"));
        }
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (number(from)?, number(to)?);
                if from > to {
                    return Err(format!("{WHAT}; the range {from}-{to} is empty"));
                }
                if to - from >= 1 << 16 {
                    return Err(format!("{WHAT}; the range {from}-{to} is larger than 65536 partitions"));
                }
                out.extend(from..=to);
            }
            None => {
                out.insert(number(part)?);
            }
        }
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_fausts() {
        let s = Settings::new("app");
        assert_eq!(s.topic_partitions, 8);
        assert_eq!(s.commit_interval, Duration::from_millis(2800));
        assert_eq!(s.stream_buffer_maxsize, 4096);
        assert_eq!((s.key_serializer.name(), s.value_serializer.name()), ("raw", "json"));
        assert_eq!(s.auto_offset_reset, AutoOffsetReset::Earliest);
        assert_eq!(s.web_port, 6066);
        assert_eq!(s.broker_url(), "local://app-data/topics");
    }

    #[test]
    fn environment_overrides_with_and_without_prefix() {
        let vars = [
            ("BROKER_URL", "memory://"),
            ("BROKER_COMMIT_INTERVAL", "0.5"),
            ("CONSUMER_AUTO_OFFSET_RESET", "latest"),
            ("WORKER_CORES", "2"),
            ("WORKER_SPIN", "0.0002"),
        ];
        let s = Settings::new("app").from_vars(vars).unwrap();
        assert_eq!(s.broker_url(), "memory://");
        assert_eq!(s.commit_interval, Duration::from_millis(500));
        assert_eq!(s.auto_offset_reset, AutoOffsetReset::Latest);
        assert_eq!(s.cores, Some(2));
        assert_eq!(s.worker_spin, Duration::from_micros(200));

        let vars = [("APP_KEY_SERIALIZER", "json"), ("APP_VALUE_SERIALIZER", " json | binary ")];
        let s = Settings::new("app").from_vars(vars).unwrap();
        assert_eq!((s.key_serializer, s.value_serializer.name()), (Codec::JSON, "json|binary"));

        let vars = [("APP_ENV_PREFIX", "MYAPP"), ("MYAPP_TOPIC_PARTITIONS", "3"), ("TOPIC_PARTITIONS", "5")];
        let s = Settings::new("app").from_vars(vars).unwrap();
        assert_eq!(s.topic_partitions, 3, "the prefixed variable wins; the bare one is ignored");

        // APP_ID renames the app, and its default data directory with it.
        let s = Settings::new("orders").from_vars([("APP_ID", "orders-2")]).unwrap();
        assert_eq!((s.id.as_str(), s.datadir.as_path()), ("orders-2", std::path::Path::new("orders-2-data")));
        let s = Settings::new("orders").from_vars([("APP_ID", "o2"), ("APP_DATADIR", "d")]).unwrap();
        assert_eq!((s.id.as_str(), s.datadir.as_path()), ("o2", std::path::Path::new("d")));
    }

    #[test]
    fn tls_and_sasl_from_the_environment() {
        let s = Settings::new("app");
        assert_eq!(
            (s.ssl_context.is_none(), s.broker_credentials.is_none(), s.producer_idempotence),
            (true, true, true)
        );
        let s = Settings::new("app")
            .from_vars([
                ("BROKER_SSL_CAFILE", "/etc/ca.pem"),
                ("BROKER_SASL_MECHANISM", "scram-sha-512"),
                ("BROKER_SASL_USERNAME", "alice"),
                ("BROKER_SASL_PASSWORD", "secret"),
                ("PRODUCER_IDEMPOTENCE", "false"),
            ])
            .unwrap();
        let tls = s.ssl_context.clone().unwrap();
        assert_eq!(tls.ca_file, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(tls.client_cert, None);
        let sasl = s.broker_credentials.clone().unwrap();
        assert_eq!(sasl.mechanism, faust_transport::SaslMechanism::ScramSha512);
        assert_eq!((sasl.username.as_str(), sasl.password.as_str()), ("alice", "secret"));
        assert!(!format!("{sasl:?}").contains("secret"));
        assert!(!s.producer_idempotence);
        let options = s.kafka_options();
        assert_eq!(
            (options.tls, options.sasl.map(|o| o.username), options.idempotent),
            (Some(tls), Some("alice".into()), false)
        );
        // System roots; PLAIN when no mechanism is named.
        let s = Settings::new("app")
            .from_vars([("BROKER_SSL", "true"), ("BROKER_SASL_USERNAME", "u"), ("BROKER_SASL_PASSWORD", "p")])
            .unwrap();
        assert_eq!(s.ssl_context, Some(faust_transport::TlsOptions::default()));
        assert_eq!(s.broker_credentials.unwrap().mechanism, faust_transport::SaslMechanism::Plain);
        // Half a client certificate, half the credentials, an unknown mechanism: refused, named.
        let e = Settings::new("app").from_vars([("BROKER_SSL_CERTFILE", "c.pem")]).unwrap_err();
        assert!(e.reason.contains("BROKER_SSL_KEYFILE"), "{e}");
        let e = Settings::new("app").from_vars([("BROKER_SASL_USERNAME", "u")]).unwrap_err();
        assert!(e.reason.contains("BROKER_SASL_PASSWORD"), "{e}");
        let e = Settings::new("app")
            .from_vars([
                ("BROKER_SASL_MECHANISM", "GSSAPI"),
                ("BROKER_SASL_USERNAME", "u"),
                ("BROKER_SASL_PASSWORD", "p"),
            ])
            .unwrap_err();
        assert_eq!(e.variable, "BROKER_SASL_MECHANISM");
    }

    #[test]
    fn kafka_tuning_under_faust_names() {
        let s = Settings::new("app")
            .from_vars([
                ("BROKER_CLIENT_ID", "orders-1"),
                ("BROKER_REQUEST_TIMEOUT", "90"),
                ("PRODUCER_ACKS", "1"),
                ("PRODUCER_COMPRESSION_TYPE", "zstd"),
                ("PRODUCER_LINGER_MS", "7"),
                ("PRODUCER_MAX_BATCH_SIZE", "16384"),
                ("TOPIC_REPLICATION_FACTOR", "3"),
                ("APP_STORE", "rocksdb://"),
            ])
            .unwrap();
        let o = s.kafka_options();
        assert_eq!((o.client_id.as_str(), o.request_timeout), ("orders-1", Duration::from_secs(90)));
        assert_eq!((o.acks, o.compression), (faust_transport::Acks::Leader, faust_transport::Compression::Zstd));
        assert_eq!((o.linger, o.max_batch_bytes, o.replication_factor), (Duration::from_millis(7), 16384, 3));
        assert_eq!(s.store, "mmap://");
        // `producer_linger` in seconds wins over the deprecated milliseconds.
        let s = Settings::new("app").from_vars([("PRODUCER_LINGER_MS", "7"), ("PRODUCER_LINGER", "0.5")]).unwrap();
        assert_eq!(s.producer_linger, Duration::from_millis(500));
        for (variable, value, says) in [
            ("PRODUCER_ACKS", "0", "durable"),
            ("PRODUCER_COMPRESSION_TYPE", "brotli", "zstd"),
            ("TOPIC_REPLICATION_FACTOR", "0", "at least 1"),
            ("APP_STORE", "aerospike://", "mmap://"),
        ] {
            let e = Settings::new("app").from_vars([(variable, value)]).unwrap_err();
            assert!(e.variable == variable && e.reason.contains(says), "{e}");
        }
    }

    #[test]
    fn a_new_version_is_a_new_app_id() {
        let s = Settings::new("orders").from_vars([("APP_VERSION", "2")]).unwrap();
        assert_eq!((s.version, s.id.as_str()), (2, "orders"), "applied by App::new");
        assert_eq!(s.clone().versioned().id, "orders-v2");
        assert_eq!(s.versioned().versioned().id, "orders-v2", "once");
        let s = Settings::new("orders")
            .from_vars([("APP_VERSION", "4"), ("APP_ID_FORMAT", "{id}.{self.version}")])
            .unwrap();
        assert_eq!(s.versioned().id, "orders.4", "Faust's placeholder");
        assert_eq!(Settings::new("orders").versioned().id, "orders", "version 1 keeps the id");
        for bad in [("APP_VERSION", "0"), ("APP_VERSION", "x"), ("APP_ID_FORMAT", "v2")] {
            let err = Settings::new("orders").from_vars([bad]).unwrap_err();
            assert_eq!(err.variable, bad.0);
        }
    }

    #[test]
    fn segment_bytes() {
        assert_eq!(Settings::new("app").segment_bytes, 64 << 20);
        let s = Settings::new("app").from_vars([("SEGMENT_BYTES", "262144")]).unwrap();
        assert_eq!(s.segment_bytes, 256 << 10);
    }

    #[test]
    fn worker_partitions() {
        assert_eq!(Settings::new("app").partitions, None);
        let s = Settings::new("app").from_vars([("WORKER_PARTITIONS", "6, 0-3,2")]).unwrap();
        assert_eq!(s.partitions, Some(vec![0, 1, 2, 3, 6]));
        assert_eq!(parse_partitions("7").unwrap(), vec![7]);
        assert_eq!(parse_partitions("4-4").unwrap(), vec![4]);
        let err = Settings::new("app").from_vars([("WORKER_PARTITIONS", "0-3,x")]).unwrap_err();
        assert!(err.reason.contains("`x` is not a partition"), "{err}");
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("TOPIC_PARTITIONS", "eight"),
            ("TOPIC_PARTITIONS", "0"),
            ("BROKER_COMMIT_INTERVAL", "-1"),
            ("CONSUMER_AUTO_OFFSET_RESET", "middle"),
            ("WEB_PORT", "70000"),
            ("WORKER_CORES", "0"),
            ("APP_VALUE_SERIALIZER", "pickle"),
            ("APP_KEY_SERIALIZER", "binary|json"),
            ("WORKER_PARTITIONS", ""),
            ("WORKER_PARTITIONS", "0-3,x"),
            ("WORKER_PARTITIONS", "3-1"),
            ("WORKER_PARTITIONS", "1,,2"),
            ("WORKER_PARTITIONS", "-1"),
            ("APP_ID", "no/slash"),
            ("APP_ID", ""),
            ("SEGMENT_BYTES", "1024"),
            ("SEGMENT_BYTES", "4GiB"),
        ] {
            let err = Settings::new("app").from_vars([(k, v)]).unwrap_err();
            assert_eq!((err.variable.as_str(), err.value.as_str()), (k, v));
            assert!(err.to_string().contains(k), "{err}");
        }
    }
}
