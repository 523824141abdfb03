//! The one mapping between [`PathInfoError`] and `tonic::Status`, both ways.
//!
//! Server side, an error becomes a status with a fitting code, the error's
//! full message, and (for a refused put) metadata naming the variant and its
//! fields, with the keys and encoding of the castore's errors
//! ([`lazystore_castore::grpc::metadata`]). Client side, that metadata turns the status back
//! into the same variant, so a caller matches
//! [`PathInfoError::MissingRoot`] whether its store is local or remote.
//! Anything else becomes [`PathInfoError::Backend`] holding a
//! [`GrpcError`] that names the server.
//!
//! [`GrpcError`]: lazystore_castore::grpc::GrpcError

use lazystore_castore::grpc::CallError;
use lazystore_castore::grpc::metadata::{
    ACTUAL, DIGEST, ErrorStatus, RECORDED, STORE_PATH, bytes, field, kind,
};
use lazystore_castore::{Digest, error_chain};
use tonic::{Code, Status};

use crate::VerifyError;
use crate::pathinfos::{PathInfoDecodeError, PathInfoError};
use crate::store_path::{StorePath, StorePathHash};

// Values of KIND: the PathInfo service's variants.
const MISSING_ROOT: &str = "pathinfo-missing-root";
const ROOT_SIZE_MISMATCH: &str = "pathinfo-root-size-mismatch";
const UNTRUSTED: &str = "pathinfo-untrusted";
const NAR_MISMATCH: &str = "pathinfo-nar-mismatch";
const ALREADY_PUBLISHED: &str = "pathinfo-already-published";

// The PathInfo service's own fields.
/// How many signatures a refused PathInfo carried.
const SIGNATURES: &str = "lazystore-signatures";
/// A NarHash as claimed, or as published (32 bytes).
const NAR_HASH: &str = "lazystore-nar-hash-bin";
/// The NarHash of the tree as rendered (32 bytes).
const ACTUAL_NAR_HASH: &str = "lazystore-actual-nar-hash-bin";

impl From<PathInfoError> for Status {
    /// Codes: a put whose root data is missing or mis-sized, or whose
    /// tree does not render, `FAILED_PRECONDITION` (store the data first);
    /// one without a trusted signature `PERMISSION_DENIED`, whose tree is
    /// not its NarHash's `INVALID_ARGUMENT`, for a path published with
    /// another tree `ALREADY_EXISTS`; a path the upstream caches behind the
    /// store could not supply `NOT_FOUND`; a stored PathInfo that is
    /// invalid or damaged `DATA_LOSS`; a backend or internal failure
    /// `INTERNAL`.
    fn from(e: PathInfoError) -> Self {
        let code = match &e {
            PathInfoError::MissingRoot { .. }
            | PathInfoError::RootSizeMismatch { .. }
            | PathInfoError::BadTree { .. }
            | PathInfoError::Incomplete { .. } => Code::FailedPrecondition,
            PathInfoError::Untrusted(_) => Code::PermissionDenied,
            PathInfoError::NarMismatch { .. } => Code::InvalidArgument,
            PathInfoError::AlreadyPublished { .. } => Code::AlreadyExists,
            // To a client, a path the upstream caches could not supply is a
            // path this store does not have; the server logs why.
            PathInfoError::Upstream { .. } => Code::NotFound,
            PathInfoError::Invalid(_) | PathInfoError::Corrupt(_) => Code::DataLoss,
            PathInfoError::Backend(_) | PathInfoError::Internal(_) => Code::Internal,
        };
        let status = match &e {
            PathInfoError::MissingRoot { store_path, root } => {
                ErrorStatus::new(code, &e, Some(MISSING_ROOT))
                    .field(STORE_PATH, store_path)
                    .field(DIGEST, root)
            }
            PathInfoError::RootSizeMismatch {
                store_path,
                root,
                recorded,
                actual,
            } => ErrorStatus::new(code, &e, Some(ROOT_SIZE_MISMATCH))
                .field(STORE_PATH, store_path)
                .field(DIGEST, root)
                .field(RECORDED, recorded)
                .field(ACTUAL, actual),
            PathInfoError::Untrusted(verify) => {
                let (path, signatures) = match verify {
                    VerifyError::Unsigned { path } => (path, 0),
                    VerifyError::NoTrustedSignature { path, signatures } => (path, *signatures),
                };
                ErrorStatus::new(code, &e, Some(UNTRUSTED))
                    .field(STORE_PATH, path)
                    .field(SIGNATURES, signatures)
            }
            PathInfoError::NarMismatch {
                store_path,
                claimed,
                claimed_size,
                actual,
                actual_size,
            } => ErrorStatus::new(code, &e, Some(NAR_MISMATCH))
                .field(STORE_PATH, store_path)
                .bytes(NAR_HASH, &claimed[..])
                .field(RECORDED, claimed_size)
                .bytes(ACTUAL_NAR_HASH, &actual[..])
                .field(ACTUAL, actual_size),
            PathInfoError::AlreadyPublished {
                store_path,
                published,
            } => ErrorStatus::new(code, &e, Some(ALREADY_PUBLISHED))
                .field(STORE_PATH, store_path)
                .bytes(NAR_HASH, &published[..]),
            // The message (with its causes) says it all.
            PathInfoError::BadTree { .. }
            | PathInfoError::Incomplete { .. }
            | PathInfoError::Upstream { .. } => ErrorStatus::new(code, &e, None),
            PathInfoError::Invalid(_)
            | PathInfoError::Corrupt(_)
            | PathInfoError::Backend(_)
            | PathInfoError::Internal(_) => {
                tracing::warn!(error = %error_chain(&e), "PathInfo backend failed");
                ErrorStatus::new(code, &e, None)
            }
        };
        status.into_status()
    }
}

/// The 32-byte hash in the binary field `key`.
fn hash(m: &tonic::metadata::MetadataMap, key: &'static str) -> Option<[u8; 32]> {
    bytes(m, key)?.try_into().ok()
}

/// A PathInfo sent by a client that is not valid: `INVALID_ARGUMENT`.
pub(super) fn invalid_request(e: PathInfoDecodeError) -> Status {
    Status::invalid_argument(error_chain(&PathInfoError::Invalid(e)))
}

/// No PathInfo for `hash`: `NOT_FOUND`.
pub(super) fn not_found(hash: &StorePathHash) -> Status {
    Status::not_found(format!("no PathInfo for store path hash {hash}"))
}

/// Back to a [`PathInfoError`], for a call to `url`: the variant the
/// server reported, or `Backend` with a [`GrpcError`](lazystore_castore::grpc::GrpcError).
pub(super) fn into_pathinfo_error(e: CallError, url: &str) -> PathInfoError {
    if let Some(status) = e.rejection() {
        let m = status.metadata();
        let kind = kind(m);
        let rebuilt = (|| match kind? {
            MISSING_ROOT => Some(PathInfoError::MissingRoot {
                store_path: field::<StorePath>(m, STORE_PATH)?,
                root: field::<Digest>(m, DIGEST)?,
            }),
            ROOT_SIZE_MISMATCH => Some(PathInfoError::RootSizeMismatch {
                store_path: field::<StorePath>(m, STORE_PATH)?,
                root: field::<Digest>(m, DIGEST)?,
                recorded: field(m, RECORDED)?,
                actual: field(m, ACTUAL)?,
            }),
            UNTRUSTED => {
                let path = field::<StorePath>(m, STORE_PATH)?;
                Some(PathInfoError::Untrusted(match field(m, SIGNATURES)? {
                    0 => VerifyError::Unsigned { path },
                    signatures => VerifyError::NoTrustedSignature { path, signatures },
                }))
            }
            NAR_MISMATCH => Some(PathInfoError::NarMismatch {
                store_path: field::<StorePath>(m, STORE_PATH)?,
                claimed: Box::new(hash(m, NAR_HASH)?),
                claimed_size: field(m, RECORDED)?,
                actual: Box::new(hash(m, ACTUAL_NAR_HASH)?),
                actual_size: field(m, ACTUAL)?,
            }),
            ALREADY_PUBLISHED => Some(PathInfoError::AlreadyPublished {
                store_path: field::<StorePath>(m, STORE_PATH)?,
                published: Box::new(hash(m, NAR_HASH)?),
            }),
            _ => None,
        })();
        if let Some(e) = rebuilt {
            return e;
        }
    }
    PathInfoError::Backend(Box::new(e.into_grpc_error(url)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazystore_castore::grpc::AttemptError;
    use lazystore_castore::{ErrorClass, Retryable};

    fn back(e: PathInfoError) -> PathInfoError {
        let status = Status::from(e);
        let e = CallError::not_retried("Put", AttemptError::Status(status));
        into_pathinfo_error(e, "grpc+http://test")
    }

    #[test]
    fn errors_survive_the_wire() {
        let store_path: StorePath = "00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60"
            .parse()
            .unwrap();
        let root = Digest::of(b"root");
        assert!(matches!(
            back(PathInfoError::MissingRoot { store_path: store_path.clone(), root }),
            PathInfoError::MissingRoot { store_path: s, root: r } if s == store_path && r == root
        ));
        assert!(matches!(
            back(PathInfoError::RootSizeMismatch {
                store_path: store_path.clone(),
                root,
                recorded: 3,
                actual: 4
            }),
            PathInfoError::RootSizeMismatch {
                recorded: 3,
                actual: 4,
                ..
            }
        ));
        for refused in [
            PathInfoError::Untrusted(VerifyError::Unsigned {
                path: store_path.clone(),
            }),
            PathInfoError::Untrusted(VerifyError::NoTrustedSignature {
                path: store_path.clone(),
                signatures: 2,
            }),
            PathInfoError::NarMismatch {
                store_path: store_path.clone(),
                claimed: Box::new([1; 32]),
                claimed_size: 100,
                actual: Box::new([2; 32]),
                actual_size: 101,
            },
            PathInfoError::AlreadyPublished {
                store_path: store_path.clone(),
                published: Box::new([3; 32]),
            },
        ] {
            let message = refused.to_string();
            let rebuilt = back(refused);
            assert_eq!(rebuilt.to_string(), message);
            assert_eq!(rebuilt.class(), ErrorClass::Permanent);
        }
        let e = back(PathInfoError::Backend("disk on fire".into()));
        let PathInfoError::Backend(inner) = &e else {
            panic!("{e}")
        };
        let msg = inner.to_string();
        assert!(
            msg.contains("grpc+http://test") && msg.contains("disk on fire"),
            "{msg}"
        );
    }
}
