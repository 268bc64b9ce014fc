//! The on-disk format shared by segment logs and key-value stores.
//!
//! All integers are little-endian. A segment file is a 64-byte header followed by record
//! batches; the file may be longer than its data (space is reserved ahead of appends), and
//! the data ends at the first batch whose length field is zero.
//!
//! ```text
//! segment header (64 bytes)
//!   0  magic "FAUSTSEG"          8  format version u16     10 reserved u16 (0)
//!   12 reserved u32 (0)          16 base offset u64        24 covered end u64 (0 = none)
//!   32 created, unix ms i64      40 reserved (20 bytes, 0)  60 crc32c of bytes 0..60
//!
//! batch (BATCH_HEADER_LEN = 48 bytes of header, then its records)
//!   0  batch length u32 (whole batch, header included)
//!   4  crc32c u32 of bytes 8..length
//!   8  base offset u64           16 last offset delta u32  20 record count u32
//!   24 first timestamp i64       32 max timestamp i64      40 attributes u16
//!   42 reserved (6 bytes, 0)
//!
//! record (RECORD_HEADER_LEN = 25 bytes of header, then key, value, headers)
//!   0  flags u8 (bit 0: key present, bit 1: value present)
//!   1  offset delta u32          5  timestamp i64
//!   13 key length u32            17 value length u32       21 headers length u32
//!
//! headers: repeated { name length u32, name, value length u32 (u32::MAX = null), value }
//! ```
//!
//! Offsets inside a batch increase strictly; after compaction they may have gaps, so a
//! batch's record count can be smaller than `last offset delta + 1`. A segment's *covered
//! end* is set on compaction output: the segment stands for every offset below it, even
//! those whose records were removed.

use crate::error::FormatError;

/// Version of the on-disk format written by this build.
pub(crate) const FORMAT_VERSION: u16 = 1;
pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"FAUSTSEG";
pub(crate) const SEGMENT_HEADER_LEN: usize = 64;
pub(crate) const BATCH_HEADER_LEN: usize = 48;
pub(crate) const RECORD_HEADER_LEN: usize = 25;

const FLAG_KEY: u8 = 1;
const FLAG_VALUE: u8 = 2;
const NULL_LEN: u32 = u32::MAX;

pub(crate) fn read_u16(buf: &[u8], at: usize) -> u16 {
    let mut b = [0u8; 2];
    b.copy_from_slice(&buf[at..at + 2]);
    u16::from_le_bytes(b)
}

pub(crate) fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

pub(crate) fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

pub(crate) fn read_i64(buf: &[u8], at: usize) -> i64 {
    read_u64(buf, at) as i64
}

/// The fixed header at the start of every segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub(crate) base_offset: u64,
    /// Set on compaction output: every offset below it is accounted for by this segment.
    pub(crate) covered_end: u64,
    pub(crate) created_ms: i64,
}

impl SegmentHeader {
    pub(crate) fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(SEGMENT_MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.base_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.covered_end.to_le_bytes());
        b[32..40].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < SEGMENT_HEADER_LEN {
            return Err(FormatError::ShortHeader { len: b.len() });
        }
        if &b[0..8] != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let stored = read_u32(b, 60);
        let computed = crc32c::crc32c(&b[0..60]);
        if stored != computed {
            return Err(FormatError::HeaderChecksum { stored, computed });
        }
        let version = read_u16(b, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion { found: version, supported: FORMAT_VERSION });
        }
        Ok(SegmentHeader { base_offset: read_u64(b, 16), covered_end: read_u64(b, 24), created_ms: read_i64(b, 32) })
    }
}

/// The parsed header of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchHeader {
    pub(crate) len: u32,
    pub(crate) crc: u32,
    pub(crate) base_offset: u64,
    pub(crate) last_offset_delta: u32,
    pub(crate) record_count: u32,
    pub(crate) first_timestamp: i64,
    pub(crate) max_timestamp: i64,
    pub(crate) attributes: u16,
}

impl BatchHeader {
    /// Reads the header at the start of `b` without checking it. `None` when `b` is shorter
    /// than a header.
    pub(crate) fn peek(b: &[u8]) -> Option<Self> {
        if b.len() < BATCH_HEADER_LEN {
            return None;
        }
        Some(BatchHeader {
            len: read_u32(b, 0),
            crc: read_u32(b, 4),
            base_offset: read_u64(b, 8),
            last_offset_delta: read_u32(b, 16),
            record_count: read_u32(b, 20),
            first_timestamp: read_i64(b, 24),
            max_timestamp: read_i64(b, 32),
            attributes: read_u16(b, 40),
        })
    }

    pub(crate) fn last_offset(&self) -> u64 {
        self.base_offset + u64::from(self.last_offset_delta)
    }
}

/// One record's layout inside a batch, as positions relative to the batch start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawRecord {
    /// Position of the record header, relative to the batch start.
    pub(crate) start: u32,
    pub(crate) offset_delta: u32,
    pub(crate) timestamp: i64,
    /// Position of the key bytes (relative to the batch start) and their length; `None` for a
    /// null key.
    pub(crate) key: Option<(u32, u32)>,
    pub(crate) value: Option<(u32, u32)>,
    pub(crate) headers: (u32, u32),
}

impl RawRecord {
    pub(crate) fn end(&self) -> u32 {
        self.headers.0 + self.headers.1
    }
}

/// Checks a whole batch: length, checksum, and the structure of every record (lengths in
/// bounds, offset deltas strictly increasing and within the header's range, header section
/// well formed). After this, `RawRecords` over the same bytes cannot go out of bounds.
pub(crate) fn validate_batch(b: &[u8]) -> Result<BatchHeader, FormatError> {
    let h = BatchHeader::peek(b).ok_or(FormatError::Truncated { needed: BATCH_HEADER_LEN, available: b.len() })?;
    let len = h.len as usize;
    if len < BATCH_HEADER_LEN + RECORD_HEADER_LEN {
        return Err(FormatError::BadBatchLength { len: h.len });
    }
    if len > b.len() {
        return Err(FormatError::Truncated { needed: len, available: b.len() });
    }
    let computed = crc32c::crc32c(&b[8..len]);
    if computed != h.crc {
        return Err(FormatError::BatchChecksum { stored: h.crc, computed });
    }
    if h.record_count == 0 || u64::from(h.record_count) > u64::from(h.last_offset_delta) + 1 {
        return Err(FormatError::BadRecordCount { count: h.record_count, last_offset_delta: h.last_offset_delta });
    }
    let mut count = 0u32;
    let mut last_delta: Option<u32> = None;
    let mut pos = BATCH_HEADER_LEN;
    while pos < len {
        let r = parse_record(&b[..len], pos)?;
        if let Some(prev) = last_delta
            && r.offset_delta <= prev
        {
            return Err(FormatError::OffsetsNotIncreasing { previous: prev, next: r.offset_delta });
        }
        if r.offset_delta > h.last_offset_delta {
            return Err(FormatError::OffsetDeltaOutOfRange { delta: r.offset_delta, last: h.last_offset_delta });
        }
        let (hp, hl) = r.headers;
        validate_headers(&b[hp as usize..(hp + hl) as usize])?;
        last_delta = Some(r.offset_delta);
        count += 1;
        pos = r.end() as usize;
    }
    if count != h.record_count {
        return Err(FormatError::BadRecordCount { count, last_offset_delta: h.last_offset_delta });
    }
    if last_delta != Some(h.last_offset_delta) {
        return Err(FormatError::OffsetDeltaOutOfRange { delta: last_delta.unwrap_or(0), last: h.last_offset_delta });
    }
    Ok(h)
}

/// Parses the record whose header starts at `pos` in `batch` (the whole batch, header
/// included), checking that it lies within `batch`.
fn parse_record(batch: &[u8], pos: usize) -> Result<RawRecord, FormatError> {
    let end = batch.len();
    if pos + RECORD_HEADER_LEN > end {
        return Err(FormatError::Truncated { needed: pos + RECORD_HEADER_LEN, available: end });
    }
    let flags = batch[pos];
    if flags & !(FLAG_KEY | FLAG_VALUE) != 0 {
        return Err(FormatError::BadRecordFlags { flags });
    }
    let offset_delta = read_u32(batch, pos + 1);
    let timestamp = read_i64(batch, pos + 5);
    let key_len = read_u32(batch, pos + 13) as usize;
    let value_len = read_u32(batch, pos + 17) as usize;
    let headers_len = read_u32(batch, pos + 21) as usize;
    let key_pos = pos + RECORD_HEADER_LEN;
    let value_pos = key_pos.checked_add(key_len).ok_or(FormatError::LengthOverflow)?;
    let headers_pos = value_pos.checked_add(value_len).ok_or(FormatError::LengthOverflow)?;
    let record_end = headers_pos.checked_add(headers_len).ok_or(FormatError::LengthOverflow)?;
    if record_end > end {
        return Err(FormatError::Truncated { needed: record_end, available: end });
    }
    if flags & FLAG_KEY == 0 && key_len != 0 || flags & FLAG_VALUE == 0 && value_len != 0 {
        return Err(FormatError::BadRecordFlags { flags });
    }
    // Every position fits in u32: the batch length is a u32.
    Ok(RawRecord {
        start: pos as u32,
        offset_delta,
        timestamp,
        key: (flags & FLAG_KEY != 0).then_some((key_pos as u32, key_len as u32)),
        value: (flags & FLAG_VALUE != 0).then_some((value_pos as u32, value_len as u32)),
        headers: (headers_pos as u32, headers_len as u32),
    })
}

fn validate_headers(mut b: &[u8]) -> Result<(), FormatError> {
    while !b.is_empty() {
        let (_, rest) = split_header(b).ok_or(FormatError::BadHeaders)?;
        b = rest;
    }
    Ok(())
}

/// Splits one header off the front of a header section: (name, value, rest).
pub(crate) fn split_header(b: &[u8]) -> Option<(Header<'_>, &[u8])> {
    if b.len() < 4 {
        return None;
    }
    let name_len = read_u32(b, 0) as usize;
    let name_end = 4usize.checked_add(name_len)?;
    if b.len() < name_end + 4 {
        return None;
    }
    let name = &b[4..name_end];
    let value_len = read_u32(b, name_end);
    let value_start = name_end + 4;
    if value_len == NULL_LEN {
        return Some(((name, None), &b[value_start..]));
    }
    let value_end = value_start.checked_add(value_len as usize)?;
    if b.len() < value_end {
        return None;
    }
    Some(((name, Some(&b[value_start..value_end])), &b[value_end..]))
}

/// Appends `headers` to `buf` in the storage format's header encoding.
pub(crate) fn encode_headers(buf: &mut Vec<u8>, headers: &[Header<'_>]) {
    for (name, value) in headers {
        buf.extend_from_slice(&(name.len() as u32).to_le_bytes());
        buf.extend_from_slice(name);
        match value {
            Some(v) => {
                buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
                buf.extend_from_slice(v);
            }
            None => buf.extend_from_slice(&NULL_LEN.to_le_bytes()),
        }
    }
}

/// One record of a [`BatchBuilder`], borrowed from its buffer (see
/// [`BatchBuilder::records`]). Offsets are not known until the batch is appended.
#[derive(Debug, Clone)]
pub struct BuiltRecord<'a> {
    /// The record's timestamp (milliseconds).
    pub timestamp: i64,
    /// The key, or `None` for a null key.
    pub key: Option<&'a [u8]>,
    /// The value, or `None` for a null value.
    pub value: Option<&'a [u8]>,
    /// The headers, in the order they were pushed.
    pub headers: crate::log::Headers<'a>,
}

/// Iterator over the records of a [`BatchBuilder`], in push order.
pub struct BuiltRecords<'a> {
    buf: &'a [u8],
    raw: RawRecords<'a>,
}

impl std::fmt::Debug for BuiltRecords<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BuiltRecords")
    }
}

impl<'a> Iterator for BuiltRecords<'a> {
    type Item = BuiltRecord<'a>;

    fn next(&mut self) -> Option<BuiltRecord<'a>> {
        let r = self.raw.next()?;
        let buf = self.buf;
        let slice = |(p, l): (u32, u32)| &buf[p as usize..(p + l) as usize];
        Some(BuiltRecord {
            timestamp: r.timestamp,
            key: r.key.map(slice),
            value: r.value.map(slice),
            headers: crate::log::Headers::new(slice(r.headers)),
        })
    }
}

/// Iterates the records of a batch that `validate_batch` accepted. On bytes it did not
/// accept, it stops early instead of panicking.
pub(crate) struct RawRecords<'a> {
    batch: &'a [u8],
    pos: usize,
}

impl<'a> RawRecords<'a> {
    pub(crate) fn new(batch: &'a [u8]) -> Self {
        RawRecords { batch, pos: BATCH_HEADER_LEN }
    }
}

impl Iterator for RawRecords<'_> {
    type Item = RawRecord;

    fn next(&mut self) -> Option<RawRecord> {
        if self.pos >= self.batch.len() {
            return None;
        }
        match parse_record(self.batch, self.pos) {
            Ok(r) => {
                self.pos = r.end() as usize;
                Some(r)
            }
            Err(_) => {
                self.pos = self.batch.len();
                None
            }
        }
    }
}

/// A header to write with a record: a name and an optional value.
pub type Header<'a> = (&'a [u8], Option<&'a [u8]>);

/// Encodes records into one batch, in the exact bytes that will be written to disk, so an
/// append copies nothing.
///
/// The log assigns offsets when the batch is appended; records get consecutive offsets in
/// the order they were pushed. A builder is reusable: `Log::append` clears it.
///
/// ```
/// use faust_storage::BatchBuilder;
///
/// let mut batch = BatchBuilder::new();
/// batch.push(1_700_000_000_000, Some(b"key"), Some(b"value"), &[]);
/// batch.push(1_700_000_000_001, None, Some(b"no key"), &[(b"trace-id", Some(b"42"))]);
/// assert_eq!(batch.len(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct BatchBuilder {
    buf: Vec<u8>,
    count: u32,
    /// Offset delta of the last pushed record. Appends assign consecutive offsets; the
    /// compactor pushes records with the offsets they already had.
    last_delta: u32,
    first_timestamp: i64,
    max_timestamp: i64,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    /// An empty batch.
    pub fn new() -> Self {
        Self::with_capacity(4096)
    }

    /// An empty batch with room for `bytes` of encoded records.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes.max(BATCH_HEADER_LEN));
        buf.resize(BATCH_HEADER_LEN, 0);
        BatchBuilder { buf, count: 0, last_delta: 0, first_timestamp: 0, max_timestamp: i64::MIN }
    }

    /// Number of records in the batch.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Size of the encoded batch in bytes, header included: what the append will write.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Removes every record, keeping the allocation.
    pub fn clear(&mut self) {
        self.buf.truncate(BATCH_HEADER_LEN);
        self.count = 0;
        self.last_delta = 0;
        self.max_timestamp = i64::MIN;
    }

    /// Adds a record. A `None` key or value is stored as null (a null value is a tombstone
    /// in compacted logs and key-value stores). Sizes are checked when the batch is appended:
    /// [`Log::append`](crate::Log::append) rejects a batch larger than a segment.
    pub fn push(&mut self, timestamp: i64, key: Option<&[u8]>, value: Option<&[u8]>, headers: &[Header<'_>]) {
        let delta = if self.count == 0 { 0 } else { self.last_delta + 1 };
        self.push_raw(delta, timestamp, key, value, |buf| encode_headers(buf, headers));
    }

    /// The records pushed so far, in order: what a transport that speaks another wire
    /// format (Kafka) re-encodes. Keys, values and headers borrow the builder's buffer.
    ///
    /// ```
    /// use faust_storage::BatchBuilder;
    ///
    /// let mut batch = BatchBuilder::new();
    /// batch.push(7, Some(b"k"), None, &[(b"h", Some(b"v"))]);
    /// let r = batch.records().next().unwrap();
    /// assert_eq!((r.timestamp, r.key, r.value), (7, Some(&b"k"[..]), None));
    /// assert_eq!(r.headers.collect::<Vec<_>>(), vec![(&b"h"[..], Some(&b"v"[..]))]);
    /// ```
    pub fn records(&self) -> BuiltRecords<'_> {
        BuiltRecords { buf: &self.buf, raw: RawRecords::new(&self.buf) }
    }

    /// Adds a record with an explicit offset delta (relative to the batch's first record)
    /// and an already-encoded header section. Used by the compactor to keep offsets.
    pub(crate) fn push_with_delta(
        &mut self,
        delta: u32,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        raw_headers: &[u8],
    ) {
        self.push_raw(delta, timestamp, key, value, |buf| buf.extend_from_slice(raw_headers));
    }

    fn push_raw(
        &mut self,
        delta: u32,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        write_headers: impl FnOnce(&mut Vec<u8>),
    ) {
        debug_assert!(self.count == 0 || delta > self.last_delta);
        let flags = if key.is_some() { FLAG_KEY } else { 0 } | if value.is_some() { FLAG_VALUE } else { 0 };
        let key = key.unwrap_or_default();
        let value = value.unwrap_or_default();
        let start = self.buf.len();
        self.buf.reserve(RECORD_HEADER_LEN + key.len() + value.len());
        self.buf.push(flags);
        self.buf.extend_from_slice(&delta.to_le_bytes());
        self.buf.extend_from_slice(&timestamp.to_le_bytes());
        self.buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&0u32.to_le_bytes()); // headers length, patched below
        self.buf.extend_from_slice(key);
        self.buf.extend_from_slice(value);
        let headers_start = self.buf.len();
        write_headers(&mut self.buf);
        let headers_len = (self.buf.len() - headers_start) as u32;
        self.buf[start + 21..start + 25].copy_from_slice(&headers_len.to_le_bytes());
        if self.count == 0 {
            self.first_timestamp = timestamp;
        }
        self.max_timestamp = self.max_timestamp.max(timestamp);
        self.last_delta = delta;
        self.count += 1;
    }

    /// The records in batches of at most `max` encoded bytes each, in order (offset deltas
    /// numbered again from 0 in each); `None` when one record alone is larger.
    pub(crate) fn split(&self, max: usize) -> Option<Vec<BatchBuilder>> {
        let mut pieces = Vec::new();
        let mut piece = BatchBuilder::with_capacity(max.min(self.buf.len()));
        for r in self.raw_records() {
            let size = (r.end() - r.start) as usize;
            if BATCH_HEADER_LEN + size > max {
                return None;
            }
            if !piece.is_empty() && piece.encoded_len() + size > max {
                let next = BatchBuilder::with_capacity(max.min(self.buf.len()));
                pieces.push(std::mem::replace(&mut piece, next));
            }
            let delta = if piece.is_empty() { 0 } else { piece.last_delta + 1 };
            let slice = |(p, l): (u32, u32)| &self.buf[p as usize..(p + l) as usize];
            let headers = slice(r.headers);
            piece.push_raw(delta, r.timestamp, r.key.map(slice), r.value.map(slice), |buf| {
                buf.extend_from_slice(headers)
            });
        }
        if !piece.is_empty() {
            pieces.push(piece);
        }
        Some(pieces)
    }

    /// The records' encoded bytes (without the batch header), for the store to index.
    pub(crate) fn raw_records(&self) -> RawRecords<'_> {
        RawRecords::new(&self.buf)
    }

    /// Stamps the header with `base_offset` and the checksum, and returns the finished bytes.
    pub(crate) fn seal(&mut self, base_offset: u64) -> &[u8] {
        let len = self.buf.len() as u32;
        let b = &mut self.buf;
        b[0..4].copy_from_slice(&len.to_le_bytes());
        b[8..16].copy_from_slice(&base_offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.last_delta.to_le_bytes());
        b[20..24].copy_from_slice(&self.count.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_timestamp.to_le_bytes());
        b[32..40].copy_from_slice(&self.max_timestamp.to_le_bytes());
        b[40..48].fill(0);
        let crc = crc32c::crc32c(&b[8..]);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        &self.buf
    }

    pub(crate) fn last_offset_delta(&self) -> u32 {
        self.last_delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_header_round_trips_and_detects_damage() {
        let h = SegmentHeader { base_offset: 42, covered_end: 99, created_ms: 7 };
        let mut b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        b[20] ^= 1;
        assert!(matches!(SegmentHeader::decode(&b), Err(FormatError::HeaderChecksum { .. })));
        assert!(matches!(SegmentHeader::decode(&b[..10]), Err(FormatError::ShortHeader { .. })));
    }

    #[test]
    fn sealed_batch_validates_and_iterates() {
        let mut bb = BatchBuilder::new();
        bb.push(10, Some(b"k1"), Some(b"v1"), &[(b"h", Some(b"x")), (b"n", None)]);
        bb.push(5, None, None, &[]);
        let bytes = bb.seal(100).to_vec();
        let h = validate_batch(&bytes).unwrap();
        assert_eq!((h.base_offset, h.record_count, h.last_offset_delta), (100, 2, 1));
        assert_eq!((h.first_timestamp, h.max_timestamp), (10, 10));
        let recs: Vec<_> = RawRecords::new(&bytes).collect();
        assert_eq!(recs.len(), 2);
        let (kp, kl) = recs[0].key.unwrap();
        assert_eq!(&bytes[kp as usize..(kp + kl) as usize], b"k1");
        assert_eq!(recs[1].key, None);
        assert_eq!(recs[1].value, None);
    }

    #[test]
    fn built_records_iterate_what_was_pushed() {
        let mut bb = BatchBuilder::new();
        assert_eq!(bb.records().count(), 0);
        bb.push(10, Some(b"k1"), Some(b"v1"), &[(b"h", Some(b"x")), (b"n", None), (b"h", Some(b""))]);
        bb.push(-5, None, None, &[]);
        bb.push(3, Some(b""), Some(b""), &[]);
        let recs: Vec<_> = bb.records().collect();
        assert_eq!(recs.len(), 3);
        assert_eq!((recs[0].timestamp, recs[0].key, recs[0].value), (10, Some(&b"k1"[..]), Some(&b"v1"[..])));
        let headers: Vec<_> = recs[0].headers.clone().collect();
        assert_eq!(headers, vec![(&b"h"[..], Some(&b"x"[..])), (&b"n"[..], None), (&b"h"[..], Some(&b""[..]))]);
        assert_eq!((recs[1].timestamp, recs[1].key, recs[1].value), (-5, None, None));
        assert_eq!(recs[1].headers.clone().count(), 0);
        assert_eq!((recs[2].key, recs[2].value), (Some(&b""[..]), Some(&b""[..])));
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let mut bb = BatchBuilder::new();
        bb.push(1, Some(b"key"), Some(b"value"), &[(b"a", Some(b"b"))]);
        let good = bb.seal(0).to_vec();
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                assert!(validate_batch(&bad).is_err(), "flip of bit {bit} in byte {i} accepted");
            }
        }
    }

    #[test]
    fn empty_or_short_input_is_an_error_not_a_panic() {
        assert!(validate_batch(&[]).is_err());
        assert!(validate_batch(&[0u8; 47]).is_err());
        assert!(validate_batch(&[0u8; 200]).is_err());
        assert!(validate_batch(&[0xffu8; 200]).is_err());
    }
}
