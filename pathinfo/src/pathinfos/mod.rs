//! PathInfos: what each store path is — its root node in the castore plus
//! the metadata of its narinfo — keyed by the 20-byte hash of the store path.
//!
//! [`PathInfoService`] is what a backend implements. A PathInfo is published
//! last, after everything its root node reaches is stored, and it is the
//! only thing that makes a store path visible; so a reader that finds one can
//! rely on its data being present.

mod facts;
pub mod grpc;
mod memory;
mod redb;
mod s3;
pub mod uses;

use async_trait::async_trait;
use futures::stream::BoxStream;
use lazystore_castore::{Digest, ErrorClass, Node, Retryable, ValidateError};

use crate::NarInfo;
use crate::nixbase32;
use crate::proto;
use crate::signature::{PublicKey, Signature, SignatureError, VerifyError, fingerprint, verify};
use crate::store_path::{StorePath, StorePathError, StorePathHash};

pub use self::facts::Facts;
pub use self::grpc::{GrpcPathInfoService, PathInfoServer};
pub use self::redb::RedbPathInfoService;
pub use self::s3::S3PathInfoService;
pub use self::uses::{PathUses, UsedPathInfos};
pub use memory::MemoryPathInfoService;

/// A store path in the store: its root node and its narinfo metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    /// The store path.
    pub store_path: StorePath,
    /// The tree, in the castore.
    pub root: Node,
    /// Store paths it refers to, sorted.
    pub references: Vec<StorePath>,
    /// Length of its NAR.
    pub nar_size: u64,
    /// SHA-256 of its NAR.
    pub nar_sha256: [u8; 32],
    /// Signatures over [`PathInfo::fingerprint`], kept from upstream.
    pub signatures: Vec<Signature>,
    /// The derivation that built it, when known.
    pub deriver: Option<StorePath>,
    /// Its content address, when it has one.
    pub ca: Option<String>,
}

impl PathInfo {
    /// The PathInfo `narinfo` describes, its NAR stored under `root`
    /// (references sorted; the narinfo's URL, compression and file hash
    /// belong to the cache it came from and are not kept).
    pub fn from_narinfo(narinfo: NarInfo, root: Node) -> PathInfo {
        PathInfo::from_facts(Facts::from(narinfo), root)
    }

    /// The PathInfo of `facts`, its NAR stored under `root`.
    pub fn from_facts(facts: Facts, root: Node) -> PathInfo {
        PathInfo {
            store_path: facts.store_path,
            root,
            references: facts.references,
            nar_size: facts.nar_size,
            nar_sha256: facts.nar_sha256,
            signatures: facts.signatures,
            deriver: facts.deriver,
            ca: facts.ca,
        }
    }

    /// The text Nix signatures sign for this path.
    pub fn fingerprint(&self) -> String {
        fingerprint(
            &self.store_path,
            &self.nar_sha256,
            self.nar_size,
            &self.references,
        )
    }

    /// Checks that at least one signature is by one of `trusted` and valid
    /// for [`PathInfo::fingerprint`], and returns the first such signature.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<&Signature, VerifyError> {
        verify(
            &self.store_path,
            &self.fingerprint(),
            &self.signatures,
            trusted,
        )
    }
}

/// Why a wire PathInfo is invalid.
#[derive(Debug, thiserror::Error)]
pub enum PathInfoDecodeError {
    /// The store path, a reference or the deriver is not a store path.
    #[error("invalid store path {path:?}")]
    StorePath {
        /// The offending value.
        path: String,
        /// The rule it breaks.
        #[source]
        source: StorePathError,
    },
    /// The root node is missing or invalid.
    #[error("invalid root node")]
    Root(#[source] ValidateError),
    /// NarHash is not 32 bytes.
    #[error("NarHash has {0} bytes, not 32")]
    NarHashLength(usize),
    /// NarSize is zero.
    #[error("NarSize is 0")]
    EmptyNar,
    /// A signature is malformed.
    #[error("invalid signature")]
    Signature(#[source] SignatureError),
}

fn store_path(path: &str) -> Result<StorePath, PathInfoDecodeError> {
    StorePath::from_basename(path).map_err(|source| PathInfoDecodeError::StorePath {
        path: path.to_owned(),
        source,
    })
}

impl TryFrom<proto::PathInfo> for PathInfo {
    type Error = PathInfoDecodeError;
    fn try_from(wire: proto::PathInfo) -> Result<Self, Self::Error> {
        let facts = Facts::try_from(&wire)?;
        let root = wire
            .root
            .ok_or(PathInfoDecodeError::Root(ValidateError::EmptyNode))?;
        Ok(PathInfo::from_facts(
            facts,
            Node::try_from(root).map_err(PathInfoDecodeError::Root)?,
        ))
    }
}

impl From<&PathInfo> for proto::PathInfo {
    fn from(info: &PathInfo) -> Self {
        proto::PathInfo {
            store_path: info.store_path.to_string(),
            root: Some((&info.root).into()),
            references: info.references.iter().map(ToString::to_string).collect(),
            nar_size: info.nar_size,
            nar_sha256: bytes::Bytes::copy_from_slice(&info.nar_sha256),
            signatures: info.signatures.iter().map(ToString::to_string).collect(),
            deriver: info
                .deriver
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            ca: info.ca.clone().unwrap_or_default(),
        }
    }
}

/// What can go wrong storing or reading PathInfos.
#[derive(Debug, thiserror::Error)]
pub enum PathInfoError {
    /// Stored or received data is not a valid PathInfo.
    #[error("invalid PathInfo")]
    Invalid(#[from] PathInfoDecodeError),
    /// A put whose root node's data is not in the store. Refused so that a
    /// published path never points at missing data.
    #[error(
        "refusing to publish {store_path}: its root {root} is not in the store; store its data first"
    )]
    MissingRoot {
        /// The path being published.
        store_path: StorePath,
        /// The root directory or file blob.
        root: Digest,
    },
    /// A put whose root node records another size than the stored data has.
    #[error(
        "refusing to publish {store_path}: its root {root} records size {recorded}, the stored one has {actual}"
    )]
    RootSizeMismatch {
        /// The path being published.
        store_path: StorePath,
        /// The root directory or file blob.
        root: Digest,
        /// Size in the root node (bytes of a file, entries of a directory).
        recorded: u64,
        /// Size of the stored data.
        actual: u64,
    },
    /// A put refused by the publishing policy of a server given trusted
    /// keys ([`Publisher`](crate::publish::Publisher)): no signature by a
    /// trusted key.
    #[error("refusing to publish: {0}")]
    Untrusted(#[source] VerifyError),
    /// A put whose tree does not render to the NarHash and NarSize it
    /// claims (and its signature signs): the tree is not the one signed.
    #[error(
        "refusing to publish {store_path}: its tree renders to a NAR of {actual_size} bytes with \
         NarHash sha256:{}, the PathInfo says {claimed_size} bytes and sha256:{}",
        nixbase32::encode(&.actual[..]),
        nixbase32::encode(&.claimed[..])
    )]
    NarMismatch {
        /// The path being published.
        store_path: StorePath,
        /// NarHash of the PathInfo.
        claimed: Box<[u8; 32]>,
        /// NarSize of the PathInfo.
        claimed_size: u64,
        /// SHA-256 of the tree's NAR.
        actual: Box<[u8; 32]>,
        /// Length of the tree's NAR.
        actual_size: u64,
    },
    /// A put whose tree does not render: data below its root is missing
    /// or does not match its entries.
    #[error("refusing to publish {store_path}: its tree does not render")]
    BadTree {
        /// The path being published.
        store_path: StorePath,
        /// What rendering it met.
        #[source]
        source: Box<crate::render::RenderError>,
    },
    /// A put whose tree lacks data below its root, found by a server that
    /// checks trees whole (one collected while it serves).
    #[error(
        "refusing to publish {store_path}: {missing} (dropped by a garbage collection during a \
         long upload, or never sent); upload the path again"
    )]
    Incomplete {
        /// The path being published.
        store_path: StorePath,
        /// The first thing found missing.
        missing: crate::Missing,
    },
    /// A put for a path already published with another tree: a server
    /// replaces a published path only when asked to explicitly.
    #[error(
        "refusing to publish {store_path}: it is already published with another tree \
         (NarHash sha256:{}); nothing was replaced",
        nixbase32::encode(&.published[..])
    )]
    AlreadyPublished {
        /// The path being published.
        store_path: StorePath,
        /// NarHash of the published PathInfo.
        published: Box<[u8; 32]>,
    },
    /// A path the store lacked could not be had from the upstream caches
    /// behind it (a pull-through store): missing there, or what they sent
    /// did not check. Not remembered: the next lookup asks again.
    #[error("cannot pull {path} from the upstream caches")]
    Upstream {
        /// The path, as asked for.
        path: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The storage backend, or the way to it, failed: a database or I/O
    /// error, a remote store's [`GrpcError`](lazystore_castore::grpc::GrpcError),
    /// or the castore's error while checking a put. Such failures may heal;
    /// see the [`Retryable`] impl for how the others are classed.
    #[error("PathInfo store backend failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored record is damaged: it does not decode, or it is filed
    /// under another path's hash.
    #[error("PathInfo store holds a damaged record")]
    Corrupt(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// This process failed, not the store: a task panicked or was
    /// cancelled. Retrying would meet the same broken state.
    #[error("PathInfo store failed internally")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Retryable for PathInfoError {
    /// Backend failures are classed by their source
    /// ([`ErrorClass::of_backend`]: a gRPC outcome or a castore error says
    /// how, anything else is transient); invalid or damaged records are
    /// corrupt; a refused put or an internal failure permanent.
    fn class(&self) -> ErrorClass {
        match self {
            PathInfoError::Backend(source) => ErrorClass::of_backend(&**source),
            PathInfoError::Invalid(_) | PathInfoError::Corrupt(_) => ErrorClass::Corrupt,
            PathInfoError::MissingRoot { .. }
            | PathInfoError::RootSizeMismatch { .. }
            | PathInfoError::Untrusted(_)
            | PathInfoError::NarMismatch { .. }
            | PathInfoError::BadTree { .. }
            | PathInfoError::Incomplete { .. }
            | PathInfoError::AlreadyPublished { .. }
            | PathInfoError::Upstream { .. }
            | PathInfoError::Internal(_) => ErrorClass::Permanent,
        }
    }
}

/// A PathInfo store backend.
#[async_trait]
pub trait PathInfoService: Send + Sync {
    /// The PathInfo of the store path whose hash is `hash`, or `None`. Must
    /// return exactly what the last [`put`](PathInfoService::put) for that
    /// path stored, or an error if the stored record does not decode: never
    /// a PathInfo that was not put.
    async fn get(&self, hash: &StorePathHash) -> Result<Option<PathInfo>, PathInfoError>;

    /// Publishes a PathInfo, replacing any earlier one for the same path.
    /// Callers must have stored everything its root node reaches first (a
    /// backend that can see the castore, like the gRPC server, refuses the
    /// put with [`PathInfoError::MissingRoot`] otherwise). Once it returns,
    /// the PathInfo must be as durable as the backend is.
    async fn put(&self, info: PathInfo) -> Result<(), PathInfoError>;

    /// What the store knows of the path whose hash is `hash` without its
    /// contents: a published path's facts, or — for a store with upstream
    /// caches behind it — what a checked upstream narinfo says, with no
    /// NAR downloaded. `None` where [`get`](PathInfoService::get) would
    /// find nothing.
    async fn facts(&self, hash: &StorePathHash) -> Result<Option<Facts>, PathInfoError> {
        Ok(self.get(hash).await?.map(Facts::from))
    }

    /// The published PathInfo of `hash` only: never one a layer pulls from
    /// elsewhere to answer. Default: [`get`](PathInfoService::get).
    async fn get_published(&self, hash: &StorePathHash) -> Result<Option<PathInfo>, PathInfoError> {
        self.get(hash).await
    }

    /// The JSON listing of the NAR of a path this service could get but
    /// has not published (a pull-through store's upstream `.ls`), so a
    /// client can show its tree first; `None` when there is none.
    async fn listing(&self, _hash: &StorePathHash) -> Result<Option<Vec<u8>>, PathInfoError> {
        Ok(None)
    }

    /// Every PathInfo, in no particular order. Must yield each published
    /// path once, as [`get`](PathInfoService::get) would return it.
    fn list(&self) -> BoxStream<'static, Result<PathInfo, PathInfoError>>;

    /// Unpublishes the path whose hash is `hash`; whether it was published.
    /// Its data stays in the castore (other paths may share it) until a
    /// garbage collection.
    async fn delete(&self, hash: &StorePathHash) -> Result<bool, PathInfoError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use lazystore_castore::Digest;

    fn sample() -> PathInfo {
        let sp = |s: &str| StorePath::from_basename(s).unwrap();
        PathInfo {
            store_path: sp("00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432"),
            root: Node::File { digest: Digest::of(b"x"), size: 1, executable: true },
            references: vec![sp("00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432")],
            nar_size: 120,
            nar_sha256: [7; 32],
            signatures: vec![
                "cache.nixos.org-1:Wz9mDGZpAAKpW8BEyqH+QjuLGxh6LEfKP3hNxhGOK1kcaCIz4zQNHJRnTlVmeq+tqMtHBEd2OBLj4rVhvwJ1BQ=="
                    .parse()
                    .unwrap(),
            ],
            deriver: Some(sp("1bgd045z0d4icpbc2yyz4gx48ak44lab-x.drv")),
            ca: Some("fixed:r:sha256:1b9fbdyiw53nv3jnagiz5vk0qb2b1hz6gzl2fsl2ib2q6ybjmlz0".into()),
        }
    }

    #[test]
    fn wire_round_trip() {
        let info = sample();
        let wire = proto::PathInfo::from(&info);
        assert_eq!(PathInfo::try_from(wire.clone()).unwrap(), info);
        let mut bad = wire.clone();
        bad.nar_sha256 = bytes::Bytes::from_static(&[0; 31]);
        assert!(matches!(
            PathInfo::try_from(bad),
            Err(PathInfoDecodeError::NarHashLength(31))
        ));
        let mut bad = wire.clone();
        bad.root = None;
        assert!(matches!(
            PathInfo::try_from(bad),
            Err(PathInfoDecodeError::Root(_))
        ));
        let mut bad = wire;
        bad.references.push("not-a-store-path".into());
        assert!(matches!(
            PathInfo::try_from(bad),
            Err(PathInfoDecodeError::StorePath { .. })
        ));
    }

    #[tokio::test]
    async fn memory_get_put_list() {
        let svc = MemoryPathInfoService::new();
        let info = sample();
        assert!(svc.get(&info.store_path.hash()).await.unwrap().is_none());
        svc.put(info.clone()).await.unwrap();
        assert_eq!(
            svc.get(&info.store_path.hash()).await.unwrap(),
            Some(info.clone())
        );
        assert_eq!(
            svc.list().try_collect::<Vec<_>>().await.unwrap(),
            vec![info]
        );
    }
}
