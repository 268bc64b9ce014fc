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
