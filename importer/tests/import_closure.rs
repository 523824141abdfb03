//! Importing a real Nix closure from signed binary caches (xz, zstd, none;
//! over HTTP and file://) and checking every path against Nix: NarHash,
//! references, signatures, and the rendered NAR against `nix-store --dump`.

mod common;

use common::*;
use lazystore_castore::{Digest, Node};
use lazystore_importer::{CacheError, Importer, SetupError};
use lazystore_pathinfo::{Store, StoreOptions};
use lazystore_testkit::{add_tree, make_cache};

async fn imports_closure_over_http(compression: &str) {
    let fx = fixture();
    let server = TestServer::start(fx.cache(compression)).await;
    let (store, summary) = import_closure_from(&server.url).await;
    assert!(summary.success(), "{summary}\n{:?}", summary.failed);
    assert_eq!(summary.imported.len(), 3, "{summary}");
    assert_eq!(summary.present, 0);
    assert_eq!(server.nar_requests(), 3);
    let nar_bytes: u64 = fx
        .closure
        .paths()
        .iter()
        .map(|p| read_narinfo(fx.cache(compression), p).nar_size)
        .sum();
    assert_eq!(summary.nar_bytes, nar_bytes);
    assert!(summary.downloaded_bytes > 0);
    check_imported(&store, fx.cache(compression), &fx.closure.paths()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_closure_over_http_xz() {
    imports_closure_over_http("xz").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_closure_over_http_zstd() {
    imports_closure_over_http("zstd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_closure_over_http_uncompressed() {
    imports_closure_over_http("none").await;
}

/// Dependencies are published before the paths that refer to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_references_first() {
    let fx = fixture();
    let store = Store::memory();
    let url = format!("file://{}", fx.cache("zstd").display());
    let summary = import(&store, options(vec![url]), &[fx.closure.top()]).await;
    assert!(summary.success(), "{summary}");
    let order: Vec<String> = summary.imported.iter().map(|p| p.to_absolute()).collect();
    assert_eq!(order, fx.closure.paths());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn importing_again_downloads_no_nar() {
    let fx = fixture();
    let server = TestServer::start(fx.cache("xz")).await;
    let store = Store::memory();
    let first = import(
        &store,
        options(vec![server.url.clone()]),
        &[fx.closure.top()],
    )
    .await;
    assert!(first.success(), "{first}");
    let (nars, narinfos) = (server.nar_requests(), server.narinfo_requests());
    assert_eq!((nars, narinfos), (3, 3));

    let again = import(
        &store,
        options(vec![server.url.clone()]),
        &[fx.closure.top()],
    )
    .await;
    assert!(again.success(), "{again}");
    assert_eq!(again.present, 3, "{again}");
    assert!(again.imported.is_empty());
    assert_eq!(again.nar_downloads, 0);
    assert_eq!(server.nar_requests(), nars, "a NAR was downloaded again");
    assert_eq!(
        server.narinfo_requests(),
        narinfos,
        "a narinfo was read again"
    );

    // A dependency already present is not fetched for a new dependent.
    let partial = Store::memory();
    let only_a = import(
        &partial,
        options(vec![server.url.clone()]),
        &[&fx.closure.a],
    )
    .await;
    assert_eq!(only_a.imported.len(), 1);
    let before = server.nar_requests();
    let rest = import(
        &partial,
        options(vec![server.url.clone()]),
        &[fx.closure.top()],
    )
    .await;
    assert_eq!((rest.imported.len(), rest.present), (2, 1), "{rest}");
    assert_eq!(server.nar_requests(), before + 2);
    check_imported(&partial, fx.cache("xz"), &fx.closure.paths()).await;
}

/// file:// caches work, and a path may be named by its bare hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_from_file_cache_by_hash() {
    let fx = fixture();
    let store = Store::memory();
    let url = format!("file://{}", fx.cache("xz").display());
    let hash = store_path(fx.closure.top()).hash_str();
    let summary = import(&store, options(vec![url]), &[&hash]).await;
    assert!(summary.success(), "{summary}");
    assert_eq!(summary.imported.len(), 3);
    check_imported(&store, fx.cache("xz"), &fx.closure.paths()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_closure_imports_the_path_alone() {
    let fx = fixture();
    let store = Store::memory();
    let mut opts = options(vec![format!("file://{}", fx.cache("zstd").display())]);
    opts.closure = false;
    let summary = import(&store, opts, &[fx.closure.top()]).await;
    assert!(summary.success(), "{summary}");
    assert_eq!(summary.imported.len(), 1);
    assert!(published(&store, fx.closure.top()).await);
    assert!(!published(&store, &fx.closure.a).await);
}

/// Caches are asked in order; one without the path is passed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tries_caches_in_order() {
    let fx = fixture();
    let empty = CraftedCache::new();
    let server = TestServer::start(fx.cache("zstd")).await;
    let store = Store::memory();
    let summary = import(
        &store,
        options(vec![empty.url(), server.url.clone()]),
        &[fx.closure.top()],
    )
    .await;
    assert!(summary.success(), "{summary}");
    assert_eq!(summary.imported.len(), 3);
}

/// Two store paths with the same contents have the same NAR: the second is
/// published from the first's tree without downloading its NAR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_nar_is_not_downloaded_twice() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let contents = format!("same contents {}\n", fx.closure.a);
    for name in ["lazystore-twin-one", "lazystore-twin-two"] {
        std::fs::create_dir(dir.path().join(name)).unwrap();
        std::fs::write(dir.path().join(name).join(name), &contents).unwrap();
    }
    let one = add_tree(&dir.path().join("lazystore-twin-one/lazystore-twin-one"));
    let two = add_tree(&dir.path().join("lazystore-twin-two/lazystore-twin-two"));
    assert_ne!(one, two);
    let cache = make_cache(&[&one, &two], "none", Some(&fx.secret_key));
    assert_eq!(
        read_narinfo(cache.path(), &one).url,
        read_narinfo(cache.path(), &two).url
    );
    let server = TestServer::start(cache.path()).await;
    let store = Store::memory();
    let mut opts = options(vec![server.url.clone()]);
    opts.jobs = 1;
    let summary = import(&store, opts, &[&one, &two]).await;
    assert!(summary.success(), "{summary}");
    assert_eq!((summary.imported.len(), summary.deduplicated.len()), (1, 1));
    assert_eq!(server.nar_requests(), 1);
    check_imported(&store, cache.path(), &[&one, &two]).await;
}

/// The index of stored NARs outlives the importer: a later one, over the
/// same redb store opened again, publishes a path whose NAR an earlier one
/// stored under another path, without downloading it. An entry whose tree
/// the store lacks (as after garbage collection) is not trusted: the NAR
/// is downloaded, and the entry mended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_importer_finds_nars_stored_before() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<String> = [
        ("lazystore-durable-one", "same"),
        ("lazystore-durable-two", "same"),
        ("lazystore-durable-three", "other"),
    ]
    .iter()
    .map(|(name, text)| {
        std::fs::create_dir(dir.path().join(name)).unwrap();
        let file = dir.path().join(name).join(name);
        std::fs::write(&file, format!("{text} contents {}\n", fx.closure.a)).unwrap();
        add_tree(&file)
    })
    .collect();
    let [one, two, three] = [&paths[0], &paths[1], &paths[2]];
    let cache = make_cache(&[one, two, three], "none", Some(&fx.secret_key));
    let server = TestServer::start(cache.path()).await;
    let url = format!("redb://{}/store.redb", dir.path().display());
    let open = || Store::open(&url, StoreOptions::default());
    let opts = options(vec![server.url.clone()]);

    let store = open().await.unwrap();
    let summary = import(&store, opts.clone(), &[one]).await;
    assert_eq!(summary.imported.len(), 1, "{summary}");
    drop(store);

    let store = open().await.unwrap();
    let summary = import(&store, opts.clone(), &[two]).await;
    assert!(summary.success(), "{summary}");
    assert_eq!((summary.imported.len(), summary.deduplicated.len()), (0, 1));
    assert_eq!(server.nar_requests(), 1);
    check_imported(&store, cache.path(), &[one, two]).await;

    let narinfo = read_narinfo(cache.path(), three);
    let gone = Node::Directory {
        digest: Digest::of(b"not in the store"),
        size: 1,
    };
    let roots = &store.nar_roots;
    roots
        .put(&narinfo.nar_hash, narinfo.nar_size, &gone)
        .await
        .unwrap();
    let summary = import(&store, opts, &[three]).await;
    assert_eq!(summary.imported.len(), 1, "{summary}");
    assert_eq!(server.nar_requests(), 2);
    check_imported(&store, cache.path(), &[three]).await;
    let root = store.path_infos.get(&store_path(three).hash()).await;
    let root = root.unwrap().unwrap().root;
    let recorded = roots.get(&narinfo.nar_hash, narinfo.nar_size).await;
    assert_eq!(recorded.unwrap(), Some(root));
}

/// A cache for another store directory is refused when it is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_cache_of_another_store_dir() {
    let fx = fixture();
    let cache = fx.cache_copy("none");
    std::fs::write(
        cache.path().join("nix-cache-info"),
        "StoreDir: /gnu/store\nWantMassQuery: 1\n",
    )
    .unwrap();
    let url = format!("file://{}", cache.path().display());
    let err = Importer::new(Store::memory(), options(vec![url.clone()]))
        .await
        .err()
        .expect("opening must fail");
    assert!(
        matches!(&err, SetupError::Cache { source: CacheError::WrongStoreDir { store_dir, .. }, .. } if store_dir == "/gnu/store"),
        "{err:?}"
    );

    std::fs::remove_file(cache.path().join("nix-cache-info")).unwrap();
    let err = Importer::new(Store::memory(), options(vec![url]))
        .await
        .err()
        .expect("opening must fail");
    assert!(
        matches!(
            &err,
            SetupError::Cache {
                source: CacheError::NotACache { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

/// With signature checks off, an unsigned cache imports (and the run warns).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_check_sigs_accepts_unsigned_paths() {
    let fx = fixture();
    let cache = fx.cache_copy("none");
    for path in fx.closure.paths() {
        edit_narinfo(cache.path(), path, false, |info| info.signatures.clear());
    }
    let url = format!("file://{}", cache.path().display());
    let store = Store::memory();
    let mut opts = options(vec![url]);
    opts.check_signatures = false;
    let summary = import(&store, opts, &[fx.closure.top()]).await;
    assert!(summary.success(), "{summary}");
    assert_eq!(summary.imported.len(), 3);
}
