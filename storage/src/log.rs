//! The segment log: an append-only sequence of record batches with dense offsets, split into
//! segment files rolled by size.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

use crate::compact::CleaningPass;
use crate::error::{Error, Result};
use crate::files::{DirLock, remove_file, sync_dir};
use crate::format::{BatchBuilder, BatchHeader, RawRecords, SEGMENT_HEADER_LEN, SegmentHeader, split_header};
use crate::segment::{Scan, ScanEnd, Segment, now_ms, parse_segment_name, segment_file_name};
use crate::store::CompactionProgress;

/// The largest segment size accepted: positions inside a segment are 32-bit, and a
/// compaction may merge two segments into one file.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;
const MIN_SEGMENT_BYTES: u64 = 4096;
const RECOVERY_POINT_FILE: &str = "recovery-point";
/// [`Log::compact_step`] starts a pass once segments not yet compacted hold at least this
/// fraction of the bytes it could compact (Kafka's `min.cleanable.dirty.ratio`).
const MIN_CLEANABLE_RATIO: f64 = 0.5;

/// How a log is laid out and cleaned.
///
/// ```
/// use std::time::Duration;
/// use faust_storage::LogConfig;
///
/// let topic = LogConfig {
///     segment_bytes: 16 << 20,
///     retention: Some(Duration::from_secs(7 * 24 * 3600)),
///     ..LogConfig::default()
/// };
/// let changelog = LogConfig { compact: true, ..LogConfig::default() };
/// # let _ = (topic, changelog);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// A segment is rolled when the next batch would not fit. Also the largest batch.
    /// Disk space is reserved in chunks as data arrives, not all at once.
    pub segment_bytes: u64,
    /// One sparse-index entry per this many bytes of batches.
    pub index_interval_bytes: u64,
    /// Delete the oldest segments while the log is larger than this.
    pub retention_bytes: Option<u64>,
    /// Delete segments whose newest record is older than this.
    pub retention: Option<Duration>,
    /// Keep only the latest record of each key (for changelogs and other compacted topics).
    pub compact: bool,
    /// In a compacted log, how long a tombstone (null value) is kept, so that readers that
    /// saw the key's earlier value also see its deletion.
    pub delete_retention: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 64 << 20,
            index_interval_bytes: 4096,
            retention_bytes: None,
            retention: None,
            compact: false,
            delete_retention: Duration::from_secs(24 * 3600),
        }
    }
}

impl LogConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(Error::Config(format!(
                "segment_bytes {} is outside {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES}",
                self.segment_bytes
            )));
        }
        if self.index_interval_bytes == 0 {
            return Err(Error::Config("index_interval_bytes must be positive".into()));
        }
        Ok(())
    }
}

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the batch's first record.
    pub base_offset: u64,
    /// Offset of the batch's last record.
    pub last_offset: u64,
    pub(crate) segment: u32,
    pub(crate) position: u32,
}

/// One record batch read from a log: a zero-copy view of the mapped segment.
#[derive(Clone)]
pub struct Batch {
    header: BatchHeader,
    bytes: Bytes,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("base_offset", &self.header.base_offset)
            .field("last_offset", &self.last_offset())
            .field("records", &self.header.record_count)
            .finish()
    }
}

impl Batch {
    /// Seals `builder` as a batch whose first record has offset `base_offset`, without
    /// writing it anywhere (for transports that keep batches in memory). The builder is
    /// cleared.
    pub fn from_builder(builder: &mut BatchBuilder, base_offset: u64) -> Batch {
        let bytes = Bytes::copy_from_slice(builder.seal(base_offset));
        builder.clear();
        let header = BatchHeader::peek(&bytes).unwrap_or(BatchHeader {
            len: 0,
            crc: 0,
            base_offset,
            last_offset_delta: 0,
            record_count: 0,
            first_timestamp: 0,
            max_timestamp: 0,
            attributes: 0,
        });
        Batch { header, bytes }
    }

    /// Offset of the first record.
    pub fn base_offset(&self) -> u64 {
        self.header.base_offset
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> u64 {
        self.header.last_offset()
    }

    /// Number of records (fewer than the offset range after compaction).
    pub fn record_count(&self) -> usize {
        self.header.record_count as usize
    }

    /// The largest record timestamp in the batch.
    pub fn max_timestamp(&self) -> i64 {
        self.header.max_timestamp
    }

    /// Size of the batch on disk, header included.
    pub fn size_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The records, in offset order. Keys, values and headers are slices of the segment.
    pub fn records(&self) -> Records<'_> {
        Records { batch: self, raw: RawRecords::new(&self.bytes), from: 0 }
    }

    /// The records whose offset is at least `offset` (a read may start inside a batch).
    pub fn records_from(&self, offset: u64) -> Records<'_> {
        Records { batch: self, raw: RawRecords::new(&self.bytes), from: offset }
    }
}

/// Iterator over a [`Batch`]'s records.
#[derive(Debug)]
pub struct Records<'a> {
    batch: &'a Batch,
    raw: RawRecords<'a>,
    from: u64,
}

impl std::fmt::Debug for RawRecords<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawRecords")
    }
}

impl Iterator for Records<'_> {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        loop {
            let r = self.raw.next()?;
            let offset = self.batch.header.base_offset + u64::from(r.offset_delta);
            if offset < self.from {
                continue;
            }
            let slice = |(p, l): (u32, u32)| self.batch.bytes.slice(p as usize..(p + l) as usize);
            return Some(Record {
                offset,
                timestamp: r.timestamp,
                key: r.key.map(slice),
                value: r.value.map(slice),
                headers: slice(r.headers),
            });
        }
    }
}

/// One record read from a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's offset in its log.
    pub offset: u64,
    /// The record's timestamp (milliseconds, as given when it was appended).
    pub timestamp: i64,
    /// The key, or `None` for a null key.
    pub key: Option<Bytes>,
    /// The value, or `None` for a null value (a tombstone in compacted logs).
    pub value: Option<Bytes>,
    headers: Bytes,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("offset", &self.offset)
            .field("timestamp", &self.timestamp)
            .field("key", &self.key)
            .field("value", &self.value)
            .field("headers", &self.headers().collect::<Vec<_>>())
            .finish()
    }
}

impl Record {
    /// Whether the record has any header (cheaper than looking at [`headers`](Record::headers)).
    pub fn has_headers(&self) -> bool {
        !self.headers.is_empty()
    }

    /// A record without headers, made in memory rather than read from a log (in-memory
    /// channels hand these to streams).
    pub fn new(offset: u64, timestamp: i64, key: Option<Bytes>, value: Option<Bytes>) -> Self {
        Record { offset, timestamp, key, value, headers: Bytes::new() }
    }

    /// A record with headers, made in memory (a transport that decodes another wire format,
    /// such as Kafka's, builds these). The headers are encoded in the storage format, so
    /// [`headers`](Record::headers) reads them back in order, duplicates and null values
    /// included.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use faust_storage::Record;
    ///
    /// let r = Record::with_headers(5, 1_000, None, Some(Bytes::from_static(b"v")), &[(b"a", Some(b"1")), (b"b", None)]);
    /// assert_eq!(r.headers().collect::<Vec<_>>(), vec![(&b"a"[..], Some(&b"1"[..])), (&b"b"[..], None)]);
    /// ```
    pub fn with_headers(
        offset: u64,
        timestamp: i64,
        key: Option<Bytes>,
        value: Option<Bytes>,
        headers: &[(&[u8], Option<&[u8]>)],
    ) -> Self {
        let headers = if headers.is_empty() {
            Bytes::new()
        } else {
            let mut buf = Vec::new();
            crate::format::encode_headers(&mut buf, headers);
            Bytes::from(buf)
        };
        Record { offset, timestamp, key, value, headers }
    }

    /// The record's headers, in the order they were written.
    pub fn headers(&self) -> Headers<'_> {
        Headers { rest: &self.headers }
    }
}

/// Iterator over a [`Record`]'s headers: `(name, value)`, where a `None` value is null.
#[derive(Debug, Clone)]
pub struct Headers<'a> {
    rest: &'a [u8],
}

impl<'a> Headers<'a> {
    /// Headers over an encoded header section.
    pub(crate) fn new(rest: &'a [u8]) -> Self {
        Headers { rest }
    }
}

impl<'a> Iterator for Headers<'a> {
    type Item = (&'a [u8], Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        let (header, rest) = split_header(self.rest)?;
        self.rest = rest;
        Some(header)
    }
}

/// What `enforce_retention` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Segments deleted.
    pub segments_deleted: usize,
    /// Bytes freed.
    pub bytes_deleted: u64,
}

/// What a compaction pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionOutcome {
    /// Segments rewritten.
    pub segments_compacted: usize,
    /// Records kept.
    pub records_kept: u64,
    /// Records removed (superseded values and expired tombstones).
    pub records_removed: u64,
    /// Bytes before and after.
    pub bytes_before: u64,
    /// Bytes after.
    pub bytes_after: u64,
}

/// How an open treats the data past the point it trusts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OpenMode {
    /// A plain log: data below the recovery point must be intact; an invalid batch at or
    /// past it is a torn write and is cut.
    Log,
    /// A store's log: everything below the checkpoint offset must be intact and is checked;
    /// everything from it on is cut.
    Checkpoint(u64),
}

/// An append-only log of record batches in segment files under one directory.
///
/// One handle owns the directory (it takes a lock). Appends go to the active (last) segment
/// with `pwrite`; reads return zero-copy [`Batch`]es of the memory-mapped segments. `sync`
/// makes everything appended so far durable and moves the *recovery point*: on open, damage
/// below it is an error ([`Error::Corruption`]), while an invalid tail past it is a torn write
/// from a crash and is cut.
///
/// ```
/// use faust_storage::{BatchBuilder, Log, LogConfig};
///
/// let dir = tempfile::tempdir()?;
/// let mut log = Log::open(dir.path(), LogConfig::default())?;
/// let mut batch = BatchBuilder::new();
/// batch.push(0, Some(b"k"), Some(b"hello"), &[]);
/// batch.push(0, Some(b"k"), Some(b"world"), &[]);
/// let appended = log.append(&mut batch)?;
/// assert_eq!((appended.base_offset, appended.last_offset), (0, 1));
/// log.sync()?;
///
/// let batches = log.read(1, 1 << 20)?;
/// let values: Vec<_> = batches.iter().flat_map(|b| b.records_from(1)).map(|r| r.value).collect();
/// assert_eq!(values, vec![Some(bytes::Bytes::from_static(b"world"))]);
/// assert_eq!(log.high_watermark(), 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    config: LogConfig,
    _lock: Option<DirLock>,
    /// Sorted by base offset and contiguous: each segment's `next_offset` is the next one's
    /// base. The last one takes appends.
    segments: Vec<Segment>,
    /// Mapping of every live or retired segment by id, for stores that keep positions.
    maps: Vec<Option<Bytes>>,
    free_ids: Vec<u32>,
    /// Offsets below this were made durable by `sync`.
    recovery_point: u64,
    recovery_seq: u64,
    /// The recovery-point file (plain logs only; a store's checkpoint plays that part).
    recovery_file: Option<std::fs::File>,
    /// Directory entries changed since the directory was last synced.
    dir_dirty: bool,
    /// The stepwise compaction under way ([`Log::compact_step`]).
    cleaning: Option<CleaningPass>,
    /// Offsets below this were compacted by the last finished pass (in this process).
    cleaned_end: u64,
    last_compaction: Option<CompactionOutcome>,
}

impl Log {
    /// Opens the log in `dir`, creating the directory and an empty log if needed. A torn tail
    /// left by a crash is cut; damaged data below the recovery point is reported.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Log> {
        Log::open_with(dir.as_ref(), config, OpenMode::Log, true)
    }

    /// Repairs the log in `dir` after its durable data was found damaged (an open or a read
    /// failed with [`Error::Corruption`] or [`Error::Inconsistent`]): rewrites every damaged
    /// segment without its damaged batches, keeping the offsets of everything else, and moves
    /// the damaged originals to `dir/damaged/`. What was lost is in the report. A log with no
    /// damage is left as it is. The log must not be open.
    ///
    /// ```
    /// use faust_storage::{BatchBuilder, Log, LogConfig};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let mut log = Log::open(dir.path(), LogConfig::default())?;
    /// let mut batch = BatchBuilder::new();
    /// batch.push(0, None, Some(b"hello"), &[]);
    /// log.append(&mut batch)?;
    /// log.sync()?;
    /// drop(log);
    /// let report = Log::repair(dir.path(), LogConfig::default())?;
    /// assert!(report.is_clean());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn repair(dir: impl AsRef<Path>, config: LogConfig) -> Result<crate::RepairReport> {
        crate::repair::repair(dir.as_ref(), &config)
    }

    pub(crate) fn open_with(dir: &Path, config: LogConfig, mode: OpenMode, lock: bool) -> Result<Log> {
        config.validate()?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        let lock = if lock { Some(DirLock::acquire(dir)?) } else { None };
        let mut log = Log {
            dir: dir.to_path_buf(),
            config,
            _lock: lock,
            segments: Vec::new(),
            maps: Vec::new(),
            free_ids: Vec::new(),
            recovery_point: 0,
            recovery_seq: 0,
            recovery_file: None,
            dir_dirty: false,
            cleaning: None,
            cleaned_end: 0,
            last_compaction: None,
        };
        if let OpenMode::Log = mode {
            (log.recovery_seq, log.recovery_point) = read_recovery_point(&log.dir)?;
            log.open_recovery_point_file()?;
        }
        log.load(mode)?;
        Ok(log)
    }

    fn load(&mut self, mode: OpenMode) -> Result<()> {
        let (bases, finished_swaps) = tidy_leftovers(&self.dir)?;
        self.dir_dirty |= finished_swaps;

        let trust = match mode {
            OpenMode::Log => self.recovery_point,
            OpenMode::Checkpoint(h) => h,
        };
        let mut covered_until = 0u64;
        let mut expected_next: Option<u64> = None;
        let count = bases.len();
        for (i, base) in bases.into_iter().enumerate() {
            let path = self.dir.join(segment_file_name(base));
            if base < covered_until {
                // Left over from an interrupted compaction swap: the compacted segment before
                // it covers its offsets.
                remove_file(&path)?;
                self.dir_dirty = true;
                continue;
            }
            if let Some(next) = expected_next
                && next != base
            {
                if next >= trust {
                    // The previous segment's unsynced tail was lost in a crash; what follows
                    // it was never durable either.
                    self.delete_files_from(base)?;
                    break;
                }
                return Err(Error::Inconsistent {
                    path: self.dir.clone(),
                    detail: format!("segment {base} follows data ending at offset {next}: offsets are missing"),
                });
            }
            let last = i + 1 == count;
            let id = self.alloc_id();
            let capacity = if last { self.config.segment_bytes } else { 0 };
            let mut seg = match Segment::open(path.clone(), id, capacity, self.config.index_interval_bytes) {
                Ok(s) => s,
                Err(e) if e.is_corruption() && expected_next.unwrap_or(base) >= trust => {
                    // A segment whose header never reached the disk: created just before a crash.
                    self.free_ids.push(id);
                    self.delete_files_from(base)?;
                    break;
                }
                Err(e) => return Err(e),
            };
            // Verify checksums wherever the data may be past the trusted point, and everywhere
            // for a store (its index is rebuilt from the records anyway).
            let verify = matches!(mode, OpenMode::Checkpoint(_)) || last || seg.covered_end >= trust || base >= trust;
            let mut scan = seg.scan(verify);
            if !verify && scan.next_offset > trust {
                // The unchecked headers claim data past the trusted point: a segment sealed after
                // the last sync (its tail may be torn), or a damaged header. Check every batch.
                scan = seg.scan(true);
            }
            self.maps_set(id, seg.map().clone());
            covered_until = seg.covered_end;
            let Scan { end, next_offset, how } = scan;
            if let ScanEnd::Invalid(reason) = how {
                if next_offset < trust {
                    return Err(Error::Corruption { path: seg.path.clone(), position: end, reason });
                }
                tracing::warn!(path = %seg.path.display(), position = end, offset = next_offset, %reason,
                    "cutting a torn write at the end of the log");
                seg.truncate_to(end, next_offset)?;
                self.segments.push(seg);
                self.delete_files_after(base)?;
                break;
            }
            expected_next = Some(seg.next_offset);
            self.segments.push(seg);
        }

        let end = self.segments.last().map(|s| s.next_offset).unwrap_or(0);
        match mode {
            OpenMode::Log => {
                if end < self.recovery_point {
                    return Err(Error::Inconsistent {
                        path: self.dir.clone(),
                        detail: format!(
                            "data ends at offset {end} but offsets up to {} were synced",
                            self.recovery_point
                        ),
                    });
                }
            }
            OpenMode::Checkpoint(h) => {
                if end < h {
                    return Err(Error::Inconsistent {
                        path: self.dir.clone(),
                        detail: format!("data ends at offset {end} but the checkpoint covers offsets up to {h}"),
                    });
                }
                self.cut_at(h)?;
            }
        }
        let n = self.segments.len();
        for seg in self.segments.iter_mut().take(n.saturating_sub(1)) {
            seg.seal()?;
        }
        if self.segments.is_empty() {
            let base = match mode {
                OpenMode::Log => 0,
                OpenMode::Checkpoint(h) => h,
            };
            self.create_segment(base)?;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// Removes everything from offset `h` on (a store's writes after its checkpoint).
    fn cut_at(&mut self, h: u64) -> Result<()> {
        while let Some(last) = self.segments.last() {
            if last.base_offset >= h && !(last.base_offset == h && self.segments.len() == 1) {
                let seg = self.segments.pop().expect("non-empty");
                self.release(seg.id);
                remove_file(&seg.path)?;
                self.dir_dirty = true;
            } else {
                break;
            }
        }
        if let Some(last) = self.segments.last_mut()
            && last.next_offset > h
        {
            let pos = last.position_of(h);
            last.truncate_to(pos, h)?;
        }
        Ok(())
    }

    fn delete_files_from(&mut self, base: u64) -> Result<()> {
        self.delete_files_where(|b| b >= base)
    }

    fn delete_files_after(&mut self, base: u64) -> Result<()> {
        self.delete_files_where(|b| b > base)
    }

    fn delete_files_where(&mut self, doomed: impl Fn(u64) -> bool) -> Result<()> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io("list", &self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", &self.dir, e))?;
            if let Some(base) = entry.file_name().to_str().and_then(|n| parse_segment_name(n, ".log"))
                && doomed(base)
            {
                tracing::warn!(path = %entry.path().display(), "removing a segment written after the last durable point");
                remove_file(&entry.path())?;
                self.dir_dirty = true;
            }
        }
        Ok(())
    }

    fn alloc_id(&mut self) -> u32 {
        if let Some(id) = self.free_ids.pop() {
            return id;
        }
        self.maps.push(None);
        (self.maps.len() - 1) as u32
    }

    fn maps_set(&mut self, id: u32, map: Bytes) {
        self.maps[id as usize] = Some(map);
    }

    /// Forgets a segment id once nothing refers to its positions any more.
    pub(crate) fn release(&mut self, id: u32) {
        if let Some(slot) = self.maps.get_mut(id as usize)
            && slot.take().is_some()
        {
            self.free_ids.push(id);
        }
    }

    /// The mapping of segment `id` (live, or retired by a compaction and not yet released).
    #[inline]
    pub(crate) fn map_of(&self, id: u32) -> Option<&Bytes> {
        self.maps.get(id as usize).and_then(Option::as_ref)
    }

    fn create_segment(&mut self, base: u64) -> Result<()> {
        let id = self.alloc_id();
        let path = self.dir.join(segment_file_name(base));
        let header = SegmentHeader { base_offset: base, covered_end: 0, created_ms: now_ms() };
        let seg = match Segment::create(path, id, header, self.config.segment_bytes, self.config.index_interval_bytes) {
            Ok(s) => s,
            Err(e) => {
                self.free_ids.push(id);
                return Err(e);
            }
        };
        self.maps_set(id, seg.map().clone());
        self.segments.push(seg);
        self.dir_dirty = true;
        Ok(())
    }

    /// The directory this log lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// The offset the next appended record gets (Kafka's high-water mark for a single
    /// replica).
    pub fn high_watermark(&self) -> u64 {
        self.segments.last().map(|s| s.next_offset).unwrap_or(0)
    }

    /// The earliest offset still held (retention moves it forward).
    pub fn earliest_offset(&self) -> u64 {
        self.segments.first().map(|s| s.base_offset).unwrap_or(0)
    }

    /// Bytes of data in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Offsets below this are durable (see [`Log::sync`]).
    pub fn recovery_point(&self) -> u64 {
        self.recovery_point
    }

    /// Appends the batch's records with consecutive offsets and clears the builder. The data
    /// is in the page cache (readable at once) and durable after the next [`Log::sync`].
    ///
    /// A batch larger than a segment holds is written as several batches, each in one
    /// segment (a single record that large is [`Error::BatchTooLarge`]). Such an append is
    /// not atomic: when a later piece fails, the earlier ones stay in the log.
    pub fn append(&mut self, batch: &mut BatchBuilder) -> Result<Appended> {
        if let Some(pieces) = self.pieces_of(batch) {
            let mut appended: Option<Appended> = None;
            for mut piece in pieces {
                let a = self.append_keep(&mut piece)?;
                let first = appended.get_or_insert(a);
                first.last_offset = a.last_offset;
            }
            batch.clear();
            return appended.ok_or_else(|| Error::EmptyBatch { path: self.dir.clone() });
        }
        let appended = self.append_keep(batch)?;
        batch.clear();
        Ok(appended)
    }

    /// A batch of several records larger than a segment holds, cut into batches that fit;
    /// `None` when it fits (or is one record: that one is too large).
    pub(crate) fn pieces_of(&self, batch: &BatchBuilder) -> Option<Vec<BatchBuilder>> {
        let max = (self.config.segment_bytes as usize).saturating_sub(SEGMENT_HEADER_LEN);
        (batch.encoded_len() > max && batch.len() > 1).then(|| batch.split(max)).flatten()
    }

    /// Appends without clearing the builder (the store indexes its records afterwards).
    pub(crate) fn append_keep(&mut self, batch: &mut BatchBuilder) -> Result<Appended> {
        if batch.is_empty() {
            return Err(Error::EmptyBatch { path: self.dir.clone() });
        }
        let size = batch.encoded_len();
        let max = (self.config.segment_bytes as usize).saturating_sub(SEGMENT_HEADER_LEN);
        if size > max {
            return Err(Error::BatchTooLarge { path: self.dir.clone(), size, max });
        }
        let hw = self.high_watermark();
        if hw.checked_add(u64::from(batch.last_offset_delta()) + 1).is_none() {
            // Only a damaged or forged file puts the high-water mark this close to u64::MAX.
            return Err(Error::Inconsistent {
                path: self.dir.clone(),
                detail: format!("offsets are exhausted: the high-water mark is {hw}"),
            });
        }
        let needs_roll = match self.segments.last() {
            Some(active) => active.remaining() < size as u64,
            None => true,
        };
        if needs_roll {
            self.roll()?;
        }
        let base = self.high_watermark();
        let bytes = batch.seal(base);
        let active = self.segments.last_mut().ok_or_else(|| Error::Config("internal: no active segment".into()))?;
        let position = active.append(bytes)?;
        Ok(Appended {
            base_offset: base,
            last_offset: base + u64::from(batch.last_offset_delta()),
            segment: active.id,
            position,
        })
    }

    /// Seals the active segment and starts a new one at the high-water mark.
    pub fn roll(&mut self) -> Result<()> {
        let base = self.high_watermark();
        if let Some(active) = self.segments.last_mut() {
            if active.len == SEGMENT_HEADER_LEN as u64 && active.covered_end == 0 {
                // Nothing written yet: a new segment would have the same name. Replace this one
                // (it may be mapped too small to take the next batch).
                let seg = self.segments.pop().ok_or_else(|| Error::Config("internal: no active segment".into()))?;
                self.release(seg.id);
                remove_file(&seg.path)?;
            } else {
                active.seal()?;
            }
        }
        self.create_segment(base)
    }

    /// Makes everything appended so far durable (`fdatasync` of the written segments and, when
    /// segments were created or removed, of the directory), then moves the recovery point.
    pub fn sync(&mut self) -> Result<()> {
        for seg in &mut self.segments {
            seg.sync()?;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        let hw = self.high_watermark();
        if hw != self.recovery_point {
            self.write_recovery_point(hw)?;
        }
        Ok(())
    }

    /// Syncs the data only, for a store whose checkpoint file records the durable point.
    pub(crate) fn sync_data(&mut self) -> Result<()> {
        for seg in &mut self.segments {
            seg.sync()?;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// Opens the recovery-point file, created at its full size so that a sync never needs new
    /// disk space (a sync on a full disk must still work), and keeps it for `sync`.
    fn open_recovery_point_file(&mut self) -> Result<()> {
        let path = self.dir.join(RECOVERY_POINT_FILE);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        let len = file.metadata().map_err(|e| Error::io("stat", &path, e))?.len();
        if len < 64 {
            file.write_all_at(&[0u8; 64][len as usize..], len).map_err(|e| Error::io("write", &path, e))?;
        }
        self.recovery_file = Some(file);
        Ok(())
    }

    fn write_recovery_point(&mut self, offset: u64) -> Result<()> {
        let seq = self.recovery_seq + 1;
        let mut slot = [0u8; 32];
        slot[0..8].copy_from_slice(&seq.to_le_bytes());
        slot[8..16].copy_from_slice(&offset.to_le_bytes());
        let crc = crc32c::crc32c(&slot[..24]);
        slot[24..28].copy_from_slice(&crc.to_le_bytes());
        if let Some(file) = &self.recovery_file {
            let path = self.dir.join(RECOVERY_POINT_FILE);
            file.write_all_at(&slot, (seq % 2) * 32).map_err(|e| Error::io("write", &path, e))?;
        }
        self.recovery_seq = seq;
        self.recovery_point = offset;
        Ok(())
    }

    /// Reads batches starting with the one that holds `from`, until at least `max_bytes` were
    /// returned (always at least one batch when `from` is below the high-water mark). Reading
    /// at the high-water mark returns nothing. Every batch's checksum is verified.
    pub fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<Batch>> {
        let mut out = Vec::new();
        self.read_into(from, max_bytes, &mut out)?;
        Ok(out)
    }

    /// Like [`Log::read`], appending to `out` (to reuse its allocation).
    pub fn read_into(&self, from: u64, max_bytes: usize, out: &mut Vec<Batch>) -> Result<()> {
        let hw = self.high_watermark();
        let earliest = self.earliest_offset();
        if from > hw || from < earliest {
            return Err(Error::OffsetOutOfRange {
                path: self.dir.clone(),
                requested: from,
                earliest,
                high_watermark: hw,
            });
        }
        let mut i = self.segments.partition_point(|s| s.base_offset <= from).saturating_sub(1);
        let mut bytes = 0usize;
        let mut first = true;
        while let Some(seg) = self.segments.get(i) {
            let mut pos = if first { seg.index_lookup(from) } else { SEGMENT_HEADER_LEN as u64 };
            first = false;
            while let Some(h) = seg.peek_at(pos) {
                if h.last_offset() >= from {
                    if bytes > 0 && bytes + h.len as usize > max_bytes {
                        return Ok(());
                    }
                    let (header, slice) = seg.batch_at(pos)?;
                    bytes += slice.len();
                    out.push(Batch { header, bytes: slice });
                    if bytes >= max_bytes {
                        return Ok(());
                    }
                }
                pos += u64::from(h.len);
            }
            i += 1;
        }
        Ok(())
    }

    /// Deletes the oldest sealed segments while the log exceeds `retention_bytes`, and those
    /// whose newest record is older than `retention` (measured against `now_ms`). The active
    /// segment is never deleted.
    pub fn enforce_retention(&mut self, now_ms: i64) -> Result<RetentionOutcome> {
        let (retention, retention_bytes) = (self.config.retention, self.config.retention_bytes);
        self.delete_leading_segments(|first, total| {
            let over_size = retention_bytes.is_some_and(|max| total - first.len >= max);
            let too_old = retention.is_some_and(|age| {
                first.max_timestamp != i64::MIN && first.max_timestamp < now_ms - age.as_millis() as i64
            });
            over_size || too_old
        })
    }

    /// Deletes the sealed segments that hold only records below `offset` (Kafka's
    /// `DeleteRecords`, by whole segments): for a topic whose consumers committed past them,
    /// such as a repartition topic. The active segment is never deleted.
    pub fn delete_below(&mut self, offset: u64) -> Result<RetentionOutcome> {
        self.delete_leading_segments(|first, _| first.next_offset <= offset)
    }

    /// Deletes the oldest sealed segments while `doomed(first, total bytes)` says so.
    fn delete_leading_segments(&mut self, doomed: impl Fn(&Segment, u64) -> bool) -> Result<RetentionOutcome> {
        let mut out = RetentionOutcome::default();
        let mut total = self.size_bytes();
        while self.segments.len() > 1 && doomed(&self.segments[0], total) {
            // A compaction pass works on segments by id: it starts again after this.
            if let Some(pass) = self.cleaning.take() {
                pass.abandon(self)?;
            }
            let seg = self.segments.remove(0);
            total -= seg.len;
            out.segments_deleted += 1;
            out.bytes_deleted += seg.len;
            remove_file(&seg.path)?;
            self.release(seg.id);
            self.dir_dirty = true;
        }
        Ok(out)
    }

    /// Does about `budget_bytes` of compaction work on a compacted log, so that an owner can
    /// interleave it with appends and reads: [`CompactionProgress::Working`] while a pass is
    /// under way (call again), `Idle` when nothing needs it. A pass starts once the sealed
    /// segments below `horizon` that no pass compacted hold at least half of their bytes; it
    /// keeps the latest record of each key among them, as [`Log::compact`] does, and records
    /// at or past `horizon` take no part — a caller whose log holds records that may still be
    /// rolled back (a table's changelog past its committed offset) passes the offset where
    /// they start, and a committed record is never dropped in favour of one of them. What
    /// the last finished pass did is in [`Log::last_compaction`].
    ///
    /// ```
    /// use faust_storage::{BatchBuilder, CompactionProgress, Log, LogConfig};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let config = LogConfig { compact: true, segment_bytes: 4096, ..LogConfig::default() };
    /// let mut log = Log::open(dir.path(), config)?;
    /// for i in 0..2_000u32 {
    ///     let mut batch = BatchBuilder::new();
    ///     batch.push(0, Some(format!("key-{}", i % 10).as_bytes()), Some(&i.to_le_bytes()), &[]);
    ///     log.append(&mut batch)?;
    /// }
    /// let before = log.size_bytes();
    /// let horizon = log.high_watermark();
    /// while log.compact_step(0, horizon, 64 << 10)? == CompactionProgress::Working {}
    /// assert!(log.size_bytes() < before / 4);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn compact_step(&mut self, now_ms: i64, horizon: u64, budget_bytes: usize) -> Result<CompactionProgress> {
        if !self.config.compact {
            return Ok(CompactionProgress::Idle);
        }
        let mut pass = match self.cleaning.take() {
            Some(pass) => pass,
            None => {
                let sealed = &self.segments[..self.segments.len().saturating_sub(1)];
                let eligible = sealed.iter().take_while(|s| s.next_offset <= horizon);
                let (mut total, mut dirty) = (0u64, 0u64);
                for s in eligible {
                    let data = s.len.saturating_sub(SEGMENT_HEADER_LEN as u64);
                    total += data;
                    if s.base_offset >= self.cleaned_end && s.covered_end == 0 {
                        dirty += data;
                    }
                }
                if dirty == 0 || (dirty as f64) < MIN_CLEANABLE_RATIO * total as f64 {
                    return Ok(CompactionProgress::Idle);
                }
                let cutoff = now_ms - self.config.delete_retention.as_millis() as i64;
                match CleaningPass::plan(&self.segments, horizon, cutoff) {
                    Some(pass) => pass,
                    None => return Ok(CompactionProgress::Idle),
                }
            }
        };
        match pass.step(self, budget_bytes) {
            Ok(false) => {
                self.cleaning = Some(pass);
                Ok(CompactionProgress::Working)
            }
            Ok(true) => {
                self.cleaned_end = pass.end;
                self.last_compaction = Some(pass.outcome);
                Ok(CompactionProgress::Working)
            }
            Err(e) => {
                pass.abandon(self)?;
                Err(e)
            }
        }
    }

    /// What the last pass of [`Log::compact_step`] that finished did.
    pub fn last_compaction(&self) -> Option<CompactionOutcome> {
        self.last_compaction
    }

    /// Rewrites the sealed segments of a compacted log so that only the latest record of each
    /// key is left (and tombstones older than `delete_retention`, once nothing older can be
    /// behind them). Offsets are kept; readers see gaps. Runs to completion.
    pub fn compact(&mut self, now_ms: i64) -> Result<CompactionOutcome> {
        if let Some(pass) = self.cleaning.take() {
            pass.abandon(self)?;
        }
        // One pass over every sealed segment, whatever part of them was compacted before.
        let cutoff = now_ms - self.config.delete_retention.as_millis() as i64;
        let Some(mut pass) = CleaningPass::plan(&self.segments, self.high_watermark(), cutoff) else {
            return Ok(CompactionOutcome::default());
        };
        loop {
            match pass.step(self, usize::MAX) {
                Ok(false) => {}
                Ok(true) => break,
                Err(e) => {
                    pass.abandon(self)?;
                    return Err(e);
                }
            }
        }
        self.cleaned_end = pass.end;
        Ok(pass.outcome)
    }

    // ---- access for the compactor and the store ----

    pub(crate) fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub(crate) fn new_segment_id(&mut self) -> u32 {
        self.alloc_id()
    }

    /// Replaces the segments with ids `group` (consecutive, sealed) by `replacement`.
    pub(crate) fn replace_segments(&mut self, group: &[u32], replacement: Segment) -> Result<()> {
        let start = self
            .segments
            .iter()
            .position(|s| s.id == group[0])
            .ok_or_else(|| Error::Config("internal: compacted segment vanished".into()))?;
        let end = start + group.len();
        if end > self.segments.len() || self.segments[start..end].iter().map(|s| s.id).ne(group.iter().copied()) {
            return Err(Error::Config("internal: compaction group is no longer consecutive".into()));
        }
        self.maps_set(replacement.id, replacement.map().clone());
        self.segments.splice(start..end, [replacement]);
        Ok(())
    }

    /// Takes over a lock the caller acquired (a store locks its directory before reading its
    /// checkpoint).
    pub(crate) fn attach_lock(&mut self, lock: DirLock) {
        self._lock = Some(lock);
    }
}

/// Lists the segment files of a log directory (their base offsets, sorted), after tidying up
/// what an interrupted compaction, repair or file replacement left: unfinished outputs
/// (`.cleaned`, `.tmp`) are deleted, since the originals are intact, and finished ones
/// (`.swap`) are installed over the segment with the same base. Also says whether it renamed
/// anything (the directory then needs a sync).
pub(crate) fn tidy_leftovers(dir: &Path) -> Result<(Vec<u64>, bool)> {
    let mut bases = Vec::new();
    let mut swaps = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = parse_segment_name(name, ".log") {
            bases.push(base);
        } else if parse_segment_name(name, ".cleaned").is_some() || name.ends_with(".tmp") {
            remove_file(&entry.path())?;
        } else if let Some(base) = parse_segment_name(name, ".swap") {
            swaps.push(base);
        }
    }
    let renamed = !swaps.is_empty();
    for base in swaps {
        let from = dir.join(format!("{base:020}.swap"));
        let to = dir.join(segment_file_name(base));
        std::fs::rename(&from, &to).map_err(|e| Error::io("finish compaction swap", &from, e))?;
        if !bases.contains(&base) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok((bases, renamed))
}

// The recovery point lives in two checksummed slots written alternately, so a torn write of
// one leaves the other. It is written after the data it covers was synced and is not synced
// itself: a stale recovery point only means more of the tail is treated as possibly torn.
pub(crate) fn read_recovery_point(dir: &Path) -> Result<(u64, u64)> {
    let path = dir.join(RECOVERY_POINT_FILE);
    let Some(b) = crate::files::read_optional(&path)? else { return Ok((0, 0)) };
    let mut best = (0, 0);
    for slot in b.chunks_exact(32).take(2) {
        let crc = crate::format::read_u32(slot, 24);
        if crc32c::crc32c(&slot[..24]) == crc {
            let seq = crate::format::read_u64(slot, 0);
            if seq >= best.0 {
                best = (seq, crate::format::read_u64(slot, 8));
            }
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> LogConfig {
        LogConfig { segment_bytes: 4096, index_interval_bytes: 256, ..LogConfig::default() }
    }

    #[test]
    fn record_with_headers_reads_them_back_in_order() {
        let none = Record::with_headers(1, 2, None, None, &[]);
        assert_eq!(none, Record::new(1, 2, None, None));
        let hs: [(&[u8], Option<&[u8]>); 4] = [(b"a", Some(b"1")), (b"b", None), (b"a", Some(b"")), (b"", Some(b"x"))];
        let r = Record::with_headers(3, -4, Some(Bytes::from_static(b"k")), Some(Bytes::new()), &hs);
        assert_eq!(r.headers().collect::<Vec<_>>(), hs.to_vec());
        assert_eq!((r.offset, r.timestamp), (3, -4));
        assert_eq!(r.value.as_deref(), Some(&b""[..]));
    }

    fn append_n(log: &mut Log, n: usize, key_mod: usize) {
        let mut b = BatchBuilder::new();
        for i in 0..n {
            let k = format!("k{}", i % key_mod);
            let v = format!("value-{i}");
            b.push(i as i64, Some(k.as_bytes()), Some(v.as_bytes()), &[]);
            log.append(&mut b).unwrap();
        }
    }

    fn all_records(log: &Log, from: u64) -> Vec<Record> {
        let mut out = Vec::new();
        let mut next = from;
        while next < log.high_watermark() {
            let batches = log.read(next, 1000).unwrap();
            for b in &batches {
                out.extend(b.records_from(next));
                next = b.last_offset() + 1;
            }
        }
        out
    }

    #[test]
    fn a_batch_larger_than_a_segment_is_written_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), small()).unwrap();
        append_n(&mut log, 3, 10);
        let mut b = BatchBuilder::new();
        for i in 0..300u32 {
            let v = format!("value-{i}");
            b.push(i64::from(i), Some(format!("k{i}").as_bytes()), Some(v.as_bytes()), &[(b"h", Some(b"1"))]);
        }
        assert!(b.encoded_len() > 4096);
        let a = log.append(&mut b).unwrap();
        assert!(b.is_empty());
        assert_eq!((a.base_offset, a.last_offset), (3, 302));
        assert!(log.segment_count() > 2);
        let recs = all_records(&log, 3);
        assert_eq!(recs.len(), 300);
        for (i, r) in recs.iter().enumerate() {
            assert_eq!((r.offset, r.timestamp), (3 + i as u64, i as i64));
            assert_eq!(r.value.as_deref(), Some(format!("value-{i}").as_bytes()));
            assert_eq!(r.headers().collect::<Vec<_>>(), vec![(&b"h"[..], Some(&b"1"[..]))]);
        }
        // One record larger than a segment is refused.
        b.push(0, None, Some(&[0u8; 5000]), &[]);
        b.push(0, None, Some(b"small"), &[]);
        assert!(matches!(log.append(&mut b), Err(Error::BatchTooLarge { .. })));
        drop(log);
        let log = Log::open(dir.path(), small()).unwrap();
        assert_eq!(all_records(&log, 3).len(), 300);
    }

    #[test]
    fn appends_roll_segments_and_read_back_from_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), small()).unwrap();
        append_n(&mut log, 500, 1000);
        assert!(log.segment_count() > 5, "{} segments", log.segment_count());
        assert_eq!(log.high_watermark(), 500);
        for from in [0u64, 1, 77, 250, 499] {
            let recs = all_records(&log, from);
            assert_eq!(recs.len() as u64, 500 - from);
            assert_eq!(recs[0].offset, from);
            assert_eq!(recs[0].value.as_deref(), Some(format!("value-{from}").as_bytes()));
        }
        assert!(log.read(500, 10).unwrap().is_empty());
        assert!(matches!(log.read(501, 10), Err(Error::OffsetOutOfRange { .. })));
    }

    #[test]
    fn reopen_keeps_everything_synced() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = Log::open(dir.path(), small()).unwrap();
            append_n(&mut log, 300, 1000);
            log.sync().unwrap();
        }
        let log = Log::open(dir.path(), small()).unwrap();
        assert_eq!(log.high_watermark(), 300);
        assert_eq!(all_records(&log, 0).len(), 300);
    }

    #[test]
    fn second_handle_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _log = Log::open(dir.path(), small()).unwrap();
        assert!(matches!(Log::open(dir.path(), small()), Err(Error::Locked { .. })));
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let last_path;
        {
            let mut log = Log::open(dir.path(), small()).unwrap();
            append_n(&mut log, 100, 1000);
            log.sync().unwrap();
            append_n(&mut log, 5, 1000);
            last_path = log.segments.last().unwrap().path.clone();
        }
        // Tear the last batch: cut its final 3 bytes.
        let len = {
            let data = std::fs::read(&last_path).unwrap();
            let mut pos = SEGMENT_HEADER_LEN;
            let mut last_end = pos;
            while pos + 4 <= data.len() && data[pos..pos + 4] != [0, 0, 0, 0] {
                let l = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
                pos += l;
                last_end = pos;
            }
            last_end
        };
        let f = std::fs::OpenOptions::new().write(true).open(&last_path).unwrap();
        f.set_len(len as u64 - 3).unwrap();
        drop(f);
        let mut log = Log::open(dir.path(), small()).unwrap();
        assert_eq!(log.high_watermark(), 104);
        append_n(&mut log, 1, 1000);
        assert_eq!(all_records(&log, 0).len(), 105);
    }

    #[test]
    fn retention_by_size_and_age() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig { retention_bytes: Some(8192), ..small() };
        let mut log = Log::open(dir.path(), cfg).unwrap();
        append_n(&mut log, 500, 1000);
        let out = log.enforce_retention(0).unwrap();
        assert!(out.segments_deleted > 0);
        assert!(log.size_bytes() < 8192 + 4096);
        assert!(log.earliest_offset() > 0);
        let earliest = log.earliest_offset();
        assert_eq!(all_records(&log, earliest).last().unwrap().offset, 499);
        assert!(matches!(log.read(0, 10), Err(Error::OffsetOutOfRange { .. })));

        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig { retention: Some(Duration::from_millis(100)), ..small() };
        let mut log = Log::open(dir.path(), cfg).unwrap();
        append_n(&mut log, 500, 1000); // timestamps 0..500
        log.enforce_retention(10_000).unwrap();
        assert_eq!(log.segment_count(), 1, "only the active segment is left");
    }

    #[test]
    fn delete_below_removes_only_segments_wholly_below_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), small()).unwrap();
        append_n(&mut log, 500, 1000);
        let segments = log.segment_count();
        assert!(segments > 3);
        let out = log.delete_below(250).unwrap();
        assert!(out.segments_deleted > 0 && log.segment_count() < segments);
        let earliest = log.earliest_offset();
        assert!(earliest > 0 && earliest <= 250, "earliest {earliest}");
        assert_eq!(all_records(&log, earliest).len() as u64, 500 - earliest);
        // Everything below the end: every sealed segment goes, the active one stays.
        log.delete_below(u64::MAX).unwrap();
        assert_eq!(log.segment_count(), 1);
        assert_eq!(log.high_watermark(), 500);
        drop(log);
        let log = Log::open(dir.path(), small()).unwrap();
        assert_eq!(log.high_watermark(), 500);
    }

    #[test]
    fn compaction_keeps_latest_per_key_and_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig { compact: true, delete_retention: Duration::ZERO, ..small() };
        let mut log = Log::open(dir.path(), cfg.clone()).unwrap();
        append_n(&mut log, 600, 10);
        let before = log.size_bytes();
        let out = log.compact(i64::MAX).unwrap();
        assert!(out.records_removed > 0);
        assert!(log.size_bytes() < before);
        let recs = all_records(&log, 0);
        // Every key's last record survives with its offset; nothing is reordered.
        for k in 0..10 {
            let key = format!("k{k}");
            let last = recs.iter().rfind(|r| r.key.as_deref() == Some(key.as_bytes())).unwrap();
            assert_eq!(last.offset, (590 + k) as u64);
        }
        assert!(recs.windows(2).all(|w| w[0].offset < w[1].offset));
        drop(log);
        let log = Log::open(dir.path(), cfg).unwrap();
        assert_eq!(all_records(&log, 0), recs);
    }
}
