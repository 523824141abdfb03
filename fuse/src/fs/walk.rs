//! Walks: a reader going through a store path file after file in NAR
//! order (`nix hash path`, a copy, a test suite reading its data, a
//! compiler's sweep of a toolchain) gets the path streamed to it.
//!
//! Every first read of a file is noted against its store path. Once
//! [`WALK_AFTER_FILES`] first reads came each of the file next after the
//! one before in its directory (reads in NAR order that skip files, or
//! move to another directory, neither count nor break the run; one out of
//! NAR order starts it again), the path is
//! streamed: its whole tree in one `get_recursive` (every directory the
//! walk will look up is then in memory), then its files' chunk lists in
//! groups of [`LISTS_AHEAD`] files to a `stat_many`, then its chunks in NAR
//! order, [`STREAM_BATCH`] bytes to a request and [`STREAM_IN_FLIGHT`]
//! requests at once, into the mount's memory cache. The stream stays at
//! most [`STREAM_LEAD`] bytes (of file contents, in NAR order) ahead of the
//! furthest byte a reader of the path has read, so a walk that stops
//! wastes at most that, and the chunks it fetched are still in memory
//! when their reader comes (the memory cache holds more than the lead).
//! Reads keep priority: a read asks for its own chunks at once, joining a
//! streamed fetch of them if one is under way.
//!
//! A build reading a handful of files of a path never triggers this; the
//! per-directory windows (`read.rs`) serve it.

use std::sync::OnceLock;

use futures::stream::FuturesUnordered;

use super::*;

/// First reads in a row, each of the next file of its directory, after
/// which a store path is streamed.
pub(super) const WALK_AFTER_FILES: usize = 64;

/// How far (bytes of file contents, in NAR order) the stream runs ahead of
/// the furthest byte a reader has read: a quarter of the default memory
/// cache, so what it fetched is still there when read.
const STREAM_LEAD: u64 = 16 << 20;

/// Bytes of chunks to one request of the stream.
const STREAM_BATCH: u64 = 1 << 20;

/// Requests of one stream in flight.
const STREAM_IN_FLIGHT: usize = 6;

/// Larger files whose chunk lists are asked for in one `stat_many`.
const LISTS_AHEAD: usize = 256;

/// A stream whose reader has not moved for this long stops.
const IDLE_STOP: Duration = Duration::from_secs(30);

/// Store paths watched at once; the table starts over past this.
const WATCHED_PATHS: usize = 1024;

/// The reads of one store path.
#[derive(Default)]
pub(super) struct Walk {
    watch: Mutex<Watch>,
    /// Once streaming: the NAR-order index of every file by its digest,
    /// and where each starts in the path's contents.
    order: OnceLock<Order>,
    /// The furthest byte (in NAR order) a reader has read.
    reached: AtomicU64,
    moved: tokio::sync::Notify,
}

#[derive(Default)]
struct Watch {
    /// The last file read for the first time.
    last: Option<Arc<str>>,
    /// First reads in a row each of the next file after the one before
    /// in its directory (or in NAR order across directories).
    adjacent: usize,
    streaming: bool,
}

struct Order {
    index: HashMap<Digest, usize>,
    /// `starts[i]`: the offset of file `i` in the path's contents.
    starts: Vec<u64>,
}

/// Whether `a` comes before `b` in NAR order (`/`-separated paths inside
/// one store path: a directory's entries by name, each directory's
/// contents right after its name).
fn nar_before(a: &str, b: &str) -> bool {
    a.split('/').lt(b.split('/'))
}

/// What a stream needs of the filesystem, owned by its task.
struct Streamer {
    /// The filesystem's walks, whose entry for this one goes when its
    /// stream ends (its order of files is the size of the path's tree).
    walks: Arc<Mutex<HashMap<Arc<str>, Arc<Walk>>>>,
    store: Store,
    chunks: Arc<ChunkFetcher>,
    directories: Arc<Mutex<Fifo<Arc<Directory>>>>,
    chunk_lists_ahead: Arc<Mutex<Fifo<BlobMeta>>>,
    stats: Arc<Stats>,
    retry: RetryPolicy,
}

/// A file of the walked path, in NAR order.
struct WalkFile {
    digest: Digest,
    size: u64,
}

impl LazyFs {
    /// The walk of the store path `inode` is in, if it is inside a
    /// directory (a store path that is one file is never walked).
    fn walk_of(&self, inode: &Inode) -> Option<Arc<Walk>> {
        let (base, _) = inode.path.split_once('/')?;
        let mut walks = self.walks.lock().expect("lock poisoned");
        if let Some(walk) = walks.get(base) {
            return Some(walk.clone());
        }
        if walks.len() >= WATCHED_PATHS {
            walks.clear();
        }
        let walk = Arc::new(Walk::default());
        walks.insert(base.into(), walk.clone());
        Some(walk)
    }

    /// Whether file `inode` is the next non-empty file after `last` (a path
    /// like an inode's) in their directory.
    fn next_file(&self, last: &str, inode: &Inode) -> bool {
        let (Some((last_dir, last_name)), Some((dir, name))) =
            (last.rsplit_once('/'), inode.path.rsplit_once('/'))
        else {
            return false;
        };
        if last_dir != dir {
            return false;
        }
        let Ok(parent) = self.inode(inode.parent) else {
            return false;
        };
        let Kind::Directory { dir: listing, .. } = &parent.kind else {
            return false;
        };
        let Some(listing) = listing.get() else {
            return false;
        };
        listing
            .entries_from(std::ops::Bound::Excluded(last_name.as_bytes()))
            .find(|(_, node)| matches!(node, Node::File { size, .. } if *size > 0))
            .is_some_and(|(next, _)| next.as_bytes() == name.as_bytes())
    }

    /// Notes the first read of file `inode` (of contents `digest`, stored,
    /// with files up to `min` bytes one chunk each): starts streaming its
    /// store path once enough first reads came in NAR order.
    pub(super) fn first_read(&self, inode: &Inode, digest: &Digest, min: u64) {
        let Some(walk) = self.walk_of(inode) else {
            return;
        };
        if walk.order.get().is_some() {
            return self.walked(inode, digest, 0);
        }
        {
            let mut watch = walk.watch.lock().expect("lock poisoned");
            if watch.streaming {
                return;
            }
            match &watch.last {
                None => watch.adjacent = 1,
                Some(last) if !nar_before(last, &inode.path) => watch.adjacent = 0,
                Some(last) if self.next_file(last, inode) => watch.adjacent += 1,
                // In order, past files not read, or in another directory:
                // a sparse reader never gets a stream, a walk goes on.
                _ => {}
            }
            watch.last = Some(inode.path.clone());
            if watch.adjacent < WALK_AFTER_FILES {
                return;
            }
            watch.streaming = true;
        }
        let (base, inside) = inode.path.split_once('/').expect("inside a directory");
        let Some(root) = self
            .inodes
            .peek(Ino::ROOT, base.as_bytes())
            .and_then(|ino| self.inodes.get(ino))
            .and_then(|root| match &root.kind {
                Kind::Directory { digest, .. } => Some(*digest),
                _ => None,
            })
        else {
            return;
        };
        self.stats.add(&self.stats.walks_streamed, 1);
        tracing::debug!("{base}: read in NAR order; streaming it from {inside}");
        let streamer = Streamer {
            walks: self.walks.clone(),
            store: self.store.clone(),
            chunks: self.chunks.clone(),
            directories: self.directories.clone(),
            chunk_lists_ahead: self.chunk_lists_ahead.clone(),
            stats: self.stats.clone(),
            retry: self.options.retry,
        };
        let (name, from): (Arc<str>, String) = (base.into(), inside.to_owned());
        tokio::spawn(async move { streamer.run(walk, root, name, from, min).await });
    }

    /// The store path (its basename) inode `ino` is inside of, if it is
    /// inside a directory.
    pub(crate) fn store_path_of(&self, ino: Ino) -> Option<Arc<str>> {
        let inode = self.inodes.get(ino)?;
        let (base, _) = inode.path.split_once('/')?;
        Some(base.into())
    }

    /// Whether the store path `base` is being streamed.
    pub(crate) fn streaming(&self, base: &str) -> bool {
        self.walks
            .lock()
            .expect("lock poisoned")
            .get(base)
            .is_some_and(|walk| walk.watch.lock().expect("lock poisoned").streaming)
    }

    /// Notes a read of `inode` up to byte `end`: a stream of its path
    /// may run ahead of it again.
    pub(super) fn walked(&self, inode: &Inode, digest: &Digest, end: u64) {
        let Some((base, _)) = inode.path.split_once('/') else {
            return;
        };
        let walk = self.walks.lock().expect("lock poisoned").get(base).cloned();
        let Some(walk) = walk else {
            return;
        };
        let Some(order) = walk.order.get() else {
            return;
        };
        if let Some(&i) = order.index.get(digest) {
            let at = order.starts[i] + end;
            if walk.reached.fetch_max(at, Ordering::Relaxed) < at {
                walk.moved.notify_one();
            }
        }
    }
}

impl Streamer {
    async fn run(self, walk: Arc<Walk>, root: Digest, name: Arc<str>, from: String, min: u64) {
        self.stream_path(&walk, root, &name, from, min).await;
        // Once streamed, the path's file order goes (a long-running mount
        // holds none for paths it streamed long ago); the path stays
        // marked as streamed, so the readers still behind the stream's
        // end neither start another nor have their files written out.
        let mut walks = self.walks.lock().expect("lock poisoned");
        if walks.get(&name).is_some_and(|w| Arc::ptr_eq(w, &walk)) {
            let done = Walk::default();
            done.watch.lock().expect("lock poisoned").streaming = true;
            walks.insert(name, Arc::new(done));
        }
    }

    async fn stream_path(
        &self,
        walk: &Arc<Walk>,
        root: Digest,
        name: &Arc<str>,
        from: String,
        min: u64,
    ) {
        let what = || format!("{name}: fetching its tree to stream it");
        let asked = Instant::now();
        let tree = match retried(&self.retry, &self.stats, &what, || {
            self.store.directories.get_recursive(&root)
        })
        .await
        {
            Ok(tree) => tree,
            Err(e) => {
                // Nothing lost: each read fetches what it needs.
                tracing::warn!("{name}: not streamed: {}", error_chain(&e));
                return;
            }
        };
        // Kept by the digest each hashes to: one the store mislabelled is
        // never found under the digest it was asked by.
        let tree: HashMap<Digest, Arc<Directory>> = tree
            .into_iter()
            .map(|d| (d.digest(), Arc::new(d)))
            .collect();
        {
            let mut cache = self.directories.lock().expect("lock poisoned");
            for (digest, dir) in &tree {
                cache.insert(*digest, dir.clone());
            }
        }
        self.stats
            .add(&self.stats.directories_fetched, tree.len() as u64);
        let (files, first) = nar_order(&tree, root, &from);
        tracing::debug!(
            "{name}: {} directories, {} files to stream, in {:?}",
            tree.len(),
            files.len() - first,
            asked.elapsed()
        );
        let mut starts = Vec::with_capacity(files.len());
        let mut index = HashMap::with_capacity(files.len());
        let mut at = 0;
        for (i, f) in files.iter().enumerate() {
            starts.push(at);
            index.entry(f.digest).or_insert(i);
            at += f.size;
        }
        walk.reached
            .fetch_max(starts.get(first).copied().unwrap_or(at), Ordering::Relaxed);
        // Set once: a walk's stream starts once (`first_read`).
        let order = walk.order.get_or_init(|| Order { index, starts });
        self.stream(walk, &files[first..], &order.starts[first..], min, name)
            .await;
    }

    /// Streams `files` (starting at `starts`) in NAR order, paced by the
    /// walk's readers.
    async fn stream(
        &self,
        walk: &Walk,
        files: &[WalkFile],
        starts: &[u64],
        min: u64,
        name: &Arc<str>,
    ) {
        let mut in_flight = FuturesUnordered::new();
        let mut lists: HashMap<Digest, BlobMeta> = HashMap::new();
        let mut listed_until = 0;
        let mut batch: Vec<Digest> = Vec::new();
        let mut batch_bytes = 0;
        for (i, file) in files.iter().enumerate() {
            if file.size == 0 {
                continue;
            }
            let chunks: Vec<(Digest, u64, u64)> = if file.size <= min {
                vec![(file.digest, 0, file.size)]
            } else {
                if i >= listed_until {
                    listed_until = self.list_ahead(&files[i..], min, &mut lists, name).await + i;
                }
                match lists.get(&file.digest) {
                    Some(meta) => {
                        let mut at = 0;
                        meta.chunks
                            .iter()
                            .map(|c| {
                                at += c.size;
                                (c.digest, at - c.size, c.size)
                            })
                            .collect()
                    }
                    // Its reader fetches it.
                    None => continue,
                }
            };
            for (digest, offset, size) in chunks {
                // Paced: no further ahead of the readers than the lead.
                let start = starts[i] + offset;
                loop {
                    let reached = walk.reached.load(Ordering::Relaxed);
                    if start <= reached + STREAM_LEAD {
                        break;
                    }
                    let moved = walk.moved.notified();
                    if walk.reached.load(Ordering::Relaxed) != reached {
                        continue;
                    }
                    if tokio::time::timeout(IDLE_STOP, moved).await.is_err() {
                        tracing::debug!("{name}: its readers stopped; stream ends");
                        return;
                    }
                }
                if start + size <= walk.reached.load(Ordering::Relaxed) {
                    continue; // read already
                }
                batch.push(digest);
                batch_bytes += size;
                if batch_bytes >= STREAM_BATCH {
                    if let Some(f) = self.chunks.fetch_ahead(&batch, name) {
                        in_flight.push(f);
                    }
                    batch.clear();
                    batch_bytes = 0;
                    while in_flight.len() >= STREAM_IN_FLIGHT {
                        in_flight.next().await;
                    }
                }
            }
        }
        if let Some(f) = self.chunks.fetch_ahead(&batch, name) {
            in_flight.push(f);
        }
        while in_flight.next().await.is_some() {}
    }

    /// Fetches the chunk lists of the next [`LISTS_AHEAD`] files larger
    /// than `min` among `files` into `lists` (and for their first reads,
    /// into the filesystem's chunk lists ahead); returns how many of
    /// `files` that covers.
    async fn list_ahead(
        &self,
        files: &[WalkFile],
        min: u64,
        lists: &mut HashMap<Digest, BlobMeta>,
        name: &Arc<str>,
    ) -> usize {
        let mut wanted = Vec::new();
        let mut covered = files.len();
        for (i, f) in files.iter().enumerate() {
            if f.size > min && !lists.contains_key(&f.digest) && !wanted.contains(&f.digest) {
                if wanted.len() == LISTS_AHEAD {
                    covered = i;
                    break;
                }
                wanted.push(f.digest);
            }
        }
        lists.clear();
        let asked = Instant::now();
        let what = || {
            format!(
                "{name}: fetching {} chunk lists to stream them",
                wanted.len()
            )
        };
        match retried(&self.retry, &self.stats, &what, || {
            self.store.blobs.stat_many(&wanted)
        })
        .await
        {
            Ok(metas) => {
                tracing::trace!(
                    "{name}: {} chunk lists in {:?}",
                    wanted.len(),
                    asked.elapsed()
                );
                self.stats
                    .add(&self.stats.chunk_lists_fetched, wanted.len() as u64);
                let mut ahead = self.chunk_lists_ahead.lock().expect("lock poisoned");
                for (digest, meta) in wanted.into_iter().zip(metas) {
                    if let Some(meta) = meta {
                        ahead.insert(digest, meta.clone());
                        lists.insert(digest, meta);
                    }
                }
            }
            Err(e) => tracing::debug!("{name}: chunk lists not streamed: {}", error_chain(&e)),
        }
        covered.max(1)
    }
}

/// The files under `root` in NAR order, and the index of the first at or
/// after `from` (a path inside `root`).
fn nar_order(
    tree: &HashMap<Digest, Arc<Directory>>,
    root: Digest,
    from: &str,
) -> (Vec<WalkFile>, usize) {
    let mut files = Vec::new();
    let mut first = None;
    // Depth first: a directory's entries go on the stack last first, so
    // they come off in name order, each directory's contents right after it.
    let mut work: Vec<(String, Node)> = Vec::new();
    let push = |work: &mut Vec<(String, Node)>, dir: &Directory, prefix: &str| {
        let entries: Vec<_> = dir.entries().collect();
        for (name, node) in entries.into_iter().rev() {
            let path = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}/{name}")
            };
            work.push((path, node.clone()));
        }
    };
    if let Some(dir) = tree.get(&root) {
        push(&mut work, dir, "");
    }
    while let Some((path, node)) = work.pop() {
        match node {
            Node::Directory { digest, .. } => {
                if let Some(dir) = tree.get(&digest) {
                    push(&mut work, dir, &path);
                }
            }
            Node::File { digest, size, .. } => {
                if first.is_none() && !nar_before(&path, from) {
                    first = Some(files.len());
                }
                files.push(WalkFile { digest, size });
            }
            Node::Symlink { .. } => {}
        }
    }
    let first = first.unwrap_or(files.len());
    (files, first)
}

#[cfg(test)]
mod tests {
    use super::nar_before;

    #[test]
    fn nar_order_is_by_component() {
        // '-' sorts before '/', but a directory's contents come right
        // after its name, before its next sibling.
        assert!(nar_before("a/b", "a-c"));
        assert!(nar_before("a", "a/b"));
        assert!(nar_before("a/z", "b"));
        assert!(!nar_before("b", "a/z"));
        assert!(!nar_before("a/b", "a/b"));
    }
}
