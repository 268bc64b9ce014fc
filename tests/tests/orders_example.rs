//! The orders example as a real process on `local://`: SIGKILLed several times while it
//! generates and counts, restarted each time, and finally run to the end. The counts it prints
//! (dumps) must equal the ground truth: the orders its generator actually wrote to the topic,
//! read back from the log files, counted per account. (A killed generator may write some
//! orders twice after a restart — it records its progress only once orders are durable — and
//! the ground truth includes such repeats: the table must count every order in the topic
//! exactly once.)
//!
//! The example counts through `group_by` (orders are keyed by order id, counted by account),
//! so every order crosses the repartition topic, mostly to the other core. A killed worker
//! sends again, after its restart, what it had re-keyed since its last commit: the test also
//! counts those repeats in the repartition topic, which the counting side must drop.
//!
//! Also, on a worker whose agent holds an event (`slow_stop`): SIGTERM stops it gracefully
//! once the event is done (exit 0), and a second signal during the graceful stop ends the
//! process at once.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faust_tests::topic_records as records;
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

/// Every order in the `orders` topic, counted per account.
fn ground_truth(datadir: &Path) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for r in records(datadir, "orders") {
        let order: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        *counts.entry(order["account_id"].as_str().unwrap().to_string()).or_default() += 1;
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
    let run = orders(&data, Some(&dump)).stderr(Stdio::piped()).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "the final run failed: {}; its stderr:\n{stderr}", run.status);
    let counted: BTreeMap<String, u64> = serde_json::from_slice(&std::fs::read(&dump).unwrap()).unwrap();
    let truth = ground_truth(&data);
    let total: u64 = truth.values().sum();
    assert!(total >= ORDERS, "the generator wrote {total} orders, fewer than {ORDERS}");
    assert_eq!(counted.len(), truth.len());
    let wrong: Vec<_> = truth.iter().filter(|(k, v)| counted.get(*k) != Some(v)).take(5).collect();
    assert!(wrong.is_empty(), "accounts counted wrongly (truth shown): {wrong:?}");
    assert_eq!(counted, truth);
    // Every order went through the repartition topic; some more than once (re-sent after a
    // kill), and those repeats were not counted.
    let repartitioned = records(&data, "orders-count-orders-account_id-repartition");
    let positions: std::collections::HashSet<Vec<u8>> = repartitioned
        .iter()
        .map(|r| r.headers().find(|(k, _)| *k == b"faust-source-position").and_then(|(_, v)| v).unwrap().to_vec())
        .collect();
    eprintln!("{} records re-keyed, {} of them repeats", repartitioned.len(), repartitioned.len() - positions.len());
    assert_eq!(positions.len() as u64, total, "each order re-keyed (at least) once");
}

/// With small segments, the worker's upkeep deletes what it committed past in the
/// repartition topic (as Kafka Streams purges its repartition topics), while every order is
/// still counted exactly once.
#[test]
fn the_repartition_topic_is_purged_below_the_committed_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = orders(&data, None).env("SEGMENT_BYTES", "65536").stderr(Stdio::piped()).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "the run failed: {}; its stderr:\n{stderr}", run.status);
    let topics = data.join("topics");
    let source = faust_tests::disk_use(&topics.join("orders"));
    let repartition = faust_tests::disk_use(&topics.join("orders-count-orders-account_id-repartition"));
    eprintln!("orders: {source} bytes; repartition topic: {repartition} bytes");
    assert!(source > 10 << 20, "the orders are all kept ({source} bytes)");
    assert!(repartition < source / 4, "the repartition topic keeps {repartition} bytes (orders: {source})");
}

/// Starts the `slow_stop` worker holding its event for `hold_ms` and waits until it holds it.
fn slow_stop(dir: &Path, hold_ms: u64) -> (std::process::Child, std::io::BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_slow_stop"))
        .arg(dir.join("data"))
        .arg(hold_ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "holding");
    (child, stdout)
}

#[test]
fn sigterm_stops_gracefully_after_the_held_event() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut stdout) = slow_stop(dir.path(), 1_000);
    let signalled = Instant::now();
    let status = signal_and_wait(&mut child, libc::SIGTERM, Duration::from_secs(20));
    assert!(status.success(), "a graceful stop exits 0: {status}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(rest.trim(), "stopped", "App::run returned Ok");
    eprintln!("stopped {:?} after SIGTERM", signalled.elapsed());
}

#[test]
fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _stdout) = slow_stop(dir.path(), 60_000);
    // SAFETY: the pid is our own child's, still waited for below.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "the graceful stop waits for the held event");
    let status = signal_and_wait(&mut child, libc::SIGINT, Duration::from_secs(5));
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{status}");
}

/// Sends `signal` to `child` and waits for it to exit, at most `within`.
fn signal_and_wait(child: &mut std::process::Child, signal: i32, within: Duration) -> std::process::ExitStatus {
    let sent = Instant::now();
    // SAFETY: the pid is our own child's, not yet waited for.
    unsafe { libc::kill(child.id() as i32, signal) };
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(sent.elapsed() < within, "signal {signal}: the process did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
