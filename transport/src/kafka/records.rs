//! Kafka RecordBatch v2 (magic 2), written from a [`BatchBuilder`] and read into
//! [`Record`]s.
//!
//! ```text
//! batch header (61 bytes, big-endian)
//!   0  base offset i64          8  batch length i32 (bytes after this field)
//!   12 partition leader epoch   16 magic i8 (2)             17 crc32c u32 of bytes 21..
//!   21 attributes i16           23 last offset delta i32    27 base timestamp i64
//!   35 max timestamp i64        43 producer id i64          51 producer epoch i16
//!   53 base sequence i32        57 record count i32
//! record: length varint, attributes i8, timestamp delta varlong, offset delta varint,
//!   key length varint (-1 = null), key, value length varint, value,
//!   header count varint, { name length varint, name, value length varint, value }*
//! ```
//!
//! Varints are zig-zag encoded. Batches are written uncompressed; fetched batches may be
//! compressed with any of Kafka's codecs (gzip, snappy, lz4, zstd).

use bytes::Bytes;
use faust_storage::{BatchBuilder, Record};

pub(crate) const BATCH_HEADER_LEN: usize = 61;
const MAGIC: i8 = 2;
const ATTR_COMPRESSION: i16 = 0x07;
const ATTR_TRANSACTIONAL: i16 = 0x10;
const ATTR_CONTROL: i16 = 0x20;

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn varint_len(v: i64) -> usize {
    let mut u = zigzag(v);
    let mut n = 1;
    while u >= 0x80 {
        u >>= 7;
        n += 1;
    }
    n
}

fn put_varint(buf: &mut Vec<u8>, v: i64) {
    let mut u = zigzag(v);
    while u >= 0x80 {
        buf.push((u as u8) | 0x80);
        u >>= 7;
    }
    buf.push(u as u8);
}

fn bytes_len(b: Option<&[u8]>) -> usize {
    match b {
        Some(b) => varint_len(b.len() as i64) + b.len(),
        None => 1,
    }
}

fn put_bytes(buf: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            put_varint(buf, b.len() as i64);
            buf.extend_from_slice(b);
        }
        None => put_varint(buf, -1),
    }
}

/// An idempotent producer's mark on a batch: who wrote it, and the sequence number of its
/// first record within the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) producer_id: i64,
    pub(crate) epoch: i16,
    pub(crate) base_sequence: i32,
    /// Written inside a transaction (the batch's transactional attribute).
    pub(crate) transactional: bool,
}

/// `sequence` advanced by `count`, wrapping to 0 after `i32::MAX` as Kafka's sequences do.
pub(crate) fn next_sequence(sequence: i32, count: i32) -> i32 {
    if sequence > i32::MAX - count { count - (i32::MAX - sequence) - 1 } else { sequence + count }
}

/// RecordBatches encoded back to back; each is sent in a Produce request of its own (Kafka
/// takes one batch per partition per request).
#[derive(Debug, Default)]
pub(crate) struct Encoded {
    pub(crate) bytes: Vec<u8>,
    pub(crate) batches: Vec<EncodedBatch>,
}

/// Where one batch is in [`Encoded::bytes`], and which records it holds.
#[derive(Debug, Clone)]
pub(crate) struct EncodedBatch {
    pub(crate) range: std::ops::Range<usize>,
    /// Its records.
    pub(crate) count: i32,
    /// The index, in the source batch, of its first record.
    pub(crate) first_record: usize,
}

/// Encodes the records of `batch` from the `skip`th on as RecordBatches of at most about
/// `max_batch_bytes` each before compression (a record larger than that gets a batch of its
/// own). Offsets and timestamps are relative to each batch's first record; the broker assigns
/// the offsets. `codec` is Kafka's compression attribute (0 none, 1 gzip, 2 snappy, 3 lz4,
/// 4 zstd). With a `stamp`, the batches carry the producer's id and epoch and consecutive
/// sequence numbers from its base sequence.
pub(crate) fn encode(
    batch: &BatchBuilder,
    max_batch_bytes: usize,
    codec: i16,
    stamp: Option<Stamp>,
    skip: usize,
) -> Result<Encoded, String> {
    let mut out = Vec::with_capacity(batch.encoded_len() + BATCH_HEADER_LEN);
    let mut batches = Vec::new();
    let mut records = batch.records().skip(skip).peekable();
    let mut first_record = skip;
    let mut sequence = stamp.map_or(-1, |s| s.base_sequence);
    while records.peek().is_some() {
        let start = out.len();
        out.resize(start + BATCH_HEADER_LEN, 0);
        let mut count: i32 = 0;
        let mut base_ts = 0i64;
        let mut max_ts = i64::MIN;
        while let Some(r) = records.peek() {
            let headers: Vec<_> = r.headers.clone().collect();
            let ts_delta = if count == 0 { 0 } else { r.timestamp.wrapping_sub(base_ts) };
            let body_len = 1
                + varint_len(ts_delta)
                + varint_len(i64::from(count))
                + bytes_len(r.key)
                + bytes_len(r.value)
                + varint_len(headers.len() as i64)
                + headers.iter().map(|(n, v)| bytes_len(Some(n)) + bytes_len(*v)).sum::<usize>();
            if count > 0 && out.len() - start + body_len + 5 > max_batch_bytes {
                break;
            }
            if count == 0 {
                base_ts = r.timestamp;
            }
            max_ts = max_ts.max(r.timestamp);
            put_varint(&mut out, body_len as i64);
            out.push(0); // record attributes: unused
            put_varint(&mut out, ts_delta);
            put_varint(&mut out, i64::from(count));
            put_bytes(&mut out, r.key);
            put_bytes(&mut out, r.value);
            put_varint(&mut out, headers.len() as i64);
            for (name, value) in &headers {
                put_bytes(&mut out, Some(name));
                put_bytes(&mut out, *value);
            }
            count += 1;
            records.next();
        }
        if codec != 0 {
            let packed = compress(codec, &out[start + BATCH_HEADER_LEN..])?;
            out.truncate(start + BATCH_HEADER_LEN);
            out.extend_from_slice(&packed);
        }
        let h = &mut out[start..];
        let batch_len = (h.len() - 12) as i32;
        h[0..8].copy_from_slice(&0i64.to_be_bytes());
        h[8..12].copy_from_slice(&batch_len.to_be_bytes());
        h[12..16].copy_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
        h[16] = MAGIC as u8;
        let transactional = if stamp.is_some_and(|s| s.transactional) { ATTR_TRANSACTIONAL } else { 0 };
        h[21..23].copy_from_slice(&((codec & ATTR_COMPRESSION) | transactional).to_be_bytes()); // create time
        h[23..27].copy_from_slice(&(count - 1).to_be_bytes());
        h[27..35].copy_from_slice(&base_ts.to_be_bytes());
        h[35..43].copy_from_slice(&max_ts.to_be_bytes());
        // Without a stamp: producer id, epoch and sequence -1 (not idempotent).
        h[43..51].copy_from_slice(&stamp.map_or(-1, |s| s.producer_id).to_be_bytes());
        h[51..53].copy_from_slice(&stamp.map_or(-1, |s| s.epoch).to_be_bytes());
        h[53..57].copy_from_slice(&sequence.to_be_bytes());
        h[57..61].copy_from_slice(&count.to_be_bytes());
        let crc = crc32c::crc32c(&h[21..]);
        h[17..21].copy_from_slice(&crc.to_be_bytes());
        if stamp.is_some() {
            sequence = next_sequence(sequence, count);
        }
        batches.push(EncodedBatch { range: start..out.len(), count, first_record });
        first_record += count as usize;
    }
    Ok(Encoded { bytes: out, batches })
}

fn compress(codec: i16, data: &[u8]) -> Result<Vec<u8>, String> {
    use kafka_protocol::compression::{Compressor, Gzip, Lz4, Snappy, Zstd};
    fn with<C: Compressor<bytes::BytesMut>>(data: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = bytes::BytesMut::with_capacity(data.len() / 2 + 64);
        C::compress(&mut out, |b| {
            bytes::BufMut::put_slice(b, data);
            Ok(())
        })
        .map_err(|e| format!("{e:#}"))?;
        Ok(out.to_vec())
    }
    match codec {
        1 => with::<Gzip>(data),
        2 => with::<Snappy>(data),
        3 => with::<Lz4>(data),
        4 => with::<Zstd>(data),
        other => Err(format!("unknown codec {other}")),
    }
}

/// Why a fetched record set could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// A batch's checksum does not match its bytes.
    Checksum { base_offset: i64 },
    /// A batch of another format (magic 0 or 1).
    Magic { base_offset: i64, magic: i8 },
    /// A compressed batch that does not decompress (or of an unknown codec).
    Compressed { base_offset: i64, codec: i16, reason: String },
    /// A record's fields run past its batch, or lengths are negative where they may not be.
    Malformed { base_offset: i64, what: &'static str },
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Checksum { base_offset } => write!(f, "batch at offset {base_offset}: checksum mismatch"),
            DecodeError::Magic { base_offset, magic } => {
                write!(f, "batch at offset {base_offset}: message format {magic} is not supported (only 2)")
            }
            DecodeError::Compressed { base_offset, codec, reason } => {
                write!(f, "batch at offset {base_offset}: cannot decompress (codec {codec}): {reason}")
            }
            DecodeError::Malformed { base_offset, what } => {
                write!(f, "batch at offset {base_offset}: malformed {what}")
            }
        }
    }
}

/// What one fetched record set held.
#[derive(Debug, Default)]
pub(crate) struct Decoded {
    /// Records at or after the requested offset.
    pub(crate) records: Vec<Record>,
    /// One past the last offset of the last whole batch (control batches included), if any.
    pub(crate) next_offset: Option<u64>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base_offset: i64,
}

impl Reader<'_> {
    fn malformed(&self, what: &'static str) -> DecodeError {
        DecodeError::Malformed { base_offset: self.base_offset, what }
    }

    fn varint(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        let mut u: u64 = 0;
        let mut shift = 0;
        loop {
            let b = *self.buf.get(self.pos).ok_or_else(|| self.malformed(what))?;
            self.pos += 1;
            u |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return Err(self.malformed(what));
            }
        }
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    /// A length-prefixed field, as a range of the buffer; `None` for length -1.
    fn field(&mut self, what: &'static str) -> Result<Option<std::ops::Range<usize>>, DecodeError> {
        let len = self.varint(what)?;
        if len < 0 {
            return Ok(None);
        }
        let end =
            self.pos.checked_add(len as usize).filter(|&e| e <= self.buf.len()).ok_or_else(|| self.malformed(what))?;
        let r = self.pos..end;
        self.pos = end;
        Ok(Some(r))
    }
}

/// Decompresses the records of a batch compressed with `codec` (1 gzip, 2 snappy in the
/// framing Kafka's Java client writes, 3 lz4 frames, 4 zstd), with kafka-protocol's codecs.
fn decompress(codec: i16, mut data: Bytes) -> Result<Bytes, String> {
    use kafka_protocol::compression::{Decompressor, Gzip, Lz4, Snappy, Zstd};
    let take = |b: &mut Bytes| Ok(std::mem::take(b));
    let out = match codec {
        1 => Gzip::decompress(&mut data, take),
        2 => Snappy::decompress(&mut data, take),
        3 => Lz4::decompress(&mut data, take),
        4 => Zstd::decompress(&mut data, take),
        other => return Err(format!("unknown codec {other}")),
    };
    out.map_err(|e| format!("{e:#}"))
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}

fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

/// Decodes a fetched record set (`records` of one partition in a Fetch response) into
/// records with offset at least `from`. Keys and values are slices of `set` (no copy); a
/// record with headers gets its headers re-encoded in the storage format. A partial batch at
/// the end (the broker cuts at the byte limit) is ignored; control batches are skipped.
///
/// For a `read_committed` fetch, `aborted` is the answer's list of aborted transactions,
/// (producer id, first offset): a transactional batch of a producer whose aborted transaction
/// began at or before it is skipped, until that producer's abort marker (a control batch)
/// ends the transaction — the rule of Kafka's own consumer. With `None`, every data batch is
/// read (`read_uncommitted`).
pub(crate) fn decode(set: &Bytes, from: u64, aborted: Option<&[(i64, i64)]>) -> Result<Decoded, DecodeError> {
    let mut pending_aborts: Vec<(i64, i64)> = aborted.map(<[_]>::to_vec).unwrap_or_default();
    // Latest first offset last, so the next one to open is popped from the end.
    pending_aborts.sort_by_key(|&(_, first)| std::cmp::Reverse(first));
    let mut aborting: std::collections::HashSet<i64> = std::collections::HashSet::new();
    let mut out = Decoded::default();
    let mut pos = 0usize;
    let mut headers: Vec<(std::ops::Range<usize>, Option<std::ops::Range<usize>>)> = Vec::new();
    while set.len() - pos >= 17 {
        let base_offset = be_i64(set, pos);
        let batch_len = be_i32(set, pos + 8);
        if batch_len < (BATCH_HEADER_LEN - 12) as i32 {
            return Err(DecodeError::Malformed { base_offset, what: "batch length" });
        }
        let end = pos + 12 + batch_len as usize;
        if end > set.len() {
            break; // partial batch
        }
        let magic = set[pos + 16] as i8;
        if magic != MAGIC {
            return Err(DecodeError::Magic { base_offset, magic });
        }
        let b = &set[pos..end];
        let crc = u32::from_be_bytes([b[17], b[18], b[19], b[20]]);
        if crc32c::crc32c(&b[21..]) != crc {
            return Err(DecodeError::Checksum { base_offset });
        }
        let attributes = be_i16(b, 21);
        let last_offset_delta = be_i32(b, 23);
        let base_ts = be_i64(b, 27);
        let producer_id = be_i64(b, 43);
        let count = be_i32(b, 57);
        let last_offset = base_offset.saturating_add(i64::from(last_offset_delta));
        let batch_next = last_offset.saturating_add(1).max(0) as u64;
        if aborted.is_some() {
            while pending_aborts.last().is_some_and(|&(_, first)| first <= last_offset) {
                if let Some((pid, _)) = pending_aborts.pop() {
                    aborting.insert(pid);
                }
            }
            let transactional = attributes & ATTR_TRANSACTIONAL != 0;
            if attributes & ATTR_CONTROL != 0 {
                if transactional && control_type(b) == Some(CONTROL_ABORT) {
                    aborting.remove(&producer_id);
                }
            } else if transactional && aborting.contains(&producer_id) {
                out.next_offset = Some(batch_next);
                pos = end;
                continue;
            }
        }
        if attributes & ATTR_CONTROL != 0 || batch_next <= from {
            out.next_offset = Some(batch_next);
            pos = end;
            continue;
        }
        // The records: a slice of the fetched buffer, or the decompressed copy of it.
        let data = set.slice(pos + BATCH_HEADER_LEN..end);
        let data = match attributes & ATTR_COMPRESSION {
            0 => data,
            codec => {
                decompress(codec, data).map_err(|reason| DecodeError::Compressed { base_offset, codec, reason })?
            }
        };
        let b = &data[..];
        let mut r = Reader { buf: b, pos: 0, base_offset };
        out.records.reserve(count.max(0) as usize);
        for _ in 0..count.max(0) {
            let len = r.varint("record length")?;
            let rec_end = r
                .pos
                .checked_add(len.max(0) as usize)
                .filter(|&e| e <= b.len())
                .ok_or_else(|| r.malformed("record length"))?;
            r.pos += 1; // attributes
            let ts_delta = r.varint("timestamp delta")?;
            let offset_delta = r.varint("offset delta")?;
            let key = r.field("key")?;
            let value = r.field("value")?;
            let n_headers = r.varint("header count")?;
            headers.clear();
            for _ in 0..n_headers.max(0) {
                let name = r.field("header name")?.ok_or_else(|| r.malformed("header name"))?;
                let value = r.field("header value")?;
                headers.push((name, value));
            }
            if r.pos != rec_end {
                return Err(r.malformed("record length"));
            }
            let offset = base_offset.checked_add(offset_delta).ok_or_else(|| r.malformed("offset delta"))?;
            if offset < 0 || (offset as u64) < from {
                continue;
            }
            let slice = |range: std::ops::Range<usize>| data.slice(range);
            let timestamp = base_ts.wrapping_add(ts_delta);
            let (key, value) = (key.map(slice), value.map(slice));
            let record = if headers.is_empty() {
                Record::new(offset as u64, timestamp, key, value)
            } else {
                let hs: Vec<(&[u8], Option<&[u8]>)> =
                    headers.iter().map(|(n, v)| (&b[n.clone()], v.clone().map(|v| &b[v]))).collect();
                Record::with_headers(offset as u64, timestamp, key, value, &hs)
            };
            out.records.push(record);
        }
        out.next_offset = Some(batch_next);
        pos = end;
    }
    Ok(out)
}

/// A control record's type: an abort marker.
const CONTROL_ABORT: i16 = 0;

/// The type of the control record in the (uncompressed) control batch `b`: its key is
/// version i16, type i16.
fn control_type(b: &[u8]) -> Option<i16> {
    let mut r = Reader { buf: b.get(BATCH_HEADER_LEN..)?, pos: 0, base_offset: 0 };
    r.varint("record length").ok()?;
    r.pos += 1;
    r.varint("timestamp delta").ok()?;
    r.varint("offset delta").ok()?;
    let key = r.field("key").ok()??;
    let key = r.buf.get(key)?;
    (key.len() >= 4).then(|| i16::from_be_bytes([key[2], key[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(b: &BatchBuilder, max: usize) -> Vec<u8> {
        encode(b, max, 0, None, 0).unwrap().bytes
    }

    fn sample() -> BatchBuilder {
        let mut b = BatchBuilder::new();
        b.push(1_700_000_000_000, Some(b"k1"), Some(b"v1"), &[(b"h", Some(b"x")), (b"n", None), (b"h", Some(b""))]);
        b.push(1_699_999_999_000, None, Some(b""), &[]);
        b.push(1_700_000_000_500, Some(b""), None, &[]);
        b
    }

    /// Sets the base offset of every batch of an encoded set, as a broker does.
    fn place(mut set: Vec<u8>, mut base: i64) -> Bytes {
        let mut pos = 0;
        while pos < set.len() {
            let len = be_i32(&set, pos + 8) as usize;
            let count = be_i32(&set, pos + 57);
            set[pos..pos + 8].copy_from_slice(&base.to_be_bytes());
            base = base.wrapping_add(i64::from(count));
            pos += 12 + len;
        }
        Bytes::from(set)
    }

    #[test]
    fn encoded_batches_decode_to_the_same_records() {
        let b = sample();
        let set = place(plain(&b, 1 << 20), 100);
        let d = decode(&set, 0, None).unwrap();
        assert_eq!(d.next_offset, Some(103));
        assert_eq!(d.records.len(), 3);
        for (i, (got, want)) in d.records.iter().zip(b.records()).enumerate() {
            assert_eq!(got.offset, 100 + i as u64);
            assert_eq!(got.timestamp, want.timestamp);
            assert_eq!(got.key.as_deref(), want.key);
            assert_eq!(got.value.as_deref(), want.value);
            assert_eq!(got.headers().collect::<Vec<_>>(), want.headers.collect::<Vec<_>>());
        }
        // Keys are slices of the fetched buffer.
        let k = d.records[0].key.as_ref().unwrap();
        let range = set.as_ptr() as usize..set.as_ptr() as usize + set.len();
        assert!(range.contains(&(k.as_ptr() as usize)));
    }

    #[test]
    fn stamped_batches_number_their_records_consecutively() {
        let mut b = BatchBuilder::new();
        for i in 0..100u32 {
            b.push(i64::from(i), Some(&i.to_be_bytes()), Some(&[7u8; 50]), &[]);
        }
        let stamp = Stamp { producer_id: 77, epoch: 3, base_sequence: i32::MAX - 30, transactional: false };
        let enc = encode(&b, 1000, 0, Some(stamp), 10).unwrap();
        assert!(enc.batches.len() > 2);
        let mut sequence = stamp.base_sequence;
        let mut first = 10;
        for batch in &enc.batches {
            let h = &enc.bytes[batch.range.clone()];
            assert_eq!(be_i64(h, 43), 77);
            assert_eq!(be_i16(h, 51), 3);
            assert_eq!(be_i32(h, 53), sequence);
            assert_eq!(be_i32(h, 57), batch.count);
            assert_eq!(batch.first_record, first);
            // Each batch stands alone: its CRC covers exactly its bytes.
            assert_eq!(crc32c::crc32c(&h[21..]), u32::from_be_bytes([h[17], h[18], h[19], h[20]]));
            sequence = next_sequence(sequence, batch.count);
            first += batch.count as usize;
        }
        assert_eq!(first, 100);
        // 90 records from i32::MAX - 30 wrap past i32::MAX to 0: (MAX - 30 + 90) mod (MAX + 1).
        assert_eq!(sequence, 59);
        let set = place(enc.bytes, 0);
        let d = decode(&set, 0, None).unwrap();
        assert_eq!(d.records.len(), 90);
        assert_eq!(d.records[0].timestamp, 10);
    }

    /// A transactional batch of `pid` with `values`, placed at `base`.
    fn txn_batch(pid: i64, base: i64, values: &[&str]) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for v in values {
            b.push(0, None, Some(v.as_bytes()), &[]);
        }
        let stamp = Stamp { producer_id: pid, epoch: 0, base_sequence: 0, transactional: true };
        place(encode(&b, 1 << 20, 0, Some(stamp), 0).unwrap().bytes, base).to_vec()
    }

    /// `pid`'s end marker (`commit` or abort) at `offset`: a control batch whose one record's
    /// key is (version 0, type).
    fn marker(pid: i64, offset: i64, commit: bool) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        let key = [0u8, 0, 0, u8::from(commit)];
        b.push(0, Some(&key), Some(&[0, 0, 0, 0, 0, 0]), &[]);
        let stamp = Stamp { producer_id: pid, epoch: 0, base_sequence: -1, transactional: true };
        let mut set = encode(&b, 1 << 20, 0, Some(stamp), 0).unwrap().bytes;
        let attributes = be_i16(&set, 21) | ATTR_CONTROL;
        set[21..23].copy_from_slice(&attributes.to_be_bytes());
        let crc = crc32c::crc32c(&set[21..]);
        set[17..21].copy_from_slice(&crc.to_be_bytes());
        place(set, offset).to_vec()
    }

    fn values(d: &Decoded) -> Vec<(u64, String)> {
        d.records
            .iter()
            .map(|r| (r.offset, String::from_utf8_lossy(r.value.as_deref().unwrap()).into_owned()))
            .collect()
    }

    #[test]
    fn read_committed_skips_aborted_transactions_only() {
        // Producer 7 aborts its first transaction and commits its second; producer 8's
        // transaction, interleaved with 7's aborted one, commits; a plain batch follows.
        let mut set = Vec::new();
        set.extend(txn_batch(7, 0, &["a0", "a1"]));
        set.extend(txn_batch(8, 2, &["b0"]));
        set.extend(txn_batch(7, 3, &["a2"]));
        set.extend(marker(7, 4, false));
        set.extend(marker(8, 5, true));
        set.extend(txn_batch(7, 6, &["c0"]));
        set.extend(marker(7, 7, true));
        let mut plain = BatchBuilder::new();
        plain.push(0, None, Some(b"p0"), &[]);
        set.extend(place(encode(&plain, 1 << 20, 0, None, 0).unwrap().bytes, 8).to_vec());
        let set = Bytes::from(set);
        let all = decode(&set, 0, None).unwrap();
        assert_eq!(values(&all).len(), 6, "read_uncommitted sees every data record");
        let committed = decode(&set, 0, Some(&[(7, 0)])).unwrap();
        let want = vec![(2, "b0".to_string()), (6, "c0".into()), (8, "p0".into())];
        assert_eq!(values(&committed), want);
        assert_eq!(committed.next_offset, Some(9));
        // From the middle of the aborted transaction, and with nothing aborted.
        assert_eq!(values(&decode(&set, 3, Some(&[(7, 0)])).unwrap()), want[1..].to_vec());
        assert_eq!(values(&decode(&set, 0, Some(&[])).unwrap()), values(&all));
    }

    #[test]
    fn sequences_wrap_as_kafka_wraps_them() {
        assert_eq!(next_sequence(0, 5), 5);
        assert_eq!(next_sequence(i32::MAX, 1), 0);
        assert_eq!(next_sequence(i32::MAX - 1, 3), 1);
    }

    #[test]
    fn small_batch_limit_splits_and_offsets_follow() {
        let mut b = BatchBuilder::new();
        for i in 0..100u32 {
            b.push(i64::from(i), Some(&i.to_be_bytes()), Some(&[7u8; 50]), &[]);
        }
        let raw = plain(&b, 1000);
        let set = place(raw, 0);
        let d = decode(&set, 0, None).unwrap();
        assert_eq!(d.records.len(), 100);
        assert!(d.records.iter().enumerate().all(|(i, r)| r.offset == i as u64 && r.timestamp == i as i64));
        // From the middle of a batch, and with the last batch cut short.
        let d = decode(&set, 42, None).unwrap();
        assert_eq!(d.records.first().map(|r| r.offset), Some(42));
        let cut = set.slice(..set.len() - 10);
        let d = decode(&cut, 0, None).unwrap();
        assert!(d.records.len() < 100 && d.next_offset == Some(d.records.len() as u64));
    }

    /// Recompresses the one batch of `set` with `C` as codec `codec`.
    fn compressed<C: kafka_protocol::compression::Compressor<bytes::BytesMut>>(set: &Bytes, codec: i16) -> Bytes {
        use bytes::BufMut;
        let mut data = bytes::BytesMut::new();
        C::compress(&mut data, |b| {
            b.put_slice(&set[BATCH_HEADER_LEN..]);
            Ok(())
        })
        .unwrap();
        let mut out = set[..BATCH_HEADER_LEN].to_vec();
        out.extend_from_slice(&data);
        let len = (out.len() - 12) as i32;
        out[8..12].copy_from_slice(&len.to_be_bytes());
        out[21..23].copy_from_slice(&codec.to_be_bytes());
        let crc = crc32c::crc32c(&out[21..]);
        out[17..21].copy_from_slice(&crc.to_be_bytes());
        Bytes::from(out)
    }

    #[test]
    fn batches_we_compress_decode_to_the_same_records() {
        let mut b = BatchBuilder::new();
        for i in 0..300u32 {
            b.push(i64::from(i), Some(&i.to_be_bytes()), Some(format!("value {i} {}", "z".repeat(40)).as_bytes()), &[]);
        }
        let want = decode(&place(plain(&b, 4096), 0), 0, None).unwrap().records;
        for codec in 1..=4 {
            let raw = encode(&b, 4096, codec, None, 0).unwrap().bytes;
            assert!(raw.len() < b.encoded_len() / 2, "codec {codec}: {} bytes", raw.len());
            assert_eq!(decode(&place(raw, 0), 0, None).unwrap().records, want, "codec {codec}");
        }
        assert!(encode(&b, 4096, 9, None, 0).is_err());
    }

    #[test]
    fn compressed_batches_decode_with_every_codec() {
        use kafka_protocol::compression::{Gzip, Lz4, Snappy, Zstd};
        let b = sample();
        let plain = place(plain(&b, 1 << 20), 7);
        let want = decode(&plain, 0, None).unwrap().records;
        for (codec, set) in [
            (1, compressed::<Gzip>(&plain, 1)),
            (2, compressed::<Snappy>(&plain, 2)),
            (3, compressed::<Lz4>(&plain, 3)),
            (4, compressed::<Zstd>(&plain, 4)),
        ] {
            let d = decode(&set, 8, None).unwrap();
            assert_eq!(d.records, want[1..].to_vec(), "codec {codec}");
            assert_eq!(d.next_offset, Some(10));
        }
        let bad = compressed::<Gzip>(&plain, 5);
        assert!(matches!(decode(&bad, 0, None), Err(DecodeError::Compressed { codec: 5, .. })));
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let set = place(plain(&sample(), 1 << 20), 0).to_vec();
        for i in 0..set.len() {
            let mut bad = set.clone();
            bad[i] ^= 0x55;
            let _ = decode(&Bytes::from(bad), 0, None);
        }
        let mut bad = set.clone();
        bad[30] ^= 1;
        assert!(matches!(decode(&Bytes::from(bad), 0, None), Err(DecodeError::Checksum { .. })));
        assert_eq!(decode(&Bytes::new(), 0, None).unwrap().records.len(), 0);
        // Offsets at the end of the range: an error or records, never an overflow.
        let set = place(plain(&sample(), 1 << 20), i64::MAX - 1);
        assert!(matches!(decode(&set, 0, None), Err(DecodeError::Malformed { .. })));
    }

    type Rec = (i64, Option<Vec<u8>>, Option<Vec<u8>>, Vec<(Vec<u8>, Option<Vec<u8>>)>);

    fn arb_record() -> impl proptest::strategy::Strategy<Value = Rec> {
        use proptest::prelude::*;
        let bytes = || proptest::collection::vec(any::<u8>(), 0..40);
        (
            any::<i64>().prop_map(|t| t / 4), // deltas from the first timestamp stay in range
            proptest::option::of(bytes()),
            proptest::option::of(bytes()),
            proptest::collection::vec((bytes(), proptest::option::of(bytes())), 0..4),
        )
    }

    proptest::proptest! {
        /// Any records, split by any batch limit, placed at any base offset, decode to the
        /// same records (from any offset on).
        #[test]
        fn batches_round_trip(
            recs in proptest::collection::vec(arb_record(), 1..60),
            limit in 1usize..4000,
            base in 0i64..1_000_000,
            skip in 0usize..70,
        ) {
            let mut b = BatchBuilder::new();
            for (ts, k, v, hs) in &recs {
                let hs: Vec<(&[u8], Option<&[u8]>)> = hs.iter().map(|(n, v)| (&n[..], v.as_deref())).collect();
                b.push(*ts, k.as_deref(), v.as_deref(), &hs);
            }
            let set = place(plain(&b, limit), base);
            let from = base as u64 + skip as u64;
            let d = decode(&set, from, None).unwrap();
            proptest::prop_assert_eq!(d.next_offset, Some(base as u64 + recs.len() as u64));
            let want: Vec<_> = recs.iter().enumerate().skip(skip).collect();
            proptest::prop_assert_eq!(d.records.len(), want.len());
            for (r, (i, (ts, k, v, hs))) in d.records.iter().zip(want) {
                proptest::prop_assert_eq!(r.offset, base as u64 + i as u64);
                proptest::prop_assert_eq!(r.timestamp, *ts);
                proptest::prop_assert_eq!(r.key.as_deref(), k.as_deref());
                proptest::prop_assert_eq!(r.value.as_deref(), v.as_deref());
                let got: Vec<_> = r.headers().map(|(n, v)| (n.to_vec(), v.map(<[u8]>::to_vec))).collect();
                proptest::prop_assert_eq!(&got, hs);
            }
        }
    }

    #[test]
    fn varints_round_trip() {
        for v in [0i64, 1, -1, 63, -64, 64, 300, -300, i32::MAX as i64, i64::MIN, i64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v));
            let mut r = Reader { buf: &buf, pos: 0, base_offset: 0 };
            assert_eq!(r.varint("v").unwrap(), v);
        }
    }
}
