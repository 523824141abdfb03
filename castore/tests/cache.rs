//! The cache layer: a local cache file in front of a remote store. What a
//! cache must do beyond the backend suite (which it also runs): serve what
//! it holds without the remote, replace a damaged local copy from the
//! remote, never cache or return a damaged remote one, stay within its
//! bound by evicting the least recently used, and keep its accounting
//! across a reopen.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use lazystore_castore::blobs::{
    BlobObserver, CachingBlobService, EncodedChunk, MemoryBlobService, ObservedBlobService,
};
use lazystore_castore::directories::{CachingDirectoryService, MemoryDirectoryService};
use lazystore_castore::{
    BlobError, BlobService, Blobs, CacheOptions, CacheStats, CacheStore, ChunkerParams, Digest,
    Directory, DirectoryError, DirectoryService, Node, PathComponent,
};
use rand::RngExt;

/// The file-size test measures how redb reuses freed pages, which the I/O
/// of tests running beside it perturbs (the file settles at 1.6 times the
/// bound instead of 1.3): it runs alone, the others share.
static ALONE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

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

fn flip(bytes: &mut [u8]) {
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
}

fn flip_chunk(c: &mut EncodedChunk) {
    let mut data = c.data.to_vec();
    flip(&mut data);
    c.data = data.into();
}

/// Counts what is asked of the remote.
#[derive(Default)]
struct Calls {
    stats: AtomicUsize,
    chunks_read: AtomicUsize,
}

impl Calls {
    fn calls(&self) -> (usize, usize) {
        (
            self.stats.load(Ordering::SeqCst),
            self.chunks_read.load(Ordering::SeqCst),
        )
    }
}

#[async_trait]
impl BlobObserver for Calls {
    fn before_stat(&self, _blob: &Digest) {
        self.stats.fetch_add(1, Ordering::SeqCst);
    }

    async fn before_read(&self, chunks: &[Digest]) -> Result<(), BlobError> {
        self.chunks_read.fetch_add(chunks.len(), Ordering::SeqCst);
        Ok(())
    }
}

/// A memory blob store that counts what is asked of it.
type CountingBlobs = ObservedBlobService<Calls>;

/// A memory directory store that counts gets.
#[derive(Default)]
struct CountingDirs {
    inner: MemoryDirectoryService,
    gets: AtomicUsize,
}

#[async_trait]
impl DirectoryService for CountingDirs {
    async fn get(&self, digest: &Digest) -> Result<Option<Directory>, DirectoryError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(digest).await
    }
    async fn put(&self, dir: Directory) -> Result<Digest, DirectoryError> {
        self.inner.put(dir).await
    }
    async fn get_recursive(&self, root: &Digest) -> Result<Vec<Directory>, DirectoryError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get_recursive(root).await
    }
}

/// A remote, and a cache of it in a temporary file.
struct Fixture {
    dir: tempfile::TempDir,
    remote: Arc<CountingBlobs>,
    /// The remote's store, to damage it.
    remote_memory: Arc<MemoryBlobService>,
    remote_dirs: Arc<CountingDirs>,
    local: CacheStore,
    cache: Arc<CachingBlobService>,
}

impl Fixture {
    /// Which of `chunks` the cache holds once what it queued is written
    /// (evicting what no longer fits).
    fn held(&self, chunks: &[Digest]) -> Vec<bool> {
        self.local.write_queued();
        chunks
            .iter()
            .map(|x| self.local.contains_chunk(x))
            .collect()
    }

    /// The cache's stats once what it queued is written.
    fn stats(&self) -> CacheStats {
        self.local.write_queued();
        self.local.stats()
    }

    fn new(max_bytes: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let remote_memory = Arc::new(MemoryBlobService::new());
        let remote = Arc::new(ObservedBlobService::new(
            remote_memory.clone(),
            Calls::default(),
        ));
        let local =
            CacheStore::open(dir.path().join("cache.redb"), CacheOptions { max_bytes }).unwrap();
        let cache = Arc::new(CachingBlobService::new(local.clone(), remote.clone()));
        Fixture {
            dir,
            remote,
            remote_memory,
            remote_dirs: Arc::default(),
            local,
            cache,
        }
    }

    /// Closes the cache and opens it again, with `max_bytes`.
    fn reopen(self, max_bytes: u64) -> Self {
        let Fixture {
            dir,
            remote,
            remote_memory,
            remote_dirs,
            local,
            cache,
        } = self;
        drop((local, cache));
        let local =
            CacheStore::open(dir.path().join("cache.redb"), CacheOptions { max_bytes }).unwrap();
        let cache = Arc::new(CachingBlobService::new(local.clone(), remote.clone()));
        Fixture {
            dir,
            remote,
            remote_memory,
            remote_dirs,
            local,
            cache,
        }
    }

    /// Writes to the remote directly.
    fn remote_blobs(&self) -> Blobs {
        Blobs::new(self.remote.clone(), ChunkerParams::default())
    }

    /// Reads through the cache.
    fn blobs(&self) -> Blobs {
        Blobs::new(self.cache.clone(), ChunkerParams::default())
    }

    fn dirs(&self) -> CachingDirectoryService {
        CachingDirectoryService::new(self.local.clone(), self.remote_dirs.clone())
    }

    /// Stores single-chunk blobs of random bytes (stored raw, so each costs
    /// the same) on the remote.
    async fn put_chunks(&self, n: usize, len: usize) -> Vec<Digest> {
        let chunks: Vec<EncodedChunk> = (0..n)
            .map(|_| EncodedChunk::encode(random(len).into()))
            .collect();
        let digests = chunks.iter().map(|c| c.digest).collect();
        self.remote.put_chunks(chunks).await.unwrap();
        digests
    }

    /// Reads one chunk through the cache, verified.
    async fn read(&self, chunk: Digest) -> Vec<u8> {
        let got = self.blobs().read_chunks_verified(&[chunk]).await.unwrap();
        got[0].to_vec()
    }

    /// The cached copy of `chunk`, decoded, or `None`.
    fn cached(&self, chunk: &Digest) -> Option<Result<bytes::Bytes, BlobError>> {
        self.local.stored_chunk(chunk).unwrap().map(|c| c.decode())
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

/// The cost of one cached chunk of `len` random bytes, found by caching one.
async fn cost_of_chunk(len: usize) -> u64 {
    let f = Fixture::new(u64::MAX);
    let c = f.put_chunks(1, len).await;
    f.read(c[0]).await;
    f.stats().bytes
}

#[tokio::test]
async fn damaged_cached_chunk_is_refetched_and_replaced() {
    let _shared = ALONE.read().await;
    let f = Fixture::new(1 << 30);
    // Random bytes are stored raw, repetitive ones zstd-compressed.
    for data in [random(1 << 20), compressible(1 << 20)] {
        let digest = f.remote_blobs().put(&data).await.unwrap();
        let blobs = f.blobs();
        assert_eq!(read_all(&blobs, digest).await.unwrap(), data);
        let meta = blobs.stat(&digest).await.unwrap().unwrap();
        let victim = meta.chunks[1];
        let victim_at = meta.chunks[0].size;
        assert!(f.cached(&victim.digest).unwrap().is_ok());

        assert!(f.local.corrupt_chunk(&victim.digest, flip_chunk).unwrap());
        assert!(f.cached(&victim.digest).unwrap().is_err());

        let (_, before) = f.remote.observer().calls();
        let got = blobs
            .read_range(&digest, &meta, victim_at + 10, 100)
            .await
            .unwrap();
        let at = victim_at as usize + 10;
        assert_eq!(&got[..], &data[at..at + 100]);
        // Only the damaged chunk came from the remote.
        assert_eq!(f.remote.observer().calls().1, before + 1);
        // The cached copy is the remote's, byte for byte, and verifies.
        let remote_copy = f.remote_memory.read_chunks(&[victim.digest]).await.unwrap();
        assert_eq!(
            f.local.stored_chunk(&victim.digest).unwrap().unwrap(),
            remote_copy[0]
        );
        assert!(f.cached(&victim.digest).unwrap().is_ok());
        // And it serves the next read without the remote.
        assert_eq!(read_all(&blobs, digest).await.unwrap(), data);
        assert_eq!(f.remote.observer().calls().1, before + 1);
    }
}

#[tokio::test]
async fn damaged_remote_chunk_fails_naming_it_and_is_not_cached() {
    let _shared = ALONE.read().await;
    let f = Fixture::new(1 << 30);
    let data = compressible(1 << 20);
    let digest = f.remote_blobs().put(&data).await.unwrap();
    let blobs = f.blobs();
    let meta = blobs.stat(&digest).await.unwrap().unwrap();
    let victim = meta.chunks[1];
    let victim_at = meta.chunks[0].size;
    assert!(f.remote_memory.corrupt_chunk(&victim.digest, flip_chunk));

    let err = blobs
        .read_range(&digest, &meta, victim_at + 10, 100)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BlobError::Corrupt { chunk, .. } | BlobError::Decompress { chunk, .. } if chunk == victim.digest),
        "{err}"
    );
    assert!(!f.local.contains_chunk(&victim.digest));
    assert!(f.cached(&victim.digest).is_none());

    // Both copies damaged: still an error, and the damaged local copy is
    // dropped rather than kept.
    let other = meta.chunks[2];
    let other_at = victim_at + victim.size;
    blobs
        .read_range(&digest, &meta, other_at, 10)
        .await
        .unwrap();
    assert!(f.local.contains_chunk(&other.digest));
    assert!(f.local.corrupt_chunk(&other.digest, flip_chunk).unwrap());
    assert!(f.remote_memory.corrupt_chunk(&other.digest, flip_chunk));
    let err = blobs
        .read_range(&digest, &meta, other_at, 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BlobError::Corrupt { chunk, .. } | BlobError::Decompress { chunk, .. } if chunk == other.digest),
        "{err}"
    );
    assert!(!f.local.contains_chunk(&other.digest));
    assert!(f.cached(&other.digest).is_none());
}

#[tokio::test]
async fn cached_reads_do_not_touch_the_remote() {
    let _shared = ALONE.read().await;
    let f = Fixture::new(1 << 30);
    let data = compressible(3 << 20);
    let digest = f.remote_blobs().put(&data).await.unwrap();
    let blobs = f.blobs();
    assert_eq!(read_all(&blobs, digest).await.unwrap(), data);
    let n = blobs.stat(&digest).await.unwrap().unwrap().chunks.len();
    assert_eq!(f.remote.observer().calls(), (1, n));
    let meta = blobs.stat(&digest).await.unwrap().unwrap();
    assert_eq!(read_all(&blobs, digest).await.unwrap(), data);
    let got = blobs
        .read_range(&digest, &meta, 1000, 2 << 20)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[1000..1000 + (2 << 20)]);
    assert_eq!(
        f.remote.observer().calls(),
        (1, n),
        "cached reads went to the remote"
    );
    let stats = f.stats();
    assert_eq!((stats.chunks, stats.blobs), (n as u64, 1));

    // Directories: one get of each from the remote, then none.
    let mut leaf = Directory::new();
    leaf.add(
        PathComponent::try_from("f").unwrap(),
        Node::File {
            digest,
            size: data.len() as u64,
            executable: false,
        },
    )
    .unwrap();
    let mut root = Directory::new();
    root.add(
        PathComponent::try_from("d").unwrap(),
        Node::directory(&leaf),
    )
    .unwrap();
    f.remote_dirs
        .put_all(vec![leaf.clone(), root.clone()])
        .await
        .unwrap();
    let dirs = f.dirs();
    assert_eq!(dirs.get(&leaf.digest()).await.unwrap(), Some(leaf.clone()));
    let tree = dirs.get_recursive(&root.digest()).await.unwrap();
    assert_eq!(tree, vec![root.clone(), leaf.clone()]);
    let gets = f.remote_dirs.gets.load(Ordering::SeqCst);
    assert_eq!(gets, 2);
    assert_eq!(dirs.get(&root.digest()).await.unwrap(), Some(root.clone()));
    assert_eq!(dirs.get_recursive(&root.digest()).await.unwrap(), tree);
    assert_eq!(f.remote_dirs.gets.load(Ordering::SeqCst), gets);
    // Unknown ones are asked for every time: they may appear later.
    assert_eq!(dirs.get(&Digest::of(b"unknown")).await.unwrap(), None);
    assert_eq!(dirs.get(&Digest::of(b"unknown")).await.unwrap(), None);
    assert_eq!(f.remote_dirs.gets.load(Ordering::SeqCst), gets + 2);
}

#[tokio::test]
async fn damaged_cached_directory_and_chunk_list_are_refetched() {
    let _shared = ALONE.read().await;
    let f = Fixture::new(1 << 30);
    let mut leaf = Directory::new();
    leaf.add(
        PathComponent::try_from("x").unwrap(),
        Node::File {
            digest: Digest::of(b"x"),
            size: 1,
            executable: true,
        },
    )
    .unwrap();
    f.remote_dirs.put(leaf.clone()).await.unwrap();
    let dirs = f.dirs();
    assert_eq!(dirs.get(&leaf.digest()).await.unwrap(), Some(leaf.clone()));
    assert!(f.local.corrupt_directory(&leaf.digest(), flip).unwrap());
    assert_eq!(dirs.get(&leaf.digest()).await.unwrap(), Some(leaf.clone()));
    assert_eq!(f.remote_dirs.gets.load(Ordering::SeqCst), 2);
    assert_eq!(dirs.get(&leaf.digest()).await.unwrap(), Some(leaf.clone()));
    assert_eq!(f.remote_dirs.gets.load(Ordering::SeqCst), 2);

    let data = random(300_000);
    let digest = f.remote_blobs().put(&data).await.unwrap();
    let blobs = f.blobs();
    let meta = blobs.stat(&digest).await.unwrap().unwrap();
    // Any damaged byte, the first (of the checksum) or the last (a chunk
    // size), is caught.
    for at in [0, 1000, usize::MAX] {
        assert!(
            f.local
                .corrupt_chunk_list(&digest, |r| {
                    let i = at.min(r.len() - 1);
                    r[i] ^= 1;
                })
                .unwrap()
        );
        let (stats, _) = f.remote.observer().calls();
        assert_eq!(blobs.stat(&digest).await.unwrap(), Some(meta.clone()));
        assert_eq!(f.remote.observer().calls().0, stats + 1);
        assert_eq!(blobs.stat(&digest).await.unwrap(), Some(meta.clone()));
        assert_eq!(f.remote.observer().calls().0, stats + 1);
    }
}

#[tokio::test]
async fn evicts_the_least_recently_used() {
    let _shared = ALONE.read().await;
    const LEN: usize = 50_000;
    let cost = cost_of_chunk(LEN).await;
    assert!(cost > LEN as u64);
    let bound = 2 * cost + cost / 2;
    let f = Fixture::new(bound);
    let c = f.put_chunks(4, LEN).await;
    let (a, b, cc, d) = (c[0], c[1], c[2], c[3]);
    let held = |f: &Fixture| f.held(&c);

    for x in [a, b, cc] {
        f.read(x).await;
    }
    assert_eq!(held(&f), [false, true, true, false]);
    assert_eq!(f.stats().bytes, 2 * cost);
    assert!(f.cached(&a).is_none());

    // B is read again (from the cache), so C is now the least recent.
    let (_, before) = f.remote.observer().calls();
    f.read(b).await;
    assert_eq!(f.remote.observer().calls().1, before);
    f.read(d).await;
    assert_eq!(held(&f), [false, true, false, true]);
    assert!(f.cached(&cc).is_none());
    assert!(f.stats().bytes <= bound);
    // A comes back from the remote, and pushes out B.
    f.read(a).await;
    assert_eq!(f.remote.observer().calls().1, before + 2);
    assert_eq!(held(&f), [true, false, false, true]);
}

#[tokio::test]
async fn queued_records_are_found_and_written_at_close() {
    let _shared = ALONE.read().await;
    const LEN: usize = 30_000;
    let mut f = Fixture::new(1 << 30);
    let c = f.put_chunks(3, LEN).await;
    let mut read = Vec::new();
    for &x in &c {
        read.push(f.read(x).await);
    }
    let fetched = f.remote.observer().calls().1;
    // Found while queued (a writer may have stored some by now): read
    // again without the remote.
    for (&x, data) in c.iter().zip(&read) {
        assert!(f.local.contains_chunk(&x));
        assert_eq!(&f.read(x).await, data);
    }
    assert_eq!(f.remote.observer().calls().1, fetched);
    // Closing writes what is still queued: nothing is lost by a clean stop.
    f = f.reopen(1 << 30);
    assert_eq!(f.local.stats().chunks, 3);
    for (&x, data) in c.iter().zip(&read) {
        assert_eq!(&f.read(x).await, data);
    }
    assert_eq!(f.remote.observer().calls().1, fetched);
}

#[tokio::test]
async fn reopen_keeps_accounting_and_recency() {
    let _shared = ALONE.read().await;
    const LEN: usize = 40_000;
    let cost = cost_of_chunk(LEN).await;
    let bound = 3 * cost;
    let mut f = Fixture::new(bound);
    let c = f.put_chunks(4, LEN).await;
    for &x in &c[..3] {
        f.read(x).await;
    }
    // A use that lives only in memory until the cache is closed.
    f.read(c[0]).await;
    let stats = f.stats();
    assert_eq!((stats.chunks, stats.bytes), (3, 3 * cost));

    f = f.reopen(bound);
    // What is stored survives; the counts of lookups are this opening's.
    let reopened = f.stats();
    assert_eq!(
        (reopened.hits, reopened.misses, reopened.evictions),
        (0, 0, 0)
    );
    assert_eq!(
        reopened,
        lazystore_castore::CacheStats {
            hits: 0,
            misses: 0,
            evictions: 0,
            ..stats
        }
    );
    for x in &c[..3] {
        assert!(f.local.contains_chunk(x));
        assert!(f.cached(x).unwrap().is_ok());
    }
    // The order survived: B, not A, is the least recently used.
    f.read(c[3]).await;
    let held = f.held(&c);
    assert_eq!(held, [true, false, true, true]);
    assert!(f.cached(&c[1]).is_none());

    // A lower bound evicts on open, oldest first.
    f.read(c[2]).await;
    f.local.flush().unwrap();
    f = f.reopen(cost + cost / 2);
    let held = f.held(&c);
    assert_eq!(held, [false, false, true, false]);
    assert_eq!(f.stats().bytes, cost);
    for x in [c[0], c[1], c[3]] {
        assert!(f.cached(&x).is_none());
    }
    f = f.reopen(bound);
    assert_eq!(f.stats().bytes, cost);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_readers_stay_within_the_bound() {
    let _shared = ALONE.read().await;
    let bound = 2 << 20;
    let f = Arc::new(Fixture::new(bound));
    let data: Arc<Vec<u8>> = Arc::new(compressible(12 << 20));
    let digest = f.remote_blobs().put(&data).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let (f, data) = (f.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let blobs = f.blobs();
            let meta = blobs.stat(&digest).await.unwrap().unwrap();
            for _ in 0..20 {
                let (offset, len) = {
                    let mut rng = rand::rng();
                    let offset = rng.random_range(0..data.len() as u64 - 1);
                    let len = rng.random_range(1..=(data.len() as u64 - offset).min(300_000));
                    (offset, len)
                };
                let got = blobs.read_range(&digest, &meta, offset, len).await.unwrap();
                let o = offset as usize;
                assert_eq!(&got[..], &data[o..o + len as usize], "task {t}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = f.stats();
    assert!(stats.bytes <= bound, "{stats:?}");
    assert!(stats.chunks > 0);
    assert_eq!(read_all(&f.blobs(), digest).await.unwrap(), *data);
}

#[tokio::test]
async fn oversized_records_are_not_cached() {
    let _shared = ALONE.read().await;
    let f = Fixture::new(10_000);
    let c = f.put_chunks(1, 20_000).await;
    assert_eq!(f.read(c[0]).await.len(), 20_000);
    assert!(!f.local.contains_chunk(&c[0]));
    assert_eq!(f.stats().bytes, 0);
}

/// Prints what verifying a cached chunk costs, for the choice documented in
/// `blobs/cache.rs`: a full decode (zstd, then BLAKE3) against BLAKE3 alone,
/// over up to 128 MiB of the files under `/usr/lib` cut into 64 KiB chunks.
/// Only meaningful optimized: `cargo test --release -p lazystore-castore
/// --test cache measure_verification -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_verification() {
    fn walk(dir: &std::path::Path, out: &mut Vec<u8>, budget: usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(ft) = e.file_type() else { continue };
            if out.len() >= budget {
                return;
            } else if ft.is_dir() {
                walk(&e.path(), out, budget);
            } else if ft.is_file()
                && let Ok(data) = std::fs::read(e.path())
            {
                out.extend_from_slice(&data);
            }
        }
    }
    let mut corpus = Vec::new();
    walk(std::path::Path::new("/usr/lib"), &mut corpus, 128 << 20);
    corpus.truncate(128 << 20);
    let chunks: Vec<EncodedChunk> = corpus
        .chunks(64 << 10)
        .map(|c| EncodedChunk::encode(c.to_vec().into()))
        .collect();
    let bytes = corpus.len() as f64;
    let rate = |start: Instant| bytes / start.elapsed().as_secs_f64() / 1e9;
    let start = Instant::now();
    let raw: Vec<bytes::Bytes> = chunks.iter().map(|c| c.decode().unwrap()).collect();
    let decode = rate(start);
    let start = Instant::now();
    for r in &raw {
        std::hint::black_box(Digest::of(r));
    }
    let hash = rate(start);
    eprintln!(
        "{} MiB: decode (zstd + BLAKE3) {decode:.2} GB/s, BLAKE3 alone {hash:.2} GB/s; \
         verified twice, handed on compressed {:.2} ms/MB, handed on decoded {:.2} ms/MB",
        corpus.len() >> 20,
        2e-6 / decode * 1e3,
        (1e-6 / decode + 1e-6 / hash) * 1e3,
    );
}

/// The bound holds for the disk, not only for the accounting: records are
/// charged for the blocks and pages they occupy, evicted chunks' blocks are
/// freed, and freed pages are made reusable often enough that the disk use
/// levels off close to the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_levels_off_near_the_bound() {
    let _alone = ALONE.write().await;
    let bound = 64 << 20;
    let f = Fixture::new(bound);
    let mut digests = Vec::new();
    for _ in 0..20 {
        digests.push(f.remote_blobs().put(&random(8 << 20)).await.unwrap());
    }
    let blobs = f.blobs();
    let mut sizes = Vec::new();
    for _ in 0..2 {
        for d in &digests {
            let meta = blobs.stat(d).await.unwrap().unwrap();
            blobs.read_range(d, &meta, 0, meta.size).await.unwrap();
        }
        assert!(f.stats().bytes <= bound);
        sizes.push(f.local.disk_bytes().unwrap());
    }
    println!("on disk after each pass: {sizes:?} (bound {bound})");
    // Measured: 1.01 times the bound (chunk bytes in packs, punched out
    // when evicted; inline in redb it was 1.27–1.63). What must hold
    // whatever the timing: the disk use stays within a quarter above the
    // bound and stops growing once the cache is full.
    assert!(sizes[1] <= bound + bound / 4, "{sizes:?}");
    assert!(sizes[1] <= sizes[0] + bound / 16, "{sizes:?}");
}

/// Whole files (for FUSE passthrough) count against the bound like any
/// record: evicting one removes it, and a file the cache has no entry for
/// (a crash before it was recorded) is removed when the cache is opened.
#[test]
fn whole_files_are_evicted_and_strays_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.redb");
    let open = || CacheStore::open(&path, CacheOptions { max_bytes: 1 << 20 }).unwrap();
    let cache = open();
    let keep = |cache: &CacheStore, data: &[u8]| {
        let digest = Digest::of(data);
        std::fs::write(cache.file_path(&digest), data).unwrap();
        cache.add_file(&digest, data.len() as u64).unwrap();
        digest
    };
    let a = keep(&cache, &random(600 << 10));
    assert!(cache.has_file(&a));
    assert_eq!(cache.stats().files, 1);
    let b = keep(&cache, &random(600 << 10));
    assert!(!cache.has_file(&a) && cache.has_file(&b));
    assert!(
        !cache.file_path(&a).exists(),
        "an evicted file stays on disk"
    );
    assert!(cache.file_path(&b).exists());

    let stray = cache.files_dir().join(".tmp-unfinished");
    std::fs::write(&stray, b"half").unwrap();
    drop(cache);
    let cache = open();
    assert!(!stray.exists());
    assert!(cache.has_file(&b) && cache.file_path(&b).exists());
    cache.drop_file(&b).unwrap();
    assert!(!cache.has_file(&b) && !cache.file_path(&b).exists());
}
