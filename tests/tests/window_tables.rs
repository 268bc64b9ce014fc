//! Windowed tables end to end on one core (`memory://`, through the test context): closing on
//! stream time, grace and late events, expiry, sessions, panes, reads and final results.
//! Event times come from the values (`update_at`), so each test states them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;

use faust::{App, Settings, Topic, WindowRange, WindowResult, WindowedTable};

type Closes = Arc<Mutex<Vec<(String, WindowRange, u64)>>>;
type Events = Topic<String, (i64, u64)>;
type Lates = Arc<Mutex<Vec<(String, i64, Vec<WindowRange>)>>>;

/// The agent of these tests: adds each event's `n` to its key's windows at its time `t`.
fn count_agent(app: &App, events: &Events, table: &WindowedTable<String, u64>) {
    let table = table.clone();
    app.agent("count", events, move |mut stream| {
        let table = table.clone();
        async move {
            while let Some((key, (t, n))) = stream.next_item().await {
                table.update_at(&key.unwrap_or_default(), t, |c| *c += n)?;
            }
            Ok(())
        }
    });
}

/// An app whose agent adds each event's `n` to its key's windows at its time `t`, with the
/// closes it saw; `make` turns the table into the windowed one under test.
fn counting(
    id: &str,
    make: impl FnOnce(faust::Table<String, u64>) -> WindowedTable<String, u64>,
) -> (App, Events, WindowedTable<String, u64>, Closes) {
    let app = App::new(Settings::new(id));
    let events = app.topic::<String, (i64, u64)>("events");
    let closes: Closes = Arc::default();
    let seen = closes.clone();
    let table = make(app.table::<String, u64>("counts").with_default(|| 0))
        .on_window_close(move |k: &String, w, v: &u64| seen.lock().unwrap().push((k.clone(), w, *v)));
    count_agent(&app, &events, &table);
    (app, events, table, closes)
}

fn put(test: &faust::TestContext, events: &Topic<String, (i64, u64)>, key: &str, t: i64, n: u64) {
    test.put(events, Some(&key.to_string()), &(t, n)).expect("put");
}

fn w(start: i64, end: i64) -> WindowRange {
    WindowRange::new(start, end)
}

#[test]
fn tumbling_windows_close_when_stream_time_passes_their_end() {
    let (app, events, table, closes) = counting("tumbling", |t| t.tumbling(Duration::from_secs(10)));
    let test = app.test_context().unwrap();
    put(&test, &events, "a", 0, 1);
    put(&test, &events, "a", 5_000, 1);
    put(&test, &events, "b", 9_999, 1);
    assert!(closes.lock().unwrap().is_empty(), "nothing is due before 10 s");
    put(&test, &events, "a", 10_000, 1);
    let mut got = closes.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, vec![("a".into(), w(0, 10_000), 2), ("b".into(), w(0, 10_000), 1)]);
    let windows = test.windows(&table).unwrap();
    assert_eq!(windows.get(&("a".to_string(), w(10_000, 20_000))), Some(&1));
    test.stop().unwrap();
    assert_eq!(app.stats().windows_closed, 2);
}

#[test]
fn grace_takes_late_events_and_after_it_they_go_to_on_late() {
    let late: Lates = Arc::default();
    let seen = late.clone();
    let (app, events, _table, closes) = counting("grace", move |t| {
        t.tumbling(Duration::from_secs(10)).grace(Duration::from_secs(5)).on_late(
            move |k: &String, t, missed: &[WindowRange]| seen.lock().unwrap().push((k.clone(), t, missed.to_vec())),
        )
    });
    let test = app.test_context().unwrap();
    put(&test, &events, "a", 1_000, 1);
    put(&test, &events, "a", 12_000, 1);
    // Within grace: counted in [0, 10 s), which is still open.
    put(&test, &events, "a", 8_000, 1);
    assert!(closes.lock().unwrap().is_empty());
    put(&test, &events, "a", 15_000, 1);
    assert_eq!(closes.lock().unwrap().clone(), vec![("a".into(), w(0, 10_000), 2)]);
    // After grace: late, and the closed window does not change or close again.
    put(&test, &events, "a", 9_000, 1);
    assert_eq!(late.lock().unwrap().clone(), vec![("a".into(), 9_000, vec![w(0, 10_000)])]);
    put(&test, &events, "a", 40_000, 1);
    assert_eq!(closes.lock().unwrap().len(), 2, "[10 s, 20 s) closes, [0, 10 s) not again");
    test.stop().unwrap();
    assert_eq!(app.stats().late_events, 1);
}

#[test]
fn closed_windows_expire_from_the_table_and_its_changelog() {
    let (app, events, table, _) =
        counting("expiry", |t| t.tumbling(Duration::from_secs(10)).expires(Duration::from_secs(5)));
    let test = app.test_context().unwrap();
    put(&test, &events, "a", 0, 1);
    put(&test, &events, "a", 12_000, 1);
    // Closed at 10 s, readable until 15 s.
    assert_eq!(test.windows(&table).unwrap().len(), 2);
    put(&test, &events, "a", 15_000, 1);
    let windows = test.windows(&table).unwrap();
    assert_eq!(windows.keys().cloned().collect::<Vec<_>>(), vec![("a".to_string(), w(10_000, 20_000))]);
    test.stop().unwrap();
}

#[test]
fn sessions_grow_merge_and_close_after_the_gap() {
    let app = App::new(Settings::new("sessions"));
    let events = app.topic::<String, (i64, u64)>("events");
    let closes: Closes = Arc::default();
    let seen = closes.clone();
    let table = app
        .table::<String, u64>("clicks")
        .with_default(|| 0)
        .session(Duration::from_millis(10), |a, b| a + b)
        .grace(Duration::from_millis(100))
        .on_window_close(move |k: &String, w, v: &u64| seen.lock().unwrap().push((k.clone(), w, *v)));
    count_agent(&app, &events, &table);
    let test = app.test_context().unwrap();
    put(&test, &events, "a", 0, 1);
    put(&test, &events, "a", 5, 1);
    put(&test, &events, "a", 18, 1);
    let sessions = test.windows(&table).unwrap();
    assert_eq!(sessions.get(&("a".to_string(), w(0, 15))), Some(&2));
    assert_eq!(sessions.get(&("a".to_string(), w(18, 28))), Some(&1));
    // An event that bridges them merges them.
    put(&test, &events, "a", 9, 1);
    let sessions = test.windows(&table).unwrap();
    assert_eq!(sessions.into_iter().collect::<Vec<_>>(), vec![(("a".to_string(), w(0, 28)), 4)]);
    put(&test, &events, "a", 200, 1);
    assert_eq!(closes.lock().unwrap().clone(), vec![("a".into(), w(0, 28), 4)]);
    test.stop().unwrap();
}

#[test]
fn reads_take_the_window_of_the_event_the_stream_or_a_delta() {
    let app = App::new(Settings::new("reads"));
    let events = app.topic::<String, (i64, u64)>("events");
    let answers = app.topic::<String, Vec<Option<u64>>>("answers");
    let table = app.table::<String, u64>("counts").with_default(|| 0).tumbling(Duration::from_secs(10));
    let (agent_table, out) = (table.clone(), answers.clone());
    app.agent("count", &events, move |mut stream| {
        let (table, out) = (agent_table.clone(), out.clone());
        async move {
            while let Some((key, (t, n))) = stream.next_item().await {
                let key = key.unwrap_or_default();
                table.update_at(&key, t, |c| *c += n)?;
                let found = vec![
                    table.at(&key, t)?,
                    table.now(&key)?,
                    table.at(&key, t - 10_000)?,
                    table.windows(&key)?.len().try_into().ok(),
                ];
                out.send_soon(Some(&key), &found)?;
            }
            Ok(())
        }
    });
    let test = app.test_context().unwrap();
    put(&test, &events, "a", 1_000, 1);
    put(&test, &events, "a", 2_000, 1);
    put(&test, &events, "a", 11_000, 5);
    let got: Vec<Vec<Option<u64>>> = test.records(&answers).unwrap().into_iter().map(|(_, v)| v).collect();
    assert_eq!(got[1], vec![Some(2), Some(2), None, Some(1)]);
    assert_eq!(got[2], vec![Some(5), Some(5), Some(2), Some(2)]);
    test.stop().unwrap();
}

#[test]
fn final_results_go_to_a_topic_once_per_closed_window() {
    let app = App::new(Settings::new("finals"));
    let events = app.topic::<String, (i64, u64)>("events");
    let finals = app.topic::<String, WindowResult<u64>>("finals");
    let table =
        app.table::<String, u64>("counts").with_default(|| 0).tumbling(Duration::from_secs(1)).emit_final(&finals);
    count_agent(&app, &events, &table);
    let test = app.test_context().unwrap();
    for t in [0, 100, 900, 1_000, 1_500, 2_000, 2_100, 3_000] {
        put(&test, &events, "k", t, 1);
    }
    let got: Vec<WindowResult<u64>> = test.records(&finals).unwrap().into_iter().map(|(_, v)| v).collect();
    assert_eq!(
        got,
        vec![
            WindowResult { start: 0, end: 1_000, value: 3 },
            WindowResult { start: 1_000, end: 2_000, value: 2 },
            WindowResult { start: 2_000, end: 3_000, value: 2 },
        ]
    );
    test.stop().unwrap();
}

/// The hopping count of these tests: 60 s windows every 10 s, grace 15 s, combined per pane or
/// written per window.
fn hopping(table: faust::Table<String, u64>, panes: bool) -> WindowedTable<String, u64> {
    let t = table.hopping(Duration::from_secs(60), Duration::from_secs(10)).grace(Duration::from_secs(15));
    if panes { t.combine(|a, b| a + b) } else { t }
}

/// Runs `events` (key index, time, amount) through a 60 s / 10 s hopping count, with panes
/// or without, then an event far later for each key that closes its windows; returns the
/// closes.
fn hopping_run(id: &str, events_in: &[(u8, i64, u64)], panes: bool) -> Vec<(String, WindowRange, u64)> {
    let (app, events, _table, closes) = counting(id, |t| hopping(t, panes));
    let test = app.test_context().unwrap();
    for (k, t, n) in events_in {
        put(&test, &events, &format!("k{k}"), *t, *n);
    }
    // Stream time is per partition: each key's own later event closes its windows.
    for k in 0..3 {
        put(&test, &events, &format!("k{k}"), 10_000_000, 1);
    }
    test.stop().unwrap();
    let mut closes = closes.lock().unwrap().clone();
    closes.sort();
    closes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// With an associative aggregation, one pane per event gives exactly the closes (and the
    /// final aggregates) of applying every event to each of its six windows.
    #[test]
    fn panes_close_as_per_window_writes_do(events in proptest::collection::vec((0u8..3, 0i64..300_000, 1u64..5), 1..40)) {
        let a = hopping_run("hop-windows", &events, false);
        let b = hopping_run("hop-panes", &events, true);
        // The first event is never late: its six windows closed.
        prop_assert!(a.iter().map(|c| c.2).sum::<u64>() >= 6 * events[0].2);
        prop_assert_eq!(a, b);
    }

    /// Reads of hopping windows combined per pane (a key's windows, every window of the
    /// partition, open ones combined from their panes and closed ones from their finals) are
    /// those of the same windows written one by one.
    #[test]
    fn panes_read_as_per_window_writes_do(events in proptest::collection::vec((0u8..3, 0i64..300_000, 1u64..5), 1..30)) {
        let a = hopping_reads("hop-reads-windows", &events, false);
        let b = hopping_reads("hop-reads-panes", &events, true);
        prop_assert_eq!(a.len(), events.len());
        prop_assert_eq!(a, b);
    }
}

/// After an event: its key, the key's windows, and every window of the partition.
type Read = (String, Vec<(WindowRange, u64)>, Vec<(String, WindowRange, u64)>);

/// Runs `events` (key index, time, amount) through a 60 s / 10 s hopping count, with panes or
/// without; after each event, reads the key's windows and every window of the partition.
fn hopping_reads(id: &str, events_in: &[(u8, i64, u64)], panes: bool) -> Vec<Read> {
    let app = App::new(Settings::new(id));
    let events = app.topic::<String, (i64, u64)>("events");
    let table = hopping(app.table::<String, u64>("counts").with_default(|| 0), panes);
    let reads: Arc<Mutex<Vec<Read>>> = Arc::default();
    let seen = reads.clone();
    app.agent("count", &events, move |mut stream| {
        let (table, seen) = (table.clone(), seen.clone());
        async move {
            while let Some((key, (t, n))) = stream.next_item().await {
                let key = key.unwrap_or_default();
                table.update_at(&key, t, |c| *c += n)?;
                let mut all = table.local_windows(i64::MIN, i64::MAX)?;
                all.sort();
                seen.lock().unwrap().push((key.clone(), table.windows(&key)?, all));
            }
            Ok(())
        }
    });
    let test = app.test_context().unwrap();
    for (k, t, n) in events_in {
        put(&test, &events, &format!("k{k}"), *t, *n);
    }
    test.stop().unwrap();
    reads.lock().unwrap().clone()
}

#[test]
fn an_idle_stream_closes_its_windows_by_the_wall_clock() {
    let app = App::new(Settings::new("idle"));
    let events = app.topic::<String, u64>("events");
    let closes: Closes = Arc::default();
    let seen = closes.clone();
    // Event time is the record's timestamp (the wall clock when it was sent).
    let table = app
        .table::<String, u64>("counts")
        .with_default(|| 0)
        .tumbling(Duration::from_millis(200))
        .idle_timeout(Duration::from_millis(50))
        .on_window_close(move |k: &String, w, v: &u64| seen.lock().unwrap().push((k.clone(), w, *v)));
    let agent_table = table.clone();
    app.agent("count", &events, move |mut stream| {
        let table = agent_table.clone();
        async move {
            while let Some((key, n)) = stream.next_item().await {
                table.update(&key.unwrap_or_default(), |c| *c += n)?;
            }
            Ok(())
        }
    });
    let test = app.test_context().unwrap();
    test.put(&events, Some(&"a".to_string()), &2).unwrap();
    // No other event comes: the window closes once its end (≤ 200 ms away) passed by the
    // wall clock, after the idle timeout.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while closes.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = closes.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0.as_str(), got[0].2), ("a", 2));
    assert_eq!(got[0].1.end - got[0].1.start, 200);
    test.stop().unwrap();
}

/// The sessions a set of event times makes, by definition: each event covers `[t, t + gap)`,
/// and overlapping covers are one session. Per session: its range and its event count.
fn sessions_by_definition(times: &[i64], gap: i64) -> Vec<(WindowRange, u64)> {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<(WindowRange, u64)> = Vec::new();
    for t in sorted {
        match out.last_mut() {
            Some((last, n)) if t < last.end => {
                last.end = last.end.max(t + gap);
                *n += 1;
            }
            _ => out.push((WindowRange::new(t, t + gap), 1)),
        }
    }
    out
}

/// Runs `times` (in that order) through a session count with gap `gap` and a grace that takes
/// them all, then an event far later that closes every session before it; returns the closes.
fn session_run(id: &str, times: &[i64], gap: i64) -> Vec<(String, WindowRange, u64)> {
    let (app, events, _table, closes) =
        counting(id, |t| t.session(Duration::from_millis(gap as u64), |a, b| a + b).grace(Duration::from_secs(3_600)));
    let test = app.test_context().unwrap();
    for t in times {
        put(&test, &events, "a", *t, 1);
    }
    // Stream time is per partition: the closing event is the same key's.
    put(&test, &events, "a", 100_000_000, 1);
    test.stop().unwrap();
    let mut closes: Vec<_> = closes.lock().unwrap().clone();
    closes.sort();
    closes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Sessions built event by event — merging when an event bridges two — are the sessions
    /// of the definition, with every event counted once, whatever the order of the events.
    #[test]
    fn sessions_are_the_same_whatever_the_order(times in proptest::collection::vec(0i64..2_000, 1..30), gap in 1i64..150) {
        let want: Vec<(String, WindowRange, u64)> =
            sessions_by_definition(&times, gap).into_iter().map(|(r, n)| ("a".to_string(), r, n)).collect();
        prop_assert_eq!(&session_run("sessions-given", &times, gap), &want);
        let mut sorted = times.clone();
        sorted.sort_unstable();
        prop_assert_eq!(&session_run("sessions-sorted", &sorted, gap), &want);
    }
}

/// `relative_to_field`: the time comes from the value (Faust's `relative_to_field`); a value
/// of another type is a typed error, not a guess.
#[test]
fn relative_to_field_reads_the_time_from_the_value() {
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    struct Click {
        at: i64,
    }
    let app = App::new(Settings::new("field"));
    let clicks = app.topic::<String, Click>("clicks");
    let answers = app.topic::<String, (Option<u64>, String)>("answers");
    let table = app
        .table::<String, u64>("counts")
        .with_default(|| 0)
        .tumbling(Duration::from_secs(10))
        .relative_to_field(|c: &Click| c.at);
    let (agent_table, out) = (table.clone(), answers.clone());
    app.agent("count", &clicks, move |mut stream| {
        let (table, out) = (agent_table.clone(), out.clone());
        async move {
            while let Some((key, click)) = stream.next_item().await {
                let key = key.unwrap_or_default();
                table.update_from(&key, &click, |n| *n += 1)?;
                let wrong = table.update_from(&key, &"not a click".to_string(), |n| *n += 1);
                let error = wrong.err().map(|e| e.to_string()).unwrap_or_default();
                out.send_soon(Some(&key), &(table.value_from(&key, &click)?, error))?;
            }
            Ok(())
        }
    });
    let test = app.test_context().unwrap();
    for at in [1_000, 2_000, 12_000] {
        test.put(&clicks, Some(&"a".to_string()), &Click { at }).unwrap();
    }
    let got: Vec<(Option<u64>, String)> = test.records(&answers).unwrap().into_iter().map(|(_, v)| v).collect();
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![Some(1), Some(2), Some(1)]);
    assert!(got[0].1.contains("no time field for a value of type alloc::string::String"), "{}", got[0].1);
    test.stop().unwrap();
}
