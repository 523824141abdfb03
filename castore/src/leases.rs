//! Leases: what a serving store's writers have touched lately, so a
//! garbage collection running beside them keeps it ([`Leases`]), and the
//! service layers that record the touches ([`LeasedBlobs`],
//! [`LeasedDirectories`]).
//!
//! The race they close: an import asks which chunks are missing, is told
//! chunk X is present (an unreferenced leftover of a deleted path), skips
//! it, and publishes a path naming X after a sweep dropped it. Every call
//! by which a writer learns of, or writes, an object — `missing_chunks`,
//! a blob `stat`, any put — touches the object's digest *before* the call
//! reaches the store. A sweep keeps every object touched since `W` (the
//! lease) before its collection began, and the chunks and subtrees those
//! objects name. The last check of the touches happens under the leases'
//! lock with the sweep's write transaction open, and the sweep commits
//! before letting go, so a touch is either seen by the sweep or happens
//! after its commit (and then the store answers "missing" and the writer
//! writes the object again). The proof sketch is in `docs/design.md`
//! ("Garbage collection").
//!
//! Reads of contents (`read_chunks`, directory `get`) touch nothing: what
//! readers read through a published path is marked from that path. A
//! chunk list's `stat` and a tree's `get_recursive` do touch: they are how
//! a writer learns that a file or a tree is stored (a mount's `stat`s
//! touch too, which only keeps more).
//!
//! Memory: touches are kept in two generations of at most `W` each, so
//! the sets hold the objects touched in the last `W` to `2W`, about 80
//! bytes each (a 10 GB import of 64 KiB chunks: some 15 MB).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::blobs::{BlobMeta, BlobObserver, BlobService, EncodedChunk, ObservedBlobService};
use crate::{Digest, Directory, DirectoryError, DirectoryService};

/// How long a writer's touch protects an object by default: an import (or
/// upload) whose first `missing_chunks` is older than this when it
/// publishes may find its path refused after a collection, and uploads
/// again.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3600);

/// The objects writers touched lately. Cheap to clone (shared).
#[derive(Clone)]
pub struct Leases {
    lease: Duration,
    state: Arc<Mutex<State>>,
}

struct State {
    /// Touched since `since`.
    current: HashSet<Digest>,
    /// Touched in the generation before.
    previous: HashSet<Digest>,
    since: Instant,
    /// Collections running: generations are not retired meanwhile, so
    /// everything touched since a lease before the oldest began is kept.
    collecting: usize,
}

/// The touches, held still: no writer can touch (and so learn an object is
/// present) while a sweep holds this, and the sweep commits before letting
/// it go.
pub struct Touched<'a>(MutexGuard<'a, State>);

impl Touched<'_> {
    /// Whether `digest` was touched within the lease.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.0.current.contains(digest) || self.0.previous.contains(digest)
    }

    /// Every digest touched within the lease.
    pub fn iter(&self) -> impl Iterator<Item = &Digest> {
        self.0.current.iter().chain(self.0.previous.iter())
    }
}

/// A collection under way; generations stay until it is dropped.
pub struct Collecting {
    leases: Leases,
}

impl Drop for Collecting {
    fn drop(&mut self) {
        self.leases.lock().collecting -= 1;
    }
}

impl Leases {
    /// Leases of `lease` each.
    pub fn new(lease: Duration) -> Self {
        Leases {
            lease,
            state: Arc::new(Mutex::new(State {
                current: HashSet::new(),
                previous: HashSet::new(),
                since: Instant::now(),
                collecting: 0,
            })),
        }
    }

    /// The lease.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while inserting leaves at worst an extra touch.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that a writer touched `digests`.
    pub fn touch<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) {
        let mut state = self.lock();
        if state.collecting == 0 && state.since.elapsed() >= self.lease {
            state.previous = std::mem::take(&mut state.current);
            state.since = Instant::now();
        }
        state.current.extend(digests);
    }

    /// Marks a collection as begun: everything touched from now on, and
    /// since one lease before now, stays in the sets until the returned
    /// guard is dropped.
    pub fn begin_collection(&self) -> Collecting {
        self.lock().collecting += 1;
        Collecting {
            leases: self.clone(),
        }
    }

    /// The touches, held still (see [`Touched`]).
    pub fn hold(&self) -> Touched<'_> {
        Touched(self.lock())
    }

    /// A copy of the touches now, to do the slow part of a sweep's check
    /// without holding them still (then only what was touched since needs
    /// the hold).
    pub fn snapshot(&self) -> HashSet<Digest> {
        let state = self.lock();
        state.current.union(&state.previous).copied().collect()
    }

    /// Objects in the sets now.
    pub fn len(&self) -> usize {
        let state = self.lock();
        state.current.len() + state.previous.len()
    }

    /// Whether nothing was touched within the lease.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Touches every object a blob service's writers learn of or write.
pub struct BlobToucher(Leases);

#[async_trait]
impl BlobObserver for BlobToucher {
    fn before_stat(&self, blob: &Digest) {
        self.0.touch([blob]);
    }

    fn before_query(&self, chunks: &[Digest]) {
        self.0.touch(chunks);
    }

    fn before_put(&self, chunks: &[EncodedChunk]) {
        self.0.touch(chunks.iter().map(|c| &c.digest));
    }

    fn before_put_blob(&self, blob: &Digest, meta: &BlobMeta) {
        self.0
            .touch(std::iter::once(blob).chain(meta.chunks.iter().map(|c| &c.digest)));
    }
}

/// A blob service whose writers' touches are leased.
pub type LeasedBlobs = ObservedBlobService<BlobToucher>;

/// `inner`, its writers' touches recorded in `leases`.
pub fn leased_blobs(inner: Arc<dyn BlobService>, leases: Leases) -> LeasedBlobs {
    ObservedBlobService::new(inner, BlobToucher(leases))
}

/// A directory service whose puts are leased (every directory put, with
/// the directories and files it names).
pub struct LeasedDirectories {
    inner: Arc<dyn DirectoryService>,
    leases: Leases,
}

impl LeasedDirectories {
    /// `inner`, its puts recorded in `leases`.
    pub fn new(inner: Arc<dyn DirectoryService>, leases: Leases) -> Self {
        LeasedDirectories { inner, leases }
    }

    fn touch(&self, dir: &Directory) {
        let digest = dir.digest();
        let named = dir.entries().filter_map(|(_, node)| match node {
            crate::Node::Directory { digest, .. } | crate::Node::File { digest, .. } => {
                Some(digest)
            }
            crate::Node::Symlink { .. } => None,
        });
        self.leases.touch(std::iter::once(&digest).chain(named));
    }
}

#[async_trait]
impl DirectoryService for LeasedDirectories {
    async fn get(&self, digest: &Digest) -> Result<Option<Directory>, DirectoryError> {
        self.inner.get(digest).await
    }

    async fn get_many(&self, digests: &[Digest]) -> Result<Vec<Option<Directory>>, DirectoryError> {
        self.inner.get_many(digests).await
    }

    async fn put(&self, dir: Directory) -> Result<Digest, DirectoryError> {
        self.touch(&dir);
        self.inner.put(dir).await
    }

    async fn put_all(&self, dirs: Vec<Directory>) -> Result<Option<Digest>, DirectoryError> {
        for dir in &dirs {
            self.touch(dir);
        }
        self.inner.put_all(dirs).await
    }

    /// Touches `root` first: a whole tree is read to check it is all there
    /// (`Store::find_missing`, before reusing it or publishing it), and a
    /// touched directory keeps its subtree.
    async fn get_recursive(&self, root: &Digest) -> Result<Vec<Directory>, DirectoryError> {
        self.leases.touch([root]);
        self.inner.get_recursive(root).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touches_outlive_one_lease_and_stay_while_collecting() {
        let leases = Leases::new(Duration::from_millis(50));
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        leases.touch([&a]);
        std::thread::sleep(Duration::from_millis(60));
        leases.touch([&b]);
        assert!(leases.hold().contains(&a), "one generation back is kept");
        std::thread::sleep(Duration::from_millis(60));
        leases.touch([&c]);
        assert!(!leases.hold().contains(&a), "two generations back is gone");
        let collecting = leases.begin_collection();
        std::thread::sleep(Duration::from_millis(120));
        leases.touch([&a]);
        let held = leases.hold();
        assert!(held.contains(&b) && held.contains(&c) && held.contains(&a));
        drop(held);
        drop(collecting);
        std::thread::sleep(Duration::from_millis(60));
        leases.touch([&a]);
        std::thread::sleep(Duration::from_millis(60));
        leases.touch([&a]);
        assert!(
            !leases.hold().contains(&b),
            "generations retire again after"
        );
    }
}
