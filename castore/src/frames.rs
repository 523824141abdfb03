//! Frames: a redb store's chunks compressed together at rest.
//!
//! Chunks are compressed one by one as they are imported (zstd level 1,
//! `blobs/encoding.rs`), so every chunk can be read, sent and cached on its
//! own. That loses the context a whole-NAR stream has: measured on the
//! builder benchmark's real Nix-built paths, deduplicated chunks compressed
//! one by one take 1.41 × (a 303 MB Python install) and 1.44 × (a 1.3 GB
//! Rust toolchain) the bytes of the same path's zstd NAR from `nix copy`.
//! Neither a higher level per chunk (level 19: 1.19 × on Python, at 4 MB/s)
//! nor a trained dictionary (512 KiB, level 9: 1.18 ×) nor compressing each
//! chunk against the chunks before it (level 3: 1.11 ×) reaches 1.0 ×:
//! what the stream wins is mostly across chunks (`.pyc` files and their
//! `opt-1`/`opt-2` twins, one library's sections). Consecutive chunks in
//! NAR order compressed together as one zstd frame of about 1 MiB do reach
//! it: at level 6, 0.97 × on Python and 0.91 × on the toolchain, decoding
//! at 1.4–1.5 GB/s on one core (figures and the command in
//! `docs/design.md`, "Frames").
//!
//! So a store is compacted after import (`compaction.rs`, `lazystore
//! compact`): the chunks of every published path, in NAR order, are
//! gathered into frames of about 1 MiB, and each chunk's index record moved
//! to its frame (`chunk_record.rs`, record encoding 2: the frame's place
//! and the chunk's offset in it). This file reads them.
//!
//! A chunk in a frame leaves the store on its own and decoded (raw): the
//! wire, the local cache and every check downstream see a chunk as
//! before. Decoded rather than compressed again for the wire because that
//! compression (zstd 1, about 350 MB/s per core) was the whole cost of
//! reading a compacted store: a cold `nix hash path` through `serve` took
//! 1.12 × (toolchain) and 1.23 × (Python) as long as from the store as
//! imported, and 1.01 × and 0.98 × once framed chunks went out raw (the
//! reader then has nothing to decompress either). What that trades: on the
//! wire a compacted chunk is its decoded size, about 3 × what it was;
//! fine inside a data centre, not on a slow link (docs/design.md,
//! "Frames").
//!
//! What a frame costs a reader of one chunk: the frame's bytes (about a
//! quarter of a MiB) and its decoding (under a millisecond) instead of one
//! chunk's. Readers in NAR order (a walk, a stream, a directory window)
//! read a frame's chunks one after another, so the last [`CACHED_FRAMES`]
//! decoded frames are kept.
//!
//! Verification is unchanged: the bytes cut from a frame go out under the
//! digest the index names, and whoever decodes them checks their BLAKE3 (as
//! for every chunk read).

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;

use crate::blobs::{BlobError, EncodedChunk, zstd_decompress};
use crate::chunk_record::{InFrame, IndexRecord};
use crate::digest::Digest;
use crate::packs::{Location, Packs};
use crate::proto::ChunkEncoding;
use crate::redb_store::RedbStore;

/// Decoded frames a store keeps for readers in NAR order.
const CACHED_FRAMES: usize = 8;

/// The last few decoded frames, by where they are.
#[derive(Debug, Default)]
pub(crate) struct FrameCache {
    frames: Mutex<VecDeque<(Location, Bytes)>>,
}

impl FrameCache {
    /// The decoded frame at `at`, `frame_len` bytes long.
    fn get(&self, packs: &Packs, at: Location, frame_len: u32) -> Result<Bytes, FrameError> {
        let lock = || self.frames.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, frame)) = lock().iter().find(|(l, _)| *l == at) {
            return Ok(frame.clone());
        }
        let data = packs.read(at).map_err(FrameError::Read)?;
        let decoded = zstd_decompress(&data, frame_len as usize).map_err(FrameError::Decompress)?;
        if decoded.len() != frame_len as usize {
            return Err(FrameError::Length);
        }
        let frame = Bytes::from(decoded);
        let mut frames = lock();
        if frames.len() == CACHED_FRAMES {
            frames.pop_front();
        }
        frames.push_back((at, frame.clone()));
        Ok(frame)
    }
}

enum FrameError {
    Read(std::io::Error),
    Decompress(std::io::Error),
    Length,
}

/// The chunk `digest` that `record` places in a frame, raw (its bytes are
/// checked by whoever decodes it).
pub(crate) fn read_framed(
    store: &RedbStore,
    digest: Digest,
    record: &IndexRecord,
    in_frame: InFrame,
) -> Result<EncodedChunk, BlobError> {
    let frame = store
        .frames()
        .get(store.packs(), record.at, in_frame.frame_len)
        .map_err(|e| match e {
            FrameError::Read(e) => BlobError::Backend(Box::new(e)),
            FrameError::Decompress(source) => BlobError::Decompress {
                chunk: digest,
                source,
            },
            FrameError::Length => BlobError::Corrupt {
                chunk: digest,
                reason: "its frame decodes to the wrong length",
            },
        })?;
    // `IndexRecord::from_bytes` refused a chunk past its frame's end.
    let start = in_frame.offset as usize;
    // A copy, not a view (`Bytes::slice`): a chunk kept in a reader's
    // memory cache would keep its whole frame alive.
    let raw = Bytes::copy_from_slice(&frame[start..start + record.size as usize]);
    Ok(EncodedChunk {
        digest,
        encoding: ChunkEncoding::Raw,
        size: record.size,
        data: raw,
    })
}
