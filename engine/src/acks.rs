//! Per-partition ack tracking: which offset may be committed.
//!
//! Events of a partition are delivered in offset order, but acked in any order (agents with
//! `concurrency > 1`, manual acks). The committable offset is one past the highest offset
//! below which *every delivered event* was acked. Only delivered offsets are tracked, so gaps
//! in the log (compaction, transaction markers, records skipped by the decode-error policy)
//! never hold a commit back — Faust's offset-gap bugs (faust-streaming#312, #606) — and
//! memory grows with the events in flight, never with the span of offsets (faust#86 built a
//! set of 2.3 billion offsets to fill a gap).

use std::collections::VecDeque;

/// The ack state of one partition. Single-core: lives on the partition's core.
#[derive(Debug, Clone)]
pub(crate) struct AckTracker {
    /// Delivered, not yet retired events, in offset order: (offset, acked).
    in_flight: VecDeque<(u64, bool)>,
    /// One past the highest offset the consumer has moved beyond: every offset below it was
    /// delivered or deliberately not delivered.
    position: u64,
    /// What may be committed now: every event below it was acked or never delivered.
    committable: u64,
    /// The monitor's sample of this partition's event latency, while its event is in flight.
    sample: Option<LatencySample>,
}

/// One event the monitor follows from its fetch to its ack (one per partition at a time, so
/// the per-event path pays a branch, not a clock read).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LatencySample {
    /// The event's offset.
    pub(crate) offset: u64,
    /// When the event was fetched.
    pub(crate) fetched_at: std::time::Instant,
    /// The record's timestamp (milliseconds since the epoch).
    pub(crate) timestamp_ms: i64,
}

/// What an ack did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acked {
    /// The offset was in flight and is now acked.
    Acked,
    /// It was acked before, or never delivered through this tracker (a stale event).
    Ignored,
}

impl AckTracker {
    /// A tracker for a partition whose consumption starts at `start` (the committed offset).
    pub(crate) fn new(start: u64) -> Self {
        AckTracker { in_flight: VecDeque::new(), position: start, committable: start, sample: None }
    }

    /// Records that the event at `offset` was handed to a stream. Offsets must increase.
    pub(crate) fn delivered(&mut self, offset: u64) {
        debug_assert!(offset >= self.position, "offset {offset} delivered after position {}", self.position);
        self.in_flight.push_back((offset, false));
        self.position = offset + 1;
    }

    /// Records that every offset below `next` has been read, whether or not it was delivered
    /// (the consumer calls it with a fetch's next offset, which covers gaps).
    pub(crate) fn read_through(&mut self, next: u64) {
        if next > self.position {
            self.position = next;
        }
        self.retire();
    }

    /// Acks the event at `offset`.
    pub(crate) fn ack(&mut self, offset: u64) -> Acked {
        let front = match self.in_flight.front() {
            Some(&(o, _)) => o,
            None => return Acked::Ignored,
        };
        if offset < front {
            return Acked::Ignored;
        }
        // Offsets are increasing: in-order acks hit the front (or the slot `offset - front`
        // when there are no gaps); otherwise binary search.
        let i = match offset - front {
            d if (d as usize) < self.in_flight.len() && self.in_flight[d as usize].0 == offset => d as usize,
            _ => match self.in_flight.binary_search_by_key(&offset, |&(o, _)| o) {
                Ok(i) => i,
                Err(_) => return Acked::Ignored,
            },
        };
        if self.in_flight[i].1 {
            return Acked::Ignored;
        }
        self.in_flight[i].1 = true;
        if i == 0 {
            self.retire();
        }
        Acked::Acked
    }

    fn retire(&mut self) {
        while let Some(&(_, true)) = self.in_flight.front() {
            self.in_flight.pop_front();
        }
        self.committable = match self.in_flight.front() {
            Some(&(o, _)) => o,
            None => self.position,
        };
    }

    /// One past the highest offset delivered or read through.
    /// Whether the event at `offset` (delivered to this tracker) was acked.
    pub(crate) fn is_acked(&self, offset: u64) -> bool {
        match self.in_flight.front() {
            Some(&(front, _)) if offset >= front => {
                self.in_flight.binary_search_by_key(&offset, |&(o, _)| o).is_ok_and(|i| self.in_flight[i].1)
            }
            // Retired (acked, with everything before it), or never in flight.
            _ => offset < self.committable,
        }
    }

    pub(crate) fn position(&self) -> u64 {
        self.position
    }

    /// The offset to commit: the next offset to process after a restart.
    pub(crate) fn committable(&self) -> u64 {
        self.committable
    }

    /// Follows `sample` unless a sample is in flight already.
    pub(crate) fn arm_sample(&mut self, sample: LatencySample) {
        if self.sample.is_none() {
            self.sample = Some(sample);
        }
    }

    /// The sample in flight, once its event and every event before it were acked.
    pub(crate) fn take_finished_sample(&mut self) -> Option<LatencySample> {
        match self.sample {
            Some(s) if self.committable > s.offset => self.sample.take(),
            _ => None,
        }
    }

    /// Whether every event delivered was acked (nothing in flight).
    pub(crate) fn settled(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Events delivered and not yet acked.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.in_flight.iter().filter(|(_, acked)| !acked).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn out_of_order_acks_commit_only_the_contiguous_prefix() {
        let mut t = AckTracker::new(10);
        for o in [10, 11, 12, 13] {
            t.delivered(o);
        }
        assert_eq!(t.committable(), 10);
        assert_eq!(t.ack(12), Acked::Acked);
        assert_eq!(t.committable(), 10, "10 and 11 are still in flight");
        t.ack(10);
        assert_eq!(t.committable(), 11);
        t.ack(11);
        assert_eq!(t.committable(), 13);
        assert_eq!(t.ack(11), Acked::Ignored, "a second ack changes nothing");
        t.ack(13);
        assert_eq!(t.committable(), 14);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn a_latency_sample_finishes_when_its_event_and_those_before_it_are_acked() {
        let mut t = AckTracker::new(0);
        for o in 0..3 {
            t.delivered(o);
        }
        let fetched_at = std::time::Instant::now();
        t.arm_sample(LatencySample { offset: 2, fetched_at, timestamp_ms: 7 });
        t.arm_sample(LatencySample { offset: 99, fetched_at, timestamp_ms: 8 }); // one at a time
        t.ack(2);
        t.ack(0);
        assert!(t.take_finished_sample().is_none(), "offset 1 is still in flight");
        t.ack(1);
        let s = t.take_finished_sample().expect("finished");
        assert_eq!((s.offset, s.timestamp_ms), (2, 7));
        assert!(t.take_finished_sample().is_none(), "taken once");
    }

    #[test]
    fn gaps_do_not_hold_commits_back_and_cost_no_memory() {
        let mut t = AckTracker::new(0);
        t.delivered(5);
        t.delivered(1_000_000_000); // a compacted stretch of a billion offsets
        t.read_through(3_000_000_000);
        t.ack(5);
        assert_eq!(t.committable(), 1_000_000_000);
        t.ack(1_000_000_000);
        assert_eq!(t.committable(), 3_000_000_000, "the fetch read through the tail gap");
        assert!(t.in_flight.capacity() < 64);
    }

    #[test]
    fn nothing_delivered_commits_the_read_position() {
        let mut t = AckTracker::new(7);
        t.read_through(9); // two records skipped by the error policy, say
        assert_eq!(t.committable(), 9);
        assert_eq!(t.ack(8), Acked::Ignored);
    }

    proptest! {
        /// Against a model: the committable offset is the smallest unacked delivered offset,
        /// or the read position when every delivered event was acked.
        #[test]
        fn matches_the_model(gaps in proptest::collection::vec(1u64..5, 1..60), order in any::<proptest::sample::Index>(), acks in proptest::collection::vec(any::<proptest::sample::Index>(), 0..80)) {
            let mut t = AckTracker::new(0);
            let mut offsets = Vec::new();
            let mut next = 0u64;
            for g in &gaps {
                next += g - 1;
                t.delivered(next);
                offsets.push(next);
                next += 1;
            }
            t.read_through(next + order.index(3) as u64);
            let position = t.position;
            let mut acked = std::collections::BTreeSet::new();
            for a in &acks {
                let o = offsets[a.index(offsets.len())];
                let first = acked.insert(o);
                prop_assert_eq!(t.ack(o) == Acked::Acked, first);
                let expected = offsets.iter().copied().find(|o| !acked.contains(o)).unwrap_or(position);
                prop_assert_eq!(t.committable(), expected);
                prop_assert_eq!(t.pending(), offsets.len() - acked.len());
            }
        }
    }
}
