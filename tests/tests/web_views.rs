//! The worker's web server, against a running orders worker (a process, on `local://`):
//! health and readiness, app info, table views (a key, a page of keys; 404 with a JSON error
//! for unknown tables and keys), `/metrics` parsed as Prometheus' text format with its
//! counters checked against the worker's own `stats`, and bad requests (a malformed escape,
//! another method, an oversized request line) answered with 4xx, never a panic.

use std::time::{Duration, Instant};

use faust_tests::cli::{Worker, cli, code, json};
use faust_tests::http;
use serde_json::Value;

const ORDERS: &str = env!("CARGO_BIN_EXE_orders");

fn get_json(port: u16, target: &str) -> (u16, Value) {
    let (status, _, body) = http(port, "GET", target);
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: not JSON ({e}): {body}")))
}

#[test]
fn the_web_views_answer_tables_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let worker = Worker::start(ORDERS, &data, &[("WEB_PORT", &port.to_string()), ("TOPIC_PARTITIONS", "4")]);
    for (i, account) in ["account-1", "account-2", "account-1", "account/3 ü"].iter().enumerate() {
        let order = format!(r#"{{"account_id": "{account}", "product_id": "p", "amount": 1, "price": 1.0}}"#);
        let sent = cli(ORDERS, &data, &["send", "orders", "--key", &format!("order-{i}"), &order], None);
        assert_eq!(code(&sent), 0, "send: {}", String::from_utf8_lossy(&sent.stderr));
    }
    // Counted (the table through the web view).
    let start = Instant::now();
    loop {
        let (status, value) = get_json(port, "/table/order_count/account-1");
        if status == 200 && value == 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "account-1 not counted: {status} {value}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get_json(port, "/health"), (200, serde_json::json!({ "status": "ok" })));
    assert_eq!(get_json(port, "/ready"), (200, serde_json::json!({ "ready": true })));
    // A key with a slash, a space and a non-ASCII letter, escaped.
    let start = Instant::now();
    while get_json(port, "/table/order_count/account%2F3%20%C3%BC") != (200, serde_json::json!(1)) {
        assert!(start.elapsed() < Duration::from_secs(30), "the escaped key is not found");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, page) = get_json(port, "/table/order_count?limit=2");
    assert_eq!(status, 200);
    assert_eq!((page["total"].as_u64(), page["items"].as_array().map(Vec::len)), (Some(3), Some(2)), "{page}");
    let (status, info) = get_json(port, "/app");
    assert_eq!((status, info["app"].as_str()), (200, Some("orders")), "{info}");
    assert!(info["tables"].as_array().unwrap().iter().any(|t| t["table"] == "order_count"), "{info}");

    // Errors: JSON with the status, never a panic.
    let (status, e) = get_json(port, "/table/nope/x");
    assert_eq!((status, e["status"].as_u64()), (404, Some(404)), "{e}");
    assert!(e["error"].as_str().unwrap().contains("nope"), "{e}");
    assert_eq!(get_json(port, "/table/order_count/account-404").0, 404);
    assert_eq!(get_json(port, "/nothing/here").0, 404);
    assert_eq!(get_json(port, "/table/order_count/%zz").0, 400);
    assert_eq!(get_json(port, "/table/order_count?limit=many").0, 400);
    assert_eq!(http(port, "POST", "/health").0, 405);
    let long = format!("/table/{}", "x".repeat(10_000));
    assert!(matches!(http(port, "GET", &long).0, 413 | 414 | 431), "an oversized request line is refused");
    assert_eq!(get_json(port, "/health").0, 200, "and the server still answers");

    // Metrics, in Prometheus' text format, agree with the worker's stats (read once the
    // counters settled: the cores publish them as they fetch and commit).
    let settled = || json(&cli(ORDERS, &data, &["stats", "--json"], None))["events_processed"].as_u64();
    let start = Instant::now();
    let mut last = settled();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = settled();
        if now == last {
            break;
        }
        last = now;
        assert!(start.elapsed() < Duration::from_secs(30), "the counters keep moving");
    }
    let (status, head, text) = http(port, "GET", "/metrics");
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("text/plain"), "{head}");
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let scrape = prometheus_parse::Scrape::parse(lines.into_iter().map(Ok)).expect("Prometheus text format");
    let value = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(Some(value("faust_events_processed_total") as u64), last, "events processed, as `stats` says");
    // Per partition: the orders topic's partitions, processed to their ends.
    let positions: Vec<&prometheus_parse::Sample> =
        scrape.samples.iter().filter(|s| s.metric == "faust_partition_position").collect();
    assert!(positions.iter().any(|s| s.labels.get("topic") == Some("orders")), "{text}");
    assert!(scrape.samples.iter().any(|s| s.metric == "faust_core_busy_seconds_total"), "{text}");
    let total_position: f64 = positions
        .iter()
        .filter(|s| s.labels.get("topic") == Some("orders"))
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(total_position, 4.0, "the four orders are processed:\n{text}");
    // The monitor's latency summaries: commits, and events sampled from fetch to ack.
    for family in ["faust_commit_latency_seconds", "faust_event_latency_seconds", "faust_event_age_seconds"] {
        assert!(text.contains(&format!("# TYPE {family} summary")), "{family} in:\n{text}");
    }
    let (_, status_now) = get_json(port, "/status");
    let sampled: u64 =
        status_now["cores"].as_array().unwrap().iter().map(|c| c["event_latency"]["count"].as_u64().unwrap()).sum();
    assert!(sampled >= 1, "at least one event's latency was sampled: {status_now}");

    // The status page, and the status it polls: this worker's partitions, moving as events flow.
    let (status, head, page) = http(port, "GET", "/");
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("text/html") && page.contains("fetch(\"/status\")"), "{page}");
    let orders_position = |status: &Value| -> u64 {
        status["cores"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["partitions"].as_array().unwrap().iter())
            .filter(|p| p["topic"] == "orders")
            .map(|p| p["position"].as_u64().unwrap())
            .sum()
    };
    let (code_before, before) = get_json(port, "/status");
    assert_eq!(code_before, 200);
    assert_eq!(orders_position(&before), 4, "{before}");
    let more = r#"{"account_id": "account-9", "product_id": "p", "amount": 1, "price": 1.0}"#;
    let sent = cli(ORDERS, &data, &["send", "orders", "--key", "order-9", "--repeat", "10", more], None);
    assert_eq!(code(&sent), 0);
    let start = Instant::now();
    while orders_position(&get_json(port, "/status").1) != 14 {
        assert!(start.elapsed() < Duration::from_secs(30), "the status did not move");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(value("faust_events_processed_total") >= 4.0, "four orders went through the agents");
    assert_eq!(value("faust_lag"), 0.0);
    assert_eq!(worker.stop(), 0);
}

/// The page as a headless browser renders it after running its script for `ms` of virtual
/// time (the DOM, serialized).
fn rendered(chromium: &str, port: u16, ms: u32) -> String {
    let out = std::process::Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        .arg(format!("--virtual-time-budget={ms}"))
        .arg("--dump-dom")
        .arg(format!("http://127.0.0.1:{port}/"))
        .stderr(std::process::Stdio::null())
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number in the element `id="{id}"` of a rendered page.
fn span(dom: &str, id: &str) -> Option<u64> {
    let start = dom.find(&format!(" id=\"{id}\">"))? + id.len() + 7;
    dom[start..].split('<').next()?.trim().parse().ok()
}

/// The status page in a real headless browser (Debian's chromium, `FAUST_TEST_CHROMIUM`,
/// installed by `scripts/test`): it loads, shows the running worker's partitions, and its
/// numbers move as events flow.
#[test]
fn the_status_page_shows_the_worker_in_a_browser() {
    let Some(chromium) = std::env::var("FAUST_TEST_CHROMIUM").ok().filter(|c| !c.is_empty()) else {
        eprintln!("skipping: FAUST_TEST_CHROMIUM unset (scripts/test installs chromium and sets it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let worker = Worker::start(ORDERS, &data, &[("WEB_PORT", &port.to_string()), ("TOPIC_PARTITIONS", "2")]);
    let order = r#"{"account_id": "account-1", "product_id": "p", "amount": 1, "price": 1.0}"#;
    let send = |n: u64| {
        let sent = cli(ORDERS, &data, &["send", "orders", "--key", "order", "--repeat", &n.to_string(), order], None);
        assert_eq!(code(&sent), 0);
    };
    send(3);
    let events_at_least = |n: u64| {
        let start = Instant::now();
        loop {
            let dom = rendered(&chromium, port, 2_000);
            if span(&dom, "events").is_some_and(|e| e >= n) {
                return dom;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "the page never showed {n} events:\n{dom}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let dom = events_at_least(6); // three orders, through two agents (group_by, then count)
    assert!(dom.contains("<tr data-partition=\"orders/0\">"), "the worker's partitions are listed:\n{dom}");
    assert!(dom.contains("<tr data-partition=\"orders/1\">"), "{dom}");
    assert!(dom.contains("faust worker <span id=\"app\">orders</span>"), "{dom}");
    let before = span(&dom, "events").unwrap();
    send(10);
    let dom = events_at_least(before + 20);
    assert!(span(&dom, "events").unwrap() > before, "the numbers moved");
    assert_eq!(worker.stop(), 0);
}
