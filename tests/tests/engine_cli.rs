//! The command line (`app.main()`) as users run it: the `hello` and `orders` examples as
//! processes, a worker in one and the other commands in others, talking through the control
//! socket in the data directory. Checks what they print (plain and `--json`) and their exit
//! codes: 0 done, 1 failed, 2 usage or bad input, 3 no worker running, 4 not found.
//!
//! Also the bad-record policies end to end: malformed JSON, an empty value and an oversized
//! record sent among good orders to the orders worker; the counts of the good orders must be
//! exact under every policy, the dead-letter topic must hold exactly the bad records, and a
//! worker stopped by a bad record must lose nothing after it.

use std::path::Path;
use std::time::Duration;

use faust_tests::cli::{Worker, cli, code, dump, eventually, json, order_lines, stderr, stdout};

const HELLO: &str = env!("CARGO_BIN_EXE_hello");
const ORDERS: &str = env!("CARGO_BIN_EXE_orders");

#[test]
fn hello_prints_what_send_sends() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    // Without a worker: listings from the declarations; a send writes the embedded log itself
    // (creating the declared topic as a worker would); commands that need a worker say so (3).
    let agents = cli(HELLO, &data, &["agents", "--json"], None);
    assert_eq!(code(&agents), 0, "{}", stderr(&agents));
    assert_eq!(json(&agents)[0]["agent"], "greet");
    assert_eq!(json(&agents)[0]["topic"], "greetings");
    let send = cli(HELLO, &data, &["send", "@greet", "hi"], None);
    assert_eq!(code(&send), 0, "{}", stderr(&send));
    assert!(stdout(&send).contains("sent 1 record to greetings"), "{}", stdout(&send));
    let stats = cli(HELLO, &data, &["stats"], None);
    assert_eq!(code(&stats), 3, "{}", stderr(&stats));
    assert!(stderr(&stats).contains("no worker is running"), "{}", stderr(&stats));
    let topics = cli(HELLO, &data, &["topics"], None);
    assert_eq!(code(&topics), 0);
    assert!(stdout(&topics).contains("greetings"), "{}", stdout(&topics));
    assert!(stderr(&topics).contains("no worker is running"), "{}", stderr(&topics));
    // Usage errors are clap's 2; help is 0.
    assert_eq!(code(&cli(HELLO, &data, &["send"], None)), 2);
    assert_eq!(code(&cli(HELLO, &data, &["no-such-command"], None)), 2);
    assert_eq!(code(&cli(HELLO, &data, &["--help"], None)), 0);
    let completions = cli(HELLO, &data, &["completions", "bash"], None);
    assert_eq!(code(&completions), 0);
    assert!(stdout(&completions).contains("hello"), "a bash completion script");

    let worker = Worker::start(HELLO, &data, &[]);
    let sent = cli(HELLO, &data, &["send", "@greet", "Hello Faust", "--json"], None);
    assert_eq!(code(&sent), 0, "{}", stderr(&sent));
    let sent = json(&sent);
    assert_eq!((sent["topic"].as_str(), sent["sent"].as_u64()), (Some("greetings"), Some(1)));
    assert!(sent["partition"].as_u64().is_some_and(|p| p < 4) && sent["offset"].is_u64(), "{sent}");
    // Values from stdin, each sent twice, to one partition.
    let piped =
        cli(HELLO, &data, &["send", "greetings", "--repeat", "2", "--partition", "3"], Some("one\ntwo\n\nthree\n"));
    assert_eq!(code(&piped), 0, "{}", stderr(&piped));
    assert_eq!(stdout(&piped).trim(), "sent 6 records to greetings");
    eventually("the worker prints every greeting", || {
        let out = worker.stdout();
        out.contains("Hello Faust")
            && out.lines().any(|l| l == "hi")
            && ["one", "two", "three"].iter().all(|g| out.matches(g).count() == 2)
    });
    // Bad requests: a partition out of range (2), an unknown topic or agent (4).
    let wrong = cli(HELLO, &data, &["send", "greetings", "x", "--partition", "9"], None);
    assert_eq!(code(&wrong), 2, "{}", stderr(&wrong));
    assert!(stderr(&wrong).contains("no partition 9"), "{}", stderr(&wrong));
    assert_eq!(code(&cli(HELLO, &data, &["send", "nope", "x"], None)), 4);
    assert_eq!(code(&cli(HELLO, &data, &["send", "@nobody", "x"], None)), 4);
    // With a worker, topics have record counts.
    let topics = json(&cli(HELLO, &data, &["topics", "--json"], None));
    let greetings = topics.as_array().unwrap().iter().find(|t| t["topic"] == "greetings").unwrap().clone();
    assert_eq!((greetings["partitions"].as_u64(), greetings["records"].as_u64()), (Some(4), Some(8)), "{topics}");
    // A reset under a running worker is refused.
    assert_eq!(code(&cli(HELLO, &data, &["reset", "--yes"], None)), 1);
    // The worker's counters.
    let stats = cli(HELLO, &data, &["stats", "--json"], None);
    assert_eq!(code(&stats), 0, "{}", stderr(&stats));
    // The 4 of `greetings`, and the app's leader topic's one.
    assert_eq!(json(&stats)["partitions_assigned"], 5, "{}", stdout(&stats));

    assert_eq!(worker.stop(), 0);
    // Without a worker, the CLI writes the embedded log itself (holding its lock), and takes
    // Faust's flag names: -V/--value-type for the value's codec, --loglevel, `completion`.
    let after = cli(HELLO, &data, &["send", "greetings", "late", "-V", "raw", "--loglevel", "warn"], None);
    assert_eq!(code(&after), 0, "a send needs no worker: {}", stderr(&after));
    assert!(stdout(&after).contains("sent 1 record to greetings"), "{}", stdout(&after));
    let topics = json(&cli(HELLO, &data, &["topics", "--json"], None));
    assert!(topics.to_string().contains("greetings"), "{topics}");
    let completion = cli(HELLO, &data, &["completion", "bash"], None);
    assert_eq!(code(&completion), 0, "{}", stderr(&completion));
    // The next worker processes what was sent meanwhile.
    let worker = Worker::start(HELLO, &data, &[]);
    eventually("the late greeting printed", || worker.stdout().lines().any(|l| l == "late"));
    assert_eq!(worker.stop(), 0);
}

#[test]
fn orders_are_sent_and_counted_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let worker = Worker::start(ORDERS, &data, &[]);
    let one = r#"{"account_id": "account-1", "product_id": "product-7", "amount": 2, "price": 9.5}"#;
    let sent = cli(ORDERS, &data, &["send", "orders", "--key", "order-1", one], None);
    assert_eq!(code(&sent), 0, "{}", stderr(&sent));
    assert!(stdout(&sent).starts_with("sent 1 record to orders (partition "), "{}", stdout(&sent));
    eventually("account-1 counted", || {
        stdout(&cli(ORDERS, &data, &["table", "get", "order_count", "account-1"], None)).trim() == "1"
    });
    let (lines, mut expected) = order_lines(500, 7, 0);
    let piped = cli(ORDERS, &data, &["send", "orders"], Some(&lines));
    assert_eq!(stdout(&piped).trim(), "sent 500 records to orders", "{}", stderr(&piped));
    *expected.entry("account-1".into()).or_insert(0) += 1;
    eventually("every order counted", || dump(ORDERS, &data) == expected);
    let get = json(&cli(ORDERS, &data, &["table", "get", "order_count", "account-3", "--json"], None));
    assert_eq!(get, serde_json::json!({ "table": "order_count", "key": "account-3", "value": expected["account-3"] }));
    // Not found (4), not valid JSON for the JSON topic (2), an unknown table (4).
    assert_eq!(code(&cli(ORDERS, &data, &["table", "get", "order_count", "account-99"], None)), 4);
    let bad = cli(ORDERS, &data, &["send", "orders", "{not json"], None);
    assert_eq!(code(&bad), 2);
    assert!(stderr(&bad).contains("not valid JSON"), "{}", stderr(&bad));
    assert_eq!(code(&cli(ORDERS, &data, &["table", "dump", "nope"], None)), 4);
    let tables = json(&cli(ORDERS, &data, &["tables", "--json"], None));
    assert!(
        tables
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["table"] == "order_count" && t["changelog"] == "orders-order_count-changelog")
    );
    assert_eq!(worker.stop(), 0);

    // Reset deletes the stores only with --yes (stdin is no terminal here); the counts come
    // back from the changelog at the next start.
    let refused = cli(ORDERS, &data, &["reset"], None);
    assert_eq!(code(&refused), 2, "{}", stderr(&refused));
    assert!(data.join("tables").exists());
    let reset = cli(ORDERS, &data, &["reset", "--yes"], None);
    assert_eq!(code(&reset), 0, "{}", stderr(&reset));
    assert!(!data.join("tables").exists());
    let worker = Worker::start(ORDERS, &data, &[]);
    eventually("the counts recovered from the changelog", || dump(ORDERS, &data) == expected);
    assert_eq!(worker.stop(), 0);
}

/// A record's value as the dead-letter topic keeps it.
fn dead_letters(datadir: &Path) -> Vec<(Vec<u8>, String)> {
    faust_tests::topic_records(datadir, "orders-dead-letter")
        .into_iter()
        .map(|r| {
            let error =
                r.headers().find(|(n, _)| *n == b"faust-error").and_then(|(_, v)| v).unwrap_or_default().to_vec();
            (r.value.map(|v| v.to_vec()).unwrap_or_default(), String::from_utf8_lossy(&error).into_owned())
        })
        .collect()
}

/// The bad records: malformed JSON, an empty value, one past `MAX_RECORD_BYTES` (512).
fn bad_records() -> [String; 3] {
    let oversized =
        format!(r#"{{"account_id": "account-0", "product_id": "{}", "amount": 1, "price": 1.0}}"#, "p".repeat(1000));
    ["{\"account_id\": ".to_string(), String::new(), oversized]
}

/// Sends 100 good orders (round `round`) to partition 2, adding them to `expected`.
fn send_good(datadir: &Path, round: usize, expected: &mut std::collections::BTreeMap<String, u64>) {
    let (lines, counts) = order_lines(100, 5, round * 100);
    let out = cli(ORDERS, datadir, &["send", "orders", "--partition", "2"], Some(&lines));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for (k, n) in counts {
        *expected.entry(k).or_insert(0) += n;
    }
}

/// Sends one record's bytes as they are to partition 2, bad or not (`--unchecked`).
fn send_raw(datadir: &Path, value: &str) {
    let args = ["send", "orders", "--partition", "2", "--value-serializer", "raw", "--unchecked", value];
    let out = cli(ORDERS, datadir, &args, None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn bad_records_are_skipped_or_dead_lettered_and_the_rest_counted_exactly() {
    let bad = bad_records();
    for policy in ["skip", "dead-letter"] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let worker = Worker::start(ORDERS, &data, &[("BAD_RECORD_POLICY", policy), ("MAX_RECORD_BYTES", "512")]);
        let mut expected = std::collections::BTreeMap::new();
        for (round, value) in bad.iter().enumerate() {
            send_good(&data, round, &mut expected);
            send_raw(&data, value);
        }
        send_good(&data, 3, &mut expected);
        eventually("every good order counted", || dump(ORDERS, &data) == expected);
        let log = worker.log();
        let message =
            if policy == "skip" { "skipping a bad record" } else { "bad record sent to the dead-letter topic" };
        assert_eq!(log.matches(message).count(), 3, "{policy}: {log}");
        assert_eq!(worker.stop(), 0);
        let letters = dead_letters(&data);
        if policy == "dead-letter" {
            let values: Vec<&[u8]> = letters.iter().map(|(v, _)| &v[..]).collect();
            assert_eq!(values, bad.iter().map(|v| v.as_bytes()).collect::<Vec<_>>());
            assert!(letters.iter().all(|(_, e)| !e.is_empty()), "every dead letter says why: {letters:?}");
            assert!(letters[2].1.contains("512"), "the oversized one names the limit: {:?}", letters[2]);
        } else {
            assert!(letters.is_empty());
        }
    }
}

#[test]
fn a_bad_record_stops_the_worker_and_stays_uncommitted() {
    let bad = bad_records();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let stop = [("BAD_RECORD_POLICY", "stop"), ("MAX_RECORD_BYTES", "512")];
    let mut expected = std::collections::BTreeMap::new();
    let mut worker = Worker::start(ORDERS, &data, &stop);
    send_good(&data, 0, &mut expected);
    eventually("the good orders counted", || dump(ORDERS, &data) == expected);
    send_raw(&data, &bad[0]);
    assert_eq!(worker.wait(Duration::from_secs(60)), 1, "{}", worker.log());
    assert!(worker.log().contains("bad record; stopping the worker"), "{}", worker.log());
    assert!(worker.log().contains("offset=100"), "the bad record is named: {}", worker.log());
    // It was not committed: a restart meets it again and stops again.
    let mut worker = Worker::start(ORDERS, &data, &stop);
    assert_eq!(worker.wait(Duration::from_secs(60)), 1, "{}", worker.log());
    assert!(worker.log().contains("offset=100"), "{}", worker.log());
    // With `skip`, it is skipped (counted as bad), and everything after it is counted.
    let worker = Worker::start(ORDERS, &data, &[("MAX_RECORD_BYTES", "512")]);
    for (round, value) in bad.iter().enumerate().skip(1) {
        send_good(&data, round, &mut expected);
        send_raw(&data, value);
    }
    send_good(&data, 3, &mut expected);
    eventually("every good order counted after the restart", || dump(ORDERS, &data) == expected);
    assert_eq!(worker.log().matches("skipping a bad record").count(), 3, "{}", worker.log());
    assert_eq!(worker.stop(), 0);
}

/// The command line's own faults (the faults issue, items 9 and 10): an argument that is not
/// UTF-8 is input, never a panic; binary values can be sent (`--value-file`, raw); values the
/// worker's agents would only drop (the wrong JSON shape, over `max_record_bytes`) are refused
/// with nothing sent; `table dump` into a closed pipe ends quietly; `stats` tells events
/// processed and lag, and the worker says when it is ready and caught up.
#[test]
fn command_line_input_is_checked_and_never_panics() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let worker = Worker::start(ORDERS, &data, &[("MAX_RECORD_BYTES", "512")]);
    // An empty worker takes little disk (its 40-odd logs and stores reserve space when they
    // are first written to, not 8 MiB each up front: 385 MB before).
    assert!(disk_usage(&data) < 4 << 20, "{} bytes", disk_usage(&data));
    let run = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(ORDERS)
            .arg("--datadir")
            .arg(&data)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let os = |s: &str| std::ffi::OsStr::new(s).to_os_string();
    // Not UTF-8: a usage error for a JSON value (exit 2), not a panic (101).
    let bad_utf8 = std::ffi::OsStr::from_bytes(&[b'{', 0xff, b'}']).to_os_string();
    let out = run(&[&os("send"), &os("orders"), &bad_utf8]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("not UTF-8"), "{}", stderr(&out));
    // A JSON value of the wrong shape, and one over max_record_bytes: refused, nothing sent.
    let out = run(&[&os("send"), &os("orders"), &os(r#"{"account": 1}"#)]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("would drop it as a bad record"), "{}", stderr(&out));
    let big = format!(r#"{{"account_id": "a", "product_id": "{}", "amount": 1, "price": 1.0}}"#, "p".repeat(600));
    let out = run(&[&os("send"), &os("orders"), &os(&big)]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("over max_record_bytes"), "{}", stderr(&out));
    // A binary value from a file, as it is (unchecked: it is no order).
    let file = dir.path().join("value.bin");
    std::fs::write(&file, [0u8, 0xff, 0x10, b'\n', 0x80]).unwrap();
    let args = ["send", "orders", "--partition", "3", "--value-serializer", "raw", "--unchecked", "--value-file"];
    let mut all: Vec<std::ffi::OsString> = args.iter().map(|a| os(a)).collect();
    all.push(file.clone().into_os_string());
    let out = run(&all.iter().map(|a| a.as_os_str()).collect::<Vec<_>>());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // A good order, counted; then stats.
    let one = r#"{"account_id": "account-1", "product_id": "p", "amount": 1, "price": 1.0}"#;
    assert_eq!(code(&cli(ORDERS, &data, &["send", "orders", one], None)), 0);
    eventually("the order counted", || dump(ORDERS, &data).get("account-1") == Some(&1));
    eventually("stats show the work done and no lag", || {
        let s = json(&cli(ORDERS, &data, &["stats", "--json"], None));
        s["lag"] == 0 && s["events_processed"].as_u64().unwrap_or(0) >= 3 && s["problems"] == serde_json::json!([])
    });
    // `table dump` whose reader is gone: no panic, exit 0.
    let mut child = std::process::Command::new(ORDERS)
        .arg("--datadir")
        .arg(&data)
        .args(["table", "dump", "order_count"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    let log = worker.log();
    assert!(log.contains("the worker is ready"), "{log}");
    assert!(log.contains("caught up"), "{log}");
    assert_eq!(worker.stop(), 0);
    let records = faust_tests::topic_records(&data, "orders");
    assert!(records.iter().any(|r| r.value.as_deref() == Some(&[0u8, 0xff, 0x10, b'\n', 0x80][..])));
    assert_eq!(records.len(), 2, "only the two accepted sends were written");
}

/// `commit_every` (BROKER_COMMIT_EVERY) commits once that many events were processed, even
/// when the commit interval is far away.
#[test]
fn commit_every_commits_before_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let worker = Worker::start(ORDERS, &data, &[("BROKER_COMMIT_INTERVAL", "600"), ("BROKER_COMMIT_EVERY", "100")]);
    let (lines, _) = order_lines(1000, 7, 0);
    assert_eq!(code(&cli(ORDERS, &data, &["send", "orders"], Some(&lines))), 0);
    let committed = || -> u64 {
        let text = std::fs::read_to_string(data.join("topics/.groups/orders.offsets")).unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with("orders\t"))
            .filter_map(|l| l.rsplit('\t').next()?.parse::<u64>().ok())
            .sum()
    };
    eventually("offsets committed long before the 600 s interval", || committed() >= 900);
    assert_eq!(worker.stop(), 0);
}

/// Bytes of disk the files under `dir` take (allocated blocks).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() { disk_usage(&entry.path()) } else { meta.blocks() * 512 };
    }
    total
}
