//! Orders, end to end on the embedded log: a task writes orders to a topic, an agent on every
//! core decodes them, keeps the ones with something in them, turns each into a sale and
//! forwards it to another topic, counting sales per country on its core.
//!
//! ```text
//! cargo run --release --example orders            # 1,000,000 orders
//! ORDERS=100000 cargo run --release --example orders
//! ```
//!
//! (Counting per country across cores, in a table replicated through a changelog, is the
//! next step of the engine; here each core keeps its own counts.)

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust::{App, Settings};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u64,
    customer: String,
    country: String,
    quantity: u32,
    price_cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Sale {
    id: u64,
    country: String,
    total_cents: u64,
}

const COUNTRIES: [&str; 4] = ["US", "DE", "FR", "JP"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::var("ORDERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let mut settings = Settings::new("orders").from_env()?;
    settings.datadir = dir.path().join("data");
    let app = App::new(settings);
    let orders = app.topic::<String, Order>("orders");
    let sales = app.topic::<String, Sale>("sales");

    let seen = Arc::new(AtomicU64::new(0));
    let totals = Arc::new(Mutex::new(BTreeMap::<String, (u64, u64)>::new()));
    {
        let (seen, totals) = (seen.clone(), totals.clone());
        app.agent("sales", &orders, move |stream| {
            let (sales, seen, totals) = (sales.clone(), seen.clone(), totals.clone());
            async move {
                let counted = seen.clone();
                let mut stream = stream
                    .filter(move |o| {
                        counted.fetch_add(1, Ordering::Relaxed);
                        o.quantity > 0
                    })
                    .map(|o| Sale { id: o.id, total_cents: o.price_cents * u64::from(o.quantity), country: o.country });
                // This core's counts: (sales, cents) per country.
                let mut mine = BTreeMap::<String, (u64, u64)>::new();
                while let Some(sale) = stream.next().await {
                    let entry = mine.entry(sale.country.clone()).or_default();
                    entry.0 += 1;
                    entry.1 += sale.total_cents;
                    sales.send_soon(Some(&sale.country), &sale)?;
                }
                let mut all = totals.lock().map_err(|_| "totals lock poisoned")?;
                for (country, (count, cents)) in mine {
                    let entry = all.entry(country).or_default();
                    entry.0 += count;
                    entry.1 += cents;
                }
                Ok(())
            }
        });
    }
    let start = Instant::now();
    app.task(move || {
        let orders = orders.clone();
        async move {
            for id in 0..n {
                let h = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let order = Order {
                    id,
                    customer: format!("customer-{}", h % 10_000),
                    country: COUNTRIES[(h >> 50) as usize % 4].to_string(),
                    quantity: ((h >> 40) % 5) as u32,
                    price_cents: 100 + (h >> 12) % 20_000,
                };
                orders.send_soon(Some(&order.customer), &order)?;
                if id % 4096 == 0 {
                    faust::runtime::yield_if_needed().await;
                }
            }
            Ok(())
        }
    });
    let stop = app.stop_signal();
    let watcher = std::thread::spawn(move || {
        while seen.load(Ordering::Relaxed) < n && start.elapsed() < Duration::from_secs(300) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let elapsed = start.elapsed();
        stop.stop();
        elapsed
    });
    app.run()?;
    let elapsed = watcher.join().map_err(|_| "watcher panicked")?;
    println!(
        "{n} orders written and processed in {:.2} s: {:.0} orders/s end to end",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    for (country, (count, cents)) in totals.lock().map_err(|_| "totals lock poisoned")?.iter() {
        println!("{country}: {count} sales, {:.2} total", *cents as f64 / 100.0);
    }
    Ok(())
}
