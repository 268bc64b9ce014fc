//! The control thread: it follows the group's assignment events and keeps this worker's
//! partitions placed on its cores, in two phases (release, then take).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust_transport::{AssignmentEvent, Fence, JoinRequest, TopicPartition};

use crate::runtime::assignment::{Command, Commands, Done, Report, WAIT_LOG_EVERY};
use crate::runtime::stats::Counters;
use crate::transports::AnyTransport;
use crate::util::lock;

/// The control thread's view of where this worker's partitions are.
pub(crate) struct Placement {
    transport: AnyTransport,
    cores: usize,
    /// Co-partitioned groups of topics: partition p of each goes to the same core.
    groups: Vec<Vec<Arc<str>>>,
    commands: Vec<Arc<Commands>>,
    /// The core processing each partition this worker owns.
    placed: HashMap<TopicPartition, usize>,
    /// The core holding the suspended shard of each changelog partition.
    suspended: HashMap<TopicPartition, usize>,
    /// The core following each changelog partition this worker is a standby of.
    standbys: HashMap<TopicPartition, usize>,
    /// How long a core may take to apply a command before the worker gives up.
    timeout: Duration,
}

impl Placement {
    pub(crate) fn new(
        transport: AnyTransport,
        cores: usize,
        groups: Vec<Vec<Arc<str>>>,
        commands: Vec<Arc<Commands>>,
        timeout: Duration,
    ) -> Placement {
        Placement {
            transport,
            cores,
            groups,
            commands,
            placed: HashMap::new(),
            suspended: HashMap::new(),
            standbys: HashMap::new(),
            timeout,
        }
    }

    /// Where each of `owned` goes: sticky (to its core, or to the core holding its suspended
    /// or standby shard) and balanced over the cores, co-partitioned groups together.
    pub(crate) fn target(&self, owned: &BTreeSet<TopicPartition>) -> HashMap<TopicPartition, usize> {
        let members: Vec<(usize, u32)> = (0..self.cores.max(1)).map(|c| (c, 1)).collect();
        let partitions: Vec<TopicPartition> = owned.iter().cloned().collect();
        let mut previous = self.standbys.clone();
        previous.extend(self.suspended.iter().map(|(tp, c)| (tp.clone(), *c)));
        previous.extend(self.placed.iter().map(|(tp, c)| (tp.clone(), *c)));
        let input = faust_transport::AssignInput {
            members: &members,
            groups: &self.groups,
            partitions: &partitions,
            previous: &previous,
        };
        match faust_transport::assign(&input) {
            Ok(placed) => {
                placed.into_iter().flat_map(|(core, tps)| tps.into_iter().map(move |tp| (tp, core))).collect()
            }
            // Unreachable with at least one member of weight 1; fall back to core 0.
            Err(e) => {
                tracing::error!(error = %e, "placing partitions on cores failed; using core 0");
                partitions.into_iter().map(|tp| (tp, 0)).collect()
            }
        }
    }

    /// Moves the worker to `target`: releases what leaves a core, then takes what arrives.
    /// Every core gets a command (with the new fence) even when nothing changes for it.
    pub(crate) async fn apply(
        &mut self,
        target: &HashMap<TopicPartition, usize>,
        fence: Option<Fence>,
    ) -> Result<(), String> {
        let n = self.cores.max(1);
        let mut release: Vec<Vec<TopicPartition>> = vec![Vec::new(); n];
        let mut close: Vec<Vec<TopicPartition>> = vec![Vec::new(); n];
        let mut take: Vec<Vec<TopicPartition>> = vec![Vec::new(); n];
        for (tp, &core) in &self.placed {
            if target.get(tp) != Some(&core) {
                release[core].push(tp.clone());
                if target.contains_key(tp) {
                    // Moves to another core: its shard must be closed here before it opens there.
                    close[core].push(tp.clone());
                }
            }
        }
        for (tp, &core) in self.suspended.iter().chain(&self.standbys) {
            if target.get(tp).is_some_and(|&c| c != core) {
                close[core].push(tp.clone());
            }
        }
        for (tp, &core) in target {
            if self.placed.get(tp) != Some(&core) {
                take[core].push(tp.clone());
            }
        }
        for list in release.iter_mut().chain(close.iter_mut()).chain(take.iter_mut()) {
            list.sort();
        }
        // Phase 1: release and close.
        let busy: Vec<usize> = (0..n).filter(|&c| !release[c].is_empty() || !close[c].is_empty()).collect();
        let phase1: Vec<(usize, Arc<Done>)> = busy
            .into_iter()
            .map(|c| {
                let command = Command {
                    fence: fence.clone(),
                    release: std::mem::take(&mut release[c]),
                    close: close[c].clone(),
                    ..Command::default()
                };
                self.send(c, command)
            })
            .collect();
        for (core, report) in self.wait_all(phase1, "release revoked partitions").await? {
            for tp in report.suspended {
                self.suspended.insert(tp, core);
            }
        }
        for (core, list) in close.iter().enumerate() {
            for tp in list {
                if self.suspended.get(tp) == Some(&core) {
                    self.suspended.remove(tp);
                }
            }
        }
        self.placed.retain(|tp, core| target.get(tp) == Some(core));
        // Phase 2: take (every core, for the fence). The embedded transport learns first which
        // core appends and reads each partition.
        let owners: Vec<(TopicPartition, usize)> = target.iter().map(|(tp, c)| (tp.clone(), *c)).collect();
        self.transport.set_owners(&owners);
        let phase2: Vec<(usize, Arc<Done>)> = (0..n)
            .map(|c| {
                self.send(c, Command { fence: fence.clone(), take: std::mem::take(&mut take[c]), ..Command::default() })
            })
            .collect();
        self.wait_all(phase2, "take assigned partitions").await?;
        for (tp, &core) in target {
            self.placed.insert(tp.clone(), core);
            if self.suspended.get(tp) == Some(&core) {
                self.suspended.remove(tp);
            }
            // Promoted where it was, or closed there (phase 1) and recovered elsewhere.
            self.standbys.remove(tp);
        }
        Ok(())
    }

    /// Makes `partitions` (changelog partitions, none owned by this worker) the worker's
    /// standbys: each stays on the core following it, or goes to the core holding its
    /// suspended shard, or to the core with the fewest.
    pub(crate) async fn set_standbys(&mut self, partitions: &[TopicPartition]) -> Result<(), String> {
        let n = self.cores.max(1);
        let mut placed: HashMap<TopicPartition, usize> = HashMap::new();
        let mut load = vec![0usize; n];
        let mut fresh = Vec::new();
        for tp in partitions.iter().filter(|tp| !self.placed.contains_key(*tp)) {
            match self.standbys.get(tp).or_else(|| self.suspended.get(tp)) {
                Some(&core) => {
                    placed.insert(tp.clone(), core);
                    load[core] += 1;
                }
                None => fresh.push(tp.clone()),
            }
        }
        fresh.sort();
        for tp in fresh {
            let core = (0..n).min_by_key(|&c| (load[c], c)).unwrap_or(0);
            load[core] += 1;
            placed.insert(tp, core);
        }
        let mut lists: Vec<Vec<TopicPartition>> = vec![Vec::new(); n];
        for (tp, &core) in &placed {
            lists[core].push(tp.clone());
        }
        let pending: Vec<(usize, Arc<Done>)> = lists
            .into_iter()
            .enumerate()
            .map(|(c, mut list)| {
                list.sort();
                self.send(c, Command { standbys: Some(list), ..Command::default() })
            })
            .collect();
        self.wait_all(pending, "follow its standbys").await?;
        // A suspended shard that became a standby is the standby now.
        self.suspended.retain(|tp, _| !placed.contains_key(tp));
        self.standbys = placed;
        Ok(())
    }

    /// How many changelog partitions the worker follows as a standby.
    pub(crate) fn standby_count(&self) -> usize {
        self.standbys.len()
    }

    /// Drops every partition and suspended shard at once, committing nothing: the group
    /// dropped this worker, so others own them already.
    pub(crate) async fn lose_everything(&mut self) -> Result<(), String> {
        let n = self.cores.max(1);
        let mut release: Vec<Vec<TopicPartition>> = vec![Vec::new(); n];
        let mut close: Vec<Vec<TopicPartition>> = vec![Vec::new(); n];
        for (tp, &core) in &self.placed {
            release[core].push(tp.clone());
            close[core].push(tp.clone());
        }
        for (tp, &core) in &self.suspended {
            close[core].push(tp.clone());
        }
        let pending: Vec<(usize, Arc<Done>)> = (0..n)
            .map(|c| {
                let command = Command {
                    release: std::mem::take(&mut release[c]),
                    close: std::mem::take(&mut close[c]),
                    standbys: Some(Vec::new()),
                    lost: true,
                    ..Command::default()
                };
                self.send(c, command)
            })
            .collect();
        let result = self.wait_all(pending, "drop lost partitions").await.map(|_| ());
        self.placed.clear();
        self.suspended.clear();
        self.standbys.clear();
        result
    }

    /// Queues `command` for `core`; returns what to wait on.
    fn send(&self, core: usize, command: Command) -> (usize, Arc<Done>) {
        let done = command.done.clone();
        self.commands[core].push(command);
        (core, done)
    }

    /// The cores' answers, each awaited for at most the timeout (logging while it waits).
    async fn wait_all(&self, pending: Vec<(usize, Arc<Done>)>, what: &str) -> Result<Vec<(usize, Report)>, String> {
        let mut out = Vec::new();
        for (core, done) in pending {
            let started = Instant::now();
            loop {
                match done.wait_for(WAIT_LOG_EVERY).await {
                    Some(Ok(report)) => {
                        out.push((core, report));
                        break;
                    }
                    Some(Err(e)) => return Err(format!("core {core} could not {what}: {e}")),
                    None if started.elapsed() >= self.timeout => {
                        return Err(format!("core {core} did not {what} within {} ms", self.timeout.as_millis()));
                    }
                    None => tracing::warn!(
                        core,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "waiting for a core to {what}"
                    ),
                }
            }
        }
        Ok(out)
    }
}

/// Follows the group for the worker: joins with `join`, applies each assignment change to
/// the cores, confirms revocations, and leaves once the cores have finished (`cores_done`).
pub(crate) struct Control {
    pub(crate) transport: AnyTransport,
    pub(crate) group: String,
    pub(crate) join: JoinRequest,
    pub(crate) placement: Placement,
    pub(crate) stop: Arc<crate::runtime::signal::StopSignal>,
    pub(crate) cores_done: Arc<crate::runtime::signal::StopSignal>,
    pub(crate) counters: Arc<Counters>,
    /// Why the control thread stopped the worker, if it did.
    pub(crate) failure: Arc<Mutex<Option<String>>>,
    /// How long to wait for the first assignment before letting the cores start without
    /// partitions (a worker joining a busy group gets its share only after others release it).
    pub(crate) first_wait: Duration,
    /// The app's sensors (told when an assignment change starts and ends).
    pub(crate) sensors: crate::runtime::sensor::Sensors,
    /// Leadership and the partition hooks.
    pub(crate) services: Arc<crate::app::services::Services>,
    /// The app's leader topic (`None` with `topic_disable_leader`).
    pub(crate) leader_topic: Option<String>,
}

impl Control {
    pub(crate) async fn run(mut self) {
        let mut membership = match self.transport.membership(&self.group, &self.join) {
            Ok(m) => m,
            Err(e) => {
                self.fail(&format!("joining the group: {e}"));
                return;
            }
        };
        let mut member = membership.member_id();
        let mut owned: BTreeSet<TopicPartition> = BTreeSet::new();
        let mut generation = 0;
        // The first assignment, so that the cores start with their partitions placed.
        let first = futures_lite::future::or(async { Some(membership.next_event().await) }, async {
            futures_timer::Delay::new(self.first_wait).await;
            None
        })
        .await;
        let mut next = match first {
            Some(event) => Some(event),
            None => {
                let fence = member.clone().map(|member| Fence { member, generation });
                if let Err(e) = self.placement.apply(&HashMap::new(), fence).await
                    && !self.stop.is_stopped()
                {
                    self.fail(&e);
                }
                None
            }
        };
        while !self.stop.is_stopped() {
            let event = match next.take() {
                Some(event) => event,
                None => {
                    let stop = self.stop.clone();
                    let event = futures_lite::future::or(async { Some(membership.next_event().await) }, async {
                        stop.wait().await;
                        None
                    })
                    .await;
                    match event {
                        Some(event) => event,
                        None => break,
                    }
                }
            };
            let event = match event {
                Ok(event) => event,
                Err(faust_transport::Error::Closed) => break,
                Err(e @ faust_transport::Error::Fenced { .. }) => {
                    // Kafka's "partitions lost": drop everything uncommitted, then join again.
                    tracing::warn!(group = %self.group, error = %e,
                        "the group dropped this worker; dropping its partitions without committing and joining again");
                    if let Err(e) = self.placement.lose_everything().await {
                        if !self.stop.is_stopped() {
                            self.fail(&e);
                        }
                        break;
                    }
                    self.services.partitions_revoked(&std::mem::take(&mut owned).into_iter().collect::<Vec<_>>());
                    self.services.note_owned(None, owned.iter());
                    match self.transport.membership(&self.group, &self.join) {
                        Ok(m) => {
                            membership = m;
                            member = membership.member_id();
                            continue;
                        }
                        Err(e) => {
                            self.fail(&format!("joining the group again: {e}"));
                            break;
                        }
                    }
                }
                Err(e) => {
                    self.fail(&format!("the group failed: {e}"));
                    break;
                }
            };
            let (g, revoked) = match &event {
                AssignmentEvent::Standbys { partitions, .. } => {
                    if let Err(e) = self.placement.set_standbys(partitions).await {
                        if !self.stop.is_stopped() {
                            self.fail(&e);
                        }
                        break;
                    }
                    let count = self.placement.standby_count() as u64;
                    self.counters.standby_partitions.store(count, Ordering::Relaxed);
                    tracing::info!(group = %self.group, standbys = count, "following standby partitions");
                    continue;
                }
                AssignmentEvent::Assigned { generation, partitions } => {
                    owned.extend(partitions.iter().cloned());
                    (*generation, false)
                }
                AssignmentEvent::Revoked { generation, partitions } => {
                    for tp in partitions {
                        owned.remove(tp);
                    }
                    (*generation, true)
                }
            };
            generation = generation.max(g);
            tracing::debug!(group = %self.group, ?event, "assignment change");
            match &event {
                AssignmentEvent::Revoked { partitions, .. } => {
                    // Leadership ends before the partition is released: a leader-only run must
                    // not start on a worker that is handing leadership over.
                    self.services.note_owned(self.leader_topic.as_deref(), owned.iter());
                    self.services.partitions_revoked(partitions);
                }
                // As Faust does, before the tables of the partitions are recovered.
                AssignmentEvent::Assigned { partitions, .. } => self.services.partitions_assigned(partitions),
                AssignmentEvent::Standbys { .. } => {}
            }
            let target = self.placement.target(&owned);
            let fence = member.clone().map(|member| Fence { member, generation });
            let started = Instant::now();
            for sensor in self.sensors.iter() {
                sensor.on_rebalance_start(g);
            }
            let applied = self.placement.apply(&target, fence).await;
            for sensor in self.sensors.iter() {
                sensor.on_rebalance_end(g, started.elapsed());
            }
            if let Err(e) = applied {
                // A stop asked for meanwhile ends the cores' commands: not a failure.
                if !self.stop.is_stopped() {
                    self.fail(&e);
                }
                break;
            }
            self.counters.rebalances.fetch_add(1, Ordering::Relaxed);
            if let AssignmentEvent::Assigned { .. } = &event {
                // Leadership starts once the leader partition is taken.
                self.services.note_owned(self.leader_topic.as_deref(), owned.iter());
            }
            if revoked && let Err(e) = membership.revoked(g).await {
                if matches!(e, faust_transport::Error::Fenced { .. }) {
                    // Too late: the group dropped this worker meanwhile; the next event says so.
                    tracing::warn!(group = %self.group, error = %e, "confirming a revocation was refused");
                    continue;
                }
                self.fail(&format!("confirming the revocation of generation {g}: {e}"));
                break;
            }
        }
        // The worker stops (or restarts its run): it gives up everything it holds.
        if !self.stop.is_restarting() {
            self.services.before_shutdown();
        }
        self.services.note_owned(None, owned.iter());
        self.services.partitions_revoked(&owned.iter().cloned().collect::<Vec<_>>());
        // Leave once the cores committed their last offsets, so others take over from there.
        self.cores_done.wait().await;
        if let Err(e) = membership.leave().await {
            tracing::warn!(group = %self.group, error = %e, "leaving the group failed");
        }
    }

    fn fail(&self, message: &str) {
        tracing::error!(group = %self.group, "{message}; stopping the worker");
        lock(&self.failure).get_or_insert_with(|| message.to_string());
        self.stop.stop();
    }
}
