//! A worker for the table crash tests: counts events per key, and sums their values, in two
//! tables on `local://`.
//!
//! ```text
//! counter DATADIR load N SEED [KEYS]   create `events` (4 partitions) and write N events to it
//! counter DATADIR count N OUT    count until the tables hold N events, write them to OUT (JSON)
//! ```
//!
//! Keys are `acct-{r}` for a random `r` below KEYS (default 50; from SEED); the value of
//! event `i` is `i`.
//! With `FAUST_CRASH_AT=<point>:<n>` the engine aborts at that step of its commit protocol.
//! Settings come from the environment too (`SEGMENT_BYTES`).

use std::time::Duration;

use faust::{App, Settings};
use rand::{Rng, SeedableRng};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(datadir), Some(mode), Some(n)) = (args.get(1), args.get(2), args.get(3).and_then(|n| n.parse().ok()))
    else {
        eprintln!("usage: counter DATADIR load N SEED [KEYS] | count N OUT");
        std::process::exit(2);
    };
    let n: u64 = n;
    let mut settings = Settings::new("counter");
    settings.datadir = datadir.into();
    settings.topic_partitions = 4;
    settings.commit_interval = Duration::from_millis(30);
    // `SEGMENT_BYTES` and the other settings from the environment.
    let settings = match settings.from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("counter: {e}");
            std::process::exit(2);
        }
    };
    let app = App::new(settings);
    let events = app.topic::<String, u64>("events");
    let stop = app.stop_signal();
    match mode.as_str() {
        "load" => {
            let seed: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
            let keys: u64 = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(50);
            let stop = stop.clone();
            app.task(move || {
                let (events, stop) = (events.clone(), stop.clone());
                async move {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                    for i in 0..n {
                        events.send_soon(Some(&format!("acct-{}", rng.gen_range(0..keys))), &i)?;
                    }
                    events.send(Some(&"acct-0".to_string()), &n).await?;
                    stop.stop();
                    Ok(())
                }
            });
            if let Err(e) = app.run() {
                eprintln!("counter: {e}");
                std::process::exit(1);
            }
        }
        "count" => {
            let Some(out) = args.get(4).cloned() else {
                eprintln!("usage: counter DATADIR count N OUT");
                std::process::exit(2);
            };
            // `load` writes one extra event (its last, awaited send).
            let expected = n + 1;
            let counts = app.table::<String, u64>("counts").with_default(|| 0);
            let sums = app.table::<String, u64>("sums").with_default(|| 0);
            {
                let (counts, sums) = (counts.clone(), sums.clone());
                app.agent("count", &events, move |mut stream| {
                    let (counts, sums) = (counts.clone(), sums.clone());
                    async move {
                        while let Some((key, value)) = stream.next_item().await {
                            let key = key.ok_or("events are keyed")?;
                            counts.update(&key, |c| *c += 1)?;
                            sums.update(&key, |s| *s += value)?;
                        }
                        Ok(())
                    }
                });
            }
            let tally = faust_tests::tally::Tally::follow(&app, &counts, &sums);
            let watcher = tally.stop_when_counted(&app, expected, Duration::ZERO);
            if let Err(e) = app.run() {
                eprintln!("counter: {e}");
                std::process::exit(1);
            }
            let _ = watcher.join();
            if let Err(e) = tally.write(&out) {
                eprintln!("counter: {e}");
                std::process::exit(1);
            }
        }
        other => {
            eprintln!("counter: unknown mode {other}");
            std::process::exit(2);
        }
    }
}
