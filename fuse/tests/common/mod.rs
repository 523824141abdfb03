//! Shared by the fuse tests: trees built straight into a store, published
//! as store paths, and backends that count, slow down or fail.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use lazystore_castore::blobs::{
    BlobObserver, EncodedChunk, MemoryBlobService, ObservedBlobService,
};
use lazystore_castore::directories::MemoryDirectoryService;
use lazystore_castore::{
    BlobError, Blobs, ChunkerParams, Digest, Directory, Node, PathComponent, SymlinkTarget,
};
use lazystore_pathinfo::pathinfos::{MemoryPathInfoService, PathInfo};
use lazystore_pathinfo::{NarRoots, STORE_PATH_HASH_LEN, Store, StorePath};

/// A tree to store.
pub enum Tree {
    File(Vec<u8>),
    Exec(Vec<u8>),
    Link(&'static str),
    Dir(Vec<(&'static str, Tree)>),
}

/// Stores `tree` and returns its root node.
pub fn put_tree<'a>(store: &'a Store, tree: &'a Tree) -> futures::future::BoxFuture<'a, Node> {
    Box::pin(async move {
        match tree {
            Tree::File(b) | Tree::Exec(b) => Node::File {
                digest: store.blobs.put(b).await.unwrap(),
                size: b.len() as u64,
                executable: matches!(tree, Tree::Exec(_)),
            },
            Tree::Link(t) => Node::Symlink {
                target: SymlinkTarget::try_from(t.as_bytes()).unwrap(),
            },
            Tree::Dir(entries) => {
                let mut dir = Directory::new();
                for (name, child) in entries {
                    let node = put_tree(store, child).await;
                    dir.add(PathComponent::try_from(*name).unwrap(), node)
                        .unwrap();
                }
                let node = Node::directory(&dir);
                store.directories.put(dir).await.unwrap();
                node
            }
        }
    })
}

static NEXT_HASH: AtomicU64 = AtomicU64::new(1);

/// Publishes `root` as a new store path called `name`.
pub async fn publish(store: &Store, name: &str, root: Node) -> StorePath {
    let mut hash = [0u8; STORE_PATH_HASH_LEN];
    hash[..8].copy_from_slice(&NEXT_HASH.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let store_path = StorePath::from_parts(hash.into(), name).unwrap();
    store
        .path_infos
        .put(PathInfo {
            store_path: store_path.clone(),
            root,
            references: vec![],
            nar_size: 1,
            nar_sha256: [0; 32],
            signatures: vec![],
            deriver: None,
            ca: None,
        })
        .await
        .unwrap();
    store_path
}

/// What a test store's blob backend does to reads.
#[derive(Default)]
pub struct Faults {
    /// `read_chunks` calls to fail with a backend error before succeeding.
    pub fail_reads: AtomicU64,
    /// `read_chunks` calls to fail with an internal error (as of a
    /// panicked task) before succeeding.
    pub fail_internal: AtomicU64,
    /// Delay of every `read_chunks`, in milliseconds.
    pub delay_ms: AtomicU64,
    /// Chunks returned by `read_chunks` so far.
    pub chunks_read: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
#[error("injected failure")]
pub struct Injected;

/// Counts, delays and fails reads as its [`Faults`] say.
#[async_trait]
impl BlobObserver for Faults {
    async fn before_read(&self, _chunks: &[Digest]) -> Result<(), BlobError> {
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let failing = self.fail_reads.load(Ordering::Relaxed);
        if failing > 0 {
            self.fail_reads.store(failing - 1, Ordering::Relaxed);
            return Err(BlobError::Backend(Box::new(Injected)));
        }
        let failing = self.fail_internal.load(Ordering::Relaxed);
        if failing > 0 {
            self.fail_internal.store(failing - 1, Ordering::Relaxed);
            return Err(BlobError::Internal(Box::new(Injected)));
        }
        Ok(())
    }

    fn after_read(&self, got: &[EncodedChunk]) {
        self.chunks_read
            .fetch_add(got.len() as u64, Ordering::Relaxed);
    }
}

/// A memory store whose blob backend counts, delays and fails reads as the
/// [`Faults`] returned say.
pub fn test_store() -> (Store, Arc<MemoryBlobService>, Arc<Faults>) {
    let inner = Arc::new(MemoryBlobService::new());
    let faults = Arc::new(Faults::default());
    let blobs = ObservedBlobService::new(inner.clone(), faults.clone());
    let store = Store {
        blobs: Blobs::new(Arc::new(blobs), ChunkerParams::default()),
        directories: Arc::new(MemoryDirectoryService::new()),
        path_infos: Arc::new(MemoryPathInfoService::new()),
        traces: Arc::new(lazystore_pathinfo::traces::MemoryTraceService::default()),
        local_cache: None,
        nar_roots: NarRoots::none(),
        connection: None,
        redb: None,
        s3: None,
    };
    (store, inner, faults)
}

/// A store mounted for real under a temporary directory, with its own
/// runtime. Dropping it unmounts, then removes the directory.
pub struct TestMount {
    pub mounted: Option<lazystore_fuse::Mounted>,
    pub dir: tempfile::TempDir,
    pub fs: Arc<lazystore_fuse::LazyFs>,
    pub runtime: tokio::runtime::Runtime,
}

impl TestMount {
    /// Mounts `store`. Fails (never skips) when FUSE is unavailable.
    pub fn new(
        runtime: tokio::runtime::Runtime,
        store: Store,
        options: lazystore_fuse::FsOptions,
    ) -> Self {
        let fs = Arc::new(lazystore_fuse::LazyFs::new(
            store,
            options,
            Arc::new(lazystore_fuse::Stats::new()),
        ));
        let dir = tempfile::tempdir().unwrap();
        let mounted = lazystore_fuse::mount(
            fs.clone(),
            runtime.handle().clone(),
            dir.path(),
            &lazystore_fuse::MountConfig::default(),
        )
        .unwrap_or_else(|e| panic!("mounting needs FUSE (/dev/fuse and fusermount3): {e}"));
        TestMount {
            mounted: Some(mounted),
            dir,
            fs,
            runtime,
        }
    }

    /// The mountpoint.
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// `MOUNT/<basename of store_path>`.
    pub fn join(&self, store_path: &str) -> std::path::PathBuf {
        self.path()
            .join(store_path.strip_prefix("/nix/store/").unwrap_or(store_path))
    }

    /// The counters, read through the mount's stats file.
    pub fn stats(&self) -> lazystore_fuse::StatsSnapshot {
        let text = std::fs::read_to_string(self.path().join(".lazystore/stats")).unwrap();
        lazystore_fuse::StatsSnapshot::parse(&text)
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            m.unmount().unwrap();
        }
    }
}

/// Imports the store path `path` from the local Nix store: its NAR from
/// `nix-store --dump`, ingested, checked against Nix's NarHash, published.
pub async fn import(store: &Store, path: &str) -> PathInfo {
    use std::process::Stdio;
    let mut child = tokio::process::Command::new("nix-store")
        .args(["--dump", path])
        .stdout(Stdio::piped())
        .spawn()
        .expect("nix-store --dump (the tests need real Nix)");
    let nar = tokio::io::BufReader::with_capacity(1 << 20, child.stdout.take().unwrap());
    let ingested = lazystore_pathinfo::ingest::ingest_nar(&store.blobs, &*store.directories, nar)
        .await
        .unwrap();
    assert!(child.wait().await.unwrap().success());
    let nix_hash = lazystore_testkit::nix_cmd(["nix-store", "--query", "--hash", path]);
    assert_eq!(
        nix_hash.trim(),
        format!(
            "sha256:{}",
            lazystore_pathinfo::nixbase32::encode(&ingested.nar_sha256)
        ),
        "ingest of {path}"
    );
    let references = lazystore_testkit::nix_cmd(["nix-store", "--query", "--references", path]);
    let mut references: Vec<StorePath> = references
        .lines()
        .map(|r| StorePath::from_absolute_path(r).unwrap())
        .collect();
    references.sort();
    let info = PathInfo {
        references,
        ..ingested.path_info(StorePath::from_absolute_path(path).unwrap())
    };
    store.path_infos.put(info.clone()).await.unwrap();
    info
}

/// `nix hash path --type sha256 --base32` of `path`.
pub fn nix_hash_path(path: &std::path::Path) -> String {
    lazystore_testkit::nix_cmd([
        std::ffi::OsStr::new("nix"),
        "hash".as_ref(),
        "path".as_ref(),
        "--type".as_ref(),
        "sha256".as_ref(),
        "--base32".as_ref(),
        path.as_os_str(),
    ])
    .trim()
    .to_owned()
}

/// Runs `diff -r --no-dereference a b` and panics with its output if they differ.
pub fn diff_trees(a: &std::path::Path, b: &std::path::Path) {
    let out = std::process::Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "diff -r {} {}:\n{}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
