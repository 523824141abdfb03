//! Where an [`UpstreamSubstituter`](crate::UpstreamSubstituter) finds the
//! paths its store lacks ([`Source`]): upstream binary caches
//! ([`UpstreamCaches`](crate::UpstreamCaches)), whose NARs the mount
//! downloads and ingests itself, or a pull-through lazystore service
//! ([`ServiceSource`]), which fetches a path when asked and serves it chunk
//! by chunk. Either way a path is shown from its facts and its NAR's
//! listing first, and its contents fetched on the first read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use lazystore_pathinfo::listing::Listing;
use lazystore_pathinfo::pathinfos::{Facts, PathInfo, PathInfoService};
use lazystore_pathinfo::{PublicKey, Wanted};

use crate::error::{PathError, PathErrorKind};
use crate::upstream::{Found, Peeked, Via};

/// A source of the paths a store lacks.
#[async_trait]
pub trait Source: Send + Sync {
    /// Where it looks, for messages: URLs.
    fn describe(&self) -> String;

    /// Whether the paths it fetches are the substituter's to publish into
    /// its store (checked upstream paths), rather than the source's own
    /// business (a service publishes what it pulls).
    fn publishes_fetched(&self) -> bool;

    /// The checked facts of `wanted`, and where to fetch it; `None` if the
    /// source does not have it.
    async fn find(&self, wanted: &Wanted) -> Result<Option<Found>, PathError>;

    /// The listing of `found`'s NAR, if the source has one it can read.
    async fn listing(&self, found: &Found) -> Option<Listing>;

    /// What `found`'s root is, from the start of its NAR; `None` when the
    /// source cannot tell without the whole path.
    async fn peek(&self, found: &Found) -> Result<Option<Peeked>, PathError>;

    /// `found`'s contents, verified and in the store; its PathInfo.
    async fn fetch(&self, found: &Found) -> Result<PathInfo, PathError>;

    /// Its counters, `(name, value)`.
    fn counters(&self) -> Vec<(&'static str, u64)>;

    /// The names the substituter counts this source's lookups and its
    /// lookups shown without a listing under.
    fn lookup_counters(&self) -> [&'static str; 2] {
        ["upstream_narinfos_fetched", "upstream_listing_fallbacks"]
    }
}

/// A pull-through lazystore service as a source: facts and listings from
/// its `Facts` and `Listing` calls (answered from upstream narinfos and
/// `.ls` files, no NAR downloaded), contents from its `Get` (the service
/// fetches, checks and stores the NAR once for every builder, then the
/// mount reads its chunks).
pub struct ServiceSource {
    url: String,
    path_infos: Arc<dyn PathInfoService>,
    trusted_keys: Vec<PublicKey>,
    fetches: AtomicU64,
    listings: AtomicU64,
}

impl ServiceSource {
    /// The service at `url` through its PathInfo client `path_infos`;
    /// with `trusted_keys`, a path's facts must carry a signature by one.
    pub fn new(
        url: &str,
        path_infos: Arc<dyn PathInfoService>,
        trusted_keys: Vec<PublicKey>,
    ) -> Self {
        ServiceSource {
            url: url.to_owned(),
            path_infos,
            trusted_keys,
            fetches: AtomicU64::new(0),
            listings: AtomicU64::new(0),
        }
    }

    fn error(&self, wanted: impl ToString, kind: PathErrorKind) -> PathError {
        PathError {
            path: wanted.to_string(),
            kind,
        }
    }
}

#[async_trait]
impl Source for ServiceSource {
    fn describe(&self) -> String {
        format!("{} (pull-through)", self.url)
    }

    fn publishes_fetched(&self) -> bool {
        false
    }

    async fn find(&self, wanted: &Wanted) -> Result<Option<Found>, PathError> {
        let facts = self.path_infos.facts(&wanted.hash()).await;
        let facts = facts.map_err(|e| self.error(wanted, PathErrorKind::Lookup(e)))?;
        let Some(facts) = facts.filter(|f| wanted.matches(&f.store_path)) else {
            return Ok(None);
        };
        if !self.trusted_keys.is_empty() {
            facts.verify(&self.trusted_keys).map_err(|source| {
                self.error(
                    wanted,
                    PathErrorKind::Untrusted {
                        url: self.url.clone(),
                        trusted: self
                            .trusted_keys
                            .iter()
                            .map(|k| k.name().to_owned())
                            .collect(),
                        source,
                    },
                )
            })?;
        }
        Ok(Some(Found {
            facts,
            via: Via::Service,
        }))
    }

    async fn listing(&self, found: &Found) -> Option<Listing> {
        let path = found.facts.store_path.to_absolute();
        let json = match self
            .path_infos
            .listing(&found.facts.store_path.hash())
            .await
        {
            Ok(Some(json)) => json,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(
                    "{path}: cannot get its listing: {}",
                    lazystore_castore::error_chain(&e)
                );
                return None;
            }
        };
        self.listings.fetch_add(1, Ordering::Relaxed);
        let parsed = tokio::task::spawn_blocking(move || Listing::parse(&json))
            .await
            .expect("parsing a listing does not panic");
        match parsed {
            Ok(listing) => Some(listing),
            Err(e) => {
                tracing::warn!("{path}: ignoring the listing {} sent: {e}", self.url);
                None
            }
        }
    }

    async fn peek(&self, _found: &Found) -> Result<Option<Peeked>, PathError> {
        Ok(None)
    }

    async fn fetch(&self, found: &Found) -> Result<PathInfo, PathError> {
        let path = found.facts.store_path.to_absolute();
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let info = self.path_infos.get(&found.facts.store_path.hash()).await;
        let info = info.map_err(|e| self.error(&path, PathErrorKind::Lookup(e)))?;
        let Some(info) = info else {
            return Err(self.error(
                &path,
                PathErrorKind::NotFound {
                    caches: vec![self.url.clone()],
                },
            ));
        };
        // What was shown must be what is served.
        let served = Facts::from(info.clone());
        if (served.store_path, served.nar_sha256, served.nar_size)
            != (
                found.facts.store_path.clone(),
                found.facts.nar_sha256,
                found.facts.nar_size,
            )
        {
            return Err(self.error(
                &path,
                PathErrorKind::Lookup(lazystore_pathinfo::pathinfos::PathInfoError::Corrupt(
                    format!("{} served another NAR than its facts said", self.url).into(),
                )),
            ));
        }
        Ok(info)
    }

    fn lookup_counters(&self) -> [&'static str; 2] {
        ["service_facts_fetched", "service_listing_fallbacks"]
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("service_fetches", self.fetches.load(Ordering::Relaxed)),
            ("service_listings", self.listings.load(Ordering::Relaxed)),
        ]
    }
}
