//! In-memory blob backend, for tests and throwaway stores.

use std::collections::HashMap;
use std::sync::RwLock;

use async_trait::async_trait;

use super::{BlobError, BlobMeta, BlobService, EncodedChunk};
use crate::digest::Digest;

/// Chunks and chunk lists in hash maps.
#[derive(Default)]
pub struct MemoryBlobService {
    // A std RwLock: every critical section is a map lookup or insert with no
    // await inside, and reads (the common case) proceed in parallel.
    inner: RwLock<Inner>,
}

/// What a [`MemoryBlobService`] holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Distinct chunks.
    pub chunks: u64,
    /// Their decoded bytes.
    pub chunk_bytes: u64,
    /// Their bytes as stored (compressed where that was smaller).
    pub stored_bytes: u64,
}

#[derive(Default)]
struct Inner {
    chunks: HashMap<Digest, EncodedChunk>,
    blobs: HashMap<Digest, BlobMeta>,
    /// Chunks quarantined and not put since.
    quarantined: std::collections::HashSet<Digest>,
}

impl MemoryBlobService {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many chunks are stored, their decoded and their stored bytes.
    pub fn stats(&self) -> MemoryStats {
        let inner = self.inner.read().expect("lock poisoned");
        let mut stats = MemoryStats {
            chunks: inner.chunks.len() as u64,
            ..Default::default()
        };
        for c in inner.chunks.values() {
            stats.chunk_bytes += c.size;
            stats.stored_bytes += c.data.len() as u64;
        }
        stats
    }

    /// Replaces a stored chunk's bytes, for corruption tests.
    #[doc(hidden)]
    pub fn corrupt_chunk(&self, digest: &Digest, f: impl FnOnce(&mut EncodedChunk)) -> bool {
        let mut inner = self.inner.write().expect("lock poisoned");
        inner.chunks.get_mut(digest).map(f).is_some()
    }
}

#[async_trait]
impl BlobService for MemoryBlobService {
    async fn stat(&self, blob: &Digest) -> Result<Option<BlobMeta>, BlobError> {
        Ok(self
            .inner
            .read()
            .expect("lock poisoned")
            .blobs
            .get(blob)
            .cloned())
    }

    async fn read_chunks(&self, chunks: &[Digest]) -> Result<Vec<EncodedChunk>, BlobError> {
        let inner = self.inner.read().expect("lock poisoned");
        chunks
            .iter()
            .map(|d| {
                inner
                    .chunks
                    .get(d)
                    .cloned()
                    .ok_or(BlobError::ChunkNotFound(*d))
            })
            .collect()
    }

    async fn missing_chunks(&self, chunks: &[Digest]) -> Result<Vec<Digest>, BlobError> {
        let inner = self.inner.read().expect("lock poisoned");
        Ok(chunks
            .iter()
            .filter(|d| !inner.chunks.contains_key(d))
            .copied()
            .collect())
    }

    async fn put_chunks(&self, chunks: Vec<EncodedChunk>) -> Result<(), BlobError> {
        let mut inner = self.inner.write().expect("lock poisoned");
        for c in chunks {
            inner.quarantined.remove(&c.digest);
            inner.chunks.entry(c.digest).or_insert(c);
        }
        Ok(())
    }

    async fn quarantine(&self, chunks: &[Digest]) -> Result<Vec<Digest>, BlobError> {
        let mut inner = self.inner.write().expect("lock poisoned");
        let mut bad = Vec::new();
        for d in chunks {
            if inner.chunks.get(d).is_some_and(|c| c.decode().is_err()) {
                inner.chunks.remove(d);
                inner.quarantined.insert(*d);
                bad.push(*d);
            }
        }
        Ok(bad)
    }

    async fn quarantined(&self) -> Result<u64, BlobError> {
        Ok(self.inner.read().expect("lock poisoned").quarantined.len() as u64)
    }

    async fn put_blob(&self, blob: Digest, meta: BlobMeta) -> Result<(), BlobError> {
        let mut inner = self.inner.write().expect("lock poisoned");
        if let Some(c) = meta
            .chunks
            .iter()
            .find(|c| !inner.chunks.contains_key(&c.digest))
        {
            return Err(BlobError::ChunkNotFound(c.digest));
        }
        inner.blobs.insert(blob, meta);
        Ok(())
    }
}
