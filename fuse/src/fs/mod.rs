//! [`LazyFs`]: the filesystem, as async operations on inode numbers, with
//! no FUSE types in sight, so tests drive it without mounting (the
//! `adapter` module is the thin layer the kernel talks to).
//!
//! The root holds store paths by name, each found through the
//! substituter when first looked up; a directory is fetched when its
//! inode is made (on lookup or readdirplus, which is when its attributes
//! are first needed); a file's chunk list is fetched on its first read, and
//! its chunks as reads reach them, with readahead for sequential readers.
//! Attributes follow Nix's canonical form. Nothing is ever written.
//!
//! Store paths are found through one [`Substituter`] (by default the
//! store's PathInfos; a mount may compose other sources behind it), which
//! also resolves the placeholder digests of paths it shows before their
//! contents are stored. Every other digest is read from the store.
//!
//! This file holds the filesystem's state, attributes and inodes; its
//! operations are in `lookup`, `readdir`, `read` and `control` (the stats
//! file and the digest xattr).

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use lazystore_castore::blobs::{ChunkIndex, cut};
use lazystore_castore::error_chain;
use lazystore_castore::{BlobMeta, Digest, Directory, Node, RetryPolicy};
use lazystore_pathinfo::substitute::{
    PROVISIONAL_TTL, Standing, StoreSubstituter, SubstituteError, Substituter,
};
use lazystore_pathinfo::{Store, StorePath};

use crate::chunks::ChunkFetcher;
use crate::error::FsError;
use crate::inode::{Ino, Inode, InodeTable, Kind, Neighbours, ReadState};
use crate::passthrough::Passthrough;

use crate::stats::{CounterSource, Stats, StatsSnapshot, retried};

mod control;
mod lookup;

pub use control::{CONTROL_DIR_NAME, DIGEST_XATTR, STATS_FILE_NAME};
use lookup::{DIRECTORY_CACHE_ENTRIES, Fifo};
mod read;
mod readdir;
mod walk;

/// How long the kernel may cache entries and attributes of store content:
/// it never changes, so as long as the kernel likes.
pub const CONTENT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// How a [`LazyFs`] behaves.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Whether the root lists every known store path (else reading it
    /// fails with EPERM; lookups by name work either way).
    pub list_root: bool,
    /// How store calls are retried before a read fails with EIO.
    pub retry: RetryPolicy,
    /// Bytes of verified chunks kept in memory.
    pub memory_cache_bytes: u64,
    /// Most bytes fetched ahead of one sequential reader.
    pub readahead_bytes: u64,
    /// Most bytes being fetched ahead at once, over all readers.
    pub readahead_total_bytes: u64,
}

impl Default for FsOptions {
    /// Root not listable, default retries, 32 MiB of chunks in memory,
    /// 8 MiB readahead per reader and 32 MiB overall. (64 MiB of chunks
    /// took the mount to 231–242 MiB resident in a cold walk of a 1.3 GB
    /// toolchain; 32 MiB, with the local cache's 16 MiB page cache, to 186–
    /// 188 MiB, and the walk refetched no chunk and was no slower: the walk
    /// stream leads its readers by at most 16 MiB.)
    fn default() -> Self {
        FsOptions {
            list_root: false,
            retry: RetryPolicy::default(),
            memory_cache_bytes: 32 << 20,
            readahead_bytes: 8 << 20,
            readahead_total_bytes: 32 << 20,
        }
    }
}

/// The type of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A directory.
    Directory,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
}

/// An inode's attributes, as Nix canonicalises them: owner root, mtime 1,
/// files 0444, executables and directories 0555, symlinks 0777.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: Ino,
    /// Type.
    pub kind: FileKind,
    /// Bytes for files, target length for symlinks, entries for directories.
    pub size: u64,
    /// 512-byte blocks the contents take.
    pub blocks: u64,
    /// Permission bits.
    pub perm: u16,
    /// Links: 1, or 2 plus the subdirectories for a directory.
    pub nlink: u32,
    /// Modification (and access and change) time.
    pub mtime: SystemTime,
    /// How long the kernel may cache this (and the entry naming it).
    pub ttl: Duration,
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Its inode number if it has one now; otherwise a stable stand-in
    /// (only `readdirplus` and `lookup` make inodes).
    pub ino: Ino,
    /// Offset of the next entry.
    pub offset: u64,
    /// Type.
    pub kind: FileKind,
    /// Name.
    pub name: Bytes,
}

/// A directory's entries in name order, as listed.
type Listing = Arc<Vec<(Bytes, Node)>>;

/// The filesystem core.
pub struct LazyFs {
    store: Store,
    options: FsOptions,
    inodes: InodeTable,
    chunks: Arc<ChunkFetcher>,
    stats: Arc<Stats>,
    // A std Mutex: a map lookup or insert per directory fetch, no await.
    directories: Arc<Mutex<Fifo<Arc<Directory>>>>,
    // A std Mutex: one insert per opendir of the root and one removal per
    // releasedir, no await.
    root_listings: Mutex<HashMap<u64, Listing>>,
    next_handle: AtomicU64,
    /// Where store paths are found.
    paths: Arc<dyn Substituter>,
    /// Passthrough from whole files in the local cache, if enabled.
    passthrough: Option<Arc<Passthrough>>,
    /// Counters shown after the filesystem's own.
    more_counters: Vec<Arc<dyn CounterSource>>,
    /// The size up to which a file is a single chunk, asked of the store
    /// once, in the background (`read.rs`, `chunk_index`); whether the
    /// question is out.
    one_chunk_up_to: Arc<std::sync::OnceLock<u64>>,
    asking_chunker: Arc<std::sync::atomic::AtomicBool>,
    /// Chunk lists fetched ahead of their files' first reads (`read.rs`),
    /// taken by those reads.
    chunk_lists_ahead: Arc<Mutex<Fifo<BlobMeta>>>,
    /// The reads of each store path, by its basename: where a walk is
    /// noticed and streamed (`walk.rs`).
    // A std Mutex: a map lookup per read, no await.
    walks: Arc<Mutex<HashMap<Arc<str>, Arc<walk::Walk>>>>,
    /// Where each build's reads are recorded, if asked (`trace.rs`).
    traces: Option<Arc<crate::trace::Traces>>,
    /// Traces to prefetch from when their first file is read (`read.rs`).
    prefetch: Option<Arc<crate::trace::TracePrefetch>>,
}

/// Chunk lists kept ahead at most (some 100 bytes each plus 40 a chunk).
const CHUNK_LISTS_KEPT: usize = 4096;

impl LazyFs {
    /// A filesystem presenting `store`, counting into `stats`.
    pub fn new(store: Store, options: FsOptions, stats: Arc<Stats>) -> Self {
        let chunks = Arc::new(ChunkFetcher::new(
            store.blobs.clone(),
            options.retry,
            stats.clone(),
            options.memory_cache_bytes,
            options.readahead_total_bytes,
        ));
        let paths = Arc::new(StoreSubstituter::new(store.path_infos.clone(), "the store"));
        LazyFs {
            store,
            options,
            inodes: InodeTable::new(),
            chunks,
            stats,
            directories: Arc::new(Mutex::new(Fifo::new(DIRECTORY_CACHE_ENTRIES))),
            walks: Arc::default(),
            traces: None,
            prefetch: None,
            root_listings: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            one_chunk_up_to: Arc::default(),
            asking_chunker: Arc::default(),
            chunk_lists_ahead: Arc::new(Mutex::new(Fifo::new(CHUNK_LISTS_KEPT))),
            paths,
            passthrough: None,
            more_counters: Vec::new(),
        }
    }

    /// Shows `source`'s counters in the stats file after the
    /// filesystem's own (and the substituters').
    pub fn with_counters(mut self, source: Arc<dyn CounterSource>) -> Self {
        self.more_counters.push(source);
        self
    }

    /// The counters of the sources given to [`LazyFs::with_counters`].
    pub fn more_counters(&self) -> Vec<(&'static str, u64)> {
        self.more_counters
            .iter()
            .flat_map(|s| s.counters())
            .collect()
    }

    /// Finds store paths through `paths` instead of the store's PathInfos
    /// alone (a [`Substituters`] composition with the store first, say):
    /// what it shows, the filesystem shows.
    ///
    /// [`Substituters`]: lazystore_pathinfo::substitute::Substituters
    pub fn with_substituter(self, paths: Arc<dyn Substituter>) -> Self {
        LazyFs { paths, ..self }
    }

    /// Reads files the local `cache` holds whole by FUSE passthrough, and
    /// writes out whole files whose chunks it has (see the `passthrough`
    /// module). Effective only if the kernel offers passthrough.
    pub fn with_passthrough(self, cache: lazystore_castore::CacheStore) -> Self {
        LazyFs {
            passthrough: Some(Arc::new(Passthrough::new(cache))),
            ..self
        }
    }

    /// Records which files each build reads into `traces`.
    pub fn with_traces(self, traces: Arc<crate::trace::Traces>) -> Self {
        LazyFs {
            traces: Some(traces),
            ..self
        }
    }

    /// Prefetches the files of `traces`, each when its first file is read.
    pub fn with_prefetch(self, traces: Arc<crate::trace::TracePrefetch>) -> Self {
        LazyFs {
            prefetch: Some(traces),
            ..self
        }
    }

    /// The traces reads are recorded into, if any.
    pub(crate) fn traces(&self) -> Option<&Arc<crate::trace::Traces>> {
        self.traces.as_ref()
    }

    /// The absolute path of inode `ino` under the store directory.
    pub(crate) fn store_path_string(&self, ino: Ino) -> Option<String> {
        let inode = self.inodes.get(ino)?;
        Some(format!("{}/{}", lazystore_pathinfo::STORE_DIR, inode.path))
    }

    /// The passthrough state, if enabled.
    pub(crate) fn passthrough(&self) -> Option<&Arc<Passthrough>> {
        self.passthrough.as_ref()
    }

    /// The blob digest and size of regular file `ino`, if its contents are
    /// known (not a substituter's placeholder).
    pub(crate) fn file_blob(&self, ino: Ino) -> Option<(Digest, u64)> {
        let inode = self.inodes.get(ino)?;
        let Kind::File { size, .. } = &inode.kind else {
            return None;
        };
        Some((self.digest_of(&inode)?, *size))
    }

    /// The blob store.
    pub(crate) fn blobs(&self) -> &lazystore_castore::Blobs {
        &self.store.blobs
    }

    /// The counters.
    pub(crate) fn counters(&self) -> &Stats {
        &self.stats
    }

    /// The options it runs with.
    pub fn options(&self) -> &FsOptions {
        &self.options
    }

    /// The counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Live inodes, not counting the root and the control directory.
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// Bytes of chunks held in memory.
    pub fn memory_cache_bytes(&self) -> u64 {
        self.chunks.memory_bytes()
    }

    /// Logs a failure with the store path and file and makes it an EIO.
    fn io_error(
        &self,
        path: &Arc<str>,
        doing: &str,
        e: &(dyn std::error::Error + 'static),
    ) -> FsError {
        let store_path = path.split('/').next().unwrap_or_default();
        let file = path.get(store_path.len()..).unwrap_or_default();
        let file = if file.is_empty() { "/" } else { file };
        let message = format!("{doing}: {}", error_chain(e));
        tracing::error!("/nix/store/{store_path} {file}: {message}; returning EIO");
        self.stats.add(&self.stats.io_errors, 1);
        FsError::Io {
            path: path.clone(),
            message,
        }
    }

    /// Releases `n` lookups of `ino`.
    pub fn forget(&self, ino: Ino, n: u64) {
        self.inodes.forget(ino, n);
    }

    /// The attributes of `ino`.
    pub fn getattr(&self, ino: Ino) -> Result<Attr, FsError> {
        match ino {
            Ino::ROOT | Ino::CONTROL_DIR | Ino::STATS_FILE => Ok(self.fixed_attr(ino)),
            _ => self.attr(&*self.inode(ino)?),
        }
    }

    fn inode(&self, ino: Ino) -> Result<Arc<Inode>, FsError> {
        self.inodes.get(ino).ok_or(FsError::UnknownInode(ino.0))
    }

    /// The attributes of `inode`: kept by the kernel as long as it likes,
    /// except those shown from a listing not yet checked against its NAR.
    fn attr(&self, inode: &Inode) -> Result<Attr, FsError> {
        let listed = self.standing(inode)?;
        let base = Attr {
            ino: inode.ino,
            kind: FileKind::File,
            size: 0,
            blocks: 0,
            perm: 0o444,
            nlink: 1,
            mtime: canonical_mtime(),
            ttl: if listed { PROVISIONAL_TTL } else { CONTENT_TTL },
        };
        Ok(match &inode.kind {
            Kind::Directory { dir, .. } => match dir.get() {
                Some(dir) => Attr {
                    kind: FileKind::Directory,
                    size: dir.len() as u64,
                    perm: 0o555,
                    nlink: 2 + dir.subdirectories().count() as u32,
                    ..base
                },
                // Not fetched yet: the kernel asks again after a listing's
                // TTL (the path stands as listed until its NAR is here).
                None => Attr {
                    kind: FileKind::Directory,
                    perm: 0o555,
                    nlink: 2,
                    ..base
                },
            },
            Kind::File {
                size, executable, ..
            } => Attr {
                size: *size,
                blocks: size.div_ceil(512),
                perm: if *executable { 0o555 } else { 0o444 },
                ..base
            },
            Kind::Symlink { target } => Attr {
                kind: FileKind::Symlink,
                size: target.as_bytes().len() as u64,
                perm: 0o777,
                ..base
            },
        })
    }
}

/// Nix's canonical timestamp: 1 second after the epoch.
fn canonical_mtime() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1)
}

fn kind_of(node: &Node) -> FileKind {
    match node {
        Node::Directory { .. } => FileKind::Directory,
        Node::File { .. } => FileKind::File,
        Node::Symlink { .. } => FileKind::Symlink,
    }
}

fn join(parent: &str, name: &[u8]) -> Arc<str> {
    let name = String::from_utf8_lossy(name);
    if parent.is_empty() {
        name.into()
    } else {
        format!("{parent}/{name}").into()
    }
}

/// A d_ino for an entry that has no inode yet: stable, non-zero, and with
/// the top bit set, so it never equals a real inode number.
fn stand_in_ino(parent: Ino, name: &[u8]) -> Ino {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    name.hash(&mut h);
    Ino(h.finish() | 1 << 63)
}

/// What failed when a substituter could not give a path's contents.
const SUBSTITUTING: &str = "substituting its store path";

/// The store holds something that contradicts itself.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Inconsistent(&'static str);
