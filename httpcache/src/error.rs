//! [`HttpError`]: every way a request fails, and the one place each becomes
//! an HTTP status and a plain-text body naming what was asked for.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use lazystore_castore::error_chain;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No such path, NAR or file here.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed (a narinfo that does not parse, a URL that
    /// names no store path).
    #[error("{0}")]
    BadRequest(String),
    /// A request without a token, while it needs one; the message says
    /// which and how to send it.
    #[error("{0}")]
    Unauthorized(String),
    /// A request refused: uploads disabled, or a token that does not allow
    /// it.
    #[error("{0}")]
    Forbidden(String),
    /// An upload that does not fit what is stored or staged (a narinfo
    /// without its NAR, a NarHash that does not match).
    #[error("{0}")]
    Conflict(String),
    /// A body or encoding this server does not take.
    #[error("{0}")]
    Unsupported(String),
    /// An upload larger than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// The upstream caches behind this one failed or sent what does not
    /// check (a pull-through store).
    #[error("{0}")]
    BadGateway(String),
    /// A Range that does not overlap the NAR.
    #[error("range not satisfiable: the NAR has {size} bytes")]
    RangeNotSatisfiable {
        /// NarSize, for the `Content-Range: bytes */SIZE` reply.
        size: u64,
    },
    /// The store failed; the message names what was being read or written.
    #[error("{context}: {source}")]
    Internal {
        /// What was being done, naming the path.
        context: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl HttpError {
    /// An internal error while doing `context`.
    pub fn internal(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> HttpError {
        HttpError::Internal {
            context: context.into(),
            source: source.into(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            HttpError::NotFound(_) => StatusCode::NOT_FOUND,
            HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HttpError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            HttpError::Forbidden(_) => StatusCode::FORBIDDEN,
            HttpError::Conflict(_) => StatusCode::CONFLICT,
            HttpError::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            HttpError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            HttpError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            HttpError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status();
        let text = match &self {
            // The Internal message already holds its source; chain the rest.
            HttpError::Internal { context, source } => {
                format!("{context}: {}", error_chain(&**source))
            }
            other => other.to_string(),
        };
        if status.is_server_error() {
            tracing::error!(target: "lazystore::http", "{text}");
        }
        let mut response = (status, format!("{text}\n")).into_response();
        let headers = response.headers_mut();
        match self {
            HttpError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"lazystore\""),
                );
            }
            HttpError::RangeNotSatisfiable { size } => {
                headers.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{size}")).expect("ASCII"),
                );
            }
            _ => {}
        }
        response
    }
}
