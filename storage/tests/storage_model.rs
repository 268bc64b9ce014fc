//! Property tests of `Log` and `Store` against in-memory models.
//!
//! Random operation sequences run against the real types (on real files, with small segments
//! so that segments roll and compaction runs often) and against a plain Rust model, and the
//! two must agree after every step:
//!
//! - a [`Store`] against a `BTreeMap`: puts, deletes, write batches, checkpoints, compaction
//!   steps and reopens. A reopen must give exactly the state and metadata of the last
//!   checkpoint — the central promise of the store, which compaction must never break;
//! - a plain [`Log`] against a `Vec` of records: appends, syncs, reopens and reads from any
//!   offset with any byte limit return every record exactly (offset, timestamp, key, value,
//!   headers), reads that start inside a batch included;
//! - a compacted [`Log`]: after `compact`, every key's latest record is still there with its
//!   offset and value, no superseded record is left, offsets still increase, and a reopen
//!   reads the same.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use faust_storage::{
    BatchBuilder, CompactionProgress, Error, Log, LogConfig, Record, Store, StoreConfig, SyncPolicy, WriteBatch,
};
use proptest::prelude::*;

/// `cases` cases, unless `PROPTEST_CASES` asks for another number (for long runs).
fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

// ---------------------------------------------------------------------------------------------
// Store vs BTreeMap
// ---------------------------------------------------------------------------------------------

/// Keys come from a small space so that overwrites and deletes of live keys are common. Their
/// lengths vary, so records of different sizes sit side by side.
const KEY_SPACE: u8 = 64;

fn key(k: u8) -> Vec<u8> {
    let mut key = format!("key-{k}").into_bytes();
    key.resize(key.len() + usize::from(k % 5) * 3, b'~');
    key
}

#[derive(Debug, Clone)]
enum StoreOp {
    Put(u8, Vec<u8>),
    Delete(u8),
    Batch(Vec<(u8, Option<Vec<u8>>)>),
    Checkpoint(Vec<u8>),
    CompactStep(usize),
    Compact,
    Reopen,
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..300)
}

fn store_op() -> impl Strategy<Value = StoreOp> {
    prop_oneof![
        12 => (0..KEY_SPACE, value()).prop_map(|(k, v)| StoreOp::Put(k, v)),
        4 => (0..KEY_SPACE).prop_map(StoreOp::Delete),
        2 => prop::collection::vec((0..KEY_SPACE, prop::option::weighted(0.8, value())), 1..12)
            .prop_map(StoreOp::Batch),
        3 => prop::collection::vec(any::<u8>(), 0..40).prop_map(StoreOp::Checkpoint),
        4 => (1usize..4096).prop_map(StoreOp::CompactStep),
        1 => Just(StoreOp::Compact),
        2 => Just(StoreOp::Reopen),
    ]
}

fn store_config(sync: SyncPolicy, min_dirty_ratio: f64) -> StoreConfig {
    StoreConfig { segment_bytes: 4096, sync, min_dirty_ratio }
}

/// Compares everything a store exposes about its contents with the model.
fn check_store(store: &Store, model: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<(), TestCaseError> {
    let listed: Vec<(Bytes, Bytes)> = store.iter().collect();
    let as_map: BTreeMap<Vec<u8>, Vec<u8>> = listed.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
    prop_assert_eq!(listed.len(), as_map.len(), "iter yields a key twice");
    prop_assert_eq!(&as_map, model);
    prop_assert_eq!(store.len(), model.len());
    prop_assert_eq!(store.is_empty(), model.is_empty());
    for k in 0..KEY_SPACE {
        let key = key(k);
        let expected = model.get(&key).map(Vec::as_slice);
        let got = store.get(&key);
        prop_assert_eq!(got.as_deref(), expected, "get of key {}", k);
        prop_assert_eq!(store.get_ref(&key), expected, "get_ref of key {}", k);
        prop_assert_eq!(store.contains_key(&key), expected.is_some());
    }
    Ok(())
}

fn run_store_ops(ops: &[StoreOp], sync: SyncPolicy, min_dirty_ratio: f64) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir()?;
    let config = store_config(sync, min_dirty_ratio);
    let mut store = Some(Store::open(dir.path(), config.clone())?);
    let mut current: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut at_checkpoint = current.clone();
    let mut metadata: Vec<u8> = Vec::new();
    let mut sequence = 0u64;
    let mut wb = WriteBatch::new();
    for (step, op) in ops.iter().enumerate() {
        let s = store.as_mut().ok_or_else(|| TestCaseError::fail("store missing"))?;
        match op {
            StoreOp::Put(k, v) => {
                s.put(&key(*k), v)?;
                current.insert(key(*k), v.clone());
            }
            StoreOp::Delete(k) => {
                s.delete(&key(*k))?;
                current.remove(&key(*k));
            }
            StoreOp::Batch(ops) => {
                for (k, v) in ops {
                    match v {
                        Some(v) => {
                            wb.put(&key(*k), v);
                            current.insert(key(*k), v.clone());
                        }
                        None => {
                            wb.delete(&key(*k));
                            current.remove(&key(*k));
                        }
                    }
                }
                prop_assert_eq!(wb.len(), ops.len());
                s.write(&mut wb)?;
                prop_assert!(wb.is_empty(), "write clears the batch");
            }
            StoreOp::Checkpoint(m) => {
                s.checkpoint(m)?;
                at_checkpoint = current.clone();
                metadata = m.clone();
                sequence += 1;
                prop_assert_eq!(s.last_checkpoint().sequence, sequence);
                prop_assert_eq!(&s.last_checkpoint().metadata[..], &m[..]);
            }
            StoreOp::CompactStep(budget) => {
                s.compact_step(*budget)?;
            }
            StoreOp::Compact => s.compact()?,
            StoreOp::Reopen => {
                drop(store.take());
                let reopened = Store::open(dir.path(), config.clone())?;
                current = at_checkpoint.clone();
                prop_assert_eq!(&reopened.last_checkpoint().metadata[..], &metadata[..], "metadata after reopen");
                prop_assert_eq!(reopened.last_checkpoint().sequence, sequence);
                prop_assert_eq!(reopened.last_checkpoint().live_keys, current.len() as u64);
                store = Some(reopened);
            }
        }
        let s = store.as_ref().ok_or_else(|| TestCaseError::fail("store missing"))?;
        check_store(s, &current).map_err(|e| TestCaseError::fail(format!("after step {step} ({op:?}): {e}")))?;
    }
    // Whatever happened, a final reopen gives the last checkpoint.
    drop(store.take());
    let s = Store::open(dir.path(), config)?;
    check_store(&s, &at_checkpoint)?;
    prop_assert_eq!(&s.last_checkpoint().metadata[..], &metadata[..]);
    Ok(())
}

fn sync_policy() -> impl Strategy<Value = SyncPolicy> {
    prop_oneof![
        1 => Just(SyncPolicy::Checkpoint),
        3 => Just(SyncPolicy::Never),
        1 => Just(SyncPolicy::Interval(Duration::from_millis(5))),
    ]
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn store_matches_a_btreemap_across_checkpoints_compactions_and_reopens(
        ops in prop::collection::vec(store_op(), 1..200),
        sync in sync_policy(),
        ratio in prop_oneof![Just(0.0), Just(0.3), Just(0.5), Just(1.0)],
    ) {
        run_store_ops(&ops, sync, ratio)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Log vs Vec of records
// ---------------------------------------------------------------------------------------------

type Headers = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// One appended record as the model keeps it; its offset is its index in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    timestamp: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Headers,
}

#[derive(Debug, Clone)]
enum LogOp {
    Append(Vec<Rec>),
    Sync,
    Reopen,
    Roll,
    /// Read from a point between the earliest offset and the high-water mark (as a fraction
    /// in 1/1000) with this byte limit.
    Read(u16, usize),
}

fn rec(max_value: usize) -> impl Strategy<Value = Rec> {
    (
        any::<i64>(),
        prop::option::weighted(0.8, prop::collection::vec(any::<u8>(), 0..20)),
        prop::option::weighted(0.85, prop::collection::vec(any::<u8>(), 0..max_value)),
        prop::collection::vec(
            (
                prop::collection::vec(any::<u8>(), 0..8),
                prop::option::weighted(0.7, prop::collection::vec(any::<u8>(), 0..12)),
            ),
            0..3,
        ),
    )
        .prop_map(|(timestamp, key, value, headers)| Rec { timestamp, key, value, headers })
}

fn log_op() -> impl Strategy<Value = LogOp> {
    prop_oneof![
        10 => prop::collection::vec(rec(200), 1..20).prop_map(LogOp::Append),
        2 => Just(LogOp::Sync),
        2 => Just(LogOp::Reopen),
        1 => Just(LogOp::Roll),
        5 => (0u16..=1000, 1usize..10_000).prop_map(|(f, m)| LogOp::Read(f, m)),
    ]
}

fn record_matches(r: &Record, offset: u64, m: &Rec) -> Result<(), TestCaseError> {
    prop_assert_eq!(r.offset, offset);
    prop_assert_eq!(r.timestamp, m.timestamp, "timestamp at {}", offset);
    prop_assert_eq!(r.key.as_deref(), m.key.as_deref(), "key at {}", offset);
    prop_assert_eq!(r.value.as_deref(), m.value.as_deref(), "value at {}", offset);
    let headers: Headers = r.headers().map(|(n, v)| (n.to_vec(), v.map(<[u8]>::to_vec))).collect();
    prop_assert_eq!(&headers, &m.headers, "headers at {}", offset);
    Ok(())
}

fn builder_of(recs: &[Rec]) -> BatchBuilder {
    let mut b = BatchBuilder::new();
    for r in recs {
        let headers: Vec<(&[u8], Option<&[u8]>)> =
            r.headers.iter().map(|(n, v)| (n.as_slice(), v.as_deref())).collect();
        b.push(r.timestamp, r.key.as_deref(), r.value.as_deref(), &headers);
    }
    b
}

/// Reads every record from `from` to the high-water mark, `max_bytes` at a time.
fn read_all(log: &Log, from: u64, max_bytes: usize) -> Result<Vec<Record>, Error> {
    let mut out = Vec::new();
    let mut next = from;
    while next < log.high_watermark() {
        let batches = log.read(next, max_bytes)?;
        if batches.is_empty() {
            // Only possible in a compacted log whose last records were removed.
            break;
        }
        for b in &batches {
            out.extend(b.records_from(next));
            next = b.last_offset() + 1;
        }
    }
    Ok(out)
}

/// One read from `from`: the first batch holds `from`, the records from it on are exactly the
/// model's, and the byte limit is kept (beyond the first batch).
fn check_read(log: &Log, model: &[Rec], from: u64, max_bytes: usize) -> Result<(), TestCaseError> {
    let batches = log.read(from, max_bytes)?;
    let hw = model.len() as u64;
    if from == hw {
        prop_assert!(batches.is_empty(), "a read at the high-water mark returns nothing");
        return Ok(());
    }
    prop_assert!(!batches.is_empty(), "a read below the high-water mark returns a batch");
    prop_assert!(batches[0].base_offset() <= from && from <= batches[0].last_offset());
    let total: usize = batches.iter().map(|b| b.size_bytes()).sum();
    prop_assert!(
        total <= max_bytes.max(batches[0].size_bytes()),
        "read returned {} bytes for a limit of {}",
        total,
        max_bytes
    );
    let mut expected = from;
    for b in &batches {
        prop_assert_eq!(b.record_count() as u64, b.last_offset() - b.base_offset() + 1);
        if b.base_offset() > from {
            prop_assert_eq!(b.base_offset(), expected, "batches are contiguous");
        }
        for r in b.records_from(from) {
            prop_assert!(r.offset >= from);
            record_matches(&r, expected, &model[expected as usize])?;
            expected += 1;
        }
        prop_assert_eq!(expected, b.last_offset() + 1);
    }
    Ok(())
}

fn check_whole_log(log: &Log, model: &[Rec], max_bytes: usize) -> Result<(), TestCaseError> {
    prop_assert_eq!(log.high_watermark(), model.len() as u64);
    prop_assert_eq!(log.earliest_offset(), 0);
    let recs = read_all(log, 0, max_bytes)?;
    prop_assert_eq!(recs.len(), model.len());
    for (i, (r, m)) in recs.iter().zip(model).enumerate() {
        record_matches(r, i as u64, m)?;
    }
    Ok(())
}

fn log_config() -> LogConfig {
    LogConfig { segment_bytes: 8192, index_interval_bytes: 512, ..LogConfig::default() }
}

fn run_log_ops(ops: &[LogOp]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir()?;
    let config = log_config();
    let max_batch = config.segment_bytes as usize - 64;
    let mut log = Some(Log::open(dir.path(), config.clone())?);
    let mut model: Vec<Rec> = Vec::new();
    let mut synced = 0u64;
    for op in ops {
        let l = log.as_mut().ok_or_else(|| TestCaseError::fail("log missing"))?;
        match op {
            LogOp::Append(recs) => {
                let mut b = builder_of(recs);
                let size = b.encoded_len();
                match l.append(&mut b) {
                    Ok(a) => {
                        prop_assert!(size <= max_batch);
                        prop_assert_eq!(a.base_offset, model.len() as u64);
                        prop_assert_eq!(a.last_offset, (model.len() + recs.len() - 1) as u64);
                        prop_assert!(b.is_empty(), "append clears the builder");
                        model.extend(recs.iter().cloned());
                    }
                    Err(Error::BatchTooLarge { .. }) => prop_assert!(size > max_batch),
                    Err(e) => return Err(TestCaseError::fail(format!("append: {e}"))),
                }
            }
            LogOp::Sync => {
                l.sync()?;
                synced = model.len() as u64;
                prop_assert_eq!(l.recovery_point(), synced);
            }
            LogOp::Roll => l.roll()?,
            LogOp::Reopen => {
                drop(log.take());
                let reopened = Log::open(dir.path(), config.clone())?;
                prop_assert_eq!(reopened.recovery_point(), synced, "the recovery point survives a reopen");
                check_whole_log(&reopened, &model, 1 << 20)?;
                log = Some(reopened);
            }
            LogOp::Read(frac, max_bytes) => {
                let from = model.len() as u64 * u64::from(*frac) / 1000;
                check_read(l, &model, from, *max_bytes)?;
            }
        }
        let l = log.as_ref().ok_or_else(|| TestCaseError::fail("log missing"))?;
        prop_assert_eq!(l.high_watermark(), model.len() as u64);
    }
    let l = log.take().ok_or_else(|| TestCaseError::fail("log missing"))?;
    check_whole_log(&l, &model, 3000)?;
    // Every single starting offset, including those inside batches.
    for from in 0..=model.len() as u64 {
        check_read(&l, &model, from, 1)?;
    }
    match l.read(model.len() as u64 + 1, 100) {
        Err(Error::OffsetOutOfRange { .. }) => {}
        other => return Err(TestCaseError::fail(format!("read past the high-water mark: {other:?}"))),
    }
    drop(l);
    let l = Log::open(dir.path(), config)?;
    check_whole_log(&l, &model, 777)?;
    Ok(())
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn log_reads_back_exactly_what_was_appended(ops in prop::collection::vec(log_op(), 1..80)) {
        run_log_ops(&ops)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Compacted log
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum CompactOp {
    /// (key in a small space or none, value or tombstone, value length)
    Append(Vec<(Option<u8>, bool, usize)>),
    /// Compact; with `true`, roll first so that every record is in a sealed segment.
    Compact(bool),
    Reopen,
}

fn compact_op() -> impl Strategy<Value = CompactOp> {
    prop_oneof![
        12 => gen_records().prop_map(CompactOp::Append),
        3 => any::<bool>().prop_map(CompactOp::Compact),
        1 => Just(CompactOp::Reopen),
    ]
}

/// A record in the compacted-log model, with its offset.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kept {
    offset: u64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    timestamp: i64,
}

fn kept_of(r: &Record) -> Kept {
    Kept {
        offset: r.offset,
        key: r.key.as_deref().map(<[u8]>::to_vec),
        value: r.value.as_deref().map(<[u8]>::to_vec),
        timestamp: r.timestamp,
    }
}

fn compacted_config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        compact: true,
        delete_retention: Duration::ZERO,
        ..LogConfig::default()
    }
}

fn read_kept(log: &Log) -> Result<Vec<Kept>, TestCaseError> {
    let recs = read_all(log, log.earliest_offset(), 2000)?;
    Ok(recs.iter().map(kept_of).collect())
}

/// Every key's last record among `recs`.
fn latest_by_key(recs: &[Kept]) -> BTreeMap<Vec<u8>, &Kept> {
    let mut latest = BTreeMap::new();
    for r in recs {
        if let Some(k) = &r.key {
            latest.insert(k.clone(), r);
        }
    }
    latest
}

/// Records generated by the strategies: (key in a small space or none, value or tombstone,
/// value length).
type GenRecords = [(Option<u8>, bool, usize)];

fn gen_records() -> impl Strategy<Value = Vec<(Option<u8>, bool, usize)>> {
    prop::collection::vec((prop::option::weighted(0.9, 0u8..12), prop::bool::weighted(0.85), 0usize..150), 1..20)
}

/// Pushes `recs` into `b` as records from `next_offset` on, and notes them in `model`.
fn push_generated(b: &mut BatchBuilder, model: &mut Vec<Kept>, next_offset: u64, recs: &GenRecords) {
    for (i, (k, live, len)) in recs.iter().enumerate() {
        let key = k.map(|k| format!("k{k}").into_bytes());
        let value = live.then(|| vec![(next_offset as u8).wrapping_add(i as u8); *len]);
        let timestamp = next_offset as i64 + i as i64;
        b.push(timestamp, key.as_deref(), value.as_deref(), &[]);
        model.push(Kept { offset: next_offset + i as u64, key, value, timestamp });
    }
}

/// Closes and opens the log again, checking that it reads what the model holds.
fn reopen_checked(log: &mut Option<Log>, dir: &std::path::Path, model: &[Kept]) -> Result<(), TestCaseError> {
    drop(log.take());
    let reopened = Log::open(dir, compacted_config())?;
    prop_assert_eq!(read_kept(&reopened)?, model.to_vec(), "a reopen reads the same");
    *log = Some(reopened);
    Ok(())
}

/// What holds after any compaction: offsets increase, survivors are unchanged, and the
/// offsets that survived.
fn survivors_unchanged(before: &[Kept], after: &[Kept]) -> Result<BTreeSet<u64>, TestCaseError> {
    prop_assert!(after.windows(2).all(|w| w[0].offset < w[1].offset), "offsets increase");
    let by_offset: BTreeMap<u64, &Kept> = before.iter().map(|r| (r.offset, r)).collect();
    for r in after {
        prop_assert_eq!(Some(&r), by_offset.get(&r.offset), "a survivor changed or appeared");
    }
    Ok(after.iter().map(|r| r.offset).collect())
}

fn run_compact_ops(ops: &[CompactOp]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir()?;
    let config = compacted_config();
    let mut log = Some(Log::open(dir.path(), config.clone())?);
    // What the log holds now: appended records minus what compactions removed.
    let mut model: Vec<Kept> = Vec::new();
    let mut next_offset = 0u64;
    let mut b = BatchBuilder::new();
    for op in ops {
        let l = log.as_mut().ok_or_else(|| TestCaseError::fail("log missing"))?;
        match op {
            CompactOp::Append(recs) => {
                push_generated(&mut b, &mut model, next_offset, recs);
                let a = l.append(&mut b)?;
                prop_assert_eq!(a.base_offset, next_offset);
                next_offset = a.last_offset + 1;
            }
            CompactOp::Compact(roll) => {
                if *roll {
                    l.roll()?;
                }
                let before = model.clone();
                l.compact(i64::MAX)?;
                let after = read_kept(l)?;
                check_compaction(&before, &after, *roll)?;
                model = after;
            }
            CompactOp::Reopen => reopen_checked(&mut log, dir.path(), &model)?,
        }
        let l = log.as_ref().ok_or_else(|| TestCaseError::fail("log missing"))?;
        prop_assert_eq!(l.high_watermark(), next_offset);
        prop_assert_eq!(read_kept(l)?, model.clone());
    }
    Ok(())
}

/// What a compaction may do to `before` (the records a log held), giving `after`.
fn check_compaction(before: &[Kept], after: &[Kept], all_sealed: bool) -> Result<(), TestCaseError> {
    // Offsets strictly increase, and every survivor is unchanged.
    let survivors = survivors_unchanged(before, after)?;
    // Records without a key are never removed.
    for r in before.iter().filter(|r| r.key.is_none()) {
        prop_assert!(survivors.contains(&r.offset), "keyless record at {} removed", r.offset);
    }
    // Every key's latest record survives, unless it is a tombstone, which may go, but only
    // together with every older record of its key (or the key would come back).
    let latest = latest_by_key(before);
    let latest_after = latest_by_key(after);
    for (k, r) in &latest {
        if r.value.is_some() {
            prop_assert!(survivors.contains(&r.offset), "latest record of {:?} at {} removed", k, r.offset);
        } else if !survivors.contains(&r.offset) {
            prop_assert!(!latest_after.contains_key(k), "tombstone of {:?} removed but an older record is left", k);
        }
    }
    if all_sealed {
        // Everything was in sealed segments: nothing superseded is left.
        for r in after {
            if let Some(k) = &r.key {
                prop_assert_eq!(latest[k].offset, r.offset, "superseded record of {:?} left at {}", k, r.offset);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn compaction_keeps_exactly_the_latest_record_of_each_key(ops in prop::collection::vec(compact_op(), 1..60)) {
        run_compact_ops(&ops)?;
    }
}

#[derive(Debug, Clone)]
enum StepOp {
    /// (key in a small space or none, value or tombstone, value length)
    Append(Vec<(Option<u8>, bool, usize)>),
    /// Raise the horizon to this percentage of the high-water mark (it never goes down, as a
    /// committed offset does not), then take up to `steps` compaction steps of `budget` bytes.
    Steps {
        percent: u8,
        budget: usize,
        steps: u8,
    },
    Roll,
    Reopen,
}

fn step_op() -> impl Strategy<Value = StepOp> {
    prop_oneof![
        10 => gen_records().prop_map(StepOp::Append),
        4 => (0u8..=100, prop::sample::select(vec![64usize, 700, 5000, usize::MAX]), 1u8..8)
            .prop_map(|(percent, budget, steps)| StepOp::Steps { percent, budget, steps }),
        1 => Just(StepOp::Roll),
        1 => Just(StepOp::Reopen),
    ]
}

/// What a replay of `recs` up to `horizon` ends with: each key's value (tombstoned keys absent).
fn state_at(recs: &[Kept], horizon: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut state = BTreeMap::new();
    for r in recs.iter().filter(|r| r.offset < horizon) {
        if let Some(k) = &r.key {
            match &r.value {
                Some(v) => state.insert(k.clone(), v.clone()),
                None => state.remove(k),
            };
        }
    }
    state
}

/// Stepwise compaction with a horizon, interleaved with appends, rolls and reopens (which
/// drop a pass half way): a replay to the horizon ends with the same state as before, every
/// record at or past the horizon is still there, and no survivor changes.
fn run_step_ops(ops: &[StepOp]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir()?;
    let config = compacted_config();
    let mut log = Some(Log::open(dir.path(), config.clone())?);
    let mut model: Vec<Kept> = Vec::new();
    let mut horizon = 0u64;
    let mut b = BatchBuilder::new();
    for op in ops {
        let l = log.as_mut().ok_or_else(|| TestCaseError::fail("log missing"))?;
        match op {
            StepOp::Append(recs) => {
                push_generated(&mut b, &mut model, l.high_watermark(), recs);
                l.append(&mut b)?;
            }
            StepOp::Steps { percent, budget, steps } => {
                horizon = horizon.max(l.high_watermark() * u64::from(*percent) / 100);
                let before = model.clone();
                for _ in 0..*steps {
                    if l.compact_step(i64::MAX, horizon, *budget)? == CompactionProgress::Idle {
                        break;
                    }
                }
                let after = read_kept(l)?;
                let survivors = survivors_unchanged(&before, &after)?;
                for r in before.iter().filter(|r| r.offset >= horizon || r.key.is_none()) {
                    prop_assert!(survivors.contains(&r.offset), "record at {} (horizon {}) removed", r.offset, horizon);
                }
                prop_assert_eq!(state_at(&after, horizon), state_at(&before, horizon), "state at the horizon");
                model = after;
            }
            StepOp::Roll => l.roll()?,
            StepOp::Reopen => reopen_checked(&mut log, dir.path(), &model)?,
        }
        let l = log.as_ref().ok_or_else(|| TestCaseError::fail("log missing"))?;
        prop_assert_eq!(read_kept(l)?, model.clone());
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn stepwise_compaction_keeps_the_state_at_its_horizon(ops in prop::collection::vec(step_op(), 1..80)) {
        run_step_ops(&ops)?;
    }
}

/// An update-heavy workload over a fixed key set, compacted in steps as it goes: the log's
/// size levels off instead of growing with the records written.
#[test]
fn stepwise_compaction_bounds_an_update_heavy_log() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut log = Log::open(dir.path(), compacted_config())?;
    let mut b = BatchBuilder::new();
    let mut sizes = Vec::new();
    for round in 0..40u64 {
        for i in 0..500u64 {
            let n = round * 500 + i;
            b.push(n as i64, Some(format!("k{}", n % 50).as_bytes()), Some(&n.to_le_bytes()), &[]);
            log.append(&mut b)?;
        }
        let horizon = log.high_watermark();
        while log.compact_step(i64::MAX, horizon, 4096)? == CompactionProgress::Working {}
        sizes.push(log.size_bytes());
    }
    // 20,000 records of ~40 bytes were written; 50 keys stay. The log ends near a few
    // segments, far below what was written, and its size in the last rounds does not grow.
    let late = &sizes[30..];
    let max_late = *late.iter().max().ok_or("no sizes")?;
    assert!(max_late < 8 * 4096, "sizes {sizes:?}");
    let last = read_all(&log, log.earliest_offset(), 1 << 20)?;
    let state = state_at(&last.iter().map(kept_of).collect::<Vec<_>>(), u64::MAX);
    assert_eq!(state.len(), 50);
    Ok(())
}

/// Keys that live a while and are then deleted, for ever new keys (a windowed table's
/// changelog: every window is written, then tombstoned when it expires), compacted in steps as
/// it goes: tombstones leave from every part of the log a pass rewrites, not only from its
/// first segment, so the log's size levels off. (Dropping them only at the head let the log
/// grow by the tombstones written, faster than one segment a pass could take.)
#[test]
fn stepwise_compaction_bounds_a_log_of_expiring_keys() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut log = Log::open(dir.path(), compacted_config())?;
    let mut b = BatchBuilder::new();
    let mut sizes = Vec::new();
    let value = [7u8; 24];
    for round in 0..60u64 {
        // 200 new keys a round, each written twice; those of two rounds ago are deleted.
        for i in 0..200u64 {
            let key = format!("w{round}-{i}");
            for _ in 0..2 {
                b.push(round as i64, Some(key.as_bytes()), Some(&value[..]), &[]);
                log.append(&mut b)?;
            }
            if round >= 2 {
                b.push(round as i64, Some(format!("w{}-{i}", round - 2).as_bytes()), None, &[]);
                log.append(&mut b)?;
            }
        }
        let horizon = log.high_watermark();
        while log.compact_step(i64::MAX, horizon, 4096)? == CompactionProgress::Working {}
        sizes.push(log.size_bytes());
    }
    let middle = *sizes[20..40].iter().max().ok_or("no sizes")?;
    let late = *sizes[40..].iter().max().ok_or("no sizes")?;
    assert!(late <= middle + middle / 4, "the log keeps growing: {sizes:?}");
    // What is left is the keys of the last two rounds (the others were deleted).
    let last = read_all(&log, log.earliest_offset(), 1 << 20)?;
    let state = state_at(&last.iter().map(kept_of).collect::<Vec<_>>(), u64::MAX);
    assert_eq!(state.len(), 400, "the live keys");
    Ok(())
}

/// A fixed scenario the properties above cover only by chance: a key overwritten many times
/// across segments, a tombstone at the head of the log, compacted twice and reopened.
#[test]
fn compaction_removes_head_tombstones_with_their_history() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut log = Log::open(dir.path(), compacted_config())?;
    let mut b = BatchBuilder::new();
    for i in 0..200u64 {
        let key = format!("k{}", i % 4);
        let value = [i as u8; 60];
        b.push(i as i64, Some(key.as_bytes()), (i % 4 != 0 || i < 150).then_some(&value[..]), &[]);
        log.append(&mut b)?;
    }
    log.roll()?;
    log.compact(i64::MAX)?;
    log.compact(i64::MAX)?;
    let recs = read_all(&log, 0, 1 << 20)?;
    let keys: Vec<_> = recs.iter().map(|r| (r.offset, r.key.clone(), r.value.is_some())).collect();
    assert!(recs.iter().all(|r| r.key.as_deref() != Some(b"k0")), "{keys:?}");
    assert_eq!(recs.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![197, 198, 199], "{keys:?}");
    drop(log);
    let log = Log::open(dir.path(), compacted_config())?;
    assert_eq!(read_all(&log, 0, 1 << 20)?, recs);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Regressions: bugs these properties found, each pinned by a fixed case
// ---------------------------------------------------------------------------------------------

/// Found by `compaction_keeps_exactly_the_latest_record_of_each_key`: a compaction output
/// whose last record was removed forgot, once its kept records were appended, that it covers
/// offsets up to the old end. Compacting it again wrote the shorter end into its header, and
/// the next open saw a hole before the following segment and deleted everything after it.
#[test]
fn compacting_a_compacted_segment_again_keeps_the_segments_after_it() -> Result<(), Box<dyn std::error::Error>> {
    let config = compacted_config();
    let mut b = BatchBuilder::new();
    let mut append = |log: &mut Log, key: &[u8]| -> Result<(), Error> {
        b.push(0, Some(key), Some(&[5u8; 300]), &[]);
        log.append(&mut b).map(|_| ())
    };
    // How many of these records fill a segment.
    let per_segment = {
        let probe = tempfile::tempdir()?;
        let mut log = Log::open(probe.path(), config.clone())?;
        while log.segment_count() < 2 {
            append(&mut log, b"probe")?;
        }
        log.high_watermark() - 1
    };
    let dir = tempfile::tempdir()?;
    let mut log = Log::open(dir.path(), config.clone())?;
    // Segment 0: distinct keys, then "x", superseded by the first record of segment 1.
    for n in 0..per_segment - 1 {
        append(&mut log, format!("d{n}").as_bytes())?;
    }
    append(&mut log, b"x")?;
    assert_eq!(log.segment_count(), 1);
    append(&mut log, b"x")?;
    while log.segment_count() < 3 {
        let n = log.high_watermark();
        append(&mut log, format!("e{n}").as_bytes())?;
    }
    let hw = log.high_watermark();
    let before = read_all(&log, 0, 1 << 20)?;
    log.compact(i64::MAX)?;
    log.compact(i64::MAX)?;
    let after = read_all(&log, 0, 1 << 20)?;
    assert_eq!(after.len(), before.len() - 1, "only the first x goes");
    drop(log);
    let log = Log::open(dir.path(), config)?;
    assert_eq!(log.high_watermark(), hw);
    assert_eq!(read_all(&log, 0, 1 << 20)?, after);
    Ok(())
}

/// Found by `store_matches_a_btreemap_across_checkpoints_compactions_and_reopens`: a compaction
/// planned while the active segment held nothing past the checkpoint treated that whole
/// segment as covered by the checkpoint — including writes made to it while the job ran — and
/// dropped the checkpointed record those writes superseded. The next open then failed (or
/// would have lost the key).
#[test]
fn compaction_keeps_a_checkpointed_value_overwritten_while_it_runs() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let config = store_config(SyncPolicy::Never, 0.0);
    let mut store = Store::open(dir.path(), config.clone())?;
    // Segment 0 is sealed and holds the checkpointed "k" (not in its first batch); the active
    // segment holds everything else up to the checkpoint.
    store.put(b"first", &[1; 200])?;
    store.put(b"k", b"checkpointed")?;
    let mut n = 0;
    while store.stats().segments < 2 {
        store.put(format!("f{n}").as_bytes(), &[2; 200])?;
        n += 1;
    }
    store.put(b"first", &[3; 10])?; // segment 0 is now partly superseded
    store.checkpoint(b"c")?;
    // Plan the job and copy segment 0's first batch only; then overwrite "k" in the active
    // segment before the job reaches k's old record.
    store.compact_step(1)?;
    store.put(b"k", b"after the checkpoint")?;
    store.compact()?;
    assert_eq!(store.get(b"k").as_deref(), Some(&b"after the checkpoint"[..]));
    drop(store);
    let store = Store::open(dir.path(), config)?;
    assert_eq!(store.get(b"k").as_deref(), Some(&b"checkpointed"[..]));
    assert_eq!(store.len(), n + 2);
    Ok(())
}
