//! The PathInfo service on the wire: malformed requests are refused with
//! `INVALID_ARGUMENT` and publish nothing; a client refuses a server's
//! answer that is not the path it asked for; a Unix socket works like TCP;
//! a client rides out a server restart and, with no server, fails with an
//! error naming it; with tokens set, a put of each kind (chunks and blob,
//! directory, PathInfo) and a read of each without the right token are
//! refused at once with `UNAUTHENTICATED`, store nothing, and say which
//! token to give; health checks stay open.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use futures::stream::{self, BoxStream};
use lazystore_castore::auth::{Access, Token, Tokens};
use lazystore_castore::grpc::{Connection, GrpcError, Services, serve};
use lazystore_castore::{Digest, Directory, ErrorClass, RetryPolicy, Retryable, error_chain};
use lazystore_castore::{Node, SymlinkTarget};
use lazystore_pathinfo::pathinfos::{
    Facts, GrpcPathInfoService, PathInfo, PathInfoError, PathInfoServer, PathInfoService,
};
use lazystore_pathinfo::proto;
use lazystore_pathinfo::proto::path_info_service_client::PathInfoServiceClient;
use lazystore_pathinfo::proto::path_info_service_server::{self, PathInfoServiceServer};
use lazystore_pathinfo::{STORE_PATH_HASH_LEN, Store, StoreOptions, StorePath, StorePathHash};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::{Code, Request, Response, Status};

/// A server over `store` on `listener`; stops when the sender is dropped.
fn start(
    listener: impl Into<lazystore_castore::grpc::Listener>,
    store: &Store,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    start_with(listener, store, Access::default())
}

/// [`start`], letting in only calls that `access` allows.
fn start_with(
    listener: impl Into<lazystore_castore::grpc::Listener>,
    store: &Store,
    access: Access,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let services = Services::new(store.blobs.service().clone(), store.directories.clone())
        .add_service(PathInfoServer::new(store.clone()).into_service())
        .with_access(access);
    let listener: lazystore_castore::grpc::Listener = listener.into();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(listener, services, async {
            stopped.await.ok();
        })
        .await
        .unwrap()
    });
    (stop, task)
}

fn symlink_info(n: u8) -> PathInfo {
    let mut hash = [7u8; STORE_PATH_HASH_LEN];
    hash[0] = n;
    PathInfo {
        store_path: StorePath::from_parts(hash.into(), "link").unwrap(),
        root: Node::Symlink {
            target: SymlinkTarget::try_from(&b"/somewhere"[..]).unwrap(),
        },
        references: vec![],
        nar_size: 120,
        nar_sha256: [1; 32],
        signatures: vec![],
        deriver: None,
        ca: None,
    }
}

fn fast_retries(deadline: Duration) -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        deadline,
        ..RetryPolicy::default()
    }
}

#[tokio::test]
async fn malformed_requests_are_invalid_arguments() {
    let store = Store::memory();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (_stop, _task) = start(listener, &store);
    let mut raw = PathInfoServiceClient::connect(url).await.unwrap();

    let good = proto::PathInfo::from(&symlink_info(1));
    let mut bad_hash = good.clone();
    bad_hash.nar_sha256 = Bytes::from_static(&[0; 31]);
    let mut bad_path = good.clone();
    bad_path.store_path = "not-a-store-path".into();
    let mut no_root = good.clone();
    no_root.root = None;
    for (what, bad) in [
        ("NarHash", bad_hash),
        ("store path", bad_path),
        ("root", no_root),
    ] {
        let e = raw.put(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains("invalid"), "{what}: {}", e.message());
    }
    assert!(
        store
            .path_infos
            .list()
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .is_empty()
    );

    for len in [0, 19, 21, 32] {
        let request = proto::GetPathInfoRequest {
            hash: vec![1; len].into(),
        };
        let e = raw.get(request).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{len}: {e:?}");
        assert!(
            e.message()
                .contains(&format!("invalid hash: {len} bytes, not 20")),
            "{len}: {e:?}"
        );
        let request = proto::DeletePathInfoRequest {
            hash: vec![1; len].into(),
        };
        let e = raw.delete(request).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "delete {len}: {e:?}");
    }
    // A path never published: nothing deleted, no error.
    let request = proto::DeletePathInfoRequest {
        hash: vec![1; 20].into(),
    };
    assert!(!raw.delete(request).await.unwrap().into_inner().deleted);
    let request = proto::GetPathInfoRequest {
        hash: vec![1; 20].into(),
    };
    assert_eq!(raw.get(request).await.unwrap_err().code(), Code::NotFound);
}

/// A server that answers every Get with the same PathInfo, whatever was
/// asked, and lists an invalid one.
struct Liar(proto::PathInfo);

#[tonic::async_trait]
impl path_info_service_server::PathInfoService for Liar {
    type ListStream = BoxStream<'static, Result<proto::PathInfo, Status>>;

    async fn get(
        &self,
        _: Request<proto::GetPathInfoRequest>,
    ) -> Result<Response<proto::PathInfo>, Status> {
        Ok(Response::new(self.0.clone()))
    }

    async fn facts(
        &self,
        _: Request<proto::GetPathInfoRequest>,
    ) -> Result<Response<proto::PathInfo>, Status> {
        Ok(Response::new(self.0.clone()))
    }

    async fn get_published(
        &self,
        _: Request<proto::GetPathInfoRequest>,
    ) -> Result<Response<proto::PathInfo>, Status> {
        Ok(Response::new(self.0.clone()))
    }

    async fn listing(
        &self,
        _: Request<proto::GetPathInfoRequest>,
    ) -> Result<Response<proto::ListingResponse>, Status> {
        Ok(Response::new(proto::ListingResponse::default()))
    }

    async fn put(
        &self,
        _: Request<proto::PathInfo>,
    ) -> Result<Response<proto::PutPathInfoResponse>, Status> {
        Ok(Response::new(proto::PutPathInfoResponse {}))
    }

    async fn delete(
        &self,
        _: Request<proto::DeletePathInfoRequest>,
    ) -> Result<Response<proto::DeletePathInfoResponse>, Status> {
        Ok(Response::new(proto::DeletePathInfoResponse {
            deleted: true,
        }))
    }

    async fn collect_garbage(
        &self,
        _: Request<proto::CollectGarbageRequest>,
    ) -> Result<Response<proto::CollectGarbageResponse>, Status> {
        Err(Status::unimplemented("a liar collects nothing"))
    }

    async fn list(
        &self,
        _: Request<proto::ListPathInfoRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let mut invalid = self.0.clone();
        invalid.nar_size = 0;
        let items = vec![Ok(self.0.clone()), Ok(invalid)];
        Ok(Response::new(Box::pin(stream::iter(items))))
    }
}

#[tokio::test]
async fn answers_are_checked() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("grpc+http://{}", listener.local_addr().unwrap());
    let sent = symlink_info(1);
    let liar = PathInfoServiceServer::new(Liar(proto::PathInfo::from(&sent)));
    let empty = Store::memory();
    let services =
        Services::new(empty.blobs.service().clone(), empty.directories).add_service(liar);
    tokio::spawn(serve(listener, services, std::future::pending()));
    let client = GrpcPathInfoService::connect_lazy(&url).unwrap();

    assert_eq!(
        client.get(&sent.store_path.hash()).await.unwrap(),
        Some(sent.clone())
    );
    let other = symlink_info(2);
    let e = client.get(&other.store_path.hash()).await.unwrap_err();
    let PathInfoError::Backend(inner) = &e else {
        panic!("{e}")
    };
    let grpc = inner.downcast_ref::<GrpcError>().expect("a GrpcError");
    assert!(matches!(grpc, GrpcError::BadReply { .. }), "{grpc}");
    assert!(grpc.to_string().contains(&url), "{grpc}");
    // Published PathInfos and facts are held to the same: the path asked
    // for.
    let e = client
        .get_published(&other.store_path.hash())
        .await
        .unwrap_err();
    assert!(
        lazystore_castore::error_chain(&e).contains("asked for hash"),
        "{e}"
    );
    assert_eq!(
        client.facts(&sent.store_path.hash()).await.unwrap(),
        Some(Facts::from(sent.clone()))
    );
    let e = client.facts(&other.store_path.hash()).await.unwrap_err();
    assert!(
        lazystore_castore::error_chain(&e).contains("asked for hash"),
        "{e}"
    );

    let listed: Vec<_> = futures::StreamExt::collect::<Vec<_>>(client.list()).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0].as_ref().unwrap(), &sent);
    let e = lazystore_castore::error_chain(listed[1].as_ref().unwrap_err());
    assert!(e.contains(&url) && e.contains("NarSize is 0"), "{e}");
}

#[tokio::test]
async fn unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("lazystore.sock");
    let store = Store::memory();
    let (_stop, _task) = start(tokio::net::UnixListener::bind(&sock).unwrap(), &store);
    let url = format!("grpc+unix://{}", sock.display());
    let client = Store::open(&url, lazystore_pathinfo::StoreOptions::default())
        .await
        .unwrap();
    let info = symlink_info(3);
    client.path_infos.put(info.clone()).await.unwrap();
    assert_eq!(
        client
            .path_infos
            .get(&info.store_path.hash())
            .await
            .unwrap(),
        Some(info.clone())
    );
    assert_eq!(
        store.path_infos.get(&info.store_path.hash()).await.unwrap(),
        Some(info)
    );
}

#[tokio::test]
async fn client_rides_out_a_restart() {
    let store = Store::memory();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (stop, task) = start(listener, &store);
    let connection = Connection::lazy(&format!("grpc+http://{addr}"))
        .unwrap()
        .with_retry(fast_retries(Duration::from_secs(20)))
        .with_attempt_timeout(Duration::from_secs(2));
    let client = GrpcPathInfoService::new(connection);
    let info = symlink_info(4);
    client.put(info.clone()).await.unwrap();

    drop(stop);
    task.await.unwrap();
    let restarted = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            start(TcpListener::bind(addr).await.unwrap(), &store)
        })
    };
    // Sent while the server is down: retried until it is back.
    assert_eq!(
        client.get(&info.store_path.hash()).await.unwrap(),
        Some(info)
    );
    drop(restarted.await.unwrap());
}

#[tokio::test]
async fn no_server_is_an_error_naming_it() {
    // A port nobody listens on: bound, then closed.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("grpc+http://{addr}");
    let connection = Connection::lazy(&url)
        .unwrap()
        .with_retry(fast_retries(Duration::from_millis(300)))
        .with_attempt_timeout(Duration::from_secs(2));
    let client = GrpcPathInfoService::new(connection);
    for e in [
        client
            .get(&StorePathHash::from([1; STORE_PATH_HASH_LEN]))
            .await
            .unwrap_err(),
        client.put(symlink_info(5)).await.unwrap_err(),
        client.list().try_collect::<Vec<_>>().await.unwrap_err(),
    ] {
        let PathInfoError::Backend(inner) = &e else {
            panic!("{e}")
        };
        let grpc = inner.downcast_ref::<GrpcError>().expect("a GrpcError");
        assert!(matches!(grpc, GrpcError::GaveUp { .. }), "{grpc}");
        let msg = grpc.to_string();
        assert!(
            msg.contains(&url) && msg.contains("is the server running?"),
            "{msg}"
        );
    }
}

/// Tokens as a server reads them from a file.
fn tokens(text: &str) -> Tokens {
    Tokens::parse(std::path::Path::new("tokens"), text).unwrap()
}

/// A client of `url` sending `token`, with the default retries (30 s):
/// a refusal must not wait for them.
async fn client(url: &str, token: Option<&str>) -> Store {
    let options = StoreOptions {
        token: token.map(|t| Token::parse(std::path::Path::new("token"), t).unwrap()),
        ..StoreOptions::default()
    };
    Store::open(url, options).await.unwrap()
}

/// A refusal: permanent, quick, naming the URL, the code, the token needed
/// and the client's flag.
fn assert_refused(e: &(dyn std::error::Error + 'static), class: ErrorClass, url: &str, kind: &str) {
    let message = error_chain(e);
    assert_eq!(class, ErrorClass::Permanent, "{message}");
    for part in [url, "Unauthenticated", kind, "--token-file"] {
        assert!(message.contains(part), "{part:?} not in: {message}");
    }
}

fn sample_dir() -> Directory {
    let mut dir = Directory::new();
    dir.add(
        "link".try_into().unwrap(),
        Node::Symlink {
            target: SymlinkTarget::try_from(&b"/somewhere"[..]).unwrap(),
        },
    )
    .unwrap();
    dir
}

#[tokio::test]
async fn writes_need_a_write_token_and_store_nothing_without_one() {
    let store = Store::memory();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("grpc+http://{}", listener.local_addr().unwrap());
    let access = Access {
        read: None,
        write: Some(tokens("# rotating\nold-token\nnew-token\n")),
    };
    let (_stop, _task) = start_with(listener, &store, access);

    let data = lazystore_testkit::noise(300 * 1024, 3);
    // The chunks the data is cut into, as the server's store would cut it.
    let local = Store::memory();
    let blob = local.blobs.put(&data).await.unwrap();
    let chunks: Vec<Digest> = local
        .blobs
        .stat(&blob)
        .await
        .unwrap()
        .unwrap()
        .chunks
        .iter()
        .map(|c| c.digest)
        .collect();
    assert!(chunks.len() > 1);
    let dir = sample_dir();
    let info = symlink_info(9);

    for token in [None, Some("guess"), Some("new-toke")] {
        let c = client(&url, token).await;
        let started = std::time::Instant::now();
        let e = c.blobs.put(&data).await.unwrap_err();
        assert_refused(&e, e.class(), &url, "write token");
        let e = c.directories.put(dir.clone()).await.unwrap_err();
        assert_refused(&e, e.class(), &url, "write token");
        let e = c.path_infos.put(info.clone()).await.unwrap_err();
        assert_refused(&e, e.class(), &url, "write token");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{token:?}: {:?}",
            started.elapsed()
        );
        // Reads stay open.
        assert_eq!(
            c.path_infos.get(&info.store_path.hash()).await.unwrap(),
            None
        );
    }
    // Nothing was stored: no chunk, no blob, no directory, no path.
    let missing = store.blobs.service().missing_chunks(&chunks).await.unwrap();
    assert_eq!(missing.len(), chunks.len());
    assert!(store.blobs.stat(&blob).await.unwrap().is_none());
    assert!(
        store
            .directories
            .get(&dir.digest())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .path_infos
            .list()
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .is_empty()
    );

    // Either token of the file writes.
    for token in ["old-token", "new-token"] {
        let c = client(&url, Some(token)).await;
        assert_eq!(c.blobs.put(&data).await.unwrap(), blob);
        assert_eq!(c.directories.put(dir.clone()).await.unwrap(), dir.digest());
        c.path_infos.put(info.clone()).await.unwrap();
    }
    assert!(
        store
            .blobs
            .service()
            .missing_chunks(&chunks)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .directories
            .get(&dir.digest())
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        store.path_infos.get(&info.store_path.hash()).await.unwrap(),
        Some(info)
    );
}

#[tokio::test]
async fn reads_need_a_read_or_write_token_and_health_stays_open() {
    let store = Store::memory();
    let blob = store.blobs.put(b"read me").await.unwrap();
    let dir = sample_dir();
    store.directories.put(dir.clone()).await.unwrap();
    let info = symlink_info(10);
    store.path_infos.put(info.clone()).await.unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("grpc+http://{}", listener.local_addr().unwrap());
    let access = Access {
        read: Some(tokens("reader\n")),
        write: Some(tokens("writer\n")),
    };
    let (_stop, _task) = start_with(listener, &store, access);

    for token in [None, Some("guess")] {
        let c = client(&url, token).await;
        let e = c.blobs.stat(&blob).await.unwrap_err();
        assert_refused(&e, e.class(), &url, "read token");
        let e = c.directories.get(&dir.digest()).await.unwrap_err();
        assert_refused(&e, e.class(), &url, "read token");
        let e = c.path_infos.get(&info.store_path.hash()).await.unwrap_err();
        assert_refused(&e, e.class(), &url, "read token");
        let e = c
            .path_infos
            .list()
            .try_collect::<Vec<_>>()
            .await
            .unwrap_err();
        assert_refused(&e, e.class(), &url, "read token");
        let e = c.blobs.service().missing_chunks(&[blob]).await.unwrap_err();
        assert_refused(&e, e.class(), &url, "read token");
    }
    // A read token reads but does not write; a write token does both.
    let reader = client(&url, Some("reader")).await;
    let writer = client(&url, Some("writer")).await;
    for c in [&reader, &writer] {
        let meta = c.blobs.stat(&blob).await.unwrap().unwrap();
        let bytes = c
            .blobs
            .read_range(&blob, &meta, 0, meta.size)
            .await
            .unwrap();
        assert_eq!(&bytes[..], b"read me");
        assert_eq!(
            c.directories.get(&dir.digest()).await.unwrap(),
            Some(dir.clone())
        );
        assert_eq!(
            c.path_infos.get(&info.store_path.hash()).await.unwrap(),
            Some(info.clone())
        );
    }
    let e = reader.blobs.put(b"new data").await.unwrap_err();
    assert_refused(&e, e.class(), &url, "write token");
    assert!(
        store
            .blobs
            .stat(&Digest::of(b"new data"))
            .await
            .unwrap()
            .is_none()
    );
    writer.blobs.put(b"new data").await.unwrap();
    assert!(
        store
            .blobs
            .stat(&Digest::of(b"new data"))
            .await
            .unwrap()
            .is_some()
    );

    // Health needs no token.
    let connection = Connection::lazy(&url).unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(connection.channel());
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "lazystore.pathinfo.v1.PathInfoService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}
