//! Bounded disk on the default transport: an update-heavy workload (20,000 events a second
//! over 5,000 keys, two minutes) on `local://` with 256 KiB segments. The topic is kept to its
//! `retention.bytes`, the table's changelog is compacted below its committed offsets and its
//! stores compact their superseded records, all in the worker's upkeep: disk use levels off
//! while hundreds of megabytes go through, and every event is counted exactly.

use std::process::Command;

const SOAK: &str = env!("CARGO_BIN_EXE_soak");
const SECONDS: u64 = 120;
const RATE: u64 = 20_000;
const MIB: u64 = 1 << 20;

#[test]
fn disk_use_levels_off_under_an_update_heavy_workload() {
    soak(SECONDS, false);
}

/// The same with the count in tumbling 1 s windows that expire 2 s after they close: windows
/// open, close and leave the store and the changelog (tombstones, then compaction) all the
/// time, and disk use levels off just the same.
#[test]
fn disk_use_levels_off_with_expiring_windows() {
    soak(SECONDS / 2, true);
}

/// One soak at a time: each measures how the worker's upkeep keeps disk use down, and two at
/// once on this 2-core machine starve each other's upkeep (the windowed one's changelog then
/// grew past its bound in one full run).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn soak(seconds: u64, windowed: bool) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("soak.json");
    let mut soak = Command::new(SOAK);
    soak.arg(dir.path().join("data"))
        .args([seconds.to_string(), RATE.to_string(), "5000".to_string()])
        .arg(&out)
        .env("SEGMENT_BYTES", (256 << 10).to_string())
        .env("RUST_LOG", "warn");
    if windowed {
        soak.env("SOAK_WINDOWED", "1");
    }
    let status = soak.status().expect("run the soak worker");
    assert!(status.success(), "the soak worker failed: {status}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("the soak report")).expect("JSON");
    let (sent, counted) = (report["sent"].as_u64().unwrap_or(0), report["counted"].as_u64().unwrap_or(0));
    assert_eq!(counted, sent, "every event is counted exactly once");
    assert!(sent > RATE * seconds * 9 / 10, "only {sent} events were sent");
    let samples = report["samples"].as_array().expect("samples");
    assert!(samples.len() as u64 >= seconds, "{} samples", samples.len());
    let series = |name: &str| -> Vec<u64> { samples.iter().map(|s| s[name].as_u64().unwrap_or(0)).collect() };
    // The values alone put this much into the topic (keys, headers and framing come on top).
    let written = sent * 100;
    for (name, cap) in [("topic", 16 * MIB), ("changelog", 16 * MIB), ("tables", 16 * MIB)] {
        let sizes = series(name);
        let third = sizes.len() / 3;
        let middle = sizes[third..2 * third].iter().copied().max().unwrap_or(0);
        let last = sizes[2 * third..].iter().copied().max().unwrap_or(0);
        eprintln!("{name}: max {} KiB in the middle third, {} KiB in the last", middle >> 10, last >> 10);
        assert!(last <= middle + middle / 4 + MIB, "{name} keeps growing: {sizes:?}");
        assert!(last <= cap, "{name} holds {last} bytes (cap {cap}): {sizes:?}");
    }
    let total = series("topic").last().copied().unwrap_or(0)
        + series("changelog").last().copied().unwrap_or(0)
        + series("tables").last().copied().unwrap_or(0);
    // Windows hold more live state per key (about three live windows, and 5 s of tombstones),
    // in a run half as long.
    let share = if windowed { 5 } else { 10 };
    assert!(total < written / share, "{total} bytes on disk after {written} bytes of values went through");
}
