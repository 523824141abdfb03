//! The local cache: chunks, chunk lists and directories copied from a
//! remote store into one redb file and the pack files beside it (chunk
//! bytes, `packs.rs`), bounded in size, the least recently used evicted
//! first.
//!
//! [`CacheStore`] owns the file and its accounting; the caching backends
//! ([`CachingBlobService`], [`CachingDirectoryService`]) decide what goes in.
//! The file is not a castore ([`RedbStore`]): it breaks the store's
//! invariants on purpose (a cached chunk list's chunks may be evicted, a
//! cached directory's children never fetched), so it has tables of its own
//! and cannot be opened as a store by mistake.
//!
//! Nothing read from the file is trusted: every chunk is decoded and checked
//! against its BLAKE3, every directory against its digest, and every chunk
//! list against a BLAKE3 stored beside it, before [`LocalRead`] hands it
//! out. What fails is reported as [`Local::Damaged`], for the caller to drop
//! and fetch again.
//!
//! Accounting. Each cached record has an entry in `cache-lru-v1`: what it
//! costs and when it was last used (a logical clock, one tick per use). The
//! cost is the space it takes on disk, so that the bound holds for the
//! disk: a chunk's bytes take whole 4 KiB blocks of a pack (it starts on
//! one, and eviction punches its blocks out of the file), plus its small
//! index record; a chunk list or directory lives in redb, which packs small
//! records together and gives a record of more than half a page a
//! power-of-two run of 4 KiB pages; each also has its key and entry. The
//! entry is written in the same transaction as the record and removed with
//! it, so after a crash the two still agree: redb loses a suffix of
//! commits, never part of one. On open the entries are read into an
//! in-memory index, ordered by last use; from then on the index answers
//! "how full" and "who goes next" without touching the file. The price is
//! memory: some 125 bytes per cached record, so about 40 MB for a full
//! 10 GiB cache of 64 KiB chunks that compress to 40% (330,000 of them),
//! and an open that reads 16 MB of entries. A table ordered by last use
//! would need no memory but cost two more writes per use (batched, still a
//! rewrite of the index pages); an approximate order (clock, sampling)
//! would save about half the memory for an order nobody can predict.
//! Neither pays at this size.
//!
//! Reads must not cost a write each, so a hit only moves its entry in the
//! index and marks it dirty. Dirty entries are written with the next
//! transaction that writes anyway (every fetch from the remote writes its
//! result back), or on their own once [`TOUCHES_PER_FLUSH`] have piled up,
//! and when the store closes. A crash loses recent recency updates only: the
//! order is a little stale, the accounting still exact.
//!
//! Durability: a cache can lose its newest writes, so commits skip the
//! fsync, and the packs are never fsynced: a chunk whose bytes a crash lost
//! fails its check when read and is fetched again. redb reuses the pages a
//! commit frees only after a durable commit, so a commit is made durable
//! once a sixteenth of the bound (at most [`DURABLE_EVERY_BYTES`]) has been
//! written since the last one, and closing the store makes everything
//! durable. Evicted chunks' blocks are punched out after the commit that
//! forgets them; a reader holding an older snapshot then reads zeros (or
//! finds the pack deleted), fails the check, and refetches.
//!
//! Measured with a 64 MiB bound and 160 MiB of random bytes read through
//! twice (`file_levels_off_near_the_bound`, `tests/cache.rs`): the disk
//! use (redb file and pack blocks) levels off at 1.01 times the bound.
//! With the chunk bytes inline in redb it levelled off at 1.27 times the
//! bound on an idle machine and 1.63 on a busy one, where freed pages wait
//! for the readers that can still see them.
//!
//! [`CachingBlobService`]: crate::blobs::CachingBlobService
//! [`CachingDirectoryService`]: crate::directories::CachingDirectoryService
//! [`RedbStore`]: crate::RedbStore

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use redb::{
    Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, Table, TableDefinition,
    TableError, WriteTransaction,
};

use bytes::Bytes;

use crate::blobs::{BlobMeta, CHUNK_ENTRY_LEN, EncodedChunk, decode_chunk_list, encode_chunk_list};
use crate::digest::{DIGEST_LEN, Digest};
use crate::nodes::Directory;
use crate::packs::{INDEX_RECORD_LEN, IndexRecord, Location, Packs};
use crate::proto::ChunkEncoding;
use crate::redb_store::{DigestKey, OpenError, create_database};

/// Memory redb may use to cache pages of the cache file, which holds the
/// chunk index, chunk lists and directories (chunk bytes are in the packs,
/// read through the kernel's page cache).
const CACHE_PAGE_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Default bound of a cache: 10 GiB.
pub const DEFAULT_CACHE_SIZE: u64 = 10 << 30;

/// Recency updates kept in memory before they are written on their own:
/// one small commit (some 50 KB) per this many distinct chunks read from
/// the cache, when nothing else writes.
const TOUCHES_PER_FLUSH: usize = 1024;

/// Most bytes written by commits without an fsync before one is made
/// durable, letting redb reuse the pages the commits since the last one
/// freed (a sixteenth of the bound, for smaller caches).
const DURABLE_EVERY_BYTES: u64 = 16 << 20;

/// Cost of a small record beyond its own bytes: its key, and its entry in
/// `cache-lru-v1` (key and value).
const ENTRY_OVERHEAD: u64 = (DIGEST_LEN + LRU_KEY_LEN + LRU_VALUE_LEN) as u64;

/// redb's page size.
const PAGE: u64 = 4096;

/// A record at least this long gets a leaf of its own: a run of pages, a
/// power of two of them (redb's allocator), so it is charged for the run.
/// Shorter ones share pages with their neighbours.
const OWN_LEAF_AT: u64 = PAGE / 2;

/// What a leaf holding one record costs beyond the record: page header,
/// value length, key.
const LEAF_OVERHEAD: u64 = 8 + DIGEST_LEN as u64;

/// What a record of `len` bytes takes in the file: its share of pages, and
/// its entry.
fn cost_of(len: u64) -> u64 {
    if len < OWN_LEAF_AT {
        return len + ENTRY_OVERHEAD;
    }
    let pages = (len + LEAF_OVERHEAD).div_ceil(PAGE);
    pages.next_power_of_two() * PAGE + (LRU_KEY_LEN + LRU_VALUE_LEN) as u64
}

/// Chunk digest → where its bytes are in the packs (layout below).
const CHUNKS: TableDefinition<DigestKey, &[u8]> = TableDefinition::new("cache-chunks-v2");

/// The chunk table of caches that kept chunk bytes inline; emptied of its
/// chunks on open.
const INLINE_CHUNKS_V1: TableDefinition<DigestKey, &[u8]> = TableDefinition::new("cache-chunks-v1");

/// Pack blocks: chunks start on them, and eviction frees whole ones.
const PACK_BLOCK: u64 = 4096;

/// Blob digest → chunk list record (layout below).
const BLOBS: TableDefinition<DigestKey, &[u8]> = TableDefinition::new("cache-blobs-v1");

/// Directory digest → its canonical encoding, whose BLAKE3 is the key.
const DIRECTORIES: TableDefinition<DigestKey, &[u8]> = TableDefinition::new("cache-directories-v1");

/// Kind and digest of a record → its cost and last use (layouts below).
const LRU: TableDefinition<&[u8; LRU_KEY_LEN], &[u8; LRU_VALUE_LEN]> =
    TableDefinition::new("cache-lru-v1");

// Chunk record (`cache-chunks-v2`): an `IndexRecord` (`packs.rs`), where
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
const BLOB_SIZE_AT: usize = 32;
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
const LRU_KEY_LEN: usize = 1 + DIGEST_LEN;
const LRU_COST_AT: usize = 0;
const LRU_TICK_AT: usize = 8;
const LRU_VALUE_LEN: usize = 16;

/// What a cached record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Chunk,
    Blob,
    Directory,
    /// A whole file's contents as a plain file in the files directory
    /// ([`CacheStore::file_path`]), for FUSE passthrough.
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

    fn to_bytes(self) -> [u8; LRU_KEY_LEN] {
        let mut k = [0u8; LRU_KEY_LEN];
        k[0] = self.kind.code();
        k[1..].copy_from_slice(self.digest.as_bytes());
        k
    }

    fn from_bytes(k: &[u8; LRU_KEY_LEN]) -> Option<Self> {
        Some(Key {
            kind: Kind::from_code(k[0])?,
            digest: Digest::try_from(&k[1..]).expect("32 bytes"),
        })
    }
}

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
    File(Digest, u64),
}

impl Record {
    fn key(&self) -> Key {
        match self {
            Record::Chunk(c) => Key::chunk(c.digest),
            Record::Blob(d, _) => Key::blob(*d),
            Record::Directory(d, _) => Key::directory(*d),
            Record::File(d, _) => Key::file(*d),
        }
    }

    /// Length of the stored value.
    fn len(&self) -> usize {
        match self {
            Record::Chunk(c) => c.data.len(),
            Record::Blob(_, meta) => BLOB_CHUNKS_AT + CHUNK_ENTRY_LEN * meta.chunks.len(),
            Record::Directory(_, encoding) => encoding.len(),
            Record::File(..) => 0,
        }
    }

    fn cost(&self) -> u64 {
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
    fn insert(
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

fn blob_checksum(blob: Digest, rest: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(blob.as_bytes());
    h.update(rest);
    h.finalize()
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
fn parse_chunk(packs: &Packs, digest: Digest, record: &[u8]) -> Result<EncodedChunk, Damaged> {
    let key = Key::chunk(digest);
    let record =
        IndexRecord::from_bytes(record).map_err(|reason| Damaged::new(key, BadRecord(reason)))?;
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

fn entry_bytes(cost: u64, tick: u64) -> [u8; LRU_VALUE_LEN] {
    let mut v = [0u8; LRU_VALUE_LEN];
    v[LRU_COST_AT..LRU_TICK_AT].copy_from_slice(&cost.to_le_bytes());
    v[LRU_TICK_AT..].copy_from_slice(&tick.to_le_bytes());
    v
}

fn entry_from_bytes(v: &[u8; LRU_VALUE_LEN]) -> Entry {
    let u64_at = |at: usize| u64::from_le_bytes(v[at..at + 8].try_into().expect("8 bytes"));
    Entry {
        cost: u64_at(LRU_COST_AT),
        tick: u64_at(LRU_TICK_AT),
    }
}

/// The tables of one write transaction, opened together.
struct Tables<'txn> {
    chunks: Table<'txn, DigestKey, &'static [u8]>,
    blobs: Table<'txn, DigestKey, &'static [u8]>,
    directories: Table<'txn, DigestKey, &'static [u8]>,
    lru: Table<'txn, &'static [u8; LRU_KEY_LEN], &'static [u8; LRU_VALUE_LEN]>,
}

impl<'txn> Tables<'txn> {
    fn new(txn: &'txn WriteTransaction) -> Result<Self, TableError> {
        Ok(Tables {
            chunks: txn.open_table(CHUNKS)?,
            blobs: txn.open_table(BLOBS)?,
            directories: txn.open_table(DIRECTORIES)?,
            lru: txn.open_table(LRU)?,
        })
    }

    /// Removes a record and its entry; a chunk's bytes in the packs, or a
    /// file, are added to `freed`, to free once the removal has committed.
    fn remove(&mut self, key: Key, freed: &mut Freed) -> Result<(), redb::Error> {
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

/// One snapshot of the cache file, for lookups. Every record it returns has
/// been verified.
pub(crate) struct LocalRead {
    packs: Arc<Packs>,
    chunks: ReadOnlyTable<DigestKey, &'static [u8]>,
    blobs: ReadOnlyTable<DigestKey, &'static [u8]>,
    directories: ReadOnlyTable<DigestKey, &'static [u8]>,
}

impl LocalRead {
    /// The chunk's decoded bytes, checked against its digest, as a raw
    /// [`EncodedChunk`].
    pub fn chunk(&self, digest: &Digest) -> Result<Local<EncodedChunk>, redb::Error> {
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
        Ok(match self.directories.get(digest.as_bytes())? {
            None => Local::Miss,
            Some(v) => match Directory::decode_verified(*digest, v.value()) {
                Ok(d) => Local::Hit(d),
                Err(e) => Local::Damaged(Damaged::new(Key::directory(*digest), e)),
            },
        })
    }
}

/// How to open a [`CacheStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheOptions {
    /// The bound, in bytes of disk taken by cached records (a chunk's pack
    /// blocks, a record's pages or share of a page, and its entry). The
    /// disk use levels off a little above it (1.01 times the bound when
    /// measured with 64 MiB): freed redb pages wait for reuse, and redb has
    /// its own structures.
    pub max_bytes: u64,
}

impl Default for CacheOptions {
    /// A bound of [`DEFAULT_CACHE_SIZE`].
    fn default() -> Self {
        CacheOptions {
            max_bytes: DEFAULT_CACHE_SIZE,
        }
    }
}

/// How full a [`CacheStore`] is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Cached chunks.
    pub chunks: u64,
    /// Cached chunk lists.
    pub blobs: u64,
    /// Cached directories.
    pub directories: u64,
    /// Whole files kept for passthrough.
    pub files: u64,
    /// Their cost, counted against the bound.
    pub bytes: u64,
    /// The bound.
    pub max_bytes: u64,
}

/// A record's accounting.
#[derive(Clone, Copy, Debug)]
struct Entry {
    cost: u64,
    tick: u64,
}

/// What is cached, by last use: the file's `cache-lru-v1` in memory, plus
/// the uses not yet written to it.
#[derive(Default)]
struct Index {
    entries: HashMap<Key, Entry>,
    /// The same entries, least recently used first. A tick names one use,
    /// so ticks are unique; the key in the pair only guards against a file
    /// that repeats one.
    by_age: BTreeSet<(u64, Key)>,
    bytes: u64,
    next_tick: u64,
    /// Entries whose tick changed since it was last written.
    dirty: HashSet<Key>,
    /// Bytes written since the last durable commit.
    undurable: u64,
}

impl Index {
    fn insert_entry(&mut self, key: Key, entry: Entry) {
        if let Some(old) = self.entries.insert(key, entry) {
            self.by_age.remove(&(old.tick, key));
            self.bytes -= old.cost;
        }
        self.by_age.insert((entry.tick, key));
        self.bytes += entry.cost;
        self.next_tick = self.next_tick.max(entry.tick + 1);
    }

    fn tick(&mut self) -> u64 {
        let t = self.next_tick;
        self.next_tick += 1;
        t
    }

    /// Records a use of `key`, if it is cached.
    fn touch(&mut self, key: Key) {
        if let Some(e) = self.entries.get(&key).copied() {
            let tick = self.tick();
            self.by_age.remove(&(e.tick, key));
            self.by_age.insert((tick, key));
            self.entries.insert(key, Entry { tick, ..e });
            self.dirty.insert(key);
        }
    }

    fn upsert(&mut self, key: Key, cost: u64) {
        let tick = self.tick();
        self.insert_entry(key, Entry { cost, tick });
        self.dirty.remove(&key);
    }

    fn remove(&mut self, key: &Key) {
        if let Some(e) = self.entries.remove(key) {
            self.by_age.remove(&(e.tick, *key));
            self.bytes -= e.cost;
        }
        self.dirty.remove(key);
    }

    /// Removes least recently used entries until the rest fit `max_bytes`,
    /// and returns them.
    fn evict_to(&mut self, max_bytes: u64) -> Vec<Key> {
        let mut victims = Vec::new();
        while self.bytes > max_bytes {
            let (_, key) = *self.by_age.first().expect("bytes > 0 means entries");
            self.remove(&key);
            victims.push(key);
        }
        victims
    }
}

/// What a write frees once it has committed.
#[derive(Default)]
struct Freed {
    /// Chunk bytes in the packs.
    chunks: Vec<Location>,
    /// Files in the files directory.
    files: Vec<Digest>,
}

/// Where the file of blob `digest` goes in `dir`.
fn file_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join(digest.to_string())
}

struct Inner {
    db: Database,
    /// Whole files, for FUSE passthrough, named by their blob digest.
    files_dir: PathBuf,
    /// The chunk bytes, in 4 KiB blocks.
    packs: Arc<Packs>,
    path: PathBuf,
    max_bytes: u64,
    // A std Mutex: every critical section is a few map operations with no
    // I/O and no await, taken on each hit and once per write transaction.
    // Entries are added and removed only while their writer also holds
    // redb's write transaction, so the index and the file change together;
    // hits only reorder.
    index: Mutex<Index>,
}

impl Inner {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().expect("lock poisoned")
    }

    /// Stores `inserts` and removes `drops` in one transaction, together
    /// with their entries, the recency updates still in memory and the
    /// eviction of whatever no longer fits. Commits without an fsync unless
    /// `durable` or [`DURABLE_EVERY_BYTES`] have been written since the last
    /// durable commit; commits nothing if there is nothing to write (and
    /// `durable` is false).
    fn write(&self, inserts: &[Record], drops: &[Key], durable: bool) -> Result<(), redb::Error> {
        let mut txn = self.db.begin_write()?;
        let mut freed = Freed::default();
        let planned = self
            .fill(&txn, inserts, drops, &mut freed)
            .and_then(|written| {
                let Some(written) = written.or(durable.then_some(0)) else {
                    return Ok(None);
                };
                let every = DURABLE_EVERY_BYTES.min(self.max_bytes / 16);
                let durable = durable || self.index().undurable + written >= every;
                let level = if durable {
                    Durability::Immediate
                } else {
                    Durability::None
                };
                txn.set_durability(level)?;
                Ok(Some((written, durable)))
            });
        let (written, durable) = match planned {
            // Nothing changed, in the file or the index: the transaction is
            // dropped, which aborts it.
            Ok(None) => return Ok(()),
            Ok(Some(p)) => p,
            Err(e) => {
                drop(txn);
                self.reload();
                return Err(e);
            }
        };
        // Readers of the committed index must find its bytes in the files.
        if let Err(e) = self.packs.flush() {
            drop(txn);
            self.reload();
            return Err(e.into());
        }
        if let Err(e) = txn.commit() {
            self.reload();
            return Err(e.into());
        }
        // Only now that nothing names them: a reader still holding an older
        // snapshot finds zeros or no file, fails the check, and refetches.
        if let Err(e) = self.packs.punch(&freed.chunks) {
            tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "cache: cannot free the space of evicted chunks"
            );
        }
        for digest in freed.files {
            let path = file_path(&self.files_dir, &digest);
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "cache: cannot remove an evicted file");
            }
        }
        let mut index = self.index();
        index.undurable = if durable {
            0
        } else {
            index.undurable + written
        };
        Ok(())
    }

    /// The body of [`Inner::write`]: returns the bytes written, or `None`
    /// if there was nothing to do.
    fn fill(
        &self,
        txn: &WriteTransaction,
        inserts: &[Record],
        drops: &[Key],
        freed: &mut Freed,
    ) -> Result<Option<u64>, redb::Error> {
        let mut t = Tables::new(txn)?;
        // A record larger than the whole cache would only push everything
        // else out, itself next.
        let inserts: Vec<&Record> = inserts
            .iter()
            .filter(|r| r.cost() <= self.max_bytes)
            .collect();
        for &key in drops {
            t.remove(key, freed)?;
        }
        let mut written = 0;
        for r in &inserts {
            r.insert(&mut t, &self.packs, freed)?;
            written += r.len() as u64;
        }
        let (victims, entries) = {
            let mut index = self.index();
            for key in drops {
                index.remove(key);
            }
            for r in &inserts {
                index.upsert(r.key(), r.cost());
            }
            let victims = index.evict_to(self.max_bytes);
            let mut keys = std::mem::take(&mut index.dirty);
            keys.extend(inserts.iter().map(|r| r.key()));
            let entries: Vec<(Key, Entry)> = keys
                .into_iter()
                .filter_map(|k| index.entries.get(&k).map(|e| (k, *e)))
                .collect();
            (victims, entries)
        };
        if drops.is_empty() && inserts.is_empty() && victims.is_empty() && entries.is_empty() {
            return Ok(None);
        }
        for key in victims {
            t.remove(key, freed)?;
        }
        for (key, e) in entries {
            t.lru
                .insert(&key.to_bytes(), &entry_bytes(e.cost, e.tick))?;
        }
        Ok(Some(written))
    }

    /// Rebuilds the index from the file after a write failed part way, so
    /// the two agree again. Holds a write transaction meanwhile, so no other
    /// writer changes either.
    fn reload(&self) {
        let result = (|| {
            let txn = self.db.begin_write()?;
            let mut lru = txn.open_table(LRU)?;
            let index = load_index(&mut lru)?;
            drop(lru);
            txn.commit()?;
            Ok::<_, redb::Error>(index)
        })();
        match result {
            Ok(index) => *self.index() = index,
            Err(e) => tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "cache: cannot reload the index after a failed write; its accounting may be off until reopened"
            ),
        }
    }
}

/// Creates the files directory, and removes what in it has no entry: a
/// file written but not yet recorded when the process stopped, or a
/// temporary one.
fn remove_unlisted_files(dir: &Path, index: &Index) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let listed = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<Digest>().ok())
            .is_some_and(|d| index.entries.contains_key(&Key::file(d)));
        if !listed {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Empties a cache of the inline layout of its chunks (the table and their
/// entries); its chunk lists and directories stay.
fn drop_inline_chunks(
    txn: &WriteTransaction,
    lru: &mut Table<'_, &'static [u8; LRU_KEY_LEN], &'static [u8; LRU_VALUE_LEN]>,
) -> Result<(), redb::Error> {
    if !txn.delete_table(INLINE_CHUNKS_V1)? {
        return Ok(());
    }
    let chunks: Vec<[u8; LRU_KEY_LEN]> = lru
        .iter()?
        .filter_map(|item| item.ok().map(|(k, _)| *k.value()))
        .filter(|k| Key::from_bytes(k).is_some_and(|k| k.kind == Kind::Chunk))
        .collect();
    for k in chunks {
        lru.remove(&k)?;
    }
    Ok(())
}

/// Reads every entry into an index, removing any of an unknown kind.
fn load_index(
    lru: &mut Table<'_, &'static [u8; LRU_KEY_LEN], &'static [u8; LRU_VALUE_LEN]>,
) -> Result<Index, redb::Error> {
    let mut index = Index::default();
    let mut unknown = Vec::new();
    for item in lru.iter()? {
        let (k, v) = item?;
        match Key::from_bytes(k.value()) {
            Some(key) => index.insert_entry(key, entry_from_bytes(v.value())),
            None => unknown.push(*k.value()),
        }
    }
    for k in unknown {
        lru.remove(&k)?;
    }
    Ok(index)
}

impl Drop for Inner {
    fn drop(&mut self) {
        let pending = {
            let index = self.index();
            !index.dirty.is_empty() || index.undurable > 0
        };
        if pending && let Err(e) = self.write(&[], &[], true) {
            tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "cache: closing lost recency updates"
            );
        }
    }
}

/// A bounded local cache file: what [`CachingBlobService`] and
/// [`CachingDirectoryService`] keep of a remote store.
///
/// Holds chunks (as the remote stores them, compressed or not), chunk lists
/// and directories, each verified whenever it is read back. When the cached
/// records cost more than the bound ([`CacheOptions::max_bytes`]), the least
/// recently used are evicted, whatever their kind. Uses are counted in
/// memory and written in batches, so reading from the cache costs no write
/// per read; what they cost in memory is an index of some 125 bytes per
/// cached record, read from the file on open.
///
/// Commits skip the fsync: a crash may lose the newest records and uses,
/// never the agreement between what is cached and what is counted.
///
/// Cheap to clone; every clone shares one file and one index. The blob and
/// directory caches of one remote should share one `CacheStore`, so they
/// share its bound. Closing (dropping the last clone) writes the uses still
/// in memory and makes everything durable.
///
/// [`CachingBlobService`]: crate::blobs::CachingBlobService
/// [`CachingDirectoryService`]: crate::directories::CachingDirectoryService
#[derive(Clone)]
pub struct CacheStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for CacheStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheStore")
            .field("path", &self.inner.path)
            .field("max_bytes", &self.inner.max_bytes)
            .finish_non_exhaustive()
    }
}

impl CacheStore {
    /// Logs a failure of the cache file: reads go on from the remote, so it
    /// is a warning, not an error. `what` names the cache ("blob", …).
    pub(crate) fn warn_failed(&self, what: &str, e: &dyn std::error::Error) {
        tracing::warn!(
            path = %self.path().display(),
            error = %e,
            "{what} cache failed; serving from the remote"
        );
    }

    /// Logs a damaged record that is dropped and fetched again.
    pub(crate) fn warn_damaged(&self, what: &str, e: &dyn std::error::Error) {
        let cause = e.source().map(|s| s.to_string()).unwrap_or_default();
        tracing::warn!(
            path = %self.path().display(),
            error = %e,
            cause,
            "{what} cache: dropping a damaged record and fetching it again"
        );
    }

    /// Opens the cache file at `path`, creating it (and its directory) if
    /// needed. If it holds more than `options.max_bytes` (the bound was
    /// lowered), the least recently used records are evicted now.
    ///
    /// Blocks on file I/O, and reads every entry (some 50 bytes for each
    /// cached record): call it before serving, or from `spawn_blocking`.
    pub fn open(path: impl AsRef<Path>, options: CacheOptions) -> Result<Self, OpenError> {
        let path = path.as_ref();
        if !path.is_absolute() {
            return Err(OpenError::NotAbsolute(path.to_owned()));
        }
        let db_err = |source: redb::Error| OpenError::Database {
            path: path.to_owned(),
            source,
        };
        // A bounded page cache: redb's default (1 GiB) made a mount reading
        // 1 GiB through the cache 1.2 GiB resident.
        let db = create_database(path, Some(CACHE_PAGE_CACHE_BYTES))?;
        let dir = path.with_extension("packs");
        // Never fsynced: a chunk whose bytes a crash lost fails its check.
        let packs = Packs::open(&dir, PACK_BLOCK, false).map_err(|source| OpenError::Packs {
            path: path.to_owned(),
            dir,
            source,
        })?;
        // Creates the tables on first open, so lookups can open them.
        let index = (|| {
            let txn = db.begin_write()?;
            let index = {
                let mut t = Tables::new(&txn)?;
                drop_inline_chunks(&txn, &mut t.lru)?;
                load_index(&mut t.lru)?
            };
            txn.commit()?;
            Ok(index)
        })()
        .map_err(db_err)?;
        let files_dir = path.with_extension("files");
        remove_unlisted_files(&files_dir, &index).map_err(|source| OpenError::Packs {
            path: path.to_owned(),
            dir: files_dir.clone(),
            source,
        })?;
        let store = CacheStore {
            inner: Arc::new(Inner {
                db,
                files_dir,
                packs: Arc::new(packs),
                path: path.to_owned(),
                max_bytes: options.max_bytes,
                index: Mutex::new(index),
            }),
        };
        store.inner.write(&[], &[], false).map_err(db_err)?;
        Ok(store)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The bound, in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
    }

    /// What is cached, and how much it costs against the bound.
    pub fn stats(&self) -> CacheStats {
        let index = self.inner.index();
        let mut stats = CacheStats {
            bytes: index.bytes,
            max_bytes: self.inner.max_bytes,
            ..CacheStats::default()
        };
        for key in index.entries.keys() {
            match key.kind {
                Kind::Chunk => stats.chunks += 1,
                Kind::Blob => stats.blobs += 1,
                Kind::Directory => stats.directories += 1,
                Kind::File => stats.files += 1,
            }
        }
        stats
    }

    /// Bytes the cache takes on disk: the redb file, and the blocks its
    /// packs have allocated.
    pub fn disk_bytes(&self) -> std::io::Result<u64> {
        Ok(std::fs::metadata(&self.inner.path)?.len() + self.inner.packs.allocated_bytes()?)
    }

    /// Where the whole file of blob `digest` is kept, if
    /// [`CacheStore::has_file`] says it is. Write it elsewhere in the same
    /// directory ([`CacheStore::files_dir`]) and rename it here, then
    /// [`CacheStore::add_file`] it.
    pub fn file_path(&self, digest: &Digest) -> PathBuf {
        file_path(&self.inner.files_dir, digest)
    }

    /// The directory of whole files; anything in it without an entry is
    /// removed when the cache is next opened.
    pub fn files_dir(&self) -> &Path {
        &self.inner.files_dir
    }

    /// Whether the whole file of blob `digest` is kept.
    pub fn has_file(&self, digest: &Digest) -> bool {
        self.inner.index().entries.contains_key(&Key::file(*digest))
    }

    /// Records the file at [`CacheStore::file_path`] (`size` bytes, checked
    /// against `digest` by the caller) against the bound, evicting what no
    /// longer fits. Blocks: call it from `spawn_blocking`.
    pub fn add_file(&self, digest: &Digest, size: u64) -> Result<(), redb::Error> {
        self.inner.write(&[Record::File(*digest, size)], &[], false)
    }

    /// Counts a use of the whole file of `digest`, for eviction order. May
    /// write a batch of uses: call it from `spawn_blocking`.
    pub fn touch_file(&self, digest: &Digest) {
        self.touch([Key::file(*digest)]);
    }

    /// Forgets the whole file of `digest` (it is gone or unusable) and
    /// removes it. Blocks: call it from `spawn_blocking`.
    pub fn drop_file(&self, digest: &Digest) -> Result<(), redb::Error> {
        self.inner.write(&[], &[Key::file(*digest)], false)
    }

    /// Whether the chunk is cached.
    pub fn contains_chunk(&self, digest: &Digest) -> bool {
        self.inner
            .index()
            .entries
            .contains_key(&Key::chunk(*digest))
    }

    /// Writes the recency updates still in memory and makes every commit
    /// durable. Blocks: call it from `spawn_blocking`.
    pub fn flush(&self) -> Result<(), redb::Error> {
        self.inner.write(&[], &[], true)
    }

    /// The chunk as stored, not decoded or verified: for tests that check
    /// what the cache holds. Blocks.
    #[doc(hidden)]
    pub fn stored_chunk(&self, digest: &Digest) -> Result<Option<EncodedChunk>, redb::Error> {
        let txn = self.inner.db.begin_read()?;
        let chunks = txn.open_table(CHUNKS)?;
        let Some(v) = chunks.get(digest.as_bytes())? else {
            return Ok(None);
        };
        Ok(parse_chunk(&self.inner.packs, *digest, v.value()).ok())
    }

    /// Replaces a cached chunk, for corruption tests: `f` gets the chunk as
    /// stored and what it leaves is written back (which counts as a use).
    /// False if it is not cached. Blocks.
    #[doc(hidden)]
    pub fn corrupt_chunk(
        &self,
        digest: &Digest,
        f: impl FnOnce(&mut EncodedChunk),
    ) -> Result<bool, redb::Error> {
        let Some(mut chunk) = self.stored_chunk(digest)? else {
            return Ok(false);
        };
        f(&mut chunk);
        self.inner.write(&[Record::Chunk(chunk)], &[], false)?;
        Ok(true)
    }

    /// Flips bytes of a cached directory's encoding in place, for corruption
    /// tests. False if it is not cached. Blocks.
    #[doc(hidden)]
    pub fn corrupt_directory(
        &self,
        digest: &Digest,
        f: impl FnOnce(&mut [u8]),
    ) -> Result<bool, redb::Error> {
        self.rewrite(DIRECTORIES, digest, f)
    }

    /// Flips bytes of a cached chunk list record in place, for corruption
    /// tests. False if it is not cached. Blocks.
    #[doc(hidden)]
    pub fn corrupt_chunk_list(
        &self,
        digest: &Digest,
        f: impl FnOnce(&mut [u8]),
    ) -> Result<bool, redb::Error> {
        self.rewrite(BLOBS, digest, f)
    }

    /// Rewrites a record in place; its length, and so the accounting, stay.
    fn rewrite(
        &self,
        table: TableDefinition<DigestKey, &[u8]>,
        digest: &Digest,
        f: impl FnOnce(&mut [u8]),
    ) -> Result<bool, redb::Error> {
        let txn = self.inner.db.begin_write()?;
        {
            let mut t = txn.open_table(table)?;
            let Some(mut record) = t.get(digest.as_bytes())?.map(|v| v.value().to_vec()) else {
                return Ok(false);
            };
            f(&mut record);
            t.insert(digest.as_bytes(), &record[..])?;
        }
        txn.commit()?;
        Ok(true)
    }

    /// A snapshot for lookups. Blocks briefly: call it from
    /// `spawn_blocking`, with the lookups.
    pub(crate) fn read(&self) -> Result<LocalRead, redb::Error> {
        let txn = self.inner.db.begin_read()?;
        Ok(LocalRead {
            packs: self.inner.packs.clone(),
            chunks: txn.open_table(CHUNKS)?,
            blobs: txn.open_table(BLOBS)?,
            directories: txn.open_table(DIRECTORIES)?,
        })
    }

    /// Records uses of cached records: in memory, written in a batch later.
    /// May write that batch now. Blocks then: call it from `spawn_blocking`.
    pub(crate) fn touch(&self, keys: impl IntoIterator<Item = Key>) {
        let pending = {
            let mut index = self.inner.index();
            for key in keys {
                index.touch(key);
            }
            index.dirty.len()
        };
        if pending >= TOUCHES_PER_FLUSH
            && let Err(e) = self.inner.write(&[], &[], false)
        {
            tracing::warn!(
                path = %self.inner.path.display(),
                error = %e,
                "cache: cannot write recency updates"
            );
        }
    }

    /// Caches `inserts` (each verified by the caller) and drops `drops`,
    /// evicting what no longer fits. Blocks: call it from `spawn_blocking`.
    pub(crate) fn write(&self, inserts: &[Record], drops: &[Key]) -> Result<(), redb::Error> {
        self.inner.write(inserts, drops, false)
    }
}
