//! Fuzz target: opening arbitrary segment, checkpoint and recovery-point files as a `Log` and
//! as a `Store`, then reading, writing and reopening, must never panic (or crash, hang or
//! allocate without bound). Errors are fine; they are what damaged files should produce.
//!
//! Input layout: one flags byte, then length-prefixed pieces (u16 little-endian length, then
//! that many bytes; a short input ends early):
//!
//! 1. the first segment, written as `00000000000000000000.log`;
//! 2. the second segment (flags bit 1): its first 2 bytes are its base offset (u16 LE, at
//!    least 1), the rest its contents, written as `<base as 20 digits>.log`;
//! 3. the `CHECKPOINT` file (flags bit 2);
//! 4. the `recovery-point` file (flags bit 3).
//!
//! With flags bit 0, the target repairs magic bytes, versions and checksums of the segment
//! headers, the batches (walking their length fields) and the checkpoint before writing them,
//! so the fuzzer reaches the checks behind the checksums instead of stopping at them.

#![no_main]

use std::path::Path;

use faust_storage::{BatchBuilder, Log, LogConfig, Store, StoreConfig, SyncPolicy};
use libfuzzer_sys::fuzz_target;

const SEGMENT_HEADER_LEN: usize = 64;
const BATCH_HEADER_LEN: usize = 48;

fn take<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    if data.len() < 2 {
        return None;
    }
    let len = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let piece = &data[2..2 + len];
    *data = &data[2 + len..];
    Some(piece)
}

fn fix_segment(seg: &mut [u8], base: u64) {
    if seg.len() < SEGMENT_HEADER_LEN {
        return;
    }
    seg[0..8].copy_from_slice(b"FAUSTSEG");
    seg[8..10].copy_from_slice(&1u16.to_le_bytes());
    seg[16..24].copy_from_slice(&base.to_le_bytes());
    let crc = crc32c::crc32c(&seg[0..60]);
    seg[60..64].copy_from_slice(&crc.to_le_bytes());
    let mut pos = SEGMENT_HEADER_LEN;
    while pos + BATCH_HEADER_LEN <= seg.len() {
        let len = u32::from_le_bytes([seg[pos], seg[pos + 1], seg[pos + 2], seg[pos + 3]]) as usize;
        if len < BATCH_HEADER_LEN || pos + len > seg.len() {
            break;
        }
        let crc = crc32c::crc32c(&seg[pos + 8..pos + len]);
        seg[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        pos += len;
    }
}

fn fix_checkpoint(ckpt: &mut [u8]) {
    if ckpt.len() < 48 {
        return;
    }
    let n = ckpt.len();
    ckpt[0..8].copy_from_slice(b"FAUSTCKP");
    ckpt[8..10].copy_from_slice(&1u16.to_le_bytes());
    ckpt[40..44].copy_from_slice(&((n - 48) as u32).to_le_bytes());
    let crc = crc32c::crc32c(&ckpt[..n - 4]);
    ckpt[n - 4..].copy_from_slice(&crc.to_le_bytes());
}

fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) {
    std::fs::create_dir_all(dir).expect("create dir");
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).expect("write file");
    }
}

fn exercise_log(dir: &Path) {
    let config = LogConfig { segment_bytes: 4096, index_interval_bytes: 256, ..LogConfig::default() };
    let Ok(mut log) = Log::open(dir, config.clone()) else { return };
    let (earliest, hw) = (log.earliest_offset(), log.high_watermark());
    assert!(earliest <= hw);
    let mut next = earliest;
    for _ in 0..10_000 {
        if next >= log.high_watermark() {
            break;
        }
        let Ok(batches) = log.read(next, 1000) else { break };
        let Some(last) = batches.last() else { break };
        for b in &batches {
            for r in b.records_from(next) {
                assert!(r.offset >= next);
                let _ = r.headers().count();
            }
        }
        next = last.last_offset() + 1;
    }
    for from in [earliest, hw / 2, hw] {
        let _ = log.read(from, 1);
    }
    let mut b = BatchBuilder::new();
    b.push(1, Some(b"k"), Some(b"v"), &[]);
    if let Ok(a) = log.append(&mut b) {
        assert_eq!(a.base_offset, hw);
        if log.sync().is_ok() {
            let _ = log.compact(i64::MAX);
            drop(log);
            // What this log synced itself must open, with the appended record.
            let log = Log::open(dir, config).expect("reopen after a sync");
            assert!(log.high_watermark() > hw);
            let _ = log.read(log.earliest_offset(), 1 << 20);
        }
    }
}

fn exercise_store(dir: &Path) {
    let config = StoreConfig { segment_bytes: 4096, sync: SyncPolicy::Never, min_dirty_ratio: 0.0 };
    let Ok(mut store) = Store::open(dir, config.clone()) else { return };
    let pairs: Vec<_> = store.iter().collect();
    assert_eq!(pairs.len(), store.len());
    for (k, v) in &pairs {
        assert_eq!(store.get(k).as_ref(), Some(v));
    }
    let before = store.last_checkpoint().clone();
    if store.put(b"fuzz", b"value").is_ok() && store.checkpoint(b"fuzz").is_ok() {
        let _ = store.compact();
        drop(store);
        // What this store wrote and checkpointed itself must open.
        let store = Store::open(dir, config).expect("reopen after a checkpoint");
        assert_eq!(store.get(b"fuzz").as_deref(), Some(&b"value"[..]));
        assert_eq!(store.last_checkpoint().sequence, before.sequence.saturating_add(1));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else { return };
    let fix = flags & 1 != 0;
    let mut files = Vec::new();
    let mut first = take(&mut rest).unwrap_or_default().to_vec();
    if fix {
        fix_segment(&mut first, 0);
    }
    files.push((format!("{:020}.log", 0), first));
    if flags & 2 != 0
        && let Some(piece) = take(&mut rest)
        && piece.len() >= 2
    {
        let base = u64::from(u16::from_le_bytes([piece[0], piece[1]]));
        let mut seg = piece[2..].to_vec();
        if fix {
            fix_segment(&mut seg, base);
        }
        // A base of 0 would overwrite the first segment: the second one starts later.
        files.push((format!("{:020}.log", base.max(1)), seg));
    }
    if flags & 4 != 0
        && let Some(piece) = take(&mut rest)
    {
        let mut ckpt = piece.to_vec();
        if fix {
            fix_checkpoint(&mut ckpt);
        }
        files.push(("CHECKPOINT".to_string(), ckpt));
    }
    if flags & 8 != 0
        && let Some(piece) = take(&mut rest)
    {
        files.push(("recovery-point".to_string(), piece.to_vec()));
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let log_dir = tmp.path().join("log");
    let store_dir = tmp.path().join("store");
    write_files(&log_dir, &files);
    write_files(&store_dir, &files);
    exercise_log(&log_dir);
    exercise_store(&store_dir);
});
