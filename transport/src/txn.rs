//! Exactly-once outputs on `local://`: records written inside a producer's transaction, and
//! which of them readers may see.
//!
//! Under `processing_guarantee = exactly_once` every record a worker core sends carries a
//! `faust-txn` header: the writing process's *incarnation* (a number unique to each start of
//! the worker), the core, and the core's transaction number — the number of the commit that
//! will cover the events that made it. A core's commit writes, in the same offsets file as
//! its source offsets and changelog ends (so in the same atomic rename), the line
//! `__faust-txn-{incarnation}  {core}  {txn}`: from then on its records up to that
//! transaction are committed.
//!
//! A reader (a `local://` fetch) then sees a tagged record only once it is committed: a record
//! of a transaction still open *in this process* stops the read there (like Kafka's last
//! stable offset: later records wait behind it, in order), and a record of another
//! incarnation past what that incarnation committed is skipped for good — that process died
//! before committing it, so it is aborted, and the events behind it were processed again
//! under a new incarnation. Untagged records (at-least-once producers, changelogs) are always
//! visible.
//!
//! The invariant this gives: a record is visible to readers if and only if the commit that
//! covers the events it came from is durable. The lines of old incarnations stay in the
//! offsets file, a few bytes per start of the worker: without them their committed records
//! could not be told from aborted ones.

use std::collections::HashMap;
use std::sync::RwLock;

use event_listener::Event;
use faust_storage::Record;

use crate::types::TopicPartition;

/// The header that marks a record as written in a transaction.
pub const TXN_HEADER: &[u8] = b"faust-txn";

/// Offsets entries `__faust-txn-{incarnation}` (partition: the core) hold the last committed
/// transaction of each core of each incarnation.
pub const TXN_OFFSETS_PREFIX: &str = "__faust-txn-";

/// Who wrote a record in which transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TxnTag {
    /// The writing process's incarnation.
    pub incarnation: u64,
    /// The writing core.
    pub core: u32,
    /// The transaction: the number of the commit that covers the record's events.
    pub txn: u64,
}

impl TxnTag {
    /// The header value: incarnation, core and transaction, big-endian.
    pub fn encode(&self) -> [u8; 20] {
        let mut out = [0u8; 20];
        out[..8].copy_from_slice(&self.incarnation.to_be_bytes());
        out[8..12].copy_from_slice(&self.core.to_be_bytes());
        out[12..].copy_from_slice(&self.txn.to_be_bytes());
        out
    }

    /// Reads a header value; `None` unless it is exactly 20 bytes.
    pub fn decode(value: &[u8]) -> Option<TxnTag> {
        let value: &[u8; 20] = value.try_into().ok()?;
        let (incarnation, rest) = value.split_at(8);
        let (core, txn) = rest.split_at(4);
        Some(TxnTag {
            incarnation: u64::from_be_bytes(incarnation.try_into().ok()?),
            core: u32::from_be_bytes(core.try_into().ok()?),
            txn: u64::from_be_bytes(txn.try_into().ok()?),
        })
    }

    /// The tag of `record`, if it has one.
    pub fn of(record: &Record) -> Option<TxnTag> {
        record.headers().find(|(name, _)| *name == TXN_HEADER).and_then(|(_, v)| v).and_then(TxnTag::decode)
    }

    /// The offsets entry that commits this core's transactions up to `self.txn`.
    pub fn offsets_entry(&self) -> (TopicPartition, u64) {
        (TopicPartition::new(format!("{TXN_OFFSETS_PREFIX}{}", self.incarnation).as_str(), self.core), self.txn)
    }
}

/// What a reader may do with a tagged record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Visibility {
    /// Its transaction committed.
    Visible,
    /// Its transaction is still open in this process: the read stops before it.
    Open,
    /// Its writer died before committing it: never to be seen.
    Aborted,
}

/// The committed transactions of every incarnation, and this process's incarnation.
#[derive(Debug)]
pub(crate) struct TxnBook {
    incarnation: u64,
    committed: RwLock<HashMap<(u64, u32), u64>>,
    /// Notified whenever a commit moves a transaction forward (readers waiting behind an
    /// open one try again).
    pub(crate) moved: Event,
}

impl TxnBook {
    /// A book holding the entries of `offsets` (every group's committed offsets), with an
    /// incarnation greater than any of theirs.
    pub(crate) fn new<'a>(offsets: impl IntoIterator<Item = (&'a TopicPartition, &'a u64)>) -> TxnBook {
        let mut committed = HashMap::new();
        for (tp, txn) in offsets {
            if let Some(incarnation) = incarnation_of(tp) {
                let entry = committed.entry((incarnation, tp.partition)).or_insert(0);
                *entry = (*entry).max(*txn);
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64);
        let newest = committed.keys().map(|(i, _)| *i).max().unwrap_or(0);
        TxnBook { incarnation: now.max(newest + 1), committed: RwLock::new(committed), moved: Event::new() }
    }

    /// This process's incarnation.
    pub(crate) fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Takes the transaction entries of a commit that is now durable.
    pub(crate) fn committed(&self, offsets: &[(TopicPartition, u64)]) {
        let mut moved = false;
        {
            let mut committed = self.committed.write().unwrap_or_else(|p| p.into_inner());
            for (tp, txn) in offsets {
                if let Some(incarnation) = incarnation_of(tp) {
                    let entry = committed.entry((incarnation, tp.partition)).or_insert(0);
                    if *txn > *entry {
                        *entry = *txn;
                        moved = true;
                    }
                }
            }
        }
        if moved {
            self.moved.notify(usize::MAX);
        }
    }

    /// What a reader may do with a record tagged `tag`.
    pub(crate) fn visibility(&self, tag: &TxnTag) -> Visibility {
        let committed = self.committed.read().unwrap_or_else(|p| p.into_inner());
        match committed.get(&(tag.incarnation, tag.core)) {
            Some(&c) if c >= tag.txn => Visibility::Visible,
            _ if tag.incarnation == self.incarnation => Visibility::Open,
            _ => Visibility::Aborted,
        }
    }
}

/// The incarnation an offsets entry is about, if it is a transaction entry.
fn incarnation_of(tp: &TopicPartition) -> Option<u64> {
    tp.topic.strip_prefix(TXN_OFFSETS_PREFIX)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_refuse_other_lengths() {
        let tag = TxnTag { incarnation: u64::MAX - 3, core: 7, txn: 1 << 40 };
        assert_eq!(TxnTag::decode(&tag.encode()), Some(tag));
        assert_eq!(TxnTag::decode(&tag.encode()[..19]), None);
        assert_eq!(TxnTag::decode(&[0u8; 21]), None);
    }

    #[test]
    fn open_committed_and_aborted() {
        let old = TxnTag { incarnation: 5, core: 0, txn: 3 };
        let (entry, txn) = TxnTag { txn: 2, ..old }.offsets_entry();
        let book = TxnBook::new([(&entry, &txn)]);
        assert!(book.incarnation() > 5);
        // Incarnation 5 committed up to 2: its 2 is visible, its 3 aborted, and so is all of
        // an incarnation that never committed.
        assert_eq!(book.visibility(&TxnTag { txn: 2, ..old }), Visibility::Visible);
        assert_eq!(book.visibility(&old), Visibility::Aborted);
        assert_eq!(book.visibility(&TxnTag { incarnation: 4, core: 0, txn: 1 }), Visibility::Aborted);
        // This process's transactions are open until committed.
        let ours = TxnTag { incarnation: book.incarnation(), core: 1, txn: 1 };
        assert_eq!(book.visibility(&ours), Visibility::Open);
        let listener = book.moved.listen();
        book.committed(&[ours.offsets_entry()]);
        assert_eq!(book.visibility(&ours), Visibility::Visible);
        assert_eq!(book.visibility(&TxnTag { txn: 2, ..ours }), Visibility::Open);
        drop(listener);
        // A commit never moves a core backwards.
        book.committed(&[TxnTag { txn: 0, ..ours }.offsets_entry()]);
        assert_eq!(book.visibility(&ours), Visibility::Visible);
    }
}
