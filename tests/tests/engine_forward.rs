//! End to end on `local://`, with real worker processes (`src/bin/forwarder.rs`, topic `a`
//! forwarded to topic `b`):
//!
//! - A worker SIGKILLed at random points and restarted loses nothing (half of the workers
//!   await each send, half buffer them with `send_soon`): every event of `a` is in
//!   `b`, in partition order. The guarantee is at-least-once, and the duplicates are bounded
//!   exactly: after a restart a partition resumes at the offset committed when the previous
//!   worker died, so the only repeats are that worker's uncommitted tail. The test reads the
//!   committed offsets after every kill and checks that each rewind in `b` starts at one.
//! - A second worker on the same data directory is refused with a clear message.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faust_storage::{Log, LogConfig};
use rand::{Rng, SeedableRng};

const PARTITIONS: u32 = 4;

fn forwarder(datadir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_forwarder"));
    cmd.arg(datadir).args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

fn run_to_end(datadir: &Path, args: &[&str], limit: Duration) {
    let mut child = forwarder(datadir, args).spawn().expect("start forwarder");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "forwarder {args:?} failed: {status}");
            return;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("forwarder {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The values of `topic`, per partition, in offset order.
fn read_topic(datadir: &Path, topic: &str) -> Vec<Vec<u64>> {
    (0..PARTITIONS)
        .map(|p| {
            let dir = datadir.join("topics").join(topic).join(p.to_string());
            let log = Log::open(&dir, LogConfig::default()).expect("open partition log");
            let mut values = Vec::new();
            let mut next = log.earliest_offset();
            while next < log.high_watermark() {
                for batch in log.read(next, 1 << 20).expect("read") {
                    for r in batch.records_from(next) {
                        let v: u64 = serde_json::from_slice(r.value.as_deref().expect("value")).expect("json");
                        values.push(v);
                    }
                    next = batch.last_offset() + 1;
                }
            }
            values
        })
        .collect()
}

/// Committed offsets of `a`, per partition (0 when nothing was committed yet).
fn committed(datadir: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(datadir.join("topics/.groups/forwarder.offsets")).unwrap_or_default();
    let mut out = vec![0; PARTITIONS as usize];
    for line in text.lines() {
        let parts: Vec<&str> = line.split('\t').collect();
        if let [topic, p, o] = parts[..]
            && topic == "a"
        {
            out[p.parse::<usize>().unwrap()] = o.parse().unwrap();
        }
    }
    out
}

#[test]
fn a_forwarding_worker_killed_at_random_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let datadir = dir.path().join("data");
    let n = 200_000u64;
    run_to_end(&datadir, &["produce", &n.to_string()], Duration::from_secs(60));

    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut committed_at_kill: Vec<HashSet<u64>> = vec![HashSet::from([0]); PARTITIONS as usize];
    let kills = 8;
    let mut kills_mid_stream = 0;
    let mut kills_after_commit = 0;
    for k in 0..kills {
        let before = committed(&datadir);
        // Kills 0,1 await sends, 2,3 buffer them, and so on: both kinds are killed early and
        // after a commit.
        let args: &[&str] = if (k / 2) % 2 == 0 { &["forward"] } else { &["forward", "soon"] };
        let mut child = forwarder(&datadir, args).spawn().unwrap();
        if k % 2 == 0 {
            // Early, at a random point: maybe before the first commit.
            std::thread::sleep(Duration::from_millis(rng.gen_range(30..400)));
        } else {
            // A random time after this worker's first commit, so the restart must resume from
            // offsets this very worker committed.
            let deadline = Instant::now() + Duration::from_secs(10);
            while committed(&datadir) == before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            kills_after_commit += usize::from(committed(&datadir) != before);
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
        }
        // SIGKILL: no chance to commit or flush anything.
        child.kill().unwrap();
        child.wait().unwrap();
        let offsets = committed(&datadir);
        let forwarded: usize = read_topic(&datadir, "b").iter().map(Vec::len).sum();
        eprintln!("killed: b holds {forwarded} events, committed offsets of a {offsets:?}");
        for (p, o) in offsets.into_iter().enumerate() {
            committed_at_kill[p].insert(o);
        }
        kills_mid_stream += usize::from(forwarded > 0 && (forwarded as u64) < n);
    }
    assert!(kills_mid_stream >= 2, "only {kills_mid_stream} kills landed while events were flowing");
    assert!(kills_after_commit >= 2, "only {kills_after_commit} workers committed before they were killed");
    run_to_end(&datadir, &["drain", "soon"], Duration::from_secs(120));

    let a = read_topic(&datadir, "a");
    let b = read_topic(&datadir, "b");
    assert_eq!(a.iter().map(Vec::len).sum::<usize>() as u64, n);
    let mut duplicates = 0;
    for p in 0..PARTITIONS as usize {
        // Keys keep their partition from a to b (same count, same partitioner).
        let position: HashMap<u64, usize> = a[p].iter().enumerate().map(|(i, v)| (*v, i)).collect();
        let seen: HashSet<u64> = b[p].iter().copied().collect();
        let missing: Vec<_> = a[p].iter().filter(|v| !seen.contains(v)).take(5).collect();
        assert!(missing.is_empty(), "partition {p}: events of a missing from b, e.g. {missing:?}");
        let mut expected_next = 0usize;
        for v in &b[p] {
            let pos = *position.get(v).unwrap_or_else(|| panic!("partition {p}: {v} is not in a's partition"));
            if pos != expected_next {
                assert!(pos < expected_next, "partition {p}: skipped from a-offset {expected_next} to {pos}");
                assert!(
                    committed_at_kill[p].contains(&(pos as u64)),
                    "partition {p}: rewound to a-offset {pos}, which was not committed when a worker died \
                     (committed then: {:?})",
                    committed_at_kill[p]
                );
                duplicates += expected_next - pos;
            }
            expected_next = pos + 1;
        }
        assert_eq!(expected_next, a[p].len(), "partition {p}: b does not reach the end of a");
    }
    eprintln!("{n} events, {kills} kills, {duplicates} duplicates (uncommitted tails replayed)");
}

#[test]
fn a_second_worker_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let datadir = dir.path().join("data");
    run_to_end(&datadir, &["produce", "10"], Duration::from_secs(60));
    let mut first = forwarder(&datadir, &["forward"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let second = forwarder(&datadir, &["forward"]).output().unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!second.status.success(), "the second worker started");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("in use by another worker") && stderr.contains(&first.id().to_string()),
        "unclear error: {stderr}"
    );
}
