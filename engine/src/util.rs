//! Small helpers every layer uses: locking a mutex whatever a panic left, the wall clock in
//! milliseconds, hex previews of bytes, and the message of a panic.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`. Every critical section in the crate leaves its data consistent, so a panic
/// elsewhere (which poisons the mutex) does not matter.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The first `max` bytes of `bytes` in hex, with `…` when there are more.
pub(crate) fn hex_preview(bytes: &[u8], max: usize) -> String {
    let shown: String = bytes.iter().take(max).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > max { format!("{shown}…") } else { shown }
}

/// What a panic said, when it said it with a string.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send), otherwise: &str) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| otherwise.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_and_panic_messages() {
        assert_eq!(hex_preview(b"ab", 4), "6162");
        assert_eq!(hex_preview(b"abcdef", 2), "6162…");
        let boxed: Box<dyn std::any::Any + Send> = Box::new("boom");
        assert_eq!(panic_message(&*boxed, "panic"), "boom");
        let boxed: Box<dyn std::any::Any + Send> = Box::new(42);
        assert_eq!(panic_message(&*boxed, "panic"), "panic");
    }
}
