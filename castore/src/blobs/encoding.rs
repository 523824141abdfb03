//! How chunks and chunk lists are stored: a chunk's encoding
//! ([`EncodedChunk`]: zstd when that is smaller, else raw), its decoding
//! with the check against its BLAKE3, and the byte layout of a stored chunk
//! list.

use bytes::Bytes;

use super::{BlobError, BlobMeta, ChunkMeta, MAX_CHUNK_SIZE};
use crate::digest::{DIGEST_LEN, Digest};
use crate::proto::ChunkEncoding;

/// zstd level for chunks. Compressing chunks is the largest CPU cost of
/// an ingest; on 64 KiB blocks of a Rust toolchain NAR level 1 compresses
/// 1.52x as fast as level 3 (336 against 221 MB/s, one core) for 4.9 % more
/// bytes (2.47x against 2.59x), and decodes 4 % faster. See
/// docs/design.md, "Decisions and trade-offs".
const ZSTD_LEVEL: i32 = 1;

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

/// Decompresses a zstd frame of at most `capacity` bytes, with one
/// decompression context per thread: making one per call
/// (`zstd::bulk::decompress`) was 4 % of a mount's CPU in a cold walk of a
/// toolchain. For chunks, and for frames (`frames.rs`).
pub(crate) fn zstd_decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with_borrow_mut(|d| {
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut().expect("just made").decompress(data, capacity)
    })
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
        Self::encode_as(Digest::of(&raw), raw)
    }

    /// Encodes `raw` as the chunk `digest`, which is not checked: for bytes
    /// read back from a store, which whoever decodes them checks, as they
    /// check every chunk read.
    pub(crate) fn encode_as(digest: Digest, raw: Bytes) -> Self {
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
        let raw = self.clone().decode_unchecked()?;
        if Digest::of(&raw) != self.digest {
            return Err(BlobError::Corrupt {
                chunk: self.digest,
                reason: "BLAKE3 mismatch",
            });
        }
        Ok(raw)
    }

    /// Decodes the chunk without checking its digest: for a store that
    /// builds another chunk from these bytes, which is checked in turn
    /// (`chunk_record.rs`, patched records). Raw bytes are handed over,
    /// not shared, so the caller may write them in place.
    pub(crate) fn decode_unchecked(self) -> Result<Bytes, BlobError> {
        let chunk = self.digest;
        if self.size > MAX_CHUNK_SIZE {
            return Err(BlobError::Corrupt {
                chunk,
                reason: "claims more than the largest chunk",
            });
        }
        let raw: Bytes = match self.encoding {
            ChunkEncoding::Raw => self.data,
            ChunkEncoding::Zstd => zstd_decompress(&self.data, self.size as usize)
                .map_err(|source| BlobError::Decompress { chunk, source })?
                .into(),
        };
        if raw.len() as u64 != self.size {
            return Err(BlobError::Corrupt {
                chunk,
                reason: "wrong length",
            });
        }
        Ok(raw)
    }
}
