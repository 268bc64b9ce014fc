//! Agent RPC (Faust's `agent.ask`, `map`, `kvmap`, `join`, `kvjoin`): a question reaches the
//! agent as an event, what the agent emits for it reaches both its sinks and the asker, from
//! another thread or from a task on a core; `join` keeps the order of the questions; an agent
//! that does not answer is a typed timeout; asking before the worker runs is a typed error;
//! and with two workers sharing a `memory://` group, questions answered by the other worker
//! come back to the asker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust::{Agent, App, AskError, MemoryTransport, Settings, Sink};
use faust_tests::{Running, wait_for_group};
use futures_lite::future::block_on;

const PATIENCE: Duration = Duration::from_secs(10);

/// An app with agent `double` (replies 2n, and sends 2n to its callback sink) and agent
/// `silent` (never emits).
fn app(settings: Settings, seen: &Arc<Mutex<Vec<u64>>>) -> (App, Agent<String, u64>, Agent<String, u64>) {
    let app = App::new(settings);
    let numbers = app.topic::<String, u64>("numbers");
    let ignored = app.topic::<String, u64>("ignored");
    let log = seen.clone();
    let sinks = vec![Sink::callback(move |n: &u64| log.lock().unwrap().push(*n))];
    let double = app.agent_with_sinks("double", &numbers, sinks, |mut stream, sinks| async move {
        while let Some(n) = stream.next().await {
            sinks.emit(&(n * 2))?;
        }
        Ok(())
    });
    let silent = app.agent_with_sinks("silent", &ignored, Vec::<Sink<u64>>::new(), |mut stream, _sinks| async move {
        while stream.next().await.is_some() {}
        Ok(())
    });
    (app, double, silent)
}

fn local_settings(dir: &std::path::Path) -> Settings {
    let mut settings = Settings::new("rpc");
    settings.datadir = dir.to_path_buf();
    settings.topic_partitions = 4;
    settings.cores = Some(2);
    settings
}

/// Asks until the worker answers (it is ready once its partitions are assigned).
fn first_answer(double: &Agent<String, u64>) -> u64 {
    let start = Instant::now();
    loop {
        match block_on(double.ask::<u64>(None, &21, Duration::from_millis(500))) {
            Ok(n) => return n,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(30), "no answer within 30 s: {e}"),
        }
    }
}

#[test]
fn questions_get_the_agents_values_and_its_sinks_get_them_too() {
    let dir = tempfile::tempdir().unwrap();
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let (app, double, silent) = app(local_settings(dir.path()), &seen);
    // From a task on a core, too.
    let on_core = Arc::new(AtomicU64::new(0));
    {
        let (double, on_core) = (double.clone(), on_core.clone());
        app.task(move || {
            let (double, on_core) = (double.clone(), on_core.clone());
            async move {
                let n: u64 = double.ask(Some(&"k".to_string()), &50, PATIENCE).await?;
                on_core.store(n, Ordering::SeqCst);
                Ok(())
            }
        });
    }
    let e = block_on(double.ask::<u64>(None, &1, PATIENCE)).unwrap_err();
    assert!(matches!(e, AskError::NotRunning { .. }), "before the worker runs: {e}");

    let running = Running::start(&app);
    assert_eq!(first_answer(&double), 42);
    let start = Instant::now();
    while on_core.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < PATIENCE, "the task's question was answered");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(on_core.load(Ordering::SeqCst), 100);

    // join: in the order asked, whatever partition (and core) answered each.
    let values: Vec<u64> = (1..=40).collect();
    let joined: Vec<u64> = block_on(double.join(values.clone(), PATIENCE)).unwrap();
    assert_eq!(joined, values.iter().map(|v| v * 2).collect::<Vec<_>>());
    // kvjoin: with the keys, in order (keys spread the questions over the partitions).
    let items: Vec<(String, u64)> = (0..20).map(|i| (format!("key-{i}"), i)).collect();
    let kv: Vec<(String, u64)> = block_on(double.kvjoin(items.clone(), PATIENCE)).unwrap();
    assert_eq!(kv, items.iter().map(|(k, v)| (k.clone(), v * 2)).collect::<Vec<_>>());
    // map and kvmap: every reply, as they arrive.
    let mut stream = block_on(double.map::<u64>(vec![5, 6, 7], PATIENCE)).unwrap();
    let mut got = Vec::new();
    while let Some(reply) = block_on(stream.next()) {
        got.push(reply.unwrap());
    }
    got.sort();
    assert_eq!(got, vec![10, 12, 14]);
    let mut stream = block_on(double.kvmap::<u64>(vec![("a".to_string(), 1), ("b".to_string(), 2)], PATIENCE)).unwrap();
    let mut pairs = Vec::new();
    while let Some(reply) = block_on(stream.next()) {
        pairs.push(reply.unwrap());
    }
    pairs.sort();
    assert_eq!(pairs, vec![("a".to_string(), 2), ("b".to_string(), 4)]);

    // An agent that never answers: a typed timeout after the time given.
    let asked = Instant::now();
    let e = block_on(silent.ask::<u64>(None, &1, Duration::from_millis(300))).unwrap_err();
    assert!(matches!(e, AskError::Timeout { ref agent, .. } if agent == "silent"), "{e}");
    assert!(asked.elapsed() >= Duration::from_millis(300) && asked.elapsed() < Duration::from_secs(5));
    // A reply that is not what the asker expects: a typed decode error.
    let e = block_on(double.ask::<String>(None, &1, PATIENCE)).unwrap_err();
    assert!(matches!(e, AskError::Decode { .. }), "{e}");
    running.stop();

    // The sinks got every value the agent emitted, the answers included.
    let seen = seen.lock().unwrap();
    for n in [42, 100, 10, 12, 14, 2, 4] {
        assert!(seen.contains(&n), "{n} in the sink: {seen:?}");
    }
    let e = block_on(double.ask::<u64>(None, &1, PATIENCE)).unwrap_err();
    assert!(matches!(e, AskError::NotRunning { .. }), "after the worker stopped: {e}");
}

#[test]
fn answers_from_another_worker_come_back_to_the_asker() {
    let dir = tempfile::tempdir().unwrap();
    let transport = MemoryTransport::new();
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let worker = |n: usize| {
        let mut settings = Settings::new("rpc-group");
        settings.broker = "memory://".into();
        settings.datadir = dir.path().join(format!("worker-{n}"));
        settings.topic_partitions = 4;
        settings.cores = Some(1);
        let (app, double, _) = app(settings, &seen);
        (app.with_memory_transport(transport.clone()), double)
    };
    let (first, asker) = worker(0);
    let (second, _) = worker(1);
    let running = [Running::start(&first), Running::start(&second)];
    wait_for_group(&transport, "rpc-group", 2);
    assert_eq!(first_answer(&asker), 42);
    // Keys over all four partitions: about half are answered by the other worker.
    let items: Vec<(String, u64)> = (0..32).map(|i| (format!("key-{i}"), i)).collect();
    let kv: Vec<(String, u64)> = block_on(asker.kvjoin(items.clone(), PATIENCE)).unwrap();
    assert_eq!(kv, items.iter().map(|(k, v)| (k.clone(), v * 2)).collect::<Vec<_>>());
    for r in running {
        r.stop();
    }
}
