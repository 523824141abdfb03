//! A chunk whose stored bytes fail verification is quarantined by the store
//! that holds them — no longer present, counted — and a write of a blob
//! holding it stores it again: on a redb store read directly, through its
//! gRPC server, and through a local cache in front of that server.

mod common;

use std::sync::Arc;

use lazystore_castore::blobs::{
    CachingBlobService, EncodedChunk, GrpcBlobService, MemoryBlobService, RedbBlobService,
};
use lazystore_castore::{
    BlobError, BlobService, Blobs, CacheOptions, CacheStore, ChunkerParams, Digest, RedbStore,
};
use rand::RngExt;

fn flip_chunk(c: &mut EncodedChunk) {
    let mut data = c.data.to_vec();
    let mid = data.len() / 2;
    data[mid] ^= 1;
    c.data = data.into();
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill(&mut v[..]);
    v
}

/// Reads `blob` whole through `blobs`.
async fn read_all(blobs: &Blobs, blob: Digest) -> Result<Vec<u8>, BlobError> {
    let meta = blobs.stat(&blob).await?.expect("blob stored");
    let mut reader = blobs.reader(blob, meta);
    let mut out = Vec::new();
    while let Some(chunk) = reader.next_chunk().await? {
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Corrupts the second chunk of a stored blob in `store`, reads it through
/// `reader` (which must fail naming the chunk), then checks the store
/// quarantined it and that writing the blob again through `reader` heals.
async fn corrupt_read_heal(name: &str, store: &RedbBlobService, reader: Blobs) {
    let data = random(1 << 20);
    let blob = reader.put(&data).await.unwrap();
    let meta = reader.stat(&blob).await.unwrap().unwrap();
    let victim = meta.chunks[1].digest;
    assert_eq!(reader.service().quarantined().await.unwrap(), 0, "{name}");
    assert!(store.corrupt_chunk(&victim, flip_chunk).unwrap());

    let err = read_all(&reader, blob).await.unwrap_err();
    assert_eq!(err.corrupt_chunk(), Some(victim), "{name}: {err}");
    // The store no longer claims it, and says something is missing.
    assert_eq!(
        store.missing_chunks(&[victim]).await.unwrap(),
        vec![victim],
        "{name}"
    );
    assert_eq!(
        reader.service().missing_chunks(&[victim]).await.unwrap(),
        vec![victim],
        "{name}"
    );
    assert_eq!(reader.service().quarantined().await.unwrap(), 1, "{name}");
    // Reading again fails (the chunk is gone), never with wrong bytes.
    assert!(read_all(&reader, blob).await.is_err(), "{name}");

    // The same bytes written again: only the missing chunk travels, and
    // the blob reads back whole.
    assert_eq!(reader.put(&data).await.unwrap(), blob);
    assert_eq!(read_all(&reader, blob).await.unwrap(), data, "{name}");
    assert!(store.missing_chunks(&[victim]).await.unwrap().is_empty());
    assert_eq!(reader.service().quarantined().await.unwrap(), 0, "{name}");
}

#[tokio::test]
async fn redb_quarantines_and_heals() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("store.redb")).unwrap();
    let service = RedbBlobService::new(store.clone());
    let blobs = Blobs::new(Arc::new(service.clone()), store.params());
    corrupt_read_heal("redb", &service, blobs).await;
}

#[tokio::test]
async fn grpc_client_reports_and_the_server_quarantines() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("server.redb")).unwrap();
    let server = common::serve_redb(&store).await;
    let client = GrpcBlobService::connect_lazy(&server.url).unwrap();
    let blobs = Blobs::new(Arc::new(client), ChunkerParams::default());
    corrupt_read_heal("grpc", &RedbBlobService::new(store.clone()), blobs).await;
    server.stop().await;
}

#[tokio::test]
async fn cache_passes_the_report_to_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("server.redb")).unwrap();
    let server = common::serve_redb(&store).await;
    let local = CacheStore::open(dir.path().join("cache.redb"), CacheOptions::default()).unwrap();
    let remote = Arc::new(GrpcBlobService::connect_lazy(&server.url).unwrap());
    let blobs = Blobs::new(
        Arc::new(CachingBlobService::new(local, remote)),
        ChunkerParams::default(),
    );
    corrupt_read_heal("cache", &RedbBlobService::new(store.clone()), blobs).await;
    server.stop().await;
}

/// A report of a chunk whose stored copy is sound (damaged on the way, or
/// a false report) changes nothing.
#[tokio::test]
async fn a_sound_copy_is_not_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("store.redb")).unwrap();
    let service = RedbBlobService::new(store.clone());
    let blobs = Blobs::new(Arc::new(service.clone()), store.params());
    let blob = blobs.put(&random(300_000)).await.unwrap();
    let chunk = blobs.stat(&blob).await.unwrap().unwrap().chunks[0].digest;
    let absent = Digest::of(b"never stored");
    assert!(
        service
            .quarantine(&[chunk, absent])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(service.missing_chunks(&[chunk]).await.unwrap().is_empty());
    assert_eq!(service.quarantined().await.unwrap(), 0);

    let memory = MemoryBlobService::new();
    assert!(memory.quarantine(&[chunk]).await.unwrap().is_empty());
}

/// The record survives a reopen: an import in a later process still finds
/// that something is missing.
#[tokio::test]
async fn quarantine_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let data = random(400_000);
    let victim = {
        let store = RedbStore::open(&path).unwrap();
        let service = RedbBlobService::new(store.clone());
        let blobs = Blobs::new(Arc::new(service.clone()), store.params());
        let blob = blobs.put(&data).await.unwrap();
        let victim = blobs.stat(&blob).await.unwrap().unwrap().chunks[0].digest;
        assert!(service.corrupt_chunk(&victim, flip_chunk).unwrap());
        assert_eq!(service.quarantine(&[victim]).await.unwrap(), vec![victim]);
        victim
    };
    let store = RedbStore::open(&path).unwrap();
    let service = RedbBlobService::new(store);
    assert_eq!(service.quarantined().await.unwrap(), 1);
    assert_eq!(
        service.missing_chunks(&[victim]).await.unwrap(),
        vec![victim]
    );
}
