//! Windowed tables: state keyed by (key, window), closed on stream time by a timer wheel.
//!
//! A windowed table is two tables the worker runs like any other, so the commit protocol,
//! recovery, the undo log and hand-overs are theirs, unchanged:
//!
//! - the **windows** table, keyed by [`WindowKey`] (the key and the window's range), holding
//!   each window's aggregate — or, for hopping windows combined per pane, each pane's, plus
//!   the final aggregate of each window once it closed;
//! - the **clock** table, `{name}-clock`, holding each partition's stream time: the highest
//!   event time the table saw on it.
//!
//! **Closing.** A window closes when its partition's stream time reaches `end + grace`. The
//! event that moves stream time writes the clock and, in the same call, closes every window
//! now due — so the close is committed with that event's offsets, in the same atomic commit:
//! after a crash the event is processed again, moves the clock again and closes the windows
//! again (close callbacks are at-least-once across a crash, exactly once otherwise). Whether a
//! window is closed is never stored apart: it is `end + grace <= stream time`, so a recovered
//! table knows exactly which windows closed, and never reopens one.
//!
//! **The per-core view.** Beside each pair of shards a core keeps a view (thread-local): the
//! stream time and a hierarchical [timer wheel](super::wheel). Fixed windows (tumbling,
//! sliding, hopping) are kept window-major: per range, the keys that have a window of it (every
//! write to the windows table goes through the view), with one timer per range — its close,
//! then its expiry — so a boundary closes all its keys' windows in one pass over the table's
//! cache, without a lookup per window. Hopping windows combined per pane are kept per pane the
//! same way: a window is closed for all its keys at once from the panes it holds, and its
//! final aggregates are kept as a range of their own until they expire. Sessions are kept per
//! key, with a timer per session (cancelled when it merges). The view is derived state: it is built by
//! one scan of the shard when the core first uses it, and built again when the shards were
//! reopened (a hand-over, a recovery) or an undo changed them (an agent failed on an event) —
//! the tables are the truth.

use std::any::Any;
use std::cell::RefCell;
use std::hash::Hash;
use std::rc::Rc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::math::{WindowRange, Windowing, millis};
use super::wheel::{TimerId, TimerWheel};
use crate::error::{SendError, TableError};
use crate::runtime::state::Token;
use crate::table::{Shard, Table};
use crate::topic::Topic;
use crate::util::lock;

type Map<K, V> = hashbrown::HashMap<K, V, foldhash::fast::RandomState>;

/// How a windowed table stores a window: the table's key and the window's range. In
/// `table dump` it reads `{"key": …, "start": …, "end": …}`.
///
/// The key is shared (`Rc`) with the view's copy and with the undo log's entries, so that a
/// window's entry, its undo entries and its close cost a reference count, not a copy of the
/// key; it is stored and hashed as the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(bound(serialize = "K: Serialize", deserialize = "K: Deserialize<'de>"))]
pub(crate) struct WindowKey<K> {
    #[serde(with = "shared_key")]
    pub(crate) key: Rc<K>,
    pub(crate) start: i64,
    pub(crate) end: i64,
}

/// (De)serializes an `Rc<K>` as the `K` it holds.
mod shared_key {
    use std::rc::Rc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<K: Serialize, S: Serializer>(key: &Rc<K>, serializer: S) -> Result<S::Ok, S::Error> {
        K::serialize(key, serializer)
    }

    pub(super) fn deserialize<'de, K: Deserialize<'de>, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Rc<K>, D::Error> {
        K::deserialize(deserializer).map(Rc::new)
    }
}

impl<K> WindowKey<K> {
    fn range(&self) -> WindowRange {
        WindowRange::new(self.start, self.end)
    }
}

/// A [`WindowKey`] borrowing its key, to look windows up without cloning the key. It hashes
/// exactly as `WindowKey` does (the derived `Hash` hashes the fields in order, and `&K`
/// hashes as `K`).
#[derive(Hash)]
struct WindowKeyRef<'a, K> {
    key: &'a K,
    start: i64,
    end: i64,
}

impl<K: Eq> hashbrown::Equivalent<WindowKey<K>> for WindowKeyRef<'_, K> {
    fn equivalent(&self, owned: &WindowKey<K>) -> bool {
        self.start == owned.start && self.end == owned.end && *self.key == *owned.key
    }
}

/// A closed window's final aggregate, as [`WindowedTable::emit_final`] sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowResult<V> {
    /// The window's first millisecond.
    pub start: i64,
    /// The first millisecond after it.
    pub end: i64,
    /// The window's aggregate when it closed.
    pub value: V,
}

/// Which time a windowed table's writes and [`WindowedTable::value`] use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relative {
    /// The current event's timestamp (Faust's `relative_to_stream`, the default).
    Stream,
    /// The wall clock (Faust's `relative_to_now`).
    Now,
}

/// A value's time (Faust's `relative_to_field`), for values of the type it was set for.
type FieldFn = Arc<dyn Fn(&dyn Any) -> Option<i64> + Send + Sync>;
type CloseFn<K, V> = Arc<dyn Fn(&K, WindowRange, &V) + Send + Sync>;
type LateFn<K> = Arc<dyn Fn(&K, i64, &[WindowRange]) + Send + Sync>;
type MergeFn<V> = Arc<dyn Fn(V, V) -> V + Send + Sync>;
type CombineFn<V> = Arc<dyn Fn(&V, &V) -> V + Send + Sync>;
type FinalFn<K, V> = Arc<dyn Fn(&K, WindowRange, &V) -> Result<(), SendError> + Send + Sync>;

/// What a windowed table is configured with; frozen when a worker first uses it.
struct Options<K, V> {
    grace: i64,
    /// How long a closed window stays readable (ms).
    expires: i64,
    /// Close windows by the wall clock after this long without events (ms).
    idle: Option<i64>,
    relative: Relative,
    /// With `relative_to_field`: the value's time, and the name of the value type.
    field: Option<(FieldFn, &'static str)>,
    on_close: Option<CloseFn<K, V>>,
    on_late: Option<LateFn<K>>,
    merge: Option<MergeFn<V>>,
    combine: Option<CombineFn<V>>,
    finals: Option<FinalFn<K, V>>,
}

impl<K, V> Options<K, V> {
    /// When `range` closes, in stream time.
    fn close_at(&self, range: WindowRange) -> i64 {
        range.end.saturating_add(self.grace)
    }

    /// When `range` leaves the table, in stream time.
    fn expire_at(&self, range: WindowRange) -> i64 {
        self.close_at(range).saturating_add(self.expires)
    }
}

impl<K, V> Clone for Options<K, V> {
    fn clone(&self) -> Self {
        Options {
            grace: self.grace,
            expires: self.expires,
            idle: self.idle,
            relative: self.relative,
            field: self.field.clone(),
            on_close: self.on_close.clone(),
            on_late: self.on_late.clone(),
            merge: self.merge.clone(),
            combine: self.combine.clone(),
            finals: self.finals.clone(),
        }
    }
}

struct Shared<K, V> {
    windowing: Windowing,
    windows: Table<WindowKey<K>, V>,
    clock: Table<u32, i64>,
    options: Mutex<Options<K, V>>,
    frozen: OnceLock<Options<K, V>>,
}

/// A windowed table (Faust's `Table.tumbling(…)`, `.hopping(…)`, and sliding windows; plus
/// session windows): per key, one aggregate per window of time, closed when the partition's
/// stream time passes the window's end plus its grace period.
///
/// Made from a [`Table`] with [`Table::tumbling`], [`Table::hopping`], [`Table::sliding`] or
/// [`Table::session`]. Inside stream processing, [`update`](WindowedTable::update) applies
/// to every window the event's time falls in (or, for hopping windows with
/// [`combine`](WindowedTable::combine), to one step-sized pane); reads take the window of
/// the event's time ([`current`](WindowedTable::current)), of the partition's latest time
/// ([`now`](WindowedTable::now)), or `d` before it ([`delta`](WindowedTable::delta)).
/// When a window closes, [`on_window_close`](WindowedTable::on_window_close) receives its
/// final aggregate and [`emit_final`](WindowedTable::emit_final) sends it to a topic.
///
/// ```
/// use std::time::Duration;
/// use faust::{App, Settings, WindowRange};
///
/// let app = App::new(Settings::new("views"));
/// let views = app.topic::<String, String>("page-views");
/// let per_minute = app
///     .table::<String, u64>("views-per-minute")
///     .with_default(|| 0)
///     .tumbling(Duration::from_secs(60))
///     .on_window_close(|page: &String, window: WindowRange, n: &u64| println!("{page} {window}: {n}"));
/// let table = per_minute.clone();
/// app.agent("count", &views, move |mut stream| {
///     let per_minute = table.clone();
///     async move {
///         while let Some((page, _user)) = stream.next_item().await {
///             if let Some(page) = page {
///                 per_minute.update(&page, |n| *n += 1)?;
///             }
///         }
///         Ok(())
///     }
/// });
/// let test = app.test_context()?;
/// test.put(&views, Some(&"/home".to_string()), &"alice".to_string())?;
/// test.stop()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct WindowedTable<K, V> {
    shared: Arc<Shared<K, V>>,
}

impl<K, V> Clone for WindowedTable<K, V> {
    fn clone(&self) -> Self {
        WindowedTable { shared: self.shared.clone() }
    }
}

impl<K, V> std::fmt::Debug for WindowedTable<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowedTable")
            .field("name", &self.shared.windows.name())
            .field("windowing", &self.shared.windowing)
            .finish()
    }
}

impl<K, V> Table<K, V>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    /// Tumbling windows of `size` (Faust's `Table.tumbling`): one window per event.
    pub fn tumbling(self, size: Duration) -> WindowedTable<K, V> {
        WindowedTable::new(self, Windowing::tumbling(size))
    }

    /// Hopping windows of `size` starting every `step` (Faust's `Table.hopping`): each event
    /// updates the `size / step` windows it falls in, or one pane with
    /// [`combine`](WindowedTable::combine).
    pub fn hopping(self, size: Duration, step: Duration) -> WindowedTable<K, V> {
        WindowedTable::new(self, Windowing::hopping(size, step))
    }

    /// A sliding window around each event, from `before` it to `after` it (Faust's
    /// `SlidingWindow`): `[t - before, t + after)`.
    pub fn sliding(self, before: Duration, after: Duration) -> WindowedTable<K, V> {
        WindowedTable::new(self, Windowing::sliding(before, after))
    }

    /// Session windows: per key, events no more than `gap` apart make one session. An event
    /// that bridges two sessions merges them, their aggregates combined by `merge` (earlier
    /// session first).
    pub fn session(self, gap: Duration, merge: impl Fn(V, V) -> V + Send + Sync + 'static) -> WindowedTable<K, V> {
        let table = WindowedTable::new(self, Windowing::session(gap));
        lock(&table.shared.options).merge = Some(Arc::new(merge));
        table
    }
}

impl<K, V> WindowedTable<K, V>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    fn new(table: Table<K, V>, windowing: Windowing) -> Self {
        use crate::codec::Codec;
        // Window keys are JSON whatever the table's key codec (`raw` does not encode a
        // structure); values keep the table's codec. The clock is internal: JSON.
        let (_, value_codec) = table.codecs();
        let windows = table.redeclare_windowed::<WindowKey<K>>().with_codecs(Codec::JSON, value_codec);
        let clock = table.declare_sibling::<u32, i64>(&format!("{}-clock", table.name()), Codec::JSON, Codec::JSON);
        let size = match windowing {
            Windowing::Tumbling { size } | Windowing::Hopping { size, .. } => size,
            Windowing::Sliding { before, after } => before.saturating_add(after),
            Windowing::Session { gap } => gap,
        };
        WindowedTable {
            shared: Arc::new(Shared {
                windowing,
                windows,
                clock,
                options: Mutex::new(Options {
                    grace: 0,
                    expires: size,
                    idle: None,
                    relative: Relative::Stream,
                    field: None,
                    on_close: None,
                    on_late: None,
                    merge: None,
                    combine: None,
                    finals: None,
                }),
                frozen: OnceLock::new(),
            }),
        }
    }

    fn configure(self, f: impl FnOnce(&mut Options<K, V>)) -> Self {
        f(&mut lock(&self.shared.options));
        self
    }

    /// How long after its end a window still takes late events (default 0). Set before the
    /// worker starts, as every option here.
    pub fn grace(self, grace: Duration) -> Self {
        self.configure(|o| o.grace = millis(grace))
    }

    /// How long a closed window stays readable before it leaves the store and the changelog
    /// (default: the window's size). Shorter than the size works too.
    pub fn expires(self, expires: Duration) -> Self {
        self.configure(|o| o.expires = millis(expires))
    }

    /// Closes windows by the wall clock too: when a partition had no event for `timeout`,
    /// its stream time moves on with the wall clock, so an idle stream closes its windows.
    pub fn idle_timeout(self, timeout: Duration) -> Self {
        self.configure(|o| o.idle = Some(millis(timeout).max(1)))
    }

    /// Writes and [`value`](WindowedTable::value) use the event's timestamp (the default;
    /// Faust's `relative_to_stream`).
    pub fn relative_to_stream(self) -> Self {
        self.configure(|o| o.relative = Relative::Stream)
    }

    /// Writes and [`value`](WindowedTable::value) use the wall clock (Faust's
    /// `relative_to_now`).
    pub fn relative_to_now(self) -> Self {
        self.configure(|o| o.relative = Relative::Now)
    }

    /// The time of an event is a field of its value (Faust's `relative_to_field`), read by
    /// `field` (ms): [`update_from`](WindowedTable::update_from) and
    /// [`value_from`](WindowedTable::value_from) take the value and use it. (A time at hand
    /// goes to [`update_at`](WindowedTable::update_at) and [`at`](WindowedTable::at).)
    pub fn relative_to_field<T: 'static>(self, field: impl Fn(&T) -> i64 + Send + Sync + 'static) -> Self {
        let read: FieldFn = Arc::new(move |value: &dyn Any| value.downcast_ref::<T>().map(&field));
        self.configure(move |o| o.field = Some((read, std::any::type_name::<T>())))
    }

    /// The time `relative_to_field` reads from `value`.
    fn field_time<T: 'static>(&self, value: &T) -> Result<i64, TableError> {
        let field = self.options().field.as_ref();
        field.and_then(|(read, _)| read(value)).ok_or_else(|| TableError::FieldTime {
            table: self.name().to_string(),
            given: std::any::type_name::<T>(),
            expected: field.map(|(_, name)| *name),
        })
    }

    /// [`update`](WindowedTable::update) at the time of `value` (see
    /// [`relative_to_field`](WindowedTable::relative_to_field)).
    pub fn update_from<T: 'static>(&self, key: &K, value: &T, f: impl Fn(&mut V)) -> Result<(), TableError> {
        let t = self.field_time(value)?;
        self.update_inner(key, Some(t), f)
    }

    /// The aggregate of `key` in the window current at the time of `value` (Faust's
    /// `.value()` with `relative_to_field`).
    pub fn value_from<T: 'static>(&self, key: &K, value: &T) -> Result<Option<V>, TableError> {
        let t = self.field_time(value)?;
        self.at(key, t)
    }

    /// Called with each window's final aggregate when it closes.
    pub fn on_window_close(self, f: impl Fn(&K, WindowRange, &V) + Send + Sync + 'static) -> Self {
        self.configure(|o| o.on_close = Some(Arc::new(f)))
    }

    /// Called for an event that came after its windows closed (`timestamp`, and the closed
    /// windows it missed); it is also counted in [`WorkerStats::late_events`](crate::WorkerStats).
    pub fn on_late(self, f: impl Fn(&K, i64, &[WindowRange]) + Send + Sync + 'static) -> Self {
        self.configure(|o| o.on_late = Some(Arc::new(f)))
    }

    /// For hopping windows with an associative aggregation (`combine(a, b)` is the aggregate
    /// of the events of `a` then `b`, and the default is its identity): each event updates
    /// one step-sized pane, and a window is the combination of its panes, read and closed as
    /// such — one write per event instead of `size / step`.
    pub fn combine(self, f: impl Fn(&V, &V) -> V + Send + Sync + 'static) -> Self {
        self.configure(|o| o.combine = Some(Arc::new(f)))
    }

    /// Sends each window's final aggregate to `topic` when it closes, keyed by the table's
    /// key (Kafka Streams' `suppress(untilWindowCloses)`): an agent on `topic` sees one
    /// [`WindowResult`] per closed window. The sends are durable before the offsets of the
    /// event that closed the window are committed.
    pub fn emit_final(self, topic: &Topic<K, WindowResult<V>>) -> Self {
        let topic = topic.clone();
        self.configure(move |o| {
            o.finals = Some(Arc::new(move |key: &K, range: WindowRange, value: &V| {
                topic.send_soon(Some(key), &WindowResult { start: range.start, end: range.end, value: value.clone() })
            }))
        })
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        self.shared.windows.name()
    }

    /// The plain table under it, keyed by key and window.
    pub(crate) fn windows_table(&self) -> &Table<WindowKey<K>, V> {
        &self.shared.windows
    }

    /// How the table cuts time into windows.
    pub fn windowing(&self) -> Windowing {
        self.shared.windowing
    }

    /// The options, frozen at the first use (they are set before the worker starts).
    fn options(&self) -> &Options<K, V> {
        self.shared.frozen.get_or_init(|| lock(&self.shared.options).clone())
    }

    /// Applies `f` to `key`'s aggregate in every window the event's time falls in (starting
    /// from the table's default) and closes the windows the event's time makes due (read the
    /// result with [`current`](WindowedTable::current)). An event after its windows closed changes nothing and goes to
    /// [`on_late`](WindowedTable::on_late).
    pub fn update(&self, key: &K, f: impl Fn(&mut V)) -> Result<(), TableError> {
        self.update_inner(key, None, f)
    }

    /// [`update`](WindowedTable::update) at the time `timestamp` (ms) instead of the
    /// event's: for a time taken from the value (Faust's `relative_to_field`).
    pub fn update_at(&self, key: &K, timestamp: i64, f: impl Fn(&mut V)) -> Result<(), TableError> {
        self.update_inner(key, Some(timestamp), f)
    }

    /// The aggregate of `key` in the window of the event's time (Faust's `.current()`).
    pub fn current(&self, key: &K) -> Result<Option<V>, TableError> {
        self.read(None, key, |t, _| Ok(t.event_time()))
    }

    /// The aggregate of `key` in the window current at the partition's stream time (Faust's
    /// `.now()`).
    pub fn now(&self, key: &K) -> Result<Option<V>, TableError> {
        self.read(None, key, |_, view| Ok(view.stream_time.unwrap_or_else(crate::util::now_ms)))
    }

    /// The aggregate of `key` in the window current `d` before the event's time (Faust's
    /// `.delta(d)`).
    pub fn delta(&self, key: &K, d: Duration) -> Result<Option<V>, TableError> {
        self.read(None, key, |t, _| Ok(t.event_time().saturating_sub(millis(d))))
    }

    /// The aggregate of `key` in the window current at `timestamp` (ms).
    pub fn at(&self, key: &K, timestamp: i64) -> Result<Option<V>, TableError> {
        self.read(None, key, |_, _| Ok(timestamp))
    }

    /// The aggregate of `key` at the configured time: the event's (default) or the wall
    /// clock's (Faust's `.value()`).
    pub fn value(&self, key: &K) -> Result<Option<V>, TableError> {
        self.read(None, key, |t, _| Ok(t.write_time(None)))
    }

    /// Every live window of `key` (open, or closed and not expired) with its aggregate,
    /// earliest first, in the current event's partition.
    pub fn windows(&self, key: &K) -> Result<Vec<(WindowRange, V)>, TableError> {
        self.with_view(None, |cx| cx.key_windows(key))
    }

    /// The partition `partition` of the table, for use outside stream processing (timers,
    /// tasks) on the core that holds it.
    pub fn partition(&self, partition: u32) -> WindowedPartition<'_, K, V> {
        WindowedPartition { table: self, partition }
    }

    /// Every live window with its key and aggregate, in the table's partitions on the
    /// calling core, that overlaps `[from, to)` (ms), by key then time.
    pub fn local_windows(&self, from: i64, to: i64) -> Result<Vec<(K, WindowRange, V)>, TableError> {
        let mut out = Vec::new();
        for partition in self.shared.windows.local_partitions() {
            let found = self.with_view(Some(partition), |cx| cx.range_windows(from, to))?;
            out.extend(found);
        }
        Ok(out)
    }

    fn read(
        &self,
        partition: Option<u32>,
        key: &K,
        time: impl FnOnce(&Cx<'_, K, V>, &View<K>) -> Result<i64, TableError>,
    ) -> Result<Option<V>, TableError> {
        self.with_view(partition, |cx| {
            let t = time(cx, &cx.view.borrow())?;
            cx.window_value_at(key, t)
        })
    }

    fn update_inner(&self, key: &K, at: Option<i64>, f: impl Fn(&mut V)) -> Result<(), TableError> {
        let outcome = self.with_view(None, |cx| cx.update(key, at, &f))?;
        self.settle(outcome)
    }

    /// Runs the callbacks of what an update or a tick closed and missed (outside the view's
    /// borrow: a callback may use the table).
    fn settle(&self, outcome: Outcome<K>) -> Result<(), TableError> {
        let options = self.options();
        if !outcome.late.is_empty() {
            crate::runtime::CoreRuntime::with_current(|core| {
                if let Some(core) = core {
                    core.count_late_event();
                }
            });
            if let Some(on_late) = &options.on_late
                && let Some((key, t)) = &outcome.late_event
            {
                on_late(key, *t, &outcome.late);
            }
        }
        Ok(())
    }

    /// Runs `f` with the shards of `partition` (or of the current event's), the token and
    /// the core's view of them (built or rebuilt first when needed).
    fn with_view<T>(
        &self,
        partition: Option<u32>,
        f: impl FnOnce(&Cx<'_, K, V>) -> Result<T, TableError>,
    ) -> Result<T, TableError> {
        let options = self.options();
        if let Some(idle) = options.idle {
            self.ensure_ticker(idle);
        }
        let shared = &self.shared;
        shared.windows.with_shard_and_core(partition, crate::table::Access::Internal, |windows, token, core| {
            let p = crate::runtime::state::AnyShard::partition(windows);
            shared.clock.on_core(core, token, p, crate::table::Access::Internal, |clock, _| {
                let view = view_of(shared, p, windows, clock, options)?;
                let cx = Cx { shared, options, windows, clock, token, partition: p, view: &view };
                f(&cx)
            })
        })
    }

    /// Starts, once per core, the task that closes windows of idle partitions by the wall
    /// clock (a quarter of the timeout apart, between 5 ms and 1 s); it ends when the worker
    /// stops.
    fn ensure_ticker(&self, idle: i64) {
        thread_local! {
            static TICKING: RefCell<hashbrown::HashSet<usize>> = RefCell::new(hashbrown::HashSet::new());
        }
        let id = Arc::as_ptr(&self.shared) as *const () as usize;
        if !TICKING.with(|t| t.borrow_mut().insert(id)) {
            return;
        }
        let table = self.clone();
        let tick = Duration::from_millis(u64::try_from((idle / 4).clamp(5, 1000)).unwrap_or(1000));
        let stopping = || crate::runtime::CoreRuntime::with_current(|c| c.is_none_or(|c| c.stopping().is_cancelled()));
        glommio::spawn_local(async move {
            while !stopping() {
                glommio::timer::sleep(tick).await;
                if stopping() {
                    break;
                }
                if let Err(e) = table.close_idle() {
                    tracing::warn!(table = table.name(), error = %e, "closing the windows of idle partitions failed");
                }
            }
            TICKING.with(|t| t.borrow_mut().remove(&id));
        })
        .detach();
    }

    /// Closes the windows due by the wall clock in this core's idle partitions (see
    /// [`idle_timeout`](WindowedTable::idle_timeout)): their stream time moves on by the
    /// time they were idle past the timeout's start.
    pub(crate) fn close_idle(&self) -> Result<(), TableError> {
        let options = self.options();
        let Some(idle) = options.idle else { return Ok(()) };
        for partition in self.shared.windows.local_partitions() {
            self.with_view(Some(partition), |cx| {
                let (since, base) = {
                    let view = cx.view.borrow();
                    (millis(view.last_event.elapsed()), view.at_last_event)
                };
                match base {
                    Some(base) if since >= idle => cx.advance(base.saturating_add(since), None),
                    _ => Ok(()),
                }
            })?;
        }
        Ok(())
    }
}

/// One partition of a windowed table, named explicitly: see [`WindowedTable::partition`].
#[derive(Debug)]
pub struct WindowedPartition<'a, K, V> {
    table: &'a WindowedTable<K, V>,
    partition: u32,
}

impl<K, V> WindowedPartition<'_, K, V>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    /// The partition's stream time: the highest event time its events brought (`None`
    /// before the first).
    pub fn stream_time(&self) -> Result<Option<i64>, TableError> {
        self.table.with_view(Some(self.partition), |cx| Ok(cx.view.borrow().stream_time))
    }

    /// The aggregate of `key` in the window current at `timestamp` (ms).
    pub fn at(&self, key: &K, timestamp: i64) -> Result<Option<V>, TableError> {
        self.table.read(Some(self.partition), key, |_, _| Ok(timestamp))
    }

    /// The aggregate of `key` in the window current at the partition's stream time.
    pub fn now(&self, key: &K) -> Result<Option<V>, TableError> {
        self.table.read(Some(self.partition), key, |_, view| Ok(view.stream_time.unwrap_or_else(crate::util::now_ms)))
    }

    /// Every live window of `key` with its aggregate, earliest first.
    pub fn windows(&self, key: &K) -> Result<Vec<(WindowRange, V)>, TableError> {
        self.table.with_view(Some(self.partition), |cx| cx.key_windows(key))
    }
}

/// What a timer stands for.
enum Due<K> {
    /// The session closes.
    Close(Rc<K>, WindowRange),
    /// The closed session leaves the table.
    Expire(Rc<K>, WindowRange),
    /// Every key's window of this range closes (fixed windows, kept by range; for panes, a
    /// window combined from them).
    CloseRange(WindowRange),
    /// Every key's window (or pane) of this range leaves the table.
    ExpireRange(WindowRange),
}

/// A live window of a key, as the view knows it. Whether it closed is not kept: that is
/// `end + grace <= stream time` ([`View::is_closed`]).
struct Live {
    range: WindowRange,
    /// Its close timer while it is open (a session's, cancelled when it merges); once it
    /// closed, nothing cancels its expiry, and this is left as it was.
    timer: TimerId,
}

/// A core's view of one partition of a windowed table (see the module's docs).
struct View<K> {
    windows_instance: u64,
    clock_instance: u64,
    undos: (u64, u64),
    stream_time: Option<i64>,
    /// The table's grace (a window closes once the stream time passes its end plus it).
    grace: i64,
    wheel: TimerWheel<Due<K>>,
    /// Per key, its live sessions, by start.
    live: Map<Rc<K>, Vec<Live>>,
    /// Whether fixed windows are kept by range (`by_range`) rather than per key (`live`):
    /// every kind but sessions.
    by_ranges: bool,
    windowing: Windowing,
    /// The length of a pane when the table combines panes (0: it does not).
    pane_len: i64,
    /// For panes: the windows with a close timer (`CloseRange`), not stored while they are
    /// open — each is the combination of the panes it holds.
    closing: std::collections::BTreeSet<WindowRange>,
    /// Fixed windows by range: the keys that have a window of it in the windows table (every
    /// window is created through the view, the table being private, and an undo rebuilds
    /// it). Kept window-major so that a range closes and expires with one timer and one pass
    /// over its keys, instead of a timer per key. Only the keys: an event's update touches
    /// the table alone (one lookup, as a plain table's), and a close reads each aggregate
    /// once. For panes, the ranges are the panes (`pane_len` long) and the closed windows
    /// (their final aggregates, kept apart until they expire).
    by_range: std::collections::BTreeMap<WindowRange, KeySet<K>>,
    /// When the partition's last event came, by the wall clock, and the stream time then
    /// (idle closing: the stream time moves on from there with the wall clock).
    last_event: Instant,
    at_last_event: Option<i64>,
    /// Scratch for the ranges of one event.
    ranges: Vec<WindowRange>,
}

type KeySet<K> = hashbrown::HashSet<Rc<K>, foldhash::fast::RandomState>;

/// The aggregates of a range's windows (or panes), by key.
type Finals<K, V> = Vec<(Rc<K>, V)>;

/// What an update or a tick leaves to do once the view is released.
struct Outcome<K> {
    late: Vec<WindowRange>,
    late_event: Option<(K, i64)>,
}

impl<K> Default for Outcome<K> {
    fn default() -> Self {
        Outcome { late: Vec::new(), late_event: None }
    }
}

thread_local! {
    /// The views of this core, by (table, partition).
    static VIEWS: RefCell<hashbrown::HashMap<(usize, u32), Rc<dyn AnyView>>> = RefCell::new(hashbrown::HashMap::new());
}

/// A view whatever its key and value types: what the core's status needs of it.
trait AnyView {
    /// Windows stored and not closed yet.
    fn open_windows(&self) -> u64;
    fn into_any(self: Rc<Self>) -> Rc<dyn Any>;
}

impl<K: Hash + Eq + 'static> AnyView for RefCell<View<K>> {
    fn open_windows(&self) -> u64 {
        let view = self.borrow();
        let open = |range: &WindowRange| view.stream_time.is_none_or(|st| range.end.saturating_add(view.grace) > st);
        if view.pane_len > 0 {
            // Open windows are virtual: those of the panes, each (key, window) once.
            let mut windows: hashbrown::HashSet<(&K, WindowRange), foldhash::fast::RandomState> = Default::default();
            for (pane, keys) in view.by_range.iter().filter(|(range, _)| view.is_pane(**range)) {
                for w in view.windowing.windows_of_pane(*pane).into_iter().filter(|w| open(w)) {
                    windows.extend(keys.iter().map(|k| (&**k, w)));
                }
            }
            windows.len() as u64
        } else if view.by_ranges {
            view.by_range.iter().filter(|(range, _)| open(range)).map(|(_, keys)| keys.len() as u64).sum()
        } else {
            view.live.values().flatten().filter(|l| open(&l.range)).count() as u64
        }
    }

    fn into_any(self: Rc<Self>) -> Rc<dyn Any> {
        self
    }
}

/// Windows open (stored, not closed yet) in the windowed tables' partitions this core holds:
/// one pass over their live windows, for the status page.
pub(crate) fn open_windows_on_this_core() -> u64 {
    VIEWS.with(|views| views.borrow().values().map(|v| v.open_windows()).sum())
}

/// The core's view of partition `p`, built (or built again) from the shards when it is
/// missing or stale.
fn view_of<K, V>(
    shared: &Arc<Shared<K, V>>,
    p: u32,
    windows: &Shard<WindowKey<K>, V>,
    clock: &Shard<u32, i64>,
    options: &Options<K, V>,
) -> Result<Rc<RefCell<View<K>>>, TableError>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    let id = (Arc::as_ptr(shared) as *const () as usize, p);
    let fresh = |v: &View<K>| {
        v.windows_instance == windows.instance()
            && v.clock_instance == clock.instance()
            && v.undos == (windows.undos(), clock.undos())
    };
    let known = VIEWS.with(|views| views.borrow().get(&id).cloned());
    if let Some(any) = known
        && let Ok(view) = any.into_any().downcast::<RefCell<View<K>>>()
        && fresh(&view.borrow())
    {
        return Ok(view);
    }
    let view = Rc::new(RefCell::new(build_view(shared.windowing, windows, clock, p, options)?));
    // Views are built rarely (a first use, a hand-over, an undo): the time to drop those of
    // partitions this core no longer holds.
    let local = shared.windows.local_partitions();
    VIEWS.with(|views| {
        let mut views = views.borrow_mut();
        views.retain(|(table, partition), _| *table != id.0 || local.contains(partition));
        views.insert(id, view.clone() as Rc<dyn AnyView>)
    });
    Ok(view)
}

/// Builds a view by one scan of the windows shard: every window gets its timer back (its
/// close if it is open, its expiry if it closed).
fn build_view<K, V>(
    windowing: Windowing,
    windows: &Shard<WindowKey<K>, V>,
    clock: &Shard<u32, i64>,
    p: u32,
    options: &Options<K, V>,
) -> Result<View<K>, TableError>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    let stream_time = clock.get(&p)?;
    let mut view: View<K> = View {
        windows_instance: windows.instance(),
        clock_instance: clock.instance(),
        undos: (windows.undos(), clock.undos()),
        stream_time,
        grace: options.grace,
        wheel: TimerWheel::new(stream_time.unwrap_or(i64::MIN)),
        live: Map::default(),
        by_ranges: !windowing.is_session(),
        windowing,
        pane_len: match windowing {
            Windowing::Hopping { step, .. } if options.combine.is_some() && windowing.has_panes() => step,
            _ => 0,
        },
        closing: std::collections::BTreeSet::new(),
        by_range: std::collections::BTreeMap::new(),
        last_event: Instant::now(),
        at_last_event: stream_time,
        ranges: Vec::new(),
    };
    let mut items = Vec::new();
    windows.items(&mut items)?;
    let mut keys: KeySet<K> = KeySet::default();
    for (wk, _) in items {
        let range = wk.range();
        // One `Rc` per key for all its windows in the view.
        let key = keys.get_or_insert(wk.key).clone();
        if view.by_ranges {
            view.note_key(&key, range, options);
        } else {
            view.arm_window(&key, range, options);
        }
    }
    Ok(view)
}

/// When a pane leaves the table: just after the last window made of it closed (and kept its
/// final aggregate apart), so that close always finds it.
fn pane_drop_time<K, V>(pane: WindowRange, windowing: Windowing, options: &Options<K, V>) -> i64 {
    pane.start.saturating_add(size_of(windowing)).saturating_add(options.grace).saturating_add(1)
}

fn size_of(windowing: Windowing) -> i64 {
    match windowing {
        Windowing::Tumbling { size } | Windowing::Hopping { size, .. } => size,
        Windowing::Sliding { before, after } => before.saturating_add(after),
        Windowing::Session { gap } => gap,
    }
}

impl<K: Hash + Eq> View<K> {
    fn is_closed<V>(&self, range: WindowRange, options: &Options<K, V>) -> bool {
        self.stream_time.is_some_and(|st| options.close_at(range) <= st)
    }

    /// Gives a stored window its timer (a close if it is open, else its expiry) and its
    /// place among the key's live windows, unless it has them.
    fn arm_window<V>(&mut self, key: &Rc<K>, range: WindowRange, options: &Options<K, V>) {
        let closed = self.is_closed(range, options);
        let live = self.live.entry(key.clone()).or_default();
        let at = match live.binary_search_by_key(&range, |l| l.range) {
            Ok(_) => return,
            Err(at) => at,
        };
        let timer = if closed {
            self.wheel.arm(options.expire_at(range), Due::Expire(key.clone(), range))
        } else {
            self.wheel.arm(options.close_at(range), Due::Close(key.clone(), range))
        };
        live.insert(at, Live { range, timer });
    }

    /// The windows a stored range stands for: itself, or for a pane its windows still open
    /// (a closed one has its final aggregate stored apart).
    fn windows_of<V>(&self, range: WindowRange, options: &Options<K, V>) -> impl Iterator<Item = WindowRange> {
        let windows = if self.is_pane(range) {
            let mut windows = self.windowing.windows_of_pane(range);
            windows.retain(|w| !self.is_closed(*w, options));
            windows
        } else {
            vec![range]
        };
        windows.into_iter()
    }

    /// Whether `range` is a pane (not a window's final aggregate) of a table that combines
    /// panes.
    fn is_pane(&self, range: WindowRange) -> bool {
        self.pane_len > 0 && range.end.saturating_sub(range.start) == self.pane_len
    }

    /// Whether `key`'s window `range` is live (stored, open or closed and not expired).
    fn is_live(&self, key: &K, range: WindowRange) -> bool {
        if self.by_ranges {
            return self.by_range.get(&range).is_some_and(|keys| keys.contains(key));
        }
        self.live.get(key).is_some_and(|live| live.iter().any(|l| l.range == range))
    }

    /// Notes that `key` has a window of the fixed range `range`; a range seen for the first
    /// time gets its timer (a close if it is open, else its expiry). A pane seen for the first
    /// time gets the close of each of its windows still open (once per window), and its own
    /// departure once the last of them closed.
    fn note_key<V>(&mut self, key: &Rc<K>, range: WindowRange, options: &Options<K, V>) {
        if let Some(keys) = self.by_range.get_mut(&range) {
            keys.insert(key.clone());
            return;
        }
        if self.is_pane(range) {
            for window in self.windowing.windows_of_pane(range) {
                if !self.is_closed(window, options) && self.closing.insert(window) {
                    self.wheel.arm(options.close_at(window), Due::CloseRange(window));
                }
            }
            self.wheel.arm(pane_drop_time(range, self.windowing, options), Due::ExpireRange(range));
        } else if self.is_closed(range, options) {
            self.wheel.arm(options.expire_at(range), Due::ExpireRange(range));
        } else {
            self.wheel.arm(options.close_at(range), Due::CloseRange(range));
        }
        self.by_range.entry(range).or_default().insert(key.clone());
    }

    fn forget(&mut self, key: &K, range: WindowRange) {
        if let Some(live) = self.live.get_mut(key) {
            live.retain(|l| l.range != range);
            if live.is_empty() {
                self.live.remove(key);
            }
        }
    }
}

/// One operation's context: the shards, the token and the view.
struct Cx<'a, K, V> {
    shared: &'a Shared<K, V>,
    options: &'a Options<K, V>,
    windows: &'a Shard<WindowKey<K>, V>,
    clock: &'a Shard<u32, i64>,
    token: Option<&'a Token>,
    partition: u32,
    view: &'a RefCell<View<K>>,
}

impl<K, V> Cx<'_, K, V>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    fn panes(&self) -> bool {
        self.options.combine.is_some() && self.shared.windowing.has_panes()
    }

    /// The event's time (the wall clock outside an event).
    fn event_time(&self) -> i64 {
        self.token.map_or_else(crate::util::now_ms, |t| t.timestamp)
    }

    /// The time a write uses: `at` when given, else by the table's relativity.
    fn write_time(&self, at: Option<i64>) -> i64 {
        match (at, self.options.relative) {
            (Some(t), _) => t,
            (None, Relative::Stream) => self.event_time(),
            (None, Relative::Now) => crate::util::now_ms(),
        }
    }

    fn wk(key: &K, range: WindowRange) -> WindowKey<K> {
        WindowKey { key: Rc::new(key.clone()), start: range.start, end: range.end }
    }

    /// [`wk`](Cx::wk) for a key the caller holds shared.
    fn wk_rc(key: &Rc<K>, range: WindowRange) -> WindowKey<K> {
        WindowKey { key: key.clone(), start: range.start, end: range.end }
    }

    /// The stored aggregate of `key` in `range` (the key cloned only on a cache miss).
    fn stored(&self, key: &K, range: WindowRange) -> Result<Option<V>, TableError> {
        self.windows.get_borrowed(&WindowKeyRef { key, start: range.start, end: range.end }, || Self::wk(key, range))
    }

    fn update(&self, key: &K, at: Option<i64>, f: &dyn Fn(&mut V)) -> Result<Outcome<K>, TableError> {
        let t = self.write_time(at);
        let mut outcome = Outcome::default();
        if self.shared.windowing.is_session() {
            self.update_session(key, t, f, &mut outcome)?;
        } else {
            self.update_fixed(key, t, f, &mut outcome)?;
        }
        if !outcome.late.is_empty() {
            outcome.late_event = Some((key.clone(), t));
        }
        self.advance(t, self.token)?;
        if self.options.idle.is_some() {
            let mut view = self.view.borrow_mut();
            view.last_event = Instant::now();
            view.at_last_event = view.stream_time;
        }
        Ok(outcome)
    }

    /// Tumbling, hopping and sliding windows: every window of `t`, or its pane.
    fn update_fixed(&self, key: &K, t: i64, f: &dyn Fn(&mut V), outcome: &mut Outcome<K>) -> Result<(), TableError> {
        let windowing = self.shared.windowing;
        let mut guard = self.view.borrow_mut();
        let view = &mut *guard;
        let mut ranges = std::mem::take(&mut view.ranges);
        windowing.ranges_into(t, &mut ranges);
        let result = if self.panes() {
            self.update_pane(view, key, t, &ranges, f, outcome)
        } else {
            self.update_windows(view, key, &ranges, f, outcome)
        };
        view.ranges = ranges;
        result
    }

    /// Every open window of `ranges` gets `f`; the closed ones are late.
    fn update_windows(
        &self,
        view: &mut View<K>,
        key: &K,
        ranges: &[WindowRange],
        f: &dyn Fn(&mut V),
        outcome: &mut Outcome<K>,
    ) -> Result<(), TableError> {
        // One `Rc` of the key for all the event's new windows, in the table and the view.
        let rc: std::cell::OnceCell<Rc<K>> = std::cell::OnceCell::new();
        let shared = || rc.get_or_init(|| Rc::new(key.clone()));
        for &r in ranges {
            if view.is_closed(r, self.options) {
                outcome.late.push(r);
                continue;
            }
            // The view knows every live window: one it does not know is in neither the cache
            // nor the store, which need not be read for it.
            let unknown = || !view.is_live(key, r);
            let probe = WindowKeyRef { key, start: r.start, end: r.end };
            let owned = || Self::wk_rc(shared(), r);
            let ((), created) = self.windows.upsert_known(self.token, &probe, &owned, &unknown, f)?;
            if created {
                // Fixed windows are kept by range (only sessions are not).
                view.note_key(shared(), r, self.options);
            }
        }
        Ok(())
    }

    /// The pane of `t` gets `f` when one of its windows is open. Closed windows hold their
    /// final aggregate apart (kept at their close), so the pane may change under them.
    fn update_pane(
        &self,
        view: &mut View<K>,
        key: &K,
        t: i64,
        ranges: &[WindowRange],
        f: &dyn Fn(&mut V),
        outcome: &mut Outcome<K>,
    ) -> Result<(), TableError> {
        let windowing = self.shared.windowing;
        outcome.late.extend(ranges.iter().copied().filter(|r| view.is_closed(*r, self.options)));
        if outcome.late.len() == ranges.len() {
            return Ok(());
        }
        let pane = windowing.pane(t).unwrap_or_else(|| windowing.current(t));
        let probe = WindowKeyRef { key, start: pane.start, end: pane.end };
        let rc: std::cell::OnceCell<Rc<K>> = std::cell::OnceCell::new();
        let shared = || rc.get_or_init(|| Rc::new(key.clone()));
        let ((), created) =
            self.windows.upsert_known(self.token, &probe, &|| Self::wk_rc(shared(), pane), &|| false, f)?;
        if created {
            view.note_key(shared(), pane, self.options);
        }
        Ok(())
    }

    /// Session windows: the event's cover `[t, t + gap)` joins every open session of the key
    /// it overlaps; a closed one it overlaps makes it late (a closed session never reopens).
    fn update_session(&self, key: &K, t: i64, f: &dyn Fn(&mut V), outcome: &mut Outcome<K>) -> Result<(), TableError> {
        let cover = self.shared.windowing.current(t);
        let mut guard = self.view.borrow_mut();
        let view = &mut *guard;
        // The common case first: the event falls inside one open session and extends nothing.
        let mut touching = 0;
        let mut inside = None;
        let mut closed = false;
        if let Some(live) = view.live.get(key) {
            for l in live.iter().filter(|l| l.range.overlaps(&cover)) {
                touching += 1;
                closed |= view.is_closed(l.range, self.options);
                if l.range.start <= cover.start && cover.end <= l.range.end {
                    inside = Some(l.range);
                }
            }
        }
        if let (1, Some(range), false) = (touching, inside, closed) {
            let probe = WindowKeyRef { key, start: range.start, end: range.end };
            self.windows.upsert_known(self.token, &probe, &|| Self::wk(key, range), &|| false, f)?;
            return Ok(());
        }
        let overlapping: Vec<Live> = view
            .live
            .get(key)
            .map(|live| {
                live.iter()
                    .filter(|l| l.range.overlaps(&cover))
                    .map(|l| Live { range: l.range, timer: l.timer })
                    .collect()
            })
            .unwrap_or_default();
        let merged =
            overlapping.iter().fold(cover, |m, l| WindowRange::new(m.start.min(l.range.start), m.end.max(l.range.end)));
        if closed || view.is_closed(merged, self.options) {
            let closed: Vec<WindowRange> =
                overlapping.iter().filter(|l| view.is_closed(l.range, self.options)).map(|l| l.range).collect();
            outcome.late.extend(if closed.is_empty() { vec![merged] } else { closed });
            return Ok(());
        }
        let rc = view.live.get_key_value(key).map_or_else(|| Rc::new(key.clone()), |(k, _)| k.clone());
        // Merge the sessions it touches (earliest first) into one over `merged`.
        let mut aggregate: Option<V> = None;
        for l in &overlapping {
            let old = self.windows.get(&Self::wk(key, l.range))?;
            self.windows.write(self.token, Self::wk(key, l.range), None)?;
            view.wheel.cancel(l.timer);
            view.forget(key, l.range);
            aggregate = match (aggregate, old) {
                (Some(a), Some(b)) => Some(match self.options.merge.as_ref() {
                    Some(merge) => merge(a, b),
                    None => b,
                }),
                (a, b) => a.or(b),
            };
        }
        let mut value = match aggregate {
            Some(v) => v,
            None => self.windows.get_or_default(&Self::wk(key, merged))?,
        };
        f(&mut value);
        self.windows.write(self.token, Self::wk(key, merged), Some(value))?;
        view.arm_window(&rc, merged, self.options);
        Ok(())
    }

    /// Moves the partition's stream time to `t` if it is later (writing the clock, with the
    /// event's token when there is one) and closes and expires what the wheel says is due.
    fn advance(&self, t: i64, token: Option<&Token>) -> Result<(), TableError> {
        {
            let mut view = self.view.borrow_mut();
            if view.stream_time.is_some_and(|st| t <= st) {
                return Ok(());
            }
            view.stream_time = Some(t);
        }
        self.clock.write(token, self.partition, Some(t))?;
        let mut fired = Vec::new();
        loop {
            // A close arms the window's expiry, which may be due at once (`expires` 0).
            self.view.borrow_mut().wheel.advance(t, &mut fired);
            if fired.is_empty() {
                return Ok(());
            }
            self.fire(&mut fired, token)?;
        }
    }

    /// Carries out what the wheel fired: the closes first, each handed to the callbacks as
    /// it is made (the close lag is the time to the callback), then expiries and panes.
    fn fire(&self, fired: &mut Vec<(i64, Due<K>)>, token: Option<&Token>) -> Result<(), TableError> {
        let mut closed = 0;
        for (_, due) in fired.iter() {
            match due {
                Due::Close(key, range) => {
                    if let Some(value) = self.close(key, *range)? {
                        closed += 1;
                        self.emit_close(key, *range, &value)?;
                    }
                }
                Due::CloseRange(range) if self.view.borrow_mut().closing.remove(range) => {
                    let finals = self.close_panes(*range, token)?;
                    closed += finals.len() as u64;
                    for (key, value) in &finals {
                        self.emit_close(key, *range, value)?;
                    }
                }
                Due::CloseRange(range) => {
                    // The range is taken out of the view while its callbacks run (one may read
                    // the table, which borrows the view), then put back until it expires.
                    let taken = {
                        let mut view = self.view.borrow_mut();
                        view.wheel.arm(self.options.expire_at(*range), Due::ExpireRange(*range));
                        view.by_range.remove(range)
                    };
                    let Some(keys) = taken else { continue };
                    let finals = self.ranges_values(&[(*range, &keys)]);
                    self.view.borrow_mut().by_range.insert(*range, keys);
                    let finals = finals?.pop().unwrap_or_default();
                    closed += finals.len() as u64;
                    for (key, value) in &finals {
                        self.emit_close(key, *range, value)?;
                    }
                }
                _ => {}
            }
        }
        if closed > 0 {
            crate::runtime::CoreRuntime::with_current(|core| {
                if let Some(core) = core {
                    core.count_windows_closed(closed);
                }
            });
        }
        for (_, due) in fired.drain(..) {
            match due {
                Due::Close(..) => {}
                Due::Expire(key, range) => {
                    // For panes, the closed window's aggregate kept apart at its close.
                    self.windows.write(token, Self::wk_rc(&key, range), None)?;
                    self.view.borrow_mut().forget(&key, range);
                }
                Due::CloseRange(_) => {}
                Due::ExpireRange(range) => {
                    let gone = self.view.borrow_mut().by_range.remove(&range);
                    for key in gone.into_iter().flatten() {
                        let probe = WindowKeyRef { key: &*key, start: range.start, end: range.end };
                        self.windows.write_borrowed(token, &probe, &|| Self::wk_rc(&key, range), None)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The aggregates of each fixed range of `ranges` (given with its keys), in that order. When
    /// the ranges hold a good part of the cache (a tumbling boundary closes the windows of
    /// every key at once) they are read in one pass over the windows table's cache, where a
    /// lookup per key would cost a cache miss each, then a lookup for each key not cached; a
    /// small range (a sliding window, one key) by lookups.
    fn ranges_values(&self, ranges: &[(WindowRange, &KeySet<K>)]) -> Result<Vec<Finals<K, V>>, TableError> {
        let mut out: Vec<Finals<K, V>> = ranges.iter().map(|(_, keys)| Vec::with_capacity(keys.len())).collect();
        let keys: usize = ranges.iter().map(|(_, keys)| keys.len()).sum();
        if keys.saturating_mul(4) < self.windows.cached_len() {
            for ((range, keys), out) in ranges.iter().zip(&mut out) {
                for key in keys.iter() {
                    if let Some(value) = self.stored(key, *range)? {
                        out.push((key.clone(), value));
                    }
                }
            }
            return Ok(out);
        }
        self.windows.for_each_cached(|wk, value| {
            if let Some(i) = ranges.iter().position(|(r, _)| wk.start == r.start && wk.end == r.end) {
                out[i].push((wk.key.clone(), value.clone()));
            }
        });
        for ((range, keys), out) in ranges.iter().zip(&mut out) {
            if out.len() >= keys.len() {
                continue;
            }
            // Some windows are only in the store: evicted from the cache, or not read since
            // the shard opened.
            let missing: Vec<Rc<K>> = {
                let found: hashbrown::HashSet<&K, foldhash::fast::RandomState> =
                    out.iter().map(|(k, _)| &**k).collect();
                keys.iter().filter(|k| !found.contains(&***k)).cloned().collect()
            };
            for key in missing {
                if let Some(value) = self.stored(&key, *range)? {
                    out.push((key, value));
                }
            }
        }
        Ok(out)
    }

    /// Closes the window `range` of every key that has a pane in it (panes are kept by range,
    /// as fixed windows are): its panes are read in one go, combined earliest first per key,
    /// and each key's final aggregate is kept apart (stored under the window's range, which
    /// then expires as a fixed window's) before the panes leave. Returns the finals.
    fn close_panes(&self, range: WindowRange, token: Option<&Token>) -> Result<Finals<K, V>, TableError> {
        let per_pane = {
            let view = self.view.borrow();
            let empty = KeySet::default();
            let panes: Vec<(WindowRange, &KeySet<K>)> =
                self.panes_in(range).map(|pane| (pane, view.by_range.get(&pane).unwrap_or(&empty))).collect();
            self.ranges_values(&panes)?
        };
        let mut finals: hashbrown::HashMap<Rc<K>, V, foldhash::fast::RandomState> = Default::default();
        for (key, value) in per_pane.into_iter().flatten() {
            match finals.entry(key) {
                hashbrown::hash_map::Entry::Occupied(mut e) => {
                    let combined = self.combined(e.get(), value);
                    *e.get_mut() = combined;
                }
                hashbrown::hash_map::Entry::Vacant(e) => {
                    e.insert(value);
                }
            }
        }
        let finals: Finals<K, V> = finals.into_iter().collect();
        for (key, value) in &finals {
            self.windows.write(token, Self::wk_rc(key, range), Some(value.clone()))?;
        }
        let mut view = self.view.borrow_mut();
        for (key, _) in &finals {
            view.note_key(key, range, self.options);
        }
        Ok(finals)
    }

    /// Hands a closed window's final aggregate to `on_window_close` and `emit_final`.
    fn emit_close(&self, key: &K, range: WindowRange, value: &V) -> Result<(), TableError> {
        if let Some(on_close) = &self.options.on_close {
            on_close(key, range, value);
        }
        if let Some(finals) = &self.options.finals {
            finals(key, range, value).map_err(|source| TableError::FinalResult {
                table: self.shared.windows.name().to_string(),
                window: range.to_string(),
                source: Box::new(source),
            })?;
        }
        Ok(())
    }

    fn pane_len(&self) -> i64 {
        match self.shared.windowing {
            Windowing::Hopping { step, .. } => step,
            _ => 0,
        }
    }

    /// Closes `key`'s window `range` (a session, closed by stream time already): its final
    /// aggregate, with its expiry armed. `None` when the window holds nothing (its writes were
    /// undone).
    fn close(&self, key: &Rc<K>, range: WindowRange) -> Result<Option<V>, TableError> {
        let value = self.stored(key, range)?;
        self.view.borrow_mut().wheel.arm(self.options.expire_at(range), Due::Expire(key.clone(), range));
        Ok(value)
    }

    /// The combination of `key`'s panes in `range`, earliest first (`None`: no pane).
    fn combine_panes(&self, key: &K, range: WindowRange) -> Result<Option<V>, TableError> {
        let mut acc: Option<V> = None;
        for pane in self.panes_in(range) {
            if let Some(v) = self.stored(key, pane)? {
                acc = Some(match acc {
                    Some(a) => self.combined(&a, v),
                    None => v,
                });
            }
        }
        Ok(acc)
    }

    /// The panes of the window `range`, earliest first.
    fn panes_in(&self, range: WindowRange) -> impl Iterator<Item = WindowRange> {
        let step = self.pane_len().max(1);
        (0..)
            .map(move |i: i64| range.start.saturating_add(i.saturating_mul(step)))
            .take_while(move |start| *start < range.end)
            .map(move |start| WindowRange::new(start, start.saturating_add(step)))
    }

    /// An earlier pane's aggregate combined with a later one's (the later alone without
    /// [`combine`](WindowedTable::combine)).
    fn combined(&self, earlier: &V, later: V) -> V {
        match &self.options.combine {
            Some(combine) => combine(earlier, &later),
            None => later,
        }
    }

    /// The aggregate of `key` in `range`: stored, or combined from panes while it is open.
    fn window_value(&self, key: &K, range: WindowRange) -> Result<Option<V>, TableError> {
        let closed = self.view.borrow().is_closed(range, self.options);
        if self.panes() && !closed {
            return self.combine_panes(key, range);
        }
        self.stored(key, range)
    }

    /// The aggregate of `key` in the window current at `t` (for sessions: the key's
    /// session that holds `t`).
    fn window_value_at(&self, key: &K, t: i64) -> Result<Option<V>, TableError> {
        if self.shared.windowing.is_session() {
            let range =
                self.view.borrow().live.get(key).and_then(|live| {
                    live.iter().rev().find(|l| l.range.start <= t && t < l.range.end).map(|l| l.range)
                });
            return match range {
                Some(r) => self.windows.get(&Self::wk(key, r)),
                None => Ok(None),
            };
        }
        let range = self.shared.windowing.current(t);
        let expired = self.view.borrow().stream_time.is_some_and(|st| self.options.expire_at(range) <= st);
        if expired {
            return Ok(None);
        }
        self.window_value(key, range)
    }

    fn key_windows(&self, key: &K) -> Result<Vec<(WindowRange, V)>, TableError> {
        let ranges: Vec<WindowRange> = {
            let view = self.view.borrow();
            if view.by_ranges {
                let mut ranges = std::collections::BTreeSet::new();
                for (r, _) in view.by_range.iter().filter(|(_, keys)| keys.contains(key)) {
                    ranges.extend(view.windows_of(*r, self.options));
                }
                ranges.into_iter().collect()
            } else {
                view.live.get(key).map(|live| live.iter().map(|l| l.range).collect()).unwrap_or_default()
            }
        };
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            if let Some(v) = self.window_value(key, r)? {
                out.push((r, v));
            }
        }
        Ok(out)
    }

    fn range_windows(&self, from: i64, to: i64) -> Result<Vec<(K, WindowRange, V)>, TableError> {
        let span = WindowRange::new(from, to);
        let found: Vec<(Rc<K>, WindowRange)> = {
            let view = self.view.borrow();
            if view.by_ranges {
                let mut found: hashbrown::HashSet<(Rc<K>, WindowRange), foldhash::fast::RandomState> =
                    Default::default();
                for (r, keys) in &view.by_range {
                    for w in view.windows_of(*r, self.options).filter(|w| w.overlaps(&span)) {
                        found.extend(keys.iter().map(|k| (k.clone(), w)));
                    }
                }
                let mut found: Vec<(Rc<K>, WindowRange)> = found.into_iter().collect();
                found.sort_by_key(|(_, w)| *w);
                found
            } else {
                view.live
                    .iter()
                    .flat_map(|(k, live)| live.iter().filter(|l| l.range.overlaps(&span)).map(|l| (k.clone(), l.range)))
                    .collect()
            }
        };
        let mut out = Vec::with_capacity(found.len());
        for (k, r) in found {
            if let Some(v) = self.window_value(&k, r)? {
                out.push(((*k).clone(), r, v));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::{WindowKey, WindowKeyRef};

    /// A borrowed window key finds the owned one: same hash, and equivalent.
    #[test]
    fn a_borrowed_window_key_hashes_as_the_owned_one() {
        let hasher = foldhash::fast::RandomState::default();
        let owned = WindowKey { key: std::rc::Rc::new("account-7".to_string()), start: -10_000, end: 0 };
        let key = "account-7".to_string();
        let probe = WindowKeyRef { key: &key, start: -10_000, end: 0 };
        assert_eq!(hasher.hash_one(&owned), hasher.hash_one(&probe));
        assert!(hashbrown::Equivalent::equivalent(&probe, &owned));
        let mut map: hashbrown::HashMap<WindowKey<String>, u32, _> = hashbrown::HashMap::with_hasher(hasher);
        map.insert(owned, 1);
        assert_eq!(map.get(&probe), Some(&1));
    }

    /// The shared key is stored as the key itself: the changelog's and the store's format.
    #[test]
    fn a_window_key_encodes_as_its_key_and_range() {
        let wk = WindowKey { key: std::rc::Rc::new("account-7".to_string()), start: -10_000, end: 0 };
        let json = serde_json::to_string(&wk).expect("encode");
        assert_eq!(json, r#"{"key":"account-7","start":-10000,"end":0}"#);
        let back: WindowKey<String> = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, wk);
    }
}
