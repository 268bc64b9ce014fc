//! What the worker did and what is wrong now, shared by the cores and the control thread.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faust_transport::TopicPartition;
use hdrhistogram::Histogram;

use crate::acks::LatencySample;
use crate::runtime::HashMap;

use crate::util::lock;

/// What the worker did about assignment changes since the app was created, for monitoring
/// and tests: see [`App::stats`](crate::App::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Assignment changes applied (each `Assigned` or `Revoked` from the group).
    pub rebalances: u64,
    /// Source partitions this worker started consuming.
    pub partitions_assigned: u64,
    /// Source partitions it stopped consuming (revoked, or moved between its cores).
    pub partitions_revoked: u64,
    /// Table shards opened and recovered from their changelog.
    pub shards_recovered: u64,
    /// Suspended table shards resumed in place, without replaying their changelog.
    pub shards_resumed: u64,
    /// Changelog records replayed while recovering shards.
    pub changelog_records_replayed: u64,
    /// Fetched events dropped unprocessed when their partition was revoked (the next owner
    /// fetches them again from the committed offset).
    pub events_abandoned: u64,
    /// Bad records met (see [`BadRecordPolicy`](crate::BadRecordPolicy)).
    pub bad_records: u64,
    /// Writes that failed (buffered sends, changelogs, stores, committed offsets) and are
    /// retried: a full disk, a broker away. See [`App::problems`](crate::App::problems) for
    /// the current ones.
    pub write_failures: u64,
    /// Whether some core takes no new events now because its writes fail (it resumes by
    /// itself once they succeed).
    pub writes_blocked: bool,
    /// Damaged logs of internal topics (changelogs, repartition topics) repaired by the
    /// worker (see `docs/engine.md`, "Faults").
    pub logs_repaired: u64,
    /// Offsets whose records were dropped by those repairs.
    pub offsets_lost_to_damage: u64,
    /// Events the agents finished (acked), over all cores (an event two agents consume
    /// counts twice). Updated as cores fetch and commit, so it may lag a moment behind.
    pub events_processed: u64,
    /// Records in the consumed partitions not processed yet: the log's end at the last fetch
    /// minus where processing stands, summed over partitions. 0 once the worker caught up.
    pub lag: u64,
    /// Events that came after the windows they belong to closed (see
    /// [`WindowedTable::on_late`](crate::WindowedTable::on_late)).
    pub late_events: u64,
    /// Windows closed (each key's window counts once).
    pub windows_closed: u64,
    /// Changelog partitions this worker follows as a standby replica now (Kafka groups with
    /// `table_standby_replicas`).
    pub standby_partitions: u64,
    /// Changelog records the standbys applied in the background.
    pub standby_records_applied: u64,
    /// Standby shards promoted to active when their partition was assigned here (recovery
    /// then replays only what the standby had not applied).
    pub standbys_promoted: u64,
    /// Whether this worker is the app's leader now (see [`App::is_leader`](crate::App::is_leader)).
    pub leader: bool,
}

/// One core's view of its work now, for the web server's status and metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct CoreStatus {
    pub(crate) core: usize,
    /// Time the core's executor spent running tasks and polling I/O, in seconds.
    pub(crate) busy_seconds: f64,
    /// Events its agents finished.
    pub(crate) events_processed: u64,
    /// Per consumed partition: where processing stands (committable), the log's end at the
    /// last fetch, and the committed offset.
    pub(crate) partitions: Vec<PartitionStatus>,
    /// How long its commits took.
    pub(crate) commit_latency: LatencySummary,
    /// How long sampled events took from their fetch until they were processed (acked, with
    /// every event before them in their partition).
    pub(crate) event_latency: LatencySummary,
    /// How old sampled events were (by their record's timestamp) when they were processed:
    /// the end-to-end latency, when producers' clocks agree with this host's.
    pub(crate) event_age: LatencySummary,
    /// Table shards recovering now.
    pub(crate) recovering: Vec<RecoveryStatus>,
    /// Table shards it holds, and standby shards it follows.
    pub(crate) shards: usize,
    pub(crate) standbys: usize,
}

/// A table shard recovering from its changelog.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct RecoveryStatus {
    pub(crate) table: String,
    pub(crate) partition: u32,
    /// Changelog records replayed, and to replay in all.
    pub(crate) done: u64,
    pub(crate) total: u64,
}

/// A latency histogram's summary, in microseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct LatencySummary {
    pub(crate) count: u64,
    pub(crate) sum_us: u64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) p999_us: u64,
    pub(crate) max_us: u64,
}

impl LatencySummary {
    fn of(h: &Histogram<u64>) -> Self {
        LatencySummary {
            count: h.len(),
            sum_us: (h.mean() * h.len() as f64) as u64,
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// The built-in monitor of one core (Faust's `Monitor`, the part that is not counters): its
/// latency histograms. Single-core, like the runtime that holds it.
#[derive(Debug)]
pub(crate) struct Monitor {
    /// Whether events are sampled (`Settings::monitor_enabled`).
    enabled: bool,
    commits: RefCell<Histogram<u64>>,
    events: RefCell<Histogram<u64>>,
    ages: RefCell<Histogram<u64>>,
    /// Shards recovering now: (table, partition) → (records replayed, records to replay).
    recovering: RefCell<std::collections::BTreeMap<(String, u32), (u64, u64)>>,
    /// Per consumed partition: (when, position) samples over the last [`RATE_WINDOW`].
    positions: RefCell<HashMap<TopicPartition, VecDeque<(Instant, u64)>>>,
}

/// The span over which a partition's rate is measured.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Samples closer than this to the previous one are not kept (the status page and scrapers
/// may ask often).
const RATE_SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// The largest latency a histogram holds, in microseconds (a week: a backfill's records can
/// be old); longer ones are counted as this.
const LATENCY_MAX_US: u64 = 7 * 24 * 3_600 * 1_000_000;

fn latency_histogram() -> Histogram<u64> {
    // 2 significant digits (1 %) keep each histogram at a few tens of KiB; the bounds are
    // constants and valid, so this cannot fail.
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 2).expect("valid histogram bounds")
}

fn record(h: &RefCell<Histogram<u64>>, micros: u64) {
    // In bounds after the clamp: recording cannot fail.
    let _ = h.borrow_mut().record(micros.clamp(1, LATENCY_MAX_US));
}

impl Monitor {
    pub(crate) fn new(enabled: bool) -> Self {
        Monitor {
            enabled,
            commits: RefCell::new(latency_histogram()),
            events: RefCell::new(latency_histogram()),
            ages: RefCell::new(latency_histogram()),
            positions: RefCell::new(HashMap::default()),
            recovering: RefCell::new(std::collections::BTreeMap::new()),
        }
    }

    /// Notes a recovery's progress (`Some((done, total))`), or its end (`None`).
    pub(crate) fn recovering(&self, table: &str, partition: u32, progress: Option<(u64, u64)>) {
        let mut recovering = self.recovering.borrow_mut();
        match progress {
            Some(p) => {
                recovering.insert((table.to_string(), partition), p);
            }
            None => {
                recovering.remove(&(table.to_string(), partition));
            }
        }
    }

    /// The recoveries running now.
    pub(crate) fn recoveries(&self) -> Vec<RecoveryStatus> {
        self.recovering
            .borrow()
            .iter()
            .map(|((table, partition), &(done, total))| RecoveryStatus {
                table: table.clone(),
                partition: *partition,
                done,
                total,
            })
            .collect()
    }

    /// Records `tp`'s `position` now, and answers its rate in events/s over the samples of
    /// the last [`RATE_WINDOW`] (0 until there are two, or with the monitor off).
    pub(crate) fn rate(&self, tp: &TopicPartition, position: u64) -> f64 {
        if !self.enabled {
            return 0.0;
        }
        let now = Instant::now();
        let mut positions = self.positions.borrow_mut();
        let samples = positions.entry(tp.clone()).or_default();
        if samples.back().is_none_or(|&(at, _)| now.duration_since(at) >= RATE_SAMPLE_EVERY) {
            samples.push_back((now, position));
        }
        // Keep one sample older than the window, so the rate spans all of it.
        while samples.len() > 2 && samples.get(1).is_some_and(|&(at, _)| now.duration_since(at) > RATE_WINDOW) {
            samples.pop_front();
        }
        match (samples.front(), samples.back()) {
            (Some(&(t0, p0)), Some(&(t1, p1))) if t1 > t0 && p1 >= p0 => {
                (p1 - p0) as f64 / t1.duration_since(t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    /// Drops the rate samples of partitions no longer consumed here.
    pub(crate) fn forget_rates_except<V>(&self, consumed: &HashMap<TopicPartition, V>) {
        self.positions.borrow_mut().retain(|tp, _| consumed.contains_key(tp));
    }

    /// Whether events are sampled.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// A commit completed after `took`.
    pub(crate) fn commit_done(&self, took: Duration) {
        record(&self.commits, took.as_micros() as u64);
    }

    /// A sampled event was processed.
    pub(crate) fn event_done(&self, sample: LatencySample) {
        record(&self.events, sample.fetched_at.elapsed().as_micros() as u64);
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        if sample.timestamp_ms > 0 {
            record(&self.ages, (now_ms - sample.timestamp_ms).max(0) as u64 * 1_000);
        }
    }

    pub(crate) fn commit_latency(&self) -> LatencySummary {
        LatencySummary::of(&self.commits.borrow())
    }

    pub(crate) fn event_latency(&self) -> LatencySummary {
        LatencySummary::of(&self.events.borrow())
    }

    pub(crate) fn event_age(&self) -> LatencySummary {
        LatencySummary::of(&self.ages.borrow())
    }
}

/// One consumed partition on a core.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct PartitionStatus {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) position: u64,
    pub(crate) end: u64,
    pub(crate) committed: Option<u64>,
    /// Events processed per second over the last few seconds (0 with the monitor off).
    pub(crate) events_per_s: f64,
}

/// The counters behind [`WorkerStats`], shared by the cores and the control thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) rebalances: AtomicU64,
    pub(crate) partitions_assigned: AtomicU64,
    pub(crate) partitions_revoked: AtomicU64,
    pub(crate) shards_recovered: AtomicU64,
    pub(crate) shards_resumed: AtomicU64,
    pub(crate) changelog_records_replayed: AtomicU64,
    pub(crate) events_abandoned: AtomicU64,
    pub(crate) bad_records: AtomicU64,
    pub(crate) write_failures: AtomicU64,
    pub(crate) logs_repaired: AtomicU64,
    pub(crate) offsets_lost_to_damage: AtomicU64,
    pub(crate) late_events: AtomicU64,
    pub(crate) windows_closed: AtomicU64,
    pub(crate) standby_partitions: AtomicU64,
    pub(crate) standby_records_applied: AtomicU64,
    pub(crate) standbys_promoted: AtomicU64,
    /// Cores whose writes fail now.
    pub(crate) blocked_cores: AtomicU64,
    /// What is wrong now, by where (`core 0 writes`, `orders/6`): shown by `stats`.
    problems: Mutex<std::collections::BTreeMap<String, String>>,
    /// Per core: (events processed, lag), as the core last published them.
    progress: Mutex<std::collections::BTreeMap<usize, (u64, u64)>>,
    /// Whether the worker was caught up (lag 0 everywhere) at the last publication.
    caught_up: std::sync::atomic::AtomicBool,
    /// When "caught up" was last logged (a steady flow goes in and out of it all the time).
    caught_up_logged: Mutex<Option<std::time::Instant>>,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> WorkerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (events_processed, lag) = lock(&self.progress).values().fold((0, 0), |(n, l), (pn, pl)| (n + pn, l + pl));
        WorkerStats {
            rebalances: get(&self.rebalances),
            partitions_assigned: get(&self.partitions_assigned),
            partitions_revoked: get(&self.partitions_revoked),
            shards_recovered: get(&self.shards_recovered),
            shards_resumed: get(&self.shards_resumed),
            changelog_records_replayed: get(&self.changelog_records_replayed),
            events_abandoned: get(&self.events_abandoned),
            bad_records: get(&self.bad_records),
            write_failures: get(&self.write_failures),
            writes_blocked: get(&self.blocked_cores) > 0,
            logs_repaired: get(&self.logs_repaired),
            offsets_lost_to_damage: get(&self.offsets_lost_to_damage),
            events_processed,
            lag,
            late_events: get(&self.late_events),
            windows_closed: get(&self.windows_closed),
            standby_partitions: get(&self.standby_partitions),
            standby_records_applied: get(&self.standby_records_applied),
            standbys_promoted: get(&self.standbys_promoted),
            leader: false,
        }
    }

    /// Publishes core `core`'s events processed and lag; logs when the whole worker catches
    /// up (its lag falls to 0): the first time, then at most once a minute.
    pub(crate) fn publish_progress(&self, core: usize, processed: u64, lag: u64) {
        let (total_lag, processed_all) = {
            let mut progress = lock(&self.progress);
            progress.insert(core, (processed, lag));
            (progress.values().map(|(_, l)| l).sum::<u64>(), progress.values().map(|(n, _)| n).sum::<u64>())
        };
        let now = total_lag == 0;
        if self.caught_up.swap(now, Ordering::Relaxed) != now && now && self.may_log_caught_up() {
            tracing::info!(
                events_processed = processed_all,
                "caught up: every consumed partition is processed to its end"
            );
        }
    }

    /// Whether to log a catch-up now: the first, then at most one a minute.
    fn may_log_caught_up(&self) -> bool {
        let mut last = lock(&self.caught_up_logged);
        let now = std::time::Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < std::time::Duration::from_secs(60)) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Records (`Some`) or clears (`None`) the current problem of `place`.
    pub(crate) fn set_problem(&self, place: &str, problem: Option<String>) {
        let mut problems = lock(&self.problems);
        match problem {
            Some(p) => {
                problems.insert(place.to_string(), p);
            }
            None => {
                problems.remove(place);
            }
        }
    }

    /// The current problems, as `place: problem`.
    pub(crate) fn problems(&self) -> Vec<String> {
        lock(&self.problems).iter().map(|(place, p)| format!("{place}: {p}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_rate_is_its_position_change_over_the_samples() {
        let monitor = Monitor::new(true);
        let tp = TopicPartition::new("orders", 0);
        assert_eq!(monitor.rate(&tp, 100), 0.0, "one sample: no rate yet");
        std::thread::sleep(RATE_SAMPLE_EVERY + Duration::from_millis(50));
        let rate = monitor.rate(&tp, 1_100);
        // 1,000 events in 250 ms or a little more (a loaded machine sleeps longer).
        assert!(rate > 500.0 && rate <= 4_000.0, "{rate}");
        assert_eq!(Monitor::new(false).rate(&tp, 5), 0.0, "off: no rates");
        let mut consumed = HashMap::default();
        consumed.insert(TopicPartition::new("orders", 1), ());
        monitor.forget_rates_except(&consumed);
        assert_eq!(monitor.rate(&tp, 2_000), 0.0, "forgotten: starts again");
    }

    #[test]
    fn latency_summaries_read_the_histograms() {
        let monitor = Monitor::new(true);
        for ms in [1, 2, 3, 100] {
            monitor.commit_done(Duration::from_millis(ms));
        }
        let s = monitor.commit_latency();
        assert_eq!(s.count, 4);
        assert!((1_900..=2_100).contains(&s.p50_us) && (99_000..=101_000).contains(&s.max_us), "{s:?}");
        let sample =
            LatencySample { offset: 0, fetched_at: Instant::now() - Duration::from_millis(5), timestamp_ms: 1 };
        monitor.event_done(sample);
        assert!(monitor.event_latency().p50_us >= 5_000, "{:?}", monitor.event_latency());
        assert!(monitor.event_age().count == 1 && monitor.event_age().max_us > 1_000_000, "an old timestamp");
    }
}
