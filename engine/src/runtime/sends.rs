//! Buffered sends (`send_soon`): buffered per partition, written in batches, retried in order
//! when a write fails; a core whose writes fail takes no new events until they succeed.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use faust_storage::Record;
use faust_transport::{Produced, TopicPartition};

use crate::acks::AckTracker;
use crate::runtime::queue::QueuedEvent;
use crate::runtime::{CoreRuntime, HashMap};
use crate::util::now_ms;

/// Why buffered sends, or a commit that waits for them, failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FlushError {
    /// A batch could not be written; it is kept and written again by the next flush.
    #[error("writing buffered sends to {tp}: {message}")]
    Write { tp: TopicPartition, message: String },
    /// Buffered records were lost, so no offset may be committed any more.
    #[error("buffered sends were lost; offsets are no longer committed")]
    SendsLost,
    /// The transport refused the commit.
    #[error(transparent)]
    Transport(#[from] faust_transport::Error),
    /// The broker lost data the worker had read: nothing may be committed any more.
    #[error("the broker lost data; offsets are no longer committed")]
    BrokerLostData,
    /// A table's state could not be written (the commit is retried later, unless the failure
    /// cannot be mended by a retry: then the worker stops).
    #[error("writing table state: {0}")]
    Tables(String),
}

/// Buffered sends (`send_soon`) past this many bytes are written before an agent takes its
/// next event: the buffer is bounded, and a busy agent feeds the log in large batches.
const PENDING_FLUSH_BYTES: usize = 1 << 20;

/// Writes that keep failing on a core: since when, and the limiter of its log lines.
pub(crate) struct WriteTrouble {
    pub(crate) since: std::time::Instant,
    pub(crate) log: LogLimiter,
}

/// Lets a repeated message through at most once per [`LogLimiter::EVERY`], counting the
/// repeats it held back (one core: no atomics).
#[derive(Debug)]
pub(crate) struct LogLimiter {
    last: Cell<std::time::Instant>,
    held: Cell<u64>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter { last: Cell::new(std::time::Instant::now()), held: Cell::new(0) }
    }
}

impl LogLimiter {
    /// How often a repeated message is logged.
    pub(crate) const EVERY: Duration = Duration::from_secs(10);

    /// `Some(repeats held back since the last one)` when the message may be logged now.
    pub(crate) fn allow(&self) -> Option<u64> {
        if self.last.get().elapsed() < Self::EVERY {
            self.held.set(self.held.get() + 1);
            return None;
        }
        self.last.set(std::time::Instant::now());
        Some(self.held.replace(0))
    }
}

/// Writes buffered sends soon after they are made: waits until something is buffered, lets
/// the agents add to the batches once, then writes them.
pub(crate) async fn flush_buffered(core: Rc<CoreRuntime>) {
    let mut failures = 0u32;
    while !core.stopping.is_cancelled() {
        let listener = core.pending_event.listen();
        if core.pending.borrow().is_empty() && core.retry.borrow().is_empty() {
            futures_lite::future::or(listener, core.stopped()).await;
            continue;
        }
        futures_lite::future::yield_now().await;
        match core.flush().await {
            Ok(()) => failures = 0,
            Err(_) => {
                // Logged (rate limited) by `writes_failed`.
                failures += 1;
                let backoff = Duration::from_millis(50 * u64::from(failures.min(20)));
                futures_lite::future::or(glommio::timer::sleep(backoff), core.stopped()).await;
            }
        }
    }
}

impl CoreRuntime {
    /// Buffers a record for `tp` (`send_soon`) and wakes the flusher.
    pub(crate) fn buffer(
        &self,
        tp: TopicPartition,
        timestamp: Option<i64>,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[faust_storage::Header<'_>],
    ) {
        let mut pending = self.pending.borrow_mut();
        let batch = pending.entry(tp).or_insert_with(|| faust_storage::BatchBuilder::with_capacity(16 * 1024));
        self.push_output(batch, timestamp.unwrap_or_else(now_ms), key, Some(value), headers);
        self.pending_bytes.set(self.pending_bytes.get() + key.map_or(0, <[u8]>::len) + value.len() + 32);
        self.pending_event.notify(1);
    }

    /// Writes every buffered send (earlier failures first); resolves when they are durable.
    /// A batch whose write fails is kept, in order, and written again by the next flush (the
    /// offsets of the events behind it are not committed until then); a partition whose
    /// writes fail does not hold back the others. Only when the transport lost a batch (it did
    /// not hand it back) does this core refuse to commit and stop the worker.
    pub(crate) async fn flush(self: &Rc<Self>) -> Result<(), FlushError> {
        // While an exactly-once commit on Kafka ends its transaction, what is buffered belongs
        // to the next one: wait, and check again once the flush is ours (the gate may have
        // closed while this waited for the lock).
        loop {
            self.wait_gate().await;
            let Ok(permit) = self.flush_lock.acquire_permit(1).await else {
                return Err(FlushError::Transport(faust_transport::Error::Closed));
            };
            if self.gate_closed() {
                drop(permit);
                continue;
            }
            return self.flush_locked(None).await;
        }
    }

    /// [`flush`](CoreRuntime::flush) of `sealed`, the sends an exactly-once commit took aside
    /// (not what is buffered now), whatever the gate.
    pub(crate) async fn flush_batches(
        self: &Rc<Self>,
        sealed: Option<HashMap<TopicPartition, faust_storage::BatchBuilder>>,
    ) -> Result<(), FlushError> {
        let Ok(_permit) = self.flush_lock.acquire_permit(1).await else {
            return Err(FlushError::Transport(faust_transport::Error::Closed));
        };
        self.flush_locked(sealed).await
    }

    /// The flush, with the flush lock held.
    async fn flush_locked(
        self: &Rc<Self>,
        sealed: Option<HashMap<TopicPartition, faust_storage::BatchBuilder>>,
    ) -> Result<(), FlushError> {
        let mut first_error = None;
        // Partitions whose write failed in this flush: their later batches wait behind.
        let mut failed: Vec<TopicPartition> = Vec::new();
        // Earlier failures first, one at a time, so a partition's records stay in order.
        let retries: VecDeque<_> = std::mem::take(&mut *self.retry.borrow_mut());
        for (tp, batch) in retries {
            if failed.contains(&tp) {
                self.retry.borrow_mut().push_back((tp, batch));
                continue;
            }
            if let Err(e) = self.produce_buffered(&tp, batch).await {
                failed.push(tp.clone());
                first_error.get_or_insert(self.keep_failed(tp, e));
            }
        }
        let mut batches: Vec<(TopicPartition, faust_storage::BatchBuilder)> = match sealed {
            Some(sealed) => sealed.into_iter().collect(),
            None => {
                self.pending_bytes.set(0);
                self.pending.borrow_mut().drain().collect()
            }
        };
        // Behind an earlier batch of their partition that is still unwritten.
        batches.retain_mut(|(tp, batch)| {
            let behind = failed.contains(tp) || self.retry.borrow().iter().any(|(t, _)| t == tp);
            if behind {
                self.retry.borrow_mut().push_back((tp.clone(), std::mem::take(batch)));
            }
            !behind
        });
        // The partitions' batches are written concurrently (they may live on other cores).
        let writes: Vec<_> = batches
            .into_iter()
            .map(|(tp, batch)| {
                let core = self.clone();
                glommio::spawn_local(async move {
                    let result = core.produce_buffered(&tp, batch).await;
                    (tp, result)
                })
            })
            .collect();
        for write in writes {
            let (tp, result) = write.await;
            if let Err(e) = result {
                first_error.get_or_insert(self.keep_failed(tp, e));
            }
        }
        match first_error {
            Some(e) => {
                self.writes_failed(&e);
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// One buffered batch to the transport (with the `sends:flush` fault point).
    async fn produce_buffered(
        &self,
        tp: &TopicPartition,
        batch: faust_storage::BatchBuilder,
    ) -> Result<Produced, faust_transport::Error> {
        let records = batch.len();
        let produced = match crate::runtime::fault_point("sends:flush") {
            Ok(()) => self.transport.produce(tp, batch).await,
            Err(e) => Err(crate::runtime::injected_produce_failure(tp, batch, e)),
        };
        for sensor in self.sensors.iter() {
            match &produced {
                Ok(_) => sensor.on_send_completed(tp, records),
                Err(e) => sensor.on_send_error(tp, &e.to_string()),
            }
        }
        produced
    }

    /// Keeps the batch of a failed write for a retry, or marks the core's sends as lost.
    fn keep_failed(&self, tp: TopicPartition, error: faust_transport::Error) -> FlushError {
        let message = error.to_string();
        if error.damaged_log().is_some() {
            // An internal log is repaired now, so the retry finds it whole; a user's topic
            // waits for the operator (the sends stay buffered meanwhile).
            self.on_damaged_log(&tp, &error, None);
        }
        match error.into_batch() {
            Some(batch) => self.retry.borrow_mut().push_back((tp.clone(), batch)),
            None => {
                tracing::error!(topic = %tp.topic, partition = tp.partition, error = %message,
                    "buffered sends were lost; refusing to commit and stopping the worker");
                self.sends_lost.set(true);
                self.app_stop.stop();
            }
        }
        FlushError::Write { tp, message }
    }

    /// Notes that a write failed: the first failure stops this core from taking new events
    /// (its consumers pause, and agents wait once their buffered sends pass their bound), and
    /// says so in the log and in the worker's stats; repeats are logged at most every few
    /// seconds. The writes are retried until they succeed ([`CoreRuntime::writes_succeeded`]).
    pub(crate) fn writes_failed(&self, error: &dyn std::fmt::Display) {
        self.stats.write_failures.fetch_add(1, Ordering::Relaxed);
        let mut failing = self.write_trouble.borrow_mut();
        match failing.as_mut() {
            None => {
                *failing = Some(WriteTrouble { since: std::time::Instant::now(), log: LogLimiter::default() });
                self.stats.blocked_cores.fetch_add(1, Ordering::Relaxed);
                self.stats.set_problem(
                    &format!("core {} writes", self.index),
                    Some(format!("writes fail, new events are not taken until they succeed: {error}")),
                );
                tracing::error!(core = self.index, %error,
                    "writes fail; this core takes no new events until they succeed again (retrying)");
            }
            Some(trouble) => {
                if let Some(suppressed) = trouble.log.allow() {
                    let failing_for_s = trouble.since.elapsed().as_secs();
                    self.stats.set_problem(
                        &format!("core {} writes", self.index),
                        Some(format!("writes fail for {failing_for_s} s, new events are not taken: {error}")),
                    );
                    tracing::error!(core = self.index, %error, failing_for_s, repeats = suppressed,
                        "writes still fail; no new events are taken (retrying)");
                }
            }
        }
    }

    /// Notes that writes succeed again (after [`CoreRuntime::writes_failed`]): the core takes
    /// new events again.
    pub(crate) fn writes_succeeded(&self) {
        let Some(trouble) = self.write_trouble.borrow_mut().take() else { return };
        self.stats.blocked_cores.fetch_sub(1, Ordering::Relaxed);
        self.stats.set_problem(&format!("core {} writes", self.index), None);
        tracing::warn!(
            core = self.index,
            failing_for_ms = trouble.since.elapsed().as_millis() as u64,
            "writes succeed again; taking new events"
        );
        self.writable.notify(usize::MAX);
    }

    /// Waits while this core's writes fail (see [`CoreRuntime::writes_failed`]), or until
    /// `cancel` is set or the worker stops.
    pub(crate) async fn wait_writable(&self, cancel: Option<&crate::runtime::signal::Cancel>) {
        // The common case, writes that succeed, without registering a listener.
        while self.write_trouble.borrow().is_some() {
            let listener = self.writable.listen();
            let cancelled = cancel.is_some_and(|c| c.is_cancelled());
            if self.write_trouble.borrow().is_none() || cancelled || self.stopping.is_cancelled() {
                return;
            }
            // Woken when writes succeed; every 100 ms it also looks for a cancel or a stop.
            futures_lite::future::or(listener, glommio::timer::sleep(Duration::from_millis(100))).await;
        }
    }

    /// Whether sends to `tp` are buffered (or waiting for a retry).
    pub(crate) fn has_pending(&self, tp: &TopicPartition) -> bool {
        self.pending.borrow().contains_key(tp) || self.retry.borrow().iter().any(|(t, _)| t == tp)
    }

    /// Flushes when the buffer has grown past its bound. While writes fail, waits until they
    /// succeed again: the buffer stays bounded, and the agent (or task) that fills it is held
    /// back instead of buffering without end.
    pub(crate) async fn flush_if_full(self: &Rc<Self>) {
        if self.pending_bytes.get() < PENDING_FLUSH_BYTES {
            return;
        }
        if self.flush().await.is_err() {
            // The failure is logged (rate limited) by `writes_failed`; the flusher retries.
            self.wait_writable(None).await;
        }
    }

    /// Hands an event sent to channel `name` to the agents of this core that consume it,
    /// once their queues have room.
    pub(crate) async fn deliver(
        &self,
        name: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<Produced, crate::error::SendError> {
        let tp = TopicPartition::new(name, self.index as u32);
        for &a in self.channel_agents.get(name).map(Vec::as_slice).unwrap_or_default() {
            let lane = self.queues[a].lane(&tp);
            self.queues[a].room(lane).await;
        }
        let offset = self.deliver_now(name, key, value);
        Ok(Produced { partition: tp.partition, base_offset: offset, last_offset: offset })
    }

    /// Hands an event sent to channel `name` to this core's agents now; returns its number.
    pub(crate) fn deliver_now(&self, name: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> u64 {
        let offset = self.channel_seq.get();
        self.channel_seq.set(offset + 1);
        let tp = TopicPartition::new(name, self.index as u32);
        let record = Record::new(
            offset,
            now_ms(),
            key.map(bytes::Bytes::copy_from_slice),
            value.map(bytes::Bytes::copy_from_slice),
        );
        for &a in self.channel_agents.get(name).map(Vec::as_slice).unwrap_or_default() {
            // Tracked like a partition's events (so tests can wait for them), never committed.
            self.acks.borrow_mut().entry((a, tp.clone())).or_insert_with(|| AckTracker::new(offset)).delivered(offset);
            let lane = self.queues[a].lane(&tp);
            self.queues[a].push(lane, QueuedEvent { tp: tp.clone(), record: record.clone() });
            self.queues[a].wake(1);
        }
        offset
    }
}
