//! Bad records under each `bad_record_policy`, on a worker over `memory://`: malformed JSON,
//! an empty value, a null value, a record over `max_record_bytes` and a key that is not
//! UTF-8, among good orders. Whatever the policy, the good orders before a bad one are
//! counted exactly; `skip` and `dead-letter` count every good order and move past the bad
//! ones (`dead-letter` keeps each, as read, with the error and its source in headers);
//! `stop` ends the worker with an error naming the record and leaves its offset
//! uncommitted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use faust::{App, BadRecordPolicy, MemoryTransport, Settings, TopicConfig, TopicPartition, WorkerError};
use faust_storage::BatchBuilder;
use faust_transport::CoreTransport;
use futures_lite::future::block_on;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    account_id: String,
    product_id: String,
}

/// A record as written: key, value, and whether it is a good order.
type Written = (Vec<u8>, Option<Vec<u8>>, bool);

/// What is written to partition 0 (partition 1 gets good orders only).
fn records() -> Vec<Written> {
    let good = |i: u32| {
        let order = Order { account_id: format!("account-{}", i % 3), product_id: "p".into() };
        (format!("order-{i}").into_bytes(), Some(serde_json::to_vec(&order).unwrap()), true)
    };
    let mut out: Vec<_> = (0..5).map(good).collect();
    out.push((b"bad-json".to_vec(), Some(br#"{"account_id": "account-1", "#.to_vec()), false));
    out.extend((5..8).map(good));
    out.push((b"empty".to_vec(), Some(Vec::new()), false));
    out.push((b"null".to_vec(), None, false));
    let big = Order { account_id: "account-0".into(), product_id: "x".repeat(400) };
    out.push((b"big".to_vec(), Some(serde_json::to_vec(&big).unwrap()), false));
    out.push((vec![0xff, 0xfe, 0x00], good(99).1, false));
    out.extend((8..12).map(good));
    out
}

fn account(value: &[u8]) -> String {
    serde_json::from_slice::<Order>(value).unwrap().account_id
}

struct Run {
    transport: MemoryTransport,
    result: Result<(), WorkerError>,
    stats: faust::WorkerStats,
}

fn run(policy: BadRecordPolicy) -> Run {
    let transport = MemoryTransport::new();
    transport.create_topic_now("orders", &TopicConfig::new(2)).unwrap();
    for (p, recs) in [(0u32, records()), (1, (0..4).map(|i| records()[i].clone()).collect())] {
        let mut batch = BatchBuilder::new();
        for (key, value, _) in &recs {
            batch.push(0, Some(key), value.as_deref(), &[]);
        }
        block_on(transport.produce(&TopicPartition::new("orders", p), batch)).unwrap();
    }
    let mut settings = Settings::new("bad-input");
    settings.broker = "memory://".into();
    settings.cores = Some(1);
    settings.topic_partitions = 2;
    settings.store = "memory://".into();
    settings.commit_interval = Duration::from_millis(50);
    settings.max_record_bytes = 256;
    settings.bad_record_policy = policy;
    let app = App::new(settings).with_memory_transport(transport.clone());
    let orders = app.topic::<String, Order>("orders");
    let counts = app.table::<String, u64>("counts").with_default(|| 0);
    app.agent("count", &orders, move |mut stream| {
        let counts = counts.clone();
        async move {
            // Events, so keys are decoded too (a key that is not UTF-8 is bad).
            while let Some(event) = stream.next_event().await {
                counts.update(&event.value.account_id, |n| *n += 1)?;
            }
            Ok(())
        }
    });
    let stop = app.stop_signal();
    let watcher = {
        let transport = transport.clone();
        std::thread::spawn(move || {
            let tps = [TopicPartition::new("orders", 0), TopicPartition::new("orders", 1)];
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) && !stop.is_stopped() {
                let committed = block_on(transport.committed("bad-input", &tps)).unwrap();
                let done = tps.iter().zip(&committed).all(|(tp, c)| *c == Some(transport.high_watermark(tp).unwrap()));
                if done {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            stop.stop();
        })
    };
    let result = app.run();
    watcher.join().unwrap();
    Run { transport, result, stats: app.stats() }
}

/// The table as committed (its changelog up to the committed offsets), summed over its
/// partitions: the orders are keyed by order, so each partition counts its own share.
fn counted(transport: &MemoryTransport) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for p in 0..2 {
        let tp = TopicPartition::new("bad-input-counts-changelog", p);
        let end = block_on(transport.committed("bad-input", std::slice::from_ref(&tp))).unwrap()[0].unwrap_or(0);
        let mut shard: BTreeMap<String, u64> = BTreeMap::new();
        for r in transport.records(&tp).unwrap().into_iter().filter(|r| r.offset < end) {
            let key = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
            shard.insert(key, serde_json::from_slice(&r.value.unwrap()).unwrap());
        }
        for (k, n) in shard {
            *out.entry(k).or_default() += n;
        }
    }
    out
}

/// The good orders of partition 0 below offset `p0_below`, and of partition 1 below
/// `p1_below`, per account.
fn expected(p0_below: usize, p1_below: usize) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let p0 = records().into_iter().take(p0_below);
    let p1 = records().into_iter().take(4.min(p1_below));
    for (_, value, good) in p0.chain(p1) {
        if good {
            *out.entry(account(&value.unwrap())).or_default() += 1;
        }
    }
    out
}

const BAD: u64 = 5;

#[test]
fn skip_counts_every_good_order_and_moves_past_the_bad_ones() {
    let run = run(BadRecordPolicy::Skip);
    run.result.unwrap();
    assert_eq!(run.stats.bad_records, BAD);
    assert_eq!(counted(&run.transport), expected(usize::MAX, usize::MAX));
}

#[test]
fn dead_letter_keeps_each_bad_record_with_its_error_and_source() {
    let run = run(BadRecordPolicy::DeadLetter { topic: None });
    run.result.unwrap();
    assert_eq!(run.stats.bad_records, BAD);
    assert_eq!(counted(&run.transport), expected(usize::MAX, usize::MAX));
    // Each dead-lettered record: key, value, and its `faust-error` and `faust-source` headers.
    type Dead = (Vec<u8>, Option<Vec<u8>>, [String; 2]);
    let mut dead: Vec<Dead> = Vec::new();
    for p in 0..2 {
        for r in run.transport.records(&TopicPartition::new("bad-input-dead-letter", p)).unwrap() {
            let header = |name: &[u8]| {
                let (_, v) = r.headers().find(|(k, _)| *k == name).unwrap();
                String::from_utf8(v.unwrap().to_vec()).unwrap()
            };
            dead.push((
                r.key.clone().unwrap().to_vec(),
                r.value.clone().map(|v| v.to_vec()),
                [header(b"faust-error"), header(b"faust-source")],
            ));
        }
    }
    let bad: Vec<(usize, Written)> = records().into_iter().enumerate().filter(|(_, r)| !r.2).collect();
    assert_eq!(dead.len(), bad.len(), "{dead:?}");
    for ((offset, (key, value, _)), (dkey, dvalue, [error, source])) in bad.into_iter().zip(dead) {
        assert_eq!(dkey, key);
        // A null value is kept as an empty one.
        assert_eq!(dvalue.unwrap_or_default(), value.unwrap_or_default());
        assert_eq!(source, format!("orders/0@{offset}"));
        assert!(!error.is_empty());
    }
}

#[test]
fn stop_ends_the_worker_at_the_first_bad_record_and_leaves_it_uncommitted() {
    let run = run(BadRecordPolicy::Stop);
    let first_bad = records().iter().position(|r| !r.2).unwrap();
    let err = run.result.unwrap_err();
    let text = err.to_string();
    let faust::WorkerError::BadRecord(bad) = err else { panic!("not a bad-record error: {text}") };
    assert_eq!((bad.topic.as_str(), bad.partition, bad.offset), ("orders", 0, first_bad as u64), "{text}");
    assert!(text.contains(&format!("bad record in orders partition 0 at offset {first_bad}")), "{text}");
    assert_eq!(run.stats.bad_records, 1);
    let tp = TopicPartition::new("orders", 0);
    let committed = block_on(run.transport.committed("bad-input", std::slice::from_ref(&tp))).unwrap()[0];
    assert_eq!(committed, Some(first_bad as u64), "nothing from the bad record on is committed");
    // Partition 0's good orders before the bad one were counted; partition 1's may or may
    // not have been by the time the worker stopped.
    let counted = counted(&run.transport);
    let (low, high) = (expected(first_bad, 0), expected(first_bad, usize::MAX));
    for (account, n) in &high {
        let got = counted.get(account).copied().unwrap_or(0);
        let least = low.get(account).copied().unwrap_or(0);
        assert!((least..=*n).contains(&got), "{account}: counted {got}, expected {least}..={n}");
    }
}
