//! Produce: to the partition's leader, retried on retriable errors.
//!
//! A core produces to one partition one request at a time, in the order `produce` was called
//! (its turn, `PartitionTurn`), and each request carries one RecordBatch (Kafka takes one
//! batch per partition per request; a produce larger than `max_batch_bytes` goes out as
//! several requests, in order).
//!
//! **Idempotence** (on by default): each core is a producer of its own, with an id and epoch
//! from InitProducerId, and numbers the records it writes to each partition (a batch carries
//! the sequence of its first record). A batch retried after its answer was lost carries the
//! same numbers, so the broker writes it once: it answers a duplicate as a success, or with
//! `DUPLICATE_SEQUENCE_NUMBER` when the original is older than what it remembers (then the
//! offsets are read from the partition's end: a changelog has one writer, the owning core). If
//! the broker forgot the producer (`UNKNOWN_PRODUCER_ID`) or the numbers are out of step
//! (`OUT_OF_ORDER_SEQUENCE_NUMBER`, `INVALID_PRODUCER_EPOCH`), the core takes a new id and
//! numbers from 0 again; a batch whose first attempt may have landed can then be written twice,
//! which is the at-least-once floor.
//!
//! With a `linger`, the first produce for a broker opens a queue and waits that long; the
//! produces for other partitions of that broker made meanwhile join it, and all go in one
//! request. A second produce for a partition already queued opens a queue of its own, which
//! goes out after the first, so a partition's order holds.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use futures_channel::oneshot;
use kafka_protocol::messages::{
    ApiKey, InitProducerIdRequest, ProduceRequest,
    produce_request::{PartitionProduceData, TopicProduceData},
};

use super::connection::{About, Connection};
use super::records::{Encoded, Stamp};
use super::{Acks, KafkaCore, Lane, records, topic_name};
use crate::error::{Error, Result};
use crate::types::{OffsetSpec, Produced, TopicPartition};
use crate::{BatchBuilder, CoreTransport};

/// Kafka's error codes of idempotent producing.
mod code {
    pub(super) const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
    pub(super) const DUPLICATE_SEQUENCE_NUMBER: i16 = 46;
    pub(super) const INVALID_PRODUCER_EPOCH: i16 = 47;
    pub(super) const UNKNOWN_PRODUCER_ID: i16 = 59;
}

/// A producer id and epoch from InitProducerId.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProducerId {
    pub(crate) id: i64,
    pub(crate) epoch: i16,
    /// Which InitProducerId of this core gave it. A broker that lost its state (restarted
    /// empty) may hand out the same id and epoch again; numbering must start over anyway.
    pub(crate) session: u64,
}

/// One partition's produces on one core: taken one at a time, and numbered.
pub(crate) struct PartitionTurn {
    turn: glommio::sync::Semaphore,
    /// The producer the numbers below belong to.
    producer: Cell<Option<ProducerId>>,
    /// The sequence of the next record written.
    next_sequence: Cell<i32>,
}

impl Default for PartitionTurn {
    fn default() -> Self {
        PartitionTurn { turn: glommio::sync::Semaphore::new(1), producer: Cell::new(None), next_sequence: Cell::new(0) }
    }
}

impl PartitionTurn {
    /// The stamp of the next batch under `producer` (inside a transaction or not); a new
    /// producer numbers from 0.
    fn stamp(&self, producer: ProducerId, transactional: bool) -> Stamp {
        if self.producer.get() != Some(producer) {
            self.producer.set(Some(producer));
            self.next_sequence.set(0);
        }
        Stamp {
            producer_id: producer.id,
            epoch: producer.epoch,
            base_sequence: self.next_sequence.get(),
            transactional,
        }
    }
}

/// Whether `e` says the broker and this producer disagree on who it is or where its numbers
/// are: a new producer id sets them straight.
fn producer_out_of_step(e: &Error) -> bool {
    matches!(e, Error::KafkaBroker { code, .. }
        if matches!(*code, code::OUT_OF_ORDER_SEQUENCE_NUMBER | code::UNKNOWN_PRODUCER_ID | code::INVALID_PRODUCER_EPOCH))
}

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
        let turn = self.st.turns.borrow_mut().entry(tp.clone()).or_default().clone();
        let Ok(_permit) = turn.turn.acquire_permit(1).await else {
            return Err(fail(batch, Error::Closed));
        };
        match self.produce_in_turn(tp, &batch, &turn).await {
            Ok(p) => Ok(p),
            // What was written stays written: only the rest goes back to the caller.
            Err((0, e)) => Err(fail(batch, e)),
            Err((written, e)) => {
                let mut rest = BatchBuilder::new();
                for r in batch.records().skip(written) {
                    let headers: Vec<_> = r.headers.collect();
                    rest.push(r.timestamp, r.key, r.value, &headers);
                }
                Err(fail(rest, e))
            }
        }
    }

    /// Writes `batch` in its partition's turn; on failure, how many of its records were
    /// written before it.
    async fn produce_in_turn(
        &self,
        tp: &TopicPartition,
        batch: &BatchBuilder,
        turn: &PartitionTurn,
    ) -> std::result::Result<Produced, (usize, Error)> {
        let codec = self.options().compression.codec();
        let max = self.options().max_batch_bytes.max(1);
        let encode = |stamp: Option<Stamp>, skip: usize| {
            records::encode(batch, max, codec, stamp, skip).map_err(|reason| Error::KafkaProtocol {
                broker: String::new(),
                api: "Produce",
                topic: Some(tp.topic.clone()),
                partition: Some(tp.partition),
                reason: format!("compressing the batch: {reason}"),
            })
        };
        // A transactional core stamps its batches with its transactional producer, once the
        // partition is part of the open transaction.
        let transactional = self.transactional_producer();
        if transactional.is_some() {
            self.add_to_transaction(tp).await.map_err(|e| (0, e))?;
        }
        let mut producer = match &transactional {
            Some((p, _)) => Some(*p),
            None if self.options().idempotent => Some(self.producer_id().await.map_err(|e| (0, e))?),
            None => None,
        };
        let stamp = |p: ProducerId| turn.stamp(p, transactional.is_some());
        let mut encoded: Encoded = encode(producer.map(stamp), 0).map_err(|e| (0, e))?;
        let mut set = Bytes::from(std::mem::take(&mut encoded.bytes));
        let mut next = 0;
        let mut written = 0;
        let mut offsets: Option<(u64, u64)> = None;
        // A new producer id is taken at most once per produce: a broker that keeps refusing
        // the new one is not chased forever.
        let mut renewed = false;
        while next < encoded.batches.len() {
            let b = encoded.batches[next].clone();
            let bytes = set.slice(b.range.clone());
            let count = b.count as u64;
            // Attempts of this batch: a duplicate answer after a retry is expected (the first
            // attempt was written but its answer lost); after a single attempt it is not.
            let attempts = std::cell::Cell::new(0u32);
            let produced = match self
                .retrying(None, || {
                    attempts.set(attempts.get() + 1);
                    self.produce_once(tp, bytes.clone(), count)
                })
                .await
                .map_err(|e| self.fenced_if(e))
            {
                Ok(p) => p,
                Err(Error::KafkaBroker { code: code::DUPLICATE_SEQUENCE_NUMBER, .. }) if producer.is_some() => {
                    // Written before, longer ago than the broker remembers the offsets: the
                    // partition's end tells them (this core is its only writer).
                    let end = self.list_offset(tp, OffsetSpec::Latest).await.map_err(|e| (written, e))?;
                    tracing::warn!(topic = %tp.topic, partition = tp.partition, records = count,
                        sequence = turn.next_sequence.get(), end, attempts = attempts.get(),
                        "the broker says this batch was written before (duplicate sequence number): taking it as written");
                    let last = end.saturating_sub(1);
                    Produced { partition: tp.partition, base_offset: end.saturating_sub(count), last_offset: last }
                }
                // A transactional producer cannot take a new id by itself: it is fenced or
                // must be made again (`init_transactions`).
                Err(e) if producer.is_some() && transactional.is_none() && !renewed && producer_out_of_step(&e) => {
                    tracing::warn!(topic = %tp.topic, partition = tp.partition, error = %e,
                        "the broker and this producer are out of step: taking a new producer id");
                    renewed = true;
                    self.forget_producer_id(producer);
                    let fresh = self.producer_id().await.map_err(|e| (written, e))?;
                    producer = Some(fresh);
                    encoded = encode(Some(stamp(fresh)), b.first_record).map_err(|e| (written, e))?;
                    set = Bytes::from(std::mem::take(&mut encoded.bytes));
                    next = 0;
                    continue;
                }
                Err(e) => return Err((written, e)),
            };
            if producer.is_some() {
                turn.next_sequence.set(records::next_sequence(turn.next_sequence.get(), b.count));
            }
            offsets = Some(match offsets {
                None => (produced.base_offset, produced.last_offset),
                Some((base, _)) => (base, produced.last_offset),
            });
            written = b.first_record + b.count as usize;
            next += 1;
        }
        let (base_offset, last_offset) = offsets.unwrap_or_default();
        Ok(Produced { partition: tp.partition, base_offset, last_offset })
    }

    /// This core's producer id, asked for with InitProducerId the first time (one request
    /// at a time: produces that need it meanwhile wait for the same answer).
    pub(super) async fn producer_id(&self) -> Result<ProducerId> {
        if let Some(p) = self.st.producer.get() {
            return Ok(p);
        }
        let _permit = self.st.producer_turn.acquire_permit(1).await.map_err(|_| Error::Closed)?;
        if let Some(p) = self.st.producer.get() {
            return Ok(p);
        }
        let p = self.retrying(None, || self.init_producer_id_once()).await?;
        self.st.producer.set(Some(p));
        Ok(p)
    }

    /// A number no earlier producer id of this core had.
    pub(crate) fn next_producer_session(&self) -> u64 {
        let n = self.st.producer_sessions.get() + 1;
        self.st.producer_sessions.set(n);
        n
    }

    /// Forgets `stale` (if it is still the current id), so that the next produce asks for a
    /// new one.
    fn forget_producer_id(&self, stale: Option<ProducerId>) {
        if self.st.producer.get() == stale {
            self.st.producer.set(None);
        }
    }

    async fn init_producer_id_once(&self) -> Result<ProducerId> {
        let conn = self.any_connection().await?;
        let timeout = self.options().request_timeout;
        let req = InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(-1)
            .with_producer_id((-1).into())
            .with_producer_epoch(-1);
        let (_, resp) = conn.request(ApiKey::InitProducerId, &req, timeout, About::default()).await?;
        if resp.error_code != 0 {
            return Err(conn.broker_error(ApiKey::InitProducerId, About::default(), resp.error_code, None));
        }
        if resp.producer_id.0 < 0 {
            return Err(conn.protocol_error(
                ApiKey::InitProducerId,
                About::default(),
                format!("producer id {}", resp.producer_id.0),
            ));
        }
        Ok(ProducerId { id: resp.producer_id.0, epoch: resp.producer_epoch, session: self.next_producer_session() })
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
        let transactional_id = self.transactional_producer().map(|(_, id)| {
            kafka_protocol::messages::TransactionalId(kafka_protocol::protocol::StrBytes::from_string(id))
        });
        let req = ProduceRequest::default()
            .with_transactional_id(transactional_id)
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
