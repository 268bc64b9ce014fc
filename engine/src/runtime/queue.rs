//! The queue between a core's consumers and one agent: a lane per partition, taken in turn.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use event_listener::{Event, IntoNotification};
use faust_storage::Record;
use faust_transport::TopicPartition;

/// An event waiting in an agent's queue: where it came from and the record.
#[derive(Debug, Clone)]
pub(crate) struct QueuedEvent {
    pub(crate) tp: TopicPartition,
    pub(crate) record: Record,
}

/// The queue between a core's consumers and one agent on that core: one bounded sub-queue
/// per partition, so back-pressure is per partition, and `pop` takes from the partitions in
/// turn, so one partition's backlog cannot starve the others (Faust round-robins the same
/// way).
#[derive(Debug)]
pub(crate) struct EventQueue {
    lanes: RefCell<Vec<Lane>>,
    /// The lane `pop` looks at first.
    next: Cell<usize>,
    capacity: usize,
    readable: Event,
    writable: Event,
    /// Readers (agent instances) and writers (consumers) waiting on the events above: a
    /// notification is only sent when someone waits, which keeps it off the per-event path.
    readers_waiting: Cell<usize>,
    writers_waiting: Cell<usize>,
    /// What was left in the lane of the event taken last.
    last_remaining: Cell<usize>,
    closed: Cell<bool>,
    /// Wake every waiting reader on new events, not one per event: set once readers take
    /// from one lane each (isolated partitions), where the reader woken must be the lane's.
    wake_all: Cell<bool>,
}

#[derive(Debug)]
struct Lane {
    tp: TopicPartition,
    events: VecDeque<QueuedEvent>,
    /// Counts the times the lane's partition was released from a reader of its own
    /// ([`EventQueue::retire`]): that reader's [`Scope::Partition`] names an older one.
    generation: u64,
}

/// Which of a queue's events a reader takes.
#[derive(Debug, Clone)]
pub(crate) enum Scope {
    /// Any partition's, in turn.
    All,
    /// One partition's, until the lane's generation moves past this one (the partition was
    /// released): the actor of an isolated partition.
    Partition(TopicPartition, u64),
    /// None: the reader only waits for the queue to close (a stream parked until the worker
    /// restarts its run).
    Nothing,
}

impl EventQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        EventQueue {
            lanes: RefCell::new(Vec::new()),
            next: Cell::new(0),
            capacity: capacity.max(1),
            readable: Event::new(),
            writable: Event::new(),
            readers_waiting: Cell::new(0),
            writers_waiting: Cell::new(0),
            last_remaining: Cell::new(0),
            closed: Cell::new(false),
            wake_all: Cell::new(false),
        }
    }

    /// Makes every new event wake every waiting reader (readers of one lane each).
    pub(crate) fn isolate(&self) {
        self.wake_all.set(true);
    }

    /// The scope of a reader of `tp` alone, from now until the partition is retired.
    pub(crate) fn partition_scope(&self, tp: &TopicPartition) -> Scope {
        let lane = self.lane(tp);
        Scope::Partition(tp.clone(), self.lanes.borrow()[lane].generation)
    }

    /// Ends the scope of `tp`'s reader: its waiting events are dropped (the partition was
    /// released) and its reader gets `None`.
    pub(crate) fn retire(&self, tp: &TopicPartition) {
        if let Some(lane) = self.lanes.borrow_mut().iter_mut().find(|l| l.tp == *tp) {
            lane.events.clear();
            lane.generation += 1;
        }
        self.readable.notify(usize::MAX);
    }

    /// The lane of `tp`, created on first use.
    pub(crate) fn lane(&self, tp: &TopicPartition) -> usize {
        let mut lanes = self.lanes.borrow_mut();
        if let Some(i) = lanes.iter().position(|l| l.tp == *tp) {
            return i;
        }
        lanes.push(Lane { tp: tp.clone(), events: VecDeque::new(), generation: 0 });
        lanes.len() - 1
    }

    pub(crate) fn push(&self, lane: usize, event: QueuedEvent) {
        if let Some(l) = self.lanes.borrow_mut().get_mut(lane) {
            l.events.push_back(event);
        }
    }

    /// Wakes readers for `pushed` new events: one more per event (instances of an agent with
    /// `concurrency` all wait here), even if some are woken and have not run yet. Called once
    /// per batch pushed, not per event, so the notification stays off the per-event path.
    pub(crate) fn wake(&self, pushed: usize) {
        let waiting = self.readers_waiting.get();
        if waiting > 0 && pushed > 0 {
            let n = if self.wake_all.get() { usize::MAX } else { pushed.min(waiting) };
            self.readable.notify(n.additional());
        }
    }

    /// Puts an event back at the front of its lane (an agent failed on it and is restarted),
    /// and makes its lane the next one served.
    pub(crate) fn push_front(&self, event: QueuedEvent) {
        let lane = self.lane(&event.tp);
        if let Some(l) = self.lanes.borrow_mut().get_mut(lane) {
            l.events.push_front(event);
        }
        self.next.set(lane);
        self.readable.notify(if self.wake_all.get() { usize::MAX } else { 1 });
    }

    pub(crate) fn take(&self) -> Option<QueuedEvent> {
        let mut lanes = self.lanes.borrow_mut();
        let n = lanes.len();
        for k in 0..n {
            let i = (self.next.get() + k) % n;
            if let Some(e) = lanes[i].events.pop_front() {
                self.next.set((i + 1) % n);
                self.last_remaining.set(lanes[i].events.len());
                return Some(e);
            }
        }
        None
    }

    /// The next event in `scope`, if one waits.
    fn take_in(&self, scope: &Scope) -> Option<QueuedEvent> {
        match scope {
            Scope::All => self.take(),
            Scope::Nothing => None,
            Scope::Partition(tp, generation) => {
                let mut lanes = self.lanes.borrow_mut();
                let lane = lanes.iter_mut().find(|l| l.tp == *tp && l.generation == *generation)?;
                let e = lane.events.pop_front()?;
                self.last_remaining.set(lane.events.len());
                Some(e)
            }
        }
    }

    /// Whether a reader of `scope` gets nothing more: the queue closed, or its partition was
    /// retired.
    fn ended(&self, scope: &Scope) -> bool {
        self.closed.get()
            || matches!(scope, Scope::Partition(tp, generation)
                if self.lanes.borrow().iter().any(|l| l.tp == *tp && l.generation != *generation))
    }

    /// Moves up to `max` waiting events of `scope` into `batch`, taking from the partitions
    /// in turn as `pop` does (a share of `max` from each at a time, so a backlog in one
    /// cannot starve the others); returns how many. Never waits.
    pub(crate) fn take_into(&self, batch: &mut VecDeque<QueuedEvent>, max: usize, scope: &Scope) -> usize {
        let mut lanes = self.lanes.borrow_mut();
        let mut taken = 0;
        // The fewest events left in a lane taken from: consumers are woken when it is low.
        let mut least_left = usize::MAX;
        let mut take = |lane: &mut Lane, n: usize| {
            let n = n.min(lane.events.len());
            batch.extend(lane.events.drain(..n));
            if n > 0 {
                least_left = least_left.min(lane.events.len());
            }
            n
        };
        match scope {
            Scope::Nothing => {}
            Scope::Partition(tp, generation) => {
                if let Some(lane) = lanes.iter_mut().find(|l| l.tp == *tp && l.generation == *generation) {
                    taken = take(lane, max);
                }
            }
            Scope::All => {
                let n = lanes.len();
                let share = max.div_ceil(n.max(1)).max(1);
                let (mut i, mut empty_in_a_row) = (self.next.get(), 0);
                while taken < max && empty_in_a_row < n {
                    i %= n;
                    match take(&mut lanes[i], share.min(max - taken)) {
                        0 => empty_in_a_row += 1,
                        k => (taken, empty_in_a_row) = (taken + k, 0),
                    }
                    i += 1;
                }
                if n > 0 {
                    self.next.set(i % n);
                }
            }
        }
        drop(lanes);
        if taken > 0 {
            self.last_remaining.set(least_left);
            self.taken();
        }
        taken
    }

    /// The next event of `scope`; `None` once the queue is closed and drained (or the
    /// scope's partition retired).
    pub(crate) async fn pop(&self, scope: &Scope) -> Option<QueuedEvent> {
        // The common case, an event waiting, without registering a listener.
        if let Some(e) = self.take_in(scope) {
            self.taken();
            return Some(e);
        }
        loop {
            let listener = self.readable.listen();
            if let Some(e) = self.take_in(scope) {
                self.taken();
                return Some(e);
            }
            if self.ended(scope) {
                return None;
            }
            self.readers_waiting.set(self.readers_waiting.get() + 1);
            // Counted down however the wait ends (the future may be dropped while waiting).
            let _waiting = WaitGuard(&self.readers_waiting);
            listener.await;
        }
    }

    /// After an event was taken: wakes consumers waiting for room once the lane is half
    /// empty, so a consumer refills it with a whole fetch rather than one event at a time.
    pub(crate) fn taken(&self) {
        if self.writers_waiting.get() > 0 && self.last_remaining.get() <= self.capacity / 2 {
            self.writable.notify(usize::MAX);
        }
    }

    /// Waits until `lane` has room (or the queue is closed).
    pub(crate) async fn room(&self, lane: usize) {
        let has_room = || {
            let len = self.lanes.borrow().get(lane).map_or(0, |l| l.events.len());
            len < self.capacity || self.closed.get()
        };
        while !has_room() {
            let listener = self.writable.listen();
            if has_room() {
                return;
            }
            self.writers_waiting.set(self.writers_waiting.get() + 1);
            let _waiting = WaitGuard(&self.writers_waiting);
            listener.await;
        }
    }

    /// Drops the events of `tp` waiting in the queue (its partition was released): returns
    /// how many, and the first one's offset.
    pub(crate) fn purge(&self, tp: &TopicPartition) -> (usize, Option<u64>) {
        let mut lanes = self.lanes.borrow_mut();
        let Some(lane) = lanes.iter_mut().find(|l| l.tp == *tp) else { return (0, None) };
        let first = lane.events.front().map(|e| e.record.offset);
        let n = lane.events.len();
        lane.events.clear();
        (n, first)
    }

    pub(crate) fn close(&self) {
        self.closed.set(true);
        self.readable.notify(usize::MAX);
        self.writable.notify(usize::MAX);
    }
}

/// Counts a waiter down when its wait ends.
struct WaitGuard<'a>(&'a Cell<usize>);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn event(tp: &TopicPartition, offset: u64) -> QueuedEvent {
        QueuedEvent { tp: tp.clone(), record: Record::new(offset, 0, None, None) }
    }

    #[test]
    fn a_batch_takes_a_share_from_each_partition_in_turn_and_keeps_each_ones_order() {
        let queue = EventQueue::new(1_000);
        let (a, b) = (TopicPartition::new(Arc::from("t"), 0), TopicPartition::new(Arc::from("t"), 1));
        let (la, lb) = (queue.lane(&a), queue.lane(&b));
        for o in 0..300 {
            queue.push(la, event(&a, o));
        }
        for o in 0..10 {
            queue.push(lb, event(&b, o));
        }
        let mut batch = VecDeque::new();
        assert_eq!(queue.take_into(&mut batch, 200, &Scope::All), 200);
        let of = |batch: &VecDeque<QueuedEvent>, tp: &TopicPartition| -> Vec<u64> {
            batch.iter().filter(|e| e.tp == *tp).map(|e| e.record.offset).collect()
        };
        // A share of 100 from `a`, all 10 of `b`, then `a` again for the rest.
        assert_eq!(of(&batch, &a), (0..190).collect::<Vec<_>>());
        assert_eq!(of(&batch, &b), (0..10).collect::<Vec<_>>());
        assert_eq!(batch[100].tp, b, "b's events come after a's first share");
        batch.clear();
        let scope = Scope::Partition(b.clone(), 0);
        assert_eq!(queue.take_into(&mut batch, 50, &scope), 0, "b is empty");
        assert_eq!(queue.take_into(&mut batch, 500, &Scope::All), 110);
        assert_eq!(of(&batch, &a), (190..300).collect::<Vec<_>>());
        assert_eq!(queue.take_into(&mut batch, 500, &Scope::Nothing), 0);
    }
}
