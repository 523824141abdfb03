//! `lazystore serve`, as a real process: it prints the URL it listens on,
//! serves blobs, directories and path infos (a NAR ingested and published
//! through `Store::open("grpc+http://…")` reads back, also after a restart
//! on the same redb file), reports gRPC health, lets a call in flight finish
//! on SIGTERM and exits 0, and refuses clearly when the store file or the
//! address is taken.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use lazystore_castore::Digest;
use lazystore_castore::proto::blob_service_client::BlobServiceClient;
use lazystore_pathinfo::ingest::ingest_nar;
use lazystore_pathinfo::nar::NarWriter;
use lazystore_pathinfo::pathinfos::PathInfo;
use lazystore_pathinfo::render::nar_hash;
use lazystore_pathinfo::{Store, StorePath};
use lazystore_testkit::noise;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long a server gets to start or stop.
const PATIENCE: Duration = Duration::from_secs(60);

/// A running `lazystore serve`.
struct Server {
    child: Child,
    /// The URL it printed.
    url: String,
    /// What it logged so far (`RUST_LOG=info`). A mutex because the
    /// reader thread appends while the test may read.
    log: Arc<Mutex<String>>,
    /// Reads the log until the process closes its stderr.
    log_reader: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(listen: &str, store: &str) -> Server {
        let mut child = serve_command(listen, store)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run lazystore serve");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let log_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("server: {line}");
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep reading, so the server never blocks on a full pipe.
            lines.for_each(drop);
        });
        let url = match rx.recv_timeout(PATIENCE) {
            Ok(Some(Ok(line))) => line,
            other => {
                let _ = child.kill();
                panic!("lazystore serve printed no address: {other:?}");
            }
        };
        Server {
            child,
            url,
            log,
            log_reader: Some(log_reader),
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name}");
    }

    /// Sends `signal` and waits for the process to exit.
    async fn stop(mut self, signal: &str) -> ExitStatus {
        self.signal(signal);
        let status = wait(&mut self.child).await;
        if let Some(reader) = self.log_reader.take() {
            reader.join().unwrap();
        }
        status
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_command(listen: &str, store: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lazystore"));
    cmd.args(["serve", "--listen", listen, "--store", store])
        .env("RUST_LOG", "info");
    cmd
}

/// Waits for `child` to exit without blocking the runtime: the test's
/// clients must go on answering the server's goodbye (HTTP/2 GOAWAY) for it
/// to finish draining.
async fn wait(child: &mut Child) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < PATIENCE, "lazystore serve did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `lazystore serve` expecting it to fail; returns its stderr.
fn serve_fails(listen: &str, store: &str) -> String {
    let out = serve_command(listen, store)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve {listen} {store} succeeded");
    assert!(out.stdout.is_empty(), "printed an address though it failed");
    String::from_utf8(out.stderr).unwrap()
}

/// A NAR of a small tree: a directory with an executable of several
/// chunks in a subdirectory, an empty file and a symlink.
async fn sample_nar() -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new());
    let hello = noise(300 * 1024, 42);
    w.start_directory(None).await.unwrap();
    w.start_directory(Some(b"bin")).await.unwrap();
    w.file(Some(b"hello"), true, hello.len() as u64)
        .await
        .unwrap();
    w.write_content(&hello).await.unwrap();
    w.end_directory().await.unwrap();
    w.file(Some(b"empty"), false, 0).await.unwrap();
    w.symlink(Some(b"lib"), b"bin").await.unwrap();
    w.end_directory().await.unwrap();
    w.finish().await.unwrap()
}

async fn assert_serving(url: &str) {
    let endpoint = url.replace("grpc+http://", "http://");
    let channel = tonic::transport::Endpoint::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in [
        "lazystore.castore.v1.BlobService",
        "lazystore.castore.v1.DirectoryService",
        "lazystore.pathinfo.v1.PathInfoService",
    ] {
        let answer = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "{service}");
    }
}

#[tokio::test]
async fn publish_read_back_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("redb://{}/store.redb", dir.path().display());

    let server = Server::start("127.0.0.1:0", &store_url);
    assert!(
        server.url.starts_with("grpc+http://127.0.0.1:") && !server.url.ends_with(":0"),
        "{}",
        server.url
    );
    assert_serving(&server.url).await;
    let client = Store::open(&server.url, lazystore_pathinfo::StoreOptions::default())
        .await
        .unwrap();

    let nar = sample_nar().await;
    let ingested = ingest_nar(&client.blobs, &*client.directories, &nar[..])
        .await
        .unwrap();
    let path = StorePath::from_basename("0c3h9dkbdsx5zzs9y5a7gf5v5ja5xkrf-hello-2.12").unwrap();
    let info = PathInfo {
        references: vec![path.clone()],
        ..ingested.path_info(path.clone())
    };
    client.path_infos.put(info.clone()).await.unwrap();
    assert_eq!(
        client.path_infos.get(&path.hash()).await.unwrap(),
        Some(info.clone())
    );
    let rendered = nar_hash(&client.blobs, &*client.directories, &info.root)
        .await
        .unwrap();
    assert_eq!(rendered, (info.nar_size, info.nar_sha256));

    let log = server.log.clone();
    let status = server.stop("TERM").await;
    assert!(status.success(), "{status:?}");
    let log = log.lock().unwrap().clone();
    for logged in ["serving", "SIGTERM", "draining", "stopped"] {
        assert!(log.contains(logged), "{logged:?} not in the log:\n{log}");
    }

    // The same file, a new process: everything is still there.
    let server = Server::start("127.0.0.1:0", &store_url);
    let client = Store::open(&server.url, lazystore_pathinfo::StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(
        client.path_infos.get(&path.hash()).await.unwrap(),
        Some(info.clone())
    );
    let rendered = nar_hash(&client.blobs, &*client.directories, &info.root)
        .await
        .unwrap();
    assert_eq!(rendered, (info.nar_size, info.nar_sha256));
    let status = server.stop("INT").await;
    assert!(status.success(), "{status:?}");
}

/// A `ReadChunks` stream that has started when SIGTERM arrives runs to its
/// end, read slowly, before the process exits 0.
#[tokio::test]
async fn sigterm_lets_calls_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("redb://{}/store.redb", dir.path().display());
    let server = Server::start("127.0.0.1:0", &store_url);
    let client = Store::open(&server.url, lazystore_pathinfo::StoreOptions::default())
        .await
        .unwrap();
    let blob = client.blobs.put(&noise(8 << 20, 7)).await.unwrap();
    let meta = client.blobs.stat(&blob).await.unwrap().unwrap();
    let chunks: Vec<Digest> = meta.chunks.iter().map(|c| c.digest).collect();
    assert!(chunks.len() > 50, "{} chunks", chunks.len());

    let endpoint = server.url.replace("grpc+http://", "http://");
    let mut raw = BlobServiceClient::connect(endpoint)
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let request = lazystore_castore::proto::ReadChunksRequest {
        digests: chunks.iter().map(|&d| d.into()).collect(),
    };
    let mut stream = raw.read_chunks(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().expect("a first chunk");
    let mut received = vec![first];

    server.signal("TERM");
    while let Some(chunk) = stream.message().await.unwrap() {
        received.push(chunk);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(received.len(), chunks.len());
    for (chunk, want) in received.iter().zip(&chunks) {
        assert_eq!(Digest::try_from(&chunk.digest).unwrap(), *want);
    }
    drop(stream);
    drop(raw);
    let mut server = server;
    let status = wait(&mut server.child).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn unix_socket_and_its_stale_file() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("lazystore.sock");
    let listen = format!("unix:{}", sock.display());
    for round in 0..2 {
        // The second round binds over the socket file the first one left.
        let server = Server::start(&listen, "memory://");
        assert_eq!(server.url, format!("grpc+unix://{}", sock.display()));
        let client = Store::open(&server.url, lazystore_pathinfo::StoreOptions::default())
            .await
            .unwrap();
        let blob = client.blobs.put(b"over a socket").await.unwrap();
        assert!(client.blobs.stat(&blob).await.unwrap().is_some(), "{round}");
        if round == 0 {
            let e = serve_fails(&listen, "memory://");
            assert!(e.contains("already listening"), "{e}");
        }
        let status = server.stop("TERM").await;
        assert!(status.success(), "{status:?}");
    }
}

#[tokio::test]
async fn taken_store_or_address_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("redb://{}/store.redb", dir.path().display());
    let server = Server::start("127.0.0.1:0", &store_url);

    let e = serve_fails("127.0.0.1:0", &store_url);
    assert!(e.starts_with("lazystore: "), "{e}");
    assert!(e.contains(&store_url) && e.contains("already open"), "{e}");

    let addr = server.url.trim_start_matches("grpc+http://");
    let e = serve_fails(addr, "memory://");
    assert!(e.contains(addr) && e.contains("in use"), "{e}");

    let e = serve_fails("127.0.0.1:0", "redb://relative/store.redb");
    assert!(e.contains("absolute"), "{e}");
    let e = serve_fails("127.0.0.1:0", "gs://bucket");
    assert!(e.contains("unsupported store URL"), "{e}");
    let e = serve_fails("127.0.0.1:0", "s3://bucket/p?sync=no");
    assert!(e.contains("unknown option"), "{e}");
    let e = serve_fails("nonsense", "memory://");
    assert!(e.contains("HOST:PORT"), "{e}");

    let status = server.stop("TERM").await;
    assert!(status.success(), "{status:?}");
    // The file is free again once the server has exited.
    let _ = Store::open(&store_url, lazystore_pathinfo::StoreOptions::default())
        .await
        .unwrap();
}
