//! Typed errors of the storage crate. Every error names the file (and where it applies, the
//! byte position and offset) it is about.

use std::path::PathBuf;

/// Why bytes on disk are not a valid segment header, batch or checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The file is shorter than its fixed header.
    #[error("header is {len} bytes, shorter than the fixed header")]
    ShortHeader {
        /// Bytes available.
        len: usize,
    },
    /// The file does not start with the expected magic bytes.
    #[error("bad magic bytes: not a faust storage file")]
    BadMagic,
    /// The header's checksum does not match its contents.
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum {
        /// Checksum in the file.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// The file was written by a format version this build cannot read.
    #[error("format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version in the file.
        found: u16,
        /// Version this build reads and writes.
        supported: u16,
    },
    /// A structure runs past the end of the available bytes.
    #[error("truncated: needs {needed} bytes, {available} available")]
    Truncated {
        /// Bytes the structure claims.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// A batch's length field is impossible.
    #[error("impossible batch length {len}")]
    BadBatchLength {
        /// The length field.
        len: u32,
    },
    /// A batch's checksum does not match its contents.
    #[error("batch checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BatchChecksum {
        /// Checksum in the file.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// A batch's record count does not match its records or its offset range.
    #[error("record count {count} does not fit the batch (last offset delta {last_offset_delta})")]
    BadRecordCount {
        /// Records counted or claimed.
        count: u32,
        /// The batch's last offset delta.
        last_offset_delta: u32,
    },
    /// Offsets inside a batch do not increase.
    #[error("record offsets do not increase (delta {next} after {previous})")]
    OffsetsNotIncreasing {
        /// Previous record's delta.
        previous: u32,
        /// This record's delta.
        next: u32,
    },
    /// A record's offset lies outside its batch's range.
    #[error("record offset delta {delta} outside the batch (last delta {last})")]
    OffsetDeltaOutOfRange {
        /// The record's delta.
        delta: u32,
        /// The batch's last delta.
        last: u32,
    },
    /// A record's flags are unknown or contradict its lengths.
    #[error("invalid record flags {flags:#04x}")]
    BadRecordFlags {
        /// The flags byte.
        flags: u8,
    },
    /// A record's lengths overflow.
    #[error("record lengths overflow")]
    LengthOverflow,
    /// A record's header section is malformed.
    #[error("malformed record headers")]
    BadHeaders,
    /// Batches in a segment go backwards or leave the segment's range.
    #[error("batch base offset {found} where at least {expected} was expected")]
    OffsetOutOfOrder {
        /// The lowest acceptable offset.
        expected: u64,
        /// The batch's base offset.
        found: u64,
    },
}

/// An error from a log or a store. Every variant names the path it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation failed (a full disk shows up here as `ENOSPC`).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another log or store handle (in this process or another) holds the directory.
    #[error("{path} is locked by another process or handle; only one may open it at a time")]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// Data that was made durable (below the recovery point or a checkpoint) is damaged.
    /// For a store, the engine rebuilds the shard from its changelog.
    #[error("corrupt data in {path} at byte {position}: {reason}")]
    Corruption {
        /// The damaged file.
        path: PathBuf,
        /// Byte position of the damaged structure in the file.
        position: u64,
        /// What is wrong.
        #[source]
        reason: FormatError,
    },
    /// The files of a log do not fit together (a segment is missing, or a checkpoint points
    /// past the data).
    #[error("inconsistent log in {path}: {detail}")]
    Inconsistent {
        /// The log or store directory.
        path: PathBuf,
        /// What does not fit.
        detail: String,
    },
    /// A read asked for an offset the log does not hold.
    #[error("offset {requested} is out of range for {path} (earliest {earliest}, high-water mark {high_watermark})")]
    OffsetOutOfRange {
        /// The log directory.
        path: PathBuf,
        /// The offset asked for.
        requested: u64,
        /// The earliest offset still held.
        earliest: u64,
        /// The next offset to be written.
        high_watermark: u64,
    },
    /// A batch is larger than a segment can hold.
    #[error("batch of {size} bytes exceeds the segment size {max} of {path}")]
    BatchTooLarge {
        /// The log directory.
        path: PathBuf,
        /// Encoded batch size.
        size: usize,
        /// The largest batch a segment holds.
        max: usize,
    },
    /// An appended batch had no record.
    #[error("empty batch appended to {path}")]
    EmptyBatch {
        /// The log directory.
        path: PathBuf,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { op, path: path.into(), source }
    }

    /// Whether the error reports damaged or inconsistent data (as opposed to an I/O failure,
    /// a lock conflict or a bad argument): the case where a table shard is rebuilt from its
    /// changelog.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corruption { .. } | Error::Inconsistent { .. })
    }
}

/// The storage crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
