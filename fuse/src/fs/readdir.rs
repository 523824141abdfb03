//! Listings: opening and reading directories (the root lists store paths
//! only with `list_root`), readdirplus with the subdirectories it needs
//! fetched in parallel, and symlink targets.

use super::*;

/// Subdirectories fetched at once to answer a readdirplus.
const DIRECTORY_FETCH_CONCURRENCY: usize = 16;

impl LazyFs {
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

    pub(super) fn check_dir(&self, ino: Ino) -> Result<(), FsError> {
        match ino {
            Ino::ROOT | Ino::CONTROL_DIR => Ok(()),
            Ino::STATS_FILE => Err(FsError::NotADirectory),
            _ => match self.inode(ino)?.kind {
                Kind::Directory { .. } => Ok(()),
                _ => Err(FsError::NotADirectory),
            },
        }
    }

    pub(super) async fn root_listing(&self) -> Result<Listing, FsError> {
        if !self.options.list_root {
            return Err(FsError::RootNotListable);
        }
        let what = || "listing every store path".to_owned();
        let infos: Vec<_> = retried(&self.options.retry, &self.stats, &what, || {
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

    pub(super) fn parent_of(&self, ino: Ino) -> Result<Ino, FsError> {
        Ok(match ino {
            Ino::ROOT | Ino::CONTROL_DIR => Ino::ROOT,
            _ => self.inode(ino)?.parent,
        })
    }

    pub(super) fn path_of(&self, ino: Ino) -> Result<Arc<str>, FsError> {
        Ok(match ino {
            Ino::ROOT => Arc::from(""),
            Ino::CONTROL_DIR => Arc::from(CONTROL_DIR_NAME),
            _ => self.inode(ino)?.path.clone(),
        })
    }

    /// The children of directory `ino`, in name order.
    pub(super) async fn children(&self, ino: Ino, fh: u64) -> Result<Listing, FsError> {
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
}
