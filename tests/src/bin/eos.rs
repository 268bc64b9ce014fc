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

use std::time::Duration;

use faust::{App, ProcessingGuarantee, Settings};

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
            let tally = faust_tests::tally::Tally::follow(&app, &counts, &sums);
            let watcher = tally.stop_when_counted(&app, n, Duration::from_millis(300));
            if let Err(e) = app.run() {
                eprintln!("eos: {e}");
                std::process::exit(1);
            }
            let _ = watcher.join();
            if let Err(e) = tally.write(&out) {
                eprintln!("eos: {e}");
                std::process::exit(1);
            }
        }
        other => {
            eprintln!("eos: unknown mode {other}");
            std::process::exit(2);
        }
    }
}
