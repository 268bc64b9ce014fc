//! Per-topic options (Faust's `app.topic(..., partitions=, replicas=, retention=,
//! compacting=, config=)`): the worker creates a declared topic with them; broker settings
//! every transport understands (`cleanup.policy`, `retention.ms`...) apply everywhere and win
//! over the options; an explicit partition count that an existing topic does not have stops
//! the worker with the topic named.

use std::time::Duration;

use faust::{App, MemoryTransport, Settings, TopicConfig, TopicOptions};
use faust_transport::CoreTransport;
use futures_lite::future::block_on;

fn app(transport: &MemoryTransport, dir: &std::path::Path) -> App {
    let mut settings = Settings::new("options");
    settings.broker = "memory://".into();
    settings.cores = Some(1);
    settings.topic_partitions = 2;
    settings.datadir = dir.to_path_buf();
    App::new(settings).with_memory_transport(transport.clone())
}

fn run_briefly(app: &App) -> Result<(), faust::WorkerError> {
    let stop = app.stop_signal();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        stop.stop();
    });
    let result = app.run();
    stopper.join().unwrap();
    result
}

#[test]
fn declared_topics_are_created_with_their_options() {
    let dir = tempfile::tempdir().unwrap();
    let transport = MemoryTransport::new();
    let app = app(&transport, dir.path());
    let orders = app.topic::<String, u64>("orders");
    let audit = app.topic::<String, u64>("audit");
    let plain = app.topic::<String, u64>("plain");
    app.configure_topic(
        orders.name(),
        TopicOptions::new()
            .partitions(3)
            .replicas(3)
            .retention(Duration::from_secs(3600))
            .retention_bytes(1 << 30)
            .broker_config("min.insync.replicas", "2"),
    );
    // Broker settings by name: understood by every transport, and they win.
    app.configure_topic(
        audit.name(),
        TopicOptions::new()
            .retention(Duration::from_secs(60))
            .broker_config("cleanup.policy", "compact,delete")
            .broker_config("retention.ms", "86400000"),
    );
    app.agent("read", &orders, |mut s| async move {
        while s.next().await.is_some() {}
        Ok(())
    });
    run_briefly(&app).expect("the worker runs");

    let config = |name: &str| block_on(transport.topic_metadata(name)).unwrap().unwrap().config;
    let expected = TopicConfig {
        replicas: Some(3),
        retention: Some(Duration::from_secs(3600)),
        retention_bytes: Some(1 << 30),
        broker_config: vec![("min.insync.replicas".into(), "2".into())],
        ..TopicConfig::new(3)
    };
    assert_eq!(config("orders"), expected);
    let audit = config("audit");
    assert!(audit.compacted, "{audit:?}");
    assert_eq!(audit.retention, Some(Duration::from_secs(86_400)), "the broker setting wins: {audit:?}");
    assert_eq!(audit.partitions, 2, "the app's default count");
    assert_eq!(config(plain.name()), TopicConfig::new(2));
}

#[test]
fn a_partition_count_an_existing_topic_does_not_have_stops_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let transport = MemoryTransport::new();
    transport.create_topic_now("orders", &TopicConfig::new(4)).unwrap();
    let app = app(&transport, dir.path());
    let orders = app.topic::<String, u64>("orders");
    app.configure_topic(orders.name(), TopicOptions::new().partitions(6));
    app.agent("read", &orders, |mut s| async move {
        while s.next().await.is_some() {}
        Ok(())
    });
    let e = run_briefly(&app).expect_err("6 partitions asked of a 4-partition topic").to_string();
    assert!(e.contains("orders") && e.contains('4') && e.contains('6'), "{e}");
}
