//! `lazystore mount`: presents a store as a read-only `/nix/store` through
//! FUSE, in the foreground, until SIGINT or SIGTERM (or an outside
//! unmount); then unmounts and prints what was presented and fetched.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lazystore_castore::blobs::ObservedBlobService;
use lazystore_castore::grpc::Connection;
use lazystore_castore::{BlobService, DEFAULT_CACHE_SIZE};
use lazystore_fuse::{
    CounterSource, CountingBlobService, FsOptions, LazyFs, MountConfig, RemoteReads, RetryPolicy,
    Stats, StatsSnapshot, TRACE_QUIET, TracePrefetch, Traces, read_trace,
};
use lazystore_importer::NEGATIVE_TTL;
use lazystore_pathinfo::substitute::Substituter;
use lazystore_pathinfo::traces::TraceService;
use lazystore_pathinfo::{LocalCache, SERVER_WAIT, Store, StoreOptions, default_store_url};
use tokio::signal::unix::{SignalKind, signal};

use crate::metrics::{FetchTimer, Metrics};
use crate::remote::RemoteArgs;
use crate::upstream::UpstreamArgs;

/// How long an unmount may wait for files still open under the mount
/// before the process exits anyway (which ends the connection).
const UNMOUNT_GRACE: Duration = Duration::from_secs(10);

/// Mount a store as a read-only /nix/store: every store path it knows is
/// there at once, and file contents are fetched chunk by chunk when read,
/// each chunk verified.
///
/// Runs in the foreground until SIGINT or SIGTERM, then unmounts; if the
/// process dies, fusermount3 unmounts. Prints the mountpoint on standard
/// output once the mount is ready (then, with --metrics-listen, the metrics
/// URL, `http://HOST:PORT/metrics`). Counters are readable while mounted in
/// MOUNTPOINT/.lazystore/stats and printed at exit. Needs /dev/fuse and
/// fusermount3 (apt-get install fuse3).
///
/// The root lists nothing (reading it fails with EPERM: "Operation not
/// permitted") unless --list-root is given; paths are found by name.
///
/// With --upstream, a path the store lacks is looked up in the upstream
/// binary caches (its narinfo checked as `lazystore import` checks it). If
/// the cache has a `.ls` listing of it, the path appears at once and its
/// NAR is downloaded, verified and stored on the first read of a file in
/// it. Without a listing, the lookup reads the start of the NAR (a Range
/// request) to learn what the path is: a file is fetched on its first
/// read, a directory on the first readdir or lookup inside it. A fetched
/// path is published in the store once every path it refers to is, so
/// later mounts find it there. Paths no upstream has, and upstream
/// failures, are logged with the path and the reason.
#[derive(clap::Args)]
pub struct Args {
    /// Where to mount (e.g. /nix/store, or the lower layer of an overlay).
    mountpoint: PathBuf,
    /// The store: redb:///abs/path/store.redb, grpc+http://HOST:PORT,
    /// grpc+unix:///PATH or memory:// [default:
    /// redb://$LAZYSTORE_DIR/store.redb, $LAZYSTORE_DIR defaulting to
    /// ~/.local/share/lazystore].
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Local chunk cache in front of the store (redb:///abs/path), or
    /// `none`. Default for a grpc+ store: redb://$LAZYSTORE_DIR/cache.redb;
    /// none for a local one.
    #[arg(long, value_name = "URL")]
    cache: Option<String>,
    /// Most bytes the local cache keeps (suffixes K, M, G, T: powers of
    /// 1024); the least recently used go first.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value_t = DEFAULT_CACHE_SIZE)]
    cache_size: u64,
    /// Read large files by FUSE passthrough: a file of 256 KiB or more
    /// whose chunks are all in the local cache is written out whole into it
    /// (checked against its BLAKE3 as it is written, and counted against
    /// --cache-size), and later opens of it are passthrough opens: the
    /// kernel reads the plain file, at the speed of a local file, without
    /// checking it again. Needs Linux 6.9+ and root. The price: the kernel
    /// then sends every open and release of every file to the mount, a
    /// round trip each, which makes open-heavy work (compilers,
    /// interpreters, `nix hash path`) 2-3 times slower warm. Off by
    /// default: every read goes through the chunk checks, each file's pages
    /// stay in the kernel's cache, and opens cost nothing.
    #[arg(long, overrides_with = "no_passthrough")]
    passthrough: bool,
    /// Never use FUSE passthrough (the default; overrides an earlier
    /// --passthrough).
    #[arg(long, overrides_with = "passthrough")]
    no_passthrough: bool,
    /// List every known store path at the root (costs a listing of all
    /// path infos per directory read).
    #[arg(long)]
    list_root: bool,
    /// Let every user use the mount, not just its owner and root (for a
    /// non-root owner, needs user_allow_other in /etc/fuse.conf). Without
    /// it the mount process refuses other users' requests, but pages the
    /// kernel has cached may still reach them: auto-unmount needs the
    /// kernel's allow_other. Store contents are world-readable anyway.
    #[arg(long)]
    allow_other: bool,
    /// Threads reading requests from the kernel. One by default: requests
    /// that wait run on the async runtime, and a second thread on the same
    /// queue made a cold walk of a toolchain 10-20 % slower on two cores
    /// (the threads contend for the kernel's queue); eight parallel readers
    /// ran as fast with one as with two. More may help a builder with many
    /// cores and many parallel readers.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// Seconds to keep retrying a failing store before a read fails with
    /// EIO.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    retry_deadline: u64,
    /// Seconds to wait at start for a grpc+ store's server to answer
    /// before giving up (0: mount without asking; reads then wait for it).
    #[arg(long, value_name = "SECS", default_value_t = SERVER_WAIT.as_secs())]
    wait_for_store: u64,
    #[command(flatten)]
    remote: RemoteArgs,
    #[command(flatten)]
    upstream: UpstreamArgs,
    /// Seconds a path no upstream cache has is believed missing before a
    /// lookup asks the caches again (failures are never remembered).
    #[arg(long, value_name = "SECS", default_value_t = NEGATIVE_TTL.as_secs())]
    upstream_negative_ttl: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g.
    /// 127.0.0.1:9101): the counters of the stats file, the local cache's
    /// hits, misses and evictions, and how long fetches from the store take.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Record which files each build reads into DIR: one trace per session
    /// (Nix starts each builder in a session of its own), the absolute
    /// paths of the files it read in the order of their first reads, for
    /// `lazystore prefetch` to fetch ahead of the next build like it.
    #[arg(long, value_name = "DIR")]
    trace_dir: Option<std::path::PathBuf>,
    /// Prefetch what these traces name (trace files, or directories of
    /// them): when the first file of one is first read, every file it
    /// names is fetched into the local cache in the background, in large
    /// parallel batches, as `lazystore prefetch` does.
    #[arg(long, value_name = "TRACE")]
    prefetch: Vec<std::path::PathBuf>,
    /// Put the trace of each Nix build into the store (needs --trace-dir),
    /// under the build's name (its output's name without the version), once
    /// it has read no new file for 5 seconds, for --prefetch-shared on every
    /// builder. A store with write tokens needs one (--token-file).
    #[arg(long, requires = "trace_dir")]
    share_traces: bool,
    /// When a Nix build starts reading, fetch ahead what the store's trace
    /// of the last build of its name (put by --share-traces) names, in the
    /// background, into the local cache.
    #[arg(long)]
    prefetch_shared: bool,
}

/// Puts the traces of the builds that have read no new file for `quiet`
/// into the store, one after another; a failure is logged, and the trace
/// put again if it grows.
async fn share_quiet(traces: Arc<Traces>, store: Arc<dyn TraceService>, quiet: Duration) {
    let ready = tokio::task::spawn_blocking(move || traces.quiet(quiet))
        .await
        .unwrap_or_default();
    for (name, path) in ready {
        let files = match tokio::fs::read_to_string(&path).await {
            Ok(text) => read_trace(&text),
            Err(e) => {
                tracing::warn!("cannot read the trace {}: {e}", path.display());
                continue;
            }
        };
        match store.put(&name, &files).await {
            Ok(()) => tracing::info!(
                "shared the trace of a build of {name} ({} files, {})",
                files.len(),
                path.display()
            ),
            Err(e) => tracing::warn!(
                "cannot share the trace {} of a build of {name}: {}",
                path.display(),
                lazystore_castore::error_chain(&e)
            ),
        }
    }
}

/// Parses `123`, `64K`, `512M`, `10G`, `1T` (powers of 1024).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix {c:?} (use K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 10G, 512M, 1048576)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s} is too large"))
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Handlers first, so a signal during startup is not fatal mid-mount.
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;

    let url = match args.store {
        Some(url) => url,
        None => default_store_url()?,
    };
    let local_cache = match args.cache {
        Some(url) if url == "none" => LocalCache::None,
        Some(url) => LocalCache::At(url),
        None => LocalCache::DefaultIfRemote,
    };
    let retry = RetryPolicy {
        deadline: Duration::from_secs(args.retry_deadline),
        ..RetryPolicy::default()
    };
    let stats = Arc::new(Stats::new());
    let counting = stats.clone();
    let mut metrics = Metrics::default();
    let fetch_seconds = metrics.seconds(
        "mount_fetch",
        "How long a fetch of chunks from the store behind the local cache took",
    );
    let store = Store::open(
        &url,
        args.remote.store_options(StoreOptions {
            // The client's own retries end at the same deadline, and a
            // call that gave up there is not retried again above it (see
            // `GrpcError`'s `Retryable`), so a read fails with EIO once the
            // deadline passes, not a deadline per layer later.
            retry,
            local_cache,
            local_cache_bytes: args.cache_size,
            wait_for_server: (args.wait_for_store > 0)
                .then(|| Duration::from_secs(args.wait_for_store)),
            // Count what the local cache has to fetch from the store.
            cache_fetches: Some(Arc::new(move |inner: Arc<dyn BlobService>| {
                let counted = Arc::new(CountingBlobService::new(
                    inner,
                    RemoteReads(counting.clone()),
                ));
                Arc::new(ObservedBlobService::new(
                    counted,
                    FetchTimer(fetch_seconds.clone()),
                )) as Arc<dyn BlobService>
            })),
            ..StoreOptions::default()
        })?,
    )
    .await?;
    let cache_url = store
        .local_cache
        .as_ref()
        .map(|c| c.path().display().to_string());
    let options = FsOptions {
        list_root: args.list_root,
        retry,
        ..FsOptions::default()
    };
    let upstreams = args.upstream.upstreams.clone();
    let negative_ttl = Duration::from_secs(args.upstream_negative_ttl);
    let paths = Arc::new(args.upstream.substituters(
        &store,
        &url,
        negative_ttl,
        args.remote.ca_certs()?,
    )?);
    let passthrough = args.passthrough && !args.no_passthrough;
    let passthrough_cache = store.local_cache.clone().filter(|_| passthrough);
    let outages = store.connection.clone().map(|c| Arc::new(Outages(c)));
    let metrics_task = match &args.metrics_listen {
        Some(addr) => {
            let (s, p, o) = (stats.clone(), paths.clone(), outages.clone());
            metrics.counters("mount", move || {
                let mut all = s.snapshot().fields().to_vec();
                all.extend(p.counters());
                all.extend(o.iter().flat_map(|o| o.counters()));
                all
            });
            if let Some(cache) = store.local_cache.clone() {
                metrics.counters("local_cache", move || {
                    let c = cache.stats();
                    vec![
                        ("hits", c.hits),
                        ("misses", c.misses),
                        ("evictions", c.evictions),
                        ("chunks", c.chunks),
                        ("bytes", c.bytes),
                        ("max_bytes", c.max_bytes),
                    ]
                });
            }
            Some(metrics.serve(addr, std::future::pending()).await?)
        }
        None => None,
    };
    let metrics_url = metrics_task.as_ref().map(|(url, _)| url.clone());
    let shared_traces = store.traces.clone();
    let mut fs = LazyFs::new(store, options, stats.clone()).with_substituter(paths.clone());
    if let Some(outages) = &outages {
        fs = fs.with_counters(outages.clone());
    }
    let fs = match passthrough_cache {
        Some(cache) => fs.with_passthrough(cache),
        None => fs,
    };
    let traces = match &args.trace_dir {
        Some(dir) => {
            Some(Arc::new(Traces::new(dir).with_context(|| {
                format!("cannot write traces into {}", dir.display())
            })?))
        }
        None => None,
    };
    let fs = match &traces {
        Some(traces) => fs.with_traces(traces.clone()),
        None => fs,
    };
    let fs = if args.prefetch.is_empty() && !args.prefetch_shared {
        fs
    } else {
        let traces = crate::prefetch::read_traces(&args.prefetch)?;
        let prefetch = TracePrefetch::new(traces);
        fs.with_prefetch(Arc::new(if args.prefetch_shared {
            prefetch.with_shared(shared_traces.clone())
        } else {
            prefetch
        }))
    };
    let fs = Arc::new(fs);
    let config = MountConfig {
        allow_other: args.allow_other,
        threads: args.threads.into(),
        ..MountConfig::default()
    };
    let runtime = tokio::runtime::Handle::current();
    let mountpoint = args.mountpoint.clone();
    // Mounting runs fusermount3 and waits for the kernel: blocking work.
    let mounted = tokio::task::spawn_blocking(move || {
        lazystore_fuse::mount(fs, runtime, &mountpoint, &config)
    })
    .await
    .context("the mount task failed")??;
    let shown = mounted.mountpoint().display().to_string();
    tracing::info!(store = %url, cache = ?cache_url, upstreams = ?upstreams, "mounted at {shown}");
    println!("{shown}");
    if let Some(url) = metrics_url {
        println!("{url}");
    }

    let mut poll = tokio::time::interval(Duration::from_millis(250));
    let why = loop {
        tokio::select! {
            _ = interrupt.recv() => break "SIGINT",
            _ = terminate.recv() => break "SIGTERM",
            _ = poll.tick() => {
                if mounted.is_finished() {
                    break "unmounted from outside";
                }
                if let Some(traces) = traces.clone() {
                    // Written out as they grow, so a trace is there to
                    // prefetch from while the mount still runs.
                    if args.share_traces {
                        tokio::spawn(share_quiet(traces.clone(), shared_traces.clone(), TRACE_QUIET));
                    }
                    tokio::task::spawn_blocking(move || traces.flush());
                }
            }
        }
    };
    tracing::info!("{why}: unmounting {shown}");
    if let Some(traces) = traces.clone().filter(|_| args.share_traces) {
        // The builds are over: their traces are shared now, not when quiet.
        let shared = share_quiet(traces, shared_traces.clone(), Duration::ZERO);
        if tokio::time::timeout(UNMOUNT_GRACE, shared).await.is_err() {
            tracing::warn!("gave up sharing the last traces after {UNMOUNT_GRACE:?}");
        }
    }
    let unmount = tokio::task::spawn_blocking(move || mounted.unmount());
    let finished = tokio::time::timeout(UNMOUNT_GRACE, unmount).await;
    let mut more = paths.counters();
    more.extend(outages.iter().flat_map(|o| o.counters()));
    let summary = summary(&stats.snapshot(), &more);
    match finished {
        Ok(joined) => joined.context("the unmount task failed")??,
        Err(_) => {
            // The unmount is lazy: files still open under the mount keep
            // the session alive. Exiting ends it (they fail with ENOTCONN);
            // returning would wait for the session in the runtime's drop.
            eprintln!(
                "lazystore: unmounted {shown} ({why}), but files were still open under it after {UNMOUNT_GRACE:?}; exiting anyway; {summary}"
            );
            std::process::exit(0);
        }
    }
    eprintln!("lazystore: unmounted {shown} ({why}); {summary}");
    if let Some((_, task)) = metrics_task {
        task.abort();
    }
    Ok(ExitCode::SUCCESS)
}

/// A remote store's outages, for the stats file and the exit log: spells
/// of transient failures (each logged when it begins and ends) and the
/// calls that gave up during them.
struct Outages(Connection);

impl CounterSource for Outages {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("outages", self.0.outages()),
            ("outage_failed_calls", self.0.outage_failed_calls()),
        ]
    }
}

/// The counters on one line, for the exit log.
fn summary(s: &StatsSnapshot, substituters: &[(&'static str, u64)]) -> String {
    s.fields()
        .iter()
        .chain(substituters)
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert!(parse_size("10X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
