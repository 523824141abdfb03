//! A pull-through store: PathInfos with the upstream binary caches behind
//! them ([`PullThrough`]). `lazystore serve --upstream` serves its store
//! through one, so builders mounting it, and Nix clients of its HTTP cache,
//! see every path of those caches without an import beforehand, and each
//! NAR is downloaded once for the whole fleet.
//!
//! A lookup of a path the store lacks fetches that path alone from the
//! caches — checked exactly as `lazystore import` checks (signature by a
//! trusted key, NarHash and NarSize of the NAR) and ingested — and answers
//! with it at once; its closure is imported behind, and the path is
//! published once every path it refers to is (a published path promises
//! its closure). Until then the fetched PathInfo is kept in memory and
//! answered from, for [`READY_TTL`] at most (the durable NAR index then
//! saves a second download). So a builder's first read waits for one NAR,
//! not for the closure of the path it reads. Concurrent lookups of one
//! path, from gRPC and HTTP clients alike, share one fetch, and the
//! closure's import finds that NAR stored. A path no cache has is believed
//! missing for the negative TTL; any other failure (a bad signature, a NAR
//! that does not match, a cache down) is logged with the path and the
//! reason, answered as [`PathInfoError::Upstream`] (gRPC `NOT_FOUND`, HTTP
//! 502), and not remembered: the next lookup tries again.
//!
//! Writes and listings go to the store itself; the server's publishing
//! checks read the store itself too, so a put never pulls from upstream.
//!
//! At most [`MAX_PULLS`] fetches and [`MAX_PULLS`] closure imports run at
//! once; runs that want one NAR take turns, so it is downloaded once
//! (`import/fetch.rs`). Caches are asked in the order of their `Priority`,
//! as Nix asks them.
//!
//! What a path is without its contents ([`PathInfoService::facts`]: the
//! gRPC `Facts` call a builder's `lazystore nix-db` makes for every path of
//! a closure) is answered from the upstream narinfo, checked, with no NAR
//! downloaded; so registering a closure's validity costs one narinfo per
//! path, and only what a build reads is fetched.
//!
//! A path's NAR listing ([`PathInfoService::listing`], the gRPC `Listing`
//! call) is the upstream `.ls`, so a builder's mount shows the tree of a
//! path the service has not fetched (`source.rs`, [`ServiceSource`]) and
//! `ls`/`stat` download no NAR; `get_published` answers from the store
//! alone, so the mount's store layer never triggers a pull.
//!
//! [`ServiceSource`]: crate::ServiceSource

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use futures::stream::BoxStream;
use lazystore_pathinfo::pathinfos::{Facts, PathInfo, PathInfoError, PathInfoService};
use lazystore_pathinfo::{Store, StorePathHash, Wanted};

use crate::error::{PathError, PathErrorKind, SetupError};
use crate::{Importer, Options};

/// What one pull of a path ended with, shared by its waiters.
type Pull = Shared<BoxFuture<'static, Result<(), Arc<PullFailed>>>>;

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
enum PullFailed {
    /// The import failed for the path (or a path it refers to).
    #[error(transparent)]
    Import(PathError),
    /// The import's task panicked.
    #[error("the import of {0} failed internally")]
    Panicked(StorePathHash),
}

impl PullFailed {
    /// No cache has the path itself.
    fn not_found(&self) -> bool {
        matches!(self, PullFailed::Import(e) if matches!(e.kind, PathErrorKind::NotFound { .. }))
    }
}

/// The PathInfos of a store, with upstream caches behind them.
pub struct PullThrough {
    inner: Arc<dyn PathInfoService>,
    state: Arc<State>,
}

/// Pulls running at once, at most: each import fetches up to its `jobs`
/// paths at a time, so a fleet asking for many different paths at once
/// opens at most this many times `jobs` downloads from the caches (each
/// streamed: memory is bounded per download, not per NAR).
pub const MAX_PULLS: usize = 8;

/// How long a fetched path whose closure is not yet published is answered
/// from memory: past this, a lookup fetches it again (finding its NAR
/// stored, through the durable index, unless a garbage collection dropped
/// its unpublished data).
pub const READY_TTL: Duration = Duration::from_secs(600);

/// Upstream facts remembered at most (some 300 bytes each) before the
/// memory starts again.
const MAX_FACTS: usize = 100_000;

/// What one fetch of a path ended with, shared by its waiters.
type Fetch = Shared<BoxFuture<'static, Result<PathInfo, Arc<PullFailed>>>>;

struct State {
    /// Made on first use, and again after a cache could not be opened, so
    /// the service starts (and serves its store) while an upstream is down.
    importer: tokio::sync::OnceCell<Importer>,
    /// What the importer is made of.
    store: Store,
    options: Options,
    /// Bounds the closure imports running at once to [`MAX_PULLS`].
    running: tokio::sync::Semaphore,
    /// Bounds the single-path fetches running at once to [`MAX_PULLS`].
    fetching: tokio::sync::Semaphore,
    /// Fetches in progress, by path.
    fetches: Mutex<HashMap<StorePathHash, Fetch>>,
    /// Paths fetched whose closure is not yet published, and when.
    ready: Mutex<HashMap<StorePathHash, (PathInfo, Instant)>>,
    /// Upstream narinfos' facts asked for (a narinfo never changes).
    facts: Mutex<HashMap<StorePathHash, Facts>>,
    /// Fetches of one path that failed (absent paths not counted).
    failures: std::sync::atomic::AtomicU64,
    negative_ttl: Duration,
    // A std Mutex: each use is one map operation, never held across await.
    /// Pulls in progress, by path.
    pulls: Mutex<HashMap<StorePathHash, Pull>>,
    /// Paths no cache had, and when that was found.
    missing: Mutex<HashMap<StorePathHash, Instant>>,
}

impl PullThrough {
    /// `store`'s PathInfos, with the caches of `options` behind them:
    /// what they import is published into `store`. "No cache has it" is
    /// believed for `negative_ttl`.
    pub async fn new(
        store: Store,
        options: Options,
        negative_ttl: Duration,
    ) -> Result<PullThrough, SetupError> {
        let inner = store.path_infos.clone();
        let importer = tokio::sync::OnceCell::new();
        match Importer::new(store.clone(), options.clone()).await {
            Ok(opened) => {
                let _ = importer.set(opened);
            }
            // Not fatal: the store is served meanwhile, and lookups try again.
            Err(e @ SetupError::Cache { .. }) => tracing::warn!(
                "{}; paths the store lacks are answered with that error until it can be opened",
                lazystore_castore::error_chain(&e)
            ),
            Err(e) => return Err(e),
        }
        Ok(PullThrough {
            inner,
            state: Arc::new(State {
                importer,
                store,
                options,
                running: tokio::sync::Semaphore::new(MAX_PULLS),
                fetching: tokio::sync::Semaphore::new(MAX_PULLS),
                fetches: Mutex::default(),
                ready: Mutex::default(),
                facts: Mutex::default(),
                failures: Default::default(),
                negative_ttl,
                pulls: Mutex::default(),
                missing: Mutex::default(),
            }),
        })
    }

    /// `store` with its PathInfos read through the upstream caches of
    /// `options`: the store to serve.
    pub async fn store(
        store: Store,
        options: Options,
        negative_ttl: Duration,
    ) -> Result<Store, SetupError> {
        let pull_through = PullThrough::new(store.clone(), options, negative_ttl).await?;
        Ok(Store {
            path_infos: Arc::new(pull_through),
            ..store
        })
    }

    /// What this layer did so far, for metrics: NARs downloaded, bytes
    /// received from the caches, failed fetches.
    pub fn counters(&self) -> impl Fn() -> Vec<(&'static str, u64)> + Send + Sync + 'static {
        let state = self.state.clone();
        move || {
            vec![
                (
                    "nar_downloads",
                    state.importer.get().map_or(0, Importer::nar_downloads),
                ),
                (
                    "bytes_downloaded",
                    state.importer.get().map_or(0, Importer::downloaded_bytes),
                ),
                (
                    "failures",
                    state.failures.load(std::sync::atomic::Ordering::Relaxed),
                ),
            ]
        }
    }

    /// The roots of the paths fetched and not yet published, for a garbage
    /// collection to keep: readers may be reading them.
    pub fn ready_roots(&self) -> Box<dyn Fn() -> Vec<lazystore_castore::Node> + Send + Sync> {
        let state = self.state.clone();
        Box::new(move || {
            state
                .ready
                .lock()
                .expect("no panics while held")
                .values()
                .map(|(info, _)| info.root.clone())
                .collect()
        })
    }

    /// Whether the caches were found lately not to have `hash`.
    fn known_missing(&self, hash: &StorePathHash) -> bool {
        let mut missing = self.state.missing.lock().expect("no panics while held");
        match missing.get(hash) {
            Some(at) if at.elapsed() < self.state.negative_ttl => true,
            Some(_) => {
                missing.remove(hash);
                false
            }
            None => false,
        }
    }

    /// The fetched, unpublished PathInfo of `hash`, if it is recent.
    fn ready(&self, hash: &StorePathHash) -> Option<PathInfo> {
        let mut ready = self.state.ready.lock().expect("no panics while held");
        match ready.get(hash) {
            Some((info, at)) if at.elapsed() < READY_TTL => Some(info.clone()),
            Some(_) => {
                ready.remove(hash);
                None
            }
            None => None,
        }
    }

    /// The fetch of `hash` alone: the one in progress, or a new one, which
    /// starts the import of its closure once it has the path.
    fn fetch(&self, hash: StorePathHash) -> Fetch {
        let mut fetches = self.state.fetches.lock().expect("no panics while held");
        if let Some(fetch) = fetches.get(&hash) {
            return fetch.clone();
        }
        let state = self.state.clone();
        let task = tokio::spawn(async move {
            let wanted = wanted(hash);
            let fetched = {
                let _turn = state.fetching.acquire().await.expect("never closed");
                match state.importer(&wanted).await {
                    Ok(importer) => importer.fetch_one(&wanted).await,
                    Err(e) => Err(e),
                }
            };
            state
                .fetches
                .lock()
                .expect("no panics while held")
                .remove(&hash);
            match fetched {
                Ok(info) => {
                    state
                        .ready
                        .lock()
                        .expect("no panics while held")
                        .insert(hash, (info.clone(), Instant::now()));
                    // The closure behind, published when whole.
                    drop(pull(&state, hash));
                    Ok(info)
                }
                Err(e) => {
                    if matches!(e.kind, PathErrorKind::NotFound { .. }) {
                        state.remember_missing(hash);
                    } else {
                        tracing::warn!("cannot pull {e}");
                        state
                            .failures
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(Arc::new(PullFailed::Import(e)))
                }
            }
        });
        let fetch = shared_task("fetching", hash, task);
        fetches.insert(hash, fetch.clone());
        fetch
    }
}

/// The import of `hash`'s closure, which publishes it: the one in
/// progress, or a new one.
fn pull(state: &Arc<State>, hash: StorePathHash) -> Pull {
    let mut pulls = state.pulls.lock().expect("no panics while held");
    if let Some(pull) = pulls.get(&hash) {
        return pull.clone();
    }
    let task = tokio::spawn({
        let state = state.clone();
        async move {
            let wanted = wanted(hash);
            let summary = {
                let _turn = state.running.acquire().await.expect("never closed");
                match state.importer(&wanted).await {
                    Ok(importer) => importer.run(std::slice::from_ref(&wanted)).await,
                    Err(e) => crate::Summary {
                        failed: vec![e],
                        ..crate::Summary::default()
                    },
                }
            };
            state
                .pulls
                .lock()
                .expect("no panics while held")
                .remove(&hash);
            let failed = summary.failed.into_iter();
            // Its own failure if it has one (else a reference's, which is
            // why it was not published).
            let failure = failed.reduce(|first, next| {
                if next.path == wanted.hash_str() {
                    next
                } else {
                    first
                }
            });
            match failure {
                None => {
                    // Published: answered from the store from now on.
                    state
                        .ready
                        .lock()
                        .expect("no panics while held")
                        .remove(&hash);
                    Ok(())
                }
                Some(e) => {
                    if matches!(e.kind, PathErrorKind::NotFound { .. })
                        && e.path == wanted.hash_str()
                    {
                        state.remember_missing(hash);
                    } else {
                        tracing::warn!("cannot pull the closure of {hash}: {e}");
                    }
                    Err(Arc::new(PullFailed::Import(e)))
                }
            }
        }
    });
    let pull = shared_task("pulling", hash, task);
    pulls.insert(hash, pull.clone());
    pull
}

/// `task` as a future every waiter on `hash` shares; a panic in it is
/// logged (`doing` `hash`) and is every waiter's failure.
fn shared_task<T: Clone + Send + Sync + 'static>(
    doing: &'static str,
    hash: StorePathHash,
    task: tokio::task::JoinHandle<Result<T, Arc<PullFailed>>>,
) -> Shared<BoxFuture<'static, Result<T, Arc<PullFailed>>>> {
    async move {
        match task.await {
            Ok(result) => result,
            Err(e) => {
                tracing::error!("{doing} {hash}: {e}");
                Err(Arc::new(PullFailed::Panicked(hash)))
            }
        }
    }
    .boxed()
    .shared()
}

/// The path a hash names, as the importer is asked for it.
fn wanted(hash: StorePathHash) -> Wanted {
    hash.to_string().parse().expect("a hash is a wanted path")
}

impl State {
    /// Remembers that no cache has `hash`, for the negative TTL.
    fn remember_missing(&self, hash: StorePathHash) {
        self.missing
            .lock()
            .expect("no panics while held")
            .insert(hash, Instant::now());
    }

    /// The importer, opening the caches if they are not yet; an error
    /// about `wanted` if a cache cannot be opened now.
    async fn importer(&self, wanted: &Wanted) -> Result<&Importer, PathError> {
        self.importer
            .get_or_try_init(|| Importer::new(self.store.clone(), self.options.clone()))
            .await
            .map_err(|e| PathError {
                path: wanted.to_string(),
                kind: match e {
                    SetupError::Cache { url, source } => {
                        PathErrorKind::NarInfoFetch { cache: url, source }
                    }
                    other => PathErrorKind::Lookup(PathInfoError::Backend(Box::new(other))),
                },
            })
    }
}

#[async_trait]
impl PathInfoService for PullThrough {
    /// From the store; a path it lacks is fetched first (its closure
    /// imported behind), unless the caches were found lately not to have
    /// it.
    async fn get(&self, hash: &StorePathHash) -> Result<Option<PathInfo>, PathInfoError> {
        if let Some(info) = self.inner.get(hash).await? {
            return Ok(Some(info));
        }
        if let Some(info) = self.ready(hash) {
            return Ok(Some(info));
        }
        if self.known_missing(hash) {
            return Ok(None);
        }
        match self.fetch(*hash).await {
            Ok(info) => Ok(Some(info)),
            Err(e) if e.not_found() => Ok(None),
            Err(e) => Err(PathInfoError::Upstream {
                path: hash.to_string(),
                source: Box::new(e),
            }),
        }
    }

    /// From the store, or from the upstream narinfo (checked as an import
    /// checks it): no NAR is downloaded.
    async fn facts(&self, hash: &StorePathHash) -> Result<Option<Facts>, PathInfoError> {
        if let Some(info) = self.inner.get(hash).await? {
            return Ok(Some(Facts::from(info)));
        }
        if let Some(info) = self.ready(hash) {
            return Ok(Some(Facts::from(info)));
        }
        if let Some(facts) = self
            .state
            .facts
            .lock()
            .expect("no panics while held")
            .get(hash)
        {
            return Ok(Some(facts.clone()));
        }
        if self.known_missing(hash) {
            return Ok(None);
        }
        let wanted = wanted(*hash);
        let importer = self.state.importer(&wanted).await;
        match async { importer?.narinfo_one(&wanted).await }.await {
            Ok(Some(narinfo)) => {
                let facts = Facts::from(narinfo);
                let mut known = self.state.facts.lock().expect("no panics while held");
                if known.len() >= MAX_FACTS {
                    known.clear();
                }
                known.insert(*hash, facts.clone());
                Ok(Some(facts))
            }
            Ok(None) => {
                self.state.remember_missing(*hash);
                Ok(None)
            }
            Err(e) => {
                tracing::warn!("cannot look up {e}");
                Err(PathInfoError::Upstream {
                    path: hash.to_string(),
                    source: Box::new(e),
                })
            }
        }
    }

    /// The store's own only: nothing is pulled.
    async fn get_published(&self, hash: &StorePathHash) -> Result<Option<PathInfo>, PathInfoError> {
        self.inner.get(hash).await
    }

    /// The upstream `.ls` of a path the store has neither published nor
    /// fetched: no NAR is downloaded.
    async fn listing(&self, hash: &StorePathHash) -> Result<Option<Vec<u8>>, PathInfoError> {
        if self.inner.get(hash).await?.is_some()
            || self.ready(hash).is_some()
            || self.known_missing(hash)
        {
            return Ok(None);
        }
        let wanted = wanted(*hash);
        let importer = self.state.importer(&wanted).await;
        async { importer?.listing_json(&wanted).await }
            .await
            .map_err(|e| PathInfoError::Upstream {
                path: hash.to_string(),
                source: Box::new(e),
            })
    }

    async fn put(&self, info: PathInfo) -> Result<(), PathInfoError> {
        self.inner.put(info).await
    }

    /// From the store; the caches may have it still, and a later lookup
    /// pulls it again.
    async fn delete(&self, hash: &StorePathHash) -> Result<bool, PathInfoError> {
        self.inner.delete(hash).await
    }

    /// What the store has: the caches are not listed.
    fn list(&self) -> BoxStream<'static, Result<PathInfo, PathInfoError>> {
        self.inner.list()
    }
}
