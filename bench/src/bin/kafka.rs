//! Kafka benchmark (issue 7): our Kafka client against rskafka on the same broker, and W2
//! (the orders count with a table and its changelog) through `kafka://` on one core.
//!
//! Measured in one run, against one broker (tansu, in memory, started by `scripts/broker`
//! unless `--broker` names one), alternating the clients over a few rounds; each figure is the
//! best of its rounds:
//!
//! - raw fetch: every record of a pre-loaded topic (JSON orders, 4 partitions) from offset 0
//!   to the end, the 4 partitions fetched concurrently, 4 MiB per fetch; our client on one
//!   glommio executor, rskafka's partition clients on a current-thread tokio runtime, both
//!   pinned to the CPU the engine's core 0 uses;
//! - produce: the same records into a fresh 4-partition topic, batches of 5,000 records, one
//!   batch in flight per partition, acks=all, for both clients; ours idempotent (the default)
//!   and not; and ours through a TLS-terminating front (`faust_tests::kafka_front`, in front of
//!   a tansu of its own) against the same front without TLS, for the cost of TLS;
//! - W2 on `kafka://`: a `faust::App` on 1 core counting the pre-loaded orders per account in
//!   a table with its changelog, events/s from its first event to the last (`w2::run_on`);
//! - consumer groups, with worker processes (`faust_bench::kafka_group`): takeover after a
//!   SIGKILL, the pause a join costs the partitions that do not move, and W2 with two worker
//!   processes against one.
//!
//! ```text
//! cargo run --release -p faust-bench --bin kafka -- --quick --json
//! ```

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::TimeZone;
use clap::Parser;
use faust::Settings;
use faust_bench::{progress, w2};
use faust_tests::kafka_front::{BrokerBehindFront, FrontConfig, TestPki};
use faust_transport::{
    BatchBuilder, CoreTransport, KafkaCore, KafkaOptions, KafkaTransport, TlsOptions, TopicConfig, TopicPartition,
};
use glommio::{LocalExecutorBuilder, Placement};
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};

#[derive(Parser, Debug)]
#[command(about = "Benchmark the Kafka client against rskafka, and W2 through kafka://, on one core")]
struct Args {
    /// A broker to use (`HOST:PORT`); without it, one is started with `scripts/broker` and
    /// stopped at the end.
    #[arg(long)]
    broker: Option<String>,
    /// A shorter run (under 90 s, broker start included).
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Orders pre-loaded (default 1,000,000, or 200,000 with --quick).
    #[arg(long)]
    events: Option<u64>,
    /// Rounds per measurement (default 3, or 2 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Only our client's raw fetch, once per round (for profiling).
    #[arg(long)]
    only_fetch: bool,
    /// Only W2 through kafka://, once per round (for profiling).
    #[arg(long)]
    only_w2: bool,
    /// Only the consumer-group figures (takeover, rebalance pause, W2 with two workers).
    #[arg(long)]
    only_groups: bool,
    /// Without the consumer-group figures.
    #[arg(long)]
    skip_groups: bool,
}

const PARTITIONS: u32 = 4;
const ACCOUNTS: u64 = 10_000;
/// Bytes asked for per fetch, by both clients.
const FETCH_BYTES: usize = 4 << 20;
/// Records per produced batch, by both clients.
const BATCH: usize = 5_000;
/// No single step (a fetch pass, a produce pass, a W2 run) may take longer.
const STEP_DEADLINE: Duration = Duration::from_secs(120);

type BenchResult<T> = Result<T, String>;

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; we set one bit and pass its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The CPU the engine's core 0 runs on.
fn cpu0() -> usize {
    faust::runtime::usable_cpus().first().copied().unwrap_or(0)
}

/// The pre-encoded orders, by partition: (key, JSON value) of order `i` in partition `i % 4`.
struct Orders {
    parts: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
    bytes: usize,
}

impl Orders {
    fn new(n: u64) -> Orders {
        let mut parts: Vec<Vec<(Vec<u8>, Vec<u8>)>> = (0..PARTITIONS).map(|_| Vec::new()).collect();
        let mut bytes = 0;
        for i in 0..n {
            let key = format!("order-{i}").into_bytes();
            let value = serde_json::to_vec(&w2::order(i, ACCOUNTS)).expect("an order encodes");
            bytes += key.len() + value.len();
            parts[(i % u64::from(PARTITIONS)) as usize].push((key, value));
        }
        Orders { parts, bytes }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn transport(broker: &str) -> BenchResult<KafkaTransport> {
    transport_with(broker, KafkaOptions::default())
}

fn transport_with(broker: &str, options: KafkaOptions) -> BenchResult<KafkaTransport> {
    let options = KafkaOptions { request_timeout: Duration::from_secs(10), ..options };
    KafkaTransport::open(&format!("kafka://{broker}"), options).map_err(|e| e.to_string())
}

/// Two brokers of their own behind fronts, one plain and one terminating TLS, and the CA
/// file that verifies the TLS one.
struct Fronts {
    plain: BrokerBehindFront,
    tls: BrokerBehindFront,
    ca: tempfile::NamedTempFile,
}

fn fronts() -> BenchResult<Fronts> {
    let pki = TestPki::generate();
    let unavailable = || "no tansu for the TLS figures (FAUST_TANSU_BIN or scripts/broker install)".to_string();
    let plain = BrokerBehindFront::start(FrontConfig::default()).ok_or_else(unavailable)?;
    let tls = BrokerBehindFront::start(FrontConfig { tls: Some(pki.server_tls(false)), sasl: None })
        .ok_or_else(unavailable)?;
    let ca = tempfile::NamedTempFile::new().map_err(|e| format!("CA file: {e}"))?;
    std::fs::write(ca.path(), &pki.ca_pem).map_err(|e| format!("CA file: {e}"))?;
    Ok(Fronts { plain, tls, ca })
}

/// Runs `f` on a fresh glommio executor pinned to `cpu0()`, with a core handle on `t`.
fn on_glommio<T, F, Fut>(t: &KafkaTransport, f: F) -> BenchResult<T>
where
    T: Send + 'static,
    F: FnOnce(KafkaCore) -> Fut + Send + 'static,
    Fut: Future<Output = BenchResult<T>> + 'static,
{
    let t = t.clone();
    LocalExecutorBuilder::new(Placement::Fixed(cpu0()))
        .name("kafka-bench")
        .spawn(move || async move { f(t.core()).await })
        .map_err(|e| format!("glommio executor: {e}"))?
        .join()
        .map_err(|e| format!("glommio executor: {e}"))?
}

/// Runs `f` on a current-thread tokio runtime on a thread pinned to `cpu0()`.
fn on_tokio<T, Fut>(f: impl FnOnce() -> Fut + Send + 'static) -> BenchResult<T>
where
    T: Send + 'static,
    Fut: Future<Output = BenchResult<T>>,
{
    std::thread::spawn(move || {
        pin_to_cpu(cpu0());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        rt.block_on(async move {
            match tokio::time::timeout(STEP_DEADLINE * 2, f()).await {
                Ok(r) => r,
                Err(_) => Err(format!("an rskafka step took more than {:?}", STEP_DEADLINE * 2)),
            }
        })
    })
    .join()
    .map_err(|_| "the tokio thread panicked".to_string())?
}

/// Produces `orders` into `topic` (created with 4 partitions) with our client: per partition,
/// batches of `BATCH` records one after the other, the partitions concurrently. Seconds taken
/// (creating the topic not included).
async fn ours_produce(core: KafkaCore, topic: String, orders: Arc<Orders>) -> BenchResult<f64> {
    let core = Rc::new(core);
    core.create_topic(&topic, &TopicConfig::new(PARTITIONS)).await.map_err(|e| format!("create {topic}: {e}"))?;
    let start = Instant::now();
    let deadline = start + STEP_DEADLINE;
    let tasks: Vec<_> = (0..PARTITIONS)
        .map(|p| {
            let (core, orders, tp) = (core.clone(), orders.clone(), TopicPartition::new(topic.as_str(), p));
            glommio::spawn_local(async move {
                let ts = now_ms();
                for chunk in orders.parts[p as usize].chunks(BATCH) {
                    if Instant::now() > deadline {
                        return Err(format!("producing {tp} took more than {STEP_DEADLINE:?}"));
                    }
                    let bytes: usize = chunk.iter().map(|(k, v)| k.len() + v.len() + 24).sum();
                    let mut batch = BatchBuilder::with_capacity(bytes);
                    for (k, v) in chunk {
                        batch.push(ts, Some(k), Some(v), &[]);
                    }
                    core.produce(&tp, batch).await.map_err(|e| format!("produce {tp}: {e}"))?;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Fetches every record of `topic`'s partitions (`ends[p]` records in partition `p`) from
/// offset 0 with our client, the partitions concurrently. Seconds taken and records seen.
async fn ours_fetch(core: KafkaCore, topic: String, ends: Vec<u64>) -> BenchResult<(f64, u64)> {
    let core = Rc::new(core);
    // Opens the connections (one per fetched partition) before the clock starts.
    for p in 0..PARTITIONS {
        let tp = TopicPartition::new(topic.as_str(), p);
        core.fetch(&tp, 0, 1, Duration::from_millis(1)).await.map_err(|e| format!("fetch {tp}: {e}"))?;
    }
    let start = Instant::now();
    let deadline = start + STEP_DEADLINE;
    let tasks: Vec<_> = (0..PARTITIONS)
        .map(|p| {
            let (core, tp, end) = (core.clone(), TopicPartition::new(topic.as_str(), p), ends[p as usize]);
            glommio::spawn_local(async move {
                let (mut offset, mut seen) = (0u64, 0u64);
                while offset < end {
                    if Instant::now() > deadline {
                        return Err(format!("fetching {tp}: at offset {offset} of {end} after {STEP_DEADLINE:?}"));
                    }
                    let f = core
                        .fetch(&tp, offset, FETCH_BYTES, Duration::from_millis(100))
                        .await
                        .map_err(|e| format!("fetch {tp}: {e}"))?;
                    seen += f.records.iter().filter(|r| r.offset >= offset).count() as u64;
                    offset = f.next_offset;
                }
                Ok::<u64, String>(seen)
            })
        })
        .collect();
    let mut seen = 0;
    for t in tasks {
        seen += t.await?;
    }
    Ok((start.elapsed().as_secs_f64(), seen))
}

async fn rs_client(broker: &str) -> BenchResult<rskafka::client::Client> {
    rskafka::client::ClientBuilder::new(vec![broker.to_string()])
        .build()
        .await
        .map_err(|e| format!("rskafka client: {e}"))
}

async fn rs_partitions(client: &rskafka::client::Client, topic: &str) -> BenchResult<Vec<Rc<PartitionClient>>> {
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        let pc = client
            .partition_client(topic.to_string(), p as i32, UnknownTopicHandling::Retry)
            .await
            .map_err(|e| format!("rskafka partition client {topic}/{p}: {e}"))?;
        out.push(Rc::new(pc));
    }
    Ok(out)
}

/// rskafka's produce, as `ours_produce`.
async fn rs_produce(broker: String, topic: String, orders: Arc<Orders>) -> BenchResult<f64> {
    let client = rs_client(&broker).await?;
    let controller = client.controller_client().map_err(|e| format!("rskafka controller: {e}"))?;
    controller
        .create_topic(topic.as_str(), PARTITIONS as i32, 1, 5_000)
        .await
        .map_err(|e| format!("rskafka create {topic}: {e}"))?;
    let pcs = rs_partitions(&client, &topic).await?;
    let start = Instant::now();
    let results = on_each_partition(&pcs, |p, pc| {
        let orders = orders.clone();
        async move {
            let ts = chrono::Utc.timestamp_millis_opt(now_ms()).single().unwrap_or_default();
            for chunk in orders.parts[p].chunks(BATCH) {
                let records = chunk
                    .iter()
                    .map(|(k, v)| rskafka::record::Record {
                        key: Some(k.clone()),
                        value: Some(v.clone()),
                        headers: BTreeMap::new(),
                        timestamp: ts,
                    })
                    .collect();
                pc.produce(records, Compression::NoCompression)
                    .await
                    .map_err(|e| format!("rskafka produce {p}: {e}"))?;
            }
            Ok::<(), String>(())
        }
    })
    .await;
    let secs = start.elapsed().as_secs_f64();
    results.into_iter().collect::<BenchResult<Vec<()>>>()?;
    Ok(secs)
}

/// Runs `task(p, client)` for each of rskafka's partition clients at once, as local tasks of
/// the current-thread runtime, and returns each one's outcome, in partition order.
async fn on_each_partition<T, F, Fut>(pcs: &[Rc<PartitionClient>], task: F) -> Vec<BenchResult<T>>
where
    T: 'static,
    F: Fn(usize, Rc<PartitionClient>) -> Fut,
    Fut: std::future::Future<Output = BenchResult<T>> + 'static,
{
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let tasks: Vec<_> =
                pcs.iter().enumerate().map(|(p, pc)| tokio::task::spawn_local(task(p, pc.clone()))).collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.map_err(|e| format!("rskafka task: {e}")).and_then(|r| r));
            }
            out
        })
        .await
}

/// rskafka's fetch, as `ours_fetch`.
async fn rs_fetch(broker: String, topic: String, ends: Vec<u64>) -> BenchResult<(f64, u64)> {
    let client = rs_client(&broker).await?;
    let pcs = rs_partitions(&client, &topic).await?;
    for pc in &pcs {
        pc.fetch_records(0, 1..2, 1).await.map_err(|e| format!("rskafka fetch: {e}"))?;
    }
    let start = Instant::now();
    let results = on_each_partition(&pcs, |p, pc| {
        let end = ends[p] as i64;
        async move {
            let (mut offset, mut seen) = (0i64, 0u64);
            while offset < end {
                let (records, _hw) = pc
                    .fetch_records(offset, 1..FETCH_BYTES as i32, 100)
                    .await
                    .map_err(|e| format!("rskafka fetch {p}: {e}"))?;
                for r in records {
                    if r.offset >= offset {
                        offset = r.offset + 1;
                        seen += 1;
                    }
                }
            }
            Ok::<u64, String>(seen)
        }
    })
    .await;
    let secs = start.elapsed().as_secs_f64();
    let seen = results.into_iter().sum::<BenchResult<u64>>()?;
    Ok((secs, seen))
}

/// Deletes `topics` (to free the broker's memory), best effort.
fn delete_topics(broker: &str, topics: Vec<String>) {
    let broker = broker.to_string();
    let _ = on_tokio(move || async move {
        let client = rs_client(&broker).await?;
        let controller = client.controller_client().map_err(|e| e.to_string())?;
        for t in topics {
            let _ = controller.delete_topic(t, 5_000).await;
        }
        Ok(())
    });
}

/// The figures of one run.
#[derive(Default)]
struct Figures {
    fetch: Vec<f64>,
    rs_fetch: Vec<f64>,
    produce: Vec<f64>,
    rs_produce: Vec<f64>,
    /// Ours with idempotence off, same rounds.
    produce_not_idempotent: Vec<f64>,
    /// Ours through the front without TLS, and through the front with TLS, same rounds.
    produce_front_plain: Vec<f64>,
    produce_tls: Vec<f64>,
    w2: Vec<f64>,
    /// W2 through `kafka://` with exactly-once (Kafka transactions), same rounds.
    w2_eos: Vec<f64>,
    /// W2 on `local://` (the same orders, pre-loaded by `w2::preload`), same rounds.
    w2_local: Vec<f64>,
    /// W2's floor: the decode and count on one plain thread over the orders in memory.
    floor: f64,
    preload_s: f64,
    /// The consumer-group figures.
    groups: Option<faust_bench::kafka_group::GroupFigures>,
}

/// `a[r] / b[r]` for each round `r` (the clients ran one after the other in each round).
fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| a / b).collect()
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn run(args: &Args, broker: &str) -> BenchResult<Figures> {
    let n = args.events.unwrap_or(if args.quick { 200_000 } else { 1_000_000 });
    let rounds = args.rounds.unwrap_or(if args.quick { 2 } else { 3 }).max(1);
    let json = args.json;
    let tag = format!("{}-{}", std::process::id(), now_ms() % 1_000_000);
    let t = transport(broker)?;
    let orders = Arc::new(Orders::new(n));
    let mut fig = Figures::default();
    progress(
        json,
        &format!(
            "pre-loading {n} orders (~{:.0} B key + value) into orders-{tag} ({PARTITIONS} partitions) on {broker}",
            orders.bytes as f64 / n as f64
        ),
    );
    if args.only_groups {
        fig.groups = Some(groups(args, broker)?);
        return Ok(fig);
    }
    let topic = format!("orders-{tag}");
    let ends: Vec<u64> = orders.parts.iter().map(|p| p.len() as u64).collect();
    {
        let (topic, o) = (topic.clone(), orders.clone());
        fig.preload_s = on_glommio(&t, move |core| ours_produce(core, topic, o))?;
    }
    progress(json, &format!("pre-loaded in {:.2} s ({:.0} orders/s)", fig.preload_s, n as f64 / fig.preload_s));

    let fronts = if args.only_fetch || args.only_w2 { None } else { Some(fronts()?) };
    let datadir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let local = datadir.path().join("w2-local");
    if !args.only_fetch {
        progress(json, &format!("pre-loading the same {n} orders into local:// for the W2 reference"));
        w2::preload(&local, n, ACCOUNTS);
        let values: Vec<Vec<u8>> = orders.parts.iter().flatten().map(|(_, v)| v.clone()).collect();
        fig.floor = w2::floor(&values, 1);
        progress(json, &format!("W2 floor (decode and count, 1 thread): {:.0} events/s", fig.floor));
    }
    for r in 0..rounds {
        if !args.only_w2 {
            let (tp, e) = (topic.clone(), ends.clone());
            let (secs, seen) = on_glommio(&t, move |core| ours_fetch(core, tp, e))?;
            check_seen("our fetch", seen, n)?;
            fig.fetch.push(n as f64 / secs);
            progress(json, &format!("round {r}: fetch, ours {:.0} msgs/s", n as f64 / secs));
        }
        if args.only_fetch {
            continue;
        }
        if !args.only_w2 {
            let (b, tp, e) = (broker.to_string(), topic.clone(), ends.clone());
            let (secs, seen) = on_tokio(move || rs_fetch(b, tp, e))?;
            check_seen("rskafka's fetch", seen, n)?;
            fig.rs_fetch.push(n as f64 / secs);
            progress(json, &format!("round {r}: fetch, rskafka {:.0} msgs/s", n as f64 / secs));

            let ours_topic = format!("produce-ours-{tag}-{r}");
            let (tp, o) = (ours_topic.clone(), orders.clone());
            let secs = on_glommio(&t, move |core| ours_produce(core, tp, o))?;
            fig.produce.push(n as f64 / secs);
            progress(json, &format!("round {r}: produce, ours {:.0} msgs/s", n as f64 / secs));
            let rs_topic = format!("produce-rskafka-{tag}-{r}");
            let (b, tp, o) = (broker.to_string(), rs_topic.clone(), orders.clone());
            let secs = on_tokio(move || rs_produce(b, tp, o))?;
            fig.rs_produce.push(n as f64 / secs);
            progress(json, &format!("round {r}: produce, rskafka {:.0} msgs/s", n as f64 / secs));
            let plain_topic = format!("produce-not-idempotent-{tag}-{r}");
            let t_plain = transport_with(broker, KafkaOptions { idempotent: false, ..KafkaOptions::default() })?;
            let (tp, o) = (plain_topic.clone(), orders.clone());
            let secs = on_glommio(&t_plain, move |core| ours_produce(core, tp, o))?;
            fig.produce_not_idempotent.push(n as f64 / secs);
            progress(json, &format!("round {r}: produce, ours without idempotence {:.0} msgs/s", n as f64 / secs));
            delete_topics(broker, vec![ours_topic, rs_topic, plain_topic]);
            if let Some(f) = &fronts {
                let tls = TlsOptions { ca_file: Some(f.ca.path().to_path_buf()), ..TlsOptions::default() };
                let cases = [
                    (&f.plain, KafkaOptions::default(), &mut fig.produce_front_plain, "plain text"),
                    (&f.tls, KafkaOptions { tls: Some(tls), ..KafkaOptions::default() }, &mut fig.produce_tls, "TLS"),
                ];
                for (front, options, figures, what) in cases {
                    let t = transport_with(&front.addr().to_string(), options)?;
                    let (tp, o) = (format!("produce-front-{tag}-{r}"), orders.clone());
                    let secs = on_glommio(&t, move |core| ours_produce(core, tp, o))?;
                    figures.push(n as f64 / secs);
                    progress(
                        json,
                        &format!("round {r}: produce through the front, {what}, {:.0} msgs/s", n as f64 / secs),
                    );
                }
            }
        }

        let id = format!("kafka-w2-{tag}-{r}");
        let mut s = Settings::new(id.as_str());
        s.broker = format!("kafka://{broker}");
        s.datadir = datadir.path().join(&id);
        s.topic_partitions = PARTITIONS;
        s.cores = Some(1);
        // tansu answers a JoinGroup round after half the session timeout.
        s.broker_session_timeout = Duration::from_secs(2);
        let w = w2::run_on(s, &topic, n, STEP_DEADLINE)?;
        fig.w2.push(w.events_s);
        progress(
            json,
            &format!("round {r}: W2 on kafka:// 1 core {:.0} events/s ({} account shards)", w.events_s, w.accounts),
        );
        delete_topics(broker, vec![format!("{id}-counts-changelog")]);
        let eos_id = format!("kafka-w2-eos-{tag}-{r}");
        let mut s = Settings::new(eos_id.as_str());
        s.broker = format!("kafka://{broker}");
        s.datadir = datadir.path().join(&eos_id);
        s.topic_partitions = PARTITIONS;
        s.cores = Some(1);
        s.broker_session_timeout = Duration::from_secs(2);
        s.processing_guarantee = faust::ProcessingGuarantee::ExactlyOnce;
        let w = w2::run_on(s, &topic, n, STEP_DEADLINE)?;
        fig.w2_eos.push(w.events_s);
        progress(json, &format!("round {r}: W2 on kafka:// 1 core, exactly-once, {:.0} events/s", w.events_s));
        delete_topics(broker, vec![format!("{eos_id}-counts-changelog")]);
        let w = w2::run(&local, &format!("w2-local-{r}"), n, 1);
        fig.w2_local.push(w.events_s);
        progress(json, &format!("round {r}: W2 on local:// 1 core {:.0} events/s", w.events_s));
    }
    delete_topics(broker, vec![topic]);
    if !args.skip_groups && !args.only_fetch && !args.only_w2 {
        fig.groups = Some(groups(args, broker)?);
    }
    Ok(fig)
}

/// The consumer-group figures, with this binary as the worker processes.
fn groups(args: &Args, broker: &str) -> BenchResult<faust_bench::kafka_group::GroupFigures> {
    let exe = std::env::current_exe().map_err(|e| format!("this benchmark's path: {e}"))?;
    let json = args.json;
    faust_bench::kafka_group::measure(&exe, broker, args.quick, &|msg: &str| progress(json, msg))
}

/// The consumer-group figures as JSON keys.
fn group_keys(g: &faust_bench::kafka_group::GroupFigures) -> serde_json::Value {
    serde_json::json!({
        "kafka_takeover_ms": g.takeover_ms,
        "kafka_takeover_replayed_records": g.takeover_replayed_records,
        "kafka_takeover_standbys_promoted": g.takeover_standbys_promoted,
        "kafka_takeover_changelog_records": g.changelog_records,
        "kafka_join_round_ms": g.join_round_ms,
        "kafka_takeover_first_ms": g.takeover_first_ms,
        "kafka_group_flow_events_s": g.flow_events_s,
        "kafka_rebalance_pause_ms": g.rebalance_pause_ms,
        "kafka_rebalance_quiet_pause_ms": g.quiet_pause_ms,
        "kafka_w2_1worker_events_s": g.w2_1worker,
        "kafka_w2_2workers_events_s": g.w2_2workers,
        "kafka_w2_2workers_vs_1_ratio": g.w2_2workers / g.w2_1worker,
    })
}

fn check_seen(what: &str, seen: u64, n: u64) -> BenchResult<()> {
    if seen == n { Ok(()) } else { Err(format!("{what} saw {seen} records, not {n}")) }
}

fn report(args: &Args, broker: &str, own: bool, fig: &Figures) {
    let n = args.events.unwrap_or(if args.quick { 200_000 } else { 1_000_000 });
    let fetch = best(&fig.fetch);
    let rs_fetch = best(&fig.rs_fetch);
    let produce = best(&fig.produce);
    let rs_produce = best(&fig.rs_produce);
    let not_idempotent = best(&fig.produce_not_idempotent);
    let (front_plain, tls) = (best(&fig.produce_front_plain), best(&fig.produce_tls));
    let w2 = best(&fig.w2);
    if args.json {
        let out = serde_json::json!({
            "events": n,
            "partitions": PARTITIONS,
            "rounds": fig.w2.len().max(fig.fetch.len()),
            "figure": "best of the rounds",
            "broker": if own { "tansu (started by the bench)" } else { broker },
            "kafka_fetch_msgs_s": fetch,
            "kafka_fetch_rskafka_msgs_s": rs_fetch,
            "kafka_fetch_vs_rskafka_ratio": fetch / rs_fetch,
            "kafka_produce_msgs_s": produce,
            "kafka_produce_rskafka_msgs_s": rs_produce,
            "kafka_produce_vs_rskafka_ratio": produce / rs_produce,
            "kafka_produce_not_idempotent_msgs_s": not_idempotent,
            "kafka_produce_idempotent_vs_not_ratio": produce / not_idempotent,
            "kafka_produce_front_plain_msgs_s": front_plain,
            "kafka_produce_tls_msgs_s": tls,
            "kafka_produce_tls_vs_plain_ratio": tls / front_plain,
            "kafka_produce_tls_vs_plain_round_ratios": ratios(&fig.produce_tls, &fig.produce_front_plain),
            "kafka_w2_events_s_1core": w2,
            "kafka_w2_vs_fetch_ratio": w2 / fetch,
            "kafka_preload_msgs_s": n as f64 / fig.preload_s,
            "kafka_w2_local_events_s_1core": best(&fig.w2_local),
            "kafka_w2_vs_local_ratio": w2 / best(&fig.w2_local),
            // The engine-core issue's name for the same ratio (target ≥ 0.9).
            "kafka_w2_vs_local_w2_ratio": w2 / best(&fig.w2_local),
            "kafka_w2_floor_events_s_1thread": fig.floor,
            "kafka_w2_floor_vs_fetch_ratio": fig.floor / fetch,
            "kafka_w2_local_rounds_events_s": fig.w2_local,
            "kafka_fetch_vs_rskafka_round_ratios": ratios(&fig.fetch, &fig.rs_fetch),
            "kafka_produce_vs_rskafka_round_ratios": ratios(&fig.produce, &fig.rs_produce),
            "kafka_w2_vs_fetch_round_ratios": ratios(&fig.w2, &fig.fetch),
            "kafka_fetch_rounds_msgs_s": fig.fetch,
            "kafka_fetch_rskafka_rounds_msgs_s": fig.rs_fetch,
            "kafka_produce_rounds_msgs_s": fig.produce,
            "kafka_produce_rskafka_rounds_msgs_s": fig.rs_produce,
            "kafka_w2_rounds_events_s": fig.w2,
            "kafka_w2_eos_events_s_1core": best(&fig.w2_eos),
            "kafka_w2_eos_vs_alo_ratio": best(&fig.w2_eos) / w2,
            "kafka_w2_eos_vs_alo_round_ratios": ratios(&fig.w2_eos, &fig.w2),
        });
        let mut out = out;
        if let (Some(g), Some(map)) = (&fig.groups, out.as_object_mut())
            && let serde_json::Value::Object(keys) = group_keys(g)
        {
            map.extend(keys);
        }
        println!("{out}");
        return;
    }
    println!(
        "Kafka client and W2 on kafka:// ({n} JSON orders, {PARTITIONS} partitions, tansu in memory, one core; best of {} rounds)",
        fig.w2.len().max(fig.fetch.len())
    );
    println!("| | ours | rskafka | ratio (target) |");
    println!("|---|---|---|---|");
    println!("| raw fetch, msgs/s | {fetch:.0} | {rs_fetch:.0} | {:.2} (≥ 1) |", fetch / rs_fetch);
    println!(
        "| produce (acks=all, {BATCH} per batch), msgs/s | {produce:.0} | {rs_produce:.0} | {:.2} (≥ 1) |",
        produce / rs_produce
    );
    println!(
        "| produce, idempotence off, msgs/s | {not_idempotent:.0} | | idempotent at {:.2} of it |",
        produce / not_idempotent
    );
    println!(
        "| produce through a TLS front, msgs/s | {tls:.0} | | {:.2} of the same front in plain text, {front_plain:.0} (≥ 0.7) |",
        tls / front_plain
    );
    println!(
        "| W2 (count per account, table + changelog), 1 core, events/s | {w2:.0} | | {:.2} of our raw fetch |",
        w2 / fetch
    );
    println!(
        "| W2 on `kafka://` with exactly-once (transactions), 1 core, events/s | {:.0} | | {:.2} of at-least-once (≥ 0.8) |",
        best(&fig.w2_eos),
        best(&fig.w2_eos) / w2
    );
    let local = best(&fig.w2_local);
    println!(
        "| W2 on local:// (same orders, 2 partitions), 1 core, events/s | {local:.0} | | kafka:// at {:.2} of it (≥ 0.9) |",
        w2 / local
    );
    println!(
        "| W2 floor (JSON decode + count, 1 plain thread, in memory), events/s | {:.0} | | {:.2} of our raw fetch |",
        fig.floor,
        fig.floor / fetch
    );
    if let Some(g) = &fig.groups {
        println!();
        println!(
            "Consumer groups (worker processes of 1 core, 2 s session timeout, {:.0} orders/s flowing)",
            g.flow_events_s
        );
        println!("| | figure | target |");
        println!("|---|---|---|");
        println!(
            "| takeover: SIGKILL to the first event of each of its partitions processed elsewhere | {:.0} ms (the first: {:.0} ms; session 2,000 ms, a join round {:.0} ms) | ≤ 3,000 ms |",
            g.takeover_ms, g.takeover_first_ms, g.join_round_ms
        );
        println!(
            "| records replayed to take over (standbys promoted: {}) | {} (changelog: {}) | ≤ the standby's tail |",
            g.takeover_standbys_promoted, g.takeover_replayed_records, g.changelog_records
        );
        println!(
            "| pause of the partitions that do not move while a worker joins | {:.0} ms (quiet: {:.0} ms) | 0 |",
            g.rebalance_pause_ms, g.quiet_pause_ms
        );
        println!(
            "| W2, 2 workers against 1 | {:.0} against {:.0} events/s: {:.2} | reported |",
            g.w2_2workers,
            g.w2_1worker,
            g.w2_2workers / g.w2_1worker
        );
    }
}

fn main() {
    // A worker process of the consumer-group figures.
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some(faust_bench::kafka_group::WORKER_FLAG) {
        std::process::exit(faust_bench::kafka_group::worker_main(&raw[2..]));
    }
    let args = Args::parse();
    if std::env::var_os("FAUST_TANSU_BIN").is_none()
        && let Ok(out) = std::process::Command::new("scripts/broker").arg("bin").output()
        && out.status.success()
    {
        // SAFETY: nothing else runs yet; the fronts' brokers read it from this one thread.
        unsafe { std::env::set_var("FAUST_TANSU_BIN", String::from_utf8_lossy(&out.stdout).trim()) };
    }
    let own = match &args.broker {
        Some(_) => None,
        None => {
            progress(args.json, "starting a broker with scripts/broker");
            match faust_bench::broker::OwnBroker::start() {
                Ok(b) => Some(b),
                Err(e) => {
                    eprintln!("kafka bench: {e}");
                    std::process::exit(1);
                }
            }
        }
    };
    let broker = args.broker.clone().or_else(|| own.as_ref().map(|b| b.addr.clone())).unwrap_or_default();
    let result = run(&args, &broker);
    match result {
        Ok(fig) => report(&args, &broker, own.is_some(), &fig),
        Err(e) => {
            drop(own);
            eprintln!("kafka bench: {e}");
            std::process::exit(1);
        }
    }
}
