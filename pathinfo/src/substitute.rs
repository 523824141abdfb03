//! [`Substituter`]: "find this store path", one trait for every place a
//! path can come from, composed in order by [`Substituters`].
//!
//! The store is one substituter ([`StoreSubstituter`]: its PathInfos);
//! upstream binary caches are another (the importer's, which checks
//! narinfos, reads listings, peeks at and downloads NARs, and publishes
//! what it fetched). The mount, `nix-db` and the server ask the
//! composition and hold no branch per source.
//!
//! A substituter may *show* a path before its contents are in the store —
//! the upstream one shows a path from the cache's listing, with
//! placeholder digests that stand for files and directories not yet
//! fetched. Such digests are resolved by the substituter that made them
//! ([`Substituter::directory`], [`Substituter::file`]); every other digest
//! is the store's, and readers fetch it from the store directly. Until its
//! contents are verified a shown path is [`Standing::Provisional`], and
//! its attributes may be cached for [`PROVISIONAL_TTL`] only.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lazystore_castore::{Digest, Directory, ErrorClass, Retryable};

use crate::pathinfos::{Facts, PathInfo, PathInfoError, PathInfoService};
use crate::signature::VerifyError;
use crate::{NarInfo, PublicKey, StorePath, Wanted};

/// How long a reader may keep attributes shown from a cache's claims (a
/// listing, a NAR's first bytes) not yet checked against the NAR.
pub const PROVISIONAL_TTL: Duration = Duration::from_secs(1);

/// Why a substituter could not answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SubstituteError {
    /// The store failed: retrying may help while it is unreachable.
    #[error(transparent)]
    Store(Arc<PathInfoError>),
    /// Another source (an upstream cache) failed or sent what does not
    /// check; it has retried what it could. The path is not shown, and the
    /// next request asks again.
    #[error(transparent)]
    Source(Arc<dyn std::error::Error + Send + Sync>),
    /// What a substituter showed turned out not to be what the verified
    /// contents are: the path is poisoned, every later access fails.
    #[error("{0}")]
    Inconsistent(Arc<str>),
}

impl Retryable for SubstituteError {
    /// The store's failures as the store classes them; another source has
    /// retried what it could already.
    fn class(&self) -> ErrorClass {
        match self {
            SubstituteError::Store(e) => e.class(),
            _ => ErrorClass::Permanent,
        }
    }
}

/// What Nix's validity database holds of a store path (what
/// `nix-store --load-db` reads), without its contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validity {
    /// The store path.
    pub store_path: StorePath,
    /// SHA-256 of its NAR.
    pub nar_sha256: [u8; 32],
    /// Length of its NAR.
    pub nar_size: u64,
    /// The derivation that built it, when known.
    pub deriver: Option<StorePath>,
    /// Store paths it refers to, sorted by basename as Nix sorts them.
    pub references: Vec<StorePath>,
}

impl From<PathInfo> for Validity {
    fn from(info: PathInfo) -> Self {
        Validity::from(Facts::from(info))
    }
}

impl From<Facts> for Validity {
    fn from(facts: Facts) -> Self {
        let mut references = facts.references;
        references.sort();
        Validity {
            store_path: facts.store_path,
            nar_sha256: facts.nar_sha256,
            nar_size: facts.nar_size,
            deriver: facts.deriver,
            references,
        }
    }
}

impl From<NarInfo> for Validity {
    fn from(narinfo: NarInfo) -> Self {
        let mut references = narinfo.references;
        references.sort();
        Validity {
            store_path: narinfo.store_path,
            nar_sha256: narinfo.nar_hash,
            nar_size: narinfo.nar_size,
            deriver: narinfo.deriver,
            references,
        }
    }
}

/// Where a shown path stands.
#[derive(Clone, Debug)]
pub enum Standing {
    /// Its contents are in the store (or it was never shown
    /// provisionally).
    Verified,
    /// Shown from claims not yet checked: keep its attributes for
    /// [`PROVISIONAL_TTL`] only.
    Provisional,
    /// Its verified contents differ from what was shown: every access
    /// fails.
    Poisoned(SubstituteError),
}

/// A source of store paths. Every method but [`find`](Self::find) and
/// [`validity`](Self::validity) has a default for sources that show only
/// what the store holds.
#[async_trait]
pub trait Substituter: Send + Sync {
    /// Where it looks, for messages: a store or cache URL.
    fn describe(&self) -> String;

    /// `path`'s PathInfo, its root as shown to readers: `Ok(None)` if this
    /// source does not have it (or has another path under its hash). The
    /// root's digests are the store's, or placeholders this substituter
    /// resolves. Concurrent finds of one path must share their work.
    async fn find(&self, path: &StorePath) -> Result<Option<PathInfo>, SubstituteError>;

    /// The facts of the path `wanted` names — references, NarHash,
    /// NarSize, deriver — reading no contents: what Nix's validity
    /// database holds. `Ok(None)` if this source does not have it.
    async fn validity(&self, wanted: &Wanted) -> Result<Option<Validity>, SubstituteError>;

    /// The directory that placeholder `shown` stands for, fetching its
    /// path's contents if need be; `Ok(None)` if `shown` is not this
    /// substituter's. `started` is when the request asking began: a fetch
    /// that failed after it (while it waited) fails it too, with no fetch
    /// of its own.
    async fn directory(
        &self,
        _shown: &Digest,
        _started: Instant,
    ) -> Result<Option<Arc<Directory>>, SubstituteError> {
        Ok(None)
    }

    /// The real digest of placeholder file `shown`, fetching its path's
    /// contents if need be; `Ok(None)` if `shown` is not this
    /// substituter's. `started` as for [`directory`](Self::directory).
    async fn file(
        &self,
        _shown: &Digest,
        _started: Instant,
    ) -> Result<Option<Digest>, SubstituteError> {
        Ok(None)
    }

    /// Whether the entries of directory `digest` are known only once its
    /// path's contents are fetched: a reader should not ask for them
    /// ([`directory`](Self::directory)) before it needs them.
    fn defers(&self, _digest: &Digest) -> bool {
        false
    }

    /// Whether `digest` is a placeholder of this substituter's (never to be
    /// shown as a content digest).
    fn is_placeholder(&self, _digest: &Digest) -> bool {
        false
    }

    /// Where the shown path `path` stands.
    fn standing(&self, _path: &StorePath) -> Standing {
        Standing::Verified
    }

    /// Its counters, `(name, value)`, for a stats file or an exit log.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// The store as a substituter: the paths its PathInfo service publishes.
pub struct StoreSubstituter {
    path_infos: Arc<dyn PathInfoService>,
    url: String,
    /// With keys, PathInfos without a valid signature by one of them are
    /// not shown.
    trusted_keys: Vec<PublicKey>,
    /// Paths refused for their signatures, each logged once.
    refused: Mutex<HashSet<StorePath>>,
}

impl StoreSubstituter {
    /// The paths `path_infos` publishes; `url` names the store in
    /// messages.
    pub fn new(path_infos: Arc<dyn PathInfoService>, url: impl Into<String>) -> Self {
        StoreSubstituter {
            path_infos,
            url: url.into(),
            trusted_keys: Vec::new(),
            refused: Mutex::default(),
        }
    }

    /// Shows only the paths whose PathInfo carries a valid signature by
    /// one of `keys` (none: every path, as the store has it). A path
    /// refused is as absent — a later substituter may have it — and is
    /// logged once.
    pub fn require_signatures(mut self, keys: Vec<PublicKey>) -> Self {
        self.trusted_keys = keys;
        self
    }

    /// The PathInfo of `hash` if it is `wanted` and, with trusted keys,
    /// signed by one.
    async fn get(
        &self,
        hash: &crate::StorePathHash,
        wanted: impl Fn(&StorePath) -> bool,
    ) -> Result<Option<PathInfo>, SubstituteError> {
        // Published paths only: a pull-through service's other paths come
        // through its own layer, shown before their NARs are fetched.
        let info = self.path_infos.get_published(hash).await;
        let info = info.map_err(|e| SubstituteError::Store(Arc::new(e)))?;
        // Keyed by hash: the name must match too.
        let Some(info) = info.filter(|info| wanted(&info.store_path)) else {
            return Ok(None);
        };
        let trusted = self.trusted(&info.store_path, || {
            info.verify(&self.trusted_keys).map(drop)
        });
        Ok(trusted.then_some(info))
    }

    /// Whether `path`, checked by `verify`, may be shown: always without
    /// trusted keys; a refusal is logged once per path.
    fn trusted(&self, path: &StorePath, verify: impl FnOnce() -> Result<(), VerifyError>) -> bool {
        if self.trusted_keys.is_empty() {
            return true;
        }
        match verify() {
            Ok(()) => true,
            Err(e) => {
                let mut refused = self.refused.lock().expect("no panics while held");
                if refused.insert(path.clone()) {
                    tracing::warn!(store = %self.url, "not showing {path}: {e}");
                }
                false
            }
        }
    }
}

#[async_trait]
impl Substituter for StoreSubstituter {
    fn describe(&self) -> String {
        self.url.clone()
    }

    async fn find(&self, path: &StorePath) -> Result<Option<PathInfo>, SubstituteError> {
        self.get(&path.hash(), |found| found == path).await
    }

    /// From the store's facts: a pull-through store answers from the
    /// upstream narinfo, downloading no NAR.
    async fn validity(&self, wanted: &Wanted) -> Result<Option<Validity>, SubstituteError> {
        let facts = self.path_infos.facts(&wanted.hash()).await;
        let facts = facts.map_err(|e| SubstituteError::Store(Arc::new(e)))?;
        let Some(facts) = facts.filter(|facts| wanted.matches(&facts.store_path)) else {
            return Ok(None);
        };
        let trusted = self.trusted(&facts.store_path, || {
            facts.verify(&self.trusted_keys).map(drop)
        });
        Ok(trusted.then(|| Validity::from(facts)))
    }
}

/// Substituters asked in order: the first that has a path shows it.
#[derive(Clone, Default)]
pub struct Substituters {
    layers: Vec<Arc<dyn Substituter>>,
}

impl Substituters {
    /// No substituter yet: finds nothing.
    pub fn new() -> Self {
        Substituters::default()
    }

    /// These, then `next`.
    pub fn then(mut self, next: Arc<dyn Substituter>) -> Self {
        self.layers.push(next);
        self
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[Arc<dyn Substituter>] {
        &self.layers
    }
}

#[async_trait]
impl Substituter for Substituters {
    fn describe(&self) -> String {
        let all: Vec<String> = self.layers.iter().map(|l| l.describe()).collect();
        all.join(", ")
    }

    async fn find(&self, path: &StorePath) -> Result<Option<PathInfo>, SubstituteError> {
        for layer in &self.layers {
            if let Some(info) = layer.find(path).await? {
                return Ok(Some(info));
            }
        }
        Ok(None)
    }

    async fn validity(&self, wanted: &Wanted) -> Result<Option<Validity>, SubstituteError> {
        for layer in &self.layers {
            if let Some(info) = layer.validity(wanted).await? {
                return Ok(Some(info));
            }
        }
        Ok(None)
    }

    async fn directory(
        &self,
        shown: &Digest,
        started: Instant,
    ) -> Result<Option<Arc<Directory>>, SubstituteError> {
        for layer in &self.layers {
            if let Some(dir) = layer.directory(shown, started).await? {
                return Ok(Some(dir));
            }
        }
        Ok(None)
    }

    async fn file(
        &self,
        shown: &Digest,
        started: Instant,
    ) -> Result<Option<Digest>, SubstituteError> {
        for layer in &self.layers {
            if let Some(real) = layer.file(shown, started).await? {
                return Ok(Some(real));
            }
        }
        Ok(None)
    }

    fn defers(&self, digest: &Digest) -> bool {
        self.layers.iter().any(|l| l.defers(digest))
    }

    fn is_placeholder(&self, digest: &Digest) -> bool {
        self.layers.iter().any(|l| l.is_placeholder(digest))
    }

    fn standing(&self, path: &StorePath) -> Standing {
        for layer in &self.layers {
            match layer.standing(path) {
                Standing::Verified => {}
                other => return other,
            }
        }
        Standing::Verified
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.layers.iter().flat_map(|l| l.counters()).collect()
    }
}
