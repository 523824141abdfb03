//! Directories: stored by the digest of their canonical encoding.
//!
//! [`DirectoryService`] is what a backend implements. Every backend checks a
//! directory against its digest on every get, and refuses a put whose
//! subdirectories are not stored yet, so directories are uploaded leaves
//! first and a stored directory never points at a missing one.

mod cache;
mod grpc;
mod memory;
pub(crate) mod redb;
mod s3;

use async_trait::async_trait;

use crate::digest::Digest;
use crate::nodes::{DecodeDirectoryError, Directory};
use crate::retry::{ErrorClass, Retryable};

pub use self::cache::CachingDirectoryService;
pub use self::grpc::GrpcDirectoryService;
pub use self::redb::RedbDirectoryService;
pub use self::s3::S3DirectoryService;
pub use memory::MemoryDirectoryService;

/// What can go wrong storing or reading directories.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// Stored or received bytes are not the directory asked for.
    #[error(transparent)]
    Invalid(#[from] DecodeDirectoryError),
    /// A put names a subdirectory that is not stored.
    #[error(
        "directory {parent}: subdirectory {child:?} ({digest}) is not stored; put leaves first"
    )]
    MissingChild {
        /// The directory being put.
        parent: Digest,
        /// The entry name.
        child: String,
        /// The missing directory.
        digest: Digest,
    },
    /// A put records a subdirectory size that differs from the stored one.
    #[error("directory {parent}: subdirectory {child:?} has size {actual}, entry says {recorded}")]
    SizeMismatch {
        /// The directory being put.
        parent: Digest,
        /// The entry name.
        child: String,
        /// Size in the entry.
        recorded: u64,
        /// Size of the stored subdirectory.
        actual: u64,
    },
    /// A recursive get found a directory missing below the root.
    #[error("directory {0} not found")]
    NotFound(Digest),
    /// The storage backend, or the way to it, failed: a database or I/O
    /// error, or a remote store's [`GrpcError`](crate::grpc::GrpcError).
    /// Such failures may heal; see the [`Retryable`] impl for how a gRPC
    /// one is classed.
    #[error("directory store backend failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored record is damaged below the directory encoding (too short
    /// for its own framing, say), so it can't even be decoded and checked.
    #[error("directory store holds a damaged record")]
    Corrupt(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// This process failed, not the store: a task panicked or was
    /// cancelled. Retrying would meet the same broken state.
    #[error("directory store failed internally")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Retryable for DirectoryError {
    /// Backend failures are transient unless their source says otherwise
    /// ([`ErrorClass::of_backend`]); bytes that are not the directory asked
    /// for, and damaged records, are corrupt; a refused put, a missing
    /// directory or an internal failure permanent.
    fn class(&self) -> ErrorClass {
        match self {
            DirectoryError::Backend(source) => ErrorClass::of_backend(&**source),
            DirectoryError::Invalid(_) | DirectoryError::Corrupt(_) => ErrorClass::Corrupt,
            DirectoryError::MissingChild { .. }
            | DirectoryError::SizeMismatch { .. }
            | DirectoryError::NotFound(_)
            | DirectoryError::Internal(_) => ErrorClass::Permanent,
        }
    }
}

/// A directory store backend.
#[async_trait]
pub trait DirectoryService: Send + Sync {
    /// The directory stored under `digest`, or `None`. Must verify the
    /// directory hashes to `digest` before returning it.
    async fn get(&self, digest: &Digest) -> Result<Option<Directory>, DirectoryError>;

    /// Stores a directory and returns its digest. Must refuse it unless every
    /// subdirectory is stored with the size its entry records.
    async fn put(&self, dir: Directory) -> Result<Digest, DirectoryError>;

    /// Stores directories in order, leaves first, root last; returns the
    /// last digest (the root's).
    async fn put_all(&self, dirs: Vec<Directory>) -> Result<Option<Digest>, DirectoryError> {
        let mut last = None;
        for d in dirs {
            last = Some(self.put(d).await?);
        }
        Ok(last)
    }

    /// The directories stored under `digests`, in the order asked, each
    /// verified as [`get`](DirectoryService::get) does. One at a time
    /// unless the backend can do better (redb: one read transaction;
    /// S3: one GET per pack).
    async fn get_many(&self, digests: &[Digest]) -> Result<Vec<Option<Directory>>, DirectoryError> {
        let mut out = Vec::with_capacity(digests.len());
        for d in digests {
            out.push(self.get(d).await?);
        }
        Ok(out)
    }

    /// `root` and every directory below it, root first and each directory
    /// after its parent (breadth first), each once: a level of the tree
    /// to one [`get_many`](DirectoryService::get_many).
    async fn get_recursive(&self, root: &Digest) -> Result<Vec<Directory>, DirectoryError> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::from([*root]);
        let mut level = vec![*root];
        while !level.is_empty() {
            let mut next = Vec::new();
            for dir in get_all(self, &level).await? {
                for (_, child, _) in dir.subdirectories() {
                    if seen.insert(child) {
                        next.push(child);
                    }
                }
                out.push(dir);
            }
            level = next;
        }
        Ok(out)
    }
}

/// Every directory of `digests` by one [`DirectoryService::get_many`], in
/// order: one not stored is [`DirectoryError::NotFound`] naming it, and a
/// backend answering more or fewer than asked is an internal error. How a
/// recursive get (the default's, the gRPC server's) reads a batch.
pub(crate) async fn get_all<S: DirectoryService + ?Sized>(
    service: &S,
    digests: &[Digest],
) -> Result<Vec<Directory>, DirectoryError> {
    let dirs = service.get_many(digests).await?;
    if dirs.len() != digests.len() {
        let message = format!("asked {} directories, got {}", digests.len(), dirs.len());
        return Err(DirectoryError::Internal(message.into()));
    }
    digests
        .iter()
        .zip(dirs)
        .map(|(digest, dir)| dir.ok_or(DirectoryError::NotFound(*digest)))
        .collect()
}

/// Checks that `dir`'s subdirectories are stored with matching sizes, using
/// `lookup` to find a stored directory's size. Shared by every backend's put.
pub fn check_children(
    dir: &Directory,
    mut lookup: impl FnMut(&Digest) -> Result<Option<u64>, DirectoryError>,
) -> Result<(), DirectoryError> {
    for (name, digest, recorded) in dir.subdirectories() {
        match lookup(&digest)? {
            None => {
                return Err(DirectoryError::MissingChild {
                    parent: dir.digest(),
                    child: name.to_string(),
                    digest,
                });
            }
            Some(actual) if actual != recorded => {
                return Err(DirectoryError::SizeMismatch {
                    parent: dir.digest(),
                    child: name.to_string(),
                    recorded,
                    actual,
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}
