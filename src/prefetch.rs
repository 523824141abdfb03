//! `lazystore prefetch`: fetch the files access traces name into the
//! local cache, ahead of the builds that will read them
//! (`pathinfo::prefetch`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use lazystore_fuse::read_trace;
use lazystore_pathinfo::prefetch::prefetch;
use lazystore_pathinfo::{LocalCache, SERVER_WAIT, Store, StoreOptions, default_store_url};

use crate::mount::parse_size;
use crate::remote::RemoteArgs;

/// Fetch the files named by access traces (`lazystore mount --trace-dir`)
/// into the local chunk cache a mount will read from, in large parallel
/// batches: a builder about to run a build like a traced one then reads
/// what it needs from its disk. Every chunk is verified as a mount
/// verifies it. Prints what it fetched; paths the store does not have are
/// listed and skipped.
#[derive(clap::Args)]
pub struct Args {
    /// Trace files (a path under /nix/store a line; # lines are
    /// comments), or directories of them (their *.trace files).
    #[arg(required = true, value_name = "TRACE")]
    traces: Vec<PathBuf>,
    /// The store: grpc+http://HOST:PORT, grpc+https://…, redb:///abs/path
    /// [default: the embedded store under $LAZYSTORE_DIR].
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// The local chunk cache to fill (redb:///abs/path): the one the mount
    /// uses. Default for a grpc+ store: redb://$LAZYSTORE_DIR/cache.redb,
    /// as for `lazystore mount`.
    #[arg(long, value_name = "URL")]
    cache: Option<String>,
    /// Most bytes the local cache keeps (suffixes K, M, G, T).
    #[arg(long, value_name = "BYTES", default_value = "10G", value_parser = parse_size)]
    cache_size: u64,
    // --token-file, --ca-file: for a grpc+ store.
    #[command(flatten)]
    remote: RemoteArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let paths: Vec<String> = read_traces(&args.traces)?.into_iter().flatten().collect();
    let url = match args.store {
        Some(url) => url,
        None => default_store_url()?,
    };
    let local_cache = match args.cache {
        Some(url) => LocalCache::At(url),
        None => LocalCache::DefaultIfRemote,
    };
    let store = Store::open(
        &url,
        args.remote.store_options(StoreOptions {
            local_cache,
            local_cache_bytes: args.cache_size,
            wait_for_server: Some(SERVER_WAIT),
            ..StoreOptions::default()
        })?,
    )
    .await
    .context("prefetch fills the local cache a mount will read: run it before the mount starts (a running mount holds its cache)")?;
    let cache = store.local_cache.as_ref().map_or_else(
        || "no local cache".to_owned(),
        |c| c.path().display().to_string(),
    );
    let done = prefetch(&store, &paths)
        .await
        .with_context(|| format!("prefetching from {url}"))?;
    for (path, why) in &done.missing {
        eprintln!("lazystore prefetch: skipped {path}: {why}");
    }
    println!(
        "{url} -> {cache}: {} files, {:.2} MB, {} chunks in {} requests, {:.2} s; {} paths skipped",
        done.files,
        done.bytes as f64 / 1e6,
        done.chunks,
        done.requests,
        done.elapsed.as_secs_f64(),
        done.missing.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// The files each trace names, for trace files given or the `*.trace`
/// files of directories given (in name order); errors name the file.
pub(crate) fn read_traces(given: &[PathBuf]) -> anyhow::Result<Vec<Vec<String>>> {
    let mut files = Vec::new();
    for path in given {
        if path.is_dir() {
            let entries = std::fs::read_dir(path)
                .with_context(|| format!("cannot list the traces in {}", path.display()))?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "trace"))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .map(|text| read_trace(&text))
                .with_context(|| format!("cannot read the trace {}", f.display()))
        })
        .collect()
}
