//! The orders example as a real process on `local://`: SIGKILLed several times while it
//! generates and counts, restarted each time, and finally run to the end. The counts it prints
//! (dumps) must equal the ground truth: the orders its generator actually wrote to the topic,
//! read back from the log files, counted per account. (A killed generator may write some
//! orders twice after a restart — it records its progress only once orders are durable — and
//! the ground truth includes such repeats: the table must count every order in the topic
//! exactly once.)

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faust_storage::{Log, LogConfig};
use rand::{Rng, SeedableRng};

const ORDERS: u64 = 300_000;

fn orders(datadir: &Path, dump: Option<&Path>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orders"));
    cmd.env("ORDERS", ORDERS.to_string())
        .env("ACCOUNTS", "2000")
        .env("ORDERS_DATADIR", datadir)
        .env("BROKER_COMMIT_INTERVAL", "0.1")
        .env_remove("FAUST_CRASH_AT")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(d) = dump {
        cmd.env("ORDERS_DUMP", d);
    }
    cmd
}

/// Every order in the `orders` topic, counted per account: read from the log files.
fn ground_truth(datadir: &Path) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    let topic = datadir.join("topics").join("orders");
    for entry in std::fs::read_dir(&topic).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_dir() || path.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.parse::<u32>().is_err()) {
            continue;
        }
        let log = Log::open(&path, LogConfig::default()).unwrap();
        let mut next = log.earliest_offset();
        while next < log.high_watermark() {
            for batch in log.read(next, 1 << 20).unwrap() {
                for r in batch.records_from(next) {
                    let order: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
                    *counts.entry(order["account_id"].as_str().unwrap().to_string()).or_default() += 1;
                }
                next = batch.last_offset() + 1;
            }
        }
    }
    counts
}

#[test]
fn the_orders_example_counts_exactly_across_sigkills() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for kill in 0..6 {
        let mut child = orders(&data, None).spawn().unwrap();
        let wait = Duration::from_millis(rng.gen_range(200..1200));
        let start = Instant::now();
        while start.elapsed() < wait {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: the pid is our own child's, still waited for below.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().unwrap();
        eprintln!("run {kill}: stopped after {:?} ({status})", start.elapsed());
    }
    let dump = dir.path().join("counts.json");
    let status = orders(&data, Some(&dump)).status().unwrap();
    assert!(status.success(), "the final run failed: {status}");
    let counted: BTreeMap<String, u64> = serde_json::from_slice(&std::fs::read(&dump).unwrap()).unwrap();
    let truth = ground_truth(&data);
    let total: u64 = truth.values().sum();
    assert!(total >= ORDERS, "the generator wrote {total} orders, fewer than {ORDERS}");
    assert_eq!(counted.len(), truth.len());
    let wrong: Vec<_> = truth.iter().filter(|(k, v)| counted.get(*k) != Some(v)).take(5).collect();
    assert!(wrong.is_empty(), "accounts counted wrongly (truth shown): {wrong:?}");
    assert_eq!(counted, truth);
}
