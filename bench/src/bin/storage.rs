//! Storage benchmark: the segment log and the key-value store against the limits they sit on.
//!
//! Measured in one run, on files it creates (under `--dir`, default the system temp dir), with
//! each figure compared to its baseline from the same run (these machines are shared and
//! noisy, so ratios are the figures to trust):
//!
//! - log append: 16-byte keys and 100-byte values in batches of 1,000, `fdatasync` at the end
//!   included, against plain sequential `write` of the same number of bytes plus `fdatasync`
//!   (the device's limit); best of 3, alternating;
//! - log sequential read of everything appended, touching every key and value;
//! - KV put (batches of 1,000, as the engine's commits write them) and get (reading the value)
//!   of 1,000,000 random 16-byte keys with 100-byte values, against a pre-sized `hashbrown`
//!   map with a fast hasher holding the same data;
//! - checkpoint cost, reopen time of the 1M-key store (page cache warm), bytes on disk per key.
//!
//! ```text
//! cargo run --release -p faust-bench --bin storage -- --quick --json
//! ```

use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use faust_bench::{peak_rss_mb, progress};
use faust_storage::{BatchBuilder, Log, LogConfig, Store, StoreConfig, WriteBatch};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(about = "Benchmark the faust storage layer (segment log and KV store)")]
struct Args {
    /// A shorter run (under 30 s): less log data, fewer repeats.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Directory to create the benchmark's files in.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keys for the KV workload.
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    /// MiB of log data to append (default 1024, or 256 with --quick).
    #[arg(long)]
    log_mb: Option<u64>,
}

const KEY_LEN: usize = 16;
const VALUE_LEN: usize = 100;
const BATCH: usize = 1000;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Appends `records` records through the log, then syncs. Returns (elapsed, bytes on disk).
fn log_append(dir: &Path, records: usize) -> (Duration, u64) {
    let _ = std::fs::remove_dir_all(dir);
    let mut log = Log::open(dir, LogConfig::default()).expect("open log");
    let mut batch = BatchBuilder::with_capacity(BATCH * (KEY_LEN + VALUE_LEN + 64));
    let value = [0x5au8; VALUE_LEN];
    let mut key = [0u8; KEY_LEN];
    let start = Instant::now();
    let mut i = 0u64;
    while (i as usize) < records {
        for _ in 0..BATCH {
            key[..8].copy_from_slice(&i.to_le_bytes());
            batch.push(i as i64, Some(&key), Some(&value), &[]);
            i += 1;
        }
        log.append(&mut batch).expect("append");
    }
    log.sync().expect("sync");
    (start.elapsed(), log.size_bytes())
}

/// Writes `bytes` with plain sequential 1 MiB writes and one fdatasync.
fn file_write(path: &Path, bytes: u64) -> Duration {
    let _ = std::fs::remove_file(path);
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut f = std::fs::File::create(path).expect("create file");
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).expect("write");
        left -= n as u64;
    }
    f.sync_data().expect("fdatasync");
    let elapsed = start.elapsed();
    drop(f);
    let _ = std::fs::remove_file(path);
    elapsed
}

fn log_read(dir: &Path) -> (Duration, u64, u64) {
    let log = Log::open(dir, LogConfig::default()).expect("reopen log");
    let start = Instant::now();
    let mut next = 0;
    let mut records = 0u64;
    let mut touched = 0u64;
    let mut batches = Vec::new();
    while next < log.high_watermark() {
        batches.clear();
        log.read_into(next, 1 << 20, &mut batches).expect("read");
        for b in &batches {
            for r in b.records_from(next) {
                let k = r.key.as_deref().unwrap_or_default();
                let v = r.value.as_deref().unwrap_or_default();
                touched = touched.wrapping_add(k.len() as u64 + v.len() as u64 + u64::from(v[0]));
                records += 1;
            }
            next = b.last_offset() + 1;
        }
    }
    black_box(touched);
    (start.elapsed(), records, log.size_bytes())
}

struct KvData {
    keys: Vec<[u8; KEY_LEN]>,
    values: Vec<[u8; VALUE_LEN]>,
    get_order: Vec<usize>,
}

fn kv_data(n: usize) -> KvData {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let keys: Vec<[u8; KEY_LEN]> = (0..n).map(|_| rng.r#gen()).collect();
    let values: Vec<[u8; VALUE_LEN]> = (0..n)
        .map(|i| {
            let mut v = [0u8; VALUE_LEN];
            v[..8].copy_from_slice(&(i as u64).to_le_bytes());
            v[8] = 1;
            v
        })
        .collect();
    let mut get_order: Vec<usize> = (0..n).collect();
    get_order.shuffle(&mut rng);
    KvData { keys, values, get_order }
}

fn kv_put(dir: &Path, data: &KvData) -> (Store, Duration) {
    let _ = std::fs::remove_dir_all(dir);
    let mut store = Store::open(dir, StoreConfig::default()).expect("open store");
    let mut batch = WriteBatch::new();
    let start = Instant::now();
    for (i, key) in data.keys.iter().enumerate() {
        batch.put(key, &data.values[i]);
        if batch.len() == BATCH {
            store.write(&mut batch).expect("write");
        }
    }
    store.write(&mut batch).expect("write");
    (store, start.elapsed())
}

fn kv_get(store: &Store, data: &KvData) -> Duration {
    let start = Instant::now();
    let mut sum = 0u64;
    for &i in &data.get_order {
        let v = store.get_ref(&data.keys[i]).expect("key present");
        sum = sum.wrapping_add(u64::from(v[8]) + v.len() as u64);
    }
    black_box(sum);
    start.elapsed()
}

type FastMap = hashbrown::HashMap<[u8; KEY_LEN], Box<[u8]>, foldhash::fast::RandomState>;

fn map_put(data: &KvData) -> (FastMap, Duration) {
    let mut map = FastMap::with_capacity_and_hasher(data.keys.len(), Default::default());
    let start = Instant::now();
    for (i, key) in data.keys.iter().enumerate() {
        map.insert(*key, Box::from(&data.values[i][..]));
    }
    (map, start.elapsed())
}

fn map_get(map: &FastMap, data: &KvData) -> Duration {
    let start = Instant::now();
    let mut sum = 0u64;
    for &i in &data.get_order {
        let v = map.get(&data.keys[i]).expect("key present");
        sum = sum.wrapping_add(u64::from(v[8]) + v.len() as u64);
    }
    black_box(sum);
    start.elapsed()
}

fn best<T>(runs: usize, mut f: impl FnMut() -> (Duration, T)) -> (Duration, T) {
    let mut best: Option<(Duration, T)> = None;
    for _ in 0..runs {
        let r = f();
        if best.as_ref().is_none_or(|b| r.0 < b.0) {
            best = Some(r);
        }
    }
    best.expect("at least one run")
}

fn main() {
    let args = Args::parse();
    let root = tempfile::Builder::new()
        .prefix("faust-bench-storage-")
        .tempdir_in(args.dir.clone().unwrap_or_else(std::env::temp_dir))
        .expect("create the benchmark directory");
    let repeats = if args.quick { 2 } else { 3 };
    let log_mb = args.log_mb.unwrap_or(if args.quick { 256 } else { 1024 });
    let record_disk_bytes = 25 + KEY_LEN + VALUE_LEN; // record header + key + value
    let records = (log_mb << 20) as usize / record_disk_bytes / BATCH * BATCH;

    // Log append vs plain write, alternating, best of each.
    progress(args.json, &format!("log append: {records} records of {VALUE_LEN} B, {repeats} runs"));
    let log_dir = root.path().join("log");
    let plain = root.path().join("plain.bin");
    let mut best_log = (Duration::MAX, 0u64);
    let mut best_file = Duration::MAX;
    for _ in 0..repeats {
        let (t, bytes) = log_append(&log_dir, records);
        if t < best_log.0 {
            best_log = (t, bytes);
        }
        best_file = best_file.min(file_write(&plain, bytes));
    }
    let (log_t, log_bytes) = best_log;
    let mb = log_bytes as f64 / (1 << 20) as f64;
    let log_append_mb_s = mb / secs(log_t);
    let log_append_records_s = records as f64 / secs(log_t);
    let file_write_mb_s = mb / secs(best_file);

    progress(args.json, "log sequential read");
    let (read_t, read_records) = best(repeats, || {
        let (t, n, _) = log_read(&log_dir);
        (t, n)
    });
    assert_eq!(read_records as usize, records, "the log lost records");
    let log_read_mb_s = mb / secs(read_t);
    let log_read_records_s = read_records as f64 / secs(read_t);
    let _ = std::fs::remove_dir_all(&log_dir);

    // KV put/get vs an in-memory map.
    let n = args.keys;
    progress(args.json, &format!("KV: {n} keys of {KEY_LEN} B, values of {VALUE_LEN} B"));
    let data = kv_data(n);
    let kv_dir = root.path().join("kv");
    let mut kv_put_t = Duration::MAX;
    let mut store = None;
    for _ in 0..if args.quick { 1 } else { 2 } {
        drop(store.take());
        let (s, t) = kv_put(&kv_dir, &data);
        kv_put_t = kv_put_t.min(t);
        store = Some(s);
    }
    let mut store = store.expect("store");
    assert_eq!(store.len(), n);
    let kv_get_t = (0..repeats).map(|_| kv_get(&store, &data)).min().expect("runs");
    let mut map_put_t = Duration::MAX;
    let mut map = None;
    for _ in 0..if args.quick { 1 } else { 2 } {
        drop(map.take());
        let (m, t) = map_put(&data);
        map_put_t = map_put_t.min(t);
        map = Some(m);
    }
    let map = map.expect("map");
    let map_get_t = (0..repeats).map(|_| map_get(&map, &data)).min().expect("runs");
    drop(map);

    progress(args.json, "KV checkpoint, reopen");
    let ckpt_start = Instant::now();
    store.checkpoint(b"bench").expect("checkpoint");
    let kv_checkpoint_ms = secs(ckpt_start.elapsed()) * 1e3;
    let stats = store.stats();
    let kv_bytes_per_key = stats.bytes_on_disk as f64 / stats.live_keys as f64;
    drop(store);
    let (open_t, opened_len) = best(repeats, || {
        let start = Instant::now();
        let s = Store::open(&kv_dir, StoreConfig::default()).expect("reopen store");
        let t = start.elapsed();
        (t, s.len())
    });
    assert_eq!(opened_len, n, "reopen lost keys");
    let kv_open_s = secs(open_t);

    let kv_put_ops_s = n as f64 / secs(kv_put_t);
    let kv_get_ops_s = n as f64 / secs(kv_get_t);
    let map_put_ops_s = n as f64 / secs(map_put_t);
    let map_get_ops_s = n as f64 / secs(map_get_t);
    let append_ratio = log_append_mb_s / file_write_mb_s;
    let put_ratio = kv_put_ops_s / map_put_ops_s;
    let get_ratio = kv_get_ops_s / map_get_ops_s;
    let rss = peak_rss_mb();

    if args.json {
        let out = serde_json::json!({
            "quick": args.quick,
            "log_append_mb_s": log_append_mb_s,
            "log_append_records_s": log_append_records_s,
            "file_write_mb_s": file_write_mb_s,
            "log_append_vs_file_ratio": append_ratio,
            "log_read_mb_s": log_read_mb_s,
            "log_read_records_s": log_read_records_s,
            "kv_put_ops_s": kv_put_ops_s,
            "kv_get_ops_s": kv_get_ops_s,
            "map_put_ops_s": map_put_ops_s,
            "map_get_ops_s": map_get_ops_s,
            "kv_put_vs_map_ratio": put_ratio,
            "kv_get_vs_map_ratio": get_ratio,
            "kv_checkpoint_ms": kv_checkpoint_ms,
            "kv_open_1m_keys_s": kv_open_s,
            "kv_keys": n,
            "kv_bytes_per_key": kv_bytes_per_key,
            "peak_rss_mb": rss,
        });
        println!("{out}");
        return;
    }
    let ok = |pass: bool| if pass { "ok" } else { "MISS" };
    println!();
    println!("faust storage benchmark{} — best of {repeats} runs each", if args.quick { " (--quick)" } else { "" });
    println!("files in {}", root.path().display());
    println!();
    println!("{:<34} {:>14} {:>14} {:>8}  target", "workload", "ours", "baseline", "ratio");
    println!("{}", "-".repeat(86));
    println!(
        "{:<34} {:>9.0} MB/s {:>9.0} MB/s {:>8.2}  >= 0.5 {}",
        "log append + fdatasync",
        log_append_mb_s,
        file_write_mb_s,
        append_ratio,
        ok(append_ratio >= 0.5)
    );
    println!("{:<34} {:>10.2} M/s", "  records appended", log_append_records_s / 1e6);
    println!("{:<34} {:>9.0} MB/s {:>10.2} M/s", "log sequential read", log_read_mb_s, log_read_records_s / 1e6);
    println!(
        "{:<34} {:>10.2} M/s {:>10.2} M/s {:>8.2}  >= 0.4 {}",
        "KV put (batches of 1000)",
        kv_put_ops_s / 1e6,
        map_put_ops_s / 1e6,
        put_ratio,
        ok(put_ratio >= 0.4)
    );
    println!(
        "{:<34} {:>10.2} M/s {:>10.2} M/s {:>8.2}  >= 0.5 {}",
        "KV get (reads the value)",
        kv_get_ops_s / 1e6,
        map_get_ops_s / 1e6,
        get_ratio,
        ok(get_ratio >= 0.5)
    );
    println!("{:<34} {:>11.1} ms", "KV checkpoint (fdatasync)", kv_checkpoint_ms);
    println!(
        "{:<34} {:>12.3} s {:>23}  <= 1 s {}",
        format!("KV reopen, {n} keys"),
        kv_open_s,
        "(page cache warm)",
        ok(kv_open_s <= 1.0)
    );
    println!(
        "{:<34} {:>12.1} B {:>23}",
        "KV bytes on disk per key",
        kv_bytes_per_key,
        format!("(payload {} B)", KEY_LEN + VALUE_LEN)
    );
    println!("{:<34} {:>11.0} MB", "peak RSS", rss);
    println!();
    println!("baselines: plain sequential write(2) of the same bytes + fdatasync; a pre-sized");
    println!("hashbrown map (foldhash) holding the same keys and boxed values.");
}
