//! Prefetching files into a store's local cache, by their absolute paths
//! (what a mount's access traces hold): every store path's tree in one
//! `get_recursive`, the files' chunk lists in batches, then their chunks
//! in large parallel batches, each verified, so a build reading them
//! finds them on the machine.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use lazystore_castore::{BlobMeta, Digest, Directory, Node};

use crate::{Store, StorePath};

/// Bytes of chunks to one request.
const BATCH_BYTES: u64 = 4 << 20;

/// Requests in flight.
const IN_FLIGHT: usize = 8;

/// What a prefetch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Prefetched {
    /// Files found and fetched.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Distinct chunks asked for.
    pub chunks: u64,
    /// Requests for chunks.
    pub requests: u64,
    /// Paths not found (their store path unknown, or no such file in it),
    /// with why.
    pub missing: Vec<(String, String)>,
    /// How long it took.
    pub elapsed: Duration,
}

/// Why a prefetch stopped.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    /// The store failed.
    #[error("{what}: {source}")]
    Store {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn store_error(
    what: impl Into<String>,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> PrefetchError {
    let what = what.into();
    move |source| PrefetchError::Store { what, source }
}

/// Fetches the files at `paths` (absolute, under the store directory)
/// through `store`'s blobs, which keep them in its local cache.
pub async fn prefetch(store: &Store, paths: &[String]) -> Result<Prefetched, PrefetchError> {
    let started = Instant::now();
    let mut out = Prefetched::default();
    let files = resolve(store, paths, &mut out.missing).await?;
    let min = store
        .blobs
        .write_params()
        .await
        .map_err(|e| store_error("asking the store's chunker")(e.into()))?
        .min;
    // Chunk lists: a file no longer than the chunker's minimum is one chunk.
    let mut metas: Vec<BlobMeta> = Vec::with_capacity(files.len());
    let mut listed = Vec::new();
    for (digest, size) in &files {
        match BlobMeta::one_chunk(*digest, *size, u64::from(min)) {
            Some(meta) => metas.push(meta),
            None => listed.push(*digest),
        }
    }
    let mut batches = std::pin::pin!(store.blobs.stat_batches(&listed));
    while let Some((batch, answer)) = batches.next().await {
        let answer = answer.map_err(|e| store_error("fetching chunk lists")(e.into()))?;
        for (digest, meta) in batch.iter().zip(answer) {
            match meta {
                Some(meta) => metas.push(meta),
                None => out.missing.push((
                    digest.to_string(),
                    "its chunk list is not in the store".into(),
                )),
            }
        }
    }
    // Chunks, each once, in batches of about BATCH_BYTES.
    let mut seen = HashSet::new();
    let mut requests: Vec<Vec<Digest>> = vec![Vec::new()];
    let mut bytes = 0;
    for meta in &metas {
        out.files += 1;
        out.bytes += meta.size;
        for chunk in &meta.chunks {
            if !seen.insert(chunk.digest) {
                continue;
            }
            if bytes >= BATCH_BYTES {
                requests.push(Vec::new());
                bytes = 0;
            }
            requests
                .last_mut()
                .expect("one at least")
                .push(chunk.digest);
            bytes += chunk.size;
        }
    }
    requests.retain(|r| !r.is_empty());
    out.chunks = seen.len() as u64;
    out.requests = requests.len() as u64;
    futures::stream::iter(requests)
        .map(|batch| async move { store.blobs.read_chunks_verified(&batch).await.map(|_| ()) })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await
        .map_err(|e| store_error("fetching chunks")(e.into()))?;
    out.elapsed = started.elapsed();
    Ok(out)
}

/// The blob digest and size of every file at `paths`, each once; paths
/// that name nothing go to `missing`.
async fn resolve(
    store: &Store,
    paths: &[String],
    missing: &mut Vec<(String, String)>,
) -> Result<Vec<(Digest, u64)>, PrefetchError> {
    // By store path, in the order first named.
    let mut by_path: Vec<(StorePath, Vec<&str>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for path in paths {
        let inside = path
            .strip_prefix(crate::STORE_DIR)
            .and_then(|p| p.strip_prefix('/'));
        let Some(inside) = inside else {
            missing.push((path.clone(), format!("not under {}", crate::STORE_DIR)));
            continue;
        };
        let (base, rest) = inside.split_once('/').unwrap_or((inside, ""));
        let Ok(store_path) = StorePath::from_basename(base) else {
            missing.push((path.clone(), "not a store path".into()));
            continue;
        };
        let at = *index.entry(base.to_owned()).or_insert_with(|| {
            by_path.push((store_path, Vec::new()));
            by_path.len() - 1
        });
        by_path[at].1.push(rest);
    }
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    for (store_path, insides) in by_path {
        let shown = store_path.to_absolute();
        let info = store
            .path_infos
            .get(&store_path.hash())
            .await
            .map_err(|e| store_error(format!("{shown}: finding its path info"))(e.into()))?;
        let Some(info) = info.filter(|i| i.store_path == store_path) else {
            for inside in insides {
                missing.push((join(&shown, inside), "the store does not have it".into()));
            }
            continue;
        };
        let tree: HashMap<Digest, Arc<Directory>> = match &info.root {
            Node::Directory { digest, .. } => store
                .directories
                .get_recursive(digest)
                .await
                .map_err(|e| store_error(format!("{shown}: fetching its tree"))(e.into()))?
                .into_iter()
                .map(|d| (d.digest(), Arc::new(d)))
                .collect(),
            _ => HashMap::new(),
        };
        for inside in insides {
            match find(&info.root, &tree, inside) {
                Some(Node::File { digest, size, .. }) => {
                    if seen.insert(digest) {
                        files.push((digest, size));
                    }
                }
                Some(_) => {}
                None => missing.push((join(&shown, inside), "no such file in it".into())),
            }
        }
    }
    Ok(files)
}

fn join(store_path: &str, inside: &str) -> String {
    if inside.is_empty() {
        store_path.to_owned()
    } else {
        format!("{store_path}/{inside}")
    }
}

/// The node at `inside` (`/`-separated, empty for the root) under `root`.
fn find(root: &Node, tree: &HashMap<Digest, Arc<Directory>>, inside: &str) -> Option<Node> {
    let mut node = root.clone();
    for name in inside.split('/').filter(|n| !n.is_empty()) {
        let Node::Directory { digest, .. } = &node else {
            return None;
        };
        node = tree.get(digest)?.get(name.as_bytes())?.clone();
    }
    Some(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::ingest_nar;
    use crate::nar::NarWriter;

    /// A trace is a file anyone may hand over: lines that name nothing
    /// (outside the store, not a store path, a path or file the store
    /// lacks) are skipped with why, a directory is not a file, and a file
    /// named twice is fetched once.
    #[tokio::test]
    async fn paths_that_name_nothing_are_skipped_with_why() {
        let store = Store::memory();
        let mut nar = NarWriter::new(Vec::new());
        nar.start_directory(None).await.unwrap();
        nar.file(Some(b"a"), false, 5).await.unwrap();
        nar.write_content(b"hello").await.unwrap();
        nar.end_directory().await.unwrap();
        let nar = nar.finish().await.unwrap();
        let ingested = ingest_nar(&store.blobs, &*store.directories, &nar[..])
            .await
            .unwrap();
        let path = "/nix/store/0c3h9dkbdsx5zzs9y5a7gf5v5ja5xkrf-traced";
        let info = ingested.path_info(StorePath::from_absolute_path(path).unwrap());
        store.path_infos.put(info).await.unwrap();
        let paths: Vec<String> = [
            "/etc/passwd",
            "/nix/store/not-a-store-path/a",
            "/nix/store/1c3h9dkbdsx5zzs9y5a7gf5v5ja5xkrf-unknown/a",
            &format!("{path}/missing"),
            &format!("{path}/a/below-a-file"),
            &format!("{path}/a"),
            &format!("{path}/a"),
            path,
        ]
        .iter()
        .map(|p| p.to_string())
        .collect();
        let done = prefetch(&store, &paths).await.unwrap();
        assert_eq!((done.files, done.bytes, done.chunks), (1, 5, 1), "{done:?}");
        let skipped: Vec<(&str, &str)> = done
            .missing
            .iter()
            .map(|(p, why)| (p.as_str(), why.as_str()))
            .collect();
        assert_eq!(
            skipped,
            [
                ("/etc/passwd", "not under /nix/store"),
                ("/nix/store/not-a-store-path/a", "not a store path"),
                (
                    "/nix/store/1c3h9dkbdsx5zzs9y5a7gf5v5ja5xkrf-unknown/a",
                    "the store does not have it"
                ),
                (&*format!("{path}/missing"), "no such file in it"),
                (&*format!("{path}/a/below-a-file"), "no such file in it"),
            ]
        );
    }
}
