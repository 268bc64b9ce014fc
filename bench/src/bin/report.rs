//! The benchmark report: runs the engine, storage and Kafka benchmarks (their `--json`), and
//! writes a Markdown report with SVG plots — events/s per workload against its floor, scaling
//! over cores, the latency distribution, the storage primitives against their baselines —
//! and the change against the previous report, whose figures are kept beside it
//! (`previous.json`).
//!
//! With `--peers` it also runs the Faust README's order count on Faust (faust-streaming) and
//! Quix Streams, installed in a Python virtual environment by `scripts/peers`, against the
//! same broker and the same orders as ours (a topic loaded once, 4 partitions, keyed by
//! account), in both shapes — with `group_by` (Faust's README form) and counting by the
//! message key without a repartition (what Quix does) — beside the raw-consume ceiling of a
//! librdkafka client on the same topic. Each peer is time-boxed: 100,000 orders or 60 s by
//! default, 1,000,000 with `--full`.
//!
//! ```text
//! scripts/bench                 # everything, into bench/report/
//! scripts/bench --quick         # the short runs (a few minutes)
//! scripts/bench --peers         # and Faust, Quix Streams and librdkafka on the same broker
//! ```
//!
//! The benchmark binaries are this one's siblings: build them all first
//! (`cargo build --release -p faust-bench`, which `scripts/bench` does).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use faust::Settings;
use faust_bench::svg::{Bar, bar_chart, human, latency_chart};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "Run the benchmarks and write a Markdown report with plots")]
struct Args {
    /// The short runs of every benchmark.
    #[arg(long)]
    quick: bool,
    /// Also run Faust, Quix Streams and a raw librdkafka consumer on the same broker and
    /// orders (installs them in a Python virtual environment the first time).
    #[arg(long)]
    peers: bool,
    /// With --peers: 1,000,000 orders per peer instead of 100,000.
    #[arg(long)]
    full: bool,
    /// Orders each peer counts (overrides the default of --peers and --full).
    #[arg(long)]
    peer_orders: Option<u64>,
    /// Seconds each peer may take before it is stopped (it reports what it counted).
    #[arg(long, default_value_t = 60)]
    peer_timeout: u64,
    /// Skip the Kafka benchmark (no broker is started).
    #[arg(long)]
    skip_kafka: bool,
    /// Where the report goes (default: bench/report in the repository).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The repository's root (this crate is `bench/` in it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// Runs sibling benchmark `name` with `--json` and `args`; its progress goes to our stderr.
fn run_bench(name: &str, args: &[&str]) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?.with_file_name(name);
    if !exe.exists() {
        return Err(format!("{} is not built: run `cargo build --release -p faust-bench` first", exe.display()));
    }
    eprintln!("==> {name} {}", args.join(" "));
    let started = Instant::now();
    let out = Command::new(&exe)
        .arg("--json")
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running {}: {e}", exe.display()))?;
    if !out.status.success() {
        return Err(format!("{name} failed ({})", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).ok_or(format!("{name} printed no JSON"))?;
    let mut v: Value = serde_json::from_str(line).map_err(|e| format!("{name}'s JSON: {e}"))?;
    v["run_seconds"] = json!(started.elapsed().as_secs_f64());
    Ok(v)
}

/// A number of `v` at `key`, if there is one.
fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64).filter(|x| x.is_finite())
}

/// Runs the peers and ours on one broker and one topic of orders.
fn run_peers(args: &Args) -> Result<Value, String> {
    let root = root();
    let orders = args.peer_orders.unwrap_or(if args.full { 1_000_000 } else { 100_000 });
    eprintln!("==> peers: installing Faust, Quix Streams and confluent-kafka (scripts/peers)");
    let out = Command::new(root.join("scripts").join("peers"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("scripts/peers: {e}"))?;
    let python = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if python.is_empty() {
        return Err("scripts/peers made no Python environment (no python3 or no PyPI): peers skipped".into());
    }
    let broker = faust_bench::broker::OwnBroker::start()?;
    let addr = broker.addr.clone();
    let peers_dir = root.join("bench").join("peers");
    let topic = "orders";
    eprintln!("==> peers: loading {orders} orders into `{topic}` (4 partitions, keyed by account) on {addr}");
    let loaded = Command::new(&python)
        .arg(peers_dir.join("produce_orders.py"))
        .args(["--broker", &addr, "--topic", topic, "--orders", &orders.to_string(), "--accounts", "10000"])
        .args(["--partitions", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| format!("produce_orders.py: {e}"))?;
    if !loaded.success() {
        return Err(format!("loading the orders failed ({loaded})"));
    }
    let timeout = Duration::from_secs(args.peer_timeout);
    let mut results = Vec::new();
    for shape in ["group_by", "by_key"] {
        eprintln!("==> peers: ours, {shape}");
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let id = format!("ours-{}-{}", shape.replace('_', "-"), std::process::id());
        let mut s = Settings::new(id.as_str());
        s.broker = format!("kafka://{addr}");
        s.datadir = dir.path().join("data");
        s.topic_partitions = 4;
        s.cores = Some(1);
        s.web_enabled = false;
        // tansu answers a JoinGroup after half the session timeout: keep the join short (the
        // rate is measured from the first event anyway).
        s.broker_session_timeout = Duration::from_secs(6);
        let started = Instant::now();
        let run = if shape == "group_by" {
            faust_bench::w2::run_grouped_on(s, topic, orders, timeout.max(Duration::from_secs(120)))
        } else {
            faust_bench::w2::run_on(s, topic, orders, timeout.max(Duration::from_secs(120)))
        };
        results.push(match run {
            Ok(r) => json!({
                "peer": "ours", "shape": shape, "events": orders, "events_per_s": r.events_s,
                "seconds": orders as f64 / r.events_s, "complete": true, "accounts": r.accounts,
                "wall_s": started.elapsed().as_secs_f64(),
            }),
            Err(e) => json!({ "peer": "ours", "shape": shape, "error": e }),
        });
    }
    let scripts: [(&str, &str, Option<&str>); 5] = [
        ("faust", "faust_orders.py", Some("group_by")),
        ("faust", "faust_orders.py", Some("by_key")),
        ("quix", "quix_orders.py", Some("group_by")),
        ("quix", "quix_orders.py", Some("by_key")),
        ("librdkafka", "raw_consume.py", None),
    ];
    for (peer, script, shape) in scripts {
        eprintln!("==> peers: {peer} {}", shape.unwrap_or("raw consume"));
        let mut cmd = Command::new(&python);
        cmd.arg(peers_dir.join(script)).args([
            "--broker",
            &addr,
            "--topic",
            topic,
            "--orders",
            &orders.to_string(),
            "--timeout",
            &args.peer_timeout.to_string(),
        ]);
        if let Some(shape) = shape {
            cmd.args(["--shape", shape]);
        }
        let out = cmd.stderr(Stdio::null()).output().map_err(|e| format!("{script}: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let parsed = text.lines().rev().find_map(|l| serde_json::from_str::<Value>(l.trim()).ok());
        results.push(match parsed {
            Some(mut v) if out.status.success() => {
                // With a repartition, the first count comes long after the first read: the
                // rate is taken from the first source record read to the last count, over the
                // whole pipeline (the script's own rate starts at the first count).
                if let (Some(events), Some(startup), Some(secs), Some(first_read)) =
                    (num(&v, "events"), num(&v, "startup_s"), num(&v, "seconds"), num(&v, "first_read_s"))
                {
                    let span = startup + secs - first_read;
                    if span > 0.0 {
                        v["events_per_s_from_first_count"] = v["events_per_s"].clone();
                        v["events_per_s"] = json!(events / span);
                    }
                }
                v
            }
            _ => json!({ "peer": peer, "shape": shape.unwrap_or("raw"), "error": format!("{script} failed ({})", out.status) }),
        });
        if let Some(last) = results.last() {
            eprintln!("    {last}");
        }
    }
    drop(broker);
    Ok(json!({ "orders": orders, "timeout_s": args.peer_timeout, "results": results }))
}

fn main() {
    let args = Args::parse();
    let out_dir = args.out.clone().unwrap_or_else(|| root().join("bench").join("report"));
    if let Err(e) = std::fs::create_dir_all(&out_dir) {
        eprintln!("error: creating {}: {e}", out_dir.display());
        std::process::exit(1);
    }
    let started = Instant::now();
    let quick: &[&str] = if args.quick { &["--quick"] } else { &[] };
    let mut failures = Vec::new();
    let mut section = |name: &str, result: Result<Value, String>| -> Value {
        result.unwrap_or_else(|e| {
            eprintln!("error: {name}: {e}");
            failures.push(format!("{name}: {e}"));
            json!({ "error": e })
        })
    };
    let engine = section("engine", run_bench("engine", quick));
    let storage = section("storage", run_bench("storage", quick));
    let kafka = if args.skip_kafka {
        json!({ "skipped": "--skip-kafka" })
    } else {
        let kafka_args: &[&str] = if args.quick { &["--quick", "--skip-groups"] } else { &[] };
        section("kafka", run_bench("kafka", kafka_args))
    };
    let peers = if args.peers { section("peers", run_peers(&args)) } else { Value::Null };
    let figures = json!({
        "date": chrono_date(),
        "quick": args.quick,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "minutes": started.elapsed().as_secs_f64() / 60.0,
        "engine": engine,
        "storage": storage,
        "kafka": kafka,
        "peers": peers,
    });
    if let Err(e) = write_report(&out_dir, &figures) {
        eprintln!("error: writing the report: {e}");
        std::process::exit(1);
    }
    println!("{}", out_dir.join("REPORT.md").display());
    if !failures.is_empty() {
        eprintln!("error: some benchmarks failed: {}", failures.join("; "));
        std::process::exit(1);
    }
}

/// Now (UTC), as `YYYY-MM-DD HH:MM UTC`.
fn chrono_date() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", rest / 3_600, rest % 3_600 / 60)
}

/// Writes `report.json`, the plots and `REPORT.md` into `dir`, after moving the report that
/// was there to `previous.json`.
fn write_report(dir: &Path, figures: &Value) -> std::io::Result<()> {
    let current = dir.join("report.json");
    let previous_path = dir.join("previous.json");
    if current.exists() {
        std::fs::rename(&current, &previous_path)?;
    }
    let previous: Option<Value> = std::fs::read(&previous_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    std::fs::write(&current, serde_json::to_vec_pretty(figures)?)?;
    let mut md = Markdown::default();
    let e = &figures["engine"];
    let s = &figures["storage"];
    let k = &figures["kafka"];
    md.line(&format!("# Benchmark report, {}", figures["date"].as_str().unwrap_or("")));
    md.line("");
    md.line(&format!(
        "{} runs on {} CPUs, {:.1} minutes. Every ratio compares figures of the same run (the machine is shared \
         and noisy); `report.json` holds every figure, `previous.json` the report before this one.",
        if figures["quick"].as_bool() == Some(true) { "Quick" } else { "Full" },
        figures["cpus"],
        figures["minutes"].as_f64().unwrap_or(0.0)
    ));
    for (name, v) in [("engine", e), ("storage", s), ("kafka", k), ("peers", &figures["peers"])] {
        if let Some(err) = v.get("error").and_then(Value::as_str) {
            md.line(&format!("\n**{name}: not measured** — {err}"));
        }
    }

    // Workloads against their floors.
    md.line("\n## Events per second against the floor\n");
    md.line(
        "The floor is the same decode and count done by plain threads over the orders in memory: no log, no runtime, \
         no table. W4, W3 and W2 over 1,000,000 accounts are set against W2's floor (the same decode and count).\n",
    );
    let rows: Vec<(&str, Option<f64>, Option<f64>)> = vec![
        ("W1 stateless, 1 core", num(e, "w1_events_s_1core"), num(e, "floor_events_s_1thread")),
        ("W2 count per account, 1 core", num(e, "w2_events_s_1core"), num(e, "w2_floor_events_s_1thread")),
        ("W2, 1,000,000 accounts", num(e, "w2_1m_keys_events_s_1core"), num(e, "w2_floor_events_s_1thread")),
        ("W4 group_by then count, 1 core", num(e, "w4_events_s_1core"), num(e, "w2_floor_events_s_1thread")),
        ("W3 tumbling windows, 1 core", num(e, "w3_tumbling_events_s"), num(e, "w2_floor_events_s_1thread")),
        ("W2 on kafka://, 1 core", num(k, "kafka_w2_events_s_1core"), num(k, "kafka_w2_floor_events_s_1thread")),
    ];
    md.table(
        &["workload", "events/s", "floor", "of the floor"],
        rows.iter().map(|(name, v, f)| vec![name.to_string(), opt(*v), opt(*f), ratio(*v, *f)]).collect(),
    );
    let bars: Vec<Bar> =
        rows.iter().map(|(name, v, f)| Bar { label: name.to_string(), values: vec![*v, *f] }).collect();
    md.plot(
        dir,
        "throughput.svg",
        &bar_chart("Events/s against the floor", "events/s", &["ours", "floor"], &bars, true, "not measured"),
    )?;

    // Scaling over cores.
    md.line("\n## Scaling over cores\n");
    let scaling = [
        ("W1", num(e, "w1_events_s_1core"), num(e, "w1_events_s_2core")),
        ("W1 floor", num(e, "floor_events_s_1thread"), num(e, "floor_events_s_2thread")),
        ("W2", num(e, "w2_events_s_1core"), num(e, "w2_events_s_2core")),
        ("W2 floor", num(e, "w2_floor_events_s_1thread"), num(e, "w2_floor_events_s_2thread")),
        ("W4", num(e, "w4_events_s_1core"), num(e, "w4_events_s_2core")),
        ("W2 on Kafka, worker processes", num(k, "kafka_w2_1worker_events_s"), num(k, "kafka_w2_2workers_events_s")),
    ];
    md.table(
        &["workload", "1 core", "2 cores", "scaling"],
        scaling.iter().map(|(n, a, b)| vec![n.to_string(), opt(*a), opt(*b), ratio(*b, *a)]).collect(),
    );
    let bars: Vec<Bar> = scaling.iter().map(|(n, a, b)| Bar { label: n.to_string(), values: vec![*a, *b] }).collect();
    md.plot(
        dir,
        "scaling.svg",
        &bar_chart("Scaling over cores", "events/s", &["1 core", "2 cores"], &bars, false, "not measured"),
    )?;

    // Latency.
    md.line("\n## Latency from send to processed (W1, 1 core)\n");
    let loads: Vec<(&str, Vec<Option<f64>>)> = vec![
        ("25 % load", vec![num(e, "w1_p50_us_25pct"), num(e, "w1_p99_us_25pct"), num(e, "w1_p999_us_25pct")]),
        (
            "25 % load, no spin",
            vec![
                num(e, "w1_p50_us_25pct_no_spin"),
                num(e, "w1_p99_us_25pct_no_spin"),
                num(e, "w1_p999_us_25pct_no_spin"),
            ],
        ),
        (
            "50 % load",
            vec![
                num(e, "w1_p50_us"),
                num(e, "w1_p99_us_50pct").or(num(e, "w1_p99_us")),
                num(e, "w1_p999_us_50pct").or(num(e, "w1_p999_us")),
            ],
        ),
    ];
    md.table(
        &["offered load", "p50 µs", "p99 µs", "p99.9 µs"],
        loads.iter().map(|(n, v)| std::iter::once(n.to_string()).chain(v.iter().map(|x| opt(*x))).collect()).collect(),
    );
    let series: Vec<(&str, Vec<f64>)> =
        loads.iter().map(|(n, v)| (*n, v.iter().map(|x| x.unwrap_or(0.0)).collect())).collect();
    md.plot(dir, "latency.svg", &latency_chart("W1 latency, send to processed", &["p50", "p99", "p99.9"], &series))?;

    // Storage.
    md.line("\n## Storage primitives against their baselines\n");
    let storage_rows = [
        ("store put", num(s, "kv_put_ops_s"), num(s, "map_put_ops_s"), "ops/s; baseline: a hash map"),
        ("store get", num(s, "kv_get_ops_s"), num(s, "map_get_ops_s"), "ops/s; baseline: a hash map"),
        ("log append", num(s, "log_append_mb_s"), num(s, "file_write_mb_s"), "MB/s; baseline: plain file writes"),
    ];
    md.table(
        &["operation", "ours", "baseline", "ratio", "unit"],
        storage_rows
            .iter()
            .map(|(n, a, b, u)| vec![n.to_string(), opt(*a), opt(*b), ratio(*a, *b), u.to_string()])
            .collect(),
    );
    let bars: Vec<Bar> =
        storage_rows.iter().map(|(n, a, b, _)| Bar { label: n.to_string(), values: vec![*a, *b] }).collect();
    md.plot(
        dir,
        "storage.svg",
        &bar_chart(
            "Storage against its baselines",
            "ops/s or MB/s",
            &["ours", "baseline"],
            &bars,
            true,
            "not measured",
        ),
    )?;

    // Kafka.
    if k.get("error").is_none() && k.get("skipped").is_none() {
        md.line("\n## Kafka (one broker, tansu in memory)\n");
        let kafka_rows = [
            ("fetch, our client against rskafka", num(k, "kafka_fetch_vs_rskafka_ratio")),
            ("produce, our client against rskafka", num(k, "kafka_produce_vs_rskafka_ratio")),
            ("W2 on kafka:// against W2 on local://", num(k, "kafka_w2_vs_local_w2_ratio")),
            ("takeover after a SIGKILL, ms", num(k, "kafka_takeover_ms")),
            ("pause of a join for partitions that stay, ms", num(k, "kafka_rebalance_pause_ms")),
        ];
        md.table(&["figure", "value"], kafka_rows.iter().map(|(n, v)| vec![n.to_string(), opt(*v)]).collect());
    }

    // Peers.
    if let Some(results) = figures["peers"]["results"].as_array() {
        md.line(&format!(
            "\n## Against Faust and Quix Streams (the README's order count, {} orders, same broker and topic)\n",
            human(figures["peers"]["orders"].as_f64().unwrap_or(0.0))
        ));
        md.line("Each peer runs alone, one process (ours: one core); events/s run from the first source record read to the last one counted (ours: from the first counted); `group_by` re-keys the orders by account through a repartition topic (Faust's README form), `by_key` counts by the message key (what Quix does). The raw consume is a librdkafka consumer reading the topic and doing nothing else.\n");
        let ours_by = |shape: &str| {
            results.iter().find(|r| r["peer"] == "ours" && r["shape"] == shape).and_then(|r| num(r, "events_per_s"))
        };
        let mut rows = Vec::new();
        for r in results {
            let shape = r["shape"].as_str().unwrap_or("");
            let v = num(r, "events_per_s");
            let vs_ours = match (ours_by(shape), v) {
                (Some(o), Some(p)) if r["peer"] != "ours" => format!("ours {:.0}×", o / p),
                _ => String::new(),
            };
            rows.push(vec![
                r["peer"].as_str().unwrap_or("?").to_string(),
                shape.to_string(),
                opt(v),
                r["events"].as_u64().map_or("–".into(), |n| human(n as f64)),
                match r.get("error") {
                    Some(e) => format!("failed: {}", e.as_str().unwrap_or("")),
                    None if r["complete"] == false => "time-boxed (stopped before the end)".into(),
                    None => "complete".into(),
                },
                vs_ours,
            ]);
        }
        md.table(&["system", "shape", "events/s", "events counted", "run", "ours against it"], rows);
        let peers = ["ours", "faust", "quix", "librdkafka"];
        let bars: Vec<Bar> = peers
            .iter()
            .map(|p| Bar {
                label: p.to_string(),
                values: ["group_by", "by_key", "raw"]
                    .iter()
                    .map(|shape| {
                        results
                            .iter()
                            .find(|r| r["peer"] == *p && r["shape"] == *shape)
                            .and_then(|r| num(r, "events_per_s"))
                    })
                    .collect(),
            })
            .collect();
        md.plot(
            dir,
            "peers.svg",
            &bar_chart(
                "The order count, events/s",
                "events/s",
                &["group_by", "by_key", "raw consume"],
                &bars,
                true,
                "",
            ),
        )?;
    }

    // The change against the previous report.
    md.line("\n## Change against the previous report\n");
    match &previous {
        None => md.line("No previous report here: the next run compares with this one."),
        Some(prev) => {
            md.line(&format!(
                "Against {} ({}). Figures of different machines or modes (quick, full) do not compare; ratios within ±10 % are noise on this machine.\n",
                prev["date"].as_str().unwrap_or("?"),
                if prev["quick"] == figures["quick"] { "same mode" } else { "another mode" }
            ));
            let mut rows = Vec::new();
            for section in ["engine", "storage", "kafka"] {
                let (now, before) = (&figures[section], &prev[section]);
                let Some(map) = now.as_object() else { continue };
                for (key, v) in map {
                    if key == "run_seconds" {
                        continue;
                    }
                    if let (Some(a), Some(b)) = (v.as_f64(), num(before, key))
                        && b != 0.0
                        && (key.ends_with("_s")
                            || key.ends_with("_ratio")
                            || key.contains("_us")
                            || key.ends_with("_ms"))
                    {
                        rows.push(vec![
                            format!("{section}.{key}"),
                            human(b),
                            human(a),
                            format!("{:+.1} %", (a / b - 1.0) * 100.0),
                        ]);
                    }
                }
            }
            md.table(&["figure", "before", "now", "change"], rows);
        }
    }
    std::fs::write(dir.join("REPORT.md"), md.text)
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), human)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    }
}

/// The report being written.
#[derive(Default)]
struct Markdown {
    text: String,
}

impl Markdown {
    fn line(&mut self, s: &str) {
        self.text.push_str(s);
        self.text.push('\n');
    }

    fn table(&mut self, head: &[&str], rows: Vec<Vec<String>>) {
        self.line(&format!("| {} |", head.join(" | ")));
        self.line(&format!("|{}", "---|".repeat(head.len())));
        for r in rows {
            self.line(&format!("| {} |", r.join(" | ")));
        }
    }

    /// Writes plot `name` beside the report and links it.
    fn plot(&mut self, dir: &Path, name: &str, svg: &str) -> std::io::Result<()> {
        std::fs::write(dir.join(name), svg)?;
        self.line(&format!("\n![{name}]({name})"));
        Ok(())
    }
}
