//! The S3 store as replicas use it, on a real Garage cluster
//! (`lazystore_testkit::garage`): what one replica writes another finds,
//! a node down changes nothing, and what storing many files costs in
//! requests.

use std::sync::Arc;

use futures::StreamExt;
use lazystore_castore::blobs::S3BlobService;
use lazystore_castore::directories::S3DirectoryService;
use lazystore_castore::{
    Blobs, ChunkerParams, Digest, Directory, DirectoryService, Node, PathComponent, S3Options,
    S3Store,
};
use lazystore_testkit::garage::{Garage, unique_prefix};
use rand::RngExt;

fn options(garage: &Garage) -> S3Options {
    let (key_id, secret) = garage.key();
    S3Options::with_key(key_id, secret)
}

/// A replica: its own client, index and writer on the store at `url`.
fn replica(garage: &Garage, url: &str) -> (S3Store, Blobs, S3DirectoryService) {
    let store = S3Store::open(url, options(garage)).unwrap();
    let blobs = Blobs::new(
        Arc::new(S3BlobService::new(store.clone(), None)),
        ChunkerParams::default(),
    );
    (store.clone(), blobs, S3DirectoryService::new(store))
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill(&mut v[..]);
    v
}

async fn read_all(blobs: &Blobs, digest: Digest) -> Vec<u8> {
    let meta = blobs.stat(&digest).await.unwrap().expect("blob is stored");
    let mut r = blobs.reader(digest, meta);
    let mut out = Vec::new();
    while let Some(c) = r.next_chunk().await.unwrap() {
        out.extend_from_slice(&c);
    }
    out
}

fn one_file_dir(name: &str, digest: Digest, size: u64) -> Directory {
    let mut dir = Directory::new();
    let name = PathComponent::try_from(name).unwrap();
    let file = Node::File {
        digest,
        size,
        executable: false,
    };
    dir.add(name, file).unwrap();
    dir
}

#[tokio::test]
async fn a_replica_finds_what_another_wrote_before_and_after_it_started() {
    let garage = tokio::task::spawn_blocking(Garage::shared).await.unwrap();
    let url = garage.store_url(&unique_prefix());
    let (_, a_blobs, a_dirs) = replica(garage, &url);
    let (b_store, b_blobs, b_dirs) = replica(garage, &url);

    let early = random(300_000);
    let early_digest = a_blobs.put(&early).await.unwrap();
    let dir = one_file_dir("early", early_digest, early.len() as u64);
    let dir_digest = a_dirs.put(dir.clone()).await.unwrap();
    // B reads every index on its first lookup.
    assert_eq!(read_all(&b_blobs, early_digest).await, early);
    assert_eq!(b_dirs.get(&dir_digest).await.unwrap(), Some(dir));

    // Written after B listed: B's miss lists again and finds it.
    let late = random(100_000);
    let late_digest = a_blobs.put(&late).await.unwrap();
    let lists = b_store.requests().lists;
    assert_eq!(read_all(&b_blobs, late_digest).await, late);
    assert_eq!(b_store.requests().lists, lists + 1, "one LIST for one miss");
    // And what B writes, A finds.
    let from_b = random(5000);
    let from_b_digest = b_blobs.put(&from_b).await.unwrap();
    assert_eq!(read_all(&a_blobs, from_b_digest).await, from_b);
    // Both storing the same bytes at once is fine: both copies are whole.
    let same = random(200_000);
    let (x, y) = tokio::join!(a_blobs.put(&same), b_blobs.put(&same));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x, y);
    let (_, c_blobs, _) = replica(garage, &url);
    assert_eq!(read_all(&c_blobs, x).await, same);
}

#[tokio::test]
async fn with_one_node_down_every_read_and_write_goes_on() {
    let garage = tokio::task::spawn_blocking(Garage::start).await.unwrap();
    let url = garage.store_url(&unique_prefix());
    let (_, blobs, dirs) = replica(&garage, &url);
    let data = random(2 << 20);
    let digest = blobs.put(&data).await.unwrap();
    let dir = one_file_dir("f", digest, data.len() as u64);
    let dir_digest = dirs.put(dir.clone()).await.unwrap();

    // Node 0 is the endpoint; node 2 goes down.
    garage.kill(2);
    let (_, fresh_blobs, fresh_dirs) = replica(&garage, &url);
    assert_eq!(read_all(&fresh_blobs, digest).await, data);
    assert_eq!(fresh_dirs.get(&dir_digest).await.unwrap(), Some(dir));
    let more = random(1 << 20);
    let more_digest = blobs.put(&more).await.unwrap();
    assert_eq!(read_all(&fresh_blobs, more_digest).await, more);
}

/// Many small files and a few large ones, stored as an ingest stores them
/// (up to 64 files at once): PUTs stay a few per 8 MiB pack, not one per
/// file or chunk. Prints the figures.
#[tokio::test]
async fn storing_many_files_costs_a_few_puts_per_pack() {
    let garage = tokio::task::spawn_blocking(Garage::shared).await.unwrap();
    let url = garage.store_url(&unique_prefix());
    let (store, blobs, _) = replica(garage, &url);
    let mut files: Vec<Vec<u8>> = (0..2000)
        .map(|i| random(1024 + (i * 7919) % 16384))
        .collect();
    files.extend((0..4).map(|_| random(16 << 20)));
    let bytes: usize = files.iter().map(Vec::len).sum();
    let chunks_before = store.requests();
    let started = std::time::Instant::now();
    let stored: Vec<_> = futures::stream::iter(&files)
        .map(|f| blobs.put(f))
        .buffer_unordered(256)
        .collect()
        .await;
    let elapsed = started.elapsed();
    assert!(stored.iter().all(Result::is_ok));
    let r = store.requests();
    let puts = r.puts - chunks_before.puts;
    let per_gb = puts as f64 * 1e9 / bytes as f64;
    eprintln!(
        "{} files, {:.1} MB: {puts} PUTs ({:.1} MB PUT), {per_gb:.0} PUTs per GB, {:.1} s",
        files.len(),
        bytes as f64 / 1e6,
        (r.put_bytes - chunks_before.put_bytes) as f64 / 1e6,
        elapsed.as_secs_f64()
    );
    // 2004 files and ~1,100 chunks: far fewer requests than either.
    assert!(puts < 80, "{puts} PUTs");
}

/// A chunk damaged in its pack: the read fails, the replica checks its
/// copy and records it, every replica then reports it missing, and
/// storing the blob again stores it anew and clears the record.
#[tokio::test]
async fn a_damaged_chunk_is_quarantined_for_every_replica_until_stored_again() {
    let garage = tokio::task::spawn_blocking(Garage::shared).await.unwrap();
    let url = garage.store_url(&unique_prefix());
    let (store, blobs, _) = replica(garage, &url);
    let service = S3BlobService::new(store.clone(), None);
    let data = random(1 << 20);
    let digest = blobs.put(&data).await.unwrap();
    let meta = blobs.stat(&digest).await.unwrap().unwrap();
    let victim = meta.chunks[1].digest;
    assert!(service.corrupt_chunk(&victim).await.unwrap());

    let (_, other, _) = replica(garage, &url);
    let meta_other = other.stat(&digest).await.unwrap().unwrap();
    assert!(
        other
            .read_range(&digest, &meta_other, 0, 1 << 20)
            .await
            .is_err()
    );
    let other_service = other.service().clone();
    assert_eq!(other_service.quarantined().await.unwrap(), 1);
    assert_eq!(
        other_service.missing_chunks(&[victim]).await.unwrap(),
        vec![victim]
    );
    // A third replica, started since, knows it too.
    let (_, third, _) = replica(garage, &url);
    assert_eq!(
        third.service().missing_chunks(&[victim]).await.unwrap(),
        vec![victim]
    );
    // Stored again through it: read whole by a fresh replica, and no
    // longer recorded.
    third.put(&data).await.unwrap();
    let (_, fresh, _) = replica(garage, &url);
    assert_eq!(read_all(&fresh, digest).await, data);
    assert_eq!(fresh.service().quarantined().await.unwrap(), 0);
}
