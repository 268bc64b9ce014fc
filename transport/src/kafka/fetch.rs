//! Fetch and ListOffsets, from the partition's leader.

use std::time::Duration;

use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, ListOffsetsRequest,
    fetch_request::{FetchPartition, FetchTopic},
    list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic},
};
use kafka_protocol::protocol::StrBytes;

use super::connection::About;
use super::protocol::code;
use super::{KafkaCore, Lane, records, topic_name};
use crate::error::{Error, Result};
use crate::types::{Fetched, OffsetSpec, TopicPartition};

fn ms(d: Duration) -> i32 {
    d.as_millis().min(i32::MAX as u128) as i32
}

impl KafkaCore {
    pub(super) async fn fetch_once(
        &self,
        tp: &TopicPartition,
        offset: u64,
        max_bytes: usize,
        max_wait: Duration,
        lane: &Lane,
    ) -> Result<Fetched> {
        let conn = self.leader(tp, lane).await?;
        let max_bytes = max_bytes.clamp(1, i32::MAX as usize) as i32;
        let req = FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            // tansu leaves the partition out of an answer to max_wait 0.
            .with_max_wait_ms(ms(max_wait).max(1))
            .with_min_bytes(1)
            .with_max_bytes(max_bytes)
            .with_isolation_level(i8::from(self.options().read_committed))
            .with_session_id(0)
            .with_session_epoch(-1)
            .with_topics(vec![FetchTopic::default().with_topic(topic_name(&tp.topic)).with_partitions(vec![
                FetchPartition::default()
                    .with_partition(tp.partition as i32)
                    .with_current_leader_epoch(-1)
                    .with_fetch_offset(offset as i64)
                    .with_last_fetched_epoch(-1)
                    .with_log_start_offset(-1)
                    .with_partition_max_bytes(max_bytes),
            ])])
            .with_rack_id(StrBytes::from_static_str(""));
        let about = About::partition(&tp.topic, tp.partition);
        let timeout = self.options().request_timeout + max_wait;
        self.count(|s| s.fetch_requests += 1);
        let (_, resp) = conn.request(ApiKey::Fetch, &req, timeout, about).await?;
        if resp.error_code != 0 {
            return Err(conn.broker_error(ApiKey::Fetch, about, resp.error_code, None));
        }
        let part = resp
            .responses
            .iter()
            .filter(|t| t.topic.0.as_str() == &*tp.topic)
            .flat_map(|t| t.partitions.iter())
            .find(|p| p.partition_index == tp.partition as i32)
            .ok_or_else(|| {
                conn.protocol_error(ApiKey::Fetch, about, "the answer does not name the partition".into())
            })?;
        match part.error_code {
            code::NONE => {}
            code::OFFSET_OUT_OF_RANGE => {
                let earliest = self.list_offsets_request(tp, OffsetSpec::Earliest).await?;
                let high_watermark = self.list_offsets_request(tp, OffsetSpec::Latest).await?;
                return Err(Error::OffsetOutOfRange { tp: tp.clone(), requested: offset, earliest, high_watermark });
            }
            c => return Err(conn.broker_error(ApiKey::Fetch, about, c, None)),
        }
        let aborted: Option<Vec<(i64, i64)>> = self
            .options()
            .read_committed
            .then(|| part.aborted_transactions.iter().flatten().map(|a| (a.producer_id.0, a.first_offset)).collect());
        let decoded = match &part.records {
            Some(set) => records::decode(set, offset, aborted.as_deref())
                .map_err(|e| conn.protocol_error(ApiKey::Fetch, about, e.to_string()))?,
            None => records::Decoded::default(),
        };
        let high_watermark = part.high_watermark.max(0) as u64;
        if decoded.records.is_empty() && decoded.next_offset.is_none() && offset > high_watermark {
            // Some brokers (tansu) answer an empty set rather than OFFSET_OUT_OF_RANGE.
            let earliest = self.list_offsets_request(tp, OffsetSpec::Earliest).await?;
            return Err(Error::OffsetOutOfRange { tp: tp.clone(), requested: offset, earliest, high_watermark });
        }
        Ok(Fetched {
            records: decoded.records,
            next_offset: decoded.next_offset.unwrap_or(offset).max(offset),
            high_watermark,
        })
    }

    /// Looks `spec` up with ListOffsets. For [`OffsetSpec::Latest`], the answer is checked
    /// against the high-water mark of a Fetch at that offset and the larger is taken: on
    /// Kafka both agree (and the fetch returns nothing), but tansu answers ListOffsets with
    /// the base offset of the last batch plus one, which would hide the rest of that batch.
    pub(super) async fn list_offset_once(&self, tp: &TopicPartition, spec: OffsetSpec) -> Result<u64> {
        let listed = self.list_offsets_request(tp, spec).await?;
        if spec != OffsetSpec::Latest {
            return Ok(listed);
        }
        let f = Box::pin(self.fetch_once(tp, listed, 1, Duration::from_millis(1), &Lane::Main)).await?;
        Ok(listed.max(f.high_watermark))
    }

    async fn list_offsets_request(&self, tp: &TopicPartition, spec: OffsetSpec) -> Result<u64> {
        let conn = self.leader(tp, &Lane::Main).await?;
        let timestamp = match spec {
            OffsetSpec::Earliest => -2,
            OffsetSpec::Latest => -1,
            OffsetSpec::Timestamp(ts) => ts,
        };
        let timeout = self.options().request_timeout;
        let req = ListOffsetsRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_isolation_level(0)
            .with_timeout_ms(ms(timeout))
            .with_topics(vec![ListOffsetsTopic::default().with_name(topic_name(&tp.topic)).with_partitions(vec![
                ListOffsetsPartition::default()
                    .with_partition_index(tp.partition as i32)
                    .with_current_leader_epoch(-1)
                    .with_timestamp(timestamp),
            ])]);
        let about = About::partition(&tp.topic, tp.partition);
        let (_, resp) = conn.request(ApiKey::ListOffsets, &req, timeout, about).await?;
        let part = resp
            .topics
            .iter()
            .filter(|t| t.name.0.as_str() == &*tp.topic)
            .flat_map(|t| t.partitions.iter())
            .find(|p| p.partition_index == tp.partition as i32)
            .ok_or_else(|| {
                conn.protocol_error(ApiKey::ListOffsets, about, "the answer does not name the partition".into())
            })?;
        if part.error_code != 0 {
            return Err(conn.broker_error(ApiKey::ListOffsets, about, part.error_code, None));
        }
        if part.offset >= 0 {
            return Ok(part.offset as u64);
        }
        // No record at or after the timestamp: the next offset to be written.
        match spec {
            OffsetSpec::Timestamp(_) => Box::pin(self.list_offset_once(tp, OffsetSpec::Latest)).await,

            _ => Err(conn.protocol_error(ApiKey::ListOffsets, about, format!("offset {}", part.offset))),
        }
    }
}
