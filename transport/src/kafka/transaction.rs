//! Transactional producing: a core as one of Kafka's transactional producers.
//!
//! [`KafkaCore::init_transactions`] finds the transaction coordinator of a transactional id
//! and takes a producer id and epoch from it (InitProducerId); an earlier producer with the
//! same id is fenced (the coordinator bumps the epoch, aborts what it left open, and refuses
//! its requests from then on). Then, per transaction: [`KafkaCore::begin_transaction`] (or
//! the first produce, which opens one; produces made while a transaction ends wait for the
//! next);
//! produces (each partition is added with AddPartitionsToTxn before its first batch, and the
//! batches carry the transactional attribute, the producer id, epoch and sequence numbers);
//! [`KafkaCore::send_offsets_to_transaction`] (AddOffsetsToTxn, then TxnOffsetCommit to the
//! group coordinator, with the member's generation when it has one); and
//! [`KafkaCore::commit_transaction`] or [`KafkaCore::abort_transaction`] (EndTxn). Readers
//! with `read_committed` see the records of a committed transaction, atomically with its
//! offsets, and never those of an aborted one.
//!
//! A request refused because the producer was fenced (`PRODUCER_FENCED`,
//! `INVALID_PRODUCER_EPOCH`) is [`Error::ProducerFenced`], never retried: a zombie must stop.

use std::collections::HashSet;
use std::rc::Rc;

use kafka_protocol::messages::{
    AddOffsetsToTxnRequest, AddPartitionsToTxnRequest, ApiKey, EndTxnRequest, GroupId, InitProducerIdRequest,
    ProducerId as WireProducerId, TransactionalId, TxnOffsetCommitRequest,
    add_partitions_to_txn_request::AddPartitionsToTxnTopic,
    txn_offset_commit_request::{TxnOffsetCommitRequestPartition, TxnOffsetCommitRequestTopic},
};
use kafka_protocol::protocol::StrBytes;

use super::connection::{About, Connection};
use super::producer::ProducerId;
use super::{KafkaCore, by_topic, topic_name};
use crate::error::{Error, Result};
use crate::types::{Fence, TopicPartition};

/// Kafka's error codes of transactions.
mod code {
    pub(super) const INVALID_PRODUCER_EPOCH: i16 = 47;
    pub(super) const PRODUCER_FENCED: i16 = 90;
}

/// A core's transactional producer.
#[derive(Debug)]
pub(crate) struct Transactions {
    pub(crate) id: String,
    pub(crate) producer: ProducerId,
    /// Whether a transaction is open.
    pub(crate) open: bool,
    /// Partitions added to the open transaction.
    pub(crate) partitions: HashSet<TopicPartition>,
    /// Set while EndTxn is in flight: produces wait, then open the next transaction.
    pub(crate) ending: bool,
}

/// The cache key of a transactional id's coordinator (group names cannot hold a NUL).
fn coordinator_key(id: &str) -> String {
    format!("\0txn\0{id}")
}

impl KafkaCore {
    /// Makes this core a transactional producer with `transactional_id` (InitProducerId via
    /// the id's transaction coordinator; `transaction_timeout` is how long the coordinator
    /// lets a transaction stay open before it aborts it). A producer that used the same id
    /// before is fenced. From then on every produce is part of a transaction: the open one,
    /// or one it opens.
    pub async fn init_transactions(
        &self,
        transactional_id: &str,
        transaction_timeout: std::time::Duration,
    ) -> Result<()> {
        let key = coordinator_key(transactional_id);
        let producer =
            self.retrying(Some(&key), || self.init_transactions_once(transactional_id, transaction_timeout)).await?;
        *self.st.transactions.borrow_mut() = Some(Transactions {
            id: transactional_id.to_string(),
            producer,
            open: false,
            partitions: HashSet::new(),
            ending: false,
        });
        Ok(())
    }

    /// Whether a transaction is open (something was produced in it, or it was begun).
    pub fn transaction_open(&self) -> bool {
        self.st.transactions.borrow().as_ref().is_some_and(|t| t.open)
    }

    async fn init_transactions_once(&self, id: &str, timeout: std::time::Duration) -> Result<ProducerId> {
        let conn = self.transaction_coordinator(id).await?;
        let req = InitProducerIdRequest::default()
            .with_transactional_id(Some(TransactionalId(StrBytes::from_string(id.to_string()))))
            .with_transaction_timeout_ms(timeout.as_millis().clamp(1, i32::MAX as u128) as i32)
            .with_producer_id(WireProducerId(-1))
            .with_producer_epoch(-1);
        let (_, resp) =
            conn.request(ApiKey::InitProducerId, &req, self.options().request_timeout, About::default()).await?;
        self.check(&conn, ApiKey::InitProducerId, id, resp.error_code)?;
        Ok(ProducerId { id: resp.producer_id.0, epoch: resp.producer_epoch, session: self.next_producer_session() })
    }

    /// Opens a transaction: what this core produces until it commits or aborts is part of it.
    pub fn begin_transaction(&self) -> Result<()> {
        let mut txns = self.st.transactions.borrow_mut();
        let t = txns.as_mut().ok_or_else(|| not_transactional("begin a transaction"))?;
        if t.open {
            return Err(Error::KafkaProtocol {
                broker: String::new(),
                api: "EndTxn",
                topic: None,
                partition: None,
                reason: format!("transactional id {}: a transaction is open already", t.id),
            });
        }
        t.open = true;
        t.partitions.clear();
        Ok(())
    }

    /// The transactional producer and its id, when this core is one (its produces are
    /// stamped with it).
    pub(crate) fn transactional_producer(&self) -> Option<(ProducerId, String)> {
        self.st.transactions.borrow().as_ref().map(|t| (t.producer, t.id.clone()))
    }

    /// `e` as [`Error::ProducerFenced`] when it says this transactional producer was fenced.
    pub(crate) fn fenced_if(&self, e: Error) -> Error {
        match (&e, self.st.transactions.borrow().as_ref()) {
            (Error::KafkaBroker { broker, code, .. }, Some(t)) => fenced(broker, &t.id, *code).unwrap_or(e),
            _ => e,
        }
    }

    /// Before a produce to `tp`: adds it to the open transaction if it is not in it yet. A
    /// produce while no transaction is open opens one; while one is ending, it waits for the
    /// end (it belongs to the next).
    pub(crate) async fn add_to_transaction(&self, tp: &TopicPartition) -> Result<()> {
        loop {
            let listener = self.st.transaction_ended.listen();
            if !self.st.transactions.borrow().as_ref().is_some_and(|t| t.ending) {
                break;
            }
            listener.await;
            self.check_open()?;
        }
        let (id, producer) = {
            let mut txns = self.st.transactions.borrow_mut();
            let Some(t) = txns.as_mut() else { return Ok(()) };
            if !t.open {
                t.open = true;
                t.partitions.clear();
            }
            if t.partitions.contains(tp) {
                return Ok(());
            }
            (t.id.clone(), t.producer)
        };
        let key = coordinator_key(&id);
        self.retrying(Some(&key), || self.add_partition_once(&id, producer, tp)).await?;
        if let Some(t) = self.st.transactions.borrow_mut().as_mut() {
            t.partitions.insert(tp.clone());
        }
        Ok(())
    }

    async fn add_partition_once(&self, id: &str, producer: ProducerId, tp: &TopicPartition) -> Result<()> {
        let conn = self.transaction_coordinator(id).await?;
        let req = AddPartitionsToTxnRequest::default()
            .with_v3_and_below_transactional_id(TransactionalId(StrBytes::from_string(id.to_string())))
            .with_v3_and_below_producer_id(WireProducerId(producer.id))
            .with_v3_and_below_producer_epoch(producer.epoch)
            .with_v3_and_below_topics(vec![
                AddPartitionsToTxnTopic::default()
                    .with_name(topic_name(&tp.topic))
                    .with_partitions(vec![tp.partition as i32]),
            ]);
        let about = About::partition(&tp.topic, tp.partition);
        let (_, resp) = conn.request(ApiKey::AddPartitionsToTxn, &req, self.options().request_timeout, about).await?;
        self.check(&conn, ApiKey::AddPartitionsToTxn, id, resp.error_code)?;
        for t in &resp.results_by_topic_v3_and_below {
            for p in &t.results_by_partition {
                self.check(&conn, ApiKey::AddPartitionsToTxn, id, p.partition_error_code)?;
            }
        }
        Ok(())
    }

    /// Adds the consumer `group`'s `offsets` to the open transaction: they are committed if
    /// and only if the transaction is. With a `fence`, as that member of the group's current
    /// generation (so a member the group dropped cannot commit).
    pub async fn send_offsets_to_transaction(
        &self,
        group: &str,
        fence: Option<&Fence>,
        offsets: &[(TopicPartition, u64)],
    ) -> Result<()> {
        let (id, producer) = {
            let txns = self.st.transactions.borrow();
            let t = txns.as_ref().ok_or_else(|| not_transactional("send offsets"))?;
            if !t.open {
                return Err(not_transactional("send offsets outside a transaction"));
            }
            (t.id.clone(), t.producer)
        };
        let member = match fence {
            Some(f) => Some(self.shared.live.member(group, &f.member).map_err(|refusal| Error::Fenced {
                group: group.to_string(),
                member: f.member.to_string(),
                tp: None,
                reason: refusal.reason,
            })?),
            None => None,
        };
        let key = coordinator_key(&id);
        self.retrying(Some(&key), || async {
            let conn = self.transaction_coordinator(&id).await?;
            let req = AddOffsetsToTxnRequest::default()
                .with_transactional_id(TransactionalId(StrBytes::from_string(id.clone())))
                .with_producer_id(WireProducerId(producer.id))
                .with_producer_epoch(producer.epoch)
                .with_group_id(GroupId(StrBytes::from_string(group.to_string())));
            let (_, resp) =
                conn.request(ApiKey::AddOffsetsToTxn, &req, self.options().request_timeout, About::default()).await?;
            self.check(&conn, ApiKey::AddOffsetsToTxn, &id, resp.error_code)
        })
        .await?;
        self.retrying(Some(group), || async {
            let conn = self.coordinator(group).await?;
            let topics: Vec<TxnOffsetCommitRequestTopic> = by_topic(offsets.iter().map(|(tp, offset)| {
                let p = TxnOffsetCommitRequestPartition::default()
                    .with_partition_index(tp.partition as i32)
                    .with_committed_offset(*offset as i64)
                    .with_committed_leader_epoch(-1)
                    .with_committed_metadata(None);
                (tp, p)
            }))
            .into_iter()
            .map(|(topic, partitions)| {
                TxnOffsetCommitRequestTopic::default().with_name(topic).with_partitions(partitions)
            })
            .collect();
            let mut req = TxnOffsetCommitRequest::default()
                .with_transactional_id(TransactionalId(StrBytes::from_string(id.clone())))
                .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
                .with_producer_id(WireProducerId(producer.id))
                .with_producer_epoch(producer.epoch)
                .with_topics(topics);
            if conn.version(ApiKey::TxnOffsetCommit, About::default())? >= 3 {
                req.generation_id = member.as_ref().map_or(-1, |m| m.generation);
                req.member_id = StrBytes::from_string(member.as_ref().map(|m| m.member_id.clone()).unwrap_or_default());
                req.group_instance_id = member.as_ref().and_then(|m| m.instance_id.clone()).map(StrBytes::from_string);
            }
            let (_, resp) =
                conn.request(ApiKey::TxnOffsetCommit, &req, self.options().request_timeout, About::default()).await?;
            for t in &resp.topics {
                for p in &t.partitions {
                    self.check(&conn, ApiKey::TxnOffsetCommit, &id, p.error_code)?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Commits the open transaction: its records become visible to `read_committed` readers,
    /// and its offsets committed, together.
    pub async fn commit_transaction(&self) -> Result<()> {
        self.end_transaction(true).await
    }

    /// Aborts the open transaction: `read_committed` readers never see its records, and its
    /// offsets are not committed.
    pub async fn abort_transaction(&self) -> Result<()> {
        self.end_transaction(false).await
    }

    async fn end_transaction(&self, commit: bool) -> Result<()> {
        let (id, producer, open) = {
            let txns = self.st.transactions.borrow();
            let t = txns.as_ref().ok_or_else(|| not_transactional("end a transaction"))?;
            (t.id.clone(), t.producer, t.open)
        };
        if !open {
            return Err(not_transactional("end a transaction that is not open"));
        }
        // Produces made meanwhile wait and go into the next transaction.
        let _ending = Ending::start(self);
        let key = coordinator_key(&id);
        self.retrying(Some(&key), || async {
            let conn = self.transaction_coordinator(&id).await?;
            let req = EndTxnRequest::default()
                .with_transactional_id(TransactionalId(StrBytes::from_string(id.clone())))
                .with_producer_id(WireProducerId(producer.id))
                .with_producer_epoch(producer.epoch)
                .with_committed(commit);
            let (_, resp) =
                conn.request(ApiKey::EndTxn, &req, self.options().request_timeout, About::default()).await?;
            self.check(&conn, ApiKey::EndTxn, &id, resp.error_code)
        })
        .await?;
        if let Some(t) = self.st.transactions.borrow_mut().as_mut() {
            t.open = false;
            t.partitions.clear();
        }
        Ok(())
    }

    /// The transaction coordinator of `id`, found with FindCoordinator (key type 1).
    async fn transaction_coordinator(&self, id: &str) -> Result<Rc<Connection>> {
        self.coordinator_of(&coordinator_key(id), id, 1).await
    }

    /// A broker's error code for a transactional request: fenced producers get
    /// [`Error::ProducerFenced`].
    fn check(&self, conn: &Connection, api: ApiKey, id: &str, code: i16) -> Result<()> {
        match code {
            0 => Ok(()),
            code => {
                Err(fenced(conn.broker(), id, code)
                    .unwrap_or_else(|| conn.broker_error(api, About::default(), code, None)))
            }
        }
    }
}

/// [`Error::ProducerFenced`] when `code` says the producer of `id` was fenced.
fn fenced(broker: &str, id: &str, code: i16) -> Option<Error> {
    matches!(code, code::PRODUCER_FENCED | code::INVALID_PRODUCER_EPOCH).then(|| Error::ProducerFenced {
        broker: broker.to_string(),
        transactional_id: id.to_string(),
        code,
    })
}

/// Marks the transaction as ending while it lives; wakes the waiting produces when dropped.
struct Ending<'a>(&'a KafkaCore);

impl<'a> Ending<'a> {
    fn start(core: &'a KafkaCore) -> Ending<'a> {
        if let Some(t) = core.st.transactions.borrow_mut().as_mut() {
            t.ending = true;
        }
        Ending(core)
    }
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.0.st.transactions.borrow_mut().as_mut() {
            t.ending = false;
        }
        self.0.st.transaction_ended.notify(usize::MAX);
    }
}

fn not_transactional(what: &str) -> Error {
    Error::KafkaProtocol {
        broker: String::new(),
        api: "transaction",
        topic: None,
        partition: None,
        reason: format!("cannot {what}: call init_transactions, then begin_transaction, first"),
    }
}

impl std::fmt::Display for ProducerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.id, self.epoch)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn coordinator_keys_cannot_collide_with_group_names() {
        assert!(super::coordinator_key("orders").starts_with('\0'));
    }
}
