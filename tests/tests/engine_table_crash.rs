//! Crash tests for tables: a counting worker (`counter`, two tables) is aborted at random
//! steps of its commit protocol and of its recovery, restarted, aborted again... and when a
//! run finally completes, both tables equal the model computed from the input — exactly,
//! although the input is consumed at least once: each table state is committed together
//! with the source offsets it corresponds to. Two of the three runs use 4 KiB segments, so
//! that the worker's upkeep compacts changelogs and stores between (and during) the crashes.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use faust_tests::tally::CRASH_POINTS;

/// Events per run; the runs with small segments take more, so that their changelogs and
/// stores fill enough segments for the upkeep to compact them between crashes.
const EVENTS: u64 = 20_000;
const EVENTS_SMALL_SEGMENTS: u64 = 150_000;

fn counter(datadir: &Path, args: &[&str], crash: Option<String>, small_segments: bool) -> std::process::ExitStatus {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_counter"));
    cmd.arg(datadir).args(args).stdout(Stdio::null()).stderr(Stdio::null());
    cmd.env_remove("FAUST_CRASH_AT");
    // 4 KiB segments: the upkeep compacts the changelogs and stores between the crashes.
    match small_segments {
        true => cmd.env("SEGMENT_BYTES", "4096"),
        false => cmd.env_remove("SEGMENT_BYTES"),
    };
    if let Some(c) = crash {
        cmd.env("FAUST_CRASH_AT", c);
    }
    cmd.status().expect("run the counter")
}

/// What the tables must hold: the `load` mode's events, replayed with the same seed.
fn model(seed: u64, events: u64, keys: u64) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut counts, mut sums) = (BTreeMap::<String, u64>::new(), BTreeMap::<String, u64>::new());
    for i in 0..events {
        let key = format!("acct-{}", rng.gen_range(0..keys));
        *counts.entry(key.clone()).or_default() += 1;
        *sums.entry(key).or_default() += i;
    }
    *counts.entry("acct-0".into()).or_default() += 1;
    *sums.entry("acct-0".into()).or_default() += events;
    BTreeMap::from([("counts".to_string(), counts), ("sums".to_string(), sums)])
}

#[test]
fn tables_are_exact_after_crashes_at_every_step_of_commit_and_recovery() {
    for seed in 1..=3u64 {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let out = dir.path().join("dump.json");
        let small = seed > 1;
        // Many keys with small segments: every commit then fills segments of changelog.
        let (events, keys) = if small { (EVENTS_SMALL_SEGMENTS, 5_000) } else { (EVENTS, 50) };
        let n = events.to_string();
        assert!(
            counter(&data, &["load", &n, &seed.to_string(), &keys.to_string()], None, small).success(),
            "load (seed {seed})"
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 7919);
        let mut points = CRASH_POINTS.to_vec();
        points.shuffle(&mut rng);
        let mut crashed = 0;
        for point in points {
            // With small segments, early crashes: each run does a part of the (larger) work,
            // with the upkeep compacting as it goes.
            let nth = if small { rng.gen_range(1..4) } else { rng.gen_range(1..6) };
            let spec = format!("{point}:{nth}");
            let status = counter(&data, &["count", &n, out.to_str().unwrap()], Some(spec.clone()), small);
            if !status.success() {
                crashed += 1;
            }
        }
        let _ = std::fs::remove_file(&out);
        assert!(
            counter(&data, &["count", &n, out.to_str().unwrap()], None, small).success(),
            "final run (seed {seed})"
        );
        let dump: BTreeMap<String, BTreeMap<String, u64>> =
            serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert!(crashed >= 4, "seed {seed}: only {crashed} runs crashed; the crash points are not reached");
        assert_eq!(
            dump,
            model(seed, events, keys),
            "seed {seed}: tables differ from the model after {crashed} crashes"
        );
    }
}
