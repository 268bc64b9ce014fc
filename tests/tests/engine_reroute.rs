//! Streams re-routed inside the agent (Faust's `stream.group_by` and `stream.through`), and
//! agents with isolated partitions (an actor per partition, started and stopped with the
//! assignment). On `memory://` workers in one process, with their group's rebalances.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faust::{App, MemoryTransport, Settings, TopicPartition};
use faust_tests::{Running, wait_for, wait_for_group};
use futures_lite::future::block_on;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Order {
    account: String,
    amount: u64,
}

/// Worker `n` of app `id` in a `memory://` group of one-core workers over 4 partitions.
fn group_settings(id: &str, dir: &std::path::Path, n: usize) -> Settings {
    let mut s = Settings::new(id);
    s.broker = "memory://".into();
    s.datadir = dir.join(format!("w{n}"));
    s.topic_partitions = 4;
    s.cores = Some(1);
    s.commit_interval = Duration::from_millis(100);
    s
}

/// The latest value of each key in a table's changelog, over its 4 partitions.
fn changelog(transport: &MemoryTransport, topic: &str) -> BTreeMap<String, u64> {
    let mut table = BTreeMap::new();
    for p in 0..4 {
        for r in transport.records(&TopicPartition::new(topic, p)).unwrap_or_default() {
            let key = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
            let value: u64 = serde_json::from_slice(&r.value.unwrap()).unwrap();
            table.insert(key, value);
        }
    }
    table
}

/// Keyed values an agent saw, in arrival order.
type Seen = Arc<Mutex<Vec<(Option<String>, i64)>>>;

/// Per actor: the partitions it saw, and whether its stream ended.
type Actors = Arc<Mutex<BTreeMap<usize, (BTreeSet<u32>, bool)>>>;

/// The latest count of each account, as the agent wrote it.
type Latest = Arc<Mutex<BTreeMap<String, u64>>>;

/// An order-count app whose agent filters and re-keys its stream by account inside its
/// body; returns the app, its orders topic and the counts it writes.
fn counting_app(settings: Settings) -> (App, faust::Topic<String, Order>, Latest) {
    let app = App::new(settings);
    let orders = app.topic::<String, Order>("orders");
    let counts = app.table::<String, u64>("counts").with_default(|| 0);
    let latest: Latest = Arc::default();
    let seen = latest.clone();
    app.agent("count", &orders, move |stream| {
        let (counts, seen) = (counts.clone(), seen.clone());
        let mut by_account = stream.filter(|o: &Order| o.amount > 0).group_by(|o: &Order| o.account.clone(), "account");
        async move {
            while let Some(order) = by_account.next().await {
                let n = counts.update(&order.account, |n| *n += 1)?;
                seen.lock().unwrap().insert(order.account, n);
            }
            Ok(())
        }
    });
    (app, orders, latest)
}

#[test]
fn a_stream_grouped_inside_the_agent_counts_each_key_once_on_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let transport = MemoryTransport::new();
    let worker = |n: usize| {
        let (app, orders, _) = counting_app(group_settings("shop", dir.path(), n));
        (app.with_memory_transport(transport.clone()), orders)
    };
    let (a, orders) = worker(0);
    let (b, _) = worker(1);
    // Half the orders are there before the workers start: the run that meets the group_by
    // restarts to subscribe to the repartition topic, and they are neither lost nor doubled.
    let send = |range: std::ops::Range<usize>| {
        for i in range {
            let order = Order { account: format!("acct-{}", i % 10), amount: (i % 4) as u64 };
            block_on(orders.send(Some(&format!("order-{i}")), &order)).unwrap();
        }
    };
    let runners = [Running::start(&a), Running::start(&b)];
    send(0..200);
    wait_for_group(&transport, "shop", 2);
    send(200..400);
    // Orders of amount 0 (every 4th) are filtered out before the re-keying: an even account
    // loses half its 40 orders to the filter, an odd one none; 300 orders count in all.
    let expected: BTreeMap<String, u64> =
        (0..10).map(|k| (format!("acct-{k}"), if k % 2 == 0 { 20 } else { 40 })).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while changelog(&transport, "shop-counts-changelog") != expected {
        if std::time::Instant::now() > deadline {
            let repartitioned: Vec<usize> = (0..4)
                .map(|p| {
                    let tp = TopicPartition::new("shop-count-orders-account-repartition", p);
                    transport.records(&tp).map(|r| r.len()).unwrap_or(0)
                })
                .collect();
            panic!(
                "counts not committed within 30 s: {:?}; re-keyed per partition {repartitioned:?}; assignment {:?}",
                changelog(&transport, "shop-counts-changelog"),
                transport.group_assignment("shop"),
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Through the repartition topic Faust would name.
    let repartitioned: usize = (0..4)
        .map(|p| {
            let tp = TopicPartition::new("shop-count-orders-account-repartition", p);
            transport.records(&tp).map(|r| r.len()).unwrap_or(0)
        })
        .sum();
    assert!(repartitioned >= 300, "{repartitioned} records re-keyed");
    for running in runners {
        running.stop();
    }
    assert_eq!(changelog(&transport, "shop-counts-changelog"), expected, "nothing counted twice at shutdown");
}

#[test]
fn a_restarted_worker_starts_with_the_grouped_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::new("shop2");
    settings.datadir = dir.path().to_path_buf();
    settings.topic_partitions = 4;
    settings.cores = Some(1);
    // On the embedded log, twice: the second worker process (here a second app) meets the
    // group_by again and restarts once more; counts stay exact across both.
    for round in 0..2u64 {
        let (app, orders, latest) = counting_app(settings.clone());
        let running = Running::start(&app);
        for i in 0..100 {
            block_on(orders.send(Some(&format!("o{i}")), &Order { account: format!("a{}", i % 5), amount: 1 }))
                .unwrap();
        }
        let expected: BTreeMap<String, u64> = (0..5).map(|k| (format!("a{k}"), 20 * (round + 1))).collect();
        wait_for("the counts", Duration::from_secs(30), || *latest.lock().unwrap() == expected);
        running.stop();
        let mut table = BTreeMap::new();
        for r in faust_tests::topic_records(dir.path(), "shop2-counts-changelog") {
            let key = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
            table.insert(key, serde_json::from_slice::<u64>(&r.value.unwrap()).unwrap());
        }
        assert_eq!(table, expected, "round {round}: the committed counts");
    }
}

#[test]
fn group_by_a_field_takes_faust_s_name_and_through_forwards_what_passes() {
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Withdrawal {
        account: String,
        amount: i64,
    }
    let app = App::new({
        let mut s = Settings::new("bank");
        s.topic_partitions = 2;
        s
    });
    let withdrawals = app.topic::<String, Withdrawal>("withdrawals");
    let seen: Seen = Arc::default();
    {
        let seen = seen.clone();
        app.agent("large", &withdrawals, move |stream| {
            let seen = seen.clone();
            let mut by_account = stream.group_by_field::<String>("account");
            async move {
                while let Some((key, w)) = by_account.next_item().await {
                    seen.lock().unwrap().push((key, w.amount));
                }
                Ok(())
            }
        });
    }
    let readings = app.topic::<String, i64>("readings");
    let valid = app.topic::<String, i64>("readings-valid");
    let passed: Seen = Arc::default();
    {
        let (passed, valid) = (passed.clone(), valid.clone());
        app.agent("validate", &readings, move |stream| {
            let passed = passed.clone();
            let mut valid = stream.filter(|v| *v >= 0).through(&valid);
            async move {
                while let Some(item) = valid.next_item().await {
                    passed.lock().unwrap().push(item);
                }
                Ok(())
            }
        });
    }
    let test = app.test_context().unwrap();
    for (i, amount) in [5i64, 50, 500].into_iter().enumerate() {
        let w = Withdrawal { account: format!("acct-{}", i % 2), amount };
        test.put(&withdrawals, Some(&format!("w{i}")), &w).unwrap();
    }
    for (i, v) in [3i64, -1, 4].into_iter().enumerate() {
        test.put(&readings, Some(&format!("sensor-{i}")), &v).unwrap();
    }
    wait_for("the re-routed events", Duration::from_secs(20), || {
        seen.lock().unwrap().len() == 3 && passed.lock().unwrap().len() == 2
    });
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        vec![(Some("acct-0".into()), 5), (Some("acct-0".into()), 500), (Some("acct-1".into()), 50)],
        "keyed by the field"
    );
    let mut passed = passed.lock().unwrap().clone();
    passed.sort();
    assert_eq!(passed, vec![(Some("sensor-0".into()), 3), (Some("sensor-2".into()), 4)], "keys kept, -1 filtered");
    let mut forwarded = test.records(&valid).unwrap();
    forwarded.sort();
    assert_eq!(forwarded, passed, "what passed is in the topic");
    let repartition = app.topic::<String, Withdrawal>("bank-large-withdrawals-Withdrawal.account-repartition");
    assert_eq!(test.records(&repartition).unwrap().len(), 3, "Faust's name for group_by(Withdrawal.account)");
    test.stop().unwrap();
}

#[test]
fn isolated_partitions_have_an_actor_each_that_follows_the_assignment() {
    let dir = tempfile::tempdir().unwrap();
    let transport = MemoryTransport::new();
    let actors: Actors = Arc::default();
    let next_actor = Arc::new(AtomicUsize::new(0));
    let worker = |n: usize| {
        let app = App::new(group_settings("meters", dir.path(), n)).with_memory_transport(transport.clone());
        let readings = app.topic::<String, u64>("readings");
        let (actors, next_actor) = (actors.clone(), next_actor.clone());
        app.agent("totals", &readings, move |mut stream| {
            let actors = actors.clone();
            let id = next_actor.fetch_add(1, Ordering::SeqCst);
            async move {
                actors.lock().unwrap().insert(id, (BTreeSet::new(), false));
                while stream.next().await.is_some() {
                    let partition = faust::current_event().expect("an event in hand").partition;
                    actors.lock().unwrap().get_mut(&id).unwrap().0.insert(partition);
                }
                actors.lock().unwrap().get_mut(&id).unwrap().1 = true;
                Ok(())
            }
        })
        .isolated_partitions();
        (app, readings)
    };
    let (a, readings) = worker(0);
    let (b, b_readings) = worker(1);
    let send_round = |readings: &faust::Topic<String, u64>, round: usize| {
        for p in 0..4u32 {
            for i in 0..5 {
                let options = faust::SendOptions { partition: Some(p), ..Default::default() };
                block_on(readings.send_with(Some(&format!("m{p}-{i}")), &(round as u64), &options)).unwrap();
            }
        }
    };
    let running_a = Running::start(&a);
    let running_b = Running::start(&b);
    wait_for_group(&transport, "meters", 2);
    send_round(&readings, 0);
    let partitions_seen = |actors: &BTreeMap<usize, (BTreeSet<u32>, bool)>| -> BTreeSet<u32> {
        actors.values().filter(|(_, ended)| !ended).flat_map(|(p, _)| p.iter().copied()).collect()
    };
    wait_for("an actor per partition, on both workers", Duration::from_secs(20), || {
        partitions_seen(&actors.lock().unwrap()).len() == 4
    });
    // The first worker stops: its actors end, and the other worker starts actors for its
    // partitions.
    running_a.stop();
    wait_for_group(&transport, "meters", 1);
    send_round(&b_readings, 1);
    wait_for("the moved partitions' new actors", Duration::from_secs(20), || {
        let actors = actors.lock().unwrap();
        let live: Vec<&(BTreeSet<u32>, bool)> = actors.values().filter(|(_, ended)| !ended).collect();
        live.len() == 4 && partitions_seen(&actors).len() == 4
    });
    {
        let actors = actors.lock().unwrap();
        for (id, (partitions, _)) in actors.iter() {
            assert!(partitions.len() <= 1, "actor {id} saw partitions {partitions:?}: one at most");
        }
        assert!(actors.values().filter(|(_, ended)| *ended).count() >= 1, "the stopped worker's actors ended");
    }
    running_b.stop();
    assert!(actors.lock().unwrap().values().all(|(_, ended)| *ended), "every actor ended at shutdown");
}
