//! [`HttpCache`]: the routes, the token check, the request limit and the
//! access log, over one [`Store`]; [`serve`] runs it on a listener until
//! shutdown, and [`serve_tls`] the same over TLS.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use lazystore_castore::auth::Access;
use lazystore_castore::error_chain;
use lazystore_castore::tls::ServerTls;
use lazystore_pathinfo::pathinfos::{PathInfo, PathInfoError};
use lazystore_pathinfo::publish::Publisher;
use lazystore_pathinfo::{SigningKey, Store, StorePath, StorePathHash};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::body::{LogLine, Tracked};
use crate::conn::IdleListener;
use crate::error::HttpError;
use crate::layouts::{Layouts, Listing, MAX_LISTING_BYTES};
use crate::narinfo::{NarCompression, cache_info, narinfo};
use crate::upload::Staging;

/// `Priority` in `nix-cache-info` unless configured: the same as
/// cache.nixos.org, so neither is preferred by default.
pub const DEFAULT_PRIORITY: u32 = 40;

/// Requests handled at once unless configured; more wait for a slot.
pub const DEFAULT_MAX_REQUESTS: usize = 64;

/// How the cache presents itself.
#[derive(Clone, Debug)]
pub struct Options {
    /// `WantMassQuery` in `nix-cache-info`.
    pub want_mass_query: bool,
    /// `Priority` in `nix-cache-info` (lower is preferred).
    pub priority: u32,
    /// The form of NAR narinfos point at.
    pub compression: NarCompression,
    /// Signs every narinfo served, beside the signatures kept.
    pub signing_key: Option<Arc<SigningKey>>,
    /// Uploads (`PUT`) are accepted (from writers, if `access` has write
    /// tokens); `false` refuses them with 403.
    pub allow_upload: bool,
    /// Who may read and write: the token each request needs. Tokens come
    /// as `Authorization: Bearer TOKEN`, or Basic auth with any user name
    /// and the token as password (what Nix sends from a netrc file).
    pub access: Access,
    /// Requests handled at once; a request holds its slot until its body
    /// is sent, or its client has read nothing for [`SEND_TIMEOUT`].
    pub max_requests: usize,
    /// Longest upload taken, compressed as sent and as a NAR; longer ones
    /// are refused with 413 and stage nothing. By default the gRPC
    /// server's ([`DEFAULT_MAX_UPLOAD_SIZE`](lazystore_castore::grpc::DEFAULT_MAX_UPLOAD_SIZE)).
    pub max_upload_size: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            want_mass_query: true,
            priority: DEFAULT_PRIORITY,
            compression: NarCompression::None,
            signing_key: None,
            allow_upload: false,
            access: Access::default(),
            max_requests: DEFAULT_MAX_REQUESTS,
            max_upload_size: lazystore_castore::grpc::DEFAULT_MAX_UPLOAD_SIZE,
        }
    }
}

/// A store served as a binary cache. Cheap to clone.
#[derive(Clone)]
pub struct HttpCache {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub store: Store,
    /// Publishes uploads into `store`.
    pub publisher: Publisher,
    pub options: Options,
    pub layouts: Layouts,
    pub staging: Staging,
    limit: Arc<Semaphore>,
}

impl HttpCache {
    /// Serves the publisher's store as `options` say, publishing uploads
    /// through it (a [`Store`] is a publisher with no trusted keys).
    pub fn new(publisher: impl Into<Publisher>, options: Options) -> HttpCache {
        let publisher = publisher.into();
        let limit = Arc::new(Semaphore::new(options.max_requests.max(1)));
        HttpCache {
            inner: Arc::new(Inner {
                store: publisher.reads().clone(),
                publisher,
                options,
                layouts: Layouts::default(),
                staging: Staging::default(),
                limit,
            }),
        }
    }

    /// The routes, with the token check, the request limit and the access
    /// log (which logs refused requests too).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/nix-cache-info", get(get_cache_info))
            .route("/{file}", get(get_top).put(crate::upload::put_top))
            .route(
                "/nar/{file}",
                get(crate::nar::get_nar).put(crate::upload::put_nar),
            )
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(
                self.clone(),
                crate::auth::authorize,
            ))
            .layer(middleware::from_fn_with_state(self.clone(), track))
            .with_state(self.clone())
    }

    /// The PathInfo of the path whose hash is `hash_str`, or 404.
    pub(crate) async fn path_info(&self, hash_str: &str, url: &str) -> Result<PathInfo, HttpError> {
        let hash = StorePath::parse_hash(hash_str).map_err(|e| {
            HttpError::NotFound(format!(
                "{url}: {hash_str:?} is not a store path hash ({e})"
            ))
        })?;
        self.path_info_by_hash(&hash, url).await
    }

    pub(crate) async fn path_info_by_hash(
        &self,
        hash: &StorePathHash,
        url: &str,
    ) -> Result<PathInfo, HttpError> {
        self.inner
            .store
            .path_infos
            .get(hash)
            .await
            .map_err(|e| match e {
                // The caches behind this one failed: a bad gateway.
                PathInfoError::Upstream { .. } => {
                    HttpError::BadGateway(format!("{url}: {}", error_chain(&e)))
                }
                e => HttpError::internal(format!("looking up {url}"), e),
            })?
            .ok_or_else(|| HttpError::NotFound(format!("{url}: no such path in this cache")))
    }

    /// Refuses (404) a path whose data is not all stored, so a client
    /// substitutes it elsewhere and `nix copy --to` uploads it again, which
    /// writes what is missing. Only checked while the store has quarantined
    /// chunks (`lazystore_pathinfo::whole`); a check that fails serves the
    /// narinfo, as before there was one.
    async fn refuse_incomplete(&self, info: &PathInfo, url: &str) -> Result<(), HttpError> {
        let store = &self.inner.store;
        if !store.may_lack_data().await.unwrap_or(false) {
            return Ok(());
        }
        match store.find_missing(&info.root).await {
            Ok(None) => Ok(()),
            Ok(Some(missing)) => Err(HttpError::NotFound(format!(
                "{url}: {} is incomplete in this cache ({missing}); upload it again to repair it",
                info.store_path
            ))),
            Err(e) => {
                tracing::warn!(
                    "{url}: cannot check that {} is whole: {}",
                    info.store_path,
                    lazystore_castore::error_chain(&e)
                );
                Ok(())
            }
        }
    }
}

/// How long a connection may take no response bytes (its client is not
/// reading) before it is closed and its request slot freed.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `cache` on `listener` until `shutdown` completes, then stops
/// accepting and lets the requests in flight finish. A connection whose
/// client reads nothing for [`SEND_TIMEOUT`] is closed.
pub async fn serve(
    listener: TcpListener,
    cache: HttpCache,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_send_timeout(listener, cache, shutdown, SEND_TIMEOUT).await
}

/// [`serve`] over TLS with `tls`'s certificate (clients use
/// `https://HOST:PORT`). Each handshake must finish within
/// [`TLS_HANDSHAKE_TIMEOUT`](crate::TLS_HANDSHAKE_TIMEOUT); one that fails
/// or times out closes its connection, logged at debug level, and the
/// server goes on.
pub async fn serve_tls(
    listener: TcpListener,
    cache: HttpCache,
    tls: &ServerTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The router speaks HTTP/1.1 only.
    let acceptor = TlsAcceptor::from(tls.rustls_config(&[b"http/1.1"]));
    let listener = IdleListener::new(listener, SEND_TIMEOUT, Some(acceptor));
    run(listener, cache, shutdown).await
}

/// [`serve`], closing a connection whose client reads nothing for
/// `send_timeout`.
pub async fn serve_with_send_timeout(
    listener: TcpListener,
    cache: HttpCache,
    shutdown: impl Future<Output = ()> + Send + 'static,
    send_timeout: Duration,
) -> std::io::Result<()> {
    run(
        IdleListener::new(listener, send_timeout, None),
        cache,
        shutdown,
    )
    .await
}

async fn run(
    listener: IdleListener,
    cache: HttpCache,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let service = cache
        .router()
        .into_make_service_with_connect_info::<crate::conn::ClientAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Holds a request slot for the whole request, body included, and logs
/// the request when its body ends.
async fn track(State(cache): State<HttpCache>, request: Request, next: Next) -> Response {
    let permit = cache
        .inner
        .limit
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let client = request
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::conn::ClientAddr>>()
        .map(|c| c.0.0);
    let range = request
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let start = Instant::now();
    let response = next.run(request).await;
    let status = response.status();
    let (parts, body) = response.into_parts();
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = Tracked::new(
        body,
        permit,
        LogLine {
            client,
            method,
            path,
            range,
            status,
            length,
            start,
        },
    );
    Response::from_parts(parts, Body::new(body))
}

async fn not_found(request: Request) -> HttpError {
    HttpError::NotFound(format!(
        "{}: no such file in this cache",
        request.uri().path()
    ))
}

async fn get_cache_info(State(cache): State<HttpCache>) -> Response {
    let options = &cache.inner.options;
    text_response(
        "text/x-nix-cache-info",
        cache_info(options.want_mass_query, options.priority),
    )
}

fn text_response(content_type: &'static str, body: impl Into<Body>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    (headers, body.into()).into_response()
}

/// `GET /<hash>.narinfo` and `GET /<hash>.ls`.
async fn get_top(
    State(cache): State<HttpCache>,
    Path(file): Path<String>,
) -> Result<Response, HttpError> {
    let url = format!("/{file}");
    if let Some(hash) = file.strip_suffix(".narinfo") {
        let info = cache.path_info(hash, &url).await?;
        cache.refuse_incomplete(&info, &url).await?;
        let options = &cache.inner.options;
        let text = narinfo(&info, options.compression, options.signing_key.as_deref()).render();
        return Ok(text_response("text/x-nix-narinfo", text));
    }
    if let Some(hash) = file.strip_suffix(".ls") {
        // HEAD answers as GET would: the listing is made (or found) for
        // both, so a listing GET refuses is refused to HEAD too.
        let info = cache.path_info(hash, &url).await?;
        let listing = cache
            .inner
            .layouts
            .listing(info.nar_sha256, &*cache.inner.store.directories, &info.root)
            .await
            .map_err(|e| HttpError::internal(format!("listing {}", info.store_path), e))?;
        return match listing {
            Listing::Json(json) => Ok(text_response("application/json", json)),
            Listing::NotUtf8 => Err(HttpError::NotFound(format!(
                "{url}: {} has names that are not UTF-8, which a JSON listing cannot hold",
                info.store_path
            ))),
            Listing::TooLarge => Err(HttpError::NotFound(format!(
                "{url}: the listing of {} would be longer than {MAX_LISTING_BYTES} bytes",
                info.store_path
            ))),
        };
    }
    Err(HttpError::NotFound(format!(
        "{url}: no such file in this cache"
    )))
}
