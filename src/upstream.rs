//! The `--upstream` options that `mount` and `nix-db` share, and the one
//! place their store-path sources are composed: the store first, then the
//! upstream binary caches in the order given.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lazystore_castore::tls::CaCerts;
use lazystore_importer::{HttpOptions, ServiceSource, UpstreamSubstituter};
use lazystore_pathinfo::substitute::{StoreSubstituter, Substituters};
use lazystore_pathinfo::{PublicKey, Store};

/// Upstream binary caches for the paths the store lacks.
#[derive(clap::Args)]
pub struct UpstreamArgs {
    /// Binary cache (https://, http:// or file:///) to find paths the
    /// store lacks in (their narinfo checked as `lazystore import` checks
    /// it); repeat for several, tried in order.
    #[arg(long = "upstream", value_name = "URL")]
    pub upstreams: Vec<String>,
    /// Key whose signatures are trusted (Nix's trusted-public-keys); repeat
    /// for several. Given, it applies to the store's own paths too: mount
    /// and nix-db show a path of the store only if its PathInfo is signed
    /// by one of these (else it is looked for upstream), serve publishes
    /// only what one of these signed. Not given: upstream narinfos must
    /// carry cache.nixos.org's signature, and the store's paths are taken
    /// as the store has them (docs/security.md).
    #[arg(long = "trusted-public-key", value_name = "NAME:KEY")]
    pub trusted_keys: Vec<PublicKey>,
    /// Take upstream narinfos whatever their signatures (says so); paths
    /// found that way are never published in the store.
    #[arg(long)]
    pub no_check_sigs: bool,
}

impl UpstreamArgs {
    /// The store at `store_url`, then these caches (storing what they fetch
    /// in `store`, trusting `ca_certs` beside the system's CAs); "no cache
    /// has it" is believed for `negative_ttl`.
    pub fn substituters(
        self,
        store: &Store,
        store_url: &str,
        negative_ttl: Duration,
        ca_certs: Option<CaCerts>,
    ) -> anyhow::Result<Substituters> {
        let in_store = StoreSubstituter::new(store.path_infos.clone(), store_url)
            .require_signatures(self.trusted_keys.clone());
        let mut paths = Substituters::new().then(Arc::new(in_store));
        // A service may pull paths it has not published from caches behind
        // it: shown from their facts and listings, fetched by it on first
        // read.
        if store.connection.is_some() {
            let service = ServiceSource::new(
                store_url,
                store.path_infos.clone(),
                self.trusted_keys.clone(),
            );
            paths = paths.then(Arc::new(UpstreamSubstituter::with_source(
                store.clone(),
                Arc::new(service),
                negative_ttl,
            )));
        }
        if self.upstreams.is_empty() {
            return Ok(paths);
        }
        let options = self.importer_options(ca_certs);
        let upstream = UpstreamSubstituter::new(store.clone(), options, negative_ttl)
            .context("cannot set up the upstream caches")?;
        Ok(paths.then(Arc::new(upstream)))
    }

    /// How the caches are read and checked, as `lazystore import` reads
    /// and checks them: cache.nixos.org's key unless keys were given,
    /// `ca_certs` trusted beside the system's CAs.
    pub fn importer_options(&self, ca_certs: Option<CaCerts>) -> lazystore_importer::Options {
        let defaults = lazystore_importer::Options::default();
        let trusted_keys = match &self.trusted_keys {
            keys if keys.is_empty() => defaults.trusted_keys.clone(),
            keys => keys.clone(),
        };
        lazystore_importer::Options {
            caches: self.upstreams.clone(),
            trusted_keys,
            check_signatures: !self.no_check_sigs,
            http: HttpOptions {
                ca_certs,
                ..HttpOptions::default()
            },
            ..defaults
        }
    }
}
