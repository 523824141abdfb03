//! 32 readers and 4 writers at once through one gRPC server, on data that
//! overlaps (writers racing to upload the same new chunks, readers reading
//! blobs as they are published): no errors, every byte read is checked, and
//! the server's redb store, reopened afterwards, holds every blob whole.

use std::sync::{Arc, Mutex};

mod common;

use lazystore_castore::blobs::{GrpcBlobService, RedbBlobService};
use lazystore_castore::{Blobs, ChunkerParams, Digest, RedbStore};
use rand::RngExt;

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill(&mut v[..]);
    v
}

/// Blobs published so far, with their bytes.
type Published = Arc<Mutex<Vec<(Digest, Arc<Vec<u8>>)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_readers_and_writers_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.redb");
    let store = RedbStore::open(&path).unwrap();
    let server = common::serve_redb(&store).await;
    let url = server.url.clone();
    let client = |url: &str| {
        Blobs::new(
            Arc::new(GrpcBlobService::connect_lazy(url).unwrap()),
            ChunkerParams::default(),
        )
    };

    // Base material every writer splices from, so their blobs share chunks.
    let base: Arc<Vec<Vec<u8>>> = Arc::new((0..4).map(|_| random(512 << 10)).collect());
    let seed = client(&url);
    // The readers' lock guards a list they scan and append to; held only
    // for a push or a clone, never across an await.
    let published: Published = Arc::new(Mutex::new(Vec::new()));
    for b in base.iter() {
        let d = seed.put(b).await.unwrap();
        published.lock().unwrap().push((d, Arc::new(b.clone())));
    }

    let writers: Vec<_> = (0..4)
        .map(|w| {
            // Each writer on a connection of its own.
            let blobs = client(&url);
            let (base, published) = (base.clone(), published.clone());
            tokio::spawn(async move {
                for i in 0..4 {
                    let mut data = Vec::new();
                    // Blob 0 is the same for every writer: four uploads of
                    // the same new chunks racing each other.
                    let fresh = if i == 0 {
                        b"shared new bytes".repeat(20_000)
                    } else {
                        random(100_000 + w * 1000)
                    };
                    data.extend_from_slice(&base[(w + i) % 4][..300_000]);
                    data.extend_from_slice(&fresh);
                    data.extend_from_slice(&base[(w + i + 1) % 4][200_000..]);
                    let d = blobs.put(&data).await.unwrap();
                    assert_eq!(d, Digest::of(&data));
                    published.lock().unwrap().push((d, Arc::new(data)));
                }
            })
        })
        .collect();

    // The readers share one connection, multiplexed.
    let shared = client(&url);
    let readers: Vec<_> = (0..32)
        .map(|r| {
            let (blobs, published) = (shared.clone(), published.clone());
            tokio::spawn(async move {
                for _ in 0..6 {
                    let (digest, bytes) = {
                        let p = published.lock().unwrap();
                        p[rand::rng().random_range(0..p.len())].clone()
                    };
                    let meta = blobs.stat(&digest).await.unwrap().expect("published");
                    if r % 2 == 0 {
                        // Whole blob: every chunk and the blob digest checked.
                        let mut reader = blobs.reader(digest, meta);
                        let mut got = Vec::new();
                        while let Some(c) = reader.next_chunk().await.unwrap() {
                            got.extend_from_slice(&c);
                        }
                        assert_eq!(got, *bytes);
                    } else {
                        let offset = rand::rng().random_range(0..bytes.len());
                        let len = rand::rng().random_range(0..=(bytes.len() - offset).min(200_000));
                        let got = blobs
                            .read_range(&digest, &meta, offset as u64, len as u64)
                            .await
                            .unwrap();
                        assert_eq!(&got[..], &bytes[offset..offset + len]);
                    }
                }
            })
        })
        .collect();

    for t in writers.into_iter().chain(readers) {
        t.await.unwrap();
    }
    assert_eq!(published.lock().unwrap().len(), 4 + 16);
    server.stop().await;

    // Consistent afterwards: the store, reopened, has every published blob
    // with a chunk list whose every chunk is there and verifies.
    drop(store);
    let store = RedbStore::open(&path).unwrap();
    let local = Blobs::new(
        Arc::new(RedbBlobService::new(store.clone())),
        store.params(),
    );
    let published = published.lock().unwrap().clone();
    for (digest, bytes) in published {
        let meta = local.stat(&digest).await.unwrap().expect("published");
        assert_eq!(meta.size, bytes.len() as u64);
        let mut reader = local.reader(digest, meta);
        let mut got = Vec::new();
        while let Some(c) = reader.next_chunk().await.unwrap() {
            got.extend_from_slice(&c);
        }
        assert_eq!(got, *bytes, "{digest}");
    }
}
