//! Tables: keyed state, sharded by partition, replicated through a changelog topic.
//!
//! A table has one shard per partition, on the core that owns that partition of the source
//! topics (tables are co-partitioned with their sources, as in Faust and Kafka Streams). A
//! shard is a typed write-back cache over a log-structured store (or, for `memory://`
//! tables, the cache alone):
//!
//! - **Writes of an event are held back until the event is acked.** An agent's writes go to
//!   the shard's pending list, tagged with the event being processed; they reach the cache
//!   when the agent moves past the event (or acks it), and are dropped if the agent fails on
//!   it (the event is retried, so its writes must not count twice). Reads inside the event see
//!   its own pending writes. So the cache only ever holds effects of finished events.
//! - **A commit** (see `worker.rs`) freezes the dirty entries of every shard of the core in
//!   the same instant as it reads the committable source offsets, writes them once to the
//!   store and once to the changelog, waits until the changelog (and every buffered send) is
//!   durable, commits the source offsets *and the changelog end offsets in one transport
//!   commit*, and then checkpoints the stores. The pair (source offset, changelog offset) is
//!   therefore committed atomically, and a store checkpoint never claims more than what is
//!   committed.
//! - **Recovery** opens the store at its checkpoint and replays the changelog from the
//!   checkpoint's offset to the *committed* changelog offset — not to the high-water mark:
//!   records past the committed offset were written by a commit that did not finish, for
//!   events whose source offsets were not committed and that will be processed again. They
//!   are neutralized by appending, for each key they touch, the committed value (or a
//!   tombstone), so that any later replay through them also ends at the committed state.
//!
//! Together these give exact state under at-least-once input: after a crash at any point, a
//! shard holds exactly the effects of the events below its partition's committed offset.
//!
//! **Why a changelog topic on `local://` too**, rather than using the store's own log as the
//! changelog: the changelog is the copy that survives the loss of the store (a damaged shard
//! is rebuilt from it), it is what another worker recovers from when a partition moves (the
//! multi-worker transports), and it lets the store skip `fsync` entirely. The write-back cache
//! keeps the cost small: a commit writes each dirty key once, however often it changed.

use std::any::Any;
use std::cell::RefCell;
use std::hash::Hash;
use std::io::IsTerminal;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust_storage::{BatchBuilder, Record, Store, StoreConfig, SyncPolicy, WriteBatch};
use faust_transport::{Fence, OffsetSpec, TopicPartition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{Codec, CodecError};
use crate::transports::AnyCore;

type Map<K, V> = hashbrown::HashMap<K, V, foldhash::fast::RandomState>;

/// A store-backed shard keeps at most this many clean entries cached after a commit.
const CACHE_MAX_KEYS: usize = 200_000;
/// Entries encoded per step of a commit, between which the core serves other tasks.
const FREEZE_CHUNK: usize = 4096;
/// Changelog records are produced in batches of about this many bytes.
const CHANGELOG_BATCH_BYTES: usize = 1 << 20;
/// How often recovery asks again when a changelog looks shorter than its committed offset,
/// and how long it waits each time, before it reports the changelog short.
const SHORT_CHANGELOG_RETRIES: u32 = 10;
const SHORT_CHANGELOG_WAIT: Duration = Duration::from_millis(100);
/// Bytes asked for per fetch while replaying a changelog.
const REPLAY_FETCH_BYTES: usize = 4 << 20;
/// How often recovery logs its progress when stderr is not a terminal.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(5);

/// Why a table operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TableError {
    /// The table was used outside stream processing without naming a partition.
    #[error(
        "table `{table}`: no current event to take the partition from; use table.partition(p) outside stream processing"
    )]
    OutsideStream {
        /// The table.
        table: String,
    },
    /// The table was used outside a running worker.
    #[error("table `{table}`: not inside a running worker")]
    NotRunning {
        /// The table.
        table: String,
    },
    /// The shard of this partition lives on another core (or worker).
    #[error("table `{table}` partition {partition} is not on this core (core {core})")]
    NotLocal {
        /// The table.
        table: String,
        /// The partition.
        partition: u32,
        /// The calling core.
        core: usize,
    },
    /// `update` on a missing key of a table without a default.
    #[error("table `{table}` has no value for the key and no default (set one with Table::with_default)")]
    NoDefault {
        /// The table.
        table: String,
    },
    /// A key or value could not be encoded or decoded. A stored value that no longer decodes
    /// (the value type changed) fails here unless the table resets such values.
    #[error("table `{table}` partition {partition}: {what}: {source}")]
    Codec {
        /// The table.
        table: String,
        /// The partition.
        partition: u32,
        /// What failed: "key", "value" or "stored value (key 6b6579…)".
        what: String,
        /// The codec's error.
        #[source]
        source: CodecError,
    },
    /// The shard's store failed.
    #[error("table `{table}` partition {partition}: {source}")]
    Store {
        /// The table.
        table: String,
        /// The partition.
        partition: u32,
        /// The store's error.
        #[source]
        source: faust_storage::Error,
    },
    /// The table's changelog does not have as many partitions as the topic of the event
    /// that uses it: the table is not co-partitioned with the agent's topic, so the shard of
    /// the event's partition would hold keys of another partition (Faust's
    /// `PartitionsMismatch`).
    #[error(
        "table `{table}`: its changelog `{changelog}` has {changelog_partitions} partitions, but the event comes from `{topic}`, which has {topic_partitions}: a table must have as many partitions as the topic its agent consumes. Declare it with `.with_partitions({topic_partitions})` (an existing changelog keeps its count: delete the changelog topic to create it again), or give the topic {changelog_partitions} partitions"
    )]
    PartitionsMismatch {
        /// The table.
        table: String,
        /// Its changelog topic.
        changelog: String,
        /// The changelog's partitions.
        changelog_partitions: u32,
        /// The event's topic.
        topic: String,
        /// Its partitions.
        topic_partitions: u32,
    },
    /// The changelog was damaged, and its repair lost records that recovery needs (they are
    /// above the store's checkpoint, or the table keeps no store): the table cannot be
    /// rebuilt exactly.
    #[error(
        "table `{table}` partition {partition}: its changelog `{changelog}` was damaged and its repair lost offsets {lost}, which recovery needs (it replays {from}..{committed}); the table cannot be rebuilt exactly. Restore the partition's log files (the damaged originals are in its `damaged/` directory), or start the app over from its sources (`reset --all`)"
    )]
    ChangelogDamaged {
        /// The table.
        table: String,
        /// The partition.
        partition: u32,
        /// The changelog topic.
        changelog: String,
        /// The lost offset ranges recovery needs.
        lost: String,
        /// Where the replay starts (the store's checkpoint).
        from: u64,
        /// Where it ends (the committed changelog offset).
        committed: u64,
    },
    /// The changelog lost records recovery needs (retention removed them).
    #[error(
        "table `{table}` partition {partition}: recovery needs changelog `{changelog}` from offset {needed}, but it starts at {earliest} (records were removed by retention); delete the table's data directory to rebuild from what is left"
    )]
    ChangelogTruncated {
        /// The table.
        table: String,
        /// The partition.
        partition: u32,
        /// The changelog topic.
        changelog: String,
        /// The first offset recovery needs.
        needed: u64,
        /// The changelog's first offset.
        earliest: u64,
    },
    /// The changelog ends before the offset committed for it.
    #[error(
        "table `{table}` partition {partition}: changelog `{changelog}` ends at {end}, before its committed offset {committed} (was the topic deleted?)"
    )]
    ChangelogShort {
        /// The table.
        table: String,
        /// The partition.
        partition: u32,
        /// The changelog topic.
        changelog: String,
        /// Where it ends.
        end: u64,
        /// What was committed for it.
        committed: u64,
    },
    /// The transport failed while recovering or committing the table.
    #[error("table `{table}` partition {partition}: {source}")]
    Transport {
        /// The table.
        table: String,
        /// The partition.
        partition: u32,
        /// The transport's error.
        #[source]
        source: faust_transport::Error,
    },
}

/// How a table is configured; read when the worker starts.
struct Config<V> {
    default: Option<Arc<dyn Fn() -> V + Send + Sync>>,
    partitions: Option<u32>,
    /// Take the partition count of this topic (a repartition topic's positions table).
    partitions_like: Option<Arc<str>>,
    in_memory: bool,
    reset_bad_values: bool,
    key_codec: Codec,
    value_codec: Codec,
}

impl<V> Clone for Config<V> {
    fn clone(&self) -> Self {
        Config {
            default: self.default.clone(),
            partitions: self.partitions,
            partitions_like: self.partitions_like.clone(),
            in_memory: self.in_memory,
            reset_bad_values: self.reset_bad_values,
            key_codec: self.key_codec.clone(),
            value_codec: self.value_codec.clone(),
        }
    }
}

/// What the worker needs of a table, whatever its types.
pub(crate) trait TableMeta: Send + Sync {
    fn name(&self) -> &Arc<str>;
    fn changelog(&self) -> &Arc<str>;
    fn partitions(&self) -> Option<u32>;
    fn partitions_like(&self) -> Option<Arc<str>>;
    fn in_memory(&self) -> bool;
    /// The key and value codecs.
    fn codecs(&self) -> (Codec, Codec);
    fn open(&self, args: ShardArgs) -> Result<Rc<dyn AnyShard>, TableError>;
}

/// Where a shard is opened.
pub(crate) struct ShardArgs {
    pub(crate) partition: u32,
    /// The store's directory; `None` keeps the shard in memory.
    pub(crate) dir: Option<PathBuf>,
}

/// A table's shared description: its name, index among the app's tables, and configuration.
pub(crate) struct TableShared<K, V> {
    name: Arc<str>,
    changelog: Arc<str>,
    pub(crate) index: usize,
    config: Mutex<Config<V>>,
    _types: PhantomData<fn() -> K>,
}

use crate::util::lock;

/// A table (Faust's `app.Table`): a map from keys to values, sharded by partition and
/// replicated through the compacted changelog topic `{app}-{table}-changelog`.
///
/// Inside stream processing, operations go to the shard of the current event's partition (so
/// key the source topic by the table's key, as Faust requires); elsewhere name the partition
/// with [`Table::partition`]. Writes made while processing an event take effect when the
/// agent moves past the event, and are dropped if the agent fails on it (the event is
/// processed again). Reads see the event's own writes.
///
/// ```
/// use faust::{App, Settings};
///
/// let app = App::new(Settings::new("counts"));
/// let orders = app.topic::<String, u64>("orders");
/// let counts = app.table::<String, u64>("order-count").with_default(|| 0);
/// let table = counts.clone();
/// app.agent("count", &orders, move |mut stream| {
///     let counts = table.clone();
///     async move {
///         while let Some((account, _amount)) = stream.next_item().await {
///             if let Some(account) = account {
///                 counts.update(&account, |n| *n += 1)?;
///             }
///         }
///         Ok(())
///     }
/// });
/// let test = app.test_context()?;
/// test.put(&orders, Some(&"alice".to_string()), &5)?;
/// test.put(&orders, Some(&"alice".to_string()), &7)?;
/// test.stop()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Table<K, V> {
    pub(crate) shared: Arc<TableShared<K, V>>,
}

impl<K, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        Table { shared: self.shared.clone() }
    }
}

impl<K, V> std::fmt::Debug for Table<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("name", &self.shared.name).finish()
    }
}

impl<K, V> Table<K, V> {
    /// The table's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub(crate) fn codecs(&self) -> (Codec, Codec) {
        let config = lock(&self.shared.config);
        (config.key_codec.clone(), config.value_codec.clone())
    }

    /// The changelog topic: `{app}-{table}-changelog`.
    pub fn changelog_topic(&self) -> &str {
        &self.shared.changelog
    }
}

/// One partition of a table, named explicitly: see [`Table::partition`].
#[derive(Debug)]
pub struct TablePartition<'a, K, V> {
    table: &'a Table<K, V>,
    partition: u32,
}

/// Identifies the event whose writes are pending: the agent and the event's position.
#[derive(Debug, Clone, Eq)]
pub(crate) struct Token {
    pub(crate) agent: usize,
    pub(crate) topic: Arc<str>,
    pub(crate) partition: u32,
    pub(crate) offset: u64,
    pub(crate) timestamp: i64,
}

/// Whether `a` and `b` name the same topic: the same `Arc` nearly always (every record of a
/// partition shares its name), the same text otherwise.
#[inline]
fn same_topic(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

impl PartialEq for Token {
    fn eq(&self, other: &Token) -> bool {
        self.offset == other.offset
            && self.partition == other.partition
            && self.agent == other.agent
            && self.timestamp == other.timestamp
            && same_topic(&self.topic, &other.topic)
    }
}

impl Token {
    pub(crate) fn matches(&self, agent: usize, tp: &TopicPartition, offset: u64) -> bool {
        self.offset == offset
            && self.partition == tp.partition
            && self.agent == agent
            && same_topic(&self.topic, &tp.topic)
    }
}

impl<K, V> Table<K, V>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    pub(crate) fn new(name: &str, app_id: &str, index: usize, key_codec: Codec, value_codec: Codec) -> Self {
        Table {
            shared: Arc::new(TableShared {
                name: Arc::from(name),
                changelog: Arc::from(format!("{app_id}-{name}-changelog")),
                index,
                config: Mutex::new(Config {
                    default: None,
                    partitions: None,
                    partitions_like: None,
                    in_memory: false,
                    reset_bad_values: false,
                    key_codec,
                    value_codec,
                }),
                _types: PhantomData,
            }),
        }
    }

    /// The value a missing key takes in [`update`](Table::update) and
    /// [`get_or_default`](Table::get_or_default) (Faust's `default=`). Set before the
    /// worker starts.
    pub fn with_default(self, default: impl Fn() -> V + Send + Sync + 'static) -> Self {
        lock(&self.shared.config).default = Some(Arc::new(default));
        self
    }

    /// The number of partitions of the table's changelog (default: the app's
    /// `topic_partitions`); it must match the partitions of the topics that write it.
    pub fn with_partitions(self, partitions: u32) -> Self {
        lock(&self.shared.config).partitions = Some(partitions.max(1));
        self
    }

    /// Gives the changelog the partition count of `topic` when the worker creates it.
    pub(crate) fn with_partitions_like(self, topic: Arc<str>) -> Self {
        lock(&self.shared.config).partitions_like = Some(topic);
        self
    }

    /// Sets `key` to `value` in the current event's shard if `value` is past its latest
    /// value — counting the writes of every event not yet acked, in the order they were made,
    /// not only the current event's — and says whether it was.
    pub(crate) fn advance(&self, key: K, value: V) -> Result<bool, TableError>
    where
        V: PartialOrd,
    {
        self.with_shard(None, |s, token| {
            if s.latest(&key)?.is_some_and(|latest| value <= latest) {
                return Ok(false);
            }
            s.write(token, key, Some(value))?;
            Ok(true)
        })
    }

    /// Keeps the shards in memory only (Faust's `store="memory://"`): they are rebuilt from
    /// the changelog every time the worker starts.
    pub fn in_memory(self) -> Self {
        lock(&self.shared.config).in_memory = true;
        self
    }

    /// Codecs of the table's keys and values (default: the app's `key_serializer` and
    /// `value_serializer`), used in the store and the changelog.
    pub fn with_codecs(self, key: Codec, value: Codec) -> Self {
        {
            let mut config = lock(&self.shared.config);
            config.key_codec = key;
            config.value_codec = value;
        }
        self
    }

    /// A stored value that no longer decodes (the value type changed) is dropped, with a
    /// warning naming the table and key, and the key starts again from the default; the
    /// deletion goes to the changelog too. Without this, reading such a value is an error
    /// naming the table.
    pub fn reset_bad_values(self) -> Self {
        lock(&self.shared.config).reset_bad_values = true;
        self
    }

    /// The table's partition `partition`, for use outside stream processing (timers, tasks)
    /// on the core that holds it.
    pub fn partition(&self, partition: u32) -> TablePartition<'_, K, V> {
        TablePartition { table: self, partition }
    }

    /// Runs `f` on the shard of `partition` (or of the current event's), with the current
    /// event's token when there is one.
    fn with_shard<T>(
        &self,
        partition: Option<u32>,
        f: impl FnOnce(&Shard<K, V>, Option<Token>) -> Result<T, TableError>,
    ) -> Result<T, TableError> {
        let table = || self.shared.name.to_string();
        let core = crate::worker::CoreRuntime::current().ok_or_else(|| TableError::NotRunning { table: table() })?;
        let token = crate::runtime::context::current_token();
        let partition_given = partition;
        let partition = match (partition, &token) {
            (Some(p), _) => p,
            (None, Some(t)) => t.partition,
            (None, None) => return Err(TableError::OutsideStream { table: table() }),
        };
        if let (None, Some(t)) = (partition_given, &token) {
            self.check_copartitioned(&core, &t.topic)?;
        }
        let not_local = || TableError::NotLocal { table: table(), partition, core: core.index };
        let shard = core.shard(self.shared.index, partition).ok_or_else(not_local)?;
        let typed = shard.as_any().downcast_ref::<Shard<K, V>>().ok_or_else(not_local)?;
        // Writes of an event are pending until it is acked: the core applies them then.
        let registered = token.as_ref().map(|t| typed.has_pending(t)).unwrap_or(true);
        let result = f(typed, token.clone());
        if let Some(t) = token
            && !registered
            && typed.has_pending(&t)
        {
            core.register_pending(t, shard);
        }
        result
    }

    /// Checks that the table's changelog has as many partitions as `topic`, the topic of the
    /// current event (once per topic and core: later calls compare one pointer).
    fn check_copartitioned(&self, core: &crate::worker::CoreRuntime, topic: &Arc<str>) -> Result<(), TableError> {
        /// Tables whose last good topic is remembered (by index); others check every time.
        const REMEMBERED: usize = 16;
        thread_local! {
            /// Per table (by index), the topic last found co-partitioned with it on this core.
            /// The `Arc` is kept, so its address cannot be reused by another topic meanwhile.
            static CHECKED: RefCell<[Option<Arc<str>>; REMEMBERED]> = const { RefCell::new([const { None }; REMEMBERED]) };
        }
        let index = self.shared.index;
        let known =
            index < REMEMBERED && CHECKED.with(|c| c.borrow()[index].as_ref().is_some_and(|t| Arc::ptr_eq(t, topic)));
        if known {
            return Ok(());
        }
        let (Some(topic_partitions), Some(changelog_partitions)) =
            (core.partitions(topic), core.partitions(&self.shared.changelog))
        else {
            // A channel's events, or a topic the core does not know: nothing to compare.
            return Ok(());
        };
        if topic_partitions != changelog_partitions {
            return Err(TableError::PartitionsMismatch {
                table: self.shared.name.to_string(),
                changelog: self.shared.changelog.to_string(),
                changelog_partitions,
                topic: topic.to_string(),
                topic_partitions,
            });
        }
        if index < REMEMBERED {
            CHECKED.with(|c| c.borrow_mut()[index] = Some(topic.clone()));
        }
        Ok(())
    }

    /// The value of `key`, if any.
    pub fn get(&self, key: &K) -> Result<Option<V>, TableError> {
        self.with_shard(None, |s, t| s.get(t.as_ref(), key))
    }

    /// The value of `key`, or the table's default.
    pub fn get_or_default(&self, key: &K) -> Result<V, TableError> {
        self.with_shard(None, |s, t| s.get_or_default(t.as_ref(), key))
    }

    /// Sets `key` to `value`.
    pub fn insert(&self, key: K, value: V) -> Result<(), TableError> {
        self.with_shard(None, |s, t| s.write(t, key, Some(value)))
    }

    /// Changes the value of `key` in place (starting from the default when it has none) and
    /// returns the new value: `counts.update(&account, |n| *n += 1)`.
    pub fn update(&self, key: &K, f: impl FnOnce(&mut V)) -> Result<V, TableError> {
        self.with_shard(None, |s, t| s.update(t, key, f))
    }

    /// Removes `key`, returning its value.
    pub fn remove(&self, key: &K) -> Result<Option<V>, TableError> {
        self.with_shard(None, |s, t| {
            let old = s.get(t.as_ref(), key)?;
            s.write(t, key.clone(), None)?;
            Ok(old)
        })
    }

    /// Every key and value of the table's shards on the calling core, in no particular order
    /// (writes of the current event included).
    pub fn local_items(&self) -> Result<Vec<(K, V)>, TableError> {
        let core = crate::worker::CoreRuntime::current()
            .ok_or_else(|| TableError::NotRunning { table: self.shared.name.to_string() })?;
        let token = crate::runtime::context::current_token();
        let mut out = Vec::new();
        for shard in core.shards_of(self.shared.index) {
            if let Some(s) = shard.as_any().downcast_ref::<Shard<K, V>>() {
                s.items(token.as_ref(), &mut out)?;
            }
        }
        Ok(out)
    }

    /// The partitions of the table held by the calling core.
    pub fn local_partitions(&self) -> Vec<u32> {
        crate::worker::CoreRuntime::current()
            .map(|core| core.shards_of(self.shared.index).iter().map(|s| s.partition()).collect())
            .unwrap_or_default()
    }
}

impl<K, V> TablePartition<'_, K, V>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    /// The value of `key`, if any.
    pub fn get(&self, key: &K) -> Result<Option<V>, TableError> {
        self.table.with_shard(Some(self.partition), |s, t| s.get(t.as_ref(), key))
    }

    /// The value of `key`, or the table's default.
    pub fn get_or_default(&self, key: &K) -> Result<V, TableError> {
        self.table.with_shard(Some(self.partition), |s, t| s.get_or_default(t.as_ref(), key))
    }

    /// Sets `key` to `value`.
    pub fn insert(&self, key: K, value: V) -> Result<(), TableError> {
        self.table.with_shard(Some(self.partition), |s, t| s.write(t, key, Some(value)))
    }

    /// Changes the value of `key` in place and returns the new value.
    pub fn update(&self, key: &K, f: impl FnOnce(&mut V)) -> Result<V, TableError> {
        self.table.with_shard(Some(self.partition), |s, t| s.update(t, key, f))
    }

    /// Removes `key`, returning its value.
    pub fn remove(&self, key: &K) -> Result<Option<V>, TableError> {
        self.table.with_shard(Some(self.partition), |s, t| {
            let old = s.get(t.as_ref(), key)?;
            s.write(t, key.clone(), None)?;
            Ok(old)
        })
    }

    /// Every key and value of this partition.
    pub fn items(&self) -> Result<Vec<(K, V)>, TableError> {
        let mut out = Vec::new();
        self.table.with_shard(Some(self.partition), |s, t| s.items(t.as_ref(), &mut out))?;
        Ok(out)
    }
}

impl<K, V> TableMeta for TableShared<K, V>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn changelog(&self) -> &Arc<str> {
        &self.changelog
    }

    fn partitions(&self) -> Option<u32> {
        lock(&self.config).partitions
    }

    fn partitions_like(&self) -> Option<Arc<str>> {
        lock(&self.config).partitions_like.clone()
    }

    fn in_memory(&self) -> bool {
        lock(&self.config).in_memory
    }

    fn codecs(&self) -> (Codec, Codec) {
        let config = lock(&self.config);
        (config.key_codec.clone(), config.value_codec.clone())
    }

    fn open(&self, args: ShardArgs) -> Result<Rc<dyn AnyShard>, TableError> {
        let config = lock(&self.config).clone();
        let changelog = TopicPartition::new(self.changelog.clone(), args.partition);
        let store = match &args.dir {
            None => None,
            Some(dir) => Some(open_store(&self.name, args.partition, dir)?),
        };
        let checkpointed = store.as_ref().map(|s| decode_meta(&s.last_checkpoint().metadata)).unwrap_or_default();
        Ok(Rc::new(Shard::<K, V> {
            name: self.name.clone(),
            config,
            partition: args.partition,
            changelog,
            state: RefCell::new(State {
                cache: Map::default(),
                dirty: 0,
                pending: Vec::new(),
                applied: Vec::new(),
                store,
                stream_time: checkpointed.stream_time,
                key_scratch: Vec::new(),
            }),
            checkpointed_changelog: checkpointed.changelog,
            written_end: std::cell::Cell::new(None),
        }))
    }
}

/// Opens a shard's store; a store damaged before its checkpoint is moved aside (to
/// `{dir}.damaged`) and started empty, to be rebuilt from the changelog.
fn open_store(table: &str, partition: u32, dir: &std::path::Path) -> Result<Store, TableError> {
    // The changelog is the durable copy: the store never forces its writes to disk. After a
    // power loss it may open as damaged, and is rebuilt.
    let config = StoreConfig { sync: SyncPolicy::Never, ..StoreConfig::default() };
    let store_err = |source| TableError::Store { table: table.to_string(), partition, source };
    match Store::open(dir, config.clone()) {
        Ok(store) => Ok(store),
        Err(e @ (faust_storage::Error::Corruption { .. } | faust_storage::Error::Inconsistent { .. })) => {
            let aside = dir.with_extension("damaged");
            tracing::warn!(table, partition, error = %e, moved_to = %aside.display(),
                "the shard's store is damaged; rebuilding it from the changelog");
            let _ = std::fs::remove_dir_all(&aside);
            std::fs::rename(dir, &aside).map_err(|source| {
                store_err(faust_storage::Error::Io {
                    op: "move a damaged store aside",
                    path: dir.to_path_buf(),
                    source,
                })
            })?;
            Store::open(dir, config).map_err(store_err)
        }
        Err(e) => Err(store_err(e)),
    }
}

/// What a checkpoint records besides the store's own position.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct CheckpointMeta {
    /// The changelog offset the store's state corresponds to.
    changelog: u64,
    /// Source offsets committed with it: (topic, partition, offset).
    sources: Vec<(String, u32, u64)>,
    /// The highest event timestamp applied to the shard (ms).
    stream_time: i64,
}

fn decode_meta(bytes: &[u8]) -> CheckpointMeta {
    if bytes.is_empty() {
        return CheckpointMeta::default();
    }
    // The checkpoint file is checksummed, so this is a format this build does not know, not
    // damage: the store is then replayed from the changelog's start (puts of whole values,
    // so replaying what it holds already changes nothing).
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "a store's checkpoint metadata does not parse; replaying its changelog from the start");
        CheckpointMeta::default()
    })
}

/// A shard as the worker sees it, whatever its types.
pub(crate) trait AnyShard {
    fn as_any(&self) -> &dyn Any;
    fn name(&self) -> &str;
    /// The committed value of an encoded key, as JSON (`None`: absent), for the control
    /// socket's `table get`.
    fn lookup_json(&self, key: &[u8]) -> Result<Option<serde_json::Value>, TableError>;
    /// Every committed key and value, as JSON, for `table dump`.
    fn items_json(&self) -> Result<Vec<(serde_json::Value, serde_json::Value)>, TableError>;
    fn partition(&self) -> u32;
    fn changelog(&self) -> &TopicPartition;
    /// Applies the writes made while processing the event of `token` (it was acked).
    fn apply_pending(&self, token: &Token);
    /// Drops them (the agent failed on the event).
    fn discard_pending(&self, token: &Token);
    /// Whether writes of an event at or past the committable offset of its partition were
    /// applied since the last freeze (events acked out of order): such a state cannot be
    /// committed with those offsets.
    fn applied_beyond(&self, committable: &dyn Fn(&TopicPartition) -> Option<u64>) -> bool;
    fn is_dirty(&self) -> bool;
    /// Takes the dirty entries, to be written by the commit under way.
    fn freeze(&self) -> Box<dyn FrozenSet>;
    /// Gives back the entries of a commit that failed before they were all durable: they are
    /// dirty again (a key written since keeps its newer value), so the next commit writes
    /// them.
    fn restore(&self, frozen: Box<dyn FrozenSet>);
    /// The changelog end a commit wrote that is not committed yet (it failed after writing):
    /// the next commit commits it even if nothing else changed.
    fn written_end(&self) -> Option<u64>;
    fn set_written_end(&self, end: Option<u64>);
    fn write_store(&self, batch: &mut WriteBatch) -> Result<(), TableError>;
    /// Records that the state is the changelog's up to `changelog_offset`.
    fn checkpoint(&self, changelog_offset: u64, sources: Vec<(String, u32, u64)>) -> Result<(), TableError>;
    /// Drops clean cache entries past the cache's bound.
    fn evict(&self);
    /// The changelog offset the store opened at.
    fn checkpointed_changelog(&self) -> u64;
    /// Applies changelog records during recovery.
    fn replay(&self, records: &[Record], end: u64) -> Result<(), TableError>;
    /// The encoded current value of an encoded key (`None`: absent), for recovery.
    fn current_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, TableError>;
    /// Every key the shard holds, encoded (for rewriting a repaired changelog).
    fn keys_raw(&self) -> Result<Vec<bytes::Bytes>, TableError>;
    /// Forgets the state (recovery found the store ahead of the committed changelog).
    fn clear(&self) -> Result<(), TableError>;
}

/// The entries a commit took from a shard, encoded a chunk at a time.
pub(crate) trait FrozenSet: Any {
    /// For [`AnyShard::restore`], which knows the concrete type.
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
    /// Encodes up to `max` entries into `changelog` and `store`; returns how many were left.
    fn encode(
        &mut self,
        max: usize,
        changelog: &mut BatchBuilder,
        store: &mut WriteBatch,
        now_ms: i64,
    ) -> Result<usize, TableError>;
}

struct Cached<V> {
    value: Option<V>,
    dirty: bool,
}

struct State<K, V> {
    /// Recently used and dirty entries; a `None` value is a deletion. For an in-memory shard
    /// this is the whole state.
    cache: Map<K, Cached<V>>,
    /// Dirty entries in `cache`.
    dirty: usize,
    /// Writes of events not yet acked, in the order they were made.
    pending: Vec<(Token, K, Option<V>)>,
    /// Per source partition, the highest offset whose writes were applied since the freeze.
    applied: Vec<(TopicPartition, u64)>,
    store: Option<Store>,
    stream_time: i64,
    key_scratch: Vec<u8>,
}

pub(crate) struct Shard<K, V> {
    name: Arc<str>,
    config: Config<V>,
    partition: u32,
    changelog: TopicPartition,
    state: RefCell<State<K, V>>,
    checkpointed_changelog: u64,
    /// See [`AnyShard::written_end`].
    written_end: std::cell::Cell<Option<u64>>,
}

fn preview(bytes: &[u8]) -> String {
    crate::util::hex_preview(bytes, 16)
}

impl<K, V> Shard<K, V>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    fn codec_err(&self, what: impl Into<String>, source: CodecError) -> TableError {
        TableError::Codec { table: self.name.to_string(), partition: self.partition, what: what.into(), source }
    }

    /// A value that does not turn into JSON (for the control socket's listings).
    fn json_err(&self, what: &str, e: serde_json::Error) -> TableError {
        self.codec_err(what, CodecError::Encode { codec: "json".to_string(), message: e.to_string() })
    }

    fn store_err(&self, source: faust_storage::Error) -> TableError {
        TableError::Store { table: self.name.to_string(), partition: self.partition, source }
    }

    fn has_pending(&self, token: &Token) -> bool {
        self.state.borrow().pending.iter().any(|(t, _, _)| t == token)
    }

    fn get(&self, token: Option<&Token>, key: &K) -> Result<Option<V>, TableError> {
        let mut state = self.state.borrow_mut();
        if let Some(t) = token
            && let Some((_, _, v)) = state.pending.iter().rev().find(|(pt, k, _)| pt == t && k == key)
        {
            return Ok(v.clone());
        }
        self.read_committed(&mut state, key)
    }

    fn latest(&self, key: &K) -> Result<Option<V>, TableError> {
        let mut state = self.state.borrow_mut();
        if let Some((_, _, v)) = state.pending.iter().rev().find(|(_, k, _)| k == key) {
            return Ok(v.clone());
        }
        self.read_committed(&mut state, key)
    }

    /// The value without pending writes: from the cache, else the store.
    fn read_committed(&self, state: &mut State<K, V>, key: &K) -> Result<Option<V>, TableError> {
        if let Some(c) = state.cache.get(key) {
            return Ok(c.value.clone());
        }
        let State { store, key_scratch, cache, dirty, .. } = state;
        let Some(store) = store.as_ref() else { return Ok(None) };
        key_scratch.clear();
        self.config.key_codec.encode_owned(key, key_scratch).map_err(|e| self.codec_err("key", e))?;
        let Some(raw) = store.get_ref(key_scratch) else { return Ok(None) };
        match self.config.value_codec.decode::<V>(raw) {
            Ok(v) => {
                cache.insert(key.clone(), Cached { value: Some(v.clone()), dirty: false });
                Ok(Some(v))
            }
            Err(e) if self.config.reset_bad_values => {
                tracing::warn!(table = %self.name, partition = self.partition, key = %preview(key_scratch), error = %e,
                    "dropping a stored value that no longer decodes");
                // A deletion, so the store and the changelog drop it at the next commit.
                cache.insert(key.clone(), Cached { value: None, dirty: true });
                *dirty += 1;
                Ok(None)
            }
            Err(e) => Err(self.codec_err(format!("stored value (key {})", preview(key_scratch)), e)),
        }
    }

    fn default_value(&self) -> Result<V, TableError> {
        self.config.default.as_ref().map(|d| d()).ok_or_else(|| TableError::NoDefault { table: self.name.to_string() })
    }

    fn get_or_default(&self, token: Option<&Token>, key: &K) -> Result<V, TableError> {
        match self.get(token, key)? {
            Some(v) => Ok(v),
            None => self.default_value(),
        }
    }

    fn update(&self, token: Option<Token>, key: &K, f: impl FnOnce(&mut V)) -> Result<V, TableError> {
        // The common case: the event already wrote this key; change its pending value.
        if let Some(t) = &token {
            let mut state = self.state.borrow_mut();
            if let Some((_, _, Some(v))) = state.pending.iter_mut().rev().find(|(pt, k, _)| pt == t && k == key) {
                f(v);
                return Ok(v.clone());
            }
        }
        let mut value = self.get_or_default(token.as_ref(), key)?;
        f(&mut value);
        self.write(token, key.clone(), Some(value.clone()))?;
        Ok(value)
    }

    fn write(&self, token: Option<Token>, key: K, value: Option<V>) -> Result<(), TableError> {
        let mut state = self.state.borrow_mut();
        match token {
            Some(t) => state.pending.push((t, key, value)),
            None => Self::apply(&mut state, key, value),
        }
        Ok(())
    }

    fn apply(state: &mut State<K, V>, key: K, value: Option<V>) {
        match state.cache.get_mut(&key) {
            Some(c) => {
                if !c.dirty {
                    c.dirty = true;
                    state.dirty += 1;
                }
                c.value = value;
            }
            None => {
                state.cache.insert(key, Cached { value, dirty: true });
                state.dirty += 1;
            }
        }
    }

    fn items(&self, token: Option<&Token>, out: &mut Vec<(K, V)>) -> Result<(), TableError> {
        let state = self.state.borrow();
        let mut merged: Map<K, Option<V>> = Map::default();
        if let Some(store) = state.store.as_ref() {
            for (k, v) in store.iter() {
                let key = self.config.key_codec.decode_bytes::<K>(&k).map_err(|e| self.codec_err("stored key", e))?;
                match self.config.value_codec.decode_bytes::<V>(&v) {
                    Ok(v) => {
                        merged.insert(key, Some(v));
                    }
                    Err(_) if self.config.reset_bad_values => {}
                    Err(e) => return Err(self.codec_err(format!("stored value (key {})", preview(&k)), e)),
                }
            }
        }
        for (k, c) in &state.cache {
            merged.insert(k.clone(), c.value.clone());
        }
        if let Some(t) = token {
            for (pt, k, v) in &state.pending {
                if pt == t {
                    merged.insert(k.clone(), v.clone());
                }
            }
        }
        out.extend(merged.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        Ok(())
    }
}

impl<K, V> AnyShard for Shard<K, V>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn lookup_json(&self, key: &[u8]) -> Result<Option<serde_json::Value>, TableError> {
        let key: K = self.config.key_codec.decode(key).map_err(|e| self.codec_err("key", e))?;
        match self.get(None, &key)? {
            Some(v) => Ok(Some(serde_json::to_value(&v).map_err(|e| self.json_err("value", e))?)),
            None => Ok(None),
        }
    }

    fn items_json(&self) -> Result<Vec<(serde_json::Value, serde_json::Value)>, TableError> {
        let mut items = Vec::new();
        self.items(None, &mut items)?;
        items
            .into_iter()
            .map(|(k, v)| {
                let key = serde_json::to_value(&k).map_err(|e| self.json_err("key", e))?;
                Ok((key, serde_json::to_value(&v).map_err(|e| self.json_err("value", e))?))
            })
            .collect()
    }

    fn partition(&self) -> u32 {
        self.partition
    }

    fn changelog(&self) -> &TopicPartition {
        &self.changelog
    }

    fn apply_pending(&self, token: &Token) {
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        if state.pending.is_empty() {
            return;
        }
        // Taken out (for `apply` to borrow the state) and put back with its capacity, so
        // that the writes of the next event do not allocate it again.
        let mut pending = std::mem::take(&mut state.pending);
        let before = pending.len();
        if pending.iter().all(|(t, _, _)| t == token) {
            for (_, k, v) in pending.drain(..) {
                Self::apply(state, k, v);
            }
        } else {
            for (_, k, v) in pending.extract_if(.., |(t, _, _)| t == token) {
                Self::apply(state, k, v);
            }
        }
        let applied = before - pending.len();
        state.pending = pending;
        if applied == 0 {
            return;
        }
        state.stream_time = state.stream_time.max(token.timestamp);
        match state
            .applied
            .iter_mut()
            .find(|(tp, _)| tp.partition == token.partition && same_topic(&tp.topic, &token.topic))
        {
            Some((_, o)) => *o = (*o).max(token.offset),
            None => state.applied.push((TopicPartition::new(token.topic.clone(), token.partition), token.offset)),
        }
    }

    fn discard_pending(&self, token: &Token) {
        self.state.borrow_mut().pending.retain(|(t, _, _)| t != token);
    }

    fn applied_beyond(&self, committable: &dyn Fn(&TopicPartition) -> Option<u64>) -> bool {
        self.state.borrow().applied.iter().any(|(tp, o)| committable(tp).is_some_and(|c| *o >= c))
    }

    fn is_dirty(&self) -> bool {
        self.state.borrow().dirty > 0
    }

    fn freeze(&self) -> Box<dyn FrozenSet> {
        let mut state = self.state.borrow_mut();
        let mut entries = Vec::with_capacity(state.dirty);
        let in_memory = state.store.is_none();
        for (k, c) in state.cache.iter_mut().filter(|(_, c)| c.dirty) {
            c.dirty = false;
            entries.push((k.clone(), c.value.clone()));
        }
        if in_memory {
            // The cache is the state: a deletion needs no entry once it is frozen.
            state.cache.retain(|_, c| c.value.is_some() || c.dirty);
        }
        state.dirty = 0;
        state.applied.clear();
        Box::new(Frozen {
            entries,
            next: 0,
            key_codec: self.config.key_codec.clone(),
            value_codec: self.config.value_codec.clone(),
            name: self.name.clone(),
            partition: self.partition,
            scratch: (Vec::new(), Vec::new()),
        })
    }

    fn restore(&self, frozen: Box<dyn FrozenSet>) {
        let Ok(frozen) = frozen.into_any().downcast::<Frozen<K, V>>() else { return };
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        for (key, value) in frozen.entries {
            match state.cache.get_mut(&key) {
                // Written again since the freeze: already dirty, with the newer value.
                Some(c) if c.dirty => {}
                Some(c) => {
                    c.dirty = true;
                    state.dirty += 1;
                }
                // A deletion an in-memory shard forgot at the freeze.
                None => {
                    state.cache.insert(key, Cached { value, dirty: true });
                    state.dirty += 1;
                }
            }
        }
    }

    fn written_end(&self) -> Option<u64> {
        self.written_end.get()
    }

    fn set_written_end(&self, end: Option<u64>) {
        self.written_end.set(end);
    }

    fn write_store(&self, batch: &mut WriteBatch) -> Result<(), TableError> {
        let mut state = self.state.borrow_mut();
        match state.store.as_mut() {
            Some(store) => store.write(batch).map_err(|e| self.store_err(e)),
            None => {
                batch.clear();
                Ok(())
            }
        }
    }

    fn checkpoint(&self, changelog_offset: u64, sources: Vec<(String, u32, u64)>) -> Result<(), TableError> {
        let mut state = self.state.borrow_mut();
        let stream_time = state.stream_time;
        let Some(store) = state.store.as_mut() else { return Ok(()) };
        let meta = CheckpointMeta { changelog: changelog_offset, sources, stream_time };
        let bytes = serde_json::to_vec(&meta).unwrap_or_default();
        store.checkpoint(&bytes).map_err(|e| self.store_err(e))
    }

    fn evict(&self) {
        let mut state = self.state.borrow_mut();
        if state.store.is_some() && state.cache.len() > CACHE_MAX_KEYS {
            state.cache.retain(|_, c| c.dirty);
        }
    }

    fn checkpointed_changelog(&self) -> u64 {
        self.checkpointed_changelog
    }

    fn replay(&self, records: &[Record], end: u64) -> Result<(), TableError> {
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        match state.store.as_mut() {
            Some(store) => {
                let mut batch = WriteBatch::new();
                for r in records.iter().filter(|r| r.offset < end) {
                    let Some(key) = r.key.as_deref() else { continue };
                    match r.value.as_deref() {
                        Some(v) => batch.put(key, v),
                        None => batch.delete(key),
                    }
                }
                store.write(&mut batch).map_err(|e| self.store_err(e))
            }
            None => {
                for r in records.iter().filter(|r| r.offset < end) {
                    let Some(raw_key) = &r.key else { continue };
                    let key: K =
                        self.config.key_codec.decode_bytes(raw_key).map_err(|e| self.codec_err("changelog key", e))?;
                    let value = match &r.value {
                        None => None,
                        Some(v) => match self.config.value_codec.decode_bytes::<V>(v) {
                            Ok(v) => Some(v),
                            Err(_) if self.config.reset_bad_values => None,
                            Err(e) => {
                                return Err(self.codec_err(format!("changelog value at offset {}", r.offset), e));
                            }
                        },
                    };
                    match value {
                        Some(v) => {
                            state.cache.insert(key, Cached { value: Some(v), dirty: false });
                        }
                        None => {
                            state.cache.remove(&key);
                        }
                    }
                }
                Ok(())
            }
        }
    }

    fn current_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, TableError> {
        let state = self.state.borrow();
        match state.store.as_ref() {
            Some(store) => Ok(store.get_ref(key).map(<[u8]>::to_vec)),
            None => {
                let key: K = self.config.key_codec.decode(key).map_err(|e| self.codec_err("changelog key", e))?;
                match state.cache.get(&key).and_then(|c| c.value.as_ref()) {
                    None => Ok(None),
                    Some(v) => {
                        let mut out = Vec::new();
                        self.config.value_codec.encode(v, &mut out).map_err(|e| self.codec_err("value", e))?;
                        Ok(Some(out))
                    }
                }
            }
        }
    }

    fn keys_raw(&self) -> Result<Vec<bytes::Bytes>, TableError> {
        let state = self.state.borrow();
        let mut keys: Vec<bytes::Bytes> = match state.store.as_ref() {
            Some(store) => store.iter().map(|(k, _)| k).collect(),
            None => Vec::new(),
        };
        for (k, c) in &state.cache {
            if c.value.is_some() {
                let mut out = Vec::new();
                self.config.key_codec.encode_owned(k, &mut out).map_err(|e| self.codec_err("key", e))?;
                keys.push(bytes::Bytes::from(out));
            }
        }
        Ok(keys)
    }

    fn clear(&self) -> Result<(), TableError> {
        let mut state = self.state.borrow_mut();
        state.cache.clear();
        state.dirty = 0;
        if let Some(store) = state.store.as_mut() {
            let keys: Vec<bytes::Bytes> = store.iter().map(|(k, _)| k).collect();
            let mut batch = WriteBatch::new();
            for k in &keys {
                batch.delete(k);
            }
            store.write(&mut batch).map_err(|e| self.store_err(e))?;
        }
        Ok(())
    }
}

struct Frozen<K, V> {
    entries: Vec<(K, Option<V>)>,
    next: usize,
    key_codec: Codec,
    value_codec: Codec,
    name: Arc<str>,
    partition: u32,
    scratch: (Vec<u8>, Vec<u8>),
}

impl<K: Serialize + 'static, V: Serialize + 'static> FrozenSet for Frozen<K, V> {
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }

    fn encode(
        &mut self,
        max: usize,
        changelog: &mut BatchBuilder,
        store: &mut WriteBatch,
        now_ms: i64,
    ) -> Result<usize, TableError> {
        let end = (self.next + max).min(self.entries.len());
        let (k_buf, v_buf) = &mut self.scratch;
        for (k, v) in &self.entries[self.next..end] {
            let err = |what: &str, source| TableError::Codec {
                table: self.name.to_string(),
                partition: self.partition,
                what: what.to_string(),
                source,
            };
            k_buf.clear();
            self.key_codec.encode_owned(k, k_buf).map_err(|e| err("key", e))?;
            match v {
                Some(v) => {
                    v_buf.clear();
                    self.value_codec.encode_owned(v, v_buf).map_err(|e| err("value", e))?;
                    changelog.push(now_ms, Some(k_buf), Some(v_buf), &[]);
                    store.put(k_buf, v_buf);
                }
                None => {
                    changelog.push(now_ms, Some(k_buf), None, &[]);
                    store.delete(k_buf);
                }
            }
        }
        self.next = end;
        Ok(self.entries.len() - end)
    }
}

/// Writes the frozen entries of `shard` to its store and produces them to its changelog;
/// returns the changelog's new end offset (or `None` when nothing was frozen). Every batch
/// that reaches the changelog moves the shard's [`written_end`](AnyShard::written_end), so a
/// commit that fails later (even in the middle of these batches) still has its records
/// committed by the next one. On failure the caller gives the frozen entries back
/// ([`AnyShard::restore`]).
pub(crate) async fn write_frozen(
    core: &AnyCore,
    shard: &Rc<dyn AnyShard>,
    frozen: &mut dyn FrozenSet,
) -> Result<Option<u64>, CommitFailure> {
    let mut end = None;
    let mut batch = BatchBuilder::with_capacity(64 * 1024);
    let mut store_batch = WriteBatch::new();
    loop {
        let left = frozen
            .encode(FREEZE_CHUNK, &mut batch, &mut store_batch, crate::util::now_ms())
            .map_err(CommitFailure::Table)?;
        crate::runtime::fault_point("commit:store")
            .map_err(|source| TableError::Store {
                table: shard.name().to_string(),
                partition: shard.partition(),
                source: faust_storage::Error::Io { op: "append to", path: "the shard's store".into(), source },
            })
            .and_then(|()| shard.write_store(&mut store_batch))
            .map_err(CommitFailure::Table)?;
        if (batch.encoded_len() >= CHANGELOG_BATCH_BYTES || left == 0) && !batch.is_empty() {
            let full = std::mem::replace(&mut batch, BatchBuilder::with_capacity(64 * 1024));
            let produced = match crate::runtime::fault_point("commit:changelog-write") {
                Ok(()) => core.produce(shard.changelog(), full).await,
                Err(e) => Err(crate::runtime::injected_produce_failure(shard.changelog(), full, e)),
            }
            .map_err(|source| CommitFailure::Changelog { tp: shard.changelog().clone(), source })?;
            end = Some(produced.last_offset + 1);
            shard.set_written_end(end);
            crate::runtime::crash_point("commit:changelog-batch");
        }
        if left == 0 {
            return Ok(end);
        }
        glommio::yield_if_needed().await;
    }
}

/// Why a commit could not write a table's state.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitFailure {
    #[error(transparent)]
    Table(TableError),
    #[error("writing changelog {tp}: {source}")]
    Changelog { tp: TopicPartition, source: faust_transport::Error },
}

impl CommitFailure {
    /// Whether trying again later can succeed (a full disk, a broker away), as opposed to a
    /// value that does not encode, which no retry mends.
    pub(crate) fn is_retriable(&self) -> bool {
        !matches!(self, CommitFailure::Table(TableError::Codec { .. }))
    }
}

/// Recovers `shard` before the core processes its partition: replays the changelog from the
/// store's checkpoint to the committed changelog offset, neutralizes records past it, and
/// checkpoints. Returns the committed changelog offset the shard now stands at and how many
/// records were replayed. `fence` is the worker's, for the commit of a neutralization.
///
/// A changelog found damaged (embedded log) is repaired on the spot. When every record it
/// lost lies below the store's checkpoint, the store holds their effects and the table is
/// exact: the changelog is then written whole again from the shard's state (every key's
/// value, and a tombstone for every key it no longer holds), so that a later rebuild from it
/// is exact too. When the replay itself would need a lost record, the state cannot be
/// rebuilt and recovery fails with [`TableError::ChangelogDamaged`].
pub(crate) async fn recover(
    core: &AnyCore,
    group: &str,
    fence: Option<&Fence>,
    shard: &Rc<dyn AnyShard>,
) -> Result<Recovered, TableError> {
    let tp = shard.changelog().clone();
    let (table, partition) = (shard.name().to_string(), shard.partition());
    let transport_err = |source| TableError::Transport { table: table.clone(), partition, source };
    let mut repair = Repair::default();
    let committed = core.committed(group, std::slice::from_ref(&tp)).await.map_err(transport_err)?;
    let committed = committed.first().copied().flatten().unwrap_or(0);
    // Snapshotted once: records appended later cannot make recovery chase a moving end. A
    // broker may answer an end short of what it acknowledged for a moment (tansu, just after
    // the previous worker's last commit): asked again a few times before it counts as short.
    let latest = || core.list_offset(&tp, OffsetSpec::Latest);
    let mut high_watermark = repair.retry(core, shard, latest).await?;
    for _ in 0..SHORT_CHANGELOG_RETRIES {
        if high_watermark >= committed {
            break;
        }
        glommio::timer::sleep(SHORT_CHANGELOG_WAIT).await;
        high_watermark = repair.retry(core, shard, latest).await?;
    }
    let earliest = repair.retry(core, shard, || core.list_offset(&tp, OffsetSpec::Earliest)).await?;
    let mut from = shard.checkpointed_changelog();
    if from > committed {
        // The store claims more than was committed (offsets reset by hand?): start over.
        tracing::warn!(
            table,
            partition,
            checkpoint = from,
            committed,
            "the store is ahead of the committed changelog offset; rebuilding it from the changelog"
        );
        shard.clear()?;
        from = 0;
    }
    if high_watermark < committed {
        return Err(TableError::ChangelogShort {
            table,
            partition,
            changelog: tp.topic.to_string(),
            end: high_watermark,
            committed,
        });
    }
    if from < committed && from < earliest {
        return Err(TableError::ChangelogTruncated {
            table,
            partition,
            changelog: tp.topic.to_string(),
            needed: from,
            earliest,
        });
    }
    repair.check(shard, from, committed)?;
    let started = Instant::now();
    let total = committed - from;
    let mut progress = Progress::new(&table, partition, total);
    let mut next = from;
    let mut empty_fetches = 0;
    while next < committed {
        // Below the end the records are there: no wait, unless a fetch came back empty.
        let wait = if empty_fetches == 0 { Duration::ZERO } else { SHORT_CHANGELOG_WAIT };
        let fetched = repair.retry(core, shard, || core.fetch(&tp, next, REPLAY_FETCH_BYTES, wait)).await?;
        repair.check(shard, from, committed)?;
        if fetched.next_offset <= next {
            // Nothing more below the committed offset although the log claims to hold it: a
            // broker may answer a fetch empty now and then; asked again a few times.
            empty_fetches += 1;
            if empty_fetches <= SHORT_CHANGELOG_RETRIES {
                continue;
            }
            return Err(TableError::ChangelogShort {
                table,
                partition,
                changelog: tp.topic.to_string(),
                end: next,
                committed,
            });
        }
        empty_fetches = 0;
        shard.replay(&fetched.records, committed)?;
        next = fetched.next_offset;
        progress.update(next.min(committed) - from);
        glommio::yield_if_needed().await;
    }
    progress.finish();
    crate::runtime::crash_point("recover:replayed");
    let mut end = committed;
    if high_watermark > committed {
        end = neutralize(core, group, fence, shard, committed, high_watermark).await?;
    }
    if repair.report.as_ref().is_some_and(|r| !r.is_clean()) {
        end = rewrite_changelog(core, group, fence, shard, end).await?;
    }
    // The state now is the changelog's up to `end`: checkpoint it so the next start skips it.
    shard.checkpoint(end, Vec::new())?;
    if total > 0 || end > committed {
        tracing::info!(table = %shard.name(), partition, replayed = total, orphans = high_watermark - committed,
            elapsed_ms = started.elapsed().as_millis() as u64, "recovered table partition");
    }
    Ok(Recovered { end, replayed: total, repaired: repair.report })
}

/// A recovery's repair of its changelog, at most one.
#[derive(Default)]
struct Repair {
    report: Option<faust_storage::RepairReport>,
}

impl Repair {
    /// Runs `call`; when it finds the changelog damaged (and it was not repaired yet), repairs
    /// the changelog and runs `call` again.
    async fn retry<T, F, Fut>(&mut self, core: &AnyCore, shard: &Rc<dyn AnyShard>, call: F) -> Result<T, TableError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, faust_transport::Error>>,
    {
        let transport_err = |source| transport_error(shard, source);
        match call().await {
            Err(e) if e.damaged_log().is_some() && self.report.is_none() => {
                let Some(repaired) = core.repair(shard.changelog()) else { return Err(transport_err(e)) };
                let report = repaired.map_err(transport_err)?;
                tracing::error!(table = shard.name(), partition = shard.partition(), error = %e,
                    lost = %report.lost_ranges(), lost_offsets = report.lost_offsets(), quarantined = ?report.quarantined,
                    "the table's changelog was damaged and is repaired");
                self.report = Some(report);
                call().await.map_err(transport_err)
            }
            other => other.map_err(transport_err),
        }
    }

    /// Fails when the repair lost records the replay from `from` to `committed` needs: the
    /// state cannot be rebuilt then. Records lost below `from` are in the store already.
    fn check(&self, shard: &Rc<dyn AnyShard>, from: u64, committed: u64) -> Result<(), TableError> {
        let Some(report) = &self.report else { return Ok(()) };
        let needed: Vec<String> = report
            .lost
            .iter()
            .filter(|r| r.start < committed && r.end > from)
            .map(|r| format!("{}..{}", r.start, r.end))
            .collect();
        if needed.is_empty() {
            return Ok(());
        }
        Err(TableError::ChangelogDamaged {
            table: shard.name().to_string(),
            partition: shard.partition(),
            changelog: shard.changelog().topic.to_string(),
            lost: needed.join(", "),
            from,
            committed,
        })
    }
}

/// A transport error met while recovering or rewriting `shard`'s changelog.
fn transport_error(shard: &Rc<dyn AnyShard>, source: faust_transport::Error) -> TableError {
    TableError::Transport { table: shard.name().to_string(), partition: shard.partition(), source }
}

/// Where a recovered shard stands.
#[derive(Debug, Clone)]
pub(crate) struct Recovered {
    /// The committed changelog offset.
    pub(crate) end: u64,
    /// Changelog records replayed to get there.
    pub(crate) replayed: u64,
    /// The repair of a damaged changelog, if one was needed.
    pub(crate) repaired: Option<faust_storage::RepairReport>,
}

/// Appends, for every key written past the committed changelog offset, its committed value
/// (or a tombstone), and commits the new end: replaying through the uncommitted records then
/// ends at the committed state. Returns the new committed changelog offset.
async fn neutralize(
    core: &AnyCore,
    group: &str,
    fence: Option<&Fence>,
    shard: &Rc<dyn AnyShard>,
    committed: u64,
    high_watermark: u64,
) -> Result<u64, TableError> {
    let mut keys = KeySet::default();
    keys.add_from_changelog(core, shard, committed, high_watermark).await?;
    let end = write_current_values(core, group, fence, shard, &keys.keys, high_watermark).await?;
    tracing::warn!(
        table = shard.name(),
        partition = shard.partition(),
        uncommitted = high_watermark - committed,
        keys = keys.keys.len(),
        "the changelog held records of a commit that did not finish; restored their keys' committed values"
    );
    Ok(end)
}

/// After a repair dropped records of the changelog: appends the shard's whole state to it —
/// every key's value, and a tombstone for every key the changelog mentions that the shard no
/// longer holds (its deletion may have been among the lost records) — and commits the new
/// end. Replaying the changelog from its start then ends at exactly the shard's state.
async fn rewrite_changelog(
    core: &AnyCore,
    group: &str,
    fence: Option<&Fence>,
    shard: &Rc<dyn AnyShard>,
    end: u64,
) -> Result<u64, TableError> {
    let tp = shard.changelog().clone();
    let transport_err = |source| transport_error(shard, source);
    let earliest = core.list_offset(&tp, OffsetSpec::Earliest).await.map_err(transport_err)?;
    let mut keys = KeySet::default();
    keys.add_from_changelog(core, shard, earliest, end).await?;
    for key in shard.keys_raw()? {
        keys.add(key);
    }
    let new_end = write_current_values(core, group, fence, shard, &keys.keys, end).await?;
    tracing::warn!(
        table = shard.name(),
        partition = shard.partition(),
        keys = keys.keys.len(),
        "wrote the table's state to its repaired changelog again: it is whole"
    );
    Ok(new_end)
}

/// Encoded keys, each once, in the order first seen.
#[derive(Default)]
struct KeySet {
    keys: Vec<bytes::Bytes>,
    seen: hashbrown::HashSet<bytes::Bytes, foldhash::fast::RandomState>,
}

impl KeySet {
    fn add(&mut self, key: bytes::Bytes) {
        if self.seen.insert(key.clone()) {
            self.keys.push(key);
        }
    }

    /// Adds the keys of the changelog's records in `[from, to)`.
    async fn add_from_changelog(
        &mut self,
        core: &AnyCore,
        shard: &Rc<dyn AnyShard>,
        from: u64,
        to: u64,
    ) -> Result<(), TableError> {
        let tp = shard.changelog();
        let transport_err = |source| transport_error(shard, source);
        let mut next = from;
        while next < to {
            let fetched = core.fetch(tp, next, REPLAY_FETCH_BYTES, Duration::ZERO).await.map_err(transport_err)?;
            if fetched.next_offset <= next {
                break;
            }
            for r in fetched.records.iter().filter(|r| r.offset < to) {
                if let Some(k) = &r.key {
                    self.add(k.clone());
                }
            }
            next = fetched.next_offset;
            glommio::yield_if_needed().await;
        }
        Ok(())
    }
}

/// Appends each key's current value in the shard (a tombstone where it has none) to the
/// changelog, and commits the new end (`end` when there are no keys). Returns the new end.
async fn write_current_values(
    core: &AnyCore,
    group: &str,
    fence: Option<&Fence>,
    shard: &Rc<dyn AnyShard>,
    keys: &[bytes::Bytes],
    mut end: u64,
) -> Result<u64, TableError> {
    let tp = shard.changelog().clone();
    let transport_err = |source| transport_error(shard, source);
    for chunk in keys.chunks(FREEZE_CHUNK) {
        let mut batch = BatchBuilder::with_capacity(64 * 1024);
        for k in chunk {
            let value = shard.current_raw(k)?;
            batch.push(crate::util::now_ms(), Some(k), value.as_deref(), &[]);
        }
        let produced = match crate::runtime::fault_point("recover:neutralize") {
            Ok(()) => core.produce(&tp, batch).await,
            Err(e) => Err(crate::runtime::injected_produce_failure(&tp, batch, e)),
        }
        .map_err(transport_err)?;
        end = produced.last_offset + 1;
        crate::runtime::crash_point("recover:neutralizing");
    }
    core.commit(group, fence, &[(tp, end)]).await.map_err(transport_err)?;
    Ok(end)
}

/// Recovery progress: a bar on a terminal, a log line every few seconds otherwise.
struct Progress {
    label: String,
    total: u64,
    started: Instant,
    last: Instant,
    tty: bool,
}

impl Progress {
    fn new(table: &str, partition: u32, total: u64) -> Self {
        let now = Instant::now();
        Progress {
            label: format!("recovering {table}[{partition}]"),
            total,
            started: now,
            last: now,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn update(&mut self, done: u64) {
        let now = Instant::now();
        if self.tty {
            if now.duration_since(self.last) >= Duration::from_millis(100) {
                self.last = now;
                let width = 30usize;
                let filled = (done as f64 / self.total.max(1) as f64 * width as f64) as usize;
                eprint!(
                    "\r{} [{}{}] {done}/{} records",
                    self.label,
                    "#".repeat(filled.min(width)),
                    " ".repeat(width - filled.min(width)),
                    self.total
                );
            }
        } else if now.duration_since(self.last) >= PROGRESS_LOG_EVERY {
            self.last = now;
            let rate = done as f64 / now.duration_since(self.started).as_secs_f64().max(1e-9);
            tracing::info!("{}: {done}/{} changelog records ({rate:.0}/s)", self.label, self.total);
        }
    }

    fn finish(&mut self) {
        if self.tty && self.started.elapsed() >= Duration::from_millis(100) {
            eprintln!("\r{}: {} records in {:.1} s", self.label, self.total, self.started.elapsed().as_secs_f64());
        }
    }
}
