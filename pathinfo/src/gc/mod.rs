//! Garbage collection: the mark ([`live`], [`mark`]) — everything the kept
//! paths reach, their directories, chunk lists and chunks, read through the
//! store's services — and a [`Collector`] that applies retention rules,
//! marks and has the backend sweep
//! ([`RedbStore::sweep`](lazystore_castore::RedbStore::sweep)), offline or
//! beside a serving store's writers.
//!
//! Memory: three sets of 32-byte digests, about 100 bytes per live object
//! (some 100 MB per million chunks).

use futures::{StreamExt as _, TryStreamExt as _};
use lazystore_castore::{BlobError, DirectoryError, Live, Node};

use crate::Store;
use crate::pathinfos::PathInfoError;

mod collect;

pub use collect::{Collector, GcError, Report, Retention, collected_while_serving};

/// Why the mark could not finish. Nothing was dropped.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    /// The paths could not be listed.
    #[error("listing the store's paths")]
    List(#[from] PathInfoError),
    /// A directory could not be read, or is missing: a sweep would be
    /// blind to what is below it, so none is made.
    #[error("reading directory {0}")]
    Directory(lazystore_castore::Digest, #[source] Option<DirectoryError>),
    /// A chunk list could not be read, or is missing.
    #[error("reading the chunk list of {0}")]
    Blob(lazystore_castore::Digest, #[source] Option<BlobError>),
}

/// Everything the paths `store` publishes reach, calling `progress` with
/// the paths marked so far.
pub async fn live(store: &Store, progress: impl Fn(u64)) -> Result<Live, MarkError> {
    let mut roots = Vec::new();
    let mut infos = store.path_infos.list();
    while let Some(info) = infos.try_next().await? {
        roots.push(info.root);
    }
    mark(store, roots, progress).await
}

/// Everything `roots` reach in `store`, calling `progress` with the roots
/// marked so far.
pub async fn mark(
    store: &Store,
    roots: Vec<Node>,
    progress: impl Fn(u64),
) -> Result<Live, MarkError> {
    let mut live = Live::default();
    let mut files = Vec::new();
    for (marked, root) in roots.into_iter().enumerate() {
        match root {
            Node::Directory { digest, .. } if !live.directories.contains(&digest) => {
                // The whole tree in one call: one streamed request to a
                // server, a level at a time from an object store.
                let tree = store.directories.get_recursive(&digest).await;
                let tree = tree.map_err(|e| match e {
                    DirectoryError::NotFound(d) => MarkError::Directory(d, None),
                    e => MarkError::Directory(digest, Some(e)),
                })?;
                for dir in tree {
                    live.directories.insert(dir.digest());
                    for (_, node) in dir.entries() {
                        if let Node::File { digest, .. } = node
                            && live.blobs.insert(*digest)
                        {
                            files.push(*digest);
                        }
                    }
                }
            }
            Node::File { digest, .. } => {
                if live.blobs.insert(digest) {
                    files.push(digest);
                }
            }
            Node::Directory { .. } | Node::Symlink { .. } => {}
        }
        progress(marked as u64 + 1);
    }
    let mut stats = std::pin::pin!(store.blobs.stat_batches(&files));
    while let Some((batch, metas)) = stats.next().await {
        let metas = metas.map_err(|e| MarkError::Blob(batch[0], Some(e)))?;
        for (digest, meta) in batch.iter().zip(metas) {
            let meta = meta.ok_or(MarkError::Blob(*digest, None))?;
            live.chunks.extend(meta.chunks.iter().map(|c| c.digest));
        }
    }
    Ok(live)
}
