//! The source position a re-keyed record carries (`group_by`): which source partition and
//! offset it came from, so that a repartition topic's consumer drops records re-sent after
//! a crash.

/// The header a re-keying agent stamps on each record: the source partition (u32) and
/// offset (u64), big-endian.
pub(crate) const POSITION_HEADER: &[u8] = b"faust-source-position";

pub(crate) fn encode_position(partition: u32, offset: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..4].copy_from_slice(&partition.to_be_bytes());
    out[4..].copy_from_slice(&offset.to_be_bytes());
    out
}

/// The source position stamped on `record`, if it has a well-formed one.
pub(crate) fn source_position(record: &faust_storage::Record) -> Option<(u32, u64)> {
    let (_, value) = record.headers().find(|(k, _)| *k == POSITION_HEADER)?;
    let value: &[u8; 12] = value?.try_into().ok()?;
    let (p, o) = value.split_at(4);
    Some((u32::from_be_bytes(p.try_into().ok()?), u64::from_be_bytes(o.try_into().ok()?)))
}

/// Calls `send` with `record`'s headers and its source position stamped on them (replacing a
/// stamp it carries from an earlier repartition).
pub(crate) fn with_position<T>(
    record: &faust_storage::Record,
    partition: u32,
    offset: u64,
    send: impl FnOnce(&[faust_storage::Header<'_>]) -> T,
) -> T {
    let position = encode_position(partition, offset);
    let stamp: faust_storage::Header<'_> = (POSITION_HEADER, Some(&position[..]));
    let mut headers = record.headers().filter(|(k, _)| *k != POSITION_HEADER).peekable();
    if headers.peek().is_none() {
        // The common case, no headers of its own: no allocation.
        return send(&[stamp]);
    }
    let headers: Vec<faust_storage::Header<'_>> = headers.chain(std::iter::once(stamp)).collect();
    send(&headers)
}
