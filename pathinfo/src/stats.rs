//! What a store's paths cost: for each published path and for the whole
//! store, the NAR bytes, the bytes of the distinct chunks its files are
//! made of, and the bytes those chunks take as stored (compressed where
//! that was smaller) — so the dedup ratio (NAR / distinct) and the
//! compression ratio (distinct / stored) can be read apart.
//!
//! Every directory and chunk list a path reaches is read (trees whole,
//! chunk lists 64 to a request), and every distinct chunk's stored size
//! (`BlobService::stored_sizes`: from the index of a redb store, where a
//! chunk in a frame counts its share of the frame; elsewhere the length of
//! the chunk as read, about what `fsck` reads, without decoding). A chunk
//! stored as a base shared with others and its store path hashes counts
//! its record, and the base counts once, in the store's figure and in each
//! path's.

use std::collections::HashMap;

use futures::{StreamExt as _, TryStreamExt as _};
use lazystore_castore::{BlobError, Digest, DirectoryError, Node, StoredSize};

use crate::Store;
use crate::pathinfos::{PathInfo, PathInfoError};
use crate::store_path::StorePath;

/// Chunks read in one call, and calls at once.
const BATCH: usize = lazystore_castore::blobs::STAT_BATCH;
const IN_FLIGHT: usize = lazystore_castore::blobs::STAT_BATCHES;

/// One path's figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathStats {
    /// The path.
    pub store_path: StorePath,
    /// Its NarSize.
    pub nar_bytes: u64,
    /// Distinct chunks its files are made of, and their bytes.
    pub chunks: u64,
    pub chunk_bytes: u64,
    /// Those chunks' bytes as stored.
    pub stored_bytes: u64,
    /// Of its distinct chunks' bytes, those no other path has.
    pub own_chunk_bytes: u64,
}

/// The store's figures: each path's, and the totals over distinct chunks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Per path, in store path order.
    pub paths: Vec<PathStats>,
    /// Sum of the NarSizes.
    pub nar_bytes: u64,
    /// Distinct chunks over all paths, their bytes, their stored bytes.
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub stored_bytes: u64,
}

impl StoreStats {
    /// NAR bytes per distinct chunk byte: what deduplication saves.
    pub fn dedup_ratio(&self) -> f64 {
        self.nar_bytes as f64 / self.chunk_bytes.max(1) as f64
    }

    /// Distinct chunk bytes per stored byte: what compression saves.
    pub fn compression_ratio(&self) -> f64 {
        self.chunk_bytes as f64 / self.stored_bytes.max(1) as f64
    }
}

/// Why the figures could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The paths could not be listed.
    #[error("listing the store's paths")]
    List(#[from] PathInfoError),
    /// A directory of `0` could not be read.
    #[error("reading the directories of {0}")]
    Directory(StorePath, #[source] DirectoryError),
    /// A chunk list or a chunk could not be read.
    #[error("reading chunk lists or chunks")]
    Blob(#[from] BlobError),
    /// A chunk list a path needs is missing (`lazystore fsck` says more).
    #[error("{0}: the chunk list of {1} is missing")]
    MissingBlob(StorePath, Digest),
}

/// The figures of every path `store` publishes; `progress` is called with
/// the paths walked, then the chunks measured.
pub async fn store_stats(
    store: &Store,
    progress: impl Fn(&str, u64, u64),
) -> Result<StoreStats, StatsError> {
    let mut infos: Vec<PathInfo> = store.path_infos.list().try_collect().await?;
    infos.sort_by(|a, b| a.store_path.cmp(&b.store_path));
    // Each path's distinct chunks, with their sizes.
    let mut per_path: Vec<HashMap<Digest, u64>> = Vec::with_capacity(infos.len());
    for (walked, info) in infos.iter().enumerate() {
        per_path.push(path_chunks(store, info).await?);
        progress("paths", walked as u64 + 1, infos.len() as u64);
    }
    let mut owners: HashMap<Digest, (u64, u32)> = HashMap::new();
    for chunks in &per_path {
        for (digest, size) in chunks {
            owners.entry(*digest).or_insert((*size, 0)).1 += 1;
        }
    }
    let stored = stored_sizes(store, owners.keys().copied().collect(), &progress).await?;
    // Bases that are not chunks of a path themselves, counted once each.
    let mut bases: Vec<Digest> = stored
        .values()
        .filter_map(|s| s.base)
        .filter(|b| !stored.contains_key(b))
        .collect();
    bases.sort_unstable();
    bases.dedup();
    let base_bytes = stored_sizes(store, bases, &progress).await?;
    // What `chunks` take: their own bytes and each base of theirs once.
    let stored_of = |chunks: &mut dyn Iterator<Item = &Digest>| -> u64 {
        let mut named = std::collections::HashSet::new();
        let mut bytes = 0;
        for d in chunks {
            bytes += stored[d].bytes;
            if let Some(base) = stored[d].base
                && let Some(b) = base_bytes.get(&base)
                && named.insert(base)
            {
                bytes += b.bytes;
            }
        }
        bytes
    };
    let mut stats = StoreStats::default();
    for (info, chunks) in infos.iter().zip(&per_path) {
        let sum = |f: &dyn Fn(&Digest, u64) -> u64| -> u64 {
            chunks.iter().map(|(d, size)| f(d, *size)).sum()
        };
        stats.paths.push(PathStats {
            store_path: info.store_path.clone(),
            nar_bytes: info.nar_size,
            chunks: chunks.len() as u64,
            chunk_bytes: sum(&|_, size| size),
            stored_bytes: stored_of(&mut chunks.keys()),
            own_chunk_bytes: sum(&|d, size| if owners[d].1 == 1 { size } else { 0 }),
        });
        stats.nar_bytes += info.nar_size;
    }
    stats.chunks = owners.len() as u64;
    stats.chunk_bytes = owners.values().map(|(size, _)| size).sum();
    stats.stored_bytes = stored_of(&mut stored.keys());
    Ok(stats)
}

/// The distinct chunks of `info`'s files, with their sizes.
async fn path_chunks(store: &Store, info: &PathInfo) -> Result<HashMap<Digest, u64>, StatsError> {
    let mut blobs = Vec::new();
    match &info.root {
        Node::File { digest, .. } => blobs.push(*digest),
        Node::Symlink { .. } => {}
        Node::Directory { digest, .. } => {
            let tree = store.directories.get_recursive(digest).await;
            let tree = tree.map_err(|e| StatsError::Directory(info.store_path.clone(), e))?;
            for dir in &tree {
                for (_, node) in dir.entries() {
                    if let Node::File { digest, .. } = node {
                        blobs.push(*digest);
                    }
                }
            }
        }
    }
    blobs.sort_unstable();
    blobs.dedup();
    let mut metas = std::pin::pin!(store.blobs.stat_batches(&blobs));
    let mut chunks = HashMap::new();
    while let Some((batch, got)) = metas.next().await {
        for (blob, meta) in batch.iter().zip(got?) {
            let meta =
                meta.ok_or_else(|| StatsError::MissingBlob(info.store_path.clone(), *blob))?;
            chunks.extend(meta.chunks.iter().map(|c| (c.digest, c.size)));
        }
    }
    Ok(chunks)
}

/// The stored size of each of `chunks`.
async fn stored_sizes(
    store: &Store,
    chunks: Vec<Digest>,
    progress: &impl Fn(&str, u64, u64),
) -> Result<HashMap<Digest, StoredSize>, StatsError> {
    let total = chunks.len() as u64;
    let batches: Vec<Vec<Digest>> = chunks.chunks(BATCH).map(<[_]>::to_vec).collect();
    let service = store.blobs.service().clone();
    let mut reads = futures::stream::iter(batches)
        .map(|batch| {
            let service = service.clone();
            async move {
                let sizes = service.stored_sizes(&batch).await?;
                Ok::<_, BlobError>(batch.into_iter().zip(sizes))
            }
        })
        .buffered(IN_FLIGHT);
    let mut sizes = HashMap::with_capacity(chunks.len());
    while let Some(read) = reads.next().await {
        sizes.extend(read?);
        progress("chunks", sizes.len() as u64, total);
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::ingest_nar;
    use crate::nar::NarWriter;

    async fn publish(store: &Store, path: &str, files: &[(&str, &[u8])]) -> u64 {
        let mut nar = NarWriter::new(Vec::new());
        nar.start_directory(None).await.unwrap();
        for (name, data) in files {
            nar.file(Some(name.as_bytes()), false, data.len() as u64)
                .await
                .unwrap();
            nar.write_content(data).await.unwrap();
        }
        nar.end_directory().await.unwrap();
        let nar = nar.finish().await.unwrap();
        let ingested = ingest_nar(&store.blobs, &*store.directories, &nar[..])
            .await
            .unwrap();
        let info = ingested.path_info(path.parse().unwrap());
        store.path_infos.put(info).await.unwrap();
        ingested.nar_size
    }

    /// Two paths sharing a 1 MB file: the shared chunks count once for
    /// the store and as no path's own; a compressible file stores smaller.
    #[tokio::test]
    async fn shared_chunks_count_once() {
        let store = Store::memory();
        let shared = lazystore_testkit::noise(1 << 20, 1);
        let own = lazystore_testkit::noise(300_000, 2);
        let text: Vec<u8> = (0..20_000u32)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let a = publish(
            &store,
            "00bgd045z0d4icpbc2yyz4gx48ak44la-a",
            &[("shared", &shared), ("text", &text)],
        )
        .await;
        let b = publish(
            &store,
            "0c6kzph7l0dcbq4iddc1ngabvk2c6y5f-b",
            &[("own", &own), ("shared", &shared)],
        )
        .await;
        let stats = store_stats(&store, |_, _, _| {}).await.unwrap();
        assert_eq!(stats.nar_bytes, a + b);
        let sizes = (shared.len() + own.len() + text.len()) as u64;
        assert_eq!(stats.chunk_bytes, sizes);
        assert!(stats.dedup_ratio() > 1.3, "{stats:?}");
        assert!(stats.stored_bytes < stats.chunk_bytes, "{stats:?}");
        let [pa, pb] = &stats.paths[..] else {
            panic!("{stats:?}")
        };
        assert_eq!(pa.chunk_bytes, (shared.len() + text.len()) as u64);
        assert_eq!(pa.own_chunk_bytes, text.len() as u64);
        assert!(pa.stored_bytes < pa.chunk_bytes / 2 + shared.len() as u64);
        assert_eq!(pb.own_chunk_bytes, own.len() as u64);
    }
}
