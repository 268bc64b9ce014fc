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

    pub(super) fn has_pending(&self, token: &Token) -> bool {
        self.state.borrow().pending.iter().any(|(t, _, _)| t == token)
    }

    pub(super) fn get(&self, token: Option<&Token>, key: &K) -> Result<Option<V>, TableError> {
        let mut state = self.state.borrow_mut();
        if let Some(t) = token
            && let Some((_, _, v)) = state.pending.iter().rev().find(|(pt, k, _)| pt == t && k == key)
        {
            return Ok(v.clone());
        }
        self.read_committed(&mut state, key)
    }

    pub(super) fn latest(&self, key: &K) -> Result<Option<V>, TableError> {
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

    pub(super) fn get_or_default(&self, token: Option<&Token>, key: &K) -> Result<V, TableError> {
        match self.get(token, key)? {
            Some(v) => Ok(v),
            None => self.default_value(),
        }
    }

    pub(super) fn update(&self, token: Option<Token>, key: &K, f: impl FnOnce(&mut V)) -> Result<V, TableError> {
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

    pub(super) fn write(&self, token: Option<Token>, key: K, value: Option<V>) -> Result<(), TableError> {
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

    pub(super) fn items(&self, token: Option<&Token>, out: &mut Vec<(K, V)>) -> Result<(), TableError> {
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
