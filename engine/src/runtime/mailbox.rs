//! A mailbox: work pushed to one core from other threads (the control thread's assignment
//! commands, the control socket's queries).

use std::collections::VecDeque;
use std::sync::Mutex;

use event_listener::Event;

use crate::runtime::signal::Cancel;
use crate::util::lock;

/// Items for one core, in the order they were pushed; the core takes them with
/// [`next`](Mailbox::next). Once closed (the core stopped), it takes nothing more.
pub(crate) struct Mailbox<T> {
    /// The queued items, and whether the mailbox is closed (both under one lock, so an item
    /// is either taken by the core or handed back by `close`, never left behind).
    state: Mutex<(VecDeque<T>, bool)>,
    event: Event,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox { state: Mutex::new((VecDeque::new(), false)), event: Event::new() }
    }
}

impl<T> std::fmt::Debug for Mailbox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("Mailbox").field("queued", &state.0.len()).field("closed", &state.1).finish()
    }
}

impl<T> Mailbox<T> {
    /// Queues `item` and wakes the core; hands it back once the mailbox is closed.
    pub(crate) fn push(&self, item: T) -> Result<(), T> {
        let mut state = lock(&self.state);
        if state.1 {
            return Err(item);
        }
        state.0.push_back(item);
        drop(state);
        self.event.notify(usize::MAX);
        Ok(())
    }

    /// The next item, or `None` once `stopping` is set (items queued before are taken first).
    pub(crate) async fn next(&self, stopping: &Cancel) -> Option<T> {
        loop {
            let listener = self.event.listen();
            if let Some(item) = lock(&self.state).0.pop_front() {
                return Some(item);
            }
            if stopping.is_cancelled() {
                return None;
            }
            futures_lite::future::or(listener, stopping.cancelled()).await;
        }
    }

    /// Refuses later items and hands back the queued ones.
    pub(crate) fn close(&self) -> Vec<T> {
        let mut state = lock(&self.state);
        state.1 = true;
        state.0.drain(..).collect()
    }
}
