//! The worker's web server (Faust's web views), on threads of its own — never on the cores:
//! the views are the control socket's requests over HTTP (`handle`, whose table reads ask the
//! cores through their inboxes), plus health, readiness, Prometheus metrics and the app's own
//! pages.
//!
//! | path | answer |
//! |---|---|
//! | `GET /` | the live status page (HTML; it polls `/status`) |
//! | `GET /status` | each core's partitions (position, end, committed, events/s), busy time, recoveries, windows open, commit and event latencies |
//! | `GET /health` | 200 while the worker runs |
//! | `GET /ready` | 200 once every partition assigned to the worker is recovered, 503 before |
//! | `GET /app` | the app: id, cores, agents, tables, topics, stats |
//! | `GET /metrics` | Prometheus text format: the worker's counters, and per core and partition |
//! | `GET /table/{name}?offset=&limit=` | a page of the table's keys on this worker (limit 100, at most 10,000) |
//! | `GET /table/{name}/{key}` | the key's value (a windowed table: its windows); on Kafka, a key another worker holds is a `307` to that worker's view |
//! | `GET {path}` | the app's own pages ([`App::page`]) |
//!
//! Errors are JSON (`{"error": ..., "status": ...}`): 404 for unknown paths, tables and keys,
//! 400 for a malformed path, 405 for another method, 413/414 for an oversized request.
//!
//! The HTTP layer is `tiny_http`: a small, synchronous HTTP/1.1 server, which fits views that
//! block on the cores' answers anyway and needs no async runtime beside glommio's.

use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{Value, json};

use super::inbox::{Inbox, ask};
use super::{Failure, Request, handle};
use crate::app::page::{WebRequest, WebResponse};
use crate::app::{App, lock};

/// Threads answering requests.
const THREADS: usize = 4;
/// The longest request line accepted (path and query).
const MAX_URL_BYTES: usize = 8 << 10;
/// The largest request body accepted (the views take none).
const MAX_BODY_BYTES: usize = 64 << 10;

/// A running web server; stops when dropped.
pub(crate) struct WebServer {
    server: Arc<tiny_http::Server>,
    threads: Vec<std::thread::JoinHandle<()>>,
    addr: SocketAddr,
}

impl WebServer {
    /// Listens on `bind:port` (port 0: any free one) for `app`, whose cores answer through
    /// `inboxes`; `ready` says whether every assigned partition is recovered.
    pub(crate) fn start(
        app: &App,
        inboxes: Vec<Arc<Inbox>>,
        ready: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Result<WebServer, String> {
        let s = app.settings();
        let server = tiny_http::Server::http((s.web_bind.as_str(), s.web_port))
            .map_err(|e| format!("listening on {}:{}: {e}", s.web_bind, s.web_port))?;
        let addr = server.server_addr().to_ip().ok_or("the web server listens on no IP address")?;
        let server = Arc::new(server);
        let mut threads = Vec::new();
        for n in 0..THREADS {
            let (server, app, inboxes, ready) = (server.clone(), app.clone(), inboxes.clone(), ready.clone());
            let thread = std::thread::Builder::new()
                .name(format!("{}-web-{n}", app.settings().id))
                .spawn(move || {
                    while let Ok(request) = server.recv() {
                        serve(request, &app, &inboxes, &*ready);
                    }
                })
                .map_err(|e| format!("starting the web server's threads: {e}"))?;
            threads.push(thread);
        }
        *lock(&app.inner.web_addr) = Some(addr);
        tracing::info!(url = %format!("http://{addr}/"), "web server listening");
        Ok(WebServer { server, threads, addr })
    }

    /// The address it listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        // Every thread's `recv` returns an error once unblocked.
        for _ in 0..self.threads.len() {
            self.server.unblock();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Answers one request; a failure to write the answer (the client went away) is ignored.
fn serve(request: tiny_http::Request, app: &App, inboxes: &[Arc<Inbox>], ready: &dyn Fn() -> bool) {
    let answer = route(&request, app, inboxes, ready);
    let mut response = tiny_http::Response::from_data(answer.body).with_status_code(answer.status);
    if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], answer.content_type.as_bytes()) {
        response.add_header(h);
    }
    if let Some(location) = answer.location
        && let Ok(h) = tiny_http::Header::from_bytes(&b"Location"[..], location.as_bytes())
    {
        response.add_header(h);
    }
    let _ = request.respond(response);
}

/// An answer, with a `Location` for redirects.
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
    location: Option<String>,
}

impl From<WebResponse> for Answer {
    fn from(r: WebResponse) -> Answer {
        Answer { status: r.status, content_type: r.content_type, body: r.body, location: None }
    }
}

fn error(status: u16, message: &str) -> Answer {
    WebResponse::json(status, &json!({ "error": message, "status": status })).into()
}

fn route(request: &tiny_http::Request, app: &App, inboxes: &[Arc<Inbox>], ready: &dyn Fn() -> bool) -> Answer {
    if request.url().len() > MAX_URL_BYTES {
        return error(414, &format!("the request line is over {MAX_URL_BYTES} bytes"));
    }
    if request.body_length().unwrap_or(0) > MAX_BODY_BYTES {
        return error(413, &format!("the request body is over {MAX_BODY_BYTES} bytes"));
    }
    if *request.method() != tiny_http::Method::Get {
        return error(405, "only GET is served");
    }
    let (raw_path, raw_query) = request.url().split_once('?').unwrap_or((request.url(), ""));
    let segments: Vec<String> = match raw_path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect() {
        Ok(segments) => segments,
        Err(e) => return error(400, &format!("the path: {e}")),
    };
    let query: Vec<(String, String)> = match raw_query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect::<Result<_, String>>()
    {
        Ok(q) => q,
        Err(e) => return error(400, &format!("the query: {e}")),
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match segments[..] {
        [] => WebResponse::html(200, STATUS_PAGE).into(),
        ["status"] => match status(app, inboxes) {
            Ok(value) => WebResponse::json(200, &value).into(),
            Err(e) => answered(Err(e)),
        },
        ["health"] => WebResponse::json(200, &json!({ "status": "ok" })).into(),
        ["ready"] => {
            let ready = ready();
            WebResponse::json(if ready { 200 } else { 503 }, &json!({ "ready": ready })).into()
        }
        ["app"] => app_info(app, inboxes),
        ["metrics"] => metrics(app, inboxes),
        ["table", name] => table_page(app, inboxes, name, &query),
        ["table", name, key] => table_key(app, inboxes, name, key),
        _ => {
            let path = format!("/{}", segments.join("/"));
            let page = lock(&app.inner.pages).iter().find(|(p, _)| *p == path).map(|(_, h)| h.clone());
            match page {
                Some(handler) => handler(&WebRequest::new(path, query)).into(),
                None => error(404, &format!("nothing at {path}")),
            }
        }
    }
}

/// A control-socket answer as an HTTP answer.
fn answered(result: Result<Value, (Failure, String)>) -> Answer {
    match result {
        Ok(value) => WebResponse::json(200, &value).into(),
        Err((Failure::NotFound, message)) => error(404, &message),
        Err((Failure::BadRequest, message)) => error(400, &message),
        Err((Failure::Failed, message)) => error(500, &message),
        Err((Failure::Elsewhere, urls)) => error(404, &format!("held by the worker at {urls}")),
    }
}

fn app_info(app: &App, inboxes: &[Arc<Inbox>]) -> Answer {
    let s = app.settings();
    let agents: Vec<Value> = lock(&app.inner.agents)
        .iter()
        .filter(|a| !a.topic.is_empty())
        .map(|a| json!({ "agent": a.name, "topic": a.topics(), "concurrency": a.concurrency }))
        .collect();
    let tables: Vec<Value> = lock(&app.inner.tables)
        .iter()
        .map(|t| json!({ "table": &**t.name(), "changelog": &**t.changelog(), "windowed": t.windowed() }))
        .collect();
    let topics = handle(Request::Topics, app, inboxes).unwrap_or(Value::Null);
    let stats = serde_json::to_value(app.stats()).unwrap_or(Value::Null);
    WebResponse::json(
        200,
        &json!({
            "app": s.id,
            "broker": s.broker_url(),
            "cores": inboxes.len(),
            "agents": agents,
            "tables": tables,
            "topics": topics,
            "stats": stats,
            "problems": app.problems(),
        }),
    )
    .into()
}

/// A page of the table's keys on this worker.
fn table_page(app: &App, inboxes: &[Arc<Inbox>], name: &str, query: &[(String, String)]) -> Answer {
    let number = |key: &str, default: usize| -> Result<usize, String> {
        match query.iter().find(|(k, _)| k == key) {
            Some((_, v)) => v.parse().map_err(|_| format!("{key} must be a number, not {v:?}")),
            None => Ok(default),
        }
    };
    let (offset, limit) = match (number("offset", 0), number("limit", 100)) {
        (Ok(o), Ok(l)) => (o, l.min(10_000)),
        (Err(e), _) | (_, Err(e)) => return error(400, &e),
    };
    match handle(Request::TableDump { table: name.to_string() }, app, inboxes) {
        Ok(Value::Array(items)) => {
            let total = items.len();
            let page: Vec<Value> = items.into_iter().skip(offset).take(limit).collect();
            WebResponse::json(200, &json!({ "table": name, "offset": offset, "total": total, "items": page })).into()
        }
        other => answered(other),
    }
}

/// One key: here, or a redirect to the worker of the group that holds it.
fn table_key(app: &App, inboxes: &[Arc<Inbox>], name: &str, key: &str) -> Answer {
    match handle(Request::TableGet { table: name.to_string(), key: key.to_string() }, app, inboxes) {
        Err((Failure::Elsewhere, urls)) => match urls.split_whitespace().find(|u| u.starts_with("http://")) {
            Some(base) => Answer {
                status: 307,
                content_type: "application/json".into(),
                body: serde_json::to_vec(&json!({ "redirect": base })).unwrap_or_default(),
                location: Some(format!("{}/table/{}/{}", base.trim_end_matches('/'), encode(name), encode(key))),
            },
            None => error(404, &format!("key {key} of `{name}` is held by the worker at {urls}")),
        },
        other => answered(other),
    }
}

/// Every core's status, with the worker's counters.
fn status(app: &App, inboxes: &[Arc<Inbox>]) -> Result<Value, (Failure, String)> {
    let cores = core_statuses(inboxes)?;
    Ok(json!({
        "app": app.settings().id,
        "stats": serde_json::to_value(app.stats()).unwrap_or(Value::Null),
        "problems": app.problems(),
        "cores": cores,
    }))
}

/// Each core's status, asked through its inbox.
fn core_statuses(inboxes: &[Arc<Inbox>]) -> Result<Vec<Value>, (Failure, String)> {
    (0..inboxes.len())
        .map(|core| {
            ask(inboxes, core, |runtime| async move {
                let mut status = serde_json::to_value(runtime.status()).map_err(|e| super::failed(e.to_string()))?;
                status["windows_open"] = json!(crate::window::open_windows_on_this_core());
                Ok(status)
            })
        })
        .collect()
}

/// The worker's counters in Prometheus' text format, then per core and partition.
fn metrics(app: &App, inboxes: &[Arc<Inbox>]) -> Answer {
    let stats = app.stats();
    let id = app.settings().id.replace(['\\', '"', '\n'], "_");
    let mut out = String::new();
    let counters: [(&str, &str, &str, u64); 18] = [
        ("events_processed_total", "counter", "Events the agents finished (acked).", stats.events_processed),
        ("lag", "gauge", "Records in the consumed partitions not processed yet.", stats.lag),
        ("rebalances_total", "counter", "Assignment changes applied.", stats.rebalances),
        ("partitions_assigned_total", "counter", "Source partitions started.", stats.partitions_assigned),
        ("partitions_revoked_total", "counter", "Source partitions stopped.", stats.partitions_revoked),
        ("shards_recovered_total", "counter", "Table shards recovered from their changelog.", stats.shards_recovered),
        (
            "changelog_records_replayed_total",
            "counter",
            "Changelog records replayed while recovering shards.",
            stats.changelog_records_replayed,
        ),
        ("bad_records_total", "counter", "Bad records met.", stats.bad_records),
        ("write_failures_total", "counter", "Writes that failed and are retried.", stats.write_failures),
        (
            "writes_blocked",
            "gauge",
            "1 while some core takes no new events because writes fail.",
            u64::from(stats.writes_blocked),
        ),
        ("late_events_total", "counter", "Events after their windows closed.", stats.late_events),
        ("windows_closed_total", "counter", "Windows closed.", stats.windows_closed),
        ("standby_partitions", "gauge", "Changelog partitions followed as a standby.", stats.standby_partitions),
        (
            "standby_records_applied_total",
            "counter",
            "Changelog records the standbys applied.",
            stats.standby_records_applied,
        ),
        ("standbys_promoted_total", "counter", "Standby shards promoted to active.", stats.standbys_promoted),
        ("leader", "gauge", "1 while this worker is the app's leader.", u64::from(stats.leader)),
        ("shards_resumed_total", "counter", "Suspended table shards resumed without a replay.", stats.shards_resumed),
        (
            "events_abandoned_total",
            "counter",
            "Fetched events dropped when their partition was revoked.",
            stats.events_abandoned,
        ),
    ];
    for (name, kind, help, value) in counters {
        out.push_str(&format!("# HELP faust_{name} {help}\n# TYPE faust_{name} {kind}\n"));
        out.push_str(&format!("faust_{name}{{app=\"{id}\"}} {value}\n"));
    }
    // Per core and partition: read from the cores at scrape time (nothing per event).
    if let Ok(cores) = core_statuses(inboxes) {
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
            out.push_str(&format!("# HELP faust_{name} {help}\n# TYPE faust_{name} {kind}\n"));
            for (labels, value) in rows {
                out.push_str(&format!("faust_{name}{{app=\"{id}\",{labels}}} {value}\n"));
            }
        };
        let per_core = |f: &dyn Fn(&Value) -> f64| -> Vec<(String, f64)> {
            cores.iter().map(|c| (format!("core=\"{}\"", c["core"]), f(c))).collect()
        };
        let num = |v: &Value| v.as_f64().unwrap_or(0.0);
        family(
            "core_busy_seconds_total",
            "counter",
            "Time the core's executor spent running tasks and polling I/O.",
            per_core(&|c| num(&c["busy_seconds"])),
        );
        family(
            "core_events_processed_total",
            "counter",
            "Events the core's agents finished.",
            per_core(&|c| num(&c["events_processed"])),
        );
        family(
            "core_windows_open",
            "gauge",
            "Windows open in the core's partitions.",
            per_core(&|c| num(&c["windows_open"])),
        );
        family(
            "core_recovering_records_left",
            "gauge",
            "Changelog records the core's recovering shards have left to replay.",
            per_core(&|c| {
                let recovering = c["recovering"].as_array().cloned().unwrap_or_default();
                recovering.iter().map(|r| (num(&r["total"]) - num(&r["done"])).max(0.0)).sum()
            }),
        );
        let partitions = |f: &dyn Fn(&Value) -> Option<f64>| -> Vec<(String, f64)> {
            cores
                .iter()
                .flat_map(|c| {
                    c["partitions"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .map(move |p| (c["core"].clone(), p))
                })
                .filter_map(|(core, p)| {
                    let topic = p["topic"].as_str().unwrap_or("").replace(['\\', '"', '\n'], "_");
                    f(&p).map(|v| (format!("core=\"{core}\",topic=\"{topic}\",partition=\"{}\"", p["partition"]), v))
                })
                .collect()
        };
        family(
            "partition_position",
            "gauge",
            "The offset processing stands at (everything below it is done).",
            partitions(&|p| p["position"].as_f64()),
        );
        family("partition_end", "gauge", "The partition's end at the last fetch.", partitions(&|p| p["end"].as_f64()));
        family(
            "partition_lag",
            "gauge",
            "Records of the partition not processed yet.",
            partitions(&|p| Some((num(&p["end"]) - num(&p["position"])).max(0.0))),
        );
        family("partition_committed", "gauge", "The committed offset.", partitions(&|p| p["committed"].as_f64()));
        family(
            "partition_events_per_second",
            "gauge",
            "Events of the partition processed per second over the last few seconds.",
            partitions(&|p| p["events_per_s"].as_f64()),
        );
        for (name, key, help) in [
            ("commit_latency_seconds", "commit_latency", "How long the core's commits took."),
            (
                "event_latency_seconds",
                "event_latency",
                "How long sampled events took from their fetch until processed (with every event before them).",
            ),
            (
                "event_age_seconds",
                "event_age",
                "How old sampled events were (by their record's timestamp) when processed: the end-to-end latency.",
            ),
        ] {
            out.push_str(&format!("# HELP faust_{name} {help}\n# TYPE faust_{name} summary\n"));
            for c in &cores {
                let (core, h) = (&c["core"], &c[key]);
                for (q, k) in [("0.5", "p50_us"), ("0.99", "p99_us"), ("0.999", "p999_us"), ("1", "max_us")] {
                    out.push_str(&format!(
                        "faust_{name}{{app=\"{id}\",core=\"{core}\",quantile=\"{q}\"}} {}\n",
                        num(&h[k]) / 1e6
                    ));
                }
                out.push_str(&format!(
                    "faust_{name}_sum{{app=\"{id}\",core=\"{core}\"}} {}\n",
                    num(&h["sum_us"]) / 1e6
                ));
                out.push_str(&format!("faust_{name}_count{{app=\"{id}\",core=\"{core}\"}} {}\n", num(&h["count"])));
            }
        }
    }
    Answer { status: 200, content_type: "text/plain; version=0.0.4".into(), body: out.into_bytes(), location: None }
}

/// The live status page: plain HTML and a little JavaScript polling `/status` every second.
const STATUS_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>faust worker</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.problem { color: #b00; }
.bar { display: inline-block; width: 120px; height: 10px; background: #eee; vertical-align: middle; }
.bar > span { display: block; height: 100%; background: #4a8; }
</style></head>
<body>
<h1>faust worker <span id="app"></span></h1>
<p><b id="events">–</b> events processed, <b id="rate">–</b> events/s, lag <b id="lag">–</b>;
windows open <b id="windows_open">–</b>, closed <b id="windows">–</b>; standby partitions <b id="standbys">–</b>.</p>
<ul id="problems"></ul>
<h2>Cores</h2>
<table><thead><tr><th>core</th><th>busy</th><th>events</th><th>event p99</th><th>end-to-end p99</th><th>shards</th><th>standbys</th><th>windows open</th><th>commits</th><th>commit p99</th></tr></thead>
<tbody id="cores"></tbody></table>
<h2>Recovering</h2>
<table><thead><tr><th>table</th><th>core</th><th>progress</th><th>records</th></tr></thead>
<tbody id="recovering"></tbody></table>
<h2>Partitions</h2>
<table><thead><tr><th>partition</th><th>core</th><th>events/s</th><th>position</th><th>end</th><th>lag</th><th>committed</th></tr></thead>
<tbody id="partitions"></tbody></table>
<script>
function cell(row, value) {
  const td = document.createElement("td");
  if (value instanceof Node) td.appendChild(value); else td.textContent = value;
  row.appendChild(td);
}
function ms(us) { return us ? (us / 1000).toFixed(2) + " ms" : "–"; }
function bar(done, total) {
  const outer = document.createElement("span"); outer.className = "bar";
  const inner = document.createElement("span"); inner.style.width = (total ? 100 * done / total : 100) + "%";
  outer.appendChild(inner); return outer;
}
async function refresh() {
  try {
    const s = await (await fetch("/status")).json();
    document.getElementById("app").textContent = s.app;
    document.getElementById("events").textContent = s.stats.events_processed;
    document.getElementById("lag").textContent = s.stats.lag;
    document.getElementById("windows").textContent = s.stats.windows_closed;
    document.getElementById("standbys").textContent = s.stats.standby_partitions;
    document.getElementById("windows_open").textContent = s.cores.reduce((n, c) => n + (c.windows_open || 0), 0);
    // The worker's rate: its partitions' rates (each over the last few seconds, kept by the cores).
    const rate = s.cores.flatMap(c => c.partitions).reduce((n, p) => n + p.events_per_s, 0);
    document.getElementById("rate").textContent = Math.round(rate);
    const problems = document.getElementById("problems"); problems.replaceChildren();
    for (const p of s.problems) { const li = document.createElement("li"); li.className = "problem"; li.textContent = p; problems.appendChild(li); }
    const cores = document.getElementById("cores"); cores.replaceChildren();
    const parts = document.getElementById("partitions"); parts.replaceChildren();
    const recovering = document.getElementById("recovering"); recovering.replaceChildren();
    for (const c of s.cores) {
      const row = document.createElement("tr");
      [c.core, c.busy_seconds.toFixed(1) + " s", c.events_processed, ms(c.event_latency.p99_us), ms(c.event_age.p99_us),
       c.shards, c.standbys, c.windows_open, c.commit_latency.count, ms(c.commit_latency.p99_us)].forEach(v => cell(row, v));
      cores.appendChild(row);
      for (const r of c.recovering) {
        const row = document.createElement("tr");
        [r.table + "[" + r.partition + "]", c.core, bar(r.done, r.total), r.done + " / " + r.total].forEach(v => cell(row, v));
        recovering.appendChild(row);
      }
      for (const p of c.partitions) {
        const name = p.topic + "/" + p.partition;
        const row = document.createElement("tr"); row.dataset.partition = name;
        [name, c.core, Math.round(p.events_per_s), p.position, p.end, Math.max(0, p.end - p.position), p.committed ?? "–"].forEach(v => cell(row, v));
        parts.appendChild(row);
      }
    }
    if (!recovering.children.length) {
      const row = document.createElement("tr"); cell(row, "nothing is recovering"); row.firstChild.colSpan = 4;
      recovering.appendChild(row);
    }
  } catch (e) { document.getElementById("problems").textContent = "the worker does not answer: " + e; }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"#;

/// `%XX` escapes decoded (and `+` left as it is); the result must be UTF-8.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(|| format!("a % without two hex digits in {s:?}"))?;
            let hex = std::str::from_utf8(hex).map_err(|_| format!("a bad % escape in {s:?}"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("a bad % escape in {s:?}"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// Percent-encodes everything but unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_escapes_round_trip_and_bad_ones_are_errors() {
        for s in ["account-1", "a b/c?d=e&f", "ünïcødé", "100%"] {
            assert_eq!(percent_decode(&encode(s)).unwrap(), s);
        }
        for bad in ["%", "%4", "%zz", "%ff"] {
            assert!(percent_decode(bad).is_err(), "{bad}");
        }
    }
}
