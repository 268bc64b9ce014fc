//! Helpers shared by the end-to-end scenarios in `tests/tests/`.
//!
//! Scenarios that need a Kafka broker read its address from `FAUST_TEST_BROKER` (set by
//! `scripts/test`, which starts one) and skip with a printed notice when it is unset, so a plain
//! `cargo test` stays hermetic.

/// The environment variable through which `scripts/test` hands a running broker to the tests.
pub const BROKER_ENV: &str = "FAUST_TEST_BROKER";

/// The broker address for tests that need one, or `None` (after printing why the test is
/// skipped) when no broker was provided.
pub fn test_broker(test_name: &str) -> Option<String> {
    match std::env::var(BROKER_ENV) {
        Ok(addr) if !addr.is_empty() => Some(addr),
        _ => {
            eprintln!("skipping {test_name}: no broker ({BROKER_ENV} unset; scripts/test starts one)");
            None
        }
    }
}

/// Every record of `topic` on a `local://` data directory (`{datadir}/topics/{topic}/{p}`),
/// read from the log files, partition after partition. Run it once the worker stopped (a
/// running worker holds the logs' locks).
pub fn topic_records(datadir: &std::path::Path, topic: &str) -> Vec<faust_storage::Record> {
    use faust_storage::{Log, LogConfig};
    let mut out = Vec::new();
    let topic = datadir.join("topics").join(topic);
    let Ok(entries) = std::fs::read_dir(&topic) else { return out };
    let mut partitions: Vec<std::path::PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.parse::<u32>().is_ok()))
        .collect();
    partitions.sort();
    for path in partitions {
        let log = Log::open(&path, LogConfig::default()).expect("open a partition's log");
        let mut next = log.earliest_offset();
        while next < log.high_watermark() {
            for batch in log.read(next, 1 << 20).expect("read a partition's log") {
                out.extend(batch.records_from(next));
                next = batch.last_offset() + 1;
            }
        }
    }
    out
}
