//! Crash and damage tests on real files: what opening a damaged `Store` or `Log` may do.
//!
//! A store (or log) is built with random writes, checkpoints (syncs) and compactions on small
//! segments, then closed; each test case copies that pristine directory and damages the copy
//! — cuts a file at a random byte, flips random bytes, or deletes a segment — and opens it.
//! The contract under test:
//!
//! - a store opens with exactly the state and metadata of its last checkpoint, or fails with
//!   an error for which `is_corruption()` holds. Never different data, never a panic, never an
//!   I/O error; damage only to bytes written after the last checkpoint must open cleanly;
//! - a log opens holding an exact run of what was appended (offsets, keys, values, headers,
//!   timestamps) that reaches at least the recovery point, or fails with a corruption error;
//!   reads may report corruption only for damage below the recovery point. Damage only to what
//!   was appended after the last sync must open cleanly with everything synced.
//!
//! A refused open must leave the segment and checkpoint files as it found them. After a
//! successful open the store or log must take new writes and read them back after another
//! reopen, so no cut-off tail can come back. (A log whose first segment was deleted opens from
//! a later offset, as after retention; damage to its `recovery-point` file may bring back an
//! older recovery point, so such cases only need an exact run, not one reaching the sync.)
//!
//! Everything is driven by seeded `StdRng`s; a failure names its seed and damage.
//! `FAUST_CRASH_SEEDS=n` runs `n` seeds instead of the default 8 (each with 40 random and 15
//! after-the-durable-point damage cases per kind of directory).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use faust_storage::{BatchBuilder, Error, Log, LogConfig, Record, Store, StoreConfig, SyncPolicy, WriteBatch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SEGMENT_BYTES: u64 = 4096;
const SEGMENT_HEADER_LEN: u64 = 64;

type Model = BTreeMap<Vec<u8>, Vec<u8>>;
type TestResult = Result<(), Box<dyn std::error::Error>>;

fn seeds(default: u64) -> std::ops::Range<u64> {
    let n = std::env::var("FAUST_CRASH_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    0..n
}

// ---------------------------------------------------------------------------------------------
// Files and damage
// ---------------------------------------------------------------------------------------------

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() && entry.file_name() != ".lock" {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

fn is_segment(name: &str) -> bool {
    name.strip_suffix(".log").is_some_and(|stem| stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
}

/// The segment files of a directory, sorted by base offset, and the other files `extra` names.
fn files(dir: &Path, extra: &[&str]) -> std::io::Result<Vec<String>> {
    let mut out: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| is_segment(n) || extra.contains(&n.as_str()))
        .collect();
    out.sort();
    Ok(out)
}

/// One batch found by walking a segment file's length fields.
#[derive(Debug, Clone)]
struct BatchSpan {
    file: String,
    position: u64,
    len: u64,
    base_offset: u64,
    records: u32,
}

/// The batches of every segment in `dir`, read straight from the bytes (format.rs layout).
fn batch_spans(dir: &Path) -> std::io::Result<Vec<BatchSpan>> {
    let mut out = Vec::new();
    for file in files(dir, &[])? {
        let data = std::fs::read(dir.join(&file))?;
        let mut pos = SEGMENT_HEADER_LEN as usize;
        while pos + 16 <= data.len() {
            let len = u32::from_le_bytes(data[pos..pos + 4].try_into().map_err(std::io::Error::other)?) as usize;
            if len == 0 || pos + len > data.len() {
                break;
            }
            if pos + 24 > data.len() {
                break;
            }
            let base = u64::from_le_bytes(data[pos + 8..pos + 16].try_into().map_err(std::io::Error::other)?);
            let records = u32::from_le_bytes(data[pos + 20..pos + 24].try_into().map_err(std::io::Error::other)?);
            out.push(BatchSpan {
                file: file.clone(),
                position: pos as u64,
                len: len as u64,
                base_offset: base,
                records,
            });
            pos += len;
        }
    }
    Ok(out)
}

fn segment_base(file: &str) -> Option<u64> {
    file.strip_suffix(".log")?.parse().ok()
}

#[derive(Debug, Clone)]
enum Damage {
    /// Shorten `file` to `len` bytes.
    Cut {
        file: String,
        len: u64,
    },
    /// XOR bytes: (file, position, mask).
    Flip(Vec<(String, u64, u8)>),
    Delete {
        file: String,
    },
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::Cut { file, len } => write!(f, "cut {file} to {len} bytes"),
            Damage::Flip(flips) => {
                write!(f, "flip")?;
                for (file, pos, mask) in flips {
                    write!(f, " {file}@{pos}^{mask:#04x}")?;
                }
                Ok(())
            }
            Damage::Delete { file } => write!(f, "delete {file}"),
        }
    }
}

impl Damage {
    fn touches(&self, name: &str) -> bool {
        match self {
            Damage::Cut { file, .. } | Damage::Delete { file } => file == name,
            Damage::Flip(flips) => flips.iter().any(|(file, ..)| file == name),
        }
    }

    fn apply(&self, dir: &Path) -> std::io::Result<()> {
        match self {
            Damage::Cut { file, len } => {
                std::fs::OpenOptions::new().write(true).open(dir.join(file))?.set_len(*len)?;
            }
            Damage::Flip(flips) => {
                for (file, pos, mask) in flips {
                    let path = dir.join(file);
                    let mut data = std::fs::read(&path)?;
                    data[*pos as usize] ^= mask;
                    std::fs::write(&path, data)?;
                }
            }
            Damage::Delete { file } => std::fs::remove_file(dir.join(file))?,
        }
        Ok(())
    }
}

/// Every segment and checkpoint file with its length.
fn snapshot(dir: &Path) -> std::io::Result<BTreeMap<String, u64>> {
    files(dir, &["CHECKPOINT"])?.into_iter().map(|f| Ok((f.clone(), file_len(dir, &f)?))).collect()
}

/// A refused open must leave the files as it found them: the data may still be recovered.
fn unchanged<T>(dir: &Path, before: &BTreeMap<String, u64>, error: &Error) -> Result<T, String>
where
    T: Default,
{
    let after = snapshot(dir).map_err(|e| e.to_string())?;
    if &after != before {
        return Err(format!("the open failed ({error}) but changed the files: {before:?} -> {after:?}"));
    }
    Ok(T::default())
}

fn file_len(dir: &Path, file: &str) -> std::io::Result<u64> {
    Ok(std::fs::metadata(dir.join(file))?.len())
}

/// Random damage to the files `candidates` of `dir` (deletions only of segments).
fn random_damage(rng: &mut StdRng, dir: &Path, candidates: &[String]) -> std::io::Result<Damage> {
    let segments: Vec<&String> = candidates.iter().filter(|f| is_segment(f)).collect();
    let kind = rng.gen_range(0..10);
    Ok(if kind < 4 {
        let file = candidates[rng.gen_range(0..candidates.len())].clone();
        let len = rng.gen_range(0..=file_len(dir, &file)?);
        Damage::Cut { file, len }
    } else if kind < 9 || segments.is_empty() {
        let mut flips = Vec::new();
        for _ in 0..rng.gen_range(1..=4) {
            let file = candidates[rng.gen_range(0..candidates.len())].clone();
            let len = file_len(dir, &file)?;
            if len == 0 {
                continue;
            }
            // Half of the flips hit the first 128 bytes: segment and first batch headers.
            let pos = if rng.gen_bool(0.5) { rng.gen_range(0..len.min(128)) } else { rng.gen_range(0..len) };
            flips.push((file, pos, rng.gen_range(1..=255u8)));
        }
        Damage::Flip(flips)
    } else {
        Damage::Delete { file: segments[rng.gen_range(0..segments.len())].clone() }
    })
}

/// Damage only to bytes of batches whose base offset is at least `from`, or to segment files
/// that start there: a cut inside such a batch, a flipped byte in one (returned with it), or a
/// deleted segment.
fn damage_from(rng: &mut StdRng, dir: &Path, from: u64) -> std::io::Result<Option<(Damage, Option<BatchSpan>)>> {
    let spans: Vec<BatchSpan> = batch_spans(dir)?.into_iter().filter(|s| s.base_offset >= from).collect();
    let later_segments: Vec<String> =
        files(dir, &[])?.into_iter().filter(|f| segment_base(f).is_some_and(|b| b >= from)).collect();
    if spans.is_empty() {
        return Ok(None);
    }
    let span = &spans[rng.gen_range(0..spans.len())];
    Ok(Some(match rng.gen_range(0..4) {
        0 => {
            let len = rng.gen_range(span.position..file_len(dir, &span.file)?);
            (Damage::Cut { file: span.file.clone(), len }, None)
        }
        1 if !later_segments.is_empty() => {
            let file = later_segments[rng.gen_range(0..later_segments.len())].clone();
            if rng.gen_bool(0.5) {
                (Damage::Delete { file }, None)
            } else {
                (Damage::Flip(vec![(file, rng.gen_range(0..SEGMENT_HEADER_LEN), rng.gen_range(1..=255u8))]), None)
            }
        }
        _ => {
            let pos = span.position + rng.gen_range(0..span.len);
            (Damage::Flip(vec![(span.file.clone(), pos, rng.gen_range(1..=255u8))]), Some(span.clone()))
        }
    }))
}

// ---------------------------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------------------------

fn store_config() -> StoreConfig {
    StoreConfig { segment_bytes: SEGMENT_BYTES, sync: SyncPolicy::Checkpoint, min_dirty_ratio: 0.3 }
}

fn store_key(k: u32) -> Vec<u8> {
    format!("key-{k}").into_bytes()
}

/// A closed store directory and what it must open as.
struct PristineStore {
    dir: tempfile::TempDir,
    model: Model,
    metadata: Vec<u8>,
    /// The log position the last checkpoint covers.
    position: u64,
}

fn random_write(rng: &mut StdRng, store: &mut Store, model: &mut Model) -> Result<(), Error> {
    let value = |rng: &mut StdRng| {
        let n = rng.gen_range(0..300);
        (0..n).map(|_| rng.r#gen::<u8>()).collect::<Vec<u8>>()
    };
    match rng.gen_range(0..10) {
        0..=5 => {
            let k = store_key(rng.gen_range(0..48));
            let v = value(rng);
            store.put(&k, &v)?;
            model.insert(k, v);
        }
        6 | 7 => {
            let k = store_key(rng.gen_range(0..48));
            store.delete(&k)?;
            model.remove(&k);
        }
        _ => {
            let mut wb = WriteBatch::new();
            for _ in 0..rng.gen_range(1..8) {
                let k = store_key(rng.gen_range(0..48));
                if rng.gen_bool(0.8) {
                    let v = value(rng);
                    wb.put(&k, &v);
                    model.insert(k, v);
                } else {
                    wb.delete(&k);
                    model.remove(&k);
                }
            }
            store.write(&mut wb)?;
        }
    }
    Ok(())
}

fn build_store(seed: u64) -> Result<PristineStore, Box<dyn std::error::Error>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir()?;
    let mut store = Store::open(dir.path(), store_config())?;
    let mut model = Model::new();
    let mut checkpointed = (Model::new(), Vec::new());
    let mut checkpoints = 0;
    let ops = rng.gen_range(150..400);
    for i in 0..ops {
        random_write(&mut rng, &mut store, &mut model)?;
        if rng.gen_bool(0.04) || (i + 1 == ops && checkpoints < 3) {
            let metadata = format!("seed {seed} op {i}").into_bytes();
            store.checkpoint(&metadata)?;
            checkpointed = (model.clone(), metadata);
            checkpoints += 1;
        }
        if rng.gen_bool(0.15) {
            store.compact_step(rng.gen_range(1..4096))?;
        }
    }
    let position = store.last_checkpoint().position;
    // Writes after the last checkpoint: none, a few, or enough to roll segments.
    let after = [0, 5, 40][rng.gen_range(0..3)];
    for _ in 0..after {
        random_write(&mut rng, &mut store, &mut model)?;
        if rng.gen_bool(0.1) {
            store.compact_step(rng.gen_range(1..4096))?;
        }
    }
    drop(store);
    let (model, metadata) = checkpointed;
    Ok(PristineStore { dir, model, metadata, position })
}

fn contents(store: &Store) -> Model {
    store.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
}

#[derive(Debug, Default)]
struct Tally {
    opened: usize,
    refused: usize,
    read_errors: usize,
}

/// Opens the damaged store in `dir` and checks the contract. Returns whether it opened.
fn check_store_open(dir: &Path, p: &PristineStore, must_open: bool) -> Result<bool, String> {
    let before = snapshot(dir).map_err(|e| e.to_string())?;
    let store = match Store::open(dir, store_config()) {
        Ok(s) => s,
        Err(e) if e.is_corruption() && !must_open => return unchanged(dir, &before, &e),
        Err(e) => return Err(format!("open failed with {e:?} (is_corruption: {})", e.is_corruption())),
    };
    if contents(&store) != p.model {
        let got = contents(&store);
        let missing: Vec<_> = p.model.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !p.model.contains_key(*k)).collect();
        return Err(format!(
            "opened with different data: {} keys instead of {}; missing {missing:?}, extra {extra:?}",
            got.len(),
            p.model.len()
        ));
    }
    for (k, v) in &p.model {
        if store.get(k).as_deref() != Some(v.as_slice()) {
            return Err(format!("get({k:?}) differs"));
        }
    }
    if store.last_checkpoint().metadata[..] != p.metadata[..] {
        return Err(format!("opened with metadata {:?}", store.last_checkpoint().metadata));
    }
    // The store takes writes, and its next checkpoint holds exactly them on top.
    let mut store = store;
    let step = |r: Result<(), Error>| r.map_err(|e| format!("write after open: {e}"));
    step(store.put(b"after-damage", b"1"))?;
    step(store.checkpoint(b"after-damage"))?;
    drop(store);
    let store = Store::open(dir, store_config()).map_err(|e| format!("reopen after a write: {e}"))?;
    let mut expected = p.model.clone();
    expected.insert(b"after-damage".to_vec(), b"1".to_vec());
    if contents(&store) != expected || &store.last_checkpoint().metadata[..] != b"after-damage" {
        return Err("after a write and a checkpoint, a reopen differs".into());
    }
    Ok(true)
}

/// Store directories take damage of every kind; each open obeys the contract.
#[test]
fn damaged_store_opens_at_its_last_checkpoint_or_reports_corruption() -> TestResult {
    let mut tally = Tally::default();
    for seed in seeds(8) {
        let p = build_store(seed)?;
        let targets = files(p.dir.path(), &["CHECKPOINT"])?;
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_da4a);
        for case in 0..40 {
            let copy = tempfile::tempdir()?;
            copy_dir(p.dir.path(), copy.path())?;
            let damage = random_damage(&mut rng, copy.path(), &targets)?;
            damage.apply(copy.path())?;
            match check_store_open(copy.path(), &p, false) {
                Ok(true) => tally.opened += 1,
                Ok(false) => tally.refused += 1,
                Err(msg) => panic!("seed {seed} case {case}: {damage}: {msg}"),
            }
        }
    }
    println!("damaged stores: {tally:?}");
    assert!(tally.opened > 0 && tally.refused > 0, "both outcomes should occur: {tally:?}");
    Ok(())
}

/// Damage confined to what was written after the last checkpoint (a torn tail) never
/// prevents the open: the store opens at the checkpoint.
#[test]
fn damage_after_the_last_checkpoint_opens_at_the_checkpoint() -> TestResult {
    let mut cases = 0;
    for seed in seeds(8) {
        let p = build_store(seed)?;
        let mut rng = StdRng::seed_from_u64(seed ^ 0xa47e_c4b7);
        for case in 0..15 {
            let copy = tempfile::tempdir()?;
            copy_dir(p.dir.path(), copy.path())?;
            let Some((damage, _)) = damage_from(&mut rng, copy.path(), p.position)? else { break };
            damage.apply(copy.path())?;
            cases += 1;
            if let Err(msg) = check_store_open(copy.path(), &p, true) {
                panic!("seed {seed} case {case} (checkpoint at {}): {damage}: {msg}", p.position);
            }
        }
    }
    assert!(cases > 30, "only {cases} cases had writes after the checkpoint");
    Ok(())
}

/// A fixed case: writes after the checkpoint, torn in the middle of the last batch.
#[test]
fn torn_last_write_after_a_checkpoint_is_cut() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut store = Store::open(dir.path(), store_config())?;
    store.put(b"a", b"1")?;
    store.put(b"b", b"2")?;
    store.checkpoint(b"one")?;
    store.put(b"a", b"changed")?;
    store.put(b"c", &[9u8; 500])?;
    drop(store);
    let spans = batch_spans(dir.path())?;
    let last = spans.last().ok_or("no batches")?;
    Damage::Cut { file: last.file.clone(), len: last.position + last.len / 2 }.apply(dir.path())?;
    let store = Store::open(dir.path(), store_config())?;
    let expected: Model = [(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())].into();
    assert_eq!(contents(&store), expected);
    assert_eq!(&store.last_checkpoint().metadata[..], b"one");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Log
// ---------------------------------------------------------------------------------------------

fn log_config() -> LogConfig {
    LogConfig { segment_bytes: SEGMENT_BYTES, index_interval_bytes: 512, ..LogConfig::default() }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    timestamp: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Rec {
    fn matches(&self, r: &Record) -> bool {
        let headers: Vec<(Vec<u8>, Option<Vec<u8>>)> =
            r.headers().map(|(n, v)| (n.to_vec(), v.map(<[u8]>::to_vec))).collect();
        r.timestamp == self.timestamp
            && r.key.as_deref() == self.key.as_deref()
            && r.value.as_deref() == self.value.as_deref()
            && headers == self.headers
    }
}

struct PristineLog {
    dir: tempfile::TempDir,
    appended: Vec<Rec>,
    /// Records made durable by the last sync.
    synced: u64,
}

fn random_batch(rng: &mut StdRng, next_offset: usize) -> Vec<Rec> {
    (0..rng.gen_range(1..10))
        .map(|i| {
            let o = next_offset + i;
            Rec {
                timestamp: o as i64 * 3,
                key: rng.gen_bool(0.8).then(|| format!("k{}", rng.gen_range(0..100)).into_bytes()),
                value: rng.gen_bool(0.9).then(|| vec![o as u8; rng.gen_range(0..200)]),
                headers: if rng.gen_bool(0.3) { vec![(b"h".to_vec(), Some(o.to_le_bytes().to_vec()))] } else { vec![] },
            }
        })
        .collect()
}

fn append_recs(log: &mut Log, recs: &[Rec]) -> Result<(), Error> {
    let mut b = BatchBuilder::new();
    for r in recs {
        let headers: Vec<(&[u8], Option<&[u8]>)> =
            r.headers.iter().map(|(n, v)| (n.as_slice(), v.as_deref())).collect();
        b.push(r.timestamp, r.key.as_deref(), r.value.as_deref(), &headers);
    }
    log.append(&mut b).map(|_| ())
}

fn build_log(seed: u64) -> Result<PristineLog, Box<dyn std::error::Error>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir()?;
    let mut log = Log::open(dir.path(), log_config())?;
    let mut appended = Vec::new();
    let mut synced = 0;
    for _ in 0..rng.gen_range(20..80) {
        let recs = random_batch(&mut rng, appended.len());
        append_recs(&mut log, &recs)?;
        appended.extend(recs);
        if rng.gen_bool(0.1) {
            log.sync()?;
            synced = appended.len() as u64;
        }
    }
    log.sync()?;
    synced = synced.max(appended.len() as u64);
    // Appended after the last sync: nothing, a little, or a few segments' worth.
    let after = [0, 3, 30][rng.gen_range(0..3)];
    for _ in 0..after {
        let recs = random_batch(&mut rng, appended.len());
        append_recs(&mut log, &recs)?;
        appended.extend(recs);
    }
    drop(log);
    Ok(PristineLog { dir, appended, synced })
}

/// Reads `from..high-water mark`; the records read before an error come back with it.
fn read_all(log: &Log, from: u64) -> (Vec<Record>, Option<Error>) {
    let mut out = Vec::new();
    let mut next = from;
    while next < log.high_watermark() {
        match log.read(next, 1500) {
            Ok(batches) if batches.is_empty() => break,
            Ok(batches) => {
                for b in &batches {
                    out.extend(b.records_from(next));
                    next = b.last_offset() + 1;
                }
            }
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

/// Records must be exactly `appended[from..]`, in order, with no gaps.
fn check_run(records: &[Record], from: u64, appended: &[Rec]) -> Result<(), String> {
    for (i, r) in records.iter().enumerate() {
        let offset = from + i as u64;
        if r.offset != offset {
            return Err(format!("record {i} read from {from} has offset {} instead of {offset}", r.offset));
        }
        match appended.get(offset as usize) {
            Some(m) if m.matches(r) => {}
            Some(m) => return Err(format!("record at {offset} differs: read {r:?}, appended {m:?}")),
            None => return Err(format!("record at {offset} was never appended")),
        }
    }
    Ok(())
}

/// Opens the damaged log in `dir` and checks the contract. `floor`: the high-water mark must
/// reach it (the synced count, unless the damage hit the recovery-point file: then an older
/// recovery point may be read back, and more of the tail may be cut). `torn`: the damage
/// touched only this batch (past the sync) and perhaps what follows it, so the open and every
/// read must succeed; once it is cut, a batch of the same size and record count is appended
/// in its place, which would bring back any stale batch left behind it.
fn check_log_open(
    dir: &Path,
    p: &PristineLog,
    floor: u64,
    torn: Option<&BatchSpan>,
    tally: &mut Tally,
) -> Result<(), String> {
    let clean_tail = torn.is_some();
    let before = snapshot(dir).map_err(|e| e.to_string())?;
    let mut log = match Log::open(dir, log_config()) {
        Ok(l) => l,
        Err(e) if e.is_corruption() && !clean_tail => {
            tally.refused += 1;
            return unchanged(dir, &before, &e);
        }
        Err(e) => return Err(format!("open failed with {e:?} (is_corruption: {})", e.is_corruption())),
    };
    tally.opened += 1;
    let (earliest, hw) = (log.earliest_offset(), log.high_watermark());
    if hw > p.appended.len() as u64 {
        return Err(format!("high-water mark {hw} is past the {} records appended", p.appended.len()));
    }
    if hw < floor {
        return Err(format!("high-water mark {hw} is below {floor} ({} records synced)", p.synced));
    }
    if earliest > hw || (clean_tail && earliest != 0) {
        return Err(format!("earliest offset {earliest} (high-water mark {hw})"));
    }
    let (records, error) = read_all(&log, earliest);
    check_run(&records, earliest, &p.appended)?;
    match error {
        None if records.len() as u64 == hw - earliest => {}
        None => return Err(format!("read {} records from {earliest} to {hw}", records.len())),
        Some(e) if e.is_corruption() && !clean_tail => {
            tally.read_errors += 1;
            return Ok(());
        }
        Some(e) => return Err(format!("read failed with {e:?}")),
    }
    // The log takes appends at its high-water mark, and no cut-off data comes back after them.
    let next = match torn {
        Some(span) if span.base_offset == hw => same_size_batch(span),
        _ => vec![Rec { timestamp: -1, key: Some(b"after-damage".to_vec()), value: None, headers: vec![] }],
    };
    append_recs(&mut log, &next).map_err(|e| format!("append after open: {e}"))?;
    log.sync().map_err(|e| format!("sync after open: {e}"))?;
    drop(log);
    let log = Log::open(dir, log_config()).map_err(|e| format!("reopen after an append: {e}"))?;
    let (records, error) = read_all(&log, earliest);
    if let Some(e) = error {
        return Err(format!("read after an append and a reopen: {e}"));
    }
    let mut expected: Vec<Rec> = p.appended[..hw as usize].to_vec();
    expected.extend(next.iter().cloned());
    check_run(&records, earliest, &expected)?;
    if records.len() != expected.len() - earliest as usize {
        return Err(format!("after an append and a reopen, read {} records, not {}", records.len(), expected.len()));
    }
    Ok(())
}

/// Records that encode to a batch of exactly `span`'s size and record count (or one record when
/// that is impossible).
fn same_size_batch(span: &BatchSpan) -> Vec<Rec> {
    let n = span.records.max(1) as usize;
    let Some(pad) = (span.len as usize).checked_sub(48 + 25 * n) else {
        return vec![Rec { timestamp: -1, key: None, value: None, headers: vec![] }];
    };
    let mut recs = vec![Rec { timestamp: -2, key: None, value: Some(Vec::new()), headers: vec![] }; n];
    recs[n - 1].value = Some(vec![0xee; pad]);
    recs
}

/// Log directories take damage of every kind; each open obeys the contract.
#[test]
fn damaged_log_opens_with_an_exact_prefix_or_reports_corruption() -> TestResult {
    let mut tally = Tally::default();
    for seed in seeds(8) {
        let p = build_log(seed)?;
        let targets = files(p.dir.path(), &["recovery-point"])?;
        let mut rng = StdRng::seed_from_u64(seed ^ 0x10_da4a);
        for case in 0..40 {
            let copy = tempfile::tempdir()?;
            copy_dir(p.dir.path(), copy.path())?;
            let damage = random_damage(&mut rng, copy.path(), &targets)?;
            damage.apply(copy.path())?;
            let floor = if damage.touches("recovery-point") { 0 } else { p.synced };
            if let Err(msg) = check_log_open(copy.path(), &p, floor, None, &mut tally) {
                panic!("seed {seed} case {case} ({} appended, {} synced): {damage}: {msg}", p.appended.len(), p.synced);
            }
        }
    }
    println!("damaged logs: {tally:?}");
    assert!(tally.opened > 0 && tally.refused > 0, "both outcomes should occur: {tally:?}");
    Ok(())
}

/// Damage confined to what was appended after the last sync (a torn tail) is cut: the log
/// opens with at least everything synced, and every read succeeds.
#[test]
fn damage_after_the_last_sync_keeps_everything_synced() -> TestResult {
    let mut tally = Tally::default();
    for seed in seeds(8) {
        let p = build_log(seed)?;
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7a11);
        for case in 0..15 {
            let copy = tempfile::tempdir()?;
            copy_dir(p.dir.path(), copy.path())?;
            let Some((damage, torn)) = damage_from(&mut rng, copy.path(), p.synced)? else { break };
            damage.apply(copy.path())?;
            if let Err(msg) = check_log_open(copy.path(), &p, p.synced, torn.as_ref(), &mut tally) {
                panic!("seed {seed} case {case} ({} appended, {} synced): {damage}: {msg}", p.appended.len(), p.synced);
            }
        }
    }
    assert!(tally.opened > 30, "only {} cases had appends after the sync", tally.opened);
    Ok(())
}

/// Cuts at fixed points (start, second byte, inside the header, last byte) of every other
/// batch past the synced data: each opens with the synced records and the intact batches
/// before the cut.
#[test]
fn every_cut_after_the_synced_data_opens() -> TestResult {
    // The first seed that appends a few segments' worth after its last sync.
    let (p, spans) = (0..)
        .map(|seed| -> Result<_, Box<dyn std::error::Error>> {
            let p = build_log(seed)?;
            let spans: Vec<BatchSpan> =
                batch_spans(p.dir.path())?.into_iter().filter(|s| s.base_offset >= p.synced).collect();
            Ok((p, spans))
        })
        .find(|r| r.as_ref().map_or(true, |(_, spans)| spans.len() > 10))
        .ok_or("no seed")??;
    let mut tally = Tally::default();
    for span in spans.iter().step_by(2) {
        for len in [span.position, span.position + 1, span.position + 47, span.position + span.len - 1] {
            let copy = tempfile::tempdir()?;
            copy_dir(p.dir.path(), copy.path())?;
            let damage = Damage::Cut { file: span.file.clone(), len };
            damage.apply(copy.path())?;
            if let Err(msg) = check_log_open(copy.path(), &p, p.synced, Some(span), &mut tally) {
                panic!("{damage}: {msg}");
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Regressions: bugs these tests found, each pinned by a fixed case
// ---------------------------------------------------------------------------------------------

/// Rewrites the batch at `position` of `file` with `edit`, then fixes its checksum, as a buggy
/// or malicious writer would.
fn forge_batch(file: &Path, position: u64, edit: impl FnOnce(&mut [u8])) -> std::io::Result<()> {
    let mut data = std::fs::read(file)?;
    let pos = position as usize;
    let len = u32::from_le_bytes(data[pos..pos + 4].try_into().map_err(std::io::Error::other)?) as usize;
    let batch = &mut data[pos..pos + len];
    edit(batch);
    let crc = crc32c::crc32c(&batch[8..]);
    batch[4..8].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(file, data)
}

/// Appends single-record batches until the log has `segments` segments.
fn fill_segments(log: &mut Log, appended: &mut Vec<Rec>, segments: usize) -> Result<(), Error> {
    while log.segment_count() < segments {
        let o = appended.len();
        let rec =
            Rec { timestamp: o as i64, key: Some(b"k".to_vec()), value: Some(vec![o as u8; 300]), headers: vec![] };
        append_recs(log, std::slice::from_ref(&rec))?;
        appended.push(rec);
    }
    Ok(())
}

/// Found by `damage_after_the_last_sync_keeps_everything_synced`: a segment sealed after the
/// last sync holds unsynced batches, but open hopped over its batches without checking them,
/// so a torn batch there was served (and reported as corruption by every read) instead of
/// being cut.
#[test]
fn torn_batch_in_a_segment_sealed_after_the_sync_is_cut() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut appended = Vec::new();
    {
        let mut log = Log::open(dir.path(), log_config())?;
        fill_segments(&mut log, &mut appended, 1)?;
        for _ in 0..3 {
            let rec = Rec { timestamp: 0, key: None, value: Some(vec![1; 300]), headers: vec![] };
            append_recs(&mut log, std::slice::from_ref(&rec))?;
            appended.push(rec);
        }
        log.sync()?;
        // More appends roll the segment: it is sealed with unsynced batches at its end.
        fill_segments(&mut log, &mut appended, 2)?;
    }
    let synced = 3u64;
    let spans = batch_spans(dir.path())?;
    let torn = spans.iter().find(|s| s.base_offset == synced + 1).ok_or("no batch after the sync")?;
    assert_eq!(torn.file, spans[0].file, "the torn batch is in the first, sealed segment");
    Damage::Flip(vec![(torn.file.clone(), torn.position + torn.len - 1, 0x40)]).apply(dir.path())?;
    let log = Log::open(dir.path(), log_config())?;
    assert_eq!(log.high_watermark(), synced + 1, "cut at the torn batch");
    let (records, error) = read_all(&log, 0);
    assert!(error.is_none(), "{error:?}");
    check_run(&records, 0, &appended)?;
    assert_eq!(records.len() as u64, synced + 1);
    Ok(())
}

/// Found by `damaged_log_opens_with_an_exact_prefix_or_reports_corruption`: a flipped bit in
/// an unchecked batch header below the recovery point gave the log a high-water mark near
/// 2^63, and open deleted every later segment as "never durable".
#[test]
fn damaged_header_below_the_recovery_point_deletes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut appended = Vec::new();
    {
        let mut log = Log::open(dir.path(), log_config())?;
        fill_segments(&mut log, &mut appended, 4)?;
        log.sync()?;
    }
    let before = files(dir.path(), &[])?;
    let second = batch_spans(dir.path())?.into_iter().nth(1).ok_or("one batch")?;
    // Bit 63 of the second batch's base offset (byte 15 of the batch).
    Damage::Flip(vec![(second.file.clone(), second.position + 15, 0x80)]).apply(dir.path())?;
    match Log::open(dir.path(), log_config()) {
        Err(e) if e.is_corruption() => {}
        Ok(log) => panic!("opened with high-water mark {} ({} appended)", log.high_watermark(), appended.len()),
        Err(e) => panic!("{e:?}"),
    }
    assert_eq!(files(dir.path(), &[])?, before, "no segment may be deleted");
    Ok(())
}

/// Overwrites the u64 at `at` in a store's CHECKPOINT file and re-seals its checksum, as a
/// forged or damaged-but-valid file would be.
fn forge_checkpoint_field(dir: &std::path::Path, at: usize, value: u64) -> TestResult {
    let path = dir.join("CHECKPOINT");
    let mut b = std::fs::read(&path)?;
    b[at..at + 8].copy_from_slice(&value.to_le_bytes());
    let n = b.len();
    let crc = crc32c::crc32c(&b[..n - 4]);
    b[n - 4..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, b)?;
    Ok(())
}

/// Found by the fuzz target: a checkpoint (with a valid checksum) claiming a huge live-key
/// count made the open reserve an index of that size (abort, or a capacity-overflow panic).
#[test]
fn checkpoint_with_an_impossible_key_count_is_an_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let mut store = Store::open(dir.path(), store_config())?;
        store.put(b"a", b"1")?;
        store.checkpoint(b"m")?;
    }
    forge_checkpoint_field(dir.path(), 32, u64::MAX)?; // live keys
    let err = Store::open(dir.path(), store_config()).err().ok_or("opened")?;
    assert!(err.is_corruption(), "{err:?}");
    Ok(())
}

/// Found by the fuzz target: a checkpoint (with a valid checksum) whose sequence number is
/// `u64::MAX` made the next checkpoint overflow (a panic in debug builds).
#[test]
fn checkpoint_sequence_at_u64_max_does_not_overflow() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let mut store = Store::open(dir.path(), store_config())?;
        store.put(b"a", b"1")?;
        store.checkpoint(b"m")?;
    }
    forge_checkpoint_field(dir.path(), 16, u64::MAX)?; // sequence
    let mut store = Store::open(dir.path(), store_config())?;
    assert_eq!(store.last_checkpoint().sequence, u64::MAX);
    store.put(b"b", b"2")?;
    store.checkpoint(b"n")?;
    drop(store);
    let store = Store::open(dir.path(), store_config())?;
    assert_eq!((store.len(), &store.last_checkpoint().metadata[..]), (2, &b"n"[..]));
    Ok(())
}

/// Found by the fuzz target: batches whose offsets reach `u64::MAX` overflowed (a panic in
/// debug builds, wrapped offsets in release) when scanned or appended after.
#[test]
fn offsets_at_the_end_of_u64_are_an_error_not_an_overflow() -> TestResult {
    let one = |o: usize| Rec { timestamp: o as i64, key: None, value: Some(vec![7; 10]), headers: vec![] };
    // A valid batch, after the synced data, whose offset range would pass u64::MAX.
    let dir = tempfile::tempdir()?;
    {
        let mut log = Log::open(dir.path(), log_config())?;
        for o in 0..3 {
            append_recs(&mut log, &[one(o)])?;
        }
        log.sync()?;
        append_recs(&mut log, &[one(3)])?;
    }
    let last = batch_spans(dir.path())?.pop().ok_or("no batch")?;
    forge_batch(&dir.path().join(&last.file), last.position, |b| b[8..16].copy_from_slice(&u64::MAX.to_le_bytes()))?;
    let log = Log::open(dir.path(), log_config())?;
    assert_eq!(log.high_watermark(), 3, "the forged batch is cut");
    drop(log);

    // A valid segment whose one record has offset u64::MAX - 1: the log is full, and an
    // append fails cleanly.
    let dir = tempfile::tempdir()?;
    {
        let mut log = Log::open(dir.path(), log_config())?;
        append_recs(&mut log, &[one(0)])?;
    }
    let first = batch_spans(dir.path())?.remove(0);
    let base = u64::MAX - 1;
    let from = dir.path().join(&first.file);
    let to = dir.path().join(format!("{base:020}.log"));
    let mut data = std::fs::read(&from)?;
    data[16..24].copy_from_slice(&base.to_le_bytes());
    let crc = crc32c::crc32c(&data[0..60]);
    data[60..64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&to, data)?;
    std::fs::remove_file(&from)?;
    forge_batch(&to, 64, |b| b[8..16].copy_from_slice(&base.to_le_bytes()))?;
    let mut log = Log::open(dir.path(), log_config())?;
    assert_eq!(log.high_watermark(), u64::MAX);
    let err = append_recs(&mut log, &[one(1)]).err().ok_or("appended past u64::MAX")?;
    assert!(err.is_corruption(), "{err:?}");
    Ok(())
}
