//! [`Collector`]: one garbage collection of a store — retention rules
//! applied (paths not kept are deleted), the kept paths marked, the rest
//! swept. A redb store is collected offline (`lazystore gc` holding the
//! store) or in a serving process beside its writers, whose [`Leases`]
//! keep what they are about to publish; an S3 store from any machine
//! beside its replicas, which a grace period protects instead
//! (`castore/src/s3_gc.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::TryStreamExt as _;
use futures::stream::BoxStream;
use lazystore_castore::{Leases, Node, RedbStore, S3Error, S3Store, S3Swept, SweepError, Swept};

use super::{MarkError, mark};
use crate::pathinfos::uses::now_secs;
use crate::pathinfos::{Facts, PathInfo, PathInfoError, PathInfoService, PathUses, UsedPathInfos};
use crate::{Store, StorePath, StorePathHash, Wanted};

/// Which published paths a collection keeps. With no rule, every one (a
/// collection then only drops what no path reaches).
#[derive(Clone, Debug, Default)]
pub struct Retention {
    /// Keep paths asked for (or published) within this long, with their
    /// closures.
    pub keep_since: Option<Duration>,
    /// Keep these paths' closures.
    pub keep_closure_of: Vec<Wanted>,
}

impl Retention {
    /// Whether no rule is given: every path is kept.
    pub fn keeps_all(&self) -> bool {
        self.keep_since.is_none() && self.keep_closure_of.is_empty()
    }
}

/// What a collection did (or, dry, would do).
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Published paths kept.
    pub paths_kept: u64,
    /// Published paths deleted by the retention rules.
    pub paths_deleted: Vec<StorePath>,
    /// Directories, chunk lists and chunks the kept paths reach.
    pub live: (u64, u64, u64),
    /// What the sweep dropped and the pack bytes before and after.
    pub swept: Swept,
    /// For an S3 store, what happened to its packs.
    pub s3: Option<S3Swept>,
}

/// Why a collection stopped. What it deleted or dropped before is gone;
/// nothing a kept path reaches was.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// Another collection of the store is running.
    #[error("a garbage collection of this store is running already")]
    Running,
    /// A path to keep is not published.
    #[error("{0} (to keep) is not published in the store")]
    UnknownRoot(Wanted),
    /// Listing, deleting or reading the last uses of paths failed.
    #[error("reading or deleting the store's paths")]
    Paths(#[from] PathInfoError),
    /// The mark could not finish: nothing was swept.
    #[error("marking what the kept paths reach; nothing was swept")]
    Mark(#[from] MarkError),
    /// The sweep failed.
    #[error("sweeping")]
    Sweep(#[from] SweepError),
    /// The sweep of an S3 store failed. Packs it condemned stay condemned
    /// (deleted by a later collection); none is deleted half.
    #[error("sweeping the S3 store")]
    S3(#[from] S3Error),
    /// `keep_since` on a store that keeps no record of use.
    #[error(
        "--keep-since needs the record of last uses that a redb store keeps; this store has \
         none (keep paths with --keep-closure-of or --roots)"
    )]
    NoUses,
}

/// Collects a store's garbage; one collection at a time.
pub struct Collector {
    /// The store as its writers see it (leased, if they run).
    store: Store,
    /// What is marked through: `store`, or for S3 a handle that still
    /// sees condemned packs.
    marked: Store,
    backend: Backend,
    uses: Option<Arc<PathUses>>,
    running: tokio::sync::Mutex<()>,
    counts: Counts,
    /// Held for writing while paths are deleted, so no path that refers
    /// to one is published meanwhile (every publication of a collected
    /// store holds it for reading: [`CollectedPathInfos`]).
    gate: Arc<tokio::sync::RwLock<()>>,
    /// Roots kept besides the published paths (a pull-through service's
    /// paths fetched and not yet published).
    extra_roots: std::sync::Mutex<Vec<RootSource>>,
}

/// What the sweep works on.
enum Backend {
    Redb {
        redb: RedbStore,
        leases: Option<Leases>,
    },
    S3 {
        s3: S3Store,
        grace: Duration,
    },
}

/// Roots to keep, asked at each collection.
pub type RootSource = Box<dyn Fn() -> Vec<Node> + Send + Sync>;

/// What the collections so far did, for metrics.
#[derive(Default)]
struct Counts {
    runs: AtomicU64,
    failures: AtomicU64,
    paths_deleted: AtomicU64,
    chunks_dropped: AtomicU64,
    bytes_reclaimed: AtomicU64,
}

impl Collector {
    /// Collects `redb`, read through `store` (its services, with whatever
    /// layers writers use); `leases`: those of writers running beside it,
    /// `None` offline (no writer may run meanwhile); `uses`: the last-use
    /// record `keep_since` reads.
    pub fn new(store: Store, redb: RedbStore, leases: Option<Leases>, uses: Arc<PathUses>) -> Self {
        let marked = store.clone();
        Collector::with(store, marked, Backend::Redb { redb, leases }, Some(uses))
    }

    /// Collects the S3 store `s3`, deleting condemned packs `grace` after
    /// their condemnation (see `castore/src/s3_gc.rs`).
    pub fn s3(s3: S3Store, grace: Duration) -> Self {
        let store = Store::s3(s3.clone(), None);
        let marked = Store::s3(s3.seeing_condemned(), None);
        Collector::with(store, marked, Backend::S3 { s3, grace }, None)
    }

    fn with(store: Store, marked: Store, backend: Backend, uses: Option<Arc<PathUses>>) -> Self {
        Collector {
            store,
            marked,
            backend,
            uses,
            running: tokio::sync::Mutex::new(()),
            counts: Counts::default(),
            gate: Arc::default(),
            extra_roots: std::sync::Mutex::default(),
        }
    }

    /// Keeps what `roots` gives at each collection too.
    pub fn keep_roots(&self, roots: RootSource) {
        self.extra_roots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(roots);
    }

    /// What the collections so far did (not dry runs): runs finished,
    /// failed, paths deleted, chunks dropped, pack bytes reclaimed.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("runs", get(&c.runs)),
            ("failures", get(&c.failures)),
            ("paths_deleted", get(&c.paths_deleted)),
            ("chunks_dropped", get(&c.chunks_dropped)),
            ("bytes_reclaimed", get(&c.bytes_reclaimed)),
        ]
    }

    /// The last-use record, if the store keeps one.
    pub fn uses(&self) -> Option<&Arc<PathUses>> {
        self.uses.as_ref()
    }

    /// One collection under `retention`; with `dry_run`, only counts.
    pub async fn collect(&self, retention: &Retention, dry_run: bool) -> Result<Report, GcError> {
        let result = self.collect_once(retention, dry_run).await;
        let c = &self.counts;
        match &result {
            Ok(report) if !dry_run => {
                c.runs.fetch_add(1, Ordering::Relaxed);
                c.paths_deleted
                    .fetch_add(report.paths_deleted.len() as u64, Ordering::Relaxed);
                c.chunks_dropped
                    .fetch_add(report.swept.chunks, Ordering::Relaxed);
                c.bytes_reclaimed.fetch_add(
                    report
                        .swept
                        .packs_before
                        .saturating_sub(report.swept.packs_after),
                    Ordering::Relaxed,
                );
            }
            Ok(_) | Err(GcError::Running) => {}
            Err(_) => {
                c.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    async fn collect_once(&self, retention: &Retention, dry_run: bool) -> Result<Report, GcError> {
        let _one = self.running.try_lock().map_err(|_| GcError::Running)?;
        // Before anything is listed: what writers touch from a lease ago
        // on stays in the leases until the sweep is done.
        let _collecting = match &self.backend {
            Backend::Redb { leases, .. } => leases.as_ref().map(Leases::begin_collection),
            Backend::S3 { .. } => None,
        };
        let infos: Vec<PathInfo> = self.store.path_infos.list().try_collect().await?;
        let (kept, mut doomed) = self.retain(infos, retention).await?;
        let mut report = Report {
            dry_run,
            paths_kept: kept.len() as u64,
            ..Report::default()
        };
        let roots: Vec<Node> = if dry_run || doomed.is_empty() {
            kept.into_iter().map(|info| info.root).collect()
        } else {
            // With publication stopped, decide again from what is
            // published and used now: a path published since the listing
            // may refer to a doomed one, or a builder may have asked for
            // it. Only what both decisions doom goes.
            let _no_puts = self.gate.write().await;
            let infos: Vec<PathInfo> = self.store.path_infos.list().try_collect().await?;
            let (kept, again) = self.retain(infos, retention).await?;
            let again: HashSet<StorePathHash> = again.iter().map(|i| i.store_path.hash()).collect();
            doomed.retain(|info| again.contains(&info.store_path.hash()));
            for info in &doomed {
                if self
                    .store
                    .path_infos
                    .delete(&info.store_path.hash())
                    .await?
                {
                    tracing::info!(path = %info.store_path, "deleted by the retention rules");
                }
            }
            report.paths_kept = kept.len() as u64;
            kept.into_iter().map(|info| info.root).collect()
        };
        report.paths_deleted = doomed.into_iter().map(|i| i.store_path).collect();
        let mut roots = roots;
        for source in self
            .extra_roots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            roots.extend(source());
        }
        let live = mark(&self.marked, roots, |_| {}).await?;
        report.live = (
            live.directories.len() as u64,
            live.blobs.len() as u64,
            live.chunks.len() as u64,
        );
        match &self.backend {
            Backend::Redb { redb, leases } => {
                let (redb, leases) = (redb.clone(), leases.clone());
                report.swept = tokio::task::spawn_blocking(move || {
                    redb.sweep(&live, leases.as_ref(), dry_run)
                })
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
            }
            Backend::S3 { s3, grace } => {
                let s = s3.sweep(&live, *grace, dry_run).await?;
                report.swept = Swept {
                    directories: s.dead_directories,
                    blobs: s.dead_blobs,
                    chunks: s.dead_chunks,
                    chunk_bytes: 0,
                    packs_before: s.bytes_before,
                    packs_after: s.bytes_before - s.deleted_bytes + s.copied_bytes,
                };
                report.s3 = Some(s);
            }
        }
        Ok(report)
    }

    /// `infos` split into the kept (the closures of the paths the rules
    /// keep) and the rest.
    async fn retain(
        &self,
        infos: Vec<PathInfo>,
        retention: &Retention,
    ) -> Result<(Vec<PathInfo>, Vec<PathInfo>), GcError> {
        if retention.keeps_all() {
            return Ok((infos, Vec::new()));
        }
        let by_hash: HashMap<StorePathHash, &PathInfo> =
            infos.iter().map(|i| (i.store_path.hash(), i)).collect();
        let mut seeds = Vec::new();
        for wanted in &retention.keep_closure_of {
            match by_hash.get(&wanted.hash()) {
                Some(info) if wanted.matches(&info.store_path) => seeds.push(wanted.hash()),
                _ => return Err(GcError::UnknownRoot(wanted.clone())),
            }
        }
        if let Some(since) = retention.keep_since {
            let hashes: Vec<StorePathHash> = by_hash.keys().copied().collect();
            let uses = self.uses.clone().ok_or(GcError::NoUses)?;
            let now = now_secs();
            let last = tokio::task::spawn_blocking(move || uses.last_uses(&hashes, now))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
            let cutoff = now.saturating_sub(since.as_secs());
            seeds.extend(
                last.into_iter()
                    .filter(|(_, at)| *at >= cutoff)
                    .map(|(h, _)| h),
            );
        }
        let mut keep = HashSet::new();
        while let Some(hash) = seeds.pop() {
            // A reference not published is not ours to keep.
            let Some(info) = by_hash.get(&hash) else {
                continue;
            };
            if keep.insert(hash) {
                seeds.extend(info.references.iter().map(StorePath::hash));
            }
        }
        Ok(infos
            .into_iter()
            .partition(|info| keep.contains(&info.store_path.hash())))
    }
}

/// The PathInfos of a store collected while it serves: uses recorded
/// ([`UsedPathInfos`]), and every put checked whole first — each
/// directory, chunk list and chunk of its tree present
/// ([`Store::find_missing`], through the leased services, so the check
/// renews the writers' leases on the tree) — while no collection is
/// deleting paths. A tree a collection dropped (an upload older than the
/// lease) is refused ([`PathInfoError::Incomplete`]), to be uploaded again.
pub struct CollectedPathInfos {
    inner: Arc<dyn PathInfoService>,
    /// The leased blobs and directories the check reads.
    leased: Store,
    gate: Arc<tokio::sync::RwLock<()>>,
}

#[async_trait::async_trait]
impl PathInfoService for CollectedPathInfos {
    async fn get(&self, hash: &StorePathHash) -> Result<Option<PathInfo>, PathInfoError> {
        self.inner.get(hash).await
    }

    async fn get_published(&self, hash: &StorePathHash) -> Result<Option<PathInfo>, PathInfoError> {
        self.inner.get_published(hash).await
    }

    async fn facts(&self, hash: &StorePathHash) -> Result<Option<Facts>, PathInfoError> {
        self.inner.facts(hash).await
    }

    async fn listing(&self, hash: &StorePathHash) -> Result<Option<Vec<u8>>, PathInfoError> {
        self.inner.listing(hash).await
    }

    async fn put(&self, info: PathInfo) -> Result<(), PathInfoError> {
        let _no_deletes = self.gate.read().await;
        let missing = self.leased.find_missing(&info.root).await;
        if let Some(missing) = missing.map_err(|e| PathInfoError::Backend(Box::new(e)))? {
            return Err(PathInfoError::Incomplete {
                store_path: info.store_path,
                missing,
            });
        }
        self.inner.put(info).await
    }

    fn list(&self) -> BoxStream<'static, Result<PathInfo, PathInfoError>> {
        self.inner.list()
    }

    async fn delete(&self, hash: &StorePathHash) -> Result<bool, PathInfoError> {
        self.inner.delete(hash).await
    }
}

/// `store` as a server that collects it while serving uses it: when it is
/// an embedded redb store, its blobs and directories leased to writers
/// ([`Leases`] of `lease`), its PathInfos [`CollectedPathInfos`], and the
/// [`Collector`] of it (which marks through `store` itself, so its own
/// reads touch nothing); any other store as it is, with none.
pub fn collected_while_serving(store: Store, lease: Duration) -> (Store, Option<Arc<Collector>>) {
    let Some(redb) = store.redb.clone() else {
        return (store, None);
    };
    let leases = Leases::new(lease);
    let uses = Arc::new(PathUses::new(redb.clone()));
    let params = store.blobs.params();
    let leased = Store {
        blobs: lazystore_castore::Blobs::new(
            Arc::new(lazystore_castore::leased_blobs(
                store.blobs.service().clone(),
                leases.clone(),
            )),
            params,
        ),
        directories: Arc::new(lazystore_castore::LeasedDirectories::new(
            store.directories.clone(),
            leases.clone(),
        )),
        ..store.clone()
    };
    let collector = Collector::new(store, redb, Some(leases), uses.clone());
    let path_infos = CollectedPathInfos {
        inner: Arc::new(UsedPathInfos::new(leased.path_infos.clone(), uses)),
        leased: leased.clone(),
        gate: collector.gate.clone(),
    };
    let served = Store {
        path_infos: Arc::new(path_infos),
        ..leased
    };
    (served, Some(Arc::new(collector)))
}

#[cfg(test)]
mod tests {
    use lazystore_castore::{Digest, RedbStore};

    use super::*;

    /// On a store collected while it serves, a PathInfo whose tree is not
    /// all there is refused, whoever puts it.
    #[tokio::test]
    async fn an_incomplete_tree_is_not_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::redb(RedbStore::open(dir.path().join("s.redb")).unwrap());
        let (served, collector) = collected_while_serving(store, Duration::from_secs(60));
        assert!(collector.is_some());
        let info = PathInfo {
            store_path: "00bgd045z0d4icpbc2yyz4gx48ak44la-gone".parse().unwrap(),
            root: Node::File {
                digest: Digest::of(b"never stored"),
                size: 12,
                executable: false,
            },
            references: Vec::new(),
            nar_size: 200,
            nar_sha256: [0; 32],
            signatures: Vec::new(),
            deriver: None,
            ca: None,
        };
        let e = served.path_infos.put(info).await.unwrap_err();
        assert!(matches!(e, PathInfoError::Incomplete { .. }), "{e}");
        assert!(e.to_string().contains("upload the path again"), "{e}");
    }
}
