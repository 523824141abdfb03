//! The one mapping between the store's errors and `tonic::Status`, both
//! ways.
//!
//! Server side, [`BlobError`], [`DirectoryError`] and [`BadMessage`] become a
//! status with a fitting code, the error's full message, and metadata naming
//! the variant and its digests (`lazystore-error`, `lazystore-digest`, …).
//! Client side, that metadata turns the status back into the same variant,
//! so a caller matches `BlobError::ChunkNotFound` or
//! `DirectoryError::MissingChild` whether its backend is local or remote.
//! Anything else becomes a [`GrpcError`] naming the server.

use std::error::Error;
use std::fmt::Write as _;
use std::time::Duration;

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use super::blob_server::UploadTooLarge;
use super::call::{CallError, Failure};
use super::metadata::{
    self, ACTUAL, CHILD, DIGEST, ErrorStatus, PARENT, REASON, RECORDED, field, kind,
};
use super::wire::BadMessage;
use crate::blobs::BlobError;
use crate::digest::Digest;
use crate::directories::DirectoryError;
use crate::error_chain;
use crate::nodes::DecodeDirectoryError;
use crate::retry::{ErrorClass, Retryable};

/// A failed gRPC call that the store's own error variants don't describe.
/// Found as the source of `BlobError::Backend` / `DirectoryError::Backend`.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// The server refused the call, for a reason retrying would not change.
    #[error("gRPC store {url}: {call} failed: {code:?}: {message}")]
    Rejected {
        /// The server.
        url: String,
        /// The RPC.
        call: &'static str,
        /// The status code.
        code: Code,
        /// The status message, with its transport-level causes.
        message: String,
    },
    /// The server stayed unreachable (or kept dropping the call) until the
    /// retry deadline passed.
    #[error(
        "gRPC store {url}: {call} still failing after {attempts} attempts in {elapsed:.1?} \
         (is the server running?): {code:?}: {message}"
    )]
    GaveUp {
        /// The server.
        url: String,
        /// The RPC.
        call: &'static str,
        /// Attempts made.
        attempts: u32,
        /// Time from the first attempt to giving up.
        elapsed: Duration,
        /// Code of the last failure.
        code: Code,
        /// Message of the last failure, with its causes.
        message: String,
    },
    /// The server's answer broke the protocol.
    #[error("gRPC store {url}: {call}: invalid answer from the server: {reason}")]
    BadReply {
        /// The server.
        url: String,
        /// The RPC.
        call: &'static str,
        /// What is wrong with the answer.
        reason: String,
    },
}

impl GrpcError {
    /// The status code of the failure, if the server sent one.
    pub fn code(&self) -> Option<Code> {
        match self {
            GrpcError::Rejected { code, .. } | GrpcError::GaveUp { code, .. } => Some(*code),
            GrpcError::BadReply { .. } => None,
        }
    }
}

impl Retryable for GrpcError {
    /// How a store call that failed over gRPC is retried by the caller,
    /// above the client's own retries:
    ///
    /// - [`GaveUp`](GrpcError::GaveUp) is permanent. The client already
    ///   retried it up to its [`RetryPolicy`](crate::RetryPolicy)'s
    ///   deadline; retrying again would make a reader wait one deadline per
    ///   layer. Give the client the deadline the reader should wait.
    /// - [`BadReply`](GrpcError::BadReply), and a rejection with
    ///   `DATA_LOSS` (the server found its own copy damaged), are corrupt:
    ///   asked again, the server (or a source behind it) may answer right.
    /// - A rejection with a transient code only comes from a stream broken
    ///   off part way, which the client does not resume itself: transient,
    ///   so the caller starts it again.
    /// - Any other rejection is the server's final word: permanent.
    fn class(&self) -> ErrorClass {
        match self {
            GrpcError::GaveUp { .. } => ErrorClass::Permanent,
            GrpcError::BadReply { .. }
            | GrpcError::Rejected {
                code: Code::DataLoss,
                ..
            } => ErrorClass::Corrupt,
            GrpcError::Rejected {
                code: Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded,
                ..
            } => ErrorClass::Transient,
            GrpcError::Rejected { .. } => ErrorClass::Permanent,
        }
    }
}

// Values of KIND: the castore's variants.
const BLOB_NOT_FOUND: &str = "blob-not-found";
const CHUNK_NOT_FOUND: &str = "chunk-not-found";
const CHUNK_CORRUPT: &str = "chunk-corrupt";
const CHUNK_DECOMPRESS: &str = "chunk-decompress";
const BAD_CHUNK_LIST: &str = "bad-chunk-list";
const DIRECTORY_NOT_FOUND: &str = "directory-not-found";
const MISSING_CHILD: &str = "missing-child";
const SIZE_MISMATCH: &str = "size-mismatch";

/// The reasons `BlobError::Corrupt` and `BadChunkList` are made with, so a
/// received one maps back to the same `&'static str`.
const KNOWN_REASONS: &[&str] = &[
    "claims more than the largest chunk",
    "wrong length",
    "BLAKE3 mismatch",
    "backend sent another chunk",
    "remote sent another chunk",
    "chunk size out of range",
    "size overflows",
    "chunk sizes do not add up",
];

impl From<BlobError> for Status {
    /// Codes: unknown blob or chunk `NOT_FOUND`; an uploaded chunk or chunk
    /// list that fails its checks `INVALID_ARGUMENT` (the server produces
    /// these only while checking uploads); a backend failure, a wrong
    /// answer from the server's own backend or an internal failure
    /// `INTERNAL`.
    fn from(e: BlobError) -> Self {
        let b = match &e {
            BlobError::BlobNotFound(d) => {
                ErrorStatus::new(Code::NotFound, &e, Some(BLOB_NOT_FOUND)).field(DIGEST, d)
            }
            BlobError::ChunkNotFound(d) => {
                ErrorStatus::new(Code::NotFound, &e, Some(CHUNK_NOT_FOUND)).field(DIGEST, d)
            }
            BlobError::Corrupt { chunk, reason } => {
                ErrorStatus::new(Code::InvalidArgument, &e, Some(CHUNK_CORRUPT))
                    .field(DIGEST, chunk)
                    .field(REASON, reason)
            }
            BlobError::Decompress { chunk, .. } => {
                ErrorStatus::new(Code::InvalidArgument, &e, Some(CHUNK_DECOMPRESS))
                    .field(DIGEST, chunk)
            }
            BlobError::BadChunkList { blob, reason } => {
                ErrorStatus::new(Code::InvalidArgument, &e, Some(BAD_CHUNK_LIST))
                    .field(DIGEST, blob)
                    .field(REASON, reason)
            }
            BlobError::OutOfRange { .. } => ErrorStatus::new(Code::OutOfRange, &e, None),
            BlobError::BlobMismatch { .. } => ErrorStatus::new(Code::DataLoss, &e, None),
            BlobError::Backend(_) | BlobError::BadAnswer(_) | BlobError::Internal(_) => {
                ErrorStatus::new(Code::Internal, &e, None)
            }
        };
        if matches!(
            e,
            BlobError::Backend(_) | BlobError::BadAnswer(_) | BlobError::Internal(_)
        ) {
            tracing::warn!(error = %error_chain(&e), "blob backend failed");
        }
        b.into_status()
    }
}

impl From<DirectoryError> for Status {
    /// Codes: unknown directory `NOT_FOUND`; a put whose subdirectories are
    /// missing or mis-sized `FAILED_PRECONDITION` (put leaves first); an
    /// invalid directory `INVALID_ARGUMENT`, but stored bytes that don't
    /// decode or hash right, or a damaged stored record, `DATA_LOSS`; a
    /// backend or internal failure `INTERNAL`.
    fn from(e: DirectoryError) -> Self {
        let b = match &e {
            DirectoryError::NotFound(d) => {
                ErrorStatus::new(Code::NotFound, &e, Some(DIRECTORY_NOT_FOUND)).field(DIGEST, d)
            }
            DirectoryError::MissingChild {
                parent,
                child,
                digest,
            } => ErrorStatus::new(Code::FailedPrecondition, &e, Some(MISSING_CHILD))
                .field(PARENT, parent)
                .field(DIGEST, digest)
                .bytes(CHILD, child.as_bytes()),
            DirectoryError::SizeMismatch {
                parent,
                child,
                recorded,
                actual,
            } => ErrorStatus::new(Code::FailedPrecondition, &e, Some(SIZE_MISMATCH))
                .field(PARENT, parent)
                .field(RECORDED, recorded)
                .field(ACTUAL, actual)
                .bytes(CHILD, child.as_bytes()),
            DirectoryError::Invalid(DecodeDirectoryError::Invalid { .. }) => {
                ErrorStatus::new(Code::InvalidArgument, &e, None)
            }
            DirectoryError::Invalid(_) | DirectoryError::Corrupt(_) => {
                ErrorStatus::new(Code::DataLoss, &e, None)
            }
            DirectoryError::Backend(_) | DirectoryError::Internal(_) => {
                ErrorStatus::new(Code::Internal, &e, None)
            }
        };
        if matches!(
            e,
            DirectoryError::Backend(_)
                | DirectoryError::Corrupt(_)
                | DirectoryError::Internal(_)
                | DirectoryError::Invalid(
                    DecodeDirectoryError::Decode { .. } | DecodeDirectoryError::Mismatch { .. }
                )
        ) {
            tracing::warn!(error = %error_chain(&e), "directory backend failed");
        }
        b.into_status()
    }
}

impl From<UploadTooLarge> for Status {
    /// A `Put` over the server's upload limit: `RESOURCE_EXHAUSTED`.
    fn from(e: UploadTooLarge) -> Self {
        tracing::warn!("refused: {e}");
        ErrorStatus::new(Code::ResourceExhausted, &e, None).into_status()
    }
}

impl From<BadMessage> for Status {
    /// A request that breaks the protocol: `INVALID_ARGUMENT`.
    fn from(e: BadMessage) -> Self {
        ErrorStatus::new(Code::InvalidArgument, &e, None).into_status()
    }
}

fn child(m: &MetadataMap) -> Option<String> {
    Some(String::from_utf8_lossy(&metadata::bytes(m, CHILD)?).into_owned())
}

fn reason(m: &MetadataMap) -> &'static str {
    let got = m.get(REASON).and_then(|v| v.to_str().ok());
    KNOWN_REASONS
        .iter()
        .find(|r| Some(**r) == got)
        .copied()
        .unwrap_or("reported by the server")
}

/// A status's message followed by its transport-level causes.
fn message(status: &Status) -> String {
    let mut out = status.message().to_string();
    let mut source = status.source();
    while let Some(e) = source {
        let _ = write!(out, ": {e}");
        source = e.source();
    }
    out
}

/// The message of `status`, with a hint when TLS explains a failure to
/// connect: an untrusted certificate, or cleartext and TLS meeting. Only
/// for the codes a broken connection comes as: a status the server sent
/// says what it means.
fn with_tls_hint(url: &str, status: &Status) -> String {
    let text = message(status);
    let connection = matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Internal
    );
    match crate::tls::hint(&text, url.starts_with("grpc+https://")) {
        Some(hint) if connection => format!("{text} ({hint})"),
        _ => text,
    }
}

impl CallError {
    /// The failure as the client side sees it, for a call to `url`: what a
    /// client reports when the error is none of its service's own.
    pub fn into_grpc_error(self, url: &str) -> GrpcError {
        let url = url.to_string();
        let call = self.call;
        match self.failure {
            Failure::Rejected(status) => GrpcError::Rejected {
                code: status.code(),
                message: with_tls_hint(&url, &status),
                url,
                call,
            },
            Failure::GaveUp {
                attempts,
                elapsed,
                last,
            } => GrpcError::GaveUp {
                code: last.code(),
                message: with_tls_hint(&url, &last),
                url,
                call,
                attempts,
                elapsed,
            },
            Failure::BadReply(b) => GrpcError::BadReply {
                url,
                call,
                reason: b.to_string(),
            },
        }
    }

    /// Back to a [`BlobError`]: the variant the server reported, or
    /// `Backend` with a [`GrpcError`].
    pub(crate) fn into_blob_error(self, url: &str) -> BlobError {
        if let Failure::Rejected(status) = &self.failure {
            let m = status.metadata();
            let rebuilt = match (kind(m), field::<Digest>(m, DIGEST)) {
                (Some(BLOB_NOT_FOUND), Some(d)) => Some(BlobError::BlobNotFound(d)),
                (Some(CHUNK_NOT_FOUND), Some(d)) => Some(BlobError::ChunkNotFound(d)),
                (Some(CHUNK_CORRUPT), Some(chunk)) => Some(BlobError::Corrupt {
                    chunk,
                    reason: reason(m),
                }),
                (Some(CHUNK_DECOMPRESS), Some(chunk)) => Some(BlobError::Decompress {
                    chunk,
                    source: std::io::Error::other(message(status)),
                }),
                (Some(BAD_CHUNK_LIST), Some(blob)) => Some(BlobError::BadChunkList {
                    blob,
                    reason: reason(m),
                }),
                _ => None,
            };
            if let Some(e) = rebuilt {
                return e;
            }
        }
        BlobError::Backend(Box::new(self.into_grpc_error(url)))
    }

    /// Back to a [`DirectoryError`]: the variant the server reported, or
    /// `Backend` with a [`GrpcError`].
    pub(crate) fn into_directory_error(self, url: &str) -> DirectoryError {
        if let Failure::Rejected(status) = &self.failure {
            let m = status.metadata();
            let rebuilt = match kind(m) {
                Some(DIRECTORY_NOT_FOUND) => {
                    field::<Digest>(m, DIGEST).map(DirectoryError::NotFound)
                }
                Some(MISSING_CHILD) => (|| {
                    Some(DirectoryError::MissingChild {
                        parent: field::<Digest>(m, PARENT)?,
                        child: child(m)?,
                        digest: field::<Digest>(m, DIGEST)?,
                    })
                })(),
                Some(SIZE_MISMATCH) => (|| {
                    Some(DirectoryError::SizeMismatch {
                        parent: field::<Digest>(m, PARENT)?,
                        child: child(m)?,
                        recorded: field::<u64>(m, RECORDED)?,
                        actual: field::<u64>(m, ACTUAL)?,
                    })
                })(),
                _ => None,
            };
            if let Some(e) = rebuilt {
                return e;
            }
        }
        DirectoryError::Backend(Box::new(self.into_grpc_error(url)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn back_blob(e: BlobError) -> BlobError {
        CallError {
            call: "Test",
            failure: Failure::Rejected(Status::from(e)),
        }
        .into_blob_error("grpc+http://test")
    }

    fn back_dir(e: DirectoryError) -> DirectoryError {
        CallError {
            call: "Test",
            failure: Failure::Rejected(Status::from(e)),
        }
        .into_directory_error("grpc+http://test")
    }

    #[test]
    fn blob_errors_survive_the_wire() {
        let d = Digest::of(b"x");
        assert!(
            matches!(back_blob(BlobError::BlobNotFound(d)), BlobError::BlobNotFound(x) if x == d)
        );
        assert!(
            matches!(back_blob(BlobError::ChunkNotFound(d)), BlobError::ChunkNotFound(x) if x == d)
        );
        assert!(matches!(
            back_blob(BlobError::Corrupt { chunk: d, reason: "BLAKE3 mismatch" }),
            BlobError::Corrupt { chunk, reason: "BLAKE3 mismatch" } if chunk == d
        ));
        assert!(matches!(
            back_blob(BlobError::BadChunkList { blob: d, reason: "chunk sizes do not add up" }),
            BlobError::BadChunkList { blob, reason: "chunk sizes do not add up" } if blob == d
        ));
        let e = back_blob(BlobError::Backend("disk on fire".into()));
        let BlobError::Backend(inner) = &e else {
            panic!("{e}")
        };
        let msg = inner.to_string();
        assert!(
            msg.contains("grpc+http://test") && msg.contains("disk on fire"),
            "{msg}"
        );
    }

    #[test]
    fn directory_errors_survive_the_wire() {
        let (p, c) = (Digest::of(b"p"), Digest::of(b"c"));
        assert!(
            matches!(back_dir(DirectoryError::NotFound(p)), DirectoryError::NotFound(x) if x == p)
        );
        assert!(matches!(
            back_dir(DirectoryError::MissingChild { parent: p, child: "süb".into(), digest: c }),
            DirectoryError::MissingChild { parent, child, digest } if parent == p && child == "süb" && digest == c
        ));
        assert!(matches!(
            back_dir(DirectoryError::SizeMismatch {
                parent: p,
                child: "s".into(),
                recorded: 3,
                actual: 4
            }),
            DirectoryError::SizeMismatch {
                recorded: 3,
                actual: 4,
                ..
            }
        ));
    }

    #[test]
    fn new_variants_get_fitting_codes() {
        let internal = || Box::new(std::io::Error::other("task panicked"));
        assert_eq!(
            Status::from(BlobError::Internal(internal())).code(),
            Code::Internal
        );
        assert_eq!(
            Status::from(BlobError::BadAnswer(Box::new(
                crate::blobs::WrongChunkCount { asked: 2, got: 1 }
            )))
            .code(),
            Code::Internal
        );
        assert_eq!(
            Status::from(DirectoryError::Internal(internal())).code(),
            Code::Internal
        );
        assert_eq!(
            Status::from(DirectoryError::Corrupt(internal())).code(),
            Code::DataLoss
        );
    }

    fn rejected(code: Code) -> GrpcError {
        GrpcError::Rejected {
            url: "grpc+http://test".into(),
            call: "Test",
            code,
            message: String::new(),
        }
    }

    #[test]
    fn grpc_errors_are_classed_by_outcome() {
        let gave_up = GrpcError::GaveUp {
            url: "grpc+http://test".into(),
            call: "Test",
            attempts: 9,
            elapsed: Duration::from_secs(30),
            code: Code::Unavailable,
            message: String::new(),
        };
        // Already retried to the client's deadline: not again above it.
        assert_eq!(gave_up.class(), ErrorClass::Permanent);
        let bad_reply = GrpcError::BadReply {
            url: "grpc+http://test".into(),
            call: "Test",
            reason: "wrong digest".into(),
        };
        assert_eq!(bad_reply.class(), ErrorClass::Corrupt);
        assert_eq!(rejected(Code::DataLoss).class(), ErrorClass::Corrupt);
        assert_eq!(rejected(Code::Unavailable).class(), ErrorClass::Transient);
        assert_eq!(rejected(Code::NotFound).class(), ErrorClass::Permanent);
        assert_eq!(rejected(Code::Internal).class(), ErrorClass::Permanent);

        // Inside a store error's Backend, the gRPC outcome decides.
        let blob = |e: GrpcError| BlobError::Backend(Box::new(e));
        assert_eq!(blob(gave_up).class(), ErrorClass::Permanent);
        assert_eq!(blob(rejected(Code::DataLoss)).class(), ErrorClass::Corrupt);
        let dir = DirectoryError::Backend(Box::new(bad_reply));
        assert_eq!(dir.class(), ErrorClass::Corrupt);
    }

    #[test]
    fn store_errors_are_classed_honestly() {
        let io = || Box::new(std::io::Error::other("disk unplugged"));
        assert_eq!(BlobError::Backend(io()).class(), ErrorClass::Transient);
        assert_eq!(BlobError::Internal(io()).class(), ErrorClass::Permanent);
        let wrong = crate::blobs::WrongChunkCount { asked: 2, got: 1 };
        assert_eq!(
            BlobError::BadAnswer(Box::new(wrong)).class(),
            ErrorClass::Corrupt
        );
        let d = Digest::of(b"x");
        assert_eq!(
            BlobError::Corrupt {
                chunk: d,
                reason: "BLAKE3 mismatch"
            }
            .class(),
            ErrorClass::Corrupt
        );
        assert_eq!(BlobError::ChunkNotFound(d).class(), ErrorClass::Permanent);
        assert_eq!(DirectoryError::Backend(io()).class(), ErrorClass::Transient);
        assert_eq!(
            DirectoryError::Internal(io()).class(),
            ErrorClass::Permanent
        );
        assert_eq!(DirectoryError::Corrupt(io()).class(), ErrorClass::Corrupt);
        assert_eq!(DirectoryError::NotFound(d).class(), ErrorClass::Permanent);
        // A store error wrapped by another store's backend keeps its class.
        let nested = DirectoryError::Backend(Box::new(BlobError::Internal(io())));
        assert_eq!(nested.class(), ErrorClass::Permanent);
    }

    #[test]
    fn every_corrupt_reason_survives_the_wire() {
        for reason in ["backend sent another chunk", "remote sent another chunk"] {
            let d = Digest::of(b"x");
            assert!(matches!(
                back_blob(BlobError::Corrupt { chunk: d, reason }),
                BlobError::Corrupt { reason: r, .. } if r == reason
            ));
        }
    }
}
