//! Crash tests for tables: a counting worker (`counter`, two tables) is aborted at random
//! steps of its commit protocol and of its recovery, restarted, aborted again... and when a
//! run finally completes, both tables equal the model computed from the input — exactly,
//! although the input is consumed at least once: each table state is committed together
//! with the source offsets it corresponds to.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// The steps a worker can die at (`FAUST_CRASH_AT`), in the order the protocol passes them.
const CRASH_POINTS: [&str; 8] = [
    "commit:frozen",
    "commit:changelog-batch",
    "commit:changelog",
    "commit:flushed",
    "commit:committed",
    "commit:checkpoint",
    "recover:replayed",
    "recover:neutralizing",
];

const EVENTS: u64 = 20_000;

fn counter(datadir: &Path, args: &[&str], crash: Option<String>) -> std::process::ExitStatus {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_counter"));
    cmd.arg(datadir).args(args).stdout(Stdio::null()).stderr(Stdio::null());
    cmd.env_remove("FAUST_CRASH_AT");
    if let Some(c) = crash {
        cmd.env("FAUST_CRASH_AT", c);
    }
    cmd.status().expect("run the counter")
}

/// What the tables must hold: the `load` mode's events, replayed with the same seed.
fn model(seed: u64) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut counts, mut sums) = (BTreeMap::<String, u64>::new(), BTreeMap::<String, u64>::new());
    for i in 0..EVENTS {
        let key = format!("acct-{}", rng.gen_range(0..50));
        *counts.entry(key.clone()).or_default() += 1;
        *sums.entry(key).or_default() += i;
    }
    *counts.entry("acct-0".into()).or_default() += 1;
    *sums.entry("acct-0".into()).or_default() += EVENTS;
    BTreeMap::from([("counts".to_string(), counts), ("sums".to_string(), sums)])
}

#[test]
fn tables_are_exact_after_crashes_at_every_step_of_commit_and_recovery() {
    for seed in 1..=3u64 {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let out = dir.path().join("dump.json");
        let n = EVENTS.to_string();
        assert!(counter(&data, &["load", &n, &seed.to_string()], None).success(), "load (seed {seed})");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 7919);
        let mut points = CRASH_POINTS.to_vec();
        points.shuffle(&mut rng);
        let mut crashed = 0;
        for point in points {
            let spec = format!("{point}:{}", rng.gen_range(1..6));
            let status = counter(&data, &["count", &n, out.to_str().unwrap()], Some(spec.clone()));
            if !status.success() {
                crashed += 1;
            }
        }
        let _ = std::fs::remove_file(&out);
        assert!(counter(&data, &["count", &n, out.to_str().unwrap()], None).success(), "final run (seed {seed})");
        let dump: BTreeMap<String, BTreeMap<String, u64>> =
            serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert!(crashed >= 4, "seed {seed}: only {crashed} runs crashed; the crash points are not reached");
        assert_eq!(dump, model(seed), "seed {seed}: tables differ from the model after {crashed} crashes");
    }
}
