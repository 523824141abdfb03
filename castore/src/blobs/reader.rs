//! The read side of [`Blobs`]: chunk lists, range reads that fetch only the
//! chunks they overlap, whole-blob reads ([`BlobReader`]), and the check of
//! every chunk against its BLAKE3 before any byte is returned.

use bytes::Bytes;

use super::{BlobError, BlobMeta, Blobs, ChunkIndex, WrongChunkCount, cut};
use crate::digest::Digest;
use crate::proto::ChunkEncoding;

/// Chunk lists asked in one [`Blobs::stat_many`] call by a walk over many
/// files, and such calls at once ([`Blobs::stat_batches`]): an object
/// store answers a batch in about one GET per pack.
pub const STAT_BATCH: usize = 64;
pub const STAT_BATCHES: usize = 4;

/// Chunks asked for in one backend read.
const READ_BATCH_CHUNKS: usize = 64;

impl Blobs {
    /// The chunk list of `blob`, or `None`.
    pub async fn stat(&self, blob: &Digest) -> Result<Option<BlobMeta>, BlobError> {
        self.service.stat(blob).await
    }

    /// The chunk lists of `blobs`, in order (see [`BlobService::stat_many`]).
    ///
    /// [`BlobService::stat_many`]: super::BlobService::stat_many
    pub async fn stat_many(&self, blobs: &[Digest]) -> Result<Vec<Option<BlobMeta>>, BlobError> {
        super::stat_many_checked(&*self.service, blobs).await
    }

    /// The chunk lists of `blobs` as a stream of batches in order, each
    /// batch's blobs with its answer: [`STAT_BATCH`] blobs to a
    /// [`stat_many`](Blobs::stat_many) call, [`STAT_BATCHES`] calls at
    /// once. How a walk over many files (a mark, a completeness check, a
    /// report) asks for their chunk lists without holding them all.
    pub fn stat_batches(
        &self,
        blobs: &[Digest],
    ) -> impl futures::Stream<Item = (Vec<Digest>, Result<Vec<Option<BlobMeta>>, BlobError>)> + '_
    {
        use futures::StreamExt;
        let batches: Vec<Vec<Digest>> = blobs.chunks(STAT_BATCH).map(<[_]>::to_vec).collect();
        futures::stream::iter(batches)
            .map(move |batch| async move {
                let metas = self.stat_many(&batch).await;
                (batch, metas)
            })
            .buffered(STAT_BATCHES)
    }

    /// Reads `len` bytes at `offset` of the blob with chunk list `meta`,
    /// fetching only the chunks that overlap and verifying each one.
    pub async fn read_range(
        &self,
        blob: &Digest,
        meta: &BlobMeta,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, BlobError> {
        let end =
            offset
                .checked_add(len)
                .filter(|&e| e <= meta.size)
                .ok_or(BlobError::OutOfRange {
                    blob: *blob,
                    offset,
                    len,
                    size: meta.size,
                })?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let index = ChunkIndex::new(meta.clone());
        let overlapping = index.overlapping(offset, end);
        // One batch of chunks in memory at a time besides the result.
        let mut out = Vec::with_capacity(len as usize);
        for first in overlapping.clone().step_by(READ_BATCH_CHUNKS) {
            let batch = first..overlapping.end.min(first + READ_BATCH_CHUNKS);
            let digests: Vec<Digest> = meta.chunks[batch].iter().map(|c| c.digest).collect();
            let chunks = self.read_chunks_verified(&digests).await?;
            let at = index.start(first);
            for piece in cut(chunks, offset.saturating_sub(at), end - at) {
                out.extend_from_slice(&piece);
            }
        }
        Ok(out.into())
    }

    /// Fetches chunks and returns their verified bytes, in order: decoded
    /// and hashed here, unless the backend did both itself (see
    /// [`BlobService::verifies_chunks`]).
    ///
    /// [`BlobService::verifies_chunks`]: super::BlobService::verifies_chunks
    ///
    /// A chunk that fails verification (here, or in a backend that
    /// verifies) is reported to the backend, which quarantines it if its
    /// stored copy fails too (see `quarantine.rs`); the read fails anyway.
    pub async fn read_chunks_verified(&self, chunks: &[Digest]) -> Result<Vec<Bytes>, BlobError> {
        let read = self.read_and_check(chunks).await;
        if let Err(e) = &read {
            self.report_corrupt(e).await;
        }
        read
    }

    async fn read_and_check(&self, chunks: &[Digest]) -> Result<Vec<Bytes>, BlobError> {
        let encoded = self.service.read_chunks(chunks).await?;
        let checked = self.service.verifies_chunks();
        if encoded.len() != chunks.len() {
            return Err(BlobError::BadAnswer(Box::new(WrongChunkCount {
                asked: chunks.len(),
                got: encoded.len(),
            })));
        }
        encoded
            .iter()
            .zip(chunks)
            .map(|(e, want)| {
                if e.digest != *want {
                    return Err(BlobError::Corrupt {
                        chunk: *want,
                        reason: "backend sent another chunk",
                    });
                }
                match e.encoding {
                    ChunkEncoding::Raw if checked && e.data.len() as u64 == e.size => {
                        Ok(e.data.clone())
                    }
                    _ => e.decode(),
                }
            })
            .collect()
    }

    /// Reads a whole blob, chunk by chunk, verified; see [`BlobReader`].
    pub fn reader(&self, blob: Digest, meta: BlobMeta) -> BlobReader {
        BlobReader {
            blobs: self.clone(),
            blob,
            meta,
            next: 0,
            ready: std::collections::VecDeque::new(),
            ahead: None,
            hasher: blake3::Hasher::new(),
        }
    }
}

/// Reads a whole blob in order, a batch of chunks at a time, each chunk
/// verified, and checks at the end that the bytes hash to the blob's digest.
///
/// The next batch is read while the caller consumes this one: a reader
/// that hashes what it gets (rendering a NAR for `fsck`, the publishing
/// check, an HTTP NAR) otherwise waits out every batch's read in turn.
pub struct BlobReader {
    blobs: Blobs,
    blob: Digest,
    meta: BlobMeta,
    /// The first chunk not yet asked for.
    next: usize,
    ready: std::collections::VecDeque<Bytes>,
    /// The batch being read ahead.
    ahead: Option<tokio::task::JoinHandle<Result<Vec<Bytes>, BlobError>>>,
    hasher: blake3::Hasher,
}

impl BlobReader {
    /// The next chunk's bytes, or `None` after the last one.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, BlobError> {
        if self.ready.is_empty() {
            if self.ahead.is_none() {
                self.read_ahead();
            }
            let Some(batch) = self.ahead.take() else {
                let actual = Digest::from(self.hasher.finalize());
                if actual != self.blob {
                    return Err(BlobError::BlobMismatch {
                        expected: self.blob,
                        actual,
                    });
                }
                return Ok(None);
            };
            let batch = batch.await.map_err(|e| BlobError::Internal(e.into()))??;
            self.ready.extend(batch);
            self.read_ahead();
        }
        let chunk = self.ready.pop_front().expect("a batch is never empty");
        self.hasher.update(&chunk);
        Ok(Some(chunk))
    }

    /// Starts reading the next batch, if chunks are left.
    fn read_ahead(&mut self) {
        if self.next == self.meta.chunks.len() {
            return;
        }
        let end = (self.next + READ_BATCH_CHUNKS).min(self.meta.chunks.len());
        let digests: Vec<Digest> = self.meta.chunks[self.next..end]
            .iter()
            .map(|c| c.digest)
            .collect();
        self.next = end;
        let blobs = self.blobs.clone();
        self.ahead = Some(tokio::spawn(async move {
            blobs.read_chunks_verified(&digests).await
        }));
    }
}

impl Drop for BlobReader {
    /// A reader given up mid-blob stops its read ahead.
    fn drop(&mut self) {
        if let Some(ahead) = self.ahead.take() {
            ahead.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blobs::tests::{random, store};
    use rand::RngExt;

    #[tokio::test]
    async fn range_reads_match_the_bytes() {
        let (_, blobs) = store();
        let data = random(3 << 20);
        let digest = blobs.put(&data).await.unwrap();
        let meta = blobs.stat(&digest).await.unwrap().unwrap();
        let mut rng = rand::rng();
        for _ in 0..200 {
            let offset = rng.random_range(0..data.len());
            let len = rng.random_range(0..=(data.len() - offset).min(600_000));
            let got = blobs
                .read_range(&digest, &meta, offset as u64, len as u64)
                .await
                .unwrap();
            assert_eq!(&got[..], &data[offset..offset + len]);
        }
        assert!(
            blobs
                .read_range(&digest, &meta, data.len() as u64, 1)
                .await
                .is_err()
        );
        assert!(
            blobs
                .read_range(&digest, &meta, data.len() as u64, 0)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn corrupt_chunk_is_an_error_never_bytes() {
        let (mem, blobs) = store();
        let data = random(200_000);
        let digest = blobs.put(&data).await.unwrap();
        let meta = blobs.stat(&digest).await.unwrap().unwrap();
        let victim = meta.chunks[0].digest;
        assert!(mem.corrupt_chunk(&victim, |c| {
            let mut d = c.data.to_vec();
            let mid = d.len() / 2;
            d[mid] ^= 1;
            c.data = d.into();
        }));
        let err = blobs.read_range(&digest, &meta, 0, 10).await.unwrap_err();
        assert!(
            matches!(err, BlobError::Corrupt { chunk, .. } | BlobError::Decompress { chunk, .. } if chunk == victim),
            "{err}"
        );
    }
}
