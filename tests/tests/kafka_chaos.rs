//! Chaos on Kafka, Faust's stress scenario: per-partition monotonic counters flow into topic
//! `numbers`; three worker processes (`stress`, one core each, in one consumer group) forward
//! them to `forwarded` and count them per key in two tables. For a minute (`CHAOS_SECS`), a
//! killer sends SIGKILL, SIGTERM or SIGINT to a random worker every few seconds and restarts
//! it. Afterwards:
//!
//! - `forwarded` holds every number of every partition (no gaps); duplicates — numbers
//!   forwarded again after a SIGKILL, because their source offsets were not committed — stay
//!   within the stated bound: per SIGKILL, at most twice `BROKER_COMMIT_EVERY` (the events a
//!   core acks between two commits, and one commit in flight);
//! - a fresh worker that recovers the tables from their changelogs finds, for every key,
//!   exactly as many records as `forwarded` holds for it and its highest number: the tables
//!   equal a rebuild from their source topic;
//! - a SIGTERM or SIGINT stops a worker gracefully (exit 0) every time.
//!
//! A tansu broker of the test's own (`FAUST_TANSU_BIN`); skipped, with a notice, without
//! `FAUST_TEST_BROKER` (or the tansu binary).

#[path = "support/orders_kafka.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use faust_transport::{
    BatchBuilder, CoreTransport, KafkaOptions, KafkaTransport, OffsetSpec, TopicConfig, TopicPartition, Transport,
};
use rand::{Rng, SeedableRng};
use support::{Broker, signal_and_wait, tansu};

const STRESS_BIN: &str = env!("CARGO_BIN_EXE_stress");
const PARTITIONS: u32 = 4;
const COMMIT_EVERY: u64 = 2_000;
/// The workers' and the verifier's `BROKER_REBALANCE_TIMEOUT`, in seconds.
const REBALANCE_TIMEOUT_S: &str = "10";
/// Orders counted while connections are cut.
const ORDERS_CUT: u64 = 150_000;

/// Runs `f` on a glommio executor with a core handle on the broker.
fn on_glommio<T: Send + 'static, Fut: std::future::Future<Output = T> + 'static>(
    broker: &str,
    f: impl FnOnce(faust_transport::KafkaCore) -> Fut + Send + 'static,
) -> T {
    let t = KafkaTransport::open(&format!("kafka://{broker}"), KafkaOptions::default()).expect("open");
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move { f(t.attach_core(0, 1).await.expect("attach")).await })
        .expect("executor")
        .join()
        .expect("join")
}

/// Appends the numbers of each partition in steps (100 per partition every 50 ms) until
/// `stop`; returns how many each partition got (its numbers are 0..that).
fn produce_numbers(broker: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        on_glommio(&broker, move |core| async move {
            core.create_topic("numbers", &TopicConfig::new(PARTITIONS)).await.expect("create numbers");
            let mut next = vec![0u64; PARTITIONS as usize];
            while !stop.load(Ordering::Relaxed) {
                for (p, n) in next.iter_mut().enumerate() {
                    let mut batch = BatchBuilder::new();
                    for i in *n..*n + 100 {
                        batch.push(0, Some(b"n"), Some(i.to_string().as_bytes()), &[]);
                    }
                    core.produce(&TopicPartition::new("numbers", p as u32), batch).await.expect("produce numbers");
                    *n += 100;
                }
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
            next
        })
    })
}

/// Every record of `forwarded`: (key, number).
fn read_forwarded(broker: &str) -> Vec<(String, u64)> {
    on_glommio(broker, |core| async move {
        let mut out = Vec::new();
        let Some(meta) = core.topic_metadata("forwarded").await.expect("metadata") else { return out };
        for p in 0..meta.config.partitions {
            let tp = TopicPartition::new("forwarded", p);
            let end = core.list_offset(&tp, OffsetSpec::Latest).await.expect("end");
            let (mut next, mut empty) = (0, 0);
            while next < end {
                let fetched = core.fetch(&tp, next, 4 << 20, Duration::from_millis(100)).await.expect("fetch");
                if fetched.next_offset <= next {
                    empty += 1;
                    assert!(empty < 100, "{tp}: no records from {next} although its end is {end}");
                    continue;
                }
                empty = 0;
                for r in &fetched.records {
                    let key = String::from_utf8(r.key.clone().expect("keyed").to_vec()).expect("utf-8 key");
                    let value: u64 = serde_json::from_slice(r.value.as_deref().expect("a value")).expect("a number");
                    out.push((key, value));
                }
                next = fetched.next_offset;
            }
        }
        out
    })
}

/// A `stress` worker process.
struct Worker {
    child: Option<Child>,
    data: PathBuf,
    log: PathBuf,
}

impl Worker {
    fn start(broker: &str, data: &Path, log: &Path) -> Worker {
        let child = Command::new(STRESS_BIN)
            .args([broker, data.to_str().expect("utf-8 path"), "work"])
            .env("BROKER_SESSION_TIMEOUT", "2")
            // tansu waits this long for members to rejoin a rebalance (a killed one never
            // does): the default, 60 s, would stall the group for a minute after a kill.
            .env("BROKER_REBALANCE_TIMEOUT", REBALANCE_TIMEOUT_S)
            .env("BROKER_COMMIT_EVERY", COMMIT_EVERY.to_string())
            .env("WORKER_CORES", "1")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log"))
            .spawn()
            .expect("start a stress worker");
        Worker { child: Some(child), data: data.to_path_buf(), log: log.to_path_buf() }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn chaos_keeps_forwarding_gapless_and_tables_exact() {
    let Some(bin) = tansu("chaos_keeps_forwarding_gapless_and_tables_exact") else { return };
    let chaos = Duration::from_secs(std::env::var("CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60));
    let broker = Broker::start(&bin);
    let addr = broker.addr();
    let dir = tempfile::tempdir().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let producer = produce_numbers(addr.clone(), stop.clone());
    // Let the producer create `numbers` before the workers look for it.
    std::thread::sleep(Duration::from_millis(500));
    let mut workers: Vec<Worker> = (0..3)
        .map(|n| Worker::start(&addr, &dir.path().join(format!("data-{n}")), &dir.path().join(format!("w{n}.log"))))
        .collect();

    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let started = Instant::now();
    let (mut kills, mut graceful) = (0u64, 0u64);
    while started.elapsed() < chaos {
        std::thread::sleep(Duration::from_millis(rng.gen_range(1_500..4_000)));
        let w = &mut workers[rng.gen_range(0..3)];
        let signal = [libc::SIGKILL, libc::SIGTERM, libc::SIGINT][rng.gen_range(0..3)];
        let mut child = w.child.take().expect("running");
        let status = signal_and_wait(&mut child, signal, Duration::from_secs(60));
        if signal == libc::SIGKILL {
            kills += 1;
        } else {
            graceful += 1;
            assert!(status.success(), "signal {signal} stops a worker gracefully: {status}; its log:\n{}", w.log());
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..1_500)));
        let restarted = Worker::start(&addr, &w.data, &w.log);
        *w = restarted;
    }
    stop.store(true, Ordering::Relaxed);
    let produced = producer.join().expect("producer");
    eprintln!(
        "chaos for {:?}: {kills} SIGKILLs, {graceful} SIGTERM/SIGINT; numbers per partition {produced:?}",
        started.elapsed()
    );

    // Settle: every number forwarded.
    let settle = Instant::now();
    let forwarded = loop {
        let records = read_forwarded(&addr);
        let mut seen: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
        for (k, v) in &records {
            seen.entry(k.clone()).or_default().insert(*v);
        }
        let complete =
            (0..PARTITIONS).all(|p| seen.get(&format!("p{p}")).map_or(0, BTreeSet::len) as u64 == produced[p as usize]);
        if complete {
            break records;
        }
        for w in &mut workers {
            if let Some(status) = w.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("a worker exited ({status}); its log:\n{}", w.log());
            }
        }
        assert!(settle.elapsed() < Duration::from_secs(120), "not every number was forwarded within 120 s");
        std::thread::sleep(Duration::from_millis(500));
    };
    // Let the counts catch up, then stop everyone gracefully, one at a time: each leave
    // completes its rebalance before the next. tansu keeps a departed leader as the group's
    // leader when members leave during a rebalance and the group empties, and hands it to
    // the next member to join (which then waits, as a follower, for a SyncGroup that never
    // comes): seen in its own log, with every LeaveGroup answered 0.
    std::thread::sleep(Duration::from_secs(2));
    for w in &mut workers {
        let mut child = w.child.take().expect("running");
        let status = signal_and_wait(&mut child, libc::SIGTERM, Duration::from_secs(60));
        assert!(status.success(), "SIGTERM stops gracefully: {status}; the log:\n{}", w.log());
        std::thread::sleep(Duration::from_secs(3));
    }
    let forwarded = {
        // Records forwarded after the settle check (the last events' re-sends) count too.
        let all = read_forwarded(&addr);
        assert!(all.len() >= forwarded.len());
        all
    };

    // No gaps; duplicates within the bound.
    let mut per_key: BTreeMap<String, (u64, BTreeSet<u64>, u64)> = BTreeMap::new();
    for (k, v) in &forwarded {
        let e = per_key.entry(k.clone()).or_default();
        e.0 += 1;
        e.1.insert(*v);
        e.2 = e.2.max(*v);
    }
    let mut duplicates = 0;
    for p in 0..PARTITIONS {
        let (records, distinct, highest) = &per_key[&format!("p{p}")];
        let want = produced[p as usize];
        assert_eq!(distinct.len() as u64, want, "p{p}: every number forwarded");
        assert_eq!(*highest, want - 1);
        duplicates += records - want;
    }
    let bound = kills * 2 * COMMIT_EVERY;
    eprintln!("{} records forwarded, {duplicates} duplicates (bound {bound} for {kills} SIGKILLs)", forwarded.len());
    assert!(duplicates <= bound, "{duplicates} duplicates, over the bound of {bound}");

    // The tables, recovered by a fresh worker from their changelogs, equal a rebuild from
    // `forwarded`.
    let out = dir.path().join("tables.json");
    let verifier = Command::new(STRESS_BIN)
        .args([addr.as_str(), dir.path().join("verify").to_str().unwrap(), "verify"])
        .arg(forwarded.len().to_string())
        .arg(&out)
        .env("BROKER_SESSION_TIMEOUT", "2")
        .env("BROKER_REBALANCE_TIMEOUT", REBALANCE_TIMEOUT_S)
        .env("WORKER_CORES", "1")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("verify.log")).expect("verifier log"))
        .status()
        .expect("run the verifier");
    // The verifier's log, shown when what it found is wrong.
    let verify_log = || {
        let log = std::fs::read_to_string(dir.path().join("verify.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let verifier = lines[lines.len().saturating_sub(40)..].join("\n");
        // And the end of each worker's log: how the group was left.
        let workers: Vec<String> = workers
            .iter()
            .map(|w| {
                let log = w.log();
                let lines: Vec<&str> = log.lines().collect();
                format!("{}:\n{}", w.log.display(), lines[lines.len().saturating_sub(15)..].join("\n"))
            })
            .collect();
        format!("{verifier}\n\nthe workers' logs end:\n{}", workers.join("\n"))
    };
    assert!(verifier.success(), "the verifier failed: {verifier}\n{}", verify_log());
    let tables: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).expect("tables")).expect("JSON");
    for (key, (records, _, highest)) in &per_key {
        assert_eq!(
            tables["count"][key].as_u64(),
            Some(*records),
            "count[{key}] equals the records forwarded; the verifier's log ends:\n{}",
            verify_log()
        );
        assert_eq!(tables["highest"][key].as_u64(), Some(*highest), "highest[{key}]");
    }
    drop(broker);
}

/// A TCP proxy on loopback in front of the broker that cuts every connection through it at
/// random moments (both directions shut, mid-request or not), while `cutting` is set.
struct CuttingProxy {
    cutting: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    cuts: Arc<std::sync::atomic::AtomicU64>,
}

impl CuttingProxy {
    fn start(listen_port: u16, upstream: String) -> CuttingProxy {
        let listener = std::net::TcpListener::bind(("127.0.0.1", listen_port)).expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let (cutting, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let cuts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let live: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        {
            let (live, stop) = (live.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((client, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let _ = client.set_nonblocking(false);
                    let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    for (mut from, mut to) in [
                        (client.try_clone().expect("clone"), server.try_clone().expect("clone")),
                        (server.try_clone().expect("clone"), client.try_clone().expect("clone")),
                    ] {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                            let _ = from.shutdown(std::net::Shutdown::Both);
                        });
                    }
                    live.lock().expect("live").extend([client, server]);
                }
            });
        }
        {
            let (live, stop, cutting, cuts) = (live.clone(), stop.clone(), cutting.clone(), cuts.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(5);
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(rng.gen_range(300..1_200)));
                    if cutting.load(Ordering::Relaxed) {
                        let mut conns = live.lock().expect("live");
                        for c in conns.drain(..) {
                            let _ = c.shutdown(std::net::Shutdown::Both);
                        }
                        cuts.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        CuttingProxy { cutting, stop, cuts }
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Connections cut mid-request, over and over: a broker behind a proxy that cuts every
/// connection at random moments (every 0.3–1.2 s) for 15 s, while three orders workers count.
/// They reconnect with backoff, rejoin their group when they must, and the counts come out
/// exact.
#[test]
fn connections_cut_mid_request_lose_nothing() {
    let Some(bin) = tansu("connections_cut_mid_request_lose_nothing") else { return };
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (broker_port, proxy_port) = (free(), free());
    // The broker listens on its port and advertises the proxy's: every client goes through it.
    let mut tansu = Command::new(&bin)
        .args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{broker_port}")])
        .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{proxy_port}")])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu");
    let proxy = CuttingProxy::start(proxy_port, format!("127.0.0.1:{broker_port}"));
    let addr = format!("127.0.0.1:{proxy_port}");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", broker_port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "tansu did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let truth = support::produce_orders_rskafka(&addr, 0, ORDERS_CUT);
    let dir = tempfile::tempdir().unwrap();
    let mut workers: Vec<Child> = (0..3)
        .map(|n| {
            support::worker_env(
                &addr,
                &dir.path().join(format!("data-{n}")),
                &dir.path().join(format!("w{n}.log")),
                &[],
                &[("WORKER_CORES", "1")],
            )
        })
        .collect();
    proxy.cutting.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(15));
    proxy.cutting.store(false, Ordering::Relaxed);
    let counted: u64 = (0..3)
        .filter_map(|n| support::counts(&dir.path().join(format!("data-{n}"))))
        .map(|c| c.values().sum::<u64>())
        .sum();
    eprintln!(
        "{} rounds of cuts; {counted} of {ORDERS_CUT} orders counted when they stopped",
        proxy.cuts.load(Ordering::Relaxed)
    );
    // Then every order counted exactly once, between the three.
    let started = Instant::now();
    let merged = loop {
        let mut merged = BTreeMap::new();
        let mut complete = true;
        for n in 0..3 {
            match support::counts(&dir.path().join(format!("data-{n}"))) {
                Some(c) => merged.extend(c),
                None => complete = false,
            }
        }
        if complete && merged.values().sum::<u64>() == ORDERS_CUT {
            std::thread::sleep(Duration::from_millis(500));
            break merged;
        }
        for (n, w) in workers.iter_mut().enumerate() {
            if let Some(status) = w.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.path().join(format!("w{n}.log"))).unwrap_or_default();
                panic!("worker {n} exited ({status}); its log:\n{log}");
            }
        }
        assert!(started.elapsed() < Duration::from_secs(120), "not every order counted within 120 s");
        std::thread::sleep(Duration::from_millis(300));
    };
    support::assert_exact(&merged, &truth, "with connections cut");
    for w in &mut workers {
        let status = signal_and_wait(w, libc::SIGTERM, Duration::from_secs(60));
        assert!(status.success(), "SIGTERM stops gracefully: {status}");
    }
    let _ = tansu.kill();
    let _ = tansu.wait();
}
