//! Tables: keyed state, sharded by partition, replicated through a changelog topic.
//!
//! A table has one shard per partition, on the core that owns that partition of the source
//! topics (tables are co-partitioned with their sources, as in Faust and Kafka Streams). A
//! shard is a typed write-back cache over a log-structured store (or, for `memory://`
//! tables, the cache alone):
//!
//! - **A write is applied in place, and owned by the shard's undo log until its event is
//!   acked.** The first time an event writes a key, the key's previous value goes to the undo
//!   log, tagged with the event; reads see the value in place. When the agent moves past the
//!   event (or acks it) the core drops its undo entries; when the agent fails on it, or the
//!   event is abandoned at a revocation, the core undoes them, and every key it wrote gets
//!   back exactly its previous value (the event is processed again, so its writes must not
//!   count twice). A commit freezes, for a key an event in flight wrote, the value under its
//!   oldest undo entry: so what a commit writes only ever holds effects of finished events.
//! - **A commit** (`runtime/commit.rs`) freezes the dirty entries with the committable
//!   offsets, writes them to the store and the changelog, and commits the changelog's end with
//!   the source offsets in one transport commit; **recovery** (`runtime/recovery.rs`) replays
//!   the changelog to the committed offset.
//!
//! Together these give exact state under at-least-once input: after a crash at any point, a
//! shard holds exactly the effects of the events below its partition's committed offset.
//!
//! **Why a changelog topic on `local://` too**, rather than using the store's own log as the
//! changelog: the changelog is the copy that survives the loss of the store (a damaged shard
//! is rebuilt from it), it is what another worker recovers from when a partition moves (the
//! multi-worker transports), and it lets the store skip `fsync` entirely. The write-back cache
//! keeps the cost small: a commit writes each dirty key once, however often it changed.

mod shard;

use std::cell::RefCell;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::Codec;
pub(crate) use crate::error::TableError;
use crate::runtime::state::{AnyShard, TableMeta, Token, same_topic};
use crate::util::lock;

/// What a table operation does, for the sensors ([`Sensor`](crate::Sensor)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// An agent reads a key.
    Read,
    /// An agent writes a key.
    Write,
    /// The engine's own bookkeeping (positions, windows): not reported.
    Internal,
}
pub(crate) use shard::Shard;

/// How a table is configured; read when the worker starts.
struct Config<V> {
    default: Option<Arc<dyn Fn() -> V + Send + Sync>>,
    partitions: Option<u32>,
    /// Take the partition count of this topic (a repartition topic's positions table).
    partitions_like: Option<Arc<str>>,
    in_memory: bool,
    reset_bad_values: bool,
    /// The windows of a windowed table.
    windowed: bool,
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
            windowed: self.windowed,
            key_codec: self.key_codec.clone(),
            value_codec: self.value_codec.clone(),
        }
    }
}

/// A table's callbacks ([`Table::on_recover`], [`Table::on_changelog_event`]).
pub(crate) struct Hooks<K, V> {
    pub(crate) on_recover: Option<Arc<dyn Fn(u32) + Send + Sync>>,
    pub(crate) on_changelog_event: Option<ChangelogHook<K, V>>,
}

/// Told of each changelog record a shard applies while recovering or following as a standby.
pub(crate) type ChangelogHook<K, V> = Arc<dyn Fn(u32, &K, Option<&V>) + Send + Sync>;

impl<K, V> Default for Hooks<K, V> {
    fn default() -> Self {
        Hooks { on_recover: None, on_changelog_event: None }
    }
}

impl<K, V> Clone for Hooks<K, V> {
    fn clone(&self) -> Self {
        Hooks { on_recover: self.on_recover.clone(), on_changelog_event: self.on_changelog_event.clone() }
    }
}

/// The app's tables, by index.
pub(crate) type TableList = Arc<Mutex<Vec<Arc<dyn TableMeta>>>>;

/// A table's shared description: its name, index among the app's tables, and configuration.
pub(crate) struct TableShared<K, V> {
    name: Arc<str>,
    changelog: Arc<str>,
    app_id: Arc<str>,
    /// The app's list the table is declared in (`None` for a table of a unit test).
    list: Option<TableList>,
    pub(crate) index: usize,
    config: Mutex<Config<V>>,
    hooks: Mutex<Hooks<K, V>>,
    /// Keys go to the partition the producer's partitioner gives them, not the current
    /// event's ([`Table::use_partitioner`]); read on every operation, so not under the lock.
    use_partitioner: std::sync::atomic::AtomicBool,
    _types: PhantomData<fn() -> K>,
}

/// A table (Faust's `app.Table`): a map from keys to values, sharded by partition and
/// replicated through the compacted changelog topic `{app}-{table}-changelog`.
///
/// Inside stream processing, operations go to the shard of the current event's partition (so
/// key the source topic by the table's key, as Faust requires); elsewhere name the partition
/// with [`Table::partition`]. Writes made while processing an event apply at once and stand
/// when the agent moves past the event; if the agent fails on it they are undone, every key
/// getting back its previous value (the event is processed again). Reads see them.
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

impl<K, V> Table<K, V>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    /// Declares the table `name` in the app's list `list` (at its end).
    pub(crate) fn declare(list: &TableList, name: &str, app_id: &str, key_codec: Codec, value_codec: Codec) -> Self {
        let mut tables = lock(list);
        let mut table = Table::new(name, app_id, tables.len(), key_codec, value_codec);
        if let Some(shared) = Arc::get_mut(&mut table.shared) {
            shared.list = Some(list.clone());
        }
        tables.push(table.shared.clone());
        table
    }

    /// Declares this table again as the windows of a windowed table, keyed by `K2` (the key
    /// and the window), in its place in the app's list: the same name, changelog, index and
    /// configuration.
    pub(crate) fn redeclare_windowed<K2>(&self) -> Table<K2, V>
    where
        K2: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    {
        let mut config = lock(&self.shared.config).clone();
        config.windowed = true;
        let shared = TableShared {
            name: self.shared.name.clone(),
            changelog: self.shared.changelog.clone(),
            app_id: self.shared.app_id.clone(),
            list: self.shared.list.clone(),
            index: self.shared.index,
            config: Mutex::new(config),
            hooks: Mutex::default(),
            use_partitioner: std::sync::atomic::AtomicBool::new(false),
            _types: PhantomData,
        };
        let table = Table { shared: Arc::new(shared) };
        if let Some(list) = &self.shared.list
            && let Some(slot) = lock(list).get_mut(self.shared.index)
        {
            *slot = table.shared.clone();
        }
        table
    }

    /// Declares a table of the same app (its name, types and codecs given).
    pub(crate) fn declare_sibling<K2, V2>(&self, name: &str, key_codec: Codec, value_codec: Codec) -> Table<K2, V2>
    where
        K2: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
        V2: Serialize + DeserializeOwned + Clone + 'static,
    {
        match &self.shared.list {
            Some(list) => Table::declare(list, name, &self.shared.app_id, key_codec, value_codec),
            None => Table::new(name, &self.shared.app_id, usize::MAX, key_codec, value_codec),
        }
    }

    pub(crate) fn new(name: &str, app_id: &str, index: usize, key_codec: Codec, value_codec: Codec) -> Self {
        Table {
            shared: Arc::new(TableShared {
                name: Arc::from(name),
                changelog: Arc::from(format!("{app_id}-{name}-changelog")),
                app_id: Arc::from(app_id),
                list: None,
                index,
                config: Mutex::new(Config {
                    default: None,
                    partitions: None,
                    partitions_like: None,
                    in_memory: false,
                    reset_bad_values: false,
                    windowed: false,
                    key_codec,
                    value_codec,
                }),
                hooks: Mutex::default(),
                use_partitioner: std::sync::atomic::AtomicBool::new(false),
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

    /// Routes each key to the partition Kafka's default partitioner gives its encoded bytes
    /// (Faust's `use_partitioner=True`), rather than to the current event's: for a table
    /// written outside stream processing (a timer, a task) or by events of a topic keyed
    /// otherwise. The key's partition must be on the calling core (else
    /// [`TableError::NotLocal`]): a table written this way suits one-core workers, or keys
    /// whose partition the caller holds. Set before the worker starts.
    pub fn use_partitioner(self) -> Self {
        self.shared.use_partitioner.store(true, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// Calls `f` with the partition each time one of the table's shards is recovered from
    /// its changelog (Faust's `on_recover`), on the shard's core, before its partition's
    /// events are processed — the place to rebuild what is derived from the table. Set
    /// before the worker starts.
    pub fn on_recover(self, f: impl Fn(u32) + Send + Sync + 'static) -> Self {
        lock(&self.shared.hooks).on_recover = Some(Arc::new(f));
        self
    }

    /// Calls `f` with the partition, key and value (`None`: deleted) of each changelog record
    /// a shard applies while it recovers or follows the changelog as a standby (Faust's
    /// `on_changelog_event`), on the shard's core. Set before the worker starts.
    pub fn on_changelog_event(self, f: impl Fn(u32, &K, Option<&V>) + Send + Sync + 'static) -> Self {
        lock(&self.shared.hooks).on_changelog_event = Some(Arc::new(f));
        self
    }

    /// Gives the changelog the partition count of `topic` when the worker creates it.
    pub(crate) fn with_partitions_like(self, topic: Arc<str>) -> Self {
        lock(&self.shared.config).partitions_like = Some(topic);
        self
    }

    /// Sets `key` to `value` in the current event's shard if `value` is past its latest
    /// value — counting the writes of every event not yet acked, not only the current
    /// event's — and says whether it was.
    pub(crate) fn advance(&self, key: K, value: V) -> Result<bool, TableError>
    where
        V: PartialOrd,
    {
        self.with_shard(None, Access::Internal, |s, token| {
            if s.get(&key)?.is_some_and(|latest| value <= latest) {
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
    ///
    /// The per-event path: the core, the token and the shard are borrowed, not cloned.
    pub(crate) fn with_shard<T>(
        &self,
        partition: Option<u32>,
        access: Access,
        f: impl FnOnce(&Shard<K, V>, Option<&Token>) -> Result<T, TableError>,
    ) -> Result<T, TableError> {
        self.with_shard_and_core(partition, access, |shard, token, _| f(shard, token))
    }

    /// [`with_shard`](Table::with_shard) that also hands `f` the core, for a caller that
    /// goes on to another table's shard on it ([`on_core`](Table::on_core)).
    pub(crate) fn with_shard_and_core<T>(
        &self,
        partition: Option<u32>,
        access: Access,
        f: impl FnOnce(&Shard<K, V>, Option<&Token>, &crate::runtime::CoreRuntime) -> Result<T, TableError>,
    ) -> Result<T, TableError> {
        let table = || self.shared.name.to_string();
        crate::runtime::CoreRuntime::with_current(|core| {
            let core = core.ok_or_else(|| TableError::NotRunning { table: table() })?;
            crate::runtime::context::with_current_token(|token| {
                let partition = match (partition, token) {
                    (Some(p), _) => p,
                    (None, Some(t)) => {
                        self.check_copartitioned(core, &t.topic)?;
                        t.partition
                    }
                    (None, None) => return Err(TableError::OutsideStream { table: table() }),
                };
                self.on_core(core, token, partition, access, |shard, token| f(shard, token, core))
            })
        })
    }

    /// Runs `f` on the shard of `partition` held by `core`, for the event of `token` (what
    /// [`with_shard`](Table::with_shard) does once it found the core and the token).
    pub(crate) fn on_core<T>(
        &self,
        core: &crate::runtime::CoreRuntime,
        token: Option<&Token>,
        partition: u32,
        access: Access,
        f: impl FnOnce(&Shard<K, V>, Option<&Token>) -> Result<T, TableError>,
    ) -> Result<T, TableError> {
        let not_local = || TableError::NotLocal { table: self.shared.name.to_string(), partition, core: core.index() };
        core.with_shard(self.shared.index, partition, |shard| {
            let shard = shard.ok_or_else(not_local)?;
            let typed = shard.as_any().downcast_ref::<Shard<K, V>>().ok_or_else(not_local)?;
            // The shard's undo log holds an event's writes until the core settles them at its
            // ack (or failure): the core learns of the shard when its log fills.
            let noted = token.is_none() || typed.holds_writes_in_flight();
            let result = f(typed, token);
            if !noted && typed.holds_writes_in_flight() {
                core.note_writes(shard.clone());
            }
            match access {
                Access::Read => core.sensors().iter().for_each(|s| s.on_table_get(&self.shared.name)),
                Access::Write => core.sensors().iter().for_each(|s| s.on_table_set(&self.shared.name)),
                Access::Internal => {}
            }
            result
        })
    }

    /// The value of `key` in the shard of `partition` for an event of `topic`, checked
    /// co-partitioned with it: a stream-table join's lookup (made before the event is the
    /// task's current one).
    pub(crate) fn join_lookup(&self, topic: &Arc<str>, partition: u32, key: &K) -> Result<Option<V>, TableError> {
        crate::runtime::CoreRuntime::with_current(|core| match core {
            Some(core) => self.check_copartitioned(core, topic),
            None => Err(TableError::NotRunning { table: self.shared.name.to_string() }),
        })?;
        self.partition(partition).get(key)
    }

    /// Checks that the table's changelog has as many partitions as `topic`, the topic of the
    /// current event (once per topic and core: later calls compare a pointer, or the name
    /// when each partition has its own copy of it).
    fn check_copartitioned(&self, core: &crate::runtime::CoreRuntime, topic: &Arc<str>) -> Result<(), TableError> {
        /// Tables whose last good topic is remembered (by index); others check every time.
        const REMEMBERED: usize = 16;
        thread_local! {
            /// Per table (by index), the topic last found co-partitioned with it on this core.
            /// The `Arc` is kept, so its address cannot be reused by another topic meanwhile.
            static CHECKED: RefCell<[Option<Arc<str>>; REMEMBERED]> = const { RefCell::new([const { None }; REMEMBERED]) };
        }
        let index = self.shared.index;
        let known =
            index < REMEMBERED && CHECKED.with(|c| c.borrow()[index].as_ref().is_some_and(|t| same_topic(t, topic)));
        if known {
            return Ok(());
        }
        // The core's partition counts are fixed when it starts: an answer holds for its life.
        let remember = || {
            if index < REMEMBERED {
                CHECKED.with(|c| c.borrow_mut()[index] = Some(topic.clone()));
            }
        };
        let (Some(topic_partitions), Some(changelog_partitions)) =
            (core.partitions(topic), core.partitions(&self.shared.changelog))
        else {
            // A channel's events, or a topic the core does not know: nothing to compare.
            remember();
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
        remember();
        Ok(())
    }

    /// The partition of `key` under [`use_partitioner`](Table::use_partitioner); `None`
    /// (the current event's) otherwise.
    fn key_partition(&self, key: &K) -> Result<Option<u32>, TableError> {
        if !self.shared.use_partitioner.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        let table = || self.shared.name.to_string();
        let partitions =
            crate::runtime::CoreRuntime::with_current(|core| core.and_then(|c| c.partitions(&self.shared.changelog)))
                .ok_or_else(|| TableError::NotRunning { table: table() })?;
        let (key_codec, _) = self.codecs();
        let mut bytes = Vec::new();
        key_codec.encode(key, &mut bytes).map_err(|source| TableError::Codec {
            table: table(),
            // Not known yet: the key's bytes choose it.
            partition: 0,
            what: "key (to choose its partition)".to_string(),
            source,
        })?;
        Ok(Some(crate::partitioner::partition_for_key(&bytes, partitions)))
    }

    /// The value of `key`, if any.
    pub fn get(&self, key: &K) -> Result<Option<V>, TableError> {
        self.with_shard(self.key_partition(key)?, Access::Read, |s, _| s.get(key))
    }

    /// The value of `key`, or the table's default.
    pub fn get_or_default(&self, key: &K) -> Result<V, TableError> {
        self.with_shard(self.key_partition(key)?, Access::Read, |s, _| s.get_or_default(key))
    }

    /// Sets `key` to `value`.
    pub fn insert(&self, key: K, value: V) -> Result<(), TableError> {
        self.with_shard(self.key_partition(&key)?, Access::Write, |s, t| s.write(t, key, Some(value)))
    }

    /// Changes the value of `key` in place (starting from the default when it has none) and
    /// returns the new value: `counts.update(&account, |n| *n += 1)`.
    pub fn update(&self, key: &K, f: impl FnOnce(&mut V)) -> Result<V, TableError> {
        self.with_shard(self.key_partition(key)?, Access::Write, |s, t| s.update(t, key, f))
    }

    /// Removes `key`, returning its value.
    pub fn remove(&self, key: &K) -> Result<Option<V>, TableError> {
        self.with_shard(self.key_partition(key)?, Access::Write, |s, t| {
            let old = s.get(key)?;
            s.write(t, key.clone(), None)?;
            Ok(old)
        })
    }

    /// Every key and value of the table's shards on the calling core, in no particular order
    /// (writes of events in flight included).
    pub fn local_items(&self) -> Result<Vec<(K, V)>, TableError> {
        let core = crate::runtime::CoreRuntime::current()
            .ok_or_else(|| TableError::NotRunning { table: self.shared.name.to_string() })?;
        let mut out = Vec::new();
        for shard in core.shards_of(self.shared.index) {
            if let Some(s) = shard.as_any().downcast_ref::<Shard<K, V>>() {
                s.items(&mut out)?;
            }
        }
        Ok(out)
    }

    /// The partitions of the table held by the calling core.
    pub fn local_partitions(&self) -> Vec<u32> {
        crate::runtime::CoreRuntime::current()
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
        self.table.with_shard(Some(self.partition), Access::Read, |s, _| s.get(key))
    }

    /// The value of `key`, or the table's default.
    pub fn get_or_default(&self, key: &K) -> Result<V, TableError> {
        self.table.with_shard(Some(self.partition), Access::Read, |s, _| s.get_or_default(key))
    }

    /// Sets `key` to `value`.
    pub fn insert(&self, key: K, value: V) -> Result<(), TableError> {
        self.table.with_shard(Some(self.partition), Access::Write, |s, t| s.write(t, key, Some(value)))
    }

    /// Changes the value of `key` in place and returns the new value.
    pub fn update(&self, key: &K, f: impl FnOnce(&mut V)) -> Result<V, TableError> {
        self.table.with_shard(Some(self.partition), Access::Write, |s, t| s.update(t, key, f))
    }

    /// Removes `key`, returning its value.
    pub fn remove(&self, key: &K) -> Result<Option<V>, TableError> {
        self.table.with_shard(Some(self.partition), Access::Write, |s, t| {
            let old = s.get(key)?;
            s.write(t, key.clone(), None)?;
            Ok(old)
        })
    }

    /// Every key and value of this partition.
    pub fn items(&self) -> Result<Vec<(K, V)>, TableError> {
        let mut out = Vec::new();
        self.table.with_shard(Some(self.partition), Access::Read, |s, _| s.items(&mut out))?;
        Ok(out)
    }
}
