//! Blobs and directories round-trip through a real gRPC server, over
//! loopback TCP and over a Unix socket, and the store's errors come back as
//! the same variants; gRPC health reports the services.

use std::sync::Arc;

use lazystore_castore::blobs::{EncodedChunk, GrpcBlobService, MAX_CHUNK_SIZE, MemoryBlobService};
use lazystore_castore::directories::{GrpcDirectoryService, MemoryDirectoryService};
use lazystore_castore::grpc::{Connection, Listener, Services, serve};
use lazystore_castore::proto::ChunkEncoding;
use lazystore_castore::{
    BlobError, BlobMeta, BlobService, Blobs, ChunkerParams, Digest, Directory, DirectoryError,
    DirectoryService, Node, PathComponent,
};
use rand::RngExt;
use tokio::sync::oneshot;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A server on `listener` over fresh memory backends, until `stop` fires.
struct Server {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn start(listener: impl Into<Listener>) -> Server {
    let listener = listener.into();
    let services = Services::new(
        Arc::new(MemoryBlobService::new()),
        Arc::new(MemoryDirectoryService::new()),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(listener, services, async {
            stopped.await.ok();
        })
        .await
        .unwrap();
    });
    Server { stop, task }
}

impl Server {
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap();
    }
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill(&mut v[..]);
    v
}

fn name(s: &str) -> PathComponent {
    PathComponent::try_from(s).unwrap()
}

async fn read_all(blobs: &Blobs, digest: Digest) -> Vec<u8> {
    let meta = blobs.stat(&digest).await.unwrap().unwrap();
    let mut r = blobs.reader(digest, meta);
    let mut out = Vec::new();
    while let Some(c) = r.next_chunk().await.unwrap() {
        out.extend_from_slice(&c);
    }
    out
}

/// Everything a client does, against the server at `url`.
async fn exercise(url: &str) {
    let connection = Connection::lazy(url).unwrap();
    let remote = Arc::new(GrpcBlobService::new(connection.clone()));
    let blobs = Blobs::new(remote.clone(), ChunkerParams::default());

    // Blobs at the chunker's boundary sizes.
    let p = ChunkerParams::default();
    let (min, avg, max) = (p.min as usize, p.avg as usize, p.max as usize);
    for len in [0, 1, min - 1, min, avg, max, max + 1, 3 << 20] {
        let data = random(len);
        let digest = blobs.put(&data).await.unwrap();
        assert_eq!(digest, Digest::of(&data), "len {len}");
        assert_eq!(read_all(&blobs, digest).await, data, "len {len}");
        let meta = blobs.stat(&digest).await.unwrap().unwrap();
        if len > 0 {
            let got = blobs
                .read_range(&digest, &meta, len as u64 / 3, len as u64 / 2)
                .await
                .unwrap();
            assert_eq!(&got[..], &data[len / 3..len / 3 + len / 2], "len {len}");
        }
    }

    // Compressible chunks travel compressed and read back right.
    let text: Vec<u8> = b"lazystore "
        .iter()
        .copied()
        .cycle()
        .take(300_000)
        .collect();
    let digest = blobs.put(&text).await.unwrap();
    let meta = remote.stat(&digest).await.unwrap().unwrap();
    let first = remote.read_chunks(&[meta.chunks[0].digest]).await.unwrap();
    assert_eq!(first[0].encoding, ChunkEncoding::Zstd);
    assert!(first[0].data.len() < first[0].size as usize / 10);
    assert_eq!(read_all(&blobs, digest).await, text);

    // A chunk of the largest size: past tonic's default 4 MiB message limit.
    let raw = random(MAX_CHUNK_SIZE as usize);
    let big = EncodedChunk {
        digest: Digest::of(&raw),
        encoding: ChunkEncoding::Raw,
        size: raw.len() as u64,
        data: raw.clone().into(),
    };
    remote.put_chunks(vec![big.clone()]).await.unwrap();
    let back = remote.read_chunks(&[big.digest]).await.unwrap();
    assert_eq!(back, vec![big]);

    // More chunks than one ReadChunks request may ask for.
    let many: Vec<EncodedChunk> = (0..1500u32)
        .map(|i| EncodedChunk::encode(i.to_le_bytes().to_vec().into()))
        .collect();
    remote.put_chunks(many.clone()).await.unwrap();
    let digests: Vec<Digest> = many.iter().map(|c| c.digest).collect();
    assert_eq!(remote.read_chunks(&digests).await.unwrap(), many);
    assert!(remote.missing_chunks(&digests).await.unwrap().is_empty());

    // Unknown things, and errors as the same variants a local store gives.
    let unknown = Digest::of(b"never stored");
    assert_eq!(remote.stat(&unknown).await.unwrap(), None);
    assert_eq!(
        remote
            .missing_chunks(&[digests[0], unknown, digests[1]])
            .await
            .unwrap(),
        vec![unknown]
    );
    assert!(matches!(
        remote.read_chunks(&[digests[0], unknown]).await,
        Err(BlobError::ChunkNotFound(d)) if d == unknown
    ));
    let meta = BlobMeta::new(
        unknown,
        5,
        vec![lazystore_castore::blobs::ChunkMeta {
            digest: unknown,
            size: 5,
        }],
    )
    .unwrap();
    assert!(matches!(
        remote.put_blob(unknown, meta).await,
        Err(BlobError::ChunkNotFound(d)) if d == unknown
    ));

    // Directories: a small tree, leaves first.
    let dirs = GrpcDirectoryService::new(connection.clone());
    let mut leaf = Directory::new();
    leaf.add(
        name("f"),
        Node::File {
            digest: Digest::of(b"f"),
            size: 1,
            executable: true,
        },
    )
    .unwrap();
    let mut mid = Directory::new();
    mid.add(name("leaf"), Node::directory(&leaf)).unwrap();
    mid.add(name("empty"), Node::directory(&Directory::new()))
        .unwrap();
    let mut root = Directory::new();
    root.add(name("a"), Node::directory(&mid)).unwrap();
    root.add(name("b"), Node::directory(&leaf)).unwrap();
    let put = vec![leaf.clone(), Directory::new(), mid.clone(), root.clone()];
    assert_eq!(dirs.put_all(put).await.unwrap(), Some(root.digest()));
    assert_eq!(dirs.get(&root.digest()).await.unwrap(), Some(root.clone()));
    assert_eq!(dirs.get(&unknown).await.unwrap(), None);
    let tree = dirs.get_recursive(&root.digest()).await.unwrap();
    assert_eq!(
        tree,
        vec![root.clone(), mid.clone(), leaf.clone(), Directory::new()]
    );
    assert!(matches!(
        dirs.get_recursive(&unknown).await,
        Err(DirectoryError::NotFound(d)) if d == unknown
    ));
    // Single puts, and a directory whose child is not stored.
    assert_eq!(dirs.put(leaf.clone()).await.unwrap(), leaf.digest());
    let mut orphan = Directory::new();
    let missing = Node::Directory {
        digest: unknown,
        size: 0,
    };
    orphan.add(name("gone"), missing).unwrap();
    match dirs.put(orphan.clone()).await {
        Err(DirectoryError::MissingChild {
            parent,
            child,
            digest,
        }) => {
            assert_eq!(
                (parent, child.as_str(), digest),
                (orphan.digest(), "gone", unknown)
            );
        }
        other => panic!("{other:?}"),
    }
    let mut wrong_size = Directory::new();
    let node = Node::Directory {
        digest: leaf.digest(),
        size: 7,
    };
    wrong_size.add(name("leaf"), node).unwrap();
    assert!(matches!(
        dirs.put(wrong_size).await,
        Err(DirectoryError::SizeMismatch {
            recorded: 7,
            actual: 1,
            ..
        })
    ));

    // Health: the server overall and each service.
    let mut health = HealthClient::new(connection.channel());
    for service in [
        "",
        "lazystore.castore.v1.BlobService",
        "lazystore.castore.v1.DirectoryService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

#[tokio::test]
async fn round_trip_over_tcp() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("grpc+http://{}", listener.local_addr().unwrap());
    let server = start(listener);
    exercise(&url).await;
    server.stop().await;
}

#[tokio::test]
async fn round_trip_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("castore.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let server = start(listener);
    exercise(&format!("grpc+unix://{}", path.display())).await;
    server.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_invalid_arguments() {
    use lazystore_castore::proto::blob_service_client::BlobServiceClient;
    use lazystore_castore::proto::{ReadChunksRequest, StatBlobRequest, StoredSizesRequest};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("grpc+http://{}", listener.local_addr().unwrap());
    let server = start(listener);
    let mut client = BlobServiceClient::new(Connection::lazy(&url).unwrap().channel());
    let short = client
        .stat(StatBlobRequest {
            digest: vec![0u8; 31].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(short.code(), tonic::Code::InvalidArgument, "{short:?}");
    let too_many = ReadChunksRequest {
        digests: vec![Digest::EMPTY.into(); lazystore_castore::grpc::MAX_READ_CHUNKS + 1],
    };
    let err = client.read_chunks(too_many).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    // StoredSizes: a short digest and too many are refused, an unknown
    // chunk is not found.
    let short = client
        .stored_sizes(StoredSizesRequest {
            digests: vec![vec![0u8; 31].into()],
        })
        .await
        .unwrap_err();
    assert_eq!(short.code(), tonic::Code::InvalidArgument, "{short:?}");
    let too_many = StoredSizesRequest {
        digests: vec![Digest::EMPTY.into(); lazystore_castore::grpc::MAX_MISSING_CHUNKS + 1],
    };
    let err = client.stored_sizes(too_many).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let unknown = client
        .stored_sizes(StoredSizesRequest {
            digests: vec![Digest::of(b"never stored").into()],
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    server.stop().await;
}
