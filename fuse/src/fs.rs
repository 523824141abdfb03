//! [`LazyFs`]: the filesystem, as async operations on inode numbers, with
//! no FUSE types in sight, so tests drive it without mounting (the
//! `adapter` module is the thin layer the kernel talks to).
//!
//! The root holds store paths by name, each resolved through the
//! path-info service when first looked up; a directory is fetched when its
//! inode is made (on lookup or readdirplus, which is when its attributes
//! are first needed); a file's chunk list is fetched on its first read, and
//! its chunks as reads reach them, with readahead for sequential readers.
//! Attributes follow Nix's canonical form. Nothing is ever written.
//!
//! Store paths are found through one [`Substituter`] (by default the
//! store's PathInfos; a mount may compose upstream caches behind it), which
//! also resolves the placeholder digests of paths it shows before their
//! contents are stored. Every other digest is read from the store.

use lazystore_castore::error_chain;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use lazystore_castore::blobs::{ChunkIndex, cut};
use lazystore_castore::{Digest, Directory, Node, RetryPolicy};
use lazystore_pathinfo::substitute::{
    PROVISIONAL_TTL, Standing, StoreSubstituter, SubstituteError, Substituter,
};
use lazystore_pathinfo::{Store, StorePath};

use crate::chunks::ChunkFetcher;
use crate::error::FsError;
use crate::inode::{Ino, Inode, InodeTable, Kind, ReadState};
use crate::passthrough::Passthrough;
use crate::retry;
use crate::stats::{Stats, StatsSnapshot};

/// How long the kernel may cache entries and attributes of store content:
/// it never changes, so as long as the kernel likes.
pub const CONTENT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Name of the control directory at the root. Not a valid store path name,
/// so it can't hide one.
pub const CONTROL_DIR_NAME: &str = ".lazystore";

/// Name of the stats file in the control directory.
pub const STATS_FILE_NAME: &str = "stats";

/// The xattr holding a file's or directory's BLAKE3 digest (hex).
pub const DIGEST_XATTR: &str = "user.lazystore.blake3";

/// Reads within this distance of the previous read's end count as
/// sequential: the kernel sends a sequential reader's requests in parallel
/// and they may arrive out of order.
const SEQUENTIAL_SLACK: u64 = 2 << 20;

/// Readahead starts at this window and doubles on each sequential read.
const READAHEAD_INITIAL: u64 = 1 << 20;

/// Chunks fetched ahead are asked for in batches of about this many bytes,
/// so they arrive in parallel.
const READAHEAD_BATCH: u64 = 1 << 20;

/// Directories kept in memory after their inodes are gone.
const DIRECTORY_CACHE_ENTRIES: usize = 4096;

/// Subdirectories fetched at once to answer a readdirplus.
const DIRECTORY_FETCH_CONCURRENCY: usize = 16;

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
    /// Root not listable, default retries, 64 MiB of chunks in memory,
    /// 8 MiB readahead per reader and 32 MiB overall.
    fn default() -> Self {
        FsOptions {
            list_root: false,
            retry: RetryPolicy::default(),
            memory_cache_bytes: 64 << 20,
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
    directories: Mutex<DirectoryCache>,
    // A std Mutex: one insert per opendir of the root and one removal per
    // releasedir, no await.
    root_listings: Mutex<HashMap<u64, Listing>>,
    next_handle: AtomicU64,
    /// Where store paths are found.
    paths: Arc<dyn Substituter>,
    /// Passthrough from whole files in the local cache, if enabled.
    passthrough: Option<Arc<Passthrough>>,
}

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
            directories: Mutex::new(DirectoryCache::default()),
            root_listings: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            paths,
            passthrough: None,
        }
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

    /// Looks `name` up in `parent` and holds one lookup of the result
    /// (released by [`forget`](Self::forget)).
    pub async fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr, FsError> {
        let started = Instant::now();
        self.stats.add(&self.stats.lookups, 1);
        match parent {
            Ino::ROOT if name == CONTROL_DIR_NAME.as_bytes() => {
                Ok(self.fixed_attr(Ino::CONTROL_DIR))
            }
            Ino::ROOT => self.lookup_store_path(name).await,
            Ino::CONTROL_DIR if name == STATS_FILE_NAME.as_bytes() => {
                Ok(self.fixed_attr(Ino::STATS_FILE))
            }
            Ino::CONTROL_DIR => Err(FsError::NotFound { permanent: true }),
            Ino::STATS_FILE => Err(FsError::NotADirectory),
            _ => {
                let p = self.inode(parent)?;
                self.standing(&p)?;
                let dir = self.entries_of(&p, started).await?;
                let node = dir
                    .get(name)
                    .ok_or(FsError::NotFound { permanent: true })?
                    .clone();
                self.child(p.ino, &p.path, name, node).await
            }
        }
    }

    /// A store path at the root: `<hash>-<name>`, where the path-info
    /// service must know the hash and record the same name.
    async fn lookup_store_path(&self, name: &[u8]) -> Result<Attr, FsError> {
        let Some(path) = std::str::from_utf8(name)
            .ok()
            .and_then(|s| StorePath::from_basename(s).ok())
        else {
            return Err(FsError::NotFound { permanent: true });
        };
        if let Some(inode) = self.inodes.lookup_existing(Ino::ROOT, name) {
            return self.attr(&inode);
        }
        let basename: Arc<str> = path.to_string().into();
        let what = || format!("{basename}: finding its path info");
        let found = retry::run(&self.options.retry, &self.stats, &what, || {
            self.paths.find(&path)
        })
        .await;
        self.stats.add(&self.stats.path_infos_fetched, 1);
        match found {
            Ok(Some(info)) => self.child(Ino::ROOT, "", name, info.root).await,
            Ok(None) => Err(FsError::NotFound { permanent: false }),
            Err(e @ SubstituteError::Store(_)) => {
                Err(self.io_error(&basename, "fetching the path info", &e))
            }
            Err(e) => {
                tracing::error!(
                    "{}: not shown: {}; returning ENOENT (the next lookup tries again)",
                    path.to_absolute(),
                    error_chain(&e)
                );
                Err(FsError::NotFound { permanent: false })
            }
        }
    }

    /// The real digest of a file shown as `digest`: itself, or for a
    /// substituter's placeholder, the file at its place in the path's
    /// verified contents, once fetched (here, if nobody has).
    ///
    /// `started` is when the read asking began: a download that failed after
    /// it began (while it waited) fails it too, without a download of its own.
    async fn real_file(
        &self,
        inode: &Inode,
        digest: &Digest,
        started: Instant,
    ) -> Result<Digest, FsError> {
        match self.paths.file(digest, started).await {
            Ok(Some(real)) => Ok(real),
            Ok(None) => Ok(*digest),
            Err(e) => Err(self.io_error(&inode.path, SUBSTITUTING, &e)),
        }
    }

    /// Fails with EIO if `inode` is in a path whose verified contents
    /// turned out to differ from what was shown; tells whether it is shown
    /// provisionally (from claims not yet checked).
    fn standing(&self, inode: &Inode) -> Result<bool, FsError> {
        let basename = inode.path.split('/').next().unwrap_or_default();
        let Ok(path) = StorePath::from_basename(basename) else {
            return Ok(false);
        };
        match self.paths.standing(&path) {
            Standing::Verified => Ok(false),
            Standing::Provisional => Ok(true),
            Standing::Poisoned(e) => Err(self.io_error(&inode.path, "showing it", &e)),
        }
    }

    /// The inode for `name` (with node `node`) in `parent`, made if needed,
    /// with one more lookup held.
    async fn child(
        &self,
        parent: Ino,
        parent_path: &str,
        name: &[u8],
        node: Node,
    ) -> Result<Attr, FsError> {
        if let Some(inode) = self.inodes.lookup_existing(parent, name) {
            return self.attr(&inode);
        }
        let name_str = String::from_utf8_lossy(name);
        let path: Arc<str> = if parent_path.is_empty() {
            name_str.into()
        } else {
            format!("{parent_path}/{name_str}").into()
        };
        let kind = match node {
            Node::Directory { digest, .. } => {
                let dir = tokio::sync::OnceCell::new();
                if !self.paths.defers(&digest) {
                    let _ = dir.set(self.directory(&digest, &path, Instant::now()).await?);
                }
                Kind::Directory { digest, dir }
            }
            Node::File {
                digest,
                size,
                executable,
            } => Kind::File {
                digest,
                size,
                executable,
                index: tokio::sync::OnceCell::new(),
                read_state: Mutex::new(ReadState::default()),
            },
            Node::Symlink { target } => Kind::Symlink { target },
        };
        let (inode, new) = self.inodes.insert(parent, name, |ino| Inode {
            ino,
            parent,
            path,
            kind,
        });
        if let (true, Kind::File { size, .. }) = (new, &inode.kind) {
            self.stats.add(&self.stats.files_presented, 1);
            self.stats.add(&self.stats.bytes_presented, *size);
        }
        self.attr(&inode)
    }

    /// The entries of directory `inode`: fetched when the inode was made,
    /// or now for a directory whose substituter defers its entries until
    /// its path's contents are fetched (here, if nobody has). `started` is
    /// when the request asking began: a fetch that failed after it began
    /// fails it too.
    async fn entries_of(&self, inode: &Inode, started: Instant) -> Result<Arc<Directory>, FsError> {
        let Kind::Directory { digest, dir } = &inode.kind else {
            return Err(FsError::NotADirectory);
        };
        dir.get_or_try_init(|| self.directory(digest, &inode.path, started))
            .await
            .cloned()
    }

    /// The directory `digest`, from memory, from the substituter that
    /// showed it, or fetched from the store and verified. `started` as for
    /// [`entries_of`](Self::entries_of).
    async fn directory(
        &self,
        digest: &Digest,
        path: &Arc<str>,
        started: Instant,
    ) -> Result<Arc<Directory>, FsError> {
        if let Some(d) = self
            .directories
            .lock()
            .expect("directory cache poisoned")
            .get(digest)
        {
            return Ok(d);
        }
        match self.paths.directory(digest, started).await {
            Ok(Some(d)) => return Ok(d),
            Ok(None) => {}
            Err(e) => return Err(self.io_error(path, SUBSTITUTING, &e)),
        }
        let what = || format!("{path}: fetching directory {}", digest.fmt_short());
        let got = retry::run(&self.options.retry, &self.stats, &what, || {
            self.store.directories.get(digest)
        })
        .await
        .map_err(|e| self.io_error(path, "fetching its directory", &e))?;
        self.stats.add(&self.stats.directories_fetched, 1);
        let dir = match got {
            Some(d) if d.digest() == *digest => Arc::new(d),
            Some(_) => {
                return Err(self.io_error(
                    path,
                    "fetching its directory",
                    &Inconsistent("the store returned another directory"),
                ));
            }
            None => {
                return Err(self.io_error(
                    path,
                    "fetching its directory",
                    &Inconsistent("directory missing from the store"),
                ));
            }
        };
        self.directories
            .lock()
            .expect("directory cache poisoned")
            .insert(*digest, dir.clone());
        Ok(dir)
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

    fn fixed_attr(&self, ino: Ino) -> Attr {
        let dir = Attr {
            ino,
            kind: FileKind::Directory,
            size: 0,
            blocks: 0,
            perm: 0o555,
            nlink: 2,
            mtime: canonical_mtime(),
            ttl: CONTENT_TTL,
        };
        match ino {
            Ino::CONTROL_DIR => Attr { size: 1, ..dir },
            Ino::STATS_FILE => {
                let size = self.stats_text().len() as u64;
                // The contents change, so: no caching of the attributes,
                // and an mtime that moves, which makes the kernel drop the
                // cached pages (the mount asks for FUSE_AUTO_INVAL_DATA).
                Attr {
                    kind: FileKind::File,
                    size,
                    blocks: size.div_ceil(512),
                    perm: 0o444,
                    nlink: 1,
                    mtime: SystemTime::now(),
                    ttl: Duration::ZERO,
                    ..dir
                }
            }
            _ => dir,
        }
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

    /// The target of symlink `ino`.
    pub fn readlink(&self, ino: Ino) -> Result<Bytes, FsError> {
        let inode = self.inode(ino)?;
        self.standing(&inode)?;
        match &inode.kind {
            Kind::Symlink { target } => Ok(target.to_bytes()),
            _ => Err(FsError::NotASymlink),
        }
    }

    /// Opens directory `ino` for listing; returns the handle to pass to
    /// [`readdir`](Self::readdir) and [`releasedir`](Self::releasedir).
    /// The root's listing is taken here, once, so offsets stay valid while
    /// the handle is open.
    pub async fn opendir(&self, ino: Ino) -> Result<u64, FsError> {
        if ino != Ino::ROOT {
            self.check_dir(ino)?;
            return Ok(0);
        }
        let listing = self.root_listing().await?;
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.root_listings
            .lock()
            .expect("root listings poisoned")
            .insert(fh, listing);
        Ok(fh)
    }

    /// Closes a handle from [`opendir`](Self::opendir).
    pub fn releasedir(&self, fh: u64) {
        self.root_listings
            .lock()
            .expect("root listings poisoned")
            .remove(&fh);
    }

    fn check_dir(&self, ino: Ino) -> Result<(), FsError> {
        match ino {
            Ino::ROOT | Ino::CONTROL_DIR => Ok(()),
            Ino::STATS_FILE => Err(FsError::NotADirectory),
            _ => match self.inode(ino)?.kind {
                Kind::Directory { .. } => Ok(()),
                _ => Err(FsError::NotADirectory),
            },
        }
    }

    async fn root_listing(&self) -> Result<Listing, FsError> {
        if !self.options.list_root {
            return Err(FsError::RootNotListable);
        }
        let what = || "listing every store path".to_owned();
        let infos: Vec<_> = retry::run(&self.options.retry, &self.stats, &what, || {
            self.store.path_infos.list().try_collect::<Vec<_>>()
        })
        .await
        .map_err(|e| self.io_error(&Arc::from(""), "listing the store paths", &e))?;
        let mut listing: Vec<(Bytes, Node)> = infos
            .into_iter()
            .map(|i| (Bytes::from(i.store_path.to_string()), i.root))
            .collect();
        listing.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Arc::new(listing))
    }

    /// The entries of directory `ino` (handle `fh`) from `offset` on, `.`
    /// and `..` first, each passed to `add` until it returns `true` (full).
    pub async fn readdir(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(DirEntry) -> bool,
    ) -> Result<(), FsError> {
        let children = self.children(ino, fh).await?;
        let parent = self.parent_of(ino)?;
        let dots = [
            (Bytes::from_static(b"."), ino),
            (Bytes::from_static(b".."), parent),
        ];
        for (i, (name, dot)) in dots.into_iter().enumerate().skip(offset as usize) {
            let entry = DirEntry {
                ino: dot,
                offset: i as u64 + 1,
                kind: FileKind::Directory,
                name,
            };
            if add(entry) {
                return Ok(());
            }
        }
        let skip = (offset as usize).saturating_sub(2);
        for (i, (name, node)) in children.iter().enumerate().skip(skip) {
            let ino = self
                .inodes
                .peek(ino, name)
                .unwrap_or_else(|| stand_in_ino(ino, name));
            let entry = DirEntry {
                ino,
                offset: i as u64 + 3,
                kind: kind_of(node),
                name: name.clone(),
            };
            if add(entry) {
                break;
            }
        }
        Ok(())
    }

    /// Like [`readdir`](Self::readdir), with each entry's attributes, and
    /// one lookup held on each entry passed to `add` except `.` and `..`
    /// (as the kernel counts them); an entry refused because `add` is full
    /// holds none.
    pub async fn readdirplus(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&Bytes, u64, &Attr) -> bool,
    ) -> Result<(), FsError> {
        let children = self.children(ino, fh).await?;
        let parent = self.parent_of(ino)?;
        let path = self.path_of(ino)?;
        for (i, (name, dot)) in [(".", ino), ("..", parent)]
            .into_iter()
            .enumerate()
            .skip(offset as usize)
        {
            let attr = self.getattr(dot)?;
            if add(&Bytes::from_static(name.as_bytes()), i as u64 + 1, &attr) {
                return Ok(());
            }
        }
        let skip = (offset as usize).saturating_sub(2);
        // Fetch the subdirectories the next replies will need in parallel:
        // each entry's attributes (nlink) need its directory.
        let wanted: Vec<(Digest, Arc<str>)> = children
            .iter()
            .skip(skip)
            .take(256)
            .filter_map(|(name, node)| match node {
                Node::Directory { digest, .. } if !self.paths.defers(digest) => {
                    Some((*digest, join(&path, name)))
                }
                _ => None,
            })
            .collect();
        futures::stream::iter(wanted)
            .map(|(digest, p)| async move {
                let _ = self.directory(&digest, &p, Instant::now()).await;
            })
            .buffer_unordered(DIRECTORY_FETCH_CONCURRENCY)
            .collect::<()>()
            .await;
        for (i, (name, node)) in children.iter().enumerate().skip(skip) {
            self.stats.add(&self.stats.lookups, 1);
            let attr = self.child(ino, &path, name, node.clone()).await?;
            if add(name, i as u64 + 3, &attr) {
                self.forget(attr.ino, 1);
                break;
            }
        }
        Ok(())
    }

    fn parent_of(&self, ino: Ino) -> Result<Ino, FsError> {
        Ok(match ino {
            Ino::ROOT | Ino::CONTROL_DIR => Ino::ROOT,
            _ => self.inode(ino)?.parent,
        })
    }

    fn path_of(&self, ino: Ino) -> Result<Arc<str>, FsError> {
        Ok(match ino {
            Ino::ROOT => Arc::from(""),
            Ino::CONTROL_DIR => Arc::from(CONTROL_DIR_NAME),
            _ => self.inode(ino)?.path.clone(),
        })
    }

    /// The children of directory `ino`, in name order.
    async fn children(&self, ino: Ino, fh: u64) -> Result<Listing, FsError> {
        let started = Instant::now();
        match ino {
            Ino::ROOT => {
                let open = self
                    .root_listings
                    .lock()
                    .expect("root listings poisoned")
                    .get(&fh)
                    .cloned();
                match open {
                    Some(l) => Ok(l),
                    None => self.root_listing().await,
                }
            }
            // The stats file is listed, but has no node; readdirplus on the
            // control directory is answered from its fixed attributes.
            Ino::CONTROL_DIR => Ok(Arc::new(Vec::new())),
            _ => {
                let inode = self.inode(ino)?;
                if !matches!(inode.kind, Kind::Directory { .. }) {
                    return Err(FsError::NotADirectory);
                }
                self.standing(&inode)?;
                let dir = self.entries_of(&inode, started).await?;
                Ok(Arc::new(
                    dir.entries()
                        .map(|(n, node)| (n.to_bytes(), node.clone()))
                        .collect(),
                ))
            }
        }
    }

    /// Reads up to `size` bytes of file `ino` at `offset`: only the chunks
    /// overlapping the range are fetched (each verified), and a sequential
    /// reader has the following chunks fetched ahead.
    pub async fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Bytes, FsError> {
        let started = Instant::now();
        self.stats.add(&self.stats.reads, 1);
        if ino == Ino::STATS_FILE {
            let text = Bytes::from(self.stats_text());
            let from = (offset as usize).min(text.len());
            let to = (from + size as usize).min(text.len());
            return Ok(text.slice(from..to));
        }
        let inode = self.inode(ino)?;
        let Kind::File {
            digest,
            size: file_size,
            index,
            read_state,
            ..
        } = &inode.kind
        else {
            return Err(match inode.kind {
                Kind::Directory { .. } => FsError::IsADirectory,
                _ => FsError::NotAFile,
            });
        };
        let end = offset.saturating_add(size as u64).min(*file_size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let index = index
            .get_or_try_init(|| self.chunk_index(&inode, digest, *file_size, started))
            .await?;
        let range = index.overlapping(offset, end);
        self.read_ahead(&inode, index, read_state, offset, end, range.end - 1);
        let digests: Vec<Digest> = index.meta.chunks[range.clone()]
            .iter()
            .map(|c| c.digest)
            .collect();
        let chunks = self
            .chunks
            .get(&digests, &inode.path)
            .await
            .map_err(|e| self.io_error(&inode.path, "reading", &*e))?;
        // A chunk verified against its digest can still contradict the
        // chunk list's sizes, if the store's list is wrong.
        let sizes_match = chunks
            .iter()
            .zip(&index.meta.chunks[range.clone()])
            .all(|(c, entry)| c.len() as u64 == entry.size);
        if !sizes_match {
            return Err(self.io_error(
                &inode.path,
                "reading",
                &Inconsistent("a chunk's length differs from its chunk list entry"),
            ));
        }
        let first_start = index.start(range.start);
        let mut pieces = cut(chunks, offset - first_start, end - first_start);
        let out = if pieces.len() == 1 {
            pieces.pop().expect("one piece")
        } else {
            let mut out = BytesMut::with_capacity((end - offset) as usize);
            for piece in &pieces {
                out.extend_from_slice(piece);
            }
            out.freeze()
        };
        self.stats.add(&self.stats.bytes_read, out.len() as u64);
        Ok(out)
    }

    async fn chunk_index(
        &self,
        inode: &Inode,
        digest: &Digest,
        size: u64,
        started: Instant,
    ) -> Result<Arc<ChunkIndex>, FsError> {
        let digest = &self.real_file(inode, digest, started).await?;
        let what = || format!("{}: fetching its chunk list", inode.path);
        let meta = retry::run(&self.options.retry, &self.stats, &what, || {
            self.store.blobs.stat(digest)
        })
        .await
        .map_err(|e| self.io_error(&inode.path, "fetching its chunk list", &e))?;
        self.stats.add(&self.stats.chunk_lists_fetched, 1);
        match meta {
            Some(meta) if meta.size == size => Ok(Arc::new(ChunkIndex::new(meta))),
            Some(_) => Err(self.io_error(
                &inode.path,
                "fetching its chunk list",
                &Inconsistent("the chunk list's size differs from the file's"),
            )),
            None => Err(self.io_error(
                &inode.path,
                "fetching its chunk list",
                &Inconsistent("blob missing from the store"),
            )),
        }
    }

    /// Updates the reader's position and, if it reads sequentially, starts
    /// fetching the chunks after `last` up to the (doubling) window.
    fn read_ahead(
        &self,
        inode: &Inode,
        index: &ChunkIndex,
        state: &Mutex<ReadState>,
        offset: u64,
        end: u64,
        last: usize,
    ) {
        let max = self.options.readahead_bytes;
        let (from, to) = {
            let mut s = state.lock().expect("read state poisoned");
            if offset == 0 {
                // A pass from the start: sequential from here.
                *s = ReadState::default();
            }
            let jump = |s: &mut ReadState| {
                *s = ReadState {
                    started: true,
                    next: end,
                    window: 0,
                    ahead_until: last + 1,
                };
            };
            if max == 0 || (!s.started && offset != 0) {
                jump(&mut s);
                return;
            }
            if s.started {
                if offset + SEQUENTIAL_SLACK < s.next || offset > s.next + SEQUENTIAL_SLACK {
                    jump(&mut s);
                    return;
                }
                if end <= s.next {
                    // Behind the furthest read (a parallel read arriving
                    // late, or a re-read): nothing new to fetch ahead.
                    return;
                }
            }
            s.started = true;
            s.window = (s.window * 2).clamp(READAHEAD_INITIAL.min(max), max);
            s.next = s.next.max(end);
            let limit = s.next + s.window;
            let from = s.ahead_until.max(last + 1);
            let mut to = from;
            while to < index.len() && index.start(to) < limit {
                to += 1;
            }
            s.ahead_until = s.ahead_until.max(to);
            (from, to)
        };
        if from < to {
            let ahead: Vec<(Digest, u64)> = index.meta.chunks[from..to]
                .iter()
                .map(|c| (c.digest, c.size))
                .collect();
            self.chunks.prefetch(&ahead, READAHEAD_BATCH, &inode.path);
        }
    }

    /// The value of xattr `name` of `ino`.
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Bytes, FsError> {
        if name != DIGEST_XATTR.as_bytes() {
            return Err(FsError::NoAttribute);
        }
        match &self.inode(ino).map(|i| self.digest_of(&i)) {
            Ok(Some(d)) => Ok(Bytes::from(d.to_string())),
            _ => Err(FsError::NoAttribute),
        }
    }

    /// The xattr names of `ino`, each NUL-terminated.
    pub fn listxattr(&self, ino: Ino) -> Result<Bytes, FsError> {
        match self.inodes.get(ino).and_then(|i| self.digest_of(&i)) {
            Some(_) => Ok(Bytes::from(format!("{DIGEST_XATTR}\0"))),
            None => Ok(Bytes::new()),
        }
    }

    fn digest_of(&self, inode: &Inode) -> Option<Digest> {
        match &inode.kind {
            Kind::Directory { digest, .. } | Kind::File { digest, .. } => {
                (!self.paths.is_placeholder(digest)).then_some(*digest)
            }
            _ => None,
        }
    }

    fn stats_text(&self) -> String {
        let mut text = self.stats.snapshot().to_string();
        text.push_str(&format!(
            "inodes {}\nmemory_cache_bytes {}\n",
            self.inodes.len(),
            self.chunks.memory_bytes()
        ));
        if let Some(p) = &self.passthrough {
            // 1 while the kernel takes backing files, 0 once it refused.
            text.push_str(&format!("passthrough {}\n", u8::from(p.usable())));
        }
        for (name, value) in self.paths.counters() {
            text.push_str(&format!("{name} {value}\n"));
        }
        text
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

/// Directories by digest, the oldest dropped first when full.
#[derive(Default)]
struct DirectoryCache {
    map: HashMap<Digest, Arc<Directory>>,
    order: VecDeque<Digest>,
}

impl DirectoryCache {
    fn get(&self, d: &Digest) -> Option<Arc<Directory>> {
        self.map.get(d).cloned()
    }

    fn insert(&mut self, d: Digest, dir: Arc<Directory>) {
        if self.map.insert(d, dir).is_none() {
            self.order.push_back(d);
            if self.order.len() > DIRECTORY_CACHE_ENTRIES
                && let Some(old) = self.order.pop_front()
            {
                self.map.remove(&old);
            }
        }
    }
}
