//! [`CallCounts`]: the calls a server answered, by method and outcome —
//! what its metrics report as requests by kind and status.
//!
//! A gRPC call's status travels in the response headers when it fails
//! before any message (a trailers-only response) and in the trailers
//! otherwise, so the count is taken when the status is seen: from the
//! headers, or from the trailers as the body ends. A body dropped before
//! its trailers (the client went away) counts as `Cancelled`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::extract::State;
use axum::middleware::Next;
use http_body::Frame;
use tonic::Code;
use tonic::codegen::http::{HeaderMap, Request};

/// Calls answered, by `(method path, status code)`.
#[derive(Debug, Default)]
pub struct CallCounts {
    // A std Mutex: one map operation per call end.
    counts: Mutex<HashMap<(String, Code), u64>>,
}

impl CallCounts {
    fn add(&self, method: &str, code: Code) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry((method.to_owned(), code)).or_default() += 1;
    }

    /// Every `(method path, status code, calls)` so far, sorted.
    pub fn snapshot(&self) -> Vec<(String, Code, u64)> {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = counts
            .iter()
            .map(|((m, c), n)| (m.clone(), *c, *n))
            .collect();
        all.sort_by(|a, b| (&a.0, a.1 as i32).cmp(&(&b.0, b.1 as i32)));
        all
    }
}

fn status(headers: &HeaderMap) -> Option<Code> {
    let value = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(Code::from_i32(value))
}

/// The middleware counting each call when its status is known.
pub(crate) async fn count(
    State(counts): State<Arc<CallCounts>>,
    request: Request<axum::body::Body>,
    next: Next,
) -> axum::response::Response {
    let method = request.uri().path().to_owned();
    let response = next.run(request).await;
    // Only the methods served are labels of their own: a client cannot
    // grow the map (and the metrics) by calling made-up ones.
    let method = match status(response.headers()) {
        Some(Code::Unimplemented) => "other".to_owned(),
        _ => method,
    };
    if let Some(code) = status(response.headers()) {
        counts.add(&method, code);
        return response;
    }
    let (parts, body) = response.into_parts();
    let body = Counted {
        inner: body,
        counts,
        method: Some(method),
    };
    axum::response::Response::from_parts(parts, axum::body::Body::new(body))
}

/// A response body that counts its call when its trailers pass (or when
/// dropped without them).
struct Counted {
    inner: axum::body::Body,
    counts: Arc<CallCounts>,
    /// Until counted.
    method: Option<String>,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
            && let Some(method) = self.method.take()
        {
            let code = status(trailers).unwrap_or(Code::Unknown);
            self.counts.add(&method, code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(method) = self.method.take() {
            self.counts.add(&method, Code::Cancelled);
        }
    }
}
