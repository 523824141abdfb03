//! A pull-through store: PathInfos with the upstream binary caches behind
//! them ([`PullThrough`]). `lazystore serve --upstream` serves its store
//! through one, so builders mounting it, and Nix clients of its HTTP cache,
//! see every path of those caches without an import beforehand, and each
//! NAR is downloaded once for the whole fleet.
//!
//! A lookup of a path the store lacks imports it, with its closure, from
//! the caches — checked exactly as `lazystore import` checks (signature by
//! a trusted key, NarHash and NarSize of the NAR) — publishes it, and then
//! answers from the store. Concurrent lookups of one path, from gRPC and
//! HTTP clients alike, share one import. A path no cache has is believed
//! missing for the negative TTL; any other failure (a bad signature, a NAR
//! that does not match, a cache down) is logged with the path and the
//! reason, answered as [`PathInfoError::Upstream`] (gRPC `NOT_FOUND`, HTTP
//! 502), and not remembered: the next lookup tries again.
//!
//! Writes and listings go to the store itself; the server's publishing
//! checks read the store itself too, so a put never pulls from upstream.
//!
//! At most [`MAX_PULLS`] imports run at once; runs that want one NAR take
//! turns, so it is downloaded once (`import/fetch.rs`).
//!
//! Not yet: answering a lookup from the narinfo and listing before the NAR
//! is downloaded (a lookup waits for its path's closure to be imported),
//! and fetching the rest of a closure in the background.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use futures::stream::BoxStream;
use lazystore_pathinfo::pathinfos::{PathInfo, PathInfoError, PathInfoService};
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

struct State {
    importer: Importer,
    /// Bounds the pulls running at once to [`MAX_PULLS`].
    running: tokio::sync::Semaphore,
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
        let importer = Importer::new(store, options).await?;
        Ok(PullThrough {
            inner,
            state: Arc::new(State {
                importer,
                running: tokio::sync::Semaphore::new(MAX_PULLS),
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

    /// The pull of `hash`: the one in progress, or a new one.
    fn pull(&self, hash: StorePathHash) -> Pull {
        let mut pulls = self.state.pulls.lock().expect("no panics while held");
        if let Some(pull) = pulls.get(&hash) {
            return pull.clone();
        }
        let state = self.state.clone();
        let task = tokio::spawn(async move {
            let wanted: Wanted = hash.to_string().parse().expect("a hash is a wanted path");
            let summary = {
                let _turn = state.running.acquire().await.expect("never closed");
                state.importer.run(std::slice::from_ref(&wanted)).await
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
                None => Ok(()),
                Some(e) => {
                    if matches!(e.kind, PathErrorKind::NotFound { .. })
                        && e.path == wanted.hash_str()
                    {
                        state
                            .missing
                            .lock()
                            .expect("no panics while held")
                            .insert(hash, Instant::now());
                    } else {
                        tracing::warn!("cannot pull {e}");
                    }
                    Err(Arc::new(PullFailed::Import(e)))
                }
            }
        });
        let pull: Pull = async move {
            match task.await {
                Ok(result) => result,
                Err(e) => {
                    tracing::error!("pulling {hash}: {e}");
                    Err(Arc::new(PullFailed::Panicked(hash)))
                }
            }
        }
        .boxed()
        .shared();
        pulls.insert(hash, pull.clone());
        pull
    }
}

#[async_trait]
impl PathInfoService for PullThrough {
    /// From the store; a path it lacks is imported first, unless the
    /// caches were found lately not to have it.
    async fn get(&self, hash: &StorePathHash) -> Result<Option<PathInfo>, PathInfoError> {
        if let Some(info) = self.inner.get(hash).await? {
            return Ok(Some(info));
        }
        if self.known_missing(hash) {
            return Ok(None);
        }
        match self.pull(*hash).await {
            Ok(()) => self.inner.get(hash).await,
            Err(e) if e.not_found() => Ok(None),
            Err(e) => Err(PathInfoError::Upstream {
                path: hash.to_string(),
                source: Box::new(e),
            }),
        }
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
