//! The orders example end to end through Kafka, as users run it: orders produced into the
//! `orders` topic (4 partitions) on a broker, then `orders --broker kafka://... worker`
//! SIGKILLed at random times and restarted, and finally left to count everything. The counts
//! read through the CLI (`table dump order_count --json`, over the control socket) must equal
//! the orders produced, per account, exactly; then a SIGTERM stops it (exit 0). A restart with
//! the data directory deleted must recover the same counts from the changelog on the broker.
//!
//! Two workers splitting the partitions by hand (`worker --partitions 0-1` and `2-3`) count
//! every order once between them.
//!
//! Also the broker restarting empty under a running worker (tansu's memory storage loses
//! everything, as a Kafka cluster that lost its data would): the worker must stop within a
//! bounded time with an error saying the broker lost data, rather than count on top of an
//! empty log.
//!
//! The example's app id is fixed (`orders`), so each test starts a broker of its own on a free
//! port (`FAUST_TANSU_BIN`, exported by `scripts/test`); that also keeps the shared broker's
//! memory small. Skipped, with a notice, without `FAUST_TEST_BROKER` (or the tansu binary).

#[path = "support/orders_kafka.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;
use support::*;

#[test]
fn the_orders_example_counts_exactly_through_kafka_across_sigkills() {
    let Some(bin) = tansu("the_orders_example_counts_exactly_through_kafka_across_sigkills") else { return };
    let orders: u64 = std::env::var("ORDERS_KAFKA_ORDERS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let broker = Broker::start(&bin);
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("data"), dir.path().join("worker.log"));
    let started = Instant::now();
    let truth = produce_orders(&broker.addr(), 0, orders);
    eprintln!("{orders} orders produced in {:?}", started.elapsed());

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for kill in 0..5 {
        let mut child = worker(&broker.addr(), &data, &log);
        let wait = Duration::from_millis(rng.gen_range(800..3_500));
        let start = Instant::now();
        while start.elapsed() < wait && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let counted: u64 = counts(&data).map_or(0, |c| c.values().sum());
        let status = signal_and_wait(&mut child, libc::SIGKILL, Duration::from_secs(10));
        eprintln!("run {kill}: SIGKILLed after {:?} with about {counted} orders counted ({status})", start.elapsed());
    }

    let started = Instant::now();
    let mut child = worker(&broker.addr(), &data, &log);
    let counted = wait_for_counts(&mut child, &data, &log, orders, Duration::from_secs(300));
    eprintln!("the last run counted everything after {:?}", started.elapsed());
    assert_exact(&counted, &truth, "after the SIGKILLs");
    let status = signal_and_wait(&mut child, libc::SIGTERM, Duration::from_secs(60));
    assert!(status.success(), "SIGTERM stops gracefully: {status}");

    // The data directory gone: the counts come back from the changelog on the broker, and the
    // committed offsets there say nothing is left to count.
    let reset = cli(&data, &["reset", "--all", "--yes"]);
    assert!(reset.status.success(), "reset: {}", String::from_utf8_lossy(&reset.stderr));
    assert!(!data.exists());
    let started = Instant::now();
    let mut child = worker(&broker.addr(), &data, &log);
    let counted = wait_for_counts(&mut child, &data, &log, orders, Duration::from_secs(300));
    eprintln!("recovered from the changelog in {:?}", started.elapsed());
    assert_exact(&counted, &truth, "recovered from the changelog");
    // More orders on top are counted once.
    let more = produce_orders(&broker.addr(), orders, orders + 1_000);
    let mut truth = truth;
    for (k, v) in more {
        *truth.entry(k).or_insert(0) += v;
    }
    let counted = wait_for_counts(&mut child, &data, &log, orders + 1_000, Duration::from_secs(120));
    assert_exact(&counted, &truth, "with more orders after the recovery");
    // `topics` through the worker: every order of the topic, counted once (not once per core).
    let topics = cli(&data, &["topics", "--json"]);
    let topics: Value = serde_json::from_slice(&topics.stdout).expect("topics --json prints JSON");
    let listed = topics.as_array().unwrap().iter().find(|t| t["topic"] == "orders").expect("orders is listed").clone();
    assert_eq!(
        (listed["partitions"].as_u64(), listed["records"].as_u64()),
        (Some(4), Some(orders + 1_000)),
        "{listed}"
    );
    let status = signal_and_wait(&mut child, libc::SIGTERM, Duration::from_secs(60));
    assert!(status.success(), "SIGTERM stops gracefully: {status}");
}

/// Two workers splitting the partitions by hand (`--partitions 0-1` and `--partitions 2-3`):
/// each counts the accounts of its half, nobody counts an account twice, and together they
/// count every order.
#[test]
fn two_workers_split_the_partitions_by_hand() {
    let Some(bin) = tansu("two_workers_split_the_partitions_by_hand") else { return };
    let broker = Broker::start(&bin);
    let dir = tempfile::tempdir().unwrap();
    let truth = produce_orders(&broker.addr(), 0, 20_000);
    let halves = [("a", "0-1"), ("b", "2-3")];
    let mut workers: Vec<(Child, PathBuf, PathBuf)> = halves
        .iter()
        .map(|(name, partitions)| {
            let (data, log) = (dir.path().join(name), dir.path().join(format!("{name}.log")));
            (worker_with(&broker.addr(), &data, &log, &["--partitions", partitions]), data, log)
        })
        .collect();
    let start = Instant::now();
    let merged = loop {
        let mut merged: BTreeMap<String, u64> = BTreeMap::new();
        let mut both = true;
        for (child, data, log) in &mut workers {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("a worker exited ({status}); its log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
            }
            match counts(data) {
                Some(c) => {
                    for (k, v) in c {
                        assert!(merged.insert(k.clone(), v).is_none(), "account {k} is counted by both workers");
                    }
                }
                None => both = false,
            }
        }
        if both && merged.values().sum::<u64>() >= 20_000 {
            break merged;
        }
        assert!(start.elapsed() < Duration::from_secs(180), "the two workers did not count everything in 180 s");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_exact(&merged, &truth, "two workers, by hand");
    for (child, data, _) in &mut workers {
        assert!(counts(data).is_some_and(|c| !c.is_empty()), "each worker counts some accounts");
        let status = signal_and_wait(child, libc::SIGTERM, Duration::from_secs(60));
        assert!(status.success(), "SIGTERM stops gracefully: {status}");
    }
}

/// Exactly-once through Kafka's transactions (`PROCESSING_GUARANTEE=exactly_once`): each of
/// the worker's cores is a transactional producer; the repartitioned orders, the changelog
/// records and the source offsets of each commit go into one transaction, and the counting
/// agent reads the repartition topic `read_committed`. The counts are exact, and stay exact
/// across a graceful restart with more orders (the offsets committed in the transactions are
/// where the restart resumes). tansu does not isolate aborted transactions from
/// `read_committed` readers, so what a crash leaves cannot be checked against it: the crash
/// half of exactly-once is tested on `local://` (`engine_exactly_once.rs`).
#[test]
fn the_orders_example_counts_exactly_with_kafka_transactions() {
    let Some(bin) = tansu("the_orders_example_counts_exactly_with_kafka_transactions") else { return };
    let broker = Broker::start(&bin);
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("data"), dir.path().join("worker.log"));
    let eos = [("PROCESSING_GUARANTEE", "exactly_once")];
    let mut truth = produce_orders(&broker.addr(), 0, 20_000);
    let mut child = worker_env(&broker.addr(), &data, &log, &[], &eos);
    let counted = wait_for_counts(&mut child, &data, &log, 20_000, Duration::from_secs(180));
    assert_exact(&counted, &truth, "exactly-once, first run");
    assert!(data.join("transactional.id").exists(), "the worker's cores are transactional producers");
    let status = signal_and_wait(&mut child, libc::SIGTERM, Duration::from_secs(60));
    assert!(status.success(), "SIGTERM stops gracefully: {status}");
    for (account, n) in produce_orders(&broker.addr(), 20_000, 30_000) {
        *truth.entry(account).or_insert(0) += n;
    }
    let mut child = worker_env(&broker.addr(), &data, &log, &[], &eos);
    let counted = wait_for_counts(&mut child, &data, &log, 30_000, Duration::from_secs(180));
    assert_exact(&counted, &truth, "exactly-once, after a restart");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("exactly-once commit failed"), "{text}");
    let status = signal_and_wait(&mut child, libc::SIGTERM, Duration::from_secs(60));
    assert!(status.success(), "SIGTERM stops gracefully: {status}");
}

/// Counts 5,000 orders, restarts the broker empty on the same port (with `orders_after`
/// orders produced on the new one), and waits (bounded) for the worker to stop with the
/// broker's data loss.
fn broker_restarts_empty(test: &str, orders_after: u64) {
    let Some(bin) = tansu(test) else { return };
    let mut broker = Broker::start(&bin);
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("data"), dir.path().join("worker.log"));
    let truth = produce_orders(&broker.addr(), 0, 5_000);
    let mut child = worker(&broker.addr(), &data, &log);
    let counted = wait_for_counts(&mut child, &data, &log, 5_000, Duration::from_secs(120));
    assert_exact(&counted, &truth, "before the broker restart");

    broker.restart();
    let restarted = Instant::now();
    if orders_after > 0 {
        produce_orders(&broker.addr(), 0, orders_after);
    }
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if restarted.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the worker neither stopped nor failed within 120 s of the broker losing its data; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("the worker stopped {:?} after the broker restart ({status})", restarted.elapsed());
    assert_eq!(status.code(), Some(1), "a failed worker exits 1; its log:\n{text}");
    assert!(text.contains("the broker lost data of orders"), "the error says the broker lost data; the log:\n{text}");

    // Restarted, the worker follows the broker as it is now: its stores are ahead of the
    // (empty) changelog, so it rebuilds them, and counts what the new broker holds.
    // A log of its own, so that a failure shows this worker's log alone.
    let log = dir.path().join("worker-after-restart.log");
    let mut child = worker(&broker.addr(), &data, &log);
    let fresh = produce_orders(&broker.addr(), orders_after, orders_after + 500);
    let mut truth = if orders_after > 0 { produce_truth(0, orders_after) } else { BTreeMap::new() };
    for (k, v) in fresh {
        *truth.entry(k).or_insert(0) += v;
    }
    let counted = wait_for_counts(&mut child, &data, &log, orders_after + 500, Duration::from_secs(120));
    assert_exact(&counted, &truth, "after the restart on the new broker");
    let status = signal_and_wait(&mut child, libc::SIGTERM, Duration::from_secs(60));
    assert!(status.success(), "SIGTERM stops gracefully: {status}");
}

/// The orders `from..to`, counted per account.
fn produce_truth(from: u64, to: u64) -> BTreeMap<String, u64> {
    let mut truth = BTreeMap::new();
    for id in from..to {
        *truth.entry(order(id).0).or_insert(0) += 1;
    }
    truth
}

#[test]
fn a_broker_that_restarts_empty_stops_the_worker() {
    broker_restarts_empty("a_broker_that_restarts_empty_stops_the_worker", 100);
}

#[test]
fn a_broker_that_restarts_empty_without_new_orders_stops_the_worker() {
    broker_restarts_empty("a_broker_that_restarts_empty_without_new_orders_stops_the_worker", 0);
}

/// The faults issue's seventh report: a worker started against a topic that already has 4
/// partitions, without `TOPIC_PARTITIONS=4` (the default is 8). Its tables' changelogs are
/// created with the topic's 4 partitions (co-partitioned), so every order is counted; before,
/// they got 8, every event failed in the agent and was skipped, and the table stayed empty.
#[test]
fn an_existing_topic_gets_co_partitioned_changelogs_without_topic_partitions() {
    let test = "an_existing_topic_gets_co_partitioned_changelogs_without_topic_partitions";
    let Some(bin) = tansu(test) else { return };
    let broker = Broker::start(&bin);
    let truth = produce_orders(&broker.addr(), 0, 20_000);
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("data"), dir.path().join("worker.log"));
    let mut child = Command::new(ORDERS_BIN)
        .arg("--broker")
        .arg(format!("kafka://{}", broker.addr()))
        .arg("--datadir")
        .arg(&data)
        .arg("worker")
        .env("BROKER_COMMIT_INTERVAL", "0.1")
        .env_remove("TOPIC_PARTITIONS")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the orders worker");
    let counted = wait_for_counts(&mut child, &data, &log, truth.values().sum(), Duration::from_secs(120));
    assert_exact(&counted, &truth, "counted with the default TOPIC_PARTITIONS");
    let topics: Value = serde_json::from_slice(&cli(&data, &["topics", "--json"]).stdout).unwrap();
    let changelog = topics.as_array().unwrap().iter().find(|t| t["topic"] == "orders-order_count-changelog").unwrap();
    assert_eq!(changelog["partitions"], 4, "{topics}");
    assert!(signal_and_wait(&mut child, libc::SIGTERM, Duration::from_secs(60)).success());
}
