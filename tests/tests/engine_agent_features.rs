//! The agent features around the stream (Faust's): `app.stream(iterable)` (`stream_of`), an
//! agent without a topic of its own naming, supervisor strategies with an `on_error` hook,
//! and `take_with_timestamp`'s batches by event time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use faust::{AgentFailure, App, MemoryTransport, Settings, Supervisor, TopicConfig, TopicPartition};
use faust_storage::BatchBuilder;
use faust_tests::{Running, wait_for, wait_for_group};
use faust_transport::CoreTransport;
use futures_lite::future::block_on;

fn settings(id: &str) -> Settings {
    let mut settings = Settings::new(id);
    settings.topic_partitions = 1;
    settings
}

/// Worker `n` of app `id` in a `memory://` group of one-core workers over 4 partitions,
/// committing every 100 ms.
fn group_settings(id: &str, dir: &std::path::Path, n: usize) -> Settings {
    let mut s = settings(id);
    s.broker = "memory://".into();
    s.datadir = dir.join(format!("w{n}"));
    s.topic_partitions = 4;
    s.cores = Some(1);
    s.commit_interval = Duration::from_millis(100);
    s
}

#[test]
fn a_stream_of_values_and_an_agent_with_its_own_topic() {
    let app = App::new(settings("backfill"));
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let history = app.stream_of("history", (1..=100u64).map(|n| n * 10));
    {
        let seen = seen.clone();
        app.agent("replay", &history, move |mut stream| {
            let seen = seen.clone();
            async move {
                while let Some(v) = stream.next().await {
                    seen.lock().unwrap().push(v);
                }
                Ok(())
            }
        });
    }
    let own: Arc<Mutex<Vec<String>>> = Arc::default();
    let audit = {
        let own = own.clone();
        app.agent_with_own_topic::<String, String, _, _>("audit", move |mut stream| {
            let own = own.clone();
            async move {
                while let Some(line) = stream.next().await {
                    own.lock().unwrap().push(line);
                }
                Ok(())
            }
        })
    };
    assert_eq!(audit.topic().name(), "backfill-audit");
    let test = app.test_context().unwrap();
    wait_for("the hundred values", Duration::from_secs(20), || seen.lock().unwrap().len() == 100);
    assert_eq!(*seen.lock().unwrap(), (1..=100u64).map(|n| n * 10).collect::<Vec<_>>(), "all, in order");
    test.put(audit.topic(), None, &"hello".to_string()).unwrap();
    assert_eq!(*own.lock().unwrap(), vec!["hello".to_string()]);
    assert_eq!(test.records(audit.topic()).unwrap(), vec![(None, "hello".to_string())]);
    test.stop().unwrap();
}

/// An app whose agent fails on 13, supervised by `strategy`; returns what the agent processed
/// and the failures `on_error` heard of, or the worker's error.
fn failing_on_13(strategy: Option<Supervisor>) -> (Vec<u64>, Vec<AgentFailure>, Result<(), String>) {
    let app = App::new(settings("supervised"));
    let numbers = app.topic::<String, u64>("numbers");
    let processed: Arc<Mutex<Vec<u64>>> = Arc::default();
    let failures: Arc<Mutex<Vec<AgentFailure>>> = Arc::default();
    let agent = {
        let processed = processed.clone();
        app.agent("unlucky", &numbers, move |mut stream| {
            let processed = processed.clone();
            async move {
                while let Some(n) = stream.next().await {
                    if n == 13 {
                        return Err("thirteen".into());
                    }
                    processed.lock().unwrap().push(n);
                }
                Ok(())
            }
        })
    };
    let log = failures.clone();
    let agent = agent.on_error(move |f| log.lock().unwrap().push(f.clone()));
    if let Some(strategy) = strategy {
        agent.supervisor(strategy);
    }
    let test = app.test_context().unwrap();
    let mut result = Ok(());
    for n in 10..=15u64 {
        if let Err(e) = test.put(&numbers, None, &n) {
            result = Err(e.to_string());
            break;
        }
    }
    let stopped = test.stop().map_err(|e| e.to_string());
    // The worker's own error (why it stopped) over a send's that met the stopped worker.
    let result = stopped.and(result);
    let processed = processed.lock().unwrap().clone();
    let failures = failures.lock().unwrap().clone();
    (processed, failures, result)
}

#[test]
fn supervisors_restart_skip_or_crash_and_on_error_hears_each_failure() {
    // Restart (the default): three restarts on 13, then it is skipped.
    let (processed, failures, result) = failing_on_13(None);
    result.expect("the worker goes on");
    assert_eq!(processed, vec![10, 11, 12, 14, 15]);
    let attempts: Vec<u32> = failures.iter().map(|f| f.attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3, 4], "{failures:?}");
    let first = &failures[0];
    assert_eq!((first.agent.as_str(), first.error.as_str()), ("unlucky", "thirteen"));
    assert_eq!(first.event.as_ref().map(|(tp, offset)| (tp.topic.to_string(), *offset)), Some(("numbers".into(), 3)));

    // Skip: no restart, 13 skipped at once.
    let (processed, failures, result) = failing_on_13(Some(Supervisor::Skip));
    result.expect("the worker goes on");
    assert_eq!(processed, vec![10, 11, 12, 14, 15]);
    assert_eq!(failures.len(), 1, "{failures:?}");

    // Crash: the worker stops at 13, naming the agent and the event.
    let (processed, failures, result) = failing_on_13(Some(Supervisor::Crash));
    let error = result.expect_err("the worker stops");
    assert!(error.contains("unlucky") && error.contains("thirteen") && error.contains("numbers/0@3"), "{error}");
    assert_eq!(processed, vec![10, 11, 12]);
    assert_eq!(failures.len(), 1, "{failures:?}");
}

#[test]
fn take_with_timestamp_batches_by_event_time() {
    let dir = tempfile::tempdir().unwrap();
    let transport = MemoryTransport::new();
    transport.create_topic_now("readings", &TopicConfig::new(1)).unwrap();
    // Timestamps 0, 400, ..., 3600 ms: each batch holds what lies within 1 s of its first
    // event's time (0-800; 1200-2000; 2400-3200; 3600), whatever the wall clock says.
    let mut batch = BatchBuilder::new();
    for i in 0..10i64 {
        batch.push(i * 400, None, Some(i.to_string().as_bytes()), &[]);
    }
    block_on(transport.produce(&TopicPartition::new("readings", 0), batch)).unwrap();
    let mut s = settings("batches");
    s.broker = "memory://".into();
    s.cores = Some(1);
    s.datadir = dir.path().to_path_buf();
    let app = App::new(s).with_memory_transport(transport);
    let readings = app.topic::<String, i64>("readings");
    let batches: Arc<Mutex<Vec<Vec<i64>>>> = Arc::default();
    {
        let batches = batches.clone();
        app.agent("batch", &readings, move |mut stream| {
            let batches = batches.clone();
            async move {
                loop {
                    let batch = stream.take_with_timestamp(100, Duration::from_secs(1)).await;
                    if batch.is_empty() {
                        return Ok(());
                    }
                    batches.lock().unwrap().push(batch.iter().map(|e| e.value).collect());
                }
            }
        });
    }
    let runner = app.clone();
    let worker = std::thread::spawn(move || runner.run());
    wait_for("all ten readings", Duration::from_secs(20), || {
        batches.lock().unwrap().iter().map(Vec::len).sum::<usize>() == 10
    });
    app.stop_signal().stop();
    worker.join().unwrap().unwrap();
    assert_eq!(*batches.lock().unwrap(), vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8], vec![9]]);
}

#[test]
fn current_event_is_the_event_with_its_record() {
    let app = App::new(settings("current"));
    let orders = app.topic::<String, u64>("orders");
    let copies = app.topic::<String, u64>("copies");
    // (key, value, header names, offset) as each agent saw them.
    type Seen = (Option<String>, Option<u64>, Vec<String>, u64);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let note = {
        let seen = seen.clone();
        move || {
            let e = faust::current_event().expect("an event");
            assert_eq!(
                faust::current_offset(),
                Some((e.partition, e.offset)),
                "current_offset is current_event's position"
            );
            let headers = e.headers().iter().map(|(k, _)| String::from_utf8_lossy(k).into_owned()).collect();
            seen.lock().unwrap().push((e.key::<String>().unwrap(), e.value::<u64>().unwrap(), headers, e.offset));
            e
        }
    };
    {
        let (note, copies) = (note.clone(), copies.clone());
        // Through `next`: the event is found among those the agent holds, and forwarded as read.
        app.agent("one_by_one", &orders, move |mut stream| {
            let (note, copies) = (note.clone(), copies.clone());
            async move {
                while stream.next().await.is_some() {
                    note().forward(&copies).await?;
                }
                Ok(())
            }
        });
    }
    // Through `for_each`: the event is the front of the batch being processed.
    app.agent("batched", &copies, move |stream| {
        let note = note.clone();
        stream.for_each(move |_| {
            note().ack();
            Ok(())
        })
    });
    let test = app.test_context().unwrap();
    let options = faust::SendOptions { headers: vec![("trace".into(), b"1".to_vec())], ..Default::default() };
    block_on(orders.send_with(Some(&"k".to_string()), &7, &options)).unwrap();
    wait_for("both agents saw the event", Duration::from_secs(20), || seen.lock().unwrap().len() == 2);
    test.stop().unwrap();
    let seen = seen.lock().unwrap().clone();
    let expected = (Some("k".to_string()), Some(7), vec!["trace".to_string()], 0);
    assert_eq!(seen, vec![expected.clone(), expected], "the copy has the same key, value and headers");
}

#[test]
fn streams_join_a_co_partitioned_table_inner_and_left() {
    let mut s = settings("joins");
    s.topic_partitions = 4;
    let app = App::new(s);
    let users = app.topic::<String, String>("users");
    let clicks = app.topic::<String, String>("clicks");
    let names = app.table::<String, String>("user_names");
    {
        let names = names.clone();
        app.agent("remember", &users, move |stream| {
            let names = names.clone();
            stream.for_each_item(move |user, name| {
                names.insert(user.unwrap_or_default(), name)?;
                Ok(())
            })
        });
    }
    let inner: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    type Pages = Arc<Mutex<Vec<(String, Option<String>)>>>;
    let left: Pages = Arc::default();
    {
        let (names, inner) = (names.clone(), inner.clone());
        app.agent("inner", &clicks, move |stream| {
            let inner = inner.clone();
            let mut joined = stream.join(&names);
            async move {
                while let Some((page, name)) = joined.next().await {
                    inner.lock().unwrap().push((page, name));
                }
                Ok(())
            }
        });
    }
    {
        let (names, left) = (names.clone(), left.clone());
        app.agent("left", &clicks, move |stream| {
            let left = left.clone();
            let mut joined = stream.left_join(&names);
            async move {
                while let Some((page, name)) = joined.next().await {
                    left.lock().unwrap().push((page, name));
                }
                Ok(())
            }
        });
    }
    let test = app.test_context().unwrap();
    for (user, name) in [("u1", "Ada"), ("u2", "Grace")] {
        test.put(&users, Some(&user.to_string()), &name.to_string()).unwrap();
    }
    for (user, page) in [("u1", "/home"), ("u3", "/nobody"), ("u2", "/docs"), ("u1", "/cart")] {
        test.put(&clicks, Some(&user.to_string()), &page.to_string()).unwrap();
    }
    // A name learnt later joins the clicks after it.
    test.put(&users, Some(&"u3".to_string()), &"Linus".to_string()).unwrap();
    test.put(&clicks, Some(&"u3".to_string()), &"/again".to_string()).unwrap();
    test.stop().unwrap();
    let mut inner = inner.lock().unwrap().clone();
    inner.sort();
    let pair = |p: &str, n: &str| (p.to_string(), n.to_string());
    assert_eq!(
        inner,
        vec![pair("/again", "Linus"), pair("/cart", "Ada"), pair("/docs", "Grace"), pair("/home", "Ada")]
    );
    let mut left = left.lock().unwrap().clone();
    left.sort();
    let some = |p: &str, n: Option<&str>| (p.to_string(), n.map(str::to_string));
    assert_eq!(
        left,
        vec![
            some("/again", Some("Linus")),
            some("/cart", Some("Ada")),
            some("/docs", Some("Grace")),
            some("/home", Some("Ada")),
            some("/nobody", None)
        ]
    );
}

#[test]
fn a_recovering_table_calls_on_changelog_event_and_on_recover() {
    let dir = tempfile::tempdir().unwrap();
    let app_with = |hooks: bool| {
        let mut s = settings("recovering");
        s.datadir = dir.path().to_path_buf();
        s.topic_partitions = 2;
        s.cores = Some(1);
        s.store = "memory://".into(); // the shards replay their changelog at every start
        let app = App::new(s);
        let words = app.topic::<String, String>("words");
        let mut counts = app.table::<String, u64>("counts").with_default(|| 0);
        let recovered: Arc<Mutex<Vec<u32>>> = Arc::default();
        type Changes = Arc<Mutex<Vec<(u32, String, Option<u64>)>>>;
        let changes: Changes = Arc::default();
        if hooks {
            let (recovered, changes) = (recovered.clone(), changes.clone());
            counts = counts.on_recover(move |p| recovered.lock().unwrap().push(p)).on_changelog_event(
                move |p, k: &String, v: Option<&u64>| changes.lock().unwrap().push((p, k.clone(), v.copied())),
            );
        }
        let table = counts.clone();
        app.agent("count", &words, move |stream| {
            let counts = table.clone();
            stream.for_each_item(move |word, _| {
                counts.update(&word.unwrap_or_default(), |n| *n += 1)?;
                Ok(())
            })
        });
        (app, words, recovered, changes)
    };
    let (app, words, _, _) = app_with(false);
    let runner = app.clone();
    let worker = std::thread::spawn(move || runner.run());
    for w in ["a", "b", "a"] {
        block_on(words.send(Some(&w.to_string()), &w.to_string())).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    app.stop_signal().stop();
    worker.join().unwrap().unwrap();

    let (app, _, recovered, changes) = app_with(true);
    let runner = app.clone();
    let worker = std::thread::spawn(move || runner.run());
    wait_for("both partitions recovered", Duration::from_secs(20), || recovered.lock().unwrap().len() == 2);
    app.stop_signal().stop();
    worker.join().unwrap().unwrap();
    let mut recovered = recovered.lock().unwrap().clone();
    recovered.sort();
    assert_eq!(recovered, vec![0, 1]);
    // Every changelog record replayed (a commit writes a key's latest value once: a=2, b=1).
    let changes = changes.lock().unwrap().clone();
    let last = |key: &str| changes.iter().rev().find(|(_, k, _)| k == key).map(|(_, _, v)| *v);
    assert_eq!((last("a"), last("b")), (Some(Some(2)), Some(Some(1))), "{changes:?}");
}

#[test]
fn one_agent_gets_the_events_of_several_topics() {
    let mut s = settings("combined");
    s.topic_partitions = 2;
    let app = App::new(s);
    let web = app.topic::<String, String>("clicks-web");
    let mobile = app.topic::<String, String>("clicks-mobile");
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    {
        let seen = seen.clone();
        app.agent_on_topics("clicks", &[&web, &mobile], move |mut stream| {
            let seen = seen.clone();
            async move {
                while let Some(event) = stream.next_event().await {
                    seen.lock().unwrap().push((event.tp.topic.to_string(), event.value));
                }
                Ok(())
            }
        });
    }
    let test = app.test_context().unwrap();
    for i in 0..4 {
        test.put(&web, Some(&format!("u{i}")), &format!("w{i}")).unwrap();
        test.put(&mobile, Some(&format!("u{i}")), &format!("m{i}")).unwrap();
    }
    test.stop().unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    let mut expected: Vec<(String, String)> = (0..4)
        .flat_map(|i| [("clicks-mobile".to_string(), format!("m{i}")), ("clicks-web".to_string(), format!("w{i}"))])
        .collect();
    expected.sort();
    assert_eq!(seen, expected);
}

#[test]
fn set_table_operations_are_applied_where_each_key_lives() {
    use std::collections::BTreeSet;
    let dir = tempfile::tempdir().unwrap();
    let transport = MemoryTransport::new();
    let worker = |n: usize| {
        let app = App::new(group_settings("sets", dir.path(), n)).with_memory_transport(transport.clone());
        let rooms = app.set_table::<String, String>("rooms");
        (app, rooms)
    };
    let (a, rooms) = worker(0);
    let (b, _) = worker(1);
    let runners = [Running::start(&a), Running::start(&b)];
    wait_for_group(&transport, "sets", 2);
    let s = |items: &[&str]| items.iter().map(|i| i.to_string()).collect::<Vec<String>>();
    for i in 0..8usize {
        let room = format!("room-{i}");
        block_on(rooms.add(&room, s(&["ada", "grace", "linus"]))).unwrap();
        block_on(rooms.discard(&room, s(&["grace"]))).unwrap();
        if i.is_multiple_of(2) {
            block_on(rooms.symmetric_difference_update(&room, s(&["ada", "ken"]))).unwrap();
        }
    }
    // The changelog says what each room holds, once the operations are applied and committed.
    let expected = |i: usize| -> BTreeSet<String> {
        if i.is_multiple_of(2) {
            s(&["ken", "linus"]).into_iter().collect()
        } else {
            s(&["ada", "linus"]).into_iter().collect()
        }
    };
    let committed = || {
        let mut sets = std::collections::BTreeMap::new();
        for p in 0..4 {
            for r in transport.records(&TopicPartition::new("sets-rooms-changelog", p)).unwrap_or_default() {
                let key: String = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
                let value: BTreeSet<String> = serde_json::from_slice(&r.value.unwrap()).unwrap();
                sets.insert(key, value);
            }
        }
        sets
    };
    wait_for("every room's set committed", Duration::from_secs(20), || {
        (0..8).all(|i| committed().get(&format!("room-{i}")) == Some(&expected(i)))
    });
    for running in runners {
        running.stop();
    }
}

#[test]
fn every_worker_reads_a_global_table_whole() {
    let dir = tempfile::tempdir().unwrap();
    let transport = MemoryTransport::new();
    let worker = |n: usize| {
        let app = App::new(group_settings("globals", dir.path(), n)).with_memory_transport(transport.clone());
        let prices = app.topic::<String, u64>("prices");
        let price_of = app.global_table::<String, u64>("price_of");
        let table = price_of.clone();
        app.agent("prices", &prices, move |stream| {
            let price_of = table.clone();
            stream.for_each_item(move |product, cents| {
                price_of.insert(product.unwrap_or_default(), cents)?;
                Ok(())
            })
        });
        (app, prices, price_of)
    };
    let (a, prices, replica_a) = worker(0);
    let (b, _, replica_b) = worker(1);
    let runners = [Running::start(&a), Running::start(&b)];
    wait_for_group(&transport, "globals", 2);
    block_on(replica_a.wait_ready());
    for i in 0..20u64 {
        block_on(prices.send(Some(&format!("p{i}")), &(i * 100))).unwrap();
    }
    // Each worker owns about half the partitions, and reads every price.
    for replica in [&replica_a, &replica_b] {
        wait_for("every price in the replica", Duration::from_secs(20), || replica.len() == 20);
        assert!(replica.is_ready());
        assert_eq!(replica.get(&"p7".to_string()), Some(700));
        assert_eq!(replica.get(&"p19".to_string()), Some(1900));
    }
    // A change reaches every replica.
    block_on(prices.send(Some(&"p7".to_string()), &777)).unwrap();
    wait_for("the change everywhere", Duration::from_secs(20), || {
        replica_a.get(&"p7".to_string()) == Some(777) && replica_b.get(&"p7".to_string()) == Some(777)
    });
    for running in runners {
        running.stop();
    }
}

#[test]
fn a_set_global_table_is_read_whole_on_every_worker() {
    let dir = tempfile::tempdir().unwrap();
    let transport = MemoryTransport::new();
    let worker = |n: usize| {
        let app = App::new(group_settings("set-globals", dir.path(), n)).with_memory_transport(transport.clone());
        let teams = app.set_global_table::<String, String>("teams");
        (app, teams)
    };
    let (a, teams_a) = worker(0);
    let (b, teams_b) = worker(1);
    let runners = [Running::start(&a), Running::start(&b)];
    wait_for_group(&transport, "set-globals", 2);
    for i in 0..6 {
        let team = format!("team-{i}");
        block_on(teams_a.operations().add(&team, [format!("lead-{i}"), "bot".to_string()])).unwrap();
        block_on(teams_b.operations().discard(&team, ["bot".to_string()])).unwrap();
    }
    for teams in [&teams_a, &teams_b] {
        wait_for("every team on this worker", Duration::from_secs(20), || {
            (0..6).all(|i| teams.members(&format!("team-{i}")).into_iter().collect::<Vec<_>>() == [format!("lead-{i}")])
        });
        assert!(teams.contains(&"team-3".to_string(), &"lead-3".to_string()));
    }
    for running in runners {
        running.stop();
    }
}

/// Runs a windowed join of `views` and `clicks` (window 1 s) over records with the given
/// timestamps, the views first; returns what the join handed over, sorted.
fn joined(kind: faust::JoinKind) -> Vec<(String, Option<String>, Option<String>)> {
    let dir = tempfile::tempdir().unwrap();
    let transport = MemoryTransport::new();
    for topic in ["views", "clicks"] {
        transport.create_topic_now(topic, &TopicConfig::new(2)).unwrap();
    }
    let produce = |topic: &str, records: &[(&str, i64, &str)]| {
        for (key, ts, value) in records {
            let mut batch = BatchBuilder::new();
            batch.push(*ts, Some(key.as_bytes()), Some(serde_json::to_vec(value).unwrap().as_slice()), &[]);
            let partition = key.bytes().map(u32::from).sum::<u32>() % 2;
            block_on(transport.produce(&TopicPartition::new(topic, partition), batch)).unwrap();
        }
    };
    let app = App::new(group_settings("joins-windowed", dir.path(), 0)).with_memory_transport(transport.clone());
    let views = app.topic::<String, String>("views");
    let clicks = app.topic::<String, String>("clicks");
    type Joined = Arc<Mutex<Vec<(String, Option<String>, Option<String>)>>>;
    let out: Joined = Arc::default();
    {
        let out = out.clone();
        app.join_windowed("view-click", &views, &clicks, Duration::from_secs(1), kind, move |ad, view, click| {
            out.lock().unwrap().push((ad.clone(), view.cloned(), click.cloned()));
            Ok(())
        });
    }
    let running = Running::start(&app);
    produce("views", &[("ad1", 0, "v1"), ("ad2", 0, "v2"), ("ad3", 2000, "v3")]);
    let unpaired_views = if kind == faust::JoinKind::Inner { 0 } else { 3 };
    wait_for("the views buffered", Duration::from_secs(20), || {
        out.lock().unwrap().len() >= unpaired_views && app.stats().events_processed >= 3
    });
    // ad4 has no view; ad2's click is 2.5 s after its view: no pair; ad1's is 0.5 s after.
    produce("clicks", &[("ad4", 100, "c4"), ("ad1", 500, "c1"), ("ad2", 2500, "c2")]);
    wait_for("the clicks joined", Duration::from_secs(20), || app.stats().events_processed >= 6);
    std::thread::sleep(Duration::from_millis(200));
    running.stop();
    let mut out = out.lock().unwrap().clone();
    out.sort();
    out
}

#[test]
fn a_windowed_stream_stream_join_pairs_events_within_the_window() {
    let pair =
        |ad: &str, v: Option<&str>, c: Option<&str>| (ad.to_string(), v.map(str::to_string), c.map(str::to_string));
    assert_eq!(joined(faust::JoinKind::Inner), vec![pair("ad1", Some("v1"), Some("c1"))]);
    assert_eq!(
        joined(faust::JoinKind::Outer),
        vec![
            pair("ad1", Some("v1"), None),
            pair("ad1", Some("v1"), Some("c1")),
            pair("ad2", None, Some("c2")),
            pair("ad2", Some("v2"), None),
            pair("ad3", Some("v3"), None),
            pair("ad4", None, Some("c4")),
        ]
    );
}

#[test]
fn an_agent_knows_its_name_and_commits_when_it_asks() {
    let dir = tempfile::tempdir().unwrap();
    let transport = MemoryTransport::new();
    let mut s = group_settings("committing", dir.path(), 0);
    s.commit_interval = Duration::from_secs(3600); // only the agent's own commits
    s.commit_every = u64::MAX;
    let app = App::new(s).with_memory_transport(transport.clone());
    let events = app.topic::<String, u64>("events");
    let names: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let (names, committer) = (names.clone(), app.clone());
        app.agent("committer", &events, move |mut stream| {
            let (names, app) = (names.clone(), committer.clone());
            async move {
                while let Some(n) = stream.next_event().await {
                    names.lock().unwrap().push(faust::current_agent().map(|a| a.to_string()).unwrap_or_default());
                    n.ack();
                    app.commit().await?;
                }
                Ok(())
            }
        });
    }
    let running = Running::start(&app);
    wait_for_group(&transport, "committing", 1);
    let sent = block_on(events.send(Some(&"k".to_string()), &1)).unwrap();
    let tp = TopicPartition::new("events", sent.partition);
    wait_for("the agent's commit", Duration::from_secs(20), || {
        block_on(transport.committed("committing", std::slice::from_ref(&tp))).unwrap()[0] == Some(sent.base_offset + 1)
    });
    assert_eq!(*names.lock().unwrap(), vec!["committer".to_string()]);
    assert!(faust::current_agent().is_none(), "no agent outside one");
    let e = block_on(app.commit()).unwrap_err().to_string();
    assert!(e.contains("core"), "{e}");
    running.stop();
}

#[test]
fn a_table_using_the_partitioner_routes_writes_by_key_outside_streams() {
    let dir = tempfile::tempdir().unwrap();
    let transport = MemoryTransport::new();
    let app = App::new(group_settings("routed", dir.path(), 0)).with_memory_transport(transport.clone());
    let probe = app.topic::<String, u64>("probe");
    let limits = app.table::<String, u64>("limits").use_partitioner();
    let plain = app.table::<String, u64>("plain");
    let partitions: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let refused = Arc::new(Mutex::new(String::new()));
    {
        let (limits, plain, probe, partitions, refused) =
            (limits.clone(), plain.clone(), probe.clone(), partitions.clone(), refused.clone());
        // A task: no event, so only the partitioner can say where a key goes.
        app.task(move || {
            let (limits, plain, probe, partitions, refused) =
                (limits.clone(), plain.clone(), probe.clone(), partitions.clone(), refused.clone());
            async move {
                for i in 0..8u64 {
                    let key = format!("k{i}");
                    limits.insert(key.clone(), i)?;
                    let sent = probe.send(Some(&key), &i).await?;
                    partitions.lock().unwrap().push((key, sent.partition));
                }
                *refused.lock().unwrap() = plain.insert("k0".to_string(), 1).unwrap_err().to_string();
                Ok(())
            }
        });
    }
    let running = Running::start(&app);
    wait_for("the task's writes", Duration::from_secs(20), || partitions.lock().unwrap().len() == 8);
    running.stop();
    // Each key is in the changelog partition the producer's partitioner sent it to.
    for (key, partition) in partitions.lock().unwrap().iter() {
        let records = transport.records(&TopicPartition::new("routed-limits-changelog", *partition)).unwrap();
        assert!(records.iter().any(|r| r.key.as_deref() == Some(key.as_bytes())), "{key} in partition {partition}");
    }
    assert!(
        refused.lock().unwrap().contains("plain"),
        "a table without it needs an event: {}",
        refused.lock().unwrap()
    );
}
