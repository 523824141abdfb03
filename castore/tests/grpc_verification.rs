//! Trust does not cross the wire: the server refuses uploaded chunks whose
//! bytes don't match their digest, and the client side refuses corrupt
//! chunks and wrong directories a server sends.

use std::sync::Arc;

use async_trait::async_trait;
use lazystore_castore::blobs::{EncodedChunk, GrpcBlobService, MemoryBlobService};
use lazystore_castore::directories::{GrpcDirectoryService, MemoryDirectoryService};
use lazystore_castore::grpc::{Connection, GrpcError, Services, serve};
use lazystore_castore::proto::ChunkEncoding;
use lazystore_castore::proto::blob_service_client::BlobServiceClient;
use lazystore_castore::proto::put_request::Item;
use lazystore_castore::proto::{ChunkData, PutRequest};
use lazystore_castore::{
    BlobError, BlobService, Blobs, ChunkerParams, Digest, Directory, DirectoryError,
    DirectoryService, Node, PathComponent,
};
use rand::RngExt;
use tokio::sync::oneshot;

/// A server on 127.0.0.1 until dropped; `url` is where it listens.
struct Server {
    url: String,
    _stop: oneshot::Sender<()>,
}

async fn start(blobs: Arc<dyn BlobService>, dirs: Arc<dyn DirectoryService>) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("grpc+http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(listener, Services::new(blobs, dirs), async {
        stopped.await.ok();
    }));
    Server { url, _stop: stop }
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill(&mut v[..]);
    v
}

fn forged(claimed: &[u8], actual: &[u8]) -> EncodedChunk {
    EncodedChunk {
        digest: Digest::of(claimed),
        encoding: ChunkEncoding::Raw,
        size: actual.len() as u64,
        data: actual.to_vec().into(),
    }
}

#[tokio::test]
async fn server_refuses_chunks_that_do_not_match_their_digest() {
    let backend = Arc::new(MemoryBlobService::new());
    let server = start(backend.clone(), Arc::new(MemoryDirectoryService::new())).await;
    let remote = GrpcBlobService::connect_lazy(&server.url).unwrap();

    // Through the client: the store's own error comes back.
    let bad = forged(b"claimed", b"actual!");
    match remote.put_chunks(vec![bad.clone()]).await {
        Err(BlobError::Corrupt { chunk, reason }) => {
            assert_eq!(chunk, bad.digest);
            assert_eq!(reason, "BLAKE3 mismatch");
        }
        other => panic!("{other:?}"),
    }
    // A compressed chunk that does not decompress.
    let garbage = EncodedChunk {
        encoding: ChunkEncoding::Zstd,
        size: 100,
        ..forged(b"zstd", b"not zstd at all")
    };
    assert!(matches!(
        remote.put_chunks(vec![garbage]).await,
        Err(BlobError::Decompress { .. })
    ));
    // A good chunk in the same upload as a bad one: the bad one stops it,
    // and neither bad chunk was stored.
    let good = EncodedChunk::encode(b"good".to_vec().into());
    assert!(
        remote
            .put_chunks(vec![good.clone(), bad.clone()])
            .await
            .is_err()
    );
    assert_eq!(
        backend.missing_chunks(&[bad.digest]).await.unwrap(),
        vec![bad.digest]
    );

    // Raw wire messages: INVALID_ARGUMENT, whatever the client.
    let mut raw = BlobServiceClient::new(Connection::lazy(&server.url).unwrap().channel());
    let put = |c: ChunkData| {
        futures::stream::iter([PutRequest {
            item: Some(Item::Chunk(c)),
        }])
    };
    for (what, chunk) in [
        ("digest mismatch", ChunkData::from(bad.clone())),
        (
            "short digest",
            ChunkData {
                digest: vec![1; 8].into(),
                ..ChunkData::from(good.clone())
            },
        ),
        (
            "unknown encoding",
            ChunkData {
                encoding: 9,
                ..ChunkData::from(good.clone())
            },
        ),
        (
            "claims to be huge",
            ChunkData {
                size: 1 << 40,
                ..ChunkData::from(good.clone())
            },
        ),
    ] {
        let err = raw.put(put(chunk)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
    }
}

#[tokio::test]
async fn client_refuses_a_corrupt_chunk_from_the_server() {
    let backend = Arc::new(MemoryBlobService::new());
    let server = start(backend.clone(), Arc::new(MemoryDirectoryService::new())).await;
    let remote = Arc::new(GrpcBlobService::connect_lazy(&server.url).unwrap());
    let blobs = Blobs::new(remote, ChunkerParams::default());

    for (label, data) in [
        ("raw", random(300_000)),
        ("zstd", b"abcdefgh".repeat(40_000)),
    ] {
        let digest = blobs.put(&data).await.unwrap();
        let meta = blobs.stat(&digest).await.unwrap().unwrap();
        let victim = meta.chunks[0].digest;
        // Damage the stored bytes behind the server's back.
        assert!(backend.corrupt_chunk(&victim, |c| {
            let mut d = c.data.to_vec();
            let mid = d.len() / 2;
            d[mid] ^= 1;
            c.data = d.into();
        }));
        let err = blobs.read_range(&digest, &meta, 0, 10).await.unwrap_err();
        assert!(
            matches!(
                err,
                BlobError::Corrupt { chunk, .. } | BlobError::Decompress { chunk, .. }
                    if chunk == victim
            ),
            "{label}: {err}"
        );
    }
}

/// A directory backend that answers every get with the same directory,
/// whatever was asked: a broken or malicious server.
struct Liar(Directory);

#[async_trait]
impl DirectoryService for Liar {
    async fn get(&self, _: &Digest) -> Result<Option<Directory>, DirectoryError> {
        Ok(Some(self.0.clone()))
    }
    async fn put(&self, dir: Directory) -> Result<Digest, DirectoryError> {
        Ok(dir.digest())
    }
}

#[tokio::test]
async fn client_refuses_directories_it_did_not_ask_for() {
    let mut lie = Directory::new();
    lie.add(
        PathComponent::try_from("x").unwrap(),
        Node::File {
            digest: Digest::of(b"x"),
            size: 1,
            executable: false,
        },
    )
    .unwrap();
    let server = start(
        Arc::new(MemoryBlobService::new()),
        Arc::new(Liar(lie.clone())),
    )
    .await;
    let dirs = GrpcDirectoryService::connect_lazy(&server.url).unwrap();

    let asked = Digest::of(b"something else");
    let err = dirs.get(&asked).await.unwrap_err();
    let DirectoryError::Backend(source) = &err else {
        panic!("{err:?}")
    };
    let grpc = source.downcast_ref::<GrpcError>().expect("a GrpcError");
    assert!(matches!(grpc, GrpcError::BadReply { .. }), "{grpc}");
    assert!(err.source_chain_mentions(&server.url), "{grpc}");
    assert!(dirs.get_recursive(&asked).await.is_err());
    // Asked for what it sends, it is believed.
    assert_eq!(dirs.get(&lie.digest()).await.unwrap(), Some(lie));
}

trait SourceChain {
    fn source_chain_mentions(&self, text: &str) -> bool;
}

impl<E: std::error::Error> SourceChain for E {
    fn source_chain_mentions(&self, text: &str) -> bool {
        let mut e: Option<&dyn std::error::Error> = Some(self);
        while let Some(err) = e {
            if err.to_string().contains(text) {
                return true;
            }
            e = err.source();
        }
        false
    }
}
