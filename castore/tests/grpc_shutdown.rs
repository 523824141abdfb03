//! Graceful shutdown: a `ReadChunks` stream in flight when the signal comes
//! runs to its end, an open health watch does not hold the server up, and
//! afterwards the port refuses new calls.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lazystore_castore::RetryPolicy;
use lazystore_castore::blobs::{
    BlobObserver, EncodedChunk, GrpcBlobService, MemoryBlobService, ObservedBlobService,
};
use lazystore_castore::directories::MemoryDirectoryService;
use lazystore_castore::grpc::{Connection, Services, serve};
use lazystore_castore::{BlobError, BlobService, Digest};
use tokio::sync::{Notify, oneshot};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Makes chunk reads slow, and says when the first one starts.
struct Slow {
    reading: Arc<Notify>,
}

#[async_trait]
impl BlobObserver for Slow {
    async fn before_read(&self, _chunks: &[Digest]) -> Result<(), BlobError> {
        self.reading.notify_one();
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(())
    }
}

#[tokio::test]
async fn shutdown_lets_a_stream_in_flight_finish() {
    let reading = Arc::new(Notify::new());
    let backend = Arc::new(ObservedBlobService::new(
        Arc::new(MemoryBlobService::new()),
        Slow {
            reading: reading.clone(),
        },
    ));
    // 64 chunks: four backend batches, so at least 300 ms of stream after
    // the first read starts.
    let chunks: Vec<EncodedChunk> = (0..64u32)
        .map(|i| EncodedChunk::encode(i.to_le_bytes().repeat(1000).into()))
        .collect();
    backend.put_chunks(chunks.clone()).await.unwrap();
    let digests: Vec<Digest> = chunks.iter().map(|c| c.digest).collect();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("grpc+http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        Services::new(backend, Arc::new(MemoryDirectoryService::new())),
        async {
            stopped.await.ok();
        },
    ));

    // An open health watch, as a load balancer keeps.
    let connection = Connection::lazy(&url).unwrap();
    let mut health = HealthClient::new(connection.channel());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "lazystore.castore.v1.BlobService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().is_some());

    // No retries: the stream must finish on its first attempt.
    let remote = GrpcBlobService::new(connection.with_retry(RetryPolicy::no_retries()));
    let read = tokio::spawn(async move { remote.read_chunks(&digests).await });
    reading.notified().await;
    stop.send(()).unwrap();

    assert_eq!(read.await.unwrap().unwrap(), chunks);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server drained")
        .unwrap()
        .unwrap();

    // The watcher heard NOT_SERVING, then the end of its stream.
    let mut last = None;
    while let Ok(Some(m)) = watch.message().await {
        last = Some(m.status);
    }
    assert_eq!(
        last,
        Some(tonic_health::pb::health_check_response::ServingStatus::NotServing as i32)
    );

    let after = GrpcBlobService::new(
        Connection::lazy(&url)
            .unwrap()
            .with_retry(RetryPolicy::no_retries()),
    );
    assert!(after.stat(&Digest::EMPTY).await.is_err());
}
