//! Compaction: rewriting a group of consecutive sealed segments into one new file that keeps
//! only the records a `Liveness` policy wants, with their original offsets.
//!
//! The job runs in steps with a byte budget, so an owner can interleave it with its work.
//! Crash safety comes from the file names: the output is written as `BASE.cleaned` (deleted
//! on open if found), synced and renamed to `BASE.swap` (an open finishes the swap), then
//! renamed over `BASE.log` — the first input — after which the other inputs are deleted (an
//! open deletes segments that a compacted segment's covered end already accounts for). The
//! inputs' mappings stay valid after their files are replaced or deleted, so a store can
//! move its index over to the new positions in steps of its own.

use std::path::PathBuf;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::files::{remove_file, sync_dir};
use crate::format::{
    BATCH_HEADER_LEN, BatchBuilder, BatchHeader, RawRecord, RawRecords, SEGMENT_HEADER_LEN, SegmentHeader,
    validate_batch,
};
use crate::log::Log;
use crate::segment::{Segment, now_ms, segment_file_name};

/// Output batches are cut at about this size.
const OUTPUT_BATCH_BYTES: usize = 256 << 10;

/// What to do with one record of a segment being compacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Drop,
    /// Keep it; `tag` comes back with the record's new position (a store passes the key's
    /// hash so it can find the index entry again).
    Keep {
        tag: u64,
    },
}

/// Decides which records survive a compaction.
pub(crate) trait Liveness {
    /// `position` is the record's position in its segment; `batch` is its whole batch.
    fn decide(&mut self, segment: u32, position: u32, record: &RawRecord, batch: &[u8], offset: u64) -> Decision;
}

/// A kept record's old and new place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Move {
    pub(crate) old_segment: u32,
    pub(crate) old_position: u32,
    pub(crate) new_position: u32,
    pub(crate) tag: u64,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct JobStats {
    pub(crate) kept: u64,
    pub(crate) removed: u64,
    pub(crate) bytes_out: u64,
}

struct Input {
    id: u32,
    map: Bytes,
    len: u64,
    path: PathBuf,
}

pub(crate) struct CompactionJob {
    inputs: Vec<Input>,
    group: Vec<u32>,
    /// Next batch to read: input index and position in it.
    cursor: (usize, u64),
    out: Option<Segment>,
    final_path: PathBuf,
    builder: BatchBuilder,
    builder_base: u64,
    /// Kept records in `builder`: (old segment, old position, position in the builder, tag).
    pending: Vec<(u32, u32, u32, u64)>,
    moves: Vec<Move>,
    stats: JobStats,
}

impl std::fmt::Debug for CompactionJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompactionJob").field("group", &self.group).field("cursor", &self.cursor).finish()
    }
}

impl CompactionJob {
    /// Starts a job over the sealed, consecutive segments `group` of `log`.
    pub(crate) fn plan(log: &mut Log, group: &[u32]) -> Result<CompactionJob> {
        let segs = log.segments();
        let start = segs
            .iter()
            .position(|s| s.id == group[0])
            .ok_or_else(|| Error::Config("internal: compaction input missing".into()))?;
        let chosen = segs
            .get(start..start + group.len())
            .ok_or_else(|| Error::Config("internal: compaction group out of range".into()))?;
        if chosen.iter().any(|s| !s.sealed) || chosen.iter().map(|s| s.id).ne(group.iter().copied()) {
            return Err(Error::Config("internal: compaction group must be consecutive sealed segments".into()));
        }
        let base = chosen[0].base_offset;
        let covered_end = chosen[chosen.len() - 1].next_offset;
        let total: u64 = chosen.iter().map(|s| s.len).sum();
        let inputs: Vec<Input> =
            chosen.iter().map(|s| Input { id: s.id, map: s.map().clone(), len: s.len, path: s.path.clone() }).collect();
        // The output is never larger than the inputs, except for the headers of input batches
        // split at OUTPUT_BATCH_BYTES.
        let capacity = total + (total / (OUTPUT_BATCH_BYTES as u64 / 4) + 2) * BATCH_HEADER_LEN as u64;
        let dir = log.dir().to_path_buf();
        let temp_path = dir.join(format!("{base:020}.cleaned"));
        remove_file(&temp_path)?;
        let id = log.new_segment_id();
        let header = SegmentHeader { base_offset: base, covered_end, created_ms: now_ms() };
        let out = match Segment::create(temp_path, id, header, capacity, log.config().index_interval_bytes) {
            Ok(s) => s,
            Err(e) => {
                log.release(id);
                return Err(e);
            }
        };
        Ok(CompactionJob {
            inputs,
            group: group.to_vec(),
            cursor: (0, SEGMENT_HEADER_LEN as u64),
            out: Some(out),
            final_path: dir.join(segment_file_name(base)),
            builder: BatchBuilder::with_capacity(OUTPUT_BATCH_BYTES + 4096),
            builder_base: 0,
            pending: Vec::new(),
            moves: Vec::new(),
            stats: JobStats::default(),
        })
    }

    /// The id of the segment the job writes.
    pub(crate) fn output_id(&self) -> u32 {
        self.out.as_ref().map(|s| s.id).unwrap_or(u32::MAX)
    }

    pub(crate) fn stats(&self) -> JobStats {
        self.stats
    }

    /// Copies about `budget` bytes of input. Returns `true` once every input was read.
    pub(crate) fn step(&mut self, budget: usize, liveness: &mut dyn Liveness) -> Result<bool> {
        let mut done = 0usize;
        while done < budget {
            let (i, pos) = self.cursor;
            let Some(input) = self.inputs.get(i) else {
                self.flush()?;
                return Ok(true);
            };
            if pos >= input.len {
                self.cursor = (i + 1, SEGMENT_HEADER_LEN as u64);
                continue;
            }
            let data = &input.map[pos as usize..input.len as usize];
            let h = validate_batch(data).map_err(|reason| Error::Corruption {
                path: input.path.clone(),
                position: pos,
                reason,
            })?;
            let (id, map) = (input.id, input.map.clone());
            let batch = &map[pos as usize..pos as usize + h.len as usize];
            self.copy_batch(id, pos as u32, &h, batch, liveness)?;
            done += h.len as usize;
            self.cursor = (i, pos + u64::from(h.len));
        }
        Ok(false)
    }

    fn copy_batch(
        &mut self,
        segment: u32,
        batch_pos: u32,
        h: &BatchHeader,
        batch: &[u8],
        liveness: &mut dyn Liveness,
    ) -> Result<()> {
        for r in RawRecords::new(batch) {
            let offset = h.base_offset + u64::from(r.offset_delta);
            let position = batch_pos + r.start;
            match liveness.decide(segment, position, &r, batch, offset) {
                Decision::Drop => self.stats.removed += 1,
                Decision::Keep { tag } => {
                    let size = (r.end() - r.start) as usize;
                    if !self.builder.is_empty()
                        && (self.builder.encoded_len() + size > OUTPUT_BATCH_BYTES
                            || offset - self.builder_base > u64::from(u32::MAX))
                    {
                        self.flush()?;
                    }
                    if self.builder.is_empty() {
                        self.builder_base = offset;
                    }
                    let slice = |range: Option<(u32, u32)>| range.map(|(p, l)| &batch[p as usize..(p + l) as usize]);
                    let (hp, hl) = r.headers;
                    let rel = self.builder.encoded_len() as u32;
                    self.builder.push_with_delta(
                        (offset - self.builder_base) as u32,
                        r.timestamp,
                        slice(r.key),
                        slice(r.value),
                        &batch[hp as usize..(hp + hl) as usize],
                    );
                    self.pending.push((segment, position, rel, tag));
                    self.stats.kept += 1;
                }
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.builder.is_empty() {
            return Ok(());
        }
        let out = self.out.as_mut().ok_or_else(|| Error::Config("internal: compaction already installed".into()))?;
        let bytes = self.builder.seal(self.builder_base);
        let pos = out.append(bytes)?;
        self.stats.bytes_out += bytes.len() as u64;
        for (old_segment, old_position, rel, tag) in self.pending.drain(..) {
            self.moves.push(Move { old_segment, old_position, new_position: pos + rel, tag });
        }
        self.builder.clear();
        Ok(())
    }

    /// Makes the output durable and swaps it in for the inputs (see the module docs). Returns
    /// the ids of the replaced segments: their mappings stay readable until released.
    pub(crate) fn install(&mut self, log: &mut Log) -> Result<Vec<u32>> {
        self.flush()?;
        let mut out = self.out.take().ok_or_else(|| Error::Config("internal: compaction already installed".into()))?;
        let dir = log.dir().to_path_buf();
        let result = (|| {
            out.sync()?;
            out.seal()?;
            let swap = out.path.with_extension("swap");
            std::fs::rename(&out.path, &swap).map_err(|e| Error::io("rename compaction output", &out.path, e))?;
            out.path = swap;
            sync_dir(&dir)
        })();
        if let Err(e) = result {
            remove_file(&out.path)?;
            log.release(out.id);
            return Err(e);
        }
        // From here on an open finishes the swap, so the job must not be rolled back.
        std::fs::rename(&out.path, &self.final_path)
            .map_err(|e| Error::io("install compaction output", &out.path, e))?;
        out.path = self.final_path.clone();
        for input in self.inputs.iter().skip(1) {
            remove_file(&input.path)?;
        }
        sync_dir(&dir)?;
        log.replace_segments(&self.group, out)?;
        Ok(self.group.clone())
    }

    /// The kept records' moves, for a store to update its index.
    pub(crate) fn take_moves(&mut self) -> Vec<Move> {
        std::mem::take(&mut self.moves)
    }

    /// Gives up before `install`: deletes the partial output.
    pub(crate) fn abandon(mut self, log: &mut Log) -> Result<()> {
        if let Some(out) = self.out.take() {
            remove_file(&out.path)?;
            log.release(out.id);
        }
        Ok(())
    }
}

/// Liveness for a plain compacted log: a record is live when it is the latest of its key in
/// the segments being compacted and those after them up to the horizon. Tombstones go once
/// they are older than the cutoff and everything before their group was rewritten with this
/// key map (nothing older can hide behind them).
pub(crate) struct KeyMapLiveness {
    latest: hashbrown::HashMap<Bytes, u64, foldhash::fast::RandomState>,
    tombstone_cutoff_ms: i64,
    prefix: bool,
}

impl KeyMapLiveness {
    pub(crate) fn new(tombstone_cutoff_ms: i64) -> KeyMapLiveness {
        KeyMapLiveness {
            latest: hashbrown::HashMap::with_hasher(foldhash::fast::RandomState::default()),
            tombstone_cutoff_ms,
            prefix: false,
        }
    }

    /// Notes the keys of the batch at `pos` in `seg` (records at or past `horizon` take no
    /// part); returns the position of the next batch.
    fn scan_batch(&mut self, seg: &Segment, pos: u64, horizon: u64) -> Result<u64> {
        let map = seg.map();
        let data = &map[pos as usize..seg.len as usize];
        let h = validate_batch(data).map_err(|reason| Error::Corruption {
            path: seg.path.clone(),
            position: pos,
            reason,
        })?;
        for r in RawRecords::new(&data[..h.len as usize]) {
            let offset = h.base_offset + u64::from(r.offset_delta);
            if offset >= horizon {
                break;
            }
            if let Some((p, l)) = r.key {
                let start = pos as usize + p as usize;
                self.latest.insert(map.slice(start..start + l as usize), offset);
            }
        }
        Ok(pos + u64::from(h.len))
    }

    pub(crate) fn set_prefix(&mut self, prefix: bool) {
        self.prefix = prefix;
    }
}

impl Liveness for KeyMapLiveness {
    fn decide(&mut self, _segment: u32, _position: u32, r: &RawRecord, batch: &[u8], offset: u64) -> Decision {
        let Some((p, l)) = r.key else { return Decision::Keep { tag: 0 } };
        let key = &batch[p as usize..(p + l) as usize];
        match self.latest.get(key) {
            Some(&latest) if latest == offset => {
                if r.value.is_none() && self.prefix && r.timestamp < self.tombstone_cutoff_ms {
                    Decision::Drop
                } else {
                    Decision::Keep { tag: 0 }
                }
            }
            Some(&latest) if latest > offset => Decision::Drop,
            // Not in the map (or newer than it): keep, to be safe.
            _ => Decision::Keep { tag: 0 },
        }
    }
}

/// One pass of stepwise compaction over a compacted log: the sealed segments wholly below a
/// horizon, fixed when the pass starts. It first reads their keys (the latest offset of each),
/// then rewrites them group by group (neighbours merged while they fit in one segment), each
/// step doing about a budget's worth of bytes. Segments sealed later wait for the next pass;
/// the active segment and everything at or past the horizon take no part, so a record there
/// never replaces one below it.
pub(crate) struct CleaningPass {
    /// The segments of the pass, oldest first, by id. After a group is installed its ids
    /// are replaced by the output's.
    ids: Vec<u32>,
    /// The offset after the pass's last segment.
    pub(crate) end: u64,
    /// Reading keys: the segment (index into `ids`) and position of the next batch.
    scan: (usize, u64),
    liveness: KeyMapLiveness,
    /// The first segment (index into `ids`) of the next group to rewrite.
    next: usize,
    job: Option<(CompactionJob, std::ops::Range<usize>)>,
    pub(crate) outcome: crate::log::CompactionOutcome,
}

impl std::fmt::Debug for CleaningPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CleaningPass")
            .field("ids", &self.ids)
            .field("end", &self.end)
            .field("next", &self.next)
            .finish()
    }
}

impl CleaningPass {
    /// A pass over `segments`' sealed, consecutive leading segments that end at or before
    /// `horizon`, or `None` when there are none.
    pub(crate) fn plan(segments: &[Segment], horizon: u64, tombstone_cutoff_ms: i64) -> Option<CleaningPass> {
        let sealed = segments.len().saturating_sub(1);
        let chosen: Vec<&Segment> =
            segments[..sealed].iter().take_while(|s| s.sealed && s.next_offset <= horizon).collect();
        let end = chosen.last()?.next_offset;
        Some(CleaningPass {
            ids: chosen.iter().map(|s| s.id).collect(),
            end,
            scan: (0, SEGMENT_HEADER_LEN as u64),
            liveness: KeyMapLiveness::new(tombstone_cutoff_ms),
            next: 0,
            job: None,
            outcome: crate::log::CompactionOutcome::default(),
        })
    }

    /// Where the pass's segment `i` is in `log`, or an error when the log changed under the
    /// pass (it is then abandoned, and the next step plans a new one).
    fn locate(&self, log: &Log, i: usize) -> Result<usize> {
        let id = self.ids[i];
        log.segments()
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| Error::Config("internal: a segment of the compaction pass is gone".into()))
    }

    /// Does about `budget` bytes of work. Returns `true` once the pass is finished.
    pub(crate) fn step(&mut self, log: &mut Log, budget: usize) -> Result<bool> {
        let mut done = 0usize;
        // 1. Read the keys.
        while self.scan.0 < self.ids.len() {
            if done >= budget {
                return Ok(false);
            }
            let at = self.locate(log, self.scan.0)?;
            let seg = &log.segments()[at];
            if self.scan.1 >= seg.len {
                self.scan = (self.scan.0 + 1, SEGMENT_HEADER_LEN as u64);
                continue;
            }
            let next = self.liveness.scan_batch(seg, self.scan.1, self.end)?;
            done += (next - self.scan.1) as usize;
            self.scan.1 = next;
        }
        // 2. Rewrite the segments, one group at a time.
        loop {
            if self.job.is_none() {
                if self.next >= self.ids.len() {
                    return Ok(true);
                }
                let start = self.locate(log, self.next)?;
                let segs = log.segments();
                let limit = log.config().segment_bytes;
                let mut size = segs[start].len;
                let mut count = 1;
                while self.next + count < self.ids.len()
                    && segs.get(start + count).is_some_and(|s| s.id == self.ids[self.next + count])
                    && size + segs[start + count].len <= limit
                {
                    size += segs[start + count].len;
                    count += 1;
                }
                let group: Vec<u32> = self.ids[self.next..self.next + count].to_vec();
                // Tombstones go only from a group with nothing before it but what this pass
                // rewrote already: the pass starts at the head of the log and its key map
                // covers all of it, so every older record of a tombstone's key was dropped
                // from the groups before (installed in order). At the head of the log that is
                // every group of the pass: `start` is `self.next` exactly when each segment
                // before the group is an output of this pass.
                self.liveness.set_prefix(start == self.next);
                let job = CompactionJob::plan(log, &group)?;
                self.outcome.bytes_before += size;
                self.outcome.segments_compacted += count;
                self.job = Some((job, self.next..self.next + count));
            }
            if done >= budget {
                return Ok(false);
            }
            let Some((job, _)) = self.job.as_mut() else { continue };
            let finished = job.step(budget - done, &mut self.liveness)?;
            done = budget;
            if !finished {
                return Ok(false);
            }
            let Some((mut job, range)) = self.job.take() else { continue };
            let stats = job.stats();
            let output = job.output_id();
            let retired = job.install(log)?;
            for id in retired {
                log.release(id);
            }
            self.outcome.records_kept += stats.kept;
            self.outcome.records_removed += stats.removed;
            self.outcome.bytes_after += stats.bytes_out;
            // The group is one segment now: the output takes its place.
            self.ids.splice(range.clone(), [output]);
            self.next = range.start + 1;
        }
    }

    /// Gives the pass up, deleting a partial output.
    pub(crate) fn abandon(mut self, log: &mut Log) -> Result<()> {
        match self.job.take() {
            Some((job, _)) => job.abandon(log),
            None => Ok(()),
        }
    }
}
