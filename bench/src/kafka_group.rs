//! Kafka consumer groups (issue 18), with worker *processes* (this benchmark's own binary,
//! run with [`WORKER_FLAG`]) in one group on one broker:
//!
//! - **takeover**: three workers (one core each, 2 s session timeout, 100 ms heartbeats, one
//!   standby per table partition) count orders flowing steadily into 4 partitions; one is
//!   SIGKILLed. Measured: from the SIGKILL to the first event of each of its partitions
//!   processed by a survivor (the latest of them). Also the changelog records the survivors
//!   replayed to take over, against the changelog's length.
//! - **rebalance pause**: after the takeover, two workers count the steady flow and a third
//!   joins. Measured: the longest time a partition that does *not* move went without an
//!   event processed while the group rebalanced, against the same in a quiet stretch before
//!   the join (the flow's own rhythm). The partition that moves is the one slot the new
//!   worker gets (4 slots over 3 workers of equal weight): the one with the longest gap.
//! - **W2 with two workers**: the orders count over pre-loaded orders by one worker process
//!   of one core, then by two (a fresh group each time), events/s from the first committed
//!   offset to the last order committed.
//!
//! Processing is seen from inside: a worker sends, for every 50th offset of a partition it
//! processes, a progress record (partition, offset, its wall clock) to a topic the
//! benchmark reads afterwards. W2 is watched through the group's committed offsets.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use faust::{App, Settings};
use faust_transport::{BatchBuilder, CoreTransport, KafkaOptions, KafkaTransport, TopicConfig, TopicPartition};

use crate::w2::{Order, order};

/// The flag that makes the benchmark binary run as one worker process:
/// `BIN --group-worker BROKER APP TOPIC DATADIR`.
pub const WORKER_FLAG: &str = "--group-worker";

const PARTITIONS: u32 = 4;
const ACCOUNTS: u64 = 10_000;
const SESSION: Duration = Duration::from_secs(2);
const COMMIT_INTERVAL: Duration = Duration::from_millis(50);
const HEARTBEAT: Duration = Duration::from_millis(100);
/// A progress record every this many offsets of a partition.
const PROGRESS_EVERY: u64 = 50;

/// What the group benchmark measured.
#[derive(Debug, Clone, Default)]
pub struct GroupFigures {
    /// SIGKILL to the first event of each of the killed worker's partitions processed
    /// elsewhere (the latest), ms.
    pub takeover_ms: f64,
    /// SIGKILL to the first of the killed worker's partitions processed elsewhere, ms.
    pub takeover_first_ms: f64,
    /// Changelog records the survivors replayed to take over.
    pub takeover_replayed_records: u64,
    /// Standbys promoted in the takeover.
    pub takeover_standbys_promoted: u64,
    /// The table's changelog length at the kill (what a takeover without standbys replays
    /// for the dead worker's partitions is a share of it).
    pub changelog_records: u64,
    /// One JoinGroup and SyncGroup round of a lone member on this broker, ms: what any
    /// rebalance costs at least (tansu answers a JoinGroup after a fixed wait of a second).
    pub join_round_ms: f64,
    /// Orders produced per second during the takeover and the join.
    pub flow_events_s: f64,
    /// Longest gap between processed events of a partition that does not move, while a
    /// worker joins, ms.
    pub rebalance_pause_ms: f64,
    /// Longest gap between processed events of any partition in a quiet stretch before the
    /// join, ms.
    pub quiet_pause_ms: f64,
    /// W2, one worker process of one core, events/s.
    pub w2_1worker: f64,
    /// W2, two worker processes of one core each, events/s.
    pub w2_2workers: f64,
}

/// Runs as one worker process (see [`WORKER_FLAG`]): counts orders per account until SIGTERM,
/// then prints its `WorkerStats` as JSON on stdout. Returns the exit status.
pub fn worker_main(args: &[String]) -> i32 {
    let [broker, id, topic, datadir] = args else {
        eprintln!("usage: {WORKER_FLAG} BROKER APP TOPIC DATADIR");
        return 2;
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).try_init();
    let mut s = Settings::new(id.as_str());
    s.broker = format!("kafka://{broker}");
    s.datadir = PathBuf::from(datadir);
    s.topic_partitions = PARTITIONS;
    s.cores = Some(1);
    s.commit_interval = COMMIT_INTERVAL;
    s.broker_session_timeout = SESSION;
    s.broker_heartbeat_interval = HEARTBEAT;
    let app = App::new(s);
    let orders = app.topic::<String, Order>(topic);
    let progress = app.topic::<String, (u32, u64, i64)>(&format!("{topic}-progress"));
    let counts = app.table::<String, u64>("counts").with_default(|| 0);
    app.agent("count", &orders, move |stream| {
        let (counts, progress) = (counts.clone(), progress.clone());
        async move {
            stream
                .for_each(move |order| {
                    counts.update(&order.account_id, |c| *c += 1)?;
                    if let Some(at) = faust::current_event().filter(|at| at.offset % PROGRESS_EVERY == 0) {
                        progress.send_soon(None, &(at.partition, at.offset, now_ms()))?;
                    }
                    Ok(())
                })
                .await
        }
    });
    if let Err(e) = app.stop_on_signals() {
        eprintln!("worker: signals: {e}");
        return 1;
    }
    let result = app.run();
    println!("{}", serde_json::to_string(&app.stats()).unwrap_or_default());
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("worker: {e}");
            1
        }
    }
}

/// A worker process, killed when dropped.
struct Worker {
    child: Child,
}

impl Worker {
    fn start(exe: &Path, broker: &str, id: &str, topic: &str, datadir: &Path) -> Result<Worker, String> {
        // With GROUP_BENCH_LOGS=DIR, each worker's log goes to DIR/{its data directory's name}.log.
        let stderr = match std::env::var_os("GROUP_BENCH_LOGS") {
            Some(logs) => {
                let name = datadir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                let file = std::fs::File::create(Path::new(&logs).join(format!("{name}.log")))
                    .map_err(|e| format!("a worker's log: {e}"))?;
                Stdio::from(file)
            }
            None => Stdio::null(),
        };
        let child = Command::new(exe)
            .arg(WORKER_FLAG)
            .args([broker, id, topic])
            .arg(datadir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting a worker process: {e}"))?;
        Ok(Worker { child })
    }

    /// SIGTERM, then its stats (bounded: 30 s).
    fn stop(mut self) -> Result<serde_json::Value, String> {
        // SAFETY: signalling our own child, not yet waited for.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().map_err(|e| e.to_string())?.is_none() {
            if Instant::now() > deadline {
                return Err("a worker did not stop within 30 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            use std::io::Read;
            stdout.read_to_string(&mut out).map_err(|e| e.to_string())?;
        }
        serde_json::from_str(out.trim()).map_err(|e| format!("a worker's stats ({out:?}): {e}"))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Our client, on a glommio executor thread of its own: produces, reads offsets.
fn on_glommio<T, F, Fut>(t: &KafkaTransport, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(faust_transport::KafkaCore) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, String>> + 'static,
{
    let t = t.clone();
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("group-bench")
        .spawn(move || async move { f(t.core()).await })
        .map_err(|e| format!("glommio executor: {e}"))?
        .join()
        .map_err(|e| format!("glommio executor: {e}"))?
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn tps(topic: &str) -> Vec<TopicPartition> {
    (0..PARTITIONS).map(|p| TopicPartition::new(topic, p)).collect()
}

/// Produces orders `from..to` into `topic`, order `i` keyed `order-{i}` into partition
/// `i % 4` (as the Kafka benchmark's W2 does), one batch per partition.
async fn produce(core: &faust_transport::KafkaCore, topic: &str, from: u64, to: u64) -> Result<(), String> {
    let mut batches: Vec<BatchBuilder> = (0..PARTITIONS).map(|_| BatchBuilder::new()).collect();
    let ts = now_ms();
    for i in from..to {
        let value = serde_json::to_vec(&order(i, ACCOUNTS)).map_err(|e| e.to_string())?;
        let key = format!("order-{i}");
        batches[(i % u64::from(PARTITIONS)) as usize].push(ts, Some(key.as_bytes()), Some(&value), &[]);
    }
    for (p, batch) in batches.into_iter().enumerate().filter(|(_, b)| !b.is_empty()) {
        core.produce(&TopicPartition::new(topic, p as u32), batch).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Produces orders steadily (a batch every 10 ms at `rate` per second) until `stop`;
/// returns how many.
fn flow(
    t: &KafkaTransport,
    topic: String,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<u64, String>> {
    let t = t.clone();
    std::thread::spawn(move || {
        on_glommio(&t, move |core| async move {
            let mut next = 0;
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                if due > next {
                    produce(&core, &topic, next, due).await?;
                    next = due;
                }
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            Ok(next)
        })
    })
}

/// Every progress record of `topic`: per source partition, the wall-clock times (ms since
/// the epoch) at which the workers processed its progress offsets, sorted.
fn progress_times(t: &KafkaTransport, topic: String) -> Result<Vec<Vec<i64>>, String> {
    on_glommio(t, move |core| async move {
        let mut times: Vec<Vec<i64>> = vec![Vec::new(); PARTITIONS as usize];
        let meta = core.topic_metadata(&topic).await.map_err(|e| e.to_string())?;
        let partitions = meta.map_or(0, |m| m.config.partitions);
        for tp in (0..partitions).map(|p| TopicPartition::new(topic.as_str(), p)) {
            let end = core.list_offset(&tp, faust_transport::OffsetSpec::Latest).await.map_err(|e| e.to_string())?;
            let mut next = 0;
            let mut empty = 0;
            while next < end {
                let fetched =
                    core.fetch(&tp, next, 4 << 20, Duration::from_millis(100)).await.map_err(|e| e.to_string())?;
                if fetched.next_offset <= next {
                    // A broker may answer a fetch below its end empty now and then.
                    empty += 1;
                    if empty > 50 {
                        return Err(format!("{tp}: no records from offset {next} although the end is {end}"));
                    }
                    continue;
                }
                empty = 0;
                for r in &fetched.records {
                    let Some(v) = &r.value else { continue };
                    let (p, _, at): (u32, u64, i64) = serde_json::from_slice(v).map_err(|e| e.to_string())?;
                    if let Some(list) = times.get_mut(p as usize) {
                        list.push(at);
                    }
                }
                next = fetched.next_offset;
            }
        }
        for list in &mut times {
            list.sort_unstable();
        }
        Ok(times)
    })
}

/// For each partition, the longest gap between processed progress offsets within
/// `[from, to)` (ms since the epoch), counting from `from` and up to `to`.
fn longest_gaps(times: &[Vec<i64>], from: i64, to: i64) -> Vec<f64> {
    times
        .iter()
        .map(|list| {
            let mut last = from;
            let mut longest = 0;
            for &at in list.iter().filter(|&&at| at >= from && at < to) {
                longest = longest.max(at - last);
                last = at;
            }
            longest.max(to - last) as f64
        })
        .collect()
}

/// Waits until every partition's committed offset reached `ends` (bounded); returns when
/// the first committed offset appeared and when the last end was reached.
fn wait_committed(
    t: &KafkaTransport,
    group: &str,
    topic: &str,
    ends: Vec<u64>,
    within: Duration,
) -> Result<(Instant, Instant), String> {
    let (group, partitions) = (group.to_string(), tps(topic));
    on_glommio(t, move |core| async move {
        let deadline = Instant::now() + within;
        let mut first = None;
        loop {
            let c: Vec<u64> = core
                .committed(&group, &partitions)
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|o| o.unwrap_or(0))
                .collect();
            let now = Instant::now();
            if first.is_none() && c.iter().any(|&o| o > 0) {
                first = Some(now);
            }
            if c.iter().zip(&ends).all(|(o, e)| o >= e) {
                return Ok((first.unwrap_or(now), now));
            }
            if now > deadline {
                return Err(format!("committed offsets {c:?} did not reach {ends:?} within {within:?}"));
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// W2 by `workers` worker processes over `n` pre-loaded orders in `topic`: events/s from the
/// first event processed to the last (seen through the progress records).
fn w2_with(
    exe: &Path,
    t: &KafkaTransport,
    broker: &str,
    topic: &str,
    workers: usize,
    n: u64,
    dir: &Path,
) -> Result<f64, String> {
    let id = format!("{topic}-w2-{workers}");
    let ends = {
        let topic = topic.to_string();
        on_glommio(t, move |core| async move {
            let mut ends = Vec::new();
            for tp in tps(&topic) {
                ends.push(core.list_offset(&tp, faust_transport::OffsetSpec::Latest).await.map_err(|e| e.to_string())?);
            }
            Ok(ends)
        })?
    };
    let procs: Vec<Worker> = (0..workers)
        .map(|w| Worker::start(exe, broker, &id, topic, &dir.join(format!("{id}-{w}"))))
        .collect::<Result<_, _>>()?;
    wait_committed(t, &id, topic, ends, Duration::from_secs(300))?;
    for w in procs {
        w.stop()?;
    }
    // Each worker of this run sent its progress to `{topic}-progress`, shared by both runs:
    // the run's records are those after the previous run's.
    let times = progress_times(t, format!("{topic}-progress"))?;
    let mut sorted: Vec<i64> = times.into_iter().flatten().collect();
    sorted.sort_unstable();
    let per_run = (n / PROGRESS_EVERY) as usize;
    let mine = &sorted[sorted.len().saturating_sub(per_run)..];
    let (first, last) = (mine.first().copied().unwrap_or(0), mine.last().copied().unwrap_or(0));
    Ok(n as f64 / ((last - first) as f64 / 1e3).max(1e-3))
}

/// How long a lone member of a fresh group waits for its first assignment: one JoinGroup
/// and SyncGroup round on this broker.
fn join_round(t: &KafkaTransport, topic: &str, group: &str) -> Result<f64, String> {
    use faust_transport::{Membership, Transport};
    let join = faust_transport::JoinRequest {
        topics: vec![topic.to_string()],
        copartitioned: Vec::new(),
        weight: 1,
        changelogs: Vec::new(),
    };
    let options = KafkaOptions {
        request_timeout: Duration::from_secs(10),
        session_timeout: SESSION,
        heartbeat_interval: HEARTBEAT,
        ..KafkaOptions::default()
    };
    let probe = KafkaTransport::open(&format!("kafka://{}", t.bootstrap()[0]), options).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut member = probe.membership(group, &join).map_err(|e| e.to_string())?;
    futures_lite::future::block_on(member.next_event()).map_err(|e| e.to_string())?;
    let took = started.elapsed();
    futures_lite::future::block_on(member.leave()).map_err(|e| e.to_string())?;
    probe.close();
    Ok(took.as_secs_f64() * 1e3)
}

/// Runs the three measurements (see the module documentation).
pub fn measure(exe: &Path, broker: &str, quick: bool, progress: &dyn Fn(&str)) -> Result<GroupFigures, String> {
    let options = KafkaOptions { request_timeout: Duration::from_secs(10), ..KafkaOptions::default() };
    let t = KafkaTransport::open(&format!("kafka://{broker}"), options).map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let tag = format!("{}-{}", std::process::id(), now_ms() % 1_000_000);
    let mut fig = GroupFigures::default();

    // Takeover, then a join, on one steady flow.
    let topic = format!("group-orders-{tag}");
    let id = format!("group-bench-{tag}");
    {
        let topic = topic.clone();
        on_glommio(&t, move |core| async move {
            core.create_topic(&topic, &TopicConfig::new(PARTITIONS)).await.map_err(|e| e.to_string())?;
            Ok(())
        })?;
    }
    fig.join_round_ms = join_round(&t, &topic, &format!("{id}-join-probe"))?;
    progress(&format!("a lone member's join round: {:.0} ms", fig.join_round_ms));
    let rate: u64 = if quick { 20_000 } else { 50_000 };
    fig.flow_events_s = rate as f64;
    let stop = Arc::new(AtomicBool::new(false));
    let flowing = flow(&t, topic.clone(), rate, stop.clone());
    let start = |n: usize| Worker::start(exe, broker, &id, &topic, &dir.path().join(format!("w{n}")));
    let mut workers = vec![start(0)?, start(1)?, start(2)?];
    // Settled: every worker in, standbys following.
    std::thread::sleep(Duration::from_secs(if quick { 6 } else { 10 }));
    progress("three workers settled; SIGKILLing one");
    let changelog = format!("{id}-counts-changelog");
    fig.changelog_records = on_glommio(&t, move |core| async move {
        let mut total = 0;
        for tp in tps(&changelog) {
            total += core.list_offset(&tp, faust_transport::OffsetSpec::Latest).await.map_err(|e| e.to_string())?;
        }
        Ok(total)
    })?;
    let mut killed = workers.pop().ok_or("three workers")?;
    let killed_at = now_ms();
    killed.kill();
    std::thread::sleep(SESSION * 4);
    let joined_at = now_ms();
    progress("took over; a third worker joins");
    workers.push(start(3)?);
    std::thread::sleep(Duration::from_secs(if quick { 6 } else { 10 }));
    let end = now_ms();
    stop.store(true, Ordering::Relaxed);
    let produced = flowing.join().map_err(|_| "the flow thread panicked")??;
    let mut stats = Vec::new();
    for w in workers {
        stats.push(w.stop()?);
    }
    // The survivors (the first two) replayed only for the takeover (their start replayed an
    // empty changelog); the third's recoveries at its join are the join's, not the takeover's.
    let survivors = |key: &str| stats.iter().take(2).map(|s| s[key].as_u64().unwrap_or(0)).sum::<u64>();
    fig.takeover_replayed_records = survivors("changelog_records_replayed");
    fig.takeover_standbys_promoted = survivors("standbys_promoted");
    let times = progress_times(&t, format!("{topic}-progress"))?;

    // Takeover: the partition that went longest without an event after the kill.
    let after_kill = longest_gaps(&times, killed_at, joined_at);
    fig.takeover_ms = after_kill.iter().copied().fold(0f64, f64::max);
    // The killed worker's partitions are those that went without events for longer than the
    // session timeout; the first of them taken over:
    fig.takeover_first_ms =
        after_kill.iter().copied().filter(|&gap| gap > SESSION.as_secs_f64() * 1e3).fold(f64::INFINITY, f64::min);
    // Rebalance pause: the quiet stretch before the join against the join; the partition with
    // the longest gap during the join is the one that moved to the new worker.
    let quiet = longest_gaps(&times, killed_at + (SESSION * 3).as_millis() as i64, joined_at);
    fig.quiet_pause_ms = quiet.iter().copied().fold(0f64, f64::max);
    let mut during = longest_gaps(&times, joined_at, end);
    progress(&format!("longest gaps per partition while a worker joins (ms): {during:?}"));
    during.sort_by(|a, b| a.total_cmp(b));
    during.pop();
    fig.rebalance_pause_ms = during.iter().copied().fold(0f64, f64::max);
    progress(&format!(
        "longest gaps per partition (ms): after the kill {after_kill:?}; quiet {quiet:?}; progress records per partition {:?}",
        times.iter().map(Vec::len).collect::<Vec<_>>()
    ));
    progress(&format!(
        "takeover {:.0} ms ({} replayed, {} standbys promoted, changelog {}); pause while joining {:.0} ms (quiet {:.0} ms); {produced} orders",
        fig.takeover_ms,
        fig.takeover_replayed_records,
        fig.takeover_standbys_promoted,
        fig.changelog_records,
        fig.rebalance_pause_ms,
        fig.quiet_pause_ms
    ));

    // W2, one worker process against two.
    let n: u64 = if quick { 300_000 } else { 1_000_000 };
    let w2_topic = format!("group-w2-{tag}");
    {
        let topic = w2_topic.clone();
        on_glommio(&t, move |core| async move {
            core.create_topic(&topic, &TopicConfig::new(PARTITIONS)).await.map_err(|e| e.to_string())?;
            let mut from = 0;
            while from < n {
                let to = (from + 20_000).min(n);
                produce(&core, &topic, from, to).await?;
                from = to;
            }
            Ok(())
        })?;
    }
    progress(&format!("pre-loaded {n} orders for W2"));
    fig.w2_1worker = w2_with(exe, &t, broker, &w2_topic, 1, n, dir.path())?;
    progress(&format!("W2, 1 worker of 1 core: {:.0} events/s", fig.w2_1worker));
    fig.w2_2workers = w2_with(exe, &t, broker, &w2_topic, 2, n, dir.path())?;
    progress(&format!("W2, 2 workers of 1 core: {:.0} events/s", fig.w2_2workers));
    Ok(fig)
}
