//! Agents on topic patterns (Faust's `app.topic(pattern=...)`): the matching topics that
//! exist when the worker starts, and those created while it runs, consumed in one stream,
//! each event once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faust::{App, MemoryTransport, Settings, TopicConfig};
use faust_tests::{Running, wait_for};
use futures_lite::future::block_on;

/// What the agent saw: per topic, the values in arrival order.
type Seen = Arc<Mutex<BTreeMap<String, Vec<String>>>>;

/// An app whose agent `audit` consumes every `orders-*` topic, recording what it sees.
fn auditing_app(settings: Settings) -> (App, faust::Agent<String, String>, Seen) {
    let app = App::new(settings);
    let seen: Seen = Arc::default();
    let orders = app.topics_matching::<String, String>("orders-[a-z]+").expect("the pattern compiles");
    let record = seen.clone();
    let agent = app.agent("audit", &orders, move |mut stream| {
        let record = record.clone();
        async move {
            while let Some(event) = stream.next_event().await {
                record.lock().unwrap().entry(event.tp.topic.to_string()).or_default().push(event.value);
            }
            Ok(())
        }
    });
    (app, agent, seen)
}

/// Per topic, the values seen, in any order (partitions interleave).
fn as_sets(seen: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, BTreeSet<String>> {
    seen.iter().map(|(topic, values)| (topic.clone(), values.iter().cloned().collect())).collect()
}

fn values(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[test]
fn topics_created_while_the_worker_runs_join_the_stream_and_nothing_is_seen_twice() {
    let mut settings = Settings::new("shop");
    settings.broker = "memory://".into();
    settings.topic_partitions = 2;
    settings.cores = Some(1);
    settings.topic_pattern_refresh = Duration::from_millis(100);
    let transport = MemoryTransport::new();
    let (app, audit, seen) = auditing_app(settings);
    let app = app.with_memory_transport(transport.clone());
    // Declared by the app itself: matched from the start.
    let eu = app.topic::<String, String>("orders-eu");
    let running = Running::start(&app);
    for v in values("eu", 5) {
        block_on(eu.send(Some(&v), &v)).unwrap();
    }
    wait_for("the declared topic's events", Duration::from_secs(20), || {
        seen.lock().unwrap().get("orders-eu").is_some_and(|v| v.len() == 5)
    });
    // Created while the worker runs (as another app or an admin would): found at the next
    // refresh, which restarts the run with the new subscription; and a topic that does not
    // match, never consumed.
    for name in ["orders-us", "payments"] {
        transport.create_topic_now(name, &TopicConfig::new(2)).unwrap();
    }
    let us = app.topic::<String, String>("orders-us");
    let payments = app.topic::<String, String>("payments");
    for v in values("us", 4) {
        block_on(us.send(Some(&v), &v)).unwrap();
    }
    block_on(payments.send(Some(&"p".to_string()), &"p".to_string())).unwrap();
    // The agent's own topic takes what is sent to the agent.
    block_on(audit.send(Some(&"direct".to_string()), &"direct".to_string())).unwrap();
    for v in values("eu-late", 3) {
        block_on(eu.send(Some(&v), &v)).unwrap();
    }
    let expected: BTreeMap<String, Vec<String>> = [
        ("orders-eu", [values("eu", 5), values("eu-late", 3)].concat()),
        ("orders-us", values("us", 4)),
        ("shop-audit", vec!["direct".to_string()]),
    ]
    .into_iter()
    .map(|(t, v)| (t.to_string(), v))
    .collect();
    wait_for("the new topic's events", Duration::from_secs(20), || {
        seen.lock().unwrap().values().map(Vec::len).sum::<usize>() >= 13
    });
    // A moment for anything seen twice (a restart re-reading what was processed) to show.
    std::thread::sleep(Duration::from_millis(500));
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.values().map(Vec::len).sum::<usize>(), 13, "each event once: {got:?}");
    assert_eq!(as_sets(&got), as_sets(&expected));
    running.stop();
}

#[test]
fn topics_already_on_the_embedded_log_are_consumed_from_the_first_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::new("shop2");
    settings.datadir = dir.path().to_path_buf();
    settings.topic_partitions = 2;
    settings.cores = Some(1);
    // A first app writes the topics (and one that does not match), then stops.
    {
        let writer = App::new(settings.clone());
        let topics: Vec<_> = ["orders-eu", "orders-us", "orders-2024", "returns"]
            .into_iter()
            .map(|name| writer.topic::<String, String>(name))
            .collect();
        let running = Running::start(&writer);
        for topic in &topics {
            for v in values(topic.name(), 3) {
                block_on(topic.send(Some(&v), &v)).unwrap();
            }
        }
        running.stop();
    }
    // The auditing app declares none of them: its pattern finds them on disk at start.
    let (app, _, seen) = auditing_app(settings);
    let running = Running::start(&app);
    let expected: BTreeMap<String, Vec<String>> =
        ["orders-eu", "orders-us"].into_iter().map(|t| (t.to_string(), values(t, 3))).collect();
    wait_for("both matching topics", Duration::from_secs(20), || as_sets(&seen.lock().unwrap()) == as_sets(&expected));
    std::thread::sleep(Duration::from_millis(300));
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.values().map(Vec::len).sum::<usize>(), 6, "each event once: {got:?}");
    assert_eq!(as_sets(&got), as_sets(&expected), "orders-2024 (digits) and returns do not match");
    running.stop();
}
