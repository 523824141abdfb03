//! `lazystore fsck`: checks a store end to end (`pathinfo::fsck`).

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lazystore_importer::{HttpOptions, Importer, Options};
use lazystore_pathinfo::fsck::{check, check_path};
use lazystore_pathinfo::{PublicKey, Wanted};

use crate::remote::RemoteArgs;

/// Check every path a store publishes: its tree rendered back to its NAR
/// and hashed, so every directory, chunk list and chunk it reaches is read
/// and verified and the NAR compared with the PathInfo's NarHash and
/// NarSize.
///
/// Runs online: give it the URL of a serving store (a redb store is held
/// by the process serving it). Given a redb store no process holds, it
/// also counts what no published path reaches (what `lazystore gc`
/// drops). Prints progress on standard error, a
/// summary and every damaged path on standard output; exits 1 if any path
/// is damaged (with --repair: any path still damaged after the repair).
#[derive(clap::Args)]
pub struct Args {
    /// Import every damaged path again from the --from caches (checked as
    /// `lazystore import` checks: signature by a --trusted-public-key,
    /// NarHash), writing what the store lacks or holds corrupt, then check
    /// it again.
    #[arg(long, requires = "caches")]
    repair: bool,
    /// Binary cache to repair from (https://, http:// or file:///); repeat
    /// for several, tried in order.
    #[arg(long = "from", value_name = "URL", requires = "repair")]
    caches: Vec<String>,
    /// Trust signatures by this key (`name:base64`); repeat for several.
    /// Default: cache.nixos.org's.
    #[arg(
        long = "trusted-public-key",
        value_name = "NAME:KEY",
        requires = "repair"
    )]
    trusted_keys: Vec<PublicKey>,
    /// The store to check: redb:///abs/path/store.redb, s3://BUCKET/PREFIX?…, grpc+http://HOST:PORT,
    /// grpc+https://…, grpc+unix:///PATH [default: the embedded store under
    /// $LAZYSTORE_DIR].
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    // --token-file, --ca-file: for a grpc+ store.
    #[command(flatten)]
    remote: RemoteArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // A redb store is opened here, so what no path reaches can be counted
    // too; any other through its services.
    let url = match args.store {
        Some(url) => url,
        None => lazystore_pathinfo::default_store_url()?,
    };
    let redb = crate::gc::open_redb(&url, "check through it: --store grpc+http://…").await?;
    let store = match &redb {
        Some(redb) => lazystore_pathinfo::Store::redb(redb.clone()),
        None => {
            let (_, store) = args
                .remote
                .open_store(Some(url.clone()))
                .await
                .context("cannot check the store")?;
            store
        }
    };
    let last = Mutex::new(Instant::now());
    let report = check(&store, |paths, bytes| {
        let mut last = last.lock().expect("no panics while held");
        if last.elapsed() >= Duration::from_secs(2) {
            *last = Instant::now();
            eprintln!("lazystore fsck: {paths} paths, {} MiB checked", bytes >> 20);
        }
    })
    .await
    .with_context(|| format!("checking {url}"))?;
    let mut out = std::io::stdout().lock();
    let secs = report.elapsed.as_secs_f64();
    writeln!(
        out,
        "{url}: {} paths, {:.1} MiB of NAR checked in {secs:.1} s ({:.0} MB/s); {} damaged",
        report.paths,
        report.nar_bytes as f64 / (1 << 20) as f64,
        report.nar_bytes as f64 / 1e6 / secs.max(1e-9),
        report.damaged.len()
    )?;
    for damage in &report.damaged {
        writeln!(
            out,
            "damaged: {}: {}",
            damage.store_path.to_absolute(),
            damage.reason
        )?;
    }
    if let Some(redb) = &redb
        && report.clean()
    {
        let unused = crate::gc::unreferenced(redb).await?;
        writeln!(
            out,
            "unreferenced: {} directories, {} chunk lists, {} chunks ({} bytes stored; \
             lazystore gc drops them)",
            unused.directories, unused.blobs, unused.chunks, unused.chunk_bytes
        )?;
    }
    if report.clean() {
        return Ok(ExitCode::SUCCESS);
    }
    if !args.repair {
        return Ok(ExitCode::from(1));
    }
    drop(out);
    let mut options = Options {
        caches: args.caches,
        closure: false,
        http: HttpOptions {
            ca_certs: args.remote.ca_certs()?,
            ..HttpOptions::default()
        },
        ..Options::default()
    };
    if !args.trusted_keys.is_empty() {
        options.trusted_keys = args.trusted_keys;
    }
    let importer = Importer::new(store.clone(), options)
        .await
        .context("cannot set up the caches to repair from")?;
    let wanted: Vec<Wanted> = report
        .damaged
        .iter()
        .map(|d| Wanted::from(d.store_path.clone()))
        .collect();
    let summary = importer.run(&wanted).await;
    for failure in &summary.failed {
        eprintln!("lazystore fsck: cannot repair {failure}");
    }
    let mut still = 0;
    let mut out = std::io::stdout().lock();
    for damage in &report.damaged {
        let info = store
            .path_infos
            .get(&damage.store_path.hash())
            .await
            .with_context(|| format!("looking up {}", damage.store_path))?;
        let result = match info {
            Some(info) => check_path(&store, &info).await,
            None => Err("no longer published".to_owned()),
        };
        match result {
            Ok(()) => writeln!(out, "repaired: {}", damage.store_path.to_absolute())?,
            Err(reason) => {
                still += 1;
                writeln!(
                    out,
                    "still damaged: {}: {reason}",
                    damage.store_path.to_absolute()
                )?;
            }
        }
    }
    writeln!(
        out,
        "{url}: {} of {} damaged paths repaired",
        report.damaged.len() - still,
        report.damaged.len()
    )?;
    Ok(if still == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
