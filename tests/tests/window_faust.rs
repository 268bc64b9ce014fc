//! Our windows against Faust's own: `tests/faust/window_ranges.json` holds what
//! faust-streaming's `faust/windows.py` gives for a table of timestamps (tumbling 10 s,
//! hopping 60 s / 10 s, sliding 5 s / 5 s, window edges included). When `FAUST_TEST_PYTHON`
//! names a Python with faust-streaming installed (`scripts/test` makes one), the table is
//! produced again by real Faust first, so a Faust release that moved a window fails here.
//!
//! The one difference is notation: Faust writes a hopping or tumbling window's end as
//! `start + size - 0.1` s, inclusive; ours is `start + size`, exclusive — the same instants.
//! A sliding window's end is `t + after` in both.

use std::time::Duration;

use faust::{WindowRange, Windowing};
use serde_json::Value;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/faust/window_ranges.json");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/faust/window_ranges.py");

fn windowing(name: &str) -> Windowing {
    match name {
        "tumbling 10s" => Windowing::tumbling(Duration::from_secs(10)),
        "hopping 60s/10s" => Windowing::hopping(Duration::from_secs(60), Duration::from_secs(10)),
        "sliding 5s/5s" => Windowing::sliding(Duration::from_secs(5), Duration::from_secs(5)),
        other => panic!("the fixture names a window this test does not know: {other}"),
    }
}

/// Faust's `(start, end)` in ms as ours: hopping and tumbling ends move from inclusive
/// (`- 100 ms`) to exclusive.
fn from_faust(name: &str, pair: &Value) -> WindowRange {
    let start = pair[0].as_i64().expect("start");
    let end = pair[1].as_i64().expect("end");
    if name.starts_with("sliding") { WindowRange::new(start, end) } else { WindowRange::new(start, end + 100) }
}

fn check(table: &Value) -> usize {
    let rows = table["rows"].as_array().expect("rows");
    for row in rows {
        let name = row["window"].as_str().expect("window");
        let t = row["timestamp_ms"].as_i64().expect("timestamp");
        let w = windowing(name);
        let faust: Vec<WindowRange> =
            row["ranges"].as_array().expect("ranges").iter().map(|p| from_faust(name, p)).collect();
        assert_eq!(w.ranges(t), faust, "{name} at {t} ms: our windows, then Faust's");
        assert_eq!(w.current(t), from_faust(name, &row["current"]), "{name} at {t} ms: current");
        assert_eq!(w.delta(t, Duration::from_secs(10)), from_faust(name, &row["delta_10s"]), "{name} at {t} ms: delta");
    }
    rows.len()
}

#[test]
fn our_windows_are_fausts_windows() {
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(FIXTURE).expect("fixture")).expect("json");
    let rows = check(&fixture);
    assert!(rows >= 60, "the fixture has {rows} rows");
    match std::env::var("FAUST_TEST_PYTHON") {
        Ok(python) if !python.is_empty() => {
            let out = std::process::Command::new(&python).arg(SCRIPT).output().expect("run Faust's windows");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let live: Value = serde_json::from_slice(&out.stdout).expect("Faust's output is JSON");
            assert_eq!(
                live["rows"], fixture["rows"],
                "Faust {} places windows differently from the fixture",
                live["faust"]
            );
            check(&live);
        }
        _ => eprintln!("FAUST_TEST_PYTHON unset: checked against the committed table of Faust's windows only"),
    }
}
