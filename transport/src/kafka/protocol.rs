//! Framing and versions: how requests are written and answers read, independently of the
//! socket they travel on.
//!
//! A frame is `size i32` then the payload. A request payload is a request header (v1, or v2
//! with tagged fields for flexible versions) and the body; an answer's is the correlation id,
//! tagged fields for flexible versions, and the body.

use std::collections::HashMap;

use bytes::{Buf, Bytes};
use kafka_protocol::messages::{ApiKey, RequestHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Message, Request, StrBytes};

/// The highest version of each API this client uses, and the lowest it can use. The caps
/// keep to versions that name topics (Fetch 13+ and Metadata's topic ids are not used) and to
/// the single-group forms of FindCoordinator (before 4) and OffsetFetch (before 8). Group
/// membership uses JoinGroup from version 2 (rebalance timeout) on.
pub(crate) const VERSIONS: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 11),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Metadata, 1, 12),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::FindCoordinator, 1, 3),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::JoinGroup, 2, 9),
    (ApiKey::SyncGroup, 1, 5),
    (ApiKey::Heartbeat, 1, 4),
    (ApiKey::LeaveGroup, 1, 5),
    (ApiKey::SaslHandshake, 1, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::AddPartitionsToTxn, 0, 3),
    (ApiKey::AddOffsetsToTxn, 0, 3),
    (ApiKey::TxnOffsetCommit, 0, 3),
    (ApiKey::EndTxn, 0, 3),
];

/// The versions one broker and this client both speak, per API key.
#[derive(Debug, Clone, Default)]
pub(crate) struct Versions {
    chosen: HashMap<i16, i16>,
}

impl Versions {
    /// Picks, for every API this client uses, the highest version in the intersection of
    /// the broker's range, `VERSIONS` and what kafka-protocol implements.
    pub(crate) fn negotiate(broker: &[(i16, i16, i16)]) -> Versions {
        let mut chosen = HashMap::new();
        for &(key, min, cap) in VERSIONS {
            let ours = max_supported(key).min(cap);
            if let Some(&(_, bmin, bmax)) = broker.iter().find(|(k, _, _)| *k == key as i16) {
                let v = ours.min(bmax);
                if v >= min.max(bmin) {
                    chosen.insert(key as i16, v);
                }
            }
        }
        Versions { chosen }
    }

    /// The version to use for `key`, or `None` when there is no common one.
    pub(crate) fn get(&self, key: ApiKey) -> Option<i16> {
        self.chosen.get(&(key as i16)).copied()
    }
}

fn max_supported(key: ApiKey) -> i16 {
    use kafka_protocol::messages::*;
    match key {
        ApiKey::Produce => ProduceRequest::VERSIONS.max,
        ApiKey::Fetch => FetchRequest::VERSIONS.max,
        ApiKey::ListOffsets => ListOffsetsRequest::VERSIONS.max,
        ApiKey::Metadata => MetadataRequest::VERSIONS.max,
        ApiKey::OffsetCommit => OffsetCommitRequest::VERSIONS.max,
        ApiKey::OffsetFetch => OffsetFetchRequest::VERSIONS.max,
        ApiKey::FindCoordinator => FindCoordinatorRequest::VERSIONS.max,
        ApiKey::CreateTopics => CreateTopicsRequest::VERSIONS.max,
        ApiKey::JoinGroup => JoinGroupRequest::VERSIONS.max,
        ApiKey::SyncGroup => SyncGroupRequest::VERSIONS.max,
        ApiKey::Heartbeat => HeartbeatRequest::VERSIONS.max,
        ApiKey::LeaveGroup => LeaveGroupRequest::VERSIONS.max,
        ApiKey::SaslHandshake => SaslHandshakeRequest::VERSIONS.max,
        ApiKey::SaslAuthenticate => SaslAuthenticateRequest::VERSIONS.max,
        ApiKey::InitProducerId => InitProducerIdRequest::VERSIONS.max,
        ApiKey::AddPartitionsToTxn => AddPartitionsToTxnRequest::VERSIONS.max,
        ApiKey::AddOffsetsToTxn => AddOffsetsToTxnRequest::VERSIONS.max,
        ApiKey::TxnOffsetCommit => TxnOffsetCommitRequest::VERSIONS.max,
        ApiKey::EndTxn => EndTxnRequest::VERSIONS.max,
        _ => -1,
    }
}

/// The name of an API, for errors.
pub(crate) fn api_name(key: ApiKey) -> &'static str {
    match key {
        ApiKey::Produce => "Produce",
        ApiKey::Fetch => "Fetch",
        ApiKey::ListOffsets => "ListOffsets",
        ApiKey::Metadata => "Metadata",
        ApiKey::OffsetCommit => "OffsetCommit",
        ApiKey::OffsetFetch => "OffsetFetch",
        ApiKey::FindCoordinator => "FindCoordinator",
        ApiKey::CreateTopics => "CreateTopics",
        ApiKey::ApiVersions => "ApiVersions",
        ApiKey::JoinGroup => "JoinGroup",
        ApiKey::SyncGroup => "SyncGroup",
        ApiKey::Heartbeat => "Heartbeat",
        ApiKey::LeaveGroup => "LeaveGroup",
        ApiKey::SaslHandshake => "SaslHandshake",
        ApiKey::SaslAuthenticate => "SaslAuthenticate",
        ApiKey::InitProducerId => "InitProducerId",
        ApiKey::AddPartitionsToTxn => "AddPartitionsToTxn",
        ApiKey::AddOffsetsToTxn => "AddOffsetsToTxn",
        ApiKey::TxnOffsetCommit => "TxnOffsetCommit",
        ApiKey::EndTxn => "EndTxn",
        _ => "request",
    }
}

/// Encodes one request frame (size prefix included).
pub(crate) fn encode_request<R: Request>(
    req: &R,
    version: i16,
    correlation_id: i32,
    client_id: &str,
) -> Result<Vec<u8>, String> {
    let header = RequestHeader::default()
        .with_request_api_key(R::KEY)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_string(client_id.to_string())));
    let header_version = R::header_version(version);
    let size = header.compute_size(header_version).map_err(|e| e.to_string())?
        + req.compute_size(version).map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(size + 4);
    buf.extend_from_slice(&(size as i32).to_be_bytes());
    header.encode(&mut buf, header_version).map_err(|e| e.to_string())?;
    req.encode(&mut buf, version).map_err(|e| e.to_string())?;
    Ok(buf)
}

/// The correlation id at the start of an answer's payload.
pub(crate) fn correlation_id(payload: &[u8]) -> Option<i32> {
    payload.get(..4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Decodes an answer's payload (correlation id included) as `R`'s response. Keeps byte
/// fields as slices of `payload`.
pub(crate) fn decode_response<R: Request>(mut payload: Bytes, version: i16) -> Result<R::Response, String> {
    if payload.len() < 4 {
        return Err("answer shorter than its header".into());
    }
    payload.advance(4);
    if <R::Response as HeaderVersion>::header_version(version) >= 1 {
        skip_tagged_fields(&mut payload)?;
    }
    <R::Response as Decodable>::decode(&mut payload, version).map_err(|e| e.to_string())
}

fn unsigned_varint(buf: &mut Bytes) -> Result<u32, String> {
    let mut v: u32 = 0;
    for shift in (0..35).step_by(7) {
        if !buf.has_remaining() {
            return Err("truncated varint".into());
        }
        let b = buf.get_u8();
        v |= u32::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

fn skip_tagged_fields(buf: &mut Bytes) -> Result<(), String> {
    let n = unsigned_varint(buf)?;
    for _ in 0..n {
        unsigned_varint(buf)?;
        let len = unsigned_varint(buf)? as usize;
        if buf.remaining() < len {
            return Err("truncated tagged field".into());
        }
        buf.advance(len);
    }
    Ok(())
}

/// Kafka error codes this client acts on.
pub(crate) mod code {
    pub(crate) const NONE: i16 = 0;
    pub(crate) const OFFSET_OUT_OF_RANGE: i16 = 1;
    pub(crate) const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub(crate) const LEADER_NOT_AVAILABLE: i16 = 5;
    pub(crate) const NOT_LEADER_OR_FOLLOWER: i16 = 6;
    pub(crate) const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
    pub(crate) const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub(crate) const NOT_COORDINATOR: i16 = 16;
    pub(crate) const TOPIC_ALREADY_EXISTS: i16 = 36;
}

/// The name of a Kafka error code (`NotLeaderOrFollower`, ...).
pub(crate) fn code_name(code: i16) -> String {
    match kafka_protocol::ResponseError::try_from_code(code) {
        Some(e) => format!("{e:?}"),
        None => format!("error code {code}"),
    }
}

/// Whether a request that failed with `code` may succeed when retried (after a metadata
/// refresh for the leadership errors).
pub(crate) fn code_is_retriable(code: i16) -> bool {
    kafka_protocol::ResponseError::try_from_code(code).is_some_and(|e| e.is_retriable())
}

/// Whether `code` means the partition's leader moved or is unknown: refresh metadata.
pub(crate) fn code_needs_metadata(code: i16) -> bool {
    matches!(code, code::UNKNOWN_TOPIC_OR_PARTITION | code::LEADER_NOT_AVAILABLE | code::NOT_LEADER_OR_FOLLOWER)
        || matches!(code, 74 | 75) // FENCED_LEADER_EPOCH, UNKNOWN_LEADER_EPOCH
}

/// Whether `code` means the group coordinator moved or is not ready.
pub(crate) fn code_needs_coordinator(code: i16) -> bool {
    matches!(code, code::COORDINATOR_LOAD_IN_PROGRESS | code::COORDINATOR_NOT_AVAILABLE | code::NOT_COORDINATOR)
}

/// Reads one frame's payload from a blocking reader.
pub(crate) fn read_frame_blocking(r: &mut impl std::io::Read) -> std::io::Result<Bytes> {
    let mut size = [0u8; 4];
    r.read_exact(&mut size)?;
    let size = i32::from_be_bytes(size);
    if !(4..=MAX_FRAME).contains(&size) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad frame size {size}")));
    }
    let mut payload = vec![0u8; size as usize];
    r.read_exact(&mut payload)?;
    Ok(Bytes::from(payload))
}

/// The largest answer this client accepts (a fetch answer is bounded by its max bytes).
pub(crate) const MAX_FRAME: i32 = 1 << 30;

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::messages::{MetadataRequest, MetadataResponse};

    #[test]
    fn negotiation_takes_the_highest_common_version() {
        let broker = [(0, 0, 11), (1, 0, 17), (3, 0, 12), (10, 0, 6), (19, 0, 7)];
        let v = Versions::negotiate(&broker);
        assert_eq!(v.get(ApiKey::Produce), Some(11));
        assert_eq!(v.get(ApiKey::Fetch), Some(12));
        assert_eq!(v.get(ApiKey::Metadata), Some(12));
        assert_eq!(v.get(ApiKey::FindCoordinator), Some(3));
        assert_eq!(v.get(ApiKey::ListOffsets), None);
        let old = Versions::negotiate(&[(0, 0, 2)]);
        assert_eq!(old.get(ApiKey::Produce), None);
    }

    #[test]
    fn a_flexible_answer_decodes_after_its_tagged_fields() {
        let resp = MetadataResponse::default().with_throttle_time_ms(7);
        for version in [3i16, 8, 9, 12] {
            let mut buf = BytesMut::new();
            buf.extend_from_slice(&42i32.to_be_bytes());
            if MetadataResponse::header_version(version) >= 1 {
                buf.extend_from_slice(&[0]);
            }
            resp.encode(&mut buf, version).unwrap();
            let payload = buf.freeze();
            assert_eq!(correlation_id(&payload), Some(42));
            let got = decode_response::<MetadataRequest>(payload, version).unwrap();
            assert_eq!(got.throttle_time_ms, 7);
        }
    }
}
