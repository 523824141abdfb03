//! Chunk lists over gRPC: a batch is one `StatMany` call, not a `Stat` per
//! blob, and a server from before `StatMany` is still answered right, one
//! `Stat` per blob, asked `StatMany` only once; requests over the bound are
//! refused, and answers with more or fewer lists than asked are errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::stream::BoxStream;
use lazystore_castore::blobs::{GrpcBlobService, MemoryBlobService};
use lazystore_castore::directories::MemoryDirectoryService;
use lazystore_castore::grpc::{BlobServer, CallCounts, MAX_STAT_BLOBS, Services, serve};
use lazystore_castore::proto::{self, blob_service_server};
use lazystore_castore::{BlobService, Blobs, ChunkerParams, Digest, error_chain};
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

/// A blob server that answers `Stat` (from the real server) and nothing
/// else but `StatMany` as set, counting those calls.
struct OldServer {
    inner: BlobServer,
    stat_many_calls: Arc<AtomicUsize>,
    /// `None`: UNIMPLEMENTED, a server from before `StatMany`; `Some(n)`:
    /// `n` answers of unknown blobs, however many were asked.
    stat_many_answers: Option<usize>,
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
        let n = self.stat_many_answers.ok_or_else(too_old)?;
        let unknown = proto::StatBlobResponse {
            unknown: true,
            ..Default::default()
        };
        let answers = vec![Ok(unknown); n];
        Ok(Response::new(Box::pin(futures::stream::iter(answers))))
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
    let (url, server) = serve_fake(OldServer {
        inner: BlobServer::new(memory),
        stat_many_calls: stat_many_calls.clone(),
        stat_many_answers: None,
    })
    .await;

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

/// Serves `fake` on a free port of 127.0.0.1; its URL and task.
async fn serve_fake(
    fake: OldServer,
) -> (
    String,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("grpc+http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(blob_service_server::BlobServiceServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (url, server)
}

/// A server that answers more or fewer chunk lists than asked is an error,
/// never a list taken for another blob's.
#[tokio::test]
async fn more_or_fewer_chunk_lists_than_asked_are_an_error() {
    let ask = [Digest::of(b"a"), Digest::of(b"b")];
    for n in [1, 3] {
        let (url, server) = serve_fake(OldServer {
            inner: BlobServer::new(Arc::new(MemoryBlobService::new())),
            stat_many_calls: Arc::default(),
            stat_many_answers: Some(n),
        })
        .await;
        let remote = GrpcBlobService::connect_lazy(&url).unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(60), remote.stat_many(&ask))
            .await
            .expect("a bad answer is not retried forever");
        let e = error_chain(&answer.expect_err("a wrong number of lists is refused"));
        assert!(e.contains("chunk lists"), "{n} answers: {e}");
        server.abort();
    }
}

/// A `StatMany` over the bound, or with a digest that is none, is refused
/// as INVALID_ARGUMENT before the backend is asked.
#[tokio::test]
async fn bad_stat_many_requests_are_refused() {
    let services = Services::new(
        Arc::new(MemoryBlobService::new()),
        Arc::new(MemoryDirectoryService::new()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, services, async {
        stopped.await.ok();
    }));
    let mut client = raw_client(addr).await;
    let digest = |d: Digest| d.as_bytes().to_vec().into();
    let too_many = (0..=MAX_STAT_BLOBS as u32)
        .map(|i| digest(Digest::of(&i.to_le_bytes())))
        .collect();
    let short = vec![digest(Digest::of(b"a")), vec![1u8, 2, 3].into()];
    for digests in [too_many, short] {
        let refused = client
            .stat_many(proto::StatManyRequest { digests })
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    }
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A plain tonic client, past `GrpcBlobService`'s own checks.
async fn raw_client(
    addr: std::net::SocketAddr,
) -> proto::blob_service_client::BlobServiceClient<tonic::transport::Channel> {
    proto::blob_service_client::BlobServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}
