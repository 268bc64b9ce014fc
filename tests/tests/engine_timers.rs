//! Timers (Faust's `@app.timer`): `app.timer` runs once per worker, on one core, whatever the
//! number of cores (a periodic producer sends once per tick, not once per core); the
//! per-core form runs on every core; ticks keep to their schedule rather than drifting by
//! the time each run takes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust::{App, MemoryTransport, Settings};

/// Runs an app on 2 cores for `run`, with `timer` on every core if `every_core`; returns
/// when each run of it started, by core.
fn ticks(every_core: bool, interval: Duration, work: Duration, run: Duration) -> BTreeMap<usize, Vec<Duration>> {
    let transport = MemoryTransport::new();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::new("timers");
    settings.broker = "memory://".into();
    settings.cores = Some(2);
    settings.datadir = dir.path().to_path_buf();
    let app = App::new(settings).with_memory_transport(transport);
    let start = Instant::now();
    let seen: Arc<Mutex<BTreeMap<usize, Vec<Duration>>>> = Arc::default();
    let f = {
        let seen = seen.clone();
        move || {
            let seen = seen.clone();
            async move {
                let core = faust::runtime::current_core().ok_or("timers run on a core")?;
                seen.lock().map_err(|_| "poisoned")?.entry(core).or_default().push(start.elapsed());
                // A run that takes `work` (the core is busy meanwhile, as with real work).
                let until = Instant::now() + work;
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
                Ok(())
            }
        }
    };
    if every_core {
        app.timer_on_every_core(interval, f);
    } else {
        app.timer(interval, f);
    }
    let stop = app.stop_signal();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(run);
        stop.stop();
    });
    app.run().expect("the worker runs");
    stopper.join().unwrap();
    seen.lock().unwrap().clone()
}

#[test]
fn a_timer_runs_once_per_worker_and_the_per_core_form_on_every_core() {
    let once = ticks(false, Duration::from_millis(50), Duration::ZERO, Duration::from_millis(1_000));
    assert_eq!(once.len(), 1, "one core runs it: {once:?}");
    let runs = once.values().next().unwrap().len();
    assert!((15..=21).contains(&runs), "about 20 ticks in 1 s: {runs}");

    let every = ticks(true, Duration::from_millis(50), Duration::ZERO, Duration::from_millis(1_000));
    assert_eq!(every.len(), 2, "both cores run it: {every:?}");
}

#[test]
fn ticks_keep_to_the_schedule_despite_slow_runs() {
    // Runs of 30 ms every 100 ms: a timer that slept 100 ms after each run would tick every
    // 130 ms (15 ticks in 2 s); one that keeps to its schedule ticks every 100 ms (about 20).
    let seen = ticks(false, Duration::from_millis(100), Duration::from_millis(30), Duration::from_millis(2_050));
    let starts = seen.values().next().unwrap();
    assert!(starts.len() >= 18, "{} ticks in 2 s: {starts:?}", starts.len());
    // Measured from the first tick (the worker's start-up comes before it): tick k is due
    // k × 100 ms later, and a late tick does not push the later ones back.
    let first = starts[0];
    for (k, at) in starts.iter().enumerate() {
        let due = first + Duration::from_millis(100 * k as u64);
        let off = (*at).abs_diff(due);
        assert!(off < Duration::from_millis(50), "tick {k} at {at:?}, due at {due:?}");
    }
}
