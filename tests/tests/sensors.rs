//! Sensors (Faust's `Sensor`): an app's own hooks, called by a running worker as events come
//! in and go out, tables are read and written, commits and sends happen, partitions are
//! assigned and table partitions recovered. Here a counting app on `local://` with a sensor
//! that counts every hook.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faust::{App, Sensor, Settings, TopicPartition};

#[derive(Default)]
struct Counting {
    messages_in: AtomicU64,
    events_out: AtomicU64,
    table_gets: AtomicU64,
    table_sets: AtomicU64,
    commits_started: AtomicU64,
    commits_done: AtomicU64,
    sends: AtomicU64,
    rebalances: AtomicU64,
    recovery_calls: AtomicU64,
    partitions_in: Mutex<HashSet<TopicPartition>>,
}

impl Sensor for Counting {
    fn on_message_in(&self, tp: &TopicPartition, _offset: u64) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
        self.partitions_in.lock().unwrap().insert(tp.clone());
    }
    fn on_stream_event_out(&self, _tp: &TopicPartition, _offset: u64) {
        self.events_out.fetch_add(1, Ordering::Relaxed);
    }
    fn on_table_get(&self, table: &str) {
        assert_eq!(table, "counts");
        self.table_gets.fetch_add(1, Ordering::Relaxed);
    }
    fn on_table_set(&self, table: &str) {
        assert_eq!(table, "counts");
        self.table_sets.fetch_add(1, Ordering::Relaxed);
    }
    fn on_commit_initiated(&self, _core: usize) {
        self.commits_started.fetch_add(1, Ordering::Relaxed);
    }
    fn on_commit_completed(&self, _core: usize, _took: Duration, _committed: bool) {
        self.commits_done.fetch_add(1, Ordering::Relaxed);
    }
    fn on_send_completed(&self, _tp: &TopicPartition, records: usize) {
        self.sends.fetch_add(records as u64, Ordering::Relaxed);
    }
    fn on_rebalance_end(&self, _generation: u64, _took: Duration) {
        self.rebalances.fetch_add(1, Ordering::Relaxed);
    }
    fn on_recovery_progress(&self, _table: &str, _partition: u32, done: u64, total: u64) {
        assert!(done <= total);
        self.recovery_calls.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn a_sensor_sees_events_tables_commits_sends_and_rebalances() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Settings::new("sensed");
    s.datadir = dir.path().to_path_buf();
    s.topic_partitions = 2;
    s.commit_interval = Duration::from_millis(50);
    s.cores = Some(1);
    s.web_enabled = false;
    let app = App::new(s);
    let orders = app.topic::<String, u64>("orders");
    let counts = app.table::<String, u64>("counts").with_default(|| 0);
    {
        let counts = counts.clone();
        app.agent("count", &orders, move |mut stream| {
            let counts = counts.clone();
            async move {
                while let Some((account, _)) = stream.next_item().await {
                    let account = account.ok_or("keyed")?;
                    let _seen = counts.get(&account)?;
                    counts.update(&account, |n| *n += 1)?;
                }
                Ok(())
            }
        });
    }
    let sensor = Arc::new(Counting::default());
    app.sensor(sensor.clone());
    let to_send: Vec<(String, u64)> = (0..500).map(|i| (format!("account-{}", i % 7), i)).collect();
    let (result, counted) = faust_tests::count_until(&app, &orders, &counts, &to_send, 500, Duration::from_secs(60));
    result.expect("the app runs");
    assert_eq!(counted.values().sum::<u64>(), 500);
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    assert_eq!(n(&sensor.messages_in), 500, "every record fetched");
    assert_eq!(n(&sensor.events_out), 500, "every event acked");
    assert_eq!(n(&sensor.table_gets), 500, "one read per event");
    assert_eq!(n(&sensor.table_sets), 500, "one write per event");
    assert_eq!(n(&sensor.sends), 500, "the task's sends, written");
    assert!(n(&sensor.commits_started) > 0 && n(&sensor.commits_done) == n(&sensor.commits_started));
    assert!(n(&sensor.rebalances) >= 1, "the first assignment");
    assert_eq!(sensor.partitions_in.lock().unwrap().len(), 2, "both partitions of orders");
}
