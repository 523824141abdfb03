//! Uploads, as `nix copy --to http://…` sends them: each NAR first
//! (`PUT /nar/<filehash>.nar[.xz|.zst|…]`), then its narinfo
//! (`PUT /<hash>.narinfo`).
//!
//! A NAR is decompressed and ingested into the castore while it arrives,
//! and its root node, NarHash and NarSize are *staged* under its URL. When
//! the narinfo arrives, the staged NAR it names (by URL, or else by
//! NarHash) must have the narinfo's NarHash and NarSize, and every
//! reference must already be a path here; only then is the PathInfo
//! published (through the server's [`Publisher`], which checks signatures
//! when it has trusted keys), and the NAR unstaged. A narinfo refused leaves the NAR
//! staged, so it can be sent again once (say) its references are uploaded.
//! Until then the ingested data is unreferenced: a narinfo that never
//! comes publishes nothing, and staged entries are forgotten after
//! [`STAGED_FOR`] or beyond [`MAX_STAGED`].
//!
//! [`Publisher`]: lazystore_pathinfo::publish::Publisher
//!
//! Every upload needs a write token (checked in front of every route, in
//! `auth`); without uploads allowed, every `PUT` is 403.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt as _;
use lazystore_castore::Node;
use lazystore_castore::error_chain;
use lazystore_pathinfo::decompress::{Decompressed, decompress};
use lazystore_pathinfo::ingest::{IngestError, ingest_nar};
use lazystore_pathinfo::pathinfos::{PathInfo, PathInfoError};
use lazystore_pathinfo::publish::{Proof, Replace};
use lazystore_pathinfo::{Compression, MAX_NARINFO_SIZE, NarInfo, StorePath, nixbase32};
use tokio::io::AsyncRead;
use tokio_util::io::StreamReader;

use crate::error::HttpError;
use crate::server::HttpCache;

/// How long an ingested NAR waits for its narinfo.
pub const STAGED_FOR: Duration = Duration::from_secs(3600);

/// NARs waiting for their narinfo, at most; the oldest is forgotten first.
pub const MAX_STAGED: usize = 4096;

/// An ingested NAR waiting for its narinfo.
#[derive(Clone, Debug)]
struct Staged {
    root: Node,
    nar_size: u64,
    nar_sha256: [u8; 32],
    at: Instant,
}

/// Ingested NARs by upload URL (`nar/…`).
#[derive(Default)]
pub struct Staging {
    /// A mutex, not an async lock: held only to insert or take, never
    /// across an await.
    entries: Mutex<HashMap<String, Staged>>,
}

impl Staging {
    fn insert(&self, url: String, staged: Staged) {
        let mut entries = self.entries.lock().expect("no panics while held");
        entries.retain(|_, s| s.at.elapsed() < STAGED_FOR);
        while entries.len() >= MAX_STAGED {
            let oldest = entries
                .iter()
                .min_by_key(|(_, s)| s.at)
                .map(|(url, _)| url.clone())
                .expect("not empty");
            entries.remove(&oldest);
        }
        entries.insert(url, staged);
    }

    /// The NAR staged under `url`, or else one with `nar_sha256`, with the
    /// URL it is staged under; one staged longer than [`STAGED_FOR`] ago
    /// is forgotten, not found. It stays staged: a narinfo refused (say for
    /// a reference not uploaded yet) can be sent again.
    fn find(&self, url: &str, nar_sha256: &[u8; 32]) -> Option<(String, Staged)> {
        let mut entries = self.entries.lock().expect("no panics while held");
        entries.retain(|_, s| s.at.elapsed() < STAGED_FOR);
        if let Some(staged) = entries.get(url) {
            return Some((url.to_owned(), staged.clone()));
        }
        entries
            .iter()
            .find(|(_, s)| s.nar_sha256 == *nar_sha256)
            .map(|(url, s)| (url.clone(), s.clone()))
    }

    /// Forgets the NAR staged under `url`, once it is published, if it is
    /// still the one published (not replaced by a later upload).
    fn remove(&self, url: &str, published: &Staged) {
        let mut entries = self.entries.lock().expect("no panics while held");
        if entries.get(url).is_some_and(|s| s.at == published.at) {
            entries.remove(url);
        }
    }
}

/// Refuses uploads unless the cache takes them. Who may upload (the
/// token) was checked in front of every route (`auth`).
fn uploads_allowed(cache: &HttpCache) -> Result<(), HttpError> {
    if cache.inner.options.allow_upload {
        Ok(())
    } else {
        Err(HttpError::Forbidden(
            "uploads are disabled on this cache (start lazystore serve with --allow-upload \
             --write-token-file FILE)"
                .to_owned(),
        ))
    }
}

/// The request body as a reader, failing with [`TooLarge`] past `limit`
/// bytes.
fn body_reader(body: Body, limit: u64) -> impl AsyncRead + Send + Unpin + 'static {
    Limited::new(
        StreamReader::new(body.into_data_stream().map_err(io::Error::other)),
        limit,
    )
}

/// An upload longer than the cache takes: as the error of a [`Limited`]
/// reader, found again in the ingestion's error chain.
#[derive(Debug, thiserror::Error)]
#[error("the upload is longer than {0} bytes")]
struct TooLarge(u64);

/// A reader that fails with [`TooLarge`] once more than `left` bytes came
/// through: unlike `take`, which would end the NAR early and make an
/// oversized upload look like a truncated one.
struct Limited<R> {
    inner: R,
    limit: u64,
    left: u64,
}

impl<R> Limited<R> {
    fn new(inner: R, limit: u64) -> Self {
        Limited {
            inner,
            limit,
            left: limit,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Limited<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = (buf.filled().len() - before) as u64;
        match this.left.checked_sub(read) {
            Some(left) => this.left = left,
            None => return std::task::Poll::Ready(Err(io::Error::other(TooLarge(this.limit)))),
        }
        std::task::Poll::Ready(Ok(()))
    }
}

/// Whether `e`'s chain holds a [`TooLarge`].
fn too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<TooLarge>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.get_ref().is_some_and(|inner| inner.is::<TooLarge>())
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// The decompressed NAR of an upload to `nar/<file>`, by the file's
/// extension, as Nix names them; the upload and the NAR each fail past
/// `limit` bytes (a small compressed upload may decompress to a huge NAR).
fn decompressed(file: &str, body: Body, limit: u64) -> Result<Decompressed, HttpError> {
    let Some((_, extension)) = file.split_once(".nar") else {
        return Err(HttpError::BadRequest(format!(
            "/nar/{file}: expected a NAR file name (…​.nar, .nar.xz, .nar.zst, .nar.bz2, .nar.br, \
             .nar.gz)"
        )));
    };
    Compression::from_nar_extension(extension)
        .and_then(|compression| decompress(body_reader(body, limit), compression))
        .map(|nar| -> Decompressed { Box::pin(Limited::new(nar, limit)) })
        .ok_or_else(|| {
            HttpError::Unsupported(format!(
                "/nar/{file}: cannot decompress {extension:?} uploads; upload with \
                 ?compression=none, xz, zstd, bzip2, br or gzip"
            ))
        })
}

/// `PUT /nar/<file>`: ingest the NAR and stage it for its narinfo.
pub async fn put_nar(
    State(cache): State<HttpCache>,
    Path(file): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    uploads_allowed(&cache)?;
    let url = format!("nar/{file}");
    let limit = cache.inner.options.max_upload_size;
    let refuse = || {
        HttpError::TooLarge(format!(
            "/{url}: uploads are limited to {limit} bytes (lazystore serve --max-upload-size); \
             nothing was staged"
        ))
    };
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|length| length > limit) {
        return Err(refuse());
    }
    let nar = decompressed(&file, body, limit)?;
    let store = &cache.inner.store;
    let ingested = ingest_nar(&store.blobs, &*store.directories, nar)
        .await
        .map_err(|e| match e {
            e if too_large(&e) => refuse(),
            IngestError::Blob(_) | IngestError::Directory(_) => {
                HttpError::internal(format!("storing the upload /{url}"), e)
            }
            other => {
                HttpError::BadRequest(format!("/{url}: not a valid NAR: {}", error_chain(&other)))
            }
        })?;
    tracing::info!(
        target: "lazystore::http",
        url = %url,
        nar_size = ingested.nar_size,
        nar_hash = %nixbase32::encode(&ingested.nar_sha256),
        "NAR ingested, waiting for its narinfo"
    );
    cache.inner.staging.insert(
        url,
        Staged {
            root: ingested.root,
            nar_size: ingested.nar_size,
            nar_sha256: ingested.nar_sha256,
            at: Instant::now(),
        },
    );
    Ok(StatusCode::OK.into_response())
}

/// `PUT /<hash>.narinfo` publishes the staged NAR it names;
/// `PUT /<hash>.ls` is accepted and dropped (listings are made from the
/// tree).
pub async fn put_top(
    State(cache): State<HttpCache>,
    Path(file): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    uploads_allowed(&cache)?;
    let url = format!("/{file}");
    if file.ends_with(".ls") {
        return Ok(StatusCode::OK.into_response());
    }
    let Some(hash) = file.strip_suffix(".narinfo") else {
        return Err(HttpError::NotFound(format!(
            "{url}: only NARs (/nar/…) and narinfos can be uploaded"
        )));
    };
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING)
        && encoding.as_bytes() != b"identity"
    {
        return Err(HttpError::Unsupported(format!(
            "{url}: compressed narinfos are not accepted; upload without narinfo-compression"
        )));
    }
    let hash = StorePath::parse_hash(hash)
        .map_err(|e| HttpError::BadRequest(format!("{url}: not a store path hash ({e})")))?;
    let text = read_bounded(body, MAX_NARINFO_SIZE, &url).await?;
    let text = String::from_utf8(text)
        .map_err(|_| HttpError::BadRequest(format!("{url}: the narinfo is not UTF-8")))?;
    let narinfo = NarInfo::parse(&text).map_err(|e| {
        HttpError::BadRequest(format!("{url}: invalid narinfo: {}", error_chain(&e)))
    })?;
    if narinfo.store_path.hash() != hash {
        return Err(HttpError::BadRequest(format!(
            "{url}: the narinfo is for {}, whose hash is not the file's name",
            narinfo.store_path
        )));
    }
    let (staged_url, staged) = cache
        .inner
        .staging
        .find(&narinfo.url, &narinfo.nar_hash)
        .ok_or_else(|| {
            HttpError::Conflict(format!(
                "{url}: no NAR was uploaded for {} (expected PUT /{} first)",
                narinfo.store_path, narinfo.url
            ))
        })?;
    if staged.nar_sha256 != narinfo.nar_hash || staged.nar_size != narinfo.nar_size {
        return Err(HttpError::Conflict(format!(
            "{url}: the uploaded NAR /{} has NarHash sha256:{} and NarSize {}, the narinfo \
             says sha256:{} and {}; nothing was published",
            narinfo.url,
            nixbase32::encode(&staged.nar_sha256),
            staged.nar_size,
            nixbase32::encode(&narinfo.nar_hash),
            narinfo.nar_size
        )));
    }
    for reference in &narinfo.references {
        if *reference == narinfo.store_path {
            continue;
        }
        let present = cache
            .inner
            .store
            .path_infos
            .get(&reference.hash())
            .await
            .map_err(|e| HttpError::internal(format!("looking up {reference}"), e))?
            .is_some();
        if !present {
            return Err(HttpError::Conflict(format!(
                "{url}: {} refers to {reference}, which is not in this cache; upload it first",
                narinfo.store_path
            )));
        }
    }
    let info = PathInfo {
        store_path: narinfo.store_path.clone(),
        root: staged.root.clone(),
        references: {
            let mut references = narinfo.references.clone();
            references.sort();
            references
        },
        nar_size: narinfo.nar_size,
        nar_sha256: narinfo.nar_hash,
        signatures: narinfo.signatures.clone(),
        deriver: narinfo.deriver.clone(),
        ca: narinfo.ca.clone(),
    };
    cache
        .inner
        .publisher
        .publish(info, Proof::Ingested, Replace::No)
        .await
        .map_err(|e| publish_error(&url, e))?;
    cache.inner.staging.remove(&staged_url, &staged);
    tracing::info!(target: "lazystore::http", path = %narinfo.store_path, "published an uploaded path");
    Ok(StatusCode::OK.into_response())
}

/// A narinfo the publisher refused or failed to publish, as an answer:
/// refusals are the client's to fix (403 unsigned, 409 another tree), the
/// rest the server's.
fn publish_error(url: &str, e: PathInfoError) -> HttpError {
    match e {
        PathInfoError::Untrusted(_) => HttpError::Forbidden(format!("{url}: {}", error_chain(&e))),
        PathInfoError::AlreadyPublished { .. }
        | PathInfoError::NarMismatch { .. }
        | PathInfoError::MissingRoot { .. }
        | PathInfoError::RootSizeMismatch { .. }
        | PathInfoError::BadTree { .. } => {
            HttpError::Conflict(format!("{url}: {}", error_chain(&e)))
        }
        e => HttpError::internal(format!("publishing {url}"), e),
    }
}

/// The whole body, refused past `limit` bytes.
async fn read_bounded(body: Body, limit: usize, url: &str) -> Result<Vec<u8>, HttpError> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(|e| HttpError::BadRequest(format!("{url}: reading the upload: {e}")))?
    {
        if out.len() + chunk.len() > limit {
            return Err(HttpError::TooLarge(format!(
                "{url}: larger than {limit} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_nars_expire_and_stay_until_published() {
        let staging = Staging::default();
        let staged = |at: Instant, n: u8| Staged {
            root: Node::File {
                digest: lazystore_castore::Digest::from(blake3::hash(&[n])),
                size: 0,
                executable: false,
            },
            nar_size: 1,
            nar_sha256: [n; 32],
            at,
        };
        let Some(long_ago) = Instant::now().checked_sub(STAGED_FOR + Duration::from_secs(1)) else {
            return; // an uptime shorter than STAGED_FOR: nothing to test
        };
        staging.insert("nar/old.nar".to_owned(), staged(long_ago, 1));
        assert!(staging.find("nar/old.nar", &[1; 32]).is_none());
        assert!(staging.find("nar/other.nar", &[1; 32]).is_none());

        let new = staged(Instant::now(), 2);
        staging.insert("nar/new.nar".to_owned(), new.clone());
        for _ in 0..2 {
            let (url, _) = staging.find("nar/x.nar", &[2; 32]).unwrap();
            assert_eq!(url, "nar/new.nar");
        }
        staging.remove("nar/new.nar", &new);
        assert!(staging.find("nar/new.nar", &[2; 32]).is_none());
    }
}
