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
