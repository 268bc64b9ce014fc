//! Signals between tasks and threads: the worker's stop, a core-local cancellation, and a
//! one-shot answer awaited by another thread.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use event_listener::Event;

use crate::util::lock;

/// Tells a running worker to stop; cheap to clone and usable from any thread.
///
/// The worker itself may also stop its run to start again at once: an agent that re-routes
/// its stream inside its body ([`Stream::group_by`](crate::Stream::group_by),
/// [`Stream::through`](crate::Stream::through)), or a new topic that matches an agent's
/// pattern, makes the worker consume a topic it did not subscribe to, which a run takes on
/// only when it joins its group. A stop asked for from outside always wins over a restart.
#[derive(Debug, Default)]
pub struct StopSignal {
    state: AtomicU8,
    event: Event,
}

/// The worker runs.
const RUNNING: u8 = 0;
/// A stop was asked for: `App::run` returns.
const STOPPED: u8 = 1;
/// The run stops to start again with what it learned (new subscriptions).
const RESTARTING: u8 = 2;

impl StopSignal {
    /// Asks the worker to stop: fetching stops, agents finish their current event, offsets are
    /// committed, and `App::run` returns.
    pub fn stop(&self) {
        self.state.store(STOPPED, Ordering::Release);
        self.event.notify(usize::MAX);
    }

    /// Ends the worker's current run as a stop does, for `App::run` to start another at once
    /// (unless a stop is asked for meanwhile, or already was).
    pub(crate) fn restart(&self) {
        if self.state.compare_exchange(RUNNING, RESTARTING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.event.notify(usize::MAX);
        }
    }

    /// Whether the run that ended was ended by [`restart`](Self::restart) and no stop came
    /// since: then the signal is running again, for the next run.
    pub(crate) fn take_restart(&self) -> bool {
        self.state.compare_exchange(RESTARTING, RUNNING, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Whether the current run ends for a restart (not a stop).
    pub(crate) fn is_restarting(&self) -> bool {
        self.state.load(Ordering::Acquire) == RESTARTING
    }

    /// Clears an earlier stop, for a worker that starts again (a second test context).
    pub(crate) fn reset(&self) {
        self.state.store(RUNNING, Ordering::Release);
    }

    /// Whether a stop (or a restart) was asked for: the current run ends.
    pub fn is_stopped(&self) -> bool {
        self.state.load(Ordering::Acquire) != RUNNING
    }

    /// Resolves once a stop (or a restart) is asked for.
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
