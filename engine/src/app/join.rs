//! Windowed stream–stream joins (Kafka Streams' `KStream.join(KStream, JoinWindows)`; Faust's
//! joins are stubs): two co-partitioned topics, one event of each with the same key and
//! timestamps at most `window` apart make a pair.
//!
//! Each side's recent events wait in a windowed table of its own (`{name}-left`,
//! `{name}-right`: tumbling windows of `window`, kept a window past their close), so the
//! buffers are replicated through changelogs, survive a crash exactly (a write stands or falls
//! with its event's ack) and expire on their own. An event looks up the other side's events
//! in the three windows that cover `[t - window, t + window]`, on its own core (the sides are
//! co-partitioned), and the pairs are handed to the join's function as the later of the two
//! events arrives — each pair once.

use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::app::{App, Topic};
use crate::error::AgentError;
use crate::window::WindowedTable;

/// Which events of a windowed stream–stream join are handed over without a partner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    /// Only pairs.
    Inner,
    /// Pairs, and each left event that finds no right one when it arrives (with `None`).
    Left,
    /// Pairs, and each event of either side that finds no partner when it arrives.
    Outer,
}

/// The events of one side waiting for partners: (timestamp, value), per key and window.
type Buffer<K, V> = WindowedTable<K, Vec<(i64, V)>>;

impl App {
    /// Joins the events of `left` and `right` by key within `window` (Kafka Streams'
    /// `join`, `leftJoin`, `outerJoin` with `JoinWindows`): `f(key, left, right)` gets each
    /// pair of events with the same key whose timestamps are at most `window` apart, once,
    /// when the later of the two arrives; with [`JoinKind::Left`] or [`JoinKind::Outer`] also
    /// an event that finds no partner when it arrives (the other side `None`; a partner that
    /// comes later makes a pair too, as in Kafka Streams before 3.1). `f` runs in the agent
    /// of the event's side, on its core: its sends with `send_soon` are durable before the
    /// event is committed, and an error fails the event as in any agent.
    ///
    /// The topics must be co-partitioned (the same partition count, keys partitioned alike).
    /// An event later than `window` behind its side's stream time is late (counted, and
    /// joined with nothing).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use faust::{App, JoinKind, Settings};
    ///
    /// let app = App::new(Settings::new("ads"));
    /// let views = app.topic::<String, String>("views"); // keyed by ad
    /// let clicks = app.topic::<String, String>("clicks");
    /// app.join_windowed("view-click", &views, &clicks, Duration::from_secs(60), JoinKind::Left, |ad, view, click| {
    ///     println!("{ad}: {view:?} then {click:?}");
    ///     Ok(())
    /// });
    /// ```
    pub fn join_windowed<K, L, R, F>(
        &self,
        name: &str,
        left: &Topic<K, L>,
        right: &Topic<K, R>,
        window: Duration,
        kind: JoinKind,
        f: F,
    ) where
        K: Serialize + DeserializeOwned + Hash + Eq + Clone + Send + Sync + 'static,
        L: Serialize + DeserializeOwned + Clone + 'static,
        R: Serialize + DeserializeOwned + Clone + 'static,
        F: Fn(&K, Option<&L>, Option<&R>) -> Result<(), AgentError> + Send + Sync + 'static,
    {
        let window = window.max(Duration::from_millis(1));
        let (lefts, rights): (Buffer<K, L>, Buffer<K, R>) =
            (buffer(self, &format!("{name}-left"), window), buffer(self, &format!("{name}-right"), window));
        let f = Arc::new(f);
        let width = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let on_left = {
            let f = f.clone();
            move |key: &K, l: &L, r: Option<&R>| f(key, Some(l), r)
        };
        let on_right = move |key: &K, r: &R, l: Option<&L>| f(key, l, Some(r));
        let side = Side { width, alone: kind != JoinKind::Inner };
        side.run(self, &format!("{name}-left"), left, &lefts, &rights, on_left);
        let side = Side { width, alone: kind == JoinKind::Outer };
        side.run(self, &format!("{name}-right"), right, &rights, &lefts, on_right);
    }
}

/// One side of a join: its events are buffered, and paired with the other side's.
struct Side {
    width: i64,
    /// Whether an event without a partner is handed over alone.
    alone: bool,
}

impl Side {
    /// Registers the agent of `topic`: each event goes into `own` and meets the events of
    /// `other`; `emit(key, event, partner)` hands over each pair (and a lone event).
    fn run<K, A, B>(
        self,
        app: &App,
        agent: &str,
        topic: &Topic<K, A>,
        own: &Buffer<K, A>,
        other: &Buffer<K, B>,
        emit: impl Fn(&K, &A, Option<&B>) -> Result<(), AgentError> + Send + Sync + 'static,
    ) where
        K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
        A: Serialize + DeserializeOwned + Clone + 'static,
        B: Serialize + DeserializeOwned + Clone + 'static,
    {
        let (own, other, emit) = (own.clone(), other.clone(), Arc::new(emit));
        let Side { width, alone } = self;
        app.agent(agent, topic, move |mut stream| {
            let (own, other, emit) = (own.clone(), other.clone(), emit.clone());
            async move {
                while let Some(event) = stream.next_event().await {
                    let Some(key) = &event.key else { continue };
                    let t = event.timestamp;
                    own.update_at(key, t, |buffered| buffered.push((t, event.value.clone())))?;
                    let partners = partners(&other, key, t, width)?;
                    for partner in &partners {
                        emit(key, &event.value, Some(partner))?;
                    }
                    if partners.is_empty() && alone {
                        emit(key, &event.value, None)?;
                    }
                }
                Ok(())
            }
        });
    }
}

/// A side's buffer: tumbling windows of `window` that take events up to a window late and
/// stay readable a window past their close.
fn buffer<K, V>(app: &App, name: &str, window: Duration) -> Buffer<K, V>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    app.table::<K, Vec<(i64, V)>>(name).with_default(Vec::new).tumbling(window).grace(window).expires(window * 2)
}

/// The values of `key` buffered on the other side with timestamps within `width` of `t`,
/// oldest first: from the windows of `t - width`, `t` and `t + width`, which cover them all.
fn partners<K, V>(buffer: &Buffer<K, V>, key: &K, t: i64, width: i64) -> Result<Vec<V>, AgentError>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    V: Serialize + DeserializeOwned + Clone + 'static,
{
    let mut found: Vec<(i64, V)> = Vec::new();
    for at in [t.saturating_sub(width), t, t.saturating_add(width)] {
        if let Some(buffered) = buffer.at(key, at)? {
            found.extend(buffered.into_iter().filter(|(ts, _)| ts.abs_diff(t) <= width.unsigned_abs()));
        }
    }
    found.sort_by_key(|(ts, _)| *ts);
    Ok(found.into_iter().map(|(_, v)| v).collect())
}
