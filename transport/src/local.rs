//! `local://PATH`: the embedded transport. Topics are directories of segment logs under PATH,
//! owned by one worker process.
//!
//! Layout: `PATH/.lock` (held by the worker, with its pid), `PATH/TOPIC/topic.meta` (the
//! topic's settings), `PATH/TOPIC/PARTITION/` (a segment log), `PATH/.groups/GROUP.offsets`
//! (committed offsets).
//!
//! **Single writer per partition.** Each partition's log is opened by exactly one core, its
//! *owner*: the core the engine placed the partition on (see
//! [`LocalTransport::set_owners`]), or `partition mod cores` for partitions this worker only
//! writes to. A produce from another core travels to the owner over a bounded cross-core
//! channel and resolves when the owner has appended it. The owner's appender tasks only
//! append and reply — they never wait on their own core's processing — so two cores sending
//! to each other cannot deadlock on full channels.
//!
//! A produce resolves once the records are in the log (the page cache): they survive a crash
//! of the process, like records acknowledged by Kafka's replicas survive a broker crash.
//! Committed offsets are written with `fsync`.
//!
//! **Upkeep.** Nothing runs by itself: the owner of a core calls [`LocalCore::maintain`]
//! now and then, and each call does a bounded step on the logs that core owns — deleting
//! segments past a topic's retention (time and size) and compacting compacted topics, below
//! the horizon set with [`LocalCore::set_compaction_horizon`] (a table's committed changelog
//! offset), so that disk use levels off; [`LocalCore::delete_records_below`] drops what a
//! topic's only consumers committed past (a repartition topic).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use event_listener::Event;
use faust_storage::{BatchBuilder, CompactionProgress, Log, LogConfig};
use futures_channel::oneshot;
use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender};
use glommio::{GlommioError, ResourceType};

use crate::checked_file::Damage;
use crate::closing::Closing;
use crate::error::{Error, Result};
use crate::types::{
    AssignmentEvent, Fence, Fetched, JoinRequest, OffsetSpec, Produced, TopicConfig, TopicMetadata, TopicPartition,
};
use crate::{CoreTransport, Membership, Transport};

/// Appends in flight from one core to another.
const CHANNEL_DEPTH: usize = 256;
const TOPIC_META: &str = "topic.meta";

/// An append sent to the core that owns the partition.
struct AppendRequest {
    tp: TopicPartition,
    batch: BatchBuilder,
    reply: oneshot::Sender<Result<Produced>>,
}

type Endpoints = (Vec<Option<SharedSender<AppendRequest>>>, Vec<Option<SharedReceiver<AppendRequest>>>);

/// Options of the embedded transport beyond its directory and core count.
///
/// ```no_run
/// use faust_transport::{LocalOptions, LocalTransport};
///
/// let options = LocalOptions { segment_bytes: 16 << 20 };
/// let transport = LocalTransport::open_with("/var/lib/my-app/topics", 2, options)?;
/// # Ok::<(), faust_transport::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalOptions {
    /// Size of each partition's segment files (Kafka's `log.segment.bytes`): retention
    /// deletes and compaction rewrites whole sealed segments, so smaller segments give
    /// space back sooner. Default 64 MiB; at least 4 KiB and at most 1 GiB.
    pub segment_bytes: u64,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions { segment_bytes: LogConfig::default().segment_bytes }
    }
}

struct Shared {
    root: PathBuf,
    cores: usize,
    options: LocalOptions,
    _lock: ProcessLock,
    topics: RwLock<HashMap<Arc<str>, TopicConfig>>,
    /// Committed offsets by group, loaded from disk on first use.
    committed: Mutex<HashMap<String, BTreeMap<TopicPartition, u64>>>,
    /// Numbers every change of `committed`; per group, the newest number on disk. Offsets
    /// files are written off the core threads and may finish out of order: an older state
    /// never overwrites a newer one.
    commit_version: AtomicU64,
    commit_written: Mutex<HashMap<String, u64>>,
    /// Committed transactions of every incarnation, for exactly-once reads (`txn.rs`).
    txns: crate::txn::TxnBook,
    owners: RwLock<HashMap<TopicPartition, usize>>,
    /// Bumped on every change of `owners`, so cores refresh their cached copy.
    owners_version: AtomicU64,
    /// Per core: its senders to every other core and its receivers from them, taken when the
    /// core attaches.
    endpoints: Mutex<Vec<Option<Endpoints>>>,
    closing: Closing,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTransport").field("root", &self.root).field("cores", &self.cores).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent, so a panic elsewhere does not matter.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The embedded transport (`local://PATH`).
///
/// ```no_run
/// use faust_transport::LocalTransport;
///
/// // Two cores; the engine then calls `attach_core` on each core's executor.
/// let transport = LocalTransport::open("/var/lib/my-app/topics", 2)?;
/// # Ok::<(), faust_transport::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct LocalTransport {
    shared: Arc<Shared>,
}

/// Checks a topic name the way Kafka does: 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
/// That also makes it a safe directory name.
pub fn validate_topic_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(Error::InvalidTopicName { name: name.to_string() }) }
}

impl LocalTransport {
    /// Opens (creating if needed) the transport directory `root` for a worker with `cores`
    /// cores. Fails with [`Error::DirectoryInUse`] while another process holds it.
    pub fn open(root: impl AsRef<Path>, cores: usize) -> Result<LocalTransport> {
        LocalTransport::open_with(root, cores, LocalOptions::default())
    }

    /// Like [`LocalTransport::open`], with `options`.
    pub fn open_with(root: impl AsRef<Path>, cores: usize, options: LocalOptions) -> Result<LocalTransport> {
        let root = root.as_ref().to_path_buf();
        if !(4096..=faust_storage::MAX_SEGMENT_BYTES).contains(&options.segment_bytes) {
            return Err(Error::InvalidUrl {
                url: format!("local://{}", root.display()),
                reason: format!(
                    "segment_bytes {} is outside 4096..={}",
                    options.segment_bytes,
                    faust_storage::MAX_SEGMENT_BYTES
                ),
            });
        }
        let cores = cores.max(1);
        std::fs::create_dir_all(&root).map_err(|e| io("create directory", &root, e))?;
        let lock = ProcessLock::acquire(&root)?;
        let topics = load_topics(&root)?;
        // Every group's offsets, for the transactions they committed.
        let mut committed = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(root.join(".groups")) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                // A damaged file is not an error here: reading the group's offsets reports it,
                // with its remedy, when the worker needs them.
                if let Some(group) = name.to_str().and_then(|n| n.strip_suffix(".offsets"))
                    && validate_topic_name(group).is_ok()
                {
                    let _ = load_group(&root, &mut committed, group);
                }
            }
        }
        let txns = crate::txn::TxnBook::new(committed.values().flat_map(|offsets| offsets.iter()));
        let mut endpoints: Vec<Option<Endpoints>> = (0..cores)
            .map(|_| Some(((0..cores).map(|_| None).collect(), (0..cores).map(|_| None).collect())))
            .collect();
        for from in 0..cores {
            for to in 0..cores {
                if from == to {
                    continue;
                }
                let (tx, rx) = shared_channel::new_bounded(CHANNEL_DEPTH);
                if let Some((senders, _)) = endpoints[from].as_mut() {
                    senders[to] = Some(tx);
                }
                if let Some((_, receivers)) = endpoints[to].as_mut() {
                    receivers[from] = Some(rx);
                }
            }
        }
        Ok(LocalTransport {
            shared: Arc::new(Shared {
                root,
                cores,
                options,
                _lock: lock,
                topics: RwLock::new(topics),
                committed: Mutex::new(committed),
                commit_version: AtomicU64::new(0),
                commit_written: Mutex::new(HashMap::new()),
                txns,
                owners: RwLock::new(HashMap::new()),
                owners_version: AtomicU64::new(0),
                endpoints: Mutex::new(endpoints),
                closing: Closing::default(),
            }),
        })
    }

    /// The transport's directory.
    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    /// Places partitions on cores: `tp` is appended to and read on `owners[tp]`. Partitions
    /// not named keep the default owner, `partition mod cores`. Call it before the cores
    /// touch those partitions (ownership does not move while a core has the log open).
    pub fn set_owners(&self, owners: impl IntoIterator<Item = (TopicPartition, usize)>) {
        let mut map = self.shared.owners.write().unwrap_or_else(|p| p.into_inner());
        for (tp, core) in owners {
            map.insert(tp, core % self.shared.cores);
        }
        self.shared.owners_version.fetch_add(1, Ordering::Release);
    }

    /// Fails every pending and later request with [`Error::Closed`] and ends membership.
    pub fn close(&self) {
        self.shared.closing.close();
    }

    fn topic_config(&self, name: &str) -> Option<TopicConfig> {
        self.shared.topics.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io { op, path: path.to_path_buf(), source }
}

/// A topic settings file's first line (files written before it had no such line).
const META_HEADER: &str = "faust-topic 2";

fn encode_meta(config: &TopicConfig) -> String {
    crate::checked_file::seal(&format!(
        "{META_HEADER}\npartitions={}\ncompacted={}\nretention_ms={}\nretention_bytes={}\n{}",
        config.partitions,
        config.compacted,
        config.retention.map(|d| d.as_millis().to_string()).unwrap_or_default(),
        config.retention_bytes.map(|b| b.to_string()).unwrap_or_default(),
        // Only when set: a file without it reads the same in builds that do not know it.
        config.delete_retention.map(|d| format!("delete_retention_ms={}\n", d.as_millis())).unwrap_or_default(),
    ))
}

/// What to do about a topic's settings file that is damaged along with its copy.
const META_REMEDY: &str = "restore it from a backup, or delete the topic's directory to create the topic again, empty";

fn decode_meta(text: &str, sealed: bool) -> std::result::Result<TopicConfig, Damage> {
    let bad = |what: &str| Damage(what.to_string());
    let mut config = TopicConfig::new(0);
    let mut lines = text.lines();
    if sealed && lines.next() != Some(META_HEADER) {
        return Err(bad(&format!("the first line is not `{META_HEADER}`")));
    }
    for line in lines {
        let (k, v) = line.split_once('=').ok_or_else(|| bad(&format!("line `{line}` is not `name=value`")))?;
        match k {
            "partitions" => config.partitions = v.parse().map_err(|_| bad("bad partition count"))?,
            "compacted" => {
                config.compacted = match v {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad("bad `compacted`")),
                }
            }
            "retention_ms" if v.is_empty() => {}
            "retention_ms" => {
                config.retention = Some(Duration::from_millis(v.parse().map_err(|_| bad("bad retention"))?))
            }
            "retention_bytes" if v.is_empty() => {}
            "retention_bytes" => config.retention_bytes = Some(v.parse().map_err(|_| bad("bad retention bytes"))?),
            "delete_retention_ms" => {
                config.delete_retention =
                    Some(Duration::from_millis(v.parse().map_err(|_| bad("bad delete retention"))?))
            }
            other => return Err(bad(&format!("unknown setting `{other}`"))),
        }
    }
    if config.partitions == 0 {
        return Err(bad("no partitions"));
    }
    Ok(config)
}

/// Reads a topic's settings, from the copy when the file is damaged (and then mends the file).
fn read_meta(path: &Path) -> Result<Option<TopicConfig>> {
    let Some((config, damage)) = crate::checked_file::read_with_fallback(path, META_REMEDY, decode_meta)? else {
        return Ok(None);
    };
    if let Some(damage) = damage {
        tracing::warn!(path = %path.display(), reason = %damage.0, "a topic's settings file is damaged; using its copy and mending it");
        crate::checked_file::write(path, encode_meta(&config).as_bytes(), crate::checked_file::Keep::Nothing)?;
    }
    Ok(Some(config))
}

/// Writes a topic's settings and a copy of them (see [`read_meta`]).
fn write_meta(path: &Path, config: &TopicConfig) -> Result<()> {
    crate::checked_file::write(path, encode_meta(config).as_bytes(), crate::checked_file::Keep::Copy)
}

fn load_topics(root: &Path) -> Result<HashMap<Arc<str>, TopicConfig>> {
    let mut topics = HashMap::new();
    for entry in std::fs::read_dir(root).map_err(|e| io("list", root, e))? {
        let entry = entry.map_err(|e| io("list", root, e))?;
        let meta = entry.path().join(TOPIC_META);
        let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
        if validate_topic_name(&name).is_err() || !entry.path().is_dir() {
            continue;
        }
        if let Some(config) = read_meta(&meta)? {
            topics.insert(Arc::from(name.as_str()), config);
        }
    }
    Ok(topics)
}

/// The exclusive lock on the transport directory, with the holder's pid in the file.
#[derive(Debug)]
struct ProcessLock {
    _file: std::fs::File,
}

impl ProcessLock {
    fn acquire(root: &Path) -> Result<ProcessLock> {
        let path = root.join(".lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io("open lock file", &path, e))?;
        // SAFETY: plain syscall on a valid descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim().to_string();
                return Err(Error::DirectoryInUse {
                    path: root.to_path_buf(),
                    holder: if holder.is_empty() { "unknown".into() } else { holder },
                });
            }
            return Err(io("lock", &path, err));
        }
        file.set_len(0).map_err(|e| io("write", &path, e))?;
        file.rewind().map_err(|e| io("write", &path, e))?;
        write!(file, "{}", std::process::id()).map_err(|e| io("write", &path, e))?;
        Ok(ProcessLock { _file: file })
    }
}

impl Transport for LocalTransport {
    type Core = LocalCore;
    type Membership = LocalMembership;

    async fn attach_core(&self, core: usize, cores: usize) -> Result<LocalCore> {
        if cores != self.shared.cores || core >= cores {
            return Err(Error::InvalidUrl {
                url: format!("local://{}", self.shared.root.display()),
                reason: format!(
                    "core {core} of {cores} attached to a transport opened for {} cores",
                    self.shared.cores
                ),
            });
        }
        let (senders, receivers) = lock(&self.shared.endpoints)[core].take().ok_or(Error::Closed)?;
        // Each end's `connect` waits for the other end's: start them all at once, or two cores
        // connecting their senders first would wait on each other forever.
        let senders: Vec<_> = senders.into_iter().map(|s| s.map(|s| glommio::spawn_local(s.connect()))).collect();
        let receivers: Vec<_> = receivers.into_iter().flatten().map(|r| glommio::spawn_local(r.connect())).collect();
        let mut connected = Vec::with_capacity(cores);
        for s in senders {
            connected.push(match s {
                Some(task) => Some(task.await),
                None => None,
            });
        }
        let local = LocalCore {
            transport: self.clone(),
            core,
            logs: Rc::new(RefCell::new(HashMap::new())),
            appended: Rc::new(Event::new()),
            senders: Rc::new(connected),
            owners: RefCell::new((u64::MAX, HashMap::new())),
            servers: RefCell::new(Vec::new()),
            stop: Rc::new(Stop::default()),
            compaction_horizons: RefCell::new(HashMap::new()),
            upkeep_cursor: std::cell::Cell::new(0),
        };
        for task in receivers {
            let rx = task.await;
            let server = glommio::spawn_local(serve_appends(rx, local.appender(), local.stop.clone()));
            local.servers.borrow_mut().push(server);
        }
        Ok(local)
    }

    fn membership(&self, _group: &str, join: &JoinRequest) -> Result<LocalMembership> {
        Ok(LocalMembership { transport: self.clone(), topics: join.topics.clone(), assigned: false })
    }
}

/// The part of a core that appends: what the appender tasks need.
struct Appender {
    transport: LocalTransport,
    logs: Rc<RefCell<HashMap<TopicPartition, Log>>>,
    appended: Rc<Event>,
}

/// Serves appends sent by one other core, until that core goes away or this one stops.
async fn serve_appends(rx: ConnectedReceiver<AppendRequest>, appender: Appender, stop: Rc<Stop>) {
    loop {
        let stopped = stop.event.listen();
        if stop.flag.get() {
            return;
        }
        let next = futures_lite::future::or(rx.recv(), async {
            stopped.await;
            None
        });
        let Some(req) = next.await else { return };
        let result = appender.append(&req.tp, req.batch);
        // The sender may have given up waiting; nothing to do then.
        let _ = req.reply.send(result);
    }
}

/// A core's stop signal for its own tasks.
#[derive(Default)]
struct Stop {
    flag: std::cell::Cell<bool>,
    event: Event,
}

impl Appender {
    fn append(&self, tp: &TopicPartition, mut batch: BatchBuilder) -> Result<Produced> {
        let result = (|| {
            let mut logs = self.logs.borrow_mut();
            let log = open_log(&self.transport, &mut logs, tp)?;
            log.append(&mut batch).map_err(|source| Error::Storage { tp: tp.clone(), source })
        })();
        match result {
            Ok(a) => {
                self.appended.notify(usize::MAX);
                Ok(Produced { partition: tp.partition, base_offset: a.base_offset, last_offset: a.last_offset })
            }
            Err(e) => Err(Error::Produce { tp: tp.clone(), batch: Box::new(batch), source: Box::new(e) }),
        }
    }
}

/// How a topic's partition logs are laid out and cleaned.
fn log_config(options: &LocalOptions, config: &TopicConfig) -> LogConfig {
    LogConfig {
        segment_bytes: options.segment_bytes,
        compact: config.compacted,
        retention: config.retention,
        retention_bytes: config.retention_bytes,
        delete_retention: config.delete_retention.unwrap_or(LogConfig::default().delete_retention),
        ..LogConfig::default()
    }
}

fn open_log<'a>(
    transport: &LocalTransport,
    logs: &'a mut HashMap<TopicPartition, Log>,
    tp: &TopicPartition,
) -> Result<&'a mut Log> {
    if !logs.contains_key(tp) {
        let config =
            transport.topic_config(&tp.topic).ok_or_else(|| Error::UnknownTopic { topic: tp.topic.to_string() })?;
        if tp.partition >= config.partitions {
            return Err(Error::UnknownPartition { tp: tp.clone() });
        }
        let dir = transport.shared.root.join(&*tp.topic).join(tp.partition.to_string());
        let log = Log::open(&dir, log_config(&transport.shared.options, &config))
            .map_err(|source| Error::Storage { tp: tp.clone(), source })?;
        logs.insert(tp.clone(), log);
    }
    logs.get_mut(tp).ok_or_else(|| Error::UnknownPartition { tp: tp.clone() })
}

/// One core's handle on the embedded transport.
pub struct LocalCore {
    transport: LocalTransport,
    core: usize,
    /// The logs of the partitions this core owns, opened on first use.
    logs: Rc<RefCell<HashMap<TopicPartition, Log>>>,
    /// Notified after every append on this core, to wake fetches.
    appended: Rc<Event>,
    /// Senders to each other core (`None` at this core's own index).
    senders: Rc<Vec<Option<ConnectedSender<AppendRequest>>>>,
    /// This core's copy of the owner map, with the version it was taken at.
    owners: RefCell<(u64, HashMap<TopicPartition, usize>)>,
    /// The tasks serving appends from other cores, and their stop signal.
    servers: RefCell<Vec<glommio::Task<()>>>,
    stop: Rc<Stop>,
    /// Per compacted partition: records at or past this offset take no part in compaction.
    compaction_horizons: RefCell<HashMap<TopicPartition, u64>>,
    /// Where the next [`LocalCore::maintain`] starts among the logs, so that every log gets
    /// its turn.
    upkeep_cursor: std::cell::Cell<usize>,
}

impl std::fmt::Debug for LocalCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCore").field("core", &self.core).finish()
    }
}

impl LocalCore {
    fn appender(&self) -> Appender {
        Appender { transport: self.transport.clone(), logs: self.logs.clone(), appended: self.appended.clone() }
    }

    /// This process's incarnation, for the tags of exactly-once records
    /// ([`TxnTag`](crate::TxnTag)).
    pub fn incarnation(&self) -> u64 {
        self.transport.shared.txns.incarnation()
    }

    /// The core that owns `tp`.
    pub fn owner(&self, tp: &TopicPartition) -> usize {
        let shared = &self.transport.shared;
        let version = shared.owners_version.load(Ordering::Acquire);
        let mut cache = self.owners.borrow_mut();
        if cache.0 != version {
            let map = shared.owners.read().unwrap_or_else(|p| p.into_inner());
            *cache = (version, map.clone());
        }
        cache.1.get(tp).copied().unwrap_or(tp.partition as usize % shared.cores)
    }

    fn check_open(&self) -> Result<()> {
        self.transport.shared.closing.check()
    }

    /// Repairs the log of `tp` after it was found damaged ([`Error::damaged_log`]): closes it
    /// if it is open, rewrites its damaged segments without the damaged batches (keeping the
    /// offsets of everything else, and the damaged originals in the partition's `damaged/`
    /// directory: see [`faust_storage::Log::repair`]), and opens it again. Runs on the core
    /// that owns `tp`. What was lost is in the report.
    pub fn repair(&self, tp: &TopicPartition) -> Result<faust_storage::RepairReport> {
        let owner = self.owner(tp);
        if owner != self.core {
            return Err(Error::NotOwner { tp: tp.clone(), core: self.core, owner });
        }
        let config = self
            .transport
            .topic_config(&tp.topic)
            .ok_or_else(|| Error::UnknownTopic { topic: tp.topic.to_string() })?;
        if tp.partition >= config.partitions {
            return Err(Error::UnknownPartition { tp: tp.clone() });
        }
        let mut logs = self.logs.borrow_mut();
        // Synced first, so that everything it took (and may have handed out) counts as durable:
        // damage anywhere below its end is then repaired as a gap, never cut as a torn tail
        // that would move the end back. Records handed out before keep their mapping; the
        // files are replaced underneath.
        if let Some(mut log) = logs.remove(tp)
            && let Err(e) = log.sync()
        {
            tracing::warn!(partition = %tp, error = %e, "syncing a damaged log before its repair failed");
        }
        let dir = self.transport.shared.root.join(&*tp.topic).join(tp.partition.to_string());
        let report = faust_storage::Log::repair(&dir, log_config(&self.transport.shared.options, &config))
            .map_err(|source| Error::Storage { tp: tp.clone(), source })?;
        open_log(&self.transport, &mut logs, tp)?;
        Ok(report)
    }

    /// Records of `tp` at or past `offset` take no part in its compaction from now on (and
    /// until the next call): for a table's changelog, its committed end offset, since records
    /// past it may be rolled back and must never replace a committed one. A compacted
    /// partition with no horizon is compacted up to its active segment, as Kafka does.
    pub fn set_compaction_horizon(&self, tp: &TopicPartition, offset: u64) {
        self.compaction_horizons.borrow_mut().insert(tp.clone(), offset);
    }

    /// Deletes the segments of `tp` that hold only records below `offset` (Kafka's
    /// `DeleteRecords`, by whole segments; the active segment stays), for a topic whose
    /// consumers committed past them. Returns the bytes freed. Runs on the core that owns
    /// `tp`.
    pub fn delete_records_below(&self, tp: &TopicPartition, offset: u64) -> Result<u64> {
        self.check_open()?;
        self.with_log(tp, |log| {
            log.delete_below(offset)
                .map(|out| out.bytes_deleted)
                .map_err(|source| Error::Storage { tp: tp.clone(), source })
        })
    }

    /// Does a bounded step of upkeep on the logs this core has open: deletes the segments
    /// that fall outside a topic's retention (age, then size) and does about `budget_bytes`
    /// of compaction on one compacted log (see [`faust_storage::Log::compact_step`]).
    /// Returns whether more compaction is waiting (call again soon); errors name the
    /// partition, and the next call moves on to the next log.
    pub fn maintain(&self, budget_bytes: usize) -> Result<bool> {
        self.check_open()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut logs = self.logs.borrow_mut();
        let mut tps: Vec<TopicPartition> = logs.keys().cloned().collect();
        tps.sort();
        let count = tps.len();
        let start = self.upkeep_cursor.get() % count.max(1);
        for i in 0..count {
            let at = (start + i) % count;
            let tp = &tps[at];
            let Some(log) = logs.get_mut(tp) else { continue };
            let storage = |source| Error::Storage { tp: tp.clone(), source };
            let config = log.config();
            if (config.retention.is_some() || config.retention_bytes.is_some())
                && let Err(e) = log.enforce_retention(now)
            {
                self.upkeep_cursor.set(at + 1);
                return Err(storage(e));
            }
            if log.config().compact {
                let horizon = self.compaction_horizons.borrow().get(tp).copied().unwrap_or(u64::MAX);
                match log.compact_step(now, horizon.min(log.high_watermark()), budget_bytes) {
                    Ok(CompactionProgress::Working) => {
                        self.upkeep_cursor.set(at);
                        return Ok(true);
                    }
                    Ok(CompactionProgress::Idle) => {}
                    Err(e) => {
                        self.upkeep_cursor.set(at + 1);
                        return Err(storage(e));
                    }
                }
            }
        }
        Ok(false)
    }

    fn with_log<T>(&self, tp: &TopicPartition, f: impl FnOnce(&mut Log) -> Result<T>) -> Result<T> {
        let owner = self.owner(tp);
        if owner != self.core {
            return Err(Error::NotOwner { tp: tp.clone(), core: self.core, owner });
        }
        let mut logs = self.logs.borrow_mut();
        f(open_log(&self.transport, &mut logs, tp)?)
    }
}

impl CoreTransport for LocalCore {
    async fn create_topic(&self, name: &str, config: &TopicConfig) -> Result<TopicMetadata> {
        validate_topic_name(name)?;
        if config.partitions == 0 {
            return Err(Error::PartitionMismatch { topic: name.to_string(), existing: 0, requested: 0 });
        }
        let shared = &self.transport.shared;
        let mut topics = shared.topics.write().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = topics.get(name) {
            if existing.partitions != config.partitions {
                return Err(Error::PartitionMismatch {
                    topic: name.to_string(),
                    existing: existing.partitions,
                    requested: config.partitions,
                });
            }
            return Ok(TopicMetadata { name: Arc::from(name), config: existing.clone() });
        }
        let dir = shared.root.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| io("create directory", &dir, e))?;
        write_meta(&dir.join(TOPIC_META), config)?;
        topics.insert(Arc::from(name), config.clone());
        Ok(TopicMetadata { name: Arc::from(name), config: config.clone() })
    }

    async fn topic_metadata(&self, name: &str) -> Result<Option<TopicMetadata>> {
        Ok(self.transport.topic_config(name).map(|config| TopicMetadata { name: Arc::from(name), config }))
    }

    /// The topics in the shared map. It is complete: [`LocalTransport::open`] loads every
    /// topic directory already on disk (those an earlier process created), and while this
    /// process holds the directory's lock no other can add one, so every later topic goes
    /// through [`create_topic`](CoreTransport::create_topic) and into the map.
    async fn topic_names(&self) -> Result<Vec<String>> {
        let topics = self.transport.shared.topics.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> =
            topics.keys().filter(|name| !crate::is_internal_topic(name)).map(|name| name.to_string()).collect();
        names.sort_unstable();
        Ok(names)
    }

    async fn produce(&self, tp: &TopicPartition, batch: BatchBuilder) -> Result<Produced> {
        if let Err(e) = self.check_open() {
            return Err(Error::Produce { tp: tp.clone(), batch: Box::new(batch), source: Box::new(e) });
        }
        let owner = self.owner(tp);
        if owner == self.core {
            return self.appender().append(tp, batch);
        }
        let Some(Some(sender)) = self.senders.get(owner) else {
            return Err(Error::Produce { tp: tp.clone(), batch: Box::new(batch), source: Box::new(Error::Closed) });
        };
        let (reply, response) = oneshot::channel();
        if let Err(e) = sender.send(AppendRequest { tp: tp.clone(), batch, reply }).await {
            // The channel hands the request back when it is closed; keep the batch.
            let batch = match e {
                GlommioError::Closed(ResourceType::Channel(req))
                | GlommioError::WouldBlock(ResourceType::Channel(req)) => req.batch,
                _ => BatchBuilder::new(),
            };
            return Err(Error::Produce { tp: tp.clone(), batch: Box::new(batch), source: Box::new(Error::Closed) });
        }
        // The owner always replies unless its executor is gone; then the batch is lost with it,
        // which only happens when the worker is shutting down.
        response.await.unwrap_or(Err(Error::Closed))
    }

    async fn fetch(&self, tp: &TopicPartition, offset: u64, max_bytes: usize, max_wait: Duration) -> Result<Fetched> {
        let deadline = std::time::Instant::now() + max_wait;
        let txns = &self.transport.shared.txns;
        // Armed once a read stopped behind an open transaction (a commit is what moves it on);
        // reads that never meet one pay for no listener.
        let mut committing = None;
        loop {
            self.check_open()?;
            let listener = self.appended.listen();
            let mut held = false;
            let fetched = self.with_log(tp, |log| {
                let batches = log.read(offset, max_bytes).map_err(|e| match e {
                    faust_storage::Error::OffsetOutOfRange { requested, earliest, high_watermark, .. } => {
                        Error::OffsetOutOfRange { tp: tp.clone(), requested, earliest, high_watermark }
                    }
                    source => Error::Storage { tp: tp.clone(), source },
                })?;
                let mut records = Vec::with_capacity(batches.iter().map(|b| b.record_count()).sum());
                let mut next_offset = offset;
                'batches: for b in &batches {
                    for record in b.records_from(offset) {
                        // Records of transactions: only committed ones are read (`txn.rs`).
                        match crate::txn::TxnTag::of(&record).map(|tag| txns.visibility(&tag)) {
                            None | Some(crate::txn::Visibility::Visible) => records.push(record),
                            Some(crate::txn::Visibility::Aborted) => {}
                            Some(crate::txn::Visibility::Open) => {
                                next_offset = record.offset;
                                held = true;
                                break 'batches;
                            }
                        }
                    }
                    next_offset = b.last_offset() + 1;
                }
                Ok(Fetched { records, next_offset, high_watermark: log.high_watermark() })
            })?;
            // A batch made only of offsets below `offset` cannot happen (reads start at the batch
            // holding it), so no records means nothing new yet.
            let now = std::time::Instant::now();
            if !fetched.records.is_empty() || fetched.next_offset > offset || now >= deadline {
                return Ok(fetched);
            }
            // Behind an open transaction, its commit is what lets the read go on: listen for
            // it, then read once more (it may have come before the listener), then wait.
            if held {
                match committing.take() {
                    None => committing = Some(txns.moved.listen()),
                    Some(commit) => {
                        futures_lite::future::or(commit, glommio::timer::sleep(deadline - now)).await;
                        committing = Some(txns.moved.listen());
                    }
                }
            } else {
                futures_lite::future::or(listener, glommio::timer::sleep(deadline - now)).await;
            }
        }
    }

    async fn list_offset(&self, tp: &TopicPartition, spec: OffsetSpec) -> Result<u64> {
        self.with_log(tp, |log| match spec {
            OffsetSpec::Earliest => Ok(log.earliest_offset()),
            OffsetSpec::Latest => Ok(log.high_watermark()),
            OffsetSpec::Timestamp(ts) => {
                let mut next = log.earliest_offset();
                while next < log.high_watermark() {
                    let batches =
                        log.read(next, 1 << 20).map_err(|source| Error::Storage { tp: tp.clone(), source })?;
                    for b in &batches {
                        if b.max_timestamp() >= ts
                            && let Some(r) = b.records_from(next).find(|r| r.timestamp >= ts)
                        {
                            return Ok(r.offset);
                        }
                        next = b.last_offset() + 1;
                    }
                }
                Ok(log.high_watermark())
            }
        })
    }

    /// One worker owns a `local://` directory, so there is no one to fence: `fence` is ignored.
    async fn commit(&self, group: &str, _fence: Option<&Fence>, offsets: &[(TopicPartition, u64)]) -> Result<()> {
        validate_topic_name(group).map_err(|_| Error::InvalidGroupName { group: group.to_string() })?;
        let shared = &self.transport.shared;
        let (text, version) = {
            let mut all = lock(&shared.committed);
            let committed = load_group(&shared.root, &mut all, group)?;
            for (tp, offset) in offsets {
                committed.insert(tp.clone(), *offset);
            }
            (encode_offsets(committed), shared.commit_version.fetch_add(1, Ordering::AcqRel) + 1)
        };
        // The fsyncs take milliseconds: they run on the executor's blocking thread, so the
        // core keeps processing (and its latency stays flat) while the file is written.
        let (shared, group) = (shared.clone(), group.to_string());
        let txns = self.transport.shared.clone();
        glommio::executor()
            .spawn_blocking(move || {
                let mut written = lock(&shared.commit_written);
                if written.get(&group).is_some_and(|&w| w >= version) {
                    return Ok(()); // A newer state (which includes this one) is on disk.
                }
                let dir = shared.root.join(".groups");
                std::fs::create_dir_all(&dir).map_err(|e| io("create directory", &dir, e))?;
                let path = dir.join(format!("{group}.offsets"));
                crate::checked_file::write(&path, text.as_bytes(), crate::checked_file::Keep::Previous)?;
                written.insert(group, version);
                Ok(())
            })
            .await?;
        // Durable: the transactions it commits become visible.
        txns.txns.committed(offsets);
        Ok(())
    }

    async fn committed(&self, group: &str, partitions: &[TopicPartition]) -> Result<Vec<Option<u64>>> {
        validate_topic_name(group).map_err(|_| Error::InvalidGroupName { group: group.to_string() })?;
        let shared = &self.transport.shared;
        let mut all = lock(&shared.committed);
        let committed = load_group(&shared.root, &mut all, group)?;
        Ok(partitions.iter().map(|tp| committed.get(tp).copied()).collect())
    }

    /// Stops serving appends from other cores and closes this core's logs (after syncing
    /// them), so the directory can be opened again once every core has shut down.
    async fn shutdown(self) -> Result<()> {
        self.stop.flag.set(true);
        self.stop.event.notify(usize::MAX);
        let servers = std::mem::take(&mut *self.servers.borrow_mut());
        for server in servers {
            server.await;
        }
        let mut logs = std::mem::take(&mut *self.logs.borrow_mut());
        for (tp, log) in logs.iter_mut() {
            log.sync().map_err(|source| Error::Storage { tp: tp.clone(), source })?;
        }
        Ok(())
    }
}

/// The committed offsets file's first line (files written before it had no such line).
const OFFSETS_HEADER: &str = "faust-offsets 2";
/// What to do about a group's offsets file that is damaged along with its previous copy.
const OFFSETS_REMEDY: &str = "delete it and its .prev copy to process every source again from its earliest offset (the tables are rebuilt to match)";

fn encode_offsets(committed: &BTreeMap<TopicPartition, u64>) -> String {
    let mut text = format!("{OFFSETS_HEADER}\n");
    for (tp, offset) in committed {
        text.push_str(&format!("{}\t{}\t{}\n", tp.topic, tp.partition, offset));
    }
    crate::checked_file::seal(&text)
}

fn decode_offsets(text: &str, sealed: bool) -> std::result::Result<BTreeMap<TopicPartition, u64>, Damage> {
    let mut lines = text.lines().peekable();
    if sealed && lines.next() != Some(OFFSETS_HEADER) {
        return Err(Damage(format!("the first line is not `{OFFSETS_HEADER}`")));
    }
    let mut map = BTreeMap::new();
    for line in lines {
        let mut parts = line.split('\t');
        let parsed = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(t), Some(p), Some(o), None) if validate_topic_name(t).is_ok() => {
                p.parse::<u32>().ok().zip(o.parse::<u64>().ok()).map(|(p, o)| (TopicPartition::new(t, p), o))
            }
            _ => None,
        };
        let (tp, offset) =
            parsed.ok_or_else(|| Damage(format!("line `{line}` is not `topic<TAB>partition<TAB>offset`")))?;
        map.insert(tp, offset);
    }
    Ok(map)
}

fn load_group<'a>(
    root: &Path,
    all: &'a mut HashMap<String, BTreeMap<TopicPartition, u64>>,
    group: &str,
) -> Result<&'a mut BTreeMap<TopicPartition, u64>> {
    if !all.contains_key(group) {
        let path = root.join(".groups").join(format!("{group}.offsets"));
        let map = match crate::checked_file::read_with_fallback(&path, OFFSETS_REMEDY, decode_offsets)? {
            None => BTreeMap::new(),
            Some((map, None)) => map,
            Some((map, Some(damage))) => {
                // The previous commit is a complete, consistent state: the events after it are
                // processed again and the tables recovered to match it.
                tracing::warn!(path = %path.display(), reason = %damage.0,
                    "the committed offsets file is damaged; using the previous commit from its .prev copy (events since then are processed again)");
                map
            }
        };
        all.insert(group.to_string(), map);
    }
    all.get_mut(group).ok_or(Error::Closed)
}

/// Membership of the one worker of a `local://` transport: every partition of the subscribed
/// topics, at once.
#[derive(Debug)]
pub struct LocalMembership {
    transport: LocalTransport,
    topics: Vec<String>,
    assigned: bool,
}

impl Membership for LocalMembership {
    async fn next_event(&mut self) -> Result<AssignmentEvent> {
        if !self.assigned {
            self.assigned = true;
            let mut partitions = Vec::new();
            for name in &self.topics {
                let config =
                    self.transport.topic_config(name).ok_or_else(|| Error::UnknownTopic { topic: name.clone() })?;
                partitions.extend((0..config.partitions).map(|p| TopicPartition::new(name.as_str(), p)));
            }
            return Ok(AssignmentEvent::Assigned { generation: 1, partitions });
        }
        self.transport.shared.closing.wait().await;
        Err(Error::Closed)
    }

    async fn revoked(&mut self, _generation: u64) -> Result<()> {
        Ok(())
    }

    fn member_id(&self) -> Option<Arc<str>> {
        None
    }

    async fn leave(&mut self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A topic's settings file keeps every setting, the tombstone retention included, and a
    /// file written without it reads as the default.
    #[test]
    fn topic_settings_survive_their_file() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("meta");
        let config = TopicConfig {
            compacted: true,
            retention: Some(Duration::from_secs(60)),
            retention_bytes: Some(1 << 20),
            delete_retention: Some(Duration::from_secs(5)),
            ..TopicConfig::new(3)
        };
        write_meta(&path, &config).expect("write");
        assert_eq!(read_meta(&path).expect("read"), Some(config));
        write_meta(&path, &TopicConfig::new(2).compacted()).expect("write");
        assert_eq!(read_meta(&path).expect("read").and_then(|c| c.delete_retention), None);
        assert_eq!(
            log_config(&LocalOptions::default(), &TopicConfig::new(1)).delete_retention,
            LogConfig::default().delete_retention
        );
    }

    /// Topics created by an earlier opening of the directory (standing in for an earlier
    /// process) are listed by a transport opened later on it, which loads them from disk at
    /// open; sorted, and without internal ones.
    #[test]
    fn topic_names_lists_the_topics_already_on_disk() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let root = dir.path().to_path_buf();
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let first = LocalTransport::open(&root, 1).expect("open");
                let core = first.attach_core(0, 1).await.expect("attach");
                core.create_topic("orders-eu", &TopicConfig::new(2)).await.expect("create");
                core.create_topic("orders-us", &TopicConfig::new(1)).await.expect("create");
                core.create_topic("__internal", &TopicConfig::new(1)).await.expect("create");
                assert_eq!(core.topic_names().await.expect("names"), ["orders-eu", "orders-us"]);
                core.shutdown().await.expect("shutdown");
                drop(first); // Releases the directory's lock.

                let second = LocalTransport::open(&root, 1).expect("open again");
                let core = second.attach_core(0, 1).await.expect("attach");
                assert_eq!(core.topic_names().await.expect("names"), ["orders-eu", "orders-us"]);
                core.shutdown().await.expect("shutdown");
            })
            .expect("executor")
            .join()
            .expect("join");
    }
}
