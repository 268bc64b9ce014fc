//! The log-structured key-value store that holds one table partition.

use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry as TableEntry;

use crate::BatchBuilder;
use crate::compact::{CompactionJob, Decision, Liveness, Move};
use crate::error::{Error, FormatError, Result};
use crate::files::{read_optional, replace_file};
use crate::format::{RECORD_HEADER_LEN, RawRecord, RawRecords, SEGMENT_HEADER_LEN, read_u16, read_u32, read_u64};
use crate::log::{Appended, Log, LogConfig, OpenMode};

const CHECKPOINT_FILE: &str = "CHECKPOINT";
const CHECKPOINT_MAGIC: &[u8; 8] = b"FAUSTCKP";
const CHECKPOINT_VERSION: u16 = 1;
const TOMBSTONE: u32 = u32::MAX;

/// When a store forces its writes to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncPolicy {
    /// `fdatasync` at every checkpoint: a checkpoint survives a power loss.
    Checkpoint,
    /// `fdatasync` at a checkpoint when the last one is at least this old. A checkpoint
    /// survives a process crash; after a power loss the store may open as damaged, and is
    /// then rebuilt from its changelog.
    Interval(Duration),
    /// Never: leave it to the kernel. Same guarantees as `Interval`, cheaper.
    Never,
}

/// How a store is laid out, synced and compacted.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// Size of the store's segment files (see [`LogConfig::segment_bytes`]).
    pub segment_bytes: u64,
    /// When writes are forced to disk.
    pub sync: SyncPolicy,
    /// A segment is compacted once at least this fraction of its bytes is superseded.
    pub min_dirty_ratio: f64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { segment_bytes: 64 << 20, sync: SyncPolicy::Checkpoint, min_dirty_ratio: 0.5 }
    }
}

/// The state a store opened at: what the caller recorded with its last checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Checkpoints taken so far in this store's life (0: none yet).
    pub sequence: u64,
    /// The store's log position the checkpoint covers (its own offsets, not the changelog's).
    pub position: u64,
    /// Live keys at the checkpoint.
    pub live_keys: u64,
    /// The caller's metadata: changelog offset, source offsets, stream time.
    pub metadata: Bytes,
}

impl Checkpoint {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(48 + self.metadata.len());
        b.extend_from_slice(CHECKPOINT_MAGIC);
        b.extend_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
        b.extend_from_slice(&[0u8; 6]);
        b.extend_from_slice(&self.sequence.to_le_bytes());
        b.extend_from_slice(&self.position.to_le_bytes());
        b.extend_from_slice(&self.live_keys.to_le_bytes());
        b.extend_from_slice(&(self.metadata.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.metadata);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> std::result::Result<Checkpoint, FormatError> {
        const FIXED: usize = 44;
        if b.len() < FIXED + 4 {
            return Err(FormatError::ShortHeader { len: b.len() });
        }
        if &b[0..8] != CHECKPOINT_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let body = &b[..b.len() - 4];
        let stored = read_u32(b, b.len() - 4);
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(FormatError::HeaderChecksum { stored, computed });
        }
        let version = read_u16(b, 8);
        if version != CHECKPOINT_VERSION {
            return Err(FormatError::UnsupportedVersion { found: version, supported: CHECKPOINT_VERSION });
        }
        let len = read_u32(b, 40) as usize;
        if FIXED + len != body.len() {
            return Err(FormatError::Truncated { needed: FIXED + len, available: body.len() });
        }
        Ok(Checkpoint {
            sequence: read_u64(b, 16),
            position: read_u64(b, 24),
            live_keys: read_u64(b, 32),
            metadata: Bytes::copy_from_slice(&body[FIXED..]),
        })
    }
}

/// A checkpoint taken by [`Store::prepare_checkpoint`] whose file is not written yet.
#[derive(Debug)]
pub struct PendingCheckpoint {
    path: PathBuf,
    bytes: Vec<u8>,
    durable: bool,
    next: Checkpoint,
}

impl PendingCheckpoint {
    /// Replaces the store's checkpoint file (atomically: a crash leaves the old one or this
    /// one). Blocking file I/O, with `fsync` under [`SyncPolicy::Checkpoint`].
    pub fn write(&self) -> Result<()> {
        replace_file(&self.path, &self.bytes, self.durable)
    }

    /// The checkpoint it holds.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.next
    }
}

/// A batch of puts and deletes, written to the store as one append.
///
/// ```
/// use faust_storage::{Store, StoreConfig, WriteBatch};
///
/// let dir = tempfile::tempdir()?;
/// let mut store = Store::open(dir.path(), StoreConfig::default())?;
/// let mut batch = WriteBatch::new();
/// batch.put(b"a", b"1");
/// batch.put(b"b", b"2");
/// batch.delete(b"a");
/// store.write(&mut batch)?;
/// assert_eq!(store.get(b"a"), None);
/// assert_eq!(store.get(b"b").as_deref(), Some(&b"2"[..]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    inner: BatchBuilder,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        WriteBatch { inner: BatchBuilder::new() }
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.inner.push(0, Some(key), Some(value), &[]);
    }

    /// Removes `key`.
    pub fn delete(&mut self, key: &[u8]) {
        self.inner.push(0, Some(key), None, &[]);
    }

    /// Operations in the batch.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// Removes every operation, keeping the allocation.
    pub fn clear(&mut self) {
        self.inner.clear();
    }
}

/// Where a key's latest record is: segment id, record position, lengths. 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    hash: u64,
    segment: u32,
    position: u32,
    key_len: u32,
    /// `TOMBSTONE` for a deleted key whose older records may still be on disk.
    value_len: u32,
}

impl Entry {
    fn record_size(&self) -> u64 {
        let value = if self.value_len == TOMBSTONE { 0 } else { self.value_len };
        (RECORD_HEADER_LEN as u32 + self.key_len + value) as u64
    }

    fn is_tombstone(&self) -> bool {
        self.value_len == TOMBSTONE
    }
}

/// The bytes of segment `id` from `log`, or an empty slice (never happens for ids taken
/// from the index, whose segments stay mapped until no entry refers to them).
#[inline]
fn segment_data(log: &Log, id: u32) -> &[u8] {
    log.map_of(id).map(|b| &b[..]).unwrap_or_default()
}

#[inline]
fn key_of<'a>(log: &'a Log, e: &Entry) -> &'a [u8] {
    let start = e.position as usize + RECORD_HEADER_LEN;
    segment_data(log, e.segment).get(start..start + e.key_len as usize).unwrap_or_default()
}

/// Progress of an incremental compaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactionProgress {
    /// Nothing needs compacting.
    Idle,
    /// A compaction is under way; call again.
    Working,
}

/// Counters describing a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Keys with a value.
    pub live_keys: u64,
    /// Deleted keys still remembered because their older records are on disk.
    pub tombstones: u64,
    /// Segment files.
    pub segments: usize,
    /// Bytes of data in the segment files.
    pub bytes_on_disk: u64,
    /// Bytes of the records the index points to.
    pub live_bytes: u64,
}

struct StoreCompaction {
    job: Option<CompactionJob>,
    /// After install: index moves still to apply, and the retired segments they leave.
    moves: Vec<Move>,
    next_move: usize,
    removals: Vec<(u64, u32, u32)>,
    retired: Vec<u32>,
    /// The segment the job writes: where moved entries point.
    output: u32,
    /// By segment id: records below this position are covered by the checkpoint the job was
    /// planned under. A record superseded by one of those can go.
    settled: Vec<u32>,
    prefix: bool,
}

/// Liveness for the store's own compaction: a record is live when the index points at it.
/// A superseded record is dropped only if what supersedes it is covered by the last
/// checkpoint — otherwise a crash would reopen the store at that checkpoint and need
/// the old record. A tombstone the index points at is dropped when the group starts at the
/// head of the log (nothing older can be behind it); its index entry goes with it.
struct StoreLiveness<'a> {
    index: &'a HashTable<Entry>,
    hasher: &'a foldhash::fast::RandomState,
    log: &'a Log,
    settled: &'a [u32],
    prefix: bool,
    removals: &'a mut Vec<(u64, u32, u32)>,
}

impl Liveness for StoreLiveness<'_> {
    fn decide(&mut self, segment: u32, position: u32, r: &RawRecord, batch: &[u8], _offset: u64) -> Decision {
        let Some((p, l)) = r.key else { return Decision::Drop };
        let key = &batch[p as usize..(p + l) as usize];
        let hash = self.hasher.hash_one(key);
        let log = self.log;
        let Some(e) = self.index.find(hash, |e| e.hash == hash && key_of(log, e) == key) else {
            // No entry: never written, or deleted and its tombstone already compacted away.
            return Decision::Drop;
        };
        if e.segment == segment && e.position == position {
            if e.is_tombstone() && self.prefix {
                self.removals.push((hash, segment, position));
                return Decision::Drop;
            }
            return Decision::Keep { tag: hash };
        }
        if e.position < self.settled.get(e.segment as usize).copied().unwrap_or(0) {
            Decision::Drop
        } else {
            Decision::Keep { tag: hash }
        }
    }
}

/// A log-structured key-value store holding one table partition.
///
/// Puts and deletes are appended to segment files (the storage crate's [`Log`]); an in-memory
/// index maps each key to its latest record, and [`Store::get`] returns a zero-copy slice of
/// the mapped file.
///
/// **Checkpoints define state.** [`Store::checkpoint`] atomically records the store's position
/// and the caller's metadata (changelog offset, source offsets, stream time). Opening a store
/// gives exactly the state of its last checkpoint and that checkpoint's metadata: writes after
/// it are cut, because the events behind them were never committed and will be processed
/// again. Damage to data the checkpoint covers is reported as [`Error::Corruption`] or
/// [`Error::Inconsistent`] (see [`Error::is_corruption`]), and the caller rebuilds the shard.
///
/// ```
/// use faust_storage::{Store, StoreConfig};
///
/// let dir = tempfile::tempdir()?;
/// {
///     let mut store = Store::open(dir.path(), StoreConfig::default())?;
///     store.put(b"alice", b"3")?;
///     store.checkpoint(b"source offset 10")?;
///     store.put(b"bob", b"1")?; // after the checkpoint: cut on reopen
/// }
/// let store = Store::open(dir.path(), StoreConfig::default())?;
/// assert_eq!(store.get(b"alice").as_deref(), Some(&b"3"[..]));
/// assert_eq!(store.get(b"bob"), None);
/// assert_eq!(&store.last_checkpoint().metadata[..], b"source offset 10");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Store {
    dir: PathBuf,
    config: StoreConfig,
    log: Log,
    index: HashTable<Entry>,
    hasher: foldhash::fast::RandomState,
    /// Bytes of records the index points to, by segment id.
    live: Vec<u64>,
    live_keys: u64,
    tombstones: u64,
    checkpoint: Checkpoint,
    last_sync: Instant,
    scratch: WriteBatch,
    compaction: Option<StoreCompaction>,
    /// Compaction outputs made under the current checkpoint: compacting them again before the
    /// checkpoint moves would keep the same records.
    fresh_outputs: Vec<u32>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("live_keys", &self.live_keys)
            .field("checkpoint", &self.checkpoint.sequence)
            .finish()
    }
}

impl Store {
    /// Opens the store in `dir` (creating it if needed) at its last checkpoint.
    pub fn open(dir: impl AsRef<Path>, config: StoreConfig) -> Result<Store> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
        let log_config = LogConfig { segment_bytes: config.segment_bytes, ..LogConfig::default() };
        log_config.validate()?;
        if !(0.0..=1.0).contains(&config.min_dirty_ratio) {
            return Err(Error::Config(format!("min_dirty_ratio {} is outside 0..=1", config.min_dirty_ratio)));
        }
        // Take the lock before reading the checkpoint, so no other handle writes it meanwhile.
        let lock = crate::files::DirLock::acquire(&dir)?;
        let ckpt_path = dir.join(CHECKPOINT_FILE);
        let checkpoint = match read_optional(&ckpt_path)? {
            None => Checkpoint::default(),
            Some(b) => Checkpoint::decode(&b).map_err(|reason| Error::Corruption {
                path: ckpt_path.clone(),
                position: 0,
                reason,
            })?,
        };
        let log = Log::open_with(&dir, log_config, OpenMode::Checkpoint(checkpoint.position), false)?;
        let mut store = Store {
            dir,
            config,
            log,
            index: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            live: Vec::new(),
            live_keys: 0,
            tombstones: 0,
            checkpoint,
            last_sync: Instant::now(),
            scratch: WriteBatch::new(),
            compaction: None,
            fresh_outputs: Vec::new(),
        };
        store.log.attach_lock(lock);
        store.rebuild_index()?;
        Ok(store)
    }

    fn rebuild_index(&mut self) -> Result<()> {
        // The checkpoint's count is only a hint (it is checked below): every live key takes at
        // least a record header on disk, so a damaged count cannot ask for a huge table.
        let hint = self.checkpoint.live_keys.min(self.log.size_bytes() / RECORD_HEADER_LEN as u64);
        self.index.reserve(hint as usize, |e| e.hash);
        let segments: Vec<(u32, u64)> = self.log.segments().iter().map(|s| (s.id, s.len)).collect();
        for (id, len) in segments {
            let map = self.log.map_of(id).cloned().unwrap_or_default();
            let mut pos = SEGMENT_HEADER_LEN;
            while pos < len as usize {
                // The open verified every batch below `len`; stop rather than panic if not.
                let Some(len_field) = map.get(pos..pos + 4).map(|_| read_u32(&map, pos) as usize) else { break };
                let Some(batch) = map.get(pos..pos + len_field).filter(|_| len_field > 0) else { break };
                for r in RawRecords::new(batch) {
                    self.index_record(id, pos as u32, batch, &r);
                }
                pos += len_field;
            }
        }
        if self.live_keys != self.checkpoint.live_keys {
            return Err(Error::Inconsistent {
                path: self.dir.clone(),
                detail: format!(
                    "the checkpoint counts {} live keys but the data holds {}",
                    self.checkpoint.live_keys, self.live_keys
                ),
            });
        }
        Ok(())
    }

    /// Points the index at one record (of a batch at `batch_pos` in segment `segment`).
    #[inline]
    fn index_record(&mut self, segment: u32, batch_pos: u32, batch: &[u8], r: &RawRecord) {
        let Some((kp, kl)) = r.key else { return };
        let key = &batch[kp as usize..(kp + kl) as usize];
        let hash = self.hasher.hash_one(key);
        let new = Entry {
            hash,
            segment,
            position: batch_pos + r.start,
            key_len: kl,
            value_len: r.value.map(|(_, l)| l).unwrap_or(TOMBSTONE),
        };
        let log = &self.log;
        let live = &mut self.live;
        let bump = |live: &mut Vec<u64>, seg: u32, delta: i64| {
            let i = seg as usize;
            if live.len() <= i {
                live.resize(i + 1, 0);
            }
            live[i] = live[i].saturating_add_signed(delta);
        };
        match self.index.entry(hash, |e| e.hash == hash && key_of(log, e) == key, |e| e.hash) {
            TableEntry::Occupied(mut o) => {
                let old = *o.get();
                bump(live, old.segment, -(old.record_size() as i64));
                bump(live, segment, new.record_size() as i64);
                match (old.is_tombstone(), new.is_tombstone()) {
                    (false, true) => {
                        self.live_keys -= 1;
                        self.tombstones += 1;
                    }
                    (true, false) => {
                        self.live_keys += 1;
                        self.tombstones -= 1;
                    }
                    _ => {}
                }
                *o.get_mut() = new;
            }
            TableEntry::Vacant(v) => {
                // A delete of a key with no record needs no tombstone: nothing older is on disk.
                if !new.is_tombstone() {
                    bump(live, segment, new.record_size() as i64);
                    v.insert(new);
                    self.live_keys += 1;
                }
            }
        }
    }

    /// Applies a batch of puts and deletes with one append, and clears it. The writes are
    /// visible at once, and part of the state from the next checkpoint on.
    pub fn write(&mut self, batch: &mut WriteBatch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // A batch larger than a segment goes in pieces: a store's state is what its
        // checkpoint says, so a failure half way loses nothing that a retry does not write.
        if let Some(pieces) = self.log.pieces_of(&batch.inner) {
            for mut piece in pieces {
                let appended = self.log.append_keep(&mut piece)?;
                self.index_appended(appended, &piece);
            }
            batch.clear();
            return Ok(());
        }
        let appended = self.log.append_keep(&mut batch.inner)?;
        self.index_appended(appended, &batch.inner);
        batch.clear();
        Ok(())
    }

    fn index_appended(&mut self, appended: Appended, builder: &BatchBuilder) {
        let map = match self.log.map_of(appended.segment) {
            Some(m) => m.clone(),
            None => return,
        };
        let pos = appended.position as usize;
        let len = builder.encoded_len();
        let batch = &map[pos..pos + len];
        for r in builder.raw_records() {
            self.index_record(appended.segment, appended.position, batch, &r);
        }
    }

    /// Sets `key` to `value` (one append; use [`Store::write`] with a [`WriteBatch`] to write
    /// many at once).
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let mut batch = std::mem::take(&mut self.scratch);
        batch.put(key, value);
        let result = self.write(&mut batch);
        batch.clear();
        self.scratch = batch;
        result
    }

    /// Removes `key`.
    pub fn delete(&mut self, key: &[u8]) -> Result<()> {
        let mut batch = std::mem::take(&mut self.scratch);
        batch.delete(key);
        let result = self.write(&mut batch);
        batch.clear();
        self.scratch = batch;
        result
    }

    #[inline]
    fn find(&self, key: &[u8]) -> Option<&Entry> {
        let hash = self.hasher.hash_one(key);
        let log = &self.log;
        self.index.find(hash, |e| e.hash == hash && key_of(log, e) == key).filter(|e| !e.is_tombstone())
    }

    /// The value of `key`, borrowed from the mapped segment.
    #[inline]
    pub fn get_ref(&self, key: &[u8]) -> Option<&[u8]> {
        let e = self.find(key)?;
        let start = e.position as usize + RECORD_HEADER_LEN + e.key_len as usize;
        segment_data(&self.log, e.segment).get(start..start + e.value_len as usize)
    }

    /// The value of `key` as a zero-copy `Bytes` slice of the mapped segment (it stays valid
    /// after later writes and compactions).
    #[inline]
    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        let e = self.find(key)?;
        let start = e.position as usize + RECORD_HEADER_LEN + e.key_len as usize;
        let map = self.log.map_of(e.segment)?;
        (start + e.value_len as usize <= map.len()).then(|| map.slice(start..start + e.value_len as usize))
    }

    /// Whether `key` has a value.
    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.find(key).is_some()
    }

    /// Number of keys with a value.
    pub fn len(&self) -> usize {
        self.live_keys as usize
    }

    /// Whether no key has a value.
    pub fn is_empty(&self) -> bool {
        self.live_keys == 0
    }

    /// Every key and value, in no particular order, as zero-copy slices.
    pub fn iter(&self) -> impl Iterator<Item = (Bytes, Bytes)> + '_ {
        self.index.iter().filter(|e| !e.is_tombstone()).filter_map(|e| {
            let map = self.log.map_of(e.segment)?;
            let k = e.position as usize + RECORD_HEADER_LEN;
            let v = k + e.key_len as usize;
            let end = v + e.value_len as usize;
            (end <= map.len()).then(|| (map.slice(k..v), map.slice(v..end)))
        })
    }

    /// Records the current state as the one to open at, with the caller's `metadata`, atomically.
    /// With [`SyncPolicy::Checkpoint`] the data and the checkpoint are on disk when it returns.
    pub fn checkpoint(&mut self, metadata: &[u8]) -> Result<()> {
        let pending = self.prepare_checkpoint(metadata)?;
        pending.write()?;
        self.finish_checkpoint(pending);
        Ok(())
    }

    /// [`Store::checkpoint`] in three steps, so that an owner that must not block (a core
    /// of the engine) can write the file on another thread: this step takes the state (and,
    /// with [`SyncPolicy::Checkpoint`], syncs the data); [`PendingCheckpoint::write`] replaces
    /// the file (it is `Send`: run it anywhere); [`Store::finish_checkpoint`] makes it the
    /// store's checkpoint. Writes may go on in between: they are past the checkpoint. A
    /// pending checkpoint that is dropped, or whose write fails, leaves the last one in force.
    ///
    /// ```
    /// use faust_storage::{Store, StoreConfig};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let mut store = Store::open(dir.path(), StoreConfig::default())?;
    /// store.put(b"k", b"v")?;
    /// let pending = store.prepare_checkpoint(b"offsets")?;
    /// std::thread::spawn(move || pending.write().map(|()| pending)).join().unwrap().map(|p| store.finish_checkpoint(p))?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn prepare_checkpoint(&mut self, metadata: &[u8]) -> Result<PendingCheckpoint> {
        let durable = match self.config.sync {
            SyncPolicy::Checkpoint => true,
            SyncPolicy::Interval(d) => self.last_sync.elapsed() >= d,
            SyncPolicy::Never => false,
        };
        if durable {
            self.log.sync_data()?;
            self.last_sync = Instant::now();
        }
        let next = Checkpoint {
            // Saturates: only a damaged or forged checkpoint file holds u64::MAX.
            sequence: self.checkpoint.sequence.saturating_add(1),
            position: self.log.high_watermark(),
            live_keys: self.live_keys,
            metadata: Bytes::copy_from_slice(metadata),
        };
        Ok(PendingCheckpoint { path: self.dir.join(CHECKPOINT_FILE), bytes: next.encode(), durable, next })
    }

    /// Makes a written checkpoint ([`Store::prepare_checkpoint`]) the store's last one. One
    /// older than the store's last checkpoint is ignored.
    pub fn finish_checkpoint(&mut self, pending: PendingCheckpoint) {
        let next = pending.next;
        if next.sequence <= self.checkpoint.sequence {
            return;
        }
        if next.position != self.checkpoint.position {
            self.fresh_outputs.clear();
        }
        self.checkpoint = next;
    }

    /// The last checkpoint: the one the store opened at, or the latest taken since.
    pub fn last_checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// Forces everything written so far to disk, whatever the sync policy.
    pub fn sync(&mut self) -> Result<()> {
        self.log.sync_data()?;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Counters describing the store.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            live_keys: self.live_keys,
            tombstones: self.tombstones,
            segments: self.log.segment_count(),
            bytes_on_disk: self.log.size_bytes(),
            live_bytes: self.live.iter().sum(),
        }
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Does a bounded piece of compaction work: reads about `budget_bytes` of old segments, or
    /// moves about as many index entries, so a caller that interleaves it with its own work is
    /// never stalled for long. Only segments wholly covered by the last checkpoint are
    /// compacted.
    pub fn compact_step(&mut self, budget_bytes: usize) -> Result<CompactionProgress> {
        if self.compaction.is_none() && !self.plan_compaction()? {
            return Ok(CompactionProgress::Idle);
        }
        let Some(c) = self.compaction.as_mut() else { return Ok(CompactionProgress::Idle) };
        if let Some(job) = c.job.as_mut() {
            let mut liveness = StoreLiveness {
                index: &self.index,
                hasher: &self.hasher,
                log: &self.log,
                settled: &c.settled,
                prefix: c.prefix,
                removals: &mut c.removals,
            };
            let copied = match job.step(budget_bytes, &mut liveness) {
                Ok(done) => done,
                Err(e) => {
                    if let Some(job) = c.job.take() {
                        job.abandon(&mut self.log)?;
                    }
                    self.compaction = None;
                    return Err(e);
                }
            };
            if copied {
                let mut job = c.job.take().ok_or_else(|| Error::Config("internal: compaction job vanished".into()))?;
                c.output = job.output_id();
                c.retired = job.install(&mut self.log)?;
                c.moves = job.take_moves();
                self.fresh_outputs.push(c.output);
            }
            return Ok(CompactionProgress::Working);
        }
        // Move index entries from the retired segments to the new one, a budget's worth at a time.
        let per_step = (budget_bytes / 64).max(1024);
        let end = (c.next_move + per_step).min(c.moves.len());
        let target = c.output;
        for m in &c.moves[c.next_move..end] {
            if let Some(e) = self.index.find_mut(m.tag, |e| e.segment == m.old_segment && e.position == m.old_position)
            {
                let size = e.record_size();
                e.segment = target;
                e.position = m.new_position;
                Self::shift_live(&mut self.live, m.old_segment, target, size);
            }
        }
        c.next_move = end;
        if c.next_move < c.moves.len() {
            return Ok(CompactionProgress::Working);
        }
        for &(hash, seg, pos) in &c.removals {
            if let Ok(o) = self.index.find_entry(hash, |e| e.segment == seg && e.position == pos) {
                let (old, _) = o.remove();
                self.tombstones -= 1;
                let i = old.segment as usize;
                self.live[i] = self.live[i].saturating_sub(old.record_size());
            }
        }
        for &id in &c.retired {
            self.log.release(id);
            if let Some(l) = self.live.get_mut(id as usize) {
                *l = 0;
            }
        }
        self.compaction = None;
        Ok(CompactionProgress::Working)
    }

    fn shift_live(live: &mut Vec<u64>, from: u32, to: u32, size: u64) {
        let need = from.max(to) as usize + 1;
        if live.len() < need {
            live.resize(need, 0);
        }
        live[from as usize] = live[from as usize].saturating_sub(size);
        live[to as usize] += size;
    }

    /// Runs compaction until nothing is left to compact.
    pub fn compact(&mut self) -> Result<()> {
        while self.compact_step(usize::MAX)? == CompactionProgress::Working {}
        Ok(())
    }

    /// Chooses the next group of segments to compact. Returns whether a job started.
    fn plan_compaction(&mut self) -> Result<bool> {
        let horizon = self.checkpoint.position;
        let segs = self.log.segments();
        // Sealed segments wholly covered by the checkpoint.
        let eligible = segs.iter().take(segs.len().saturating_sub(1)).take_while(|s| s.next_offset <= horizon).count();
        let seg_bytes = self.config.segment_bytes;
        let live_of = |id: u32| self.live.get(id as usize).copied().unwrap_or(0);
        let dirty = |i: usize| {
            let s = &segs[i];
            let data = s.len.saturating_sub(SEGMENT_HEADER_LEN as u64);
            data > 0 && (data - live_of(s.id).min(data)) as f64 >= self.config.min_dirty_ratio * data as f64
        };
        let small_pair = |i: usize| i + 1 < eligible && segs[i].len + segs[i + 1].len <= seg_bytes;
        let Some(start) =
            (0..eligible).find(|&i| !self.fresh_outputs.contains(&segs[i].id) && (dirty(i) || small_pair(i)))
        else {
            return Ok(false);
        };
        let mut end = start + 1;
        let mut total = segs[start].len;
        let mut live = live_of(segs[start].id);
        while end < eligible && total + segs[end].len <= 2 * seg_bytes && live + live_of(segs[end].id) <= seg_bytes {
            total += segs[end].len;
            live += live_of(segs[end].id);
            end += 1;
        }
        let group: Vec<u32> = segs[start..end].iter().map(|s| s.id).collect();
        let mut settled = vec![0u32; segs.iter().map(|s| s.id as usize + 1).max().unwrap_or(0)];
        for s in segs {
            // The active segment takes more writes while the job runs: only its bytes below
            // the checkpoint are settled, even when all it holds now is covered.
            settled[s.id as usize] = if s.sealed && s.next_offset <= horizon {
                u32::MAX
            } else if s.base_offset < horizon {
                s.position_of(horizon) as u32
            } else {
                0
            };
        }
        let prefix = start == 0;
        let job = CompactionJob::plan(&mut self.log, &group)?;
        self.compaction = Some(StoreCompaction {
            job: Some(job),
            moves: Vec::new(),
            next_move: 0,
            removals: Vec::new(),
            retired: Vec::new(),
            output: 0,
            settled,
            prefix,
        });
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn small() -> StoreConfig {
        StoreConfig { segment_bytes: 4096, ..StoreConfig::default() }
    }

    fn contents(store: &Store) -> BTreeMap<Vec<u8>, Vec<u8>> {
        store.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }

    #[test]
    fn writes_after_the_checkpoint_are_cut_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), small()).unwrap();
            s.put(b"a", b"1").unwrap();
            s.put(b"b", b"2").unwrap();
            s.checkpoint(b"m1").unwrap();
            s.put(b"a", b"changed").unwrap();
            s.delete(b"b").unwrap();
            s.put(b"c", b"3").unwrap();
            assert_eq!(s.get(b"a").as_deref(), Some(&b"changed"[..]));
        }
        let mut s = Store::open(dir.path(), small()).unwrap();
        let expected: BTreeMap<_, _> = [(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())].into();
        assert_eq!(contents(&s), expected);
        assert_eq!(&s.last_checkpoint().metadata[..], b"m1");
        assert_eq!(s.last_checkpoint().sequence, 1);
        // The cut tail never comes back, even after new writes.
        s.put(b"z", b"9").unwrap();
        s.checkpoint(b"m2").unwrap();
        drop(s);
        let s = Store::open(dir.path(), small()).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.get(b"c"), None);
    }

    #[test]
    fn never_checkpointed_store_opens_empty() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), small()).unwrap();
            s.put(b"a", b"1").unwrap();
        }
        let s = Store::open(dir.path(), small()).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.last_checkpoint(), &Checkpoint::default());
    }

    #[test]
    fn compaction_reclaims_space_and_keeps_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), small()).unwrap();
        let mut model = BTreeMap::new();
        let mut batch = WriteBatch::new();
        for round in 0..40u32 {
            for k in 0..20u32 {
                let key = format!("key-{k}");
                if (k + round) % 7 == 0 {
                    batch.delete(key.as_bytes());
                    model.remove(key.as_bytes());
                } else {
                    let v = format!("v{round}-{k}");
                    batch.put(key.as_bytes(), v.as_bytes());
                    model.insert(key.into_bytes(), v.into_bytes());
                }
            }
            s.write(&mut batch).unwrap();
        }
        s.checkpoint(b"x").unwrap();
        let before = s.stats();
        s.compact().unwrap();
        let after = s.stats();
        assert!(after.bytes_on_disk < before.bytes_on_disk / 2, "{before:?} -> {after:?}");
        assert_eq!(contents(&s), model);
        // Writes after the checkpoint survive in memory; compaction never loses the checkpointed state.
        s.put(b"key-1", b"late").unwrap();
        s.compact().unwrap();
        drop(s);
        let s = Store::open(dir.path(), small()).unwrap();
        assert_eq!(contents(&s), model);
    }

    #[test]
    fn compaction_after_checkpoint_keeps_the_checkpointed_value() {
        // k is written in an old segment, checkpointed, then overwritten: the old record is
        // still the checkpointed value and must survive compaction.
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), small()).unwrap();
            s.put(b"k", b"checkpointed").unwrap();
            let filler = vec![7u8; 900];
            for i in 0..20u32 {
                s.put(format!("f{}", i % 3).as_bytes(), &filler).unwrap();
            }
            s.checkpoint(b"c").unwrap();
            s.put(b"k", b"after").unwrap();
            s.delete(b"f0").unwrap();
            for _ in 0..5 {
                s.compact().unwrap();
            }
            assert_eq!(s.get(b"k").as_deref(), Some(&b"after"[..]));
        }
        let s = Store::open(dir.path(), small()).unwrap();
        assert_eq!(s.get(b"k").as_deref(), Some(&b"checkpointed"[..]));
        assert_eq!(s.get(b"f0").as_deref(), Some(&vec![7u8; 900][..]));
    }

    #[test]
    fn a_write_batch_larger_than_a_segment_is_written_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { segment_bytes: 4096, ..StoreConfig::default() };
        let mut store = Store::open(dir.path(), config.clone()).unwrap();
        let mut batch = WriteBatch::new();
        for i in 0..500u32 {
            batch.put(format!("key-{i}").as_bytes(), format!("value-{i}").as_bytes());
        }
        store.write(&mut batch).unwrap();
        assert!(batch.is_empty());
        store.checkpoint(b"").unwrap();
        drop(store);
        let store = Store::open(dir.path(), config).unwrap();
        assert_eq!(store.len(), 500);
        for i in 0..500u32 {
            assert_eq!(store.get_ref(format!("key-{i}").as_bytes()), Some(format!("value-{i}").as_bytes()));
        }
    }

    #[test]
    fn compaction_in_small_steps_interleaved_with_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), small()).unwrap();
        let mut model = BTreeMap::new();
        for i in 0..3000u32 {
            let key = format!("k{}", i % 50);
            let v = format!("value-{i}");
            s.put(key.as_bytes(), v.as_bytes()).unwrap();
            model.insert(key.into_bytes(), v.into_bytes());
            if i % 100 == 0 {
                s.checkpoint(&i.to_le_bytes()).unwrap();
            }
            s.compact_step(512).unwrap();
            if i % 250 == 0 {
                assert_eq!(contents(&s), model);
            }
        }
        s.checkpoint(b"end").unwrap();
        assert_eq!(contents(&s), model);
        s.compact().unwrap();
        assert!(s.stats().bytes_on_disk < 50 * 4096, "{:?}", s.stats());
        drop(s);
        let s = Store::open(dir.path(), small()).unwrap();
        assert_eq!(contents(&s), model);
    }

    #[test]
    fn corrupt_checkpoint_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), small()).unwrap();
            s.put(b"a", b"1").unwrap();
            s.checkpoint(b"m").unwrap();
        }
        let p = dir.path().join(CHECKPOINT_FILE);
        let mut b = std::fs::read(&p).unwrap();
        b[20] ^= 0x40;
        std::fs::write(&p, b).unwrap();
        let err = Store::open(dir.path(), small()).unwrap_err();
        assert!(err.is_corruption(), "{err}");
    }
}
