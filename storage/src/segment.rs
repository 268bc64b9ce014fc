//! One segment file: a header and record batches, appended with `pwrite` and read through a
//! shared read-only memory map.
//!
//! Invariants that keep mapped reads safe (no SIGBUS):
//! - every byte handed out lies below `len`, and `len <= allocated <= file size`;
//! - space is reserved with `posix_fallocate` (real blocks, not a sparse hole) before a
//!   `pwrite` goes past it, so a full disk fails the append with `ENOSPC` instead of faulting
//!   a later read;
//! - a file is only shortened (`ftruncate`) when it is opened, before any of its bytes are
//!   handed out, or when it is sealed, down to `len`;
//! - the owning directory is locked, so no other handle changes the files under us.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::error::{Error, FormatError, Result};
use crate::format::{BATCH_HEADER_LEN, BatchHeader, SEGMENT_HEADER_LEN, SegmentHeader, validate_batch};

/// File name of the segment whose first offset is `base`.
pub(crate) fn segment_file_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// Parses a segment file name back into its base offset.
pub(crate) fn parse_segment_name(name: &str, ext: &str) -> Option<u64> {
    let stem = name.strip_suffix(ext)?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// How a scan of a segment's batches ended.
#[derive(Debug)]
pub(crate) enum ScanEnd {
    /// The data ended cleanly: end of file, or zeros where the next batch would start.
    Clean,
    /// The bytes at `Scan::end` are not a valid batch.
    Invalid(FormatError),
}

/// What a scan of a segment found.
#[derive(Debug)]
pub(crate) struct Scan {
    /// Position just past the last valid batch.
    pub(crate) end: u64,
    /// Offset after the last valid batch's last record (or the base offset when empty).
    pub(crate) next_offset: u64,
    pub(crate) how: ScanEnd,
}

pub(crate) struct Segment {
    /// Handle through which stores refer to this segment's bytes; unique among the live
    /// segments of one log.
    pub(crate) id: u32,
    pub(crate) base_offset: u64,
    /// Set on compaction output (see the format docs); zero otherwise.
    pub(crate) covered_end: u64,
    pub(crate) path: PathBuf,
    file: File,
    /// The whole mapping (`capacity` bytes). Only bytes below `len` are ever read.
    map: Bytes,
    /// Bytes of data: header and valid batches.
    pub(crate) len: u64,
    /// Bytes reserved on disk; the file's size.
    allocated: u64,
    /// Length of the mapping: appends never go past it.
    capacity: u64,
    /// Offset after the last record, at least `base_offset` and `covered_end`.
    pub(crate) next_offset: u64,
    pub(crate) max_timestamp: i64,
    /// Sparse index: (batch base offset, position), one entry every `index_interval` bytes.
    index: Vec<(u64, u32)>,
    bytes_since_index: u64,
    index_interval: u64,
    pub(crate) sealed: bool,
    /// Whether bytes were written since the last `fdatasync`.
    pub(crate) dirty: bool,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("id", &self.id)
            .field("path", &self.path)
            .field("base_offset", &self.base_offset)
            .field("next_offset", &self.next_offset)
            .field("len", &self.len)
            .field("sealed", &self.sealed)
            .finish()
    }
}

fn map_file(file: &File, len: u64, path: &Path) -> Result<Bytes> {
    // SAFETY: the mapping is read-only and shared. Bytes below `len` of the data are never
    // rewritten while mapped (appends only write above it), the file is never shortened below
    // any byte that was handed out (see the module invariants), and the directory lock keeps
    // other handles away.
    let map =
        unsafe { memmap2::MmapOptions::new().len(len as usize).map(file) }.map_err(|e| Error::io("mmap", path, e))?;
    Ok(Bytes::from_owner(map))
}

fn reserve(file: &File, from: u64, to: u64, path: &Path) -> Result<()> {
    if to <= from {
        return Ok(());
    }
    // SAFETY: plain syscall on a valid descriptor.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), from as libc::off_t, (to - from) as libc::off_t) };
    if rc != 0 {
        return Err(Error::io("reserve space in", path, std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

impl Segment {
    /// Creates a new, empty segment file.
    pub(crate) fn create(
        path: PathBuf,
        id: u32,
        header: SegmentHeader,
        capacity: u64,
        index_interval: u64,
    ) -> Result<Segment> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io("create segment", &path, e))?;
        let init = |seg: &mut Segment| -> Result<()> {
            // Only the header: space for data is reserved by the first append, so a log that
            // is never written takes no more disk than its header (an empty worker has dozens).
            seg.file.write_all_at(&header.encode(), 0).map_err(|e| Error::io("write segment header", &seg.path, e))?;
            seg.allocated = seg.allocated.max(SEGMENT_HEADER_LEN as u64);
            seg.len = SEGMENT_HEADER_LEN as u64;
            seg.dirty = true;
            Ok(())
        };
        let result = Segment::from_parts(path.clone(), file, id, header, capacity, index_interval)
            .and_then(|mut seg| init(&mut seg).map(|()| seg));
        if result.is_err() {
            // Leave no half-made file behind: a later roll creates one with the same name.
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    fn from_parts(
        path: PathBuf,
        file: File,
        id: u32,
        header: SegmentHeader,
        capacity: u64,
        index_interval: u64,
    ) -> Result<Segment> {
        let allocated = file.metadata().map_err(|e| Error::io("stat", &path, e))?.len();
        let capacity = capacity.max(allocated).max(SEGMENT_HEADER_LEN as u64);
        let map = map_file(&file, capacity, &path)?;
        Ok(Segment {
            id,
            base_offset: header.base_offset,
            covered_end: header.covered_end,
            path,
            file,
            map,
            len: 0,
            allocated,
            capacity,
            next_offset: header.base_offset.max(header.covered_end),
            max_timestamp: i64::MIN,
            index: Vec::new(),
            bytes_since_index: 0,
            index_interval,
            sealed: false,
            dirty: false,
        })
    }

    /// Opens an existing segment file and reads its header. Call `scan` next.
    ///
    /// `capacity` is the mapping length for a segment that will take appends (at least the
    /// file size); for sealed segments pass 0 to map exactly the file.
    pub(crate) fn open(path: PathBuf, id: u32, capacity: u64, index_interval: u64) -> Result<Segment> {
        let file =
            OpenOptions::new().read(true).write(true).open(&path).map_err(|e| Error::io("open segment", &path, e))?;
        let mut hdr = [0u8; SEGMENT_HEADER_LEN];
        let size = file.metadata().map_err(|e| Error::io("stat", &path, e))?.len();
        let n = (size as usize).min(SEGMENT_HEADER_LEN);
        file.read_exact_at(&mut hdr[..n], 0).map_err(|e| Error::io("read segment header", &path, e))?;
        let header = SegmentHeader::decode(&hdr[..n]).map_err(|reason| Error::Corruption {
            path: path.clone(),
            position: 0,
            reason,
        })?;
        Segment::from_parts(path, file, id, header, capacity, index_interval)
    }

    /// Reads the segment's batches from the start, rebuilding the sparse index and the next
    /// offset, and stops at the first invalid batch. With `verify`, every batch's checksum and
    /// record structure is checked; without it, only the headers (lengths and offsets).
    ///
    /// Leaves `len` at the end of the valid data; the caller decides what an invalid tail
    /// means (a torn write to cut, or damage to report).
    pub(crate) fn scan(&mut self, verify: bool) -> Scan {
        self.index.clear();
        self.bytes_since_index = 0;
        self.max_timestamp = i64::MIN;
        let file_len = self.allocated;
        let map = self.map.clone();
        let data = &map[..file_len as usize];
        let mut pos = SEGMENT_HEADER_LEN;
        let mut next = self.base_offset;
        let how = loop {
            let rest = &data[pos..];
            if rest.len() < 4 || rest[..4] == [0, 0, 0, 0] {
                break ScanEnd::Clean;
            }
            let checked = if verify {
                validate_batch(rest)
            } else {
                match BatchHeader::peek(rest) {
                    None => Err(FormatError::Truncated { needed: BATCH_HEADER_LEN, available: rest.len() }),
                    Some(h) if (h.len as usize) < BATCH_HEADER_LEN || h.len as usize > rest.len() => {
                        Err(FormatError::BadBatchLength { len: h.len })
                    }
                    Some(h) => Ok(h),
                }
            };
            let h = match checked {
                Ok(h) => h,
                Err(e) => break ScanEnd::Invalid(e),
            };
            if h.base_offset < next {
                break ScanEnd::Invalid(FormatError::OffsetOutOfOrder { expected: next, found: h.base_offset });
            }
            if pos == SEGMENT_HEADER_LEN && self.covered_end == 0 && h.base_offset != self.base_offset {
                break ScanEnd::Invalid(FormatError::OffsetOutOfOrder {
                    expected: self.base_offset,
                    found: h.base_offset,
                });
            }
            // Unchecked headers may hold any offset: one whose range overflows is invalid.
            let Some(after) = h.base_offset.checked_add(u64::from(h.last_offset_delta) + 1) else {
                break ScanEnd::Invalid(FormatError::OffsetOutOfOrder { expected: next, found: h.base_offset });
            };
            self.note_batch(pos as u64, &h);
            next = after;
            pos += h.len as usize;
        };
        self.len = pos as u64;
        self.next_offset = next.max(self.covered_end).max(self.base_offset);
        Scan { end: self.len, next_offset: self.next_offset, how }
    }

    fn note_batch(&mut self, pos: u64, h: &BatchHeader) {
        if self.index.is_empty() || self.bytes_since_index >= self.index_interval {
            self.index.push((h.base_offset, pos as u32));
            self.bytes_since_index = 0;
        }
        self.bytes_since_index += u64::from(h.len);
        self.max_timestamp = self.max_timestamp.max(h.max_timestamp);
    }

    /// Cuts the data at `len` (a batch boundary found by `scan`), releasing the space past it
    /// so no stale batch can reappear behind later appends. Only called before any bytes of
    /// this segment are handed out.
    pub(crate) fn truncate_to(&mut self, len: u64, next_offset: u64) -> Result<()> {
        self.file.set_len(len).map_err(|e| Error::io("truncate", &self.path, e))?;
        self.file.sync_all().map_err(|e| Error::io("fsync", &self.path, e))?;
        self.allocated = len;
        self.len = len;
        self.next_offset = next_offset.max(self.covered_end).max(self.base_offset);
        self.index.retain(|&(_, p)| u64::from(p) < len);
        Ok(())
    }

    /// Space left for appends.
    pub(crate) fn remaining(&self) -> u64 {
        self.capacity - self.len
    }

    fn ensure_reserved(&mut self, end: u64) -> Result<()> {
        if end <= self.allocated {
            return Ok(());
        }
        // Reserve in chunks of at least 1 MiB (or an eighth of the capacity) so that appends
        // rarely pay for it, and never past the mapping. (Each reservation is a journaled
        // metadata change that can wait behind the file system's writeback: chunks that start
        // small and grow measurably stalled a busy core in the latency benchmark.)
        let chunk = (self.capacity / 8).clamp(1 << 20, 8 << 20);
        let target = end.max(self.allocated + chunk).min(self.capacity).max(end);
        reserve(&self.file, self.allocated, target, &self.path)?;
        self.allocated = target;
        Ok(())
    }

    /// Appends a finished batch. Returns the position it was written at.
    pub(crate) fn append(&mut self, batch: &[u8]) -> Result<u32> {
        let h = BatchHeader::peek(batch).ok_or(Error::Config("internal: unsealed batch".into()))?;
        let pos = self.len;
        let end = pos + batch.len() as u64;
        if end > self.capacity {
            return Err(Error::Config("internal: append past segment capacity".into()));
        }
        self.ensure_reserved(end)?;
        self.file.write_all_at(batch, pos).map_err(|e| Error::io("append to", &self.path, e))?;
        self.note_batch(pos, &h);
        self.len = end;
        // A compaction output stands for every offset below its covered end, even past its
        // last record: appending the kept records must not move its end back.
        self.next_offset = self.next_offset.max(h.last_offset() + 1);
        self.dirty = true;
        Ok(pos as u32)
    }

    /// Marks the segment read-only and gives back the reserved space past its data.
    pub(crate) fn seal(&mut self) -> Result<()> {
        if self.allocated > self.len {
            self.file.set_len(self.len).map_err(|e| Error::io("trim", &self.path, e))?;
            self.allocated = self.len;
        }
        self.sealed = true;
        Ok(())
    }

    pub(crate) fn sync(&mut self) -> Result<()> {
        if self.dirty {
            self.file.sync_data().map_err(|e| Error::io("fdatasync", &self.path, e))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// The segment's bytes, header included, up to the end of its data.
    pub(crate) fn data(&self) -> &[u8] {
        &self.map[..self.len as usize]
    }

    /// A zero-copy handle on the segment's whole mapping.
    pub(crate) fn map(&self) -> &Bytes {
        &self.map
    }

    /// The batch starting at `pos`, checked; `pos` must come from the index or a hop.
    pub(crate) fn batch_at(&self, pos: u64) -> std::result::Result<(BatchHeader, Bytes), Error> {
        let data = self.data();
        let rest = data.get(pos as usize..).unwrap_or_default();
        let h = validate_batch(rest).map_err(|reason| Error::Corruption {
            path: self.path.clone(),
            position: pos,
            reason,
        })?;
        Ok((h, self.map.slice(pos as usize..pos as usize + h.len as usize)))
    }

    /// The position of the first batch that may hold `offset` or later records: the last
    /// indexed batch at or before it, from where the caller hops forward.
    pub(crate) fn index_lookup(&self, offset: u64) -> u64 {
        let i = self.index.partition_point(|&(o, _)| o <= offset);
        if i == 0 { SEGMENT_HEADER_LEN as u64 } else { u64::from(self.index[i - 1].1) }
    }

    /// The header of the batch at `pos`, unchecked (for hopping); `None` past the data.
    pub(crate) fn peek_at(&self, pos: u64) -> Option<BatchHeader> {
        let data = self.data();
        let h = BatchHeader::peek(data.get(pos as usize..)?)?;
        (h.len as usize >= BATCH_HEADER_LEN && pos + u64::from(h.len) <= self.len).then_some(h)
    }

    /// Position of the first batch whose base offset is at least `offset` (or the end of the
    /// data). Used to cut a segment at a checkpoint.
    pub(crate) fn position_of(&self, offset: u64) -> u64 {
        let mut pos = self.index_lookup(offset);
        while let Some(h) = self.peek_at(pos) {
            if h.base_offset >= offset {
                break;
            }
            pos += u64::from(h.len);
        }
        pos.min(self.len)
    }
}
