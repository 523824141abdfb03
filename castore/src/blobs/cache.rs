//! Blob backend that keeps what it reads from a remote backend in a local
//! [`CacheStore`].
//!
//! Reads try the cache first and fetch only what it lacks, in one remote
//! call per read. Every chunk is verified before it is cached and whenever
//! it is read back; a cached chunk that fails is dropped and fetched again,
//! so a damaged cache costs a round trip, never a failed read. Writes and
//! `missing_chunks` go to the remote, which is the source of truth: a cache
//! that holds a chunk says nothing about whether the remote does.
//!
//! Chunks come out of this backend decoded (as [`ChunkEncoding::Raw`]),
//! because verifying them meant decoding them, and the backend says so
//! ([`BlobService::verifies_chunks`]), so [`Blobs`] hands them on without
//! hashing them again. Measured on the 2-core development machine,
//! optimized, over 128 MiB of /usr/lib in 64 KiB chunks (what
//! `measure_verification` in `tests/cache.rs` repeats): a full decode
//! 0.62 GB/s, BLAKE3 alone 4.5 GB/s; handing chunks on compressed would
//! cost a second decompression. The price: a gRPC server whose backend is a
//! cache would send its chunks uncompressed.
//!
//! The cache degrades to the remote: if the local file fails (I/O errors, a
//! full disk) reads go to the remote and the failure is logged.
//!
//! [`ChunkEncoding::Raw`]: crate::proto::ChunkEncoding::Raw
//! [`Blobs`]: super::Blobs

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use super::{BlobError, BlobMeta, BlobService, EncodedChunk, WrongChunkCount};
use crate::cache_store::{CacheStore, Key, Local, Record};
use crate::chunker::ChunkerParams;
use crate::digest::Digest;
use crate::proto::ChunkEncoding;

/// A [`BlobService`] that caches a remote one in a [`CacheStore`].
#[derive(Clone)]
pub struct CachingBlobService {
    local: CacheStore,
    remote: Arc<dyn BlobService>,
}

impl std::fmt::Debug for CachingBlobService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachingBlobService")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl CachingBlobService {
    /// Caches `remote` in `local`.
    pub fn new(local: CacheStore, remote: Arc<dyn BlobService>) -> Self {
        CachingBlobService { local, remote }
    }

    /// The cache.
    pub fn local(&self) -> &CacheStore {
        &self.local
    }

    /// The backend it caches.
    pub fn remote(&self) -> &Arc<dyn BlobService> {
        &self.remote
    }

    /// Queues `inserts` to cache and `drops` to drop (the cache writes them
    /// behind, `cache_store/queue.rs`). A cache that cannot write still
    /// serves reads, so a failure is logged, not returned.
    async fn write_back(&self, inserts: Vec<Record>, drops: Vec<Key>) {
        if inserts.is_empty() && drops.is_empty() {
            return;
        }
        let local = self.local.clone();
        let result = tokio::task::spawn_blocking(move || local.write(inserts, drops)).await;
        if let Err(e) = result {
            self.local.warn_failed("blob", &e);
        }
    }
}

/// What the cache had for one chunk asked for.
enum Found {
    Hit(EncodedChunk),
    Miss,
    Damaged,
}

#[async_trait]
impl BlobService for CachingBlobService {
    /// The remote's: writes go through to it.
    async fn chunker_params(&self) -> Result<Option<ChunkerParams>, BlobError> {
        self.remote.chunker_params().await
    }

    /// From the cache if there, else from the remote and then cached.
    async fn stat(&self, blob: &Digest) -> Result<Option<BlobMeta>, BlobError> {
        Ok(self.stat_many(&[*blob]).await?.pop().flatten())
    }

    /// Cached chunk lists from the cache (one lookup pass), the rest from
    /// the remote in one `stat_many`, and what came back cached in one
    /// write: a walk's lists cost a blocking task and a remote call per
    /// batch, not per blob.
    async fn stat_many(&self, blobs: &[Digest]) -> Result<Vec<Option<BlobMeta>>, BlobError> {
        if blobs.is_empty() {
            return Ok(Vec::new());
        }
        let (local, want) = (self.local.clone(), blobs.to_vec());
        let looked_up = tokio::task::spawn_blocking(move || {
            let read = local.read()?;
            let found = want
                .iter()
                .map(|d| read.blob(d))
                .collect::<Result<Vec<_>, _>>()?;
            local.touch(
                want.iter()
                    .zip(&found)
                    .filter(|(_, f)| matches!(f, Local::Hit(_)))
                    .map(|(d, _)| Key::blob(*d)),
            );
            Ok::<_, redb::Error>(found)
        })
        .await;
        let found = match looked_up {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                self.local.warn_failed("blob", &e);
                blobs.iter().map(|_| Local::Miss).collect()
            }
            Err(e) => {
                self.local.warn_failed("blob", &e);
                blobs.iter().map(|_| Local::Miss).collect()
            }
        };
        let mut drops = Vec::new();
        let mut out = Vec::with_capacity(blobs.len());
        let mut missed = Vec::new();
        for (blob, found) in blobs.iter().zip(found) {
            let meta = match found {
                Local::Hit(meta) => Some(meta),
                Local::Miss => None,
                Local::Damaged(e) => {
                    self.local.warn_damaged("blob", &e);
                    drops.push(e.key());
                    None
                }
            };
            if meta.is_none() {
                missed.push((out.len(), *blob));
            }
            out.push(meta);
        }
        if missed.is_empty() {
            return Ok(out);
        }
        let ask: Vec<Digest> = missed.iter().map(|(_, d)| *d).collect();
        let answers = match super::stat_many_checked(&*self.remote, &ask).await {
            Ok(answers) => answers,
            Err(e) => {
                // The damaged copies go anyway: they are no use.
                self.write_back(Vec::new(), drops).await;
                return Err(e);
            }
        };
        let mut inserts = Vec::new();
        for ((at, blob), meta) in missed.into_iter().zip(answers) {
            if let Some(meta) = &meta {
                inserts.push(Record::Blob(blob, meta.clone()));
            }
            out[at] = meta;
        }
        self.write_back(inserts, drops).await;
        Ok(out)
    }

    /// Cached chunks from the cache, the rest from the remote in one call;
    /// every chunk verified, and returned decoded.
    async fn read_chunks(&self, chunks: &[Digest]) -> Result<Vec<EncodedChunk>, BlobError> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        // Lookups and the decoding that verifies them, on a blocking thread:
        // redb is synchronous, and decoding is CPU work.
        let (local, want) = (self.local.clone(), chunks.to_vec());
        let looked_up = tokio::task::spawn_blocking(move || {
            let read = local.read()?;
            let mut found = Vec::with_capacity(want.len());
            let mut damaged = Vec::new();
            for d in &want {
                found.push(match read.chunk(d)? {
                    Local::Hit(c) => Found::Hit(c),
                    Local::Miss => Found::Miss,
                    Local::Damaged(e) => {
                        damaged.push(e);
                        Found::Damaged
                    }
                });
            }
            local.touch(
                want.iter()
                    .zip(&found)
                    .filter(|(_, f)| matches!(f, Found::Hit(_)))
                    .map(|(d, _)| Key::chunk(*d)),
            );
            Ok::<_, redb::Error>((found, damaged))
        })
        .await;
        let (found, damaged) = match looked_up {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.local.warn_failed("blob", &e);
                (chunks.iter().map(|_| Found::Miss).collect(), Vec::new())
            }
            Err(e) => {
                self.local.warn_failed("blob", &e);
                (chunks.iter().map(|_| Found::Miss).collect(), Vec::new())
            }
        };
        let mut drops = Vec::with_capacity(damaged.len());
        for e in damaged {
            self.local.warn_damaged("blob", &e);
            drops.push(e.key());
        }

        let hits = found.iter().filter(|f| matches!(f, Found::Hit(_))).count() as u64;
        self.local.count_lookups(hits, found.len() as u64 - hits);
        // Each chunk the cache lacks, once, in the order first asked.
        let mut fetch = Vec::new();
        let mut fetched_at: HashMap<Digest, usize> = HashMap::new();
        for (d, f) in chunks.iter().zip(&found) {
            if !matches!(f, Found::Hit(_)) && !fetched_at.contains_key(d) {
                fetched_at.insert(*d, fetch.len());
                fetch.push(*d);
            }
        }
        let fetched = if fetch.is_empty() {
            Vec::new()
        } else {
            match self.fetch(fetch).await {
                Ok(f) => f,
                Err(e) => {
                    // The damaged copies go anyway: they are no use.
                    self.write_back(Vec::new(), drops).await;
                    return Err(e);
                }
            }
        };

        let out = chunks
            .iter()
            .zip(found)
            .map(|(d, f)| match f {
                Found::Hit(c) => c,
                Found::Miss | Found::Damaged => fetched[fetched_at[d]].1.clone(),
            })
            .collect();
        // Every damaged copy was fetched again: caching the good one
        // overwrites it.
        let inserts = fetched
            .into_iter()
            .map(|(stored, _)| Record::Chunk(stored))
            .collect();
        self.write_back(inserts, Vec::new()).await;
        Ok(out)
    }

    async fn missing_chunks(&self, chunks: &[Digest]) -> Result<Vec<Digest>, BlobError> {
        self.remote.missing_chunks(chunks).await
    }

    async fn put_chunks(&self, chunks: Vec<EncodedChunk>) -> Result<(), BlobError> {
        self.remote.put_chunks(chunks).await
    }

    /// The remote's: a chunk that fails here came from it (a damaged
    /// cached copy is dropped and fetched again without a report).
    async fn quarantine(&self, chunks: &[Digest]) -> Result<Vec<Digest>, BlobError> {
        self.remote.quarantine(chunks).await
    }

    async fn quarantined(&self) -> Result<u64, BlobError> {
        self.remote.quarantined().await
    }

    async fn put_blob(&self, blob: Digest, meta: BlobMeta) -> Result<(), BlobError> {
        self.remote.put_blob(blob, meta).await
    }

    async fn put_chunks_and_blob(
        &self,
        chunks: Vec<EncodedChunk>,
        blob: Digest,
        meta: BlobMeta,
    ) -> Result<(), BlobError> {
        self.remote.put_chunks_and_blob(chunks, blob, meta).await
    }

    /// Every chunk returned was decoded and checked: a cached one when read
    /// from the cache, a fetched one in `CachingBlobService::fetch`. One
    /// BLAKE3 pass instead of two: a cold read of 1 GiB from the local
    /// cache spent a fifth of its CPU hashing.
    fn verifies_chunks(&self) -> bool {
        true
    }

    /// The remote's: writes go through to it.
    fn uploads_travel(&self) -> bool {
        self.remote.uploads_travel()
    }
}

impl CachingBlobService {
    /// Fetches `want` from the remote and verifies every chunk; returns
    /// each as the remote sent it (to cache: compressed stays compressed)
    /// and decoded (to return). Fails, naming the chunk, if any does not
    /// verify: nothing unverified is cached or returned.
    async fn fetch(
        &self,
        want: Vec<Digest>,
    ) -> Result<Vec<(EncodedChunk, EncodedChunk)>, BlobError> {
        let sent = self.remote.read_chunks(&want).await?;
        if sent.len() != want.len() {
            return Err(BlobError::BadAnswer(Box::new(WrongChunkCount {
                asked: want.len(),
                got: sent.len(),
            })));
        }
        tokio::task::spawn_blocking(move || {
            sent.into_iter()
                .zip(want)
                .map(|(c, asked)| {
                    if c.digest != asked {
                        return Err(BlobError::Corrupt {
                            chunk: asked,
                            reason: "remote sent another chunk",
                        });
                    }
                    let raw = EncodedChunk {
                        digest: c.digest,
                        encoding: ChunkEncoding::Raw,
                        size: c.size,
                        data: c.decode()?,
                    };
                    Ok((c, raw))
                })
                .collect()
        })
        .await
        .map_err(|e| BlobError::Internal(e.into()))?
    }
}
