//! The per-core runtime: pinned executors (`executor`), and on each core the engine that
//! fetches, queues, hands events to agents, buffers sends, commits and recovers — the state
//! every core keeps, and the one contract table shards implement.
//!
//! User work is given as a *factory*: a `Fn(CoreContext) -> Future` that is `Send + Sync`,
//! called once on each core's own thread; the future it returns stays on that core and need
//! not be `Send`.

pub(crate) mod commit;
pub(crate) mod context;
mod crash;
mod executor;
pub(crate) mod mailbox;
pub(crate) mod recovery;
pub(crate) mod signal;
pub(crate) mod state;

pub(crate) use crash::{crash_point, fault_point, injected_produce_failure};
pub(crate) use executor::choose_cpus;
pub use executor::{
    CoreContext, RuntimeConfig, RuntimeError, StallHandler, run_on_cores, run_on_cores_with, usable_cpus,
};

/// The index (`0..cores`) of the worker core the caller runs on, or `None` outside a worker
/// (an agent can use it to keep per-core state, such as counters, without sharing).
pub fn current_core() -> Option<usize> {
    crate::worker::CoreRuntime::current().map(|core| core.index)
}

/// Lets the core's other tasks run if this one has used up its time slice, after writing the
/// core's buffered sends if they have grown past their bound. A task that loops without
/// awaiting anything else (a generator calling [`Topic::send_soon`](crate::Topic::send_soon)
/// in a tight loop) should await this now and then; agents need not, their streams do it.
pub async fn yield_if_needed() {
    if let Some(core) = crate::worker::CoreRuntime::current() {
        core.flush_if_full().await;
    }
    glommio::yield_if_needed().await;
}

/// Writes the calling core's buffered sends ([`Topic::send_soon`](crate::Topic::send_soon))
/// now and waits until they are durable (Faust's `producer.flush()`): a generator can record
/// its progress once what it sent so far is safe. Outside a worker there is nothing to flush.
/// On failure ([`SendError::NotYetWritten`](crate::SendError::NotYetWritten): a full disk, a
/// broker away) nothing is lost or reordered: the records stay buffered and are written once
/// the transport takes them.
pub async fn flush() -> Result<(), crate::SendError> {
    let Some(core) = crate::worker::CoreRuntime::current() else { return Ok(()) };
    core.flush().await.map_err(|e| match e {
        crate::worker::FlushError::Write { tp, message } => {
            crate::SendError::NotYetWritten { partition: Some(tp), message }
        }
        other => crate::SendError::NotYetWritten { partition: None, message: other.to_string() },
    })
}
