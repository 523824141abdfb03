//! What only the redb store does: it lives in a file, which outlasts the
//! process and records the chunker parameters it was made with.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use lazystore_castore::blobs::{
    BlobMeta, ChunkMeta, EncodedChunk, MemoryBlobService, RedbBlobService,
};
use lazystore_castore::directories::RedbDirectoryService;
use lazystore_castore::{
    BlobService, Blobs, Chunker, ChunkerParams, Digest, Directory, DirectoryService, Node,
    OpenError, PathComponent, RedbOptions, RedbStore, SyncMode,
};
use rand::RngExt;

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill(&mut v[..]);
    v
}

fn with_params(params: ChunkerParams) -> RedbOptions {
    RedbOptions {
        params: Some(params),
        ..RedbOptions::default()
    }
}

fn services(store: &RedbStore) -> (Blobs, RedbDirectoryService) {
    let blobs = Blobs::new(
        Arc::new(RedbBlobService::new(store.clone())),
        store.params(),
    );
    (blobs, RedbDirectoryService::new(store.clone()))
}

#[tokio::test]
async fn data_outlasts_a_reopen() {
    for sync in [SyncMode::EveryCommit, SyncMode::Deferred] {
        reopen_and_read(sync, true).await;
    }
    // A clean close makes deferred commits durable too.
    reopen_and_read(SyncMode::Deferred, false).await;
}

async fn reopen_and_read(sync: SyncMode, call_sync: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/store.redb");
    let options = RedbOptions {
        sync,
        ..RedbOptions::default()
    };
    let data = random(700_000);
    let mut tree = Directory::new();
    tree.add(
        PathComponent::try_from("f").unwrap(),
        Node::File {
            digest: Digest::of(&data),
            size: data.len() as u64,
            executable: false,
        },
    )
    .unwrap();
    let mut root = Directory::new();
    root.add(
        PathComponent::try_from("d").unwrap(),
        Node::directory(&tree),
    )
    .unwrap();
    {
        let store = RedbStore::open_with(&path, options).unwrap();
        assert_eq!(store.path(), path);
        assert_eq!(store.sync_mode(), sync);
        let (blobs, dirs) = services(&store);
        blobs.put(&data).await.unwrap();
        dirs.put_all(vec![tree.clone(), root.clone()])
            .await
            .unwrap();
        if call_sync {
            store.sync().unwrap();
        }
    }
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.params(), ChunkerParams::default());
    let (blobs, dirs) = services(&store);
    let digest = Digest::of(&data);
    let meta = blobs.stat(&digest).await.unwrap().unwrap();
    let back = blobs
        .read_range(&digest, &meta, 0, meta.size)
        .await
        .unwrap();
    assert_eq!(&back[..], &data[..]);
    assert_eq!(
        dirs.get_recursive(&root.digest()).await.unwrap(),
        vec![root, tree]
    );
}

#[test]
fn other_chunker_params_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let small = ChunkerParams {
        min: 4096,
        avg: 16384,
        max: 65536,
    };
    drop(RedbStore::open_with(&path, with_params(small)).unwrap());

    // Plain open takes what the store records; naming them again is fine.
    assert_eq!(RedbStore::open(&path).unwrap().params(), small);
    assert_eq!(
        RedbStore::open_with(&path, with_params(small))
            .unwrap()
            .params(),
        small
    );

    let err = RedbStore::open_with(&path, with_params(ChunkerParams::default())).unwrap_err();
    match &err {
        OpenError::ParamsMismatch {
            stored, requested, ..
        } => {
            assert_eq!(*stored, small);
            assert_eq!(*requested, ChunkerParams::default());
        }
        other => panic!("{other}"),
    }
    let msg = err.to_string();
    for part in [&path.display().to_string(), "16384", "65536", "262144"] {
        assert!(msg.contains(part), "{msg:?} lacks {part}");
    }
}

#[test]
fn bad_opens_say_which_file() {
    assert!(matches!(
        RedbStore::open("relative/store.redb"),
        Err(OpenError::NotAbsolute(_))
    ));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let bad = ChunkerParams {
        min: 4096,
        avg: 2048,
        max: 8192,
    };
    assert!(matches!(
        RedbStore::open_with(&path, with_params(bad)),
        Err(OpenError::InvalidParams { .. })
    ));
    assert!(!path.exists(), "refused parameters left a file behind");

    let _open = RedbStore::open(&path).unwrap();
    let err = RedbStore::open(&path).unwrap_err();
    assert!(matches!(err, OpenError::AlreadyOpen { .. }), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()));

    let junk = dir.path().join("junk.redb");
    std::fs::write(&junk, vec![0x5a; 10_000]).unwrap();
    let err = RedbStore::open(&junk).unwrap_err();
    assert!(matches!(err, OpenError::Database { .. }), "{err}");
    assert!(err.to_string().contains(&junk.display().to_string()));

    // A store of the inline layout (chunk bytes in `chunks-v1`) is named,
    // with what to do, rather than read as if it were empty.
    let old = dir.path().join("old.redb");
    {
        let db = redb::Database::create(&old).unwrap();
        let txn = db.begin_write().unwrap();
        let chunks: redb::TableDefinition<&[u8; 32], &[u8]> =
            redb::TableDefinition::new("chunks-v1");
        txn.open_table(chunks).unwrap();
        txn.commit().unwrap();
    }
    let err = RedbStore::open(&old).unwrap_err();
    assert!(matches!(err, OpenError::OldLayout { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&old.display().to_string()) && msg.contains("import"),
        "{msg}"
    );

    // A pack directory that can't be one.
    let blocked = dir.path().join("blocked.redb");
    std::fs::write(dir.path().join("blocked.packs"), b"a file").unwrap();
    let err = RedbStore::open(&blocked).unwrap_err();
    assert!(matches!(err, OpenError::Packs { .. }), "{err}");
    assert!(err.to_string().contains("blocked.packs"), "{err}");
}

/// Regular files under `roots`, in path order, up to `limit` bytes in all.
fn corpus(roots: &[&str], limit: usize) -> Vec<Vec<u8>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                walk(&p, out);
            } else if m.is_file() {
                out.push(p);
            }
        }
    }
    let mut paths = Vec::new();
    for r in roots {
        walk(Path::new(r), &mut paths);
    }
    let mut files = Vec::new();
    let mut total = 0;
    for p in paths {
        if total >= limit {
            break;
        }
        if let Ok(data) = std::fs::read(&p) {
            total += data.len();
            files.push(data);
        }
    }
    files
}

/// Puts every file with `writers` concurrent writers; returns MB/s.
async fn ingest(blobs: &Blobs, files: &Arc<Vec<Vec<u8>>>, writers: usize) -> f64 {
    let bytes: usize = files.iter().map(Vec::len).sum();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let (blobs, files, next) = (blobs.clone(), files.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(f) = files.get(i) else { break };
                    blobs.put(f).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    bytes as f64 / 1e6 / start.elapsed().as_secs_f64()
}

/// A file chunked and encoded ahead of time: what a store is handed.
struct Prepared {
    digest: Digest,
    meta: BlobMeta,
    chunks: Vec<EncodedChunk>,
}

fn prepare(files: &[Vec<u8>]) -> Vec<Prepared> {
    files
        .iter()
        .map(|f| {
            let mut raw = Vec::new();
            let mut chunker = Chunker::new(ChunkerParams::default());
            chunker.push(f, &mut raw);
            chunker.finish(&mut raw);
            let chunks: Vec<EncodedChunk> = raw.into_iter().map(EncodedChunk::encode).collect();
            let digest = Digest::of(f);
            let list = chunks
                .iter()
                .map(|c| ChunkMeta {
                    digest: c.digest,
                    size: c.size,
                })
                .collect();
            let meta = BlobMeta::new(digest, f.len() as u64, list).unwrap();
            Prepared {
                digest,
                meta,
                chunks,
            }
        })
        .collect()
}

/// Stores prepared files the way a blob writer does (ask what is missing,
/// send it in 4 MiB batches, record the list); returns MB/s of file bytes.
async fn store_only(service: &dyn BlobService, files: &[Prepared]) -> f64 {
    let start = Instant::now();
    let mut bytes = 0;
    for f in files {
        bytes += f.meta.size;
        let digests: Vec<Digest> = f.chunks.iter().map(|c| c.digest).collect();
        for batch in digests.chunks(64) {
            let missing = service.missing_chunks(batch).await.unwrap();
            let send: Vec<EncodedChunk> = f
                .chunks
                .iter()
                .filter(|c| missing.contains(&c.digest))
                .cloned()
                .collect();
            service.put_chunks(send).await.unwrap();
        }
        service.put_blob(f.digest, f.meta.clone()).await.unwrap();
    }
    bytes as f64 / 1e6 / start.elapsed().as_secs_f64()
}

/// Ingest throughput, memory against redb in both sync modes, on system
/// files (large libraries; many small files) and on random bytes. Run in
/// release:
/// `cargo test --release -p lazystore-castore --test redb -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run in release with --ignored --nocapture"]
async fn bench_ingest() {
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let corpora = [
        ("libraries", corpus(&["/usr/lib", "/usr/bin"], 384 << 20)),
        ("small files", corpus(&["/usr/share"], 128 << 20)),
        ("random", vec![random(128 << 20)]),
    ];
    let modes = [SyncMode::EveryCommit, SyncMode::Deferred];
    let redb = |name: String, sync| {
        let path = scratch.path().join(name);
        let options = RedbOptions {
            sync,
            ..RedbOptions::default()
        };
        RedbStore::open_with(path, options).unwrap()
    };
    for (name, files) in corpora {
        let files = Arc::new(files);
        let bytes: usize = files.iter().map(Vec::len).sum();
        println!("{name}: {} files, {} MB", files.len(), bytes / 1_000_000);

        let t = Instant::now();
        let prepared = prepare(&files);
        let stored: usize = prepared
            .iter()
            .flat_map(|p| &p.chunks)
            .map(|c| c.data.len())
            .sum();
        println!(
            "  chunk + hash + zstd, 1 thread: {:.0} MB/s, {} MB stored",
            bytes as f64 / 1e6 / t.elapsed().as_secs_f64(),
            stored / 1_000_000
        );

        let mem = store_only(&MemoryBlobService::new(), &prepared).await;
        print!("  store alone, 1 writer: memory {mem:.0} MB/s");
        for sync in modes {
            let store = redb(format!("{name}-store-{sync:?}.redb"), sync);
            let mbs = store_only(&RedbBlobService::new(store), &prepared).await;
            print!(", redb {sync:?} {mbs:.0} MB/s");
        }
        println!();

        for writers in [1, 2] {
            let mem = Blobs::new(Arc::new(MemoryBlobService::new()), ChunkerParams::default());
            let mem = ingest(&mem, &files, writers).await;
            println!("  Blobs::put, {writers} writer(s): memory {mem:.0} MB/s");
            for sync in modes {
                let store = redb(format!("{name}-{writers}-{sync:?}.redb"), sync);
                let blobs = Blobs::new(
                    Arc::new(RedbBlobService::new(store.clone())),
                    store.params(),
                );
                let t = Instant::now();
                let first = ingest(&blobs, &files, writers).await;
                store.sync().unwrap();
                let synced = bytes as f64 / 1e6 / t.elapsed().as_secs_f64();
                let again = ingest(&blobs, &files, writers).await;
                let file = std::fs::metadata(store.path()).unwrap().len()
                    + std::fs::read_dir(store.path().with_extension("packs"))
                        .unwrap()
                        .map(|e| e.unwrap().metadata().unwrap().len())
                        .sum::<u64>();
                println!(
                    "    redb {sync:?}: {first:.0} MB/s, {synced:.0} with a final sync; \
                     again (all deduplicated) {again:.0} MB/s; file and packs {} MB",
                    file / 1_000_000
                );
            }
        }
    }
}

/// Writers cut blobs with the parameters the store records, whatever they
/// were built with: directly, through a gRPC server in front of the store,
/// and through a local cache in front of that server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_cut_with_the_stores_params_even_over_grpc() {
    use lazystore_castore::blobs::{CachingBlobService, GrpcBlobService};
    use lazystore_castore::{CacheOptions, CacheStore};

    let dir = tempfile::tempdir().unwrap();
    let small = ChunkerParams {
        min: 2048,
        avg: 8192,
        max: 32768,
    };
    let store = RedbStore::open_with(dir.path().join("store.redb"), with_params(small)).unwrap();
    let server = common::serve_redb(&store).await;
    let grpc = Arc::new(GrpcBlobService::connect_lazy(&server.url).unwrap());
    let cache = CacheStore::open(dir.path().join("cache.redb"), CacheOptions::default()).unwrap();
    let writers = [
        (
            "direct",
            Arc::new(RedbBlobService::new(store.clone())) as Arc<dyn BlobService>,
        ),
        ("grpc", grpc.clone()),
        ("cache", Arc::new(CachingBlobService::new(cache, grpc))),
    ];
    for (name, service) in writers {
        // Built with the defaults, as a client that knows nothing would be.
        let blobs = Blobs::new(service, ChunkerParams::default());
        assert_eq!(blobs.write_params().await.unwrap(), small, "{name}");
        let data = random(1 << 20);
        let digest = blobs.put(&data).await.unwrap();
        let meta = blobs.stat(&digest).await.unwrap().unwrap();
        let mut expected = Vec::new();
        let mut chunker = Chunker::new(small);
        chunker.push(&data, &mut expected);
        chunker.finish(&mut expected);
        let sizes: Vec<u64> = meta.chunks.iter().map(|c| c.size).collect();
        let wanted: Vec<u64> = expected.iter().map(|c| c.len() as u64).collect();
        assert_eq!(sizes, wanted, "{name}: cut with other parameters");
    }
    server.stop().await;
}
