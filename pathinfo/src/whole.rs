//! Whether a store path the store holds still has all its data: the check
//! an import or an upload makes before it takes "already present" for an
//! answer.
//!
//! A published path's data can go missing only through quarantine (a
//! chunk whose stored bytes failed verification, `castore`'s
//! `blobs/quarantine.rs`), and the store counts what it has quarantined
//! and not had written again. So the check is in two steps:
//! [`Store::may_lack_data`] asks for that count — one redb lookup, or one
//! call to a remote store — and only when it is not zero does
//! [`Store::find_missing`] walk the path's tree (its directories, every
//! file's chunk list, and which of their chunks the store lacks). With an
//! intact store a re-import of a closure costs one more call per run;
//! with something quarantined it costs a walk of each present path.
//! Measured (debug build, 2 cores, `lazystore import -j 8` of 500 small
//! paths already in a redb store): 0.07–0.08 s intact, 0.24–0.28 s with a
//! chunk quarantined (each path walked); see `docs/design.md`,
//! "Quarantine".

use std::collections::HashSet;

use futures::StreamExt;
use lazystore_castore::{BlobError, Digest, DirectoryError, ErrorClass, Node, Retryable};

use crate::store::Store;

/// Chunks asked about in one `missing_chunks` call.
const MISSING_BATCH: usize = 4096;

/// The first thing found missing below a store path's root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Missing {
    /// A directory of the tree is not stored.
    #[error("directory {0} is missing")]
    Directory(Digest),
    /// A file's chunk list is not stored.
    #[error("the chunk list of blob {0} is missing")]
    Blob(Digest),
    /// A chunk of a file is not stored (quarantined, most likely).
    #[error("chunk {0} is missing")]
    Chunk(Digest),
}

/// Why a tree could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Reading its directories failed.
    #[error("cannot read the directories of the tree")]
    Directory(#[source] DirectoryError),
    /// Reading chunk lists or asking which chunks are stored failed.
    #[error("cannot read the chunk lists of the tree")]
    Blob(#[source] BlobError),
}

impl Retryable for CheckError {
    /// The class of the store's error.
    fn class(&self) -> ErrorClass {
        match self {
            CheckError::Directory(e) => e.class(),
            CheckError::Blob(e) => e.class(),
        }
    }
}

impl Store {
    /// Whether a path this store holds may lack data: the store has
    /// quarantined chunks that were not written again since. False for a
    /// store that cannot quarantine.
    pub async fn may_lack_data(&self) -> Result<bool, BlobError> {
        Ok(self.blobs.service().quarantined().await? > 0)
    }

    /// The first directory, chunk list or chunk below `root` the store
    /// lacks, or `None` when the tree is whole. Reads every directory and
    /// chunk list of the tree, no chunk.
    pub async fn find_missing(&self, root: &Node) -> Result<Option<Missing>, CheckError> {
        let mut blobs = Vec::new();
        match root {
            Node::Symlink { .. } => return Ok(None),
            Node::File { digest, .. } => blobs.push(*digest),
            Node::Directory { digest, .. } => {
                let dirs = match self.directories.get_recursive(digest).await {
                    Ok(dirs) => dirs,
                    Err(DirectoryError::NotFound(d)) => return Ok(Some(Missing::Directory(d))),
                    Err(e) => return Err(CheckError::Directory(e)),
                };
                let mut seen = HashSet::new();
                for dir in &dirs {
                    for (_, node) in dir.entries() {
                        if let Node::File { digest, .. } = node
                            && seen.insert(*digest)
                        {
                            blobs.push(*digest);
                        }
                    }
                }
            }
        }
        let mut chunks = Vec::new();
        let mut seen = HashSet::new();
        let mut stats = std::pin::pin!(self.blobs.stat_batches(&blobs));
        while let Some((batch, metas)) = stats.next().await {
            for (blob, meta) in batch.into_iter().zip(metas.map_err(CheckError::Blob)?) {
                let Some(meta) = meta else {
                    return Ok(Some(Missing::Blob(blob)));
                };
                chunks.extend(
                    meta.chunks
                        .iter()
                        .map(|c| c.digest)
                        .filter(|d| seen.insert(*d)),
                );
            }
        }
        for batch in chunks.chunks(MISSING_BATCH) {
            let missing = self
                .blobs
                .service()
                .missing_chunks(batch)
                .await
                .map_err(CheckError::Blob)?;
            if let Some(chunk) = missing.first() {
                return Ok(Some(Missing::Chunk(*chunk)));
            }
        }
        Ok(None)
    }
}
