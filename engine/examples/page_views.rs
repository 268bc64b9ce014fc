//! Faust's page-view example, windowed: views per page per minute in hopping windows (one
//! minute long, every ten seconds), on the embedded log, with each window's final count
//! printed once it closes.
//!
//! ```text
//! cargo run --release --example page_views                 # 20 minutes of views, 12 pages
//! VIEWS=200000 cargo run --release --example page_views
//! ```
//!
//! A task writes `VIEWS` page views spread over 20 minutes of event time (each view carries
//! its time, which `relative_to_field` reads, as in Faust); the `count` agent counts
//! them per page in the `views_per_minute` table (hopping 60 s / 10 s, combined per 10 s
//! pane, 5 s of grace). As the views' time moves on, windows close: their final counts go to
//! the `page-view-counts` topic (`emit_final`), and the `print` agent prints them as they
//! come. The run ends when the last view was counted; the windows still open then close
//! with the next run's views (the state is in `PAGE_VIEWS_DATADIR`, default a temporary
//! directory).
//!
//! With arguments it is the app's command line (the same topics, table and agents, without
//! the generator): a worker, and the commands that reach it.
//!
//! ```text
//! cargo run --release --example page_views -- worker
//! cargo run --release --example page_views -- send page-views --key /docs \
//!     '{"page": "/docs", "user": "ann", "at_ms": 1700000001000}'
//! cargo run --release --example page_views -- table get views_per_minute /docs   # its windows
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use faust::{App, Settings, WindowResult};
use serde::{Deserialize, Serialize};

/// Faust's `PageView` record, with the time of the view.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PageView {
    page: String,
    user: String,
    /// When the page was viewed (ms since the epoch).
    at_ms: i64,
}

const PAGES: [&str; 12] = [
    "/",
    "/about",
    "/blog",
    "/blog/1",
    "/blog/2",
    "/cart",
    "/docs",
    "/docs/api",
    "/jobs",
    "/login",
    "/pricing",
    "/search",
];

fn main() -> std::process::ExitCode {
    if std::env::args().len() > 1 {
        let (app, _, _) = declare(Settings::new("page-views"));
        return app.main();
    }
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("page_views: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The topics, the windowed table and the agents; returns the app, the page-view topic and
/// the number of views counted so far.
fn declare(settings: Settings) -> (App, faust::Topic<String, PageView>, Arc<AtomicU64>) {
    let app = App::new(settings);
    let page_views = app.topic::<String, PageView>("page-views");
    let counts = app.topic::<String, WindowResult<u64>>("page-view-counts");
    let per_minute = app
        .table::<String, u64>("views_per_minute")
        .with_default(|| 0)
        .hopping(Duration::from_secs(60), Duration::from_secs(10))
        .combine(|a, b| a + b)
        .grace(Duration::from_secs(5))
        // Event time is the view's own (Faust's `relative_to_field(PageView.at)`).
        .relative_to_field(|view: &PageView| view.at_ms)
        .emit_final(&counts);
    let counted = Arc::new(AtomicU64::new(0));
    let (table, seen) = (per_minute.clone(), counted.clone());
    app.agent("count", &page_views, move |stream| {
        let (table, seen) = (table.clone(), seen.clone());
        async move {
            stream
                .for_each(move |view: PageView| {
                    table.update_from(&view.page, &view, |n| *n += 1)?;
                    seen.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                })
                .await
        }
    });
    app.agent("print", &counts, move |mut stream| async move {
        while let Some((page, result)) = stream.next_item().await {
            let minute = (result.start - START) as f64 / 60_000.0;
            println!(
                "{:<10} minute {minute:>5.2}..{:>5.2}: {:>5} views",
                page.unwrap_or_default(),
                minute + 1.0,
                result.value
            );
        }
        Ok(())
    });
    (app, page_views, counted)
}

/// When the generated views start (ms since the epoch).
const START: i64 = 1_700_000_000_000;

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let views: u64 = std::env::var("VIEWS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let scratch = tempfile::tempdir()?;
    let mut settings = Settings::new("page-views");
    settings.datadir = std::env::var_os("PAGE_VIEWS_DATADIR").map_or_else(|| scratch.path().to_path_buf(), Into::into);
    settings.topic_partitions = 2;
    let (app, page_views, counted) = declare(settings);

    // 20 minutes of views from START on, keyed by page.
    let span_ms = 20 * 60 * 1000;
    let source = page_views.clone();
    app.task(move || {
        let source = source.clone();
        async move {
            for i in 0..views {
                let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let page = PAGES[(h % PAGES.len() as u64) as usize].to_string();
                let view = PageView {
                    page: page.clone(),
                    user: format!("user-{}", (h >> 20) % 1_000),
                    at_ms: START + (i * span_ms / views.max(1)) as i64,
                };
                source.send_soon(Some(&page), &view)?;
                if i % 1024 == 0 {
                    faust::runtime::yield_if_needed().await;
                }
            }
            Ok(())
        }
    });

    let stop = app.stop_signal();
    let watcher = std::thread::spawn(move || {
        while counted.load(Ordering::Relaxed) < views {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Time for the last final results to reach the printer.
        std::thread::sleep(Duration::from_millis(500));
        stop.stop();
    });
    app.run()?;
    watcher.join().map_err(|_| "the watcher thread panicked")?;
    println!("{views} page views counted; {} windows closed", app.stats().windows_closed);
    Ok(())
}
