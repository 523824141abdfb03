//! Conversions between the blob wire messages and the store's types, shared
//! by server and client. Directories convert through `TryFrom` in
//! [`crate::nodes`]; this covers digests, chunks and chunk lists.

use bytes::Bytes;

use crate::blobs::{BlobMeta, ChunkMeta, EncodedChunk, MAX_CHUNK_SIZE, StoredSize};
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

/// A known blob's answer to `Stat` and `StatMany`.
pub(crate) fn stat_to_wire(meta: &BlobMeta) -> proto::StatBlobResponse {
    proto::StatBlobResponse {
        size: meta.size,
        chunks: chunk_list_to_wire(meta),
        unknown: false,
    }
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

/// A `StoredSizes` answer: bases only where a chunk has one, and an empty
/// list when none has (what a server from before bases sends too).
pub(crate) fn stored_sizes_to_wire(stored: &[StoredSize]) -> proto::StoredSizesResponse {
    let bases = if stored.iter().any(|s| s.base.is_some()) {
        stored
            .iter()
            .map(|s| s.base.map(Into::into).unwrap_or_default())
            .collect()
    } else {
        Vec::new()
    };
    proto::StoredSizesResponse {
        sizes: stored.iter().map(|s| s.bytes).collect(),
        bases,
    }
}

/// A `StoredSizes` answer to a request for `asked` chunks, checked: one
/// size per chunk, and either no bases or one (possibly empty) per chunk,
/// each a digest.
pub(crate) fn stored_sizes_from_wire(
    asked: usize,
    answer: proto::StoredSizesResponse,
) -> Result<Vec<StoredSize>, BadMessage> {
    if answer.sizes.len() != asked {
        return Err(BadMessage::new("sizes", "one size per chunk asked"));
    }
    let bases = if answer.bases.is_empty() {
        vec![None; asked]
    } else if answer.bases.len() != asked {
        return Err(BadMessage::new(
            "bases",
            "one (or an empty) base per chunk asked",
        ));
    } else {
        answer
            .bases
            .iter()
            .map(|b| (!b.is_empty()).then(|| digest("bases", b)).transpose())
            .collect::<Result<Vec<_>, _>>()?
    };
    Ok(answer
        .sizes
        .into_iter()
        .zip(bases)
        .map(|(bytes, base)| StoredSize { bytes, base })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_sizes_round_trip_and_bad_answers_are_refused() {
        let base = Digest::of(b"base");
        let sizes = vec![
            StoredSize {
                bytes: 149,
                base: Some(base),
            },
            StoredSize {
                bytes: 4096,
                base: None,
            },
        ];
        let wire = stored_sizes_to_wire(&sizes);
        assert_eq!(wire.bases.len(), 2);
        assert_eq!(stored_sizes_from_wire(2, wire.clone()).unwrap(), sizes);
        // No base anywhere: no list, read as none.
        let plain = stored_sizes_to_wire(&sizes[1..]);
        assert!(plain.bases.is_empty());
        assert_eq!(
            stored_sizes_from_wire(1, plain).unwrap(),
            sizes[1..].to_vec()
        );

        // Too few sizes, too few bases, a base that is not a digest.
        let err = stored_sizes_from_wire(3, wire.clone()).unwrap_err();
        assert_eq!(err.field, "sizes");
        let mut short = wire.clone();
        short.bases.pop();
        assert_eq!(stored_sizes_from_wire(2, short).unwrap_err().field, "bases");
        let mut bad = wire;
        bad.bases[0] = Bytes::from_static(b"not a digest");
        assert_eq!(stored_sizes_from_wire(2, bad).unwrap_err().field, "bases");
    }
}
