//! Produce: to the partition's leader, retried on retriable errors.
//!
//! Requests to one broker share its connection and are written in the order `produce` was
//! called, so batches for one partition land in that order unless one is retried. Records are
//! not idempotent yet: a retry after a timeout may write a batch twice.
//!
//! With a `linger`, the first produce for a broker opens a queue and waits that long; the
//! produces for other partitions of that broker made meanwhile join it, and all go in one
//! request. A second produce for a partition already queued opens a queue of its own, which
//! goes out after the first, so a partition's order holds.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use futures_channel::oneshot;
use kafka_protocol::messages::{
    ApiKey, ProduceRequest,
    produce_request::{PartitionProduceData, TopicProduceData},
};

use super::connection::{About, Connection};
use super::{Acks, KafkaCore, Lane, records, topic_name};
use crate::BatchBuilder;
use crate::error::{Error, Result};
use crate::types::{Produced, TopicPartition};

impl KafkaCore {
    pub(super) async fn produce_batch(&self, tp: &TopicPartition, batch: BatchBuilder) -> Result<Produced> {
        let fail = |batch: BatchBuilder, source: Error| Error::Produce {
            tp: tp.clone(),
            batch: Box::new(batch),
            source: Box::new(source),
        };
        if let Err(e) = self.check_open() {
            return Err(fail(batch, e));
        }
        if batch.is_empty() {
            let e = Error::KafkaProtocol {
                broker: String::new(),
                api: "Produce",
                topic: Some(tp.topic.clone()),
                partition: Some(tp.partition),
                reason: "an empty batch cannot be produced".into(),
            };
            return Err(fail(batch, e));
        }
        let codec = self.options().compression.codec();
        let set = match records::encode(&batch, self.options().max_batch_bytes.max(1), codec) {
            Ok(set) => Bytes::from(set),
            Err(reason) => {
                let e = Error::KafkaProtocol {
                    broker: String::new(),
                    api: "Produce",
                    topic: Some(tp.topic.clone()),
                    partition: Some(tp.partition),
                    reason: format!("compressing the batch: {reason}"),
                };
                return Err(fail(batch, e));
            }
        };
        let count = batch.len() as u64;
        match self.retrying(None, || self.produce_once(tp, set.clone(), count)).await {
            Ok(p) => Ok(p),
            Err(e) => Err(fail(batch, e)),
        }
    }

    async fn produce_once(&self, tp: &TopicPartition, set: Bytes, count: u64) -> Result<Produced> {
        let conn = self.leader(tp, &Lane::Main).await?;
        let linger = self.options().linger;
        if linger.is_zero() {
            let entries = [Queued { tp: tp.clone(), set, count, reply: None }];
            return self.send_produce(&conn, &entries).await?.pop().unwrap_or(Err(Error::Closed));
        }
        let broker = conn.broker().clone();
        // Join the broker's open queue, unless it holds this partition already or is full.
        let joined = {
            let map = self.st.lingering.borrow();
            match map.get(&broker) {
                Some(q) => {
                    let mut q = q.borrow_mut();
                    let full = q.bytes + set.len() > self.options().max_batch_bytes.max(1) * 16;
                    if full || q.entries.iter().any(|e| e.tp == *tp) {
                        None
                    } else {
                        let (reply, answer) = oneshot::channel();
                        q.bytes += set.len();
                        q.entries.push(Queued { tp: tp.clone(), set: set.clone(), count, reply: Some(reply) });
                        Some(answer)
                    }
                }
                None => None,
            }
        };
        let about = About::partition(&tp.topic, tp.partition);
        if let Some(answer) = joined {
            let timeout = linger + self.options().request_timeout;
            let answer = futures_lite::future::or(async { Some(answer.await) }, async {
                glommio::timer::sleep(timeout).await;
                None
            })
            .await;
            return match answer {
                Some(Ok(result)) => result,
                // The queue's owner was dropped before it sent the request: retriable.
                Some(Err(_)) => Err(Error::KafkaConnection {
                    broker: broker.to_string(),
                    op: "write",
                    source: std::io::Error::new(std::io::ErrorKind::Interrupted, "the lingering request was dropped"),
                }),
                None => Err(Error::KafkaTimeout {
                    broker: broker.to_string(),
                    api: "Produce",
                    topic: about.topic.map(Arc::from),
                    partition: about.partition,
                    timeout,
                }),
            };
        }
        let queue = Rc::new(RefCell::new(Queue {
            entries: vec![Queued { tp: tp.clone(), set: set.clone(), count, reply: None }],
            bytes: set.len(),
        }));
        self.st.lingering.borrow_mut().insert(broker.clone(), queue.clone());
        let guard = Lingering { core: self, broker, queue };
        glommio::timer::sleep(linger).await;
        let entries = guard.close();
        let mut results = match self.send_produce(&conn, &entries).await {
            Ok(results) => results,
            Err(e) => entries.iter().map(|_| Err(replicate(&e))).collect(),
        };
        let own = if results.is_empty() { Err(Error::Closed) } else { results.remove(0) };
        for (entry, result) in entries.into_iter().skip(1).zip(results) {
            if let Some(reply) = entry.reply {
                let _ = reply.send(result);
            }
        }
        own
    }

    /// Sends `entries` (one per partition) in one Produce request; the result of each, in
    /// order.
    async fn send_produce(&self, conn: &Connection, entries: &[Queued]) -> Result<Vec<Result<Produced>>> {
        let timeout = self.options().request_timeout;
        let acks = match self.options().acks {
            Acks::All => -1,
            Acks::Leader => 1,
        };
        let mut topics: Vec<TopicProduceData> = Vec::new();
        for e in entries {
            let data =
                PartitionProduceData::default().with_index(e.tp.partition as i32).with_records(Some(e.set.clone()));
            match topics.iter_mut().find(|t| t.name.0.as_str() == &*e.tp.topic) {
                Some(t) => t.partition_data.push(data),
                None => topics.push(
                    TopicProduceData::default().with_name(topic_name(&e.tp.topic)).with_partition_data(vec![data]),
                ),
            }
        }
        let req = ProduceRequest::default()
            .with_acks(acks)
            .with_timeout_ms(timeout.as_millis().min(i32::MAX as u128) as i32)
            .with_topic_data(topics);
        let about = match entries {
            [one] => About::partition(&one.tp.topic, one.tp.partition),
            _ => About::default(),
        };
        self.count(|s| s.produce_requests += 1);
        let (_, resp) = conn.request(ApiKey::Produce, &req, timeout, about).await?;
        Ok(entries
            .iter()
            .map(|e| {
                let about = About::partition(&e.tp.topic, e.tp.partition);
                let part = resp
                    .responses
                    .iter()
                    .filter(|t| t.name.0.as_str() == &*e.tp.topic)
                    .flat_map(|t| t.partition_responses.iter())
                    .find(|p| p.index == e.tp.partition as i32)
                    .ok_or_else(|| {
                        conn.protocol_error(ApiKey::Produce, about, "the answer does not name the partition".into())
                    })?;
                if part.error_code != 0 {
                    let message = part.error_message.as_ref().map(|m| m.to_string());
                    return Err(conn.broker_error(ApiKey::Produce, about, part.error_code, message));
                }
                if part.base_offset < 0 {
                    return Err(conn.protocol_error(
                        ApiKey::Produce,
                        about,
                        format!("base offset {}", part.base_offset),
                    ));
                }
                let base_offset = part.base_offset as u64;
                Ok(Produced {
                    partition: e.tp.partition,
                    base_offset,
                    last_offset: base_offset.saturating_add(e.count - 1),
                })
            })
            .collect())
    }
}

/// Produces lingering for one broker.
#[derive(Default)]
pub(crate) struct Queue {
    entries: Vec<Queued>,
    bytes: usize,
}

/// One partition's records in a produce request.
pub(crate) struct Queued {
    tp: TopicPartition,
    set: Bytes,
    count: u64,
    /// Where the result goes; `None` for the produce that sends the request.
    reply: Option<oneshot::Sender<Result<Produced>>>,
}

/// The open queue of the produce that will send it. Dropping it (the produce was
/// cancelled) closes the queue: the produces that joined get an error and retry.
struct Lingering<'a> {
    core: &'a KafkaCore,
    broker: Arc<str>,
    queue: Rc<RefCell<Queue>>,
}

impl Lingering<'_> {
    /// Closes the queue to newcomers and takes what it holds.
    fn close(&self) -> Vec<Queued> {
        let mut map = self.core.st.lingering.borrow_mut();
        if map.get(&self.broker).is_some_and(|q| Rc::ptr_eq(q, &self.queue)) {
            map.remove(&self.broker);
        }
        std::mem::take(&mut self.queue.borrow_mut().entries)
    }
}

impl Drop for Lingering<'_> {
    fn drop(&mut self) {
        drop(self.close());
    }
}

/// A copy of a request-wide error for each produce that shared the request.
fn replicate(e: &Error) -> Error {
    match e {
        Error::KafkaConnection { broker, op, source } => Error::KafkaConnection {
            broker: broker.clone(),
            op,
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        Error::KafkaTimeout { broker, api, topic, partition, timeout } => Error::KafkaTimeout {
            broker: broker.clone(),
            api,
            topic: topic.clone(),
            partition: *partition,
            timeout: *timeout,
        },
        Error::KafkaBroker { broker, api, topic, partition, code, message } => Error::KafkaBroker {
            broker: broker.clone(),
            api,
            topic: topic.clone(),
            partition: *partition,
            code: *code,
            message: message.clone(),
        },
        Error::Closed => Error::Closed,
        other => Error::KafkaProtocol {
            broker: String::new(),
            api: "Produce",
            topic: None,
            partition: None,
            reason: other.to_string(),
        },
    }
}
