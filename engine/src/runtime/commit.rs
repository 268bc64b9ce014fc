//! The commit protocol.
//!
//! **Invariant: after a crash at any point, a table shard holds exactly the effects of the
//! events below its partition's committed offset.** Writes reach a shard's cache only when
//! their event is acked, so freezing the dirty entries in the same instant as the
//! committable offsets are read captures exactly those effects. A commit then writes them
//! once to the store and once to the changelog, waits until the changelog (and every buffered
//! send) is durable, commits the source offsets *and the changelog end offsets in one
//! transport commit*, and only then checkpoints the stores: the pair (source offset,
//! changelog offset) is committed atomically, and a store checkpoint never claims more than
//! what is committed. A commit that fails part way undoes nothing durable and loses nothing:
//! entries whose write failed are dirty again, and changelog records it wrote are committed
//! by the next commit that succeeds.

use std::rc::Rc;

use faust_storage::{BatchBuilder, WriteBatch};

use crate::error::TableError;
use crate::runtime::state::{AnyShard, CommitFailure, FrozenSet};
use crate::transports::AnyCore;

/// Entries encoded per step of a commit, between which the core serves other tasks.
pub(crate) const FREEZE_CHUNK: usize = 4096;
/// Changelog records are produced in batches of about this many bytes.
const CHANGELOG_BATCH_BYTES: usize = 1 << 20;

/// Writes the frozen entries of `shard` to its store and produces them to its changelog;
/// returns the changelog's new end offset (or `None` when nothing was frozen). Every batch
/// that reaches the changelog moves the shard's [`written_end`](AnyShard::written_end), so a
/// commit that fails later (even in the middle of these batches) still has its records
/// committed by the next one. On failure the caller gives the frozen entries back
/// ([`AnyShard::restore`]).
pub(crate) async fn write_frozen(
    core: &AnyCore,
    shard: &Rc<dyn AnyShard>,
    frozen: &mut dyn FrozenSet,
) -> Result<Option<u64>, CommitFailure> {
    let mut end = None;
    let mut batch = BatchBuilder::with_capacity(64 * 1024);
    let mut store_batch = WriteBatch::new();
    loop {
        let left = frozen
            .encode(FREEZE_CHUNK, &mut batch, &mut store_batch, crate::util::now_ms())
            .map_err(CommitFailure::Table)?;
        crate::runtime::fault_point("commit:store")
            .map_err(|source| TableError::Store {
                table: shard.name().to_string(),
                partition: shard.partition(),
                source: faust_storage::Error::Io { op: "append to", path: "the shard's store".into(), source },
            })
            .and_then(|()| shard.write_store(&mut store_batch))
            .map_err(CommitFailure::Table)?;
        if (batch.encoded_len() >= CHANGELOG_BATCH_BYTES || left == 0) && !batch.is_empty() {
            let full = std::mem::replace(&mut batch, BatchBuilder::with_capacity(64 * 1024));
            let produced = match crate::runtime::fault_point("commit:changelog-write") {
                Ok(()) => core.produce(shard.changelog(), full).await,
                Err(e) => Err(crate::runtime::injected_produce_failure(shard.changelog(), full, e)),
            }
            .map_err(|source| CommitFailure::Changelog { tp: shard.changelog().clone(), source })?;
            end = Some(produced.last_offset + 1);
            shard.set_written_end(end);
            crate::runtime::crash_point("commit:changelog-batch");
        }
        if left == 0 {
            return Ok(end);
        }
        glommio::yield_if_needed().await;
    }
}
