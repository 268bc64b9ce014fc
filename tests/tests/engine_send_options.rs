//! `topic.send_with`: a partition, a timestamp and headers chosen by the sender (Faust's
//! `topic.send(..., partition=, timestamp=, headers=)`), from a worker core and from another
//! thread; a partition the topic does not have is a typed error.

use std::time::{Duration, Instant};

use faust::{App, MemoryTransport, SendError, SendOptions, Settings, TopicPartition};

#[test]
fn sends_take_a_partition_a_timestamp_and_headers() {
    let transport = MemoryTransport::new();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::new("send-options");
    settings.broker = "memory://".into();
    settings.topic_partitions = 4;
    settings.cores = Some(1);
    settings.datadir = dir.path().to_path_buf();
    let app = App::new(settings).with_memory_transport(transport.clone());
    let out = app.topic::<String, u64>("out");
    let options = |partition: u32, timestamp: i64| SendOptions {
        partition: Some(partition),
        timestamp: Some(timestamp),
        headers: vec![("source".into(), b"test".to_vec()), ("source".into(), b"again".to_vec())],
    };
    {
        let out = out.clone();
        app.task(move || {
            let out = out.clone();
            async move {
                // From a worker core.
                let p = out.send_with(Some(&"k".to_string()), &1, &options(3, 1_000)).await?;
                assert_eq!(p.partition, 3);
                let e = out.send_with(None, &2, &options(9, 1_000)).await.unwrap_err();
                assert!(matches!(&e, SendError::UnknownPartition { partition: 9, partitions: 4, .. }), "{e}");
                Ok(())
            }
        });
    }
    let runner = app.clone();
    let worker = std::thread::spawn(move || runner.run());
    // From another thread: handed to core 0 with its options.
    let sent = futures_lite::future::block_on(out.send_with(None, &7, &options(1, 2_000))).expect("send from outside");
    assert_eq!(sent.partition, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    let tp = |p| TopicPartition::new("out", p);
    while transport.high_watermark(&tp(3)).unwrap_or(0) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    app.stop_signal().stop();
    worker.join().unwrap().unwrap();

    for (p, value, timestamp) in [(3, b"1", 1_000), (1, b"7", 2_000)] {
        let records = transport.records(&tp(p)).unwrap();
        assert_eq!(records.len(), 1, "partition {p}");
        let r = &records[0];
        assert_eq!((r.value.as_deref(), r.timestamp), (Some(&value[..]), timestamp));
        let headers: Vec<(&[u8], Option<&[u8]>)> = r.headers().collect();
        assert_eq!(headers, vec![(&b"source"[..], Some(&b"test"[..])), (&b"source"[..], Some(&b"again"[..]))]);
    }
    assert_eq!(transport.high_watermark(&tp(0)).unwrap_or(0) + transport.high_watermark(&tp(2)).unwrap_or(0), 0);
}
