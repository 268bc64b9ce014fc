//! The Faust README's program: JSON orders re-keyed by account with `group_by` and counted
//! per account in a table, on the embedded log.
//!
//! Without arguments it runs alone: a built-in generator writes the orders, the run ends once
//! every order is counted, and it prints the throughput.
//!
//! ```text
//! cargo run --release --example orders                  # 1,000,000 orders, 10,000 accounts
//! ORDERS=100000 ACCOUNTS=500 cargo run --release --example orders
//! ORDERS_DATADIR=orders-data cargo run --release --example orders   # keep the state; rerun to resume
//! ```
//!
//! With arguments it is the app's command line ([`faust::App::main`]): a worker that waits for
//! orders, and the commands that talk to it from another terminal.
//!
//! ```text
//! cargo run --release --example orders -- worker
//! cargo run --release --example orders -- send orders --key order-1 \
//!     '{"account_id": "account-1", "product_id": "product-7", "amount": 2, "price": 9.5}'
//! cargo run --release --example orders -- table get order_count account-1
//! cargo run --release --example orders -- --help
//! ```
//!
//! The generator writes `ORDERS` orders keyed by order id (it records its progress once what
//! it sent is durable, so a restarted run continues where it left off); the `count` agent
//! takes them grouped by account — through the repartition topic
//! `orders-count-orders-account_id-repartition`, so each account's orders reach the core that
//! holds its shard — and counts them per account in the `order_count` table, whose changelog
//! and stores make the counts survive crashes exactly; a timer on each core reads its shards
//! four times a second, and the count is printed every second. `ORDERS_DUMP=FILE` writes
//! every account's count to FILE as JSON at the end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust::{App, Settings, Table, Topic};
use serde::{Deserialize, Serialize};

/// Faust's `Order` record.
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    account_id: String,
    product_id: String,
    amount: u32,
    price: f64,
}

fn env_u64(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| format!("{name}={v}: expected a number")),
        Err(_) => Ok(default),
    }
}

/// Per core: (orders counted, accounts), as its timer last saw its shards.
type Totals = Arc<Mutex<BTreeMap<usize, (u64, u64)>>>;
/// Per core: every account's count in its shards.
type Counts = Arc<Mutex<BTreeMap<usize, Vec<(String, u64)>>>>;

/// Declares the orders topic, the count table and the agent that counts (Faust's program).
fn declare(app: &App) -> (Topic<String, Order>, Table<String, u64>) {
    let orders = app.topic::<String, Order>("orders");
    let order_count = app.table::<String, u64>("order_count").with_default(|| 0);
    // @app.agent(orders_topic)
    // async for order in orders.group_by(Order.account_id): order_count[order.account_id] += 1
    {
        let order_count = order_count.clone();
        let by_account = orders.group_by(|order: &Order| order.account_id.clone(), "account_id");
        app.agent("count", &by_account, move |mut stream| {
            let order_count = order_count.clone();
            async move {
                while let Some(order) = stream.next().await {
                    order_count.update(&order.account_id, |n| *n += 1)?;
                }
                Ok(())
            }
        });
    }
    (orders, order_count)
}

fn main() -> std::process::ExitCode {
    if std::env::args().len() > 1 {
        let settings = match Settings::new("orders").from_env() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::from(2);
            }
        };
        let app = App::new(settings);
        declare(&app);
        return app.main();
    }
    match run_alone() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The run without arguments: generate, count, report, stop.
fn run_alone() -> Result<(), Box<dyn std::error::Error>> {
    // Warnings and errors to stderr (RUST_LOG=info for more); the command line sets up its
    // own logging (`--log-level`).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    let orders_total = env_u64("ORDERS", 1_000_000)?;
    let accounts = env_u64("ACCOUNTS", 10_000)?.max(1);
    let temp = tempfile::tempdir()?;
    let datadir = std::env::var("ORDERS_DATADIR").map(PathBuf::from).unwrap_or_else(|_| temp.path().join("data"));
    let mut settings = Settings::new("orders").from_env()?;
    settings.datadir = datadir.clone();
    let app = App::new(settings);
    // Ctrl-C (or SIGTERM) stops gracefully: the counts are committed, a rerun resumes.
    app.stop_on_signals()?;
    let (orders, order_count) = declare(&app);

    // The generator, resuming from its recorded progress.
    let generated_all = Arc::new(AtomicBool::new(false));
    {
        let (orders, done, progress_file) = (orders.clone(), generated_all.clone(), datadir.join("generator.progress"));
        app.task(move || {
            let (orders, done, progress_file) = (orders.clone(), done.clone(), progress_file.clone());
            async move {
                let from: u64 =
                    std::fs::read_to_string(&progress_file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
                for id in from..orders_total {
                    let h = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    let order = Order {
                        account_id: format!("account-{}", h % accounts),
                        product_id: format!("product-{}", (h >> 24) % 1_000),
                        amount: 1 + ((h >> 40) % 10) as u32,
                        price: ((h >> 12) % 100_000) as f64 / 100.0,
                    };
                    orders.send_soon(Some(&format!("order-{id}")), &order)?;
                    if (id + 1) % 50_000 == 0 || id + 1 == orders_total {
                        // Durable first, then recorded: a restart may repeat orders, never skip.
                        faust::runtime::flush().await?;
                        std::fs::write(&progress_file, (id + 1).to_string())?;
                    } else if id % 4096 == 0 {
                        faust::runtime::yield_if_needed().await;
                    }
                }
                done.store(true, Ordering::SeqCst);
                Ok(())
            }
        });
    }

    // Each core reports what its shards hold.
    let totals: Totals = Arc::default();
    let counted = Arc::new(AtomicU64::new(0));
    let dump: Counts = Arc::default();
    let start = Instant::now();
    {
        let (order_count, totals, counted, dump) = (order_count.clone(), totals.clone(), counted.clone(), dump.clone());
        app.timer(Duration::from_millis(250), move || {
            let (order_count, totals, counted, dump) =
                (order_count.clone(), totals.clone(), counted.clone(), dump.clone());
            async move {
                let core = faust::runtime::current_core().ok_or("timers run on a core")?;
                let items = order_count.local_items()?;
                let mine = (items.iter().map(|(_, n)| n).sum::<u64>(), items.len() as u64);
                dump.lock().map_err(|_| "poisoned")?.insert(core, items);
                let mut all = totals.lock().map_err(|_| "poisoned")?;
                all.insert(core, mine);
                counted.store(all.values().map(|(n, _)| n).sum(), Ordering::SeqCst);
                Ok(())
            }
        });
    }

    // Stop once the generator is done and the count has not moved for a second.
    let stop = app.stop_signal();
    let watcher = {
        let (counted, generated_all) = (counted.clone(), generated_all.clone());
        std::thread::spawn(move || {
            let (mut last, mut still_since, mut last_print) = (u64::MAX, Instant::now(), Instant::now());
            let mut finished_at = None;
            // Until the work is done, or the worker is stopped otherwise (a signal).
            while start.elapsed() < Duration::from_secs(600) && !stop.is_stopped() {
                std::thread::sleep(Duration::from_millis(50));
                let now = counted.load(Ordering::SeqCst);
                if now != last {
                    (last, still_since) = (now, Instant::now());
                    if now >= orders_total && finished_at.is_none() {
                        finished_at = Some(start.elapsed());
                    }
                }
                if last_print.elapsed() >= Duration::from_secs(1) {
                    last_print = Instant::now();
                    println!("[{:5.1} s] {now} orders counted", start.elapsed().as_secs_f64());
                }
                if generated_all.load(Ordering::SeqCst) && still_since.elapsed() >= Duration::from_secs(1) {
                    break;
                }
            }
            stop.stop();
            finished_at
        })
    };
    app.run()?;
    let finished_at = watcher.join().map_err(|_| "watcher panicked")?;

    let all: BTreeMap<String, u64> =
        dump.lock().map_err(|_| "poisoned")?.values().flat_map(|items| items.iter().cloned()).collect();
    let total: u64 = all.values().sum();
    println!("{total} orders counted across {} accounts (state in {})", all.len(), datadir.display());
    if let Some(t) = finished_at {
        println!(
            "{orders_total} orders generated, written and counted in {:.2} s: {:.0} orders/s end to end",
            t.as_secs_f64(),
            orders_total as f64 / t.as_secs_f64()
        );
    }
    let mut top: Vec<(&String, &u64)> = all.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (account, n) in top.iter().take(3) {
        println!("  {account}: {n} orders");
    }
    if let Ok(path) = std::env::var("ORDERS_DUMP") {
        std::fs::write(&path, serde_json::to_string(&all)?)?;
    }
    Ok(())
}
