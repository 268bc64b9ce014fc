//! Global tables (Faust's `app.GlobalTable`): every worker holds every partition.
//!
//! A global table is a [`Table`] for its writes — sharded, each write on the core that owns
//! the current event's partition, replicated through its changelog — plus, on every worker, a
//! replica of the whole table that core 0 keeps current by following every partition of the
//! changelog in the background. Reads go to the replica, from any core or thread, and never
//! wait once it is ready (it has read the changelog up to where it stood when the worker
//! started). A write shows in the replicas once its changelog record is written, at the
//! owner's next commit: reads lag writes by up to a commit interval, as Faust's do.

use std::collections::HashMap;
use std::hash::Hash;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use faust_transport::{OffsetSpec, TopicPartition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::app::App;
use crate::codec::Codec;
use crate::error::TableError;
use crate::runtime::CoreRuntime;
use crate::table::Table;

/// The whole table, as this worker's replica holds it.
struct Replica<K, V> {
    values: RwLock<HashMap<K, V>>,
    ready: AtomicBool,
    became_ready: event_listener::Event,
}

/// A table every worker holds whole (Faust's `GlobalTable`): see [`App::global_table`].
pub struct GlobalTable<K, V> {
    table: Table<K, V>,
    replica: Arc<Replica<K, V>>,
}

impl<K, V> Clone for GlobalTable<K, V> {
    fn clone(&self) -> Self {
        GlobalTable { table: self.table.clone(), replica: self.replica.clone() }
    }
}

impl<K, V> std::fmt::Debug for GlobalTable<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalTable").field("table", &self.table.name()).finish()
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<K, V> GlobalTable<K, V>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    /// The value of `key` in this worker's replica, whichever partition it is in.
    pub fn get(&self, key: &K) -> Option<V> {
        read(&self.replica.values).get(key).cloned()
    }

    /// Whether the replica holds `key`.
    pub fn contains_key(&self, key: &K) -> bool {
        read(&self.replica.values).contains_key(key)
    }

    /// Every key and value of the replica.
    pub fn items(&self) -> Vec<(K, V)> {
        read(&self.replica.values).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// How many keys the replica holds.
    pub fn len(&self) -> usize {
        read(&self.replica.values).len()
    }

    /// Whether the replica is empty.
    pub fn is_empty(&self) -> bool {
        read(&self.replica.values).is_empty()
    }

    /// Whether the replica has read the whole changelog as it stood when the worker started.
    pub fn is_ready(&self) -> bool {
        self.replica.ready.load(Ordering::Acquire)
    }

    /// Waits until the replica is ready (from an agent, a task or another thread).
    pub async fn wait_ready(&self) {
        loop {
            let listener = self.replica.became_ready.listen();
            if self.is_ready() {
                return;
            }
            listener.await;
        }
    }

    /// Sets `key` to `value`: in the current event's shard, as [`Table::insert`] (inside
    /// stream processing, for an event of a topic co-partitioned with the table).
    pub fn insert(&self, key: K, value: V) -> Result<(), TableError> {
        self.table.insert(key, value)
    }

    /// Changes the value of `key` in the current event's shard, as [`Table::update`].
    pub fn update(&self, key: &K, f: impl FnOnce(&mut V)) -> Result<V, TableError> {
        self.table.update(key, f)
    }

    /// Removes `key` from the current event's shard, as [`Table::remove`].
    pub fn remove(&self, key: &K) -> Result<Option<V>, TableError> {
        self.table.remove(key)
    }

    /// The sharded table the writes go to.
    pub fn table(&self) -> &Table<K, V> {
        &self.table
    }
}

impl App {
    /// Declares a global table (Faust's `app.GlobalTable`): written like a [`Table`] (in
    /// agents, on the core of the event's partition), read whole on every worker from a
    /// replica kept current in the background — for reference data every event may need,
    /// whatever its key: prices, settings, user names.
    ///
    /// ```
    /// use faust::{App, Settings};
    ///
    /// let app = App::new(Settings::new("shop"));
    /// let prices = app.topic::<String, u64>("prices"); // keyed by product
    /// let price_of = app.global_table::<String, u64>("price_of");
    /// let table = price_of.clone();
    /// app.agent("prices", &prices, move |stream| {
    ///     let price_of = table.clone();
    ///     stream.for_each_item(move |product, cents| {
    ///         price_of.insert(product.unwrap_or_default(), cents)?;
    ///         Ok(())
    ///     })
    /// });
    /// // Anywhere, on any worker: `price_of.get(&product)`.
    /// ```
    pub fn global_table<K, V>(&self, name: &str) -> GlobalTable<K, V>
    where
        K: Serialize + DeserializeOwned + Hash + Eq + Clone + Send + Sync + 'static,
        V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let table = self.table::<K, V>(name);
        self.global_of(table)
    }

    /// A replica of `table` on every worker, kept current from its changelog.
    pub(crate) fn global_of<K, V>(&self, table: Table<K, V>) -> GlobalTable<K, V>
    where
        K: Serialize + DeserializeOwned + Hash + Eq + Clone + Send + Sync + 'static,
        V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let replica = Arc::new(Replica {
            values: RwLock::new(HashMap::new()),
            ready: AtomicBool::new(false),
            became_ready: event_listener::Event::new(),
        });
        let (changelog, codecs) = (Arc::<str>::from(table.changelog_topic()), table.codecs());
        let follower = replica.clone();
        self.add_service("global-table", false, move |run| {
            let (changelog, codecs, replica) = (changelog.clone(), codecs.clone(), follower.clone());
            async move { follow(run.core, changelog, codecs, replica).await }
        });
        GlobalTable { table, replica }
    }
}

/// Reads every partition of `changelog` into `replica` until the worker stops (core 0).
async fn follow<K, V>(
    core: Rc<CoreRuntime>,
    changelog: Arc<str>,
    (key_codec, value_codec): (Codec, Codec),
    replica: Arc<Replica<K, V>>,
) where
    K: DeserializeOwned + Hash + Eq + Send + Sync,
    V: DeserializeOwned + Send + Sync,
{
    let partitions = core.partitions(&changelog).unwrap_or(0);
    // The replica starts afresh with each run of the worker (the changelog is compacted).
    replica.values.write().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    replica.ready.store(false, Ordering::Release);
    let mut positions = Vec::new();
    for p in 0..partitions {
        let tp = TopicPartition::new(changelog.clone(), p);
        let start = core.transport().list_offset(&tp, OffsetSpec::Earliest).await.unwrap_or(0);
        let end = core.transport().list_offset(&tp, OffsetSpec::Latest).await.unwrap_or(start);
        positions.push((tp, start, end));
    }
    loop {
        if core.stopping().is_cancelled() {
            return;
        }
        let mut read_any = false;
        for (tp, next, _) in positions.iter_mut() {
            let fetched = match core.transport().fetch(tp, *next, 1 << 20, Duration::ZERO).await {
                Ok(fetched) => fetched,
                Err(e) => {
                    tracing::warn!(changelog = %tp, error = %e, "a global table's replica could not read its changelog; retrying");
                    continue;
                }
            };
            if !fetched.records.is_empty() {
                read_any = true;
                let mut values = replica.values.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                for r in &fetched.records {
                    let Some(raw) = &r.key else { continue };
                    let Ok(key) = key_codec.decode_bytes::<K>(raw) else { continue };
                    match r.value.as_ref().map(|v| value_codec.decode_bytes::<V>(v)) {
                        Some(Ok(value)) => {
                            values.insert(key, value);
                        }
                        // A deletion, or a value of another type: not in the table.
                        _ => {
                            values.remove(&key);
                        }
                    }
                }
            }
            *next = (*next).max(fetched.next_offset);
        }
        // Ready once every partition was read up to where it ended at the start.
        if !replica.ready.load(Ordering::Acquire) && positions.iter().all(|(_, next, end)| next >= end) {
            replica.ready.store(true, Ordering::Release);
            replica.became_ready.notify(usize::MAX);
        }
        if !read_any && !core.sleep_unless_stopped(Duration::from_millis(20)).await {
            return;
        }
        glommio::yield_if_needed().await;
    }
}
