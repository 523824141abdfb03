//! The inode table: which inode number means which node, and how many
//! lookups the kernel holds on each.
//!
//! An inode is made per (parent inode, name) on the first lookup (or
//! readdirplus entry) and lives until the kernel forgets every lookup it
//! was given, so a long-running mount holds only what the kernel caches.
//! Identical contents under two names get two inodes: a file's mode follows
//! its own executable bit, and directories are never aliased, which the
//! kernel's dentry cache does not allow. Numbers are never reused, so the
//! generation is always 0.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lazystore_castore::blobs::ChunkIndex;
use lazystore_castore::{Digest, Directory, SymlinkTarget};

/// An inode number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ino(pub u64);

impl Ino {
    /// The mount's root: the store directory.
    pub const ROOT: Ino = Ino(1);
    /// `.lazystore`, the control directory at the root.
    pub const CONTROL_DIR: Ino = Ino(2);
    /// `.lazystore/stats`.
    pub const STATS_FILE: Ino = Ino(3);
    /// The first number given to store nodes.
    const FIRST_DYNAMIC: u64 = 16;
}

impl fmt::Display for Ino {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a sequential reader of a file is, for readahead.
#[derive(Debug, Default)]
pub(crate) struct ReadState {
    /// Whether the file has been read before.
    pub(crate) started: bool,
    /// End of the furthest read so far.
    pub(crate) next: u64,
    /// Bytes to fetch ahead of the reader; 0 when reads are not sequential.
    pub(crate) window: u64,
    /// Chunks below this index have been fetched or asked for ahead.
    pub(crate) ahead_until: usize,
}

/// How far a directory's files were fetched ahead of its readers: in
/// windows, the next asked for once a read reaches the middle of the last.
#[derive(Debug, Default)]
pub(crate) enum Neighbours {
    /// Nothing yet.
    #[default]
    None,
    /// One file of it was read: nothing fetched ahead yet (a build reading
    /// one file of a directory, or one here and one there, pays nothing).
    Seen,
    /// Entries up to `resume_after` were fetched; the next window is
    /// asked when a file from `refill_at` on is read.
    Until {
        refill_at: Bytes,
        resume_after: Bytes,
        /// The last window's size, in first windows.
        scale: usize,
    },
    /// Every entry was.
    All,
}

/// What an inode is.
pub(crate) enum Kind {
    /// A directory of a store path, fetched when its inode was made, or
    /// (the root of an upstream path shown before its NAR) on first use.
    Directory {
        digest: Digest,
        dir: tokio::sync::OnceCell<Arc<Directory>>,
        /// How far its files were fetched ahead of reads (`read.rs`).
        ahead: Mutex<Neighbours>,
    },
    /// A regular file; its chunk list is fetched on the first read.
    File {
        digest: Digest,
        size: u64,
        executable: bool,
        index: tokio::sync::OnceCell<Arc<ChunkIndex>>,
        // A std Mutex: updated in a few instructions per read, never held
        // across an await, so concurrent reads are not serialized on it.
        read_state: Mutex<ReadState>,
    },
    /// A symlink.
    Symlink { target: SymlinkTarget },
}

/// One inode of store content (the root and the control directory have
/// fixed numbers and no entry in the table).
pub(crate) struct Inode {
    pub(crate) ino: Ino,
    pub(crate) parent: Ino,
    /// `<hash>-<name>/path/inside`, for log lines; empty for the root.
    pub(crate) path: Arc<str>,
    pub(crate) kind: Kind,
}

struct Entry {
    inode: Arc<Inode>,
    /// Lookups the kernel holds; the inode goes when this reaches 0.
    lookups: u64,
    /// The key in `by_name`, to remove it with the inode.
    name: Bytes,
}

/// Inodes by number, and by (parent, name) for reuse while alive.
pub(crate) struct InodeTable {
    // A std Mutex: every critical section is a few map operations with no
    // await, and a read/write split would not help (lookups write counts).
    inner: Mutex<Inner>,
}

struct Inner {
    by_ino: HashMap<Ino, Entry>,
    by_name: HashMap<(Ino, Bytes), Ino>,
    next: u64,
}

impl InodeTable {
    pub(crate) fn new() -> Self {
        InodeTable {
            inner: Mutex::new(Inner {
                by_ino: HashMap::new(),
                by_name: HashMap::new(),
                next: Ino::FIRST_DYNAMIC,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("inode table poisoned")
    }

    /// The live inode `ino`.
    pub(crate) fn get(&self, ino: Ino) -> Option<Arc<Inode>> {
        self.lock().by_ino.get(&ino).map(|e| e.inode.clone())
    }

    /// The number of the live inode for `name` in `parent`, if any.
    pub(crate) fn peek(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        self.lock()
            .by_name
            .get(&(parent, Bytes::copy_from_slice(name)))
            .copied()
    }

    /// The live inode for `name` in `parent`, with one more lookup held.
    pub(crate) fn lookup_existing(&self, parent: Ino, name: &[u8]) -> Option<Arc<Inode>> {
        let mut inner = self.lock();
        let ino = *inner.by_name.get(&(parent, Bytes::copy_from_slice(name)))?;
        let e = inner
            .by_ino
            .get_mut(&ino)
            .expect("by_name points at a live inode");
        e.lookups += 1;
        Some(e.inode.clone())
    }

    /// The inode for `name` in `parent` with one more lookup held: the live
    /// one if another lookup made it meanwhile, else a new one made by
    /// `make` from its number. The bool tells whether it is new.
    pub(crate) fn insert(
        &self,
        parent: Ino,
        name: &[u8],
        make: impl FnOnce(Ino) -> Inode,
    ) -> (Arc<Inode>, bool) {
        let mut inner = self.lock();
        let name = Bytes::copy_from_slice(name);
        if let Some(&ino) = inner.by_name.get(&(parent, name.clone())) {
            let e = inner
                .by_ino
                .get_mut(&ino)
                .expect("by_name points at a live inode");
            e.lookups += 1;
            return (e.inode.clone(), false);
        }
        let ino = Ino(inner.next);
        inner.next += 1;
        let inode = Arc::new(make(ino));
        inner.by_name.insert((parent, name.clone()), ino);
        inner.by_ino.insert(
            ino,
            Entry {
                inode: inode.clone(),
                lookups: 1,
                name,
            },
        );
        (inode, true)
    }

    /// Drops `n` lookups of `ino`; the inode goes with its last lookup.
    pub(crate) fn forget(&self, ino: Ino, n: u64) {
        let mut inner = self.lock();
        let Some(e) = inner.by_ino.get_mut(&ino) else {
            return;
        };
        e.lookups = e.lookups.saturating_sub(n);
        if e.lookups == 0 {
            let e = inner.by_ino.remove(&ino).expect("just found");
            inner.by_name.remove(&(e.inode.parent, e.name));
        }
    }

    /// Live inodes (not counting the fixed ones).
    pub(crate) fn len(&self) -> usize {
        self.lock().by_ino.len()
    }
}
