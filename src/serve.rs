//! `lazystore serve`: one store over gRPC — blobs, directories and path
//! infos, with gRPC health — until SIGINT or SIGTERM, then a graceful stop.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use lazystore_castore::grpc::{Listener, Services, serve};
use lazystore_pathinfo::pathinfos::PathInfoServer;
use lazystore_pathinfo::{Store, default_store_url};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Serve a store over gRPC to importers, builders and other lazystores.
///
/// Prints the URL clients use (`grpc+http://HOST:PORT` with the port
/// actually bound, or `grpc+unix:///PATH`) on standard output once
/// listening. On SIGINT or SIGTERM it stops accepting connections, lets the
/// calls in flight finish and exits 0; a second signal exits at once. Logs
/// go to standard error, filtered by `RUST_LOG` (e.g. `RUST_LOG=info`).
#[derive(clap::Args)]
pub struct Args {
    /// Where to listen: HOST:PORT for TCP (port 0 picks a free one), or
    /// unix:/PATH for a Unix socket.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// The store to serve: redb:///abs/path/store.redb, memory://,
    /// grpc+http://HOST:PORT or grpc+unix:///PATH [default:
    /// redb://$LAZYSTORE_DIR/store.redb, $LAZYSTORE_DIR defaulting to
    /// ~/.local/share/lazystore].
    #[arg(long, value_name = "URL")]
    store: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Handlers first: a signal during startup then stops the server as
    // soon as it runs instead of killing the process mid-open.
    let interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;

    let url = match args.store {
        Some(url) => url,
        None => default_store_url()?,
    };
    // A redb store is opened with every commit fsynced (what `Store::open`
    // does): clients publish PathInfos on the strength of what this server
    // told them is stored, so that must survive a crash of the server.
    let store = Store::open(&url).await?;
    let (listener, client_url) = bind(&args.listen).await?;
    if url == "memory://" {
        tracing::warn!("serving a memory:// store: everything stored is lost when it stops");
    }

    let services = Services::new(store.blobs.service().clone(), store.directories.clone())
        .add_service(PathInfoServer::new(store.clone()).into_service());
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{client_url}")
        .and_then(|()| stdout.flush())
        .context("cannot write the address to standard output")?;
    drop(stdout);
    tracing::info!(store = %url, listen = %client_url, "serving");

    serve(listener, services, shutdown(interrupt, terminate))
        .await
        .with_context(|| format!("serving {url} on {client_url}"))?;
    // The last clone of the store: closing it flushes the redb file.
    drop(store);
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Binds `--listen`, returning the listener and the URL clients use.
async fn bind(addr: &str) -> anyhow::Result<(Listener, String)> {
    if let Some(path) = addr.strip_prefix("unix:") {
        let path = Path::new(path);
        if !path.is_absolute() {
            bail!("cannot listen on {addr:?}: the socket path must be absolute (unix:/PATH)");
        }
        remove_stale_socket(path).await?;
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot listen on Unix socket {}", path.display()))?;
        let url = format!("grpc+unix://{}", path.display());
        return Ok((listener.into(), url));
    }
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "the address is in use (another lazystore serve?): pick another port, or 0 for any"
            }
            std::io::ErrorKind::PermissionDenied => "ports below 1024 need root",
            std::io::ErrorKind::AddrNotAvailable => "no interface has that address",
            _ => "expected HOST:PORT (e.g. 127.0.0.1:7400) or unix:/PATH",
        };
        anyhow::Error::new(e).context(format!("cannot listen on {addr:?}; {hint}"))
    })?;
    let local = listener
        .local_addr()
        .with_context(|| format!("cannot read the address bound for {addr:?}"))?;
    Ok((listener.into(), format!("grpc+http://{local}")))
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
