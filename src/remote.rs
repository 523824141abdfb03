//! `--token-file` and `--ca-file`: how a client command reaches a remote
//! store, for every command that opens one (`import`, `mount`, `nix-db`,
//! `serve` in front of a `grpc+…` store). Both go into [`StoreOptions`]
//! (the token into every call, the CA certificates into the TLS check of a
//! `grpc+https://` store's certificate), and `--ca-file` also into the
//! HTTP client of upstream binary caches; no command handles them
//! otherwise.

use std::path::PathBuf;

use anyhow::Context as _;
use lazystore_castore::OpenError;
use lazystore_castore::auth::Token;
use lazystore_castore::tls::CaCerts;
use lazystore_pathinfo::{OpenStoreError, SERVER_WAIT, Store, StoreOptions, default_store_url};

/// What a client presents to, and trusts of, a remote store.
#[derive(clap::Args, Debug)]
pub struct RemoteArgs {
    /// Send the token in FILE with every call to a remote store (one that
    /// runs with --read-token-file or --write-token-file). The file holds
    /// one token; blank lines and lines starting with # are ignored.
    #[arg(long, value_name = "FILE", env = "LAZYSTORE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Trust the CA certificates in FILE (PEM), beside the system's, for a
    /// grpc+https:// store and for https:// binary caches: the CA that
    /// signed the server's certificate (serve --tls-cert), or that
    /// certificate itself if self-signed.
    #[arg(long, value_name = "FILE", env = "LAZYSTORE_CA_FILE")]
    ca_file: Option<PathBuf>,
}

impl RemoteArgs {
    /// The token, read from its file, if one was given.
    pub fn token(&self) -> anyhow::Result<Option<Token>> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        // The error names the file; say where it came from.
        let token =
            Token::from_file(path).context("cannot use --token-file (or $LAZYSTORE_TOKEN_FILE)")?;
        Ok(Some(token))
    }

    /// The extra CA certificates, read from their file, if one was given.
    pub fn ca_certs(&self) -> anyhow::Result<Option<CaCerts>> {
        let Some(path) = &self.ca_file else {
            return Ok(None);
        };
        let certs =
            CaCerts::from_pem_file(path).context("cannot use --ca-file (or $LAZYSTORE_CA_FILE)")?;
        Ok(Some(certs))
    }

    /// `options` with the token and the CA certificates.
    pub fn store_options(&self, options: StoreOptions) -> anyhow::Result<StoreOptions> {
        Ok(StoreOptions {
            token: self.token()?,
            ca_certs: self.ca_certs()?,
            ..options
        })
    }

    /// The store a client command works on, with its URL: `url`, or the
    /// embedded one by default. A `grpc+` store's server must answer within
    /// [`SERVER_WAIT`]; a redb store another process holds is an error
    /// saying to ask that process's server instead.
    pub async fn open_store(&self, url: Option<String>) -> anyhow::Result<(String, Store)> {
        let url = match url {
            Some(url) => url,
            None => default_store_url()?,
        };
        let options = self.store_options(StoreOptions {
            wait_for_server: Some(SERVER_WAIT),
            ..StoreOptions::default()
        })?;
        let store = Store::open(&url, options).await.map_err(|e| {
            let held = matches!(&e, OpenStoreError::Redb { source, .. }
                if matches!(**source, OpenError::AlreadyOpen { .. }));
            let e = anyhow::Error::new(e);
            if held {
                // A redb store is held by one process at a time.
                e.context(
                    "the store is in use (mounted or served?): ask that server instead, with \
                     --store grpc+http://…",
                )
            } else {
                e
            }
        })?;
        Ok((url, store))
    }
}
