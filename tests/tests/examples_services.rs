//! The `word_count` and `rpc` examples, run as a user runs them (`-- worker`), for a few
//! seconds: word_count's crontab prints its report every five seconds with growing counts;
//! rpc's client prints the squares its questions got back, single and joined.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `bin worker` in a data directory of its own until `done` says its output is enough
/// (at most `within`), then stops it with SIGTERM; returns its output.
fn run_worker(bin: &str, within: Duration, done: impl Fn(&str) -> bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("stdout");
    let mut child = Command::new(bin)
        .arg("worker")
        .env("APP_DATADIR", dir.path().join("data"))
        .env("WEB_PORT", "0")
        .stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .expect("start the example");
    let start = Instant::now();
    let mut out = String::new();
    while start.elapsed() < within {
        std::thread::sleep(Duration::from_millis(200));
        out = std::fs::read_to_string(&out_path).unwrap_or_default();
        if done(&out) {
            break;
        }
    }
    // SAFETY: a plain kill(2) of our own child, by its pid; no memory is involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("the example stops");
    assert!(status.success(), "the example stops cleanly on SIGTERM: {status}");
    std::fs::read_to_string(&out_path).unwrap_or(out)
}

#[test]
fn word_count_reports_growing_counts_on_its_crontab() {
    let out = run_worker(env!("CARGO_BIN_EXE_word_count"), Duration::from_secs(30), |out| {
        out.lines().filter(|l| l.starts_with("top words:")).count() >= 2
    });
    let reports: Vec<&str> = out.lines().filter(|l| l.starts_with("top words:")).collect();
    assert!(reports.len() >= 2, "two reports within 30 s:\n{out}");
    let count_of_the = |line: &str| -> u64 {
        line.split_whitespace().find_map(|w| w.strip_prefix("the=")).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let (first, second) = (count_of_the(reports[0]), count_of_the(reports[1]));
    // "the" is the text's most frequent word: it leads, and it grows between reports.
    assert!(reports[1].starts_with("top words: the="), "{out}");
    assert!(second > first && first > 0, "growing counts: {first} then {second}\n{out}");
}

#[test]
fn rpc_prints_the_answers_to_its_questions() {
    let out = run_worker(env!("CARGO_BIN_EXE_rpc"), Duration::from_secs(30), |out| out.contains("squares of 5"));
    assert!(out.contains("1² = 1\n") && out.contains("3² = 9\n"), "{out}");
    assert!(out.contains("squares of 5, 6 and 7: [25, 36, 49]"), "{out}");
}
