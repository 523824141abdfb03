//! Compacting a redb store into frames (`RedbStore::compact`, the module
//! doc of castore's `compaction.rs`): the chunks of every published path in
//! NAR order, which is the order a walk, a stream and a directory window
//! read them in, and the order in which a stream compressor would have met
//! them, so neighbours that resemble each other share a frame.

use std::collections::HashMap;

use futures::{StreamExt as _, TryStreamExt as _};
use lazystore_castore::{
    BlobError, CompactOptions, Compacted, Digest, Directory, DirectoryError, Node, RedbStore,
};

use crate::Store;
use crate::pathinfos::{PathInfo, PathInfoError};
use crate::store_path::StorePath;

/// Why a store could not be compacted.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    /// The paths could not be listed.
    #[error("listing the store's paths")]
    List(#[from] PathInfoError),
    /// A directory of `0` could not be read.
    #[error("reading the directories of {0}")]
    Directory(StorePath, #[source] DirectoryError),
    /// A chunk list or a chunk could not be read or moved.
    #[error("reading chunk lists or moving chunks")]
    Blob(#[from] BlobError),
    /// A chunk list a path needs is missing (`lazystore fsck` says more).
    #[error("{0}: the chunk list of {1} is missing")]
    MissingBlob(StorePath, Digest),
    /// The compaction's thread failed.
    #[error("the compaction stopped")]
    Join(#[from] tokio::task::JoinError),
}

/// Compacts `redb` (whose services `store` are): every published path's
/// chunks in NAR order, paths in store path order. `progress` is called
/// with what is being done, and how much of it is done out of how much.
pub async fn compact(
    store: &Store,
    redb: RedbStore,
    options: CompactOptions,
    progress: impl Fn(&str, u64, u64) + Send + Sync + 'static,
) -> Result<Compacted, CompactError> {
    let progress = std::sync::Arc::new(progress);
    let order = nar_order(store, &*progress).await?;
    let report = tokio::task::spawn_blocking(move || {
        redb.compact(&order, options, &|done, total| {
            progress("bytes", done, total)
        })
    })
    .await??;
    Ok(report)
}

/// The chunks of every published path, in NAR order (a chunk may repeat).
pub async fn nar_order(
    store: &Store,
    progress: &(impl Fn(&str, u64, u64) + ?Sized),
) -> Result<Vec<Digest>, CompactError> {
    let mut infos: Vec<PathInfo> = store.path_infos.list().try_collect().await?;
    infos.sort_by(|a, b| a.store_path.cmp(&b.store_path));
    let mut order = Vec::new();
    for (walked, info) in infos.iter().enumerate() {
        let files = files_in_nar_order(store, info).await?;
        let mut metas = std::pin::pin!(store.blobs.stat_batches(&files));
        while let Some((batch, got)) = metas.next().await {
            for (blob, meta) in batch.iter().zip(got?) {
                let meta =
                    meta.ok_or_else(|| CompactError::MissingBlob(info.store_path.clone(), *blob))?;
                order.extend(meta.chunks.iter().map(|c| c.digest));
            }
        }
        progress("paths", walked as u64 + 1, infos.len() as u64);
    }
    Ok(order)
}

/// The blob digests of `info`'s files, in NAR order.
async fn files_in_nar_order(store: &Store, info: &PathInfo) -> Result<Vec<Digest>, CompactError> {
    let root = match &info.root {
        Node::File { digest, .. } => return Ok(vec![*digest]),
        Node::Symlink { .. } => return Ok(Vec::new()),
        Node::Directory { digest, .. } => *digest,
    };
    let tree = store.directories.get_recursive(&root).await;
    let tree = tree.map_err(|e| CompactError::Directory(info.store_path.clone(), e))?;
    let by_digest: HashMap<Digest, &Directory> = tree.iter().map(|d| (d.digest(), d)).collect();
    let mut files = Vec::new();
    // Depth first, each directory's entries in name order, going down into
    // a directory where it is met: a NAR's order. (`get_recursive` refused
    // a tree lacking a directory.)
    let mut stack: Vec<(&Directory, usize)> =
        by_digest.get(&root).map(|d| (*d, 0)).into_iter().collect();
    while let Some((dir, next)) = stack.pop() {
        let Some((_, node)) = dir.entries().nth(next) else {
            continue;
        };
        stack.push((dir, next + 1));
        match node {
            Node::File { digest, .. } => files.push(*digest),
            Node::Directory { digest, .. } => {
                if let Some(below) = by_digest.get(digest) {
                    stack.push((*below, 0));
                }
            }
            Node::Symlink { .. } => {}
        }
    }
    Ok(files)
}
