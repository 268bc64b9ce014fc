//! Stream processors, buffered sends, sends from outside the worker, channels, agent
//! handles and concurrency, on real workers over `memory://` (most through the
//! `test_context` harness).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use faust::{App, SendError, Settings, TopicPartition};
use faust_transport::CoreTransport;

fn settings(id: &str, partitions: u32) -> Settings {
    let mut s = Settings::new(id);
    s.topic_partitions = partitions;
    s.commit_interval = Duration::from_millis(20);
    s
}

/// An app on a `memory://` transport of its own, with the transport.
fn memory_app(id: &str, partitions: u32, cores: usize) -> (App, faust::MemoryTransport) {
    let mut s = settings(id, partitions);
    s.broker = "memory://".into();
    s.cores = Some(cores);
    let transport = faust::MemoryTransport::new();
    (App::new(s).with_memory_transport(transport.clone()), transport)
}

#[test]
fn filter_echo_map_and_enumerate_compose() {
    let app = App::new(settings("stages", 2));
    let numbers = app.topic::<String, u64>("numbers");
    let evens = app.topic::<String, u64>("evens");
    let out = app.topic::<String, (u64, u64)>("out");
    let (evens2, out2) = (evens.clone(), out.clone());
    app.agent("stages", &numbers, move |stream| {
        let (evens, out) = (evens2.clone(), out2.clone());
        async move {
            let mut stream = stream.filter(|n| n % 2 == 0).echo(&evens).map(|n| n * 10).enumerate();
            while let Some((key, (i, n))) = stream.next_item().await {
                out.send_soon(key.as_ref(), &(i, n))?;
            }
            Ok(())
        }
    });
    let test = app.test_context().unwrap();
    for n in 0..20u64 {
        test.put(&numbers, Some(&format!("k{n}")), &n).unwrap();
    }
    let echoed: BTreeSet<u64> = test.records(&evens).unwrap().into_iter().map(|(_, v)| v).collect();
    assert_eq!(echoed, (0..20).filter(|n| n % 2 == 0).collect());
    let mut mapped: Vec<(u64, u64)> = test.records(&out).unwrap().into_iter().map(|(_, v)| v).collect();
    mapped.sort();
    // Put one at a time, so the count follows the order they were put in.
    let expected: Vec<(u64, u64)> = (0..10).map(|i| (i, i * 20)).collect();
    assert_eq!(mapped, expected);
    // Keys are kept through map and enumerate.
    assert!(test.records(&out).unwrap().iter().all(|(k, (_, n))| k.as_deref() == Some(&*format!("k{}", n / 10))));
    test.stop().unwrap();
}

/// Regression: `put` on a topic that no agent consumes waited for acks that never come (it
/// hung); it returns once the record is written.
#[test]
fn put_on_a_topic_nothing_consumes_returns_once_written() {
    let app = App::new(settings("unconsumed", 2));
    let audit = app.topic::<String, u64>("audit");
    let test = app.test_context().unwrap();
    let start = Instant::now();
    for n in 0..3u64 {
        test.put(&audit, Some(&format!("k{n}")), &n).unwrap();
    }
    assert!(start.elapsed() < Duration::from_secs(10), "put waited {:?}", start.elapsed());
    assert_eq!(test.records(&audit).unwrap().len(), 3);
    test.stop().unwrap();
}

#[test]
fn buffered_sends_are_written_when_the_worker_stops() {
    let mut s = settings("flush-at-stop", 3);
    s.broker = "memory://".into();
    s.cores = Some(1);
    let transport = faust::MemoryTransport::new();
    let app = App::new(s).with_memory_transport(transport.clone());
    let out = app.topic::<String, u64>("out");
    let stop = app.stop_signal();
    app.task(move || {
        let (out, stop) = (out.clone(), stop.clone());
        async move {
            for n in 0..1000u64 {
                out.send_soon(Some(&format!("k{n}")), &n)?;
            }
            // Stop at once: nothing gave the buffer a chance to be written yet.
            stop.stop();
            Ok(())
        }
    });
    app.run().unwrap();
    let held: u64 = (0..3).map(|p| transport.high_watermark(&TopicPartition::new("out", p)).unwrap()).sum();
    assert_eq!(held, 1000);
}

#[test]
fn sends_from_other_threads_reach_the_worker_and_fail_clearly_after_it_stops() {
    let (app, transport) = memory_app("outside", 2, 2);
    let input = app.topic::<String, u64>("input");
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    app.agent("count", &input, move |mut stream| {
        let counter = counter.clone();
        async move {
            while stream.next().await.is_some() {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        }
    });
    // Sent before the worker starts: kept until it does.
    for n in 0..50u64 {
        input.send_soon(Some(&format!("early{n}")), &n).unwrap();
    }
    let stop = app.stop_signal();
    let sender = {
        let input = input.clone();
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut offsets = Vec::new();
            for n in 0..50u64 {
                let produced = futures_lite::future::block_on(input.send(Some(&format!("late{n}")), &n)).unwrap();
                offsets.push(produced);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while seen.load(Ordering::SeqCst) < 100 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.stop();
            offsets
        })
    };
    app.run().unwrap();
    let produced = sender.join().unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 100);
    assert!(produced.iter().all(|p| p.partition < 2 && p.base_offset == p.last_offset));
    let held: u64 = (0..2).map(|p| transport.high_watermark(&TopicPartition::new("input", p)).unwrap()).sum();
    assert_eq!(held, 100);
    match input.send_soon(None, &1) {
        Err(SendError::Stopped { topic }) => assert_eq!(topic, "input"),
        other => panic!("expected Stopped, got {other:?}"),
    }
    let awaited = futures_lite::future::block_on(input.send(None, &1));
    assert!(matches!(awaited, Err(SendError::Stopped { .. })), "{awaited:?}");
}

/// A thread that sends faster than the worker takes its records waits, as a Kafka producer
/// waits on a full buffer, instead of queueing without end: while core 0 is held up, no more
/// than the outbox's bound (8 MiB) is queued, and every record still arrives.
#[test]
fn a_sender_faster_than_the_worker_waits_for_room() {
    const RECORDS: usize = 200;
    const VALUE_BYTES: usize = 64 << 10;
    let (app, transport) = memory_app("outbox-bound", 1, 1);
    let trigger = app.topic::<String, u64>("trigger");
    let big = app.topic::<String, String>("big");
    // 0: not yet; 1: core 0 is held up; 2: it goes on.
    let phase = Arc::new(AtomicUsize::new(0));
    let held = phase.clone();
    app.agent("hold", &trigger, move |mut stream| {
        let held = held.clone();
        async move {
            while stream.next().await.is_some() {
                held.store(1, Ordering::SeqCst);
                // Blocks the core's thread, so nothing takes the outbox meanwhile.
                std::thread::sleep(Duration::from_millis(700));
                held.store(2, Ordering::SeqCst);
            }
            Ok(())
        }
    });
    let stop = app.stop_signal();
    let sender = {
        let (trigger, big, phase, transport) = (trigger.clone(), big.clone(), phase.clone(), transport.clone());
        std::thread::spawn(move || {
            trigger.send_soon(None, &1).unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while phase.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            let value = "x".repeat(VALUE_BYTES);
            let mut sent_while_held = 0;
            for n in 0..RECORDS {
                big.send_soon(Some(&format!("k{n}")), &value).unwrap();
                if phase.load(Ordering::SeqCst) == 1 {
                    sent_while_held += 1;
                }
            }
            let arrived = || transport.high_watermark(&TopicPartition::new("big", 0)).unwrap_or(0);
            while arrived() < RECORDS as u64 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.stop();
            sent_while_held
        })
    };
    app.run().unwrap();
    let sent_while_held = sender.join().unwrap();
    // Each record is its value's JSON (the bytes and two quotes) and its key.
    let bound = (8 << 20) / VALUE_BYTES + 1;
    assert!(
        sent_while_held <= bound,
        "{sent_while_held} records of {VALUE_BYTES} B were queued while the worker was held up (bound {bound})"
    );
    let records = transport.records(&TopicPartition::new("big", 0)).unwrap();
    assert_eq!(records.len(), RECORDS, "every record arrives");
    let keys: Vec<String> =
        records.iter().map(|r| String::from_utf8(r.key.as_deref().unwrap().to_vec()).unwrap()).collect();
    let expected: Vec<String> = (0..RECORDS).map(|n| format!("k{n}")).collect();
    assert_eq!(keys, expected, "in the order they were sent");
}

#[test]
fn channels_hand_events_to_agents_in_memory() {
    let app = App::new(settings("channels", 2));
    let commands = app.channel::<String, String>("commands");
    let log = app.topic::<String, String>("log");
    let out = log.clone();
    app.agent("shout", &commands, move |mut stream| {
        let out = out.clone();
        async move {
            while let Some((key, command)) = stream.next_item().await {
                out.send(key.as_ref(), &command.to_uppercase()).await?;
            }
            Ok(())
        }
    });
    let test = app.test_context().unwrap();
    test.put(&commands, Some(&"a".to_string()), &"start".to_string()).unwrap();
    test.put(&commands, None, &"stop".to_string()).unwrap();
    let mut logged: Vec<String> = test.records(&log).unwrap().into_iter().map(|(_, v)| v).collect();
    logged.sort();
    assert_eq!(logged, vec!["START".to_string(), "STOP".to_string()]);
    // Nothing of the channel reaches the transport: no topic, no commits.
    let channel_topic = futures_lite::future::block_on(test.transport().topic_metadata("commands")).unwrap();
    assert!(channel_topic.is_none());
    assert!(test.records(&commands).unwrap().is_empty());
    test.stop().unwrap();
}

#[test]
fn agent_handles_send_and_cast_and_concurrency_overlaps_events() {
    let app = App::new(settings("concurrent", 1));
    let jobs = app.topic::<String, u64>("jobs");
    let (running, max_running, done) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let counters = (running.clone(), max_running.clone(), done.clone());
    let agent = app
        .agent("slow", &jobs, move |mut stream| {
            let (running, max_running, done) = counters.clone();
            async move {
                while stream.next().await.is_some() {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    max_running.fetch_max(now, Ordering::SeqCst);
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                }
                Ok(())
            }
        })
        .concurrency(4);
    let test = app.test_context().unwrap();
    for n in 0..39u64 {
        agent.cast(Some(&format!("k{n}")), &n).unwrap();
    }
    // `put` waits for the last one and, as offsets commit in order, everything before it.
    test.put(agent.topic(), Some(&"last".to_string()), &39).unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 40);
    let overlap = max_running.load(Ordering::SeqCst);
    assert!((2..=4).contains(&overlap), "at most 4 and more than 1 at a time, saw {overlap}");
    let transport = test.transport().clone();
    test.stop().unwrap();
    let tp = TopicPartition::new("jobs", 0);
    let committed = futures_lite::future::block_on(transport.committed("concurrent", std::slice::from_ref(&tp)));
    assert_eq!(committed.unwrap(), vec![Some(40)], "committed through the last event");
}

#[test]
fn agent_send_waits_for_the_record_to_be_written() {
    let app = App::new(settings("agent-send", 1));
    let jobs = app.topic::<String, u64>("jobs");
    let agent = app.agent("sink", &jobs, |mut stream| async move {
        while stream.next().await.is_some() {}
        Ok(())
    });
    let test = app.test_context().unwrap();
    let produced = futures_lite::future::block_on(agent.send(None, &7)).unwrap();
    assert_eq!((produced.partition, produced.base_offset), (0, 0));
    assert_eq!(test.transport().high_watermark(&TopicPartition::new("jobs", 0)).unwrap(), 1);
    test.stop().unwrap();
}

#[test]
fn agents_yield_to_topic_agent_and_callback_sinks() {
    let app = App::new(settings("sinks", 2));
    let words = app.topic::<String, String>("words");
    let lengths = app.topic::<String, u64>("lengths");
    let relayed = app.topic::<String, u64>("relayed");
    // A second agent receives the lengths through an agent sink and relays them.
    let relay_out = relayed.clone();
    let relay = app.agent("relay", &app.topic::<String, u64>("relay-in"), move |mut stream| {
        let out = relay_out.clone();
        async move {
            while let Some(n) = stream.next().await {
                out.send_soon(None, &(n * 100))?;
            }
            Ok(())
        }
    });
    let called = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = called.clone();
    let sinks = vec![
        faust::Sink::topic(&lengths),
        faust::Sink::agent(&relay),
        faust::Sink::callback(move |n: &u64| log.lock().unwrap().push(*n)),
    ];
    app.agent_with_sinks("lengths", &words, sinks, |mut stream, sinks| async move {
        while let Some(word) = stream.next().await {
            sinks.emit(&(word.len() as u64))?;
        }
        Ok(())
    });
    let test = app.test_context().unwrap();
    for word in ["a", "bb", "ccc"] {
        test.put(&words, Some(&word.to_string()), &word.to_string()).unwrap();
    }
    // The relay agent's input was cast, not waited for: wait for its output.
    let deadline = Instant::now() + Duration::from_secs(10);
    while test.records(&relayed).unwrap().len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let sorted = |mut v: Vec<u64>| {
        v.sort();
        v
    };
    let values = |records: Vec<(Option<String>, u64)>| sorted(records.into_iter().map(|(_, v)| v).collect());
    assert_eq!(values(test.records(&lengths).unwrap()), vec![1, 2, 3]);
    assert_eq!(values(test.records(&relayed).unwrap()), vec![100, 200, 300]);
    assert_eq!(sorted(called.lock().unwrap().clone()), vec![1, 2, 3]);
    test.stop().unwrap();
}

#[test]
fn through_moves_records_to_another_topic_for_its_agents() {
    let app = App::new(settings("through", 2));
    let raw = app.topic::<String, u64>("raw");
    let by_key = app.topic_with::<String, u64>("by-key", faust::Codec::RAW, faust::Codec::JSON);
    app.through(&raw, &by_key);
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    app.agent("count", &by_key, move |mut stream| {
        let counter = counter.clone();
        async move {
            while let Some(event) = stream.next_event().await {
                assert_eq!(event.tp.topic.as_ref(), "by-key");
                counter.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        }
    });
    let test = app.test_context().unwrap();
    for n in 0..20u64 {
        test.put(&raw, Some(&format!("k{n}")), &n).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.load(Ordering::SeqCst) < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(seen.load(Ordering::SeqCst), 20);
    let mut moved: Vec<u64> = test.records(&by_key).unwrap().into_iter().map(|(_, v)| v).collect();
    moved.sort();
    assert_eq!(moved, (0..20).collect::<Vec<_>>());
    test.stop().unwrap();
}

#[test]
fn a_second_test_context_on_the_same_app_starts_afresh() {
    let app = App::new(settings("twice", 1));
    let input = app.topic::<String, u64>("input");
    let output = app.topic::<String, u64>("output");
    let out = output.clone();
    app.agent("copy", &input, move |mut stream| {
        let out = out.clone();
        async move {
            while let Some((key, n)) = stream.next_item().await {
                out.send_soon(key.as_ref(), &n)?;
            }
            Ok(())
        }
    });
    for round in 0..2u64 {
        let test = app.test_context().unwrap();
        test.put(&input, None, &round).unwrap();
        // Each context has its own memory:// transport: only this round's record.
        assert_eq!(test.records(&output).unwrap(), vec![(None, round)]);
        test.stop().unwrap();
    }
}

#[test]
fn keys_are_decoded_only_for_agents_that_can_see_them() {
    // Keys that do not decode as the topic's key type (`u64` under the raw codec): an agent
    // reading values only (`next`) never decodes them, one reading events skips such records.
    let app = App::new(settings("lazy-keys", 1));
    let numbers = app.topic::<u64, u64>("numbers");
    let values = app.topic::<String, u64>("values");
    let events = app.topic::<String, u64>("events");
    let (values2, events2) = (values.clone(), events.clone());
    app.agent("values", &numbers, move |mut stream| {
        let values = values2.clone();
        async move {
            while let Some(n) = stream.next().await {
                values.send_soon(None, &n)?;
            }
            Ok(())
        }
    });
    app.agent("events", &numbers, move |mut stream| {
        let events = events2.clone();
        async move {
            while let Some(e) = stream.next_event().await {
                events.send_soon(None, &e.value)?;
            }
            Ok(())
        }
    });
    let test = app.test_context().unwrap();
    let tp = TopicPartition::new("numbers", 0);
    // The worker may not have created it yet (it keeps an existing one).
    test.transport().create_topic_now("numbers", &faust::TopicConfig::new(1)).unwrap();
    for n in 0..3u64 {
        let mut batch = faust::storage::BatchBuilder::new();
        batch.push(0, Some(b"not-a-number"), Some(n.to_string().as_bytes()), &[]);
        let produced = futures_lite::future::block_on(test.transport().produce(&tp, batch)).unwrap();
        assert_eq!(produced.base_offset, n);
    }
    // A good record after them, put through the harness so it waits for both agents.
    test.put(&numbers, None, &3).unwrap();
    let seen = |topic| test.records(topic).unwrap().into_iter().map(|(_, v)| v).collect::<Vec<u64>>();
    assert_eq!(seen(&values), vec![0, 1, 2, 3]);
    assert_eq!(seen(&events), vec![3], "records whose key does not decode are skipped by next_event");
    test.stop().unwrap();
}
