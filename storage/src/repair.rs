//! Repair of a log whose durable data is damaged: what [`Log::repair`](crate::Log::repair)
//! does.
//!
//! An open cuts a torn tail past the recovery point by itself (a crash left it). Damage below
//! the recovery point is different: those records were synced and may have been read,
//! committed and acted on, so an open refuses it ([`Error::Corruption`] or
//! [`Error::Inconsistent`]) rather than drop data silently, and a read that meets a damaged
//! batch fails the same way. Repair is the explicit step after that:
//!
//! - Every batch of every segment is checked (length, checksum, record structure, offsets in
//!   order). Past a damaged batch the scan looks for the next valid one (first where the
//!   damaged batch's length says it ends, then byte by byte), so damage in the middle of a
//!   segment costs only the batches it touched.
//! - A segment with damage is rewritten without the damaged batches. The records kept keep
//!   their offsets, and the segment's *covered end* (see the format docs) is set to where its
//!   offsets ended before the damage — the next segment's base, or the recovery point for the
//!   last one — so the log's offsets, and every offset committed against it, stay valid: the
//!   damaged records read as a gap, like records removed by compaction.
//! - A missing segment in the middle and data cut short below the recovery point are repaired
//!   the same way (a gap where the data was).
//! - The damaged original is kept in `DIR/damaged/` (quarantined), never deleted.
//!
//! The rewrite uses compaction's crash-safe swap: the new file is written as `BASE.cleaned`,
//! synced, renamed to `BASE.swap`; then the original moves to `damaged/`, and the swap is
//! renamed to `BASE.log`. An open after a crash anywhere in that sequence finds either the
//! original, or the finished swap and installs it.

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::files::{DirLock, sync_dir};
use crate::format::{BATCH_HEADER_LEN, BatchHeader, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, SegmentHeader};
use crate::log::{LogConfig, read_recovery_point, tidy_leftovers};
use crate::segment::{Segment, now_ms, segment_file_name};

/// The quarantine directory inside a log's directory.
pub(crate) const DAMAGED_DIR: &str = "damaged";

/// What a repair found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RepairReport {
    /// The log's directory.
    pub dir: PathBuf,
    /// Segment files checked.
    pub segments_checked: usize,
    /// Segment files rewritten without their damaged parts.
    pub segments_repaired: usize,
    /// Damaged batches dropped.
    pub batches_dropped: usize,
    /// The offset ranges whose records are gone (damaged, or missing below the recovery
    /// point), in order. Offsets in a range may never have held a record (compaction gaps).
    pub lost: Vec<Range<u64>>,
    /// Where the damaged originals were moved.
    pub quarantined: Vec<PathBuf>,
}

impl RepairReport {
    /// Whether nothing was damaged (and nothing changed).
    pub fn is_clean(&self) -> bool {
        self.segments_repaired == 0
    }

    /// How many offsets the lost ranges span (an upper bound of the records lost).
    pub fn lost_offsets(&self) -> u64 {
        self.lost.iter().map(|r| r.end - r.start).sum()
    }

    /// The lost ranges as text (`100..164, 900..1000`), for messages.
    pub fn lost_ranges(&self) -> String {
        let ranges: Vec<String> = self.lost.iter().map(|r| format!("{}..{}", r.start, r.end)).collect();
        if ranges.is_empty() { "none".to_string() } else { ranges.join(", ") }
    }
}

impl std::fmt::Display for RepairReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_clean() {
            return write!(f, "{}: {} segments checked, no damage", self.dir.display(), self.segments_checked);
        }
        write!(
            f,
            "{}: {} of {} segments repaired, {} damaged batches dropped, offsets lost: {} ({} offsets); originals kept in {}",
            self.dir.display(),
            self.segments_repaired,
            self.segments_checked,
            self.batches_dropped,
            self.lost_ranges(),
            self.lost_offsets(),
            self.dir.join(DAMAGED_DIR).display()
        )
    }
}

/// Repairs the log in `dir` (see the module docs). The directory must not be open (the lock
/// is taken for the duration).
pub(crate) fn repair(dir: &Path, config: &LogConfig) -> Result<RepairReport> {
    config.validate()?;
    let _lock = DirLock::acquire(dir)?;
    let (bases, renamed) = tidy_leftovers(dir)?;
    if renamed {
        sync_dir(dir)?;
    }
    let (_, recovery_point) = read_recovery_point(dir)?;
    let mut report = RepairReport { dir: dir.to_path_buf(), ..RepairReport::default() };
    let mut covered_until = 0u64;
    // Segments an earlier compacted segment accounts for are leftovers that an open deletes.
    let live: Vec<u64> = bases
        .iter()
        .copied()
        .filter(|&base| {
            let keep = base >= covered_until;
            if keep && let Some(end) = covered_end_of(&dir.join(segment_file_name(base))) {
                covered_until = covered_until.max(end);
            }
            keep
        })
        .collect();
    for (i, &base) in live.iter().enumerate() {
        let next_base = live.get(i + 1).copied();
        report.segments_checked += 1;
        let path = dir.join(segment_file_name(base));
        let bytes = std::fs::read(&path).map_err(|e| Error::io("read segment", &path, e))?;
        // Where this segment's offsets must reach: the next segment's base, or for the last
        // one the recovery point (everything below it was synced, and may have been read).
        let must_reach = next_base.unwrap_or(recovery_point);
        let found = scan_segment(&bytes, base, next_base, must_reach);
        if !found.damaged {
            continue;
        }
        let header = SegmentHeader::decode(&bytes).ok().filter(|h| h.base_offset == base);
        let covered_end = header.map_or(0, |h| h.covered_end).max(must_reach).max(found.end).max(base + 1);
        let created_ms = header.map_or_else(now_ms, |h| h.created_ms);
        let new_header = SegmentHeader { base_offset: base, covered_end, created_ms };
        let quarantined = rewrite(dir, base, &path, &bytes, &found.kept, new_header, config)?;
        report.segments_repaired += 1;
        report.batches_dropped += found.dropped;
        report.lost.extend(found.lost);
        report.quarantined.push(quarantined);
    }
    if report.segments_repaired > 0 {
        tracing::warn!(dir = %dir.display(), segments = report.segments_repaired, batches = report.batches_dropped,
            lost = %report.lost_ranges(), "repaired a damaged log");
    }
    Ok(report)
}

/// The covered end in a segment's header, if the header is readable and sets one.
fn covered_end_of(path: &Path) -> Option<u64> {
    use std::io::Read;
    let mut header = [0u8; SEGMENT_HEADER_LEN];
    std::fs::File::open(path).ok()?.read_exact(&mut header).ok()?;
    SegmentHeader::decode(&header).ok().map(|h| h.covered_end).filter(|&e| e > 0)
}

/// What a scan of one segment's bytes found.
#[derive(Debug, Default)]
struct Found {
    /// The valid batches to keep: (position, length).
    kept: Vec<(usize, usize)>,
    /// Offset ranges lost to damage.
    lost: Vec<Range<u64>>,
    dropped: usize,
    /// The offset after the last kept batch.
    end: u64,
    damaged: bool,
}

/// Checks every batch of a segment, skipping damage (see the module docs). Batches must end
/// before `bound` (the next segment's base); the data must reach `must_reach`, past which
/// invalid bytes are a torn write that an open cuts by itself.
fn scan_segment(bytes: &[u8], base: u64, bound: Option<u64>, must_reach: u64) -> Found {
    let header = SegmentHeader::decode(bytes).ok().filter(|h| h.base_offset == base);
    let mut found = Found { end: base, damaged: header.is_none(), ..Found::default() };
    // A compacted segment (or one repaired before) may start past its base.
    let starts_anywhere = header.is_none_or(|h| h.covered_end != 0);
    // The offsets the segment accounts for even where it holds no record.
    let covered = header.map_or(0, |h| h.covered_end);
    let mut pos = SEGMENT_HEADER_LEN;
    loop {
        let rest = bytes.get(pos..).unwrap_or_default();
        let at_end = rest.len() < 4 || rest[..4] == [0, 0, 0, 0];
        if at_end && found.end.max(covered) >= must_reach {
            break;
        }
        let first = found.kept.is_empty() && found.lost.is_empty();
        let valid = (!at_end).then(|| check(rest, found.end, bound, first && !starts_anywhere)).flatten();
        if let Some(h) = valid {
            found.kept.push((pos, h.len as usize));
            found.end = h.last_offset() + 1;
            pos += h.len as usize;
            continue;
        }
        match resync(bytes, pos, found.end, bound) {
            Some((next_pos, next_base)) => {
                // Valid data after invalid bytes: damage, not a torn write.
                if next_base > found.end {
                    found.lost.push(found.end..next_base);
                }
                found.damaged = true;
                found.dropped += 1;
                found.end = next_base;
                pos = next_pos;
            }
            None if bound.is_none() && found.end >= must_reach => {
                // Invalid bytes at the end of the log, past everything that was synced: a
                // torn write, which an open cuts. (A sealed segment was complete when sealed.)
                break;
            }
            None => {
                found.damaged = true;
                found.dropped += usize::from(!at_end);
                found.lost.push(found.end..must_reach);
                found.end = must_reach;
                break;
            }
        }
    }
    found
}

/// The batch at the start of `rest` if it is valid and fits: it starts at or after `from`
/// (exactly at `from` for the first batch of a plain segment) and ends before `bound`.
fn check(rest: &[u8], from: u64, bound: Option<u64>, exact_start: bool) -> Option<BatchHeader> {
    let h = crate::format::validate_batch(rest).ok()?;
    let last = h.base_offset.checked_add(u64::from(h.last_offset_delta))?;
    let fits = h.base_offset >= from && bound.is_none_or(|end| last < end);
    (fits && (!exact_start || h.base_offset == from)).then_some(h)
}

/// The next valid batch after the damaged bytes at `pos`: first where the damaged batch's
/// own length says the next one starts, then at every later byte. Cheap checks of the header
/// come before the checksum, so the search is fast over garbage.
fn resync(bytes: &[u8], pos: usize, from: u64, bound: Option<u64>) -> Option<(usize, u64)> {
    let try_at = |q: usize| -> Option<u64> {
        let rest = bytes.get(q..)?;
        let h = BatchHeader::peek(rest)?;
        let len = h.len as usize;
        if len < BATCH_HEADER_LEN + RECORD_HEADER_LEN
            || len > rest.len()
            || h.base_offset < from
            || h.record_count == 0
            || u64::from(h.record_count) > u64::from(h.last_offset_delta) + 1
            || bound.is_some_and(|end| h.base_offset >= end)
        {
            return None;
        }
        check(rest, from, bound, false).map(|h| h.base_offset)
    };
    if let Some(h) = BatchHeader::peek(bytes.get(pos..).unwrap_or_default()) {
        let skip = pos + h.len as usize;
        if h.len as usize >= BATCH_HEADER_LEN
            && let Some(base) = try_at(skip)
        {
            return Some((skip, base));
        }
    }
    (pos + 1..bytes.len().saturating_sub(BATCH_HEADER_LEN)).find_map(|q| try_at(q).map(|base| (q, base)))
}

/// Writes the kept batches into a new segment file and swaps it in for `path`, moving the
/// original to the quarantine directory. Returns where the original went.
fn rewrite(
    dir: &Path,
    base: u64,
    path: &Path,
    bytes: &[u8],
    kept: &[(usize, usize)],
    header: SegmentHeader,
    config: &LogConfig,
) -> Result<PathBuf> {
    let cleaned = dir.join(format!("{base:020}.cleaned"));
    crate::files::remove_file(&cleaned)?;
    let size: u64 = kept.iter().map(|&(_, len)| len as u64).sum::<u64>() + SEGMENT_HEADER_LEN as u64;
    let mut out = Segment::create(cleaned.clone(), 0, header, size, config.index_interval_bytes)?;
    let written = (|| {
        for &(at, len) in kept {
            out.append(&bytes[at..at + len])?;
        }
        out.sync()?;
        out.seal()
    })();
    if let Err(e) = written {
        drop(out);
        crate::files::remove_file(&cleaned)?;
        return Err(e);
    }
    drop(out);
    let swap = dir.join(format!("{base:020}.swap"));
    std::fs::rename(&cleaned, &swap).map_err(|e| Error::io("rename repaired segment", &cleaned, e))?;
    sync_dir(dir)?;
    let quarantine = dir.join(DAMAGED_DIR);
    std::fs::create_dir_all(&quarantine).map_err(|e| Error::io("create directory", &quarantine, e))?;
    let aside = quarantine.join(format!("{}.{}", segment_file_name(base), now_ms()));
    std::fs::rename(path, &aside).map_err(|e| Error::io("move a damaged segment aside", path, e))?;
    std::fs::rename(&swap, path).map_err(|e| Error::io("install repaired segment", &swap, e))?;
    sync_dir(dir)?;
    sync_dir(&quarantine)?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BatchBuilder, Log, Record};

    fn small() -> LogConfig {
        LogConfig { segment_bytes: 8192, index_interval_bytes: 256, ..LogConfig::default() }
    }

    /// A log of `n` records, one per batch, synced.
    fn log_with(dir: &Path, n: u64) {
        let mut log = Log::open(dir, small()).unwrap();
        let mut b = BatchBuilder::new();
        for i in 0..n {
            b.push(i as i64, Some(format!("k{i}").as_bytes()), Some(format!("value-{i}").as_bytes()), &[]);
            log.append(&mut b).unwrap();
        }
        log.sync().unwrap();
    }

    fn offsets(dir: &Path) -> Vec<u64> {
        let log = Log::open(dir, small()).unwrap();
        let mut out = Vec::new();
        let mut next = log.earliest_offset();
        while next < log.high_watermark() {
            let batches = log.read(next, 1 << 20).unwrap();
            if batches.is_empty() {
                break;
            }
            for b in &batches {
                out.extend(b.records_from(next).map(|r: Record| r.offset));
                next = b.last_offset() + 1;
            }
        }
        out
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        v.sort();
        v
    }

    /// Flips one byte at `at` of `path`.
    fn flip(path: &Path, at: u64) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    }

    #[test]
    fn a_clean_log_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 300);
        let report = Log::repair(dir.path(), small()).unwrap();
        assert!(report.is_clean(), "{report}");
        assert!(report.segments_checked > 1);
        assert_eq!(offsets(dir.path()), (0..300).collect::<Vec<_>>());
    }

    #[test]
    fn a_flipped_byte_below_the_recovery_point_costs_only_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 300);
        let first = segments(dir.path())[0].clone();
        // Inside the third batch's payload.
        flip(&first, SEGMENT_HEADER_LEN as u64 + 2 * 90 + 70);
        let log = Log::open(dir.path(), small()).unwrap();
        let err = (0..300).find_map(|o| log.read(o, 1 << 20).err()).expect("a read meets the damage");
        assert!(err.is_corruption(), "{err}");
        drop(log);
        let report = Log::repair(dir.path(), small()).unwrap();
        assert_eq!((report.segments_repaired, report.batches_dropped), (1, 1), "{report}");
        assert_eq!(report.lost.len(), 1, "{report}");
        assert_eq!(report.lost_offsets(), 1, "{report}");
        let lost = report.lost[0].start;
        let expected: Vec<u64> = (0..300).filter(|&o| o != lost).collect();
        assert_eq!(offsets(dir.path()), expected);
        assert!(report.quarantined[0].exists());
        // A second repair finds nothing more, and appends continue at the same offsets.
        assert!(Log::repair(dir.path(), small()).unwrap().is_clean());
        let mut log = Log::open(dir.path(), small()).unwrap();
        assert_eq!(log.high_watermark(), 300);
        let mut b = BatchBuilder::new();
        b.push(0, None, Some(b"more"), &[]);
        assert_eq!(log.append(&mut b).unwrap().base_offset, 300);
    }

    #[test]
    fn a_tail_cut_below_the_recovery_point_keeps_the_offsets() {
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 300);
        let last = segments(dir.path()).pop().unwrap();
        let len = std::fs::metadata(&last).unwrap().len();
        // Cut into the data: the open refuses it, since it was synced.
        let data = std::fs::read(&last).unwrap();
        let end = data.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
        std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(end.min(len) - 30).unwrap();
        let err = Log::open(dir.path(), small()).unwrap_err();
        assert!(err.is_corruption(), "{err}");
        let report = Log::repair(dir.path(), small()).unwrap();
        assert_eq!(report.lost, vec![299..300], "{report}");
        let log = Log::open(dir.path(), small()).unwrap();
        assert_eq!(log.high_watermark(), 300, "the offsets that were synced stay taken");
        drop(log);
        assert_eq!(offsets(dir.path()), (0..299).collect::<Vec<_>>());
    }

    #[test]
    fn a_damaged_header_and_a_missing_segment_are_gaps() {
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 400);
        let segs = segments(dir.path());
        assert!(segs.len() >= 4, "{segs:?}");
        flip(&segs[0], 20); // the first segment's header
        let second_base: u64 = segs[1].file_stem().unwrap().to_str().unwrap().parse().unwrap();
        let third_base: u64 = segs[2].file_stem().unwrap().to_str().unwrap().parse().unwrap();
        std::fs::remove_file(&segs[1]).unwrap();
        assert!(Log::open(dir.path(), small()).is_err());
        let report = Log::repair(dir.path(), small()).unwrap();
        assert_eq!(report.lost, vec![second_base..third_base], "{report}");
        let expected: Vec<u64> = (0..400).filter(|o| !(second_base..third_base).contains(o)).collect();
        assert_eq!(offsets(dir.path()), expected);
    }

    #[test]
    fn a_torn_tail_past_the_recovery_point_is_not_damage() {
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 50);
        {
            let mut log = Log::open(dir.path(), small()).unwrap();
            let mut b = BatchBuilder::new();
            b.push(0, None, Some(b"unsynced"), &[]);
            log.append(&mut b).unwrap();
        }
        let last = segments(dir.path()).pop().unwrap();
        let data = std::fs::read(&last).unwrap();
        let end = data.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
        std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(end - 3).unwrap();
        let report = Log::repair(dir.path(), small()).unwrap();
        assert!(report.is_clean(), "{report}");
        assert_eq!(offsets(dir.path()), (0..50).collect::<Vec<_>>());
    }

    /// Damage anywhere never makes repair fail or lose a batch it did not have to: every
    /// batch whose bytes are intact is still read after a repair (checked over many flips).
    #[test]
    fn repair_keeps_every_intact_batch() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            log_with(dir.path(), 200);
            let segs = segments(dir.path());
            let victim = &segs[rng.gen_range(0..segs.len())];
            let len = std::fs::metadata(victim).unwrap().len();
            let flips = rng.gen_range(1..4);
            for _ in 0..flips {
                flip(victim, rng.gen_range(0..len));
            }
            let report = Log::repair(dir.path(), small()).unwrap();
            let left = offsets(dir.path());
            let lost: u64 = report.lost_offsets();
            assert!(lost <= 200, "{report}");
            assert_eq!(left.len() as u64 + lost, 200, "{report}: {} read back", left.len());
            assert!(left.windows(2).all(|w| w[0] < w[1]));
            let again = Log::repair(dir.path(), small()).unwrap();
            assert!(again.is_clean(), "first: {report:?}\nsecond: {again:?}");
        }
    }
}
