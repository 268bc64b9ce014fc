//! A table's shard: the typed write-back cache over a partition's store (or the cache alone,
//! in memory), and its side of the runtime's contract ([`AnyShard`]).

use std::any::Any;
use std::cell::RefCell;
use std::hash::Hash;
use std::rc::Rc;
use std::sync::Arc;

use faust_storage::{BatchBuilder, Record, Store, StoreConfig, SyncPolicy, WriteBatch};
use faust_transport::TopicPartition;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Config, TableShared};
use crate::codec::{Codec, CodecError};
use crate::error::TableError;
use crate::runtime::state::{AnyShard, FrozenSet, ShardArgs, TableMeta, Token, same_topic};
use crate::util::lock;

type Map<K, V> = hashbrown::HashMap<K, V, foldhash::fast::RandomState>;

/// A store-backed shard keeps at most this many clean entries cached after a commit.
const CACHE_MAX_KEYS: usize = 200_000;

/// Opens a shard's store; a store damaged before its checkpoint is moved aside (to
/// `{dir}.damaged`) and started empty, to be rebuilt from the changelog.
fn open_store(table: &str, partition: u32, dir: &std::path::Path, segment_bytes: u64) -> Result<Store, TableError> {
    // The changelog is the durable copy: the store never forces its writes to disk. After a
    // power loss it may open as damaged, and is rebuilt.
    let config = StoreConfig { sync: SyncPolicy::Never, segment_bytes, ..StoreConfig::default() };
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

struct Cached<V> {
    value: Option<V>,
    /// Not yet frozen by a commit.
    dirty: bool,
    /// The write run ([`State::run`]) that last noted an undo entry for this key: a write in
    /// the same run changes the value in place without another one.
    run: u64,
    /// The changelog (and so the store) may hold a value of this key: it was loaded from the
    /// store, recovered, or frozen by a commit. A deletion of a key that was never persisted
    /// needs no tombstone: its entry leaves the cache at once (a windowed table creates and
    /// expires many windows within one commit interval, and keeping their deletions cached
    /// until the commit grew the cache far beyond the live windows).
    persisted: bool,
}

impl<V: Clone> Cached<V> {
    fn prior(&self) -> Prior<V> {
        Prior { value: self.value.clone(), dirty: self.dirty, persisted: self.persisted }
    }
}

/// A key's cache entry as an undo restores it.
#[derive(Clone)]
struct Prior<V> {
    value: Option<V>,
    dirty: bool,
    persisted: bool,
}

/// What undoing an event's write to a key restores: the key's entry before the write.
struct Undo<K, V> {
    event: Token,
    key: K,
    /// The entry before the write; `None`: the key was not in the cache (nor, when it was
    /// never persisted, anywhere).
    before: Option<Prior<V>>,
}

/// How many keys of acked undo entries a shard keeps for reuse: about the events of a few
/// acked batches.
const SPARE_KEYS: usize = 1024;

/// `key`, copied into a spare key's memory when there is one.
fn key_from_spare<K: Clone>(spare: &mut Vec<K>, key: &K) -> K {
    match spare.pop() {
        Some(mut k) => {
            k.clone_from(key);
            k
        }
        None => key.clone(),
    }
}

struct State<K, V> {
    /// Recently used and dirty entries; a `None` value is a deletion. For an in-memory shard
    /// this is the whole state. Writes of events not yet acked are in it too, in place.
    cache: Map<K, Cached<V>>,
    /// Dirty entries in `cache`.
    dirty: usize,
    /// The undo log: for each key an event in flight wrote, its entry before that event's
    /// first write, oldest first. The one owner of a write until its ack: an ack drops the
    /// event's entries, a failed or abandoned event puts them back (newest first).
    undo: Vec<Undo<K, V>>,
    /// Keys of acked undo entries, kept (at most [`SPARE_KEYS`]) for the next entries to
    /// `clone_from`: a key that owns memory (a `String`) is then copied into memory already
    /// held, not allocated and freed once per event.
    spare_keys: Vec<K>,
    /// The current write run: consecutive writes of one event, numbered so that a key the
    /// run already wrote (its [`Cached::run`]) needs no second undo entry.
    run: u64,
    /// The event of the current run; `None` after it was settled.
    run_event: Option<Token>,
    /// Per source partition, the highest offset whose writes were acked since the freeze.
    applied: Vec<(TopicPartition, u64)>,
    store: Option<Store>,
    /// Deletions frozen since the last eviction: clean entries with no value, dropped from
    /// the cache when there are many.
    frozen_deletions: usize,
    stream_time: i64,
    key_scratch: Vec<u8>,
}

pub(crate) struct Shard<K, V> {
    name: Arc<str>,
    config: Config<V>,
    /// The table's callbacks, as they were when the shard opened.
    hooks: super::Hooks<K, V>,
    partition: u32,
    changelog: TopicPartition,
    state: RefCell<State<K, V>>,
    /// See [`AnyShard::checkpointed_changelog`].
    checkpointed_changelog: std::cell::Cell<u64>,
    /// See [`AnyShard::written_end`].
    written_end: std::cell::Cell<Option<u64>>,
    /// Unique among the shards the process opened: what a view kept beside the shard (a
    /// windowed table's timers) compares to tell a reopened shard from the one it was built on.
    instance: u64,
    /// Counts the undos and clears that changed the state: a view built on the shard is
    /// rebuilt when this moved.
    undos: std::cell::Cell<u64>,
}

/// The next [`Shard::instance`].
static NEXT_INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

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

    /// The current value: writes of events in flight included (they are in place).
    pub(crate) fn get(&self, key: &K) -> Result<Option<V>, TableError> {
        let mut state = self.state.borrow_mut();
        if let Some(c) = state.cache.get(key) {
            return Ok(c.value.clone());
        }
        Ok(self.load(&mut state, key)?.and_then(|c| c.value.clone()))
    }

    /// [`get`](Shard::get) for a key given in a borrowed form (`probe`), without building the
    /// owned key when it is cached; `owned` builds it when it is not.
    pub(crate) fn get_borrowed<Q>(&self, probe: &Q, owned: impl FnOnce() -> K) -> Result<Option<V>, TableError>
    where
        Q: Hash + hashbrown::Equivalent<K> + ?Sized,
    {
        if let Some(c) = self.state.borrow().cache.get(probe) {
            return Ok(c.value.clone());
        }
        self.get(&owned())
    }

    /// Loads `key` from the store into the cache, when it is there and not cached (a value
    /// that no longer decodes is a deletion with `reset_bad_values`, an error otherwise).
    fn load<'s>(&self, state: &'s mut State<K, V>, key: &K) -> Result<Option<&'s mut Cached<V>>, TableError> {
        let State { store, key_scratch, cache, dirty, .. } = state;
        if cache.contains_key(key) {
            return Ok(cache.get_mut(key));
        }
        let Some(store) = store.as_ref() else { return Ok(None) };
        key_scratch.clear();
        self.config.key_codec.encode_owned(key, key_scratch).map_err(|e| self.codec_err("key", e))?;
        let Some(raw) = store.get_ref(key_scratch) else { return Ok(None) };
        let entry = match self.config.value_codec.decode::<V>(raw) {
            Ok(v) => Cached { value: Some(v), dirty: false, run: 0, persisted: true },
            Err(e) if self.config.reset_bad_values => {
                tracing::warn!(table = %self.name, partition = self.partition, key = %preview(key_scratch), error = %e,
                    "dropping a stored value that no longer decodes");
                // A deletion, so the store and the changelog drop it at the next commit.
                *dirty += 1;
                Cached { value: None, dirty: true, run: 0, persisted: true }
            }
            Err(e) => return Err(self.codec_err(format!("stored value (key {})", preview(key_scratch)), e)),
        };
        Ok(Some(cache.entry(key.clone()).insert(entry).into_mut()))
    }

    fn default_value(&self) -> Result<V, TableError> {
        self.config.default.as_ref().map(|d| d()).ok_or_else(|| TableError::NoDefault { table: self.name.to_string() })
    }

    pub(crate) fn get_or_default(&self, key: &K) -> Result<V, TableError> {
        match self.get(key)? {
            Some(v) => Ok(v),
            None => self.default_value(),
        }
    }

    /// Runs `write` on the cache entry of `key` for a write by the event of `token` (or,
    /// without one, outside any event), after noting the key's entry before the event's first
    /// write to it in the undo log; then marks the entry dirty. One hash lookup when the key is
    /// cached.
    ///
    /// The key is given as `probe` (any form that hashes and compares as `K` does) and built
    /// with `owned` only when it is not cached.
    fn write_entry<Q, R>(
        &self,
        state: &mut State<K, V>,
        token: Option<&Token>,
        probe: &Q,
        owned: &dyn Fn() -> K,
        absent: &dyn Fn() -> bool,
        write: impl FnOnce(&mut Cached<V>) -> Result<R, TableError>,
    ) -> Result<R, TableError>
    where
        Q: Hash + hashbrown::Equivalent<K> + ?Sized,
    {
        let State { cache, undo, run, run_event, dirty, spare_keys, .. } = state;
        if let Some(t) = token
            && run_event.as_ref() != Some(t)
        {
            *run += 1;
            match run_event.as_mut() {
                // The same topic: the fields change, the topic's reference count does not.
                Some(r) if Arc::ptr_eq(&r.topic, &t.topic) => {
                    (r.agent, r.partition, r.offset, r.timestamp) = (t.agent, t.partition, t.offset, t.timestamp);
                }
                _ => *run_event = Some(t.clone()),
            }
        }
        if let Some((cached_key, entry)) = cache.get_key_value_mut(probe) {
            if let Some(t) = token
                && entry.run != *run
            {
                let key = key_from_spare(spare_keys, cached_key);
                undo.push(Undo { event: t.clone(), key, before: Some(entry.prior()) });
                entry.run = *run;
            }
            let result = write(entry)?;
            if !keep_written(entry, dirty) {
                cache.remove(probe);
            }
            return Ok(result);
        }
        // Not cached: from the store if it is there (unless the caller knows it is not), else
        // a new entry.
        let key = owned();
        let loaded = !absent() && self.load(state, &key)?.is_some();
        let State { cache, undo, run, dirty, spare_keys, .. } = state;
        let entry = if loaded {
            cache.get_mut(&key).expect("loaded above")
        } else {
            cache.entry(key.clone()).or_insert(Cached { value: None, dirty: false, run: 0, persisted: false })
        };
        if let Some(t) = token {
            let before = loaded.then(|| entry.prior());
            undo.push(Undo { event: t.clone(), key: key_from_spare(spare_keys, &key), before });
            entry.run = *run;
        }
        let result = write(entry)?;
        if !keep_written(entry, dirty) {
            cache.remove(&key);
        }
        Ok(result)
    }

    pub(crate) fn update(&self, token: Option<&Token>, key: &K, f: impl FnOnce(&mut V)) -> Result<V, TableError> {
        self.upsert(token, key, |v| {
            f(v);
            v.clone()
        })
        .map(|(v, _)| v)
    }

    /// Changes the value of `key` in place (from the default when it has none) and returns
    /// what `f` returns, and whether the key had no value before.
    pub(crate) fn upsert<R>(
        &self,
        token: Option<&Token>,
        key: &K,
        f: impl FnOnce(&mut V) -> R,
    ) -> Result<(R, bool), TableError> {
        self.upsert_known(token, key, &|| key.clone(), &|| false, f)
    }

    /// [`upsert`](Shard::upsert) with the key given as `probe` (a borrowed form that hashes and
    /// compares as `K`; `owned` builds the key when it is not cached), for a caller that may
    /// know that a key the cache does not hold is not in the store either (`absent`, asked only
    /// then): the store is not read for it.
    pub(crate) fn upsert_known<Q, R>(
        &self,
        token: Option<&Token>,
        probe: &Q,
        owned: &dyn Fn() -> K,
        absent: &dyn Fn() -> bool,
        f: impl FnOnce(&mut V) -> R,
    ) -> Result<(R, bool), TableError>
    where
        Q: Hash + hashbrown::Equivalent<K> + ?Sized,
    {
        let mut guard = self.state.borrow_mut();
        let state = &mut *guard;
        let result = self.write_entry(state, token, probe, owned, absent, |entry| {
            let created = entry.value.is_none();
            let value = match &mut entry.value {
                Some(v) => v,
                None => entry.value.insert(self.default_value()?),
            };
            Ok((f(value), created))
        })?;
        if token.is_none() {
            Self::keep_outside_write(state, &owned());
        }
        Ok(result)
    }

    /// How many entries the cache holds (deletions and writes in flight included).
    pub(crate) fn cached_len(&self) -> usize {
        self.state.borrow().cache.len()
    }

    /// Calls `f` on every cached key that has a value (writes in flight included), in the
    /// cache's order: one pass over the cache, for a caller that wants many of its keys at
    /// once. Keys only in the store are not seen.
    pub(crate) fn for_each_cached(&self, mut f: impl FnMut(&K, &V)) {
        let state = self.state.borrow();
        for (key, cached) in &state.cache {
            if let Some(value) = &cached.value {
                f(key, value);
            }
        }
    }

    /// See [`Shard::instance`](struct@Shard).
    pub(crate) fn instance(&self) -> u64 {
        self.instance
    }

    /// How many undos and clears changed the state so far.
    pub(crate) fn undos(&self) -> u64 {
        self.undos.get()
    }

    pub(crate) fn write(&self, token: Option<&Token>, key: K, value: Option<V>) -> Result<(), TableError> {
        self.write_borrowed(token, &key, &|| key.clone(), value)
    }

    /// [`write`](Shard::write) with the key given as `probe` (a borrowed form that hashes and
    /// compares as `K`; `owned` builds the key when it is not cached).
    pub(crate) fn write_borrowed<Q>(
        &self,
        token: Option<&Token>,
        probe: &Q,
        owned: &dyn Fn() -> K,
        value: Option<V>,
    ) -> Result<(), TableError>
    where
        Q: Hash + hashbrown::Equivalent<K> + ?Sized,
    {
        let mut guard = self.state.borrow_mut();
        let state = &mut *guard;
        self.write_entry(state, token, probe, owned, &|| false, |entry| {
            entry.value = value;
            Ok(())
        })?;
        if token.is_none() {
            Self::keep_outside_write(state, &owned());
        }
        Ok(())
    }

    /// A write outside any event to a key that events in flight wrote: undoing them restores
    /// this value.
    fn keep_outside_write(state: &mut State<K, V>, key: &K) {
        if state.undo.is_empty() {
            return;
        }
        // Not cached after the write: a deletion of a key never persisted, which undoing
        // restores by leaving the key out.
        let now = state.cache.get(key).map(|c| Prior { dirty: true, ..c.prior() });
        for u in state.undo.iter_mut().filter(|u| u.key == *key) {
            u.before = now.clone();
        }
    }

    pub(crate) fn items(&self, out: &mut Vec<(K, V)>) -> Result<(), TableError> {
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
        out.extend(merged.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        Ok(())
    }
}

/// Settles an entry just written, keeping the count of dirty entries: a deletion of a key
/// never persisted has nothing to tombstone, and `false` says it leaves the cache; any other
/// entry is now dirty.
fn keep_written<V>(entry: &mut Cached<V>, dirty: &mut usize) -> bool {
    if entry.value.is_none() && !entry.persisted {
        *dirty -= usize::from(entry.dirty);
        return false;
    }
    if !entry.dirty {
        entry.dirty = true;
        *dirty += 1;
    }
    true
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
        match self.get(&key)? {
            Some(v) => Ok(Some(serde_json::to_value(&v).map_err(|e| self.json_err("value", e))?)),
            None => Ok(None),
        }
    }

    fn items_json(&self) -> Result<Vec<(serde_json::Value, serde_json::Value)>, TableError> {
        let mut items = Vec::new();
        self.items(&mut items)?;
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

    fn acked(&self, agent: usize, tp: &TopicPartition, offsets: &[u64]) {
        let mut guard = self.state.borrow_mut();
        let state = &mut *guard;
        let (Some(&lowest), Some(&highest)) = (offsets.first(), offsets.last()) else { return };
        // A batch's offsets are mostly a contiguous run: then a range check says it.
        let contiguous = highest - lowest + 1 == offsets.len() as u64;
        let is_acked = |t: &Token| {
            t.partition == tp.partition
                && t.agent == agent
                && (lowest..=highest).contains(&t.offset)
                && (contiguous || offsets.binary_search(&t.offset).is_ok())
                && same_topic(&t.topic, &tp.topic)
        };
        let (mut newest_offset, mut newest_timestamp) = (None, i64::MIN);
        for u in state.undo.extract_if(.., |u| is_acked(&u.event)) {
            newest_offset = newest_offset.max(Some(u.event.offset));
            newest_timestamp = newest_timestamp.max(u.event.timestamp);
            if state.spare_keys.len() < SPARE_KEYS {
                state.spare_keys.push(u.key);
            }
        }
        let Some(newest_offset) = newest_offset else { return };
        if state.run_event.as_ref().is_some_and(is_acked) {
            state.run_event = None;
        }
        state.stream_time = state.stream_time.max(newest_timestamp);
        match state.applied.iter_mut().find(|(t, _)| t.partition == tp.partition && same_topic(&t.topic, &tp.topic)) {
            Some((_, o)) => *o = (*o).max(newest_offset),
            None => state.applied.push((tp.clone(), newest_offset)),
        }
    }

    fn undo(&self, which: &dyn Fn(&Token) -> bool) {
        let mut guard = self.state.borrow_mut();
        let state = &mut *guard;
        if state.run_event.as_ref().is_some_and(which) {
            state.run_event = None;
        }
        if state.undo.iter().any(|u| which(&u.event)) {
            self.undos.set(self.undos.get() + 1);
        }
        // Newest first, so a key an event wrote twice ends at its value before the first.
        let mut i = state.undo.len();
        while i > 0 {
            i -= 1;
            if !which(&state.undo[i].event) {
                continue;
            }
            let entry = state.undo.remove(i);
            // A later event in flight wrote the key since: it now restores what this one
            // would have (the key's current value is that event's, and stays).
            if let Some(later) = state.undo[i..].iter_mut().find(|u| u.key == entry.key) {
                later.before = entry.before;
                continue;
            }
            let State { cache, dirty, .. } = state;
            let was_dirty = cache.get(&entry.key).is_some_and(|c| c.dirty);
            let now_dirty = match entry.before {
                None => {
                    cache.remove(&entry.key);
                    false
                }
                Some(Prior { value, dirty: d, persisted }) => {
                    cache.insert(entry.key, Cached { value, dirty: d, run: 0, persisted });
                    d
                }
            };
            match (was_dirty, now_dirty) {
                (true, false) => *dirty -= 1,
                (false, true) => *dirty += 1,
                _ => {}
            }
        }
    }

    fn holds_writes_in_flight(&self) -> bool {
        !self.state.borrow().undo.is_empty()
    }

    fn applied_beyond(&self, committable: &dyn Fn(&TopicPartition) -> Option<u64>) -> bool {
        self.state.borrow().applied.iter().any(|(tp, o)| committable(tp).is_some_and(|c| *o >= c))
    }

    fn is_dirty(&self) -> bool {
        self.state.borrow().dirty > 0
    }

    fn freeze(&self) -> Box<dyn FrozenSet> {
        let mut guard = self.state.borrow_mut();
        let state = &mut *guard;
        let mut entries = Vec::with_capacity(state.dirty);
        let in_memory = state.store.is_none();
        // Keys events in flight wrote: what the acked events left in them is the value before
        // the oldest undo entry of each, and their entry in the cache stays dirty.
        let mut in_flight: Map<K, usize> = Map::default();
        for (i, u) in state.undo.iter().enumerate() {
            in_flight.entry(u.key.clone()).or_insert(i);
        }
        let mut still_dirty = 0;
        for (k, c) in state.cache.iter_mut().filter(|(_, c)| c.dirty) {
            if in_flight.contains_key(k) {
                still_dirty += 1;
                continue;
            }
            // A write never leaves a deletion of a key never persisted in the cache
            // (`keep_written`), and undos restore entries taken from the cache.
            debug_assert!(c.value.is_some() || c.persisted, "a cached deletion of a key never persisted");
            c.dirty = false;
            c.persisted = true;
            state.frozen_deletions += usize::from(c.value.is_none());
            entries.push((k.clone(), c.value.clone()));
        }
        let mut persisted_in_flight: hashbrown::HashSet<K, foldhash::fast::RandomState> = Default::default();
        for (k, i) in in_flight {
            let Some(before) = &mut state.undo[i].before else { continue };
            if !before.dirty {
                continue;
            }
            before.dirty = false;
            before.persisted = true;
            entries.push((k.clone(), before.value.clone()));
            // The acked value goes to the changelog: what the events in flight made of the
            // key (a deletion, even one that left the cache) must follow it there.
            match state.cache.get_mut(&k) {
                Some(c) => c.persisted = true,
                None => {
                    state.cache.insert(k.clone(), Cached { value: None, dirty: true, run: 0, persisted: true });
                    still_dirty += 1;
                }
            }
            persisted_in_flight.insert(k);
        }
        // And whatever undoing a later event in flight would put back.
        if !persisted_in_flight.is_empty() {
            for u in state.undo.iter_mut().filter(|u| persisted_in_flight.contains(&u.key)) {
                if let Some(before) = &mut u.before {
                    before.persisted = true;
                }
            }
        }
        if in_memory {
            // The cache is the state: a deletion needs no entry once it is frozen.
            state.cache.retain(|_, c| c.value.is_some() || c.dirty);
        }
        state.dirty = still_dirty;
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
        let mut guard = self.state.borrow_mut();
        let state = &mut *guard;
        for (key, value) in frozen.entries {
            // Written by an event in flight: the acked value under its undo entry is dirty again.
            if let Some(u) = state.undo.iter_mut().find(|u| u.key == key) {
                match &mut u.before {
                    Some(before) => before.dirty = true,
                    // Evicted between the freeze and now: the frozen value is the acked one.
                    None => u.before = Some(Prior { value, dirty: true, persisted: true }),
                }
                continue;
            }
            match state.cache.get_mut(&key) {
                // Written again since the freeze: already dirty, with the newer value.
                Some(c) if c.dirty => {}
                Some(c) => {
                    c.dirty = true;
                    state.dirty += 1;
                }
                // Evicted since, or a deletion an in-memory shard forgot at the freeze.
                None => {
                    state.cache.insert(key, Cached { value, dirty: true, run: 0, persisted: true });
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

    fn prepare_checkpoint(
        &self,
        changelog_offset: u64,
        sources: Vec<(String, u32, u64)>,
    ) -> Result<Option<faust_storage::PendingCheckpoint>, TableError> {
        let mut state = self.state.borrow_mut();
        let stream_time = state.stream_time;
        let Some(store) = state.store.as_mut() else { return Ok(None) };
        let meta = CheckpointMeta { changelog: changelog_offset, sources, stream_time };
        let bytes = serde_json::to_vec(&meta).unwrap_or_default();
        store.prepare_checkpoint(&bytes).map(Some).map_err(|e| self.store_err(e))
    }

    fn finish_checkpoint(&self, pending: faust_storage::PendingCheckpoint) {
        if let Some(store) = self.state.borrow_mut().store.as_mut() {
            store.finish_checkpoint(pending);
        }
    }

    fn compact_store(&self, budget_bytes: usize) -> Result<bool, TableError> {
        let mut state = self.state.borrow_mut();
        let Some(store) = state.store.as_mut() else { return Ok(false) };
        match store.compact_step(budget_bytes) {
            Ok(progress) => Ok(progress == faust_storage::CompactionProgress::Working),
            Err(e) => Err(self.store_err(e)),
        }
    }

    fn evict(&self) {
        let mut state = self.state.borrow_mut();
        if state.store.is_none() {
            return;
        }
        if state.cache.len() > CACHE_MAX_KEYS {
            state.cache.retain(|_, c| c.dirty);
        } else if state.frozen_deletions > 1024 || state.frozen_deletions * 8 > state.cache.len() {
            // A committed deletion is in the store already: its entry only takes room (a
            // windowed table deletes a key for every window that expires).
            state.cache.retain(|_, c| c.dirty || c.value.is_some());
        }
        state.frozen_deletions = 0;
    }

    fn checkpointed_changelog(&self) -> u64 {
        self.checkpointed_changelog.get()
    }

    fn advance_to(&self, changelog_offset: u64) {
        self.checkpointed_changelog.set(changelog_offset);
    }

    fn recovered(&self) {
        if let Some(on_recover) = &self.hooks.on_recover {
            on_recover(self.partition);
        }
    }

    fn replay(&self, records: &[Record], end: u64) -> Result<(), TableError> {
        if let Some(hook) = &self.hooks.on_changelog_event {
            // Decoded for the callback only when there is one (a store takes the bytes).
            for r in records.iter().filter(|r| r.offset < end) {
                let Some(raw_key) = &r.key else { continue };
                let Ok(key) = self.config.key_codec.decode_bytes::<K>(raw_key) else { continue };
                let value = r.value.as_ref().and_then(|v| self.config.value_codec.decode_bytes::<V>(v).ok());
                hook(self.partition, &key, value.as_ref());
            }
        }
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
                    // The store now has the newer value: a cached one would shadow it. (A
                    // recovering shard's cache is empty; this keeps any other replay right.)
                    if !state.cache.is_empty()
                        && let Some(raw) = &r.key
                        && let Ok(k) = self.config.key_codec.decode_bytes::<K>(raw)
                    {
                        state.cache.remove(&k);
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
                            state.cache.insert(key, Cached { value: Some(v), dirty: false, run: 0, persisted: true });
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
        self.undos.set(self.undos.get() + 1);
        let mut state = self.state.borrow_mut();
        state.cache.clear();
        state.dirty = 0;
        state.undo.clear();
        state.run_event = None;
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

    fn windowed(&self) -> bool {
        lock(&self.config).windowed
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
            Some(dir) => Some(open_store(&self.name, args.partition, dir, args.segment_bytes)?),
        };
        let checkpointed = store.as_ref().map(|s| decode_meta(&s.last_checkpoint().metadata)).unwrap_or_default();
        Ok(Rc::new(Shard::<K, V> {
            name: self.name.clone(),
            config,
            hooks: lock(&self.hooks).clone(),
            partition: args.partition,
            changelog,
            state: RefCell::new(State {
                cache: Map::default(),
                dirty: 0,
                undo: Vec::new(),
                spare_keys: Vec::new(),
                run: 0,
                run_event: None,
                applied: Vec::new(),
                store,
                stream_time: checkpointed.stream_time,
                frozen_deletions: 0,
                key_scratch: Vec::new(),
            }),
            checkpointed_changelog: std::cell::Cell::new(checkpointed.changelog),
            written_end: std::cell::Cell::new(None),
            instance: NEXT_INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            undos: std::cell::Cell::new(0),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn token(event: u64) -> Token {
        Token { agent: 0, topic: Arc::from("t"), partition: 0, offset: event, timestamp: event as i64 }
    }

    fn ack(shard: &Rc<dyn AnyShard>, event: u64) {
        shard.acked(0, &TopicPartition::new(Arc::from("t"), 0), &[event]);
    }

    fn open(dir: Option<std::path::PathBuf>) -> Rc<dyn AnyShard> {
        let json = || Codec::named("json").expect("the json codec");
        let table = super::super::Table::<String, u64>::new("t", "app", 0, json(), json());
        lock(&table.shared.config).default = Some(Arc::new(|| 0));
        table.shared.open(ShardArgs { partition: 0, dir, segment_bytes: 64 << 20 }).expect("open the shard")
    }

    fn typed(shard: &Rc<dyn AnyShard>) -> &Shard<String, u64> {
        shard.as_any().downcast_ref().expect("a Shard<String, u64>")
    }

    /// Freezes `shard` and returns what the commit would write; with `fail`, gives it back as
    /// a failed commit does.
    fn freeze(shard: &Rc<dyn AnyShard>, fail: bool) -> BTreeMap<String, Option<u64>> {
        let mut set = shard.freeze();
        let (mut changelog, mut batch) = (BatchBuilder::with_capacity(1024), WriteBatch::new());
        while set.encode(64, &mut changelog, &mut batch, 0).expect("encode") > 0 {}
        if fail {
            shard.restore(set);
            return BTreeMap::new();
        }
        shard.write_store(&mut batch).expect("write the store");
        set.into_any().downcast::<Frozen<String, u64>>().expect("frozen").entries.into_iter().collect()
    }

    fn get(shard: &Rc<dyn AnyShard>, key: &str) -> Option<u64> {
        typed(shard).get(&key.to_string()).expect("read")
    }

    #[test]
    fn undo_restores_the_previous_value_and_a_later_writer_keeps_its_own() {
        let shard = open(None);
        let s = typed(&shard);
        s.write(None, "k".into(), Some(5)).expect("write");
        s.update(Some(&token(1)), &"k".into(), |v| *v += 1).expect("A");
        s.update(Some(&token(1)), &"k".into(), |v| *v += 1).expect("A again");
        assert_eq!(s.state.borrow().undo.len(), 1, "one undo entry per event and key");
        s.update(Some(&token(2)), &"k".into(), |v| *v += 10).expect("B on top of A");
        assert_eq!(get(&shard, "k"), Some(17), "reads see writes in flight");
        // A fails: B built on A's value, and keeps it; undoing B now goes back before A.
        shard.undo(&|t| *t == token(1));
        assert_eq!(get(&shard, "k"), Some(17));
        shard.undo(&|t| *t == token(2));
        assert_eq!(get(&shard, "k"), Some(5));
        assert!(s.state.borrow().undo.is_empty());
    }

    #[test]
    fn keys_of_acked_undo_entries_are_reused_and_undo_still_restores_each_key() {
        let shard = open(None);
        let s = typed(&shard);
        for (event, key) in [(1, "a-long-key-of-account-1"), (2, "b")] {
            s.update(Some(&token(event)), &key.to_string(), |v| *v += 1).expect("write");
        }
        ack(&shard, 1);
        ack(&shard, 2);
        assert_eq!(s.state.borrow().spare_keys.len(), 2, "the acked entries' keys are kept");
        // New events take the spare keys (a short key into a long one's memory, and back).
        s.update(Some(&token(3)), &"c".to_string(), |v| *v += 5).expect("write c");
        s.update(Some(&token(4)), &"a-long-key-of-account-1".to_string(), |v| *v += 5).expect("write a");
        assert!(s.state.borrow().spare_keys.is_empty());
        shard.undo(&|t| t.offset >= 3);
        assert_eq!((get(&shard, "a-long-key-of-account-1"), get(&shard, "b")), (Some(1), Some(1)));
        assert_eq!(get(&shard, "c"), None, "c had no value, and has none again");
        assert!(s.state.borrow().undo.is_empty());
    }

    #[test]
    fn a_write_outside_events_stands_when_an_event_before_it_is_undone() {
        let shard = open(None);
        let s = typed(&shard);
        s.write(Some(&token(1)), "k".into(), Some(1)).expect("A");
        s.write(None, "k".into(), Some(9)).expect("a timer");
        s.write(Some(&token(1)), "k".into(), Some(2)).expect("A again");
        shard.undo(&|t| *t == token(1));
        assert_eq!(get(&shard, "k"), Some(9));
    }

    #[test]
    fn a_freeze_takes_what_acked_events_left_and_keeps_writes_in_flight_dirty() {
        let shard = open(None);
        let s = typed(&shard);
        s.write(None, "k".into(), Some(5)).expect("write");
        s.write(Some(&token(1)), "k".into(), Some(6)).expect("A");
        s.write(Some(&token(1)), "j".into(), Some(1)).expect("A");
        assert_eq!(freeze(&shard, false), BTreeMap::from([("k".to_string(), Some(5))]));
        assert!(shard.is_dirty(), "A's writes are not committed");
        ack(&shard, 1);
        let second = freeze(&shard, false);
        assert_eq!(second, BTreeMap::from([("k".to_string(), Some(6)), ("j".to_string(), Some(1))]));
        assert!(!shard.is_dirty());
    }

    #[test]
    fn a_key_deleted_before_any_commit_leaves_no_entry_and_no_tombstone() {
        for dir in [None, Some(tempfile::tempdir().expect("a temporary directory"))] {
            let shard = open(dir.as_ref().map(|d| d.path().join("shard")));
            let s = typed(&shard);
            s.write(None, "gone".into(), Some(1)).expect("write");
            s.write(Some(&token(1)), "brief".into(), Some(2)).expect("A");
            s.write(Some(&token(1)), "brief".into(), None).expect("A deletes it");
            s.write(None, "gone".into(), None).expect("delete");
            assert!(s.state.borrow().cache.is_empty(), "nothing was persisted: nothing to keep");
            assert_eq!(s.state.borrow().dirty, 0);
            ack(&shard, 1);
            assert_eq!(freeze(&shard, false), BTreeMap::new(), "no tombstone for what no commit saw");
            // Once committed, a deletion is a tombstone.
            s.write(None, "kept".into(), Some(3)).expect("write");
            assert_eq!(freeze(&shard, false), BTreeMap::from([("kept".to_string(), Some(3))]));
            s.write(None, "kept".into(), None).expect("delete");
            assert_eq!(freeze(&shard, false), BTreeMap::from([("kept".to_string(), None)]));
            assert_eq!(get(&shard, "kept"), None);
        }
    }

    #[test]
    fn a_deletion_in_flight_across_a_freeze_follows_the_acked_value_to_the_changelog() {
        let shard = open(None);
        let s = typed(&shard);
        s.write(Some(&token(1)), "k".into(), Some(1)).expect("A");
        ack(&shard, 1);
        s.write(Some(&token(2)), "k".into(), None).expect("B deletes it, never committed");
        assert_eq!(get(&shard, "k"), None);
        // The commit takes A's value; B's deletion must then reach the changelog too.
        assert_eq!(freeze(&shard, false), BTreeMap::from([("k".to_string(), Some(1))]));
        ack(&shard, 2);
        assert_eq!(freeze(&shard, false), BTreeMap::from([("k".to_string(), None)]));

        // The same, with the deleting event undone: A's value is back, and stays committed.
        s.write(Some(&token(3)), "j".into(), Some(7)).expect("C");
        ack(&shard, 3);
        s.write(Some(&token(3)), "j".into(), None).expect("C again, in flight");
        assert_eq!(freeze(&shard, false), BTreeMap::from([("j".to_string(), Some(7))]));
        shard.undo(&|t| *t == token(3));
        assert_eq!(get(&shard, "j"), Some(7));
    }

    #[test]
    fn undoing_a_later_event_after_a_freeze_keeps_the_key_persisted() {
        let shard = open(None);
        let s = typed(&shard);
        s.write(Some(&token(1)), "k".into(), Some(1)).expect("A");
        ack(&shard, 1);
        s.write(Some(&token(2)), "k".into(), Some(2)).expect("B");
        s.write(Some(&token(3)), "k".into(), None).expect("C deletes it");
        assert_eq!(freeze(&shard, false), BTreeMap::from([("k".to_string(), Some(1))]));
        // C fails: the key is back at B's value, which the changelog does not have, over A's,
        // which it does: a later deletion of it must be written.
        shard.undo(&|t| *t == token(3));
        assert_eq!(get(&shard, "k"), Some(2));
        ack(&shard, 2);
        s.write(Some(&token(4)), "k".into(), None).expect("D deletes it");
        ack(&shard, 4);
        assert_eq!(freeze(&shard, false), BTreeMap::from([("k".to_string(), None)]));
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// An event (or, with `None`, a write outside events) sets a key.
        Write(Option<u64>, u8, Option<u64>),
        /// An event adds one to a key (from the default when absent).
        Update(u64, u8),
        Ack(u64),
        Undo(u64),
        /// A commit's freeze; `true`: the commit fails and gives the entries back.
        Freeze(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        let event = 0u64..4;
        let key = 0u8..6;
        prop_oneof![
            4 => (proptest::option::of(event.clone()), key.clone(), proptest::option::weighted(0.8, 0u64..100))
                .prop_map(|(e, k, v)| Op::Write(e, k, v)),
            4 => (event.clone(), key).prop_map(|(e, k)| Op::Update(e, k)),
            2 => event.clone().prop_map(Op::Ack),
            1 => event.prop_map(Op::Undo),
            1 => any::<bool>().prop_map(Op::Freeze),
        ]
    }

    /// The shard against a model: events in flight each write keys no other event in flight
    /// wrote (the case with no conflicts, where the result is fully defined); every read sees
    /// the acked state with the writes in flight over it; an ack keeps an event's writes, an
    /// undo forgets them; a successful commit brings the committed state to the acked one.
    fn check(ops: Vec<Op>, dir: Option<std::path::PathBuf>) -> Result<(), TestCaseError> {
        let shard = open(dir);
        let s = typed(&shard);
        let mut acked: BTreeMap<String, Option<u64>> = BTreeMap::new();
        let mut in_flight: BTreeMap<u64, BTreeMap<String, Option<u64>>> = BTreeMap::new();
        let mut committed: BTreeMap<String, Option<u64>> = BTreeMap::new();
        let view = |acked: &BTreeMap<String, Option<u64>>,
                    in_flight: &BTreeMap<u64, BTreeMap<String, Option<u64>>>,
                    k: &str| {
            in_flight.values().find_map(|w| w.get(k).copied()).unwrap_or_else(|| acked.get(k).copied().flatten())
        };
        let owner = |in_flight: &BTreeMap<u64, BTreeMap<String, Option<u64>>>, k: &str| {
            in_flight.iter().find(|(_, w)| w.contains_key(k)).map(|(e, _)| *e)
        };
        for op in ops {
            match op {
                Op::Write(event, k, v) => {
                    let k = k.to_string();
                    let owned = owner(&in_flight, &k);
                    if owned.is_some() && owned != event {
                        continue;
                    }
                    s.write(event.map(token).as_ref(), k.clone(), v).expect("write");
                    match event {
                        Some(e) => {
                            in_flight.entry(e).or_default().insert(k, v);
                        }
                        None => {
                            acked.insert(k, v);
                        }
                    }
                }
                Op::Update(e, k) => {
                    let k = k.to_string();
                    let owned = owner(&in_flight, &k);
                    if owned.is_some() && owned != Some(e) {
                        continue;
                    }
                    let new = s.update(Some(&token(e)), &k, |v| *v += 1).expect("update");
                    let expected = view(&acked, &in_flight, &k).unwrap_or(0) + 1;
                    prop_assert_eq!(new, expected);
                    in_flight.entry(e).or_default().insert(k, Some(new));
                }
                Op::Ack(e) => {
                    ack(&shard, e);
                    acked.extend(in_flight.remove(&e).unwrap_or_default());
                }
                Op::Undo(e) => {
                    shard.undo(&|t| *t == token(e));
                    in_flight.remove(&e);
                }
                Op::Freeze(fail) => {
                    let frozen = freeze(&shard, fail);
                    if !fail {
                        committed.extend(frozen);
                        let norm = |m: &BTreeMap<String, Option<u64>>| -> BTreeMap<String, u64> {
                            m.iter().filter_map(|(k, v)| v.map(|v| (k.clone(), v))).collect()
                        };
                        prop_assert_eq!(norm(&committed), norm(&acked), "a commit writes exactly the acked state");
                        if in_flight.is_empty() {
                            prop_assert!(!shard.is_dirty(), "nothing left to commit");
                        }
                    }
                }
            }
            for k in 0..6u8 {
                let k = k.to_string();
                prop_assert_eq!(get(&shard, &k), view(&acked, &in_flight, &k), "key {}", k);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn in_memory_shard_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
            check(ops, None)?;
        }

        #[test]
        fn store_backed_shard_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().expect("a temporary directory");
            check(ops, Some(dir.path().join("shard")))?;
        }
    }
}
