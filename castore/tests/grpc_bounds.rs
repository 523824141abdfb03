//! Bounds at the server's door: a `Put` over the upload limit is refused
//! with `RESOURCE_EXHAUSTED` and stores nothing, and connections over the
//! connection limit wait unaccepted until one closes.

use std::sync::Arc;
use std::time::Duration;

use lazystore_castore::blobs::{EncodedChunk, GrpcBlobService, MemoryBlobService};
use lazystore_castore::directories::MemoryDirectoryService;
use lazystore_castore::grpc::{Connection, Services, serve};
use lazystore_castore::proto::blob_service_client::BlobServiceClient;
use lazystore_castore::proto::put_request::{BlobRecord, Item};
use lazystore_castore::proto::{ChunkData, PutRequest};
use lazystore_castore::{BlobService, Digest};
use tokio::sync::oneshot;

/// A server on 127.0.0.1 until dropped; `url` is where it listens.
struct Server {
    url: String,
    addr: std::net::SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start(blobs: Arc<dyn BlobService>, services: impl FnOnce(Services) -> Services) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let services = services(Services::new(
        blobs,
        Arc::new(MemoryDirectoryService::new()),
    ));
    tokio::spawn(serve(listener, services, async {
        stopped.await.ok();
    }));
    Server {
        url: format!("grpc+http://{addr}"),
        addr,
        _stop: stop,
    }
}

/// Two distinct chunks of `len` bytes.
fn chunks(len: usize) -> [EncodedChunk; 2] {
    [1u8, 2].map(|b| {
        // Raw: zstd would shrink a run of equal bytes below the limit.
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ b).collect();
        let digest = Digest::of(&data);
        EncodedChunk {
            digest,
            encoding: lazystore_castore::proto::ChunkEncoding::Raw,
            size: len as u64,
            data: data.into(),
        }
    })
}

#[tokio::test]
async fn a_put_over_the_upload_limit_is_refused_and_stores_nothing() {
    let backend = Arc::new(MemoryBlobService::new());
    let server = start(backend.clone(), |s| s.with_max_upload_size(1000)).await;
    let mut raw = BlobServiceClient::new(Connection::lazy(&server.url).unwrap().channel());
    let put = |items: Vec<Item>| {
        futures::stream::iter(
            items
                .into_iter()
                .map(|item| PutRequest { item: Some(item) })
                .collect::<Vec<_>>(),
        )
    };

    // Two chunks of 600 bytes: the second passes the limit.
    let [a, b] = chunks(600);
    let digests = [a.digest, b.digest];
    let err = raw
        .put(put(vec![
            Item::Chunk(ChunkData::from(a.clone())),
            Item::Chunk(ChunkData::from(b.clone())),
        ]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("1000") && err.message().contains("--max-upload-size"),
        "{err:?}"
    );
    assert_eq!(backend.missing_chunks(&digests).await.unwrap(), digests);

    // A blob recorded as larger than the limit, its chunks within it.
    let [small, _] = chunks(10);
    let err = raw
        .put(put(vec![
            Item::Chunk(ChunkData::from(small.clone())),
            Item::Blob(BlobRecord {
                digest: Digest::of(b"a big blob").as_bytes().to_vec().into(),
                size: 1001,
                chunks: vec![],
            }),
        ]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        backend
            .stat(&Digest::of(b"a big blob"))
            .await
            .unwrap()
            .is_none()
    );

    // The store's own client is told so at once, not after retries.
    let client = GrpcBlobService::connect_lazy(&server.url).unwrap();
    let started = std::time::Instant::now();
    let err = client.put_chunks(vec![a, b]).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(format!("{err:?}").contains("ResourceExhausted"), "{err:?}");
    assert_eq!(backend.missing_chunks(&digests).await.unwrap(), digests);

    // Within the limit, stored.
    let [c, _] = chunks(900);
    client.put_chunks(vec![c.clone()]).await.unwrap();
    assert!(
        backend
            .missing_chunks(&[c.digest])
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn connections_over_the_limit_wait_until_one_closes() {
    let server = start(Arc::new(MemoryBlobService::new()), |s| {
        s.with_max_connections(2)
    })
    .await;
    // Two clients that say nothing hold both slots.
    let first = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Let the server accept them.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A third is not served: its connection waits in the accept queue.
    let third = Connection::lazy(&server.url).unwrap();
    let err = third.probe(Duration::from_millis(1500)).await.unwrap_err();
    assert!(err.to_string().contains(&server.url), "{err}");

    // Once one closes, the third is accepted and answered.
    drop(first);
    third.probe(Duration::from_secs(5)).await.unwrap();
}
