//! Tables on real workers: counting through the `test_context` harness, writes of failed
//! events undone, restarts on `local://` that recover from stores and changelogs, a damaged
//! shard rebuilt from its changelog, and the errors a user can meet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faust::{App, Settings, Table, TableError};

fn settings(id: &str, partitions: u32) -> Settings {
    let mut s = Settings::new(id);
    s.topic_partitions = partitions;
    s.commit_interval = Duration::from_millis(20);
    s
}

/// The README's program: count orders per account.
fn counting_app(settings: Settings) -> (App, faust::Topic<String, u64>, Table<String, u64>) {
    let app = App::new(settings);
    let orders = app.topic::<String, u64>("orders");
    let counts = app.table::<String, u64>("counts").with_default(|| 0);
    let table = counts.clone();
    app.agent("count", &orders, move |mut stream| {
        let counts = table.clone();
        async move {
            while let Some((account, _amount)) = stream.next_item().await {
                counts.update(&account.ok_or("orders are keyed by account")?, |n| *n += 1)?;
            }
            Ok(())
        }
    });
    (app, orders, counts)
}

#[test]
fn a_table_counts_per_key_and_its_changelog_holds_the_counts() {
    let (app, orders, counts) = counting_app(settings("tables-count", 4));
    let test = app.test_context().unwrap();
    for i in 0..100u64 {
        test.put(&orders, Some(&format!("acct-{}", i % 7)), &i).unwrap();
    }
    let table = test.table(&counts).unwrap();
    let expected: HashMap<String, u64> = (0..7).map(|a| (format!("acct-{a}"), if a < 2 { 15 } else { 14 })).collect();
    assert_eq!(table, expected);
    // Compacted changelog, one per table, named after the app.
    assert_eq!(counts.changelog_topic(), "tables-count-counts-changelog");
    test.stop().unwrap();
}

#[test]
fn writes_of_a_failed_event_are_undone_before_it_is_retried() {
    let app = App::new(settings("tables-retry", 1));
    let orders = app.topic::<String, u64>("orders");
    let counts = app.table::<String, u64>("counts").with_default(|| 0);
    let failed_once = Arc::new(AtomicBool::new(false));
    let (table, failed) = (counts.clone(), failed_once.clone());
    app.agent("count", &orders, move |mut stream| {
        let (counts, failed) = (table.clone(), failed.clone());
        async move {
            while let Some((account, amount)) = stream.next_item().await {
                let account = account.ok_or("keyed")?;
                // Two writes, then a failure on the event of amount 13 (once): neither write
                // may survive, or the retry counts it twice.
                counts.update(&account, |n| *n += 1)?;
                counts.update(&format!("{account}-amount"), |n| *n += amount)?;
                if amount == 13 && !failed.swap(true, Ordering::SeqCst) {
                    return Err("failing once on 13".into());
                }
            }
            Ok(())
        }
    });
    let test = app.test_context().unwrap();
    for amount in [10u64, 13, 20] {
        test.put(&orders, Some(&"a".to_string()), &amount).unwrap();
    }
    let table = test.table(&counts).unwrap();
    assert!(failed_once.load(Ordering::SeqCst));
    assert_eq!(table.get("a"), Some(&3));
    assert_eq!(table.get("a-amount"), Some(&43));
    test.stop().unwrap();
}

#[test]
fn tables_outside_stream_processing_name_their_partition() {
    let app = App::new(settings("tables-outside", 2));
    let counts = app.table::<String, u64>("counts").with_default(|| 0);
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let (table, log) = (counts.clone(), seen.clone());
    app.task(move || {
        let (counts, log) = (table.clone(), log.clone());
        async move {
            let log_line = |r: String| log.lock().map(|mut l| l.push(r)).unwrap_or(());
            match counts.get(&"x".to_string()) {
                Err(TableError::OutsideStream { table }) => log_line(format!("outside:{table}")),
                other => log_line(format!("unexpected {other:?}")),
            }
            counts.partition(1).insert("x".to_string(), 5)?;
            let v = counts.partition(1).update(&"x".to_string(), |n| *n += 1)?;
            log_line(format!("p1:{v}"));
            log_line(format!("items:{:?}", counts.partition(1).items()?));
            log_line(format!("local:{:?}", counts.local_partitions()));
            Ok(())
        }
    });
    let test = app.test_context().unwrap();
    let table = test.table(&counts).unwrap();
    assert_eq!(table.get("x"), Some(&6));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, vec!["outside:counts", "p1:6", "items:[(\"x\", 6)]", "local:[0, 1]"]);
    // Outside a worker: a typed error, not a panic.
    assert!(matches!(counts.get(&"x".to_string()), Err(TableError::NotRunning { .. })));
    test.stop().unwrap();
}

/// Runs the counting app on `local://` in `dir` over `orders` already in the topic (written by
/// the app itself on its first run), until `expected` events were counted; returns the table.
fn run_local(
    dir: &std::path::Path,
    cores: usize,
    to_send: &[(String, u64)],
    expected_total: u64,
) -> HashMap<String, u64> {
    let mut s = settings("tables-local", 4);
    s.datadir = dir.to_path_buf();
    s.cores = Some(cores);
    let (app, orders, counts) = counting_app(s);
    let (result, counted) =
        faust_tests::count_until(&app, &orders, &counts, to_send, expected_total, Duration::from_secs(60));
    result.unwrap();
    counted
}

#[test]
fn counts_survive_restarts_on_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let batch = |from: u64, n: u64| -> Vec<(String, u64)> {
        (from..from + n).map(|i| (format!("acct-{}", i % 13), i)).collect()
    };
    let model = |n: u64| -> HashMap<String, u64> {
        let mut m = HashMap::new();
        for i in 0..n {
            *m.entry(format!("acct-{}", i % 13)).or_default() += 1;
        }
        m
    };
    assert_eq!(run_local(dir.path(), 2, &batch(0, 5000), 5000), model(5000));
    // A restart recovers from the stores' checkpoints (on the other core count, too).
    assert_eq!(run_local(dir.path(), 1, &batch(5000, 3000), 8000), model(8000));
    // A damaged shard is rebuilt from the changelog.
    let shard = dir.path().join("tables").join("counts").join("0");
    let segment = std::fs::read_dir(&shard)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("a segment file");
    let mut bytes = std::fs::read(&segment).unwrap();
    // Inside the first records (the file is preallocated: its tail is empty).
    bytes[200] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();
    assert_eq!(run_local(dir.path(), 2, &batch(8000, 2000), 10_000), model(10_000));
    assert!(shard.with_extension("damaged").exists(), "the damaged store is kept aside");
}

#[test]
fn a_new_version_of_the_app_counts_from_the_start_in_state_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let run = |version: u32, to_send: &[(String, u64)], expected_total: u64| {
        let mut s = settings("tables-version", 2);
        s.datadir = dir.path().to_path_buf();
        s.cores = Some(1);
        s.version = version;
        let (app, orders, counts) = counting_app(s);
        let (result, counted) =
            faust_tests::count_until(&app, &orders, &counts, to_send, expected_total, Duration::from_secs(60));
        result.unwrap();
        (app.settings().id.clone(), counted)
    };
    let orders = |from: u64, n: u64| (from..from + n).map(|i| (format!("acct-{}", i % 3), i)).collect::<Vec<_>>();
    let (id, counted) = run(1, &orders(0, 300), 300);
    assert_eq!((id.as_str(), counted.values().sum::<u64>()), ("tables-version", 300));
    // Version 2: a new app id, group and changelog; it reads the same orders topic from the
    // start (and the 60 sent now), counting into stores of its own.
    let (id, counted) = run(2, &orders(300, 60), 360);
    assert_eq!((id.as_str(), counted.values().sum::<u64>()), ("tables-version-v2", 360));
    assert!(dir.path().join("tables").join("counts").is_dir(), "version 1's stores are kept");
    assert!(dir.path().join("v2").join("tables").join("counts").is_dir(), "version 2's are apart");
    let changelog = faust_tests::topic_records(dir.path(), "tables-version-v2-counts-changelog");
    assert!(!changelog.is_empty(), "version 2 has its own changelog");
}
