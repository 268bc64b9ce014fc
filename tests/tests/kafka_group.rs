//! Several worker processes of the orders example share one app through a Kafka consumer
//! group (our assignor on the group's leader), against a tansu broker of each test's own:
//! the orders, produced by an independent client (rskafka), are counted exactly once between
//! them, every worker gets partitions, and when one is SIGKILLed the others take its
//! partitions over (recovering its counts from the changelog) and go on counting exactly.
//!
//! The example's app id is fixed (`orders`), so each test starts a broker of its own on a free
//! port (`FAUST_TANSU_BIN`, exported by `scripts/test`). Skipped, with a notice, without
//! `FAUST_TEST_BROKER` (or the tansu binary).

#[path = "support/orders_kafka.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use support::*;

/// One worker process, with its data directory and log.
struct Worker {
    child: Child,
    data: PathBuf,
    log: PathBuf,
    /// Its web server's port.
    web: u16,
}

impl Worker {
    /// Worker `n` of the group, on one core (so that three fit this machine's two cores).
    fn start(broker: &str, dir: &std::path::Path, n: usize) -> Worker {
        let (data, log) = (dir.join(format!("data-{n}")), dir.join(format!("worker-{n}.log")));
        let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let env = [("WORKER_CORES", "1"), ("WEB_PORT", &web.to_string())];
        let child = worker_env(broker, &data, &log, &[], &env);
        Worker { child, data, log, web }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The worker's `stats --json`, through the CLI.
    fn stats(&self) -> serde_json::Value {
        let out = cli(&self.data, &["stats", "--json"]);
        assert!(out.status.success(), "stats: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("stats --json prints JSON")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every worker's counts, merged, once they add up to `total` and stay so for half a second
/// (read twice: a hand-over between two reads could show an account on two workers or on
/// none). Fails, with the logs, if a worker exits or it takes longer than `within`. Returns
/// the merged counts and each worker's number of accounts.
fn wait_for_group_counts(workers: &mut [Worker], total: u64, within: Duration) -> (BTreeMap<String, u64>, Vec<usize>) {
    let start = Instant::now();
    let mut last = 0;
    let read = |workers: &[Worker]| -> Option<(BTreeMap<String, u64>, Vec<usize>)> {
        let mut merged = BTreeMap::new();
        let mut sizes = Vec::new();
        for w in workers {
            let c = counts(&w.data)?;
            sizes.push(c.len());
            for (k, v) in c {
                if merged.insert(k, v).is_some() {
                    return None;
                }
            }
        }
        Some((merged, sizes))
    };
    loop {
        for w in workers.iter_mut() {
            if let Some(status) = w.child.try_wait().unwrap() {
                panic!("a worker exited ({status}); its log:\n{}", w.log());
            }
        }
        if let Some((merged, _)) = read(workers) {
            last = merged.values().sum();
            if last >= total {
                std::thread::sleep(Duration::from_millis(500));
                if let Some(again) = read(workers)
                    && again.0 == merged
                {
                    return again;
                }
            }
        }
        if start.elapsed() > within {
            let logs: Vec<String> = workers.iter().map(|w| w.log()).collect();
            panic!("only {last} of {total} orders counted within {within:?}; the logs:\n{}", logs.join("\n---\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn three_workers_share_the_orders_and_take_over_from_a_killed_one() {
    let Some(bin) = tansu("three_workers_share_the_orders_and_take_over_from_a_killed_one") else { return };
    let broker = Broker::start(&bin);
    let dir = tempfile::tempdir().unwrap();
    let first: u64 = 30_000;
    let mut truth = produce_orders_rskafka(&broker.addr(), 0, first);
    let mut workers: Vec<Worker> = (0..3).map(|n| Worker::start(&broker.addr(), dir.path(), n)).collect();
    let started = Instant::now();
    let (counted, sizes) = wait_for_group_counts(&mut workers, first, Duration::from_secs(180));
    eprintln!("three workers counted {first} orders in {:?}; accounts per worker: {sizes:?}", started.elapsed());
    assert_exact(&counted, &truth, "three workers in one group");
    assert!(sizes.iter().all(|&n| n > 0), "every worker holds some of the counts: {sizes:?}");
    // `table get` through any worker answers for every key: a key another worker holds is
    // asked of that worker (found from the group's assignment).
    for (account, count) in truth.iter().take(40) {
        let out = cli(&workers[0].data, &["table", "get", "order_count", account]);
        let got = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "table get {account}: {got} {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(got.trim(), count.to_string(), "table get {account}");
    }
    // The same through worker 0's web view: a key another worker holds is a redirect to it.
    let mut redirected = 0;
    for (account, count) in truth.iter().take(40) {
        let (mut status, mut head, mut body) =
            faust_tests::http(workers[0].web, "GET", &format!("/table/order_count/{account}"));
        if status == 307 {
            redirected += 1;
            let location = head.lines().find_map(|l| l.strip_prefix("Location: ")).expect("a Location").to_string();
            let (host, path) = location.trim_start_matches("http://").split_once('/').expect("a URL");
            let port: u16 = host.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("a port");
            (status, head, body) = faust_tests::http(port, "GET", &format!("/{path}"));
        }
        assert_eq!((status, body.trim()), (200, count.to_string().as_str()), "GET {account}: {head}");
    }
    assert!(redirected > 0, "some keys live on the other workers");
    // Each changelog partition (one per table shard the workers recovered) has a standby on
    // another worker (table_standby_replicas = 1), kept up to date in the background.
    let start = Instant::now();
    loop {
        let stats: Vec<serde_json::Value> = workers.iter().map(Worker::stats).collect();
        let standbys: u64 = stats.iter().map(|s| s["standby_partitions"].as_u64().unwrap_or(0)).sum();
        let applied: u64 = stats.iter().map(|s| s["standby_records_applied"].as_u64().unwrap_or(0)).sum();
        let shards: u64 = stats.iter().map(|s| s["shards_recovered"].as_u64().unwrap_or(0)).sum();
        if standbys == shards && applied > 0 {
            eprintln!("standbys: {standbys} partitions, {applied} records applied");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "standbys not followed within 30 s: {stats:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // One of the three leads the app (holds its leader topic's partition).
    let leaders = |workers: &[Worker]| -> Vec<usize> {
        workers.iter().enumerate().filter(|(_, w)| w.stats()["leader"] == true).map(|(i, _)| i).collect()
    };
    let leader = leaders(&workers);
    assert_eq!(leader.len(), 1, "exactly one leader among three: {leader:?}");

    // SIGKILL the leader: the others take its partitions (and leadership) over and count
    // what comes next.
    let mut killed = workers.remove(leader[0]);
    let replayed_before: Vec<u64> =
        workers.iter().map(|w| w.stats()["changelog_records_replayed"].as_u64().unwrap_or(0)).collect();
    signal_and_wait(&mut killed.child, libc::SIGKILL, Duration::from_secs(10));
    let killed_at = Instant::now();
    for (k, v) in produce_orders_rskafka(&broker.addr(), first, first + 10_000) {
        *truth.entry(k).or_insert(0) += v;
    }
    let (counted, sizes) = wait_for_group_counts(&mut workers, first + 10_000, Duration::from_secs(120));
    eprintln!(
        "the two left counted everything {:?} after the SIGKILL; accounts per worker: {sizes:?}",
        killed_at.elapsed()
    );
    assert_exact(&counted, &truth, "after a worker was SIGKILLed");
    // The takeover promoted the standbys: it replayed only what they had not applied.
    let stats: Vec<serde_json::Value> = workers.iter().map(Worker::stats).collect();
    let promoted: u64 = stats.iter().map(|s| s["standbys_promoted"].as_u64().unwrap_or(0)).sum();
    let replayed: u64 = stats
        .iter()
        .zip(&replayed_before)
        .map(|(s, before)| s["changelog_records_replayed"].as_u64().unwrap_or(0) - before)
        .sum();
    eprintln!("takeover: {promoted} standbys promoted, {replayed} changelog records replayed");
    assert!(promoted >= 1, "the takeover promoted a standby: {stats:?}");
    assert_eq!(leaders(&workers).len(), 1, "one of the two left took leadership over");
    for w in &mut workers {
        let status = signal_and_wait(&mut w.child, libc::SIGTERM, Duration::from_secs(60));
        assert!(status.success(), "SIGTERM stops gracefully: {status}; the log:\n{}", w.log());
    }
}

/// Orders produced by rskafka in chunks of 1,000 every 100 ms until `stop`, from order
/// `from` on; returns them counted per account, and how many.
fn produce_steadily(
    broker: String,
    from: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(BTreeMap<String, u64>, u64)> {
    std::thread::spawn(move || {
        let mut truth = BTreeMap::new();
        let mut next = from;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for (k, v) in produce_orders_rskafka(&broker, next, next + 1_000) {
                *truth.entry(k).or_insert(0) += v;
            }
            next += 1_000;
            std::thread::sleep(Duration::from_millis(100));
        }
        (truth, next - from)
    })
}

/// Scaling under load: one worker, then three (the two new ones get partitions while orders
/// keep coming), then one again (the two stop gracefully and leave): nothing is lost or
/// counted twice, and while three run, none is left without partitions.
#[test]
fn scaling_from_one_to_three_workers_and_back_under_load_loses_nothing() {
    let Some(bin) = tansu("scaling_from_one_to_three_workers_and_back_under_load_loses_nothing") else { return };
    let broker = Broker::start(&bin);
    let dir = tempfile::tempdir().unwrap();
    let mut truth = produce_orders_rskafka(&broker.addr(), 0, 10_000);
    let mut workers = vec![Worker::start(&broker.addr(), dir.path(), 0)];
    let (counted, _) = wait_for_group_counts(&mut workers, 10_000, Duration::from_secs(120));
    assert_exact(&counted, &truth, "one worker");

    // Three, under load.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = produce_steadily(broker.addr(), 10_000, stop.clone());
    workers.push(Worker::start(&broker.addr(), dir.path(), 1));
    workers.push(Worker::start(&broker.addr(), dir.path(), 2));
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (more, n) = producer.join().expect("producer");
    for (k, v) in more {
        *truth.entry(k).or_insert(0) += v;
    }
    let total = 10_000 + n;
    let (counted, sizes) = wait_for_group_counts(&mut workers, total, Duration::from_secs(120));
    eprintln!("three workers: {total} orders; accounts per worker {sizes:?}");
    assert_exact(&counted, &truth, "scaled to three under load");
    assert!(sizes.iter().all(|&n| n > 0), "no worker without partitions: {sizes:?}");

    // Back to one, under load: the two leave gracefully while orders keep coming.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = produce_steadily(broker.addr(), total, stop.clone());
    for mut w in workers.drain(1..) {
        let status = signal_and_wait(&mut w.child, libc::SIGTERM, Duration::from_secs(60));
        assert!(status.success(), "SIGTERM stops gracefully: {status}; the log:\n{}", w.log());
    }
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (more, n) = producer.join().expect("producer");
    for (k, v) in more {
        *truth.entry(k).or_insert(0) += v;
    }
    let (counted, _) = wait_for_group_counts(&mut workers, total + n, Duration::from_secs(120));
    assert_exact(&counted, &truth, "back to one under load");
    let status = signal_and_wait(&mut workers[0].child, libc::SIGTERM, Duration::from_secs(60));
    assert!(status.success(), "SIGTERM stops gracefully: {status}");
}

/// The CLI's `send` on Kafka needs no running worker (it produces like any other client), and
/// a worker started afterwards counts what it sent.
#[test]
fn the_cli_sends_to_kafka_without_a_worker() {
    let Some(bin) = tansu("the_cli_sends_to_kafka_without_a_worker") else { return };
    let broker = Broker::start(&bin);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The topic exists (a worker created it before, or another producer did).
    produce_orders_rskafka(&broker.addr(), 0, 0);
    let order = r#"{"account_id": "account-cli", "product_id": "p", "amount": 1, "price": 1.0}"#;
    let out = std::process::Command::new(ORDERS_BIN)
        .args(["--broker", &format!("kafka://{}", broker.addr()), "--datadir"])
        .arg(&data)
        .args(["send", "orders", "--key", "order-cli", order])
        .env_remove("RUST_LOG")
        .output()
        .expect("run the CLI");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "send without a worker: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("sent 1 record to orders (partition "), "{stdout}");
    let mut workers = vec![Worker::start(&broker.addr(), dir.path(), 0)];
    let (counted, _) = wait_for_group_counts(&mut workers, 1, Duration::from_secs(60));
    assert_eq!(counted, BTreeMap::from([("account-cli".to_string(), 1)]));
}
