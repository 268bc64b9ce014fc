//! A hierarchical timer wheel: the deadlines at which a windowed table closes its windows,
//! keyed by a partition's stream time (integer milliseconds, any `i64`).
//!
//! Times are mapped to `u64` by flipping the sign bit ([`enc`]), which keeps their order, so
//! `i64::MIN..=i64::MAX` becomes `0..=u64::MAX` and no difference can overflow. The wheel has
//! [`LEVELS`] levels of 64 slots; a slot of level `l` spans `64^l` ms. A timer goes to the level
//! of the highest 6-bit digit in which its deadline differs from the wheel's time, and to the
//! slot given by the deadline's digit at that level; each level has a `u64` bitmap of its
//! non-empty slots. Entries live in a slab with a free list, each slot being an intrusive doubly
//! linked list through it, so arming and cancelling are O(1).
//!
//! Invariants, with `now` the wheel's (encoded) time, between calls:
//! 1. A timer at level `l > 0` has a deadline that agrees with `now` on every digit above `l`
//!    and is greater in digit `l`: its slot lies strictly after `now`'s slot at that level. So
//!    every timer at level `l` is later than anything level `l - 1` can hold, and the first
//!    occupied slot of the lowest occupied level holds the earliest deadline.
//! 2. A timer at level 0 has a deadline in `now`'s 64 ms block; deadlines `<= now` (armed in the
//!    past) all sit in `now`'s own level-0 slot and are due at the next [`TimerWheel::advance`].
//!
//! `advance` repeatedly takes the earliest occupied slot (found from the bitmaps, lowest level
//! first) while its start is not after the target time, moves `now` to that start, and either
//! fires it (level 0) or re-inserts its timers, which then land in lower levels (a cascade).
//! `now` never jumps past an occupied slot's start without processing it, which keeps
//! invariant 1; a jump of any length costs O(levels) per fired or cascaded timer, never
//! O(elapsed milliseconds). Fired timers are sorted by (deadline, arm sequence number), which
//! gives ascending deadlines with ties in arm order whatever path they took through the wheel.

/// Bits of the (encoded) time each level resolves.
const BITS: u32 = 6;
/// Slots per level.
const SLOTS: usize = 1 << BITS;
/// Levels needed for any 64-bit distance: `ceil(64 / 6)`; the top one uses only 4 of its bits.
const LEVELS: usize = 11;
/// "No entry" in the intrusive links and the free list.
const NIL: usize = usize::MAX;

/// Maps an `i64` time to a `u64` with the same order (flips the sign bit).
const fn enc(t: i64) -> u64 {
    (t as u64) ^ (1 << 63)
}

/// The inverse of [`enc`].
const fn dec(t: u64) -> i64 {
    (t ^ (1 << 63)) as i64
}

/// The slot a time falls in at `level`: its 6-bit digit there.
const fn digit(t: u64, level: usize) -> usize {
    ((t >> (BITS as usize * level)) & (SLOTS as u64 - 1)) as usize
}

/// The first instant of `slot` at `level`, in the block of `now` one level up.
fn slot_start(now: u64, level: usize, slot: usize) -> u64 {
    let shift = BITS * level as u32;
    // Above the top level there is no block: the mask is empty (a shift by 64+ would panic).
    let block = u64::MAX.checked_shl(shift + BITS).unwrap_or(0);
    (now & block) | ((slot as u64) << shift)
}

/// An armed timer's handle: its slab index and the generation of that slab entry, so a handle
/// kept after its timer fired or was cancelled never cancels a later timer in the same entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct TimerId {
    /// The slab index.
    index: usize,
    /// The entry's generation when the timer was armed.
    generation: u64,
}

/// One slab entry: an armed timer, or a vacant entry on the free list.
#[derive(Debug)]
struct Entry<T> {
    /// The payload; `None` when the entry is vacant.
    item: Option<T>,
    /// The encoded deadline.
    deadline: u64,
    /// Arm order, to break ties between equal deadlines.
    seq: u64,
    /// Bumped every time the entry is freed, invalidating old [`TimerId`]s.
    generation: u64,
    /// The previous entry in the slot's list (`NIL` at its head).
    prev: usize,
    /// The next entry in the slot's list, or in the free list when vacant.
    next: usize,
    /// The level the timer is in.
    level: u8,
    /// The slot the timer is in.
    slot: u8,
}

/// One level of the wheel.
#[derive(Debug)]
struct Level {
    /// Bit `s` is set iff slot `s` is non-empty.
    occupied: u64,
    /// The head of each slot's list.
    heads: [usize; SLOTS],
}

/// A hierarchical timer wheel over `i64` millisecond deadlines (see the module docs).
#[derive(Debug)]
pub(crate) struct TimerWheel<T> {
    /// The wheel's time, encoded with [`enc`].
    now: u64,
    /// The levels, 0 (1 ms slots) first.
    levels: Vec<Level>,
    /// The slab of entries.
    entries: Vec<Entry<T>>,
    /// The first vacant entry, chained through `next`.
    free: usize,
    /// Armed timers.
    len: usize,
    /// The next arm sequence number.
    seq: u64,
    /// Fired timers of the current `advance`, before sorting; empty between calls (kept to
    /// reuse its allocation).
    due: Vec<(u64, u64, T)>,
}

impl<T> TimerWheel<T> {
    /// An empty wheel whose time is `now`.
    pub(crate) fn new(now: i64) -> Self {
        let levels = (0..LEVELS).map(|_| Level { occupied: 0, heads: [NIL; SLOTS] }).collect();
        TimerWheel { now: enc(now), levels, entries: Vec::new(), free: NIL, len: 0, seq: 0, due: Vec::new() }
    }

    // Used by the tests' model checks; windowed tables need only arm, cancel and advance.
    #[cfg(test)]
    /// The wheel's time: the highest time it has been advanced to (or created with).
    pub(crate) fn now(&self) -> i64 {
        dec(self.now)
    }

    // Used by the tests' model checks; windowed tables need only arm, cancel and advance.
    #[cfg(test)]
    /// The number of armed timers.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    // Used by the tests' model checks; windowed tables need only arm, cancel and advance.
    #[cfg(test)]
    /// Whether no timer is armed.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Arms a timer firing once time reaches `deadline`; a deadline not after [`Self::now`] fires
    /// at the next [`Self::advance`]. O(1) (amortized, for the slab's growth).
    pub(crate) fn arm(&mut self, deadline: i64, item: T) -> TimerId {
        let seq = self.seq;
        // 2^64 arms cannot happen; wrapping only avoids a debug-build overflow check.
        self.seq = self.seq.wrapping_add(1);
        let index = if self.free != NIL {
            let index = self.free;
            let e = &mut self.entries[index];
            self.free = e.next;
            e.item = Some(item);
            e.deadline = enc(deadline);
            e.seq = seq;
            index
        } else {
            self.entries.push(Entry {
                item: Some(item),
                deadline: enc(deadline),
                seq,
                generation: 0,
                prev: NIL,
                next: NIL,
                level: 0,
                slot: 0,
            });
            self.entries.len() - 1
        };
        self.len += 1;
        self.link(index);
        TimerId { index, generation: self.entries[index].generation }
    }

    /// Cancels a timer, returning its item; `None` if it already fired or was cancelled (or the
    /// id is from another wheel's slab and names no armed timer here). O(1).
    pub(crate) fn cancel(&mut self, id: TimerId) -> Option<T> {
        let e = self.entries.get(id.index)?;
        if e.generation != id.generation || e.item.is_none() {
            return None;
        }
        self.unlink(id.index);
        let (_, item) = self.release(id.index);
        Some(item)
    }

    /// Moves the wheel's time to `now` (a lower `now` leaves it where it is: time never goes
    /// back) and appends every timer with a deadline not after the wheel's time to `fired`, as
    /// `(deadline, item)` in ascending deadline order, ties in arm order.
    pub(crate) fn advance(&mut self, now: i64, fired: &mut Vec<(i64, T)>) {
        let target = enc(now).max(self.now);
        while let Some((level, slot, at)) = self.next_event() {
            if at > target {
                break;
            }
            // `at >= self.now` (next_event clamps it), so time only moves forward.
            self.now = at;
            let lvl = &mut self.levels[level];
            let mut index = std::mem::replace(&mut lvl.heads[slot], NIL);
            lvl.occupied &= !(1 << slot);
            while index != NIL {
                let next = self.entries[index].next;
                if level == 0 {
                    // A level-0 slot at `now` holds only deadlines <= now (invariant 2).
                    let seq = self.entries[index].seq;
                    let (deadline, item) = self.release(index);
                    self.due.push((deadline, seq, item));
                } else {
                    // The slot spans [at, at + 64^level) and `now == at`, so the timer lands in
                    // a lower level: no slot is processed twice and the loop ends.
                    self.link(index);
                    debug_assert!((self.entries[index].level as usize) < level, "a cascade must move down");
                }
                index = next;
            }
        }
        // Every slot left starts after `target` (the loop's exit), so moving `now` there keeps
        // invariant 1: `target` lies between the old `now` and those starts, sharing their
        // higher digits.
        self.now = target;
        self.due.sort_unstable_by_key(|&(deadline, seq, _)| (deadline, seq));
        fired.extend(self.due.drain(..).map(|(deadline, _, item)| (dec(deadline), item)));
    }

    // Used by the tests' model checks; windowed tables need only arm, cancel and advance.
    #[cfg(test)]
    /// The earliest armed deadline, exactly. O(levels + timers in the earliest occupied slot):
    /// a level-0 slot ahead of `now` holds one deadline, others need a scan of their list.
    pub(crate) fn next_deadline(&self) -> Option<i64> {
        let (level, slot, at) = self.next_event()?;
        if level == 0 && at > self.now {
            return Some(dec(at));
        }
        let mut min = u64::MAX;
        let mut index = self.levels[level].heads[slot];
        while index != NIL {
            min = min.min(self.entries[index].deadline);
            index = self.entries[index].next;
        }
        Some(dec(min))
    }

    // Used by the tests' model checks; windowed tables need only arm, cancel and advance.
    #[cfg(test)]
    /// Removes every armed timer, returning them in ascending deadline order (ties in arm
    /// order). Old ids stay invalid. O(slab size).
    pub(crate) fn clear(&mut self) -> Vec<(i64, T)> {
        let mut all = Vec::with_capacity(self.len);
        for index in 0..self.entries.len() {
            if self.entries[index].item.is_some() {
                let seq = self.entries[index].seq;
                let (deadline, item) = self.release(index);
                all.push((deadline, seq, item));
            }
        }
        for level in &mut self.levels {
            level.occupied = 0;
            level.heads = [NIL; SLOTS];
        }
        all.sort_unstable_by_key(|&(deadline, seq, _)| (deadline, seq));
        all.into_iter().map(|(deadline, _, item)| (dec(deadline), item)).collect()
    }

    /// The earliest occupied slot as `(level, slot, start)`, its start clamped to `now`.
    /// By invariant 1, the lowest occupied level's first slot at or after `now`'s is the
    /// earliest one.
    fn next_event(&self) -> Option<(usize, usize, u64)> {
        for (level, lvl) in self.levels.iter().enumerate() {
            if lvl.occupied == 0 {
                continue;
            }
            let ahead = lvl.occupied & (u64::MAX << digit(self.now, level));
            // Slots behind `now`'s cannot be occupied (invariants 1 and 2). Should one be, it is
            // taken as due now rather than left stranded.
            debug_assert!(ahead != 0, "occupied slot behind the wheel's time");
            let bits = if ahead != 0 { ahead } else { lvl.occupied };
            let slot = bits.trailing_zeros() as usize;
            return Some((level, slot, slot_start(self.now, level, slot).max(self.now)));
        }
        None
    }

    /// Puts entry `index` (armed, unlinked) into the slot its deadline gives relative to `now`.
    fn link(&mut self, index: usize) {
        let deadline = self.entries[index].deadline;
        let (level, slot) = if deadline <= self.now {
            // Already due: `now`'s own level-0 slot, which the next advance fires first.
            (0, digit(self.now, 0))
        } else {
            // The highest differing digit; `| 63` makes the result at least level 0.
            let top_bit = 63 - ((self.now ^ deadline) | (SLOTS as u64 - 1)).leading_zeros();
            let level = (top_bit / BITS) as usize;
            (level, digit(deadline, level))
        };
        debug_assert!(level < LEVELS);
        let lvl = &mut self.levels[level];
        let head = lvl.heads[slot];
        lvl.heads[slot] = index;
        lvl.occupied |= 1 << slot;
        if head != NIL {
            self.entries[head].prev = index;
        }
        let e = &mut self.entries[index];
        e.prev = NIL;
        e.next = head;
        // Both fit: level < 11 and slot < 64.
        e.level = level as u8;
        e.slot = slot as u8;
    }

    /// Takes entry `index` out of its slot's list.
    fn unlink(&mut self, index: usize) {
        let Entry { prev, next, level, slot, .. } = self.entries[index];
        let (level, slot) = (level as usize, slot as usize);
        if prev != NIL {
            self.entries[prev].next = next;
        } else {
            self.levels[level].heads[slot] = next;
            if next == NIL {
                self.levels[level].occupied &= !(1 << slot);
            }
        }
        if next != NIL {
            self.entries[next].prev = prev;
        }
    }

    /// Frees entry `index` (armed, already out of any slot list) and returns its deadline
    /// (encoded) and item.
    fn release(&mut self, index: usize) -> (u64, T) {
        let e = &mut self.entries[index];
        // Invariant: callers pass only armed entries (checked by `cancel`, or taken from a slot
        // list, which holds only armed entries).
        let item = e.item.take().expect("released a vacant timer entry");
        e.generation = e.generation.wrapping_add(1);
        e.next = self.free;
        self.free = index;
        self.len -= 1;
        (e.deadline, item)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// Advances `w` to `now` and returns what fired.
    fn fire(w: &mut TimerWheel<u32>, now: i64) -> Vec<(i64, u32)> {
        let mut fired = Vec::new();
        w.advance(now, &mut fired);
        fired
    }

    #[test]
    fn arm_and_advance_fire_in_deadline_order() {
        let mut w = TimerWheel::new(0);
        for (i, d) in [500, 3, 70, 64, 63, 4096, 1].into_iter().enumerate() {
            w.arm(d, i as u32);
        }
        assert_eq!(w.len(), 7);
        assert_eq!(w.next_deadline(), Some(1));
        assert_eq!(fire(&mut w, 0), vec![]);
        assert_eq!(fire(&mut w, 64), vec![(1, 6), (3, 1), (63, 4), (64, 3)]);
        assert_eq!(w.next_deadline(), Some(70));
        assert_eq!(fire(&mut w, 4095), vec![(70, 2), (500, 0)]);
        assert_eq!(fire(&mut w, 4096), vec![(4096, 5)]);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
        assert_eq!(w.now(), 4096);
    }

    #[test]
    fn past_deadline_fires_at_next_advance_and_time_never_goes_back() {
        let mut w = TimerWheel::new(1_000);
        w.arm(1_000, 0);
        w.arm(-7, 1);
        w.arm(i64::MIN, 2);
        assert_eq!(w.next_deadline(), Some(i64::MIN));
        // A lower time fires what is due at the wheel's time and leaves the time alone.
        assert_eq!(fire(&mut w, 0), vec![(i64::MIN, 2), (-7, 1), (1_000, 0)]);
        assert_eq!(w.now(), 1_000);
        w.arm(1_001, 3);
        assert_eq!(fire(&mut w, 5), vec![]);
        assert_eq!(fire(&mut w, 1_001), vec![(1_001, 3)]);
    }

    #[test]
    fn cancel_before_and_after_fire() {
        let mut w = TimerWheel::new(0);
        let a = w.arm(10, 1);
        let b = w.arm(1 << 40, 2);
        let c = w.arm(10, 3);
        assert_eq!(w.cancel(b), Some(2));
        assert_eq!(w.cancel(b), None);
        assert_eq!(w.next_deadline(), Some(10));
        assert_eq!(w.cancel(a), Some(1));
        assert_eq!(fire(&mut w, 1 << 41), vec![(10, 3)]);
        assert_eq!(w.cancel(c), None);
        assert!(w.is_empty());
    }

    #[test]
    fn stale_id_does_not_cancel_a_reused_entry() {
        let mut w = TimerWheel::new(0);
        let old = w.arm(5, 1);
        assert_eq!(fire(&mut w, 5), vec![(5, 1)]);
        let new = w.arm(6, 2);
        assert_eq!(new.index, old.index, "the entry is reused");
        assert_eq!(w.cancel(old), None);
        let cancelled = w.arm(7, 3);
        assert_eq!(w.cancel(cancelled), Some(3));
        assert_eq!(w.cancel(cancelled), None);
        assert_eq!(w.clear(), vec![(6, 2)]);
        assert_eq!(w.cancel(new), None);
        assert_eq!(w.cancel(TimerId { index: 99, generation: 0 }), None);
    }

    #[test]
    fn huge_jumps_fire_exactly_the_due_timers() {
        const T: i64 = 1_700_000_000_000;
        const DAY: i64 = 86_400_000;
        let mut w = TimerWheel::new(0);
        for (i, d) in [T + 1, T, T - 1, T + DAY, T + DAY + 1, i64::MAX].into_iter().enumerate() {
            w.arm(d, i as u32);
        }
        assert_eq!(fire(&mut w, T), vec![(T - 1, 2), (T, 1)]);
        assert_eq!(w.next_deadline(), Some(T + 1));
        assert_eq!(fire(&mut w, T + DAY), vec![(T + 1, 0), (T + DAY, 3)]);
        assert_eq!(fire(&mut w, i64::MAX - 1), vec![(T + DAY + 1, 4)]);
        assert_eq!(fire(&mut w, i64::MAX), vec![(i64::MAX, 5)]);
        // At the end of time everything armed is due.
        w.arm(0, 6);
        w.arm(i64::MAX, 7);
        assert_eq!(fire(&mut w, i64::MAX), vec![(0, 6), (i64::MAX, 7)]);
    }

    #[test]
    fn negative_and_extreme_times() {
        let mut w = TimerWheel::new(i64::MIN);
        for (i, d) in [i64::MAX - 1, -1, i64::MIN + 1, i64::MIN, -1_700_000_000_000, 0].into_iter().enumerate() {
            w.arm(d, i as u32);
        }
        assert_eq!(w.next_deadline(), Some(i64::MIN));
        assert_eq!(fire(&mut w, i64::MIN + 1), vec![(i64::MIN, 3), (i64::MIN + 1, 2)]);
        assert_eq!(fire(&mut w, -2), vec![(-1_700_000_000_000, 4)]);
        assert_eq!(fire(&mut w, 0), vec![(-1, 1), (0, 5)]);
        assert_eq!(w.next_deadline(), Some(i64::MAX - 1));
        assert_eq!(fire(&mut w, i64::MAX - 2), vec![]);
        assert_eq!(fire(&mut w, i64::MAX - 1), vec![(i64::MAX - 1, 0)]);
    }

    #[test]
    fn equal_deadlines_keep_arm_order_across_cascades() {
        let mut w = TimerWheel::new(0);
        let d = 300_000;
        // Armed at different wheel times, so they sit in different levels until cascaded.
        let mut expected = Vec::new();
        for i in 0..1_000u32 {
            if i % 100 == 0 {
                assert_eq!(fire(&mut w, i64::from(i) * 299), vec![]);
            }
            w.arm(d, i);
            expected.push((d, i));
        }
        w.arm(d - 1, 5_000);
        expected.insert(0, (d - 1, 5_000));
        assert_eq!(fire(&mut w, d), expected);
    }

    /// One step of the model test; the deadlines and times are relative to the wheel's time.
    #[derive(Debug, Clone)]
    enum Op {
        Arm(i64),
        Cancel(usize),
        /// Advance by a step (`false`) or to an absolute time (`true`).
        Advance(bool, i64),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        let offset = prop_oneof![
            4 => -100i64..300,
            2 => -5_000i64..300_000,
            2 => -(1i64 << 45)..(1i64 << 45),
            1 => any::<i64>(),
        ];
        prop_oneof![
            8 => offset.clone().prop_map(Op::Arm),
            3 => any::<usize>().prop_map(Op::Cancel),
            4 => prop_oneof![4 => -10i64..200, 2 => 0i64..1_000_000, 1 => 0i64..(1i64 << 50)]
                .prop_map(|step| Op::Advance(false, step)),
            1 => any::<i64>().prop_map(|to| Op::Advance(true, to)),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn matches_a_sorted_map_model(start in prop_oneof![Just(0i64), any::<i64>()], ops in prop::collection::vec(op(), 1..300)) {
            let mut w = TimerWheel::new(start);
            let mut model: BTreeMap<(i64, u64), u64> = BTreeMap::new();
            let mut ids: Vec<(TimerId, (i64, u64))> = Vec::new();
            let mut now = start;
            let mut seq = 0u64;
            for op in ops {
                match op {
                    Op::Arm(offset) => {
                        let deadline = now.saturating_add(offset);
                        let id = w.arm(deadline, seq);
                        model.insert((deadline, seq), seq);
                        ids.push((id, (deadline, seq)));
                        seq += 1;
                    }
                    Op::Cancel(pick) if !ids.is_empty() => {
                        let (id, key) = ids[pick % ids.len()];
                        prop_assert_eq!(w.cancel(id), model.remove(&key));
                    }
                    Op::Cancel(_) => {}
                    Op::Advance(absolute, t) => {
                        let to = if absolute { t } else { now.saturating_add(t) };
                        now = now.max(to);
                        let mut fired = vec![(1, u64::MAX)]; // `advance` appends
                        w.advance(to, &mut fired);
                        let mut expected = vec![(1, u64::MAX)];
                        expected.extend(model.range(..=(now, u64::MAX)).map(|(&(d, _), &v)| (d, v)));
                        model.retain(|&(d, _), _| d > now);
                        prop_assert_eq!(fired, expected);
                        prop_assert_eq!(w.now(), now);
                    }
                    Op::Clear => {
                        let all: Vec<_> = model.iter().map(|(&(d, _), &v)| (d, v)).collect();
                        prop_assert_eq!(w.clear(), all);
                        model.clear();
                    }
                }
                prop_assert_eq!(w.len(), model.len());
                prop_assert_eq!(w.is_empty(), model.is_empty());
                prop_assert_eq!(w.next_deadline(), model.keys().next().map(|&(d, _)| d));
            }
        }
    }
}
