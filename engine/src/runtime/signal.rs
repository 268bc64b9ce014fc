//! Signals between tasks and threads: the worker's stop, a core-local cancellation, and a
//! one-shot answer awaited by another thread.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use event_listener::Event;

use crate::util::lock;

/// Tells a running worker to stop; cheap to clone and usable from any thread.
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    event: Event,
}

impl StopSignal {
    /// Asks the worker to stop: fetching stops, agents finish their current event, offsets are
    /// committed, and `App::run` returns.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.event.notify(usize::MAX);
    }

    /// Clears an earlier stop, for a worker that starts again (a second test context).
    pub(crate) fn reset(&self) {
        self.stopped.store(false, Ordering::Release);
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Resolves once a stop is asked for.
    pub async fn wait(&self) {
        loop {
            let listener = self.event.listen();
            if self.is_stopped() {
                return;
            }
            listener.await;
        }
    }
}

/// A cancellation flag one task sets and another awaits (single core).
#[derive(Debug, Default)]
pub(crate) struct Cancel {
    flag: Cell<bool>,
    event: Event,
}

impl Cancel {
    pub(crate) fn cancel(&self) {
        self.flag.set(true);
        self.event.notify(usize::MAX);
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.flag.get()
    }

    pub(crate) async fn cancelled(&self) {
        loop {
            let listener = self.event.listen();
            if self.flag.get() {
                return;
            }
            listener.await;
        }
    }
}

/// A value set once by one side and awaited by the other (any threads): the answer to a send
/// made from outside the worker, or a core's answer to a command of the control thread.
#[derive(Debug)]
pub(crate) struct Oneshot<T> {
    value: Mutex<Option<T>>,
    event: Event,
}

impl<T> Default for Oneshot<T> {
    fn default() -> Self {
        Oneshot { value: Mutex::new(None), event: Event::new() }
    }
}

impl<T> Oneshot<T> {
    /// Sets the value and wakes whoever waits.
    pub(crate) fn set(&self, value: T) {
        *lock(&self.value) = Some(value);
        self.event.notify(usize::MAX);
    }

    /// The value, once set.
    pub(crate) async fn wait(&self) -> T {
        loop {
            let listener = self.event.listen();
            if let Some(v) = lock(&self.value).take() {
                return v;
            }
            listener.await;
        }
    }

    /// The value, or `None` if it is not set within `timeout` (on any thread: the timer is not
    /// an executor's).
    pub(crate) async fn wait_for(&self, timeout: Duration) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let listener = self.event.listen();
            if let Some(v) = lock(&self.value).take() {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            futures_lite::future::or(
                async {
                    listener.await;
                },
                futures_timer::Delay::new(deadline - now),
            )
            .await;
        }
    }
}
