//! A recursive directory `Get` over gRPC: the server asks its backend for
//! directories in batches (`get_many`), not one by one, still sends them
//! breadth first and each once, and a directory missing below the root
//! ends the stream with NOT_FOUND naming it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use lazystore_castore::blobs::MemoryBlobService;
use lazystore_castore::directories::{GrpcDirectoryService, MemoryDirectoryService};
use lazystore_castore::grpc::{Services, serve};
use lazystore_castore::{Digest, Directory, DirectoryError, DirectoryService, Node, PathComponent};

/// A memory backend that counts its calls, and can lose one directory
/// (as a damaged or half-collected store would).
#[derive(Default)]
struct Counting {
    inner: MemoryDirectoryService,
    gets: AtomicUsize,
    get_manys: AtomicUsize,
    largest_batch: AtomicUsize,
    lost: std::sync::Mutex<Option<Digest>>,
}

#[async_trait]
impl DirectoryService for Counting {
    async fn get(&self, digest: &Digest) -> Result<Option<Directory>, DirectoryError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        if *self.lost.lock().unwrap() == Some(*digest) {
            return Ok(None);
        }
        self.inner.get(digest).await
    }

    async fn get_many(&self, digests: &[Digest]) -> Result<Vec<Option<Directory>>, DirectoryError> {
        self.get_manys.fetch_add(1, Ordering::SeqCst);
        self.largest_batch
            .fetch_max(digests.len(), Ordering::SeqCst);
        let lost = *self.lost.lock().unwrap();
        let mut out = self.inner.get_many(digests).await?;
        for (d, dir) in digests.iter().zip(&mut out) {
            if Some(*d) == lost {
                *dir = None;
            }
        }
        Ok(out)
    }

    async fn put(&self, dir: Directory) -> Result<Digest, DirectoryError> {
        self.inner.put(dir).await
    }
}

fn name(s: &str) -> PathComponent {
    PathComponent::try_from(s).unwrap()
}

#[tokio::test]
async fn a_recursive_get_asks_the_backend_in_batches() {
    let backend = Arc::new(Counting::default());
    let services = Services::new(Arc::new(MemoryBlobService::new()), backend.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("grpc+http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, services, async {
        stopped.await.ok();
    }));

    // root → 200 middles, each → its own leaf and one shared leaf: 402
    // directories over three levels.
    let mut shared = Directory::new();
    shared
        .add(
            name("s"),
            Node::File {
                digest: Digest::of(b"s"),
                size: 1,
                executable: false,
            },
        )
        .unwrap();
    backend.put(shared.clone()).await.unwrap();
    let mut root = Directory::new();
    let mut leaves = Vec::new();
    for i in 0..200u64 {
        let mut leaf = Directory::new();
        leaf.add(
            name("f"),
            Node::File {
                digest: Digest::of(&i.to_le_bytes()),
                size: i + 1,
                executable: false,
            },
        )
        .unwrap();
        backend.put(leaf.clone()).await.unwrap();
        let mut middle = Directory::new();
        middle.add(name("leaf"), Node::directory(&leaf)).unwrap();
        middle
            .add(name("shared"), Node::directory(&shared))
            .unwrap();
        backend.put(middle.clone()).await.unwrap();
        root.add(name(&format!("m{i:03}")), Node::directory(&middle))
            .unwrap();
        leaves.push(leaf);
    }
    let root_digest = backend.put(root.clone()).await.unwrap();

    let client = GrpcDirectoryService::connect_lazy(&url).unwrap();
    let got = client.get_recursive(&root_digest).await.unwrap();
    assert_eq!(got.len(), 1 + 200 + 200 + 1);
    assert_eq!(got[0], root);
    let digests: Vec<Digest> = got.iter().map(Directory::digest).collect();
    assert_eq!(digests.iter().collect::<HashSet<_>>().len(), got.len());
    // Breadth first: every directory after its parent, levels in order.
    let position = |d: &Digest| digests.iter().position(|x| x == d).unwrap();
    for (i, dir) in got.iter().enumerate() {
        for (_, child, _) in dir.subdirectories() {
            assert!(position(&child) > i);
        }
    }
    assert!(got[1..201].iter().all(|d| d.subdirectories().count() == 2));
    assert!(got[201..].iter().all(|d| d.subdirectories().count() == 0));

    // The root by `get`, the other 401 in batches of at most 64.
    assert_eq!(backend.gets.load(Ordering::SeqCst), 1);
    let batches = backend.get_manys.load(Ordering::SeqCst);
    assert!((7..=10).contains(&batches), "{batches} get_many calls");
    assert!(backend.largest_batch.load(Ordering::SeqCst) <= 64);

    // A leaf gone from the store: the stream ends with NOT_FOUND naming it.
    let gone = leaves[150].digest();
    *backend.lost.lock().unwrap() = Some(gone);
    match client.get_recursive(&root_digest).await {
        Err(DirectoryError::NotFound(d)) => assert_eq!(d, gone),
        other => panic!("{other:?}"),
    }

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
