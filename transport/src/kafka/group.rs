//! Consumer-group membership on Kafka: the classic group protocol (FindCoordinator, JoinGroup,
//! SyncGroup, Heartbeat, LeaveGroup) run by a thread of its own per member, so that a busy
//! core never delays a heartbeat, with our assignor (`assignor.rs`) on the leader.
//!
//! # From the group protocol to the engine's events
//!
//! After each SyncGroup the member compares what it was granted with what it owns:
//! partitions it owns and was not granted are *revoked* ([`AssignmentEvent::Revoked`]; the
//! engine stops them, commits and confirms with [`Membership::revoked`]), and partitions
//! granted that it did not own are *assigned*. Once a revoke is confirmed, the member drops
//! those partitions from what it owns and rejoins at once: in that generation nobody owns
//! them, and the leader grants them to their target. The first SyncGroup always gives an
//! `Assigned` event (possibly empty), so a worker can wait for "I am in".
//!
//! While a revoke is under way the member keeps heartbeating, and rejoins whenever the group
//! rebalances, reporting the partitions being revoked as still owned (they are, until the
//! engine confirms): nobody else can be granted them meanwhile.
//!
//! # Losing the partitions
//!
//! A heartbeat, JoinGroup or SyncGroup answered with `UNKNOWN_MEMBER_ID`, `ILLEGAL_GENERATION`
//! or `FENCED_INSTANCE_ID` means the group went on without this member (it missed its session
//! timeout, or another process took its static instance id): its partitions may already be
//! someone else's. The member is then *fenced*: [`Membership::next_event`] fails with
//! [`Error::Fenced`] (the engine drops everything uncommitted and joins again with a new
//! membership), and every commit made under it is refused before it reaches the broker.
//!
//! # Commits
//!
//! Commits carry the member id and generation the member holds *now* ([`Live`]), not those of
//! the engine's fence: the group's generation moves on every rebalance, also when this
//! member's partitions do not change, and Kafka refuses a commit of an older generation once
//! the new one is formed.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use futures_lite::StreamExt;
use kafka_protocol::messages::{
    ApiKey, FindCoordinatorRequest, GroupId, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, MetadataRequest,
    SyncGroupRequest, join_group_request::JoinGroupRequestProtocol, leave_group_request::MemberIdentity,
    metadata_request::MetadataRequestTopic, sync_group_request::SyncGroupRequestAssignment,
};
use kafka_protocol::protocol::StrBytes;

use super::assignor::{self, Joined, MemberData, PROTOCOL, PROTOCOL_TYPE};
use super::blocking::BlockingConn;
use super::{Shared, topic_name};
use crate::error::{Error, Result};
use crate::types::{AssignmentEvent, JoinRequest, TopicPartition};

/// Kafka error codes of the group protocol.
mod code {
    pub(super) const ILLEGAL_GENERATION: i16 = 22;
    pub(super) const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
    pub(super) const UNKNOWN_MEMBER_ID: i16 = 25;
    pub(super) const REBALANCE_IN_PROGRESS: i16 = 27;
    pub(super) const MEMBER_ID_REQUIRED: i16 = 79;
    pub(super) const FENCED_INSTANCE_ID: i16 = 82;
}

/// Whether `code` says the group went on without this member.
pub(crate) fn code_means_lost(code: i16) -> bool {
    matches!(code, code::ILLEGAL_GENERATION | code::UNKNOWN_MEMBER_ID | code::FENCED_INSTANCE_ID)
}

/// Whether `code` says a rebalance is under way (commit again once it is done).
pub(crate) fn code_means_rebalancing(code: i16) -> bool {
    code == code::REBALANCE_IN_PROGRESS
}

/// What the cores need of a member to commit under it: its ids and generation now.
#[derive(Debug, Clone)]
pub(crate) struct LiveMember {
    /// The engine's name for the membership (its fence's member).
    pub(crate) handle: Arc<str>,
    /// The coordinator's member id ("" before the first JoinGroup answer).
    pub(crate) member_id: String,
    /// The generation of the latest SyncGroup (-1 before).
    pub(crate) generation: i32,
    /// The static instance id, if any.
    pub(crate) instance_id: Option<String>,
    /// Why the member is fenced, once it is.
    pub(crate) fenced: Option<String>,
    /// Until when the coordinator surely still counts the member in (see [`LEASE`]); `None`
    /// while it is joining (a member waiting in a JoinGroup does not expire).
    pub(crate) lease_until: Option<Instant>,
}

/// The part of the session timeout, counted from when a heartbeat that was answered was
/// *sent*, during which the member may commit: the coordinator started its own session
/// timer later (when the heartbeat reached it), so the member stops writing before the group
/// can give its partitions to another, with a margin for a write in flight.
const LEASE: (u32, u32) = (3, 4);

/// Every member's URL with the partitions an assignment heads to it.
pub(crate) type Owners = Vec<(String, Vec<TopicPartition>)>;

/// Why a member may not commit.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    /// Why, in words.
    pub(crate) reason: String,
    /// Only for now: its lease ran out, and the member's thread is still trying to reach the
    /// coordinator (a commit may wait for it). Otherwise the member is out of the group.
    pub(crate) for_now: bool,
}

/// The live members of this process, by group.
#[derive(Debug, Default)]
pub(crate) struct Live {
    by_group: Mutex<HashMap<String, LiveMember>>,
    /// Topics a member of this process found on the broker (one gone later was lost).
    topics_seen: Mutex<std::collections::HashSet<String>>,
    /// Per group, every member's URL with the partitions the latest assignment heads to it.
    owners: Mutex<HashMap<String, Owners>>,
}

impl Live {
    /// The member committing as `handle` in `group`, or why it may not (now).
    pub(crate) fn member(&self, group: &str, handle: &str) -> std::result::Result<LiveMember, Refusal> {
        let map = self.by_group.lock().unwrap_or_else(|p| p.into_inner());
        let fenced = |reason: String| Refusal { reason, for_now: false };
        match map.get(group) {
            Some(m) if &*m.handle != handle => {
                Err(fenced("this membership was replaced (the worker joined the group again)".to_string()))
            }
            Some(LiveMember { fenced: Some(reason), .. }) => Err(fenced(reason.clone())),
            Some(LiveMember { lease_until: Some(until), .. }) if *until <= Instant::now() => Err(Refusal {
                reason: "no heartbeat was answered for most of the session timeout: the group may have given this worker's partitions away"
                    .to_string(),
                for_now: true,
            }),
            Some(m) => Ok(m.clone()),
            None => Err(fenced("not a member of the group (it left)".to_string())),
        }
    }

    /// Every member's URL with its partitions, as the latest assignment of `group` said.
    pub(crate) fn owners(&self, group: &str) -> Owners {
        self.owners.lock().unwrap_or_else(|p| p.into_inner()).get(group).cloned().unwrap_or_default()
    }

    fn saw_topics<'a>(&self, topics: impl Iterator<Item = &'a String>) {
        self.topics_seen.lock().unwrap_or_else(|p| p.into_inner()).extend(topics.cloned());
    }

    fn had_topic(&self, topic: &str) -> bool {
        self.topics_seen.lock().unwrap_or_else(|p| p.into_inner()).contains(topic)
    }

    /// Changes `handle`'s entry of `group` (not a newer membership's that replaced it).
    fn update(&self, group: &str, handle: &str, f: impl FnOnce(&mut LiveMember)) {
        let mut map = self.by_group.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = map.get_mut(group).filter(|m| &*m.handle == handle) {
            f(m);
        }
    }

    fn insert(&self, group: &str, member: LiveMember) {
        self.by_group.lock().unwrap_or_else(|p| p.into_inner()).insert(group.to_string(), member);
    }

    /// Forgets `handle`'s membership of `group` (it left or stopped).
    fn remove(&self, group: &str, handle: &str) {
        let mut map = self.by_group.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(group).is_some_and(|m| &*m.handle == handle) {
            map.remove(group);
        }
    }
}

/// How long a follower waits after its JoinGroup answer before its SyncGroup.
const FOLLOWER_SYNC_DELAY: Duration = Duration::from_millis(30);

/// What the engine asks of the member's thread.
enum Command {
    /// The revokes of this generation and earlier are done.
    Confirm(u64),
    /// Leave the group (unless static), then stop; the sender hears when it is done.
    Leave(Sender<Result<()>>),
}

/// The engine's side of one member: its events and a line to its thread.
pub(crate) struct GroupMember {
    handle: Arc<str>,
    group: String,
    commands: Sender<Command>,
    events: UnboundedReceiver<Result<AssignmentEvent>>,
    thread: Option<JoinHandle<()>>,
    live: Arc<Shared>,
}

impl std::fmt::Debug for GroupMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupMember").field("group", &self.group).field("handle", &self.handle).finish()
    }
}

/// Numbers the memberships of this process (their handles must never repeat).
static NEXT_HANDLE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl GroupMember {
    /// Starts a member of `group` that takes `join`'s topics.
    pub(crate) fn start(shared: Arc<Shared>, group: &str, join: &JoinRequest) -> Result<GroupMember> {
        let n = NEXT_HANDLE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let handle: Arc<str> = Arc::from(format!("{}-{}-{n}", shared.options.client_id, std::process::id()));
        let (commands, command_rx) = std::sync::mpsc::channel();
        let (event_tx, events) = unbounded();
        shared.live.insert(
            group,
            LiveMember {
                handle: handle.clone(),
                member_id: String::new(),
                generation: -1,
                instance_id: shared.options.group_instance_id.clone(),
                fenced: None,
                lease_until: None,
            },
        );
        let mut thread = MemberThread {
            shared: shared.clone(),
            group: group.to_string(),
            join: join.clone(),
            handle: handle.clone(),
            commands: command_rx,
            events: event_tx,
            coordinator: None,
            member_id: String::new(),
            generation: -1,
            owned: BTreeSet::new(),
            revoking: HashMap::new(),
            standbys: Vec::new(),
            pending_standbys: None,
            joined_once: false,
            rejoin: true,
            next_heartbeat: Instant::now(),
        };
        let name = format!("{}-group", group.chars().take(8).collect::<String>());
        let thread = std::thread::Builder::new().name(name).spawn(move || thread.run()).map_err(|source| {
            Error::Io { op: "start the group member's thread", path: std::path::PathBuf::new(), source }
        })?;
        Ok(GroupMember { handle, group: group.to_string(), commands, events, thread: Some(thread), live: shared })
    }

    /// The membership's name in fences.
    pub(crate) fn handle(&self) -> &Arc<str> {
        &self.handle
    }

    /// The next event from the member's thread.
    pub(crate) async fn next_event(&mut self) -> Result<AssignmentEvent> {
        match self.events.next().await {
            Some(event) => event,
            None => Err(Error::Closed),
        }
    }

    /// Confirms the revokes of `generation` and earlier.
    pub(crate) fn confirm(&self, generation: u64) -> Result<()> {
        if let Err(refusal) = self.live.live.member(&self.group, &self.handle)
            && !refusal.for_now
        {
            let reason = refusal.reason;
            return Err(Error::Fenced { group: self.group.clone(), member: self.handle.to_string(), tp: None, reason });
        }
        // A thread that ended (fenced, closed) no longer needs confirmations.
        let _ = self.commands.send(Command::Confirm(generation));
        Ok(())
    }

    /// Leaves the group and waits (bounded) for the thread to end.
    pub(crate) fn leave(&mut self) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.commands.send(Command::Leave(tx)).is_ok() {
            // The thread may be inside a JoinGroup the broker holds for a while.
            let bound = self.live.options.rebalance_timeout + self.live.options.request_timeout;
            match rx.recv_timeout(bound) {
                Ok(result) => result?,
                Err(_) => tracing::warn!(group = %self.group, "the group member's thread did not leave in time"),
            }
        }
        if let Some(thread) = self.thread.take()
            && thread.is_finished()
        {
            let _ = thread.join();
        }
        Ok(())
    }
}

impl Drop for GroupMember {
    fn drop(&mut self) {
        // Dropping the command line ends the thread at its next step; it is not waited for.
        self.live.live.remove(&self.group, &self.handle);
    }
}

/// Why one round of the protocol did not complete.
enum Step {
    /// Try again after a pause (a broker away, a coordinator moving, a rebalance restarting).
    Retry(Error),
    /// The group went on without this member.
    Lost(String),
    /// Nothing more can be done (a misconfiguration): the worker stops with this error.
    Fatal(Error),
    /// The transport closed, or the engine went away.
    Stop,
}

struct MemberThread {
    shared: Arc<Shared>,
    group: String,
    join: JoinRequest,
    handle: Arc<str>,
    commands: Receiver<Command>,
    events: UnboundedSender<Result<AssignmentEvent>>,
    /// The connection to the group's coordinator, once found.
    coordinator: Option<BlockingConn>,
    member_id: String,
    generation: i32,
    /// Partitions this member owns, including those being revoked.
    owned: BTreeSet<TopicPartition>,
    /// Partitions being revoked, with the generation of their revoke.
    revoking: HashMap<TopicPartition, u64>,
    /// The standby partitions of the latest assignment, sorted.
    standbys: Vec<TopicPartition>,
    /// A change of the standbys, given to the engine after the round's other events.
    pending_standbys: Option<AssignmentEvent>,
    /// Whether the first assignment was given to the engine.
    joined_once: bool,
    /// Whether the member must (re)join before its next heartbeat.
    rejoin: bool,
    next_heartbeat: Instant,
}

impl MemberThread {
    fn run(&mut self) {
        let mut backoff = self.shared.options.retry_backoff;
        let mut failing_since: Option<Instant> = None;
        loop {
            if self.shared.closing.is_closed() {
                return self.stop();
            }
            let wait = if self.rejoin {
                Duration::ZERO
            } else {
                self.next_heartbeat.saturating_duration_since(Instant::now())
            };
            match self.commands.recv_timeout(wait) {
                Ok(Command::Confirm(generation)) => {
                    let done: Vec<TopicPartition> =
                        self.revoking.iter().filter(|(_, g)| **g <= generation).map(|(tp, _)| tp.clone()).collect();
                    for tp in &done {
                        self.revoking.remove(tp);
                        self.owned.remove(tp);
                    }
                    // Rejoin, so that the group gives them to their new owners.
                    if !done.is_empty() {
                        self.rejoin = true;
                    }
                    continue;
                }
                Ok(Command::Leave(reply)) => {
                    let result = self.leave();
                    let _ = reply.send(result);
                    return self.stop();
                }
                Err(RecvTimeoutError::Disconnected) => return self.stop(),
                Err(RecvTimeoutError::Timeout) => {}
            }
            let result = if self.rejoin { self.join_and_sync() } else { self.heartbeat() };
            match result {
                Ok(()) => {
                    backoff = self.shared.options.retry_backoff;
                    failing_since = None;
                }
                Err(Step::Retry(e)) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    tracing::warn!(group = %self.group, error = %e, failing_ms = since.elapsed().as_millis() as u64,
                        "group request failed; retrying");
                    self.coordinator = None;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(Step::Lost(reason)) => {
                    tracing::warn!(group = %self.group, member = %self.member_id, %reason, "the group went on without this member");
                    self.shared.live.update(&self.group, &self.handle, |m| m.fenced = Some(reason.clone()));
                    let _ = self.events.unbounded_send(Err(Error::Fenced {
                        group: self.group.clone(),
                        member: self.member_id.clone(),
                        tp: None,
                        reason,
                    }));
                    return;
                }
                Err(Step::Fatal(e)) => {
                    self.shared.live.update(&self.group, &self.handle, |m| m.fenced = Some(e.to_string()));
                    let _ = self.events.unbounded_send(Err(e));
                    return;
                }
                Err(Step::Stop) => return self.stop(),
            }
        }
    }

    fn stop(&mut self) {
        self.shared.live.remove(&self.group, &self.handle);
    }

    fn options(&self) -> &super::KafkaOptions {
        &self.shared.options
    }

    /// The coordinator's connection, found and opened if needed.
    fn coordinator(&mut self) -> std::result::Result<&mut BlockingConn, Step> {
        if self.coordinator.is_none() {
            let opts = &self.shared.options;
            let mut last = None;
            let mut found = None;
            for broker in &self.shared.bootstrap {
                match BlockingConn::connect(broker, &opts.client_id, opts.request_timeout, &self.shared.security) {
                    Ok(mut conn) => {
                        let req = FindCoordinatorRequest::default()
                            .with_key(StrBytes::from_string(self.group.clone()))
                            .with_key_type(0);
                        match conn.request(ApiKey::FindCoordinator, &req, opts.request_timeout) {
                            Ok((_, resp)) if resp.error_code == 0 => {
                                found = Some(format!("{}:{}", resp.host.as_str(), resp.port));
                                break;
                            }
                            Ok((_, resp)) => {
                                let message = resp.error_message.map(|m| m.to_string());
                                last = Some(conn.broker_error(ApiKey::FindCoordinator, resp.error_code, message));
                            }
                            Err(e) => last = Some(e),
                        }
                    }
                    Err(e) => last = Some(e),
                }
            }
            let Some(addr) = found else { return Err(Step::Retry(last.unwrap_or(Error::Closed))) };
            let conn = BlockingConn::connect(&addr, &opts.client_id, opts.request_timeout, &self.shared.security)
                .map_err(Step::Retry)?;
            self.coordinator = Some(conn);
        }
        self.coordinator.as_mut().ok_or(Step::Retry(Error::Closed))
    }

    /// A broker error code from a group request: what to do about it.
    fn judge(&mut self, api: ApiKey, code: i16) -> Step {
        let broker = self.coordinator.as_ref().map(|c| c.broker().to_string()).unwrap_or_default();
        let err = Error::KafkaBroker {
            broker,
            api: super::protocol::api_name(api),
            topic: None,
            partition: None,
            code,
            message: None,
        };
        match code {
            code::FENCED_INSTANCE_ID => Step::Lost(format!(
                "another worker joined with the static instance id {:?}",
                self.options().group_instance_id.as_deref().unwrap_or("")
            )),
            code::UNKNOWN_MEMBER_ID | code::ILLEGAL_GENERATION if !self.owned.is_empty() || self.joined_once => {
                Step::Lost(format!("{err} (the session timed out, or the group rebalanced without this member)"))
            }
            code::UNKNOWN_MEMBER_ID | code::ILLEGAL_GENERATION => {
                // Nothing owned and never in: start over with a fresh id.
                self.member_id.clear();
                self.generation = -1;
                self.rejoin = true;
                Step::Retry(err)
            }
            code::REBALANCE_IN_PROGRESS => {
                self.rejoin = true;
                Step::Retry(err)
            }
            code::INCONSISTENT_GROUP_PROTOCOL => Step::Fatal(Error::KafkaBroker {
                broker: self.coordinator.as_ref().map(|c| c.broker().to_string()).unwrap_or_default(),
                api: super::protocol::api_name(api),
                topic: None,
                partition: None,
                code,
                message: Some(
                    format!(
                        "group `{}` is used by consumers of another protocol (another app with the same id, or a Faust worker); give this app its own id",
                        self.group
                    )
                    .into(),
                ),
            }),
            c if super::protocol::code_needs_coordinator(c) || super::protocol::code_is_retriable(c) => {
                self.coordinator = None;
                Step::Retry(err)
            }
            _ => Step::Fatal(err),
        }
    }

    fn heartbeat(&mut self) -> std::result::Result<(), Step> {
        let opts = self.shared.options.clone();
        let mut req = HeartbeatRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(self.group.clone())))
            .with_generation_id(self.generation)
            .with_member_id(StrBytes::from_string(self.member_id.clone()));
        let conn = self.coordinator()?;
        if conn.version(ApiKey::Heartbeat).map_err(Step::Fatal)? >= 3 {
            req.group_instance_id = opts.group_instance_id.clone().map(StrBytes::from_string);
        }
        let sent = Instant::now();
        let (_, resp) = conn.request(ApiKey::Heartbeat, &req, opts.request_timeout).map_err(Step::Retry)?;
        self.next_heartbeat = Instant::now() + self.heartbeat_interval();
        match resp.error_code {
            0 => {
                self.renew_lease(sent);
                Ok(())
            }
            code::REBALANCE_IN_PROGRESS => {
                // Still a member (the coordinator answered it), for the rebalance.
                self.renew_lease(sent);
                tracing::debug!(group = %self.group, "the group is rebalancing; rejoining");
                self.rejoin = true;
                Ok(())
            }
            c => Err(self.judge(ApiKey::Heartbeat, c)),
        }
    }

    /// The coordinator answered a request sent at `sent`: the member may commit for most of
    /// a session timeout from then.
    fn renew_lease(&self, sent: Instant) {
        let lease = self.options().session_timeout * LEASE.0 / LEASE.1;
        self.shared.live.update(&self.group, &self.handle, |m| m.lease_until = Some(sent + lease));
    }

    fn heartbeat_interval(&self) -> Duration {
        let opts = self.options();
        opts.heartbeat_interval.min(opts.session_timeout / 3).max(Duration::from_millis(10))
    }

    /// What this member tells the group about itself.
    fn member_data(&mut self) -> std::result::Result<MemberData, Step> {
        let counts = self.partition_counts()?;
        let mut topics = Vec::new();
        for t in &self.join.topics {
            match counts.get(t) {
                Some(&n) => topics.push((t.clone(), n)),
                None if self.shared.live.had_topic(t) => {
                    return Err(Step::Fatal(Error::TopicVanished { topic: t.clone() }));
                }
                None => return Err(Step::Fatal(Error::UnknownTopic { topic: t.clone() })),
            }
        }
        self.shared.live.saw_topics(topics.iter().map(|(t, _)| t));
        Ok(MemberData {
            weight: self.join.weight.max(1),
            url: self.options().advertised_url.clone(),
            topics,
            copartitioned: self.join.copartitioned.clone(),
            changelogs: self.join.changelogs.clone(),
            standbys: self.standbys.clone(),
        })
    }

    fn partition_counts(&mut self) -> std::result::Result<HashMap<String, u32>, Step> {
        let opts = self.shared.options.clone();
        let req = MetadataRequest::default()
            .with_topics(Some(
                self.join
                    .topics
                    .iter()
                    .map(|t| MetadataRequestTopic::default().with_name(Some(topic_name(t))))
                    .collect(),
            ))
            .with_allow_auto_topic_creation(false);
        let conn = self.coordinator()?;
        let (_, resp) = conn.request(ApiKey::Metadata, &req, opts.request_timeout).map_err(Step::Retry)?;
        Ok(resp
            .topics
            .into_iter()
            .filter(|t| t.error_code == 0)
            .filter_map(|t| t.name.map(|n| (n.0.to_string(), t.partitions.len() as u32)))
            .collect())
    }

    /// One JoinGroup and SyncGroup round; gives the engine the changes it brings.
    fn join_and_sync(&mut self) -> std::result::Result<(), Step> {
        let opts = self.shared.options.clone();
        let data = self.member_data()?;
        let owned: Vec<TopicPartition> = self.owned.iter().cloned().collect();
        let metadata = assignor::encode_subscription(&owned, self.generation, &data);
        let group_id = GroupId(StrBytes::from_string(self.group.clone()));
        let instance = opts.group_instance_id.clone().map(StrBytes::from_string);
        // A JoinGroup is answered once the group's members have rejoined: up to the rebalance
        // timeout on Kafka.
        let join_timeout = opts.rebalance_timeout + opts.request_timeout;
        // A member waiting in a JoinGroup does not expire: no lease while joining.
        self.shared.live.update(&self.group, &self.handle, |m| m.lease_until = None);
        let mut resp = None;
        for _ in 0..3 {
            if self.shared.closing.is_closed() {
                return Err(Step::Stop);
            }
            let member_id = StrBytes::from_string(self.member_id.clone());
            let conn = self.coordinator()?;
            let version = conn.version(ApiKey::JoinGroup).map_err(Step::Fatal)?;
            let req = JoinGroupRequest::default()
                .with_group_id(group_id.clone())
                .with_session_timeout_ms(millis(opts.session_timeout))
                .with_rebalance_timeout_ms(millis(opts.rebalance_timeout))
                .with_member_id(member_id)
                .with_group_instance_id(if version >= 5 { instance.clone() } else { None })
                .with_protocol_type(StrBytes::from_static_str(PROTOCOL_TYPE))
                .with_protocols(vec![
                    JoinGroupRequestProtocol::default()
                        .with_name(StrBytes::from_static_str(PROTOCOL))
                        .with_metadata(metadata.clone()),
                ]);
            let (_, r) = conn.request(ApiKey::JoinGroup, &req, join_timeout).map_err(Step::Retry)?;
            if r.error_code == code::MEMBER_ID_REQUIRED {
                // KIP-394: the coordinator names the member; join again under that id.
                self.member_id = r.member_id.to_string();
                continue;
            }
            resp = Some(r);
            break;
        }
        let Some(resp) = resp else {
            return Err(Step::Retry(Error::KafkaProtocol {
                broker: self.coordinator.as_ref().map(|c| c.broker().to_string()).unwrap_or_default(),
                api: "JoinGroup",
                topic: None,
                partition: None,
                reason: "the coordinator kept asking for a member id".into(),
            }));
        };
        if resp.error_code != 0 {
            return Err(self.judge(ApiKey::JoinGroup, resp.error_code));
        }
        self.member_id = resp.member_id.to_string();
        let generation = resp.generation_id;
        let assignments = if resp.leader == resp.member_id {
            self.lead(&resp.members)
        } else {
            // The leader's SyncGroup carries the assignment; a follower's that arrives first
            // waits for it, and some brokers (tansu) make it wait a whole second. Let the
            // leader go first.
            std::thread::sleep(FOLLOWER_SYNC_DELAY);
            Vec::new()
        };
        let member_id = StrBytes::from_string(self.member_id.clone());
        let conn = self.coordinator()?;
        let version = conn.version(ApiKey::SyncGroup).map_err(Step::Fatal)?;
        let mut req = SyncGroupRequest::default()
            .with_group_id(group_id)
            .with_generation_id(generation)
            .with_member_id(member_id)
            .with_assignments(assignments);
        if version >= 3 {
            req.group_instance_id = instance;
        }
        if version >= 5 {
            req.protocol_type = Some(StrBytes::from_static_str(PROTOCOL_TYPE));
            req.protocol_name = Some(StrBytes::from_static_str(PROTOCOL));
        }
        let sync_sent = Instant::now();
        let (_, sync) = conn.request(ApiKey::SyncGroup, &req, join_timeout).map_err(Step::Retry)?;
        if sync.error_code != 0 {
            return Err(self.judge(ApiKey::SyncGroup, sync.error_code));
        }
        let (granted, data) = match assignor::decode_assignment(sync.assignment) {
            Ok(a) => a,
            Err(e) => {
                return Err(Step::Fatal(Error::KafkaProtocol {
                    broker: self.coordinator.as_ref().map(|c| c.broker().to_string()).unwrap_or_default(),
                    api: "SyncGroup",
                    topic: None,
                    partition: None,
                    reason: format!("the leader's assignment cannot be read ({e}): are all workers of one version?"),
                }));
            }
        };
        self.generation = generation;
        self.shared.live.owners.lock().unwrap_or_else(|p| p.into_inner()).insert(self.group.clone(), data.owners);
        let mut standbys = data.standbys;
        standbys.sort();
        if standbys != self.standbys {
            self.standbys = standbys;
            let event =
                AssignmentEvent::Standbys { generation: generation.max(0) as u64, partitions: self.standbys.clone() };
            // After the partitions' own events: a revoked partition's shard may become a standby.
            self.pending_standbys = Some(event);
        }
        self.rejoin = false;
        // A heartbeat at once: the lease from the SyncGroup counts from when it was sent, and a
        // broker may have held it a while.
        self.next_heartbeat = Instant::now();
        let (member_id, generation) = (self.member_id.clone(), self.generation);
        self.shared.live.update(&self.group, &self.handle, |m| {
            m.member_id = member_id;
            m.generation = generation;
        });
        self.renew_lease(sync_sent);
        self.deliver(granted);
        if let Some(event) = self.pending_standbys.take() {
            let _ = self.events.unbounded_send(Ok(event));
        }
        Ok(())
    }

    /// As the leader: the assignment of every member.
    fn lead(
        &self,
        members: &[kafka_protocol::messages::join_group_response::JoinGroupResponseMember],
    ) -> Vec<SyncGroupRequestAssignment> {
        let mut joined = Vec::new();
        let mut urls = HashMap::new();
        for m in members {
            let id: Arc<str> = Arc::from(m.member_id.as_str());
            match assignor::decode_subscription(id.clone(), m.metadata.clone()) {
                Ok(j) => {
                    urls.insert(id, j.data.url.clone());
                    joined.push(j);
                }
                Err(e) => {
                    tracing::error!(group = %self.group, member = %m.member_id, error = %e,
                        "a member's subscription cannot be read; it gets no partitions");
                }
            }
        }
        let plan = assignor::plan(&joined, self.options().standby_replicas);
        tracing::info!(group = %self.group, members = members.len(), moving = moving(&joined, &plan),
            "leading the group's assignment");
        members
            .iter()
            .map(|m| {
                SyncGroupRequestAssignment::default()
                    .with_member_id(m.member_id.clone())
                    .with_assignment(plan.assignment_for(m.member_id.as_str(), &urls))
            })
            .collect()
    }

    /// Gives the engine the difference between what it owns and what it was granted.
    fn deliver(&mut self, granted: Vec<TopicPartition>) {
        let granted: BTreeSet<TopicPartition> = granted.into_iter().collect();
        let generation = self.generation.max(0) as u64;
        let revoked: Vec<TopicPartition> = self
            .owned
            .iter()
            .filter(|tp| !granted.contains(*tp) && !self.revoking.contains_key(*tp))
            .cloned()
            .collect();
        let assigned: Vec<TopicPartition> = granted.iter().filter(|tp| !self.owned.contains(*tp)).cloned().collect();
        tracing::info!(group = %self.group, member = %self.member_id, generation, assigned = assigned.len(),
            revoked = revoked.len(), owned = self.owned.len() + assigned.len(), "group assignment");
        if !revoked.is_empty() {
            for tp in &revoked {
                self.revoking.insert(tp.clone(), generation);
            }
            let _ = self.events.unbounded_send(Ok(AssignmentEvent::Revoked { generation, partitions: revoked }));
        }
        if !assigned.is_empty() || !self.joined_once {
            self.owned.extend(assigned.iter().cloned());
            self.joined_once = true;
            let _ = self.events.unbounded_send(Ok(AssignmentEvent::Assigned { generation, partitions: assigned }));
        }
    }

    /// Leaves the group: a LeaveGroup, unless the member is static (then its partitions wait
    /// for it, up to the session timeout, so that a restart takes them back without a
    /// rebalance).
    fn leave(&mut self) -> Result<()> {
        if self.member_id.is_empty() || self.options().group_instance_id.is_some() {
            return Ok(());
        }
        let opts = self.shared.options.clone();
        let member_id = StrBytes::from_string(self.member_id.clone());
        let group_id = GroupId(StrBytes::from_string(self.group.clone()));
        let conn = match self.coordinator() {
            Ok(conn) => conn,
            Err(Step::Retry(e) | Step::Fatal(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        // Version 3 replaced the member id with a list of members.
        let req = if conn.version(ApiKey::LeaveGroup)? >= 3 {
            LeaveGroupRequest::default()
                .with_group_id(group_id)
                .with_members(vec![MemberIdentity::default().with_member_id(member_id)])
        } else {
            LeaveGroupRequest::default().with_group_id(group_id).with_member_id(member_id)
        };
        let (_, resp) = conn.request(ApiKey::LeaveGroup, &req, opts.request_timeout)?;
        if resp.error_code != 0 {
            return Err(conn.broker_error(ApiKey::LeaveGroup, resp.error_code, None));
        }
        Ok(())
    }
}

/// How many partitions the plan withholds from their owners (they move in the next round).
fn moving(joined: &[Joined], plan: &assignor::Plan) -> usize {
    joined
        .iter()
        .map(|j| {
            let granted = plan.granted.get(&j.id);
            j.owned.iter().filter(|tp| granted.is_none_or(|g| !g.contains(tp))).count()
        })
        .sum()
}

fn millis(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}
