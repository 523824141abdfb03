//! [`Store`]: the three services a store is made of — blobs, directories,
//! path infos — opened together from one URL by [`Store::open`], the one
//! place store URLs are parsed.
//!
//! A store is a plain struct of its three services, so a layer in front of
//! one of them is built by replacing that field. [`StoreOptions`] say which
//! layers `Store::open` builds: a remote store's retry policy, access
//! token and extra trusted CA certificates, a local chunk cache in front of it (by default for a remote
//! store), and a wrapper of what that cache fetches (a mount's counters).
//! A command given a token passes it here, and only here: every call to a
//! remote store then carries it.
//!
//! Beside the services a store carries its [`NarRoots`], the index of the
//! NARs it has ingested, kept in the nearest redb file: the constructor of
//! a redb store puts it in the store's file, [`Store::with_cache`] moves it
//! into the cache's, and the others keep none.
//!
//! A new backend is one file per service (in `castore::blobs`,
//! `castore::directories`, `pathinfos`), a constructor here beside
//! [`Store::redb`], [`Store::grpc`] and [`Store::s3`], and one arm in
//! [`Store::open`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lazystore_castore::auth::Token;
use lazystore_castore::blobs::{
    CachingBlobService, GrpcBlobService, MemoryBlobService, RedbBlobService, S3BlobService,
};
use lazystore_castore::directories::{
    CachingDirectoryService, GrpcDirectoryService, MemoryDirectoryService, RedbDirectoryService,
    S3DirectoryService,
};
use lazystore_castore::grpc::{Connection, InvalidUrl, Unreachable};
use lazystore_castore::tls::CaCerts;
use lazystore_castore::{
    BlobService, Blobs, CacheOptions, CacheStore, ChunkerParams, DEFAULT_CACHE_SIZE,
    DirectoryService, Node, OpenError, OpenS3Error, RedbOptions, RedbStore, RetryPolicy, S3Options,
    S3Store, SyncMode,
};

use crate::nar_roots::NarRoots;
use crate::pathinfos::{
    GrpcPathInfoService, MemoryPathInfoService, PathInfo, PathInfoError, PathInfoService,
    RedbPathInfoService, S3PathInfoService,
};
use crate::traces::{
    GrpcTraceService, MemoryTraceService, RedbTraceService, S3TraceService, TraceService,
};

/// How long commands wait for a remote store's server to answer before
/// they start ([`StoreOptions::wait_for_server`]): a server starting up
/// answers within it, a wrong address fails in seconds.
pub const SERVER_WAIT: Duration = Duration::from_secs(5);

/// The environment variable naming the directory of the default store.
pub const LAZYSTORE_DIR: &str = "LAZYSTORE_DIR";

/// The environment variable naming the token file a client sends its
/// token from, when no `--token-file` is given.
pub const LAZYSTORE_TOKEN_FILE: &str = "LAZYSTORE_TOKEN_FILE";

/// The environment variable naming the file of CA certificates a client
/// trusts beside the system's, when no `--ca-file` is given.
pub const LAZYSTORE_CA_FILE: &str = "LAZYSTORE_CA_FILE";

/// Where the default store lives when [`LAZYSTORE_DIR`] is not set,
/// relative to `$HOME`.
const DEFAULT_DIR_IN_HOME: &str = ".local/share/lazystore";

/// The file name of the default store in its directory.
const DEFAULT_FILE: &str = "store.redb";

/// The file name of the default local cache in the same directory.
const DEFAULT_CACHE_FILE: &str = "cache.redb";

/// A whole store: chunked blobs, directories and path infos.
#[derive(Clone)]
pub struct Store {
    /// File contents, verified on read.
    pub blobs: Blobs,
    /// Directories, verified on get.
    pub directories: Arc<dyn DirectoryService>,
    /// Store paths, published last.
    pub path_infos: Arc<dyn PathInfoService>,
    /// What builds read, kept for the next build of the same name
    /// (`traces/`): beside the PathInfos, in the same backend.
    pub traces: Arc<dyn TraceService>,
    /// The local chunk cache in front of the blobs and directories, if
    /// [`Store::open`] (or [`Store::with_cache`]) put one there.
    pub local_cache: Option<CacheStore>,
    /// Which root each NAR stored here was ingested as, kept in the nearest
    /// redb file: the local cache's, else a redb store's own; none for a
    /// memory store or a remote one without a cache.
    pub nar_roots: NarRoots,
    /// The connection of a remote store, shared by its three clients: its
    /// outages are counted there ([`Connection::outages`]).
    pub connection: Option<Connection>,
    /// The embedded store under the services, when they are one's: what
    /// only it can do (collect its garbage) is done on it.
    pub redb: Option<RedbStore>,
    /// The object store under the services, when they are one's: what
    /// only it can do (collect its garbage) is done on it.
    pub s3: Option<S3Store>,
}

/// Wraps a blob service: a layer of a store (counters, say).
pub type BlobLayer = Arc<dyn Fn(Arc<dyn BlobService>) -> Arc<dyn BlobService> + Send + Sync>;

/// Where a store opened by [`Store::open`] keeps its local chunk cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LocalCache {
    /// None: every read goes to the store.
    #[default]
    None,
    /// At [`default_cache_url`] for a remote (`grpc+…`) store; none for a
    /// local one, which is its own cache. What a builder's mount wants.
    DefaultIfRemote,
    /// In the redb file at this `redb:///abs/path` URL.
    At(String),
}

/// How [`Store::open`] opens a store and which layers it puts in front.
#[derive(Clone)]
pub struct StoreOptions {
    /// When a redb store's chunk lists and directories are made durable
    /// (other schemes ignore it).
    pub sync: SyncMode,
    /// The chunker parameters a new store records (a redb store checks
    /// them against those it records; a memory store cuts with them).
    /// `None`: the defaults for a new store, whatever an existing one
    /// records. A gRPC store's writers always cut with the server's.
    pub chunker: Option<ChunkerParams>,
    /// How a remote store's calls are retried.
    pub retry: RetryPolicy,
    /// How long to wait, when opening a remote store, for its server to
    /// answer a health check; `None` opens it without asking (it connects
    /// on first use and its calls retry as `retry` says).
    pub wait_for_server: Option<Duration>,
    /// The token every call to a remote store carries (a server started
    /// with `--read-token-file` or `--write-token-file` wants one); local
    /// stores ignore it.
    pub token: Option<Token>,
    /// CA certificates a `grpc+https://` store's certificate may be signed
    /// by, beside the system's (what `--ca-file` gives); other stores
    /// ignore them.
    pub ca_certs: Option<CaCerts>,
    /// The local chunk cache in front of the blobs and directories.
    pub local_cache: LocalCache,
    /// Most bytes the local cache keeps.
    pub local_cache_bytes: u64,
    /// A layer around the blob service the local cache fetches from (what
    /// crosses the network, for a remote store). Unused without a cache.
    pub cache_fetches: Option<BlobLayer>,
}

impl Default for StoreOptions {
    /// Every commit fsynced, the default retries, no token, only the
    /// system's CA certificates, no local cache (one of
    /// [`DEFAULT_CACHE_SIZE`] if asked for), no layer.
    fn default() -> Self {
        StoreOptions {
            sync: SyncMode::EveryCommit,
            chunker: None,
            retry: RetryPolicy::default(),
            wait_for_server: None,
            token: None,
            ca_certs: None,
            local_cache: LocalCache::None,
            local_cache_bytes: DEFAULT_CACHE_SIZE,
            cache_fetches: None,
        }
    }
}

/// Why a store URL can't be opened. Every message names the URL.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    /// The URL's scheme is not one [`Store::open`] knows.
    #[error(
        "unsupported store URL {0:?}: expected memory://, redb:///abs/path/store.redb, \
         grpc+http://host:port, grpc+https://host:port, grpc+unix:///path/to.sock or \
         s3://bucket/prefix?endpoint=…&region=…"
    )]
    UnknownScheme(String),
    /// An `s3://` URL that cannot be opened (its form, or no credentials).
    #[error(transparent)]
    S3(#[from] OpenS3Error),
    /// A `redb://` URL whose path is not absolute, or that has a query.
    #[error(
        "invalid store URL {url:?}: {reason} (expected redb:///abs/path/store.redb, \
         with three slashes)"
    )]
    RedbUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The redb file could not be opened or created.
    #[error("cannot open store {url}")]
    Redb {
        /// The URL given.
        url: String,
        /// Why, naming the file (and the fix when there is one). Boxed: it
        /// is large, and every `Store::open` result would carry its size.
        #[source]
        source: Box<OpenError>,
    },
    /// A `grpc+…` URL that is not a server address.
    #[error(transparent)]
    Grpc(#[from] InvalidUrl),
    /// No server answered at a `grpc+…` URL within
    /// [`StoreOptions::wait_for_server`].
    #[error(transparent)]
    Unreachable(#[from] Unreachable),
    /// No default store location: neither `$LAZYSTORE_DIR` nor `$HOME` is
    /// set.
    #[error("no default store: set $LAZYSTORE_DIR or $HOME, or pass a store URL (--store)")]
    NoDefaultDir,
    /// `$LAZYSTORE_DIR` is not an absolute UTF-8 path.
    #[error("${LAZYSTORE_DIR} is {0:?}; it must be an absolute path")]
    BadDefaultDir(PathBuf),
    /// The default directory could not be created.
    #[error("cannot create the store directory {dir:?}")]
    CreateDefaultDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `redb://` URL in a directory that does not exist. Only the
    /// default directory is created: a mistyped path would otherwise make
    /// a new, empty store somewhere unexpected.
    #[error("cannot open store {url}: the directory {dir:?} does not exist (create it first)")]
    NoDirectory {
        /// The URL given.
        url: String,
        /// The missing directory.
        dir: PathBuf,
    },
}

/// The URL of the default store, `redb://$LAZYSTORE_DIR/store.redb`, where
/// `$LAZYSTORE_DIR` defaults to `~/.local/share/lazystore`; the directory
/// is created if missing.
pub fn default_store_url() -> Result<String, OpenStoreError> {
    created(default_url(
        std::env::var_os(LAZYSTORE_DIR),
        std::env::var_os("HOME"),
        DEFAULT_FILE,
    )?)
}

/// The URL of the default local cache (what a builder keeps in front of a
/// remote store), `redb://$LAZYSTORE_DIR/cache.redb`; the directory is
/// created if missing.
pub fn default_cache_url() -> Result<String, OpenStoreError> {
    created(default_url(
        std::env::var_os(LAZYSTORE_DIR),
        std::env::var_os("HOME"),
        DEFAULT_CACHE_FILE,
    )?)
}

fn default_url(
    dir: Option<OsString>,
    home: Option<OsString>,
    file: &str,
) -> Result<String, OpenStoreError> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty());
    let dir = match (set(dir), set(home)) {
        (Some(dir), _) => PathBuf::from(dir),
        (None, Some(home)) => PathBuf::from(home).join(DEFAULT_DIR_IN_HOME),
        (None, None) => return Err(OpenStoreError::NoDefaultDir),
    };
    match dir.to_str() {
        Some(s) if dir.is_absolute() => Ok(format!("redb://{}/{file}", s.trim_end_matches('/'))),
        _ => Err(OpenStoreError::BadDefaultDir(dir)),
    }
}

/// `url`, a default `redb://` URL, once its directory exists.
fn created(url: String) -> Result<String, OpenStoreError> {
    if let Some(dir) = redb_path(&url)?
        .as_deref()
        .and_then(std::path::Path::parent)
    {
        std::fs::create_dir_all(dir).map_err(|source| OpenStoreError::CreateDefaultDir {
            dir: dir.to_owned(),
            source,
        })?;
    }
    Ok(url)
}

/// Fails unless the directory of `path` (from `url`) exists.
fn check_directory(url: &str, path: &std::path::Path) -> Result<(), OpenStoreError> {
    match path.parent() {
        Some(dir) if !dir.is_dir() => Err(OpenStoreError::NoDirectory {
            url: url.to_owned(),
            dir: dir.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// Whether the store at `url` keeps nothing once its process exits
/// (`memory://`), for a server to warn about.
pub fn is_ephemeral(url: &str) -> bool {
    url == MEMORY_URL
}

/// The store URL of a `lazystore serve` listening on TCP at `addr`, in
/// cleartext.
pub fn grpc_tcp_url(addr: std::net::SocketAddr) -> String {
    format!("grpc+http://{addr}")
}

/// The store URL of a `lazystore serve` listening on TCP at `addr` with
/// TLS (`serve --tls-cert`).
pub fn grpc_https_url(addr: std::net::SocketAddr) -> String {
    format!("grpc+https://{addr}")
}

/// Whether `url` names an object store (`s3://…`).
pub fn is_s3(url: &str) -> bool {
    url.starts_with("s3://")
}

/// Whether `url` names a remote store (`grpc+…`), one reached through a
/// [`Connection`]: what `--token-file` and `--ca-file` are for.
pub fn is_remote(url: &str) -> bool {
    ["grpc+http://", "grpc+https://", "grpc+unix://"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
}

/// The store URL of a `lazystore serve` listening on the Unix socket at
/// `path`.
pub fn grpc_unix_url(path: &std::path::Path) -> String {
    format!("grpc+unix://{}", path.display())
}

/// The URL of a fresh store in memory.
const MEMORY_URL: &str = "memory://";

/// The path of a `redb:///abs/path` URL; `None` for another scheme.
fn redb_path(url: &str) -> Result<Option<PathBuf>, OpenStoreError> {
    let Some(path) = url.strip_prefix("redb://") else {
        return Ok(None);
    };
    let bad = |reason| OpenStoreError::RedbUrl {
        url: url.to_owned(),
        reason,
    };
    if !path.starts_with('/') {
        return Err(bad("the path must be absolute"));
    }
    if path.contains(['?', '#']) {
        return Err(bad("a redb store URL has no query or fragment"));
    }
    Ok(Some(PathBuf::from(path)))
}

impl Store {
    /// A fresh in-memory store.
    pub fn memory() -> Store {
        Store {
            blobs: Blobs::new(Arc::new(MemoryBlobService::new()), ChunkerParams::default()),
            directories: Arc::new(MemoryDirectoryService::new()),
            path_infos: Arc::new(MemoryPathInfoService::new()),
            traces: Arc::new(MemoryTraceService::default()),
            local_cache: None,
            nar_roots: NarRoots::none(),
            connection: None,
            redb: None,
            s3: None,
        }
    }

    /// The three services of one open redb file, chunking with the
    /// parameters it records.
    pub fn redb(store: RedbStore) -> Store {
        Store {
            blobs: Blobs::new(
                Arc::new(RedbBlobService::new(store.clone())),
                store.params(),
            ),
            directories: Arc::new(RedbDirectoryService::new(store.clone())),
            path_infos: Arc::new(RedbPathInfoService::new(store.clone())),
            traces: Arc::new(RedbTraceService::new(store.clone())),
            local_cache: None,
            nar_roots: NarRoots::in_store(store.clone()),
            connection: None,
            redb: Some(store),
            s3: None,
        }
    }

    /// The three clients of one gRPC server, sharing `connection`. Blobs
    /// written through it are cut with the parameters the server's store
    /// records, asked on the first write (the defaults if it records none).
    pub fn grpc(connection: Connection) -> Store {
        Store {
            blobs: Blobs::new(
                Arc::new(GrpcBlobService::new(connection.clone())),
                ChunkerParams::default(),
            ),
            directories: Arc::new(GrpcDirectoryService::new(connection.clone())),
            path_infos: Arc::new(GrpcPathInfoService::new(connection.clone())),
            traces: Arc::new(GrpcTraceService::new(connection.clone())),
            local_cache: None,
            nar_roots: NarRoots::none(),
            connection: Some(connection),
            redb: None,
            s3: None,
        }
    }

    /// The three services of one object store bucket (and prefix), shared
    /// with every other replica opened on it; a store that records no
    /// chunker parameters yet records `params` (the defaults if `None`).
    pub fn s3(store: S3Store, params: Option<ChunkerParams>) -> Store {
        Store {
            blobs: Blobs::new(
                Arc::new(S3BlobService::new(store.clone(), params)),
                params.unwrap_or_default(),
            ),
            directories: Arc::new(S3DirectoryService::new(store.clone())),
            path_infos: Arc::new(S3PathInfoService::new(store.clone())),
            traces: Arc::new(S3TraceService::new(store.clone())),
            local_cache: None,
            nar_roots: NarRoots::none(),
            connection: None,
            redb: None,
            s3: Some(store),
        }
    }

    /// Opens the store at `url`, with the layers `options` ask for:
    ///
    /// - `memory://` — a fresh store in memory, gone when the process exits.
    /// - `redb:///abs/path/store.redb` — one redb file holding all three
    ///   services, created (with its directory) if missing, commits made
    ///   durable as `options.sync` says; only one process can have it open.
    ///   For other options open a [`RedbStore`] and use [`Store::redb`].
    /// - `grpc+http://host:port` — a `lazystore serve` over TCP.
    /// - `grpc+https://host:port` — the same over TLS, its certificate
    ///   signed by a CA of the system's or of `options.ca_certs`.
    /// - `grpc+unix:///path/to.sock` — a `lazystore serve` on a Unix socket.
    /// - `s3://bucket/prefix?endpoint=http://host:port&region=name` — an
    ///   S3-compatible object store, with the key of the standard AWS
    ///   environment variables ([`S3Options::from_env`]); requests retried
    ///   as `options.retry` says. Several servers may share one.
    ///
    /// gRPC stores connect on first use (and retry while the server is
    /// unreachable, as `options.retry` says), so opening one always
    /// succeeds for a well-formed URL unless `options.wait_for_server` asks
    /// for its server to answer first. The default store is at
    /// [`default_store_url`]. This is the only code that reads a store URL.
    pub async fn open(url: &str, options: StoreOptions) -> Result<Store, OpenStoreError> {
        let (store, remote) = Store::open_backend(url, &options).await?;
        let cache_url = match options.local_cache {
            LocalCache::None => return Ok(store),
            LocalCache::DefaultIfRemote if !remote => return Ok(store),
            LocalCache::DefaultIfRemote => default_cache_url()?,
            LocalCache::At(url) => url,
        };
        let mut store = store;
        if let Some(layer) = &options.cache_fetches {
            let params = store.blobs.params();
            store.blobs = Blobs::new(layer(store.blobs.service().clone()), params);
        }
        let cache = Store::open_cache(&cache_url, options.local_cache_bytes).await?;
        Ok(store.with_cache(cache))
    }

    /// The bare backend `url` names, and whether it is remote.
    async fn open_backend(
        url: &str,
        options: &StoreOptions,
    ) -> Result<(Store, bool), OpenStoreError> {
        if url == MEMORY_URL {
            let mut store = Store::memory();
            if let Some(params) = options.chunker {
                store.blobs = Blobs::new(store.blobs.service().clone(), params);
            }
            return Ok((store, false));
        }
        if let Some(path) = redb_path(url)? {
            check_directory(url, &path)?;
            let redb = RedbOptions {
                params: options.chunker,
                sync: options.sync,
            };
            // Opening may repair the file after a crash: blocking work.
            let opened = tokio::task::spawn_blocking(move || RedbStore::open_with(path, redb))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            let store = opened.map_err(|source| OpenStoreError::Redb {
                url: url.to_owned(),
                source: Box::new(source),
            })?;
            return Ok((Store::redb(store), false));
        }
        if is_remote(url) {
            let connection = Connection::lazy_with_ca(url, options.ca_certs.as_ref())?
                .with_retry(options.retry)
                .with_token(options.token.as_ref());
            if let Some(wait) = options.wait_for_server {
                connection.probe(wait).await?;
            }
            return Ok((Store::grpc(connection), true));
        }
        if is_s3(url) {
            let s3 = S3Store::open(url, S3Options::from_env(options.retry))?;
            // Remote: a mount keeps a local cache in front of it.
            return Ok((Store::s3(s3, options.chunker), true));
        }
        Err(OpenStoreError::UnknownScheme(url.to_owned()))
    }

    /// Puts the local `cache` in front of this store's blobs and
    /// directories: reads are served from it when it holds the data (each
    /// chunk verified), fetched from this store and kept when it doesn't;
    /// writes and path infos go to this store. The NAR root index moves
    /// into the cache's file, the nearest.
    pub fn with_cache(self, cache: CacheStore) -> Store {
        let params = self.blobs.params();
        Store {
            blobs: Blobs::new(
                Arc::new(CachingBlobService::new(
                    cache.clone(),
                    self.blobs.service().clone(),
                )),
                params,
            ),
            directories: Arc::new(CachingDirectoryService::new(
                cache.clone(),
                self.directories,
            )),
            path_infos: self.path_infos,
            traces: self.traces,
            nar_roots: NarRoots::in_cache(cache.clone()),
            local_cache: Some(cache),
            connection: self.connection,
            redb: self.redb,
            s3: self.s3,
        }
    }

    /// Opens (or creates) the local cache at `url`, `redb:///abs/path`,
    /// bounded to `max_bytes`, for [`Store::with_cache`].
    async fn open_cache(url: &str, max_bytes: u64) -> Result<CacheStore, OpenStoreError> {
        let Some(path) = redb_path(url)? else {
            return Err(OpenStoreError::RedbUrl {
                url: url.to_owned(),
                reason: "a cache is a redb file",
            });
        };
        check_directory(url, &path)?;
        let options = CacheOptions { max_bytes };
        // Opening reads the cache's index and may evict: blocking work.
        tokio::task::spawn_blocking(move || CacheStore::open(path, options))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
            .map_err(|source| OpenStoreError::Redb {
                url: url.to_owned(),
                source: Box::new(source),
            })
    }

    /// Checks the store holds `info`'s root: the root directory (and so,
    /// directories being stored leaves first, everything below it) or the
    /// file's blob (and so its chunks), with the size the root node records.
    /// What the gRPC server checks before it publishes a PathInfo.
    pub async fn check_root(&self, info: &PathInfo) -> Result<(), PathInfoError> {
        let (root, recorded, actual) = match &info.root {
            Node::Symlink { .. } => return Ok(()),
            Node::Directory { digest, size } => {
                let stored = self.directories.get(digest).await;
                let stored = stored.map_err(|e| PathInfoError::Backend(Box::new(e)))?;
                (*digest, *size, stored.map(|d| d.size()))
            }
            Node::File { digest, size, .. } => {
                let stored = self.blobs.stat(digest).await;
                let stored = stored.map_err(|e| PathInfoError::Backend(Box::new(e)))?;
                (*digest, *size, stored.map(|meta| meta.size))
            }
        };
        match actual {
            None => Err(PathInfoError::MissingRoot {
                store_path: info.store_path.clone(),
                root,
            }),
            Some(actual) if actual != recorded => Err(PathInfoError::RootSizeMismatch {
                store_path: info.store_path.clone(),
                root,
                recorded,
                actual,
            }),
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls() {
        assert!(
            Store::open("memory://", StoreOptions::default())
                .await
                .is_ok()
        );
        assert!(
            Store::open("grpc+http://127.0.0.1:1", StoreOptions::default())
                .await
                .is_ok()
        );
        assert!(
            Store::open("grpc+unix:///run/lazystore.sock", StoreOptions::default())
                .await
                .is_ok()
        );
        for (bad, says) in [
            ("memory:", "unsupported"),
            ("/abs/store.redb", "unsupported"),
            ("redb://relative/store.redb", "absolute"),
            ("redb:///x/store.redb?sync=no", "no query"),
            ("grpc+http://host:1/path", "no path"),
            ("grpc+unix://relative.sock", "absolute"),
        ] {
            let e = Store::open(bad, StoreOptions::default())
                .await
                .err()
                .expect(bad)
                .to_string();
            assert!(e.contains(bad) && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn default_url() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(
            super::default_url(os("/srv/lazy/"), os("/root"), DEFAULT_FILE).unwrap(),
            "redb:///srv/lazy/store.redb"
        );
        assert_eq!(
            super::default_url(os(""), os("/home/u"), DEFAULT_CACHE_FILE).unwrap(),
            "redb:///home/u/.local/share/lazystore/cache.redb"
        );
        assert!(matches!(
            super::default_url(os("rel"), os("/root"), DEFAULT_FILE),
            Err(OpenStoreError::BadDefaultDir(_))
        ));
        assert!(matches!(
            super::default_url(None, None, DEFAULT_FILE),
            Err(OpenStoreError::NoDefaultDir)
        ));
    }

    #[tokio::test]
    async fn a_cache_in_front_serves_reads_it_has_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Store::memory();
        let digest = remote.blobs.put(&[7u8; 100_000]).await.unwrap();
        let url = format!("redb://{}/cache.redb", dir.path().display());
        let cache = Store::open_cache(&url, 1 << 30).await.unwrap();
        let cached = remote.clone().with_cache(cache.clone());
        let meta = cached.blobs.stat(&digest).await.unwrap().unwrap();
        let bytes = cached
            .blobs
            .read_range(&digest, &meta, 0, 100_000)
            .await
            .unwrap();
        assert_eq!(&bytes[..], &[7u8; 100_000][..]);
        assert!(meta.chunks.iter().all(|c| cache.contains_chunk(&c.digest)));
        assert!(Store::open_cache("memory://", 1).await.is_err());
    }

    #[tokio::test]
    async fn a_missing_directory_is_named_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such");
        for url in [
            format!("redb://{}/store.redb", missing.display()),
            format!("redb://{}/cache.redb", missing.display()),
        ] {
            let options = StoreOptions {
                local_cache: LocalCache::At(url.clone()),
                ..StoreOptions::default()
            };
            // The store itself for the first, the cache in front of a
            // remote for the second.
            let store = if url.ends_with("store.redb") {
                url.as_str()
            } else {
                "grpc+http://127.0.0.1:1"
            };
            let e = Store::open(store, options).await.err().unwrap().to_string();
            assert!(e.contains(&url) && e.contains("does not exist"), "{e}");
            assert!(!missing.exists());
        }
        let made = created(format!("redb://{}/store.redb", missing.display())).unwrap();
        assert!(missing.is_dir(), "{made}");
    }

    #[tokio::test]
    async fn options_give_the_chunker_parameters() {
        let small = ChunkerParams {
            min: 4096,
            avg: 8192,
            max: 32768,
        };
        let with = |chunker| StoreOptions {
            chunker,
            ..StoreOptions::default()
        };
        let memory = Store::open("memory://", with(Some(small))).await.unwrap();
        assert_eq!(memory.blobs.params(), small);
        let dir = tempfile::tempdir().unwrap();
        let url = format!("redb://{}/store.redb", dir.path().display());
        let created = Store::open(&url, with(Some(small))).await.unwrap();
        assert_eq!(created.blobs.params(), small);
        drop(created);
        // An existing store keeps what it records; asking for other
        // parameters is refused, naming the URL.
        let reopened = Store::open(&url, with(None)).await.unwrap();
        assert_eq!(reopened.blobs.params(), small);
        drop(reopened);
        let e = Store::open(&url, with(Some(ChunkerParams::default())))
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains(&url), "{e}");
    }

    #[tokio::test]
    async fn options_choose_the_layers() {
        let dir = tempfile::tempdir().unwrap();
        let cache_url = format!("redb://{}/cache.redb", dir.path().display());
        let counted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let layer: BlobLayer = {
            let counted = counted.clone();
            Arc::new(move |inner| {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                inner
            })
        };
        let with_cache = |local_cache| StoreOptions {
            local_cache,
            cache_fetches: Some(layer.clone()),
            ..StoreOptions::default()
        };
        // A local store is its own cache unless one is named.
        let local = Store::open("memory://", with_cache(LocalCache::DefaultIfRemote)).await;
        assert!(local.unwrap().local_cache.is_none());
        assert_eq!(counted.load(std::sync::atomic::Ordering::Relaxed), 0);
        let remote = "grpc+http://127.0.0.1:1";
        let cached = Store::open(remote, with_cache(LocalCache::At(cache_url.clone())))
            .await
            .unwrap();
        assert!(cached.local_cache.is_some());
        assert_eq!(counted.load(std::sync::atomic::Ordering::Relaxed), 1);
        // The NAR root index is in the nearest redb file.
        let cache_file = dir.path().join("cache.redb");
        assert_eq!(cached.nar_roots.path(), Some(cache_file.as_path()));
        drop(cached);
        let bare = Store::open(remote, with_cache(LocalCache::None)).await;
        let bare = bare.unwrap();
        assert!(bare.local_cache.is_none());
        assert_eq!(bare.nar_roots.path(), None);
        let store_file = dir.path().join("store.redb");
        let url = format!("redb://{}", store_file.display());
        let redb = Store::open(&url, with_cache(LocalCache::None)).await;
        assert_eq!(redb.unwrap().nar_roots.path(), Some(store_file.as_path()));
        let redb = Store::open(&url, with_cache(LocalCache::At(cache_url.clone()))).await;
        assert_eq!(redb.unwrap().nar_roots.path(), Some(cache_file.as_path()));
        let bad = Store::open(remote, with_cache(LocalCache::At("memory://".into()))).await;
        assert!(
            bad.err()
                .unwrap()
                .to_string()
                .contains("a cache is a redb file")
        );
    }

    #[tokio::test]
    async fn redb_names_the_url_when_the_file_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("redb://{}/store.redb", dir.path().display());
        let _first = Store::open(&url, StoreOptions::default()).await.unwrap();
        let e = Store::open(&url, StoreOptions::default())
            .await
            .err()
            .unwrap();
        assert!(matches!(
            e,
            OpenStoreError::Redb {
                ref source,
                ..
            } if matches!(**source, OpenError::AlreadyOpen { .. })
        ));
        assert!(e.to_string().contains(&url), "{e}");
    }
}
