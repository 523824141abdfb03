//! Garbage collection's sweep of a redb store ([`RedbStore::sweep`]): every
//! directory, chunk list and chunk not in the live set is dropped from the
//! index, and every pack byte no live chunk takes is given back to the file
//! system — packs with no live chunk left are deleted, and the gaps between
//! live chunks in the others (dropped chunks, and bytes a crash appended
//! without indexing) are punched out (`fallocate(PUNCH_HOLE)`: whole blocks
//! are freed, the partial blocks at a gap's ends only zeroed in the gap, so
//! the live neighbours' bytes are untouched).
//!
//! Order, for crash safety: the index entries go in one durable commit
//! first, then the bytes. A crash between the two leaves bytes no index
//! names — space the next sweep does not see, as after any crash — never
//! an index naming freed bytes.
//!
//! The live set must be taken from the same store with no writer in
//! between (the caller holds the store: redb admits one process, and
//! `lazystore gc` opens it itself). A sweep during writes could drop a
//! chunk an import was about to name; see `docs/design.md`.

use std::collections::{HashMap, HashSet};

use redb::ReadableTable as _;

use crate::packs::IndexRecord;
use crate::redb_store::{BLOBS, CHUNKS, DIRECTORIES};
use crate::{Digest, RedbStore};

/// What a garbage collection keeps: everything a kept path reaches.
#[derive(Debug, Default)]
pub struct Live {
    /// Directories.
    pub directories: HashSet<Digest>,
    /// Chunk lists (blobs).
    pub blobs: HashSet<Digest>,
    /// Chunks.
    pub chunks: HashSet<Digest>,
}

/// What a sweep dropped (or, dry, would drop).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Directories dropped.
    pub directories: u64,
    /// Chunk lists dropped.
    pub blobs: u64,
    /// Chunks dropped.
    pub chunks: u64,
    /// Their stored (encoded) bytes.
    pub chunk_bytes: u64,
    /// Bytes the pack files took before.
    pub packs_before: u64,
    /// And after (the same, dry).
    pub packs_after: u64,
}

/// Why a sweep failed. Whatever it dropped from the index is gone; the
/// bytes not yet freed are only wasted space.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The index could not be read or written.
    #[error("sweeping the index")]
    Database(#[from] redb::Error),
    /// A chunk's index record does not decode.
    #[error("chunk {digest} has a damaged index record: {reason}")]
    Record {
        /// The chunk.
        digest: Digest,
        /// What is wrong.
        reason: &'static str,
    },
    /// The pack files could not be measured or freed.
    #[error("freeing pack space")]
    Packs(#[from] std::io::Error),
}

fn db<E: Into<redb::Error>>(e: E) -> SweepError {
    SweepError::Database(e.into())
}

/// The keys of `table` that `keep` does not hold.
fn unreached(
    table: &impl redb::ReadableTable<&'static [u8; 32], &'static [u8]>,
    keep: &HashSet<Digest>,
) -> Result<Vec<[u8; 32]>, SweepError> {
    let mut gone = Vec::new();
    for entry in table.iter().map_err(db)? {
        let (key, _) = entry.map_err(db)?;
        if !keep.contains(&Digest::from_bytes(*key.value())) {
            gone.push(*key.value());
        }
    }
    Ok(gone)
}

impl RedbStore {
    /// Drops what `live` does not hold (see the module docs); with
    /// `dry_run`, only counts it. Blocks: call it from `spawn_blocking`.
    pub fn sweep(&self, live: &Live, dry_run: bool) -> Result<Swept, SweepError> {
        let packs = self.packs();
        let mut swept = Swept {
            packs_before: packs.allocated_bytes()?,
            ..Swept::default()
        };
        let txn = self.database().begin_write().map_err(db)?;
        let mut live_chunks: HashMap<u32, Vec<crate::packs::Location>> = HashMap::new();
        {
            let mut directories = txn.open_table(DIRECTORIES).map_err(db)?;
            let mut blobs = txn.open_table(BLOBS).map_err(db)?;
            let mut chunks = txn.open_table(CHUNKS).map_err(db)?;
            let drop_dirs = unreached(&directories, &live.directories)?;
            let drop_blobs = unreached(&blobs, &live.blobs)?;
            let mut drop_chunks = Vec::new();
            for entry in chunks.iter().map_err(db)? {
                let (key, value) = entry.map_err(db)?;
                let digest = Digest::from_bytes(*key.value());
                let record = IndexRecord::from_bytes(value.value())
                    .map_err(|reason| SweepError::Record { digest, reason })?;
                if live.chunks.contains(&digest) {
                    live_chunks
                        .entry(record.at.pack)
                        .or_default()
                        .push(record.at);
                } else {
                    drop_chunks.push(*key.value());
                    swept.chunk_bytes += u64::from(record.at.len);
                }
            }
            swept.directories = drop_dirs.len() as u64;
            swept.blobs = drop_blobs.len() as u64;
            swept.chunks = drop_chunks.len() as u64;
            if !dry_run {
                for key in &drop_dirs {
                    directories.remove(key).map_err(db)?;
                }
                for key in &drop_blobs {
                    blobs.remove(key).map_err(db)?;
                }
                for key in &drop_chunks {
                    chunks.remove(key).map_err(db)?;
                }
            }
        }
        if dry_run {
            txn.abort().map_err(db)?;
            swept.packs_after = swept.packs_before;
            return Ok(swept);
        }
        self.commit(txn, redb::Durability::Immediate).map_err(db)?;
        // The index names only live chunks now: free every other byte.
        packs.keep_only(&live_chunks)?;
        swept.packs_after = packs.allocated_bytes()?;
        Ok(swept)
    }
}
