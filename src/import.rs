//! `lazystore import`: parses the arguments, opens the store and the caches,
//! and hands the paths to the importer; prints its summary and exits
//! non-zero if any path failed.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::bail;
use lazystore_castore::SyncMode;
use lazystore_importer::{
    DEFAULT_CACHE, DEFAULT_TRUSTED_KEY, HttpOptions, Importer, Options, ProgressMode, Wanted,
};
use lazystore_pathinfo::{PublicKey, SERVER_WAIT, Store, StoreOptions, default_store_url};

use crate::remote::RemoteArgs;

/// Import store paths and their closures from Nix binary caches.
///
/// Every narinfo must carry a valid signature by a trusted key, and every
/// NAR must match its NarHash and NarSize, before its path is published.
/// Paths already in the store are skipped without downloading their NAR.
#[derive(clap::Args)]
pub struct Args {
    /// Store paths to import: `/nix/store/<hash>-<name>`, `<hash>-<name>`
    /// or the bare `<hash>`.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<Wanted>,

    /// Binary cache to import from (https://, http:// or file:///); repeat
    /// for several, tried in order.
    #[arg(long = "from", value_name = "URL", default_value = DEFAULT_CACHE)]
    caches: Vec<String>,

    /// Trust signatures by this key (`name:base64`, as in Nix's
    /// trusted-public-keys); repeat for several. Default: cache.nixos.org's.
    #[arg(long = "trusted-public-key", value_name = "NAME:KEY", default_value = DEFAULT_TRUSTED_KEY)]
    trusted_keys: Vec<PublicKey>,

    /// Import paths whatever their signatures. Says so on every run.
    #[arg(long)]
    no_check_sigs: bool,

    /// The store to import into (memory://, redb:///abs/path,
    /// grpc+http://host:port). Default: the embedded store under
    /// $LAZYSTORE_DIR (~/.local/share/lazystore).
    #[arg(long = "store", value_name = "URL")]
    store: Option<String>,

    /// Paths downloaded at once.
    #[arg(long, short = 'j', default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    jobs: u16,

    /// Import only the paths named, not their references.
    #[arg(long)]
    no_closure: bool,

    #[command(flatten)]
    remote: RemoteArgs,
}

/// Opens the store to import into (the embedded default when none is
/// given). A redb store defers its fsyncs to each published PathInfo, whose
/// commit is durable and makes everything written before it durable: the
/// importer is in the same process, so it never publishes on the strength
/// of a write a crash could lose.
async fn open_store(url: Option<String>, remote: &RemoteArgs) -> anyhow::Result<(Store, String)> {
    let url = match url {
        Some(url) => url,
        None => default_store_url()?,
    };
    // Every error names the URL already.
    let options = remote.store_options(StoreOptions {
        sync: SyncMode::Deferred,
        wait_for_server: Some(SERVER_WAIT),
        ..StoreOptions::default()
    })?;
    let store = Store::open(&url, options).await?;
    Ok((store, url))
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (store, store_url) = open_store(args.store, &args.remote).await?;
    let options = Options {
        http: HttpOptions {
            ca_certs: args.remote.ca_certs()?,
            ..HttpOptions::default()
        },
        caches: args.caches,
        trusted_keys: args.trusted_keys,
        check_signatures: !args.no_check_sigs,
        jobs: args.jobs.into(),
        closure: !args.no_closure,
        progress: if std::io::stderr().is_terminal() {
            ProgressMode::Bars
        } else {
            ProgressMode::Lines
        },
        ..Options::default()
    };
    let importer = match Importer::new(store, options).await {
        Ok(importer) => importer,
        Err(e) => bail!(
            "{:#}; check the URL, that the cache is reachable, and that it is a Nix binary cache",
            anyhow::Error::new(e)
        ),
    };
    let summary = importer.run(&args.paths).await;
    println!("store: {store_url}");
    println!("{summary}");
    if !summary.success() {
        bail!(
            "{} of the paths failed (see the errors above); nothing was published for them",
            summary.failed.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
