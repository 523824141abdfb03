//! What the importer's integration tests share: one signed binary cache of a
//! real Nix closure per compression, built once per test binary; a local
//! HTTP server with fault injection; crafted caches with hand-written NARs;
//! and the check that an imported closure is what Nix has.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use lazystore_importer::{Importer, Options, ProgressMode, RetryPolicy, Summary, Wanted};
use lazystore_pathinfo::render::render_nar;
use lazystore_pathinfo::{
    Compression, NarInfo, PublicKey, STORE_PATH_HASH_LEN, SigningKey, Store, StorePath,
    StorePathHash,
};
use lazystore_testkit::{Closure, build_closure, copy_tree, gen_key, make_cache, nix_output};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

/// A closure of three paths in a signed cache per compression.
pub struct Fixture {
    pub closure: Closure,
    pub secret_key: PathBuf,
    pub public_key: PublicKey,
    caches: HashMap<&'static str, TempDir>,
    _keys: TempDir,
}

impl Fixture {
    /// The pristine cache for `compression` (`xz`, `zstd`, `none`). Tests
    /// that edit a cache take a [`copy_tree`] of it.
    pub fn cache(&self, compression: &str) -> &Path {
        self.caches[compression].path()
    }

    /// A copy of the cache for `compression`, free to edit.
    pub fn cache_copy(&self, compression: &str) -> TempDir {
        copy_tree(self.cache(compression))
    }

    pub fn signing_key(&self) -> SigningKey {
        SigningKey::load(&self.secret_key).expect("load the test key")
    }
}

/// The fixture of this test binary, built on first use.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let closure = build_closure();
        let keys = tempfile::tempdir().expect("tempdir");
        let (secret_key, public_key) = gen_key(keys.path(), "lazystore-test-1");
        let caches = ["xz", "zstd", "none"]
            .into_iter()
            .map(|c| (c, make_cache(&[closure.top()], c, Some(&secret_key))))
            .collect();
        Fixture {
            closure,
            secret_key,
            public_key: public_key.parse().expect("nix wrote a valid public key"),
            caches,
            _keys: keys,
        }
    })
}

/// Options for a test: quiet, fast retries, the fixture's key trusted.
pub fn options(caches: Vec<String>) -> Options {
    Options {
        caches,
        trusted_keys: vec![fixture().public_key.clone()],
        check_signatures: true,
        jobs: 4,
        closure: true,
        retry: RetryPolicy {
            max_attempts: Some(4),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            ..Options::default().retry
        },
        http: Default::default(),
        progress: ProgressMode::Quiet,
    }
}

/// Imports `paths` into `store` with `options`; panics if the caches can't
/// be opened.
pub async fn import(store: &Store, options: Options, paths: &[&str]) -> Summary {
    let wanted: Vec<Wanted> = paths
        .iter()
        .map(|p| p.parse().expect("a store path"))
        .collect();
    Importer::new(store.clone(), options)
        .await
        .expect("open the caches")
        .run(&wanted)
        .await
}

/// The fixture's closure imported from the cache at `url` into a fresh
/// memory store.
pub async fn import_closure_from(url: &str) -> (Store, Summary) {
    let store = Store::memory();
    let summary = import(
        &store,
        options(vec![url.to_owned()]),
        &[fixture().closure.top()],
    )
    .await;
    (store, summary)
}

pub fn store_path(absolute: &str) -> StorePath {
    StorePath::from_absolute_path(absolute).expect("a store path")
}

/// The narinfo file of `path` in the cache at `dir`.
pub fn narinfo_file(dir: &Path, path: &str) -> PathBuf {
    dir.join(format!("{}.narinfo", store_path(path).hash_str()))
}

pub fn read_narinfo(dir: &Path, path: &str) -> NarInfo {
    let text = std::fs::read_to_string(narinfo_file(dir, path)).expect("read narinfo");
    NarInfo::parse(&text).expect("nix wrote a valid narinfo")
}

/// Edits the narinfo of `path`, then signs it with the fixture key (its
/// old signatures dropped) if `resign`.
pub fn edit_narinfo(dir: &Path, path: &str, resign: bool, edit: impl FnOnce(&mut NarInfo)) {
    let mut info = read_narinfo(dir, path);
    edit(&mut info);
    if resign {
        info.signatures.clear();
        info.sign(&fixture().signing_key());
    }
    std::fs::write(narinfo_file(dir, path), info.render()).expect("write narinfo");
}

/// The NAR file of `path` in the cache at `dir`.
pub fn nar_file(dir: &Path, path: &str) -> PathBuf {
    dir.join(read_narinfo(dir, path).url)
}

/// Checks that every path of `paths` is in `store` as in the cache at
/// `cache`: NarHash, NarSize, references, signatures, deriver and CA as the
/// narinfo says, and the rendered NAR identical to `nix-store --dump`.
pub async fn check_imported(store: &Store, cache: &Path, paths: &[&str]) {
    for path in paths {
        let sp = store_path(path);
        let info = store
            .path_infos
            .get(&sp.hash())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{path} was not published"));
        let narinfo = read_narinfo(cache, path);
        assert_eq!(info.store_path, sp);
        assert_eq!(info.nar_sha256, narinfo.nar_hash, "{path}: NarHash");
        assert_eq!(info.nar_size, narinfo.nar_size, "{path}: NarSize");
        let mut references = narinfo.references.clone();
        references.sort();
        assert_eq!(info.references, references, "{path}: references");
        assert_eq!(info.signatures, narinfo.signatures, "{path}: signatures");
        assert!(!info.signatures.is_empty());
        assert_eq!(info.deriver, narinfo.deriver, "{path}: deriver");
        assert_eq!(info.ca, narinfo.ca, "{path}: CA");

        let rendered = render_nar(&store.blobs, &*store.directories, &info.root, Vec::new())
            .await
            .expect("render");
        let dump = nix_output(["nix-store", "--dump", path]);
        assert!(dump.status.success(), "nix-store --dump {path} failed");
        assert!(
            rendered == dump.stdout,
            "{path}: rendered NAR differs from nix-store --dump"
        );
        assert_eq!(Sha256::digest(&rendered)[..], info.nar_sha256[..]);
    }
}

/// Whether `path` has a PathInfo in `store`.
pub async fn published(store: &Store, path: &str) -> bool {
    store
        .path_infos
        .get(&store_path(path).hash())
        .await
        .unwrap()
        .is_some()
}

#[allow(unused_imports)]
pub use lazystore_testkit::http::{Fault, TestServer};

/// NAR encoding, for crafting NARs Nix would never write.
pub mod nar {
    /// Appends `str(s)`: length, bytes, zero padding to 8.
    pub fn put(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
        out.resize(out.len().next_multiple_of(8), 0);
    }

    /// Appends tokens.
    pub fn tokens(out: &mut Vec<u8>, tokens: &[&str]) {
        for t in tokens {
            put(out, t.as_bytes());
        }
    }

    /// A NAR of a directory holding regular files, in the order given
    /// (which may break NAR rules: unsorted, `..`).
    pub fn directory(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        tokens(&mut out, &["nix-archive-1", "(", "type", "directory"]);
        for (name, contents) in entries {
            tokens(&mut out, &["entry", "(", "name", name, "node"]);
            tokens(&mut out, &["(", "type", "regular", "contents"]);
            put(&mut out, contents);
            tokens(&mut out, &[")", ")"]);
        }
        tokens(&mut out, &[")"]);
        out
    }
}

/// A binary cache written by hand, with narinfos signed by its own key.
pub struct CraftedCache {
    pub dir: TempDir,
    pub key: SigningKey,
}

impl CraftedCache {
    pub fn new() -> CraftedCache {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
        std::fs::create_dir(dir.path().join("nar")).unwrap();
        CraftedCache {
            dir,
            key: SigningKey::generate("crafted-1").unwrap(),
        }
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    /// Adds `path` with the file `nar_file` (already compressed as
    /// `compression`) and a narinfo signed by this cache's key that states
    /// `nar_size` and `nar_hash`.
    pub fn add(
        &self,
        path: &StorePath,
        nar_file: &[u8],
        compression: Compression,
        nar_size: u64,
        nar_hash: [u8; 32],
    ) {
        let url = format!("nar/{}.nar.{compression}", path.hash_str());
        std::fs::write(self.dir.path().join(&url), nar_file).unwrap();
        let mut info = NarInfo {
            store_path: path.clone(),
            url,
            compression,
            file_hash: None,
            file_size: Some(nar_file.len() as u64),
            nar_hash,
            nar_size,
            references: Vec::new(),
            deriver: None,
            signatures: Vec::new(),
            ca: None,
        };
        info.sign(&self.key);
        std::fs::write(
            self.dir.path().join(format!("{}.narinfo", path.hash_str())),
            info.render(),
        )
        .unwrap();
    }

    /// Adds `path` with an uncompressed `nar` and its true size and hash.
    pub fn add_nar(&self, path: &StorePath, nar: &[u8]) {
        self.add(
            path,
            nar,
            Compression::None,
            nar.len() as u64,
            Sha256::digest(nar).into(),
        );
    }

    /// Options trusting this cache's key only.
    pub fn options(&self) -> Options {
        let mut options = options(vec![self.url()]);
        options.trusted_keys = vec![self.key.public_key()];
        options
    }
}

/// A store path that exists in no Nix store, for crafted caches.
pub fn crafted_path(name: &str) -> StorePath {
    let sha256 = Sha256::digest(name.as_bytes());
    let hash = StorePathHash::try_from(&sha256[..STORE_PATH_HASH_LEN]).unwrap();
    StorePath::from_parts(hash, name).unwrap()
}
