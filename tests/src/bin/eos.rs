//! A worker for the exactly-once tests on `local://`: forwards topic `in` to topic `out` and
//! counts `out` per key in a table, with `processing_guarantee = exactly_once`.
//!
//! ```text
//! eos DATADIR load FROM TO       create `in` and `out` (4 partitions each) and write events FROM..TO to `in`
//! eos DATADIR run N OUT [MODE]   forward and count until the table holds N events; write it to OUT (JSON)
//! ```
//!
//! Event `i` has key `k{i % 16}` and value `i`. The forwarding agent awaits each send
//! (MODE `await`, the default), buffers it with `send_soon` (`soon`), or awaits it and then
//! dawdles before taking the next event now and then (`slow`: an event whose output is
//! already in the log stays unacked for a while, which a commit must not split). The counting agent reads `out` in the same app, so
//! it sees only committed outputs: a count above N would be an output seen twice.
//! With `FAUST_CRASH_AT=<point>:<n>` the engine aborts at that step of its commit protocol.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust::{App, ProcessingGuarantee, Settings};

type Snapshot = HashMap<usize, (Vec<(String, u64)>, Vec<(String, u64)>)>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(datadir), Some(mode), Some(n)) = (args.get(1), args.get(2), args.get(3).and_then(|n| n.parse().ok()))
    else {
        eprintln!("usage: eos DATADIR load FROM TO | run N OUT [soon]");
        std::process::exit(2);
    };
    let n: u64 = n;
    let mut settings = Settings::new("eos");
    settings.datadir = datadir.into();
    settings.topic_partitions = 4;
    settings.commit_interval = Duration::from_millis(30);
    if mode == "run" {
        settings.processing_guarantee = ProcessingGuarantee::ExactlyOnce;
    }
    // `BROKER_URL` and the other settings from the environment.
    let settings = match settings.from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("eos: {e}");
            std::process::exit(2);
        }
    };
    let app = App::new(settings);
    let input = app.topic::<String, u64>("in");
    let output = app.topic::<String, u64>("out");
    let stop = app.stop_signal();
    match mode.as_str() {
        "load" => {
            let (from, to) = (n, args.get(4).and_then(|t| t.parse::<u64>().ok()).unwrap_or(n));
            let stop = stop.clone();
            app.task(move || {
                let (input, stop) = (input.clone(), stop.clone());
                async move {
                    for i in from..to {
                        input.send_soon(Some(&format!("k{}", i % 16)), &i)?;
                    }
                    stop.stop();
                    Ok(())
                }
            });
            if let Err(e) = app.run() {
                eprintln!("eos: {e}");
                std::process::exit(1);
            }
        }
        "run" => {
            let Some(out) = args.get(4).cloned() else {
                eprintln!("usage: eos DATADIR run N OUT [soon]");
                std::process::exit(2);
            };
            let mode = args.get(5).cloned().unwrap_or_default();
            let (soon, slow) = (mode == "soon", mode == "slow");
            {
                let output = output.clone();
                app.agent("forward", &input, move |mut stream| {
                    let output = output.clone();
                    async move {
                        while let Some((key, value)) = stream.next_item().await {
                            if soon {
                                output.send_soon(key.as_ref(), &value)?;
                            } else {
                                output.send(key.as_ref(), &value).await?;
                            }
                            if slow && value % 64 == 0 {
                                glommio::timer::sleep(Duration::from_millis(3)).await;
                            }
                        }
                        Ok(())
                    }
                });
            }
            let counts = app.table::<String, u64>("counts").with_default(|| 0);
            let sums = app.table::<String, u64>("sums").with_default(|| 0);
            {
                let (counts, sums) = (counts.clone(), sums.clone());
                app.agent("count", &output, move |mut stream| {
                    let (counts, sums) = (counts.clone(), sums.clone());
                    async move {
                        while let Some((key, value)) = stream.next_item().await {
                            let key = key.ok_or("outputs are keyed")?;
                            counts.update(&key, |c| *c += 1)?;
                            sums.update(&key, |s| *s += value)?;
                        }
                        Ok(())
                    }
                });
            }
            let snapshot: Arc<Mutex<Snapshot>> = Arc::default();
            let total = Arc::new(AtomicU64::new(0));
            {
                let (counts, sums, snapshot, total) = (counts.clone(), sums.clone(), snapshot.clone(), total.clone());
                app.timer(Duration::from_millis(10), move || {
                    let (counts, sums, snapshot, total) =
                        (counts.clone(), sums.clone(), snapshot.clone(), total.clone());
                    async move {
                        let core = faust::runtime::current_core().ok_or("timers run on cores")?;
                        let mine = (counts.local_items()?, sums.local_items()?);
                        let mut all = snapshot.lock().map_err(|_| "poisoned")?;
                        all.insert(core, mine);
                        total.store(all.values().flat_map(|(c, _)| c.iter().map(|(_, n)| n)).sum(), Ordering::SeqCst);
                        Ok(())
                    }
                });
            }
            let watcher = {
                let (stop, total) = (stop.clone(), total.clone());
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while total.load(Ordering::SeqCst) < n && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    // A little longer: an output counted twice would show now.
                    std::thread::sleep(Duration::from_millis(300));
                    stop.stop();
                })
            };
            if let Err(e) = app.run() {
                eprintln!("eos: {e}");
                std::process::exit(1);
            }
            let _ = watcher.join();
            let all = snapshot.lock().map(|s| s.clone()).unwrap_or_default();
            let mut dump: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
            for (c, s) in all.values() {
                dump.entry("counts").or_default().extend(c.iter().cloned());
                dump.entry("sums").or_default().extend(s.iter().cloned());
            }
            let text = serde_json::to_string(&dump).unwrap_or_default();
            if let Err(e) = std::fs::write(&out, text) {
                eprintln!("eos: writing {out}: {e}");
                std::process::exit(1);
            }
        }
        other => {
            eprintln!("eos: unknown mode {other}");
            std::process::exit(2);
        }
    }
}
