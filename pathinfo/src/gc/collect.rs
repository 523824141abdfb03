//! [`Collector`]: one garbage collection of a redb store — retention rules
//! applied (paths not kept are deleted), the kept paths marked, the rest
//! swept — offline (`lazystore gc` holding the store) or in a serving
//! process beside its writers, whose [`Leases`] keep what they are about to
//! publish.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::TryStreamExt as _;
use lazystore_castore::{Leases, RedbStore, SweepError, Swept};

use super::{MarkError, mark};
use crate::pathinfos::uses::now_secs;
use crate::pathinfos::{PathInfo, PathInfoError, PathUses};
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
}

/// Collects a redb store's garbage; one collection at a time.
pub struct Collector {
    /// The store as its writers see it (leased, if they run).
    store: Store,
    redb: RedbStore,
    leases: Option<Leases>,
    uses: Arc<PathUses>,
    running: tokio::sync::Mutex<()>,
    counts: Counts,
}

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
        Collector {
            store,
            redb,
            leases,
            uses,
            running: tokio::sync::Mutex::new(()),
            counts: Counts::default(),
        }
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

    /// The last-use record.
    pub fn uses(&self) -> &Arc<PathUses> {
        &self.uses
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
        let _collecting = self.leases.as_ref().map(Leases::begin_collection);
        let infos: Vec<PathInfo> = self.store.path_infos.list().try_collect().await?;
        let (kept, doomed) = self.retain(infos, retention).await?;
        let mut report = Report {
            dry_run,
            paths_kept: kept.len() as u64,
            ..Report::default()
        };
        if !dry_run {
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
        }
        report.paths_deleted = doomed.into_iter().map(|i| i.store_path).collect();
        let roots = kept.into_iter().map(|info| info.root).collect();
        let live = mark(&self.store, roots, |_| {}).await?;
        report.live = (
            live.directories.len() as u64,
            live.blobs.len() as u64,
            live.chunks.len() as u64,
        );
        let (redb, leases) = (self.redb.clone(), self.leases.clone());
        report.swept =
            tokio::task::spawn_blocking(move || redb.sweep(&live, leases.as_ref(), dry_run))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
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
            let uses = self.uses.clone();
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

/// `store` as a server that collects it while serving uses it: when it is
/// an embedded redb store, its blobs and directories leased to writers
/// ([`Leases`] of `lease`), its PathInfos' uses recorded, and the
/// [`Collector`] of it; any other store as it is, with none.
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
        path_infos: Arc::new(crate::pathinfos::UsedPathInfos::new(
            store.path_infos.clone(),
            uses.clone(),
        )),
        ..store
    };
    let collector = Collector::new(leased.clone(), redb, Some(leases), uses);
    (leased, Some(Arc::new(collector)))
}
