//! The control socket: how the CLI's commands reach a running worker.
//!
//! A worker that keeps state in its data directory listens on the Unix socket
//! `{datadir}/control.sock`. On `local://` the worker owns the log (it holds the log's lock),
//! so `send`, `table get` and `table dump` from another process go through it. The protocol
//! is one JSON request per line and one JSON response per line ([`Request`], [`Response`]);
//! both ends are the same program (the app's own binary), so it is not a stable interface.
//!
//! A request that needs a core (a send, a table read) becomes a [`Query`] in that core's
//! [`Inbox`]; the core runs it as a task of its own and answers through a channel. The socket
//! thread waits for the answer a bounded time.

mod inbox;
pub(crate) mod web;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use faust_transport::{OffsetSpec, TopicPartition};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::app::{App, TopicKind, lock};
use crate::codec::Codec;
use crate::runtime::CoreRuntime;
pub(crate) use inbox::Inbox;
use inbox::ask;

/// The socket's file name in the data directory.
pub(crate) const SOCKET_NAME: &str = "control.sock";
/// How long the socket thread waits for a core's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection may sit idle before the worker drops it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest path a Unix socket address holds on Linux (`sun_path` is 108 bytes, with the
/// terminating NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// A request to the worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub(crate) enum Request {
    /// Is a worker there? Answers with the app's id, the process id and the cores.
    Ping,
    /// Sends `values` (each `repeat` times) to `topic`, encoded with the topic's codecs from
    /// their text (see [`encode_text`]).
    Send {
        topic: String,
        key: Option<Payload>,
        values: Vec<Payload>,
        partition: Option<u32>,
        repeat: u64,
        /// Codecs to use instead of the topic's.
        #[serde(default)]
        key_serializer: Option<String>,
        #[serde(default)]
        value_serializer: Option<String>,
        /// Send records the worker's agents would drop as bad records (for testing the
        /// bad-record policy).
        #[serde(default)]
        unchecked: bool,
    },
    /// The value of `key` in `table`.
    TableGet { table: String, key: String },
    /// Every key and value of `table`.
    TableDump { table: String },
    /// The topics with their partitions and record counts.
    Topics,
    /// The worker's counters.
    Stats,
    /// Repairs the damaged log of `topic`'s partitions (all, or `partition`) on the embedded
    /// transport: see the CLI's `repair`.
    Repair { topic: String, partition: Option<u32> },
}

/// What went wrong with a request, for the CLI's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Failure {
    /// The topic, table or key does not exist.
    NotFound,
    /// The request is wrong (a value that does not encode, a partition out of range).
    BadRequest,
    /// The worker could not do it (a transport error, the worker stopping).
    Failed,
    /// Another worker of the group holds what was asked for; the message is its URL.
    Elsewhere,
}

/// The worker's answer.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Response {
    /// The result when it worked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) result: Option<Value>,
    /// Why not, otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<(Failure, String)>,
}

type Answer = Result<Value, (Failure, String)>;

fn not_found(message: String) -> (Failure, String) {
    (Failure::NotFound, message)
}

fn bad_request(message: String) -> (Failure, String) {
    (Failure::BadRequest, message)
}

fn failed(message: String) -> (Failure, String) {
    (Failure::Failed, message)
}

/// A key or value as given on the command line: text, or bytes that are not UTF-8 (carried
/// in base64, since requests are JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Payload {
    Text(String),
    Bytes { base64: String },
}

impl Payload {
    pub(crate) fn from_bytes(bytes: Vec<u8>) -> Payload {
        use base64::Engine;
        match String::from_utf8(bytes) {
            Ok(text) => Payload::Text(text),
            Err(e) => Payload::Bytes { base64: base64::engine::general_purpose::STANDARD.encode(e.into_bytes()) },
        }
    }

    fn bytes(&self) -> Result<std::borrow::Cow<'_, [u8]>, String> {
        use base64::Engine;
        match self {
            Payload::Text(t) => Ok(std::borrow::Cow::Borrowed(t.as_bytes())),
            Payload::Bytes { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| format!("bad base64 in the request: {e}")),
        }
    }
}

/// Bytes that serialize as bytes (what the `raw` format writes as they are).
struct AsBytes<'a>(&'a [u8]);

impl Serialize for AsBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// Encodes a key or value given on the command line with `codec`: for `raw`, its bytes as
/// they are; for JSON, it must be a JSON document (in UTF-8) — except for a key, where text
/// that is not JSON is taken as a JSON string.
pub(crate) fn encode_payload(codec: &Codec, payload: &Payload, is_key: bool) -> Result<Vec<u8>, String> {
    let bytes = payload.bytes()?;
    if codec.is_raw_format() {
        let mut out = Vec::new();
        codec.encode(&AsBytes(&bytes), &mut out).map_err(|e| e.to_string())?;
        return Ok(out);
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| format!("not valid JSON (not UTF-8: {e}) for the {} codec", codec.name()))?;
    encode_text(codec, text, is_key)
}

/// The socket path for a data directory.
pub(crate) fn socket_path(datadir: &Path) -> PathBuf {
    datadir.join(SOCKET_NAME)
}

/// The data directory of the worker whose advertised URLs (space-separated) are `urls`, when
/// one is a control socket on this host (`unix://{datadir}/control.sock`).
pub(crate) fn datadir_of(urls: &str) -> Option<PathBuf> {
    urls.split_whitespace().find_map(|url| {
        let path = Path::new(url.strip_prefix("unix://")?);
        (path.file_name()? == SOCKET_NAME).then(|| path.parent().map(Path::to_path_buf)).flatten()
    })
}

/// Encodes the text a user typed as a key or value with `codec`: for `raw`, the text's
/// bytes; for JSON, the text must be a JSON document — except for a key, where text that is
/// not JSON is taken as a JSON string (`--key account-1` means `"account-1"`).
pub(crate) fn encode_text(codec: &Codec, text: &str, is_key: bool) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    match codec.is_raw_format() {
        true => codec.encode(text, &mut out).map_err(|e| e.to_string())?,
        false => {
            let value: Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(_) if is_key => Value::String(text.to_string()),
                Err(e) => return Err(format!("not valid JSON ({e}) for the {} codec", codec.name())),
            };
            codec.encode(&value, &mut out).map_err(|e| e.to_string())?;
        }
    }
    Ok(out)
}

/// The socket server of a running worker.
pub(crate) struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `{datadir}/control.sock` for `app`, whose cores take queries from
    /// `inboxes`. A socket file left by a worker that died is replaced; one that answers
    /// belongs to a running worker and is left alone (`Ok(None)`, logged).
    pub(crate) fn start(datadir: &Path, app: &App, inboxes: Vec<Arc<Inbox>>) -> std::io::Result<Option<ControlServer>> {
        let path = socket_path(datadir);
        if UnixStream::connect(&path).is_ok() {
            tracing::warn!(socket = %path.display(),
                "another worker answers on the control socket of this data directory; running without one");
            return Ok(None);
        }
        // Nothing answers: a leftover from a worker that was killed.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("binding the control socket {}: {e}", path.display()))
        })?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, app) = (stop.clone(), app.clone());
            std::thread::Builder::new()
                .name(format!("{}-control-socket", app.settings().id))
                .spawn(move || accept_loop(listener, &app, &inboxes, &stop))?
        };
        tracing::debug!(socket = %path.display(), "control socket listening");
        Ok(Some(ControlServer { path, stop, thread: Some(thread) }))
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, app: &App, inboxes: &[Arc<Inbox>], stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (app, inboxes) = (app.clone(), inboxes.to_vec());
                let spawned = std::thread::Builder::new()
                    .name("control-connection".into())
                    .spawn(move || serve_connection(stream, &app, &inboxes));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "could not start a thread for a control connection");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

fn serve_connection(stream: UnixStream, app: &App, inboxes: &[Arc<Inbox>]) {
    // Accepted sockets inherit non-blocking mode on some platforms: make it blocking, with
    // a bound on how long an idle client holds the thread.
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(IDLE_TIMEOUT)).is_err() {
        return;
    }
    let Ok(mut writer) = stream.try_clone() else { return };
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(request) => handle(request, app, inboxes),
            Err(e) => Err(bad_request(format!("not a control request: {e}"))),
        };
        let response = match answer {
            Ok(result) => Response { result: Some(result), error: None },
            Err(error) => Response { result: None, error: Some(error) },
        };
        let Ok(mut text) = serde_json::to_string(&response) else { return };
        text.push('\n');
        if writer.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

fn handle(request: Request, app: &App, inboxes: &[Arc<Inbox>]) -> Answer {
    match request {
        Request::Ping => Ok(serde_json::json!({
            "app": app.settings().id,
            "pid": std::process::id(),
            "cores": inboxes.len(),
        })),
        Request::Stats => {
            let mut stats = serde_json::to_value(app.stats()).map_err(|e| failed(e.to_string()))?;
            stats["problems"] = serde_json::json!(app.problems());
            Ok(stats)
        }
        Request::Send { topic, key, values, partition, repeat, key_serializer, value_serializer, unchecked } => {
            let codec = |name: Option<String>| -> Result<Option<Codec>, (Failure, String)> {
                name.map(|n| n.parse::<Codec>().map_err(|e| bad_request(e.to_string()))).transpose()
            };
            let codecs = (codec(key_serializer)?, codec(value_serializer)?);
            let topics = app.inner.outbox.topics();
            let send = SendRequest { topic, key, values, partition, repeat, codecs, unchecked, topics };
            ask(inboxes, 0, move |core| async move { send.run(&core).await })
        }
        Request::Repair { topic, partition } => {
            let partitions = match partition {
                Some(p) => vec![p],
                None => {
                    let name = topic.clone();
                    let count = ask(inboxes, 0, move |core| async move {
                        let meta = core.transport().topic_metadata(&name).await.map_err(|e| failed(e.to_string()))?;
                        Ok(meta.map_or(Value::Null, |m| m.config.partitions.into()))
                    })?;
                    let count = count.as_u64().ok_or_else(|| not_found(format!("no topic `{topic}`")))?;
                    (0..count as u32).collect()
                }
            };
            let mut reports = Vec::new();
            for p in partitions {
                let tp = TopicPartition::new(topic.as_str(), p);
                // The core that owns the partition's log repairs it; the others say so.
                let mut answer = Err(failed(format!("no core owns {tp}")));
                for core in 0..inboxes.len() {
                    let tp = tp.clone();
                    answer = ask(inboxes, core, move |runtime| async move {
                        match runtime.transport().repair(&tp) {
                            None => Err(bad_request(
                                "repair is for the embedded log (local://); a Kafka broker repairs its own logs".into(),
                            )),
                            Some(Err(faust_transport::Error::NotOwner { .. })) => Ok(Value::Null),
                            Some(Err(e)) => Err(failed(format!("repairing {tp}: {e}"))),
                            Some(Ok(report)) => Ok(repair_json(&tp, &report)),
                        }
                    });
                    if !matches!(answer, Ok(Value::Null)) {
                        break;
                    }
                }
                reports.push(answer?);
            }
            Ok(Value::Array(reports))
        }
        Request::TableGet { table, key } if is_windowed(app, &table) => {
            // A windowed table: the key's windows, from whichever core holds its shard.
            let (index, _) = find_table(app, &table)?;
            let wanted: Value = serde_json::from_str(&key).unwrap_or(Value::String(key.clone()));
            let mut windows: Vec<Value> = Vec::new();
            for core in 0..inboxes.len() {
                let wanted = wanted.clone();
                let found = ask(inboxes, core, move |runtime| async move {
                    let mut out = Vec::new();
                    for shard in runtime.shards_of(index) {
                        let items = shard.items_json().map_err(|e| failed(e.to_string()))?;
                        out.extend(
                            items
                                .into_iter()
                                .filter(|(k, _)| k["key"] == wanted)
                                .map(|(k, v)| serde_json::json!({"start": k["start"], "end": k["end"], "value": v})),
                        );
                    }
                    Ok(Value::Array(out))
                })?;
                if let Value::Array(found) = found {
                    windows.extend(found);
                }
            }
            if windows.is_empty() {
                return Err(not_found(format!("windowed table `{table}` has no window of key {key}")));
            }
            windows.sort_by_key(|w| (w["start"].as_i64(), w["end"].as_i64()));
            Ok(Value::Array(windows))
        }
        Request::TableGet { table, key } => {
            let (index, (key_codec, _)) = find_table(app, &table)?;
            let key_bytes = encode_text(&key_codec, &key, true).map_err(|e| bad_request(format!("key: {e}")))?;
            // Whichever core holds the key's shard answers; the others find nothing.
            for core in 0..inboxes.len() {
                let key_bytes = key_bytes.clone();
                let found = ask(inboxes, core, move |runtime| async move {
                    for shard in runtime.shards_of(index) {
                        if let Some(v) = shard.lookup_json(&key_bytes).map_err(|e| failed(e.to_string()))? {
                            return Ok(v);
                        }
                    }
                    Ok(Value::Null)
                })?;
                if !found.is_null() {
                    return Ok(found);
                }
            }
            // On Kafka the key may live on another worker of the group: the one its partition
            // (by Kafka's default partitioner, as Faust routes table lookups) is assigned to.
            let changelog = lock(&app.inner.tables)[index].changelog().clone();
            let group = app.settings().id.clone();
            let owner = ask(inboxes, 0, move |runtime| async move {
                let Some((owners, me)) = runtime.transport().group_owners(&group) else { return Ok(Value::Null) };
                let partitions = owners
                    .iter()
                    .flat_map(|(_, tps)| tps.iter())
                    .filter(|tp| tp.topic == changelog)
                    .map(|tp| tp.partition + 1)
                    .max()
                    .unwrap_or(0);
                if partitions == 0 {
                    return Ok(Value::Null);
                }
                let tp = TopicPartition::new(changelog, crate::partitioner::partition_for_key(&key_bytes, partitions));
                Ok(owners
                    .into_iter()
                    .find(|(url, tps)| tps.contains(&tp) && *url != me && !url.is_empty())
                    .map_or(Value::Null, |(url, _)| Value::String(url)))
            })?;
            if let Value::String(url) = owner {
                return Err((Failure::Elsewhere, url));
            }
            Err(not_found(format!("table `{table}` has no key {key}")))
        }
        Request::TableDump { table } => {
            let (index, _) = find_table(app, &table)?;
            let mut items: Vec<Value> = Vec::new();
            for core in 0..inboxes.len() {
                let part = ask(inboxes, core, move |runtime| async move {
                    let mut out = Vec::new();
                    for shard in runtime.shards_of(index) {
                        let items = shard.items_json().map_err(|e| failed(e.to_string()))?;
                        out.extend(items.into_iter().map(|(k, v)| serde_json::json!([k, v])));
                    }
                    Ok(Value::Array(out))
                })?;
                if let Value::Array(part) = part {
                    items.extend(part);
                }
            }
            items.sort_by_key(|item| item[0].to_string());
            Ok(Value::Array(items))
        }
        Request::Topics => {
            // On `local://` a partition's log is read by the core that owns it: every core
            // counts the records of its partitions, and the counts add up. Elsewhere any core
            // reads every partition's offsets, so core 0 counts them all.
            let names: Vec<(String, &'static str)> = topic_names(app);
            let mut topics: Vec<Value> = Vec::new();
            for core in 0..inboxes.len() {
                let asked = names.clone();
                let counted = ask(inboxes, core, move |runtime| async move {
                    let counts = core == 0 || matches!(runtime.transport(), crate::transports::AnyCore::Local(_));
                    let mut out = Vec::new();
                    for (name, _) in &asked {
                        let partitions = match runtime.transport().topic_metadata(name).await {
                            Ok(meta) => meta.map(|m| m.config.partitions),
                            Err(e) => return Err(failed(format!("reading topic `{name}`: {e}"))),
                        };
                        let mut records = 0u64;
                        // Partitions that could not be counted, with why (a damaged log).
                        let mut unreadable: Vec<String> = Vec::new();
                        let counted_partitions = if counts { partitions.unwrap_or(0) } else { 0 };
                        for p in 0..counted_partitions {
                            let tp = TopicPartition::new(name.as_str(), p);
                            let latest = runtime.transport().list_offset(&tp, OffsetSpec::Latest).await;
                            let earliest = runtime.transport().list_offset(&tp, OffsetSpec::Earliest).await;
                            match (latest, earliest) {
                                (Ok(l), Ok(e)) => records += l.saturating_sub(e),
                                (Err(faust_transport::Error::NotOwner { .. }), _) => {}
                                (Err(e), _) | (_, Err(e)) => {
                                    let what = if e.damaged_log().is_some() { "damaged" } else { "unreadable" };
                                    unreadable.push(format!("{p} ({what})"));
                                }
                            }
                        }
                        out.push(serde_json::json!([partitions, records, unreadable]));
                    }
                    Ok(Value::Array(out))
                })?;
                let counted = counted.as_array().cloned().unwrap_or_default();
                if topics.is_empty() {
                    topics = names
                        .iter()
                        .zip(&counted)
                        .map(|((name, kind), c)| {
                            serde_json::json!({ "topic": name, "kind": kind, "partitions": c[0], "records": 0, "uncounted": [] })
                        })
                        .collect();
                }
                for (topic, c) in topics.iter_mut().zip(&counted) {
                    let sum = topic["records"].as_u64().unwrap_or(0) + c[1].as_u64().unwrap_or(0);
                    topic["records"] = sum.into();
                    if let (Some(all), Some(more)) = (topic["uncounted"].as_array_mut(), c[2].as_array()) {
                        all.extend(more.iter().cloned());
                    }
                }
            }
            Ok(Value::Array(topics))
        }
    }
}

/// A repair's report as the CLI shows it.
pub(crate) fn repair_json(tp: &TopicPartition, report: &faust_storage::RepairReport) -> Value {
    serde_json::json!({
        "partition": tp.to_string(),
        "segments_checked": report.segments_checked,
        "segments_repaired": report.segments_repaired,
        "batches_dropped": report.batches_dropped,
        "lost_offsets": report.lost_offsets(),
        "lost": report.lost_ranges(),
        "quarantined": report.quarantined.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    })
}

/// Whether the table named `name` is the windows of a windowed table.
fn is_windowed(app: &App, name: &str) -> bool {
    lock(&app.inner.tables).iter().any(|t| &**t.name() == name && t.windowed())
}

/// The table named `name`: its index and codecs.
fn find_table(app: &App, name: &str) -> Result<(usize, (Codec, Codec)), (Failure, String)> {
    let tables = lock(&app.inner.tables);
    tables
        .iter()
        .position(|t| &**t.name() == name)
        .map(|i| (i, tables[i].codecs()))
        .ok_or_else(|| not_found(format!("no table `{name}` (see the `tables` command)")))
}

/// Every topic the app declares, and the changelogs of its tables, with their kind.
pub(crate) fn topic_names(app: &App) -> Vec<(String, &'static str)> {
    let leader = crate::app::services::leader_topic(app.settings());
    let mut names: Vec<(String, &'static str)> = lock(&app.inner.topics)
        .iter()
        .map(|t| {
            let kind = match t.kind {
                TopicKind::Channel => "channel",
                TopicKind::Log if leader.as_deref() == Some(&*t.name) => "leader",
                TopicKind::Log if t.name.ends_with("-repartition") => "repartition",
                TopicKind::Log => "topic",
            };
            (t.name.to_string(), kind)
        })
        .collect();
    for t in lock(&app.inner.tables).iter() {
        names.push((t.changelog().to_string(), "changelog"));
    }
    if let Some(topic) = app.settings().dead_letter_topic() {
        names.push((topic, "dead-letter"));
    }
    names
}

/// A `send` request, on core 0.
struct SendRequest {
    topic: String,
    key: Option<Payload>,
    values: Vec<Payload>,
    partition: Option<u32>,
    repeat: u64,
    /// Key and value codecs replacing the topic's.
    codecs: (Option<Codec>, Option<Codec>),
    /// Skip the checks that the worker's agents will take the records.
    unchecked: bool,
    /// The app's topic handles.
    topics: Vec<Arc<crate::app::TopicInner>>,
}

/// Records of one send are written in batches of about this size.
const SEND_BATCH_BYTES: usize = 1 << 20;

/// What a send wrote so far, per partition: (records, first offset, last offset).
#[derive(Default)]
struct Written {
    partitions: std::collections::BTreeMap<u32, (u64, u64, u64)>,
}

impl Written {
    fn records(&self) -> u64 {
        self.partitions.values().map(|(n, _, _)| n).sum()
    }

    fn note(&mut self, produced: &faust_transport::Produced, records: u64) {
        let entry = self.partitions.entry(produced.partition).or_insert((0, produced.base_offset, 0));
        entry.0 += records;
        entry.2 = produced.last_offset;
    }

    fn describe(&self, topic: &str) -> String {
        if self.partitions.is_empty() {
            return "no record of this send was written".to_string();
        }
        let parts: Vec<String> = self
            .partitions
            .iter()
            .map(|(p, (n, first, last))| format!("{n} to {topic}/{p} at offsets {first}..={last}"))
            .collect();
        format!("{} records of this send were written ({})", self.records(), parts.join(", "))
    }
}

impl SendRequest {
    /// Writes the records itself, partition batch by partition batch, and reports exactly
    /// what was written. A send is never left buffered in the worker: when a write fails,
    /// the answer is final — what was not written is dropped, not written later behind the
    /// caller's back (a retried send would duplicate it) — and says which records did land.
    async fn run<C: SendCore>(self, core: &C) -> Answer {
        let SendRequest { topic, key, values, partition, repeat, codecs, unchecked, topics } = self;
        let topic = topic.as_str();
        let inner = topics
            .iter()
            .find(|t| &*t.name == topic)
            .ok_or_else(|| not_found(format!("no topic `{topic}` (see the `topics` command)")))?;
        if inner.kind == TopicKind::Channel {
            return Err(bad_request(format!("`{topic}` is an in-memory channel of the worker, not a topic")));
        }
        let partitions = core.partitions(topic).await?;
        let (key_codec, value_codec) = (
            codecs.0.unwrap_or_else(|| inner.key_codec.clone()),
            codecs.1.unwrap_or_else(|| inner.value_codec.clone()),
        );
        let key_bytes = match &key {
            Some(k) => Some(encode_payload(&key_codec, k, true).map_err(|e| bad_request(format!("key: {e}")))?),
            None => None,
        };
        let encoded: Vec<Vec<u8>> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                encode_payload(&value_codec, v, false).map_err(|e| bad_request(format!("value {}: {e}", i + 1)))
            })
            .collect::<Result<_, _>>()?;
        if !unchecked {
            // What the worker's agents would only drop as bad records is refused here, so
            // that "sent" means the records will be processed.
            let max = core.max_record_bytes();
            for (i, value) in encoded.iter().enumerate() {
                let size = value.len() + key_bytes.as_ref().map_or(0, Vec::len);
                let problem = if size > max {
                    Some(format!("{size} bytes, over max_record_bytes ({max})"))
                } else {
                    inner.check(key_bytes.as_deref(), value).err()
                };
                if let Some(problem) = problem {
                    return Err(bad_request(format!(
                        "value {}: the worker's agents would drop it as a bad record ({problem}); nothing was sent (--unchecked sends it anyway)",
                        i + 1
                    )));
                }
            }
        }
        if let Some(p) = partition
            && p >= partitions
        {
            return Err(bad_request(format!(
                "topic `{topic}` has partitions 0..{partitions}; there is no partition {p}"
            )));
        }
        let route = |key: Option<&[u8]>| match (partition, key) {
            (Some(p), _) => p,
            (None, Some(k)) => crate::partitioner::partition_for_key(k, partitions),
            (None, None) => core.round_robin(partitions),
        };
        let total = repeat.saturating_mul(encoded.len() as u64);
        let mut written = Written::default();
        let mut batches: std::collections::BTreeMap<u32, faust_storage::BatchBuilder> = Default::default();
        for _ in 0..repeat {
            for value in &encoded {
                let p = route(key_bytes.as_deref());
                let batch = batches.entry(p).or_default();
                batch.push(crate::util::now_ms(), key_bytes.as_deref(), Some(value), &[]);
                if batch.encoded_len() >= SEND_BATCH_BYTES {
                    let full = std::mem::take(batch);
                    write_send(core, &inner.name, p, full, &mut written, total).await?;
                }
            }
        }
        for (p, batch) in batches {
            if !batch.is_empty() {
                write_send(core, &inner.name, p, batch, &mut written, total).await?;
            }
        }
        if let [(p, (1, offset, _))] = written.partitions.iter().map(|(p, v)| (*p, *v)).collect::<Vec<_>>()[..] {
            return Ok(serde_json::json!({ "topic": topic, "sent": 1, "partition": p, "offset": offset }));
        }
        Ok(serde_json::json!({ "topic": topic, "sent": written.records() }))
    }
}

/// Where a send writes: a worker's core (through its buffer), or the broker directly (the CLI
/// on Kafka with no worker running).
#[allow(async_fn_in_trait)] // Used on one thread, by one caller.
pub(crate) trait SendCore {
    /// The partition count of `topic`, or why it has none.
    async fn partitions(&self, topic: &str) -> Result<u32, (Failure, String)>;
    /// Records larger than this are refused (`max_record_bytes`).
    fn max_record_bytes(&self) -> usize;
    /// The partition of the next record without a key.
    fn round_robin(&self, partitions: u32) -> u32;
    /// Writes what is buffered for `tp` before a send's own batch (to keep the partition's
    /// order); `Err(why)` if it could not.
    async fn before_write(&self, tp: &TopicPartition) -> Result<(), String>;
    /// Appends `batch` to `tp`.
    async fn produce(
        &self,
        tp: &TopicPartition,
        batch: faust_storage::BatchBuilder,
    ) -> Result<faust_transport::Produced, faust_transport::Error>;
}

impl SendCore for Rc<CoreRuntime> {
    async fn partitions(&self, topic: &str) -> Result<u32, (Failure, String)> {
        CoreRuntime::partitions(self, topic).ok_or_else(|| failed(format!("topic `{topic}` is not created yet")))
    }

    fn max_record_bytes(&self) -> usize {
        self.settings().max_record_bytes
    }

    fn round_robin(&self, partitions: u32) -> u32 {
        CoreRuntime::round_robin(self, partitions)
    }

    async fn before_write(&self, tp: &TopicPartition) -> Result<(), String> {
        if self.has_pending(tp) {
            let flushed = self.flush().await;
            if self.has_pending(tp) {
                let why =
                    flushed.err().map_or_else(|| "earlier records are not written yet".to_string(), |e| e.to_string());
                return Err(format!("earlier records for {tp} are not written yet ({why})"));
            }
        }
        Ok(())
    }

    async fn produce(
        &self,
        tp: &TopicPartition,
        batch: faust_storage::BatchBuilder,
    ) -> Result<faust_transport::Produced, faust_transport::Error> {
        match crate::runtime::fault_point("send:produce") {
            Ok(()) => self.transport().produce(tp, batch).await,
            Err(e) => Err(crate::runtime::injected_produce_failure(tp, batch, e)),
        }
    }
}

/// The broker itself, for a send with no worker running (the CLI is a producer).
struct DirectSend {
    core: crate::transports::AnyCore,
    max_record_bytes: usize,
    next: std::cell::Cell<u32>,
    /// How to create the app's declared topics that do not exist yet, by name.
    declared: std::collections::HashMap<String, faust_transport::TopicConfig>,
}

impl SendCore for DirectSend {
    async fn partitions(&self, topic: &str) -> Result<u32, (Failure, String)> {
        match self.core.topic_metadata(topic).await {
            Ok(Some(meta)) => Ok(meta.config.partitions),
            // The app declares it: created as the worker would create it.
            Ok(None) => match self.declared.get(topic) {
                Some(config) => match self.core.create_topic(topic, config).await {
                    Ok(meta) => Ok(meta.config.partitions),
                    Err(e) => Err(failed(format!("creating topic `{topic}`: {e}"))),
                },
                None => Err(failed(format!("topic `{topic}` does not exist on the broker yet (a worker creates it)"))),
            },
            Err(e) => Err(failed(format!("reading topic `{topic}`: {e}"))),
        }
    }

    fn max_record_bytes(&self) -> usize {
        self.max_record_bytes
    }

    fn round_robin(&self, partitions: u32) -> u32 {
        let n = self.next.get();
        self.next.set(n.wrapping_add(1));
        n % partitions.max(1)
    }

    async fn before_write(&self, _tp: &TopicPartition) -> Result<(), String> {
        Ok(())
    }

    async fn produce(
        &self,
        tp: &TopicPartition,
        batch: faust_storage::BatchBuilder,
    ) -> Result<faust_transport::Produced, faust_transport::Error> {
        self.core.produce(tp, batch).await
    }
}

/// Runs `request` (a `Request::Send`) against the broker of `settings` with no worker: on
/// Kafka the CLI is a producer like any other. Other transports need their worker.
pub(crate) fn send_without_worker(
    app: &App,
    settings: &crate::Settings,
    request: Request,
) -> Result<Value, ClientError> {
    let Request::Send { topic, key, values, partition, repeat, key_serializer, value_serializer, unchecked } = request
    else {
        return Err(ClientError::Refused(Failure::BadRequest, "only a send runs without a worker".into()));
    };
    let refused = |(failure, message): (Failure, String)| ClientError::Refused(failure, message);
    let codec = |name: Option<String>| -> Result<Option<Codec>, (Failure, String)> {
        name.map(|n| n.parse::<Codec>().map_err(|e| bad_request(e.to_string()))).transpose()
    };
    let codecs = (codec(key_serializer).map_err(refused)?, codec(value_serializer).map_err(refused)?);
    let topics = app.inner.outbox.topics();
    let send = SendRequest { topic, key, values, partition, repeat, codecs, unchecked, topics };
    // On Kafka, a client outside the group (no partitions of its own to consume).
    let url = settings.broker_url();
    let partitions = (!url.starts_with("local://")).then(Vec::new);
    let kafka = faust_transport::KafkaOptions { partitions, ..settings.kafka_options() };
    let transport =
        crate::transports::AnyTransport::open(&settings.broker_url(), 1, None, kafka, settings.segment_bytes)
            .map_err(|e| refused(failed(e.to_string())))?;
    let max_record_bytes = settings.max_record_bytes;
    let declared: std::collections::HashMap<String, faust_transport::TopicConfig> = lock(&app.inner.topics)
        .iter()
        .filter(|t| t.kind == crate::topic::TopicKind::Log && t.partitions_like.is_none())
        .map(|t| (t.name.to_string(), t.config(t.partitions.unwrap_or(settings.topic_partitions))))
        .collect();
    let answer = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("faust-send")
        .spawn(move || async move {
            let core = transport.attach_core(0, 1).await.map_err(|e| failed(e.to_string()))?;
            let direct = DirectSend { core, max_record_bytes, next: std::cell::Cell::new(0), declared };
            let answer = send.run(&direct).await;
            let _ = direct.core.shutdown().await;
            answer
        })
        .map_err(|e| refused(failed(format!("starting an executor: {e}"))))?
        .join()
        .map_err(|e| refused(failed(format!("the executor failed: {e}"))))?;
    answer.map_err(refused)
}

/// Writes one batch of a send to `topic`/`partition`, after whatever the core had buffered
/// for that partition (to keep the partition's order); on failure, the final answer.
async fn write_send<C: SendCore>(
    core: &C,
    topic: &Arc<str>,
    partition: u32,
    batch: faust_storage::BatchBuilder,
    written: &mut Written,
    total: u64,
) -> Result<(), (Failure, String)> {
    let tp = TopicPartition::new(topic.clone(), partition);
    let records = batch.len() as u64;
    let not_written = |written: &Written, why: String| {
        failed(format!(
            "writing to {tp} failed: {why}. {}; the other {} were not written, and nothing of this send will be written later (send them again)",
            written.describe(topic),
            total - written.records()
        ))
    };
    if let Err(why) = core.before_write(&tp).await {
        return Err(not_written(written, why));
    }
    let produced = core.produce(&tp, batch).await;
    match produced {
        Ok(produced) => {
            written.note(&produced, records);
            Ok(())
        }
        Err(e) => {
            // A Kafka produce that timed out may still land: say so rather than promise it did not.
            let maybe = matches!(
                e.cause(),
                faust_transport::Error::KafkaTimeout { .. } | faust_transport::Error::KafkaConnection { .. }
            );
            let mut why = e.to_string();
            if let Some(damaged) = e.damaged_log() {
                why.push_str(&format!(
                    " (the partition's log is damaged: `repair {} --partition {}` repairs it)",
                    damaged.topic, damaged.partition
                ));
            }
            if maybe {
                why.push_str(&format!(" (the broker may still have written these {records} records)"));
            }
            Err(not_written(written, why))
        }
    }
}

/// Why a CLI command could not talk to a worker.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// No worker listens on the socket.
    #[error(
        "no worker is running for data directory {datadir} (no control socket answers at {socket}); start one with the `worker` command"
    )]
    NoWorker { datadir: PathBuf, socket: PathBuf },
    /// The worker refused the request.
    #[error("{1}")]
    Refused(Failure, String),
    /// The connection failed mid-request.
    #[error("talking to the worker at {socket}: {message}")]
    Io { socket: PathBuf, message: String },
}

/// Sends `request` to the worker of `datadir` and returns its result.
pub(crate) fn request(datadir: &Path, request: &Request) -> Result<Value, ClientError> {
    let socket = socket_path(datadir);
    let io = |e: std::io::Error| ClientError::Io { socket: socket.clone(), message: e.to_string() };
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(io(std::io::Error::other(format!(
            "the path is over {MAX_SOCKET_PATH} bytes, too long for a Unix socket (a worker there runs without one); use a shorter --datadir"
        ))));
    }
    let stream = UnixStream::connect(&socket)
        .map_err(|_| ClientError::NoWorker { datadir: datadir.to_path_buf(), socket: socket.clone() })?;
    // A core answers within ANSWER_TIMEOUT or the worker says so; a little more here.
    stream.set_read_timeout(Some(ANSWER_TIMEOUT * 2 + Duration::from_secs(5))).map_err(io)?;
    let mut writer = stream.try_clone().map_err(io)?;
    let mut text = serde_json::to_string(request).map_err(|e| io(std::io::Error::other(e)))?;
    text.push('\n');
    writer.write_all(text.as_bytes()).map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(io)?;
    if line.is_empty() {
        return Err(io(std::io::Error::other("the worker closed the connection without answering")));
    }
    let response: Response = serde_json::from_str(&line).map_err(|e| io(std::io::Error::other(e)))?;
    match (response.result, response.error) {
        (_, Some((failure, message))) => Err(ClientError::Refused(failure, message)),
        (Some(result), None) => Ok(result),
        (None, None) => Ok(Value::Null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_encoded_by_codec() {
        assert_eq!(encode_text(&Codec::RAW, "account-1", true).unwrap(), b"account-1");
        assert_eq!(encode_text(&Codec::JSON, "account-1", true).unwrap(), br#""account-1""#);
        assert_eq!(encode_text(&Codec::JSON, r#"{"a": 1}"#, false).unwrap(), br#"{"a":1}"#);
        let err = encode_text(&Codec::JSON, "{not json", false).unwrap_err();
        assert!(err.contains("not valid JSON"), "{err}");
        // Composed codecs encode the same way, then transform.
        let codec: Codec = "json|binary".parse().unwrap();
        assert_eq!(encode_text(&codec, "[1]", false).unwrap(), b"WzFd");
        let err = encode_text(&codec, "{not json", false).unwrap_err();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn requests_and_responses_round_trip() {
        let request = Request::Send {
            topic: "orders".into(),
            key: Some(Payload::Text("k".into())),
            values: vec![Payload::Text("{}".into()), Payload::from_bytes(vec![0xff, 0, 1])],
            partition: Some(3),
            repeat: 2,
            key_serializer: None,
            value_serializer: Some("raw".into()),
            unchecked: false,
        };
        let text = serde_json::to_string(&request).unwrap();
        assert!(text.contains(r#""command":"send""#), "{text}");
        match serde_json::from_str::<Request>(&text).unwrap() {
            Request::Send { repeat: 2, values, .. } => {
                assert_eq!(values[1], Payload::Bytes { base64: "/wAB".into() });
                assert_eq!(encode_payload(&Codec::RAW, &values[1], false).unwrap(), vec![0xff, 0, 1]);
                let err = encode_payload(&Codec::JSON, &values[1], false).unwrap_err();
                assert!(err.contains("not UTF-8"), "{err}");
            }
            other => panic!("{other:?}"),
        }
        let response = Response { result: None, error: Some((Failure::NotFound, "no".into())) };
        let back: Response = serde_json::from_str(&serde_json::to_string(&response).unwrap()).unwrap();
        assert_eq!(back.error, Some((Failure::NotFound, "no".into())));
    }

    #[test]
    fn a_data_directory_too_long_for_a_socket_is_named() {
        let long = PathBuf::from(format!("/tmp/{}", "d".repeat(120)));
        let err = request(&long, &Request::Ping).unwrap_err();
        assert!(err.to_string().contains("too long for a Unix socket"), "{err}");
    }

    #[test]
    fn a_missing_worker_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let err = request(dir.path(), &Request::Ping).unwrap_err();
        assert!(matches!(err, ClientError::NoWorker { .. }), "{err}");
        assert!(err.to_string().contains("no worker is running"), "{err}");
    }
}
