//! The token check in front of every route: what each request needs
//! ([`Need`]), the token it presents (`Authorization: Bearer TOKEN`, or
//! Basic auth with the token as password, which is what Nix sends from a
//! netrc file), and the refusal: 401 with `WWW-Authenticate` when no token
//! was sent, 403 when a token was sent that does not allow the request.
//! The tokens and their comparison are the castore's
//! ([`lazystore_castore::auth`]), shared with the gRPC server.
//!
//! `GET /nix-cache-info` stays open: it tells nothing about the store's
//! contents, and Nix asks for it before anything else; when it is refused,
//! Nix takes the cache for an empty one and tries to write it.

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use lazystore_castore::auth::{Denied, Need, bearer, credentials};

use crate::error::HttpError;
use crate::server::HttpCache;

/// What a request of `method` on `path` needs: GET and HEAD read (but
/// `nix-cache-info`, which needs nothing); anything else writes, so a
/// method added later is guarded until someone decides otherwise.
pub(crate) fn need(method: &Method, path: &str) -> Need {
    if *method != Method::GET && *method != Method::HEAD {
        Need::Write
    } else if path == "/nix-cache-info" {
        Need::Nothing
    } else {
        Need::Read
    }
}

/// The token in an `Authorization` header value: a bearer token, or the
/// password of Basic auth (the user name is not checked). Anything else
/// presents an empty token, which no token file holds.
fn presented(value: &[u8]) -> Vec<u8> {
    if let Some(token) = bearer(value) {
        return token.to_vec();
    }
    let Some(encoded) = credentials(value, "Basic") else {
        return Vec::new();
    };
    let Ok(decoded) = BASE64.decode(encoded) else {
        return Vec::new();
    };
    match decoded.iter().position(|&b| b == b':') {
        Some(colon) => decoded[colon + 1..].to_vec(),
        None => Vec::new(),
    }
}

/// Lets a request through if it presents the token it needs.
pub(crate) async fn authorize(
    State(cache): State<HttpCache>,
    request: Request,
    next: Next,
) -> Response {
    let need = need(request.method(), request.uri().path());
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| presented(v.as_bytes()));
    match cache.inner.options.access.check(need, token.as_deref()) {
        Ok(()) => next.run(request).await,
        Err(Denied::Missing { kind }) => HttpError::Unauthorized(format!(
            "{}: this cache needs a {kind} token: send Authorization: Bearer TOKEN, or Basic auth \
             with the token as password (for Nix, a netrc file: netrc-file = FILE, with machine \
             HOST password TOKEN)",
            request.uri().path()
        ))
        .into_response(),
        Err(Denied::Wrong { kind }) => HttpError::Forbidden(format!(
            "{}: the token sent is not a {kind} token of this cache (one of the server's \
             --{kind}-token-file)",
            request.uri().path()
        ))
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_as_bearer_or_basic_passwords() {
        assert_eq!(presented(b"Bearer abc"), b"abc");
        assert_eq!(presented(b"bearer  abc "), b"abc");
        // "nix:s3cr:et": the password is everything after the first colon.
        let basic = format!("Basic {}", BASE64.encode("nix:s3cr:et"));
        assert_eq!(presented(basic.as_bytes()), b"s3cr:et");
        assert_eq!(presented(b"Basic !!!"), b"");
        assert_eq!(presented(b"Digest abc"), b"");
        assert_eq!(presented(b""), b"");
    }

    #[test]
    fn requests_are_classed() {
        assert_eq!(need(&Method::GET, "/nix-cache-info"), Need::Nothing);
        assert_eq!(need(&Method::HEAD, "/nix-cache-info"), Need::Nothing);
        assert_eq!(need(&Method::GET, "/abc.narinfo"), Need::Read);
        assert_eq!(need(&Method::HEAD, "/nar/x.nar"), Need::Read);
        assert_eq!(need(&Method::GET, "/abc.ls"), Need::Read);
        assert_eq!(need(&Method::PUT, "/abc.narinfo"), Need::Write);
        assert_eq!(need(&Method::PUT, "/nix-cache-info"), Need::Write);
        assert_eq!(need(&Method::DELETE, "/abc.narinfo"), Need::Write);
        assert_eq!(need(&Method::POST, "/"), Need::Write);
    }
}
