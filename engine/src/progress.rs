//! Progress where work is long (recovery, a backlog, a benchmark job): a bar with the records
//! done, the rate and the time left when stderr is a terminal, a log line every few seconds
//! when it is not (a service's log, a CI job). The bars of one process share one
//! `indicatif::MultiProgress`, so several cores recovering at once draw one bar each, and
//! log lines written through [`log_writer`] go above the bars instead of through them.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the log-line form reports.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// The process's bars: drawn on stderr when it is a terminal, hidden otherwise.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(|| {
        let target =
            if std::io::stderr().is_terminal() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        MultiProgress::with_draw_target(target)
    })
}

/// Progress of one piece of long work: `done` out of `total` records.
///
/// ```
/// use faust::Progress;
///
/// let mut progress = Progress::new("loading orders", Some(1_000));
/// for done in (0..=1_000).step_by(100) {
///     progress.set(done, None);
/// }
/// progress.finish();
/// ```
#[derive(Debug)]
pub struct Progress {
    label: String,
    /// The bar on a terminal; `None` for log lines.
    bar: Option<ProgressBar>,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    /// Progress of `label`, out of `total` records when it is known (a bar with an ETA; an
    /// open-ended count with its rate otherwise).
    pub fn new(label: &str, total: Option<u64>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let style = match total {
                Some(_) => "{msg} [{bar:30}] {human_pos}/{human_len} records, {rate}, ETA {eta}",
                None => "{msg} {human_pos} records, {rate}",
            };
            let bar = bars().add(match total {
                Some(t) => ProgressBar::new(t),
                None => ProgressBar::no_length(),
            });
            // The templates are constants and valid: the fallback is never used.
            let style = ProgressStyle::with_template(style).unwrap_or_else(|_| ProgressStyle::default_bar()).with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0}/s", state.per_sec());
                },
            );
            bar.set_style(style);
            bar.set_message(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = Instant::now();
        Progress { label: label.to_string(), bar, total, done: 0, started: now, last_log: now }
    }

    /// `done` records are done now; `total` changes the total when given (a backlog grows).
    pub fn set(&mut self, done: u64, total: Option<u64>) {
        self.done = done;
        if total.is_some() {
            self.total = total;
        }
        match &self.bar {
            Some(bar) => {
                if let Some(t) = total {
                    bar.set_length(t);
                }
                bar.set_position(done);
            }
            None if self.last_log.elapsed() >= LOG_EVERY => {
                self.last_log = Instant::now();
                tracing::info!("{}", self.line());
            }
            None => {}
        }
    }

    /// The work is over: the bar leaves a summary line; the log gets one when the work took
    /// long enough to have been reported on.
    pub fn finish(&mut self) {
        match self.bar.take() {
            Some(bar) => {
                // The bar goes; a line stays, so output after it starts on a line of its own.
                bar.finish_and_clear();
                let secs = self.started.elapsed().as_secs_f64();
                let line = format!(
                    "{}: {} records in {secs:.1} s ({:.0}/s)",
                    self.label,
                    self.done,
                    self.done as f64 / secs.max(1e-9)
                );
                bars().suspend(|| eprintln!("{line}"));
            }
            None if self.started.elapsed() >= LOG_EVERY => tracing::info!("{} (done)", self.line()),
            None => {}
        }
    }

    /// `label: done/total records (rate/s, ETA)`, for the log.
    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = self.done as f64 / secs;
        match self.total {
            Some(total) => {
                let left = total.saturating_sub(self.done);
                let eta = if rate > 0.0 { format!("{:.0} s", left as f64 / rate) } else { "unknown".into() };
                format!("{}: {}/{total} records ({rate:.0}/s, ETA {eta})", self.label, self.done)
            }
            None => format!("{}: {} records ({rate:.0}/s)", self.label, self.done),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// A writer for `tracing_subscriber::fmt().with_writer(faust::log_writer)`: writes to stderr
/// above the progress bars (they are redrawn below), so log lines and bars do not mix.
///
/// ```
/// let _ = tracing_subscriber::fmt().with_writer(faust::log_writer).try_init();
/// ```
pub fn log_writer() -> LogWriter {
    LogWriter
}

/// Stderr, written above the progress bars: see [`log_writer`].
#[derive(Debug, Clone, Copy)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        bars().suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_line_gives_records_rate_and_time_left() {
        let mut p = Progress::new("recovering counts[3]", Some(1_000));
        p.started = Instant::now() - Duration::from_secs(2);
        p.set(500, None);
        let line = p.line();
        assert!(line.starts_with("recovering counts[3]: 500/1000 records ("), "{line}");
        assert!(line.contains("/s, ETA 2 s)"), "{line}");
        p.set(600, Some(2_000));
        assert!(p.line().contains("600/2000 records"), "a growing backlog moves the total");
        let mut open = Progress::new("reading", None);
        open.set(7, None);
        assert!(open.line().starts_with("reading: 7 records ("), "{}", open.line());
        open.finish();
    }
}
