//! A counting app on `kafka://`: the engine's workers produce, fetch and commit through our
//! Kafka client against the broker of `FAUST_TEST_BROKER` (started by `scripts/test`), and a
//! restarted worker recovers its table from the changelog on Kafka and resumes from the
//! offsets it committed there. Skipped, with a notice, without a broker.

use std::collections::HashMap;
use std::time::Duration;

use faust::{App, Settings};

/// Runs the counting app once on `cores` cores until the counts it holds add up to
/// `expected_total` (bounded), sending `to_send` from a task; returns the counts.
fn run_on_kafka(
    broker: &str,
    id: &str,
    dir: &std::path::Path,
    cores: usize,
    to_send: &[(String, u64)],
    expected_total: u64,
) -> HashMap<String, u64> {
    let mut s = Settings::new(id);
    s.broker = format!("kafka://{broker}");
    s.datadir = dir.to_path_buf();
    s.store = "memory://".into(); // every start recovers from the changelog on Kafka
    s.topic_partitions = 3;
    s.commit_interval = Duration::from_millis(50);
    s.cores = Some(cores);
    // tansu answers each JoinGroup round after half the session timeout.
    s.broker_session_timeout = Duration::from_secs(2);
    let app = App::new(s);
    let orders = app.topic::<String, u64>(&format!("{id}-orders"));
    let counts = app.table::<String, u64>("counts").with_default(|| 0);
    let table = counts.clone();
    app.agent("count", &orders, move |mut stream| {
        let counts = table.clone();
        async move {
            while let Some((account, _)) = stream.next_item().await {
                counts.update(&account.ok_or("orders are keyed by account")?, |n| *n += 1)?;
            }
            Ok(())
        }
    });
    let (result, counted) =
        faust_tests::count_until(&app, &orders, &counts, to_send, expected_total, Duration::from_secs(90));
    result.expect("the app runs on kafka://");
    counted
}

#[test]
fn a_counting_app_runs_on_kafka_and_recovers_after_a_restart() {
    let Some(broker) = faust_tests::test_broker("a_counting_app_runs_on_kafka_and_recovers_after_a_restart") else {
        return;
    };
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let id = format!("kafka-count-{}-{}", std::process::id(), nanos % 1_000_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let batch = |from: u64, n: u64| -> Vec<(String, u64)> {
        (from..from + n).map(|i| (format!("acct-{}", i % 11), i)).collect()
    };
    let model = |n: u64| -> HashMap<String, u64> {
        let mut m = HashMap::new();
        for i in 0..n {
            *m.entry(format!("acct-{}", i % 11)).or_default() += 1;
        }
        m
    };
    assert_eq!(run_on_kafka(&broker, &id, dir.path(), 2, &batch(0, 3000), 3000), model(3000));
    // It went through the broker: the source topic holds the orders and the changelog the counts.
    let (orders, changelog) = on_broker(&broker, format!("{id}-orders"), format!("{id}-counts-changelog"));
    assert_eq!(orders, 3000);
    assert!(changelog >= 11, "changelog records {changelog}");
    // A second run: counts come back from the changelog, the source resumes where the first
    // run committed, so each order is counted once.
    assert_eq!(run_on_kafka(&broker, &id, dir.path(), 1, &batch(3000, 2000), 5000), model(5000));
}

/// The number of records in `orders` and in `changelog` (all partitions), read with our client.
fn on_broker(broker: &str, orders: String, changelog: String) -> (u64, u64) {
    use faust_transport::{CoreTransport, KafkaOptions, KafkaTransport, OffsetSpec, TopicPartition, Transport};
    let t = KafkaTransport::open(&format!("kafka://{broker}"), KafkaOptions::default()).expect("open");
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let core = t.attach_core(0, 1).await.expect("attach");
            let mut totals = Vec::new();
            for topic in [orders, changelog] {
                let meta = core.topic_metadata(&topic).await.expect("metadata").expect("the topic exists");
                let mut n = 0;
                for p in 0..meta.config.partitions {
                    let tp = TopicPartition::new(topic.as_str(), p);
                    n += core.list_offset(&tp, OffsetSpec::Latest).await.expect("latest");
                }
                totals.push(n);
            }
            (totals[0], totals[1])
        })
        .expect("executor")
        .join()
        .expect("join")
}

/// Creates `topic` on the broker with one partition, and writes `values` to it (keyed by
/// themselves, JSON strings), with our client.
fn create_with_values(broker: &str, topic: String, values: Vec<String>) {
    use faust_transport::{
        BatchBuilder, CoreTransport, KafkaOptions, KafkaTransport, TopicConfig, TopicPartition, Transport,
    };
    let t = KafkaTransport::open(&format!("kafka://{broker}"), KafkaOptions::default()).expect("open");
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let core = t.attach_core(0, 1).await.expect("attach");
            core.create_topic(&topic, &TopicConfig::new(1)).await.expect("create");
            let mut batch = BatchBuilder::new();
            for v in &values {
                let json = serde_json::to_vec(v).expect("json");
                batch.push(0, Some(v.as_bytes()), Some(&json), &[]);
            }
            core.produce(&TopicPartition::new(topic.as_str(), 0), batch).await.expect("produce");
            core.shutdown().await.expect("shutdown");
        })
        .expect("executor")
        .join()
        .expect("join")
}

#[test]
fn an_agent_on_a_pattern_consumes_the_matching_topics_on_kafka_including_new_ones() {
    let Some(broker) = faust_tests::test_broker("an_agent_on_a_pattern_consumes_the_matching_topics_on_kafka") else {
        return;
    };
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let id = format!("kafka-pattern-{}-{}", std::process::id(), nanos % 1_000_000_000);
    let values = |topic: &str, n: usize| (0..n).map(|i| format!("{topic}/{i}")).collect::<Vec<_>>();
    // Two matching topics and one that does not match, there before the worker starts.
    for (suffix, n) in [("feed-a", 3), ("feed-b", 2), ("other", 2)] {
        let topic = format!("{id}-{suffix}");
        create_with_values(&broker, topic.clone(), values(&topic, n));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = Settings::new(&id);
    s.broker = format!("kafka://{broker}");
    s.datadir = dir.path().to_path_buf();
    s.topic_partitions = 1;
    s.cores = Some(1);
    s.commit_interval = Duration::from_millis(100);
    s.broker_session_timeout = Duration::from_secs(2);
    s.topic_pattern_refresh = Duration::from_millis(500);
    let app = App::new(s);
    let seen: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let feeds = app.topics_matching::<String, String>(&format!("{id}-feed-.*")).expect("the pattern compiles");
    let record = seen.clone();
    app.agent("audit", &feeds, move |mut stream| {
        let record = record.clone();
        async move {
            while let Some(value) = stream.next().await {
                record.lock().unwrap().push(value);
            }
            Ok(())
        }
    });
    let running = faust_tests::Running::start(&app);
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let mut expected = sorted([values(&format!("{id}-feed-a"), 3), values(&format!("{id}-feed-b"), 2)].concat());
    faust_tests::wait_for("the topics there at start", Duration::from_secs(60), || {
        sorted(seen.lock().unwrap().clone()) == expected
    });
    // A matching topic created while the worker runs joins at the next refresh.
    let late = format!("{id}-feed-c");
    create_with_values(&broker, late.clone(), values(&late, 4));
    expected = sorted([expected, values(&late, 4)].concat());
    faust_tests::wait_for("the topic created later", Duration::from_secs(60), || {
        seen.lock().unwrap().len() >= expected.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sorted(seen.lock().unwrap().clone()), expected, "each event once, none of the other topic");
    running.stop();
}
