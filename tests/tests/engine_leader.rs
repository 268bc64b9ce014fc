//! Leader election, leader-only work, crontabs and lifecycle hooks.
//!
//! - On `local://` the one worker leads: `is_leader` turns true with its first assignment,
//!   a leader-only timer and a crontab with seconds run, the hooks are called in order
//!   (init, assigned — with the leader topic's partition —, startup finished, before
//!   shutdown, and revoked at the end); with `topic_disable_leader` nobody leads and leader-only work never
//!   runs.
//! - Two workers sharing a `memory://` group: exactly one leads at any moment, a leader-only
//!   timer runs on that one only (once per tick for the app, not per worker), and when the
//!   leader stops, the other takes over and its leader-only work starts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faust::{App, Crontab, MemoryTransport, Settings};
use faust_tests::{Running, wait_for, wait_for_group};

fn counting(
    counter: &Arc<AtomicU64>,
) -> impl Fn() -> std::future::Ready<Result<(), faust::AgentError>> + Send + Sync + 'static {
    let counter = counter.clone();
    move || {
        counter.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(()))
    }
}

#[test]
fn the_only_worker_leads_runs_leader_work_and_calls_its_hooks_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::new("leading");
    settings.datadir = dir.path().to_path_buf();
    settings.topic_partitions = 2;
    settings.cores = Some(2);
    let app = App::new(settings);
    let topic = app.topic::<String, String>("words");
    app.agent("read", &topic, |mut stream| async move {
        while stream.next().await.is_some() {}
        Ok(())
    });
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let note = |what: &'static str| {
        let log = log.clone();
        move || log.lock().unwrap().push(what.to_string())
    };
    app.on_worker_init(note("init"));
    app.on_startup_finished(note("startup finished"));
    app.on_before_shutdown(note("before shutdown"));
    {
        let log = log.clone();
        app.on_partitions_assigned(move |tps| {
            let mut names: Vec<String> = tps.iter().map(|tp| tp.to_string()).collect();
            names.sort();
            log.lock().unwrap().push(format!("assigned {}", names.join(" ")));
        });
    }
    {
        let log = log.clone();
        app.on_partitions_revoked(move |tps| log.lock().unwrap().push(format!("revoked {}", tps.len())));
    }
    let (leader_ticks, cron_runs, leader_tasks) = (Arc::default(), Arc::default(), Arc::default());
    app.timer_on_leader(Duration::from_millis(20), counting(&leader_ticks));
    app.crontab(Crontab::parse("* * * * * *").unwrap().on_leader(), counting(&cron_runs)).unwrap();
    app.task_on_leader(counting(&leader_tasks));
    assert!(!app.is_leader(), "no leader before the worker runs");

    let running = Running::start(&app);
    wait_for("leadership", Duration::from_secs(20), || app.is_leader());
    wait_for("leader-only timer ticks", Duration::from_secs(10), || leader_ticks.load(Ordering::SeqCst) >= 5);
    // A crontab with seconds fires every second, on the second.
    let cron_start = cron_runs.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(2_600));
    let fired = cron_runs.load(Ordering::SeqCst) - cron_start;
    assert!((2..=3).contains(&fired), "every second for 2.6 s: {fired}");
    running.stop();
    assert!(!app.is_leader(), "a stopped worker does not lead");
    assert_eq!(leader_tasks.load(Ordering::SeqCst), 1, "the leader task ran once, as leadership began");

    let log = log.lock().unwrap().clone();
    assert_eq!(log.first().map(String::as_str), Some("init"), "{log:?}");
    let assigned = log.iter().find(|l| l.starts_with("assigned")).expect("an assignment");
    for tp in ["leading-__assignor-__leader/0", "words/0", "words/1"] {
        assert!(assigned.split(' ').any(|t| t == tp), "{tp} in {assigned}");
    }
    let at = |what: &str| log.iter().position(|l| l.starts_with(what)).unwrap_or_else(|| panic!("{what}: {log:?}"));
    assert!(at("init") < at("assigned") && at("assigned") < at("startup finished"), "{log:?}");
    assert!(at("startup finished") < at("before shutdown"), "{log:?}");
    assert!(log.last().is_some_and(|l| l.starts_with("revoked")), "a stopping worker gives up its partitions: {log:?}");
}

#[test]
fn without_the_leader_topic_nobody_leads() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::new("leaderless");
    settings.datadir = dir.path().to_path_buf();
    settings.cores = Some(1);
    settings.topic_disable_leader = true;
    let app = App::new(settings);
    let (leader_ticks, ticks) = (Arc::default(), Arc::default());
    app.timer_on_leader(Duration::from_millis(10), counting(&leader_ticks));
    app.timer(Duration::from_millis(10), counting(&ticks));
    let running = Running::start(&app);
    wait_for("plain timer ticks", Duration::from_secs(20), || ticks.load(Ordering::SeqCst) >= 10);
    assert!(!app.is_leader());
    running.stop();
    assert_eq!(leader_ticks.load(Ordering::SeqCst), 0, "leader-only work never runs without a leader");
}

/// A worker of the `memory://` group "shared", counting its leader-only ticks.
fn worker(transport: &MemoryTransport, dir: &std::path::Path, n: usize, ticks: &Arc<AtomicU64>) -> App {
    let mut settings = Settings::new("shared");
    settings.broker = "memory://".into();
    settings.datadir = dir.join(format!("worker-{n}"));
    settings.cores = Some(1);
    settings.topic_partitions = 4;
    let app = App::new(settings).with_memory_transport(transport.clone());
    let topic = app.topic::<String, String>("events");
    app.agent("read", &topic, |mut stream| async move {
        while stream.next().await.is_some() {}
        Ok(())
    });
    app.timer_on_leader(Duration::from_millis(20), counting(ticks));
    app
}

#[test]
fn one_of_two_workers_leads_and_the_other_takes_over_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let transport = MemoryTransport::new();
    let ticks: [Arc<AtomicU64>; 2] = [Arc::default(), Arc::default()];
    let apps = [worker(&transport, dir.path(), 0, &ticks[0]), worker(&transport, dir.path(), 1, &ticks[1])];
    let first = Running::start(&apps[0]);
    wait_for("the first worker leads", Duration::from_secs(20), || apps[0].is_leader());
    let second = Running::start(&apps[1]);
    // Once the group settled on both workers, exactly one leads, for good.
    wait_for_group(&transport, "shared", 2);
    let leaders = || apps.iter().filter(|a| a.is_leader()).count();
    wait_for("one leader", Duration::from_secs(10), || leaders() == 1);
    let leader = if apps[0].is_leader() { 0 } else { 1 };
    let follower = 1 - leader;
    let before = [ticks[0].load(Ordering::SeqCst), ticks[1].load(Ordering::SeqCst)];
    for _ in 0..30 {
        assert_eq!(leaders(), 1, "never two leaders, never none while the group is stable");
        std::thread::sleep(Duration::from_millis(10));
    }
    let during = [ticks[0].load(Ordering::SeqCst) - before[0], ticks[1].load(Ordering::SeqCst) - before[1]];
    assert_eq!(during[follower], 0, "the follower's leader-only timer does not run: {during:?}");
    assert!(during[leader] >= 5, "the leader's runs about every 20 ms: {during:?}");

    // The leader stops: the other worker takes over, and its leader-only work starts.
    let (stopping, staying) = if leader == 0 { (first, second) } else { (second, first) };
    stopping.stop();
    wait_for("the other worker leads", Duration::from_secs(30), || apps[follower].is_leader());
    let taken_over = ticks[follower].load(Ordering::SeqCst);
    wait_for("the new leader's timer runs", Duration::from_secs(10), || {
        ticks[follower].load(Ordering::SeqCst) >= taken_over + 5
    });
    staying.stop();
}
