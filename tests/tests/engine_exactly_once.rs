//! Exactly-once on `local://` (`processing_guarantee = exactly_once`), with real worker
//! processes (`src/bin/eos.rs`: topic `in` forwarded to `out`, and `out` counted per key in
//! a table by the same app). The worker is aborted at every step of its commit protocol and
//! of its recovery, and SIGKILLed at random moments, many times over, the runs awaiting each
//! send, buffering them, or holding events unacked after their send; when a run finally
//! completes:
//!
//! - every event of `in` appears in `out` exactly once among the records readers can see,
//!   although the log holds more (the outputs of crashed runs, which no reader sees);
//! - the counting agent, which reads `out` like any downstream consumer, counted each output
//!   exactly once: its tables equal the model.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faust_transport::{CoreTransport, LocalTransport, TopicPartition, Transport};
use rand::{Rng, SeedableRng};

use faust_tests::tally::CRASH_POINTS;
/// Events added before each run, so that every run has work to crash in.
const EVENTS_PER_RUN: u64 = 10_000;
const KEYS: u64 = 16;

fn eos(datadir: &Path, args: &[&str], crash: Option<String>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_eos"));
    cmd.arg(datadir).args(args).stdout(Stdio::null()).stderr(Stdio::null());
    cmd.env_remove("FAUST_CRASH_AT").env_remove("PROCESSING_GUARANTEE");
    if let Some(c) = crash {
        cmd.env("FAUST_CRASH_AT", c);
    }
    cmd
}

/// Every record of `topic` a reader may see, and how many the log holds, per partition in
/// offset order: read through the transport, as the worker's own consumers read.
fn visible(datadir: &Path, topic: &'static str) -> (Vec<u64>, u64) {
    let transport = LocalTransport::open(datadir.join("topics"), 1).expect("open the topics");
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let core = transport.attach_core(0, 1).await.expect("attach");
            let (mut values, mut raw) = (Vec::new(), 0);
            for p in 0..4 {
                let tp = TopicPartition::new(topic, p);
                let end = core.list_offset(&tp, faust_transport::OffsetSpec::Latest).await.expect("end");
                raw += end;
                let mut next = 0;
                while next < end {
                    let fetched = core.fetch(&tp, next, 1 << 20, Duration::ZERO).await.expect("fetch");
                    for r in &fetched.records {
                        values.push(serde_json::from_slice::<u64>(r.value.as_deref().expect("a value")).expect("json"));
                    }
                    assert!(fetched.next_offset > next, "{tp}: the read is stuck at {next} (an open transaction?)");
                    next = fetched.next_offset;
                }
            }
            transport.close();
            (values, raw)
        })
        .expect("executor")
        .join()
        .expect("join")
}

fn model(events: u64) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for i in 0..events {
        let key = format!("k{}", i % KEYS);
        *out.entry("counts".into()).or_default().entry(key.clone()).or_default() += 1;
        *out.entry("sums".into()).or_default().entry(key).or_default() += i;
    }
    out
}

#[test]
fn outputs_are_seen_exactly_once_across_crashes_at_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut events = 0;
    let load = |events: &mut u64| {
        let (from, to) = (*events, *events + EVENTS_PER_RUN);
        let status = eos(&data, &["load", &from.to_string(), &to.to_string()], None).status().expect("load");
        assert!(status.success(), "load: {status}");
        *events = to;
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let out = dir.path().join("out.json");
    let (mut crashed, mut kills) = (0, 0);
    for (round, point) in CRASH_POINTS.iter().cycle().take(CRASH_POINTS.len() * 3).enumerate() {
        let soon = ["soon", "await", "slow"][round % 3];
        let crash = format!("{point}:{}", rng.gen_range(1..4));
        load(&mut events);
        let total = events.to_string();
        let args = ["run", &total, out.to_str().unwrap(), soon];
        let status = eos(&data, &args, Some(crash.clone())).status().expect("run");
        if !status.success() {
            crashed += 1;
        }
        eprintln!("round {round}: {crash} ({soon}): {status}");
        // And a SIGKILL at a random moment.
        load(&mut events);
        let total = events.to_string();
        let args = ["run", &total, out.to_str().unwrap(), soon];
        let mut child = eos(&data, &args, None).spawn().expect("run");
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..600)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    assert!(crashed >= CRASH_POINTS.len(), "most runs reached their crash point ({crashed})");

    let started = Instant::now();
    let total = events.to_string();
    let args = ["run", &total, out.to_str().unwrap(), "soon"];
    let status = eos(&data, &args, None).status().expect("the last run");
    assert!(status.success(), "the last run: {status}");
    eprintln!("{crashed} crashes and {kills} kills; the last run took {:?}", started.elapsed());

    let tables: BTreeMap<String, BTreeMap<String, u64>> =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(tables, model(events), "the downstream counts saw each output exactly once");

    let (mut values, raw) = visible(&data, "out");
    values.sort_unstable();
    assert_eq!(values, (0..events).collect::<Vec<_>>(), "every input once among the visible outputs");
    assert!(raw > events, "the crashed runs left outputs in the log ({raw} records) that no reader sees");
    eprintln!("`out` holds {raw} records, {events} of them visible");
}

#[test]
fn exactly_once_is_refused_where_it_is_not_built() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_eos"))
        .arg(dir.path())
        .args(["run", "1", "/dev/null"])
        .env("BROKER_URL", "memory://")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run");
    assert!(!status.status.success());
    let text = String::from_utf8_lossy(&status.stderr);
    assert!(text.contains("exactly_once") && text.contains("local://"), "{text}");
}
