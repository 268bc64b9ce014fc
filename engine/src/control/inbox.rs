//! Work for one core sent from other threads (the control socket's queries): a core runs
//! each as a task of its own and answers through a channel the asking thread waits on.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, mpsc};

use super::{ANSWER_TIMEOUT, Answer, failed};
use crate::runtime::CoreRuntime;
use crate::runtime::mailbox::Mailbox;

/// Work for one core, sent from the socket thread.
pub(crate) type Query = Box<dyn FnOnce(Rc<CoreRuntime>) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// The queries waiting for one core.
#[derive(Default)]
pub(crate) struct Inbox {
    mailbox: Mailbox<Query>,
}

impl Inbox {
    /// Queues `query`; drops it (its reply channel with it) when the core has stopped, so its
    /// asker hears at once.
    fn push(&self, query: Query) {
        drop(self.mailbox.push(query));
    }

    /// Runs the queries that arrive, each as a task of its own, until the core stops.
    pub(crate) async fn serve(self: Arc<Self>, core: Rc<CoreRuntime>) {
        while let Some(query) = self.mailbox.next(core.stopping()).await {
            glommio::spawn_local(query(core.clone())).detach();
        }
    }

    /// Refuses later queries and drops the queued ones.
    pub(crate) fn close(&self) {
        drop(self.mailbox.close());
    }
}

/// Runs `f` on core `core` and waits for its answer.
pub(super) fn ask<F, Fut>(inboxes: &[Arc<Inbox>], core: usize, f: F) -> Answer
where
    F: FnOnce(Rc<CoreRuntime>) -> Fut + Send + 'static,
    Fut: Future<Output = Answer> + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let Some(inbox) = inboxes.get(core) else { return Err(failed(format!("no core {core}"))) };
    inbox.push(Box::new(move |runtime| {
        Box::pin(async move {
            let _ = tx.send(f(runtime).await);
        })
    }));
    match rx.recv_timeout(ANSWER_TIMEOUT) {
        Ok(answer) => answer,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            Err(failed(format!("core {core} did not answer within {} s", ANSWER_TIMEOUT.as_secs())))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(failed("the worker is stopping".into())),
    }
}
