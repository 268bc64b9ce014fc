//! The README's windowed example, `page_views`, as a user runs it: every view is counted in
//! hopping windows, and each closed window's final count is printed once, with a count that
//! matches the views the generator put in it.

use std::collections::HashMap;
use std::process::Command;

#[test]
fn page_views_prints_each_closed_window_once_with_its_count() {
    let out = Command::new(env!("CARGO_BIN_EXE_page_views")).env("VIEWS", "24000").output().expect("run page_views");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "page_views failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    // "PAGE minute A..B: N views": one line per page and closed window.
    let mut seen: HashMap<(String, String), u64> = HashMap::new();
    for line in stdout.lines().filter(|l| l.contains(" views") && l.contains("minute")) {
        let (head, count) = line.rsplit_once(':').expect("a count");
        let n: u64 = count.trim().trim_end_matches(" views").trim().parse().expect("a number");
        let mut words = head.split_whitespace();
        let page = words.next().expect("a page").to_string();
        let window = words.collect::<Vec<_>>().join(" ");
        assert!(seen.insert((page, window.clone()), n).is_none(), "window {window} printed twice:\n{stdout}");
    }
    // The generator's views again (the example's formula): every printed count is exact.
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
    let (views, start, span_ms) = (24_000u64, 1_700_000_000_000i64, 20 * 60 * 1000u64);
    let mut expected: HashMap<(String, i64), u64> = HashMap::new();
    for i in 0..views {
        let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let page = PAGES[(h % 12) as usize].to_string();
        let at = start + (i * span_ms / views) as i64;
        for w in
            faust::Windowing::hopping(std::time::Duration::from_secs(60), std::time::Duration::from_secs(10)).ranges(at)
        {
            *expected.entry((page.clone(), w.start)).or_default() += 1;
        }
    }
    let label = |window_start: i64| {
        let minute = (window_start - start) as f64 / 60_000.0;
        format!("minute {minute:>5.2}..{:>5.2}", minute + 1.0)
    };
    let expected: HashMap<(String, String), u64> = expected
        .into_iter()
        .map(|((page, w), n)| ((page, label(w).split_whitespace().collect::<Vec<_>>().join(" ")), n))
        .collect();
    assert!(seen.len() > 1_000, "only {} windows closed:\n{stdout}", seen.len());
    for (window, n) in &seen {
        assert_eq!(expected.get(window), Some(n), "window {window:?}");
    }
    assert!(stdout.contains("24000 page views counted"), "{stdout}");
}

/// `page_views worker` and the CLI: `table get` lists a key's windows with their ranges (for
/// this table, hopping and combined per pane: the closed ones whole, the open ones as their
/// 10 s panes), `table dump` every key's.
#[test]
fn the_cli_shows_a_windowed_table_with_its_ranges() {
    use faust_tests::cli::{Worker, cli, code, eventually, json, stderr, stdout};
    const BIN: &str = env!("CARGO_BIN_EXE_page_views");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let worker = Worker::start(BIN, &data, &[]);
    let start = 1_700_000_000_000i64;
    for (page, at) in
        [("/docs", start + 1_000), ("/docs", start + 2_000), ("/docs", start + 15_000), ("/", start + 3_000)]
    {
        let view = format!(r#"{{"page": "{page}", "user": "ann", "at_ms": {at}}}"#);
        let sent = cli(BIN, &data, &["send", "page-views", "--key", page, &view], None);
        assert_eq!(code(&sent), 0, "{}", stderr(&sent));
    }
    let get = || json(&cli(BIN, &data, &["table", "get", "views_per_minute", "/docs", "--json"], None));
    // The view at +15 s moved stream time to the end (+10 s) plus grace (5 s) of the window
    // [-50 s, +10 s): it closed, and holds its final count under its whole range; the open
    // windows are there as their panes.
    eventually("the views of /docs counted", || get()["value"].as_array().is_some_and(|w| w.len() == 3));
    assert_eq!(
        get()["value"],
        serde_json::json!([
            {"start": start - 50_000, "end": start + 10_000, "value": 2},
            {"start": start, "end": start + 10_000, "value": 2},
            {"start": start + 10_000, "end": start + 20_000, "value": 1},
        ])
    );
    let dump = json(&cli(BIN, &data, &["table", "dump", "views_per_minute", "--json"], None));
    let keys: Vec<&str> =
        dump.as_array().map_or_else(Vec::new, |items| items.iter().filter_map(|i| i["key"]["key"].as_str()).collect());
    assert_eq!(keys.iter().filter(|k| **k == "/").count(), 1, "{dump}");
    assert_eq!(code(&cli(BIN, &data, &["table", "get", "views_per_minute", "/nowhere"], None)), 4);
    let text = stdout(&cli(BIN, &data, &["table", "get", "views_per_minute", "/docs"], None));
    assert!(text.contains(&format!("{}", start + 10_000)), "{text}");
    assert_eq!(worker.stop(), 0);
}
