//! Manual acks (Faust's `stream.noack()` and `event.ack()`): an event the agent has not
//! acked holds back its partition's commit however far the agent moved on, acked events are
//! committed, and an agent that fails gets its unacked events again, with their table
//! writes undone.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use faust::{App, MemoryTransport, Settings, TopicConfig, TopicPartition};
use faust_storage::BatchBuilder;
use faust_tests::wait_for;
use faust_transport::CoreTransport;
use futures_lite::future::block_on;

const GROUP: &str = "noack";

fn transport_with(events: u64) -> MemoryTransport {
    let transport = MemoryTransport::new();
    transport.create_topic_now("events", &TopicConfig::new(1)).unwrap();
    let mut batch = BatchBuilder::new();
    for i in 0..events {
        batch.push(0, None, Some(i.to_string().as_bytes()), &[]);
    }
    block_on(transport.produce(&TopicPartition::new("events", 0), batch)).unwrap();
    transport
}

fn app(transport: &MemoryTransport, dir: &std::path::Path) -> App {
    let mut settings = Settings::new(GROUP);
    settings.broker = "memory://".into();
    settings.cores = Some(1);
    settings.topic_partitions = 1;
    settings.datadir = dir.to_path_buf();
    settings.commit_interval = Duration::from_millis(50);
    settings.shutdown_timeout = Duration::from_millis(300);
    App::new(settings).with_memory_transport(transport.clone())
}

fn committed(transport: &MemoryTransport) -> u64 {
    block_on(transport.committed(GROUP, &[TopicPartition::new("events", 0)])).unwrap()[0].unwrap_or(0)
}

#[test]
fn unacked_events_hold_the_commit_back_and_acked_ones_are_committed() {
    let dir = tempfile::tempdir().unwrap();
    let transport = transport_with(25);
    let app = app(&transport, dir.path());
    let events = app.topic::<String, u64>("events");
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = seen.clone();
        app.agent("hold", &events, move |stream| {
            let seen = seen.clone();
            async move {
                let mut stream = stream.noack();
                let mut held = Vec::new();
                while let Some(event) = stream.next_event().await {
                    seen.lock().unwrap().push(event.value);
                    held.push(event);
                    // Acked ten at a time: the last five stay unacked.
                    if held.len() == 10 {
                        held.drain(..).for_each(|e| e.ack());
                    }
                }
                // Still waiting on something for those five when the worker stops: cancelled
                // after the shutdown timeout, with them unacked.
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }
    let runner = app.clone();
    let worker = std::thread::spawn(move || runner.run());
    wait_for("25 events seen", Duration::from_secs(20), || seen.lock().unwrap().len() == 25);
    wait_for("the acked 20 committed", Duration::from_secs(20), || committed(&transport) == 20);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(committed(&transport), 20, "the 5 unacked events hold the commit at 20");
    app.stop_signal().stop();
    worker.join().unwrap().unwrap();
    assert_eq!(committed(&transport), 20, "nor does stopping commit them");

    // The next run starts at the first unacked event.
    let again = self::app(&transport, dir.path());
    let events = again.topic::<String, u64>("events");
    let resumed = Arc::new(Mutex::new(Vec::new()));
    {
        let resumed = resumed.clone();
        again.agent("hold", &events, move |mut stream| {
            let resumed = resumed.clone();
            async move {
                while let Some(v) = stream.next().await {
                    resumed.lock().unwrap().push(v);
                }
                Ok(())
            }
        });
    }
    let runner = again.clone();
    let worker = std::thread::spawn(move || runner.run());
    wait_for("the 5 unacked events again", Duration::from_secs(20), || resumed.lock().unwrap().len() == 5);
    again.stop_signal().stop();
    worker.join().unwrap().unwrap();
    assert_eq!(*resumed.lock().unwrap(), (20..25).collect::<Vec<u64>>());
    assert_eq!(committed(&transport), 25);
}

#[test]
fn a_failing_agent_gets_its_unacked_events_again_with_their_writes_undone() {
    let dir = tempfile::tempdir().unwrap();
    let transport = transport_with(10);
    let app = app(&transport, dir.path());
    let events = app.topic::<String, u64>("events");
    let sums = app.table::<String, u64>("sums").with_default(|| 0);
    let attempts = Arc::new(Mutex::new(Vec::<Vec<u64>>::new()));
    {
        let (attempts, sums) = (attempts.clone(), sums.clone());
        app.agent("sum", &events, move |stream| {
            let (attempts, sums) = (attempts.clone(), sums.clone());
            async move {
                let mut stream = stream.noack();
                attempts.lock().unwrap().push(Vec::new());
                let first_attempt = attempts.lock().unwrap().len() == 1;
                let mut held = Vec::new();
                while let Some(event) = stream.next_event().await {
                    attempts.lock().unwrap().last_mut().unwrap().push(event.value);
                    sums.update(&"all".to_string(), |s| *s += event.value)?;
                    held.push(event);
                    // The first attempt fails with events 6, 7 and 8 in hand, unacked.
                    if first_attempt && held.last().is_some_and(|e| e.value == 8) {
                        return Err("failed with three events in hand".into());
                    }
                    if held.len() == 3 {
                        held.drain(..).for_each(|e| e.ack());
                    }
                }
                Ok(())
            }
        });
    }
    let runner = app.clone();
    let worker = std::thread::spawn(move || runner.run());
    wait_for("all 10 events processed", Duration::from_secs(20), || {
        attempts.lock().unwrap().iter().map(Vec::len).sum::<usize>() >= 13
    });
    wait_for("everything acked is committed", Duration::from_secs(20), || committed(&transport) >= 9);
    app.stop_signal().stop();
    worker.join().unwrap().unwrap();
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts[0], (0..9).collect::<Vec<u64>>(), "{attempts:?}");
    assert_eq!(attempts[1], (6..10).collect::<Vec<u64>>(), "the unacked 6, 7 and 8 again, then 9: {attempts:?}");
    // 0 + 1 + ... + 9, each once: the failed attempt's writes for 6, 7 and 8 were undone.
    let total: u64 = (0..10).sum();
    let changelog = transport.records(&TopicPartition::new("noack-sums-changelog", 0)).unwrap();
    let last = changelog.last().and_then(|r| r.value.as_deref()).map(|v| String::from_utf8_lossy(v).to_string());
    assert_eq!(last.as_deref(), Some(total.to_string().as_str()), "{changelog:?}");
}
