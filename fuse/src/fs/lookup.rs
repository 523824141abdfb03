//! Lookups: a store path at the root found through the filesystem's
//! [`Substituter`](lazystore_pathinfo::substitute::Substituter), an entry
//! in a directory, the inode made for it, and directories fetched (from
//! the substituter that showed them, or from the store, verified) and kept
//! in memory.

use super::*;

/// Directories kept in memory after their inodes are gone.
pub(super) const DIRECTORY_CACHE_ENTRIES: usize = 4096;

impl LazyFs {
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
    pub(super) async fn lookup_store_path(&self, name: &[u8]) -> Result<Attr, FsError> {
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
        let found = retried(&self.options.retry, &self.stats, &what, || {
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

    /// Fails with EIO if `inode` is in a path whose verified contents
    /// turned out to differ from what was shown; tells whether it is shown
    /// provisionally (from claims not yet checked).
    pub(super) fn standing(&self, inode: &Inode) -> Result<bool, FsError> {
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
    pub(super) async fn child(
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
                Kind::Directory {
                    digest,
                    dir,
                    ahead: Default::default(),
                }
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
    pub(super) async fn entries_of(
        &self,
        inode: &Inode,
        started: Instant,
    ) -> Result<Arc<Directory>, FsError> {
        let Kind::Directory { digest, dir, .. } = &inode.kind else {
            return Err(FsError::NotADirectory);
        };
        dir.get_or_try_init(|| self.directory(digest, &inode.path, started))
            .await
            .cloned()
    }

    /// The directory `digest`, from memory, from the substituter that
    /// showed it, or fetched from the store and verified. `started` as for
    /// [`entries_of`](Self::entries_of).
    pub(super) async fn directory(
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
        let got = retried(&self.options.retry, &self.stats, &what, || {
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
}

/// A map by digest bounded to a number of entries, the oldest dropped
/// first when full: the directories kept after their inodes are gone, the
/// chunk lists fetched ahead of their files' first reads (`read.rs`).
pub(super) struct Fifo<V> {
    map: HashMap<Digest, V>,
    order: VecDeque<Digest>,
    capacity: usize,
}

impl<V> Fifo<V> {
    pub(super) fn new(capacity: usize) -> Self {
        Fifo {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    pub(super) fn insert(&mut self, d: Digest, value: V) {
        if self.map.insert(d, value).is_none() {
            self.order.push_back(d);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    /// Removes and returns the entry for `d` (its place in the order goes
    /// when it comes to the front).
    pub(super) fn take(&mut self, d: &Digest) -> Option<V> {
        self.map.remove(d)
    }
}

impl<V: Clone> Fifo<V> {
    pub(super) fn get(&self, d: &Digest) -> Option<V> {
        self.map.get(d).cloned()
    }
}
