//! Chunk lists over gRPC: a batch is one `StatMany` call, not a `Stat` per
//! blob, and a server from before `StatMany` is still answered right, one
//! `Stat` per blob, asked `StatMany` only once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::stream::BoxStream;
use lazystore_castore::blobs::{GrpcBlobService, MemoryBlobService};
use lazystore_castore::directories::MemoryDirectoryService;
use lazystore_castore::grpc::{BlobServer, CallCounts, Services, serve};
use lazystore_castore::proto::{self, blob_service_server};
use lazystore_castore::{BlobService, Blobs, ChunkerParams, Digest};
use tonic::{Request, Response, Status, Streaming};

/// `n` one-chunk blobs stored through `blobs`, with their digests.
async fn put_blobs(blobs: &Blobs, n: usize) -> Vec<Digest> {
    let mut digests = Vec::new();
    for i in 0..n {
        digests.push(blobs.put(format!("blob {i}").as_bytes()).await.unwrap());
    }
    digests
}

/// Calls of `method` (`Stat`, `StatMany`) answered so far.
fn calls(counts: &CallCounts, method: &str) -> u64 {
    let path = format!("/lazystore.castore.v1.BlobService/{method}");
    counts
        .snapshot()
        .iter()
        .filter(|(m, _, _)| *m == path)
        .map(|(_, _, n)| n)
        .sum()
}

#[tokio::test]
async fn a_batch_of_chunk_lists_is_one_call() {
    let memory = Arc::new(MemoryBlobService::new());
    let counts = Arc::new(CallCounts::default());
    let services = Services::new(memory.clone(), Arc::new(MemoryDirectoryService::new()))
        .with_call_counts(counts.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("grpc+http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, services, async {
        stopped.await.ok();
    }));

    let local = Blobs::new(memory, ChunkerParams::default());
    let digests = put_blobs(&local, 300).await;
    let remote = Blobs::new(
        Arc::new(GrpcBlobService::connect_lazy(&url).unwrap()),
        ChunkerParams::default(),
    );
    let mut ask = digests.clone();
    ask.push(Digest::of(b"unknown"));
    let metas = remote.stat_many(&ask).await.unwrap();
    assert_eq!(metas.len(), 301);
    for (digest, meta) in digests.iter().zip(&metas) {
        assert_eq!(meta.as_ref(), local.stat(digest).await.unwrap().as_ref());
    }
    assert_eq!(metas[300], None);
    assert_eq!((calls(&counts, "StatMany"), calls(&counts, "Stat")), (1, 0));

    // One blob is a unary `Stat`.
    remote.stat_many(&digests[..1]).await.unwrap();
    assert_eq!((calls(&counts, "StatMany"), calls(&counts, "Stat")), (1, 1));

    // More than one call may carry (`MAX_STAT_BLOBS`): split in two.
    let many: Vec<Digest> = digests.iter().cycle().take(1500).copied().collect();
    assert_eq!(remote.stat_many(&many).await.unwrap().len(), 1500);
    assert_eq!(calls(&counts, "StatMany"), 3);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A blob server from before `StatMany`: it answers `Stat` (from the real
/// server) and nothing else, and counts the `StatMany` calls it refused.
struct OldServer {
    inner: BlobServer,
    stat_many_calls: Arc<AtomicUsize>,
}

fn too_old() -> Status {
    Status::unimplemented("not in this version")
}

#[tonic::async_trait]
impl blob_service_server::BlobService for OldServer {
    async fn chunker_params(
        &self,
        _: Request<proto::ChunkerParamsRequest>,
    ) -> Result<Response<proto::ChunkerParamsResponse>, Status> {
        Err(too_old())
    }

    async fn stat(
        &self,
        request: Request<proto::StatBlobRequest>,
    ) -> Result<Response<proto::StatBlobResponse>, Status> {
        self.inner.stat(request).await
    }

    type StatManyStream = BoxStream<'static, Result<proto::StatBlobResponse, Status>>;

    async fn stat_many(
        &self,
        _: Request<proto::StatManyRequest>,
    ) -> Result<Response<Self::StatManyStream>, Status> {
        self.stat_many_calls.fetch_add(1, Ordering::SeqCst);
        Err(too_old())
    }

    type ReadChunksStream = BoxStream<'static, Result<proto::ChunkData, Status>>;

    async fn read_chunks(
        &self,
        _: Request<proto::ReadChunksRequest>,
    ) -> Result<Response<Self::ReadChunksStream>, Status> {
        Err(too_old())
    }

    async fn missing_chunks(
        &self,
        _: Request<proto::MissingChunksRequest>,
    ) -> Result<Response<proto::MissingChunksResponse>, Status> {
        Err(too_old())
    }

    async fn put(
        &self,
        _: Request<Streaming<proto::PutRequest>>,
    ) -> Result<Response<proto::PutResponse>, Status> {
        Err(too_old())
    }

    async fn report_corrupt(
        &self,
        _: Request<proto::ReportCorruptRequest>,
    ) -> Result<Response<proto::ReportCorruptResponse>, Status> {
        Err(too_old())
    }

    async fn quarantined(
        &self,
        _: Request<proto::QuarantinedRequest>,
    ) -> Result<Response<proto::QuarantinedResponse>, Status> {
        Err(too_old())
    }

    async fn stored_sizes(
        &self,
        _: Request<proto::StoredSizesRequest>,
    ) -> Result<Response<proto::StoredSizesResponse>, Status> {
        Err(too_old())
    }
}

#[tokio::test]
async fn a_server_without_stat_many_is_asked_blob_by_blob() {
    let memory = Arc::new(MemoryBlobService::new());
    let local = Blobs::new(memory.clone(), ChunkerParams::default());
    let digests = put_blobs(&local, 40).await;
    let stat_many_calls = Arc::new(AtomicUsize::new(0));
    let old = OldServer {
        inner: BlobServer::new(memory),
        stat_many_calls: stat_many_calls.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("grpc+http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(blob_service_server::BlobServiceServer::new(old))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let remote = GrpcBlobService::connect_lazy(&url).unwrap();
    let mut ask = digests.clone();
    ask.insert(7, Digest::of(b"unknown"));
    for _ in 0..2 {
        let metas = remote.stat_many(&ask).await.unwrap();
        assert_eq!(metas.len(), ask.len());
        for (digest, meta) in ask.iter().zip(&metas) {
            assert_eq!(meta.as_ref(), local.stat(digest).await.unwrap().as_ref());
        }
    }
    let unknown = [Digest::of(b"a"), Digest::of(b"b")];
    assert_eq!(remote.stat_many(&unknown).await.unwrap(), [None, None]);
    // Refused once, then not asked again.
    assert_eq!(stat_many_calls.load(Ordering::SeqCst), 1);
    server.abort();
}
