//! [`BlobServer`]: the gRPC blob service over any [`BlobService`] backend.
//!
//! Chunks go out as stored (zstd stays compressed on the wire; the reader
//! decodes and verifies them), except that with
//! [`BlobServer::with_compressed_wire`] raw chunks (those a store keeps in
//! frames, `frames.rs`, leave it raw) are compressed for the wire. Chunks
//! coming in are decoded and checked against their digest before they are
//! stored, so a client can never plant bytes under the wrong name.
//!
//! One `Put` may upload at most its server's upload limit: a client that
//! sends more gets `RESOURCE_EXHAUSTED`, and the chunk that passed the
//! limit, and those waiting with it for the next batch, are not stored.

use std::sync::Arc;

use futures::stream::{self, BoxStream, StreamExt};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use super::wire::{self, BadMessage};
use super::{MAX_MESSAGE_SIZE, MAX_MISSING_CHUNKS, MAX_READ_CHUNKS, MAX_STAT_BLOBS};
use crate::blobs::{BlobError, BlobService, EncodedChunk, STAT_BATCH, stat_many_checked};
use crate::digest::Digest;
use crate::proto;
use crate::proto::ChunkEncoding;
use crate::proto::blob_service_server::{self, BlobServiceServer};
use crate::proto::put_request::Item;

/// Chunks read from the backend at a time while answering `ReadChunks`; one
/// batch is read ahead while the previous one is sent.
const READ_BATCH_CHUNKS: usize = 16;

/// Encoded bytes of uploaded chunks gathered before they are verified and
/// stored together; one batch is verified and stored while the next arrives.
const PUT_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// The blob service, answering gRPC calls from a backend.
#[derive(Clone)]
pub struct BlobServer {
    blobs: Arc<dyn BlobService>,
    max_upload_size: u64,
    compress_raw: bool,
}

/// A `Put` that went past the server's upload limit; sent as
/// `RESOURCE_EXHAUSTED`.
#[derive(Debug, thiserror::Error)]
#[error(
    "upload too large: {what} {size} bytes, over this server's limit of {limit} bytes (lazystore \
     serve --max-upload-size)"
)]
pub struct UploadTooLarge {
    /// What is too large: the chunks of the call, or the blob recorded.
    pub what: &'static str,
    /// Its size, in bytes (for chunks, as far as the server counted).
    pub size: u64,
    /// The limit.
    pub limit: u64,
}

impl BlobServer {
    /// The service's gRPC name, as health reports it.
    pub const NAME: &'static str = <BlobServiceServer<BlobServer> as NamedService>::NAME;

    /// Serves `blobs`, without an upload limit.
    pub fn new(blobs: Arc<dyn BlobService>) -> Self {
        BlobServer {
            blobs,
            max_upload_size: u64::MAX,
            compress_raw: false,
        }
    }

    /// Compresses every raw chunk it sends (zstd 1, where that is smaller):
    /// for links slower than that compression (about 350 MB/s per core),
    /// reading a compacted store, whose chunks in frames leave it raw.
    pub fn with_compressed_wire(mut self, on: bool) -> Self {
        self.compress_raw = on;
        self
    }

    /// Refuses a `Put` whose chunks add up to more than `bytes` (encoded,
    /// as sent) or that records a blob larger than `bytes`.
    pub fn with_max_upload_size(mut self, bytes: u64) -> Self {
        self.max_upload_size = bytes;
        self
    }

    /// The tonic service, with message limits of [`MAX_MESSAGE_SIZE`].
    pub fn into_service(self) -> BlobServiceServer<Self> {
        BlobServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }

    /// Verifies `chunks` on a blocking thread (decompressing and hashing is
    /// CPU work) and stores them.
    async fn store_chunks(
        blobs: Arc<dyn BlobService>,
        chunks: Vec<EncodedChunk>,
    ) -> Result<u64, BlobError> {
        let chunks = tokio::task::spawn_blocking(move || {
            for c in &chunks {
                c.decode()?;
            }
            Ok::<_, BlobError>(chunks)
        })
        .await
        .map_err(|e| BlobError::Internal(e.into()))??;
        let n = chunks.len() as u64;
        blobs.put_chunks(chunks).await?;
        Ok(n)
    }
}

/// An upload in progress: chunks gathered for the next batch, and the batch
/// being verified and stored.
struct Upload {
    blobs: Arc<dyn BlobService>,
    pending: Vec<EncodedChunk>,
    pending_bytes: usize,
    storing: Option<tokio::task::JoinHandle<Result<u64, BlobError>>>,
    chunks_stored: u64,
}

impl Upload {
    async fn add(&mut self, chunk: EncodedChunk) -> Result<(), Status> {
        self.pending_bytes += chunk.data.len();
        self.pending.push(chunk);
        if self.pending_bytes >= PUT_BATCH_BYTES {
            self.start_batch().await?;
        }
        Ok(())
    }

    /// Waits for the batch being stored, then starts storing the pending one.
    async fn start_batch(&mut self) -> Result<(), Status> {
        self.wait().await?;
        let batch = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        if !batch.is_empty() {
            let blobs = self.blobs.clone();
            // A task, so receiving the next batch overlaps with this one. If
            // the client goes away it still finishes: storing verified
            // chunks is harmless.
            self.storing = Some(tokio::spawn(BlobServer::store_chunks(blobs, batch)));
        }
        Ok(())
    }

    async fn wait(&mut self) -> Result<(), Status> {
        if let Some(task) = self.storing.take() {
            self.chunks_stored += task.await.map_err(|e| BlobError::Internal(e.into()))??;
        }
        Ok(())
    }

    /// Stores everything received so far.
    async fn flush(&mut self) -> Result<(), Status> {
        self.start_batch().await?;
        self.wait().await
    }
}

#[tonic::async_trait]
impl blob_service_server::BlobService for BlobServer {
    async fn chunker_params(
        &self,
        _request: Request<proto::ChunkerParamsRequest>,
    ) -> Result<Response<proto::ChunkerParamsResponse>, Status> {
        let params = self.blobs.chunker_params().await?;
        Ok(Response::new(proto::ChunkerParamsResponse {
            params: params.map(wire::chunker_params_to_wire),
        }))
    }

    async fn stat(
        &self,
        request: Request<proto::StatBlobRequest>,
    ) -> Result<Response<proto::StatBlobResponse>, Status> {
        let blob = wire::digest("digest", &request.get_ref().digest)?;
        let meta = self
            .blobs
            .stat(&blob)
            .await?
            .ok_or(BlobError::BlobNotFound(blob))?;
        Ok(Response::new(wire::stat_to_wire(&meta)))
    }

    type StatManyStream = BoxStream<'static, Result<proto::StatBlobResponse, Status>>;

    /// Asks the backend [`STAT_BATCH`] blobs at a time, so an object store
    /// reads the lists of a pack once.
    async fn stat_many(
        &self,
        request: Request<proto::StatManyRequest>,
    ) -> Result<Response<Self::StatManyStream>, Status> {
        let digests = wire::digests("digests", &request.get_ref().digests, MAX_STAT_BLOBS)?;
        let blobs = self.blobs.clone();
        let stream = answer_in_batches(digests, STAT_BATCH, move |batch| {
            let blobs = blobs.clone();
            async move {
                let metas = stat_many_checked(&*blobs, &batch).await?;
                Ok(metas
                    .into_iter()
                    .map(|meta| match meta {
                        Some(meta) => wire::stat_to_wire(&meta),
                        None => proto::StatBlobResponse {
                            unknown: true,
                            ..Default::default()
                        },
                    })
                    .collect())
            }
        });
        Ok(Response::new(stream))
    }

    type ReadChunksStream = BoxStream<'static, Result<proto::ChunkData, Status>>;

    async fn read_chunks(
        &self,
        request: Request<proto::ReadChunksRequest>,
    ) -> Result<Response<Self::ReadChunksStream>, Status> {
        let digests = wire::digests("digests", &request.get_ref().digests, MAX_READ_CHUNKS)?;
        let (blobs, compress_raw) = (self.blobs.clone(), self.compress_raw);
        let stream = answer_in_batches(digests, READ_BATCH_CHUNKS, move |batch| {
            let blobs = blobs.clone();
            async move {
                let chunks = blobs.read_chunks(&batch).await?;
                if !compress_raw || chunks.iter().all(|c| c.encoding != ChunkEncoding::Raw) {
                    return Ok(chunks.into_iter().map(Into::into).collect());
                }
                tokio::task::spawn_blocking(move || {
                    chunks
                        .into_iter()
                        .map(|c| match c.encoding {
                            ChunkEncoding::Raw => EncodedChunk::encode_as(c.digest, c.data),
                            _ => c,
                        })
                        .map(Into::into)
                        .collect()
                })
                .await
                .map_err(|e| BlobError::Internal(e.into()))
            }
        });
        Ok(Response::new(stream))
    }

    async fn stored_sizes(
        &self,
        request: Request<proto::StoredSizesRequest>,
    ) -> Result<Response<proto::StoredSizesResponse>, Status> {
        let digests = wire::digests("digests", &request.get_ref().digests, MAX_MISSING_CHUNKS)?;
        let stored = self.blobs.stored_sizes(&digests).await?;
        Ok(Response::new(wire::stored_sizes_to_wire(&stored)))
    }

    async fn missing_chunks(
        &self,
        request: Request<proto::MissingChunksRequest>,
    ) -> Result<Response<proto::MissingChunksResponse>, Status> {
        let digests = wire::digests("digests", &request.get_ref().digests, MAX_MISSING_CHUNKS)?;
        let missing = self.blobs.missing_chunks(&digests).await?;
        Ok(Response::new(proto::MissingChunksResponse {
            digests: wire::digests_to_wire(&missing),
        }))
    }

    async fn report_corrupt(
        &self,
        request: Request<proto::ReportCorruptRequest>,
    ) -> Result<Response<proto::ReportCorruptResponse>, Status> {
        let digests = wire::digests("digests", &request.get_ref().digests, MAX_READ_CHUNKS)?;
        let quarantined = self.blobs.quarantine(&digests).await?;
        for chunk in &quarantined {
            tracing::error!(
                %chunk,
                "chunk {chunk} reported corrupt by a client and failed this store's check too; \
                 quarantined until a path holding it is uploaded again"
            );
        }
        Ok(Response::new(proto::ReportCorruptResponse {
            quarantined: wire::digests_to_wire(&quarantined),
        }))
    }

    async fn quarantined(
        &self,
        _request: Request<proto::QuarantinedRequest>,
    ) -> Result<Response<proto::QuarantinedResponse>, Status> {
        let chunks = self.blobs.quarantined().await?;
        Ok(Response::new(proto::QuarantinedResponse { chunks }))
    }

    async fn put(
        &self,
        request: Request<Streaming<proto::PutRequest>>,
    ) -> Result<Response<proto::PutResponse>, Status> {
        let mut stream = request.into_inner();
        let mut upload = Upload {
            blobs: self.blobs.clone(),
            pending: Vec::new(),
            pending_bytes: 0,
            storing: None,
            chunks_stored: 0,
        };
        let mut blobs_stored = 0;
        let limit = self.max_upload_size;
        let mut received: u64 = 0;
        while let Some(message) = stream.message().await? {
            match message.item {
                Some(Item::Chunk(chunk)) => {
                    // Counted before the chunk joins a batch, so the one
                    // that passes the limit (and its batch) is not stored.
                    received = received.saturating_add(chunk.data.len() as u64);
                    if received > limit {
                        return Err(UploadTooLarge {
                            what: "the chunks of this call add up to at least",
                            size: received,
                            limit,
                        }
                        .into());
                    }
                    upload.add(EncodedChunk::try_from(chunk)?).await?
                }
                Some(Item::Blob(record)) => {
                    if record.size > limit {
                        return Err(UploadTooLarge {
                            what: "the blob recorded is",
                            size: record.size,
                            limit,
                        }
                        .into());
                    }
                    // A chunk list may name any chunk sent before it.
                    upload.flush().await?;
                    let blob = wire::digest("blob.digest", &record.digest)?;
                    let meta = wire::chunk_list_from_wire(blob, record.size, record.chunks)?;
                    self.blobs.put_blob(blob, meta).await?;
                    blobs_stored += 1;
                }
                None => return Err(BadMessage::new("item", "empty PutRequest").into()),
            }
        }
        upload.flush().await?;
        Ok(Response::new(proto::PutResponse {
            chunks_stored: upload.chunks_stored,
            blobs_stored,
        }))
    }
}

/// A streamed answer to a request for `digests`: `batch` of them at a
/// time through `answer`, the next batch asked of the backend while one is
/// sent; the items in order, and the first error ends the stream.
fn answer_in_batches<T, F, Fut>(
    digests: Vec<Digest>,
    batch: usize,
    answer: F,
) -> BoxStream<'static, Result<T, Status>>
where
    T: Send + 'static,
    F: FnMut(Vec<Digest>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Vec<T>, BlobError>> + Send + 'static,
{
    let batches: Vec<Vec<Digest>> = digests.chunks(batch).map(<[_]>::to_vec).collect();
    let mut failed = false;
    stream::iter(batches)
        .map(answer)
        .buffered(2)
        .flat_map(|batch| match batch {
            Ok(items) => stream::iter(items.into_iter().map(Ok)).left_stream(),
            Err(e) => stream::once(async { Err(Status::from(e)) }).right_stream(),
        })
        // The first error ends the stream.
        .take_while(move |item| {
            let go = !failed;
            failed |= item.is_err();
            std::future::ready(go)
        })
        .boxed()
}
