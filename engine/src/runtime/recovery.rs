//! Recovery of a table shard before its partition is processed: replay the changelog from
//! the store's checkpoint to the *committed* changelog offset — not to the high-water mark:
//! records past the committed offset were written by a commit that did not finish, for events
//! whose source offsets were not committed and that will be processed again. They are
//! neutralized by appending, for each key they touch, the committed value (or a tombstone), so
//! that any later replay through them also ends at the committed state. A damaged changelog
//! is repaired, and rebuilt from the store when the store holds what it lost.

use std::rc::Rc;
use std::time::{Duration, Instant};

use faust_storage::BatchBuilder;
use faust_transport::{Fence, OffsetSpec};

use crate::error::TableError;
use crate::runtime::commit::FREEZE_CHUNK;
use crate::runtime::state::AnyShard;
use crate::transports::AnyCore;

/// How often recovery asks again when a changelog looks shorter than its committed offset,
/// and how long it waits each time, before it reports the changelog short.
const SHORT_CHANGELOG_RETRIES: u32 = 10;
const SHORT_CHANGELOG_WAIT: Duration = Duration::from_millis(100);
/// Bytes asked for per fetch while replaying a changelog.
const REPLAY_FETCH_BYTES: usize = 4 << 20;

/// Recovers `shard` before the core processes its partition: replays the changelog from the
/// store's checkpoint to the committed changelog offset, neutralizes records past it, and
/// checkpoints. Returns the committed changelog offset the shard now stands at and how many
/// records were replayed. `fence` is the worker's, for the commit of a neutralization.
///
/// A changelog found damaged (embedded log) is repaired on the spot. When every record it
/// lost lies below the store's checkpoint, the store holds their effects and the table is
/// exact: the changelog is then written whole again from the shard's state (every key's
/// value, and a tombstone for every key it no longer holds), so that a later rebuild from it
/// is exact too. When the replay itself would need a lost record, the state cannot be
/// rebuilt and recovery fails with [`TableError::ChangelogDamaged`].
pub(crate) async fn recover(
    core: &AnyCore,
    group: &str,
    fence: Option<&Fence>,
    shard: &Rc<dyn AnyShard>,
    sensors: &crate::runtime::sensor::Sensors,
) -> Result<Recovered, TableError> {
    let tp = shard.changelog().clone();
    let (table, partition) = (shard.name().to_string(), shard.partition());
    let transport_err = |source| TableError::Transport { table: table.clone(), partition, source };
    let mut repair = Repair::default();
    let committed = core.committed(group, std::slice::from_ref(&tp)).await.map_err(transport_err)?;
    let committed = committed.first().copied().flatten().unwrap_or(0);
    // Before the log is touched: records past the committed offset may be neutralized below,
    // and compaction must never let one of them replace a committed record.
    core.set_compaction_horizon(&tp, committed);
    // Snapshotted once: records appended later cannot make recovery chase a moving end. A
    // broker may answer an end short of what it acknowledged for a moment (tansu, just after
    // the previous worker's last commit): asked again a few times before it counts as short.
    let latest = || core.list_offset(&tp, OffsetSpec::Latest);
    let mut high_watermark = repair.retry(core, shard, latest).await?;
    for _ in 0..SHORT_CHANGELOG_RETRIES {
        if high_watermark >= committed {
            break;
        }
        glommio::timer::sleep(SHORT_CHANGELOG_WAIT).await;
        high_watermark = repair.retry(core, shard, latest).await?;
    }
    let earliest = repair.retry(core, shard, || core.list_offset(&tp, OffsetSpec::Earliest)).await?;
    let mut from = shard.checkpointed_changelog();
    if from > committed {
        // The store claims more than was committed (offsets reset by hand?): start over.
        tracing::warn!(
            table,
            partition,
            checkpoint = from,
            committed,
            "the store is ahead of the committed changelog offset; rebuilding it from the changelog"
        );
        shard.clear()?;
        from = 0;
    }
    if high_watermark < committed {
        return Err(TableError::ChangelogShort {
            table,
            partition,
            changelog: tp.topic.to_string(),
            end: high_watermark,
            committed,
        });
    }
    if from < committed && from < earliest {
        return Err(TableError::ChangelogTruncated {
            table,
            partition,
            changelog: tp.topic.to_string(),
            needed: from,
            earliest,
        });
    }
    repair.check(shard, from, committed)?;
    let started = Instant::now();
    let total = committed - from;
    let mut progress = Progress::new(&table, partition, total, sensors.clone());
    let mut next = from;
    let mut empty_fetches = 0;
    while next < committed {
        // Below the end the records are there: no wait, unless a fetch came back empty.
        let wait = if empty_fetches == 0 { Duration::ZERO } else { SHORT_CHANGELOG_WAIT };
        let fetched = repair.retry(core, shard, || core.fetch(&tp, next, REPLAY_FETCH_BYTES, wait)).await?;
        repair.check(shard, from, committed)?;
        if fetched.next_offset <= next {
            // Nothing more below the committed offset although the log claims to hold it: a
            // broker may answer a fetch empty now and then; asked again a few times.
            empty_fetches += 1;
            if empty_fetches <= SHORT_CHANGELOG_RETRIES {
                continue;
            }
            return Err(TableError::ChangelogShort {
                table,
                partition,
                changelog: tp.topic.to_string(),
                end: next,
                committed,
            });
        }
        empty_fetches = 0;
        shard.replay(&fetched.records, committed)?;
        next = fetched.next_offset;
        progress.update(next.min(committed) - from);
        glommio::yield_if_needed().await;
    }
    progress.finish();
    crate::runtime::crash_point("recover:replayed");
    let mut end = committed;
    if high_watermark > committed {
        end = neutralize(core, group, fence, shard, committed, high_watermark).await?;
    }
    if repair.report.as_ref().is_some_and(|r| !r.is_clean()) {
        end = rewrite_changelog(core, group, fence, shard, end).await?;
    }
    // The state now is the changelog's up to `end`: checkpoint it so the next start skips it.
    crate::runtime::commit::checkpoint(shard, end, Vec::new()).await?;
    if total > 0 || end > committed {
        tracing::info!(table = %shard.name(), partition, replayed = total, orphans = high_watermark - committed,
            elapsed_ms = started.elapsed().as_millis() as u64, "recovered table partition");
    }
    shard.recovered();
    Ok(Recovered { end, replayed: total, repaired: repair.report })
}

/// A recovery's repair of its changelog, at most one.
#[derive(Default)]
struct Repair {
    report: Option<faust_storage::RepairReport>,
}

impl Repair {
    /// Runs `call`; when it finds the changelog damaged (and it was not repaired yet), repairs
    /// the changelog and runs `call` again.
    async fn retry<T, F, Fut>(&mut self, core: &AnyCore, shard: &Rc<dyn AnyShard>, call: F) -> Result<T, TableError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, faust_transport::Error>>,
    {
        let transport_err = |source| transport_error(shard, source);
        match call().await {
            Err(e) if e.damaged_log().is_some() && self.report.is_none() => {
                let Some(repaired) = core.repair(shard.changelog()) else { return Err(transport_err(e)) };
                let report = repaired.map_err(transport_err)?;
                tracing::error!(table = shard.name(), partition = shard.partition(), error = %e,
                    lost = %report.lost_ranges(), lost_offsets = report.lost_offsets(), quarantined = ?report.quarantined,
                    "the table's changelog was damaged and is repaired");
                self.report = Some(report);
                call().await.map_err(transport_err)
            }
            other => other.map_err(transport_err),
        }
    }

    /// Fails when the repair lost records the replay from `from` to `committed` needs: the
    /// state cannot be rebuilt then. Records lost below `from` are in the store already.
    fn check(&self, shard: &Rc<dyn AnyShard>, from: u64, committed: u64) -> Result<(), TableError> {
        let Some(report) = &self.report else { return Ok(()) };
        let needed: Vec<String> = report
            .lost
            .iter()
            .filter(|r| r.start < committed && r.end > from)
            .map(|r| format!("{}..{}", r.start, r.end))
            .collect();
        if needed.is_empty() {
            return Ok(());
        }
        Err(TableError::ChangelogDamaged {
            table: shard.name().to_string(),
            partition: shard.partition(),
            changelog: shard.changelog().topic.to_string(),
            lost: needed.join(", "),
            from,
            committed,
        })
    }
}

/// A transport error met while recovering or rewriting `shard`'s changelog.
fn transport_error(shard: &Rc<dyn AnyShard>, source: faust_transport::Error) -> TableError {
    TableError::Transport { table: shard.name().to_string(), partition: shard.partition(), source }
}

/// Where a recovered shard stands.
#[derive(Debug, Clone)]
pub(crate) struct Recovered {
    /// The committed changelog offset.
    pub(crate) end: u64,
    /// Changelog records replayed to get there.
    pub(crate) replayed: u64,
    /// The repair of a damaged changelog, if one was needed.
    pub(crate) repaired: Option<faust_storage::RepairReport>,
}

/// Appends, for every key written past the committed changelog offset, its committed value
/// (or a tombstone), and commits the new end: replaying through the uncommitted records then
/// ends at the committed state. Returns the new committed changelog offset.
async fn neutralize(
    core: &AnyCore,
    group: &str,
    fence: Option<&Fence>,
    shard: &Rc<dyn AnyShard>,
    committed: u64,
    high_watermark: u64,
) -> Result<u64, TableError> {
    let mut keys = KeySet::default();
    keys.add_from_changelog(core, shard, committed, high_watermark).await?;
    let end = write_current_values(core, group, fence, shard, &keys.keys, high_watermark).await?;
    tracing::warn!(
        table = shard.name(),
        partition = shard.partition(),
        uncommitted = high_watermark - committed,
        keys = keys.keys.len(),
        "the changelog held records of a commit that did not finish; restored their keys' committed values"
    );
    Ok(end)
}

/// After a repair dropped records of the changelog: appends the shard's whole state to it —
/// every key's value, and a tombstone for every key the changelog mentions that the shard no
/// longer holds (its deletion may have been among the lost records) — and commits the new
/// end. Replaying the changelog from its start then ends at exactly the shard's state.
async fn rewrite_changelog(
    core: &AnyCore,
    group: &str,
    fence: Option<&Fence>,
    shard: &Rc<dyn AnyShard>,
    end: u64,
) -> Result<u64, TableError> {
    let tp = shard.changelog().clone();
    let transport_err = |source| transport_error(shard, source);
    let earliest = core.list_offset(&tp, OffsetSpec::Earliest).await.map_err(transport_err)?;
    let mut keys = KeySet::default();
    keys.add_from_changelog(core, shard, earliest, end).await?;
    for key in shard.keys_raw()? {
        keys.add(key);
    }
    let new_end = write_current_values(core, group, fence, shard, &keys.keys, end).await?;
    tracing::warn!(
        table = shard.name(),
        partition = shard.partition(),
        keys = keys.keys.len(),
        "wrote the table's state to its repaired changelog again: it is whole"
    );
    Ok(new_end)
}

/// Encoded keys, each once, in the order first seen.
#[derive(Default)]
struct KeySet {
    keys: Vec<bytes::Bytes>,
    seen: hashbrown::HashSet<bytes::Bytes, foldhash::fast::RandomState>,
}

impl KeySet {
    fn add(&mut self, key: bytes::Bytes) {
        if self.seen.insert(key.clone()) {
            self.keys.push(key);
        }
    }

    /// Adds the keys of the changelog's records in `[from, to)`.
    async fn add_from_changelog(
        &mut self,
        core: &AnyCore,
        shard: &Rc<dyn AnyShard>,
        from: u64,
        to: u64,
    ) -> Result<(), TableError> {
        let tp = shard.changelog();
        let transport_err = |source| transport_error(shard, source);
        let mut next = from;
        while next < to {
            let fetched = core.fetch(tp, next, REPLAY_FETCH_BYTES, Duration::ZERO).await.map_err(transport_err)?;
            if fetched.next_offset <= next {
                break;
            }
            for r in fetched.records.iter().filter(|r| r.offset < to) {
                if let Some(k) = &r.key {
                    self.add(k.clone());
                }
            }
            next = fetched.next_offset;
            glommio::yield_if_needed().await;
        }
        Ok(())
    }
}

/// Appends each key's current value in the shard (a tombstone where it has none) to the
/// changelog, and commits the new end (`end` when there are no keys). Returns the new end.
async fn write_current_values(
    core: &AnyCore,
    group: &str,
    fence: Option<&Fence>,
    shard: &Rc<dyn AnyShard>,
    keys: &[bytes::Bytes],
    mut end: u64,
) -> Result<u64, TableError> {
    let tp = shard.changelog().clone();
    let transport_err = |source| transport_error(shard, source);
    for chunk in keys.chunks(FREEZE_CHUNK) {
        let mut batch = BatchBuilder::with_capacity(64 * 1024);
        for k in chunk {
            let value = shard.current_raw(k)?;
            batch.push(crate::util::now_ms(), Some(k), value.as_deref(), &[]);
        }
        let produced = match crate::runtime::fault_point("recover:neutralize") {
            Ok(()) => core.produce(&tp, batch).await,
            Err(e) => Err(crate::runtime::injected_produce_failure(&tp, batch, e)),
        }
        .map_err(transport_err)?;
        end = produced.last_offset + 1;
        crate::runtime::crash_point("recover:neutralizing");
    }
    core.commit(group, fence, &[(tp, end)]).await.map_err(transport_err)?;
    Ok(end)
}

/// Recovery progress: a bar on a terminal, a log line every few seconds otherwise (see
/// `crate::progress`); the sensors and the core's monitor (the status page) follow it too.
struct Progress {
    table: String,
    partition: u32,
    sensors: crate::runtime::sensor::Sensors,
    total: u64,
    /// Shown only for a replay long enough to watch: a short one would flash a bar.
    meter: Option<crate::progress::Progress>,
    started: Instant,
}

/// Replays shorter than this get no bar or log lines.
const PROGRESS_AFTER: Duration = Duration::from_millis(500);

impl Progress {
    fn new(table: &str, partition: u32, total: u64, sensors: crate::runtime::sensor::Sensors) -> Self {
        Progress { table: table.to_string(), partition, sensors, total, meter: None, started: Instant::now() }
    }

    fn update(&mut self, done: u64) {
        for sensor in self.sensors.iter() {
            sensor.on_recovery_progress(&self.table, self.partition, done, self.total);
        }
        crate::runtime::CoreRuntime::with_current(|core| {
            if let Some(core) = core {
                core.monitor.recovering(&self.table, self.partition, Some((done, self.total)));
            }
        });
        if self.meter.is_none() && self.started.elapsed() >= PROGRESS_AFTER {
            let label = format!("recovering {}[{}]", self.table, self.partition);
            self.meter = Some(crate::progress::Progress::new(&label, Some(self.total)));
        }
        if let Some(meter) = &mut self.meter {
            meter.set(done, None);
        }
    }

    fn finish(&mut self) {
        crate::runtime::CoreRuntime::with_current(|core| {
            if let Some(core) = core {
                core.monitor.recovering(&self.table, self.partition, None);
            }
        });
        if let Some(meter) = &mut self.meter {
            meter.finish();
        }
    }
}
