//! `lazystore serve`: one store over gRPC — blobs, directories and path
//! infos, with gRPC health — and/or as a Nix binary cache over HTTP, until
//! SIGINT or SIGTERM, then a graceful stop.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use lazystore_castore::Blobs;
use lazystore_castore::auth::{Access, Tokens};
use lazystore_castore::blobs::ObservedBlobService;
use lazystore_castore::grpc::{CallCounts, DEFAULT_MAX_UPLOAD_SIZE, Listener, Services, serve};
use lazystore_castore::tls::ServerTls;
use lazystore_httpcache::{DEFAULT_MAX_REQUESTS, DEFAULT_PRIORITY, HttpCache, NarCompression};
use lazystore_importer::{NEGATIVE_TTL, PullThrough};
use lazystore_pathinfo::gc::{Collector, collected_while_serving};
use lazystore_pathinfo::pathinfos::PathInfoServer;
use lazystore_pathinfo::pathinfos::uses::FLUSH_EVERY;
use lazystore_pathinfo::publish::{PublishPolicy, Publisher};
use lazystore_pathinfo::traces::TraceServer;
use lazystore_pathinfo::{
    LocalCache, SigningKey, Store, StoreOptions, default_store_url, grpc_https_url, grpc_tcp_url,
    grpc_unix_url, is_ephemeral, is_remote, is_s3,
};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

use crate::metrics::{Metrics, StoreTraffic};
use crate::remote::RemoteArgs;
use crate::upstream::UpstreamArgs;

/// Serve a store over gRPC to importers, builders and other lazystores,
/// and/or as a Nix binary cache over HTTP.
///
/// Prints the URLs clients use on standard output once listening, one a
/// line: the gRPC one first (`grpc+http://HOST:PORT` with the port
/// actually bound, `grpc+https://HOST:PORT` with --tls-cert, or
/// `grpc+unix:///PATH`), then the HTTP one (`http://HOST:PORT`, or
/// `https://HOST:PORT` with --tls-cert), then the metrics one
/// (`http://HOST:PORT/metrics`, with --metrics-listen). On SIGINT or SIGTERM it stops accepting
/// connections, lets the calls in flight finish and exits 0; a second
/// signal exits at once. Logs go to standard error, filtered by `RUST_LOG`
/// (by default warnings and the HTTP access log, `lazystore::http=info`, of
/// one line per request; `RUST_LOG=warn` turns the access log off).
#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("listeners").required(true).multiple(true))]
#[command(group = clap::ArgGroup::new("write_tokens").multiple(false))]
pub struct Args {
    /// Where to serve gRPC: HOST:PORT for TCP (port 0 picks a free one),
    /// or unix:/PATH for a Unix socket.
    #[arg(long, value_name = "ADDR", group = "listeners")]
    listen: Option<String>,
    /// Where to serve the store as a Nix binary cache over HTTP: HOST:PORT
    /// (port 0 picks a free one). Nix uses it as a substituter
    /// (http://HOST:PORT) and with nix copy --from / --to.
    #[arg(long, value_name = "ADDR", group = "listeners")]
    http_listen: Option<String>,
    /// Sign every narinfo served over HTTP with this key (Nix's secret key
    /// file, from nix-store --generate-binary-cache-key), beside the
    /// signatures kept from upstream.
    #[arg(long, value_name = "FILE", requires = "http_listen")]
    signing_key: Option<PathBuf>,
    /// Priority in nix-cache-info (lower is preferred by Nix).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_PRIORITY, requires = "http_listen")]
    priority: u32,
    /// WantMassQuery in nix-cache-info.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, requires = "http_listen")]
    want_mass_query: bool,
    /// The NARs narinfos point at: none (Range requests work), zstd or
    /// zstd:LEVEL (compressed as they stream). Both forms are served
    /// whatever this says.
    #[arg(
        long,
        value_name = "HOW",
        default_value = "none",
        requires = "http_listen"
    )]
    nar_compression: NarCompression,
    /// HTTP requests handled at once; more wait. A request holds its slot
    /// until its body is sent.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_REQUESTS, requires = "http_listen")]
    http_max_requests: usize,
    /// Accept uploads over HTTP (nix copy --to http://…), from clients
    /// presenting a token of --write-token-file.
    #[arg(long, requires_all = ["http_listen", "write_tokens"])]
    allow_upload: bool,
    /// Every write needs a token from FILE: gRPC puts of chunks, blobs,
    /// directories and PathInfos, and HTTP uploads. FILE holds tokens one
    /// a line (blank lines and # comments ignored), read at startup: to
    /// rotate, add the new token and restart, hand it to clients, then
    /// remove the old one and restart. A write token allows
    /// reads too. lazystore clients send theirs with --token-file; Nix
    /// sends it as the password of Basic auth (a netrc file, netrc-file =
    /// …, with `machine HOST password TOKEN`). Without --tls-cert, tokens
    /// cross the network in clear (docs/security.md).
    #[arg(long, value_name = "FILE", group = "write_tokens")]
    write_token_file: Option<PathBuf>,
    /// Every read needs a token from FILE (or one of --write-token-file):
    /// gRPC reads, and HTTP narinfos, NARs and listings (nix-cache-info and
    /// gRPC health stay open). Same format as --write-token-file; without
    /// --write-token-file, writes need one of these tokens too.
    #[arg(long, value_name = "FILE")]
    read_token_file: Option<PathBuf>,
    // --upstream, --trusted-public-key: the caches behind the store, and
    // the keys both they and writers are held to.
    #[command(flatten)]
    upstream: UpstreamArgs,
    /// Seconds a path no upstream cache has is believed missing before a
    /// lookup asks the caches again (failures are never remembered).
    #[arg(long, value_name = "SECS", default_value_t = NEGATIVE_TTL.as_secs(), requires = "upstreams")]
    upstream_negative_ttl: u64,
    /// Sign PathInfos written with no signature at all (paths built by the
    /// writers themselves) with this key (Nix's secret key file), once
    /// their tree renders to their NarHash; its public key is trusted as
    /// if given to --trusted-public-key. Writers are then trusted to build:
    /// docs/security.md.
    #[arg(long, value_name = "FILE")]
    sign_with: Option<PathBuf>,
    /// The old name of --write-token-file; its tokens now guard gRPC
    /// writes as well as HTTP uploads.
    #[arg(long, value_name = "FILE", group = "write_tokens", hide = true)]
    upload_token_file: Option<PathBuf>,
    /// The store to serve: redb:///abs/path/store.redb, memory://,
    /// grpc+http://HOST:PORT, grpc+unix:///PATH or
    /// s3://BUCKET/PREFIX?endpoint=URL&region=NAME [default:
    /// redb://$LAZYSTORE_DIR/store.redb, $LAZYSTORE_DIR defaulting to
    /// ~/.local/share/lazystore].
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// A local chunk cache (redb:///abs/path) in front of a remote store:
    /// an s3:// or grpc+ one. Chunks, chunk lists and directories read
    /// through this server are kept there, so reads a replica answered
    /// once cost the object store nothing again. Each server needs its own
    /// file. Publication checks bypass it.
    #[arg(long, value_name = "URL")]
    cache: Option<String>,
    /// Most bytes the --cache keeps (suffixes K, M, G, T: powers of 1024);
    /// the least recently used go first.
    #[arg(long, value_name = "BYTES", value_parser = crate::mount::parse_size,
          default_value_t = lazystore_castore::DEFAULT_CACHE_SIZE, requires = "cache")]
    cache_size: u64,
    /// Serve TLS on both listeners with the certificate (chain) in FILE,
    /// PEM, whose key is in --tls-key: clients then use
    /// grpc+https://HOST:PORT and https://HOST:PORT, and need to trust
    /// the CA that signed it (lazystore's --ca-file, Nix's ssl-cert-file).
    /// TCP listeners only: a Unix socket is guarded by its permissions.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert, PEM.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Longest upload taken, in bytes: a gRPC blob upload carrying more is
    /// refused (RESOURCE_EXHAUSTED) and nothing more of it is stored; an
    /// HTTP NAR upload longer, as sent or decompressed, gets 413 and
    /// stages nothing.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_UPLOAD_SIZE)]
    max_upload_size: u64,
    /// Compress raw chunks for gRPC readers (zstd level 1). The chunks a
    /// compacted store (`lazystore compact`) keeps in frames go out raw,
    /// which is cheapest where the link is faster than that compression
    /// (about 350 MB/s per core); set this where builders reach the
    /// service over a slower link.
    #[arg(long)]
    compress_wire: bool,
    /// How long a writer's touch of an object (asking whether it is
    /// stored, writing it) keeps it from a garbage collection run while
    /// serving (`lazystore gc --store grpc+…`): an upload that takes
    /// longer between its first question and its PathInfo may be refused
    /// after a collection, and is then uploaded again. A redb:// store
    /// only (`90min`, `2h`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration,
          default_value = "1h")]
    gc_lease: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g.
    /// 127.0.0.1:9100): gRPC calls by method and status, chunks and bytes
    /// read from and written to the store, upstream downloads and
    /// failures, garbage collections.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    // --token-file, --ca-file: what to send to, and trust of, a remote
    // --store (grpc+…).
    #[command(flatten)]
    remote: RemoteArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Handlers first: a signal during startup then stops the server as
    // soon as it runs instead of killing the process mid-open.
    let interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;

    let url = match args.store.clone() {
        Some(url) => url,
        None => default_store_url()?,
    };
    // A redb store is opened with every commit fsynced (what `Store::open`
    // does): clients publish PathInfos on the strength of what this server
    // told them is stored, so that must survive a crash of the server.
    let access = access(&args)?;
    let http_options = match &args.http_listen {
        Some(_) => Some(http_options(&args, access.clone())?),
        None => None,
    };
    let tls = server_tls(&args)?;
    if args.cache.is_some() && !(is_s3(&url) || is_remote(&url)) {
        bail!(
            "--cache is for a remote store (s3://… or grpc+…); {url} is local: serve it without \
             --cache"
        );
    }
    let options = args.remote.store_options(StoreOptions {
        local_cache: match &args.cache {
            Some(url) => LocalCache::At(url.clone()),
            None => LocalCache::None,
        },
        local_cache_bytes: args.cache_size,
        ..StoreOptions::default()
    })?;
    let store = Store::open(&url, options).await?;
    // An embedded store is collected by this process when asked
    // (`lazystore gc --store grpc+…`), beside its writers.
    let (mut store, collector) = collected_while_serving(store, args.gc_lease);
    let mut metrics = Metrics::default();
    let traffic = Arc::new(StoreTraffic::default());
    store.blobs = Blobs::new(
        Arc::new(ObservedBlobService::new(
            store.blobs.service().clone(),
            traffic.clone(),
        )),
        store.blobs.params(),
    );
    metrics.counters("store", move || traffic.counters());
    if let Some(collector) = &collector {
        let collector = collector.clone();
        metrics.counters("gc", move || collector.counters());
    }
    let publisher = Publisher::new(store.clone(), publish_policy(&args)?);
    // With upstream caches, clients read through them; writes and the
    // publishing checks stay on the store itself.
    let (store, publisher) = if args.upstream.upstreams.is_empty() {
        (store, publisher)
    } else {
        if args.upstream.no_check_sigs {
            bail!(
                "serve publishes what it pulls from --upstream for every client: it checks \
                 signatures (--no-check-sigs is for mount and nix-db)"
            );
        }
        let caches = args.upstream.importer_options(args.remote.ca_certs()?);
        let ttl = Duration::from_secs(args.upstream_negative_ttl);
        let pull = PullThrough::new(store.clone(), caches, ttl)
            .await
            .context("cannot set up the upstream caches")?;
        metrics.counters("upstream", pull.counters());
        if let Some(collector) = &collector {
            collector.keep_roots(pull.ready_roots());
        }
        let reads = Store {
            path_infos: Arc::new(pull),
            ..store
        };
        tracing::info!(upstream = ?args.upstream.upstreams, "paths the store lacks are pulled from upstream");
        (reads.clone(), publisher.with_reads(reads))
    };
    if is_ephemeral(&url) {
        tracing::warn!("serving {url}: everything stored is lost when it stops");
    }
    let grpc = match &args.listen {
        Some(addr) => Some(bind(addr, tls.is_some()).await?),
        None => None,
    };
    let http = match &args.http_listen {
        Some(addr) => Some(bind_http(addr, tls.is_some()).await?),
        None => None,
    };

    let calls = Arc::new(CallCounts::default());
    metrics.calls(calls.clone());
    let metrics = match &args.metrics_listen {
        Some(addr) => Some(metrics.serve(addr, std::future::pending()).await?),
        None => None,
    };
    let urls = grpc
        .iter()
        .map(|(_, u)| u)
        .chain(http.iter().map(|(_, u)| u))
        .chain(metrics.iter().map(|(u, _)| u));
    let mut stdout = std::io::stdout().lock();
    for client_url in urls {
        writeln!(stdout, "{client_url}").context("cannot write the address to standard output")?;
    }
    stdout
        .flush()
        .context("cannot write the address to standard output")?;
    drop(stdout);

    // One signal stops both servers.
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown(interrupt, terminate).await;
        let _ = stop.send(true);
    });
    let stopping = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|&s| s).await;
        }
    };

    let mut tasks = tokio::task::JoinSet::new();
    if let Some((listener, client_url)) = grpc {
        let mut services = Services::new(store.blobs.service().clone(), store.directories.clone())
            .add_service(path_info_server(&publisher, &collector).into_service())
            .add_service(TraceServer::new(store.traces.clone()).into_service())
            .with_access(access.clone())
            .with_max_upload_size(args.max_upload_size)
            .with_compressed_wire(args.compress_wire)
            .with_call_counts(calls.clone());
        if let Some(tls) = &tls {
            services = services.with_tls(tls.clone());
        }
        tracing::info!(store = %url, listen = %client_url, "serving gRPC");
        let (url, stop) = (url.clone(), stopping());
        tasks.spawn(async move {
            serve(listener, services, stop)
                .await
                .with_context(|| format!("serving {url} on {client_url}"))
        });
    }
    if let (Some((listener, client_url)), Some(options)) = (http, http_options) {
        let cache = HttpCache::new(publisher.clone(), options);
        tracing::info!(store = %url, listen = %client_url, "serving a Nix binary cache");
        let (url, stop) = (url.clone(), stopping());
        let tls = tls.clone();
        tasks.spawn(async move {
            match tls {
                Some(tls) => lazystore_httpcache::serve_tls(listener, cache, &tls, stop).await,
                None => lazystore_httpcache::serve(listener, cache, stop).await,
            }
            .with_context(|| format!("serving {url} as a binary cache on {client_url}"))
        });
    }
    if let Some(uses) = collector.as_ref().and_then(|c| c.uses()).cloned() {
        tasks.spawn(async move {
            let mut every = tokio::time::interval(FLUSH_EVERY);
            let mut stop = std::pin::pin!(stopping());
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    () = &mut stop => break,
                }
                let uses = uses.clone();
                let flushed = tokio::task::spawn_blocking(move || uses.flush(false)).await?;
                if let Err(e) = flushed {
                    tracing::warn!(
                        "recording when paths were last used: {}",
                        lazystore_castore::error_chain(&e)
                    );
                }
            }
            let uses = uses.clone();
            tokio::task::spawn_blocking(move || uses.flush(true))
                .await?
                .context("recording when paths were last used")
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.context("a server task panicked")??;
    }
    if let Some((_, task)) = metrics {
        task.abort();
    }
    // The last clone of the store: closing it flushes the redb file.
    drop(store);
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// The gRPC PathInfo service: puts through `publisher`, collections by
/// `collector` if there is one.
fn path_info_server(publisher: &Publisher, collector: &Option<Arc<Collector>>) -> PathInfoServer {
    let server = PathInfoServer::new(publisher.clone());
    match collector {
        Some(collector) => server.with_collector(collector.clone()),
        None => server,
    }
}

/// Who may read and write, from the token files. Every error names the
/// file.
fn access(args: &Args) -> anyhow::Result<Access> {
    let load = |path: &Option<PathBuf>, flag: &str| -> anyhow::Result<Option<Tokens>> {
        path.as_deref()
            .map(|path| Tokens::from_file(path).with_context(|| format!("cannot use {flag}")))
            .transpose()
    };
    if args.upload_token_file.is_some() {
        tracing::warn!(
            "--upload-token-file is the old name of --write-token-file: its tokens now guard \
             gRPC writes too"
        );
    }
    let access = Access {
        read: load(&args.read_token_file, "--read-token-file")?,
        write: match &args.upload_token_file {
            Some(_) => load(&args.upload_token_file, "--upload-token-file")?,
            None => load(&args.write_token_file, "--write-token-file")?,
        },
    };
    if access.read.is_some() && access.write.is_none() {
        tracing::warn!(
            "--read-token-file without --write-token-file: writes accept the read tokens; give \
             --write-token-file to keep readers from writing"
        );
    }
    // A warning worth giving only where the traffic leaves the machine.
    let beyond_loopback = |addr: &str| {
        !["unix:", "127.", "localhost:", "[::1]:"]
            .iter()
            .any(|local| addr.starts_with(local))
    };
    let exposed = [&args.listen, &args.http_listen]
        .into_iter()
        .flatten()
        .any(|addr| beyond_loopback(addr));
    if !access.is_open() && exposed && args.tls_cert.is_none() {
        tracing::warn!(
            "tokens cross the network in clear: anyone who can watch the traffic can use them; \
             serve TLS with --tls-cert and --tls-key (docs/security.md)"
        );
    }
    Ok(access)
}

/// What a PathInfo must be to be published, from the command line,
/// reading the key file.
fn publish_policy(args: &Args) -> anyhow::Result<PublishPolicy> {
    let sign_with = args
        .sign_with
        .as_deref()
        .map(|path| load_key(path, "--sign-with"))
        .transpose()?;
    let policy = PublishPolicy {
        trusted_keys: args.upstream.trusted_keys.clone(),
        sign_with,
    };
    if !policy.verifies() && (args.listen.is_some() || args.allow_upload) {
        tracing::info!(
            "no --trusted-public-key: PathInfos are published as writers send them, unchecked \
             (docs/security.md)"
        );
    }
    Ok(policy)
}

/// A secret key file given to `flag`, with an error that names both.
fn load_key(path: &Path, flag: &str) -> anyhow::Result<Arc<SigningKey>> {
    let key = SigningKey::load(path).with_context(|| {
        format!(
            "cannot use {flag} {}; make one with: nix-store --generate-binary-cache-key NAME \
             SECRET-FILE PUBLIC-FILE",
            path.display()
        )
    })?;
    Ok(Arc::new(key))
}

/// The certificate and key of --tls-cert and --tls-key, if given. Errors
/// name the file and say how to make a good one.
fn server_tls(args: &Args) -> anyhow::Result<Option<ServerTls>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let tls = ServerTls::from_pem_files(cert, key).context("cannot use --tls-cert/--tls-key")?;
    Ok(Some(tls))
}

/// The HTTP cache's options from the command line, reading the key file.
fn http_options(args: &Args, access: Access) -> anyhow::Result<lazystore_httpcache::Options> {
    let signing_key = args
        .signing_key
        .as_deref()
        .map(|path| load_key(path, "--signing-key"))
        .transpose()?;
    Ok(lazystore_httpcache::Options {
        want_mass_query: args.want_mass_query,
        priority: args.priority,
        compression: args.nar_compression,
        signing_key,
        allow_upload: args.allow_upload,
        access,
        max_requests: args.http_max_requests.max(1),
        max_upload_size: args.max_upload_size,
    })
}

/// Binds `--http-listen`, returning the listener and the cache's URL
/// (`https://` with `tls`).
async fn bind_http(addr: &str, tls: bool) -> anyhow::Result<(TcpListener, String)> {
    if addr.starts_with("unix:") {
        bail!("cannot serve HTTP on {addr:?}: --http-listen takes HOST:PORT (e.g. 127.0.0.1:8080)");
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| listen_error(addr, e, "expected HOST:PORT (e.g. 127.0.0.1:8080)"))?;
    let local = listener
        .local_addr()
        .with_context(|| format!("cannot read the address bound for {addr:?}"))?;
    let scheme = if tls { "https" } else { "http" };
    Ok((listener, format!("{scheme}://{local}")))
}

fn listen_error(addr: &str, e: std::io::Error, otherwise: &str) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "the address is in use (another lazystore serve?): pick another port, or 0 for any"
        }
        std::io::ErrorKind::PermissionDenied => "ports below 1024 need root",
        std::io::ErrorKind::AddrNotAvailable => "no interface has that address",
        _ => otherwise,
    };
    anyhow::Error::new(e).context(format!("cannot listen on {addr:?}; {hint}"))
}

/// Binds `--listen`, returning the listener and the URL clients use
/// (`grpc+https://` with `tls`).
async fn bind(addr: &str, tls: bool) -> anyhow::Result<(Listener, String)> {
    if let Some(path) = addr.strip_prefix("unix:") {
        if tls {
            bail!(
                "cannot serve TLS on {addr:?}: --tls-cert is for TCP listeners (a Unix socket is \
                 guarded by its file permissions); serve the socket from a lazystore serve \
                 without --tls-cert, or --listen HOST:PORT"
            );
        }
        let path = Path::new(path);
        if !path.is_absolute() {
            bail!("cannot listen on {addr:?}: the socket path must be absolute (unix:/PATH)");
        }
        remove_stale_socket(path).await?;
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot listen on Unix socket {}", path.display()))?;
        let url = grpc_unix_url(path);
        return Ok((listener.into(), url));
    }
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        listen_error(
            addr,
            e,
            "expected HOST:PORT (e.g. 127.0.0.1:7400) or unix:/PATH",
        )
    })?;
    let local = listener
        .local_addr()
        .with_context(|| format!("cannot read the address bound for {addr:?}"))?;
    let url = if tls {
        grpc_https_url(local)
    } else {
        grpc_tcp_url(local)
    };
    Ok((listener.into(), url))
}

/// Removes a socket file left by a server that is gone, so the address can
/// be bound again; refuses if a server still answers there or the file is
/// not a socket.
async fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "cannot listen on {}: it exists and is not a socket; remove it or pick another path",
            path.display()
        );
    }
    if UnixStream::connect(path).await.is_ok() {
        bail!(
            "cannot listen on {}: a server is already listening there (another lazystore serve?)",
            path.display()
        );
    }
    std::fs::remove_file(path)
        .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    tracing::info!(socket = %path.display(), "removed a stale socket");
    Ok(())
}

/// Completes on the first SIGINT or SIGTERM; a second one exits at once,
/// without waiting for the calls in flight.
async fn shutdown(mut interrupt: Signal, mut terminate: Signal) {
    let name = tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    tracing::info!("{name}: finishing the calls in flight (signal again to stop at once)");
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        eprintln!("lazystore: second signal: stopping without finishing the calls in flight");
        std::process::exit(1);
    });
}
