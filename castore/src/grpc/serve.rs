//! Running the server: [`Services`] collects what to serve (the castore
//! services, gRPC health, and anything a caller adds such as PathInfo) and
//! who may call them ([`Access`]), and [`serve`] runs them on a listener
//! until a shutdown signal, then drains.
//!
//! The token check sits in front of every route, so no service checks
//! tokens itself and none added later can forget to: a call without the
//! token its method needs ([`Need::of_grpc_call`]) is refused with
//! `UNAUTHENTICATED` before its service sees a byte of it.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::middleware::{self, Next};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::server::{TcpConnectInfo, TcpIncoming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::{BlobServer, DirectoryServer};
use crate::auth::{Access, Need, bearer};
use crate::blobs::BlobService;
use crate::directories::DirectoryService;

/// Where the server accepts connections.
#[derive(Debug)]
pub enum Listener {
    /// TCP, cleartext HTTP/2 (clients use `grpc+http://HOST:PORT`).
    Tcp(TcpListener),
    /// A Unix socket (clients use `grpc+unix:///PATH`). The socket file
    /// stays after the server stops; whoever binds it again removes it.
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
#[error("gRPC server failed")]
pub struct ServeError(#[source] tonic::transport::Error);

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
}

impl Services {
    /// The blob and directory services over these backends.
    pub fn new(blobs: Arc<dyn BlobService>, directories: Arc<dyn DirectoryService>) -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        Services {
            routes,
            names: Vec::new(),
            health,
            access: Access::default(),
        }
        .add_service(BlobServer::new(blobs).into_service())
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
        routes,
        names,
        mut health,
        access,
    } = services;
    let mut routes = routes.routes();
    if !access.is_open() {
        let router = routes.into_axum_router();
        routes = router
            .layer(middleware::from_fn_with_state(Arc::new(access), authorize))
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
    let router = tonic::transport::Server::builder()
        .http2_adaptive_window(Some(false))
        .initial_connection_window_size(CONNECTION_WINDOW)
        .initial_stream_window_size(STREAM_WINDOW)
        .add_routes(routes);
    let result = match listener.into() {
        Listener::Tcp(l) => {
            let incoming = TcpIncoming::from(l).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        Listener::Unix(l) => {
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown)
                .await
        }
    };
    result.map_err(ServeError)
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
            let client = request
                .extensions()
                .get::<TcpConnectInfo>()
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
