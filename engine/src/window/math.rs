//! The window math: which windows hold a timestamp, for each kind of window, in integer
//! milliseconds with half-open ranges `[start, end)`.
//!
//! Hopping and tumbling windows are placed exactly as Faust's `faust/windows.py` places them
//! (checked against Faust's own output in `tests/tests/window_faust.rs`): the windows that
//! hold `t` start at `floor(t / step) * step - size + step` and every `step` after it up to
//! `t`. When `size` is a multiple of `step` (always, for tumbling windows) the windows start
//! on multiples of `step`; otherwise their *ends* are. Faust writes a window's end as
//! `start + size - 0.1` seconds (inclusive); ours is `start + size`, exclusive: the same
//! instants. A sliding window is one range around each event, `[t - before, t + after)`, as
//! Faust's `SlidingWindow.ranges` gives. A session window is the span of a key's events no
//! more than `gap` apart: each event covers `[t, t + gap)`, and overlapping covers are one
//! session (see [`merge_sessions`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A window's time range in milliseconds since the epoch: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WindowRange {
    /// The first millisecond in the window.
    pub start: i64,
    /// The first millisecond after it.
    pub end: i64,
}

impl WindowRange {
    /// The range `[start, end)`.
    pub const fn new(start: i64, end: i64) -> Self {
        WindowRange { start, end }
    }

    /// Whether `t` lies in the range.
    pub const fn contains(&self, t: i64) -> bool {
        self.start <= t && t < self.end
    }

    /// Whether the two ranges share an instant.
    pub const fn overlaps(&self, other: &WindowRange) -> bool {
        self.start < other.end && other.start < self.end
    }
}

impl std::fmt::Display for WindowRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {})", self.start, self.end)
    }
}

/// How a windowed table cuts time into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Windowing {
    /// Fixed-size windows, one after the other: `Hopping(size, size)`.
    Tumbling {
        /// The window's length (ms).
        size: i64,
    },
    /// Fixed-size windows that start every `step`: each event falls in `size / step` of them.
    Hopping {
        /// The window's length (ms).
        size: i64,
        /// The time between two window starts (ms).
        step: i64,
    },
    /// One window around each event: `[t - before, t + after)`.
    Sliding {
        /// How far the window reaches before the event (ms).
        before: i64,
        /// How far it reaches after (ms).
        after: i64,
    },
    /// Per key, the span of events no more than `gap` apart.
    Session {
        /// The longest quiet time inside one session (ms).
        gap: i64,
    },
}

/// Milliseconds in `d`, saturating (a window longer than 292 million years is not one).
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Windowing {
    /// Tumbling windows of `size` (at least 1 ms).
    pub fn tumbling(size: Duration) -> Self {
        Windowing::Tumbling { size: millis(size).max(1) }
    }

    /// Hopping windows of `size` every `step` (each at least 1 ms; a step longer than the
    /// size leaves gaps, as in Faust).
    pub fn hopping(size: Duration, step: Duration) -> Self {
        Windowing::Hopping { size: millis(size).max(1), step: millis(step).max(1) }
    }

    /// A sliding window from `before` each event to `after` it.
    pub fn sliding(before: Duration, after: Duration) -> Self {
        // An empty range would hold no instant, not even the event's.
        Windowing::Sliding { before: millis(before), after: millis(after).max(1) }
    }

    /// Session windows that end after `gap` without events (at least 1 ms).
    pub fn session(gap: Duration) -> Self {
        Windowing::Session { gap: millis(gap).max(1) }
    }

    /// `(size, step)` of a fixed-size kind.
    fn size_step(&self) -> Option<(i64, i64)> {
        match *self {
            Windowing::Tumbling { size } => Some((size, size)),
            Windowing::Hopping { size, step } => Some((size, step)),
            _ => None,
        }
    }

    /// Every window that holds `t`, earliest first (for a session window: the range an event
    /// at `t` covers on its own).
    pub fn ranges(&self, t: i64) -> Vec<WindowRange> {
        let mut out = Vec::with_capacity(1);
        self.ranges_into(t, &mut out);
        out
    }

    /// [`ranges`](Windowing::ranges) into `out` (cleared first), without allocating when it
    /// has room.
    pub(crate) fn ranges_into(&self, t: i64, out: &mut Vec<WindowRange>) {
        out.clear();
        match *self {
            Windowing::Tumbling { .. } | Windowing::Hopping { .. } => {
                let Some((size, step)) = self.size_step() else { return };
                let mut start = first_start(t, size, step);
                while start <= t {
                    out.push(WindowRange::new(start, start.saturating_add(size)));
                    start = match start.checked_add(step) {
                        Some(s) => s,
                        None => break,
                    };
                }
            }
            Windowing::Sliding { before, after } => {
                out.push(WindowRange::new(t.saturating_sub(before), t.saturating_add(after)))
            }
            Windowing::Session { gap } => out.push(WindowRange::new(t, t.saturating_add(gap))),
        }
    }

    /// The latest window that holds `t` (Faust's `current`): for hopping windows, the one
    /// that started last.
    pub fn current(&self, t: i64) -> WindowRange {
        match *self {
            Windowing::Tumbling { .. } | Windowing::Hopping { .. } => {
                let (size, step) = self.size_step().unwrap_or((1, 1));
                let first = first_start(t, size, step);
                let start = first.saturating_add(t.saturating_sub(first).div_euclid(step).saturating_mul(step));
                WindowRange::new(start, start.saturating_add(size))
            }
            Windowing::Sliding { before, after } => WindowRange::new(t.saturating_sub(before), t.saturating_add(after)),
            Windowing::Session { gap } => WindowRange::new(t, t.saturating_add(gap)),
        }
    }

    /// The window current `d` before `t` (Faust's `delta`).
    pub fn delta(&self, t: i64, d: Duration) -> WindowRange {
        self.current(t.saturating_sub(millis(d)))
    }

    /// The step-sized pane that holds `t`, for hopping windows combined per pane.
    pub(crate) fn pane(&self, t: i64) -> Option<WindowRange> {
        let (size, step) = self.size_step()?;
        // Panes are cut where windows end, so every window is a whole number of panes:
        // window ends sit on multiples of `step` shifted by the start's phase.
        if size % step != 0 {
            return None;
        }
        let start = t.div_euclid(step).saturating_mul(step);
        Some(WindowRange::new(start, start.saturating_add(step)))
    }

    /// Whether windows of this kind are fixed-size ranges of the epoch (not per key).
    pub(crate) fn is_session(&self) -> bool {
        matches!(self, Windowing::Session { .. })
    }

    /// Whether the panes of [`pane`](Windowing::pane) exist for this kind: hopping windows
    /// whose size is a multiple of their step, with more than one window per event.
    pub(crate) fn has_panes(&self) -> bool {
        matches!(*self, Windowing::Hopping { size, step } if size % step == 0 && size > step)
    }

    /// The windows made of the pane `pane` (those that hold its start), earliest first.
    pub(crate) fn windows_of_pane(&self, pane: WindowRange) -> Vec<WindowRange> {
        self.ranges(pane.start)
    }
}

/// The start of the earliest window of `size` every `step` that holds `t` (Faust's
/// `_start_initial_range`, with a floor division that is right for negative times too).
fn first_start(t: i64, size: i64, step: i64) -> i64 {
    t.div_euclid(step).saturating_mul(step).saturating_sub(size).saturating_add(step)
}

/// The sessions a set of events makes: each event at `t` covers `[t, t + gap)`, and covers
/// that overlap are one session. Sorted, disjoint, and the same whatever the order of `times`.
#[cfg(test)]
pub(crate) fn merge_sessions(times: &[i64], gap: i64) -> Vec<WindowRange> {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<WindowRange> = Vec::new();
    for t in sorted {
        let cover = WindowRange::new(t, t.saturating_add(gap));
        match out.last_mut() {
            Some(last) if last.overlaps(&cover) => last.end = last.end.max(cover.end),
            _ => out.push(cover),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tumbling_edges() {
        let w = Windowing::tumbling(Duration::from_secs(10));
        assert_eq!(w.ranges(0), vec![WindowRange::new(0, 10_000)]);
        assert_eq!(w.ranges(9_999), vec![WindowRange::new(0, 10_000)]);
        assert_eq!(w.ranges(10_000), vec![WindowRange::new(10_000, 20_000)]);
        assert_eq!(w.ranges(-1), vec![WindowRange::new(-10_000, 0)]);
        assert_eq!(w.current(10_000), WindowRange::new(10_000, 20_000));
    }

    #[test]
    fn hopping_gives_size_over_step_windows() {
        let w = Windowing::hopping(Duration::from_secs(60), Duration::from_secs(10));
        let r = w.ranges(60_000);
        assert_eq!(r.len(), 6);
        assert_eq!(r[0], WindowRange::new(10_000, 70_000));
        assert_eq!(r[5], WindowRange::new(60_000, 120_000));
        assert_eq!(w.current(65_000), WindowRange::new(60_000, 120_000));
        assert_eq!(w.pane(65_000), Some(WindowRange::new(60_000, 70_000)));
    }

    #[test]
    fn sessions_merge_overlapping_covers() {
        assert_eq!(merge_sessions(&[0, 5, 20], 10), vec![WindowRange::new(0, 15), WindowRange::new(20, 30)]);
        // Covers that touch without overlapping stay apart: [0, 10) and [10, 20).
        assert_eq!(merge_sessions(&[0, 10], 10).len(), 2);
    }

    fn kind() -> impl Strategy<Value = Windowing> {
        prop_oneof![
            (1i64..100_000).prop_map(|size| Windowing::Tumbling { size }),
            (1i64..50, 1i64..2_000).prop_map(|(n, step)| Windowing::Hopping { size: n * step, step }),
            (1i64..100_000, 1i64..100_000).prop_map(|(size, step)| Windowing::Hopping { size, step }),
            (0i64..100_000, 1i64..100_000).prop_map(|(before, after)| Windowing::Sliding { before, after }),
        ]
    }

    proptest! {
        /// A timestamp lies in exactly the windows the definition says: every range given
        /// holds it, and for fixed-size kinds every window on the grid that holds it is given.
        #[test]
        fn a_timestamp_lies_in_exactly_its_windows(w in kind(), t in -10_000_000_000i64..10_000_000_000) {
            let ranges = w.ranges(t);
            // Steps longer than the size leave gaps (as in Faust): a time there is in none.
            if let Some((size, step)) = w.size_step() && step > size {
                let phase = (-size).rem_euclid(step);
                let in_gap = (t - phase).rem_euclid(step) >= size;
                prop_assert_eq!(ranges.is_empty(), in_gap);
                if in_gap {
                    return Ok(());
                }
            }
            prop_assert!(!ranges.is_empty());
            for r in &ranges {
                prop_assert!(r.contains(t), "{r} does not hold {t}");
            }
            prop_assert!(ranges.windows(2).all(|p| p[0].start < p[1].start));
            if let Some((size, step)) = w.size_step() {
                if size % step == 0 {
                    prop_assert_eq!(ranges.len() as i64, size / step);
                }
                // The grid: windows start `step` apart on one phase; the one before the first
                // and the one after the last do not hold `t`.
                let phase = (-size).rem_euclid(step);
                for r in &ranges {
                    prop_assert_eq!(r.start.rem_euclid(step), phase);
                    prop_assert_eq!(r.end - r.start, size);
                }
                let before = ranges[0].start - step;
                prop_assert!(!WindowRange::new(before, before + size).contains(t));
                let after = ranges[ranges.len() - 1].start + step;
                prop_assert!(!WindowRange::new(after, after + size).contains(t));
                prop_assert_eq!(w.current(t), ranges[ranges.len() - 1]);
            }
        }

        /// Panes tile every window: a window is exactly the panes of the times it holds.
        #[test]
        fn panes_tile_windows(n in 2i64..20, step in 1i64..5_000, t in -1_000_000_000i64..1_000_000_000) {
            let w = Windowing::Hopping { size: n * step, step };
            let pane = w.pane(t).expect("size is a multiple of step");
            prop_assert!(pane.contains(t));
            for window in w.windows_of_pane(pane) {
                prop_assert_eq!((window.start - pane.start).rem_euclid(step), 0);
                prop_assert!(window.start <= pane.start && pane.end <= window.end);
            }
            prop_assert_eq!(w.windows_of_pane(pane).len() as i64, n);
        }

        /// Sessions are the same whatever the order of their events, cover every event, and
        /// are separated by more than the gap's worth of quiet.
        #[test]
        fn sessions_do_not_depend_on_order(mut times in proptest::collection::vec(-1_000i64..1_000, 1..40), gap in 1i64..200, seed in any::<u64>()) {
            let a = merge_sessions(&times, gap);
            // A deterministic shuffle.
            let mut s = seed | 1;
            for i in (1..times.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                times.swap(i, (s % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(&a, &merge_sessions(&times, gap));
            for t in &times {
                prop_assert_eq!(a.iter().filter(|r| r.contains(*t)).count(), 1);
            }
            prop_assert!(a.windows(2).all(|p| p[0].end <= p[1].start));
        }
    }
}
