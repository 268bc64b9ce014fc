//! What the crash-test workers (`counter`, `eos`) report: their two tables (a count and a sum
//! per key), gathered from every core by a timer, and the stop once they account for every
//! event.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faust::{App, Table};

/// Per core: the items of its shards of the two tables.
type Snapshot = HashMap<usize, (Vec<(String, u64)>, Vec<(String, u64)>)>;

/// The tables' latest items from every core, and the events they count.
#[derive(Clone, Default)]
pub struct Tally {
    snapshot: Arc<Mutex<Snapshot>>,
    total: Arc<AtomicU64>,
}

impl Tally {
    /// Reads `counts` and `sums` on every core of `app` every 10 ms.
    pub fn follow(app: &App, counts: &Table<String, u64>, sums: &Table<String, u64>) -> Tally {
        let tally = Tally::default();
        let (counts, sums, snapshot, total) =
            (counts.clone(), sums.clone(), tally.snapshot.clone(), tally.total.clone());
        app.timer_on_every_core(Duration::from_millis(10), move || {
            let (counts, sums, snapshot, total) = (counts.clone(), sums.clone(), snapshot.clone(), total.clone());
            async move {
                let core = faust::runtime::current_core().ok_or("timers run on cores")?;
                let mine = (counts.local_items()?, sums.local_items()?);
                let mut all = snapshot.lock().map_err(|_| "poisoned")?;
                all.insert(core, mine);
                total.store(all.values().flat_map(|(c, _)| c.iter().map(|(_, n)| n)).sum(), Ordering::SeqCst);
                Ok(())
            }
        });
        tally
    }

    /// Stops `app` once the counts add up to `n` (or after 120 s), `linger` later.
    pub fn stop_when_counted(&self, app: &App, n: u64, linger: Duration) -> std::thread::JoinHandle<()> {
        let (stop, total) = (app.stop_signal(), self.total.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while total.load(Ordering::SeqCst) < n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(linger);
            stop.stop();
        })
    }

    /// Writes the tables to `out`, as JSON: `{"counts": {key: n}, "sums": {key: n}}`.
    pub fn write(&self, out: &str) -> Result<(), String> {
        let all = self.snapshot.lock().map(|s| s.clone()).unwrap_or_default();
        let mut dump: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
        for (c, s) in all.values() {
            dump.entry("counts").or_default().extend(c.iter().cloned());
            dump.entry("sums").or_default().extend(s.iter().cloned());
        }
        let text = serde_json::to_string(&dump).map_err(|e| e.to_string())?;
        std::fs::write(out, text).map_err(|e| format!("writing {out}: {e}"))
    }
}

/// The steps a worker can die at (`FAUST_CRASH_AT`), in the order the commit protocol and
/// recovery pass them.
pub const CRASH_POINTS: [&str; 8] = [
    "commit:frozen",
    "commit:changelog-batch",
    "commit:changelog",
    "commit:flushed",
    "commit:committed",
    "commit:checkpoint",
    "recover:replayed",
    "recover:neutralizing",
];
