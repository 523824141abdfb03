//! Directory backend that keeps what it reads from a remote backend in a
//! local [`CacheStore`].
//!
//! Directories are immutable and named by their digest, so a cached one
//! never goes stale; it is checked against its digest whenever it is read
//! back, and one that fails is dropped and fetched again. Puts go to the
//! remote, which checks that children exist: the cache alone can't tell.
//! If the local file fails, reads go to the remote and the failure is
//! logged.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;

use super::{DirectoryError, DirectoryService};
use crate::cache_store::{CacheStore, Key, Local, Record};
use crate::digest::Digest;
use crate::nodes::{DecodeDirectoryError, Directory};

/// A [`DirectoryService`] that caches a remote one in a [`CacheStore`].
#[derive(Clone)]
pub struct CachingDirectoryService {
    local: CacheStore,
    remote: Arc<dyn DirectoryService>,
}

impl std::fmt::Debug for CachingDirectoryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachingDirectoryService")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// What the cache had for one directory. A cache that failed counts as a
/// miss (and is logged).
enum Cached {
    Hit(Directory),
    Miss,
    /// Present but damaged: the key to drop.
    Damaged(Key),
}

/// What a walk of the cache found below a root.
enum Walk {
    /// The whole tree, breadth first.
    Complete(Vec<Directory>),
    /// Some directory is not cached, or damaged (those to drop).
    Incomplete(Vec<Key>),
}

impl CachingDirectoryService {
    /// Caches `remote` in `local`.
    pub fn new(local: CacheStore, remote: Arc<dyn DirectoryService>) -> Self {
        CachingDirectoryService { local, remote }
    }

    /// The cache.
    pub fn local(&self) -> &CacheStore {
        &self.local
    }

    /// The backend it caches.
    pub fn remote(&self) -> &Arc<dyn DirectoryService> {
        &self.remote
    }

    /// The tree below `root` from the cache, breadth first, in one snapshot.
    async fn walk_local(&self, root: Digest) -> Option<Walk> {
        let local = self.local.clone();
        let walked = tokio::task::spawn_blocking(move || {
            let read = local.read()?;
            let mut out = Vec::new();
            let mut seen = HashSet::from([root]);
            let mut queue = VecDeque::from([root]);
            while let Some(d) = queue.pop_front() {
                let dir = match read.directory(&d)? {
                    Local::Hit(dir) => dir,
                    Local::Miss => return Ok(Walk::Incomplete(Vec::new())),
                    Local::Damaged(e) => {
                        local.warn_damaged("directory", &e);
                        return Ok(Walk::Incomplete(vec![e.key()]));
                    }
                };
                for (_, child, _) in dir.subdirectories() {
                    if seen.insert(child) {
                        queue.push_back(child);
                    }
                }
                out.push(dir);
            }
            local.touch(seen.into_iter().map(Key::directory));
            Ok::<_, redb::Error>(Walk::Complete(out))
        })
        .await;
        match walked {
            Ok(Ok(w)) => Some(w),
            Ok(Err(e)) => {
                self.local.warn_failed("directory", &e);
                None
            }
            Err(e) => {
                self.local.warn_failed("directory", &e);
                None
            }
        }
    }

    /// Caches `dirs` (each under the digest of its encoding, so nothing can
    /// land under the wrong name) and drops `drops`, through the cache's
    /// queue (`cache_store/queue.rs`). A failure is logged.
    async fn write_back(&self, dirs: Vec<Directory>, drops: Vec<Key>) {
        if dirs.is_empty() && drops.is_empty() {
            return;
        }
        let local = self.local.clone();
        let result = tokio::task::spawn_blocking(move || {
            let inserts: Vec<Record> = dirs
                .iter()
                .map(|d| {
                    let encoding = d.encode();
                    Record::Directory(Digest::of(&encoding), encoding)
                })
                .collect();
            local.write(inserts, drops)
        })
        .await;
        if let Err(e) = result {
            self.local.warn_failed("directory", &e);
        }
    }
}

#[async_trait]
impl DirectoryService for CachingDirectoryService {
    /// From the cache if there, else from the remote and then cached.
    async fn get(&self, digest: &Digest) -> Result<Option<Directory>, DirectoryError> {
        let drops = match self.get_local(*digest).await {
            Cached::Hit(dir) => return Ok(Some(dir)),
            Cached::Damaged(key) => vec![key],
            Cached::Miss => Vec::new(),
        };
        let dir = self.remote.get(digest).await?;
        if let Some(d) = &dir {
            // The remote must have checked it; this guards the cache against
            // one that did not.
            let actual = d.digest();
            if actual != *digest {
                return Err(DecodeDirectoryError::Mismatch {
                    expected: *digest,
                    actual,
                }
                .into());
            }
        }
        self.write_back(dir.iter().cloned().collect(), drops).await;
        Ok(dir)
    }

    async fn put(&self, dir: Directory) -> Result<Digest, DirectoryError> {
        self.remote.put(dir).await
    }

    async fn put_all(&self, dirs: Vec<Directory>) -> Result<Option<Digest>, DirectoryError> {
        self.remote.put_all(dirs).await
    }

    /// From the cache if the whole tree is there, else the whole tree from
    /// the remote, then cached.
    async fn get_recursive(&self, root: &Digest) -> Result<Vec<Directory>, DirectoryError> {
        let drops = match self.walk_local(*root).await {
            Some(Walk::Complete(dirs)) => return Ok(dirs),
            Some(Walk::Incomplete(drops)) => drops,
            None => Vec::new(),
        };
        let dirs = self.remote.get_recursive(root).await?;
        if let Some(first) = dirs.first() {
            let actual = first.digest();
            if actual != *root {
                return Err(DecodeDirectoryError::Mismatch {
                    expected: *root,
                    actual,
                }
                .into());
            }
        }
        self.write_back(dirs.clone(), drops).await;
        Ok(dirs)
    }
}

impl CachingDirectoryService {
    /// One directory from the cache.
    async fn get_local(&self, digest: Digest) -> Cached {
        let local = self.local.clone();
        let found = tokio::task::spawn_blocking(move || {
            let found = local.read()?.directory(&digest)?;
            if let Local::Hit(_) = found {
                local.touch([Key::directory(digest)]);
            }
            Ok::<_, redb::Error>(found)
        })
        .await;
        match found {
            Ok(Ok(Local::Hit(dir))) => Cached::Hit(dir),
            Ok(Ok(Local::Miss)) => Cached::Miss,
            Ok(Ok(Local::Damaged(e))) => {
                self.local.warn_damaged("directory", &e);
                Cached::Damaged(e.key())
            }
            Ok(Err(e)) => {
                self.local.warn_failed("directory", &e);
                Cached::Miss
            }
            Err(e) => {
                self.local.warn_failed("directory", &e);
                Cached::Miss
            }
        }
    }
}
