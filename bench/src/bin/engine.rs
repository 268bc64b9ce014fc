//! Engine benchmark, workload W1 (stateless): decode JSON orders, filter, map, forward to a
//! topic, on a pre-loaded `local://` log with nothing else running.
//!
//! Measured in one run, so the ratios compare like with like on a shared, noisy machine:
//!
//! - W1 throughput on 1 and 2 cores (events/s from the first event to the last, two
//!   partitions so both cores have work), with the process's peak RSS during each run;
//! - the floor: the same decode, filter, map and count done by 1 and 2 plain threads over
//!   the same orders held in memory (no log, no runtime, no output);
//! - latency from send to processed (p50/p99/p999, hdrhistogram) on a 1-core worker at an
//!   offered load of 50 % and 25 % of its measured maximum (with `worker_spin` 200 µs, and at
//!   25 % without it too), the generator thread pinned to the other CPU and sending from
//!   outside the worker, with the worker's CPU per event and busy share in those runs and
//!   the machine's own stalls (a clock-reading thread per CPU, as jHiccup measures them);
//! - the codec section (`--only-codec` alone): decode cost per codec on one core, JSON by
//!   simd-json and by serde_json against a fixed-layout record read in place.
//!
//! ```text
//! cargo run --release -p faust-bench --bin engine -- --quick --json
//! ```

use std::cell::{Cell, RefCell};
use std::hint::black_box;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use faust::{App, Settings};
use faust_bench::{peak_rss_mb, progress, reset_peak_rss};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(about = "Benchmark the faust engine on workload W1 (decode, filter, map, forward)")]
struct Args {
    /// A shorter run (under 60 s).
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Orders pre-loaded for the throughput runs (default 2,000,000, or 400,000 with --quick).
    #[arg(long)]
    events: Option<u64>,
    /// Seconds of the latency run (default 10, or 4 with --quick).
    #[arg(long)]
    latency_secs: Option<u64>,
    /// Only the 1-core W1 run, once (for profiling).
    #[arg(long)]
    only_w1: bool,
    /// Only the latency run, at this many events/s (for profiling).
    #[arg(long)]
    only_latency: Option<f64>,
    /// The worker's `worker_spin` in the latency runs, in microseconds (the runs without
    /// it are reported too).
    #[arg(long, default_value_t = LATENCY_SPIN_US)]
    spin_us: u64,
    /// Only the 1-core W2 run (10,000 accounts), once (for profiling).
    #[arg(long)]
    only_w2: bool,
    /// Only the 1-core W2 run over 1,000,000 accounts, once (for profiling).
    #[arg(long)]
    only_w2_1m: bool,
    /// Skip W1 and the latency runs (W2, recovery, W4, the takeover and W3 only).
    #[arg(long)]
    skip_w1: bool,
    /// Only the 1-core W4 run (group_by, then count), once (for profiling).
    #[arg(long)]
    only_w4: bool,
    /// Only the W3 runs (windowed counts), once each.
    #[arg(long)]
    only_w3: bool,
    /// Only W2 and the tumbling W3 run, in five alternate rounds (for profiling, and for the
    /// ratio on a noisy machine).
    #[arg(long)]
    only_w3_tumbling: bool,
    /// Only the takeover on memory://, once.
    #[arg(long)]
    only_takeover: bool,
    /// Only the codec section (decode cost per codec on one core).
    #[arg(long)]
    only_codec: bool,
    /// Only the monitor's cost: W2 on 1 core with the monitor off, on, and on with a
    /// counting sensor, interleaved over 5 rounds (3 with --quick).
    #[arg(long)]
    only_monitor: bool,
    /// Only exactly-once against at-least-once: W2 and W4 on 1 core, interleaved over 5
    /// rounds (3 with --quick).
    #[arg(long)]
    only_eos: bool,
}

/// Runs the codec section: 1,000,000 records (200,000 with --quick), best of 5 rounds.
fn run_codec(quick: bool, json: bool) -> faust_bench::codec::CodecFigures {
    let records = if quick { 200_000 } else { 1_000_000 };
    progress(json, &format!("codecs: decoding {records} orders per codec on one core"));
    let c = faust_bench::codec::run(records, 5);
    progress(
        json,
        &format!(
            "codecs: json-simd {:.0}/s, json-serde {:.0}/s, zero-copy in place {:.0}/s ({:.1}x JSON), owned {:.0}/s ({:.1}x)",
            c.json_simd,
            c.json_serde,
            c.zerocopy,
            c.zerocopy_vs_json(),
            c.zerocopy_owned,
            c.zerocopy_owned / c.json()
        ),
    );
    c
}

fn print_codec(c: &faust_bench::codec::CodecFigures) {
    println!();
    println!(
        "Codecs (decode one order record and read a field, one core, {} records; JSON ~{:.0} B, fixed layout {} B)",
        c.records,
        c.json_bytes,
        std::mem::size_of::<faust_bench::codec::FixedOrder>()
    );
    println!("| codec | records/s | vs fastest JSON (target) |");
    println!("|---|---|---|");
    let json = c.json();
    println!("| JSON, simd-json (`json-simd`) | {:.0} | {:.2} |", c.json_simd, c.json_simd / json);
    println!("| JSON, serde_json (`json-serde`) | {:.0} | {:.2} |", c.json_serde, c.json_serde / json);
    println!(
        "| fixed layout read in place (`Codec::RAW.view`, as `for_each_in_place` reads) | {:.0} | {:.1} (≥ 10) |",
        c.zerocopy,
        c.zerocopy_vs_json()
    );
    println!(
        "| fixed layout, owned (`raw` into `Fixed<R>`, which holds the buffer) | {:.0} | {:.1} |",
        c.zerocopy_owned,
        c.zerocopy_owned / json
    );
    println!(
        "| (floor of any value holding its buffer: the view + a clone and drop of the record's `Bytes`) | {:.0} | {:.1} |",
        c.handle,
        c.handle / json
    );
}

/// The codec section's keys of `--json`.
fn codec_json(c: &faust_bench::codec::CodecFigures) -> serde_json::Value {
    serde_json::json!({
        "codec_records": c.records,
        "codec_json_bytes": c.json_bytes,
        "codec_json_simd_records_s": c.json_simd,
        "codec_json_serde_records_s": c.json_serde,
        "codec_zerocopy_records_s": c.zerocopy,
        "codec_zerocopy_vs_json_ratio": c.zerocopy_vs_json(),
        "codec_zerocopy_owned_records_s": c.zerocopy_owned,
        "codec_zerocopy_owned_vs_json_ratio": c.zerocopy_owned / c.json(),
        "codec_bytes_handle_records_s": c.handle,
    })
}

/// W2's figures.
struct W2Figures {
    one: f64,
    /// CPU time of the worker thread per event, 1 core (the least over the runs).
    one_cpu_ns: f64,
    /// The same with the agent written as a loop over `Stream::next` (the least over the
    /// runs), and its rate against the `for_each` form's (the median of the rounds).
    next_cpu_ns: f64,
    next_ratio: f64,
    two: f64,
    floor_1: f64,
    floor_2: f64,
    million: f64,
    million_accounts: u64,
    recovery_records_s: f64,
    recovery_records: u64,
    reopen_s: f64,
    /// W2 on 1 core with the built-in monitor off, and with a counting app sensor added
    /// (best of the runs, interleaved with the runs of `one`, where the monitor is on).
    monitor_off: f64,
    /// Median over the rounds of W2 with the monitor on (and with a sensor) / off.
    monitor_ratio: f64,
    sensor_ratio: f64,
    /// W2 and W4 on 1 core with exactly-once (best of the runs), and the median over the
    /// rounds of their ratio to the at-least-once run of the same round.
    eos_one: f64,
    eos_ratio: f64,
    w4_eos_one: f64,
    w4_eos_ratio: f64,
    /// W4 (group_by then count), best of the runs, on the same orders.
    w4_one: f64,
    w4_two: f64,
    takeover: faust_bench::takeover::Takeover,
    w3: W3Figures,
}

/// W3's figures: one run of each kind of window on one core.
struct W3Figures {
    tumbling: faust_bench::w3::W3Run,
    hopping: faust_bench::w3::W3Run,
    sliding: faust_bench::w3::W3Run,
    session: faust_bench::w3::W3Run,
}

/// W3 over the orders pre-loaded in `dir` (as W2 left them): tumbling and hopping windows,
/// whose rates make the ratios, `runs` times each (the fastest run counts, as for W2), the
/// others once.
fn run_w3(dir: &Path, n: u64, json: bool, runs: usize) -> W3Figures {
    use faust_bench::w3::{Kind, run};
    let one = |kind: Kind, attempt: usize| {
        let id = format!("w3-{kind:?}-{attempt}").to_lowercase();
        let r = run(dir, &id, n, kind).unwrap_or_else(|e| panic!("{e}"));
        progress(
            json,
            &format!(
                "W3 {kind:?}: {:.0} events/s, {} windows closed, close lag p99 {:.0} µs ({:.0} windows per closing event, {:.0} ns each), {} live windows, {:.0} B each",
                r.events_s,
                r.closed,
                r.close_lag_p99_us,
                r.closes_per_boundary,
                r.close_ns_per_window,
                r.live_windows,
                r.bytes_per_live_window
            ),
        );
        r
    };
    // The fastest run, with the least CPU per event of all the runs (as W2's figures).
    let best = |kind: Kind| {
        let all: Vec<faust_bench::w3::W3Run> = (0..runs.max(1)).map(|attempt| one(kind, attempt)).collect();
        let least_cpu = all.iter().map(|r| r.cpu_ns_per_event).fold(f64::NAN, f64::min);
        let mut fastest =
            all.into_iter().max_by(|a, b| a.events_s.total_cmp(&b.events_s)).unwrap_or_else(|| one(kind, 0));
        fastest.cpu_ns_per_event = least_cpu;
        fastest
    };
    W3Figures {
        tumbling: best(Kind::Tumbling),
        hopping: best(Kind::Hopping),
        sliding: one(Kind::Sliding, 0),
        session: one(Kind::Session, 0),
    }
}

/// The W3 keys of `--json` (the ratios against W2's 1-core rate of the same run).
fn w3_json(w3: &W3Figures, w2_one: f64, w2_one_cpu_ns: f64) -> serde_json::Value {
    serde_json::json!({
        "w3_tumbling_events_s": w3.tumbling.events_s,
        "w3_tumbling_cpu_ns_per_event": w3.tumbling.cpu_ns_per_event,
        "w3_tumbling_vs_w2_cpu_ratio": w2_one_cpu_ns / w3.tumbling.cpu_ns_per_event,
        "w3_hopping_events_s": w3.hopping.events_s,
        "w3_sliding_events_s": w3.sliding.events_s,
        "w3_session_events_s": w3.session.events_s,
        "w3_tumbling_vs_w2_ratio": w3.tumbling.events_s / w2_one,
        "w3_hopping_vs_tumbling_ratio": w3.hopping.events_s / w3.tumbling.events_s,
        "w3_close_lag_p99_us": w3.tumbling.close_lag_p99_us,
        "w3_bytes_per_live_window": w3.tumbling.bytes_per_live_window,
        "w3_tumbling_closes_per_boundary": w3.tumbling.closes_per_boundary,
        "w3_tumbling_close_ns_per_window": w3.tumbling.close_ns_per_window,
        "w3_hopping_close_lag_p99_us": w3.hopping.close_lag_p99_us,
        "w3_hopping_close_ns_per_window": w3.hopping.close_ns_per_window,
    })
}

fn print_w3(w3: &W3Figures, w2_one: f64, w2_one_cpu_ns: f64) {
    println!();
    println!("W3 windowed (W2's count per account in windows), 1 core");
    println!("| windows | events/s | vs | windows closed | close lag p99 |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, r: &faust_bench::w3::W3Run, vs: &str| {
        println!(
            "| {name} | {:.0} | {vs} | {} | {:.0} µs ({:.0} per closing event, {:.0} ns each) |",
            r.events_s, r.closed, r.close_lag_p99_us, r.closes_per_boundary, r.close_ns_per_window
        );
    };
    row("tumbling 10 s", &w3.tumbling, &format!("{:.2} of W2 (≥ 0.7)", w3.tumbling.events_s / w2_one));
    row(
        "hopping 60 s / 10 s (panes)",
        &w3.hopping,
        &format!("{:.2} of tumbling (≥ 0.6)", w3.hopping.events_s / w3.tumbling.events_s),
    );
    println!(
        "| tumbling, CPU per event | {:.0} ns | {:.2} of W2's {:.0} ns | | |",
        w3.tumbling.cpu_ns_per_event,
        w2_one_cpu_ns / w3.tumbling.cpu_ns_per_event,
        w2_one_cpu_ns
    );
    row("sliding 5 s / 5 s", &w3.sliding, "");
    row("session, 30 s gap", &w3.session, "");
    println!(
        "| memory per live window | {:.0} B ({} windows live) | | | |",
        w3.tumbling.bytes_per_live_window, w3.tumbling.live_windows
    );
}

/// W2 (the orders count, 10,000 and 1,000,000 accounts), its floor, table recovery, W4 (the
/// same count behind a `group_by`) and the takeover on `memory://`.
fn run_w2(dir: &Path, n: u64, json: bool, runs: usize) -> W2Figures {
    use faust_bench::w2;
    let small = dir.join("w2-10k");
    progress(json, &format!("W2: pre-loading {n} orders over 10,000 accounts"));
    w2::preload(&small, n, 10_000);
    let (mut one, mut two) = (0.0f64, 0.0f64);
    let mut one_cpu_ns = f64::NAN;
    let (mut w4_one, mut w4_two) = (0.0f64, 0.0f64);
    // Per round: W2 with the monitor off, on (the default, `a` below) and with a sensor.
    let (mut off_runs, mut on_runs, mut sensor_runs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut eos_runs, mut w4_runs, mut w4_eos_runs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut next_runs, mut next_cpu_ns) = (Vec::new(), f64::NAN);
    for r in 0..runs {
        let off = w2::run_monitored(&small, &format!("w2-monitor-off-{r}"), n, false, false);
        progress(json, &format!("W2 1 core, monitor off, run {r}: {:.0} events/s", off.events_s));
        off_runs.push(off.events_s);
        let a = w2::run(&small, &format!("w2-1core-{r}"), n, 1);
        assert_eq!(a.accounts, 10_000, "W2 counted {} accounts", a.accounts);
        progress(
            json,
            &format!("W2 1 core run {r}: {:.0} events/s, {:.0} CPU ns per event", a.events_s, a.cpu_ns_per_event),
        );
        one = one.max(a.events_s);
        on_runs.push(a.events_s);
        one_cpu_ns = one_cpu_ns.min(a.cpu_ns_per_event);
        let with_next = w2::run_with_next(&small, &format!("w2-next-{r}"), n);
        assert_eq!(with_next.accounts, 10_000, "W2 with next() counted {} accounts", with_next.accounts);
        progress(
            json,
            &format!(
                "W2 1 core written with next(), run {r}: {:.0} events/s, {:.0} CPU ns per event",
                with_next.events_s, with_next.cpu_ns_per_event
            ),
        );
        next_runs.push(with_next.events_s);
        next_cpu_ns = next_cpu_ns.min(with_next.cpu_ns_per_event);
        let b = w2::run(&small, &format!("w2-2core-{r}"), n, 2);
        progress(json, &format!("W2 2 cores run {r}: {:.0} events/s", b.events_s));
        let c = w2::run_grouped(&small, &format!("w4-1core-{r}"), n, 1);
        progress(json, &format!("W4 1 core run {r}: {:.0} events/s", c.events_s));
        w4_runs.push(c.events_s);
        let x = w2::run_exactly_once(&small, &format!("w2-eos-{r}"), n, false);
        assert_eq!(x.accounts, 10_000, "W2 with exactly-once counted {} accounts", x.accounts);
        progress(json, &format!("W2 1 core, exactly-once, run {r}: {:.0} events/s", x.events_s));
        eos_runs.push(x.events_s);
        let y = w2::run_exactly_once(&small, &format!("w4-eos-{r}"), n, true);
        progress(json, &format!("W4 1 core, exactly-once, run {r}: {:.0} events/s", y.events_s));
        w4_eos_runs.push(y.events_s);
        let d = w2::run_grouped(&small, &format!("w4-2core-{r}"), n, 2);
        progress(json, &format!("W4 2 cores run {r}: {:.0} events/s", d.events_s));
        w4_one = w4_one.max(c.events_s);
        w4_two = w4_two.max(d.events_s);
        two = two.max(b.events_s);
        let e = w2::run_monitored(&small, &format!("w2-sensor-{r}"), n, true, true);
        progress(json, &format!("W2 1 core, monitor on and a counting sensor, run {r}: {:.0} events/s", e.events_s));
        sensor_runs.push(e.events_s);
    }
    let encoded: Vec<Vec<u8>> = (0..n).map(|i| serde_json::to_vec(&w2::order(i, 10_000)).unwrap()).collect();
    let floor_1 = w2::floor(&encoded, 1);
    let floor_2 = w2::floor(&encoded, 2);
    drop(encoded);
    progress(json, &format!("W2 floor: {floor_1:.0} events/s on 1 thread, {floor_2:.0} on 2"));
    let big = dir.join("w2-1m");
    let big_n = n.max(1_000_000);
    progress(json, &format!("W2: pre-loading {big_n} orders over 1,000,000 accounts"));
    w2::preload(&big, big_n, 1_000_000);
    let m = w2::run(&big, "w2-1m", big_n, 1);
    progress(json, &format!("W2 1M accounts, 1 core: {:.0} events/s, {} accounts", m.events_s, m.accounts));
    // Recovery into an empty shard: the stores go, the changelog stays.
    let records = w2::changelog_records(&big, "w2-1m");
    std::fs::remove_dir_all(big.join("tables").join("counts")).expect("remove the table's stores");
    let replay = w2::time_to_ready(&big, "w2-1m");
    progress(json, &format!("recovery of {records} changelog records: {:.2} s", replay.as_secs_f64()));
    let reopen = w2::time_to_ready(&big, "w2-1m");
    progress(json, &format!("reopen of {} keys from the checkpoint: {:.2} s", m.accounts, reopen.as_secs_f64()));
    W2Figures {
        one,
        one_cpu_ns,
        next_cpu_ns,
        next_ratio: median_ratio(&next_runs, &on_runs),
        two,
        floor_1,
        floor_2,
        million: m.events_s,
        million_accounts: m.accounts,
        recovery_records_s: records as f64 / replay.as_secs_f64(),
        recovery_records: records,
        reopen_s: reopen.as_secs_f64(),
        monitor_off: off_runs.iter().copied().fold(0.0, f64::max),
        monitor_ratio: median_ratio(&on_runs, &off_runs),
        sensor_ratio: median_ratio(&sensor_runs, &off_runs),
        eos_one: eos_runs.iter().copied().fold(0.0, f64::max),
        eos_ratio: median_ratio(&eos_runs, &on_runs),
        w4_eos_one: w4_eos_runs.iter().copied().fold(0.0, f64::max),
        w4_eos_ratio: median_ratio(&w4_eos_runs, &w4_runs),
        w4_one,
        w4_two,
        takeover: run_takeover(dir, n, json),
        w3: run_w3(&small, n, json, runs),
    }
}

fn run_takeover(dir: &Path, n: u64, json: bool) -> faust_bench::takeover::Takeover {
    let preload = (n / 4).max(10_000);
    progress(json, &format!("takeover on memory:// after {preload} orders counted"));
    let t = faust_bench::takeover::run(&dir.join("takeover"), preload);
    progress(
        json,
        &format!(
            "takeover of {} partitions: {:.1} ms after the leave ({:.1} ms after the stop), {} changelog records replayed",
            t.moved, t.takeover_ms, t.stop_to_processed_ms, t.replayed
        ),
    );
    t
}

fn print_w2(w: &W2Figures, n: u64) {
    println!();
    println!("W2 stateful (decode JSON order, count per account in a table, changelog on), {n} orders on local://");
    println!("| | figure | vs | ratio (target) |");
    println!("|---|---|---|---|");
    println!(
        "| W2 1 core, 10k accounts | {:.0} events/s (≥ 1,000,000) | floor 1 thread {:.0} | {:.2} (≥ 0.6) |",
        w.one,
        w.floor_1,
        w.one / w.floor_1
    );
    let scaling = w.two / w.one;
    let floor_scaling = w.floor_2 / w.floor_1;
    println!("| W2 1 core, CPU per event | {:.0} ns of the worker thread | | |", w.one_cpu_ns);
    println!(
        "| W2 1 core, the agent a loop over `next()` | {:.0} CPU ns per event | `for_each`: {:.0} ns | rate {:.2} of `for_each`'s |",
        w.next_cpu_ns, w.one_cpu_ns, w.next_ratio
    );
    println!(
        "| W2 2 cores, 10k accounts | {:.0} events/s | floor 2 threads {:.0} | scaling {scaling:.2} vs floor's {floor_scaling:.2} = {:.2} (≥ 0.9) |",
        w.two,
        w.floor_2,
        scaling / floor_scaling
    );
    println!(
        "| W2 1 core, 1M accounts | {:.0} events/s ({} accounts) | 10k accounts | {:.2} (≥ 0.5) |",
        w.million,
        w.million_accounts,
        w.million / w.one
    );
    println!(
        "| recovery into an empty shard | {:.0} changelog records/s ({} records) | | (≥ 1,000,000) |",
        w.recovery_records_s, w.recovery_records
    );
    println!("| reopen 1M keys from the checkpoint | {:.2} s | | (≤ 1 s) |", w.reopen_s);
    println!(
        "| W4 1 core (group_by, then count) | {:.0} events/s | W2 1 core {:.0} | {:.2} (≥ 0.4) |",
        w.w4_one,
        w.one,
        w.w4_one / w.one
    );
    println!("| W4 2 cores | {:.0} events/s | W2 2 cores {:.0} | {:.2} |", w.w4_two, w.two, w.w4_two / w.two);
    println!(
        "| W2 1 core, monitor on (the default) against off | {:.0} events/s | monitor off {:.0} | {:.2} (≥ 0.95; median of the rounds' ratios) |",
        w.one, w.monitor_off, w.monitor_ratio
    );
    println!("| W2 1 core, monitor and a counting sensor against off | | | {:.2} |", w.sensor_ratio);
    println!(
        "| W2 1 core, exactly-once against at-least-once | {:.0} events/s | | {:.2} (≥ 0.9; median of the rounds' ratios) |",
        w.eos_one, w.eos_ratio
    );
    println!(
        "| W4 1 core, exactly-once against at-least-once | {:.0} events/s | | {:.2} (reported) |",
        w.w4_eos_one, w.w4_eos_ratio
    );
    let t = &w.takeover;
    println!(
        "| takeover on memory:// ({} partitions) | {:.1} ms after the leave, {:.1} ms after the stop | replayed {} changelog records | (≤ 100 ms + tail replay) |",
        t.moved, t.takeover_ms, t.stop_to_processed_ms, t.replayed
    );
}

/// The median over rounds of `a[i] / b[i]`.
fn median_ratio(a: &[f64], b: &[f64]) -> f64 {
    let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    r.sort_by(f64::total_cmp);
    match r.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => r[n / 2],
        n => (r[n / 2 - 1] + r[n / 2]) / 2.0,
    }
}

/// The W4, `next()` and takeover keys of `--json`.
fn w4_json(w: &W2Figures) -> serde_json::Value {
    serde_json::json!({
        "w2_next_cpu_ns_per_event": w.next_cpu_ns,
        "w2_next_vs_for_each_ratio": w.next_ratio,
        "w4_events_s_1core": w.w4_one,
        "w4_events_s_2core": w.w4_two,
        "w4_vs_w2_ratio": w.w4_one / w.one,
        "w2_monitor_vs_off": w.monitor_ratio,
        "w2_monitor_off_events_s_1core": w.monitor_off,
        "w2_with_sensor_vs_off": w.sensor_ratio,
        "w2_eos_events_s_1core": w.eos_one,
        "w2_eos_vs_alo_ratio": w.eos_ratio,
        "w4_eos_events_s_1core": w.w4_eos_one,
        "w4_eos_vs_alo_ratio": w.w4_eos_ratio,
        "w4_vs_w2_ratio_2core": w.w4_two / w.two,
        "memory_takeover_ms": w.takeover.takeover_ms,
        "memory_stop_to_processed_ms": w.takeover.stop_to_processed_ms,
        "memory_takeover_replayed_records": w.takeover.replayed,
    })
}

/// An order as the generator writes it (about 150 bytes of JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: u64,
    customer: String,
    product: String,
    quantity: u32,
    price_cents: u64,
    country: String,
    /// When the generator made it: nanoseconds since the benchmark's clock started.
    created_ns: u64,
}

/// What W1 forwards: the orders worth forwarding, reduced to a sale.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sale {
    id: u64,
    customer: String,
    total_cents: u64,
}

const COUNTRIES: [&str; 4] = ["US", "DE", "FR", "JP"];

fn order(i: u64, created_ns: u64) -> Order {
    // A cheap deterministic mix, so every run sees the same orders.
    let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    Order {
        id: i,
        customer: format!("customer-{:05}", h % 10_000),
        product: format!("sku-{:04}", (h >> 20) % 1_000),
        quantity: ((h >> 40) % 5) as u32,
        price_cents: 100 + (h >> 12) % 20_000,
        country: COUNTRIES[((h >> 50) % 4) as usize].to_string(),
        created_ns,
    }
}

/// W1's filter: orders with something in them (4 in 5).
fn keep(o: &Order) -> bool {
    o.quantity > 0
}

/// W1's map.
fn to_sale(o: Order) -> Sale {
    Sale { total_cents: o.price_cents * u64::from(o.quantity), id: o.id, customer: o.customer }
}

fn settings(id: &str, datadir: &Path, cores: usize) -> Settings {
    let mut s = Settings::new(id);
    s.datadir = datadir.to_path_buf();
    s.topic_partitions = 2;
    s.cores = Some(cores);
    s
}

/// Writes `n` orders to `orders` (two partitions) with `send_soon` from one core.
fn preload(datadir: &Path, n: u64) -> Duration {
    let app = App::new(settings("w1-load", datadir, 1));
    let orders = app.topic::<String, Order>("orders");
    let stop = app.stop_signal();
    app.task(move || {
        let (orders, stop) = (orders.clone(), stop.clone());
        async move {
            for i in 0..n {
                let o = order(i, 0);
                orders.send_soon(Some(&o.customer), &o)?;
                if i % 4096 == 0 {
                    // Let the flusher write what is buffered.
                    faust::runtime::yield_if_needed().await;
                }
            }
            stop.stop();
            Ok(())
        }
    });
    let start = Instant::now();
    app.run().expect("preload worker");
    start.elapsed()
}

/// One counter per core, on its own cache line.
#[repr(align(128))]
#[derive(Default)]
struct Counter(AtomicU64);

/// One W1 run.
#[derive(Clone, Copy, Default)]
struct W1Run {
    events_s: f64,
    peak_rss_mb: f64,
    /// CPU time of the worker thread per event (1-core runs; NaN otherwise).
    cpu_ns_per_event: f64,
}

/// Runs W1 over the pre-loaded orders on `cores` cores.
fn w1_throughput(datadir: &Path, n: u64, cores: usize) -> W1Run {
    reset_peak_rss();
    let app = App::new(settings(&format!("w1-{cores}core-{}", rand::random::<u32>()), datadir, cores));
    let orders = app.topic::<String, Order>("orders");
    let sales = app.topic::<String, Sale>(&format!("sales-{cores}"));
    let counters: Arc<Vec<Counter>> = Arc::new((0..cores).map(|_| Counter::default()).collect());
    let base = Instant::now();
    let first_ns = Arc::new(AtomicU64::new(u64::MAX));
    let cpu = Arc::new(faust_bench::CpuSpan::new(n));
    {
        let (counters, first_ns, cpu) = (counters.clone(), first_ns.clone(), cpu.clone());
        app.agent("w1", &orders, move |stream| {
            let (sales, counters, first_ns, cpu) = (sales.clone(), counters.clone(), first_ns.clone(), cpu.clone());
            async move {
                let core = faust::runtime::current_core().unwrap_or(0);
                stream
                    .filter(move |o| {
                        let seen = counter_add(&counters[core]);
                        if cores == 1 {
                            cpu.mark(seen);
                        }
                        keep(o)
                    })
                    .map(to_sale)
                    .for_each_item(move |key, sale| {
                        if first_ns.load(Ordering::Relaxed) == u64::MAX {
                            first_ns.fetch_min(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        }
                        sales.send_soon(key.as_ref(), &sale)?;
                        Ok(())
                    })
                    .await
            }
        });
    }
    let stop = app.stop_signal();
    let done_at = Arc::new(Mutex::new(None));
    let watcher = {
        let (counters, done_at) = (counters.clone(), done_at.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(600);
            while Instant::now() < deadline {
                let seen: u64 = counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum();
                if seen >= n {
                    *done_at.lock().unwrap() = Some(base.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            stop.stop();
        })
    };
    app.run().expect("W1 worker");
    watcher.join().unwrap();
    let rss = peak_rss_mb();
    let end = done_at.lock().unwrap().expect("W1 did not process every order in time");
    let start = Duration::from_nanos(first_ns.load(Ordering::Relaxed));
    W1Run { events_s: n as f64 / (end - start).as_secs_f64(), peak_rss_mb: rss, cpu_ns_per_event: cpu.ns_per_event() }
}

/// Counts one event; returns the count so far.
fn counter_add(c: &Counter) -> u64 {
    c.0.fetch_add(1, Ordering::Relaxed) + 1
}

/// The floor: decode, filter, map and count the same orders from memory on `threads` plain
/// threads. Returns events/s (best of 3).
fn floor(encoded: &[Vec<u8>], threads: usize) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        std::thread::scope(|s| {
            for chunk in encoded.chunks(encoded.len().div_ceil(threads)) {
                s.spawn(move || {
                    let mut kept = 0u64;
                    for bytes in chunk {
                        let o: Order = serde_json::from_slice(bytes).expect("order");
                        if keep(&o) {
                            kept += black_box(to_sale(o)).total_cents & 1;
                        }
                    }
                    black_box(kept)
                });
            }
        });
        best = best.min(start.elapsed());
    }
    encoded.len() as f64 / best.as_secs_f64()
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; we set one bit and pass its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

struct Latency {
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    offered: f64,
    achieved: f64,
    samples: u64,
    /// CPU time of the worker thread per event after the warm-up: on `local://` that thread
    /// also takes the orders from the generator and appends them (the broker's work), which
    /// the pre-loaded W1 run does not do.
    worker_cpu_ns_per_event: f64,
    /// The worker thread's CPU time over the wall-clock time after the warm-up (1.0: saturated).
    worker_busy: f64,
    /// The longest pause between two of the generator's sends after the warm-up: the orders
    /// due meanwhile arrive at once, as a burst the worker then works through.
    generator_max_gap_us: f64,
    /// Events the worker processed per second after the warm-up: at an offered load it
    /// cannot keep up with, the live path's maximum.
    processed_events_s: f64,
}

/// The machine's own stalls, as jHiccup measures them: one thread per usable CPU reads the
/// clock in a loop for `secs`; a gap between two reads is time the thread did not run (the
/// kernel or the hypervisor had the CPU). Returns the longest gap in µs and the gaps over
/// 1 ms per second and CPU. The latency runs' p99.9 cannot be below what the machine does.
fn hiccups(secs: f64) -> (f64, f64) {
    let cpus = faust::runtime::usable_cpus();
    let threads: Vec<_> = cpus
        .iter()
        .map(|&cpu| {
            std::thread::spawn(move || {
                pin_to_cpu(cpu);
                let start = Instant::now();
                let (mut prev, mut max_gap, mut over_1ms) = (start, Duration::ZERO, 0u64);
                while prev - start < Duration::from_secs_f64(secs) {
                    let now = Instant::now();
                    let gap = now - prev;
                    max_gap = max_gap.max(gap);
                    over_1ms += u64::from(gap > Duration::from_millis(1));
                    prev = now;
                }
                (max_gap, over_1ms)
            })
        })
        .collect();
    let (mut max_gap, mut over_1ms) = (Duration::ZERO, 0u64);
    for t in threads {
        let (gap, over) = t.join().unwrap();
        max_gap = max_gap.max(gap);
        over_1ms += over;
    }
    (max_gap.as_secs_f64() * 1e6, over_1ms as f64 / secs / cpus.len().max(1) as f64)
}

/// The latency runs' `worker_spin`: the tuning for a core given to the worker alone.
const LATENCY_SPIN_US: u64 = 200;

/// A latency run's worker figures at one point: (events taken, thread CPU ns, wall ns).
type WorkerSample = (u64, u64, u64);

fn latency(parent: &Path, rate: f64, secs: u64, spin: Duration) -> Latency {
    // Its own data directory: no records left by an earlier run (stamped against another
    // clock) to read first. And the page cache written back first, so that the write-back of
    // what the throughput runs wrote does not land in this run.
    let datadir = &parent.join(format!("latency-{rate:.0}-{}", spin.as_micros()));
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let mut settings = settings("w1-latency", datadir, 1);
    settings.worker_spin = spin;
    let app = App::new(settings);
    let orders = app.topic::<String, Order>("live-orders");
    let sales = app.topic::<String, Sale>("live-sales");
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap()));
    let base = Instant::now();
    let warmup_ns = 1_000_000_000u64;
    let handled = Arc::new(AtomicU64::new(0));
    // The worker's (events, CPU ns, wall ns) after the warm-up.
    let worker = Arc::new(Mutex::new((0u64, 0u64, 0u64)));
    {
        let (histogram, handled, worker) = (histogram.clone(), handled.clone(), worker.clone());
        app.agent("w1", &orders, move |stream| {
            let (sales, histogram, handled, worker) =
                (sales.clone(), histogram.clone(), handled.clone(), worker.clone());
            async move {
                // The agent as the pre-loaded W1 run writes it (`for_each_item`), so that the
                // load is a share of that run's peak.
                let local = Rc::new(RefCell::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap()));
                // (events, worker CPU ns, wall ns) at the first event after the warm-up and at
                // every 4,096th after it: the thread's CPU clock is a system call, too dear
                // for every event.
                let samples: Rc<Cell<(Option<WorkerSample>, WorkerSample)>> = Rc::default();
                // Every event the worker takes, those the filter drops included (as W1 counts).
                let taken = Rc::new(Cell::new(0u64));
                let counted = taken.clone();
                let (recorded, sampled) = (local.clone(), samples.clone());
                stream
                    .filter(move |o| {
                        counted.set(counted.get() + 1);
                        keep(o)
                    })
                    .map(|o| {
                        let created = o.created_ns;
                        (created, to_sale(o))
                    })
                    .for_each_item(move |key, (created, sale)| {
                        sales.send_soon(key.as_ref(), &sale)?;
                        let now = base.elapsed().as_nanos() as u64;
                        if created >= warmup_ns {
                            recorded.borrow_mut().saturating_record(now.saturating_sub(created) / 1000);
                        }
                        // The worker's figures from the end of the warm-up by the clock
                        // (behind a backlog, the events processed then were created earlier).
                        if now >= warmup_ns {
                            let seen = taken.get();
                            let (first, last) = sampled.get();
                            if first.is_none() || seen >= last.0 + 4096 {
                                let sample = (seen, faust_bench::thread_cpu_ns(), now);
                                sampled.set((first.or(Some(sample)), sample));
                            }
                        }
                        handled.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    })
                    .await?;
                histogram.lock().unwrap().add(&*local.borrow()).unwrap();
                if let (Some(first), last) = samples.get() {
                    *worker.lock().unwrap() = (last.0 - first.0, last.1 - first.1, last.2 - first.2);
                }
                Ok(())
            }
        });
    }
    let stop = app.stop_signal();
    let generator_cpu = faust::runtime::usable_cpus().get(1).copied();
    let generator = {
        let orders = orders.clone();
        std::thread::spawn(move || {
            if let Some(cpu) = generator_cpu {
                pin_to_cpu(cpu);
            }
            // Sends in ticks of 100 µs, each with the orders due by then.
            let total = (rate * secs as f64) as u64;
            let start = Instant::now();
            let mut sent = 0u64;
            let (mut last_send, mut max_gap) = (None::<Instant>, Duration::ZERO);
            while sent < total {
                let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
                if due > sent && base.elapsed().as_nanos() as u64 >= warmup_ns {
                    let now = Instant::now();
                    if let Some(before) = last_send {
                        max_gap = max_gap.max(now - before);
                    }
                    last_send = Some(now);
                }
                while sent < due {
                    let o = order(sent, base.elapsed().as_nanos() as u64);
                    orders.send_soon(Some(&o.customer), &o).expect("send");
                    sent += 1;
                }
                let next_tick = start + Duration::from_secs_f64((sent + 1) as f64 / rate);
                let now = Instant::now();
                if next_tick > now {
                    std::thread::sleep((next_tick - now).min(Duration::from_micros(100)));
                }
            }
            let elapsed = start.elapsed();
            // Give the worker a moment to finish what was sent, then stop it.
            std::thread::sleep(Duration::from_millis(500));
            stop.stop();
            (sent, elapsed, max_gap)
        })
    };
    app.run().expect("latency worker");
    let (sent, elapsed, max_gap) = generator.join().unwrap();
    let h = histogram.lock().unwrap();
    let (events, cpu_ns, wall_ns) = *worker.lock().unwrap();
    Latency {
        p50_us: h.value_at_quantile(0.50) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
        p999_us: h.value_at_quantile(0.999) as f64,
        max_us: h.max() as f64,
        offered: rate,
        achieved: sent as f64 / elapsed.as_secs_f64(),
        samples: h.len(),
        worker_cpu_ns_per_event: cpu_ns as f64 / events as f64,
        worker_busy: cpu_ns as f64 / wall_ns as f64,
        generator_max_gap_us: max_gap.as_secs_f64() * 1e6,
        processed_events_s: events as f64 / (wall_ns as f64 / 1e9),
    }
}

fn main() {
    let args = Args::parse();
    let n = args.events.unwrap_or(if args.quick { 400_000 } else { 2_000_000 });
    let latency_secs = args.latency_secs.unwrap_or(if args.quick { 4 } else { 10 });
    let dir = tempfile::tempdir().expect("temp dir");
    let datadir = dir.path().join("data");
    let cpus = faust::runtime::usable_cpus().len();

    if args.only_codec {
        let c = run_codec(args.quick, args.json);
        if args.json {
            println!("{}", codec_json(&c));
        } else {
            print_codec(&c);
        }
        return;
    }
    if args.only_latency.is_none() {
        progress(args.json, &format!("pre-loading {n} orders"));
    }
    let load = if args.only_latency.is_none() { preload(&datadir, n) } else { Duration::ZERO };
    progress(
        args.json,
        &format!("pre-loaded in {:.2} s ({:.0} orders/s)", load.as_secs_f64(), n as f64 / load.as_secs_f64()),
    );

    if let Some(rate) = args.only_latency {
        let lat = latency(dir.path(), rate, latency_secs, Duration::from_micros(args.spin_us));
        println!(
            "latency at {rate:.0}/s: p50 {:.0} µs, p99 {:.0} µs, p999 {:.0} µs, max {:.0} µs; worker {:.0} CPU ns per event, busy {:.2}, {:.0} events/s processed; generator's longest pause {:.0} µs",
            lat.p50_us,
            lat.p99_us,
            lat.p999_us,
            lat.max_us,
            lat.worker_cpu_ns_per_event,
            lat.worker_busy,
            lat.processed_events_s,
            lat.generator_max_gap_us
        );
        return;
    }
    if args.only_eos {
        use faust_bench::w2;
        let small = dir.path().join("w2-10k");
        w2::preload(&small, n, 10_000);
        let rounds = if args.quick { 3 } else { 5 };
        let (mut alo, mut eos, mut w4_alo, mut w4_eos) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            let a = w2::run(&small, &format!("alo-{r}"), n, 1);
            let b = w2::run_exactly_once(&small, &format!("eos-{r}"), n, false);
            let c = w2::run_grouped(&small, &format!("w4-alo-{r}"), n, 1);
            let d = w2::run_exactly_once(&small, &format!("w4-eos-{r}"), n, true);
            progress(
                args.json,
                &format!(
                    "round {r}: W2 {:.0} against {:.0} events/s exactly-once; W4 {:.0} against {:.0}",
                    a.events_s, b.events_s, c.events_s, d.events_s
                ),
            );
            alo.push(a.events_s);
            eos.push(b.events_s);
            w4_alo.push(c.events_s);
            w4_eos.push(d.events_s);
        }
        let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let (ratio, w4_ratio) = (median_ratio(&eos, &alo), median_ratio(&w4_eos, &w4_alo));
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "w2_eos_vs_alo_ratio": ratio,
                    "w2_eos_events_s_1core": best(&eos),
                    "w2_events_s_1core": best(&alo),
                    "w4_eos_vs_alo_ratio": w4_ratio,
                    "w4_eos_events_s_1core": best(&w4_eos),
                    "w4_events_s_1core": best(&w4_alo),
                })
            );
        } else {
            println!(
                "1 core over {rounds} rounds (medians of the rounds' ratios): W2 exactly-once / at-least-once {ratio:.3} \
                 (best {:.0} against {:.0} events/s); W4 {w4_ratio:.3} (best {:.0} against {:.0})",
                best(&eos),
                best(&alo),
                best(&w4_eos),
                best(&w4_alo)
            );
        }
        return;
    }
    if args.only_monitor {
        let small = dir.path().join("w2-10k");
        faust_bench::w2::preload(&small, n, 10_000);
        let rounds = if args.quick { 3 } else { 5 };
        let (mut off, mut on, mut sensor) = (Vec::new(), Vec::new(), Vec::new());
        // CPU time of the worker thread per event: steadier than rates on a shared machine.
        let (mut off_cpu, mut on_cpu, mut sensor_cpu) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            let a = faust_bench::w2::run_monitored(&small, &format!("m-off-{r}"), n, false, false);
            let b = faust_bench::w2::run_monitored(&small, &format!("m-on-{r}"), n, true, false);
            let c = faust_bench::w2::run_monitored(&small, &format!("m-sensor-{r}"), n, true, true);
            progress(
                args.json,
                &format!(
                    "round {r}: off {:.0}, on {:.0}, on with a sensor {:.0} events/s; CPU {:.0}, {:.0}, {:.0} ns per event",
                    a.events_s, b.events_s, c.events_s, a.cpu_ns_per_event, b.cpu_ns_per_event, c.cpu_ns_per_event
                ),
            );
            off.push(a.events_s);
            on.push(b.events_s);
            sensor.push(c.events_s);
            off_cpu.push(a.cpu_ns_per_event);
            on_cpu.push(b.cpu_ns_per_event);
            sensor_cpu.push(c.cpu_ns_per_event);
        }
        // Each round's runs follow one another: their ratio is the least disturbed by a
        // machine whose load changes from round to round; the median drops outlying rounds.
        let (on_ratio, sensor_ratio) = (median_ratio(&on, &off), median_ratio(&sensor, &off));
        // As a rate: CPU per event with it off over CPU per event with it on.
        let (on_cpu_ratio, sensor_cpu_ratio) = (median_ratio(&off_cpu, &on_cpu), median_ratio(&off_cpu, &sensor_cpu));
        let best_off = off.iter().copied().fold(0.0, f64::max);
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "w2_monitor_vs_off": on_ratio,
                    "w2_with_sensor_vs_off": sensor_ratio,
                    "w2_monitor_vs_off_cpu": on_cpu_ratio,
                    "w2_with_sensor_vs_off_cpu": sensor_cpu_ratio,
                    "w2_monitor_off_events_s_1core": best_off,
                    "w2_events_s_1core": on.iter().copied().fold(0.0, f64::max),
                })
            );
        } else {
            println!(
                "W2 1 core over {rounds} rounds (medians of the rounds' ratios): monitor on / off {on_ratio:.3} in events/s, \
                 {on_cpu_ratio:.3} in CPU per event; with a counting sensor / off {sensor_ratio:.3} and {sensor_cpu_ratio:.3}; \
                 best with it off {best_off:.0} events/s"
            );
        }
        return;
    }
    if args.only_w2 || args.only_w2_1m {
        let accounts = if args.only_w2_1m { 1_000_000 } else { 10_000 };
        let n = if args.only_w2_1m { n.max(1_000_000) } else { n };
        let small = dir.path().join("w2-only");
        faust_bench::w2::preload(&small, n, accounts);
        let r = faust_bench::w2::run(&small, "w2-only", n, 1);
        println!(
            "W2 1 core: {:.0} events/s, {:.0} CPU ns per event ({} accounts)",
            r.events_s, r.cpu_ns_per_event, r.accounts
        );
        return;
    }
    let runs = if args.quick { 1 } else { 3 };
    if args.skip_w1 {
        let w = run_w2(dir.path(), n, args.json, runs);
        if args.json {
            let mut out = w4_json(&w);
            if let (Some(o), serde_json::Value::Object(w3)) = (out.as_object_mut(), w3_json(&w.w3, w.one, w.one_cpu_ns))
            {
                o.extend(w3);
            }
            println!("{out}");
        } else {
            print_w2(&w, n);
            print_w3(&w.w3, w.one, w.one_cpu_ns);
        }
        return;
    }
    if args.only_w4 {
        let small = dir.path().join("w4-only");
        faust_bench::w2::preload(&small, n, 10_000);
        let r = faust_bench::w2::run_grouped(&small, "w4-only", n, 1);
        println!("W4 1 core: {:.0} events/s ({} accounts)", r.events_s, r.accounts);
        return;
    }
    if args.only_w3_tumbling {
        // W2 and tumbling W3 in alternate rounds, so that both see the same spells of a
        // shared machine's noise; each one's best round, and the ratio of the bests.
        let small = dir.path().join("w3-only");
        faust_bench::w2::preload(&small, n, 10_000);
        let (mut w2_best, mut w3_best, mut w2_cpu, mut w3_cpu) = (0f64, 0f64, f64::NAN, f64::NAN);
        for round in 0..5 {
            let w2 = faust_bench::w2::run(&small, &format!("w2-for-w3-{round}"), n, 1);
            let w3 = faust_bench::w3::run(&small, &format!("w3-tumbling-{round}"), n, faust_bench::w3::Kind::Tumbling)
                .unwrap_or_else(|e| panic!("{e}"));
            println!(
                "round {round}: W2 {:.0} events/s, {:.0} CPU ns per event; W3 tumbling {:.0} events/s, {:.0} CPU ns per event; {:.2} of W2 ({:.2} in CPU time)",
                w2.events_s,
                w2.cpu_ns_per_event,
                w3.events_s,
                w3.cpu_ns_per_event,
                w3.events_s / w2.events_s,
                w2.cpu_ns_per_event / w3.cpu_ns_per_event
            );
            (w2_best, w3_best) = (w2_best.max(w2.events_s), w3_best.max(w3.events_s));
            (w2_cpu, w3_cpu) = (w2_cpu.min(w2.cpu_ns_per_event), w3_cpu.min(w3.cpu_ns_per_event));
        }
        println!(
            "best rounds: W2 {w2_best:.0} events/s, {w2_cpu:.0} CPU ns; W3 tumbling {w3_best:.0} events/s, {w3_cpu:.0} CPU ns; {:.2} of W2 ({:.2} in CPU time)",
            w3_best / w2_best,
            w2_cpu / w3_cpu
        );
        return;
    }
    if args.only_w3 {
        let small = dir.path().join("w3-only");
        faust_bench::w2::preload(&small, n, 10_000);
        let w2 = faust_bench::w2::run(&small, "w2-for-w3", n, 1);
        let w3 = run_w3(&small, n, args.json, 1);
        if args.json {
            println!("{}", w3_json(&w3, w2.events_s, w2.cpu_ns_per_event));
        } else {
            print_w3(&w3, w2.events_s, w2.cpu_ns_per_event);
        }
        return;
    }
    if args.only_takeover {
        let t = run_takeover(dir.path(), n, args.json);
        println!("takeover: {t:?}");
        return;
    }
    if args.only_w1 {
        let r = w1_throughput(&datadir, n, 1);
        println!(
            "W1 1 core: {:.0} events/s, {:.0} CPU ns per event, peak RSS {:.0} MB",
            r.events_s, r.cpu_ns_per_event, r.peak_rss_mb
        );
        return;
    }
    let mut w1_1 = W1Run::default();
    let mut w1_2 = W1Run::default();
    // The least CPU per event over the runs (like the best rate: the run least disturbed).
    let mut w1_cpu_ns = f64::NAN;
    for r in 0..runs {
        let one = w1_throughput(&datadir, n, 1);
        progress(
            args.json,
            &format!(
                "W1 1 core run {r}: {:.0} events/s, {:.0} CPU ns per event, peak RSS {:.0} MB",
                one.events_s, one.cpu_ns_per_event, one.peak_rss_mb
            ),
        );
        w1_cpu_ns = w1_cpu_ns.min(one.cpu_ns_per_event);
        if one.events_s > w1_1.events_s {
            w1_1 = one;
        }
        if cpus >= 2 {
            let two = w1_throughput(&datadir, n, 2);
            progress(
                args.json,
                &format!("W1 2 cores run {r}: {:.0} events/s, peak RSS {:.0} MB", two.events_s, two.peak_rss_mb),
            );
            if two.events_s > w1_2.events_s {
                w1_2 = two;
            }
        }
    }

    let encoded: Vec<Vec<u8>> = (0..n).map(|i| serde_json::to_vec(&order(i, 0)).unwrap()).collect();
    let floor_1 = floor(&encoded, 1);
    let floor_2 = floor(&encoded, 2);
    let avg_bytes = encoded.iter().map(Vec::len).sum::<usize>() as f64 / n as f64;
    drop(encoded);
    progress(args.json, &format!("floor: {floor_1:.0} events/s on 1 thread, {floor_2:.0} on 2"));

    let spin = Duration::from_micros(args.spin_us);
    let rate = w1_1.events_s * 0.5;
    progress(args.json, &format!("latency at {rate:.0} events/s for {latency_secs} s, spin {} µs", args.spin_us));
    let lat = latency(dir.path(), rate, latency_secs, spin);
    // The same at half that load: on local:// the worker core also appends the input (the
    // broker's work) and takes it from the generator, so at 50 % of W1's maximum it is close
    // to saturated; this shows the latency with headroom.
    let quarter = w1_1.events_s * 0.25;
    progress(args.json, &format!("latency at {quarter:.0} events/s for {latency_secs} s, spin {} µs", args.spin_us));
    let lat_quarter = latency(dir.path(), quarter, latency_secs, spin);
    // And without the spin (the default): each wake-up of the core then costs a sleep.
    progress(args.json, &format!("latency at {quarter:.0} events/s for {latency_secs} s, no spin"));
    let lat_quarter_no_spin = latency(dir.path(), quarter, latency_secs, Duration::ZERO);
    let hiccup_secs = if args.quick { 1.0 } else { 3.0 };
    let (machine_max_stall_us, machine_stalls_over_1ms_per_s) = hiccups(hiccup_secs);
    progress(
        args.json,
        &format!(
            "the machine's own stalls: longest {machine_max_stall_us:.0} µs, {machine_stalls_over_1ms_per_s:.1} over 1 ms per second and CPU"
        ),
    );

    let w2 = run_w2(dir.path(), n, args.json, runs);
    let codec = run_codec(args.quick, args.json);

    let ratio = w1_1.events_s / floor_1;
    let scaling = if w1_1.events_s > 0.0 { w1_2.events_s / w1_1.events_s } else { f64::NAN };
    let floor_scaling = floor_2 / floor_1;
    if args.json {
        let out = serde_json::json!({
            "events": n,
            "order_bytes": avg_bytes,
            "w1_events_s_1core": w1_1.events_s,
            "w1_events_s_2core": w1_2.events_s,
            "w1_peak_rss_mb_1core": w1_1.peak_rss_mb,
            "w1_peak_rss_mb_2core": w1_2.peak_rss_mb,
            "floor_events_s_1thread": floor_1,
            "floor_events_s_2thread": floor_2,
            "w1_vs_floor_ratio": ratio,
            "w1_2core_scaling": scaling,
            "floor_2thread_scaling": floor_scaling,
            "w1_scaling_vs_floor_scaling": scaling / floor_scaling,
            "latency_offered_events_s": lat.offered,
            "latency_achieved_events_s": lat.achieved,
            "latency_samples": lat.samples,
            "w1_p50_us": lat.p50_us,
            "w1_p99_us": lat.p99_us,
            "w1_p999_us": lat.p999_us,
            "w1_p99_us_50pct": lat.p99_us,
            "w1_p999_us_50pct": lat.p999_us,
            "w1_cpu_ns_per_event": w1_cpu_ns,
            "w2_cpu_ns_per_event": w2.one_cpu_ns,
            "w1_max_us": lat.max_us,
            "latency_25pct_offered_events_s": lat_quarter.offered,
            "w1_p50_us_25pct": lat_quarter.p50_us,
            "w1_p99_us_25pct": lat_quarter.p99_us,
            "w1_p999_us_25pct": lat_quarter.p999_us,
            "w2_events_s_1core": w2.one,
            "w2_events_s_2core": w2.two,
            "w2_floor_events_s_1thread": w2.floor_1,
            "w2_floor_events_s_2thread": w2.floor_2,
            "w2_vs_floor_ratio": w2.one / w2.floor_1,
            "w2_scaling_vs_floor_scaling": (w2.two / w2.one) / (w2.floor_2 / w2.floor_1),
            "w2_1m_keys_events_s_1core": w2.million,
            "w2_1m_vs_10k_ratio": w2.million / w2.one,
            "recovery_records_s": w2.recovery_records_s,
            "reopen_1m_keys_s": w2.reopen_s,
        });
        let mut out = out;
        // The worker behind the latency figures (a second object: one `json!` this large
        // passes the macro's recursion limit).
        let live = serde_json::json!({
            "w1_live_cpu_ns_per_event_50pct": lat.worker_cpu_ns_per_event,
            "w1_live_cpu_ns_per_event_25pct": lat_quarter.worker_cpu_ns_per_event,
            "w1_live_worker_busy_50pct": lat.worker_busy,
            "w1_live_worker_busy_25pct": lat_quarter.worker_busy,
            "latency_generator_max_gap_us_50pct": lat.generator_max_gap_us,
            "latency_generator_max_gap_us_25pct": lat_quarter.generator_max_gap_us,
            "latency_worker_spin_us": args.spin_us,
            "machine_max_stall_us": machine_max_stall_us,
            "machine_stalls_over_1ms_per_s": machine_stalls_over_1ms_per_s,
            "w1_p50_us_25pct_no_spin": lat_quarter_no_spin.p50_us,
            "w1_p99_us_25pct_no_spin": lat_quarter_no_spin.p99_us,
            "w1_p999_us_25pct_no_spin": lat_quarter_no_spin.p999_us,
            "w1_live_cpu_ns_per_event_25pct_no_spin": lat_quarter_no_spin.worker_cpu_ns_per_event,
            "w1_live_worker_busy_25pct_no_spin": lat_quarter_no_spin.worker_busy,
        });
        if let (Some(o), serde_json::Value::Object(live)) = (out.as_object_mut(), live) {
            o.extend(live);
        }
        if let (Some(o), serde_json::Value::Object(w4)) = (out.as_object_mut(), w4_json(&w2)) {
            o.extend(w4);
        }
        if let (Some(o), serde_json::Value::Object(w3)) = (out.as_object_mut(), w3_json(&w2.w3, w2.one, w2.one_cpu_ns))
        {
            o.extend(w3);
        }
        if let (Some(o), serde_json::Value::Object(c)) = (out.as_object_mut(), codec_json(&codec)) {
            o.extend(c);
        }
        println!("{out}");
    } else {
        println!("W1 stateless (decode JSON order ~{avg_bytes:.0} B, filter, map, forward), {n} orders on local://");
        println!("| | figure | vs | ratio (target) |");
        println!("|---|---|---|---|");
        println!("| W1 1 core | {:.0} events/s | floor 1 thread {floor_1:.0} | {ratio:.2} (≥ 0.8) |", w1_1.events_s);
        println!(
            "| W1 2 cores | {:.0} events/s | floor 2 threads {floor_2:.0} | scaling {scaling:.2} vs floor's {floor_scaling:.2} = {:.2} (≥ 0.9) |",
            w1_2.events_s,
            scaling / floor_scaling
        );
        println!("| W1 1 core, CPU per event | {w1_cpu_ns:.0} ns of the worker thread | | |");
        println!("| peak RSS | {:.0} MB (1 core), {:.0} MB (2 cores) | | |", w1_1.peak_rss_mb, w1_2.peak_rss_mb);
        println!(
            "| latency at {:.0} events/s (50 %), spin | p50 {:.0} µs, p99 {:.0} µs, p999 {:.0} µs, max {:.0} µs | | p99 ≤ 200 µs |",
            lat.offered, lat.p50_us, lat.p99_us, lat.p999_us, lat.max_us
        );
        println!(
            "| latency at {:.0} events/s (25 %), spin | p50 {:.0} µs, p99 {:.0} µs, p999 {:.0} µs, max {:.0} µs | | |",
            lat_quarter.offered, lat_quarter.p50_us, lat_quarter.p99_us, lat_quarter.p999_us, lat_quarter.max_us
        );
        println!(
            "| latency at {:.0} events/s (25 %), no spin | p50 {:.0} µs, p99 {:.0} µs, p999 {:.0} µs, max {:.0} µs | | |",
            lat_quarter_no_spin.offered,
            lat_quarter_no_spin.p50_us,
            lat_quarter_no_spin.p99_us,
            lat_quarter_no_spin.p999_us,
            lat_quarter_no_spin.max_us
        );
        println!(
            "| the machine's own stalls | longest {machine_max_stall_us:.0} µs | | {machine_stalls_over_1ms_per_s:.1} over 1 ms per s and CPU |"
        );
        for (share, l) in [("50 %", &lat), ("25 %", &lat_quarter), ("25 %, no spin", &lat_quarter_no_spin)] {
            println!(
                "| live W1 at {share}: worker CPU per event | {:.0} ns (busy {:.2}) | pre-loaded W1 {w1_cpu_ns:.0} ns | generator's longest pause {:.0} µs |",
                l.worker_cpu_ns_per_event, l.worker_busy, l.generator_max_gap_us
            );
        }
        print_w2(&w2, n);
        print_w3(&w2.w3, w2.one, w2.one_cpu_ns);
        print_codec(&codec);
    }
}
