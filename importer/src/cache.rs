//! Reading Nix binary caches: `http://`, `https://` and `file://` ones, through
//! one [`BinaryCache`] type.
//!
//! A cache is opened once per run, which reads and checks its
//! `nix-cache-info`. After that it hands out small files whole (narinfo
//! files, listings, bounded in size before they are buffered) and large
//! ones as streams (NARs). Small-file reads retry transient failures
//! themselves; a stream can fail half-way, so retrying one is the caller's
//! business, guided by [`CacheError`]'s [`Retryable`] class.
//!
//! Every HTTP response is read as its `Content-Encoding` header says:
//! cache.nixos.org stores listings brotli- or zstd-compressed and serves
//! the stored bytes with that header, whatever the request asked for.
//! Small files come back decoded, their size bound applied to the decoded
//! bytes; a NAR comes back as sent, with the codings to undo
//! ([`Opened`]), so that its caller counts and bounds the bytes on the wire
//! before decoding them. reqwest is built without its decompression
//! features, so nothing below this module decodes anything.

use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::TryStreamExt;
use lazystore_castore::tls::CaCerts;
use lazystore_castore::{ErrorClass, RetryPolicy, Retryable};
use lazystore_pathinfo::decompress::Decompressed;
use lazystore_pathinfo::{Compression, STORE_DIR};
use reqwest::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::io::StreamReader;
use url::Url;

use crate::stream::{Counted, StreamError, decompress, take_stream_error, transport_error};

/// Largest `nix-cache-info` read. Real ones are three short lines.
const MAX_CACHE_INFO_SIZE: usize = 64 * 1024;

/// Why a cache could not be opened or a file in it read.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache URL does not parse.
    #[error("invalid cache URL {url:?}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What the URL parser said.
        #[source]
        source: url::ParseError,
    },
    /// The URL's scheme is not one this importer reads.
    #[error("unsupported cache URL {url}: expected https://, http:// or file:///")]
    UnsupportedScheme {
        /// The URL given.
        url: String,
    },
    /// The cache has no `nix-cache-info`, so it is not a binary cache.
    #[error("{url} is not a Nix binary cache: it has no nix-cache-info")]
    NotACache {
        /// The cache URL.
        url: String,
    },
    /// `nix-cache-info` is not `Key: value` lines of text.
    #[error("{url}/nix-cache-info is malformed")]
    MalformedCacheInfo {
        /// The cache URL.
        url: String,
    },
    /// The cache holds paths of another store directory.
    #[error("{url} is a cache for store {store_dir}, not {STORE_DIR}")]
    WrongStoreDir {
        /// The cache URL.
        url: String,
        /// The `StoreDir` it declares.
        store_dir: String,
    },
    /// The server answered with an error status other than not-found.
    #[error("{url}: HTTP status {status}")]
    Status {
        /// The file's URL.
        url: String,
        /// The status.
        status: StatusCode,
    },
    /// The request or the response body failed in transit.
    #[error("{url}: request failed")]
    Http {
        /// The file's URL.
        url: String,
        /// What failed.
        #[source]
        source: reqwest::Error,
    },
    /// The server sent nothing for longer than the read timeout while a
    /// response was awaited.
    #[error("{url}: no data from the server for {after:?}")]
    Stalled {
        /// The file's URL.
        url: String,
        /// How long nothing came.
        after: Duration,
    },
    /// A file of a `file://` cache could not be read.
    #[error("{path}: cannot read")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file that is read whole is larger than allowed.
    #[error("{url} is larger than {limit} bytes")]
    TooLarge {
        /// The file's URL.
        url: String,
        /// The limit.
        limit: usize,
    },
    /// A NAR URL in a narinfo leaves the cache or does not parse.
    #[error("NAR URL {nar_url:?} is not a file inside {url}")]
    BadNarUrl {
        /// The URL in the narinfo.
        nar_url: String,
        /// The cache URL.
        url: String,
    },
    /// The response names a `Content-Encoding` no decoder here reads.
    #[error("{url}: unsupported Content-Encoding {encoding:?}")]
    UnsupportedEncoding {
        /// The file's URL.
        url: String,
        /// The header's value.
        encoding: String,
    },
    /// The response body is not what its `Content-Encoding` says (corrupt
    /// or truncated).
    #[error("{url}: cannot decode its Content-Encoding {encoding}")]
    Decode {
        /// The file's URL.
        url: String,
        /// The coding that failed.
        encoding: Compression,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },
}

impl Retryable for CacheError {
    /// [`Transient`](ErrorClass::Transient) where trying again may help: a
    /// 5xx, 408 or 429 status, a timeout, a refused or reset connection, a
    /// body cut short. Anything else (a missing or malformed file, a bad
    /// URL) is [`Permanent`](ErrorClass::Permanent).
    fn class(&self) -> ErrorClass {
        let transient = match self {
            CacheError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            CacheError::Stalled { .. } => true,
            CacheError::Http { source, .. } => {
                source.is_timeout()
                    || source.is_connect()
                    || source.is_request()
                    || source.is_body()
                    || source.is_decode()
            }
            _ => false,
        };
        if transient {
            ErrorClass::Transient
        } else {
            ErrorClass::Permanent
        }
    }
}

/// A stream of a file's bytes as they arrive.
pub type Body = Pin<Box<dyn AsyncRead + Send>>;

/// A file opened for reading, as the server sent it.
pub struct Opened {
    /// The bytes as they come off the wire.
    pub body: Body,
    /// The codings of its `Content-Encoding`, in the order the server
    /// applied them; empty for none (and always for `file://` caches).
    pub encoding: Vec<Compression>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("encoding", &self.encoding)
            .finish_non_exhaustive()
    }
}

impl Opened {
    /// The body with its `Content-Encoding` undone, after `wire` is put
    /// around the bytes as sent (to count or bound them). Decoder failures
    /// carry a [`StreamError::Decompress`] naming the coding.
    pub fn decoded<R>(self, wire: impl FnOnce(Body) -> R) -> Decompressed
    where
        R: AsyncRead + Send + 'static,
    {
        let mut body: Decompressed = Box::pin(wire(self.body));
        // The last coding applied is the first to undo.
        for &coding in self.encoding.iter().rev() {
            body = decompress(body, coding);
        }
        body
    }
}

/// A small file read whole.
#[derive(Debug)]
pub struct SmallFile {
    /// Its contents, `Content-Encoding` undone.
    pub data: Vec<u8>,
    /// Bytes received for it (before decoding), for the download counters.
    pub received: u64,
}

/// How to reach the cache's files.
#[derive(Debug)]
enum Location {
    Http {
        client: reqwest::Client,
        base: Url,
        read_timeout: Duration,
    },
    File {
        root: PathBuf,
    },
}

/// An opened binary cache whose `nix-cache-info` has been checked.
#[derive(Debug)]
pub struct BinaryCache {
    /// The URL as given (without a trailing `/`), for messages.
    url: String,
    location: Location,
    retry: RetryPolicy,
    priority: Option<u32>,
}

/// HTTP client settings shared by every cache of a run.
///
/// The read timeout counts only time spent waiting for the server: a
/// download the importer is not reading (because the store is busy) does
/// not time out, unlike reqwest's own `read_timeout`.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Time to establish a connection.
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response.
    pub read_timeout: Duration,
    /// CA certificates an `https://` cache's certificate may be signed by,
    /// beside the system's (`--ca-file`: a `lazystore serve --tls-cert`
    /// with a private CA).
    pub ca_certs: Option<CaCerts>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(20),
            read_timeout: Duration::from_secs(60),
            ca_certs: None,
        }
    }
}

/// Builds the HTTP client every cache of a run shares (one connection pool).
pub fn http_client(options: &HttpOptions) -> Result<reqwest::Client, reqwest::Error> {
    // reqwest is built without a bundled crypto provider; ring is ours.
    // Installing fails harmlessly when one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("lazystore/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(options.connect_timeout);
    if let Some(ca) = &options.ca_certs {
        // Parsed already when read (`CaCerts::from_pem_file`).
        for cert in reqwest::Certificate::from_pem_bundle(ca.pem())? {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build()
}

impl BinaryCache {
    /// Opens the cache at `url` and reads its `nix-cache-info`, which must
    /// exist and, if it names a `StoreDir`, name `/nix/store`.
    pub async fn open(
        url: &str,
        client: &reqwest::Client,
        http: &HttpOptions,
        retry: RetryPolicy,
    ) -> Result<BinaryCache, CacheError> {
        let trimmed = url.trim_end_matches('/');
        let parsed = Url::parse(trimmed).map_err(|source| CacheError::InvalidUrl {
            url: url.to_owned(),
            source,
        })?;
        let location = match parsed.scheme() {
            "http" | "https" => {
                // A base URL must end in '/' for `join` to append to it.
                let mut base = parsed.clone();
                base.set_path(&format!("{}/", parsed.path().trim_end_matches('/')));
                Location::Http {
                    client: client.clone(),
                    base,
                    read_timeout: http.read_timeout,
                }
            }
            "file" => Location::File {
                root: parsed
                    .to_file_path()
                    .map_err(|()| CacheError::UnsupportedScheme {
                        url: url.to_owned(),
                    })?,
            },
            _ => {
                return Err(CacheError::UnsupportedScheme {
                    url: url.to_owned(),
                });
            }
        };
        let mut cache = BinaryCache {
            url: trimmed.to_owned(),
            location,
            retry,
            priority: None,
        };
        let info = cache
            .read_small("nix-cache-info", MAX_CACHE_INFO_SIZE)
            .await?
            .ok_or_else(|| CacheError::NotACache {
                url: cache.url.clone(),
            })?;
        cache.priority = cache.check_cache_info(&info.data)?;
        Ok(cache)
    }

    /// Checks `nix-cache-info` and returns its `Priority`, if any.
    fn check_cache_info(&self, info: &[u8]) -> Result<Option<u32>, CacheError> {
        let malformed = || CacheError::MalformedCacheInfo {
            url: self.url.clone(),
        };
        let text = std::str::from_utf8(info).map_err(|_| malformed())?;
        let mut priority = None;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, value) = line.split_once(':').ok_or_else(malformed)?;
            let value = value.trim();
            match key.trim() {
                "StoreDir" if value != STORE_DIR => {
                    return Err(CacheError::WrongStoreDir {
                        url: self.url.clone(),
                        store_dir: value.to_owned(),
                    });
                }
                "Priority" => priority = value.parse().ok(),
                _ => {}
            }
        }
        Ok(priority)
    }

    /// The cache URL, as given without a trailing `/`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The `Priority` from `nix-cache-info` (lower is preferred by Nix).
    pub fn priority(&self) -> Option<u32> {
        self.priority
    }

    /// The URL of the file at `relative`, for messages.
    pub fn file_url(&self, relative: &str) -> String {
        format!("{}/{relative}", self.url)
    }

    /// Reads a small file whole, its `Content-Encoding` undone, retrying
    /// transient failures: `None` if the cache does not have it, an error
    /// if it is larger than `limit` decoded (or, compressed, larger than
    /// any compression of `limit` bytes would be).
    pub async fn read_small(
        &self,
        relative: &str,
        limit: usize,
    ) -> Result<Option<SmallFile>, CacheError> {
        self.retry
            .run(
                || async {
                    let Some(opened) = self.open_file(relative).await? else {
                        return Ok(None);
                    };
                    let received = Arc::new(AtomicU64::new(0));
                    // The bytes on the wire are bounded too: a body of
                    // padding that never decodes to anything must end.
                    let counter = received.clone();
                    let body = opened.decoded(|body| Counted::new(body, counter, limit as u64));
                    let mut data = Vec::new();
                    // One byte more than allowed shows an overlong file.
                    let read = body
                        .take(limit as u64 + 1)
                        .read_to_end(&mut data)
                        .await
                        .map_err(|e| self.body_error(relative, e, limit))?;
                    if read > limit {
                        return Err(CacheError::TooLarge {
                            url: self.file_url(relative),
                            limit,
                        });
                    }
                    Ok(Some(SmallFile {
                        data,
                        received: received.load(Ordering::Relaxed),
                    }))
                },
                |e, _, wait| tracing::debug!("retrying in {wait:?} after: {e}"),
            )
            .await
    }

    /// Turns an error out of a small file's body stream back into a
    /// `CacheError`.
    fn body_error(&self, relative: &str, e: std::io::Error, limit: usize) -> CacheError {
        match take_stream_error(e) {
            Ok(StreamError::Transport(transport)) => transport,
            Ok(StreamError::Decompress {
                compression,
                source,
            }) => CacheError::Decode {
                url: self.file_url(relative),
                encoding: compression,
                source,
            },
            Ok(StreamError::CompressedTooLong { .. } | StreamError::TooLong { .. }) => {
                CacheError::TooLarge {
                    url: self.file_url(relative),
                    limit,
                }
            }
            Err(source) => CacheError::File {
                path: self.file_path(relative).unwrap_or_else(|| relative.into()),
                source,
            },
        }
    }

    fn file_path(&self, relative: &str) -> Option<PathBuf> {
        match &self.location {
            Location::File { root } => Some(root.join(relative)),
            Location::Http { .. } => None,
        }
    }

    /// Opens the NAR file a narinfo's `URL` names, once (no retries: a
    /// stream that fails half-way must be started again by the caller).
    /// `None` if the cache does not have it. With `prefix`, an HTTP server
    /// is asked for the first `prefix` bytes only (a `Range` request); one
    /// that ignores the range sends the whole file, and the reader stops
    /// when it has enough. The body is as sent: its `Content-Encoding`
    /// (which cache.nixos.org never sets on NARs) is the caller's to undo,
    /// before the narinfo's `Compression`.
    pub async fn open_nar(
        &self,
        nar_url: &str,
        prefix: Option<u64>,
    ) -> Result<Option<Opened>, CacheError> {
        let bad = || CacheError::BadNarUrl {
            nar_url: nar_url.to_owned(),
            url: self.url.clone(),
        };
        // The URL is not covered by the signature, so it is held to a
        // relative path inside the cache: no absolute URLs, no `..`, no
        // `\` (a URL parser reads it as `/`, so `\\host\x` names another
        // host) and no `%` (`%2e%2e` is `..` once decoded).
        let relative = Path::new(nar_url);
        if nar_url.contains("://")
            || nar_url.contains(['?', '#', '\\', '%'])
            || nar_url.split('/').any(|s| s == "." || s == "..")
            || !relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(bad());
        }
        self.open_range(nar_url, prefix).await
    }

    /// Starts reading the file at `relative`, once.
    async fn open_file(&self, relative: &str) -> Result<Option<Opened>, CacheError> {
        self.open_range(relative, None).await
    }

    /// Starts reading the file at `relative` (over HTTP, its first `prefix`
    /// bytes if given), once.
    async fn open_range(
        &self,
        relative: &str,
        prefix: Option<u64>,
    ) -> Result<Option<Opened>, CacheError> {
        match &self.location {
            Location::File { root } => {
                let path = root.join(relative);
                match tokio::fs::File::open(&path).await {
                    Ok(file) => Ok(Some(Opened {
                        body: Box::pin(file),
                        encoding: Vec::new(),
                    })),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(CacheError::File { path, source }),
                }
            }
            Location::Http {
                client,
                base,
                read_timeout,
            } => {
                let bad = || CacheError::BadNarUrl {
                    nar_url: relative.to_owned(),
                    url: self.url.clone(),
                };
                let url = base.join(relative).map_err(|_| bad())?;
                // Whatever the checks above missed, the file must be under
                // the cache's own URL: same scheme, host and port, and a
                // path below the cache's.
                if url.origin() != base.origin() || !url.path().starts_with(base.path()) {
                    return Err(bad());
                }
                let shown = url.to_string();
                let stalled = |url: &str| CacheError::Stalled {
                    url: url.to_owned(),
                    after: *read_timeout,
                };
                let mut request = client.get(url);
                if let Some(n) = prefix.filter(|&n| n > 0) {
                    request = request.header(reqwest::header::RANGE, format!("bytes=0-{}", n - 1));
                }
                let response = tokio::time::timeout(*read_timeout, request.send())
                    .await
                    .map_err(|_| stalled(&shown))?
                    .map_err(|source| CacheError::Http {
                        url: shown.clone(),
                        source,
                    })?;
                let status = response.status();
                // S3 answers 403 for a missing key of a bucket that does
                // not allow listing; Nix counts both as not found.
                if status == StatusCode::NOT_FOUND
                    || status == StatusCode::FORBIDDEN
                    || status == StatusCode::GONE
                {
                    return Ok(None);
                }
                if !status.is_success() {
                    return Err(CacheError::Status { url: shown, status });
                }
                let encoding = content_encoding(response.headers(), &shown)?;
                let on_stall = stalled(&shown);
                let stream = response.bytes_stream().map_err(move |source| {
                    transport_error(CacheError::Http {
                        url: shown.clone(),
                        source,
                    })
                });
                let stream = IdleTimeout {
                    inner: stream,
                    timeout: *read_timeout,
                    sleep: None,
                    on_stall: Some(on_stall),
                };
                Ok(Some(Opened {
                    body: Box::pin(StreamReader::new(stream)),
                    encoding,
                }))
            }
        }
    }
}

/// The codings a response's `Content-Encoding` headers name, in the order
/// they were applied, `identity` left out.
fn content_encoding(
    headers: &reqwest::header::HeaderMap,
    url: &str,
) -> Result<Vec<Compression>, CacheError> {
    let mut codings = Vec::new();
    for value in headers.get_all(reqwest::header::CONTENT_ENCODING) {
        let unsupported = || CacheError::UnsupportedEncoding {
            url: url.to_owned(),
            encoding: String::from_utf8_lossy(value.as_bytes()).into_owned(),
        };
        let value = value.to_str().map_err(|_| unsupported())?;
        for coding in value.split(',') {
            match Compression::from_content_encoding(coding) {
                Some(Compression::None) => {}
                Some(compression) => codings.push(compression),
                None => return Err(unsupported()),
            }
        }
    }
    Ok(codings)
}

/// Fails a body stream that stays pending for `timeout`. Only time spent
/// waiting on the server counts; time between polls does not.
struct IdleTimeout<S> {
    inner: S,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    on_stall: Option<CacheError>,
}

impl<S, T> futures::Stream for IdleTimeout<S>
where
    S: futures::Stream<Item = std::io::Result<T>> + Unpin,
{
    type Item = std::io::Result<T>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(item) => {
                self.sleep = None;
                Poll::Ready(item)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                match self.on_stall.take() {
                    Some(error) => Poll::Ready(Some(Err(transport_error(error)))),
                    None => Poll::Ready(None),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder};
    use reqwest::header::{CONTENT_ENCODING, HeaderMap, HeaderValue};

    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(CONTENT_ENCODING, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn content_encodings_are_read_in_the_order_applied() {
        let url = "http://cache.test/x.ls";
        let read = |values: &[&str]| content_encoding(&headers(values), url).unwrap();
        assert!(read(&[]).is_empty());
        assert!(read(&["identity"]).is_empty());
        assert_eq!(read(&["br"]), [Compression::Brotli]);
        assert_eq!(
            read(&["gzip, ZSTD", "xz"]),
            [Compression::Gzip, Compression::Zstd, Compression::Xz]
        );
        let e = content_encoding(&headers(&["compress"]), url).unwrap_err();
        assert!(
            matches!(&e, CacheError::UnsupportedEncoding { url: u, encoding } if u == url && encoding == "compress"),
            "{e:?}"
        );
        assert!(e.to_string().contains(url), "{e}");
    }

    #[tokio::test]
    async fn opened_undoes_the_last_coding_first() {
        let plain = b"{\"version\":1}".repeat(50);
        let mut gzipped = Vec::new();
        GzipEncoder::new(&plain[..])
            .read_to_end(&mut gzipped)
            .await
            .unwrap();
        let mut both = Vec::new();
        BrotliEncoder::new(&gzipped[..])
            .read_to_end(&mut both)
            .await
            .unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let opened = Opened {
            body: Box::pin(std::io::Cursor::new(both.clone())),
            encoding: vec![Compression::Gzip, Compression::Brotli],
        };
        let mut out = Vec::new();
        opened
            .decoded(|body| Counted::new(body, counter, 1 << 20))
            .read_to_end(&mut out)
            .await
            .unwrap();
        assert_eq!(out, plain);
        assert_eq!(received.load(Ordering::Relaxed), both.len() as u64);

        // A body that is not what its coding says fails as that coding.
        let opened = Opened {
            body: Box::pin(std::io::Cursor::new(b"plain text".to_vec())),
            encoding: vec![Compression::Zstd],
        };
        let e = opened
            .decoded(|body| body)
            .read_to_end(&mut Vec::new())
            .await
            .unwrap_err();
        assert!(
            matches!(
                StreamError::find(&e),
                Some(StreamError::Decompress {
                    compression: Compression::Zstd,
                    ..
                })
            ),
            "{e:?}"
        );
    }
}
