//! [`UpstreamSubstituter`]: store paths the store lacks, substituted
//! lazily from upstream binary caches — the upstream layer of a
//! [`Substituters`](lazystore_pathinfo::substitute::Substituters)
//! composition.
//!
//! A lookup of an unknown path asks the upstreams for its narinfo (checked
//! as an import checks it). If the cache has a `.ls` listing of the NAR
//! whose implied NAR size is the signed NarSize, the path is shown from it
//! at once: its tree becomes in-memory castore directories and files with
//! *placeholder* digests, and the first read of a file's contents downloads
//! the NAR (one download at a time per path; readers waiting on a download
//! that fails share its failure), verifies it, ingests it into the store
//! and then checks the shown tree against the real one — names, kinds,
//! sizes, executable bits and symlink targets. Only then is any file's
//! content served, through the real digest of the file at its place. A
//! path whose NAR differs from its listing is poisoned: every later access
//! fails with EIO. Without a usable listing, the lookup reads the start of
//! the NAR (a `Range` request for its first 256 KiB) to learn what the root
//! is: a file is shown with its size and mode and fetched on its first
//! read, like a listed one; a directory is shown with its entries unknown,
//! and the first readdir or lookup inside it fetches the NAR; a symlink,
//! whose NAR is only its header, is fetched at once. Each lookup that
//! falls back so (no listing, or one that cannot be used, logged with the
//! reason) is counted (`upstream_listing_fallbacks`), so an upstream whose
//! listings stopped working shows in the stats rather than only as a
//! slower mount.
//!
//! The listing is not signed, so until the NAR is verified what is shown
//! (sizes, modes, symlink targets) is only what the cache claims: the
//! path stands [`Standing::Provisional`] until then.
//!
//! Placeholders are BLAKE3 keyed hashes under a key drawn per mount, so no
//! content can collide with one; they are never shown as digests (the
//! digest xattr is absent on them).
//!
//! Positive narinfo answers are kept for the life of the mount (a narinfo
//! never changes); "no cache has it" is kept for [`NEGATIVE_TTL`] (or what
//! the mount was given); failures are not kept, so the next access tries
//! again. A fetched path is
//! published in the store's path-info service (as an import would: its
//! signature and NarHash are checked) when every path it refers to is
//! published there already, since a published path promises its closure;
//! later mounts of the store then find it there, without upstream.
//! Otherwise it is kept pending (at most [`MAX_PENDING`] paths, the oldest
//! dropped first). After each path it publishes, the substituter goes
//! through the pending paths and publishes every one whose references are
//! all published now, and again until a pass publishes nothing; so a path
//! read before its references is published once they have been read too.
//! A reference published by another process is seen at the next such pass.
//! Publishing runs one path at a time. What is still pending when the mount
//! exits is forgotten, but its NAR is not: the store's index of NARs
//! (`Store::nar_roots`) names its tree, so the next mount that reads the
//! path fetches only its narinfo. With signature checks off nothing is
//! published.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lazystore_castore::{Digest, Directory, DirectoryError, DirectoryService, Node};
use lazystore_pathinfo::listing::{Listing, ListingEntry};
use lazystore_pathinfo::pathinfos::{PathInfo, PathInfoService};
use lazystore_pathinfo::substitute::{Standing, SubstituteError, Substituter, Validity};
use lazystore_pathinfo::{Store, StorePath, StorePathHash, Wanted};
use tokio::sync::OnceCell;

mod placeholders;

use placeholders::{Tree, placeholder, rand_key};

use crate::error::PathError;
use crate::source::Source;
use crate::upstream::{Found, Peeked, UpstreamCaches};

/// How long "no upstream has this path" is believed, by default.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// Paths remembered as missing before the expired ones are dropped.
const MAX_MISSING: usize = 4096;

/// Fetched paths kept waiting for their references to be published; past
/// it the oldest is dropped. Each publish goes through all of them.
const MAX_PENDING: usize = 1024;

/// A path found upstream.
struct UpstreamPath {
    found: Found,
    /// The root shown: from the listing or the NAR's start (with
    /// placeholders), or the real one once fetched.
    shown: Node,
    /// Where `shown` came from.
    shown_from: ShownFrom,
    /// The real root, once the NAR is ingested (and, for a listed path,
    /// the shown tree checked against it).
    fetched: OnceCell<Node>,
    /// One download at a time.
    fetch_lock: tokio::sync::Mutex<()>,
    /// When the last download failed and why, for readers that waited on
    /// it.
    // std Mutexes: one read or write each, no await.
    last_failure: Mutex<Option<(Instant, FetchError)>>,
    /// Why the path can't be shown any more: its NAR differs from its
    /// listing.
    poisoned: Mutex<Option<FetchError>>,
}

/// Where a path's shown root came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ShownFrom {
    /// The fetched NAR: nothing to check.
    Nar,
    /// A listing (or, for a single file, the NAR's start): checked against
    /// the NAR when it is fetched.
    Listing,
    /// The NAR's start said the root is a directory; its entries come
    /// with the NAR.
    Peek,
}

/// What a placeholder digest stands for.
enum Placeholder {
    /// A directory of a listing.
    Directory(Arc<Directory>),
    /// A file of a listing, in this path.
    File(Arc<UpstreamPath>),
    /// The root directory of this path, its entries not known before its
    /// NAR is fetched.
    Unfetched(Arc<UpstreamPath>),
}

/// A path's lookup, shared by everyone looking it up.
type PathCell = Arc<OnceCell<Arc<UpstreamPath>>>;

/// Why a path's contents could not be had.
#[derive(Clone, Debug, thiserror::Error)]
enum FetchError {
    /// Downloading or verifying the NAR failed.
    #[error(transparent)]
    Upstream(Arc<PathError>),
    /// The verified NAR is not what the listing showed.
    #[error("the cache's listing differs from the verified NAR at {0}")]
    Listing(Arc<str>),
    /// The verified NAR is not the directory its start showed.
    #[error("the verified NAR is not the directory the start of its download showed")]
    NotADirectory,
    /// The ingested tree could not be read back.
    #[error("reading the ingested tree back")]
    Store(#[source] Arc<DirectoryError>),
}

impl From<FetchError> for SubstituteError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Listing(_) | FetchError::NotADirectory => {
                SubstituteError::Inconsistent(lazystore_castore::error_chain(&e).into())
            }
            e => SubstituteError::Source(Arc::new(e)),
        }
    }
}

/// Upstream binary caches as a [`Substituter`]: paths shown from their
/// narinfos and listings, fetched into the store on first use.
pub struct UpstreamSubstituter {
    upstream: Arc<dyn Source>,
    /// Where fetched trees are read back from, to check them.
    directories: Arc<dyn DirectoryService>,
    /// Where fetched paths are published once their closure is.
    path_infos: Arc<dyn PathInfoService>,
    /// Fetched paths not published for want of a published reference,
    /// oldest first. Held while a path is published, so paths are
    /// published one at a time.
    pending: tokio::sync::Mutex<Vec<PathInfo>>,
    key: [u8; 32],
    /// One cell per path asked for: concurrent lookups wait on one fetch.
    // std Mutexes: one map operation per call, no await.
    paths: Mutex<HashMap<StorePathHash, PathCell>>,
    /// When each path was last found in no cache.
    missing: Mutex<HashMap<StorePathHash, Instant>>,
    /// How long such an answer is believed.
    negative_ttl: Duration,
    placeholders: Mutex<HashMap<Digest, Placeholder>>,
    /// Placeholder file → the real file, once its path is verified.
    resolved: Mutex<HashMap<Digest, Digest>>,
    narinfos_fetched: AtomicU64,
    /// Lookups shown from the NAR's start for want of a usable listing.
    listing_fallbacks: AtomicU64,
}

/// Why an upstream lookup found nothing to show.
enum LookupError {
    /// No upstream has the path (or it was found missing recently).
    Missing,
    /// An upstream failed.
    Failed(FetchError),
}

impl UpstreamSubstituter {
    /// The caches of `options` (tried in order; only `caches`,
    /// `trusted_keys`, `check_signatures`, `retry` and `http` are used)
    /// in front of `store`: fetched NARs are stored in it and fetched
    /// paths published there once their closure is. "No cache has it" is
    /// believed for `negative_ttl`. Opens nothing yet.
    pub fn new(
        store: Store,
        options: crate::Options,
        negative_ttl: Duration,
    ) -> Result<Self, crate::SetupError> {
        let upstream = UpstreamCaches::new(store.clone(), options)?;
        Ok(UpstreamSubstituter::with_source(
            store,
            Arc::new(upstream),
            negative_ttl,
        ))
    }

    /// Paths from `source` in front of `store`: shown from their facts and
    /// listings, their contents fetched on first read; fetched paths are
    /// published in `store` once their closure is, if the source says they
    /// are ours to publish. "Not there" is believed for `negative_ttl`.
    pub fn with_source(store: Store, source: Arc<dyn Source>, negative_ttl: Duration) -> Self {
        UpstreamSubstituter {
            upstream: source,
            directories: store.directories,
            path_infos: store.path_infos,
            pending: tokio::sync::Mutex::new(Vec::new()),
            key: rand_key(),
            paths: Mutex::new(HashMap::new()),
            missing: Mutex::new(HashMap::new()),
            negative_ttl,
            placeholders: Mutex::new(HashMap::new()),
            resolved: Mutex::new(HashMap::new()),
            narinfos_fetched: AtomicU64::new(0),
            listing_fallbacks: AtomicU64::new(0),
        }
    }

    /// The path to show for `path`, looked up upstream (once, however many
    /// ask at the same time).
    async fn lookup(&self, path: &StorePath) -> Result<Arc<UpstreamPath>, LookupError> {
        let hash = path.hash();
        if self.recently_missing(&hash) {
            return Err(LookupError::Missing);
        }
        let cell = self
            .paths
            .lock()
            .expect("poisoned")
            .entry(hash)
            .or_default()
            .clone();
        let found = match cell.get_or_try_init(|| self.find(path)).await {
            Ok(found) => found,
            Err(e) => {
                // Keep no cell for a path not found: one per name ever
                // looked up would grow without bound.
                let mut paths = self.paths.lock().expect("poisoned");
                if paths
                    .get(&hash)
                    .is_some_and(|c| Arc::ptr_eq(c, &cell) && !c.initialized())
                {
                    paths.remove(&hash);
                }
                return Err(e);
            }
        };
        // The cell is keyed by hash; the name must match too.
        if found.found.facts.store_path != *path {
            return Err(LookupError::Missing);
        }
        Ok(found.clone())
    }

    fn recently_missing(&self, hash: &StorePathHash) -> bool {
        let mut missing = self.missing.lock().expect("poisoned");
        match missing.get(hash) {
            Some(at) if at.elapsed() < self.negative_ttl => true,
            Some(_) => {
                missing.remove(hash);
                false
            }
            None => false,
        }
    }

    async fn find(&self, path: &StorePath) -> Result<Arc<UpstreamPath>, LookupError> {
        // Another waiter may have found it missing while this one waited.
        if self.recently_missing(&path.hash()) {
            return Err(LookupError::Missing);
        }
        let failed = |e| LookupError::Failed(FetchError::Upstream(Arc::new(e)));
        let wanted = Wanted::from(path.clone());
        self.narinfos_fetched.fetch_add(1, Ordering::Relaxed);
        let found = match self.upstream.find(&wanted).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                let mut missing = self.missing.lock().expect("poisoned");
                if missing.len() >= MAX_MISSING {
                    missing.retain(|_, at| at.elapsed() < self.negative_ttl);
                }
                missing.insert(path.hash(), Instant::now());
                tracing::info!(
                    "{}: in no upstream cache (narinfo not found); returning ENOENT, \
                     believed for {:?}",
                    path.to_absolute(),
                    self.negative_ttl
                );
                return Err(LookupError::Missing);
            }
            Err(e) => return Err(failed(e)),
        };
        if let Some(listing) = self.upstream.listing(&found).await {
            let implied = listing.nar_size();
            if implied == found.facts.nar_size {
                return Ok(self.show_listing(found, listing).await);
            }
            tracing::warn!(
                "{}: ignoring its listing, which implies a NAR of {implied} bytes, not the \
                 signed NarSize {}",
                path.to_absolute(),
                found.facts.nar_size
            );
        }
        self.listing_fallbacks.fetch_add(1, Ordering::Relaxed);
        match self.upstream.peek(&found).await.map_err(failed)? {
            Some(Peeked::File { size, executable }) => {
                let listing = Listing {
                    root: ListingEntry::Regular {
                        size,
                        executable,
                        nar_offset: None,
                    },
                };
                // Held to the signed NarSize, as a listing is.
                if listing.nar_size() == found.facts.nar_size {
                    return Ok(self.show_listing(found, listing).await);
                }
                tracing::warn!(
                    "{}: the start of its NAR claims a file of {size} bytes, which does not \
                     fit the signed NarSize {}; fetching the NAR now",
                    path.to_absolute(),
                    found.facts.nar_size
                );
            }
            Some(Peeked::Directory) => return Ok(self.show_unfetched(found)),
            // A symlink's NAR is its header: fetched now; and a path whose
            // root the source cannot tell without it.
            Some(Peeked::Symlink) | None => {}
        }
        let real = self.upstream.fetch(&found).await.map_err(failed)?;
        self.publish_if_closed(&real).await;
        Ok(Arc::new(UpstreamPath::new(
            found,
            real.root.clone(),
            ShownFrom::Nar,
            Some(real.root),
        )))
    }

    /// The path `found`, a directory, shown with a placeholder root whose
    /// entries are known once its NAR is fetched.
    fn show_unfetched(&self, found: Found) -> Arc<UpstreamPath> {
        let base = found.facts.store_path.to_string();
        let digest = placeholder(&self.key, b'r', base.as_bytes());
        let shown = Node::Directory { digest, size: 0 };
        let path = Arc::new(UpstreamPath::new(found, shown, ShownFrom::Peek, None));
        self.placeholders
            .lock()
            .expect("poisoned")
            .insert(digest, Placeholder::Unfetched(path.clone()));
        path
    }

    /// For the placeholder root of a directory path shown before its NAR:
    /// the path.
    fn unfetched(&self, digest: &Digest) -> Option<Arc<UpstreamPath>> {
        match self.placeholders.lock().expect("poisoned").get(digest) {
            Some(Placeholder::Unfetched(path)) => Some(path.clone()),
            _ => None,
        }
    }

    /// The path `found`, shown as `listing` says, its placeholders
    /// registered.
    async fn show_listing(&self, found: Found, listing: Listing) -> Arc<UpstreamPath> {
        let base = found.facts.store_path.to_string();
        let key = self.key;
        // A large listing is CPU work: off the runtime's threads.
        let built = tokio::task::spawn_blocking(move || {
            let mut tree = Tree::default();
            let mut within = base.into_bytes();
            let shown = tree.node(&key, &listing.root, &mut within);
            (shown, tree)
        })
        .await
        .expect("building a listing's tree does not panic");
        let (shown, tree) = built;
        let path = Arc::new(UpstreamPath::new(found, shown, ShownFrom::Listing, None));
        let mut placeholders = self.placeholders.lock().expect("poisoned");
        for digest in tree.files {
            placeholders.insert(digest, Placeholder::File(path.clone()));
        }
        for (digest, dir) in tree.dirs {
            placeholders.insert(digest, Placeholder::Directory(dir));
        }
        path
    }

    /// The directory a placeholder digest stands for, if it is one.
    fn listed_directory(&self, digest: &Digest) -> Option<Arc<Directory>> {
        match self.placeholders.lock().expect("poisoned").get(digest) {
            Some(Placeholder::Directory(d)) => Some(d.clone()),
            _ => None,
        }
    }

    /// For a placeholder file: the path it is in.
    fn listed_file(&self, digest: &Digest) -> Option<Arc<UpstreamPath>> {
        match self.placeholders.lock().expect("poisoned").get(digest) {
            Some(Placeholder::File(path)) => Some(path.clone()),
            _ => None,
        }
    }

    /// The real digest of placeholder file `digest`, once its path is
    /// fetched and verified.
    fn resolved(&self, digest: &Digest) -> Option<Digest> {
        self.resolved.lock().expect("poisoned").get(digest).copied()
    }

    /// Where the shown path `path` stands.
    fn path_standing(&self, path: &StorePath) -> Standing {
        let cell = self
            .paths
            .lock()
            .expect("poisoned")
            .get(&path.hash())
            .cloned();
        match cell.as_deref().and_then(OnceCell::get) {
            Some(path) => path.standing(),
            None => Standing::Verified,
        }
    }

    /// The real root of `path`: its NAR downloaded, verified and ingested,
    /// and for a listed path the shown tree checked against it. One
    /// download at a time; a reader that began (at `started`) before a
    /// download failed gets its failure, and a later reader tries again.
    async fn fetched(&self, path: &UpstreamPath, started: Instant) -> Result<Node, FetchError> {
        if let Some(root) = path.fetched.get() {
            return Ok(root.clone());
        }
        if let Some(e) = path.poisoned() {
            return Err(e);
        }
        let _only = path.fetch_lock.lock().await;
        if let Some(root) = path.fetched.get() {
            return Ok(root.clone());
        }
        if let Some(e) = path.poisoned() {
            return Err(e);
        }
        if let Some((at, e)) = &*path.last_failure.lock().expect("poisoned")
            && *at >= started
        {
            return Err(e.clone());
        }
        let result = match self.upstream.fetch(&path.found).await {
            Err(e) => Err(FetchError::Upstream(Arc::new(e))),
            Ok(info) => match path.shown_from {
                ShownFrom::Nar => Ok(info),
                ShownFrom::Peek if matches!(info.root, Node::Directory { .. }) => Ok(info),
                ShownFrom::Peek => Err(FetchError::NotADirectory),
                ShownFrom::Listing => self.verify(&path.shown, &info.root).await.map(|resolved| {
                    self.resolved.lock().expect("poisoned").extend(resolved);
                    info
                }),
            },
        };
        match result {
            Ok(info) => {
                let root = info.root.clone();
                let _ = path.fetched.set(root.clone());
                self.publish_if_closed(&info).await;
                Ok(root)
            }
            Err(e) => {
                // A NAR that is not what was shown poisons the path; other
                // failures are tried again.
                if matches!(e, FetchError::Listing(_) | FetchError::NotADirectory) {
                    *path.poisoned.lock().expect("poisoned") = Some(e.clone());
                }
                *path.last_failure.lock().expect("poisoned") = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// Publishes the fetched (checked and stored) path `info` if every path
    /// it refers to is published, so the store's promise that a published
    /// path has its closure holds, and then every pending path that this
    /// lets through; else keeps `info` pending. Best effort: a failure is
    /// logged, and the path is then fetched again by the next mount that
    /// wants it.
    async fn publish_if_closed(&self, info: &PathInfo) {
        // Unchecked signatures vouch for nothing: such paths stay the
        // mount's own, not the store's.
        if !self.upstream.publishes_fetched() {
            return;
        }
        let mut pending = self.pending.lock().await;
        let mut known = Known::default();
        match self.try_publish(info, &mut known).await {
            Attempt::Published => {}
            Attempt::Failed => return,
            Attempt::Open(reference) => {
                let path = info.store_path.to_absolute();
                tracing::debug!(
                    "{path}: not published yet: {} is not; pending until it is",
                    reference.to_absolute()
                );
                if pending.iter().any(|p| p.store_path == info.store_path) {
                    return;
                }
                if pending.len() >= MAX_PENDING {
                    let dropped = pending.remove(0);
                    tracing::debug!(
                        "{}: no longer pending publication: {MAX_PENDING} paths newer wait",
                        dropped.store_path.to_absolute()
                    );
                }
                pending.push(info.clone());
                return;
            }
        }
        // Passes until one publishes nothing: a pending path may come
        // before the pending reference it waits for.
        loop {
            let mut progressed = false;
            let mut i = 0;
            while i < pending.len() {
                match self.try_publish(&pending[i], &mut known).await {
                    Attempt::Published => {
                        pending.remove(i);
                        progressed = true;
                    }
                    Attempt::Failed => {
                        pending.remove(i);
                    }
                    Attempt::Open(_) => i += 1,
                }
            }
            if !progressed {
                break;
            }
        }
    }

    /// Publishes `info` if every path it refers to is published; `known`
    /// remembers the answers of one pass through the pending paths.
    async fn try_publish(&self, info: &PathInfo, known: &mut Known) -> Attempt {
        let path = info.store_path.to_absolute();
        for reference in &info.references {
            let hash = reference.hash();
            if *reference == info.store_path || known.published.contains(&hash) {
                continue;
            }
            if known.unpublished.contains(&hash) {
                return Attempt::Open(reference.clone());
            }
            match self.path_infos.get(&hash).await {
                Ok(Some(r)) if r.store_path == *reference => {
                    known.published.insert(hash);
                }
                Ok(_) => {
                    known.unpublished.insert(hash);
                    return Attempt::Open(reference.clone());
                }
                Err(e) => {
                    tracing::warn!("{path}: not published yet: looking up {reference}: {e}");
                    return Attempt::Open(reference.clone());
                }
            }
        }
        match self.path_infos.put(info.clone()).await {
            Ok(()) => {
                tracing::info!("{path}: substituted from upstream and published");
                let hash = info.store_path.hash();
                known.unpublished.remove(&hash);
                known.published.insert(hash);
                Attempt::Published
            }
            Err(e) => {
                tracing::warn!("{path}: substituted from upstream, but publishing failed: {e}");
                Attempt::Failed
            }
        }
    }
}

/// How an attempt to publish a fetched path ended.
enum Attempt {
    Published,
    /// This reference (the first found) is not published.
    Open(StorePath),
    /// Publishing failed (logged).
    Failed,
}

/// Which references are published, as found by one pass of publishing.
#[derive(Default)]
struct Known {
    published: HashSet<StorePathHash>,
    unpublished: HashSet<StorePathHash>,
}

#[async_trait]
impl Substituter for UpstreamSubstituter {
    fn describe(&self) -> String {
        self.upstream.describe()
    }

    async fn find(&self, path: &StorePath) -> Result<Option<PathInfo>, SubstituteError> {
        match self.lookup(path).await {
            Ok(found) => {
                let facts = found.found.facts.clone();
                Ok(Some(PathInfo::from_facts(facts, found.root())))
            }
            Err(LookupError::Missing) => Ok(None),
            Err(LookupError::Failed(e)) => Err(e.into()),
        }
    }

    /// The checked narinfo only: no listing, no NAR.
    async fn validity(&self, wanted: &Wanted) -> Result<Option<Validity>, SubstituteError> {
        self.narinfos_fetched.fetch_add(1, Ordering::Relaxed);
        let found = self.upstream.find(wanted).await;
        let found = found.map_err(|e| SubstituteError::Source(Arc::new(e)))?;
        Ok(found.map(|found| Validity::from(found.facts)))
    }

    async fn directory(
        &self,
        shown: &Digest,
        started: Instant,
    ) -> Result<Option<Arc<Directory>>, SubstituteError> {
        if let Some(dir) = self.listed_directory(shown) {
            return Ok(Some(dir));
        }
        let Some(path) = self.unfetched(shown) else {
            return Ok(None);
        };
        let Node::Directory { digest, .. } = self.fetched(&path, started).await? else {
            return Err(FetchError::NotADirectory.into());
        };
        let dir = self.directories.get(&digest).await;
        let dir = dir.map_err(|e| FetchError::Store(Arc::new(e)))?;
        let dir = dir.ok_or(FetchError::Store(Arc::new(DirectoryError::NotFound(
            digest,
        ))))?;
        Ok(Some(Arc::new(dir)))
    }

    async fn file(
        &self,
        shown: &Digest,
        started: Instant,
    ) -> Result<Option<Digest>, SubstituteError> {
        let Some(path) = self.listed_file(shown) else {
            return Ok(None);
        };
        self.fetched(&path, started).await?;
        match self.resolved(shown) {
            Some(real) => Ok(Some(real)),
            None => Err(SubstituteError::Inconsistent(
                "a verified listing left a file unresolved".into(),
            )),
        }
    }

    fn defers(&self, digest: &Digest) -> bool {
        self.unfetched(digest).is_some()
    }

    fn is_placeholder(&self, digest: &Digest) -> bool {
        self.placeholders
            .lock()
            .expect("poisoned")
            .contains_key(digest)
    }

    fn standing(&self, path: &StorePath) -> Standing {
        self.path_standing(path)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let [looked_up, fell_back] = self.upstream.lookup_counters();
        let mut counters = vec![
            (looked_up, self.narinfos_fetched.load(Ordering::Relaxed)),
            (fell_back, self.listing_fallbacks.load(Ordering::Relaxed)),
        ];
        counters.extend(self.upstream.counters());
        counters
    }
}

impl UpstreamPath {
    /// The root to give a new inode of this path: the real one once a
    /// path shown from its NAR's start is fetched (its placeholder root has
    /// no entries), else the one shown.
    fn root(&self) -> Node {
        match (self.shown_from, self.fetched.get()) {
            (ShownFrom::Peek, Some(real)) => real.clone(),
            _ => self.shown.clone(),
        }
    }

    fn new(found: Found, shown: Node, shown_from: ShownFrom, fetched: Option<Node>) -> Self {
        UpstreamPath {
            found,
            shown,
            shown_from,
            fetched: OnceCell::new_with(fetched),
            fetch_lock: tokio::sync::Mutex::new(()),
            last_failure: Mutex::new(None),
            poisoned: Mutex::new(None),
        }
    }

    fn poisoned(&self) -> Option<FetchError> {
        self.poisoned.lock().expect("poisoned").clone()
    }

    fn standing(&self) -> Standing {
        if let Some(e) = self.poisoned() {
            return Standing::Poisoned(e.into());
        }
        if self.shown_from != ShownFrom::Nar && !self.fetched.initialized() {
            Standing::Provisional
        } else {
            Standing::Verified
        }
    }
}
