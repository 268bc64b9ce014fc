//! Workload W3, windowed: W2's order count per account, in windows — tumbling 10 s, hopping
//! 60 s / 10 s (six windows per event), sliding 5 s / 5 s, sessions with a 30 s gap — over
//! the orders W2 pre-loaded. Event time is the record's offset in its partition at 5 events
//! per millisecond, so every run sees the same times: a 10 s window holds about ten orders
//! of each account, and windows close all through the run.
//!
//! Also measured: the close lag (from the start of the update whose event moves stream time
//! past a window's `end + grace` to that window's close callback), what it is made of (the
//! windows one event closes, and the time per window), and the memory per live window (the
//! growth of the resident anonymous memory over the run, over the windows live at the end).

use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust::{App, Settings, WindowedTable};

use crate::w2::Order;

/// Which windows a W3 run counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 10 s.
    Tumbling,
    /// 60 s every 10 s.
    Hopping,
    /// 5 s before and after each event.
    Sliding,
    /// 30 s of quiet ends a session.
    Session,
}

/// What a W3 run measured.
#[derive(Debug, Clone, Copy)]
pub struct W3Run {
    /// Events per second from the first event to the last.
    pub events_s: f64,
    /// Windows closed during the run.
    pub closed: u64,
    /// Close lag, 99th percentile (µs).
    pub close_lag_p99_us: f64,
    /// Windows live (open, or closed and readable) at the end.
    pub live_windows: u64,
    /// Growth of the resident anonymous memory over the run per live window at the end (bytes).
    pub bytes_per_live_window: f64,
    /// Windows closed by one event, on average over the events that closed at least 100.
    pub closes_per_boundary: f64,
    /// On those events, the time from the update's start to its last close callback, per
    /// window closed (ns, median): what the close lag of a boundary is made of.
    pub close_ns_per_window: f64,
    /// CPU time of the worker thread per event (ns): steadier than the rate on a shared machine.
    pub cpu_ns_per_event: f64,
}

thread_local! {
    /// When the update being made on this core started (the close lag's origin).
    static UPDATE_START: Cell<Option<Instant>> = const { Cell::new(None) };
    /// The close lags seen on this core (µs), handed over when its agent ends: recording into
    /// a shared histogram at each close would add a lock to what is measured.
    static LAGS: std::cell::RefCell<Vec<(Instant, u64)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The process's resident anonymous memory (bytes): the resident set without its file-backed
/// pages (the pages of the input log it reads count in the resident set, not in what the
/// windows hold).
fn anonymous_resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let mut fields = statm.split_whitespace().skip(1).map(|p| p.parse::<u64>().unwrap_or(0));
    let (resident, shared) = (fields.next().unwrap_or(0), fields.next().unwrap_or(0));
    resident.saturating_sub(shared) * 4096
}

/// Hands the memory freed by earlier runs back to the system, so that the growth measured
/// over this run is this run's (freed pages the allocator kept would be reused unseen).
fn release_freed_memory() {
    // SAFETY: `malloc_trim` only returns free heap pages to the system; it takes no pointer.
    unsafe { libc::malloc_trim(0) };
}

fn windowed(app: &App, kind: Kind) -> WindowedTable<String, u64> {
    let table = app.table::<String, u64>("counts").with_default(|| 0);
    let s = Duration::from_secs;
    match kind {
        Kind::Tumbling => table.tumbling(s(10)),
        Kind::Hopping => table.hopping(s(60), s(10)).combine(|a, b| a + b),
        Kind::Sliding => table.sliding(s(5), s(5)),
        Kind::Session => table.session(s(30), |a, b| a + b),
    }
}

/// Runs W3 with `kind` windows as app `id` over the `n` orders pre-loaded in `datadir` (topic
/// `orders`, 2 partitions), on one core.
pub fn run(datadir: &Path, id: &str, n: u64, kind: Kind) -> Result<W3Run, String> {
    let mut settings = Settings::new(id);
    settings.datadir = datadir.to_path_buf();
    settings.topic_partitions = 2;
    settings.cores = Some(1);
    let app = App::new(settings);
    let orders = app.topic::<String, Order>("orders");
    // (the update's start, its close's lag in ns), per close.
    let lags: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let closed = Arc::new(AtomicU64::new(0));
    let table = {
        let closed = closed.clone();
        windowed(&app, kind).on_window_close(move |_: &String, _, _: &u64| {
            closed.fetch_add(1, Ordering::Relaxed);
            if let Some(start) = UPDATE_START.with(Cell::get) {
                let ns = start.elapsed().as_nanos() as u64;
                LAGS.with(|l| l.borrow_mut().push((start, ns)));
            }
        })
    };
    let seen = Arc::new(AtomicU64::new(0));
    let live = Arc::new(AtomicU64::new(0));
    // Fixed windows close on the step's boundaries only.
    let step: Option<i64> = match kind {
        Kind::Tumbling | Kind::Hopping => Some(10_000),
        Kind::Sliding | Kind::Session => None,
    };
    let base = Instant::now();
    let first_ns = Arc::new(AtomicU64::new(u64::MAX));
    let cpu = Arc::new(crate::CpuSpan::new(n));
    let rss_at_end = Arc::new(AtomicU64::new(0));
    {
        let (seen, live, first_ns, lags, cpu, rss_at_end) =
            (seen.clone(), live.clone(), first_ns.clone(), lags.clone(), cpu.clone(), rss_at_end.clone());
        app.agent("count", &orders, move |stream: faust::Stream<String, Order>| {
            let (table, seen, live, first_ns, lags, cpu, rss_at_end) = (
                table.clone(),
                seen.clone(),
                live.clone(),
                first_ns.clone(),
                lags.clone(),
                cpu.clone(),
                rss_at_end.clone(),
            );
            async move {
                // Room for every close's lag up front: growing the vector during the run would
                // copy it and fault in fresh pages inside a boundary's closes (2 ms once the
                // vector passes 2 MB), a cost of the measurement that the lag would include.
                let expected = match kind {
                    Kind::Sliding => n,
                    _ => n / 4,
                };
                LAGS.with(|l| l.borrow_mut().reserve(usize::try_from(expected).unwrap_or(0)));
                let counted = table.clone();
                stream
                    .for_each(move |order| {
                        if first_ns.load(Ordering::Relaxed) == u64::MAX {
                            first_ns.fetch_min(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        }
                        let offset = faust::current_offset().map_or(0, |(_, offset)| offset);
                        let t = (offset / 5) as i64;
                        // The lag's origin: the start of an update that can close windows. Fixed
                        // windows of 10 s steps close only on an event whose time enters a new
                        // step (grace 0), so only those read the clock (reading it for every
                        // event would be a cost of the measurement, not of the engine).
                        let may_close = match step {
                            Some(step) => t % step < 1,
                            None => true,
                        };
                        if may_close {
                            UPDATE_START.with(|s| s.set(Some(Instant::now())));
                        }
                        counted.update_at(&order.account_id, t, |c| *c += 1)?;
                        cpu.mark(seen.fetch_add(1, Ordering::Relaxed) + 1);
                        Ok(())
                    })
                    .await?;
                // The memory while the windows are all still held (the run's end drops them),
                // without the pages the lags took (one entry per close).
                let lag_bytes = LAGS.with(|l| l.borrow().len() * std::mem::size_of::<(Instant, u64)>());
                rss_at_end.store(anonymous_resident_bytes().saturating_sub(lag_bytes as u64), Ordering::Relaxed);
                let windows = table.local_windows(i64::MIN, i64::MAX)?;
                live.fetch_add(windows.len() as u64, Ordering::Relaxed);
                let mine = LAGS.with(|l| std::mem::take(&mut *l.borrow_mut()));
                lags.lock().map_err(|_| "poisoned")?.extend(mine);
                Ok::<(), faust::AgentError>(())
            }
        });
    }
    release_freed_memory();
    let rss_before = anonymous_resident_bytes();
    let stop = app.stop_signal();
    let done_at = Arc::new(Mutex::new(None));
    let watcher = {
        let (seen, done_at) = (seen.clone(), done_at.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(600);
            while Instant::now() < deadline && seen.load(Ordering::Relaxed) < n {
                std::thread::sleep(Duration::from_micros(500));
            }
            *done_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(base.elapsed());
            stop.stop();
        })
    };
    let ran = app.run();
    watcher.join().map_err(|_| "the W3 watcher panicked".to_string())?;
    ran.map_err(|e| format!("W3 ({id}): the worker failed: {e}"))?;
    let counted = seen.load(Ordering::Relaxed);
    if counted < n {
        return Err(format!("W3 ({id}): only {counted} of {n} orders counted"));
    }
    let end = done_at.lock().unwrap_or_else(|p| p.into_inner()).ok_or("W3: no end time")?;
    let start = Duration::from_nanos(first_ns.load(Ordering::Relaxed));
    let live_windows = live.load(Ordering::Relaxed);
    let lags = lags.lock().map_err(|_| "poisoned")?;
    let mut histogram = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    // Per closing event: how many windows it closed, and its last close's lag.
    let mut boundaries: std::collections::HashMap<Instant, (u64, u64)> = std::collections::HashMap::new();
    for &(start, ns) in lags.iter() {
        histogram.record((ns / 1000).max(1)).map_err(|e| e.to_string())?;
        let b = boundaries.entry(start).or_default();
        *b = (b.0 + 1, b.1.max(ns));
    }
    let big: Vec<(u64, u64)> = boundaries.into_values().filter(|(n, _)| *n >= 100).collect();
    let mut per_window: Vec<f64> = big.iter().map(|(n, ns)| *ns as f64 / *n as f64).collect();
    per_window.sort_by(f64::total_cmp);
    Ok(W3Run {
        // (`+ 0.0`: an empty sum is -0.0.)
        closes_per_boundary: big.iter().map(|(n, _)| *n as f64).sum::<f64>() / big.len().max(1) as f64 + 0.0,
        close_ns_per_window: per_window.get(per_window.len() / 2).copied().unwrap_or(f64::NAN),
        events_s: n as f64 / (end - start).as_secs_f64(),
        closed: closed.load(Ordering::Relaxed),
        close_lag_p99_us: if histogram.is_empty() { f64::NAN } else { histogram.value_at_quantile(0.99) as f64 },
        live_windows,
        cpu_ns_per_event: cpu.ns_per_event(),
        bytes_per_live_window: rss_at_end.load(Ordering::Relaxed).saturating_sub(rss_before) as f64
            / live_windows.max(1) as f64,
    })
}
