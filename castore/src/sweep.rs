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
//! A chunk stored as its base and the hashes taken out of it
//! (`chunk_record.rs`, encoding 3) has no bytes of its own: its base is
//! kept whenever it is, whether or not any path names the base.
//!
//! Offline (no [`Leases`]), the live set must be taken from the same store
//! with no writer in between: `lazystore gc` opens the store itself (redb
//! admits one process). Online, in a serving process, the writers' leases
//! keep what they are about to name; see `docs/design.md` ("Garbage
//! collection").

use std::collections::{HashMap, HashSet};

use redb::ReadableTable as _;

use crate::chunk_record::StoredRecord;
use crate::redb_store::{BLOBS, CHUNKS, DIRECTORIES};
use crate::{Digest, Leases, Node, RedbStore};

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

/// Adds to `kept` the objects `touched` names and everything they name in
/// turn: a touched directory's subtree, a touched chunk list's chunks. A
/// digest no table holds is kept as a chunk (a writer may be about to put
/// it).
fn leased<'a>(
    kept: &mut Live,
    touched: impl IntoIterator<Item = &'a Digest>,
    directories: &impl redb::ReadableTable<&'static [u8; 32], &'static [u8]>,
    blobs: &impl redb::ReadableTable<&'static [u8; 32], &'static [u8]>,
) -> Result<(), SweepError> {
    let mut stack: Vec<Digest> = touched.into_iter().copied().collect();
    while let Some(digest) = stack.pop() {
        if let Some(record) = directories.get(digest.as_bytes()).map_err(db)? {
            if kept.directories.insert(digest) {
                // A damaged record names nothing to keep; fsck reports it.
                if let Ok(dir) = crate::directories::redb::decode(digest, record.value()) {
                    stack.extend(dir.entries().filter_map(|(_, node)| match node {
                        Node::Directory { digest, .. } | Node::File { digest, .. } => Some(*digest),
                        Node::Symlink { .. } => None,
                    }));
                }
            }
        } else if let Some(record) = blobs.get(digest.as_bytes()).map_err(db)? {
            if kept.blobs.insert(digest)
                && let Ok(meta) = crate::blobs::redb::decode_blob(digest, record.value())
            {
                kept.chunks.extend(meta.chunks.iter().map(|c| c.digest));
            }
        } else {
            kept.chunks.insert(digest);
        }
    }
    Ok(())
}

impl RedbStore {
    /// Drops what `live` does not hold (see the module docs); with
    /// `dry_run`, only counts it. Blocks: call it from `spawn_blocking`.
    ///
    /// With `leases` (a serving store, writers running), what they hold is
    /// kept too, checked with the touches held still until the commit;
    /// only the dropped chunks' bytes are freed then (bytes a writer
    /// appended and has not indexed yet are not told apart from a crash's,
    /// so those wait for an offline sweep), and no pack is deleted.
    pub fn sweep(
        &self,
        live: &Live,
        leases: Option<&Leases>,
        dry_run: bool,
    ) -> Result<Swept, SweepError> {
        let packs = self.packs();
        let mut swept = Swept {
            packs_before: packs.allocated_bytes()?,
            ..Swept::default()
        };
        let txn = self.database().begin_write().map_err(db)?;
        let mut live_chunks: HashMap<u32, Vec<crate::packs::Location>> = HashMap::new();
        let mut dropped_at = Vec::new();
        // Chunks in frames (`frames.rs`), which share their frame's bytes.
        let mut framed = Vec::new();
        let mut held = None;
        {
            let mut directories = txn.open_table(DIRECTORIES).map_err(db)?;
            let mut blobs = txn.open_table(BLOBS).map_err(db)?;
            let mut chunks = txn.open_table(CHUNKS).map_err(db)?;
            let mut drop_dirs = unreached(&directories, &live.directories)?;
            let mut drop_blobs = unreached(&blobs, &live.blobs)?;
            let mut drop_chunks = Vec::new();
            // Patched chunks and their bases.
            let mut patched = Vec::new();
            for entry in chunks.iter().map_err(db)? {
                let (key, value) = entry.map_err(db)?;
                let digest = Digest::from_bytes(*key.value());
                let record = StoredRecord::from_bytes(value.value())
                    .map_err(|reason| SweepError::Record { digest, reason })?;
                if let StoredRecord::Placed(r) = &record
                    && r.frame.is_some()
                {
                    framed.push((*key.value(), r.at));
                }
                match &record {
                    StoredRecord::Placed(r) if live.chunks.contains(&digest) => {
                        live_chunks.entry(r.at.pack).or_default().push(r.at);
                    }
                    StoredRecord::Patched(p) => {
                        patched.push((digest, p.base));
                        if !live.chunks.contains(&digest) {
                            drop_chunks.push((*key.value(), record));
                        }
                    }
                    StoredRecord::Placed(_) => drop_chunks.push((*key.value(), record)),
                }
            }
            if let Some(leases) = leases {
                // The slow part on a copy of the touches; then, from the
                // hold to the commit, no writer can learn that an object is
                // present, and only what was touched since the copy is
                // walked.
                let copy = leases.snapshot();
                let mut kept = Live::default();
                leased(&mut kept, &copy, &directories, &blobs)?;
                let touched = leases.hold();
                let since = touched.iter().filter(|d| !copy.contains(d));
                leased(&mut kept, since, &directories, &blobs)?;
                drop_dirs.retain(|k| !kept.directories.contains(&Digest::from_bytes(*k)));
                drop_blobs.retain(|k| !kept.blobs.contains(&Digest::from_bytes(*k)));
                drop_chunks.retain(|(k, _)| !kept.chunks.contains(&Digest::from_bytes(*k)));
                held = Some(touched);
            }
            // The bases of the patched chunks kept.
            let dropped: HashSet<&[u8; 32]> = drop_chunks.iter().map(|(k, _)| k).collect();
            let bases: HashSet<Digest> = patched
                .iter()
                .filter(|(digest, _)| !dropped.contains(digest.as_bytes()))
                .map(|(_, base)| *base)
                .collect();
            drop_chunks.retain(|(k, record)| {
                let base = bases.contains(&Digest::from_bytes(*k));
                if base && let StoredRecord::Placed(r) = record {
                    live_chunks.entry(r.at.pack).or_default().push(r.at);
                }
                !base
            });
            swept.directories = drop_dirs.len() as u64;
            swept.blobs = drop_blobs.len() as u64;
            swept.chunks = drop_chunks.len() as u64;
            swept.chunk_bytes = drop_chunks.iter().map(|(_, r)| r.stored_bytes()).sum();
            if !dry_run {
                for key in &drop_dirs {
                    directories.remove(key).map_err(db)?;
                }
                for key in &drop_blobs {
                    blobs.remove(key).map_err(db)?;
                }
                // A frame's bytes are freed only with its last chunk.
                let dropped: HashSet<&[u8; 32]> = drop_chunks.iter().map(|(k, _)| k).collect();
                let kept_frames: HashSet<crate::packs::Location> = framed
                    .iter()
                    .filter(|(k, _)| !dropped.contains(k))
                    .map(|(_, at)| *at)
                    .collect();
                for (key, record) in &drop_chunks {
                    chunks.remove(key).map_err(db)?;
                    // Chunks of one frame name it again and again; a punch
                    // merges the repeats.
                    if let StoredRecord::Placed(r) = record
                        && (r.frame.is_none() || !kept_frames.contains(&r.at))
                    {
                        dropped_at.push(r.at);
                    }
                }
            }
        }
        if dry_run {
            txn.abort().map_err(db)?;
            swept.packs_after = swept.packs_before;
            return Ok(swept);
        }
        self.commit(txn, redb::Durability::Immediate).map_err(db)?;
        drop(held);
        // The index names only kept chunks now: free the others' bytes.
        if leases.is_some() {
            packs.punch(&dropped_at)?;
        } else {
            packs.keep_only(&live_chunks)?;
        }
        swept.packs_after = packs.allocated_bytes()?;
        Ok(swept)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::blobs::{ChunkMeta, EncodedChunk, RedbBlobService};
    use crate::{BlobMeta, BlobService, leased_blobs};

    fn chunk(data: &'static [u8]) -> EncodedChunk {
        EncodedChunk::encode(Bytes::from_static(data))
    }

    /// What a writer was told is stored, or wrote, survives a sweep that
    /// nothing published reaches; untouched leftovers do not.
    #[tokio::test]
    async fn what_writers_touched_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
        let raw = RedbBlobService::new(store.clone());
        let (asked, listed, left) = (chunk(b"asked"), chunk(b"listed"), chunk(b"left over"));
        raw.put_chunks(vec![asked.clone(), listed.clone(), left.clone()])
            .await
            .unwrap();
        let blob = Digest::of(b"listed");
        let meta = BlobMeta::new(
            blob,
            listed.size,
            vec![ChunkMeta {
                digest: listed.digest,
                size: listed.size,
            }],
        )
        .unwrap();
        raw.put_blob(blob, meta).await.unwrap();

        let leases = Leases::new(Duration::from_secs(60));
        let writer = leased_blobs(Arc::new(raw.clone()), leases.clone());
        // A writer asks about `asked` (told it is stored) and stats the
        // chunk list of `blob` (so it need not send `listed`).
        assert!(
            writer
                .missing_chunks(&[asked.digest])
                .await
                .unwrap()
                .is_empty()
        );
        assert!(writer.stat(&blob).await.unwrap().is_some());

        let swept = store.sweep(&Live::default(), Some(&leases), false).unwrap();
        assert_eq!((swept.chunks, swept.blobs), (1, 0), "{swept:?}");
        let missing = raw
            .missing_chunks(&[asked.digest, listed.digest, left.digest])
            .await
            .unwrap();
        assert_eq!(missing, vec![left.digest]);
        // Offline (a fresh open, no leases), all of it goes.
        drop((writer, raw, store));
        let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
        let swept = store.sweep(&Live::default(), None, false).unwrap();
        assert_eq!((swept.chunks, swept.blobs), (2, 1), "{swept:?}");
    }
}
