//! Fetching a partition into the queues of the agents that consume it; damaged logs; the
//! lag and events processed a core publishes.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faust_transport::{AutoOffsetReset, OffsetSpec, TopicPartition};

use crate::acks::{AckTracker, LatencySample};
use crate::runtime::queue::QueuedEvent;
use crate::runtime::{AckKey, CoreRuntime};
use crate::util::lock;

/// Where a core found that the broker lost data: the partition, the position read up to and
/// the log's end now (`None`: the partition is gone). Shared by the cores.
pub(crate) type LostData = Arc<Mutex<Option<(TopicPartition, u64, Option<u64>)>>>;

/// Bytes asked for per fetch.
const FETCH_BYTES: usize = 1 << 20;

/// How long a fetch waits for new records before the consumer checks for a stop.
const FETCH_WAIT: Duration = Duration::from_millis(100);

/// How long fetches must keep failing because the broker does not know the partition (each
/// after a metadata refresh) before the worker takes the partition as lost: longer than a
/// cluster takes to spread the metadata of a topic just created.
const LOST_AFTER_UNKNOWN: Duration = Duration::from_secs(10);

/// How often a consumer asks again for a partition whose log is damaged (until the operator
/// repairs it).
pub(crate) const DAMAGED_RETRY: Duration = Duration::from_secs(2);

/// Fetches one partition and feeds the agents subscribed to its topic, until the worker
/// stops or `cancel` is set (the partition was released).
pub(crate) async fn consume(
    core: Rc<CoreRuntime>,
    tp: TopicPartition,
    agents: Vec<usize>,
    reset: AutoOffsetReset,
    cancel: Rc<crate::runtime::signal::Cancel>,
) {
    // A committed offset that cannot be read stops the worker: starting over from
    // `auto_offset_reset` would process again (or skip) what was committed.
    let committed = match core.transport.committed(&core.group, std::slice::from_ref(&tp)).await {
        Ok(c) => c.first().copied().flatten(),
        Err(e) => {
            tracing::error!(partition = %tp, error = %e, "reading the committed offset failed; stopping the worker");
            core.failure.borrow_mut().get_or_insert_with(|| format!("reading the committed offset of {tp}: {e}"));
            core.app_stop.stop();
            return;
        }
    };
    let mut next = match committed {
        Some(offset) => offset,
        None => {
            let spec = match reset {
                AutoOffsetReset::Earliest => OffsetSpec::Earliest,
                AutoOffsetReset::Latest => OffsetSpec::Latest,
            };
            loop {
                match core.transport.list_offset(&tp, spec).await {
                    Ok(offset) => break offset,
                    Err(e) if e.damaged_log().is_some() => {
                        if core.on_damaged_log(&tp, &e, None).is_none() {
                            futures_lite::future::or(glommio::timer::sleep(DAMAGED_RETRY), cancel.cancelled()).await;
                        }
                    }
                    Err(e) => {
                        tracing::error!(partition = %tp, error = %e, "looking up where to start failed; retrying");
                        futures_lite::future::or(glommio::timer::sleep(Duration::from_secs(1)), cancel.cancelled())
                            .await;
                    }
                }
                if core.stopping.is_cancelled() || cancel.is_cancelled() {
                    return;
                }
            }
        }
    };
    for &a in &agents {
        core.acks.borrow_mut().insert((a, tp.clone()), AckTracker::new(next));
    }
    let lanes: Vec<usize> = agents.iter().map(|&a| core.queues[a].lane(&tp)).collect();
    let mut failures = 0u32;
    // Since when fetches in a row found the partition unknown to the broker.
    let mut unknown_since: Option<std::time::Instant> = None;
    let running = || !core.stopping.is_cancelled() && !cancel.is_cancelled();
    while running() {
        for (&a, &lane) in agents.iter().zip(&lanes) {
            futures_lite::future::or(core.queues[a].room(lane), cancel.cancelled()).await;
        }
        // No new events while this core's writes fail (a full disk): they would only add to
        // what cannot be written.
        core.wait_writable(Some(&cancel)).await;
        // Nor while an exactly-once commit drains the events in flight.
        core.wait_drained().await;
        if !running() {
            break;
        }
        match core.transport.fetch(&tp, next, FETCH_BYTES, FETCH_WAIT).await {
            Ok(fetched) => {
                (failures, unknown_since) = (0, None);
                if core.damage_logs.borrow_mut().remove(&tp).is_some() {
                    tracing::warn!(partition = %tp, "the damaged partition was repaired; processing it again");
                    core.stats.set_problem(&tp.to_string(), None);
                }
                let fetched_count = fetched.records.len();
                let last_fetched = fetched.records.last().map(|r| (r.offset, r.timestamp));
                for sensor in core.sensors.iter() {
                    for r in &fetched.records {
                        sensor.on_message_in(&tp, r.offset);
                    }
                }
                // Per agent, the fetch's offsets go to its ack tracker (looked up once, not per
                // record), then its records to its queue: the last agent gets the records
                // themselves, the others clones.
                let mut records = Some(fetched.records);
                for (i, (&a, &lane)) in agents.iter().zip(&lanes).enumerate() {
                    let Some(batch) = records.as_ref() else { break };
                    if let Some(t) = core.acks.borrow_mut().get_mut(&AckKey(a, &tp)) {
                        for r in batch {
                            t.delivered(r.offset);
                        }
                    }
                    let queue = &core.queues[a];
                    if i + 1 == agents.len() {
                        for r in records.take().into_iter().flatten() {
                            queue.push(lane, QueuedEvent { tp: tp.clone(), record: r });
                        }
                    } else {
                        for r in batch {
                            queue.push(lane, QueuedEvent { tp: tp.clone(), record: r.clone() });
                        }
                    }
                }
                // The monitor follows one event per partition at a time, from here to its ack.
                if let Some((offset, timestamp_ms)) = last_fetched.filter(|_| core.monitor.enabled()) {
                    let sample = LatencySample { offset, fetched_at: std::time::Instant::now(), timestamp_ms };
                    let mut acks = core.acks.borrow_mut();
                    for &a in &agents {
                        if let Some(t) = acks.get_mut(&AckKey(a, &tp)) {
                            t.arm_sample(sample);
                        }
                    }
                }
                next = fetched.next_offset;
                for &a in &agents {
                    core.queues[a].wake(fetched_count);
                }
                core.note_end(&tp, fetched.high_watermark);
                glommio::yield_if_needed().await;
                for &a in &agents {
                    if let Some(t) = core.acks.borrow_mut().get_mut(&AckKey(a, &tp)) {
                        t.read_through(next);
                    }
                }
            }
            Err(faust_transport::Error::OffsetOutOfRange { high_watermark, .. }) if next > high_watermark => {
                // The log is shorter than what was read of it: whatever the broker holds now
                // is not the log the worker's offsets and tables stand on. Stop, committing
                // nothing more (resetting would count the new log on top of the old one).
                core.lost_data(&tp, next, Some(high_watermark));
                break;
            }
            Err(
                e @ (faust_transport::Error::UnknownTopic { .. } | faust_transport::Error::UnknownPartition { .. }),
            ) if unknown_since.is_some_and(|t| t.elapsed() >= LOST_AFTER_UNKNOWN) => {
                // The topic existed at start-up (core 0 created it) and the broker kept saying
                // it does not, each time after refreshing its metadata: it was lost.
                tracing::error!(topic = %tp.topic, partition = tp.partition, error = %e, "fetch failed");
                core.lost_data(&tp, next, None);
                break;
            }
            Err(faust_transport::Error::OffsetOutOfRange { earliest, high_watermark, .. }) => {
                let to = match reset {
                    AutoOffsetReset::Earliest => earliest,
                    AutoOffsetReset::Latest => high_watermark,
                };
                tracing::warn!(topic = %tp.topic, partition = tp.partition, offset = next, reset_to = to,
                    "offset out of range; resetting");
                next = to;
                for &a in &agents {
                    core.acks.borrow_mut().insert((a, tp.clone()), AckTracker::new(next));
                }
            }
            Err(faust_transport::Error::Closed) => break,
            Err(e) if e.damaged_log().is_some() => {
                // Repaired at once (internal topics: fetched again right away), or waiting for
                // the operator's repair (asked again every few seconds; the log and `stats`
                // say so; the other partitions go on).
                if core.on_damaged_log(&tp, &e, Some(next)).is_none() {
                    futures_lite::future::or(glommio::timer::sleep(DAMAGED_RETRY), cancel.cancelled()).await;
                }
            }
            Err(e) => {
                failures += 1;
                let gone = matches!(
                    e,
                    faust_transport::Error::UnknownTopic { .. } | faust_transport::Error::UnknownPartition { .. }
                );
                unknown_since = if gone { unknown_since.or_else(|| Some(std::time::Instant::now())) } else { None };
                let backoff = Duration::from_millis(50 * u64::from(failures.min(20)));
                tracing::error!(topic = %tp.topic, partition = tp.partition, offset = next, error = %e,
                    retry_in_ms = backoff.as_millis() as u64, "fetch failed");
                futures_lite::future::or(glommio::timer::sleep(backoff), core.stopped()).await;
            }
        }
    }
}

impl CoreRuntime {
    /// Whether `topic` is one the engine makes and can rebuild or do without (a table's
    /// changelog, a repartition topic), rather than a user's topic.
    pub(crate) fn is_internal(&self, topic: &str) -> bool {
        self.internal_topics.contains(topic)
    }

    /// A log of `tp` is damaged below what was made durable (`error` says where). An internal
    /// topic's log is repaired at once: its damaged batches are dropped (and kept aside), the
    /// rest keeps its offsets, and the loss is logged and counted. A user's topic waits for
    /// the operator (`repair` on the command line), and says so in the log and in `stats`
    /// until then; the caller retries it now and then, and other partitions go on. `position`
    /// is where this core stands in the partition (records below it were taken already).
    pub(crate) fn on_damaged_log(
        &self,
        tp: &TopicPartition,
        error: &faust_transport::Error,
        position: Option<u64>,
    ) -> Option<faust_storage::RepairReport> {
        let place = tp.to_string();
        if !self.is_internal(&tp.topic) {
            let first = !self.damage_logs.borrow().contains_key(tp);
            let mut logs = self.damage_logs.borrow_mut();
            let limiter = logs.entry(tp.clone()).or_default();
            let repeats = if first { Some(0) } else { limiter.allow() };
            if let Some(repeats) = repeats {
                tracing::error!(partition = %tp, %error, repeats,
                    "a partition's log is damaged; it is not processed until it is repaired (the other partitions go on): run the `repair` command for it");
            }
            self.stats.set_problem(
                &place,
                Some(format!(
                    "damaged log, not processed until repaired (`repair {} --partition {}`): {error}",
                    tp.topic, tp.partition
                )),
            );
            return None;
        }
        let report = match self.transport.repair(tp)? {
            Ok(report) => report,
            Err(e) => {
                tracing::error!(partition = %tp, error = %e, "repairing a damaged log failed");
                self.stats.set_problem(&place, Some(format!("damaged log, and its repair failed: {e}")));
                return None;
            }
        };
        self.stats.set_problem(&place, None);
        self.stats.logs_repaired.fetch_add(1, Ordering::Relaxed);
        self.stats.offsets_lost_to_damage.fetch_add(report.lost_offsets(), Ordering::Relaxed);
        let unprocessed: u64 =
            position.map_or(0, |p| report.lost.iter().map(|r| r.end.saturating_sub(r.start.max(p))).sum());
        tracing::error!(partition = %tp, lost = %report.lost_ranges(), lost_offsets = report.lost_offsets(),
            not_yet_processed = unprocessed, quarantined = ?report.quarantined,
            "repaired a damaged internal log: its damaged batches were dropped, the rest keeps its offsets");
        Some(report)
    }

    /// Notes where `tp`'s log ends (at a fetch) and publishes this core's progress (events
    /// processed, lag) for the worker's stats.
    pub(crate) fn note_end(&self, tp: &TopicPartition, high_watermark: u64) {
        {
            let mut ends = self.log_ends.borrow_mut();
            match ends.get_mut(tp) {
                Some(end) => *end = high_watermark,
                None => {
                    ends.insert(tp.clone(), high_watermark);
                }
            }
        }
        self.publish_progress();
    }

    /// Publishes this core's events processed and lag (see [`WorkerStats`](crate::WorkerStats)).
    pub(crate) fn publish_progress(&self) {
        let acks = self.acks.borrow();
        let lag: u64 = self
            .log_ends
            .borrow()
            .iter()
            .map(|(tp, end)| {
                let done = acks.iter().filter(|((_, t), _)| t == tp).map(|(_, tracker)| tracker.committable()).min();
                end.saturating_sub(done.unwrap_or(*end))
            })
            .sum();
        let processed = self.agent_acks.iter().map(Cell::get).sum();
        self.stats.publish_progress(self.index, processed, lag);
    }

    /// Each consumed partition's position, end, committed offset and recent rate, in order.
    fn partition_statuses(&self) -> Vec<crate::runtime::stats::PartitionStatus> {
        let acks = self.acks.borrow();
        let committed = self.committed.borrow();
        let log_ends = self.log_ends.borrow();
        let mut partitions: Vec<crate::runtime::stats::PartitionStatus> = self
            .consumers
            .borrow()
            .keys()
            .map(|tp| {
                let position = acks.iter().filter(|((_, t), _)| t == tp).map(|(_, t)| t.committable()).min();
                let position = position.unwrap_or_else(|| committed.get(tp).copied().unwrap_or(0));
                crate::runtime::stats::PartitionStatus {
                    topic: tp.topic.to_string(),
                    partition: tp.partition,
                    position,
                    end: log_ends.get(tp).copied().unwrap_or(0),
                    committed: committed.get(tp).copied(),
                    events_per_s: self.monitor.rate(tp, position),
                }
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        partitions
    }

    /// Samples every consumed partition's position for the monitor's rates (the upkeep task
    /// calls it every second, so rates move whether or not anyone looks).
    pub(crate) fn sample_rates(&self) {
        if self.monitor.enabled() {
            self.monitor.forget_rates_except(&self.consumers.borrow());
            let _ = self.partition_statuses();
        }
    }

    /// What this core is doing now (for the web server): its partitions with where processing
    /// stands, its busy time, its commit and event latencies, its recoveries.
    pub(crate) fn status(&self) -> crate::runtime::stats::CoreStatus {
        // glommio hands each interval's stats out once: add them up here.
        let busy = self.busy.get() + glommio::executor().executor_stats().total_runtime();
        self.busy.set(busy);
        let partitions = self.partition_statuses();
        crate::runtime::stats::CoreStatus {
            core: self.index,
            busy_seconds: busy.as_secs_f64(),
            events_processed: self.agent_acks.iter().map(Cell::get).sum(),
            partitions,
            commit_latency: self.monitor.commit_latency(),
            event_latency: self.monitor.event_latency(),
            event_age: self.monitor.event_age(),
            recovering: self.monitor.recoveries(),
            shards: self.shards.borrow().iter().flatten().flatten().count(),
            standbys: self.standbys.borrow().len(),
        }
    }

    /// The broker lost data of `tp` this core had read up to `position`: stops the worker,
    /// and no core commits any more (`WorkerError::BrokerLostData`).
    fn lost_data(&self, tp: &TopicPartition, position: u64, high_watermark: Option<u64>) {
        tracing::error!(topic = %tp.topic, partition = tp.partition, position, ?high_watermark,
            "the broker lost data this worker had read; stopping the worker without committing");
        lock(&self.lost_data).get_or_insert((tp.clone(), position, high_watermark));
        self.failure.borrow_mut().get_or_insert_with(|| format!("the broker lost data of {tp}"));
        self.app_stop.stop();
    }
}
