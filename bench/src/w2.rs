//! Workload W2, stateful: the Faust README's order count — decode JSON orders, count them per
//! account in a table with its changelog on — over orders pre-loaded into a `local://` log;
//! its floor (the same decode and count in plain threads over the orders in memory); and
//! table recovery: changelog records replayed into an empty shard per second, and the time
//! to reopen a 1M-key shard from its checkpoint. [`run_with_next`] runs the count with the
//! agent written as a loop over `Stream::next` (the per-event path) rather than `for_each`.
//! [`run_on`] runs the count on any broker (the `kafka` benchmark's W2 through `kafka://`).

use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust::storage::{Log, LogConfig};
use faust::{App, Settings};
use serde::{Deserialize, Serialize};

/// Faust's README `Order` record (about 90 bytes of JSON here).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Order {
    /// The account, the topic's key and the table's.
    pub account_id: String,
    /// The product.
    pub product_id: String,
    /// Items ordered.
    pub amount: u32,
    /// Unit price.
    pub price: f64,
}

/// The `i`-th order over `accounts` accounts (deterministic, so every run sees the same).
pub fn order(i: u64, accounts: u64) -> Order {
    let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    Order {
        account_id: format!("account-{:07}", h % accounts),
        product_id: format!("product-{:04}", (h >> 24) % 1_000),
        amount: 1 + ((h >> 40) % 10) as u32,
        price: ((h >> 12) % 100_000) as f64 / 100.0,
    }
}

fn settings(id: &str, datadir: &Path, cores: usize) -> Settings {
    let mut s = Settings::new(id);
    s.datadir = datadir.to_path_buf();
    s.topic_partitions = 2;
    s.cores = Some(cores);
    s
}

/// Writes `n` orders over `accounts` accounts to topic `orders` (2 partitions, keyed by
/// account) in `datadir`, from one core.
pub fn preload(datadir: &Path, n: u64, accounts: u64) {
    let app = App::new(settings("w2-load", datadir, 1));
    let orders = app.topic::<String, Order>("orders");
    let stop = app.stop_signal();
    app.task(move || {
        let (orders, stop) = (orders.clone(), stop.clone());
        async move {
            for i in 0..n {
                let o = order(i, accounts);
                orders.send_soon(Some(&o.account_id), &o)?;
                if i % 4096 == 0 {
                    faust::runtime::yield_if_needed().await;
                }
            }
            stop.stop();
            Ok(())
        }
    });
    app.run().expect("W2 preload worker");
}

/// One counter per core, on its own cache line.
#[repr(align(128))]
#[derive(Default)]
struct Counter(AtomicU64);

/// What a W2 run measured.
#[derive(Debug, Clone, Copy)]
pub struct W2Run {
    /// Events per second from the first event to the last.
    pub events_s: f64,
    /// Accounts in the table at the end.
    pub accounts: u64,
    /// CPU time of the worker thread per event (1-core runs; NaN otherwise).
    pub cpu_ns_per_event: f64,
}

/// Runs W2 as app `id` over the pre-loaded orders on `cores` cores, checks that the table
/// counted every order, and returns the rate.
pub fn run(datadir: &Path, id: &str, n: u64, cores: usize) -> W2Run {
    run_counting(datadir, id, n, cores, false)
}

/// W4: W2 with the orders re-keyed by account through `group_by` first (one more hop through
/// the log: the repartition topic), as the Faust README writes it.
pub fn run_grouped(datadir: &Path, id: &str, n: u64, cores: usize) -> W2Run {
    run_counting(datadir, id, n, cores, true)
}

fn run_counting(datadir: &Path, id: &str, n: u64, cores: usize, grouped: bool) -> W2Run {
    try_run_on(settings(id, datadir, cores), "orders", n, Shape::counting(grouped), None, Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// W2 on 1 core with the agent written as a loop over [`Stream::next`](faust::Stream::next)
/// (Faust's `async for order in stream`) rather than `for_each`: the per-event path.
pub fn run_with_next(datadir: &Path, id: &str, n: u64) -> W2Run {
    let run = Shape { grouped: false, with_next: true };
    try_run_on(settings(id, datadir, 1), "orders", n, run, None, Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// How a W2 run's agent is written.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// W4: `group_by` the account first.
    grouped: bool,
    /// A loop over `next()` rather than `for_each`.
    with_next: bool,
}

impl Shape {
    /// The count written with `for_each`, behind a `group_by` when `grouped` (W4).
    fn counting(grouped: bool) -> Self {
        Shape { grouped, with_next: false }
    }
}

/// W2 on 1 core with the built-in monitor on or off (`Settings::monitor_enabled`), and with
/// or without an app sensor that counts every event in and out and every table access (what
/// a user's Prometheus or statsd sensor does per event): the monitor's cost.
pub fn run_monitored(datadir: &Path, id: &str, n: u64, monitor: bool, sensor: bool) -> W2Run {
    let mut s = settings(id, datadir, 1);
    s.monitor_enabled = monitor;
    let sensor: Option<Arc<dyn faust::Sensor>> = sensor.then(|| Arc::new(CountingSensor::default()) as _);
    try_run_on(s, "orders", n, Shape::counting(false), sensor, Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// W2 (or, `grouped`, W4) on 1 core with `processing_guarantee = exactly_once`: each commit
/// drains the events in flight, and W4's repartitioned orders reach the counting agent only
/// once the commit that covers them is durable.
pub fn run_exactly_once(datadir: &Path, id: &str, n: u64, grouped: bool) -> W2Run {
    let mut s = settings(id, datadir, 1);
    s.processing_guarantee = faust::ProcessingGuarantee::ExactlyOnce;
    try_run_on(s, "orders", n, Shape::counting(grouped), None, Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A sensor counting events in and out and table reads and writes, with relaxed atomics.
#[derive(Default)]
struct CountingSensor {
    events_in: AtomicU64,
    events_out: AtomicU64,
    table_ops: AtomicU64,
}

impl faust::Sensor for CountingSensor {
    fn on_message_in(&self, _tp: &faust::TopicPartition, _offset: u64) {
        self.events_in.fetch_add(1, Ordering::Relaxed);
    }
    fn on_stream_event_out(&self, _tp: &faust::TopicPartition, _offset: u64) {
        self.events_out.fetch_add(1, Ordering::Relaxed);
    }
    fn on_table_get(&self, _table: &str) {
        self.table_ops.fetch_add(1, Ordering::Relaxed);
    }
    fn on_table_set(&self, _table: &str) {
        self.table_ops.fetch_add(1, Ordering::Relaxed);
    }
}

/// W2 (the count per account, without `group_by`) as configured by `settings` (any broker;
/// `settings.cores` cores, default 1) over the `n` orders already in `topic`: the rate from
/// the first event to the `n`-th, or an error when the worker fails or has not counted them
/// all within `deadline`.
pub fn run_on(settings: Settings, topic: &str, n: u64, deadline: Duration) -> Result<W2Run, String> {
    try_run_on(settings, topic, n, Shape::counting(false), None, deadline)
}

/// W4 (`group_by` by account, then the count: the Faust README's form) as configured by
/// `settings` over the `n` orders already in `topic`, as [`run_on`] does W2.
pub fn run_grouped_on(settings: Settings, topic: &str, n: u64, deadline: Duration) -> Result<W2Run, String> {
    try_run_on(settings, topic, n, Shape::counting(true), None, deadline)
}

fn try_run_on(
    settings: Settings,
    topic: &str,
    n: u64,
    shape: Shape,
    sensor: Option<Arc<dyn faust::Sensor>>,
    deadline: Duration,
) -> Result<W2Run, String> {
    let Shape { grouped, with_next } = shape;
    let id = settings.id.clone();
    let cores = settings.cores.unwrap_or(1).max(1);
    let app = App::new(settings);
    if let Some(sensor) = sensor {
        app.sensor(sensor);
    }
    let orders = app.topic::<String, Order>(topic);
    let counts = app.table::<String, u64>("counts").with_default(|| 0);
    let counters: Arc<Vec<Counter>> = Arc::new((0..cores).map(|_| Counter::default()).collect());
    let base = Instant::now();
    let first_ns = Arc::new(AtomicU64::new(u64::MAX));
    let cpu = Arc::new(crate::CpuSpan::new(n));
    // (orders counted, accounts) per core, read from its shards when its agent ends.
    let tallies: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    {
        let (counters, first_ns, tallies, cpu) = (counters.clone(), first_ns.clone(), tallies.clone(), cpu.clone());
        let count = move |stream: faust::Stream<String, Order>| {
            let (counts, counters, first_ns, tallies, cpu) =
                (counts.clone(), counters.clone(), first_ns.clone(), tallies.clone(), cpu.clone());
            async move {
                let core = faust::runtime::current_core().unwrap_or(0);
                let counted = counts.clone();
                let count_one = move |order: Order| {
                    if first_ns.load(Ordering::Relaxed) == u64::MAX {
                        first_ns.fetch_min(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    }
                    counted.update(&order.account_id, |c| *c += 1)?;
                    let seen = counters[core].0.fetch_add(1, Ordering::Relaxed) + 1;
                    if cores == 1 {
                        cpu.mark(seen);
                    }
                    Ok::<(), faust::AgentError>(())
                };
                if with_next {
                    let mut stream = stream;
                    while let Some(order) = stream.next().await {
                        count_one(order)?;
                    }
                } else {
                    stream.for_each(count_one).await?;
                }
                let items = counts.local_items()?;
                let counted = items.iter().map(|(_, c)| c).sum();
                tallies.lock().map_err(|_| "poisoned")?.push((counted, items.len() as u64));
                Ok::<(), faust::AgentError>(())
            }
        };
        if grouped {
            app.agent("count", &orders.group_by(|o: &Order| o.account_id.clone(), "account"), count);
        } else {
            app.agent("count", &orders, count);
        }
    }
    let stop = app.stop_signal();
    let done_at = Arc::new(Mutex::new(None));
    // Set when the worker returned (so a failed worker is not waited for until the deadline).
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (counters, done_at, ended) = (counters.clone(), done_at.clone(), ended.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + deadline;
            while Instant::now() < deadline && !ended.load(Ordering::Relaxed) {
                let seen: u64 = counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum();
                if seen >= n {
                    *done_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(base.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            stop.stop();
        })
    };
    let ran = app.run();
    ended.store(true, Ordering::Relaxed);
    watcher.join().map_err(|_| format!("W2 ({id}): the watcher thread panicked"))?;
    ran.map_err(|e| format!("W2 ({id}): the worker failed: {e}"))?;
    let seen: u64 = counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum();
    let end = done_at
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .ok_or_else(|| format!("W2 ({id}): only {seen} of {n} orders counted within {deadline:?}"))?;
    let start = Duration::from_nanos(first_ns.load(Ordering::Relaxed));
    let tallies = tallies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let counted: u64 = tallies.iter().map(|t| t.0).sum();
    let accounts: u64 = tallies.iter().map(|t| t.1).sum();
    if counted != n {
        return Err(format!("W2 ({id}): the table counted {counted} orders, not {n}"));
    }
    Ok(W2Run { events_s: n as f64 / (end - start).as_secs_f64(), accounts, cpu_ns_per_event: cpu.ns_per_event() })
}

/// The floor: the same decode and count per account (a foldhash map) by `threads` plain
/// threads over the orders in memory. Events/s, best of 3.
pub fn floor(encoded: &[Vec<u8>], threads: usize) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        std::thread::scope(|s| {
            for chunk in encoded.chunks(encoded.len().div_ceil(threads)) {
                s.spawn(move || {
                    let mut counts: hashbrown::HashMap<String, u64, foldhash::fast::RandomState> = Default::default();
                    for bytes in chunk {
                        let o: Order = serde_json::from_slice(bytes).expect("order");
                        match counts.get_mut(&o.account_id) {
                            Some(c) => *c += 1,
                            None => {
                                counts.insert(o.account_id, 1);
                            }
                        }
                    }
                    black_box(counts.len())
                });
            }
        });
        best = best.min(start.elapsed());
    }
    encoded.len() as f64 / best.as_secs_f64()
}

/// Starts app `id` (1 core) on `datadir` with nothing new to process and returns the time
/// until a task on core 0 runs, which is after every shard was opened and recovered.
pub fn time_to_ready(datadir: &Path, id: &str) -> Duration {
    let app = App::new(settings(id, datadir, 1));
    let _orders = app.topic::<String, Order>("orders");
    let _counts = app.table::<String, u64>("counts").with_default(|| 0);
    let ready = Arc::new(Mutex::new(None));
    let stop = app.stop_signal();
    let start = Instant::now();
    {
        let ready = ready.clone();
        app.task(move || {
            let (ready, stop) = (ready.clone(), stop.clone());
            async move {
                *ready.lock().map_err(|_| "poisoned")? = Some(start.elapsed());
                stop.stop();
                Ok(())
            }
        });
    }
    app.run().expect("W2 recovery worker");
    let ready = *ready.lock().unwrap_or_else(|p| p.into_inner());
    ready.expect("the task ran")
}

/// Records in app `id`'s `counts` changelog (what recovery into an empty shard replays).
pub fn changelog_records(datadir: &Path, id: &str) -> u64 {
    let topic = datadir.join("topics").join(format!("{id}-counts-changelog"));
    let mut total = 0;
    for p in 0..2 {
        if let Ok(log) = Log::open(topic.join(p.to_string()), LogConfig::default()) {
            total += log.high_watermark() - log.earliest_offset();
        }
    }
    total
}
