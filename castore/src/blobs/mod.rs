//! Blobs: file contents, stored as content-defined chunks.
//!
//! [`BlobService`] is what a backend implements: chunks by digest (stored in
//! their encoded form) and a chunk list per blob. [`Blobs`] is what everyone
//! else uses: it chunks and compresses on write, and on read it decodes and
//! checks every chunk against its BLAKE3 before any byte is returned, so
//! verification never depends on the backend.
//!
//! The trait, its errors and the chunk list types are here; how a chunk is
//! encoded and checked is in `encoding.rs`, the verified read side of
//! [`Blobs`] in `reader.rs`, and its write pipeline in `writer.rs`.

mod cache;
mod encoding;
mod grpc;
mod index;
mod memory;
mod observed;
mod quarantine;
mod reader;
pub use reader::{STAT_BATCH, STAT_BATCHES};
pub(crate) mod redb;
mod s3;
mod writer;

use std::sync::Arc;

use async_trait::async_trait;

use crate::chunker::ChunkerParams;
use crate::digest::Digest;
use crate::retry::{ErrorClass, Retryable};

pub use self::cache::CachingBlobService;
pub use self::encoding::EncodedChunk;
pub(crate) use self::encoding::{
    CHUNK_ENTRY_LEN, decode_chunk_list, encode_chunk_list, zstd_decompress,
};
pub use self::grpc::GrpcBlobService;
pub use self::index::{ChunkIndex, cut};
pub use self::reader::BlobReader;
pub use self::redb::RedbBlobService;
pub use self::s3::S3BlobService;
pub use self::writer::BlobWriter;
use self::writer::IN_FLIGHT_BYTES;
pub use memory::{MemoryBlobService, MemoryStats};
pub use observed::{BlobObserver, ObservedBlobService};

/// Largest chunk any store accepts (fastcdc's largest maximum), so a claimed
/// size can be bounded before anything is allocated for it.
pub const MAX_CHUNK_SIZE: u64 = 16 * 1024 * 1024;

/// One chunk of a blob's chunk list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    /// BLAKE3 of the chunk's bytes.
    pub digest: Digest,
    /// Its length in bytes.
    pub size: u64,
}

/// What one chunk takes where it is stored (`BlobService::stored_sizes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoredSize {
    /// Its own bytes: alone, its share of a frame's, or its patch record's.
    pub bytes: u64,
    /// The chunk of its bytes with their store path hashes taken out,
    /// which it is read from and which other chunks may share: its bytes
    /// count once however many chunks name it (a redb store after
    /// `lazystore compact`, `chunk_record.rs`).
    pub base: Option<Digest>,
}

/// A blob's length and chunk list, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobMeta {
    /// Length of the blob in bytes: the sum of the chunk sizes.
    pub size: u64,
    /// The chunks, in order. Empty for the empty blob.
    pub chunks: Vec<ChunkMeta>,
}

impl BlobMeta {
    /// The chunk list of a blob of `size` bytes no longer than the
    /// chunker's minimum chunk `min`, known without asking the store: one
    /// chunk, whose digest is the blob's (both are the BLAKE3 of the same
    /// bytes), and which is verified against it as any chunk is. `None`
    /// for an empty or a longer blob.
    pub fn one_chunk(blob: Digest, size: u64, min: u64) -> Option<Self> {
        if size == 0 || size > min {
            return None;
        }
        let one = vec![ChunkMeta { digest: blob, size }];
        BlobMeta::new(blob, size, one).ok()
    }

    /// Builds a chunk list, checking the sizes add up to `size` and each
    /// chunk is within [`MAX_CHUNK_SIZE`].
    pub fn new(blob: Digest, size: u64, chunks: Vec<ChunkMeta>) -> Result<Self, BlobError> {
        let mut total: u64 = 0;
        for c in &chunks {
            if c.size == 0 || c.size > MAX_CHUNK_SIZE {
                return Err(BlobError::BadChunkList {
                    blob,
                    reason: "chunk size out of range",
                });
            }
            total = total.checked_add(c.size).ok_or(BlobError::BadChunkList {
                blob,
                reason: "size overflows",
            })?;
        }
        if total != size {
            return Err(BlobError::BadChunkList {
                blob,
                reason: "chunk sizes do not add up",
            });
        }
        Ok(BlobMeta { size, chunks })
    }
}

/// What can go wrong storing or reading blobs.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No blob with this digest is stored.
    #[error("blob {0} not found")]
    BlobNotFound(Digest),
    /// A chunk the caller needs is not stored.
    #[error("chunk {0} not found")]
    ChunkNotFound(Digest),
    /// A chunk's bytes do not match its digest: never returned.
    #[error("chunk {chunk} is corrupt: {reason}")]
    Corrupt {
        /// The chunk.
        chunk: Digest,
        /// What check failed.
        reason: &'static str,
    },
    /// A compressed chunk does not decompress.
    #[error("chunk {chunk} does not decompress")]
    Decompress {
        /// The chunk.
        chunk: Digest,
        /// zstd's error.
        #[source]
        source: std::io::Error,
    },
    /// A chunk list is inconsistent.
    #[error("chunk list of blob {blob} is invalid: {reason}")]
    BadChunkList {
        /// The blob.
        blob: Digest,
        /// What is wrong.
        reason: &'static str,
    },
    /// A read past the end of a blob.
    #[error("range {offset}+{len} is outside blob {blob} of {size} bytes")]
    OutOfRange {
        /// The blob.
        blob: Digest,
        /// Start asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The blob's size.
        size: u64,
    },
    /// The bytes read for a whole blob hash to something else.
    #[error("blob {expected} reads back as {actual}")]
    BlobMismatch {
        /// The blob asked for.
        expected: Digest,
        /// BLAKE3 of what its chunks gave.
        actual: Digest,
    },
    /// The storage backend, or the way to it, failed: a database or I/O
    /// error, or a remote store's [`GrpcError`](crate::grpc::GrpcError).
    /// Such failures may heal; see the [`Retryable`] impl for how a gRPC
    /// one is classed.
    #[error("blob store backend failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A backend answered what its contract does not allow, such as another
    /// number of chunks than asked for ([`WrongChunkCount`]). Like corrupt
    /// data, worth asking again a few times, not for long.
    #[error("blob store backend answered wrongly")]
    BadAnswer(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// This process failed, not the store: a task panicked or was
    /// cancelled, a worker thread is gone, a write's group commit failed.
    /// Retrying would meet the same broken state.
    #[error("blob store failed internally")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Retryable for BlobError {
    /// Backend failures are transient unless their source says otherwise
    /// ([`ErrorClass::of_backend`]); data that fails verification and
    /// wrong answers are corrupt; the rest (not found, a bad request, an
    /// internal failure) permanent.
    fn class(&self) -> ErrorClass {
        match self {
            BlobError::Backend(source) => ErrorClass::of_backend(&**source),
            BlobError::Corrupt { .. }
            | BlobError::Decompress { .. }
            | BlobError::BlobMismatch { .. }
            | BlobError::BadAnswer(_) => ErrorClass::Corrupt,
            BlobError::BlobNotFound(_)
            | BlobError::ChunkNotFound(_)
            | BlobError::BadChunkList { .. }
            | BlobError::OutOfRange { .. }
            | BlobError::Internal(_) => ErrorClass::Permanent,
        }
    }
}

/// A backend's answer to [`BlobService::read_chunks`] with another number
/// of chunks than asked for: found as the source of
/// [`BlobError::BadAnswer`].
#[derive(Debug, thiserror::Error)]
#[error("{got} chunks returned for {asked} asked")]
pub struct WrongChunkCount {
    /// Chunks asked for.
    pub asked: usize,
    /// Chunks returned.
    pub got: usize,
}

/// Chunk lists [`BlobService::stat_many`] asks at once by default.
pub const STAT_MANY_PARALLEL: usize = 16;

/// The default [`BlobService::stat_many`]: one [`BlobService::stat`] per
/// blob, [`STAT_MANY_PARALLEL`] at a time (also what a gRPC client falls
/// back to against a server without `StatMany`).
pub(crate) async fn stat_each<S: BlobService + ?Sized>(
    service: &S,
    blobs: &[Digest],
) -> Result<Vec<Option<BlobMeta>>, BlobError> {
    use futures::{StreamExt, TryStreamExt};
    futures::stream::iter(blobs.iter().copied())
        .map(|blob| async move { service.stat(&blob).await })
        .buffered(STAT_MANY_PARALLEL)
        .try_collect()
        .await
}

/// `service.stat_many(blobs)`, failing with [`BlobError::BadAnswer`]
/// unless it answers each blob asked: how a backend's batch is read by
/// [`Blobs`], the gRPC server and the cache in front of a remote.
pub(crate) async fn stat_many_checked<S: BlobService + ?Sized>(
    service: &S,
    blobs: &[Digest],
) -> Result<Vec<Option<BlobMeta>>, BlobError> {
    let metas = service.stat_many(blobs).await?;
    if metas.len() != blobs.len() {
        return Err(BlobError::BadAnswer(Box::new(WrongChunkCount {
            asked: blobs.len(),
            got: metas.len(),
        })));
    }
    Ok(metas)
}

/// A chunk store backend.
#[async_trait]
pub trait BlobService: Send + Sync {
    /// The chunker parameters the store records, which every writer must
    /// cut its blobs with, or `None` when the store records none and
    /// writers choose. A store that wraps another must pass its answer on.
    async fn chunker_params(&self) -> Result<Option<ChunkerParams>, BlobError> {
        Ok(None)
    }

    /// The chunk list of `blob`. Must return exactly what [`put_blob`] stored,
    /// or `None` for an unknown blob.
    ///
    /// [`put_blob`]: BlobService::put_blob
    async fn stat(&self, blob: &Digest) -> Result<Option<BlobMeta>, BlobError>;

    /// The chunk lists of `blobs`, in the order asked, as [`stat`] answers
    /// each. By default asked [`STAT_MANY_PARALLEL`] at a time; a backend
    /// that answers several in one request (an object store reads the
    /// lists of one pack in one GET) does so, and a store that wraps
    /// another passes the batch on.
    ///
    /// [`stat`]: BlobService::stat
    async fn stat_many(&self, blobs: &[Digest]) -> Result<Vec<Option<BlobMeta>>, BlobError> {
        stat_each(self, blobs).await
    }

    /// The stored chunks, in the order asked. Must fail with
    /// [`BlobError::ChunkNotFound`] if any is unknown. Need not verify them:
    /// [`Blobs`] does, whatever the backend.
    async fn read_chunks(&self, chunks: &[Digest]) -> Result<Vec<EncodedChunk>, BlobError>;

    /// The bytes each chunk takes where it is stored, in the order asked
    /// (for `lazystore stats`); fails as [`read_chunks`] does. By default
    /// the length of what `read_chunks` answers, which is the stored length
    /// wherever chunks are stored on their own.
    ///
    /// [`read_chunks`]: BlobService::read_chunks
    async fn stored_sizes(&self, chunks: &[Digest]) -> Result<Vec<StoredSize>, BlobError> {
        let read = self.read_chunks(chunks).await?;
        Ok(read
            .iter()
            .map(|c| StoredSize {
                bytes: c.data.len() as u64,
                base: None,
            })
            .collect())
    }

    /// The subset of `chunks` that is not stored, in the order asked.
    async fn missing_chunks(&self, chunks: &[Digest]) -> Result<Vec<Digest>, BlobError>;

    /// Stores chunks. Must be idempotent: a chunk already present is kept
    /// once. Callers must pass chunks whose digest matches their bytes.
    async fn put_chunks(&self, chunks: Vec<EncodedChunk>) -> Result<(), BlobError>;

    /// Stores `chunks`, then records `blob`'s chunk list, as
    /// [`put_chunks`] and [`put_blob`] would one after the other (and with
    /// the same checks): a backend may do both in one write.
    ///
    /// [`put_chunks`]: BlobService::put_chunks
    /// [`put_blob`]: BlobService::put_blob
    async fn put_chunks_and_blob(
        &self,
        chunks: Vec<EncodedChunk>,
        blob: Digest,
        meta: BlobMeta,
    ) -> Result<(), BlobError> {
        if !chunks.is_empty() {
            self.put_chunks(chunks).await?;
        }
        self.put_blob(blob, meta).await
    }

    /// Records `blob`'s chunk list. Must refuse (with
    /// [`BlobError::ChunkNotFound`]) a list naming a chunk that is not stored,
    /// so no blob ever points at missing data.
    async fn put_blob(&self, blob: Digest, meta: BlobMeta) -> Result<(), BlobError>;

    /// Quarantines those of `chunks` whose stored bytes fail verification:
    /// a reader found them corrupt as this backend returned them. A backend
    /// that holds chunk bytes must check its own copy of each (the reader's
    /// copy may have been damaged on the way) and, for each that fails,
    /// stop reporting it present — [`missing_chunks`] lists it,
    /// [`read_chunks`] fails with [`BlobError::ChunkNotFound`] — and record
    /// it until it is written again, so the next write of any blob holding
    /// it stores it anew. Returns the chunks quarantined. A backend over
    /// another passes the report on; the default quarantines nothing.
    ///
    /// [`missing_chunks`]: BlobService::missing_chunks
    /// [`read_chunks`]: BlobService::read_chunks
    async fn quarantine(&self, _chunks: &[Digest]) -> Result<Vec<Digest>, BlobError> {
        Ok(Vec::new())
    }

    /// How many chunks are quarantined and not yet written again: while it
    /// is not zero, a blob the store holds may lack a chunk. Must be cheap
    /// (one lookup, or one call to a remote backend): writers ask it before
    /// deciding whether a present store path needs checking.
    async fn quarantined(&self) -> Result<u64, BlobError> {
        Ok(0)
    }

    /// Whether every chunk [`read_chunks`](BlobService::read_chunks)
    /// returns was decoded and checked against its BLAKE3 by this backend,
    /// so [`Blobs`] need not hash it again. A backend must return `true`
    /// only if it can never return a chunk it has not checked itself; the
    /// default, `false`, is right for every store that returns chunks as
    /// stored.
    fn verifies_chunks(&self) -> bool {
        false
    }

    /// Whether chunks put here cross a network, so that asking
    /// [`missing_chunks`](BlobService::missing_chunks) first saves sending
    /// them. Writers always ask such a backend; a local one they ask only
    /// for batches large enough to be worth a lookup. A store that wraps
    /// another must pass its answer on.
    fn uploads_travel(&self) -> bool {
        false
    }
}

/// Verified access to a [`BlobService`]: chunked, compressed writes and
/// checked reads.
#[derive(Clone)]
pub struct Blobs {
    service: Arc<dyn BlobService>,
    params: ChunkerParams,
    /// The parameters writes use, asked of the backend once.
    chosen: Arc<tokio::sync::OnceCell<ChunkerParams>>,
    /// Permits for [`IN_FLIGHT_BYTES`], shared by every writer.
    budget: Arc<tokio::sync::Semaphore>,
}

impl Blobs {
    /// Wraps a backend. Writes are chunked with the parameters the backend
    /// records ([`BlobService::chunker_params`]), or with `params` when it
    /// records none.
    pub fn new(service: Arc<dyn BlobService>, params: ChunkerParams) -> Self {
        Blobs {
            service,
            params,
            chosen: Arc::new(tokio::sync::OnceCell::new()),
            budget: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_BYTES)),
        }
    }

    /// The chunker parameters writes use when the backend records none.
    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// The backend.
    pub fn service(&self) -> &Arc<dyn BlobService> {
        &self.service
    }
}

#[cfg(test)]
mod tests {
    //! Helpers the tests of the reader and the writer share, and the tests
    //! of the chunk list contract.

    use super::*;
    use rand::RngExt;

    pub(super) fn store() -> (Arc<MemoryBlobService>, Blobs) {
        let mem = Arc::new(MemoryBlobService::new());
        (mem.clone(), Blobs::new(mem, ChunkerParams::default()))
    }

    pub(super) fn random(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rng().fill(&mut v[..]);
        v
    }

    pub(super) async fn read_back(blobs: &Blobs, digest: Digest) -> Vec<u8> {
        let meta = blobs.stat(&digest).await.unwrap().unwrap();
        let mut r = blobs.reader(digest, meta);
        let mut out = Vec::new();
        while let Some(c) = r.next_chunk().await.unwrap() {
            out.extend_from_slice(&c);
        }
        out
    }

    #[tokio::test]
    async fn put_blob_refuses_missing_chunks() {
        let (mem, _) = store();
        let chunk = ChunkMeta {
            digest: Digest::of(b"x"),
            size: 1,
        };
        let meta = BlobMeta::new(Digest::of(b"x"), 1, vec![chunk]).unwrap();
        assert!(matches!(
            mem.put_blob(Digest::of(b"x"), meta).await,
            Err(BlobError::ChunkNotFound(_))
        ));
        assert!(BlobMeta::new(Digest::of(b"x"), 2, vec![chunk]).is_err());
    }
}
