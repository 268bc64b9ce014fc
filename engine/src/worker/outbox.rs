//! Sends made from outside the worker (other threads, the test harness), taken by core 0.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use faust_transport::Produced;

use crate::runtime::CoreRuntime;

/// Takes the records sent from outside the worker, on core 0, until the worker stops.
pub(super) async fn serve_outbox(core: Rc<CoreRuntime>, outbox: Arc<crate::app::Outbox>) {
    while !core.stopping().is_cancelled() {
        let listener = outbox.event.listen();
        let records = outbox.take(false);
        let probes = outbox.take_probes();
        for probe in probes {
            let core = core.clone();
            if probe.commit {
                glommio::spawn_local(async move {
                    let mut result = Err(crate::error::SendError::Stopped { topic: probe.tp.topic.to_string() });
                    for _ in 0..500 {
                        match core.commit_now().await {
                            Ok(true) => {
                                result = Ok(Produced { partition: 0, base_offset: 0, last_offset: 0 });
                                break;
                            }
                            Ok(false) => glommio::timer::sleep(Duration::from_millis(2)).await,
                            Err(e) => {
                                tracing::error!(error = %e, "commit asked by a test failed");
                                break;
                            }
                        }
                    }
                    probe.reply.set(result);
                })
                .detach();
                continue;
            }
            // Nothing consumes the topic: nothing to wait for but the write.
            let consumed = core.is_consumed(&probe.tp.topic);
            glommio::spawn_local(async move {
                // Polled: acks are the hot path and do not notify anyone.
                while consumed && !core.processed(&probe.tp, probe.offset) {
                    if core.stopping().is_cancelled() {
                        probe.reply.set(Err(crate::error::SendError::Stopped { topic: probe.tp.topic.to_string() }));
                        return;
                    }
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                // Whatever the agents sent for it is written before the answer.
                if let Err(e) = core.flush().await {
                    tracing::error!(error = %e, "writing buffered sends failed");
                }
                let (partition, offset) = (probe.tp.partition, probe.offset);
                probe.reply.set(Ok(Produced { partition, base_offset: offset, last_offset: offset }));
            })
            .detach();
        }
        if records.records.is_empty() {
            outbox.recycle(records);
            futures_lite::future::or(listener, core.stopped()).await;
            continue;
        }
        take_outbound(&core, &outbox, records).await;
        glommio::yield_if_needed().await;
    }
}

/// Sends records that came from outside the worker, in the order they were sent:
/// `send_soon`s join this core's buffer, `send`s are written (after what is buffered for
/// their partition) and answered.
pub(super) async fn take_outbound(
    core: &Rc<CoreRuntime>,
    outbox: &crate::app::Outbox,
    mut outgoing: crate::app::Outgoing,
) {
    let topics = outbox.topics();
    // Drained, not taken: the emptied vector goes back to the senders with its capacity.
    let crate::app::Outgoing { records, bytes } = &mut outgoing;
    for record in records.drain(..) {
        let Some(topic) = topics.get(record.topic) else { continue };
        let key = record.key.map(|k| &bytes[k]);
        let value = &bytes[record.value];
        match (record.reply, record.options) {
            (None, _) => {
                if let Err(e) = topic.send_soon_raw(core, None, key, value, &[]) {
                    tracing::error!(topic = %topic.name, error = %e, "dropping a record sent from outside the worker");
                }
            }
            (Some(reply), None) => reply.set(topic.send_raw(core, key, Some(value), &[], None).await),
            (Some(reply), Some(options)) => {
                let headers = options.raw_headers();
                reply.set(topic.send_raw(core, key, Some(value), &headers, Some(&options)).await);
            }
        }
    }
    outbox.recycle(outgoing);
}
