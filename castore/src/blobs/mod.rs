//! Blobs: file contents, stored as content-defined chunks.
//!
//! [`BlobService`] is what a backend implements: chunks by digest (stored in
//! their encoded form) and a chunk list per blob. [`Blobs`] is what everyone
//! else uses: it chunks and compresses on write, and on read it decodes and
//! checks every chunk against its BLAKE3 before any byte is returned, so
//! verification never depends on the backend.

mod cache;
mod grpc;
mod index;
mod memory;
mod observed;
mod redb;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::chunker::{Chunker, ChunkerParams};
use crate::digest::{DIGEST_LEN, Digest};
use crate::proto::ChunkEncoding;
use crate::retry::{ErrorClass, Retryable};

pub use self::cache::CachingBlobService;
pub use self::grpc::GrpcBlobService;
pub use self::index::{ChunkIndex, cut};
pub use self::redb::RedbBlobService;
pub use memory::{MemoryBlobService, MemoryStats};
pub use observed::{BlobObserver, ObservedBlobService};

/// Largest chunk any store accepts (fastcdc's largest maximum), so a claimed
/// size can be bounded before anything is allocated for it.
pub const MAX_CHUNK_SIZE: u64 = 16 * 1024 * 1024;

/// zstd level for chunks. Compressing chunks is the largest CPU cost of
/// an ingest; on 64 KiB blocks of a Rust toolchain NAR level 1 compresses
/// 1.52x as fast as level 3 (336 against 221 MB/s, one core) for 4.9 % more
/// bytes (2.47x against 2.59x), and decodes 4 % faster. See
/// docs/design.md, "Decisions and trade-offs".
const ZSTD_LEVEL: i32 = 1;

/// Chunks gathered before asking the backend which it lacks, and handed
/// to one task to hash, compress and store. Small enough that a large file
/// keeps both cores compressing (4 MiB batches, two at a time, left one
/// core idle for a third of an import), large enough that the backend
/// round trips per batch do not show.
const WRITE_BATCH_BYTES: usize = 2 * 1024 * 1024;

/// Bytes of chunks (before compression) that the writers of one [`Blobs`]
/// may have on their way to the backend at once, whatever the number of
/// writers or files: what bounds an ingest's memory.
const IN_FLIGHT_BYTES: usize = 32 * 1024 * 1024;

/// Chunks asked for in one backend read.
const READ_BATCH_CHUNKS: usize = 64;

/// One chunk of a blob's chunk list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    /// BLAKE3 of the chunk's bytes.
    pub digest: Digest,
    /// Its length in bytes.
    pub size: u64,
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

/// Length of one chunk's entry in a stored chunk list: its digest and its
/// size as a u32 (chunks are at most [`MAX_CHUNK_SIZE`], 16 MiB).
pub(crate) const CHUNK_ENTRY_LEN: usize = DIGEST_LEN + 4;
const _: () = assert!(MAX_CHUNK_SIZE <= u32::MAX as u64);

/// Appends `meta` as the store (`blobs-v1`) and the local cache
/// (`cache-blobs-v1`, after its checksum) keep a chunk list: the blob size,
/// u64 little endian, then each chunk's digest and size, u32 little endian.
pub(crate) fn encode_chunk_list(meta: &BlobMeta, out: &mut Vec<u8>) -> Result<(), &'static str> {
    out.reserve(8 + CHUNK_ENTRY_LEN * meta.chunks.len());
    out.extend_from_slice(&meta.size.to_le_bytes());
    for c in &meta.chunks {
        let size = u32::try_from(c.size).map_err(|_| "chunk size out of range")?;
        out.extend_from_slice(c.digest.as_bytes());
        out.extend_from_slice(&size.to_le_bytes());
    }
    Ok(())
}

/// Parses what [`encode_chunk_list`] wrote into the blob size and its
/// chunks; the error says what is wrong. The caller checks they add up
/// ([`BlobMeta::new`]).
pub(crate) fn decode_chunk_list(bytes: &[u8]) -> Result<(u64, Vec<ChunkMeta>), &'static str> {
    let (size, entries) = bytes.split_at_checked(8).ok_or("record is truncated")?;
    if entries.len() % CHUNK_ENTRY_LEN != 0 {
        return Err("record has a partial entry");
    }
    let size = u64::from_le_bytes(size.try_into().expect("8 bytes"));
    let chunks = entries
        .chunks_exact(CHUNK_ENTRY_LEN)
        .map(|e| ChunkMeta {
            digest: Digest::try_from(&e[..DIGEST_LEN]).expect("32 bytes"),
            size: u32::from_le_bytes(e[DIGEST_LEN..].try_into().expect("4 bytes")).into(),
        })
        .collect();
    Ok((size, chunks))
}

/// A chunk as stored and sent: its digest and its possibly compressed bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedChunk {
    /// BLAKE3 of the decoded bytes.
    pub digest: Digest,
    /// How `data` is encoded.
    pub encoding: ChunkEncoding,
    /// Decoded length.
    pub size: u64,
    /// The encoded bytes.
    pub data: Bytes,
}

impl EncodedChunk {
    /// Encodes `raw`, compressing it when that makes it smaller.
    pub fn encode(raw: Bytes) -> Self {
        let digest = Digest::of(&raw);
        let size = raw.len() as u64;
        // One compression context per thread: making one per chunk (what
        // `zstd::bulk::compress` does) cost 5% of an import's CPU.
        thread_local! {
            static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
                const { std::cell::RefCell::new(None) };
        }
        let compressed = COMPRESSOR.with_borrow_mut(|c| {
            if c.is_none() {
                *c = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
            }
            c.as_mut().expect("just made").compress(&raw)
        });
        match compressed {
            Ok(z) if z.len() < raw.len() => EncodedChunk {
                digest,
                encoding: ChunkEncoding::Zstd,
                size,
                data: z.into(),
            },
            _ => EncodedChunk {
                digest,
                encoding: ChunkEncoding::Raw,
                size,
                data: raw,
            },
        }
    }

    /// Decodes the chunk and checks it against its digest. The only way
    /// chunk bytes leave the store.
    pub fn decode(&self) -> Result<Bytes, BlobError> {
        let chunk = self.digest;
        if self.size > MAX_CHUNK_SIZE {
            return Err(BlobError::Corrupt {
                chunk,
                reason: "claims more than the largest chunk",
            });
        }
        let raw: Bytes = match self.encoding {
            ChunkEncoding::Raw => self.data.clone(),
            ChunkEncoding::Zstd => zstd::bulk::decompress(&self.data, self.size as usize)
                .map_err(|source| BlobError::Decompress { chunk, source })?
                .into(),
        };
        if raw.len() as u64 != self.size {
            return Err(BlobError::Corrupt {
                chunk,
                reason: "wrong length",
            });
        }
        if Digest::of(&raw) != chunk {
            return Err(BlobError::Corrupt {
                chunk,
                reason: "BLAKE3 mismatch",
            });
        }
        Ok(raw)
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

    /// The stored chunks, in the order asked. Must fail with
    /// [`BlobError::ChunkNotFound`] if any is unknown. Need not verify them:
    /// [`Blobs`] does, whatever the backend.
    async fn read_chunks(&self, chunks: &[Digest]) -> Result<Vec<EncodedChunk>, BlobError>;

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

    /// The backend.
    pub fn service(&self) -> &Arc<dyn BlobService> {
        &self.service
    }

    /// The chunk list of `blob`, or `None`.
    pub async fn stat(&self, blob: &Digest) -> Result<Option<BlobMeta>, BlobError> {
        self.service.stat(blob).await
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
    pub async fn read_chunks_verified(&self, chunks: &[Digest]) -> Result<Vec<Bytes>, BlobError> {
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
            hasher: blake3::Hasher::new(),
        }
    }
}

/// Reads a whole blob in order, a batch of chunks at a time, each chunk
/// verified, and checks at the end that the bytes hash to the blob's digest.
pub struct BlobReader {
    blobs: Blobs,
    blob: Digest,
    meta: BlobMeta,
    next: usize,
    ready: std::collections::VecDeque<Bytes>,
    hasher: blake3::Hasher,
}

impl BlobReader {
    /// The next chunk's bytes, or `None` after the last one.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, BlobError> {
        if self.ready.is_empty() {
            if self.next == self.meta.chunks.len() {
                let actual = Digest::from(self.hasher.finalize());
                if actual != self.blob {
                    return Err(BlobError::BlobMismatch {
                        expected: self.blob,
                        actual,
                    });
                }
                return Ok(None);
            }
            let end = (self.next + READ_BATCH_CHUNKS).min(self.meta.chunks.len());
            let digests: Vec<Digest> = self.meta.chunks[self.next..end]
                .iter()
                .map(|c| c.digest)
                .collect();
            self.ready
                .extend(self.blobs.read_chunks_verified(&digests).await?);
            self.next = end;
        }
        let chunk = self.ready.pop_front().expect("a batch is never empty");
        self.hasher.update(&chunk);
        Ok(Some(chunk))
    }
}

/// Streams one blob into the store: chunks, hashes, sends only the chunks
/// the backend lacks (compressed), and records the chunk list on `finish`.
///
/// Chunking happens as bytes arrive; each full batch is hashed, checked
/// against the backend, compressed and stored by a task of its own, with up
/// to [`MAX_BATCHES_IN_FLIGHT`] batches behind the one being filled, so the
/// hashing and compression of one batch overlap with the chunking of the
/// next and with the backend's round trips. Every batch on its way holds
/// its bytes of the [`IN_FLIGHT_BYTES`] budget shared by all writers of the
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
    use rand::RngExt;

    fn store() -> (Arc<MemoryBlobService>, Blobs) {
        let mem = Arc::new(MemoryBlobService::new());
        (mem.clone(), Blobs::new(mem, ChunkerParams::default()))
    }

    fn random(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rng().fill(&mut v[..]);
        v
    }

    async fn read_back(blobs: &Blobs, digest: Digest) -> Vec<u8> {
        let meta = blobs.stat(&digest).await.unwrap().unwrap();
        let mut r = blobs.reader(digest, meta);
        let mut out = Vec::new();
        while let Some(c) = r.next_chunk().await.unwrap() {
            out.extend_from_slice(&c);
        }
        out
    }

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
