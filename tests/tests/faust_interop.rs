//! Faust and us sharing topics, records included: real Faust (faust-streaming, from the
//! virtual environment `scripts/test` makes) and an app of ours on one tansu broker. Faust's
//! producer sends `Order` records (`faust.Record`, with its `__faust` metadata) that our agent
//! reads as `Record<Order>`; our app sends `Record<Order>` values that a Faust worker reads
//! *without* a value type, so Faust rebuilds each one from its namespace — the check that our
//! layout is Faust's own.
//!
//! Skipped, with a notice, without the broker (`FAUST_TEST_BROKER`, `FAUST_TANSU_BIN`) or
//! without Python (`FAUST_TEST_PYTHON`).

#[path = "support/orders_kafka.rs"]
mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust::{App, FaustRecord, Record, Settings};
use serde::{Deserialize, Serialize};
use support::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/faust/interop.py");
const N: u64 = 20;

/// `interop.Order` in tests/faust/interop.py.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    account_id: String,
    amount: i64,
    price: f64,
    tags: Vec<String>,
}

impl FaustRecord for Order {
    const NAMESPACE: &'static str = "interop.Order";
}

/// The script's `order(i)`.
fn order(i: u64) -> Order {
    Order {
        account_id: format!("account-{}", i % 7),
        amount: i as i64,
        price: i as f64 / 4.0,
        tags: vec![format!("t{i}"), "faust".into()],
    }
}

fn python(test: &str) -> Option<String> {
    match std::env::var("FAUST_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            eprintln!("skipping {test}: FAUST_TEST_PYTHON unset (scripts/test makes a venv with faust-streaming)");
            None
        }
    }
}

#[test]
fn faust_and_our_app_read_each_others_records() {
    let test = "faust_and_our_app_read_each_others_records";
    let Some(bin) = tansu(test) else { return };
    let Some(python) = python(test) else { return };
    let broker = Broker::start(&bin);
    let dir = tempfile::tempdir().unwrap();

    let mut settings = Settings::new("interop-rust");
    settings.broker = format!("kafka://{}", broker.addr());
    settings.datadir = dir.path().join("data");
    settings.topic_partitions = 2;
    settings.cores = Some(1);
    settings.web_enabled = false;
    settings.broker_session_timeout = Duration::from_secs(10);
    settings.broker_heartbeat_interval = Duration::from_secs(1);
    let app = App::new(settings);
    app.model::<Order>();
    let from_faust = app.topic::<String, Record<Order>>("faust-to-rust");
    let to_faust = app.topic::<String, Record<Order>>("rust-to-faust");
    let received: Arc<Mutex<BTreeMap<String, Order>>> = Arc::default();
    {
        let received = received.clone();
        app.agent("read", &from_faust, move |mut stream| {
            let received = received.clone();
            async move {
                while let Some((key, order)) = stream.next_item().await {
                    received.lock().unwrap().insert(key.unwrap_or_default(), order.into_inner());
                }
                Ok(())
            }
        });
    }
    {
        let to_faust = to_faust.clone();
        app.task(move || {
            let to_faust = to_faust.clone();
            async move {
                for i in 0..N {
                    to_faust.send(Some(&format!("k{i}")), &Record(order(i))).await?;
                }
                Ok(())
            }
        });
    }
    let runner = app.clone();
    let worker = std::thread::spawn(move || runner.run());

    // Faust → us. (Our worker created both topics as it started.)
    let start = Instant::now();
    loop {
        let out =
            Command::new(&python).args([SCRIPT, "produce", &broker.addr(), "faust-to-rust", &N.to_string()]).output();
        let out = out.expect("run interop.py");
        if out.status.success() {
            break;
        }
        // Until our worker has created the topic.
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "Faust's producer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let start = Instant::now();
    while received.lock().unwrap().len() < N as usize {
        assert!(start.elapsed() < Duration::from_secs(60), "our agent read {:?}", received.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    let expected: BTreeMap<String, Order> = (0..N).map(|i| (format!("k{i}"), order(i))).collect();
    assert_eq!(*received.lock().unwrap(), expected, "Faust's records, read by us");

    // Us → Faust: a Faust worker reads our records by their namespace.
    let out = Command::new(&python)
        .args([SCRIPT, "consume", &broker.addr(), "rust-to-faust", &N.to_string(), "interop-faust"])
        .output()
        .expect("run interop.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "Faust's worker: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let mut read_by_faust = BTreeMap::new();
    for line in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(v["class"], "Order", "Faust rebuilt our record as its model: {line}");
        let order = Order {
            account_id: v["account_id"].as_str().unwrap().to_string(),
            amount: v["amount"].as_i64().unwrap(),
            price: v["price"].as_f64().unwrap(),
            tags: v["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect(),
        };
        read_by_faust.insert(v["key"].as_str().unwrap().to_string(), order);
    }
    assert_eq!(read_by_faust, expected, "our records, read by Faust");
    assert_eq!(app.models().list(), vec![("interop.Order", std::any::type_name::<Order>())]);

    app.stop_signal().stop();
    worker.join().unwrap().expect("our worker");
}
