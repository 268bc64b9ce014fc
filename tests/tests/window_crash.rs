//! Crash tests for windowed tables: a worker counting in tumbling 1 s windows (`windows`) is
//! aborted at random steps of its commit protocol and of its recovery, and SIGKILLed at
//! random moments, then restarted; when a run finally completes:
//!
//! - every window that closed sent its final count to `finals` with exactly the events of
//!   the window — once, or again with the same count after a crash (close callbacks are
//!   at-least-once across crashes), never with another count (a window is never reopened);
//! - every window that closed is there, none is forgotten; no open window sent one;
//! - the windows still live in the table hold exactly their events' counts, and each
//!   partition's stream time is its last event's time (it survived every restart).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const CRASH_POINTS: [&str; 7] = [
    "commit:frozen",
    "commit:changelog-batch",
    "commit:changelog",
    "commit:flushed",
    "commit:committed",
    "recover:replayed",
    "recover:neutralizing",
];
const EVENTS: u64 = 200_000;
const KEYS: u64 = 5;

fn windows(datadir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_windows"));
    cmd.arg(datadir).args(args).stdout(Stdio::null()).stderr(Stdio::null()).env_remove("FAUST_CRASH_AT");
    cmd
}

/// Event i: key k{i % KEYS} at i × 10 ms; the last (index EVENTS) on k0. Per (key, window
/// start): its count.
fn model() -> BTreeMap<(String, i64), u64> {
    let mut m = BTreeMap::new();
    let mut add = |key: String, t: i64| *m.entry((key, t.div_euclid(1000) * 1000)).or_default() += 1;
    for i in 0..EVENTS {
        add(format!("k{}", i % KEYS), i as i64 * 10);
    }
    add("k0".into(), EVENTS as i64 * 10);
    m
}

#[test]
fn windows_close_exactly_in_state_and_at_least_once_outside_across_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("state.json");
    let (n, keys, out_s) = (EVENTS.to_string(), KEYS.to_string(), out.to_str().unwrap().to_string());
    assert!(windows(&data, &["load", &n, &keys]).status().unwrap().success(), "load");
    let run = || windows(&data, &["run", &n, &keys, &out_s]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut points = CRASH_POINTS.to_vec();
    points.shuffle(&mut rng);
    let mut crashed = 0;
    for point in &points {
        // A SIGKILL at a random moment early in the run (each run takes a part of the work)...
        let mut child = run().spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(40..160)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            crashed += 1;
        }
        child.wait().unwrap();
        // ...and a crash at a step of the protocol.
        let status = run().env("FAUST_CRASH_AT", format!("{point}:{}", rng.gen_range(1..3))).status().unwrap();
        crashed += usize::from(!status.success());
    }
    let _ = std::fs::remove_file(&out);
    assert!(run().status().unwrap().success(), "the final run");
    assert!(crashed >= 7, "only {crashed} runs crashed");

    let model = model();
    let state: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    // Stream time: each partition's last event.
    let mut stream_time: BTreeMap<u64, i64> = BTreeMap::new();
    for pt in state["stream_time"].as_array().unwrap() {
        stream_time.insert(pt[0].as_u64().unwrap(), pt[1].as_i64().unwrap());
    }
    // The live windows, with the partition each key is on.
    let mut partition_of: BTreeMap<String, u64> = BTreeMap::new();
    for w in state["windows"].as_array().unwrap() {
        let (p, key, start, end, count) = (
            w[0].as_u64().unwrap(),
            w[1].as_str().unwrap().to_string(),
            w[2].as_i64().unwrap(),
            w[3].as_i64().unwrap(),
            w[4].as_u64().unwrap(),
        );
        assert_eq!(end - start, 1000);
        assert_eq!(Some(&count), model.get(&(key.clone(), start)), "live window {key} [{start}, {end})");
        partition_of.insert(key, p);
    }
    assert_eq!(partition_of.len() as u64, KEYS, "every key has live windows: {partition_of:?}");
    let last_time = |key: &str| model.keys().filter(|(k, _)| k == key).map(|(_, s)| *s).max().unwrap();
    for (key, p) in &partition_of {
        let keys_here: Vec<&String> = partition_of.iter().filter(|(_, q)| *q == p).map(|(k, _)| k).collect();
        let latest = keys_here.iter().map(|k| last_time(k)).max().unwrap();
        assert!(stream_time[p] >= latest, "partition {p} (key {key}): stream time {} < {latest}", stream_time[p]);
    }
    // The final results.
    let mut finals: BTreeMap<(String, i64), BTreeSet<u64>> = BTreeMap::new();
    let mut sent = 0;
    for r in faust_tests::topic_records(&data, "finals") {
        // Keys are `raw` (the default key serializer).
        let key = String::from_utf8(r.key.as_deref().unwrap().to_vec()).unwrap();
        let result: Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        let (start, end) = (result["start"].as_i64().unwrap(), result["end"].as_i64().unwrap());
        assert_eq!(end - start, 1000);
        finals.entry((key, start)).or_default().insert(result["value"].as_u64().unwrap());
        sent += 1;
    }
    let mut closed_windows = 0;
    for ((key, start), counts) in &model {
        let closed = start + 1000 <= stream_time[&partition_of[key]];
        closed_windows += usize::from(closed);
        match finals.get(&(key.clone(), *start)) {
            Some(sent) if closed => assert_eq!(sent, &BTreeSet::from([*counts]), "window {key} [{start}, +1 s)"),
            None if closed => panic!("window {key} [{start}, +1 s) closed without a final result"),
            Some(sent) => panic!("open window {key} [{start}, +1 s) sent {sent:?}"),
            None => {}
        }
    }
    assert_eq!(finals.len(), closed_windows);
    assert!(closed_windows >= model.len() - KEYS as usize, "all but the last windows closed");
    eprintln!("{crashed} crashes; {sent} final results for {} windows", finals.len());
}
