//! Helpers shared by the benchmark binaries (`storage`, `engine`, `kafka`), workloads W2 and
//! W4, the takeover measurement and the codec section.

pub mod broker;
pub mod codec;
pub mod kafka_group;
pub mod svg;
pub mod takeover;
pub mod w2;
pub mod w3;

/// Prints a progress line on stderr (plain when stdout carries JSON, indented otherwise).
pub fn progress(json: bool, msg: &str) {
    if json {
        eprintln!("{msg}");
    } else {
        eprintln!("  .. {msg}");
    }
}

/// The process's peak resident set size in MB (`VmHWM`), NaN where it cannot be read.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Resets the peak RSS to the current RSS (Linux `clear_refs` 5), so the next reading is the
/// peak of what follows.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The CPU time this thread has used, in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The CPU time of the worker thread between its first and its `n`-th event (a 1-core run:
/// both are marked on the core's thread, which also fetches, commits and writes). Steadier
/// than a wall-clock rate on a shared machine: time the thread spends descheduled is not in it.
pub struct CpuSpan {
    n: u64,
    start: std::sync::atomic::AtomicU64,
    end: std::sync::atomic::AtomicU64,
}

impl CpuSpan {
    /// A span over events 1 to `n`.
    pub fn new(n: u64) -> CpuSpan {
        CpuSpan { n, start: u64::MAX.into(), end: 0.into() }
    }

    /// Notes that the calling thread has now seen `seen` events.
    #[inline]
    pub fn mark(&self, seen: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if seen == 1 {
            self.start.store(thread_cpu_ns(), Relaxed);
        } else if seen == self.n {
            self.end.store(thread_cpu_ns(), Relaxed);
        }
    }

    /// CPU nanoseconds per event between the two marks (NaN if either is missing).
    pub fn ns_per_event(&self) -> f64 {
        use std::sync::atomic::Ordering::Relaxed;
        let (start, end) = (self.start.load(Relaxed), self.end.load(Relaxed));
        if start == u64::MAX || end < start || self.n < 2 {
            return f64::NAN;
        }
        (end - start) as f64 / (self.n - 1) as f64
    }
}
