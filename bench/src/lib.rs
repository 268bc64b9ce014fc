//! Helpers shared by the benchmark binaries (`storage`, `engine`, `kafka`), workloads W2 and
//! W4, the takeover measurement and the codec section.

pub mod codec;
pub mod takeover;
pub mod w2;

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
