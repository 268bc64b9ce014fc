//! A worker for the disk soak test: an update-heavy workload over a fixed key set on
//! `local://`, with disk use sampled every second.
//!
//! ```text
//! soak DATADIR SECONDS RATE KEYS OUT
//! ```
//!
//! For SECONDS, a task writes RATE events a second to `events` (4 partitions, each kept to
//! 2 MiB by `retention.bytes`), keyed `key-{i mod KEYS}`, each with a 100-byte value; an agent
//! counts them per key in the `counts` table (a store and a changelog per partition). Every
//! second the sizes on disk (allocated blocks) of the topic, the changelog and the stores are
//! sampled. Once every event is counted the worker stops and writes OUT (JSON): the samples,
//! the events sent and the events counted. `SEGMENT_BYTES` (and the other settings) come from
//! the environment.
//!
//! With `SOAK_WINDOWED=1` the count is per key in tumbling 1 s windows of the records' time,
//! each window kept readable 2 s after it closed: windows open, close and expire all the time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust::{App, Settings};
use faust_tests::disk_use;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let parse = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok());
    let (Some(datadir), Some(seconds), Some(rate), Some(keys), Some(out)) =
        (args.get(1), parse(2), parse(3), parse(4), args.get(5))
    else {
        eprintln!("usage: soak DATADIR SECONDS RATE KEYS OUT");
        std::process::exit(2);
    };
    let mut settings = Settings::new("soak");
    settings.datadir = datadir.into();
    settings.topic_partitions = 4;
    settings.commit_interval = Duration::from_millis(200);
    let settings = match settings.from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    let app = App::new(settings);
    let events = app.topic::<String, String>("events");
    // Retention deletes what the worker has not read yet once it lags by that much (as Kafka
    // would; the fetch then resumes at the earliest record, and those events are never
    // counted): 2 MiB a partition is about 3.5 s of lag at this rate, room for a
    // loaded 2-core machine. (1 MiB, under two seconds, lost ~11,000 events in a third of
    // the runs on 2026-12-04.)
    app.topic_retention(events.name(), None, Some(2 << 20));
    let counts = app.table::<String, u64>("counts").with_default(|| 0);
    // Windowed: the events counted, by the agent (windows expire, so the table cannot say).
    let windowed_count = Arc::new(AtomicU64::new(0));
    if std::env::var_os("SOAK_WINDOWED").is_some() {
        let windows = counts.clone().tumbling(Duration::from_secs(1)).expires(Duration::from_secs(2));
        let counted = windowed_count.clone();
        app.agent("count", &events, move |mut stream| {
            let (windows, counted) = (windows.clone(), counted.clone());
            async move {
                while let Some((key, _value)) = stream.next_item().await {
                    windows.update(&key.ok_or("events are keyed")?, |c| *c += 1)?;
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
        });
    } else {
        let counts = counts.clone();
        app.agent("count", &events, move |mut stream| {
            let counts = counts.clone();
            async move {
                while let Some((key, _value)) = stream.next_item().await {
                    counts.update(&key.ok_or("events are keyed")?, |c| *c += 1)?;
                }
                Ok(())
            }
        });
    }
    let sent = Arc::new(AtomicU64::new(0));
    let done_sending = Arc::new(AtomicBool::new(false));
    {
        let (sent, done_sending) = (sent.clone(), done_sending.clone());
        app.task(move || {
            let (events, sent, done_sending) = (events.clone(), sent.clone(), done_sending.clone());
            async move {
                let value = "v".repeat(100);
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < Duration::from_secs(seconds) {
                    // Keep to RATE events a second, in 10 ms slices.
                    let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                    while n < due {
                        events.send_soon(Some(&format!("key-{}", n % keys)), &value)?;
                        n += 1;
                    }
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
                events.send(Some(&format!("key-{}", n % keys)), &value).await?;
                sent.store(n + 1, Ordering::SeqCst);
                done_sending.store(true, Ordering::SeqCst);
                Ok(())
            }
        });
    }
    // Per core: the events its shards have counted.
    let counted: Arc<Mutex<BTreeMap<usize, u64>>> = Arc::default();
    if std::env::var_os("SOAK_WINDOWED").is_none() {
        let (counts, counted) = (counts.clone(), counted.clone());
        app.timer_on_every_core(Duration::from_millis(100), move || {
            let (counts, counted) = (counts.clone(), counted.clone());
            async move {
                let core = faust::runtime::current_core().ok_or("timers run on cores")?;
                let mine: u64 = counts.local_items()?.iter().map(|(_, n)| n).sum();
                counted.lock().map_err(|_| "poisoned")?.insert(core, mine);
                Ok(())
            }
        });
    }
    let samples: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sampler = {
        let (stop, sent, done_sending, counted, samples) =
            (app.stop_signal(), sent.clone(), done_sending.clone(), counted.clone(), samples.clone());
        let windowed_count = windowed_count.clone();
        let data = std::path::PathBuf::from(datadir);
        std::thread::spawn(move || {
            let start = Instant::now();
            let deadline = start + Duration::from_secs(seconds + 120);
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let topic = disk_use(&data.join("topics/events"));
                let changelog = disk_use(&data.join("topics/soak-counts-changelog"));
                let tables = disk_use(&data.join("tables"));
                let total: u64 =
                    counted.lock().map(|c| c.values().sum()).unwrap_or(0) + windowed_count.load(Ordering::Relaxed);
                if let Ok(mut s) = samples.lock() {
                    s.push(serde_json::json!({
                        "t": start.elapsed().as_secs_f64(),
                        "topic": topic,
                        "changelog": changelog,
                        "tables": tables,
                        "counted": total,
                    }));
                }
                let finished = done_sending.load(Ordering::SeqCst) && total >= sent.load(Ordering::SeqCst);
                if finished || Instant::now() > deadline {
                    break;
                }
            }
            stop.stop();
        })
    };
    if let Err(e) = app.run() {
        eprintln!("soak: {e}");
        std::process::exit(1);
    }
    let _ = sampler.join();
    let report = serde_json::json!({
        "sent": sent.load(Ordering::SeqCst),
        "counted": counted.lock().map(|c| c.values().sum::<u64>()).unwrap_or(0) + windowed_count.load(Ordering::Relaxed),
        "samples": *samples.lock().unwrap_or_else(|p| p.into_inner()),
    });
    if let Err(e) = std::fs::write(out, report.to_string()) {
        eprintln!("soak: writing {out}: {e}");
        std::process::exit(1);
    }
}
