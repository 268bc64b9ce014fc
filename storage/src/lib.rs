//! Storage for the faust engine: segment logs for topics and log-structured key-value stores
//! for table partitions, on memory-mapped files.
//!
//! - [`Log`]: an append-only log of record batches with dense 64-bit offsets, CRC32C per
//!   batch, segments rolled by size, a sparse offset index, zero-copy reads, retention by size
//!   and age, key compaction, and cutting of torn tails after a crash. The embedded transport
//!   keeps its topics in these.
//! - [`Store`]: one table partition. Puts and deletes are appended to a log; an in-memory
//!   index maps each key to its latest record; gets return slices of the mapped file.
//!   Checkpoints define state: opening a store gives exactly its last checkpoint.
//!
//! Both share one file format (see `docs/storage.md` at the repository root), so a store's own log can
//! serve as a table's changelog. Neither spawns threads: the owner (one core of the engine)
//! drives appends, syncs and compaction steps.
//!
//! ```
//! use faust_storage::{Store, StoreConfig, WriteBatch};
//!
//! let dir = tempfile::tempdir()?;
//! let mut store = Store::open(dir.path(), StoreConfig::default())?;
//! let mut batch = WriteBatch::new();
//! for i in 0..1000u32 {
//!     batch.put(format!("account-{i}").as_bytes(), &i.to_le_bytes());
//! }
//! store.write(&mut batch)?;
//! store.checkpoint(b"my offsets")?;
//! assert_eq!(store.len(), 1000);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod compact;
mod error;
mod files;
mod format;
mod log;
mod repair;
mod segment;
mod store;

pub use crate::error::{Error, FormatError, Result};
pub use crate::format::{BatchBuilder, BuiltRecord, BuiltRecords, Header};
pub use crate::log::{
    Appended, Batch, CompactionOutcome, Headers, Log, LogConfig, MAX_SEGMENT_BYTES, Record, Records, RetentionOutcome,
};
pub use crate::repair::RepairReport;
pub use crate::store::{
    Checkpoint, CompactionProgress, PendingCheckpoint, Store, StoreConfig, StoreStats, SyncPolicy, WriteBatch,
};
