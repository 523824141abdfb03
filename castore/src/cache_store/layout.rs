//! The cache file's tables, and the byte layout of each record and entry:
//! what [`Record`] writes, what the lookups (`read.rs`) parse, and the
//! write transaction's view of the tables ([`Tables`]).

use std::fmt;

use redb::{Table, TableDefinition, TableError, WriteTransaction};

use super::accounting::{ENTRY_OVERHEAD, Entry, cost_of};
use super::write::Freed;
use crate::blobs::{BlobMeta, CHUNK_ENTRY_LEN, EncodedChunk, encode_chunk_list};
use crate::chunk_record::{INDEX_RECORD_LEN, IndexRecord};
use crate::digest::{DIGEST_LEN, Digest};
use crate::packs::Packs;
use crate::redb_store::DigestKey;

/// Chunk digest → where its bytes are in the packs (layout below).
pub(super) const CHUNKS: TableDefinition<DigestKey, &[u8]> =
    TableDefinition::new("cache-chunks-v2");

/// The chunk table of caches that kept chunk bytes inline; emptied of its
/// chunks on open.
pub(super) const INLINE_CHUNKS_V1: TableDefinition<DigestKey, &[u8]> =
    TableDefinition::new("cache-chunks-v1");

/// Pack blocks: chunks start on them, and eviction frees whole ones.
pub(super) const PACK_BLOCK: u64 = 4096;

/// Blob digest → chunk list record (layout below).
pub(super) const BLOBS: TableDefinition<DigestKey, &[u8]> = TableDefinition::new("cache-blobs-v1");

/// Directory digest → its canonical encoding, whose BLAKE3 is the key.
pub(super) const DIRECTORIES: TableDefinition<DigestKey, &[u8]> =
    TableDefinition::new("cache-directories-v1");

/// Kind and digest of a record → its cost and last use (layouts below).
pub(super) const LRU: TableDefinition<&[u8; LRU_KEY_LEN], &[u8; LRU_VALUE_LEN]> =
    TableDefinition::new("cache-lru-v1");

// Chunk record (`cache-chunks-v2`): an `IndexRecord` (`chunk_record.rs`), where
// the chunk's bytes are in the cache's packs.

// Chunk list record (`cache-blobs-v1`). Unlike a chunk or a directory, a
// chunk list can't be checked against its digest without reading every
// chunk, so it carries a checksum: damage is then caught before the list
// sends a range read to the wrong chunks.
//
// | offset       | size | field                                        |
// |--------------|------|----------------------------------------------|
// | 0            | 32   | BLAKE3 of the blob digest ‖ bytes 32..       |
// | 32           | 8    | blob size, u64 little endian                 |
// | 40 + 36·i    | 32   | digest of chunk i                            |
// | 40 + 36·i+32 | 4    | size of chunk i, u32 little endian           |
//
// Bytes 32.. are the store's `blobs-v1` record, written and read by the
// same functions (`encode_chunk_list`, `decode_chunk_list`).
const BLOB_CHECKSUM_AT: usize = 0;
pub(super) const BLOB_SIZE_AT: usize = 32;
const BLOB_CHUNKS_AT: usize = 40;

// Entry key (`cache-lru-v1`):
//
// | offset | size | field                                    |
// |--------|------|------------------------------------------|
// | 0      | 1    | kind: 0 chunk, 1 chunk list, 2 directory, 3 file |
// | 1      | 32   | digest                                   |
//
// Entry value:
//
// | offset | size | field                                  |
// |--------|------|----------------------------------------|
// | 0      | 8    | cost in bytes, u64 little endian       |
// | 8      | 8    | last use (a tick), u64 little endian   |
pub(super) const LRU_KEY_LEN: usize = 1 + DIGEST_LEN;
const LRU_COST_AT: usize = 0;
const LRU_TICK_AT: usize = 8;
pub(super) const LRU_VALUE_LEN: usize = 16;

/// What a cached record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Chunk,
    Blob,
    Directory,
    /// A whole file's contents as a plain file in the files directory
    /// ([`CacheStore::file_path`]), for FUSE passthrough.
    ///
    /// [`CacheStore::file_path`]: super::CacheStore::file_path
    File,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Chunk => 0,
            Kind::Blob => 1,
            Kind::Directory => 2,
            Kind::File => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Kind::Chunk),
            1 => Some(Kind::Blob),
            2 => Some(Kind::Directory),
            3 => Some(Kind::File),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Chunk => "chunk",
            Kind::Blob => "chunk list",
            Kind::Directory => "directory",
            Kind::File => "file",
        })
    }
}

/// A cached record's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Key {
    pub kind: Kind,
    pub digest: Digest,
}

impl Key {
    pub fn chunk(digest: Digest) -> Self {
        Key {
            kind: Kind::Chunk,
            digest,
        }
    }

    pub fn blob(digest: Digest) -> Self {
        Key {
            kind: Kind::Blob,
            digest,
        }
    }

    pub fn directory(digest: Digest) -> Self {
        Key {
            kind: Kind::Directory,
            digest,
        }
    }

    pub fn file(digest: Digest) -> Self {
        Key {
            kind: Kind::File,
            digest,
        }
    }

    pub(super) fn to_bytes(self) -> [u8; LRU_KEY_LEN] {
        let mut k = [0u8; LRU_KEY_LEN];
        k[0] = self.kind.code();
        k[1..].copy_from_slice(self.digest.as_bytes());
        k
    }

    pub(super) fn from_bytes(k: &[u8; LRU_KEY_LEN]) -> Option<Self> {
        Some(Key {
            kind: Kind::from_code(k[0])?,
            digest: Digest::try_from(&k[1..]).expect("32 bytes"),
        })
    }
}

/// A record to cache. Only what was verified goes in.
pub(crate) enum Record {
    /// A chunk as the remote stores it (compressed or not), already decoded
    /// and checked against its digest.
    Chunk(EncodedChunk),
    /// A blob's chunk list.
    Blob(Digest, BlobMeta),
    /// A directory's canonical encoding, under the BLAKE3 of it.
    Directory(Digest, Vec<u8>),
    /// A file of this size, already in place at its
    /// [`CacheStore::file_path`] and checked against its digest: only its
    /// entry is written.
    ///
    /// [`CacheStore::file_path`]: super::CacheStore::file_path
    File(Digest, u64),
}

impl Record {
    pub(super) fn key(&self) -> Key {
        match self {
            Record::Chunk(c) => Key::chunk(c.digest),
            Record::Blob(d, _) => Key::blob(*d),
            Record::Directory(d, _) => Key::directory(*d),
            Record::File(d, _) => Key::file(*d),
        }
    }

    /// Length of the stored value.
    pub(super) fn len(&self) -> usize {
        match self {
            Record::Chunk(c) => c.data.len(),
            Record::Blob(_, meta) => BLOB_CHUNKS_AT + CHUNK_ENTRY_LEN * meta.chunks.len(),
            Record::Directory(_, encoding) => encoding.len(),
            Record::File(..) => 0,
        }
    }

    pub(super) fn cost(&self) -> u64 {
        match self {
            // Its blocks in a pack, and its index record (a small one).
            Record::Chunk(c) => {
                (c.data.len() as u64).next_multiple_of(PACK_BLOCK)
                    + cost_of(INDEX_RECORD_LEN as u64)
            }
            Record::File(_, size) => size.next_multiple_of(PACK_BLOCK) + ENTRY_OVERHEAD,
            _ => cost_of(self.len() as u64),
        }
    }

    /// Writes the record; a chunk's bytes go to `packs`, and the bytes of a
    /// chunk it replaces are added to `freed`.
    pub(super) fn insert(
        &self,
        t: &mut Tables<'_>,
        packs: &Packs,
        freed: &mut Freed,
    ) -> Result<(), redb::Error> {
        match self {
            Record::Chunk(c) => {
                let at = packs.append(&c.data)?;
                let record = IndexRecord {
                    encoding: c.encoding,
                    size: c.size,
                    at,
                    frame: None,
                };
                if let Some(old) = t
                    .chunks
                    .insert(c.digest.as_bytes(), &record.to_bytes()[..])?
                    && let Ok(old) = IndexRecord::from_bytes(old.value())
                {
                    freed.chunks.push(old.at);
                }
            }
            // Its entry is all it has in the file.
            Record::File(..) => {}
            Record::Blob(blob, meta) => {
                t.blobs
                    .insert(blob.as_bytes(), &encode_blob(*blob, meta)[..])?;
            }
            Record::Directory(digest, encoding) => {
                t.directories.insert(digest.as_bytes(), &encoding[..])?;
            }
        }
        Ok(())
    }
}

fn encode_blob(blob: Digest, meta: &BlobMeta) -> Vec<u8> {
    let mut record = vec![0u8; BLOB_SIZE_AT];
    // A `BlobMeta` cached was checked (`BlobMeta::new`): its chunk sizes fit.
    encode_chunk_list(meta, &mut record).expect("a checked chunk list encodes");
    let checksum = blob_checksum(blob, &record[BLOB_SIZE_AT..]);
    record[BLOB_CHECKSUM_AT..BLOB_SIZE_AT].copy_from_slice(checksum.as_bytes());
    record
}

pub(super) fn blob_checksum(blob: Digest, rest: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(blob.as_bytes());
    h.update(rest);
    h.finalize()
}

pub(super) fn entry_bytes(cost: u64, tick: u64) -> [u8; LRU_VALUE_LEN] {
    let mut v = [0u8; LRU_VALUE_LEN];
    v[LRU_COST_AT..LRU_TICK_AT].copy_from_slice(&cost.to_le_bytes());
    v[LRU_TICK_AT..].copy_from_slice(&tick.to_le_bytes());
    v
}

pub(super) fn entry_from_bytes(v: &[u8; LRU_VALUE_LEN]) -> Entry {
    let u64_at = |at: usize| u64::from_le_bytes(v[at..at + 8].try_into().expect("8 bytes"));
    Entry {
        cost: u64_at(LRU_COST_AT),
        tick: u64_at(LRU_TICK_AT),
    }
}

/// The tables of one write transaction, opened together.
pub(super) struct Tables<'txn> {
    chunks: Table<'txn, DigestKey, &'static [u8]>,
    blobs: Table<'txn, DigestKey, &'static [u8]>,
    directories: Table<'txn, DigestKey, &'static [u8]>,
    pub(super) lru: Table<'txn, &'static [u8; LRU_KEY_LEN], &'static [u8; LRU_VALUE_LEN]>,
}

impl<'txn> Tables<'txn> {
    pub(super) fn new(txn: &'txn WriteTransaction) -> Result<Self, TableError> {
        Ok(Tables {
            chunks: txn.open_table(CHUNKS)?,
            blobs: txn.open_table(BLOBS)?,
            directories: txn.open_table(DIRECTORIES)?,
            lru: txn.open_table(LRU)?,
        })
    }

    /// Removes a record and its entry; a chunk's bytes in the packs, or a
    /// file, are added to `freed`, to free once the removal has committed.
    pub(super) fn remove(&mut self, key: Key, freed: &mut Freed) -> Result<(), redb::Error> {
        let digest = key.digest.as_bytes();
        match key.kind {
            Kind::Chunk => {
                if let Some(old) = self.chunks.remove(digest)?
                    && let Ok(old) = IndexRecord::from_bytes(old.value())
                {
                    freed.chunks.push(old.at);
                }
            }
            Kind::File => freed.files.push(key.digest),
            Kind::Blob => {
                self.blobs.remove(digest)?;
            }
            Kind::Directory => {
                self.directories.remove(digest)?;
            }
        };
        self.lru.remove(&key.to_bytes())?;
        Ok(())
    }
}
