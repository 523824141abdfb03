//! Lookups in the cache file, each record verified before it is handed
//! out: a chunk decoded and checked against its BLAKE3, a chunk list
//! against its checksum, a directory against its digest. What fails is
//! [`Damaged`], for the caller to drop and fetch again.

use std::sync::Arc;

use bytes::Bytes;
use redb::{ReadOnlyTable, ReadableDatabase};

use super::CacheStore;
use super::layout::{BLOB_SIZE_AT, BLOBS, CHUNKS, DIRECTORIES, Key, Kind, blob_checksum};
use super::queue::{Queued, WriteQueue};
use crate::blobs::{BlobMeta, EncodedChunk, decode_chunk_list};
use crate::chunk_record::IndexRecord;
use crate::digest::Digest;
use crate::nodes::Directory;
use crate::packs::Packs;
use crate::proto::ChunkEncoding;
use crate::redb_store::DigestKey;

/// A cached record that fails its check: never handed out.
#[derive(Debug, thiserror::Error)]
#[error("cached {key_kind} {digest} is damaged")]
pub(crate) struct Damaged {
    key_kind: Kind,
    digest: Digest,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl Damaged {
    fn new(key: Key, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Damaged {
            key_kind: key.kind,
            digest: key.digest,
            source: source.into(),
        }
    }

    /// The record, to drop.
    pub fn key(&self) -> Key {
        Key {
            kind: self.key_kind,
            digest: self.digest,
        }
    }
}

/// A lookup in the cache file.
#[derive(Debug)]
pub(crate) enum Local<T> {
    /// Present and verified.
    Hit(T),
    /// Not cached.
    Miss,
    /// Present, but failed its check.
    Damaged(Damaged),
}

/// A damaged chunk list record.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadRecord(&'static str);

fn decode_blob(blob: Digest, record: &[u8]) -> Result<BlobMeta, Damaged> {
    let key = Key::blob(blob);
    let (checksum, rest) = record
        .split_at_checked(BLOB_SIZE_AT)
        .ok_or_else(|| Damaged::new(key, BadRecord("record is truncated")))?;
    if blob_checksum(blob, rest).as_bytes()[..] != checksum[..] {
        return Err(Damaged::new(key, BadRecord("checksum mismatch")));
    }
    let (size, chunks) = decode_chunk_list(rest).map_err(|r| Damaged::new(key, BadRecord(r)))?;
    BlobMeta::new(blob, size, chunks).map_err(|e| Damaged::new(key, e))
}

/// Reads the chunk an index record names, as stored. Any failure (a bad
/// record, a pack gone or short) is damage: drop it and fetch it again.
pub(super) fn parse_chunk(
    packs: &Packs,
    digest: Digest,
    record: &[u8],
) -> Result<EncodedChunk, Damaged> {
    let key = Key::chunk(digest);
    let record =
        IndexRecord::from_bytes(record).map_err(|reason| Damaged::new(key, BadRecord(reason)))?;
    if record.frame.is_some() {
        // The cache keeps every chunk on its own.
        return Err(Damaged::new(
            key,
            BadRecord("a frame record in the local cache"),
        ));
    }
    let data = packs.read(record.at).map_err(|e| Damaged::new(key, e))?;
    Ok(EncodedChunk {
        digest,
        encoding: record.encoding,
        size: record.size,
        data: Bytes::from(data),
    })
}

/// Reads and verifies a chunk; the result is the chunk's bytes, as a raw
/// [`EncodedChunk`].
fn decode_chunk(packs: &Packs, digest: Digest, record: &[u8]) -> Result<EncodedChunk, Damaged> {
    let stored = parse_chunk(packs, digest, record)?;
    let raw = stored
        .decode()
        .map_err(|e| Damaged::new(Key::chunk(digest), e))?;
    Ok(EncodedChunk {
        encoding: ChunkEncoding::Raw,
        data: raw,
        ..stored
    })
}

/// One snapshot of the cache file, and the records queued for it
/// (`queue.rs`), for lookups. Every record it returns has been verified:
/// a queued one was before it was queued, and is checked again here all
/// the same, as cheap insurance.
pub(crate) struct LocalRead {
    queue: Arc<WriteQueue>,
    packs: Arc<Packs>,
    chunks: ReadOnlyTable<DigestKey, &'static [u8]>,
    blobs: ReadOnlyTable<DigestKey, &'static [u8]>,
    directories: ReadOnlyTable<DigestKey, &'static [u8]>,
}

impl LocalRead {
    /// The chunk's decoded bytes, checked against its digest, as a raw
    /// [`EncodedChunk`].
    pub fn chunk(&self, digest: &Digest) -> Result<Local<EncodedChunk>, redb::Error> {
        if let Some(Queued::Chunk(c)) = self.queue.find(&Key::chunk(*digest)) {
            return Ok(match c.decode() {
                Ok(data) => Local::Hit(EncodedChunk {
                    encoding: ChunkEncoding::Raw,
                    data,
                    ..c
                }),
                Err(e) => Local::Damaged(Damaged::new(Key::chunk(*digest), e)),
            });
        }
        Ok(match self.chunks.get(digest.as_bytes())? {
            None => Local::Miss,
            Some(v) => match decode_chunk(&self.packs, *digest, v.value()) {
                Ok(c) => Local::Hit(c),
                Err(e) => Local::Damaged(e),
            },
        })
    }

    /// The blob's chunk list, checked against its checksum.
    pub fn blob(&self, digest: &Digest) -> Result<Local<BlobMeta>, redb::Error> {
        if let Some(Queued::Blob(meta)) = self.queue.find(&Key::blob(*digest)) {
            return Ok(Local::Hit(meta));
        }
        Ok(match self.blobs.get(digest.as_bytes())? {
            None => Local::Miss,
            Some(v) => match decode_blob(*digest, v.value()) {
                Ok(m) => Local::Hit(m),
                Err(e) => Local::Damaged(e),
            },
        })
    }

    /// The directory, checked against its digest.
    pub fn directory(&self, digest: &Digest) -> Result<Local<Directory>, redb::Error> {
        if let Some(Queued::Directory(encoding)) = self.queue.find(&Key::directory(*digest)) {
            return Ok(match Directory::decode_verified(*digest, &encoding) {
                Ok(d) => Local::Hit(d),
                Err(e) => Local::Damaged(Damaged::new(Key::directory(*digest), e)),
            });
        }
        Ok(match self.directories.get(digest.as_bytes())? {
            None => Local::Miss,
            Some(v) => match Directory::decode_verified(*digest, v.value()) {
                Ok(d) => Local::Hit(d),
                Err(e) => Local::Damaged(Damaged::new(Key::directory(*digest), e)),
            },
        })
    }
}

impl CacheStore {
    /// A snapshot for lookups. Blocks briefly: call it from
    /// `spawn_blocking`, with the lookups.
    pub(crate) fn read(&self) -> Result<LocalRead, redb::Error> {
        let txn = self.inner.db.begin_read()?;
        Ok(LocalRead {
            queue: self.inner.queue.clone(),
            packs: self.inner.packs.clone(),
            chunks: txn.open_table(CHUNKS)?,
            blobs: txn.open_table(BLOBS)?,
            directories: txn.open_table(DIRECTORIES)?,
        })
    }
}
