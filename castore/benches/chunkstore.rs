//! Chunk-store benchmark: ingest throughput into the embedded redb store and
//! batched chunk reads over gRPC on loopback, beside the machine's limits for
//! the same bytes (BLAKE3 hashing, zstd decoding) measured in the same run.
//!
//! `cargo bench -p lazystore-castore --bench chunkstore` (release build).
//! The corpus is a mix of real files (a Rust toolchain and a Python install,
//! both present on these machines), capped by `LAZYSTORE_BENCH_BYTES`
//! (default 1 GiB); `LAZYSTORE_BENCH_SOURCES` overrides the directories
//! (colon-separated).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazystore_castore::blobs::{BlobMeta, RedbBlobService};
use lazystore_castore::directories::MemoryDirectoryService;
use lazystore_castore::grpc::{Services, serve};
use lazystore_castore::{Blobs, Digest, RedbOptions, RedbStore, SyncMode};

fn sources() -> Vec<PathBuf> {
    if let Ok(s) = std::env::var("LAZYSTORE_BENCH_SOURCES") {
        return s.split(':').map(PathBuf::from).collect();
    }
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()));
    let mut out = Vec::new();
    for dir in [
        home.join(".rustup/toolchains"),
        home.join(".pyenv/versions"),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            entries.sort();
            out.extend(entries);
        }
    }
    out
}

/// Reads regular files under `dirs` (sorted walk) until `budget` bytes.
fn corpus(dirs: &[PathBuf], budget: u64) -> Vec<Vec<u8>> {
    fn walk(dir: &Path, files: &mut Vec<Vec<u8>>, total: &mut u64, budget: u64) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            if *total >= budget {
                return;
            }
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                walk(&e.path(), files, total, budget);
            } else if ft.is_file()
                && let Ok(data) = std::fs::read(e.path())
            {
                *total += data.len() as u64;
                files.push(data);
            }
        }
    }
    let mut files = Vec::new();
    let mut total = 0;
    for d in dirs {
        walk(d, &mut files, &mut total, budget);
    }
    files
}

/// Blobs written at once during ingest.
const WRITERS: usize = 8;

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn main() {
    let budget: u64 = std::env::var("LAZYSTORE_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);
    let files = corpus(&sources(), budget);
    let total: u64 = files.iter().map(|f| f.len() as u64).sum();
    assert!(
        total > 0,
        "no corpus files found; set LAZYSTORE_BENCH_SOURCES"
    );
    eprintln!(
        "corpus: {} files, {:.1} MB",
        files.len(),
        total as f64 / 1e6
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open_with(
        dir.path().join("store.redb"),
        RedbOptions {
            params: None,
            sync: SyncMode::Deferred,
        },
    )
    .unwrap();
    let backend = Arc::new(RedbBlobService::new(store.clone()));
    let blobs = Blobs::new(backend.clone(), store.params());

    // Ingest: chunk + hash + compress + store, one blob per file.
    let start = Instant::now();
    // Files are stored WRITERS at a time, as an importer's jobs and a NAR's
    // files do.
    let files = Arc::new(files);
    let digests: Vec<Digest> = rt.block_on(async {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..WRITERS {
            let (files, blobs, next) = (files.clone(), blobs.clone(), next.clone());
            tasks.spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(f) = files.get(i) else { return out };
                    out.push((i, blobs.put(f).await.unwrap()));
                }
            });
        }
        let mut out = vec![Digest::EMPTY; files.len()];
        while let Some(done) = tasks.join_next().await {
            for (i, d) in done.unwrap() {
                out[i] = d;
            }
        }
        store.sync().unwrap();
        out
    });
    let ingest = start.elapsed();

    // Gather chunk lists; decompressed bytes per unique chunk.
    let metas: Vec<BlobMeta> = rt.block_on(async {
        let mut out = Vec::new();
        for d in &digests {
            out.push(blobs.stat(d).await.unwrap().unwrap());
        }
        out
    });
    let mut unique = std::collections::HashSet::new();
    let mut chunk_list = Vec::new();
    for m in &metas {
        for c in &m.chunks {
            if unique.insert(c.digest) {
                chunk_list.push((c.digest, c.size));
            }
        }
    }
    let unique_bytes: u64 = chunk_list.iter().map(|(_, s)| s).sum();

    // Machine limits on the same bytes: BLAKE3 over the corpus, zstd decode
    // of the stored chunks.
    let start = Instant::now();
    for f in files.iter() {
        std::hint::black_box(blake3::hash(f));
    }
    let blake3_time = start.elapsed();
    let encoded = rt.block_on(async {
        let mut out = Vec::new();
        let digests: Vec<Digest> = chunk_list.iter().map(|(d, _)| *d).collect();
        for batch in digests.chunks(1024) {
            out.extend(backend_read(&backend, batch).await);
        }
        out
    });
    let stored_bytes: u64 = encoded.iter().map(|c| c.data.len() as u64).sum();
    let start = Instant::now();
    for c in &encoded {
        if c.encoding == lazystore_castore::proto::ChunkEncoding::Zstd {
            std::hint::black_box(zstd::bulk::decompress(&c.data, c.size as usize).unwrap());
        }
    }
    let zstd_time = start.elapsed();
    let zstd_bytes: u64 = encoded
        .iter()
        .filter(|c| c.encoding == lazystore_castore::proto::ChunkEncoding::Zstd)
        .map(|c| c.size)
        .sum();
    drop(encoded);

    // gRPC: server on 127.0.0.1 over the same redb store; the client reads
    // every unique chunk in batches, several requests in flight, each chunk
    // decompressed and verified on the client.
    let (grpc_time, grpc_bytes) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let services = Services::new(backend.clone(), Arc::new(MemoryDirectoryService::new()));
        let server = tokio::spawn(serve(listener, services, async {
            stopped.await.ok();
        }));
        let client =
            lazystore_castore::blobs::GrpcBlobService::connect_lazy(&format!("grpc+http://{addr}"))
                .unwrap();
        let remote = Blobs::new(Arc::new(client), store.params());
        let digests: Vec<Digest> = chunk_list.iter().map(|(d, _)| *d).collect();
        let start = Instant::now();
        let mut bytes = 0u64;
        let mut tasks = tokio::task::JoinSet::new();
        let batches: Vec<Vec<Digest>> = digests.chunks(256).map(|b| b.to_vec()).collect();
        let mut batches = batches.into_iter();
        const IN_FLIGHT: usize = 4;
        for b in batches.by_ref().take(IN_FLIGHT) {
            let remote = remote.clone();
            tasks.spawn(async move { remote.read_chunks_verified(&b).await.unwrap() });
        }
        while let Some(done) = tasks.join_next().await {
            bytes += done.unwrap().iter().map(|c| c.len() as u64).sum::<u64>();
            if let Some(b) = batches.next() {
                let remote = remote.clone();
                tasks.spawn(async move { remote.read_chunks_verified(&b).await.unwrap() });
            }
        }
        let elapsed = start.elapsed();
        stop.send(()).ok();
        server.await.unwrap().unwrap();
        (elapsed, bytes)
    });
    assert_eq!(grpc_bytes, unique_bytes);

    println!();
    println!("| measurement | bytes | time | throughput |");
    println!("|---|---:|---:|---:|");
    let row = |name: &str, bytes: u64, d: Duration| {
        println!(
            "| {name} | {:.1} MB | {:.2} s | {:.0} MB/s |",
            bytes as f64 / 1e6,
            d.as_secs_f64(),
            mbps(bytes, d)
        )
    };
    row(
        "ingest into redb (chunk + BLAKE3 + zstd + store)",
        total,
        ingest,
    );
    row(
        "gRPC batched chunk reads, decompressed + verified",
        grpc_bytes,
        grpc_time,
    );
    row("limit: BLAKE3 of the corpus, one core", total, blake3_time);
    row(
        "limit: zstd decode of the stored chunks, one core",
        zstd_bytes,
        zstd_time,
    );
    println!();
    println!(
        "corpus {:.1} MB in {} files; {} unique chunks, {:.1} MB unique, {:.1} MB stored ({:.2}x)",
        total as f64 / 1e6,
        files.len(),
        chunk_list.len(),
        unique_bytes as f64 / 1e6,
        stored_bytes as f64 / 1e6,
        unique_bytes as f64 / stored_bytes.max(1) as f64,
    );
    println!(
        "ratios: ingest / BLAKE3 = {:.2}, gRPC reads / zstd decode = {:.2}",
        mbps(total, ingest) / mbps(total, blake3_time),
        mbps(grpc_bytes, grpc_time) / mbps(zstd_bytes, zstd_time).max(1.0),
    );
}

async fn backend_read(
    backend: &Arc<RedbBlobService>,
    batch: &[Digest],
) -> Vec<lazystore_castore::blobs::EncodedChunk> {
    use lazystore_castore::BlobService;
    backend.read_chunks(batch).await.unwrap()
}
