//! Windowed counts after `group_by`, on two workers sharing one `memory://` group: orders
//! keyed by order id are re-keyed by account and counted per account in tumbling 1 s windows
//! (event time from the order). A second worker joins half way, so partitions — and their
//! windows and stream time — move between workers while orders flow. Every window closes
//! once, on the worker that owns its partition then: each window's final result is in the
//! `finals` topic exactly once, with exactly the orders of that window.

use std::collections::BTreeMap;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use faust::{App, MemoryTransport, Settings, TopicConfig, TopicPartition, WindowResult, WorkerError};
use faust_storage::BatchBuilder;
use faust_transport::CoreTransport;
use futures_lite::future::block_on;
use serde::{Deserialize, Serialize};

const PARTITIONS: u32 = 4;
const ACCOUNTS: u64 = 20;

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    account_id: String,
    at_ms: i64,
}

struct Worker {
    app: App,
    thread: JoinHandle<Result<(), WorkerError>>,
}

fn start(transport: &MemoryTransport, dir: &Path, n: usize) -> Worker {
    let mut settings = Settings::new("windowed");
    settings.broker = "memory://".into();
    settings.cores = Some(1);
    settings.datadir = dir.join(format!("worker-{n}"));
    settings.commit_interval = Duration::from_millis(50);
    settings.topic_partitions = PARTITIONS;
    let app = App::new(settings).with_memory_transport(transport.clone());
    let orders = app.topic::<String, Order>("orders");
    let finals = app.topic::<String, WindowResult<u64>>("finals");
    // The re-keyed orders of one account come from all four source partitions, interleaved
    // as the workers fetch them: far out of time order. The grace takes them all.
    let counts = app
        .table::<String, u64>("per_second")
        .with_default(|| 0)
        .tumbling(Duration::from_secs(1))
        .grace(Duration::from_secs(1_000))
        .emit_final(&finals);
    let by_account = orders.group_by(|o: &Order| o.account_id.clone(), "account_id");
    app.agent("count", &by_account, move |mut stream| {
        let counts = counts.clone();
        async move {
            while let Some(order) = stream.next().await {
                counts.update_at(&order.account_id, order.at_ms, |n| *n += 1)?;
            }
            Ok(())
        }
    });
    let runner = app.clone();
    let thread = std::thread::spawn(move || runner.run());
    Worker { app, thread }
}

impl Worker {
    fn stop(self) {
        self.app.stop_signal().stop();
        self.thread.join().expect("worker thread panicked").expect("worker failed");
    }
}

/// Orders `from..to` (order i: account i % ACCOUNTS at i × 10 ms), in batches of 50 over the
/// partitions by order id, a little apart; adds them to `expected` per (account, window).
fn produce(transport: &MemoryTransport, from: u64, to: u64, expected: &mut BTreeMap<(String, i64), u64>) {
    let mut i = from;
    while i < to {
        let mut batch = BatchBuilder::new();
        let p = ((i / 50) % u64::from(PARTITIONS)) as u32;
        for j in i..(i + 50).min(to) {
            let order = Order { account_id: format!("account-{}", j % ACCOUNTS), at_ms: j as i64 * 10 };
            *expected.entry((order.account_id.clone(), order.at_ms.div_euclid(1000) * 1000)).or_default() += 1;
            batch.push(0, Some(format!("order-{j}").as_bytes()), Some(&serde_json::to_vec(&order).unwrap()), &[]);
        }
        block_on(transport.produce(&TopicPartition::new("orders", p), batch)).unwrap();
        i = (i + 50).min(to);
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn finals(transport: &MemoryTransport) -> Vec<(String, WindowResult<u64>)> {
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        for r in transport.records(&TopicPartition::new("finals", p)).unwrap_or_default() {
            let key = String::from_utf8(r.key.as_deref().unwrap().to_vec()).unwrap();
            out.push((key, serde_json::from_slice(r.value.as_deref().unwrap()).unwrap()));
        }
    }
    out
}

#[test]
fn windows_after_group_by_close_once_on_their_owner_as_partitions_move() {
    let dir = tempfile::tempdir().unwrap();
    let transport = MemoryTransport::new();
    transport.create_topic_now("orders", &TopicConfig::new(PARTITIONS)).unwrap();
    let mut expected = BTreeMap::new();
    let first = start(&transport, dir.path(), 0);
    produce(&transport, 0, 6_000, &mut expected);
    let second = start(&transport, dir.path(), 1);
    let late = |w: &Worker| w.app.stats().late_events;
    produce(&transport, 6_000, 12_000, &mut expected);
    // Every order so far processed first (both hops of `group_by`): otherwise an order far
    // later, repartitioned ahead of them, would make them late. (On a loaded machine the
    // workers can be seconds behind.)
    let settled = Instant::now() + Duration::from_secs(60);
    let mut quiet = 0;
    while quiet < 3 && Instant::now() < settled {
        let (a, b) = (first.app.stats(), second.app.stats());
        let caught_up = a.events_processed + b.events_processed >= 12_000 && a.lag == 0 && b.lag == 0;
        quiet = if caught_up { quiet + 1 } else { 0 };
        std::thread::sleep(Duration::from_millis(100));
    }
    // One order per account far later: every window of every account closes.
    let mut last = BTreeMap::new();
    produce(&transport, 10_000_000, 10_000_000 + ACCOUNTS, &mut last);
    let closing = expected.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while finals(&transport).len() < closing && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(second.app.stats().partitions_assigned > 0, "the second worker took partitions");
    assert_eq!((late(&first), late(&second)), (0, 0), "no order came after its window's grace");
    second.stop();
    first.stop();
    let mut got: BTreeMap<(String, i64), Vec<u64>> = BTreeMap::new();
    for (key, result) in finals(&transport) {
        assert_eq!(result.end - result.start, 1000);
        got.entry((key, result.start)).or_default().push(result.value);
    }
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(k, n)| got.get(*k) != Some(&vec![**n]))
        .map(|((key, start), n)| format!("{key} [{start}, +1 s): {:?}, not [{n}]", got.get(&(key.clone(), *start))))
        .take(10)
        .collect();
    assert!(
        wrong.is_empty(),
        "each window closes once, with its orders; not these (the first 10):\n{}",
        wrong.join("\n")
    );
    assert_eq!(got.len(), expected.len(), "no other window closed");
}
