//! `GET /nar/…`: a NAR rendered from the chunk store as it streams:
//! uncompressed, whole or one byte range, from its layout (seeking, reading
//! ahead); zstd-compressed, rendered in order and compressed on the way.

use async_compression::Level;
use async_compression::tokio::write::ZstdEncoder;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt as _;
use lazystore_castore::error_chain;
use lazystore_pathinfo::render::{render_nar, stream_range};
use tokio::io::AsyncWriteExt;

use crate::body::streamed;
use crate::error::HttpError;
use crate::narinfo::{NarCompression, parse_nar_name};
use crate::range::{self, Ranged};
use crate::server::HttpCache;

/// `GET|HEAD /nar/<hash>-<narhash>.nar[.zst]`.
pub async fn get_nar(
    State(cache): State<HttpCache>,
    method: Method,
    Path(file): Path<String>,
    request_headers: HeaderMap,
) -> Result<Response, HttpError> {
    let url = format!("/nar/{file}");
    let name = parse_nar_name(&file)
        .ok_or_else(|| HttpError::NotFound(format!("{url}: no such NAR in this cache")))?;
    let info = cache.path_info_by_hash(&name.path_hash, &url).await?;
    if info.nar_sha256 != name.nar_sha256 {
        return Err(HttpError::NotFound(format!(
            "{url}: {} has other contents now; fetch its narinfo again",
            info.store_path
        )));
    }
    let store = cache.inner.store.clone();
    let what = format!("rendering the NAR of {}", info.store_path);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-nix-nar"),
    );
    let head = method == Method::HEAD;
    // The layout is walked (or found) before any status is sent, for HEAD
    // too, so that a tree that does not make a NAR of NarSize bytes, or a
    // missing directory, is a 500 to HEAD and GET alike, not a broken
    // response. Whole NARs are served from it too: read ahead on every
    // core, without copies.
    let layout = cache
        .inner
        .layouts
        .get(info.nar_sha256, &*store.directories, &info.root)
        .await
        .map_err(|e| {
            HttpError::internal(format!("laying out the NAR of {}", info.store_path), e)
        })?;
    if layout.size() != info.nar_size {
        return Err(HttpError::internal(
            format!("laying out the NAR of {}", info.store_path),
            format!(
                "its tree makes a NAR of {} bytes, its PathInfo says {}",
                layout.size(),
                info.nar_size
            ),
        ));
    }

    if name.zstd {
        let level = match cache.inner.options.compression {
            NarCompression::Zstd { level } => level,
            NarCompression::None => 3,
        };
        if head {
            return Ok((headers, Body::empty()).into_response());
        }
        let body = streamed(what, move |writer| async move {
            let encoder = ZstdEncoder::with_quality(writer, Level::Precise(level));
            let mut encoder =
                render_nar(&store.blobs, &*store.directories, &info.root, encoder).await?;
            encoder.shutdown().await?;
            Ok(())
        });
        return Ok((headers, body).into_response());
    }

    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let size = info.nar_size;
    let wanted = range::parse(
        request_headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok()),
        size,
    );
    let part = match wanted {
        Ranged::Whole => None,
        Ranged::Unsatisfiable => return Err(HttpError::RangeNotSatisfiable { size }),
        Ranged::Part(part) => Some(part),
    };
    let status = match &part {
        None => StatusCode::OK,
        Some(part) => {
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {}-{}/{size}", part.start, part.end - 1))
                    .expect("ASCII"),
            );
            StatusCode::PARTIAL_CONTENT
        }
    };
    let part = part.unwrap_or(0..size);
    headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(part.end - part.start),
    );
    if head {
        return Ok((status, headers, Body::empty()).into_response());
    }
    let pieces = stream_range(store.blobs.clone(), layout, part)
        .map_err(|e| HttpError::internal(what.clone(), e))?
        .map_err(move |e| {
            let text = format!("{what}: {}", error_chain(&e));
            tracing::error!(target: "lazystore::http", "{text}");
            std::io::Error::other(text)
        });
    Ok((status, headers, Body::from_stream(pieces)).into_response())
}
