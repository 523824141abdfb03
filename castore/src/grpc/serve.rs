//! Running the server: [`Services`] collects what to serve (the castore
//! services, gRPC health, and anything a caller adds such as PathInfo) and
//! who may call them ([`Access`]), and [`serve`] runs them on a listener
//! until a shutdown signal, then drains.
//!
//! The token check sits in front of every route, so no service checks
//! tokens itself and none added later can forget to: a call without the
//! token its method needs ([`Need::of_grpc_call`]) is refused with
//! `UNAUTHENTICATED` before its service sees a byte of it.
//!
//! The door is bounded for clients nobody vouches for: at most
//! [`MAX_CONNECTIONS`] connections at once (more wait, unaccepted, in the
//! kernel's accept queue), [`MAX_CONCURRENT_STREAMS`] calls at once on one
//! connection, [`FIRST_BYTES_TIMEOUT`] for a new connection to say
//! something (and [`TLS_HANDSHAKE_TIMEOUT`] to finish its TLS handshake),
//! keepalive pings that close a connection whose peer stopped answering,
//! and a blob upload limit ([`Services::with_max_upload_size`]). There is
//! no time limit on a call: a `ReadChunks` stream to a slow reader may
//! rightly take hours. "Idle" therefore means a peer that does not answer
//! HTTP/2 pings (gone, partitioned, or frozen); a live client that holds a
//! connection open without calls keeps it, and holds one of the
//! connection slots.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::middleware::{self, Next};
use futures::{Stream, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::server::{
    Connected, ServerTlsConfig, TcpConnectInfo, TcpIncoming, TlsConnectInfo,
};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::{BlobServer, DirectoryServer};
use crate::auth::{Access, Need, bearer};
use crate::blobs::BlobService;
use crate::directories::DirectoryService;
use crate::tls::ServerTls;

/// Connections served at once. Each costs a task, its HTTP/2 state and
/// buffers (up to the flow-control windows, [`CONNECTION_WINDOW`]), so
/// this bounds what unauthenticated clients can make the server hold,
/// while leaving room for a build farm: every builder's mount keeps one
/// connection (clones of a `Connection` share it). Connections over the
/// limit are not accepted until one closes: they wait in the kernel's
/// accept queue, and their clients' connect timeouts decide how long.
pub const MAX_CONNECTIONS: usize = 1024;

/// Calls (HTTP/2 streams) open at once on one connection: this bounds the
/// memory one connection's calls can hold to a few hundred times a call's
/// stream window. A client ingesting a path has up to 1,024 files in
/// flight (`pathinfo::ingest::MAX_FILES_IN_FLIGHT`), most of them waiting
/// for the store to commit; what it opens past this limit it queues
/// itself (HTTP/2 clients wait for a free stream).
pub const MAX_CONCURRENT_STREAMS: u32 = 512;

/// How often the server pings a connection from which nothing has come,
/// and how long it waits for the answer before closing it: a client that
/// vanished without closing (power loss, partition) frees its slot within
/// a minute. Answering takes a client no work, so a live client, even one
/// slowly reading a long `ReadChunks` stream, is never closed by this.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(40);

/// See [`KEEPALIVE_INTERVAL`]: long enough for a loaded client on a slow
/// link to answer.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a new connection may send nothing: an HTTP/2 client sends its
/// preface (or TLS hello) at once, so only a connection opened to hold a
/// slot (of [`MAX_CONNECTIONS`]) waits longer. HTTP/2 pings can't reach a
/// peer that never started HTTP/2.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a TLS handshake may take, once started: a few round trips,
/// so seconds even across continents.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest blob one `Put` call may upload unless configured
/// ([`Services::with_max_upload_size`]): the whole NAR of a large store
/// path (a toolchain, a VM image) fits, while one client cannot fill a
/// store's disk in one call by accident or design.
pub const DEFAULT_MAX_UPLOAD_SIZE: u64 = 64 << 30;

/// Where the server accepts connections.
#[derive(Debug)]
pub enum Listener {
    /// TCP: cleartext HTTP/2 (clients use `grpc+http://HOST:PORT`), or TLS
    /// if the services have a certificate ([`Services::with_tls`];
    /// `grpc+https://HOST:PORT`).
    Tcp(TcpListener),
    /// A Unix socket (clients use `grpc+unix:///PATH`), never TLS: the
    /// socket file's permissions guard it. The socket file stays after the
    /// server stops; whoever binds it again removes it.
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Listener::Unix(l)
    }
}

/// The server failed to run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The transport failed.
    #[error("gRPC server failed")]
    Transport(#[source] tonic::transport::Error),
    /// TLS was asked for on a Unix socket.
    #[error(
        "TLS is for TCP listeners: a Unix socket is guarded by its file permissions (serve it \
         without a certificate, or listen on HOST:PORT)"
    )]
    TlsOnUnixSocket,
}

/// The gRPC services one server runs, with `grpc.health.v1.Health`
/// reporting each as `SERVING` while it runs.
///
/// ```no_run
/// # async fn f(
/// #     blobs: std::sync::Arc<dyn lazystore_castore::BlobService>,
/// #     dirs: std::sync::Arc<dyn lazystore_castore::DirectoryService>,
/// # ) -> Result<(), Box<dyn std::error::Error>> {
/// use lazystore_castore::grpc::{Services, serve};
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
/// let services = Services::new(blobs, dirs); // .add_service(a PathInfo server)
/// serve(listener, services, async { tokio::signal::ctrl_c().await.ok(); }).await?;
/// # Ok(()) }
/// ```
pub struct Services {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    health: HealthReporter,
    access: Access,
    blobs: BlobServer,
    tls: Option<ServerTls>,
    max_connections: usize,
    calls: Option<Arc<super::CallCounts>>,
}

impl Services {
    /// The blob and directory services over these backends.
    pub fn new(blobs: Arc<dyn BlobService>, directories: Arc<dyn DirectoryService>) -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        Services {
            routes,
            // The blob service is added by `serve`, with its upload limit.
            names: vec![BlobServer::NAME],
            health,
            access: Access::default(),
            blobs: BlobServer::new(blobs).with_max_upload_size(DEFAULT_MAX_UPLOAD_SIZE),
            tls: None,
            max_connections: MAX_CONNECTIONS,
            calls: None,
        }
        .add_service(DirectoryServer::new(directories).into_service())
    }

    /// Adds another service to the same server (such as the PathInfo
    /// service); health reports it `SERVING` while the server runs. Set its
    /// message limits on `service` itself (see
    /// [`MAX_MESSAGE_SIZE`](super::MAX_MESSAGE_SIZE)).
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.routes.add_service(service);
        self.names.push(S::NAME);
        self
    }

    /// Who may call: by default anyone who can reach the listener.
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// Serves TLS with this certificate on a TCP listener (clients use
    /// `grpc+https://HOST:PORT`); a handshake that does not finish within
    /// [`TLS_HANDSHAKE_TIMEOUT`] closes the connection, and a failed one
    /// is logged at debug level without stopping the server.
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Compresses raw chunks for the wire ([`BlobServer::with_compressed_wire`]).
    pub fn with_compressed_wire(mut self, on: bool) -> Self {
        self.blobs = self.blobs.with_compressed_wire(on);
        self
    }

    /// Refuses a blob `Put` whose chunks add up to more than `bytes`
    /// (encoded, as sent), or that records a blob larger than `bytes`,
    /// with `RESOURCE_EXHAUSTED` (default [`DEFAULT_MAX_UPLOAD_SIZE`]).
    pub fn with_max_upload_size(mut self, bytes: u64) -> Self {
        self.blobs = self.blobs.with_max_upload_size(bytes);
        self
    }

    /// Serves at most `n` connections at once (default
    /// [`MAX_CONNECTIONS`]); more wait in the accept queue.
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Counts every call answered in `calls`, by method and status.
    pub fn with_call_counts(mut self, calls: Arc<super::CallCounts>) -> Self {
        self.calls = Some(calls);
        self
    }

    /// The health reporter, to mark a service `NOT_SERVING` while it can't
    /// answer (and back).
    pub fn health_reporter(&self) -> HealthReporter {
        self.health.clone()
    }
}

/// HTTP/2 connection flow-control window of the server (see [`serve`])
/// and of clients.
pub(crate) const CONNECTION_WINDOW: u32 = 16 << 20;

/// HTTP/2 stream flow-control window of the server and of clients: a few
/// 1 MiB messages in flight per call.
pub(crate) const STREAM_WINDOW: u32 = 4 << 20;

/// Serves `services` on `listener` until `shutdown` completes; then stops
/// accepting connections, reports every service `NOT_SERVING`, lets the
/// calls in flight finish (a `ReadChunks` stream runs to its end) and
/// returns once every connection has closed.
pub async fn serve(
    listener: impl Into<Listener>,
    services: Services,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let Services {
        mut routes,
        names,
        mut health,
        access,
        blobs,
        tls,
        max_connections,
        calls,
    } = services;
    routes.add_service(blobs.into_service());
    let mut routes = routes.routes();
    if !access.is_open() {
        let router = routes.into_axum_router();
        routes = router
            .layer(middleware::from_fn_with_state(Arc::new(access), authorize))
            .into();
    }
    // Outside the token check, so refusals are counted too.
    if let Some(calls) = calls {
        let router = routes.into_axum_router();
        routes = router
            .layer(middleware::from_fn_with_state(calls, super::calls::count))
            .into();
    }
    for name in &names {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    let shutdown = async move {
        shutdown.await;
        tracing::info!("gRPC server shutting down, draining calls in flight");
        // The overall status ("") too. Then drop the statuses so open Watch
        // streams end: they would otherwise keep their connections, and the
        // drain, open forever.
        let all = names.iter().copied().chain([""]);
        for name in all.clone() {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        for name in all {
            health.clear_service_status(name).await;
        }
    };
    // Fixed, large flow-control windows rather than adaptive ones. h2 caps
    // the framing overhead of small DATA frames a connection may have
    // buffered at half its connection window, and closes the connection
    // (ENHANCE_YOUR_CALM, "too_many_data_frames") past it. An adaptive
    // window starts at 64 KiB, a 32 KiB cap: a mount ingesting a path of
    // thousands of small files, each a Put of a few hundred bytes, while
    // the store fsyncs, lost its connection mid-NAR. 16 MiB makes the cap
    // 8 MiB, some 30,000 small frames waiting at once.
    let mut server = tonic::transport::Server::builder()
        .http2_adaptive_window(Some(false))
        .initial_connection_window_size(CONNECTION_WINDOW)
        .initial_stream_window_size(STREAM_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    let listener = listener.into();
    if let Some(tls) = &tls {
        if let Listener::Unix(_) = listener {
            return Err(ServeError::TlsOnUnixSocket);
        }
        // tonic hands each accepted connection to a task of its own for
        // the handshake (a slow one holds up no other) and applies the
        // configuration in `serve_with_incoming_shutdown` too.
        let config = ServerTlsConfig::new()
            .identity(tls.identity())
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        server = server.tls_config(config).map_err(ServeError::Transport)?;
    }
    let router = server.add_routes(routes);
    let slots = Arc::new(Semaphore::new(max_connections));
    let result = match listener {
        Listener::Tcp(l) => {
            let incoming = TcpIncoming::from(l).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(limited(incoming, slots), shutdown)
                .await
        }
        Listener::Unix(l) => {
            let incoming = UnixListenerStream::new(l);
            router
                .serve_with_incoming_shutdown(limited(incoming, slots), shutdown)
                .await
        }
    };
    result.map_err(ServeError::Transport)
}

/// `incoming`, accepting a connection only once one of `slots` is free;
/// the connection holds it until it closes.
fn limited<S, IO, E>(
    incoming: S,
    slots: Arc<Semaphore>,
) -> impl Stream<Item = Result<Slotted<IO>, E>>
where
    S: Stream<Item = Result<IO, E>> + Unpin,
{
    futures::stream::unfold((incoming, slots), |(mut incoming, slots)| async move {
        // The permit first: until one is free, nothing is accepted and new
        // connections wait in the kernel's queue. (Dropping this future
        // while it waits is fine: `serve` drops the whole stream.)
        let permit = slots.clone().acquire_owned().await.ok()?;
        let accepted = incoming.next().await?.map(|io| Slotted {
            io,
            _slot: permit,
            silence: Some(Box::pin(tokio::time::sleep(FIRST_BYTES_TIMEOUT))),
        });
        Some((accepted, (incoming, slots)))
    })
}

/// An accepted connection holding its slot, and failing its reads if
/// nothing comes within [`FIRST_BYTES_TIMEOUT`] of its accepting.
struct Slotted<IO> {
    io: IO,
    _slot: OwnedSemaphorePermit,
    /// Until the first bytes arrive.
    silence: Option<Pin<Box<Sleep>>>,
}

impl<IO: Connected> Connected for Slotted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Slotted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if result.is_ready() {
            this.silence = None;
        } else if let Some(silence) = this.silence.as_mut()
            && silence.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client sent nothing for {FIRST_BYTES_TIMEOUT:?}"),
            )));
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Slotted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Lets a call through if it carries the token its method needs; refuses
/// it with `UNAUTHENTICATED` otherwise, saying which token the client
/// needs and how to give it.
async fn authorize(
    State(access): State<Arc<Access>>,
    request: Request<axum::body::Body>,
    next: Next,
) -> axum::response::Response {
    let need = Need::of_grpc_call(request.uri().path());
    let token = request
        .headers()
        .get(tonic::codegen::http::header::AUTHORIZATION)
        .map(|v| bearer(v.as_bytes()).unwrap_or_default());
    match access.check(need, token) {
        Ok(()) => next.run(request).await,
        Err(denied) => {
            let extensions = request.extensions();
            let client = extensions
                .get::<TcpConnectInfo>()
                .or_else(|| {
                    extensions
                        .get::<TlsConnectInfo<TcpConnectInfo>>()
                        .map(TlsConnectInfo::get_ref)
                })
                .and_then(TcpConnectInfo::remote_addr);
            tracing::warn!(
                call = request.uri().path(),
                client = ?client,
                "refused: {denied}"
            );
            tonic::Status::unauthenticated(denied.to_string()).into_http()
        }
    }
}
