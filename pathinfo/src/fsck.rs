//! Checking a store end to end: every published path's tree rendered back
//! to its NAR and hashed ([`check`]).
//!
//! Rendering a path reads every directory and chunk its root reaches, so
//! one walk checks all of it: each directory decodes to its digest and has
//! its children with the sizes it records, each file's chunk list is
//! stored and adds up to the file's size, each chunk matches its BLAKE3,
//! and the NAR the tree makes has the NarHash and NarSize the PathInfo
//! (and its signatures) say. What a damaged path misses or holds wrong is
//! named with the path.
//!
//! It reads the store through its public services, so it runs online,
//! against a store being served and written. A path is checked as it was
//! when its PathInfo was read.
//!
//! `lazystore fsck --repair` imports the damaged paths again from binary
//! caches: a chunk found corrupt was quarantined as it was read, so the
//! import sees the path incomplete and writes what it lacks.
//!
//! Objects no PathInfo reaches are counted by `lazystore fsck` on a redb
//! store it opens itself (the gc's mark and a dry sweep). Not yet: chunks
//! shared by several paths are read once per path.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::TryStreamExt as _;
use lazystore_castore::{Node, error_chain};

use crate::Store;
use crate::nixbase32;
use crate::pathinfos::{PathInfo, PathInfoError};
use crate::render::nar_hash;
use crate::store_path::StorePath;

/// Paths checked at once.
const PARALLEL_PATHS: usize = 4;

/// What is wrong with one path.
#[derive(Debug)]
pub struct Damage {
    /// The path.
    pub store_path: StorePath,
    /// What rendering it met, or how its NAR differs.
    pub reason: String,
}

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    /// Paths checked.
    pub paths: u64,
    /// Bytes of NAR rendered and hashed.
    pub nar_bytes: u64,
    /// Paths whose tree is damaged, each with why.
    pub damaged: Vec<Damage>,
    /// How long it took.
    pub elapsed: Duration,
}

impl Report {
    /// Whether every path checked out.
    pub fn clean(&self) -> bool {
        self.damaged.is_empty()
    }
}

/// Why a check could not run to the end.
#[derive(Debug, thiserror::Error)]
#[error("cannot list the store's paths")]
pub struct CheckError(#[source] pub PathInfoError);

/// Checks every path `store` publishes (see the module docs), calling
/// `progress` with the paths and NAR bytes checked so far after each path.
pub async fn check(
    store: &Store,
    progress: impl Fn(u64, u64) + Send + Sync,
) -> Result<Report, CheckError> {
    let started = Instant::now();
    let paths = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let damaged = std::sync::Mutex::new(Vec::new());
    let progress = Arc::new(progress);
    store
        .path_infos
        .list()
        .map_err(CheckError)
        .try_for_each_concurrent(PARALLEL_PATHS, |info| {
            let (paths, bytes, damaged, progress) = (&paths, &bytes, &damaged, progress.clone());
            async move {
                if let Err(reason) = check_path(store, &info).await {
                    tracing::error!(path = %info.store_path, "damaged: {reason}");
                    damaged.lock().expect("no panics while held").push(Damage {
                        store_path: info.store_path.clone(),
                        reason,
                    });
                }
                let done = paths.fetch_add(1, Ordering::Relaxed) + 1;
                let nar = bytes.fetch_add(info.nar_size, Ordering::Relaxed) + info.nar_size;
                progress(done, nar);
                Ok(())
            }
        })
        .await?;
    let mut damaged = damaged.into_inner().expect("no panics while held");
    damaged.sort_by(|a, b| a.store_path.cmp(&b.store_path));
    Ok(Report {
        paths: paths.into_inner(),
        nar_bytes: bytes.into_inner(),
        damaged,
        elapsed: started.elapsed(),
    })
}

/// Renders `info`'s tree and compares its NAR with the PathInfo's; what
/// is wrong, if anything. (A chunk that fails verification on the way is
/// quarantined by the reader, so an import of the path writes it again.)
///
/// A path that does not render is walked again object by object, so
/// every bad chunk, chunk list and directory of it is named, not only the
/// first the rendering met (a clean path is read once).
pub async fn check_path(store: &Store, info: &PathInfo) -> Result<(), String> {
    let rendered = nar_hash(&store.blobs, &*store.directories, &info.root).await;
    let (size, sha256) = match rendered {
        Ok(measured) => measured,
        Err(e) => {
            let found = bad_objects(store, &info.root).await;
            return Err(if found.is_empty() {
                error_chain(&e)
            } else {
                found.join("; ")
            });
        }
    };
    if (size, sha256) != (info.nar_size, info.nar_sha256) {
        return Err(format!(
            "its tree renders to a NAR of {size} bytes with NarHash sha256:{}, the PathInfo says \
             {} bytes and sha256:{}",
            nixbase32::encode(&sha256),
            info.nar_size,
            nixbase32::encode(&info.nar_sha256)
        ));
    }
    Ok(())
}

/// Chunks read in one request while looking for bad ones.
const SCAN_BATCH: usize = 64;

/// Every directory, chunk list and chunk below `root` that is missing or
/// fails verification, each with why.
async fn bad_objects(store: &Store, root: &Node) -> Vec<String> {
    let mut bad = Vec::new();
    // A chunk in several files is read, and named, once.
    let mut checked = std::collections::HashSet::new();
    let mut stack = vec![root.clone()];
    while let Some(node) = stack.pop() {
        match node {
            Node::Directory { digest, .. } => match store.directories.get(&digest).await {
                Ok(Some(dir)) => stack.extend(dir.entries().map(|(_, node)| node.clone())),
                Ok(None) => bad.push(format!("directory {digest} is missing")),
                Err(e) => bad.push(format!("directory {digest}: {}", error_chain(&e))),
            },
            Node::File { digest, size, .. } => {
                let meta = match store.blobs.stat(&digest).await {
                    Ok(Some(meta)) => meta,
                    Ok(None) => {
                        bad.push(format!("the chunk list of {digest} is missing"));
                        continue;
                    }
                    Err(e) => {
                        bad.push(format!("the chunk list of {digest}: {}", error_chain(&e)));
                        continue;
                    }
                };
                if meta.size != size {
                    bad.push(format!(
                        "the chunk list of {digest} adds up to {} bytes, the file has {size}",
                        meta.size
                    ));
                }
                let digests: Vec<_> = meta
                    .chunks
                    .iter()
                    .map(|c| c.digest)
                    .filter(|d| checked.insert(*d))
                    .collect();
                for batch in digests.chunks(SCAN_BATCH) {
                    if store.blobs.read_chunks_verified(batch).await.is_ok() {
                        continue;
                    }
                    for chunk in batch {
                        // The error names the chunk: missing (or quarantined
                        // by an earlier read), or corrupt and why.
                        if let Err(e) = store.blobs.read_chunks_verified(&[*chunk]).await {
                            bad.push(error_chain(&e));
                        }
                    }
                }
            }
            Node::Symlink { .. } => {}
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::ingest_nar;
    use crate::nar::NarWriter;

    async fn publish(store: &Store, name: &str, contents: &[u8]) -> PathInfo {
        let mut nar = NarWriter::new(Vec::new());
        nar.start_directory(None).await.unwrap();
        nar.file(Some(b"data"), false, contents.len() as u64)
            .await
            .unwrap();
        nar.write_content(contents).await.unwrap();
        nar.end_directory().await.unwrap();
        let nar = nar.finish().await.unwrap();
        let tree = ingest_nar(&store.blobs, &*store.directories, &nar[..])
            .await
            .unwrap();
        let info = PathInfo {
            store_path: StorePath::from_basename(name).unwrap(),
            root: tree.root,
            references: Vec::new(),
            nar_size: tree.nar_size,
            nar_sha256: tree.nar_sha256,
            signatures: Vec::new(),
            deriver: None,
            ca: None,
        };
        store.path_infos.put(info.clone()).await.unwrap();
        info
    }

    #[tokio::test]
    async fn a_clean_store_checks_and_damage_is_named() {
        let store = Store::memory();
        let good = publish(&store, "00bgd045z0d4icpbc2yyz4gx48ak44la-good", b"fine").await;
        let report = check(&store, |_, _| {}).await.unwrap();
        assert!(report.clean(), "{report:?}");
        assert_eq!((report.paths, report.nar_bytes), (1, good.nar_size));

        // A PathInfo whose NarHash is not its tree's, and one whose file
        // blob is not stored.
        let mut wrong = publish(&store, "11bgd045z0d4icpbc2yyz4gx48ak44la-wrong", b"x").await;
        wrong.nar_sha256[0] ^= 1;
        store.path_infos.put(wrong.clone()).await.unwrap();
        let mut missing = good.clone();
        missing.store_path =
            StorePath::from_basename("22bgd045z0d4icpbc2yyz4gx48ak44la-missing").unwrap();
        let Node::Directory { .. } = missing.root else {
            panic!("a directory")
        };
        missing.root = Node::File {
            digest: lazystore_castore::Digest::of(b"never stored"),
            size: 12,
            executable: false,
        };
        store.path_infos.put(missing.clone()).await.unwrap();

        let report = check(&store, |_, _| {}).await.unwrap();
        assert_eq!(report.paths, 3);
        let names: Vec<_> = report
            .damaged
            .iter()
            .map(|d| d.store_path.clone())
            .collect();
        assert_eq!(
            names,
            vec![wrong.store_path.clone(), missing.store_path.clone()]
        );
        assert!(report.damaged[0].reason.contains("NarHash"), "{report:?}");
        assert!(
            report.damaged[1].reason.contains("is missing"),
            "{report:?}"
        );
    }
}
