//! Crash and fault points: where crash tests abort the process (`FAUST_CRASH_AT`) and fault
//! tests make a write fail as on a full disk (`FAUST_FAIL_AT`).

/// Crash points for crash tests. With `FAUST_CRASH_AT=<point>:<n>` in the environment, the
/// process aborts (no destructors, no flushing: as a `SIGKILL` would stop it) the `n`-th time
/// it passes `point`. Points are named where they are placed (`commit:frozen`, ...); without
/// the variable this is one relaxed load.
pub(crate) fn crash_point(point: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static PASSED: AtomicU64 = AtomicU64::new(0);
    let target = TARGET.get_or_init(|| {
        let spec = std::env::var("FAUST_CRASH_AT").ok()?;
        let (name, n) = spec.rsplit_once(':')?;
        Some((name.to_string(), n.parse().ok()?))
    });
    if let Some((name, n)) = target
        && name == point
        && PASSED.fetch_add(1, Ordering::Relaxed) + 1 >= *n
    {
        eprintln!("crash point {point} reached: aborting");
        std::process::abort();
    }
}

/// Fault points for fault-injection tests: places where the engine writes (a changelog, a
/// store, buffered sends, the committed offsets, a checkpoint). With
/// `FAUST_FAIL_AT=<point>:<n>[:<count>]` in the environment (several, comma-separated), the
/// `n`-th pass of `point` and the `count - 1` passes after it fail as a full disk would
/// (`ENOSPC`); `count` defaults to 1, and `*` fails every pass from the `n`-th on. Without
/// the variable this is one load.
pub(crate) fn fault_point(point: &str) -> std::io::Result<()> {
    use std::sync::{Mutex, OnceLock};
    /// Per point: first failing pass, passes that fail (`u64::MAX`: all), passes so far.
    type Faults = Mutex<Vec<(String, u64, u64, u64)>>;
    static FAULTS: OnceLock<Option<Faults>> = OnceLock::new();
    let faults = FAULTS.get_or_init(|| {
        let spec = std::env::var("FAUST_FAIL_AT").ok()?;
        let parsed = spec
            .split(',')
            .filter_map(|one| {
                let mut parts: Vec<&str> = one.rsplitn(3, ':').collect();
                parts.reverse();
                // `point:n:count` (the point's own name has a colon) or `point:n`.
                let (name, n, count) = match parts.as_slice() {
                    [name, n, count] if n.parse::<u64>().is_ok() => (name.to_string(), n.parse().ok()?, *count),
                    [a, b, n] => (format!("{a}:{b}"), n.parse().ok()?, "1"),
                    _ => return None,
                };
                let count = if count == "*" { u64::MAX } else { count.parse().ok()? };
                Some((name, n, count, 0))
            })
            .collect();
        Some(Mutex::new(parsed))
    });
    let Some(faults) = faults else { return Ok(()) };
    let mut faults = faults.lock().unwrap_or_else(|p| p.into_inner());
    for (name, first, count, passed) in faults.iter_mut() {
        if name == point {
            *passed += 1;
            if *passed >= *first && *passed - *first < *count {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
    }
    Ok(())
}

/// The error a produce to `tp` returns when a fault point fails it: the one a full disk under
/// the embedded log gives, with the batch handed back.
pub(crate) fn injected_produce_failure(
    tp: &faust_transport::TopicPartition,
    batch: faust_storage::BatchBuilder,
    source: std::io::Error,
) -> faust_transport::Error {
    let storage =
        faust_storage::Error::Io { op: "reserve space in (injected fault)", path: tp.to_string().into(), source };
    faust_transport::Error::Produce {
        tp: tp.clone(),
        batch: Box::new(batch),
        source: Box::new(faust_transport::Error::Storage { tp: tp.clone(), source: storage }),
    }
}
