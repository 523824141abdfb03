//! Store paths the store lacks, substituted lazily from upstream binary
//! caches.
//!
//! A lookup of an unknown path asks the upstreams for its narinfo (checked
//! as an import checks it). If the cache has a `.ls` listing of the NAR,
//! the path is shown from it at once: its tree becomes in-memory castore
//! directories whose files have *placeholder* digests, and only the first
//! read of a file's contents downloads the NAR (once, however many readers
//! wait on it), verifies it, ingests it into the store and maps the
//! placeholder to the real file by its place in the tree. Without a
//! listing, the NAR is fetched at the lookup: nothing else says whether the
//! path is a file, a directory or a symlink.
//!
//! Placeholders are BLAKE3 keyed hashes under a key drawn per mount, so no
//! content can collide with one; they are never shown as digests (the
//! digest xattr is absent on them).
//!
//! Positive narinfo answers are kept for the life of the mount (a narinfo
//! never changes); "no cache has it" is kept for [`NEGATIVE_TTL`];
//! failures are not kept, so the next access tries again. Fetched paths are
//! not published in the store's path-info service: their references may
//! be missing from it, and a published path promises its closure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazystore_castore::{Digest, Directory, Node, PathComponent};
use lazystore_importer::{Found, PathError, Upstream, Wanted};
use lazystore_pathinfo::listing::{Listing, ListingEntry};
use lazystore_pathinfo::{DIGEST_LEN, StorePath};
use tokio::sync::OnceCell;

/// How long "no upstream has this path" is believed.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// A path found upstream.
pub(crate) struct UpstreamPath {
    pub(crate) found: Found,
    /// The root shown: from the listing (with placeholders), or the real
    /// one when there was no listing.
    pub(crate) shown: Node,
    /// The real root, once the NAR is ingested.
    fetched: OnceCell<Node>,
}

/// A path's lookup, shared by everyone looking it up.
type PathCell = Arc<OnceCell<Arc<UpstreamPath>>>;

/// What a placeholder digest stands for.
pub(crate) enum Placeholder {
    /// A directory of a listing.
    Directory(Arc<Directory>),
    /// A file of a listing: its path and where it is inside it.
    File {
        path: Arc<UpstreamPath>,
        within: Vec<PathComponent>,
    },
}

/// The upstream side of a mount.
pub(crate) struct Upstreams {
    upstream: Arc<Upstream>,
    key: [u8; 32],
    /// One cell per path asked for: concurrent lookups wait on one fetch.
    // A std Mutex: one map operation per lookup, no await.
    paths: Mutex<HashMap<[u8; DIGEST_LEN], PathCell>>,
    /// When each path was last found in no cache.
    missing: Mutex<HashMap<[u8; DIGEST_LEN], Instant>>,
    placeholders: Mutex<HashMap<Digest, Placeholder>>,
    pub(crate) narinfos_fetched: std::sync::atomic::AtomicU64,
}

/// Why an upstream lookup found nothing to show.
pub(crate) enum LookupError {
    /// No upstream has the path (or it was found missing recently).
    Missing,
    /// An upstream failed; logged.
    Failed(PathError),
}

impl Upstreams {
    pub(crate) fn new(upstream: Arc<Upstream>) -> Self {
        Upstreams {
            upstream,
            key: rand_key(),
            paths: Mutex::new(HashMap::new()),
            missing: Mutex::new(HashMap::new()),
            placeholders: Mutex::new(HashMap::new()),
            narinfos_fetched: Default::default(),
        }
    }

    pub(crate) fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The root node to show for `path`, looked up upstream (once, however
    /// many ask at the same time).
    pub(crate) async fn lookup(&self, path: &StorePath) -> Result<Arc<UpstreamPath>, LookupError> {
        let digest = *path.digest();
        let recently_missing = self
            .missing
            .lock()
            .expect("poisoned")
            .get(&digest)
            .is_some_and(|at| at.elapsed() < NEGATIVE_TTL);
        if recently_missing {
            return Err(LookupError::Missing);
        }
        let cell = self
            .paths
            .lock()
            .expect("poisoned")
            .entry(digest)
            .or_default()
            .clone();
        cell.get_or_try_init(|| self.find(path))
            .await
            .map(Arc::clone)
    }

    async fn find(&self, path: &StorePath) -> Result<Arc<UpstreamPath>, LookupError> {
        // Another waiter may have found it missing while this one waited.
        if let Some(at) = self.missing.lock().expect("poisoned").get(path.digest())
            && at.elapsed() < NEGATIVE_TTL
        {
            return Err(LookupError::Missing);
        }
        let wanted = Wanted::from(path.clone());
        self.narinfos_fetched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let found = match self.upstream.narinfo(&wanted).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                self.missing
                    .lock()
                    .expect("poisoned")
                    .insert(*path.digest(), Instant::now());
                return Err(LookupError::Missing);
            }
            Err(e) => return Err(LookupError::Failed(e)),
        };
        match self.upstream.listing(&found).await {
            Some(listing) => Ok(self.show_listing(found, &listing)),
            None => {
                let real = self
                    .upstream
                    .fetch(&found)
                    .await
                    .map_err(LookupError::Failed)?;
                Ok(Arc::new(UpstreamPath {
                    found,
                    shown: real.root.clone(),
                    fetched: OnceCell::new_with(Some(real.root)),
                }))
            }
        }
    }

    /// The path `found`, shown as `listing` says, its placeholders
    /// registered.
    fn show_listing(&self, found: Found, listing: &Listing) -> Arc<UpstreamPath> {
        let base = found.narinfo.store_path.to_string();
        let mut files = Vec::new();
        let mut dirs = Vec::new();
        let shown = self.node_of(&base, &listing.root, &mut Vec::new(), &mut files, &mut dirs);
        let path = Arc::new(UpstreamPath {
            found,
            shown,
            fetched: OnceCell::new(),
        });
        let mut placeholders = self.placeholders.lock().expect("poisoned");
        for (digest, within) in files {
            placeholders.insert(
                digest,
                Placeholder::File {
                    path: path.clone(),
                    within,
                },
            );
        }
        for (digest, dir) in dirs {
            placeholders.insert(digest, Placeholder::Directory(dir));
        }
        path
    }

    /// The castore node for a listing entry at `within`, collecting the
    /// placeholder files and directories made.
    fn node_of(
        &self,
        base: &str,
        entry: &ListingEntry,
        within: &mut Vec<PathComponent>,
        files: &mut Vec<(Digest, Vec<PathComponent>)>,
        dirs: &mut Vec<(Digest, Arc<Directory>)>,
    ) -> Node {
        match entry {
            ListingEntry::Regular {
                size, executable, ..
            } => {
                let digest = self.placeholder(base, within);
                files.push((digest, within.clone()));
                Node::File {
                    digest,
                    size: *size,
                    executable: *executable,
                }
            }
            ListingEntry::Symlink { target } => Node::Symlink {
                target: target.clone(),
            },
            ListingEntry::Directory { entries } => {
                let mut dir = Directory::new();
                for (name, child) in entries {
                    within.push(name.clone());
                    let node = self.node_of(base, child, within, files, dirs);
                    within.pop();
                    dir.add(name.clone(), node)
                        .expect("listing names are valid and sorted");
                }
                let node = Node::directory(&dir);
                if let Node::Directory { digest, .. } = &node {
                    dirs.push((*digest, Arc::new(dir)));
                }
                node
            }
        }
    }

    /// A placeholder digest for the file at `within` in store path `base`.
    fn placeholder(&self, base: &str, within: &[PathComponent]) -> Digest {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(base.as_bytes());
        for c in within {
            h.update(b"/");
            h.update(c.as_bytes());
        }
        Digest::from(h.finalize())
    }

    /// The directory a placeholder digest stands for, if it is one.
    pub(crate) fn directory(&self, digest: &Digest) -> Option<Arc<Directory>> {
        match self.placeholders.lock().expect("poisoned").get(digest) {
            Some(Placeholder::Directory(d)) => Some(d.clone()),
            _ => None,
        }
    }

    /// Whether `digest` is a placeholder (of a file or a directory).
    pub(crate) fn is_placeholder(&self, digest: &Digest) -> bool {
        self.placeholders
            .lock()
            .expect("poisoned")
            .contains_key(digest)
    }

    /// For a placeholder file: its path and its place inside it.
    pub(crate) fn file(&self, digest: &Digest) -> Option<(Arc<UpstreamPath>, Vec<PathComponent>)> {
        match self.placeholders.lock().expect("poisoned").get(digest) {
            Some(Placeholder::File { path, within }) => Some((path.clone(), within.clone())),
            _ => None,
        }
    }

    /// The real root of `path`: its NAR downloaded, verified and ingested
    /// once, whoever asks and however many at a time.
    pub(crate) async fn fetched(&self, path: &UpstreamPath) -> Result<Node, PathError> {
        path.fetched
            .get_or_try_init(|| async {
                let info = self.upstream.fetch(&path.found).await?;
                Ok(info.root)
            })
            .await
            .cloned()
    }
}

/// A key no one else knows, so no content hashes to a placeholder.
fn rand_key() -> [u8; 32] {
    use rand::TryRng as _;
    let mut key = [0u8; 32];
    if rand::rngs::SysRng.try_fill_bytes(&mut key).is_err() {
        // No OS randomness: a key from the clock and the process still
        // differs per mount, and content would have to be made for it.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let seed = format!("{}:{}", std::process::id(), now.as_nanos());
        key = *blake3::hash(seed.as_bytes()).as_bytes();
    }
    key
}
