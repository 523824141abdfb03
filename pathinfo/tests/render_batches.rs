//! How a rendering reads: small files travel in batches across files, a
//! served range asks no chunk list for a file of one chunk, a whole
//! rendering (what fsck and publication checks use) asks every chunk list
//! and catches a chunk list that names another file's chunks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use lazystore_castore::blobs::{
    BlobError, BlobObserver, BlobService, MemoryBlobService, ObservedBlobService,
};
use lazystore_castore::directories::MemoryDirectoryService;
use lazystore_castore::{Blobs, ChunkerParams, Digest, Node};
use lazystore_pathinfo::ingest::ingest_nar;
use lazystore_pathinfo::render::{RenderError, nar_hash, nar_layout, render_range};
use lazystore_testkit::noise;

mod common;

use common::nar_of;

#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    stats: AtomicU64,
}

#[async_trait]
impl BlobObserver for Counts {
    async fn before_read(&self, _chunks: &[Digest]) -> Result<(), BlobError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn before_stat(&self, _blob: &Digest) {
        self.stats.fetch_add(1, Ordering::Relaxed);
    }
}

fn params() -> ChunkerParams {
    ChunkerParams {
        min: 4096,
        avg: 16384,
        max: 65536,
    }
    .validate()
    .unwrap()
}

struct Stored {
    mem: Arc<MemoryBlobService>,
    blobs: Blobs,
    counts: Arc<Counts>,
    directories: MemoryDirectoryService,
    root: Node,
}

async fn store(nar: &[u8]) -> Stored {
    let mem = Arc::new(MemoryBlobService::new());
    let counts = Arc::new(Counts::default());
    let observed: Arc<dyn BlobService> =
        Arc::new(ObservedBlobService::new(mem.clone(), counts.clone()));
    let blobs = Blobs::new(observed, params());
    let directories = MemoryDirectoryService::new();
    let root = ingest_nar(&blobs, &directories, nar).await.unwrap().root;
    counts.reads.store(0, Ordering::Relaxed);
    counts.stats.store(0, Ordering::Relaxed);
    Stored {
        mem,
        blobs,
        counts,
        directories,
        root,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_travel_in_batches() {
    let files: Vec<(String, Vec<u8>)> = (0..500)
        .map(|i| (format!("f{i:04}"), noise(100 + i * 7, i as u64)))
        .collect();
    let nar = nar_of(&files).await;
    let stored = store(&nar).await;
    let layout = Arc::new(nar_layout(&stored.directories, &stored.root).await.unwrap());

    // A served range: no chunk list asked, reads in batches.
    let got = render_range(&stored.blobs, &layout, 0..layout.size(), Vec::new())
        .await
        .unwrap();
    assert_eq!(got, nar);
    let (reads, stats) = (
        stored.counts.reads.load(Ordering::Relaxed),
        stored.counts.stats.load(Ordering::Relaxed),
    );
    assert_eq!(stats, 0, "a file of one chunk needs no chunk list");
    assert!(reads <= 20, "{reads} reads for 500 small files");

    // A whole rendering asks every chunk list, still reading in batches.
    stored.counts.reads.store(0, Ordering::Relaxed);
    let (size, _) = nar_hash(&stored.blobs, &stored.directories, &stored.root)
        .await
        .unwrap();
    assert_eq!(size, nar.len() as u64);
    let (reads, stats) = (
        stored.counts.reads.load(Ordering::Relaxed),
        stored.counts.stats.load(Ordering::Relaxed),
    );
    assert_eq!(stats, 500);
    assert!(reads <= 20, "{reads} reads for 500 small files");
}

/// A chunk list stored under file B's digest that names file A's chunks
/// (same size, so every chunk verifies): a whole rendering fails on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_rendering_checks_every_file() {
    let a = noise(300_000, 1);
    let b = noise(300_000, 2);
    let nar = nar_of(&[("a", a.clone()), ("b", b.clone())]).await;
    let stored = store(&nar).await;
    let digest_a = Digest::from(blake3::hash(&a));
    let digest_b = Digest::from(blake3::hash(&b));
    let meta_a = stored.blobs.stat(&digest_a).await.unwrap().unwrap();
    assert!(meta_a.chunks.len() > 1);
    let wrong =
        lazystore_castore::blobs::BlobMeta::new(digest_b, meta_a.size, meta_a.chunks).unwrap();
    stored.mem.put_blob(digest_b, wrong).await.unwrap();

    let err = nar_hash(&stored.blobs, &stored.directories, &stored.root)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RenderError::Blob(BlobError::BlobMismatch { expected, .. }) if expected == digest_b
        ),
        "{err:?}"
    );
}
