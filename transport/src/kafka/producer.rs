//! Produce: one request per batch, to the partition's leader, retried on retriable errors.
//!
//! Requests to one broker share its connection and are written in the order `produce` was
//! called, so batches for one partition land in that order unless one is retried. Records are
//! not idempotent yet: a retry after a timeout may write a batch twice.

use bytes::Bytes;
use kafka_protocol::messages::{
    ApiKey, ProduceRequest,
    produce_request::{PartitionProduceData, TopicProduceData},
};

use super::connection::About;
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
        let timeout = self.options().request_timeout;
        let acks = match self.options().acks {
            Acks::All => -1,
            Acks::Leader => 1,
        };
        let req = ProduceRequest::default()
            .with_acks(acks)
            .with_timeout_ms(timeout.as_millis().min(i32::MAX as u128) as i32)
            .with_topic_data(vec![TopicProduceData::default().with_name(topic_name(&tp.topic)).with_partition_data(
                vec![PartitionProduceData::default().with_index(tp.partition as i32).with_records(Some(set))],
            )]);
        let about = About::partition(&tp.topic, tp.partition);
        let (_, resp) = conn.request(ApiKey::Produce, &req, timeout, about).await?;
        let part = resp
            .responses
            .iter()
            .filter(|t| t.name.0.as_str() == &*tp.topic)
            .flat_map(|t| t.partition_responses.iter())
            .find(|p| p.index == tp.partition as i32)
            .ok_or_else(|| {
                conn.protocol_error(ApiKey::Produce, about, "the answer does not name the partition".into())
            })?;
        if part.error_code != 0 {
            let message = part.error_message.as_ref().map(|m| m.to_string());
            return Err(conn.broker_error(ApiKey::Produce, about, part.error_code, message));
        }
        if part.base_offset < 0 {
            return Err(conn.protocol_error(ApiKey::Produce, about, format!("base offset {}", part.base_offset)));
        }
        let base_offset = part.base_offset as u64;
        Ok(Produced { partition: tp.partition, base_offset, last_offset: base_offset.saturating_add(count - 1) })
    }
}
