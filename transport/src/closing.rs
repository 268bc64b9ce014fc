//! [`Closing`]: a transport's closed flag, which requests check and memberships wait on.

use std::sync::atomic::{AtomicBool, Ordering};

use event_listener::Event;

use crate::error::{Error, Result};

/// Set once by the transport's `close`; every core's requests check it, and a membership that
/// has nothing more to report waits on it.
#[derive(Default)]
pub(crate) struct Closing {
    closed: AtomicBool,
    event: Event,
}

impl Closing {
    /// Closes, waking every waiter.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.event.notify(usize::MAX);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// `Err(Error::Closed)` once closed.
    pub(crate) fn check(&self) -> Result<()> {
        if self.is_closed() { Err(Error::Closed) } else { Ok(()) }
    }

    /// Waits until closed.
    pub(crate) async fn wait(&self) {
        loop {
            // Listening before the check: a close between the two still wakes the listener.
            let listener = self.event.listen();
            if self.is_closed() {
                return;
            }
            listener.await;
        }
    }
}
