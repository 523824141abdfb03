//! Conversions between the blob wire messages and the store's types, shared
//! by server and client. Directories convert through `TryFrom` in
//! [`crate::nodes`]; this covers digests, chunks and chunk lists.

use bytes::Bytes;

use crate::blobs::{BlobMeta, ChunkMeta, EncodedChunk, MAX_CHUNK_SIZE};
use crate::chunker::ChunkerParams;
use crate::digest::Digest;
use crate::proto;

/// A message that breaks the protocol: a digest of the wrong length, an
/// unknown enum value, too many items. The server answers it with
/// `INVALID_ARGUMENT`; a client treats it as a broken server.
#[derive(Debug, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct BadMessage {
    /// The message field at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl BadMessage {
    /// `field` of a message is invalid because of `reason`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        BadMessage {
            field,
            reason: reason.into(),
        }
    }
}

/// One digest field.
pub(crate) fn digest(field: &'static str, bytes: &Bytes) -> Result<Digest, BadMessage> {
    Digest::try_from(bytes).map_err(|e| BadMessage::new(field, e.to_string()))
}

/// A repeated digest field of at most `max` entries.
pub(crate) fn digests(
    field: &'static str,
    list: &[Bytes],
    max: usize,
) -> Result<Vec<Digest>, BadMessage> {
    if list.len() > max {
        return Err(BadMessage::new(
            field,
            format!("{} digests, at most {max} per request", list.len()),
        ));
    }
    list.iter().map(|d| digest(field, d)).collect()
}

/// Chunker parameters from the wire, checked as a store checks its own.
pub(crate) fn chunker_params_from_wire(
    p: proto::ChunkerParams,
) -> Result<ChunkerParams, BadMessage> {
    ChunkerParams {
        min: p.min_size,
        avg: p.avg_size,
        max: p.max_size,
    }
    .validate()
    .map_err(|e| BadMessage::new("params", e.to_string()))
}

/// Chunker parameters as sent.
pub(crate) fn chunker_params_to_wire(p: ChunkerParams) -> proto::ChunkerParams {
    proto::ChunkerParams {
        min_size: p.min,
        avg_size: p.avg,
        max_size: p.max,
    }
}

/// Digests as wire bytes.
pub(crate) fn digests_to_wire(list: &[Digest]) -> Vec<Bytes> {
    list.iter().map(|&d| d.into()).collect()
}

impl From<EncodedChunk> for proto::ChunkData {
    fn from(c: EncodedChunk) -> Self {
        proto::ChunkData {
            digest: c.digest.into(),
            encoding: c.encoding.into(),
            size: c.size,
            data: c.data,
        }
    }
}

impl TryFrom<proto::ChunkData> for EncodedChunk {
    type Error = BadMessage;

    /// Checks the framing only; whether the bytes match the digest is
    /// [`EncodedChunk::decode`]'s job.
    fn try_from(c: proto::ChunkData) -> Result<Self, Self::Error> {
        let encoding = proto::ChunkEncoding::try_from(c.encoding).map_err(|_| {
            BadMessage::new("chunk.encoding", format!("unknown value {}", c.encoding))
        })?;
        if c.size > MAX_CHUNK_SIZE {
            return Err(BadMessage::new(
                "chunk.size",
                format!("{} bytes, larger than any chunk", c.size),
            ));
        }
        Ok(EncodedChunk {
            digest: digest("chunk.digest", &c.digest)?,
            encoding,
            size: c.size,
            data: c.data,
        })
    }
}

/// A chunk list as wire messages.
pub(crate) fn chunk_list_to_wire(meta: &BlobMeta) -> Vec<proto::ChunkMeta> {
    meta.chunks
        .iter()
        .map(|c| proto::ChunkMeta {
            digest: c.digest.into(),
            size: c.size,
        })
        .collect()
}

/// A wire chunk list, checked like any other ([`BlobMeta::new`]).
pub(crate) fn chunk_list_from_wire(
    blob: Digest,
    size: u64,
    chunks: Vec<proto::ChunkMeta>,
) -> Result<BlobMeta, BadMessage> {
    let chunks = chunks
        .iter()
        .map(|c| {
            Ok(ChunkMeta {
                digest: digest("chunks.digest", &c.digest)?,
                size: c.size,
            })
        })
        .collect::<Result<Vec<_>, BadMessage>>()?;
    BlobMeta::new(blob, size, chunks).map_err(|e| BadMessage::new("chunks", e.to_string()))
}
