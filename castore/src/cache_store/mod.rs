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
//! The parts: `layout.rs` has the tables and the byte layout of every
//! record; `read.rs` the verified lookups ([`LocalRead`]); `accounting.rs`
//! what each record costs and the in-memory index by last use that picks
//! what is evicted; `queue.rs` the records waiting to be written, in
//! batches, by a writer thread; `write.rs` the write transaction,
//! durability and the freeing of evicted space; `repair.rs` how the file
//! and the index are brought back into agreement, on open and after a
//! failed write; and `files.rs` the whole files kept for FUSE passthrough.
//!
//! [`CachingBlobService`]: crate::blobs::CachingBlobService
//! [`CachingDirectoryService`]: crate::directories::CachingDirectoryService
//! [`RedbStore`]: crate::RedbStore
//! [`LocalRead`]: read::LocalRead

mod accounting;
mod files;
mod layout;
mod queue;
mod read;
mod repair;
mod write;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};

use crate::blobs::EncodedChunk;
use crate::digest::Digest;
use crate::packs::Packs;
use crate::redb_store::{DigestKey, OpenError, create_database};

use self::accounting::{Index, TOUCHES_PER_FLUSH};
use self::files::remove_unlisted_files;
use self::layout::{BLOBS, CHUNKS, DIRECTORIES, PACK_BLOCK, Tables};
pub(crate) use self::layout::{Key, Kind, Record};
use self::queue::{WriteQueue, Writer};
pub(crate) use self::read::Local;
use self::read::parse_chunk;
use self::repair::{drop_inline_chunks, load_index};

/// Memory redb may use to cache pages of the cache file, which holds the
/// chunk index, chunk lists and directories (chunk bytes are in the packs,
/// read through the kernel's page cache). 16 MiB holds a cold walk of a
/// 52,073-file toolchain's index and chunk lists; 32 MiB added 8 MiB to
/// the mount's peak resident size and nothing to its speed.
const CACHE_PAGE_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Default bound of a cache: 10 GiB.
pub const DEFAULT_CACHE_SIZE: u64 = 10 << 30;

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
    /// Chunks asked of the cache that it had, since it was opened.
    pub hits: u64,
    /// Chunks asked of the cache that it lacked (fetched from the store).
    pub misses: u64,
    /// Records evicted to stay within the bound, since it was opened.
    pub evictions: u64,
}

struct Inner {
    db: Database,
    /// Whole files, for FUSE passthrough, named by their blob digest.
    files_dir: PathBuf,
    /// The chunk bytes, in 4 KiB blocks.
    packs: Arc<Packs>,
    path: PathBuf,
    max_bytes: u64,
    /// Counted for [`CacheStats`].
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
    evictions: std::sync::atomic::AtomicU64,
    // A std Mutex: every critical section is a few map operations with no
    // I/O and no await, taken on each hit and once per write transaction.
    // Entries are added and removed only while their writer also holds
    // redb's write transaction, so the index and the file change together;
    // hits only reorder.
    index: Mutex<Index>,
    /// Records waiting to be written (`queue.rs`).
    queue: Arc<WriteQueue>,
}

impl Inner {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().expect("lock poisoned")
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
    /// Dropped first: the last handle's drop writes what is queued.
    _writer: Arc<Writer>,
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
        let inner = Arc::new(Inner {
            db,
            files_dir,
            packs: Arc::new(packs),
            path: path.to_owned(),
            max_bytes: options.max_bytes,
            hits: Default::default(),
            misses: Default::default(),
            evictions: Default::default(),
            index: Mutex::new(index),
            queue: Arc::default(),
        });
        let store = CacheStore {
            _writer: Arc::new(Writer::start(inner.clone())),
            inner,
        };

        store.inner.write(&[], &[], false).map_err(db_err)?;
        Ok(store)
    }

    /// Counts chunk lookups: `hits` found, `misses` not.
    pub(crate) fn count_lookups(&self, hits: u64, misses: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.inner.hits.fetch_add(hits, Relaxed);
        self.inner.misses.fetch_add(misses, Relaxed);
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The database, for tables of other crates kept in the same file
    /// (`lazystore-pathinfo`'s NAR roots). Their records are not counted
    /// against the bound and never evicted. Commit writes with
    /// [`CacheStore::commit`].
    pub fn database(&self) -> &Database {
        &self.inner.db
    }

    /// Commits a write of another crate's table as the cache commits its
    /// own: without an fsync. The next durable commit, or closing the
    /// cache, makes it durable; a crash may lose it.
    pub fn commit(&self, mut txn: WriteTransaction) -> Result<(), redb::Error> {
        txn.set_durability(Durability::None)?;
        txn.commit()?;
        Ok(())
    }

    /// The bound, in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
    }

    /// What is cached, and how much it costs against the bound.
    pub fn stats(&self) -> CacheStats {
        let index = self.inner.index();
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let mut stats = CacheStats {
            bytes: index.bytes,
            max_bytes: self.inner.max_bytes,
            hits: get(&self.inner.hits),
            misses: get(&self.inner.misses),
            evictions: get(&self.inner.evictions),
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

    /// Whether the chunk is cached, or queued to be.
    pub fn contains_chunk(&self, digest: &Digest) -> bool {
        let key = Key::chunk(*digest);
        self.inner
            .queue
            .queued(&key)
            .unwrap_or_else(|| self.inner.index().entries.contains_key(&key))
    }

    /// Writes the queued records and the recency updates still in memory,
    /// and makes every commit durable. Blocks: call it from
    /// `spawn_blocking`.
    pub fn flush(&self) -> Result<(), redb::Error> {
        self.write_queued();
        self.inner.write(&[], &[], true)
    }

    /// Waits until the records queued so far are in the file (`queue.rs`),
    /// for tests that look at it.
    #[doc(hidden)]
    pub fn write_queued(&self) {
        self.inner.queue.flush();
    }

    /// The chunk as stored, not decoded or verified: for tests that check
    /// what the cache holds. Writes what is queued first. Blocks.
    #[doc(hidden)]
    pub fn stored_chunk(&self, digest: &Digest) -> Result<Option<EncodedChunk>, redb::Error> {
        self.inner.queue.flush();
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
        self.inner.queue.flush();
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

    /// Records uses of cached records: in memory, written in a batch later.
    /// May write that batch now. Blocks then: call it from `spawn_blocking`.
    pub(crate) fn touch(&self, keys: impl IntoIterator<Item = Key>) {
        let pending = {
            let mut index = self.inner.index();
            for key in keys {
                if index.entries.contains_key(&key) {
                    index.touch(key);
                } else {
                    self.inner.queue.touch(key);
                }
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
    /// evicting what no longer fits: queued, and written with others soon
    /// after (`queue.rs`); lookups find them meanwhile. Blocks only while
    /// the queue is full: call it from `spawn_blocking`.
    pub(crate) fn write(&self, mut inserts: Vec<Record>, drops: Vec<Key>) {
        // Never written (see `Inner::fill`), so not kept meanwhile either.
        inserts.retain(|r| r.cost() <= self.inner.max_bytes);
        self.inner.queue.push(inserts, drops);
    }
}
