//! Fixed-layout orders read in place: the `orders` topic carries `Fixed<Order>` values (a
//! 16-byte little-endian record, no JSON), and the `sum` agent adds each order's amount to
//! its account's total in a table, reading the amount where the record was fetched.
//!
//! ```text
//! cargo run --release --example zerocopy                 # 1,000,000 orders, 1,000 accounts
//! ORDERS=100000 ACCOUNTS=50 cargo run --release --example zerocopy
//! ```
//!
//! A task on core 0 writes `ORDERS` orders keyed by account; the agent sums them; a timer on
//! each core reads its shards, and the run stops once every order is summed (or after two
//! minutes), then checks the totals against sums computed here. It runs on `local://` in a
//! temporary directory and exits by itself: 0 when the totals are right.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust::{App, Codec, Fixed, Settings};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// An order as 16 bytes on the wire: account, item count, amount in cents. Little-endian
/// integers with no alignment, so the record can be viewed in any buffer.
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Order {
    account: U32,
    items: U32,
    amount_cents: U64,
}

/// The `i`-th order over `accounts` accounts (deterministic).
fn order(i: u64, accounts: u64) -> Order {
    let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    Order {
        account: ((h % accounts) as u32).into(),
        items: ((1 + (h >> 40) % 10) as u32).into(),
        amount_cents: (100 + (h >> 12) % 100_000).into(),
    }
}

fn env_u64(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| format!("{name}={v}: expected a number")),
        Err(_) => Ok(default),
    }
}

/// Per core: every account's total in its shards, as its timer last read them.
type Totals = Arc<Mutex<BTreeMap<usize, Vec<(u32, u64)>>>>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total_orders = env_u64("ORDERS", 1_000_000)?;
    let accounts = env_u64("ACCOUNTS", 1_000)?.clamp(1, u64::from(u32::MAX));
    let temp = tempfile::tempdir()?;
    let mut settings = Settings::new("zerocopy").from_env()?;
    settings.datadir = temp.path().join("data");
    settings.broker = "local://".to_string();
    let app = App::new(settings);

    // Keys are account numbers (JSON, so records of one account share a partition); values
    // are fixed-layout records under `raw`, which the agent reads where they were fetched.
    let orders = app.topic_with::<u32, Fixed<Order>>("orders", Codec::JSON, Codec::RAW);
    let sums = app.table::<u32, u64>("sums").with_codecs(Codec::JSON, Codec::JSON).with_default(|| 0);

    // @app.agent(orders): sums[order.account] += order.amount_cents
    let summed = Arc::new(AtomicU64::new(0));
    let (first, last) = (Arc::new(Mutex::new(None::<Instant>)), Arc::new(Mutex::new(None::<Instant>)));
    {
        let (sums, summed, first, last) = (sums.clone(), summed.clone(), first.clone(), last.clone());
        app.agent("sum", &orders, move |stream| {
            let (sums, summed, first, last) = (sums.clone(), summed.clone(), first.clone(), last.clone());
            // `order` is a `&Order` in the fetched buffer itself: nothing decoded, copied
            // or reference-counted.
            stream.for_each_in_place(move |order: &Order| {
                sums.update(&order.account.get(), |total| *total += order.amount_cents.get())?;
                let n = summed.fetch_add(1, Ordering::Relaxed) + 1;
                if n == 1 {
                    first.lock().map_err(|_| "poisoned")?.get_or_insert_with(Instant::now);
                }
                if n == total_orders {
                    *last.lock().map_err(|_| "poisoned")? = Some(Instant::now());
                }
                Ok(())
            })
        });
    }

    // The generator: every order, keyed by its account.
    {
        let orders = orders.clone();
        app.task(move || {
            let orders = orders.clone();
            async move {
                for i in 0..total_orders {
                    let o = order(i, accounts);
                    orders.send_soon(Some(&o.account.get()), &Fixed::new(&o))?;
                    if i % 4096 == 0 {
                        faust::runtime::yield_if_needed().await;
                    }
                }
                faust::runtime::flush().await?;
                Ok(())
            }
        });
    }

    // Each core reports what its shards hold.
    let totals: Totals = Arc::default();
    {
        let (sums, totals) = (sums.clone(), totals.clone());
        app.timer_on_every_core(Duration::from_millis(100), move || {
            let (sums, totals) = (sums.clone(), totals.clone());
            async move {
                let core = faust::runtime::current_core().ok_or("timers run on a core")?;
                let items = sums.local_items()?;
                totals.lock().map_err(|_| "poisoned")?.insert(core, items);
                Ok(())
            }
        });
    }

    // The expected totals, computed here.
    let mut expected: BTreeMap<u32, u64> = BTreeMap::new();
    for i in 0..total_orders {
        let o = order(i, accounts);
        *expected.entry(o.account.get()).or_default() += o.amount_cents.get();
    }
    let expected_sum: u64 = expected.values().sum();

    // Stop once the shards hold every order's amount (or after two minutes).
    let stop = app.stop_signal();
    let watcher = {
        let totals = totals.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(120) && !stop.is_stopped() {
                std::thread::sleep(Duration::from_millis(50));
                let sum: u64 = totals.lock().map(|t| t.values().flatten().map(|(_, s)| s).sum()).unwrap_or(0);
                if sum >= expected_sum {
                    break;
                }
            }
            stop.stop();
        })
    };
    app.run()?;
    watcher.join().map_err(|_| "watcher panicked")?;

    let got: BTreeMap<u32, u64> = totals.lock().map_err(|_| "poisoned")?.values().flatten().copied().collect();
    let summed = summed.load(Ordering::Relaxed);
    let (first, last) = (*first.lock().map_err(|_| "poisoned")?, *last.lock().map_err(|_| "poisoned")?);
    if let (Some(first), Some(last)) = (first, last) {
        let secs = last.duration_since(first).as_secs_f64();
        println!(
            "{summed} fixed-layout orders summed in {secs:.2} s: {:.0} orders/s (agent, first to last order)",
            summed as f64 / secs
        );
    }
    let got_sum: u64 = got.values().sum();
    println!(
        "{} accounts, total {got_sum} cents (expected {expected_sum} over {} accounts)",
        got.len(),
        expected.len()
    );
    if got != expected {
        return Err(
            format!("the table's totals are wrong: {} accounts differ", accounts_differing(&got, &expected)).into()
        );
    }
    println!("check: every account's total is right");
    Ok(())
}

fn accounts_differing(got: &BTreeMap<u32, u64>, expected: &BTreeMap<u32, u64>) -> usize {
    let keys: std::collections::BTreeSet<&u32> = got.keys().chain(expected.keys()).collect();
    keys.into_iter().filter(|k| got.get(k) != expected.get(k)).count()
}
