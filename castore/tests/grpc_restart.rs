//! Readers through the gRPC client ride out a server restart on the same
//! port, whether the server shut down cleanly or died mid-stream; past the
//! retry deadline they fail with an error naming the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use lazystore_castore::RetryPolicy;
use lazystore_castore::blobs::{GrpcBlobService, MemoryBlobService};
use lazystore_castore::directories::MemoryDirectoryService;
use lazystore_castore::grpc::{Connection, GrpcError, Services, serve};
use lazystore_castore::{BlobError, BlobService, Blobs, ChunkerParams, Digest, DirectoryService};
use rand::RngExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The store outlives the servers, as a database file would.
#[derive(Clone)]
struct Store {
    blobs: Arc<dyn BlobService>,
    dirs: Arc<dyn DirectoryService>,
}

impl Store {
    fn services(&self) -> Services {
        Services::new(self.blobs.clone(), self.dirs.clone())
    }
}

/// A server in the test's runtime, stopped cleanly.
struct Graceful {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_graceful(addr: SocketAddr, store: &Store) -> Graceful {
    let listener = TcpListener::bind(addr).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, store.services(), async {
        stopped.await.ok();
    }));
    let task = tokio::spawn(async move { task.await.unwrap().unwrap() });
    Graceful { stop, task }
}

impl Graceful {
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap();
    }
}

/// A server in a runtime of its own on its own thread, so it can die the
/// way a killed process does: every task and socket dropped at once, no
/// goodbye to the clients.
struct Crashable {
    kill: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

fn start_crashable(addr: SocketAddr, store: &Store) -> Crashable {
    let services = store.services();
    let (kill, killed) = oneshot::channel::<()>();
    let (ready, is_ready) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind(addr).await.unwrap();
            ready.send(()).unwrap();
            tokio::spawn(serve(listener, services, std::future::pending()));
            killed.await.ok();
        });
        rt.shutdown_background();
    });
    is_ready.recv().unwrap();
    Crashable { kill, thread }
}

impl Crashable {
    fn kill(self) {
        self.kill.send(()).unwrap();
        self.thread.join().unwrap();
    }
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill(&mut v[..]);
    v
}

/// Readers that loop over `data` until told to stop, checking every byte.
struct Readers {
    reads: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), BlobError>>>,
}

fn start_readers(url: &str, n: usize, data: Arc<Vec<(Digest, Vec<u8>)>>) -> Readers {
    let reads = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = (0..n)
        .map(|i| {
            let blobs = Blobs::new(
                Arc::new(GrpcBlobService::connect_lazy(url).unwrap()),
                ChunkerParams::default(),
            );
            let (data, reads, stop) = (data.clone(), reads.clone(), stop.clone());
            tokio::spawn(async move {
                let mut k = i;
                while !stop.load(Ordering::Relaxed) {
                    let (digest, bytes) = &data[k % data.len()];
                    k += 1;
                    let meta = blobs.stat(digest).await?.expect("stored");
                    let mut r = blobs.reader(*digest, meta);
                    let mut got = Vec::new();
                    while let Some(c) = r.next_chunk().await? {
                        got.extend_from_slice(&c);
                    }
                    assert_eq!(&got, bytes);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    Readers { reads, stop, tasks }
}

impl Readers {
    /// Waits until `n` more reads have completed.
    async fn wait_for(&self, n: usize) {
        let target = self.reads.load(Ordering::Relaxed) + n;
        tokio::time::timeout(Duration::from_secs(60), async {
            while self.reads.load(Ordering::Relaxed) < target {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("readers made no progress");
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap().expect("a reader failed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_survive_restarts() {
    let store = Store {
        blobs: Arc::new(MemoryBlobService::new()),
        dirs: Arc::new(MemoryDirectoryService::new()),
    };
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let url = format!("grpc+http://{addr}");

    let server = start_graceful(addr, &store).await;
    let writer = Blobs::new(
        Arc::new(GrpcBlobService::connect_lazy(&url).unwrap()),
        ChunkerParams::default(),
    );
    let mut data = Vec::new();
    for _ in 0..8 {
        let bytes = random(400_000);
        data.push((writer.put(&bytes).await.unwrap(), bytes));
    }
    let readers = start_readers(&url, 6, Arc::new(data));
    readers.wait_for(20).await;

    // A clean restart: calls in flight finish, new ones are refused until
    // the server is back.
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = start_crashable(addr, &store);
    readers.wait_for(20).await;

    // A crash in the middle of the readers' streams.
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = start_graceful(addr, &store).await;
    readers.wait_for(20).await;

    readers.finish().await;
    server.stop().await;
}

#[tokio::test]
async fn past_the_deadline_the_error_names_the_server() {
    // A port nothing listens on.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let url = format!("grpc+http://{addr}");
    let policy = RetryPolicy {
        deadline: Duration::from_millis(300),
        ..RetryPolicy::default()
    };
    let connection = Connection::lazy(&url).unwrap().with_retry(policy);
    let remote = GrpcBlobService::new(connection.clone());
    let started = std::time::Instant::now();
    let err = remote.stat(&Digest::EMPTY).await.unwrap_err();
    // One outage, however many attempts and calls it cost.
    let again = remote.stat(&Digest::EMPTY).await;
    assert!(again.is_err());
    assert_eq!(connection.outages(), 1);
    assert!(started.elapsed() < Duration::from_secs(5));
    let BlobError::Backend(source) = &err else {
        panic!("{err:?}")
    };
    let grpc = source.downcast_ref::<GrpcError>().expect("a GrpcError");
    assert!(
        matches!(grpc, GrpcError::GaveUp { attempts, .. } if *attempts > 1),
        "{grpc}"
    );
    assert!(grpc.to_string().contains(&url), "{grpc}");
    assert_eq!(grpc.code(), Some(tonic::Code::Unavailable));
}
