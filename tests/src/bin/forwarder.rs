//! A worker for the end-to-end tests: forwards topic `a` to topic `b` on `local://`.
//!
//! ```text
//! forwarder DATADIR produce N      create a and b (4 partitions) and write N events to a
//! forwarder DATADIR forward [soon] forward a -> b until stopped (or killed)
//! forwarder DATADIR drain [soon]   forward until no event arrived for a second, then stop
//! ```
//!
//! With `soon`, the agent sends with `send_soon` (buffered, flushed before each commit)
//! instead of awaiting each send.
//!
//! ```text
//! ```
//!
//! Keys are `k{i % 16}`, values the event number `i`, so each key's values increase.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use faust::{App, Settings};

fn settings(datadir: &str) -> Settings {
    let mut s = Settings::new("forwarder");
    s.datadir = datadir.into();
    s.topic_partitions = 4;
    s.commit_interval = Duration::from_millis(50);
    s
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(datadir), Some(mode)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: forwarder DATADIR produce N | forward | drain");
        std::process::exit(2);
    };
    let app = App::new(settings(datadir));
    let a = app.topic::<String, u64>("a");
    let b = app.topic::<String, u64>("b");
    let stop = app.stop_signal();
    match mode.as_str() {
        "produce" => {
            let n: u64 = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1000);
            let stop = stop.clone();
            app.task(move || {
                let (a, stop) = (a.clone(), stop.clone());
                async move {
                    for i in 0..n {
                        a.send(Some(&format!("k{}", i % 16)), &i).await?;
                    }
                    stop.stop();
                    Ok(())
                }
            });
        }
        "forward" | "drain" => {
            let soon = args.get(3).is_some_and(|a| a == "soon");
            let last_event = Arc::new(AtomicI64::new(0));
            let start = Instant::now();
            {
                let last_event = last_event.clone();
                app.agent("forward", &a, move |mut stream| {
                    let (b, last_event) = (b.clone(), last_event.clone());
                    async move {
                        while let Some(event) = stream.next_event().await {
                            if soon {
                                b.send_soon(event.key.as_ref(), &event.value)?;
                            } else {
                                b.send(event.key.as_ref(), &event.value).await?;
                            }
                            last_event.store(start.elapsed().as_millis() as i64, Ordering::Relaxed);
                        }
                        Ok(())
                    }
                });
            }
            if mode == "drain" {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_millis(100));
                        let idle = start.elapsed().as_millis() as i64 - last_event.load(Ordering::Relaxed);
                        if idle > 1000 {
                            stop.stop();
                            return;
                        }
                    }
                });
            }
        }
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
    if let Err(e) = app.run() {
        eprintln!("forwarder: {e}");
        std::process::exit(1);
    }
}
