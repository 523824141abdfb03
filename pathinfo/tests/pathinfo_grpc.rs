//! The PathInfo service on the wire: malformed requests are refused with
//! `INVALID_ARGUMENT` and publish nothing; a client refuses a server's
//! answer that is not the path it asked for; a Unix socket works like TCP;
//! a client rides out a server restart and, with no server, fails with an
//! error naming it.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use futures::stream::{self, BoxStream};
use lazystore_castore::RetryPolicy;
use lazystore_castore::grpc::{Connection, GrpcError, Services, serve};
use lazystore_castore::{Node, SymlinkTarget};
use lazystore_pathinfo::pathinfos::{
    GrpcPathInfoService, PathInfo, PathInfoError, PathInfoServer, PathInfoService,
};
use lazystore_pathinfo::proto;
use lazystore_pathinfo::proto::path_info_service_client::PathInfoServiceClient;
use lazystore_pathinfo::proto::path_info_service_server::{self, PathInfoServiceServer};
use lazystore_pathinfo::{STORE_PATH_HASH_LEN, Store, StorePath, StorePathHash};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::{Code, Request, Response, Status};

/// A server over `store` on `listener`; stops when the sender is dropped.
fn start(
    listener: impl Into<lazystore_castore::grpc::Listener>,
    store: &Store,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let services = Services::new(store.blobs.service().clone(), store.directories.clone())
        .add_service(PathInfoServer::new(store.clone()).into_service());
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
    }
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

    async fn put(
        &self,
        _: Request<proto::PathInfo>,
    ) -> Result<Response<proto::PutPathInfoResponse>, Status> {
        Ok(Response::new(proto::PutPathInfoResponse {}))
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
