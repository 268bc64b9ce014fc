//! A worker for the windowed-table crash tests: counts events per key in tumbling 1 s
//! windows on `local://`, and sends each closed window's final count to `finals`.
//!
//! ```text
//! windows DATADIR load N KEYS   write N events to `events` (2 partitions): event i is key
//!                               `k{i % KEYS}` at time i × 10 ms
//! windows DATADIR run N KEYS OUT  count until the last event was processed, then stop and
//!                               write the live windows and each partition's stream time to OUT
//! ```
//!
//! With `FAUST_CRASH_AT=<point>:<n>` the engine aborts at that step of its commit protocol.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use faust::{App, Settings, WindowResult};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(datadir), Some(mode), Some(n)) = (args.get(1), args.get(2), args.get(3).and_then(|n| n.parse().ok()))
    else {
        eprintln!("usage: windows DATADIR load N KEYS | run N KEYS OUT");
        std::process::exit(2);
    };
    let n: u64 = n;
    let mut settings = Settings::new("windows");
    settings.datadir = datadir.into();
    settings.topic_partitions = 2;
    settings.cores = Some(1);
    settings.commit_interval = Duration::from_millis(20);
    let app = App::new(settings);
    let events = app.topic::<String, (u64, i64)>("events");
    let finals = app.topic::<String, WindowResult<u64>>("finals");
    let stop = app.stop_signal();
    match mode.as_str() {
        "load" => {
            let keys: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(5);
            app.task(move || {
                let (events, stop) = (events.clone(), stop.clone());
                async move {
                    for i in 0..n {
                        events.send_soon(Some(&format!("k{}", i % keys)), &(i, i as i64 * 10))?;
                    }
                    events.send(Some(&"k0".to_string()), &(n, n as i64 * 10)).await?;
                    stop.stop();
                    Ok(())
                }
            });
        }
        "run" => {
            let keys: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(5);
            let out = args.get(5).cloned().unwrap_or_else(|| "windows.json".into());
            let counts = app
                .table::<String, u64>("counts")
                .with_default(|| 0)
                .tumbling(Duration::from_secs(1))
                .expires(Duration::from_secs(2))
                .emit_final(&finals);
            let finished = Arc::new(AtomicBool::new(false));
            {
                // A run that finds every event processed already (a crash after the last
                // commit) stops once it has caught up.
                let (stats_of, stop, finished) = (app.clone(), stop.clone(), finished.clone());
                std::thread::spawn(move || {
                    let mut caught_up = 0;
                    while caught_up < 5 {
                        std::thread::sleep(Duration::from_millis(50));
                        let stats = stats_of.stats();
                        let idle = stats.partitions_assigned > 0 && stats.lag == 0;
                        caught_up = if idle { caught_up + 1 } else { 0 };
                    }
                    finished.store(true, Ordering::Relaxed);
                    stop.stop();
                });
            }
            app.agent("count", &events, move |mut stream| {
                let (counts, stop, finished, out) = (counts.clone(), stop.clone(), finished.clone(), out.clone());
                async move {
                    while let Some((key, (i, t))) = stream.next_item().await {
                        counts.update_at(&key.unwrap_or_default(), t, |c| *c += 1)?;
                        if i >= n {
                            finished.store(true, Ordering::Relaxed);
                            stop.stop();
                        }
                    }
                    if finished.load(Ordering::Relaxed) {
                        write_state(&counts, keys, &out)?;
                    }
                    Ok(())
                }
            });
        }
        _ => {
            eprintln!("usage: windows DATADIR load N KEYS | run N KEYS OUT");
            std::process::exit(2);
        }
    }
    if let Err(e) = app.run() {
        eprintln!("windows: {e}");
        std::process::exit(1);
    }
}

/// Writes every live window (partition, key, start, end, count) and each partition's stream
/// time to `out` as JSON.
fn write_state(counts: &faust::WindowedTable<String, u64>, keys: u64, out: &str) -> Result<(), faust::AgentError> {
    let mut windows = Vec::new();
    let mut times = Vec::new();
    for p in 0..2u32 {
        let part = counts.partition(p);
        times.push((p, part.stream_time()?));
        for k in 0..keys {
            let key = format!("k{k}");
            for (w, v) in part.windows(&key)? {
                windows.push((p, key.clone(), w.start, w.end, v));
            }
        }
    }
    let json = serde_json::json!({ "stream_time": times, "windows": windows });
    std::fs::write(out, json.to_string())?;
    Ok(())
}
