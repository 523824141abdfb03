//! Blob backend over gRPC: a client of a lazystore server's blob service.
//!
//! Chunks arrive as the server stores them (zstd stays compressed) and are
//! verified like any backend's, by [`Blobs`](super::Blobs) after they
//! arrive: the server is not trusted. Every call is retried on transient
//! failures (see [`RetryPolicy`](crate::RetryPolicy)); the writes are
//! idempotent, as the trait requires: storing a chunk or a chunk list twice
//! stores it once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use futures::stream;

use super::{BlobError, BlobMeta, BlobService, EncodedChunk, StoredSize};
use crate::chunker::ChunkerParams;
use crate::digest::Digest;
use crate::grpc::{
    AttemptError, BadMessage, Connection, InvalidUrl, MAX_MESSAGE_SIZE, MAX_MISSING_CHUNKS,
    MAX_READ_CHUNKS, MAX_STAT_BLOBS,
};
use crate::grpc::{AuthChannel, CallError, wire};
use crate::proto;
use crate::proto::blob_service_client::BlobServiceClient;
use crate::proto::put_request::{BlobRecord, Item};

/// A [`BlobService`] on a gRPC server.
#[derive(Clone, Debug)]
pub struct GrpcBlobService {
    connection: Connection,
    client: BlobServiceClient<AuthChannel>,
    /// The server answered `StatMany` with UNIMPLEMENTED: it predates it.
    no_stat_many: Arc<AtomicBool>,
}

impl GrpcBlobService {
    /// A client of the server at `url` (`grpc+http://HOST:PORT` or
    /// `grpc+unix:///PATH`), connected on first use, with the default
    /// retry policy. Must be called within a Tokio runtime.
    pub fn connect_lazy(url: &str) -> Result<Self, InvalidUrl> {
        Ok(Self::new(Connection::lazy(url)?))
    }

    /// A client over an existing connection (shared with other clients, or
    /// with another retry policy).
    pub fn new(connection: Connection) -> Self {
        let client = BlobServiceClient::new(connection.channel())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        GrpcBlobService {
            connection,
            client,
            no_stat_many: Arc::default(),
        }
    }

    /// The connection it uses.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    fn error(&self, e: CallError) -> BlobError {
        e.into_blob_error(self.connection.url())
    }

    /// Streams `want` into `out`, appending each chunk as it arrives so a
    /// retry can resume after the last one received.
    async fn read_batch(
        &self,
        want: &[Digest],
        out: &mut Vec<EncodedChunk>,
    ) -> Result<(), AttemptError> {
        let timeout = self.connection.attempt_timeout();
        let request = proto::ReadChunksRequest {
            digests: wire::digests_to_wire(want),
        };
        let mut client = self.client.clone();
        let mut stream = timeout
            .timed(client.read_chunks(request))
            .await?
            .into_inner();
        let mut received = 0;
        while let Some(chunk) = timeout.timed(stream.message()).await? {
            let Some(&asked) = want.get(received) else {
                return Err(BadMessage::new("stream", "more chunks than asked for").into());
            };
            let chunk = EncodedChunk::try_from(chunk)?;
            if chunk.digest != asked {
                return Err(BadMessage::new(
                    "chunk.digest",
                    format!("sent {} where {asked} was asked for", chunk.digest),
                )
                .into());
            }
            out.push(chunk);
            received += 1;
        }
        if received < want.len() {
            return Err(BadMessage::new(
                "stream",
                format!("{received} chunks, {} asked for", want.len()),
            )
            .into());
        }
        Ok(())
    }

    /// One `StatMany` call for `blobs` (at most [`MAX_STAT_BLOBS`]), its
    /// answers checked against what was asked.
    async fn stat_batch(&self, blobs: &[Digest]) -> Result<Vec<Option<BlobMeta>>, CallError> {
        let request = proto::StatManyRequest {
            digests: wire::digests_to_wire(blobs),
        };
        self.connection
            .call("StatMany", || {
                let mut client = self.client.clone();
                let request = request.clone();
                let timeout = self.connection.attempt_timeout();
                async move {
                    let mut stream = timeout.timed(client.stat_many(request)).await?.into_inner();
                    let mut metas = Vec::with_capacity(blobs.len());
                    while let Some(answer) = timeout.timed(stream.message()).await? {
                        let Some(&blob) = blobs.get(metas.len()) else {
                            return Err(BadMessage::new(
                                "stream",
                                "more chunk lists than asked for",
                            )
                            .into());
                        };
                        metas.push(match answer.unknown {
                            true => None,
                            false => Some(wire::chunk_list_from_wire(
                                blob,
                                answer.size,
                                answer.chunks,
                            )?),
                        });
                    }
                    if metas.len() < blobs.len() {
                        let got = metas.len();
                        let message = format!("{got} chunk lists, {} asked for", blobs.len());
                        return Err(BadMessage::new("stream", message).into());
                    }
                    Ok::<_, AttemptError>(metas)
                }
            })
            .await
    }

    /// Sends `items` as one `Put` call, retried as a whole.
    async fn put(
        &self,
        call: &'static str,
        items: Vec<proto::PutRequest>,
    ) -> Result<(), BlobError> {
        let bytes: usize = items
            .iter()
            .map(|i| match &i.item {
                Some(Item::Chunk(c)) => c.data.len(),
                _ => 0,
            })
            .sum();
        self.connection
            .call(call, || {
                let mut client = self.client.clone();
                let items = items.clone();
                let timeout = self.connection.attempt_timeout();
                async move {
                    timeout
                        .timed_upload(bytes, client.put(stream::iter(items)))
                        .await
                        .map_err(AttemptError::from)
                }
            })
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }
}

#[async_trait]
impl BlobService for GrpcBlobService {
    /// The server's, asked with `ChunkerParams`. A server too old to know
    /// the call records none as far as its clients can tell: `None`.
    async fn chunker_params(&self) -> Result<Option<ChunkerParams>, BlobError> {
        let answer = self
            .connection
            .call("ChunkerParams", || {
                let mut client = self.client.clone();
                let timeout = self.connection.attempt_timeout();
                async move {
                    let answer = timeout
                        .timed(client.chunker_params(proto::ChunkerParamsRequest {}))
                        .await?;
                    Ok::<_, AttemptError>(answer.into_inner().params)
                }
            })
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) if e.code() == Some(tonic::Code::Unimplemented) => return Ok(None),
            Err(e) => return Err(self.error(e)),
        };
        answer
            .map(wire::chunker_params_from_wire)
            .transpose()
            .map_err(|b| self.error(CallError::bad_reply("ChunkerParams", b)))
    }

    async fn stat(&self, blob: &Digest) -> Result<Option<BlobMeta>, BlobError> {
        let request = proto::StatBlobRequest {
            digest: (*blob).into(),
        };
        let answer = self
            .connection
            .call("Stat", || {
                let mut client = self.client.clone();
                let request = request.clone();
                let timeout = self.connection.attempt_timeout();
                async move {
                    let answer = timeout.timed(client.stat(request)).await?.into_inner();
                    Ok(wire::chunk_list_from_wire(
                        *blob,
                        answer.size,
                        answer.chunks,
                    )?)
                }
            })
            .await;
        match answer.map_err(|e| self.error(e)) {
            Ok(meta) => Ok(Some(meta)),
            Err(BlobError::BlobNotFound(d)) if d == *blob => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `StatMany`, [`MAX_STAT_BLOBS`] to a call: one round trip for a
    /// batch instead of one per blob. A single blob is asked with `Stat`
    /// (a unary call is the cheaper), and so is every blob of a server from
    /// before `StatMany`, once it has said so.
    async fn stat_many(&self, blobs: &[Digest]) -> Result<Vec<Option<BlobMeta>>, BlobError> {
        if blobs.len() == 1 || self.no_stat_many.load(Ordering::Relaxed) {
            return super::stat_each(self, blobs).await;
        }
        let mut metas = Vec::with_capacity(blobs.len());
        for batch in blobs.chunks(MAX_STAT_BLOBS) {
            match self.stat_batch(batch).await {
                Ok(answer) => metas.extend(answer),
                Err(e) if e.code() == Some(tonic::Code::Unimplemented) => {
                    self.no_stat_many.store(true, Ordering::Relaxed);
                    metas.extend(super::stat_each(self, batch).await?);
                }
                Err(e) => return Err(self.error(e)),
            }
        }
        Ok(metas)
    }

    async fn read_chunks(&self, chunks: &[Digest]) -> Result<Vec<EncodedChunk>, BlobError> {
        let mut out = Vec::with_capacity(chunks.len());
        for batch in chunks.chunks(MAX_READ_CHUNKS) {
            let start = out.len();
            let mut retry = self.connection.retry("ReadChunks");
            loop {
                let done = out.len() - start;
                match self.read_batch(&batch[done..], &mut out).await {
                    Ok(()) => {
                        retry.succeeded();
                        break;
                    }
                    Err(e) => retry.failed(e).await.map_err(|e| self.error(e))?,
                }
            }
        }
        Ok(out)
    }

    /// `StoredSizes`; a server before the call is asked for the chunks
    /// themselves, whose lengths as sent are what it stores unless it keeps
    /// frames (which only servers with the call do).
    async fn stored_sizes(&self, chunks: &[Digest]) -> Result<Vec<StoredSize>, BlobError> {
        let mut sizes = Vec::with_capacity(chunks.len());
        for batch in chunks.chunks(MAX_MISSING_CHUNKS) {
            let request = proto::StoredSizesRequest {
                digests: wire::digests_to_wire(batch),
            };
            let answer = self
                .connection
                .call("StoredSizes", || {
                    let mut client = self.client.clone();
                    let request = request.clone();
                    let timeout = self.connection.attempt_timeout();
                    async move {
                        let answer = timeout.timed(client.stored_sizes(request)).await?;
                        Ok::<_, AttemptError>(answer.into_inner())
                    }
                })
                .await;
            let answer = match answer {
                Ok(answer) => answer,
                Err(e) if e.code() == Some(tonic::Code::Unimplemented) => {
                    let read = self.read_chunks(batch).await?;
                    proto::StoredSizesResponse {
                        sizes: read.iter().map(|c| c.data.len() as u64).collect(),
                        bases: Vec::new(),
                    }
                }
                Err(e) => return Err(self.error(e)),
            };
            let answer = wire::stored_sizes_from_wire(batch.len(), answer)
                .map_err(|e| self.error(CallError::bad_reply("StoredSizes", e)))?;
            sizes.extend(answer);
        }
        Ok(sizes)
    }

    async fn missing_chunks(&self, chunks: &[Digest]) -> Result<Vec<Digest>, BlobError> {
        let mut missing = Vec::new();
        for batch in chunks.chunks(MAX_MISSING_CHUNKS) {
            let request = proto::MissingChunksRequest {
                digests: wire::digests_to_wire(batch),
            };
            let answer = self
                .connection
                .call("MissingChunks", || {
                    let mut client = self.client.clone();
                    let request = request.clone();
                    let timeout = self.connection.attempt_timeout();
                    async move {
                        let answer = timeout.timed(client.missing_chunks(request)).await?;
                        Ok::<_, AttemptError>(answer.into_inner().digests)
                    }
                })
                .await
                .map_err(|e| self.error(e))?;
            let answer = wire::digests("digests", &answer, batch.len())
                .map_err(|b| self.error(CallError::bad_reply("MissingChunks", b)))?;
            missing.extend(answer);
        }
        Ok(missing)
    }

    /// `ReportCorrupt`: the server checks its copies and quarantines the
    /// bad ones. A server before the call quarantines nothing.
    async fn quarantine(&self, chunks: &[Digest]) -> Result<Vec<Digest>, BlobError> {
        let request = proto::ReportCorruptRequest {
            digests: wire::digests_to_wire(chunks),
        };
        let answer = self
            .connection
            .call("ReportCorrupt", || {
                let mut client = self.client.clone();
                let request = request.clone();
                let timeout = self.connection.attempt_timeout();
                async move {
                    let answer = timeout.timed(client.report_corrupt(request)).await?;
                    Ok::<_, AttemptError>(answer.into_inner().quarantined)
                }
            })
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) if e.code() == Some(tonic::Code::Unimplemented) => return Ok(Vec::new()),
            Err(e) => return Err(self.error(e)),
        };
        wire::digests("quarantined", &answer, chunks.len())
            .map_err(|b| self.error(CallError::bad_reply("ReportCorrupt", b)))
    }

    /// `Quarantined`; a server before the call counts none.
    async fn quarantined(&self) -> Result<u64, BlobError> {
        let answer = self
            .connection
            .call("Quarantined", || {
                let mut client = self.client.clone();
                let timeout = self.connection.attempt_timeout();
                async move {
                    let answer = timeout
                        .timed(client.quarantined(proto::QuarantinedRequest {}))
                        .await?;
                    Ok::<_, AttemptError>(answer.into_inner().chunks)
                }
            })
            .await;
        match answer {
            Ok(n) => Ok(n),
            Err(e) if e.code() == Some(tonic::Code::Unimplemented) => Ok(0),
            Err(e) => Err(self.error(e)),
        }
    }

    /// One `Put` stream of chunks. Idempotent, so retried like a read.
    async fn put_chunks(&self, chunks: Vec<EncodedChunk>) -> Result<(), BlobError> {
        if chunks.is_empty() {
            return Ok(());
        }
        let items = chunks
            .into_iter()
            .map(|c| proto::PutRequest {
                item: Some(Item::Chunk(c.into())),
            })
            .collect();
        self.put("Put", items).await
    }

    /// One `Put` with the chunk list. Idempotent, so retried like a read.
    async fn put_blob(&self, blob: Digest, meta: BlobMeta) -> Result<(), BlobError> {
        let record = BlobRecord {
            digest: blob.into(),
            size: meta.size,
            chunks: wire::chunk_list_to_wire(&meta),
        };
        let item = proto::PutRequest {
            item: Some(Item::Blob(record)),
        };
        self.put("Put", vec![item]).await
    }

    fn uploads_travel(&self) -> bool {
        true
    }
}
