//! `lazystore fsck`: checks a store end to end (`pathinfo::fsck`).

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lazystore_pathinfo::fsck::check;
use lazystore_pathinfo::{SERVER_WAIT, Store, StoreOptions, default_store_url};

use crate::remote::RemoteArgs;

/// Check every path a store publishes: its tree rendered back to its NAR
/// and hashed, so every directory, chunk list and chunk it reaches is read
/// and verified and the NAR compared with the PathInfo's NarHash and
/// NarSize.
///
/// Runs online: give it the URL of a serving store (a redb store is held
/// by the process serving it). Prints progress on standard error, a
/// summary and every damaged path on standard output; exits 1 if any path
/// is damaged.
#[derive(clap::Args)]
pub struct Args {
    /// The store to check: redb:///abs/path/store.redb, grpc+http://HOST:PORT,
    /// grpc+https://…, grpc+unix:///PATH [default: the embedded store under
    /// $LAZYSTORE_DIR].
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    // --token-file, --ca-file: for a grpc+ store.
    #[command(flatten)]
    remote: RemoteArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let url = match args.store {
        Some(url) => url,
        None => default_store_url()?,
    };
    let options = args.remote.store_options(StoreOptions {
        wait_for_server: Some(SERVER_WAIT),
        ..StoreOptions::default()
    })?;
    let store = Store::open(&url, options)
        .await
        .with_context(|| format!("cannot check {url}"))?;
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
    Ok(if report.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
