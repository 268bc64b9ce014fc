//! A worker for the Kafka chaos test, Faust's stress scenario: per-partition monotonic
//! counters in topic `numbers` are forwarded by one agent to topic `forwarded` (keyed by their
//! source partition), and a second agent keeps, per key, how many it received and the highest
//! number, in two tables.
//!
//! ```text
//! stress BROKER DATADIR work                 forward and count until SIGTERM / SIGINT (or SIGKILL)
//! stress BROKER DATADIR verify EXPECTED OUT  count until the tables hold EXPECTED records, write them to OUT, stop
//! ```
//!
//! The app id is `stress` (one consumer group); each process needs its own data directory.
//! Settings come from the environment too (`BROKER_SESSION_TIMEOUT`, `WORKER_CORES`, ...).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust::{App, Settings};

type Snapshot = HashMap<usize, (Vec<(String, u64)>, Vec<(String, u64)>)>;

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).try_init();
    let args: Vec<String> = std::env::args().collect();
    let (Some(broker), Some(datadir), Some(mode)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: stress BROKER DATADIR work | verify EXPECTED OUT");
        std::process::exit(2);
    };
    let mut settings = Settings::new("stress");
    settings.broker = format!("kafka://{broker}");
    settings.datadir = datadir.into();
    settings.topic_partitions = 4;
    settings.commit_interval = Duration::from_millis(100);
    let settings = match settings.from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stress: {e}");
            std::process::exit(2);
        }
    };
    let app = App::new(settings);
    let numbers = app.topic::<String, u64>("numbers");
    let forwarded = app.topic::<String, u64>("forwarded");
    let counts = app.table::<String, u64>("count").with_default(|| 0);
    let highest = app.table::<String, u64>("highest").with_default(|| 0);
    {
        let forwarded = forwarded.clone();
        app.agent("forward", &numbers, move |stream| {
            let forwarded = forwarded.clone();
            async move {
                stream
                    .for_each(move |n| {
                        let p = faust::current_event().map_or(0, |e| e.partition);
                        forwarded.send_soon(Some(&format!("p{p}")), &n)?;
                        Ok(())
                    })
                    .await
            }
        });
    }
    {
        let (counts, highest) = (counts.clone(), highest.clone());
        app.agent("count", &forwarded, move |mut stream| {
            let (counts, highest) = (counts.clone(), highest.clone());
            async move {
                while let Some((key, n)) = stream.next_item().await {
                    let key = key.ok_or("forwarded records are keyed")?;
                    counts.update(&key, |c| *c += 1)?;
                    highest.update(&key, |h| *h = (*h).max(n))?;
                }
                Ok(())
            }
        });
    }
    match mode.as_str() {
        "work" => {
            if let Err(e) = app.stop_on_signals() {
                eprintln!("stress: signals: {e}");
                std::process::exit(1);
            }
            if let Err(e) = app.run() {
                eprintln!("stress: {e}");
                std::process::exit(1);
            }
        }
        "verify" => {
            let (Some(expected), Some(out)) = (args.get(4).and_then(|n| n.parse::<u64>().ok()), args.get(5)) else {
                eprintln!("usage: stress BROKER DATADIR verify EXPECTED OUT");
                std::process::exit(2);
            };
            let snapshot: Arc<Mutex<Snapshot>> = Arc::default();
            let total = Arc::new(AtomicU64::new(0));
            {
                let (counts, highest, snapshot, total) =
                    (counts.clone(), highest.clone(), snapshot.clone(), total.clone());
                app.timer_on_every_core(Duration::from_millis(100), move || {
                    let (counts, highest, snapshot, total) =
                        (counts.clone(), highest.clone(), snapshot.clone(), total.clone());
                    async move {
                        let core = faust::runtime::current_core().ok_or("timers run on cores")?;
                        let mine = (counts.local_items()?, highest.local_items()?);
                        let mut all = snapshot.lock().map_err(|_| "poisoned")?;
                        all.insert(core, mine);
                        total.store(all.values().flat_map(|(c, _)| c.iter().map(|(_, n)| n)).sum(), Ordering::SeqCst);
                        Ok(())
                    }
                });
            }
            let stop = app.stop_signal();
            let watcher = {
                let total = total.clone();
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(180);
                    while total.load(Ordering::SeqCst) < expected && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    // Anything counted twice would show up now.
                    std::thread::sleep(Duration::from_millis(500));
                    stop.stop();
                })
            };
            let result = app.run();
            let _ = watcher.join();
            if let Err(e) = result {
                eprintln!("stress: {e}");
                std::process::exit(1);
            }
            let all = snapshot.lock().unwrap_or_else(|p| p.into_inner());
            let counts: BTreeMap<String, u64> = all.values().flat_map(|(c, _)| c.iter().cloned()).collect();
            let highest: BTreeMap<String, u64> = all.values().flat_map(|(_, h)| h.iter().cloned()).collect();
            let json = serde_json::json!({ "count": counts, "highest": highest });
            if let Err(e) = std::fs::write(out, json.to_string()) {
                eprintln!("stress: writing {out}: {e}");
                std::process::exit(1);
            }
        }
        other => {
            eprintln!("stress: unknown mode {other}");
            std::process::exit(2);
        }
    }
}
