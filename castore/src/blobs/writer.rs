//! The write side of [`Blobs`]: [`BlobWriter`] chunks a blob as its bytes
//! arrive, and stores it in batches, each hashed, checked against what the
//! backend lacks, compressed and sent by a task of its own, within a memory
//! budget every writer of one [`Blobs`] shares.

use std::sync::Arc;

use bytes::Bytes;

use super::{BlobError, BlobMeta, BlobService, Blobs, ChunkMeta, EncodedChunk};
use crate::chunker::{Chunker, ChunkerParams};
use crate::digest::Digest;

/// Chunks gathered before asking the backend which it lacks, and handed
/// to one task to hash, compress and store. Small enough that a large file
/// keeps both cores compressing (4 MiB batches, two at a time, left one
/// core idle for a third of an import), large enough that the backend
/// round trips per batch do not show.
const WRITE_BATCH_BYTES: usize = 2 * 1024 * 1024;

/// Bytes of chunks (before compression) that the writers of one [`Blobs`]
/// may have on their way to the backend at once, whatever the number of
/// writers or files: what bounds an ingest's memory.
pub(super) const IN_FLIGHT_BYTES: usize = 32 * 1024 * 1024;

impl Blobs {
    /// The chunker parameters writes use: the backend's, asked once (a
    /// round trip for a remote store), else [`Blobs::params`].
    pub async fn write_params(&self) -> Result<ChunkerParams, BlobError> {
        self.chosen
            .get_or_try_init(|| async {
                Ok(self.service.chunker_params().await?.unwrap_or(self.params))
            })
            .await
            .copied()
    }

    /// A writer for a new blob, cutting chunks with [`Blobs::write_params`].
    pub async fn writer(&self) -> Result<BlobWriter, BlobError> {
        Ok(BlobWriter {
            service: self.service.clone(),
            budget: self.budget.clone(),
            chunker: Chunker::new(self.write_params().await?),
            hasher: blake3::Hasher::new(),
            size: 0,
            chunks: Vec::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            in_flight: std::collections::VecDeque::new(),
        })
    }

    /// Stores `data` as a blob and returns its digest.
    pub async fn put(&self, data: &[u8]) -> Result<Digest, BlobError> {
        let mut w = self.writer().await?;
        w.write(data).await?;
        Ok(w.finish().await?.0)
    }
}

/// Streams one blob into the store: chunks, hashes, sends only the chunks
/// the backend lacks (compressed), and records the chunk list on `finish`.
///
/// Chunking happens as bytes arrive; each full batch is hashed, checked
/// against the backend, compressed and stored by a task of its own, with up
/// to `MAX_BATCHES_IN_FLIGHT` batches behind the one being filled, so the
/// hashing and compression of one batch overlap with the chunking of the
/// next and with the backend's round trips. Every batch on its way holds
/// its bytes of the `IN_FLIGHT_BYTES` budget shared by all writers of the
/// same [`Blobs`], so memory stays bounded however many files are stored
/// at once.
pub struct BlobWriter {
    service: Arc<dyn BlobService>,
    budget: Arc<tokio::sync::Semaphore>,
    chunker: Chunker,
    hasher: blake3::Hasher,
    size: u64,
    chunks: Vec<ChunkMeta>,
    pending: Vec<Bytes>,
    pending_bytes: usize,
    in_flight:
        std::collections::VecDeque<tokio::task::JoinHandle<Result<Vec<ChunkMeta>, BlobError>>>,
}

/// Batches a writer has being stored at once (besides the one it fills):
/// enough to keep two cores compressing while the next batch is chunked
/// and one batch waits on the backend. Memory is bounded by
/// [`IN_FLIGHT_BYTES`], not by this.
const MAX_BATCHES_IN_FLIGHT: usize = 8;

/// Takes `bytes` of the in-flight budget (all of it at most), waiting until
/// stored batches give enough back.
async fn reserve(
    budget: &Arc<tokio::sync::Semaphore>,
    bytes: usize,
) -> Result<tokio::sync::OwnedSemaphorePermit, BlobError> {
    let n = bytes.clamp(1, IN_FLIGHT_BYTES) as u32;
    budget
        .clone()
        .acquire_many_owned(n)
        .await
        .map_err(|e| BlobError::Internal(e.into()))
}

impl BlobWriter {
    /// Appends bytes to the blob.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        // A batch at a time, so a large write is stored in a pipeline
        // rather than chunked whole before any of it is sent.
        for piece in data.chunks(WRITE_BATCH_BYTES) {
            self.hasher.update(piece);
            self.size += piece.len() as u64;
            let before = self.pending.len();
            self.chunker.push(piece, &mut self.pending);
            self.pending_bytes += self.pending[before..].iter().map(Bytes::len).sum::<usize>();
            if self.pending_bytes >= WRITE_BATCH_BYTES {
                self.flush(MAX_BATCHES_IN_FLIGHT).await?;
            }
        }
        Ok(())
    }

    /// Sends the pending chunks off to be stored, then waits for the oldest
    /// batches until at most `keep` are still in flight.
    async fn flush(&mut self, keep: usize) -> Result<(), BlobError> {
        let pending = std::mem::take(&mut self.pending);
        let bytes = std::mem::take(&mut self.pending_bytes);
        if !pending.is_empty() {
            let permit = reserve(&self.budget, bytes).await?;
            let service = self.service.clone();
            self.in_flight.push_back(tokio::spawn(async move {
                let stored = store_batch(service, pending).await;
                drop(permit);
                stored
            }));
        }
        self.wait(keep).await
    }

    /// Waits for the oldest batches until at most `keep` are in flight.
    async fn wait(&mut self, keep: usize) -> Result<(), BlobError> {
        while self.in_flight.len() > keep {
            let batch = self.in_flight.pop_front().expect("checked non-empty");
            let metas = batch.await.map_err(|e| BlobError::Internal(e.into()))??;
            self.chunks.extend(metas);
        }
        Ok(())
    }

    /// Ends the blob as soon as its last bytes have a place in the in-flight
    /// budget: returns its digest and size, and a task that stores the last
    /// chunks and the chunk list. The blob is stored only when the task has
    /// succeeded; a caller must wait for it before publishing anything that
    /// refers to the blob.
    pub async fn finish_in_background(
        mut self,
    ) -> Result<(Digest, u64, tokio::task::JoinHandle<Result<(), BlobError>>), BlobError> {
        let digest = Digest::from(self.hasher.finalize());
        let size = self.size;
        let last = self.take_last();
        let permit = reserve(&self.budget, last.iter().map(Bytes::len).sum()).await?;
        let stored = tokio::spawn(async move { self.store_last(last, digest, permit).await });
        Ok((digest, size, stored))
    }

    /// Ends the blob: stores the last chunks and the chunk list, and returns
    /// the blob's digest and size.
    pub async fn finish(mut self) -> Result<(Digest, u64), BlobError> {
        let digest = Digest::from(self.hasher.finalize());
        let size = self.size;
        let last = self.take_last();
        let permit = reserve(&self.budget, last.iter().map(Bytes::len).sum()).await?;
        self.store_last(last, digest, permit).await?;
        Ok((digest, size))
    }

    /// The chunks not sent yet, the chunker's remainder included.
    fn take_last(&mut self) -> Vec<Bytes> {
        self.chunker.finish(&mut self.pending);
        self.pending_bytes = 0;
        std::mem::take(&mut self.pending)
    }

    /// Waits for the batches in flight, then stores the last one and the
    /// chunk list together, so a small file costs one backend write, not
    /// two.
    async fn store_last(
        mut self,
        last: Vec<Bytes>,
        digest: Digest,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(), BlobError> {
        self.wait(0).await?;
        let (metas, encoded) = prepare_batch(&self.service, last).await?;
        self.chunks.extend(metas);
        let meta = BlobMeta::new(digest, self.size, std::mem::take(&mut self.chunks))?;
        self.service
            .put_chunks_and_blob(encoded, digest, meta)
            .await?;
        drop(permit);
        Ok(())
    }
}

/// Work on fewer bytes than this is done in place rather than handed to a
/// blocking thread: for a small file the hand-off costs more than the work.
const INLINE_CPU_BYTES: usize = 64 * 1024;

/// Runs CPU-heavy `work` (hashing, compression) over `chunks` on a blocking
/// thread, so it never stalls the async workers, or in place when the
/// chunks are small.
async fn cpu<T: Send + 'static>(
    chunks: Vec<Bytes>,
    work: impl FnOnce(Vec<Bytes>) -> T + Send + 'static,
) -> Result<T, BlobError> {
    if chunks.iter().map(Bytes::len).sum::<usize>() < INLINE_CPU_BYTES {
        return Ok(work(chunks));
    }
    tokio::task::spawn_blocking(move || work(chunks))
        .await
        .map_err(|e| BlobError::Internal(e.into()))
}

/// Hashes a batch of chunks, asks the backend which it lacks, compresses
/// and stores those, and returns the batch's part of the chunk list.
async fn store_batch(
    service: Arc<dyn BlobService>,
    batch: Vec<Bytes>,
) -> Result<Vec<ChunkMeta>, BlobError> {
    let (metas, encoded) = prepare_batch(&service, batch).await?;
    if !encoded.is_empty() {
        service.put_chunks(encoded).await?;
    }
    Ok(metas)
}

/// Hashes a batch of chunks, asks the backend which it lacks and
/// compresses those: the batch's part of the chunk list, and the chunks to
/// store.
async fn prepare_batch(
    service: &Arc<dyn BlobService>,
    batch: Vec<Bytes>,
) -> Result<(Vec<ChunkMeta>, Vec<EncodedChunk>), BlobError> {
    let hashed = cpu(batch, |batch| {
        batch
            .into_iter()
            .map(|c| (Digest::of(&c), c))
            .collect::<Vec<_>>()
    })
    .await?;
    let metas: Vec<ChunkMeta> = hashed
        .iter()
        .map(|(digest, c)| ChunkMeta {
            digest: *digest,
            size: c.len() as u64,
        })
        .collect();
    // Uploads over a network ask which chunks the backend lacks and send
    // only those. A local backend is asked only about large batches: for a
    // small one the lookup (a read transaction) costs about what storing it
    // does, and storing a chunk that is already there is a no-op.
    let batch_bytes: usize = hashed.iter().map(|(_, c)| c.len()).sum();
    let ask = service.uploads_travel() || batch_bytes >= INLINE_CPU_BYTES;
    let missing: Option<std::collections::HashSet<Digest>> = if !ask {
        None
    } else {
        let digests: Vec<Digest> = metas.iter().map(|c| c.digest).collect();
        Some(
            service
                .missing_chunks(&digests)
                .await?
                .into_iter()
                .collect(),
        )
    };
    let mut seen = std::collections::HashSet::new();
    let to_send: Vec<Bytes> = hashed
        .into_iter()
        .filter(|(d, _)| missing.as_ref().is_none_or(|m| m.contains(d)) && seen.insert(*d))
        .map(|(_, c)| c)
        .collect();
    let encoded = if to_send.is_empty() {
        Vec::new()
    } else {
        cpu(to_send, |chunks| {
            chunks
                .into_iter()
                .map(EncodedChunk::encode)
                .collect::<Vec<_>>()
        })
        .await?
    };
    Ok((metas, encoded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blobs::tests::{random, read_back, store};

    #[tokio::test]
    async fn boundary_sizes_round_trip() {
        let (_, blobs) = store();
        let p = ChunkerParams::default();
        let (min, avg, max) = (p.min as usize, p.avg as usize, p.max as usize);
        for len in [0, 1, min - 1, min, avg, max, max + 1, 10 << 20] {
            let data = random(len);
            let digest = blobs.put(&data).await.unwrap();
            assert_eq!(digest, Digest::of(&data), "len {len}");
            let meta = blobs.stat(&digest).await.unwrap().unwrap();
            assert_eq!(meta.size, len as u64);
            if len < min {
                assert!(
                    meta.chunks.len() <= 1,
                    "len {len}: {} chunks",
                    meta.chunks.len()
                );
            }
            assert!(meta.chunks.iter().all(|c| c.size <= max as u64));
            assert_eq!(read_back(&blobs, digest).await, data, "len {len}");
        }
    }

    #[tokio::test]
    async fn one_inserted_byte_adds_few_chunks() {
        let (mem, blobs) = store();
        let data = random(10 << 20);
        let a = blobs.put(&data).await.unwrap();
        let mut edited = data.clone();
        edited.insert(data.len() / 2, 0x5a);
        let b = blobs.put(&edited).await.unwrap();
        let old: std::collections::HashSet<Digest> = mem
            .stat(&a)
            .await
            .unwrap()
            .unwrap()
            .chunks
            .iter()
            .map(|c| c.digest)
            .collect();
        let new = mem.stat(&b).await.unwrap().unwrap().chunks;
        let added = new.iter().filter(|c| !old.contains(&c.digest)).count();
        assert!(added <= 3, "{added} new chunks");
    }
}
