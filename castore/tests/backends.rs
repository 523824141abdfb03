//! One suite, every backend: each test runs against everything [`backends`]
//! lists, so a new backend gets the whole suite by adding one line there.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use lazystore_castore::blobs::{
    BlobObserver, ChunkMeta, EncodedChunk, MemoryBlobService, ObservedBlobService, RedbBlobService,
};
use lazystore_castore::directories::{MemoryDirectoryService, RedbDirectoryService};
use lazystore_castore::{
    BlobError, BlobMeta, BlobService, Blobs, ChunkerParams, Digest, Directory, DirectoryError,
    DirectoryService, ErrorClass, Node, PathComponent, RedbOptions, RedbStore, Retryable,
    SymlinkTarget, SyncMode,
};
use rand::RngExt;

/// Flips one byte of a stored chunk; false if the chunk is not stored.
type CorruptChunk = Box<dyn Fn(&Digest) -> bool + Send + Sync>;
/// Flips one byte of a stored directory's encoding; false if not stored.
type CorruptDirectory = Box<dyn Fn(&Digest) -> bool + Send + Sync>;

/// A backend under test.
struct Backend {
    name: &'static str,
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
    params: ChunkerParams,
    /// `None` where the backend gives no way in to its stored bytes; the
    /// corruption tests then skip it, saying so.
    corrupt_chunk: Option<CorruptChunk>,
    corrupt_directory: Option<CorruptDirectory>,
    /// Whatever must outlive the test: a temporary directory, a server.
    _keep: Box<dyn std::any::Any + Send + Sync>,
}

/// Every backend the suite runs against: one line each.
async fn backends() -> Vec<Backend> {
    vec![
        memory().await,
        redb("redb", SyncMode::EveryCommit).await,
        redb("redb-deferred", SyncMode::Deferred).await,
        grpc().await,
        cache().await,
        s3().await,
    ]
}

async fn memory() -> Backend {
    let blobs = Arc::new(MemoryBlobService::new());
    let directories = Arc::new(MemoryDirectoryService::new());
    let (b, d) = (blobs.clone(), directories.clone());
    Backend {
        name: "memory",
        blobs,
        directories,
        params: ChunkerParams::default(),
        corrupt_chunk: Some(Box::new(move |c| b.corrupt_chunk(c, flip_chunk))),
        corrupt_directory: Some(Box::new(move |c| d.corrupt_directory(c, |e| flip(e)))),
        _keep: Box::new(()),
    }
}

async fn redb(name: &'static str, sync: SyncMode) -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let options = RedbOptions {
        sync,
        ..RedbOptions::default()
    };
    let store = RedbStore::open_with(dir.path().join("store.redb"), options).unwrap();
    let blobs = RedbBlobService::new(store.clone());
    let directories = RedbDirectoryService::new(store.clone());
    let (b, d) = (blobs.clone(), directories.clone());
    Backend {
        name,
        blobs: Arc::new(blobs),
        directories: Arc::new(directories),
        params: store.params(),
        corrupt_chunk: Some(Box::new(move |c| b.corrupt_chunk(c, flip_chunk).unwrap())),
        corrupt_directory: Some(Box::new(move |c| {
            d.corrupt_directory(c, |e| flip(e)).unwrap()
        })),
        _keep: Box::new(dir),
    }
}

/// The gRPC clients, against a server on 127.0.0.1 over a redb store: the
/// whole suite through the wire. The corruption hooks damage the server's
/// copy. The server stops with the backend.
async fn grpc() -> Backend {
    use lazystore_castore::blobs::GrpcBlobService;
    use lazystore_castore::directories::GrpcDirectoryService;
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("server.redb")).unwrap();
    let (blobs, directories) = (
        RedbBlobService::new(store.clone()),
        RedbDirectoryService::new(store.clone()),
    );
    let server = common::serve_redb(&store).await;
    let url = server.url.clone();
    Backend {
        name: "grpc",
        blobs: Arc::new(GrpcBlobService::connect_lazy(&url).unwrap()),
        directories: Arc::new(GrpcDirectoryService::connect_lazy(&url).unwrap()),
        params: store.params(),
        corrupt_chunk: Some(Box::new(move |c| {
            blobs.corrupt_chunk(c, flip_chunk).unwrap()
        })),
        corrupt_directory: Some(Box::new(move |c| {
            directories.corrupt_directory(c, |e| flip(e)).unwrap()
        })),
        _keep: Box::new((dir, server)),
    }
}

/// The cache layer: a local cache file in front of the gRPC clients of a
/// server on a redb store. Writes go through to the server, reads are
/// cached; the corruption hook damages the server's copy of a chunk and the
/// cached one, if any, so no good copy is left to read.
async fn cache() -> Backend {
    use lazystore_castore::blobs::{CachingBlobService, GrpcBlobService};
    use lazystore_castore::directories::{CachingDirectoryService, GrpcDirectoryService};
    use lazystore_castore::{CacheOptions, CacheStore};
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("remote.redb")).unwrap();
    let remote_blobs = RedbBlobService::new(store.clone());
    let remote_dirs = RedbDirectoryService::new(store.clone());
    let server = common::serve_redb(&store).await;
    let url = server.url.clone();
    let local = CacheStore::open(dir.path().join("cache.redb"), CacheOptions::default()).unwrap();
    let local_dirs = local.clone();
    let blobs = CachingBlobService::new(
        local.clone(),
        Arc::new(GrpcBlobService::connect_lazy(&url).unwrap()),
    );
    let directories = CachingDirectoryService::new(
        local.clone(),
        Arc::new(GrpcDirectoryService::connect_lazy(&url).unwrap()),
    );
    Backend {
        name: "cache",
        blobs: Arc::new(blobs),
        directories: Arc::new(directories),
        params: store.params(),
        corrupt_chunk: Some(Box::new(move |d| {
            let remote = remote_blobs.corrupt_chunk(d, flip_chunk).unwrap();
            let cached = local.corrupt_chunk(d, flip_chunk).unwrap();
            remote || cached
        })),
        corrupt_directory: Some(Box::new(move |c| {
            let remote = remote_dirs.corrupt_directory(c, |e| flip(e)).unwrap();
            let cached = local_dirs.corrupt_directory(c, flip).unwrap();
            remote || cached
        })),
        _keep: Box::new((dir, server)),
    }
}

/// The S3 backends on the shared Garage cluster of this test process
/// (`lazystore_testkit::garage`), each under a prefix of its own: a fresh
/// store.
async fn s3() -> Backend {
    use lazystore_castore::blobs::S3BlobService;
    use lazystore_castore::directories::S3DirectoryService;
    use lazystore_castore::{S3Options, S3Store};
    use lazystore_testkit::garage::{Garage, unique_prefix};
    let garage = tokio::task::spawn_blocking(Garage::shared).await.unwrap();
    let (key_id, secret) = garage.key();
    let options = S3Options::with_key(key_id, secret);
    let url = garage.store_url(&unique_prefix());
    let store = S3Store::open(&url, options.clone()).unwrap();
    // The hooks are synchronous: each rewrites a pack through a client of
    // its own on a runtime of its own (the test's is blocked meanwhile).
    let (url2, options2) = (url.clone(), options.clone());
    let corrupt_chunk: CorruptChunk = Box::new(move |c| {
        let service = S3BlobService::new(S3Store::open(&url, options.clone()).unwrap(), None);
        let c = *c;
        on_own_runtime(async move { service.corrupt_chunk(&c).await.unwrap() })
    });
    let corrupt_directory: CorruptDirectory = Box::new(move |d| {
        let service = S3DirectoryService::new(S3Store::open(&url2, options2.clone()).unwrap());
        let d = *d;
        on_own_runtime(async move { service.corrupt_directory(&d).await.unwrap() })
    });
    Backend {
        name: "s3",
        blobs: Arc::new(S3BlobService::new(store.clone(), None)),
        directories: Arc::new(S3DirectoryService::new(store)),
        params: ChunkerParams::default(),
        corrupt_chunk: Some(corrupt_chunk),
        corrupt_directory: Some(corrupt_directory),
        _keep: Box::new(()),
    }
}

/// Runs `work` to completion on a new thread and runtime.
fn on_own_runtime<T: Send + 'static>(work: impl Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(work)
    })
    .join()
    .unwrap()
}

fn flip(bytes: &mut [u8]) {
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
}

fn flip_chunk(c: &mut EncodedChunk) {
    let mut data = c.data.to_vec();
    flip(&mut data);
    c.data = data.into();
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill(&mut v[..]);
    v
}

/// Bytes zstd shrinks: short random words, repeated.
fn compressible(len: usize) -> Vec<u8> {
    let mut rng = rand::rng();
    let words: Vec<Vec<u8>> = (0..64).map(|_| random(rng.random_range(3..12))).collect();
    let mut v = Vec::with_capacity(len + 12);
    while v.len() < len {
        v.extend_from_slice(&words[rng.random_range(0..words.len())]);
    }
    v.truncate(len);
    v
}

impl Backend {
    fn blobs(&self) -> Blobs {
        Blobs::new(self.blobs.clone(), self.params)
    }
}

async fn read_all(blobs: &Blobs, digest: Digest) -> Result<Vec<u8>, BlobError> {
    let meta = blobs.stat(&digest).await?.expect("blob is stored");
    let mut r = blobs.reader(digest, meta);
    let mut out = Vec::new();
    while let Some(c) = r.next_chunk().await? {
        out.extend_from_slice(&c);
    }
    Ok(out)
}

fn name(s: &str) -> PathComponent {
    PathComponent::try_from(s).unwrap()
}

fn file(size: u64) -> Node {
    Node::File {
        digest: Digest::of(&size.to_le_bytes()),
        size,
        executable: false,
    }
}

#[tokio::test]
async fn blobs_round_trip_at_boundary_sizes() {
    for b in backends().await {
        let blobs = b.blobs();
        let (min, avg, max) = (
            b.params.min as usize,
            b.params.avg as usize,
            b.params.max as usize,
        );
        for len in [0, 1, min - 1, min, avg, max, max + 1, 10 << 20] {
            let at = format!("{} len {len}", b.name);
            let data = random(len);
            let digest = blobs.put(&data).await.unwrap();
            assert_eq!(digest, Digest::of(&data), "{at}");
            let meta = blobs.stat(&digest).await.unwrap().unwrap();
            assert_eq!(meta.size, len as u64, "{at}");
            assert_eq!(meta.chunks.is_empty(), len == 0, "{at}");
            if len <= min {
                assert!(meta.chunks.len() <= 1, "{at}: {} chunks", meta.chunks.len());
            }
            assert!(meta.chunks.iter().all(|c| c.size <= max as u64), "{at}");
            assert_eq!(read_all(&blobs, digest).await.unwrap(), data, "{at}");
            let whole = blobs
                .read_range(&digest, &meta, 0, len as u64)
                .await
                .unwrap();
            assert_eq!(&whole[..], &data[..], "{at}");
        }
    }
}

#[tokio::test]
async fn range_reads_equal_the_bytes() {
    for b in backends().await {
        let blobs = b.blobs();
        let data = compressible(3 << 20);
        let digest = blobs.put(&data).await.unwrap();
        let meta = blobs.stat(&digest).await.unwrap().unwrap();
        let mut rng = rand::rng();
        for _ in 0..200 {
            let offset = rng.random_range(0..data.len());
            let len = rng.random_range(0..=(data.len() - offset).min(600_000));
            let got = blobs
                .read_range(&digest, &meta, offset as u64, len as u64)
                .await
                .unwrap();
            assert_eq!(&got[..], &data[offset..offset + len], "{}", b.name);
        }
        // Chunk boundaries exactly, and one byte either side.
        let mut start = 0u64;
        for c in &meta.chunks {
            for (offset, len) in [(start, c.size), (start.saturating_sub(1), 2)] {
                let len = len.min(meta.size - offset);
                let got = blobs.read_range(&digest, &meta, offset, len).await.unwrap();
                let (o, l) = (offset as usize, len as usize);
                assert_eq!(&got[..], &data[o..o + l], "{}", b.name);
            }
            start += c.size;
        }
        let end = data.len() as u64;
        assert!(
            blobs
                .read_range(&digest, &meta, end, 0)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(matches!(
            blobs.read_range(&digest, &meta, end, 1).await,
            Err(BlobError::OutOfRange { .. })
        ));
        assert!(matches!(
            blobs.read_range(&digest, &meta, u64::MAX, 2).await,
            Err(BlobError::OutOfRange { .. })
        ));
    }
}

#[tokio::test]
async fn one_inserted_byte_adds_at_most_three_chunks() {
    for b in backends().await {
        let blobs = b.blobs();
        let data = random(10 << 20);
        let a = blobs.put(&data).await.unwrap();
        let mut edited = data.clone();
        edited.insert(data.len() / 2, 0x5a);
        let e = blobs.put(&edited).await.unwrap();
        let old: HashSet<Digest> = blobs
            .stat(&a)
            .await
            .unwrap()
            .unwrap()
            .chunks
            .iter()
            .map(|c| c.digest)
            .collect();
        let new = blobs.stat(&e).await.unwrap().unwrap().chunks;
        let added = new.iter().filter(|c| !old.contains(&c.digest)).count();
        assert!(added <= 3, "{}: {added} new chunks", b.name);
        assert_eq!(read_all(&blobs, e).await.unwrap(), edited, "{}", b.name);
    }
}

/// Counts the chunks put.
#[derive(Default)]
struct CountingPuts {
    chunks_put: AtomicUsize,
}

impl BlobObserver for CountingPuts {
    fn before_put(&self, chunks: &[EncodedChunk]) {
        self.chunks_put.fetch_add(chunks.len(), Ordering::Relaxed);
    }
}

/// Over the network, even a file smaller than one chunk is sent only if the
/// server lacks it: the writer asks first.
#[tokio::test]
async fn uploads_send_only_missing_chunks_however_small() {
    for b in backends().await {
        let remote = matches!(b.name, "grpc" | "cache" | "s3");
        assert_eq!(b.blobs.uploads_travel(), remote, "{}", b.name);
        if !remote {
            continue;
        }
        let counting = Arc::new(CountingPuts::default());
        let observed = ObservedBlobService::new(b.blobs.clone(), counting.clone());
        let blobs = Blobs::new(Arc::new(observed), b.params);
        for len in [1, 1000, 40_000] {
            let data = random(len);
            let before = counting.chunks_put.load(Ordering::Relaxed);
            let digest = blobs.put(&data).await.unwrap();
            let n = blobs.stat(&digest).await.unwrap().unwrap().chunks.len();
            assert_eq!(counting.chunks_put.load(Ordering::Relaxed), before + n);
            blobs.put(&data).await.unwrap();
            assert_eq!(
                counting.chunks_put.load(Ordering::Relaxed),
                before + n,
                "{}: {len} bytes sent twice",
                b.name
            );
        }
    }
}

#[tokio::test]
async fn second_put_of_the_same_data_stores_no_chunk() {
    for b in backends().await {
        let counting = Arc::new(CountingPuts::default());
        let observed = ObservedBlobService::new(b.blobs.clone(), counting.clone());
        let blobs = Blobs::new(Arc::new(observed), b.params);
        let data = compressible(2 << 20);
        let first = blobs.put(&data).await.unwrap();
        let n = blobs.stat(&first).await.unwrap().unwrap().chunks.len();
        assert_eq!(counting.chunks_put.load(Ordering::Relaxed), n, "{}", b.name);
        let second = blobs.put(&data).await.unwrap();
        assert_eq!(first, second);
        assert_eq!(counting.chunks_put.load(Ordering::Relaxed), n, "{}", b.name);

        // The backend itself keeps a chunk put twice once and intact.
        let chunk = EncodedChunk::encode(random(1000).into());
        b.blobs
            .put_chunks(vec![chunk.clone(), chunk.clone()])
            .await
            .unwrap();
        b.blobs.put_chunks(vec![chunk.clone()]).await.unwrap();
        let back = b.blobs.read_chunks(&[chunk.digest]).await.unwrap();
        assert_eq!(back, vec![chunk], "{}", b.name);
    }
}

#[tokio::test]
async fn missing_chunks_lists_the_absent_in_the_order_asked() {
    for b in backends().await {
        let stored: Vec<EncodedChunk> = (0..3)
            .map(|_| EncodedChunk::encode(random(100).into()))
            .collect();
        b.blobs.put_chunks(stored.clone()).await.unwrap();
        let absent: Vec<Digest> = (0..3).map(|i| Digest::of(&[i, 1, 2])).collect();
        let ask = vec![
            absent[2],
            stored[0].digest,
            absent[0],
            stored[2].digest,
            stored[1].digest,
            absent[1],
        ];
        assert_eq!(
            b.blobs.missing_chunks(&ask).await.unwrap(),
            vec![absent[2], absent[0], absent[1]],
            "{}",
            b.name
        );
        assert!(b.blobs.missing_chunks(&[]).await.unwrap().is_empty());
        let all: Vec<Digest> = stored.iter().map(|c| c.digest).collect();
        assert!(b.blobs.missing_chunks(&all).await.unwrap().is_empty());
        // Read back in the order asked, and an unknown one is an error.
        let order = [all[2], all[0], all[1], all[0]];
        let back = b.blobs.read_chunks(&order).await.unwrap();
        assert_eq!(back.iter().map(|c| c.digest).collect::<Vec<_>>(), order);
        assert!(matches!(
            b.blobs.read_chunks(&[all[0], absent[0]]).await,
            Err(BlobError::ChunkNotFound(d)) if d == absent[0]
        ));
    }
}

/// `stat_many` answers each blob asked, in order, an unknown one as `None`,
/// however many are asked: more than one gRPC `StatMany` may carry
/// (`MAX_STAT_BLOBS`), repeats, and none.
#[tokio::test]
async fn stat_many_answers_each_blob_in_the_order_asked() {
    for b in backends().await {
        let mut known = Vec::new();
        for len in [100, 200, 300] {
            let chunk = EncodedChunk::encode(random(len).into());
            let only = vec![ChunkMeta {
                digest: chunk.digest,
                size: len as u64,
            }];
            let blob = Digest::of(&chunk.digest.as_bytes()[..8]);
            let meta = BlobMeta::new(blob, len as u64, only).unwrap();
            b.blobs
                .put_chunks_and_blob(vec![chunk], blob, meta.clone())
                .await
                .unwrap();
            known.push((blob, meta));
        }
        let unknown = Digest::of(b"never a blob");
        let mut ask = Vec::new();
        let mut expected = Vec::new();
        for i in 0..1100 {
            if i % 4 == 3 {
                ask.push(unknown);
                expected.push(None);
            } else {
                let (blob, meta) = &known[(i * 7) % 3];
                ask.push(*blob);
                expected.push(Some(meta.clone()));
            }
        }
        let blobs = b.blobs();
        assert_eq!(blobs.stat_many(&ask).await.unwrap(), expected, "{}", b.name);
        // Again: from a cache's copies this time, where there is a cache.
        assert_eq!(blobs.stat_many(&ask).await.unwrap(), expected, "{}", b.name);
        assert_eq!(
            blobs.stat_many(&[unknown, known[1].0]).await.unwrap(),
            vec![None, Some(known[1].1.clone())],
            "{}",
            b.name
        );
        assert_eq!(blobs.stat_many(&[unknown]).await.unwrap(), vec![None]);
        assert!(blobs.stat_many(&[]).await.unwrap().is_empty(), "{}", b.name);
    }
}

#[tokio::test]
async fn put_blob_refuses_missing_chunks() {
    for b in backends().await {
        let present = EncodedChunk::encode(random(500).into());
        b.blobs.put_chunks(vec![present.clone()]).await.unwrap();
        let absent = Digest::of(b"never stored");
        let chunks = vec![
            ChunkMeta {
                digest: present.digest,
                size: 500,
            },
            ChunkMeta {
                digest: absent,
                size: 12,
            },
        ];
        let blob = Digest::of(b"some blob");
        let meta = BlobMeta::new(blob, 512, chunks).unwrap();
        assert!(
            matches!(
                b.blobs.put_blob(blob, meta).await,
                Err(BlobError::ChunkNotFound(d)) if d == absent
            ),
            "{}",
            b.name
        );
        assert_eq!(b.blobs.stat(&blob).await.unwrap(), None, "{}", b.name);

        // With the chunk there, the same list is accepted and read back.
        let only = vec![ChunkMeta {
            digest: present.digest,
            size: 500,
        }];
        let meta = BlobMeta::new(blob, 500, only).unwrap();
        b.blobs.put_blob(blob, meta.clone()).await.unwrap();
        assert_eq!(b.blobs.stat(&blob).await.unwrap(), Some(meta), "{}", b.name);
    }
}

#[tokio::test]
async fn corrupt_chunk_fails_its_range_and_returns_no_bytes() {
    for b in backends().await {
        let Some(corrupt) = &b.corrupt_chunk else {
            eprintln!("{}: no way to corrupt a chunk, skipped", b.name);
            continue;
        };
        let blobs = b.blobs();
        // Random bytes are stored raw, repetitive ones zstd-compressed:
        // damage to either is caught.
        for data in [random(1 << 20), compressible(1 << 20)] {
            let digest = blobs.put(&data).await.unwrap();
            let meta = blobs.stat(&digest).await.unwrap().unwrap();
            assert!(meta.chunks.len() >= 3, "{}", b.name);
            let victim = meta.chunks[1];
            let victim_at = meta.chunks[0].size;
            assert!(corrupt(&victim.digest), "{}", b.name);
            let err = blobs
                .read_range(&digest, &meta, victim_at + 10, 100)
                .await
                .expect_err(b.name);
            assert!(
                matches!(err, BlobError::Corrupt { chunk, .. } | BlobError::Decompress { chunk, .. } if chunk == victim.digest),
                "{}: {err}",
                b.name
            );
            // A range straddling into it fails too; one that misses it reads.
            assert!(
                blobs
                    .read_range(&digest, &meta, victim_at - 5, 10)
                    .await
                    .is_err()
            );
            let after = victim_at + victim.size;
            let ok = blobs.read_range(&digest, &meta, after, 100).await.unwrap();
            let a = after as usize;
            assert_eq!(&ok[..], &data[a..a + 100], "{}", b.name);
            assert!(read_all(&blobs, digest).await.is_err(), "{}", b.name);
        }
        assert!(!corrupt(&Digest::of(b"not stored")));
    }
}

#[tokio::test]
async fn directories_round_trip() {
    for b in backends().await {
        let dirs = &b.directories;
        let empty = Directory::new();
        assert_eq!(dirs.put(empty.clone()).await.unwrap(), Digest::EMPTY);
        assert_eq!(dirs.get(&Digest::EMPTY).await.unwrap(), Some(empty.clone()));

        let mut leaf = Directory::new();
        leaf.add(name("a.txt"), file(3)).unwrap();
        leaf.add(
            name("link"),
            Node::Symlink {
                target: SymlinkTarget::try_from(&b"../a.txt"[..]).unwrap(),
            },
        )
        .unwrap();
        let mut root = Directory::new();
        root.add(name("bin"), Node::directory(&leaf)).unwrap();
        root.add(name("empty"), Node::directory(&empty)).unwrap();
        root.add(
            name("run"),
            Node::File {
                digest: Digest::of(b"#!/bin/sh"),
                size: 9,
                executable: true,
            },
        )
        .unwrap();
        let leaf_digest = dirs.put(leaf.clone()).await.unwrap();
        assert_eq!(leaf_digest, leaf.digest());
        let root_digest = dirs.put(root.clone()).await.unwrap();
        assert_eq!(root_digest, root.digest());
        assert_eq!(dirs.get(&root_digest).await.unwrap(), Some(root.clone()));
        assert_eq!(dirs.get(&leaf_digest).await.unwrap(), Some(leaf.clone()));
        assert_eq!(dirs.get(&Digest::of(b"unknown")).await.unwrap(), None);
        // A second put of a stored directory is fine.
        assert_eq!(
            dirs.put(root.clone()).await.unwrap(),
            root_digest,
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn directory_put_refuses_missing_child_or_wrong_size() {
    for b in backends().await {
        let dirs = &b.directories;
        let mut child = Directory::new();
        child.add(name("f"), file(1)).unwrap();
        let mut parent = Directory::new();
        parent.add(name("sub"), Node::directory(&child)).unwrap();
        let err = dirs.put(parent.clone()).await.unwrap_err();
        assert!(
            matches!(&err, DirectoryError::MissingChild { child: c, digest, .. }
                if c == "sub" && *digest == child.digest()),
            "{}: {err}",
            b.name
        );
        assert_eq!(dirs.get(&parent.digest()).await.unwrap(), None);

        dirs.put(child.clone()).await.unwrap();
        let mut lying = Directory::new();
        lying
            .add(
                name("sub"),
                Node::Directory {
                    digest: child.digest(),
                    size: child.size() + 1,
                },
            )
            .unwrap();
        let err = dirs.put(lying.clone()).await.unwrap_err();
        assert!(
            matches!(err, DirectoryError::SizeMismatch { recorded, actual, .. }
                if recorded == child.size() + 1 && actual == child.size()),
            "{}: {err}",
            b.name
        );
        assert_eq!(dirs.get(&lying.digest()).await.unwrap(), None);
        assert_eq!(dirs.put(parent.clone()).await.unwrap(), parent.digest());

        // put_all: leaves first is accepted, root last is returned; a tree
        // given root first is refused.
        let mut c2 = Directory::new();
        c2.add(name("g"), file(2)).unwrap();
        let mut p2 = Directory::new();
        p2.add(name("c2"), Node::directory(&c2)).unwrap();
        assert!(dirs.put_all(vec![p2.clone(), c2.clone()]).await.is_err());
        assert_eq!(
            dirs.put_all(vec![c2.clone(), p2.clone()]).await.unwrap(),
            Some(p2.digest()),
            "{}",
            b.name
        );
        assert_eq!(dirs.put_all(vec![]).await.unwrap(), None);
    }
}

#[tokio::test]
async fn get_recursive_is_breadth_first_each_once() {
    for b in backends().await {
        let dirs = &b.directories;
        // root → {a, b}; a → {shared}; b → {shared, c}; shared and c leaves.
        let mut shared = Directory::new();
        shared.add(name("s"), file(1)).unwrap();
        let mut c = Directory::new();
        c.add(name("c"), file(2)).unwrap();
        let mut a = Directory::new();
        a.add(name("shared"), Node::directory(&shared)).unwrap();
        let mut bd = Directory::new();
        bd.add(name("c"), Node::directory(&c)).unwrap();
        bd.add(name("shared"), Node::directory(&shared)).unwrap();
        let mut root = Directory::new();
        root.add(name("a"), Node::directory(&a)).unwrap();
        root.add(name("b"), Node::directory(&bd)).unwrap();
        let root_digest = dirs
            .put_all(vec![
                shared.clone(),
                c.clone(),
                a.clone(),
                bd.clone(),
                root.clone(),
            ])
            .await
            .unwrap()
            .unwrap();
        let got = dirs.get_recursive(&root_digest).await.unwrap();
        assert_eq!(got, vec![root, a, bd, shared, c], "{}", b.name);
        assert!(matches!(
            dirs.get_recursive(&Digest::of(b"unknown")).await,
            Err(DirectoryError::NotFound(_))
        ));
    }
}

/// A tree wider than a server's batch of directories (64), with a
/// subtree shared by many parents: `get_recursive` is still breadth first,
/// each directory once, and `get_many` answers in the order asked.
#[tokio::test]
async fn wide_trees_come_whole_and_in_order() {
    for b in backends().await {
        let dirs = &b.directories;
        let mut shared = Directory::new();
        shared.add(name("s"), file(1)).unwrap();
        let mut all = vec![shared.clone()];
        let mut root = Directory::new();
        let mut middles = Vec::new();
        for i in 0..150u64 {
            let mut leaf = Directory::new();
            leaf.add(name("f"), file(i + 2)).unwrap();
            let mut middle = Directory::new();
            middle.add(name("leaf"), Node::directory(&leaf)).unwrap();
            middle
                .add(name("shared"), Node::directory(&shared))
                .unwrap();
            root.add(name(&format!("d{i:03}")), Node::directory(&middle))
                .unwrap();
            all.push(leaf);
            middles.push(middle);
        }
        all.extend(middles.iter().cloned());
        all.push(root.clone());
        let root_digest = dirs.put_all(all).await.unwrap().unwrap();

        // Breadth first: the root, its 150 children in name order, then
        // the next level in the order their parents came, each once.
        let mut want = vec![root.clone()];
        want.extend(middles.iter().cloned());
        let mut seen = HashSet::new();
        for m in &middles {
            for (_, child, _) in m.subdirectories() {
                if seen.insert(child) {
                    want.push(dirs.get(&child).await.unwrap().unwrap());
                }
            }
        }
        assert_eq!(want.len(), 1 + 150 + 150 + 1);
        let got = dirs.get_recursive(&root_digest).await.unwrap();
        assert!(got == want, "{}: {} directories", b.name, got.len());

        let unknown = Digest::of(b"unknown");
        let ask = [
            middles[3].digest(),
            unknown,
            root_digest,
            middles[3].digest(),
        ];
        let got = dirs.get_many(&ask).await.unwrap();
        let want = vec![
            Some(middles[3].clone()),
            None,
            Some(root.clone()),
            Some(middles[3].clone()),
        ];
        assert!(got == want, "{}", b.name);
        assert!(dirs.get_many(&[]).await.unwrap().is_empty(), "{}", b.name);
    }
}

#[tokio::test]
async fn corrupt_directory_fails_get() {
    for b in backends().await {
        let Some(corrupt) = &b.corrupt_directory else {
            eprintln!("{}: no way to corrupt a directory, skipped", b.name);
            continue;
        };
        let mut leaf = Directory::new();
        leaf.add(name("x"), file(5)).unwrap();
        leaf.add(name("y"), file(6)).unwrap();
        let mut root = Directory::new();
        root.add(name("leaf"), Node::directory(&leaf)).unwrap();
        let root_digest = b
            .directories
            .put_all(vec![leaf.clone(), root])
            .await
            .unwrap()
            .unwrap();
        assert!(corrupt(&leaf.digest()));
        let err = b.directories.get(&leaf.digest()).await.unwrap_err();
        // A server that finds its own copy damaged says so (DATA_LOSS), and
        // the client passes that on as a backend failure naming the digest.
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(e) = source {
            text += &format!(": {e}");
            source = e.source();
        }
        let named = text.contains(&leaf.digest().to_string());
        assert!(
            matches!(err, DirectoryError::Invalid(_))
                || (matches!(err, DirectoryError::Backend(_)) && named),
            "{}: {text}",
            b.name
        );
        // Whichever variant, it is classed as damage, not as an outage.
        assert_eq!(err.class(), ErrorClass::Corrupt, "{}: {text}", b.name);
        assert!(b.directories.get_recursive(&root_digest).await.is_err());
        // Putting it again repairs it.
        b.directories.put(leaf.clone()).await.unwrap();
        assert_eq!(b.directories.get(&leaf.digest()).await.unwrap(), Some(leaf));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_overlapping_reads_and_writes() {
    for b in backends().await {
        let b = Arc::new(b);
        // Four shared bases; each task writes a base with its own tail, so
        // tasks race to store the same chunks.
        let bases: Arc<Vec<Vec<u8>>> = Arc::new((0..4).map(|_| random(600_000)).collect());
        let mut tasks = Vec::new();
        for t in 0..24usize {
            let (b, bases) = (b.clone(), bases.clone());
            tasks.push(tokio::spawn(async move {
                let blobs = b.blobs();
                let mut data = bases[t % 4].clone();
                data.extend_from_slice(&(t / 4).to_le_bytes());
                let digest = blobs.put(&data).await.unwrap();
                let meta = blobs.stat(&digest).await.unwrap().unwrap();
                assert_eq!(read_all(&blobs, digest).await.unwrap(), data);
                let got = blobs
                    .read_range(&digest, &meta, 1000, 300_000)
                    .await
                    .unwrap();
                assert_eq!(&got[..], &data[1000..301_000]);

                let mut leaf = Directory::new();
                leaf.add(name("f"), file((t % 3) as u64)).unwrap();
                let mut root = Directory::new();
                root.add(name("d"), Node::directory(&leaf)).unwrap();
                let r = b.directories.put_all(vec![leaf, root.clone()]).await;
                assert_eq!(r.unwrap(), Some(root.digest()));
                assert_eq!(b.directories.get(&root.digest()).await.unwrap(), Some(root));
            }));
        }
        for t in tasks {
            t.await.unwrap_or_else(|e| panic!("{}: {e}", b.name));
        }
    }
}
