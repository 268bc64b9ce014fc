//! Exactly-once outputs (`processing_guarantee = exactly_once`), on `local://` and on Kafka.
//!
//! **Invariant: a record a core sends is visible to readers if and only if the commit that
//! covers the events it came from is durable.** Each core has an open transaction, numbered;
//! every record it sends carries the transaction's tag (`faust_transport::TxnTag`), and the
//! transport shows a tagged record only once the core's commit of that transaction is in the
//! offsets file (`faust-transport`'s `txn.rs`). So what the commit protocol (`commit.rs`)
//! already gives tables — exactly the effects of the events below the committed offsets —
//! holds for outputs too: a crash before the commit leaves records that no reader ever sees,
//! and the events behind them are processed again under a new incarnation.
//!
//! For that, a transaction must hold the sends of exactly the events its commit covers. Events
//! are processed concurrently, so a commit first *drains*: the core's fetch loops take no new
//! events until every event already taken is acked; in that instant (no await) the commit
//! reads the committable offsets, freezes the tables and closes the transaction, and then the
//! fetches go on while the commit writes. Every record tagged with the closed transaction was
//! sent by an event at or below the offsets this commit covers, and every later record is
//! tagged with the next one.
//!
//! **On Kafka** the transaction is Kafka's own: each core is a transactional producer
//! (`{app}-{instance}-{core}`, made at start-up, which fences an earlier life of the same
//! worker), its changelog records and sends go into the open transaction, and the commit
//! ends it with the source offsets and changelog ends in it (TxnOffsetCommit, then EndTxn);
//! readers fetch `read_committed`. There are no tags: in the drained instant the commit takes
//! the buffered sends aside and closes a *gate*, behind which sends made afterwards wait
//! until the transaction has ended, so that they go into the next one. A Kafka exactly-once
//! commit that fails stops the worker: what the transaction held is aborted by the
//! coordinator, and a restart resumes from the last committed one.

use std::cell::Cell;
use std::time::{Duration, Instant};

use event_listener::Event;
use faust_transport::TxnTag;

use crate::runtime::CoreRuntime;

/// A core's transactions.
#[derive(Debug)]
pub(crate) struct Eos {
    /// Kafka's transactions, rather than tags (`local://`).
    kafka: bool,
    incarnation: u64,
    core: u32,
    /// The open transaction: what the core sends now is tagged with it.
    open: Cell<u64>,
    /// Whether anything was tagged with the open transaction.
    used: Cell<bool>,
    /// The newest closed transaction whose commit has not succeeded yet.
    uncommitted: Cell<Option<u64>>,
    /// Held while a commit drains the events in flight: the fetch loops wait.
    draining: Hold,
    /// Kafka: held from the drained instant until the transaction ended: sends wait.
    gate: Hold,
}

/// A condition a commit holds up while other tasks wait for it to drop.
#[derive(Debug, Default)]
struct Hold {
    held: Cell<bool>,
    released: Event,
}

impl Hold {
    /// Holds it until the returned guard is dropped, whatever way the commit leaves.
    fn hold(&self) -> Held<'_> {
        self.held.set(true);
        Held(self)
    }

    /// Waits while it is held (or until the core stops).
    async fn released(&self, core: &CoreRuntime) {
        while self.held.get() && !core.stopping.is_cancelled() {
            let listener = self.released.listen();
            if self.held.get() {
                futures_lite::future::or(listener, core.stopped()).await;
            }
        }
    }
}

/// Releases a [`Hold`] when dropped.
pub(crate) struct Held<'a>(&'a Hold);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.held.set(false);
        self.0.released.notify(usize::MAX);
    }
}

/// The longest a commit waits for the events in flight to be acked before it gives up (and
/// is tried again): an agent holding events (a `take` with a long window) must not stall the
/// fetches for longer.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

impl Eos {
    /// Transactions by tags on `local://`, for the process's `incarnation`.
    pub(crate) fn tagging(incarnation: u64, core: usize) -> Eos {
        Eos::new(false, incarnation, core)
    }

    /// Kafka's transactions.
    pub(crate) fn kafka(core: usize) -> Eos {
        Eos::new(true, 0, core)
    }

    fn new(kafka: bool, incarnation: u64, core: usize) -> Eos {
        Eos {
            kafka,
            incarnation,
            core: core as u32,
            open: Cell::new(1),
            used: Cell::new(false),
            uncommitted: Cell::new(None),
            draining: Hold::default(),
            gate: Hold::default(),
        }
    }

    /// Whether the transactions are Kafka's.
    pub(crate) fn is_kafka(&self) -> bool {
        self.kafka
    }

    /// Closes the gate until the returned guard is dropped.
    pub(crate) fn close_gate(&self) -> Held<'_> {
        self.gate.hold()
    }

    /// The tag of a record sent now.
    pub(crate) fn tag(&self) -> [u8; 20] {
        self.used.set(true);
        TxnTag { incarnation: self.incarnation, core: self.core, txn: self.open.get() }.encode()
    }

    /// Closes the open transaction (if anything was sent in it) and opens the next; the
    /// transaction the commit must make visible: the newest closed one not committed yet.
    pub(crate) fn close(&self) -> Option<TxnTag> {
        if self.used.replace(false) {
            self.uncommitted.set(Some(self.open.get()));
            self.open.set(self.open.get() + 1);
        }
        self.uncommitted.get().map(|txn| TxnTag { incarnation: self.incarnation, core: self.core, txn })
    }

    /// The commit of `tag` is durable.
    pub(crate) fn committed(&self, tag: TxnTag) {
        if self.uncommitted.get() == Some(tag.txn) {
            self.uncommitted.set(None);
        }
    }
}

impl CoreRuntime {
    /// Adds a record the core sends to `batch`, tagged with the open transaction under
    /// exactly-once.
    pub(crate) fn push_output(
        &self,
        batch: &mut faust_storage::BatchBuilder,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[faust_storage::Header<'_>],
    ) {
        let Some(eos) = self.eos.as_ref().filter(|e| !e.kafka) else {
            batch.push(timestamp, key, value, headers);
            return;
        };
        let tag = eos.tag();
        let txn: faust_storage::Header<'_> = (faust_transport::TXN_HEADER, Some(&tag[..]));
        if headers.is_empty() {
            batch.push(timestamp, key, value, &[txn]);
        } else {
            let mut all = headers.to_vec();
            all.push(txn);
            batch.push(timestamp, key, value, &all);
        }
    }

    /// Whether an exactly-once commit on Kafka holds the gate closed.
    pub(crate) fn gate_closed(&self) -> bool {
        self.eos.as_ref().is_some_and(|e| e.gate.held.get())
    }

    /// Waits while an exactly-once commit on Kafka ends its transaction (sends made meanwhile
    /// belong to the next one).
    pub(crate) async fn wait_gate(&self) {
        if let Some(eos) = &self.eos {
            eos.gate.released(self).await;
        }
    }

    /// Waits while a commit drains this core's events in flight (the fetch loops call it
    /// before each fetch).
    pub(crate) async fn wait_drained(&self) {
        if let Some(eos) = &self.eos {
            eos.draining.released(self).await;
        }
    }

    /// Under exactly-once, stops the fetches and waits until every event taken is acked:
    /// `Some(drain)` then, with nothing taken until the drain is dropped; `None` when events
    /// stayed in flight past the limit (the commit is tried again later). Without
    /// exactly-once, `None` at once: there is nothing to drain ([`CoreRuntime::eos`] tells).
    pub(crate) async fn drain(&self) -> Option<Held<'_>> {
        let eos = self.eos.as_ref()?;
        let drain = eos.draining.hold();
        let deadline = Instant::now() + DRAIN_LIMIT;
        loop {
            if self.acks.borrow().values().all(|t| t.settled()) {
                return Some(drain);
            }
            if Instant::now() >= deadline || self.stopping.is_cancelled() {
                tracing::warn!(
                    core = self.index,
                    "events stayed in flight for {DRAIN_LIMIT:?}: this exactly-once commit waits for the next round"
                );
                return None;
            }
            glommio::timer::sleep(Duration::from_micros(200)).await;
        }
    }

    /// This core's transactions, under exactly-once.
    pub(crate) fn eos(&self) -> Option<&Eos> {
        self.eos.as_ref()
    }
}
