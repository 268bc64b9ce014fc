//! Running an agent: restarting it on the event it failed on, skipping a poison event after
//! three restarts, stopping the worker on an error that is not about the event.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use faust_transport::TopicPartition;

use crate::error::AgentError;
use crate::runtime::CoreRuntime;
use crate::runtime::context::{InTask, TaskSlot};
use crate::runtime::queue::{EventQueue, QueuedEvent};

/// How an agent (or task, or timer) is started on a core: the factory the app registered.
pub(crate) type StartAgent = Arc<dyn Fn(AgentRun) -> Pin<Box<dyn Future<Output = ()>>> + Send + Sync>;

/// How many times an agent is restarted on the same event before the event is skipped.
const MAX_RESTARTS_PER_EVENT: u32 = 3;

/// Events skipped in a row with the same error after which the worker stops instead: an
/// error that repeats for different records is not about the records.
const SKIPS_IN_A_ROW_FATAL: u32 = 3;

/// Why an agent's error is not about the event it failed on (then the worker stops rather
/// than skip events): a table whose shard is not on this core, whose changelog is not
/// co-partitioned with the event's topic, or whose store or transport failed.
fn systemic(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use crate::error::TableError;
    match error.downcast_ref::<TableError>()? {
        TableError::NotLocal { .. } => Some("a table shard is not on the core of the event's partition"),
        TableError::PartitionsMismatch { .. } => Some("a table is not co-partitioned with the agent's topic"),
        TableError::NotRunning { .. } | TableError::OutsideStream { .. } => Some("a table is used where it cannot be"),
        TableError::Store { .. } | TableError::Transport { .. } => Some("a table's storage failed"),
        _ => None,
    }
}

/// What an agent's supervisor does when the agent fails on an event (Faust's
/// `supervisor_strategy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Supervisor {
    /// Restart the agent on the event it failed on; after 3 failures on the same event, log
    /// and skip it (Faust's default, the one-for-one supervisor, which restarts the failed
    /// actor).
    #[default]
    Restart,
    /// Log and skip the event at once, and go on with the next one.
    Skip,
    /// Stop the worker with the error (Faust's crashing supervisor), the event and everything
    /// after it uncommitted: a restart after the fix processes it.
    Crash,
}

/// One failure of an agent on an event, as [`Agent::on_error`](crate::Agent::on_error) hears
/// of it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentFailure {
    /// The agent.
    pub agent: String,
    /// What it failed with (the error, or the panic's message).
    pub error: String,
    /// The event's topic, partition and offset (`None` when it failed outside an event).
    pub event: Option<(TopicPartition, u64)>,
    /// How many times in a row it failed on this event.
    pub attempt: u32,
}

/// An agent's `on_error` hook.
pub(crate) type OnError = Arc<dyn Fn(&AgentFailure) + Send + Sync>;

/// How an agent is supervised (set on its handle before the worker starts).
#[derive(Clone, Default)]
pub(crate) struct SupervisorOptions {
    pub(crate) strategy: Supervisor,
    pub(crate) on_error: Option<OnError>,
}

/// What an agent's supervisor gets on its core.
#[derive(Clone)]
pub(crate) struct AgentRun {
    pub(crate) core: Rc<CoreRuntime>,
    pub(crate) agent: usize,
    pub(crate) queue: Rc<EventQueue>,
    /// The events the agent holds (one, or a batch from `take`), shared with the supervisor
    /// so that what an agent failed on is handed to the restarted agent.
    pub(crate) current: Rc<RefCell<Vec<QueuedEvent>>>,
    /// Which of the queue's events are this instance's.
    pub(crate) scope: crate::runtime::queue::Scope,
}

/// Runs an agent, restarting it when it fails: the event it failed on goes back to the front
/// of its queue (it was not acked), up to `MAX_RESTARTS_PER_EVENT` times; then the event is
/// logged and skipped (acked) and the agent restarted on the next one — or, as `options`
/// say, skipped at once, or the worker stopped.
pub(crate) async fn supervise<F, Fut>(run: AgentRun, name: Arc<str>, options: SupervisorOptions, make: F)
where
    F: Fn(&AgentRun) -> Fut,
    Fut: Future<Output = Result<(), AgentError>>,
{
    let slot = Rc::new(TaskSlot::for_agent(run.agent, name.clone(), run.current.clone()));
    let mut failures_on: Option<(TopicPartition, u64, u32)> = None;
    // Events skipped in a row with the same error: (the error, how many, the agent's acks
    // right after the last one). An event handled in between ends the streak.
    let mut streak: Option<(String, u32, u64)> = None;
    loop {
        let mut fatal: Option<&'static str> = None;
        let fut = make(&run);
        let outcome =
            InTask::new(slot.clone(), futures_lite::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(fut))).await;
        let error = match outcome {
            Ok(Ok(())) => {
                for e in run.current.borrow_mut().drain(..) {
                    run.core.ack(run.agent, &e.tp, e.record.offset);
                }
                return;
            }
            Ok(Err(e)) => {
                fatal = systemic(&*e);
                e.to_string()
            }
            Err(panic) => crate::util::panic_message(&*panic, "panic"),
        };
        let failed: Vec<QueuedEvent> = run.current.borrow_mut().drain(..).collect();
        // Whatever the agent wrote to tables for these events is undone: they are retried
        // (or skipped), and their writes must not count twice (or at all).
        run.core.discard_writes(run.agent, &failed);
        if let Some(reason) = &fatal {
            // Not about the record: every event would fail the same way, and skipping them
            // would commit their offsets with nothing done. Stop without acking them.
            run.core.agent_failed_for_good(&name, &error, reason, failed.first());
            return;
        }
        let Some(event) = failed.first().cloned() else {
            if let Some(on_error) = &options.on_error {
                on_error(&AgentFailure { agent: name.to_string(), error: error.clone(), event: None, attempt: 1 });
            }
            if options.strategy == Supervisor::Crash {
                run.core.agent_failed_for_good(&name, &error, "the agent's supervisor crashes on a failure", None);
                return;
            }
            tracing::error!(agent = %name, %error, "agent failed outside an event; restarting it");
            if run.core.stopping.is_cancelled() {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (tp, offset) = (event.tp.clone(), event.record.offset);
        let attempts = match &failures_on {
            Some((t, o, n)) if *t == tp && *o == offset => n + 1,
            _ => 1,
        };
        if let Some(on_error) = &options.on_error {
            on_error(&AgentFailure {
                agent: name.to_string(),
                error: error.clone(),
                event: Some((tp.clone(), offset)),
                attempt: attempts,
            });
        }
        if options.strategy == Supervisor::Crash {
            run.core.agent_failed_for_good(&name, &error, "the agent's supervisor crashes on a failure", Some(&event));
            return;
        }
        if attempts > MAX_RESTARTS_PER_EVENT || options.strategy == Supervisor::Skip {
            let in_a_row = match &streak {
                Some((same, n, acks)) if *same == error && *acks == run.core.agent_acks(run.agent) => n + 1,
                _ => 1,
            };
            if in_a_row >= SKIPS_IN_A_ROW_FATAL {
                // The same error on several events in a row: not about one record.
                let reason = "the same error on several events in a row is not about one record";
                run.core.agent_failed_for_good(&name, &error, reason, Some(&event));
                return;
            }
            tracing::error!(agent = %name, topic = %tp.topic, partition = tp.partition, offset, events = failed.len(), %error,
                "agent failed {MAX_RESTARTS_PER_EVENT} times on these events; skipping them");
            for e in &failed {
                run.core.ack(run.agent, &e.tp, e.record.offset);
            }
            streak = Some((error, in_a_row, run.core.agent_acks(run.agent)));
            failures_on = None;
        } else {
            tracing::warn!(agent = %name, topic = %tp.topic, partition = tp.partition, offset, events = failed.len(),
                attempt = attempts, %error, "agent failed; restarting it on the same events");
            // Back in their original order, ahead of everything not yet handed out; events of
            // a partition released meanwhile are dropped (its next owner processes them).
            for e in failed.into_iter().rev() {
                if !run.core.released(&e.tp) {
                    run.queue.push_front(e);
                }
            }
            failures_on = Some((tp, offset, attempts));
        }
    }
}

impl CoreRuntime {
    /// An agent failed in a way that is not about its event: stops the worker with that
    /// error, leaving the event (and everything after it) uncommitted, so that a restart after
    /// the cause is fixed processes it.
    pub(crate) fn agent_failed_for_good(&self, agent: &str, error: &str, reason: &str, event: Option<&QueuedEvent>) {
        let at = event.map_or_else(String::new, |e| format!(" at {}@{}", e.tp, e.record.offset));
        tracing::error!(agent, %error, reason, "stopping the worker: the agent's error is not about the event{at}, which stays uncommitted");
        self.failure.borrow_mut().get_or_insert_with(|| {
            format!("agent `{agent}` failed{at}: {error} ({reason}; the event stays uncommitted)")
        });
        self.app_stop.stop();
    }
}
