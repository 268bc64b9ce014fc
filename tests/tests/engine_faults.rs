//! Faults that used to lose data or wedge a worker, run end to end on the `orders` example
//! (a `group_by` through a repartition topic, and a table), each bounded in time:
//!
//! - **A full disk at every write point of the commit protocol** (buffered sends, the
//!   changelog, the store, the committed offsets, the checkpoint, a recovery's
//!   neutralization), injected with `FAUST_FAIL_AT` (the write fails with `ENOSPC`, as on a
//!   full disk, for a number of tries, then space "returns"). Before the fix, a commit that
//!   failed after writing its changelog left those records uncommitted while a later commit
//!   moved the source offsets past their events: a restart neutralized them and lost counts.
//! - **A real full disk** (a small tmpfs the test mounts; needs root, skipped otherwise): sends
//!   that fail report exactly what was written and nothing more lands later; once space is
//!   freed the worker catches up; counts are exact across a restart.
//! - **The main job on a full disk** exits with a clear error instead of hanging.
//! - **Damaged files** of every kind the engine writes (cut tails, flipped bytes, edited
//!   numbers): a user's topic partition waits for `repair` while the others go on; internal
//!   logs are repaired; a damaged changelog is rebuilt from the store; damaged offsets and
//!   settings files fall back to their copies.
//!
//! After each: exact counts (equal to the orders acknowledged), no acknowledged send lost, no
//! failed send delivered, no panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faust_tests::cli::{Worker, cli, code, dump, eventually, json, order_lines, stderr, stdout};

const ORDERS: &str = env!("CARGO_BIN_EXE_orders");

/// Sends `lines` (JSON orders, one per line) to `orders`, asserting success.
fn send(data: &Path, lines: &str, expected: &mut BTreeMap<String, u64>, counts: BTreeMap<String, u64>) {
    let out = cli(ORDERS, data, &["send", "orders"], Some(lines));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for (k, n) in counts {
        *expected.entry(k).or_default() += n;
    }
}

fn stats(data: &Path) -> serde_json::Value {
    let out = cli(ORDERS, data, &["stats", "--json"], None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    json(&out)
}

/// The records of `topic` in the data directory (no worker may run).
fn records(data: &Path, topic: &str) -> Vec<faust_storage::Record> {
    faust_tests::topic_records(data, topic)
}

fn assert_no_panic(worker_log: &str) {
    assert!(!worker_log.contains("panicked"), "the worker panicked:\n{worker_log}");
}

/// A worker started, `rounds` × 100 orders over 7 accounts sent and counted, stopped.
fn counted_data(dir: &Path, rounds: usize) -> (PathBuf, BTreeMap<String, u64>) {
    let data = dir.join("data");
    let worker = Worker::start(ORDERS, &data, &[]);
    let mut expected = BTreeMap::new();
    for round in 0..rounds {
        let (lines, counts) = order_lines(100, 7, round * 100);
        send(&data, &lines, &mut expected, counts);
    }
    eventually("every order counted", || dump(ORDERS, &data) == expected);
    let log = worker.log();
    assert_eq!(worker.stop(), 0, "{log}");
    (data, expected)
}

#[test]
fn a_full_disk_at_each_write_point_loses_and_duplicates_nothing() {
    for point in ["sends:flush", "commit:changelog-write", "commit:store", "commit:offsets", "commit:checkpoint"] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // Tries 2 to 9 at the point fail as on a full disk; then space is back.
        let fault = format!("{point}:2:8");
        let worker = Worker::start(ORDERS, &data, &[("FAUST_FAIL_AT", &fault)]);
        let mut expected = BTreeMap::new();
        for round in 0..3 {
            let (lines, counts) = order_lines(300, 7, round * 300);
            send(&data, &lines, &mut expected, counts);
        }
        eventually(&format!("{point}: every order counted"), || dump(ORDERS, &data) == expected);
        if point != "commit:checkpoint" {
            // (A failed checkpoint costs a longer replay at the next start, nothing else.)
            eventually(&format!("{point}: the faults are reached"), || {
                stats(&data)["write_failures"].as_u64().is_some_and(|n| n > 0)
            });
        }
        // The counts show applied writes; the commits behind them succeed once space is back.
        eventually(&format!("{point}: writes succeed again"), || stats(&data)["writes_blocked"] == false);
        let log = worker.log();
        assert_eq!(worker.stop(), 0, "{point}: {log}");
        assert_no_panic(&log);
        // Exact after a restart too, and the topic holds every order once.
        let worker = Worker::start(ORDERS, &data, &[]);
        eventually(&format!("{point}: exact after a restart"), || dump(ORDERS, &data) == expected);
        assert_eq!(worker.stop(), 0);
        assert_eq!(records(&data, "orders").len(), 900, "{point}");
    }
}

/// A crash leaves changelog records of a commit that did not finish; the next start must
/// neutralize them, and the disk is full for that write: the worker stops with the error
/// (nothing committed), and the start after that is exact.
#[test]
fn a_full_disk_while_recovery_neutralizes_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (data, mut expected) = counted_data(dir.path(), 3);
    // More orders, and a crash right after their changelog records are written.
    let mut worker = Worker::start(ORDERS, &data, &[("FAUST_CRASH_AT", "commit:changelog:1")]);
    let (lines, counts) = order_lines(200, 7, 5_000);
    send(&data, &lines, &mut expected, counts);
    assert_ne!(worker.wait(Duration::from_secs(30)), 0, "the crash point was not reached");
    let mut worker = Worker::start(ORDERS, &data, &[("FAUST_FAIL_AT", "recover:neutralize:1:1")]);
    assert_eq!(worker.wait(Duration::from_secs(60)), 1, "{}", worker.log());
    assert!(worker.log().contains("No space left on device"), "{}", worker.log());
    assert_no_panic(&worker.log());
    let worker = Worker::start(ORDERS, &data, &[]);
    eventually("exact after the failed recovery", || dump(ORDERS, &data) == expected);
    assert_eq!(worker.stop(), 0);
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct SmallDisk {
    _parent: tempfile::TempDir,
    path: PathBuf,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let parent = tempfile::tempdir().ok()?;
        let path = parent.path().join("disk");
        std::fs::create_dir(&path).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipping: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(SmallDisk { _parent: parent, path })
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remounting the tmpfs");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// The number at the start of "N records of this send were written" in a failed send's
/// message (0 when none was).
fn written_before_failure(message: &str) -> u64 {
    if message.contains("no record of this send was written") {
        return 0;
    }
    let at = message.find(" records of this send were written").unwrap_or_else(|| panic!("{message}"));
    message[..at].rsplit(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

/// The issue's first report, on a real full disk: batches of orders per account until sends
/// fail; every failed send says how many of its records were written, and exactly those are
/// in the topic (nothing is written later behind the sender's back); space is freed, the
/// worker catches up by itself, and the counts stay exact across a graceful restart.
#[test]
fn a_real_full_disk_then_space_freed() {
    let Some(disk) = SmallDisk::mount("24m") else { return };
    let data = disk.path.join("data");
    let worker = Worker::start(ORDERS, &data, &[]);
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures = 0;
    for round in 0..60 {
        let account = format!("account-{}", round % 13);
        let line = format!("{{\"account_id\": \"{account}\", \"product_id\": \"p\", \"amount\": 1, \"price\": 1.0}}\n");
        let out = cli(ORDERS, &data, &["send", "orders", "--repeat", "5000"], Some(&line));
        let written = match code(&out) {
            0 => 5_000,
            1 => {
                failures += 1;
                assert!(stderr(&out).contains("No space left on device"), "{}", stderr(&out));
                written_before_failure(&stderr(&out))
            }
            other => panic!("send exited {other}: {}", stderr(&out)),
        };
        *acked.entry(account).or_default() += written;
        if failures >= 3 {
            break;
        }
    }
    assert!(failures >= 3, "the disk never filled");
    disk.resize("1g");
    acked.retain(|_, n| *n > 0);
    eventually("every acknowledged order counted once space is back", || dump(ORDERS, &data) == acked);
    eventually("writes succeed again", || stats(&data)["writes_blocked"] == false);
    let log = worker.log();
    assert_eq!(worker.stop(), 0, "{log}");
    assert_no_panic(&log);
    let total: u64 = acked.values().sum();
    assert_eq!(records(&data, "orders").len() as u64, total, "the topic holds exactly the acknowledged orders");
    let worker = Worker::start(ORDERS, &data, &[]);
    eventually("exact after a restart", || dump(ORDERS, &data) == acked);
    assert_eq!(worker.stop(), 0);
}

/// The main job (no arguments) on a disk that stays full: it ends with an error that says
/// so, within its bound, instead of printing the same count forever.
#[test]
fn the_main_job_exits_with_an_error_on_a_full_disk() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(ORDERS)
        .env("ORDERS", "300000")
        .env("ORDERS_DATADIR", dir.path().join("data"))
        .env("FAUST_FAIL_AT", "sends:flush:1:*")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("ORDERS_DATADIR="), "it says how to resume: {err}");
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    assert!(!err.contains("panicked"), "{err}");
    // Rate-limited: a handful of lines, not one per retry.
    assert!(err.lines().count() < 40, "{} lines:\n{err}", err.lines().count());
}

/// The log files of `topic`/`partition`, sorted.
fn segments(data: &Path, topic: &str, partition: u32) -> Vec<PathBuf> {
    let dir = data.join("topics").join(topic).join(partition.to_string());
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

/// Where the data of a segment file ends (it may be followed by reserved zeros).
fn data_end(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i as u64 + 1)
}

fn flip(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x41], at).unwrap();
}

/// A partition of `topic` that holds records.
fn partition_with_data(data: &Path, topic: &str) -> u32 {
    (0..8).find(|&p| data_end(segments(data, topic, p).last().unwrap()) > 200).expect("a partition with data")
}

/// The issue's third report: a flipped byte, or a cut tail, below the recovery point of a
/// partition of the user's topic. The worker starts and processes the other partitions; the
/// damaged one is reported in `stats` and `topics` (not silently under-counted); sends to it
/// fail at once naming the damage, sends elsewhere succeed; `repair` drops the damaged batch
/// and the partition is processed again; the worker stops gracefully.
#[test]
fn a_damaged_partition_of_a_users_topic_waits_for_repair_and_blocks_nothing_else() {
    for damage in ["flip", "cut"] {
        let dir = tempfile::tempdir().unwrap();
        let (data, mut expected) = counted_data(dir.path(), 5);
        let p = partition_with_data(&data, "orders");
        let last = segments(&data, "orders", p).pop().unwrap();
        let end = data_end(&last);
        match damage {
            "flip" => flip(&last, end - 40),
            _ => std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(end - 20).unwrap(),
        }
        let worker = Worker::start(ORDERS, &data, &[]);
        let place = format!("orders/{p}");
        eventually("the damage is reported", || {
            stats(&data)["problems"].as_array().unwrap().iter().any(|l| l.as_str().unwrap().contains(&place))
        });
        let topics = json(&cli(ORDERS, &data, &["topics", "--json"], None));
        let orders = topics.as_array().unwrap().iter().find(|t| t["topic"] == "orders").unwrap().clone();
        assert_eq!(orders["uncounted"], serde_json::json!([format!("{p} (damaged)")]), "{orders}");
        // Sends to the damaged partition fail at once and say what to do; others go through.
        let one = r#"{"account_id": "account-x", "product_id": "p", "amount": 1, "price": 1.0}"#;
        let bad = cli(ORDERS, &data, &["send", "orders", "--partition", &p.to_string(), one], None);
        assert_eq!(code(&bad), 1, "{}", stderr(&bad));
        assert!(stderr(&bad).contains("repair orders --partition"), "{}", stderr(&bad));
        let other = (p + 1) % 8;
        let good = cli(ORDERS, &data, &["send", "orders", "--partition", &other.to_string(), one], None);
        assert_eq!(code(&good), 0, "{}", stderr(&good));
        *expected.entry("account-x".into()).or_default() += 1;
        eventually("the other partitions are processed", || dump(ORDERS, &data) == expected);
        // The operator's repair, through the running worker.
        let repaired = cli(ORDERS, &data, &["repair", "orders", "--partition", &p.to_string(), "--yes"], None);
        assert_eq!(code(&repaired), 0, "{}", stderr(&repaired));
        assert!(stdout(&repaired).contains("dropped 1 damaged batches"), "{}", stdout(&repaired));
        let again = cli(ORDERS, &data, &["send", "orders", "--partition", &p.to_string(), one], None);
        assert_eq!(code(&again), 0, "{}", stderr(&again));
        *expected.entry("account-x".into()).or_default() += 1;
        // The damaged records had been counted before the damage: the counts stay exact.
        eventually("the repaired partition is processed again", || dump(ORDERS, &data) == expected);
        eventually("the problem is cleared", || stats(&data)["problems"].as_array().unwrap().is_empty());
        let log = worker.log();
        assert_eq!(worker.stop(), 0, "{damage}: {log}");
        assert_no_panic(&log);
    }
}

/// Damage to the files the engine keeps for itself: each is detected, and repaired or
/// rebuilt automatically where the data can be rebuilt; the counts stay exact.
#[test]
fn damaged_internal_files_are_repaired_or_rebuilt_and_counts_stay_exact() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage); 7] = [
        ("a flipped byte in the repartition topic", |data| {
            let p = partition_with_data(data, "orders-count-orders-account_id-repartition");
            let last = segments(data, "orders-count-orders-account_id-repartition", p).pop().unwrap();
            flip(&last, data_end(&last) - 30);
        }),
        ("a flipped byte in the changelog", |data| {
            let p = partition_with_data(data, "orders-order_count-changelog");
            let last = segments(data, "orders-order_count-changelog", p).pop().unwrap();
            flip(&last, data_end(&last) - 10);
        }),
        ("a cut changelog segment", |data| {
            let p = partition_with_data(data, "orders-order_count-changelog");
            let last = segments(data, "orders-order_count-changelog", p).pop().unwrap();
            std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(64).unwrap();
        }),
        ("a flipped byte in a store", |data| {
            let dir = data.join("tables/order_count");
            let store = (0..8).map(|p| dir.join(p.to_string())).find(|d| d.exists()).unwrap();
            let seg = std::fs::read_dir(&store)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|e| e == "log"))
                .unwrap();
            flip(&seg, data_end(&seg) - 5);
        }),
        ("a flipped byte in a store's checkpoint", |data| {
            let dir = data.join("tables/order_count");
            let store = (0..8).map(|p| dir.join(p.to_string())).find(|d| d.join("CHECKPOINT").exists()).unwrap();
            flip(&store.join("CHECKPOINT"), 20);
        }),
        ("an edited topic settings file", |data| {
            let meta = data.join("topics/orders/topic.meta");
            let text = std::fs::read_to_string(&meta).unwrap();
            std::fs::write(&meta, text.replace("partitions=8", "partitions=9")).unwrap();
        }),
        ("a flipped byte in a recovery point", |data| {
            let rp = data.join("topics/orders/0/recovery-point");
            flip(&rp, 9);
        }),
    ];
    for (what, damage) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (data, mut expected) = counted_data(dir.path(), 5);
        damage(&data);
        let worker = Worker::start(ORDERS, &data, &[]);
        eventually(&format!("{what}: exact"), || dump(ORDERS, &data) == expected);
        // And it goes on counting.
        let (lines, counts) = order_lines(100, 7, 10_000);
        send(&data, &lines, &mut expected, counts);
        eventually(&format!("{what}: new orders counted"), || dump(ORDERS, &data) == expected);
        let log = worker.log();
        assert_eq!(worker.stop(), 0, "{what}: {log}");
        assert_no_panic(&log);
        if what.contains("changelog") {
            assert!(log.contains("repaired"), "{what}: {log}");
            // The changelog was written whole again: the tables rebuilt from it alone (no
            // stores) are exact.
            let reset = cli(ORDERS, &data, &["reset", "--yes"], None);
            assert_eq!(code(&reset), 0, "{}", stderr(&reset));
            let worker = Worker::start(ORDERS, &data, &[]);
            eventually(&format!("{what}: exact from the changelog alone"), || dump(ORDERS, &data) == expected);
            assert_eq!(worker.stop(), 0);
        }
    }
}

/// The issue's fourth report: one digit of a committed offset changed in the offsets file.
/// The checksum catches it; the previous commit (kept beside it) is used, the events since
/// are processed again and the tables recovered to match: exact. With both copies damaged
/// the worker refuses to start and says what is wrong and what to do; after the operator
/// deletes them, everything is processed again from the sources: exact.
#[test]
fn a_damaged_offsets_file_is_detected_and_recovered_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (data, expected) = counted_data(dir.path(), 5);
    let offsets = data.join("topics/.groups/orders.offsets");
    let text = std::fs::read_to_string(&offsets).unwrap();
    let line = text.lines().find(|l| l.starts_with("orders-order_count-changelog\t") && !l.ends_with("\t0")).unwrap();
    let edited = format!("{}7", &line[..line.len() - 1]);
    std::fs::write(&offsets, text.replace(line, &edited)).unwrap();
    let worker = Worker::start(ORDERS, &data, &[]);
    eventually("exact after falling back to the previous commit", || dump(ORDERS, &data) == expected);
    let log = worker.log();
    assert!(log.contains("damaged"), "{log}");
    assert_eq!(worker.stop(), 0, "{log}");

    // Both copies damaged: a clear refusal.
    std::fs::write(&offsets, "faust-offsets 2\nx\n").unwrap();
    std::fs::write(data.join("topics/.groups/orders.offsets.prev"), [0xffu8, 0x00]).unwrap();
    let mut worker = Worker::start(ORDERS, &data, &[]);
    assert_eq!(worker.wait(Duration::from_secs(30)), 1, "{}", worker.log());
    let log = worker.log();
    assert!(log.contains("orders.offsets is damaged") && log.contains("delete it"), "{log}");
    assert_no_panic(&log);
    std::fs::remove_file(&offsets).unwrap();
    std::fs::remove_file(data.join("topics/.groups/orders.offsets.prev")).unwrap();
    let worker = Worker::start(ORDERS, &data, &[]);
    eventually("exact after processing everything again", || dump(ORDERS, &data) == expected);
    assert_eq!(worker.stop(), 0);
}

/// The issue's seventh report, on the embedded log: a table whose changelog has more
/// partitions than the agent's topic. An existing changelog that differs stops the worker at
/// the first event with Faust's `PartitionsMismatch` in words, committing nothing of it; new
/// changelogs take their sources' partition count, so once the bad changelog is gone a
/// restart counts every order.
#[test]
fn a_partition_count_mismatch_stops_the_worker_before_anything_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Everything with 8 partitions (the default)...
    let worker = Worker::start(ORDERS, &data, &[]);
    assert_eq!(worker.stop(), 0);
    // ...then the topics again with 4, while the table's changelog keeps its 8.
    for t in [
        "orders",
        "orders-count-orders-account_id-repartition",
        "orders-count-orders-account_id-positions-changelog",
        ".groups",
    ] {
        std::fs::remove_dir_all(data.join("topics").join(t)).unwrap();
    }
    let _ = std::fs::remove_dir_all(data.join("tables"));
    let mut worker = Worker::start(ORDERS, &data, &[("TOPIC_PARTITIONS", "4")]);
    let mut expected = BTreeMap::new();
    let (lines, counts) = order_lines(100, 7, 0);
    send(&data, &lines, &mut expected, counts);
    assert_eq!(worker.wait(Duration::from_secs(30)), 1, "{}", worker.log());
    let log = worker.log();
    assert!(log.contains("has 8 partitions, but the event comes from"), "{log}");
    assert_no_panic(&log);
    // The fix: the bad changelog deleted; recreated with the topics' 4 partitions although
    // TOPIC_PARTITIONS is the default 8; every order counted (none was skipped).
    std::fs::remove_dir_all(data.join("topics/orders-order_count-changelog")).unwrap();
    let worker = Worker::start(ORDERS, &data, &[]);
    let topics = json(&cli(ORDERS, &data, &["topics", "--json"], None));
    // (All but the app's one-partition leader topic.)
    assert!(topics.as_array().unwrap().iter().all(|t| t["partitions"] == 4 || t["kind"] == "leader"), "{topics}");
    eventually("every order counted after the fix", || dump(ORDERS, &data) == expected);
    assert_eq!(worker.stop(), 0);
}
