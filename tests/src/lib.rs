//! Helpers shared by the end-to-end scenarios in `tests/tests/`.
//!
//! Scenarios that need a Kafka broker read its address from `FAUST_TEST_BROKER` (set by
//! `scripts/test`, which starts one) and skip with a printed notice when it is unset, so a plain
//! `cargo test` stays hermetic.

pub mod cli;
pub mod kafka_front;
pub mod tally;

/// The environment variable through which `scripts/test` hands a running broker to the tests.
pub const BROKER_ENV: &str = "FAUST_TEST_BROKER";

/// The broker address for tests that need one, or `None` (after printing why the test is
/// skipped) when no broker was provided.
pub fn test_broker(test_name: &str) -> Option<String> {
    match std::env::var(BROKER_ENV) {
        Ok(addr) if !addr.is_empty() => Some(addr),
        _ => {
            eprintln!("skipping {test_name}: no broker ({BROKER_ENV} unset; scripts/test starts one)");
            None
        }
    }
}

/// Bytes allocated on disk under `dir` (0 when it does not exist): what its files really
/// take, preallocated space included.
pub fn disk_use(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_use(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Every record of `topic` on a `local://` data directory (`{datadir}/topics/{topic}/{p}`),
/// read from the log files, partition after partition. Run it once the worker stopped (a
/// running worker holds the logs' locks).
pub fn topic_records(datadir: &std::path::Path, topic: &str) -> Vec<faust_storage::Record> {
    use faust_storage::{Log, LogConfig};
    let mut out = Vec::new();
    let topic = datadir.join("topics").join(topic);
    let Ok(entries) = std::fs::read_dir(&topic) else { return out };
    let mut partitions: Vec<std::path::PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.parse::<u32>().is_ok()))
        .collect();
    partitions.sort();
    for path in partitions {
        let log = Log::open(&path, LogConfig::default()).expect("open a partition's log");
        let mut next = log.earliest_offset();
        while next < log.high_watermark() {
            for batch in log.read(next, 1 << 20).expect("read a partition's log") {
                out.extend(batch.records_from(next));
                next = batch.last_offset() + 1;
            }
        }
    }
    out
}

/// Runs `app` on its own settings until the counts its cores hold in `table` add up to
/// `expected_total` (or `within` passed), after a task sent `to_send` to `topic` with
/// `send_soon`; returns the counts, merged over the cores, with what `App::run` returned.
///
/// Each core's timer reads its shards every 20 ms, so the counts are those of the shards the
/// cores hold at the end.
pub fn count_until(
    app: &faust::App,
    topic: &faust::Topic<String, u64>,
    table: &faust::Table<String, u64>,
    to_send: &[(String, u64)],
    expected_total: u64,
    within: std::time::Duration,
) -> (Result<(), faust::WorkerError>, std::collections::HashMap<String, u64>) {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let sends = to_send.to_vec();
    let orders = topic.clone();
    app.task(move || {
        let (orders, sends) = (orders.clone(), sends.clone());
        async move {
            for (k, v) in &sends {
                orders.send_soon(Some(k), v)?;
            }
            Ok(())
        }
    });
    // Per core: what its timer last saw of its shards.
    let totals: Arc<Mutex<HashMap<usize, HashMap<String, u64>>>> = Arc::default();
    let seen = Arc::new(AtomicU64::new(0));
    {
        let (counts, totals, seen) = (table.clone(), totals.clone(), seen.clone());
        app.timer_on_every_core(std::time::Duration::from_millis(20), move || {
            let (counts, totals, seen) = (counts.clone(), totals.clone(), seen.clone());
            async move {
                let core = faust::runtime::current_core().ok_or("timers run on a core")?;
                let items: HashMap<String, u64> = counts.local_items()?.into_iter().collect();
                let mut all = totals.lock().map_err(|_| "poisoned")?;
                all.insert(core, items);
                seen.store(all.values().flat_map(|m| m.values()).sum(), Ordering::SeqCst);
                Ok(())
            }
        });
    }
    let stop = app.stop_signal();
    let watched = seen.clone();
    let watcher = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + within;
        while watched.load(Ordering::SeqCst) < expected_total && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        stop.stop();
    });
    let result = app.run();
    watcher.join().expect("the watcher thread");
    let per_core = totals.lock().unwrap_or_else(|p| p.into_inner()).clone();
    (result, per_core.into_values().flatten().collect())
}

/// One HTTP/1.1 request over a plain socket to `127.0.0.1:port` (bounded by 30 s): the
/// status, the head (status line and headers) and the body.
pub fn http(port: u16, method: &str, target: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the web server");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).expect("a read timeout");
    write!(s, "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").expect("send the request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// An app's worker, run on a thread of its own by a test.
pub struct Running {
    /// The app.
    pub app: faust::App,
    thread: std::thread::JoinHandle<Result<(), faust::WorkerError>>,
}

impl Running {
    /// Runs `app`'s worker on a new thread.
    pub fn start(app: &faust::App) -> Running {
        let runner = app.clone();
        let thread = std::thread::spawn(move || runner.run());
        Running { app: app.clone(), thread }
    }

    /// Stops the worker and waits for it; panics if it failed.
    pub fn stop(self) {
        self.app.stop_signal().stop();
        self.thread.join().expect("the worker thread").expect("the worker runs");
    }
}

/// Polls `ready` every 10 ms until it holds; panics naming `what` after `within`.
pub fn wait_for(what: &str, within: std::time::Duration, ready: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !ready() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Waits until the `memory://` group `group` has `members` members and no revocation in
/// flight (every worker holds its share).
pub fn wait_for_group(transport: &faust::MemoryTransport, group: &str, members: usize) {
    wait_for(&format!("{members} workers in group {group}"), std::time::Duration::from_secs(30), || {
        transport.group_assignment(group).len() == members && transport.pending_revokes(group) == 0
    });
}
