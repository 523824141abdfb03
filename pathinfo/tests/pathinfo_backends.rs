//! One suite, every PathInfo backend: each test runs against everything
//! [`backends`] lists (memory, redb, and the gRPC client against a server on
//! 127.0.0.1 over redb), each as a whole [`Store`] so a test can store a
//! root's data before publishing it.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use lazystore_castore::grpc::{Services, serve};
use lazystore_castore::{
    Directory, ErrorClass, Node, PathComponent, RedbStore, Retryable, SymlinkTarget,
};
use lazystore_pathinfo::pathinfos::{
    GrpcPathInfoService, PathInfo, PathInfoError, PathInfoServer, PathInfoService,
    RedbPathInfoService,
};
use lazystore_pathinfo::proto;
use lazystore_pathinfo::proto::trace_service_client::TraceServiceClient;
use lazystore_pathinfo::traces::{TraceError, TraceServer};
use lazystore_pathinfo::{STORE_PATH_HASH_LEN, Signature, Store, StorePath, StorePathHash};

mod common;

/// Cuts the last byte off the stored record of a PathInfo, so it no longer
/// decodes; false if it is not stored.
type CorruptRecord = Box<dyn Fn(&StorePathHash) -> bool + Send + Sync>;

/// A backend under test.
struct Backend {
    name: &'static str,
    store: Store,
    /// Whether a put whose root's data is missing is refused (the server
    /// and the S3 store check; local backends leave that to their callers).
    checks_root: bool,
    /// The server's client, which replaces a path published with another
    /// tree only when asked (`replace`); local backends replace on `put`.
    replaces: Option<GrpcPathInfoService>,
    /// `None` where the backend gives no way in to its stored bytes.
    corrupt_record: Option<CorruptRecord>,
    /// Whatever must outlive the test: a temporary directory, a server.
    _keep: Box<dyn std::any::Any + Send + Sync>,
}

/// Every backend the suite runs against: one line each.
async fn backends() -> Vec<Backend> {
    vec![memory(), redb().await, grpc().await, s3().await]
}

fn memory() -> Backend {
    Backend {
        name: "memory",
        store: Store::memory(),
        checks_root: false,
        replaces: None,
        corrupt_record: None,
        _keep: Box::new(()),
    }
}

/// A redb store in a temporary directory, and a way in to its records.
fn redb_store() -> (Store, CorruptRecord, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(dir.path().join("store.redb")).unwrap();
    let raw = RedbPathInfoService::new(redb.clone());
    let corrupt: CorruptRecord = Box::new(move |hash| {
        raw.corrupt_record(hash, |record| {
            record.pop();
        })
        .unwrap()
    });
    (Store::redb(redb), corrupt, dir)
}

async fn redb() -> Backend {
    let (store, corrupt, dir) = redb_store();
    Backend {
        name: "redb",
        store,
        checks_root: false,
        replaces: None,
        corrupt_record: Some(corrupt),
        _keep: Box::new(dir),
    }
}

/// The gRPC clients, against a server on 127.0.0.1 over a redb store. The
/// server stops with the backend.
async fn grpc() -> Backend {
    let (served, corrupt, dir) = redb_store();
    let traces = TraceServer::new(served.traces.clone()).into_service();
    let services = Services::new(served.blobs.service().clone(), served.directories.clone())
        .add_service(PathInfoServer::new(served).into_service())
        .add_service(traces);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("grpc+http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, services, async {
        stopped.await.ok();
    }));
    Backend {
        name: "grpc",
        store: Store::open(&url, lazystore_pathinfo::StoreOptions::default())
            .await
            .unwrap(),
        checks_root: true,
        replaces: Some(GrpcPathInfoService::connect_lazy(&url).unwrap()),
        corrupt_record: Some(corrupt),
        _keep: Box::new((stop, dir)),
    }
}

/// The three S3 services on the shared Garage cluster of this test
/// process (`lazystore_testkit::garage`), under a prefix of their own.
async fn s3() -> Backend {
    use lazystore_castore::S3Store;
    use lazystore_pathinfo::pathinfos::S3PathInfoService;
    use lazystore_testkit::garage::{Garage, unique_prefix};
    let garage = tokio::task::spawn_blocking(Garage::shared).await.unwrap();
    let options = common::s3_options(garage);
    let url = garage.store_url(&unique_prefix());
    let s3 = S3Store::open(&url, options.clone()).unwrap();
    // The hook is synchronous: the record is rewritten by a client of its
    // own on a runtime of its own (the test's is blocked meanwhile).
    let corrupt: CorruptRecord = Box::new(move |hash| {
        let hash = *hash;
        let raw = S3PathInfoService::new(S3Store::open(&url, options.clone()).unwrap());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime
                .block_on(raw.corrupt_record(&hash, |record| {
                    record.pop();
                }))
                .unwrap()
        })
        .join()
        .unwrap()
    });
    Backend {
        name: "s3",
        store: Store::s3(s3, None),
        checks_root: true,
        replaces: None,
        corrupt_record: Some(corrupt),
        _keep: Box::new(()),
    }
}

fn store_path(n: u8, name: &str) -> StorePath {
    let mut hash = [0u8; STORE_PATH_HASH_LEN];
    hash[0] = n;
    hash[STORE_PATH_HASH_LEN - 1] = 0xa5;
    StorePath::from_parts(hash.into(), name).unwrap()
}

fn signature() -> Signature {
    "cache.nixos.org-1:Wz9mDGZpAAKpW8BEyqH+QjuLGxh6LEfKP3hNxhGOK1kcaCIz4zQNHJRnTlVmeq+tqMtHBEd2OBLj4rVhvwJ1BQ=="
        .parse()
        .unwrap()
}

/// A PathInfo for `path` with `root` and every field set.
fn info(path: StorePath, root: Node) -> PathInfo {
    PathInfo {
        references: vec![path.clone(), store_path(200, "glibc-2.40")],
        store_path: path,
        root,
        nar_size: 4242,
        nar_sha256: [9; 32],
        signatures: vec![signature()],
        deriver: Some(store_path(201, "hello-2.12.drv")),
        ca: None,
    }
}

/// Stores a file and returns its root node.
async fn stored_file(store: &Store, contents: &[u8]) -> Node {
    let digest = store.blobs.put(contents).await.unwrap();
    Node::File {
        digest,
        size: contents.len() as u64,
        executable: true,
    }
}

/// Stores a directory with a file and a subdirectory, leaves first, and
/// returns its root node.
async fn stored_directory(store: &Store, contents: &[u8]) -> Node {
    let file = stored_file(store, contents).await;
    let mut sub = Directory::new();
    sub.add(
        PathComponent::try_from("link").unwrap(),
        Node::Symlink {
            target: SymlinkTarget::try_from(&b"../bin/hello"[..]).unwrap(),
        },
    )
    .unwrap();
    let mut root = Directory::new();
    root.add(PathComponent::try_from("bin").unwrap(), file)
        .unwrap();
    root.add(
        PathComponent::try_from("share").unwrap(),
        Node::directory(&sub),
    )
    .unwrap();
    let node = Node::directory(&root);
    store.directories.put_all(vec![sub, root]).await.unwrap();
    node
}

async fn list_sorted(svc: &dyn PathInfoService) -> Vec<PathInfo> {
    let mut all: Vec<PathInfo> = svc.list().try_collect().await.unwrap();
    all.sort_by(|a, b| a.store_path.cmp(&b.store_path));
    all
}

#[tokio::test]
async fn get_put_list() {
    for b in backends().await {
        let svc = &*b.store.path_infos;
        let a = info(
            store_path(1, "hello-2.12"),
            stored_directory(&b.store, b"hello").await,
        );
        let c = info(
            store_path(2, "bash-5.2"),
            stored_file(&b.store, b"#!/bin/sh").await,
        );
        let target = SymlinkTarget::try_from(&b"/nix/store/x"[..]).unwrap();
        let d = info(store_path(3, "link"), Node::Symlink { target });

        assert_eq!(
            svc.get(&a.store_path.hash()).await.unwrap(),
            None,
            "{}",
            b.name
        );
        assert!(list_sorted(svc).await.is_empty(), "{}", b.name);
        for i in [&a, &c, &d] {
            svc.put(i.clone()).await.unwrap();
        }
        for i in [&a, &c, &d] {
            let got = svc.get(&i.store_path.hash()).await.unwrap();
            assert_eq!(got.as_ref(), Some(i), "{}", b.name);
        }
        assert_eq!(list_sorted(svc).await, vec![a, c, d], "{}", b.name);
        let unknown = store_path(4, "unknown");
        assert_eq!(svc.get(&unknown.hash()).await.unwrap(), None, "{}", b.name);
    }
}

/// Traces: none until put, the latest put kept under its name, and a
/// trace naming a file outside the store refused (by the server, for the
/// gRPC client, which checks too: sent raw, it is refused there).
#[tokio::test]
async fn traces_are_kept_by_build_name() {
    for b in backends().await {
        let traces = &*b.store.traces;
        let file = |n: u8| format!("/nix/store/{}/share/{n}", store_path(1, "hello-2.12"));
        assert_eq!(traces.get("hello").await.unwrap(), None, "{}", b.name);
        let first = vec![file(1), file(2)];
        traces.put("hello", &first).await.unwrap();
        assert_eq!(
            traces.get("hello").await.unwrap(),
            Some(first),
            "{}",
            b.name
        );
        let second = vec![file(3)];
        traces.put("hello", &second).await.unwrap();
        traces.put("bash", &[file(4)]).await.unwrap();
        assert_eq!(
            traces.get("hello").await.unwrap(),
            Some(second.clone()),
            "{}",
            b.name
        );
        assert_eq!(
            traces.get("bash").await.unwrap(),
            Some(vec![file(4)]),
            "{}",
            b.name
        );
        for (name, files) in [
            ("hello", vec!["/etc/passwd".to_owned()]),
            ("../hello", vec![file(1)]),
        ] {
            let e = traces.put(name, &files).await.unwrap_err();
            assert!(matches!(e, TraceError::Invalid(_)), "{}: {e:?}", b.name);
            assert_eq!(e.class(), ErrorClass::Permanent, "{}", b.name);
            // Sent raw, past the client's own check: the server refuses it
            // and keeps the trace it had.
            if let Some(client) = &b.replaces {
                let mut raw = TraceServiceClient::new(client.connection().channel());
                let status = raw
                    .put(proto::Trace {
                        name: name.to_owned(),
                        files,
                    })
                    .await
                    .unwrap_err();
                assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            }
        }
        assert_eq!(
            traces.get("hello").await.unwrap(),
            Some(second),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn delete_unpublishes() {
    for b in backends().await {
        let svc = &*b.store.path_infos;
        let path = store_path(9, "gone-1.0");
        let kept = store_path(10, "kept-1.0");
        for p in [&path, &kept] {
            let info = info(p.clone(), stored_file(&b.store, b"data").await);
            svc.put(info).await.unwrap();
        }
        assert!(svc.delete(&path.hash()).await.unwrap(), "{}", b.name);
        assert_eq!(svc.get(&path.hash()).await.unwrap(), None, "{}", b.name);
        assert!(!svc.delete(&path.hash()).await.unwrap(), "{}", b.name);
        assert!(svc.get(&kept.hash()).await.unwrap().is_some(), "{}", b.name);
        let listed: Vec<_> = list_sorted(svc)
            .await
            .into_iter()
            .map(|i| i.store_path)
            .collect();
        assert_eq!(listed, vec![kept], "{}", b.name);
    }
}

#[tokio::test]
async fn put_replaces() {
    for b in backends().await {
        let svc = &*b.store.path_infos;
        let path = store_path(7, "hello-2.12");
        let first = info(path.clone(), stored_file(&b.store, b"one").await);
        svc.put(first.clone()).await.unwrap();
        // Same path, other metadata and root: the last put wins, or, on a
        // server, the last put asking to replace.
        let mut second = info(path.clone(), stored_directory(&b.store, b"two").await);
        second.signatures.clear();
        second.deriver = None;
        second.ca =
            Some("fixed:r:sha256:1b9fbdyiw53nv3jnagiz5vk0qb2b1hz6gzl2fsl2ib2q6ybjmlz0".into());
        second.nar_sha256[0] ^= 1;
        if let Some(client) = &b.replaces {
            let e = svc.put(second.clone()).await.unwrap_err();
            assert!(e.to_string().contains("already published"), "{e}");
            assert_eq!(e.class(), ErrorClass::Permanent);
            assert_eq!(svc.get(&path.hash()).await.unwrap(), Some(first.clone()));
            client.replace(second.clone()).await.unwrap();
        } else {
            svc.put(second.clone()).await.unwrap();
        }
        assert_eq!(
            svc.get(&path.hash()).await.unwrap(),
            Some(second.clone()),
            "{}",
            b.name
        );
        assert_eq!(list_sorted(svc).await, vec![second.clone()], "{}", b.name);
        // Publishing the same PathInfo again changes nothing.
        svc.put(second.clone()).await.unwrap();
        assert_eq!(list_sorted(svc).await, vec![second], "{}", b.name);
    }
}

#[tokio::test]
async fn corrupt_records_are_errors_not_paths() {
    for b in backends().await {
        let Some(corrupt) = &b.corrupt_record else {
            eprintln!("{}: no access to stored records, skipped", b.name);
            continue;
        };
        let svc = &*b.store.path_infos;
        let good = info(store_path(1, "good"), stored_file(&b.store, b"good").await);
        let bad = info(store_path(2, "bad"), stored_file(&b.store, b"bad").await);
        svc.put(good.clone()).await.unwrap();
        svc.put(bad.clone()).await.unwrap();
        assert!(corrupt(&bad.store_path.hash()), "{}", b.name);

        let e = svc.get(&bad.store_path.hash()).await.unwrap_err();
        assert!(
            matches!(
                e,
                PathInfoError::Invalid(_) | PathInfoError::Corrupt(_) | PathInfoError::Backend(_)
            ),
            "{}: {e}",
            b.name
        );
        // Whichever variant, it is classed as damage, not as an outage.
        assert_eq!(e.class(), ErrorClass::Corrupt, "{}: {e}", b.name);
        // The damaged record is reported; the others are still listed.
        let listed: Vec<_> = svc.list().collect::<Vec<_>>().await;
        let ok: Vec<_> = listed.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert!(listed.iter().any(Result::is_err), "{}", b.name);
        // Over gRPC the listing ends at the error, which the server sends
        // in its backend's order; memory and redb go on past it.
        if b.name != "grpc" {
            assert_eq!(ok, vec![&good], "{}", b.name);
        }
        assert_eq!(
            svc.get(&good.store_path.hash()).await.unwrap(),
            Some(good),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn put_with_missing_root_is_refused() {
    for b in backends().await {
        if !b.checks_root {
            eprintln!(
                "{}: does not check roots (its callers must), skipped",
                b.name
            );
            continue;
        }
        let svc = &*b.store.path_infos;
        // Made in another store: the data is not in this one.
        let elsewhere = Store::memory();
        let dir = stored_directory(&elsewhere, b"elsewhere").await;
        let file = stored_file(&elsewhere, b"elsewhere").await;
        for root in [dir, file] {
            let i = info(store_path(1, "missing"), root.clone());
            let e = svc.put(i.clone()).await.unwrap_err();
            let PathInfoError::MissingRoot {
                store_path,
                root: r,
            } = &e
            else {
                panic!("{}: {e}", b.name)
            };
            assert_eq!(store_path, &i.store_path, "{}", b.name);
            assert!(e.to_string().contains("store its data first"), "{e}");
            assert!(
                matches!(root, Node::Directory { digest, .. } | Node::File { digest, .. } if digest == *r)
            );
            assert_eq!(
                svc.get(&i.store_path.hash()).await.unwrap(),
                None,
                "{}",
                b.name
            );
        }

        // Stored, but not with the size the root node records.
        let Node::File { digest, .. } = stored_file(&b.store, b"12345").await else {
            unreachable!()
        };
        let wrong = Node::File {
            digest,
            size: 6,
            executable: false,
        };
        let e = svc
            .put(info(store_path(2, "wrong-size"), wrong))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                PathInfoError::RootSizeMismatch {
                    recorded: 6,
                    actual: 5,
                    ..
                }
            ),
            "{}: {e}",
            b.name
        );
        assert!(list_sorted(svc).await.is_empty(), "{}", b.name);
    }
}

/// Sixteen publishers at once, each storing its data and publishing: every
/// put lands, and each path reads back as put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts() {
    for b in backends().await {
        let store = Arc::new(b.store.clone());
        let mut tasks = Vec::new();
        for n in 0..16u8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let root = stored_file(&store, &[n; 100]).await;
                let i = info(store_path(n, "p"), root);
                store.path_infos.put(i.clone()).await.unwrap();
                i
            }));
        }
        let mut put = Vec::new();
        for t in tasks {
            put.push(t.await.unwrap());
        }
        put.sort_by(|a, b| a.store_path.cmp(&b.store_path));
        assert_eq!(list_sorted(&*b.store.path_infos).await, put, "{}", b.name);
    }
}
