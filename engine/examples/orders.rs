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
//! four times a second, and the count shows as a progress bar (rate, time left) on a
//! terminal, a line a second otherwise. `ORDERS_DUMP=FILE` writes every account's count to
//! FILE as JSON at the end.

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

/// How long the job waits while the worker's writes fail before it gives up with an error.
const BLOCKED_LIMIT: Duration = Duration::from_secs(10);

/// Orders the generator writes between two records of its progress.
const PROGRESS_EVERY: u64 = 50_000;
/// A count that stays still this long once every order was generated, without the worker
/// catching up, is stuck: the run stops and the check reports what was not counted.
const STILL_LIMIT: Duration = Duration::from_secs(30);

/// The account of order `id` (the generator's orders are a function of their id).
fn account_of(id: u64, accounts: u64) -> String {
    format!("account-{}", id.wrapping_mul(0x9e37_79b9_7f4a_7c15) % accounts)
}

/// The run without arguments: generate, count, report, check, stop.
fn run_alone() -> Result<(), Box<dyn std::error::Error>> {
    // Warnings and errors to stderr (RUST_LOG=info for more), in colour only on a terminal;
    // the command line sets up its own logging (`--log-level`).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(faust::log_writer).with_ansi(ansi).try_init();
    let orders_total = env_u64("ORDERS", 1_000_000)?;
    let accounts = env_u64("ACCOUNTS", 10_000)?.max(1);
    let temp = tempfile::tempdir()?;
    let kept = std::env::var("ORDERS_DATADIR").ok().map(PathBuf::from);
    let datadir = kept.clone().unwrap_or_else(|| temp.path().join("data"));
    let mut settings = Settings::new("orders").from_env()?;
    settings.datadir = datadir.clone();
    let app = App::new(settings);
    // Ctrl-C (or SIGTERM) stops gracefully: the counts are committed, a rerun resumes.
    app.stop_on_signals()?;
    let (orders, order_count) = declare(&app);

    // The generator, resuming from its recorded progress. A write it cannot make (a full
    // disk) ends the run with that error: its orders stay buffered until then, so nothing
    // that was recorded as written is lost, and a rerun on the same data directory resumes.
    let progress_file = datadir.join("generator.progress");
    let recorded = std::fs::read_to_string(&progress_file).ok();
    // A run that finds a progress file is not a run from scratch, even when its record is 0:
    // the run before may have written orders before its first record.
    let resumed = recorded.is_some();
    let resumed_from: u64 = recorded.and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    if !resumed {
        std::fs::create_dir_all(&datadir)?;
        std::fs::write(&progress_file, "0")?;
    }
    let generated_all = Arc::new(AtomicBool::new(false));
    let generator_failed: Arc<Mutex<Option<String>>> = Arc::default();
    {
        let (orders, done, failed, stop) =
            (orders.clone(), generated_all.clone(), generator_failed.clone(), app.stop_signal());
        app.task(move || {
            let (orders, done, failed, stop, progress_file) =
                (orders.clone(), done.clone(), failed.clone(), stop.clone(), progress_file.clone());
            async move {
                let generate = async {
                    for id in resumed_from..orders_total {
                        let h = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        let order = Order {
                            account_id: account_of(id, accounts),
                            product_id: format!("product-{}", (h >> 24) % 1_000),
                            amount: 1 + ((h >> 40) % 10) as u32,
                            price: ((h >> 12) % 100_000) as f64 / 100.0,
                        };
                        orders.send_soon(Some(&format!("order-{id}")), &order)?;
                        if (id + 1) % PROGRESS_EVERY == 0 || id + 1 == orders_total {
                            // Durable first, then recorded: a restart may repeat orders, never skip.
                            faust::runtime::flush().await?;
                            std::fs::write(&progress_file, (id + 1).to_string())?;
                        } else if id % 4096 == 0 {
                            faust::runtime::yield_if_needed().await;
                        }
                    }
                    Ok::<(), Box<dyn std::error::Error>>(())
                };
                match generate.await {
                    Ok(()) => done.store(true, Ordering::SeqCst),
                    Err(e) => {
                        *failed.lock().map_err(|_| "poisoned")? = Some(e.to_string());
                        stop.stop();
                    }
                }
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
        app.timer_on_every_core(Duration::from_millis(250), move || {
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

    // Stop once the generator is done, the worker caught up with every topic it consumes
    // (lag 0, every order counted) and the count has not moved for a second; or, if the count
    // stays still for `STILL_LIMIT` without getting there, so that the check below says what
    // is missing; or, with an error, once writes have kept failing for `BLOCKED_LIMIT` (a full
    // disk: the worker waits for space, which a benchmark job should not do for long).
    let stop = app.stop_signal();
    let watcher = {
        let (counted, generated_all, failed, app) =
            (counted.clone(), generated_all.clone(), generator_failed.clone(), app.clone());
        std::thread::spawn(move || {
            let (mut last, mut still_since, mut last_print) = (u64::MAX, Instant::now(), Instant::now());
            // On a terminal, a bar (orders counted, rate, time left); otherwise a line a second.
            let mut bar = std::io::IsTerminal::is_terminal(&std::io::stderr())
                .then(|| faust::Progress::new("counting orders", Some(orders_total)));
            let mut finished_at = None;
            let mut blocked_since: Option<Instant> = None;
            // Until the work is done, or the worker is stopped otherwise (a signal).
            while start.elapsed() < Duration::from_secs(600) && !stop.is_stopped() {
                std::thread::sleep(Duration::from_millis(50));
                let stats = app.stats();
                match (stats.writes_blocked, blocked_since) {
                    (false, _) => blocked_since = None,
                    (true, None) => blocked_since = Some(Instant::now()),
                    (true, Some(since)) if since.elapsed() >= BLOCKED_LIMIT => {
                        let problems = app.problems().join("; ");
                        if let Ok(mut failed) = failed.lock() {
                            failed.get_or_insert(format!(
                                "writes kept failing for {} s ({problems})",
                                BLOCKED_LIMIT.as_secs()
                            ));
                        }
                        break;
                    }
                    (true, Some(_)) => {}
                }
                let now = counted.load(Ordering::SeqCst);
                if now != last {
                    (last, still_since) = (now, Instant::now());
                    if now >= orders_total && finished_at.is_none() {
                        finished_at = Some(start.elapsed());
                    }
                }
                if let Some(bar) = &mut bar {
                    bar.set(now, None);
                } else if last_print.elapsed() >= Duration::from_secs(1) {
                    last_print = Instant::now();
                    println!("[{:5.1} s] {now} orders counted", start.elapsed().as_secs_f64());
                }
                // A loaded machine may hold a core still for a while (a slow disk's sync):
                // stillness alone does not mean the count is done.
                let caught_up = stats.lag == 0 && now >= orders_total;
                let still = still_since.elapsed();
                if generated_all.load(Ordering::SeqCst)
                    && (caught_up && still >= Duration::from_secs(1) || still >= STILL_LIMIT)
                {
                    break;
                }
            }
            if let Some(bar) = &mut bar {
                bar.finish();
            }
            stop.stop();
            finished_at
        })
    };
    let ran = app.run();
    let finished_at = watcher.join().map_err(|_| "watcher panicked")?;
    if let Some(e) = generator_failed.lock().map_err(|_| "poisoned")?.take() {
        let resume = match &kept {
            Some(dir) => format!("rerun with ORDERS_DATADIR={} to resume", dir.display()),
            None => "set ORDERS_DATADIR to keep the state and resume after such a stop".to_string(),
        };
        return Err(format!("writing the orders failed: {e}; the run stopped ({resume})").into());
    }
    ran?;

    let all: BTreeMap<String, u64> =
        dump.lock().map_err(|_| "poisoned")?.values().flat_map(|items| items.iter().cloned()).collect();
    let total: u64 = all.values().sum();
    let state = match &kept {
        Some(dir) => format!("state in {}", dir.display()),
        None => "state in a temporary directory, deleted now; ORDERS_DATADIR=DIR keeps it".to_string(),
    };
    println!("{total} orders counted across {} accounts ({state})", all.len());
    if !generated_all.load(Ordering::SeqCst) {
        println!("stopped before every order was generated: rerun with the same ORDERS_DATADIR to go on");
        return Ok(());
    }
    let this_run = orders_total - resumed_from.min(orders_total);
    if let Some(t) = finished_at.filter(|_| this_run > 0) {
        let resumed = match resumed_from {
            0 => String::new(),
            n => format!(" (this run: orders {n}..{orders_total}, after a restart)"),
        };
        println!(
            "{this_run} orders generated, written and counted in {:.2} s: {:.0} orders/s end to end{resumed}",
            t.as_secs_f64(),
            this_run as f64 / t.as_secs_f64()
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
    check(&all, orders_total, accounts, resumed)
}

/// Checks the counts against the orders the generator makes. A run from scratch counts each
/// exactly once. A resumed run may count some twice: the generator records its progress
/// every `PROGRESS_EVERY` orders, so after a stop it writes again those it wrote since its
/// last record — real records in the topic, each counted once.
fn check(
    counted: &BTreeMap<String, u64>,
    orders: u64,
    accounts: u64,
    resumed: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for id in 0..orders {
        *expected.entry(account_of(id, accounts)).or_default() += 1;
    }
    let short: Vec<String> = expected
        .iter()
        .filter(|(account, n)| counted.get(*account).copied().unwrap_or(0) < **n)
        .take(5)
        .map(|(account, n)| format!("{account}: {} of {n}", counted.get(account).copied().unwrap_or(0)))
        .collect();
    if !short.is_empty() {
        return Err(format!("check failed: orders were not counted ({})", short.join(", ")).into());
    }
    let total: u64 = counted.values().sum();
    let extra = total - orders;
    match (extra, resumed) {
        (0, _) => println!("check: every one of the {orders} orders counted exactly once"),
        (n, true) => println!(
            "check: every order counted; {n} were written twice by the generator after a restart (it records its progress every {PROGRESS_EVERY} orders and writes again what came after), and each copy is counted once"
        ),
        (n, false) => {
            return Err(format!("check failed: {n} orders counted more than once in a run from scratch").into());
        }
    }
    Ok(())
}
