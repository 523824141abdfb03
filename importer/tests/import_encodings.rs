//! Importing from caches that encode their responses: one that answers as
//! cache.nixos.org does (xz NARs as stored, listings compressed and said
//! so only in `Content-Encoding`, ranges, `Priority: 40`), with a real Nix
//! closure and with 60 paths; and one that encodes every response, NARs
//! included, whose `Content-Encoding` is undone before the narinfo's
//! `Compression`. Size bounds hold for the decoded bytes.

mod common;

use common::*;
use lazystore_importer::{BinaryCache, CacheError, HttpOptions, PathErrorKind, http_client};
use lazystore_pathinfo::Store;
use lazystore_testkit::http::{Behaviour, Encoding};
use lazystore_testkit::{build_paths, make_cache};

async fn open(url: &str) -> Result<BinaryCache, CacheError> {
    let http = HttpOptions::default();
    let client = http_client(&http).unwrap();
    BinaryCache::open(url, &client, &http, options(Vec::new()).retry).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_from_a_cache_that_answers_as_cache_nixos_org() {
    let fx = fixture();
    for encoding in [Encoding::Br, Encoding::Zstd] {
        let server =
            TestServer::start_with(fx.cache("xz"), Behaviour::cache_nixos_org(encoding)).await;
        assert_eq!(open(&server.url).await.unwrap().priority(), Some(40));
        let (store, summary) = import_closure_from(&server.url).await;
        assert!(summary.success(), "{summary}\n{:?}", summary.failed);
        assert_eq!(summary.imported.len(), 3, "{summary}");
        assert_eq!(server.nar_requests(), 3);
        check_imported(&store, fx.cache("xz"), &fx.closure.paths()).await;
    }
}

/// Every response encoded, NARs included: the `Content-Encoding` is
/// undone first, then the narinfo's `Compression`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_when_every_response_is_encoded() {
    let fx = fixture();
    for (compression, encoding) in [
        ("xz", Encoding::Gzip),
        ("xz", Encoding::Xz),
        ("zstd", Encoding::Br),
        ("none", Encoding::Zstd),
    ] {
        let server = TestServer::start_with(
            fx.cache(compression),
            Behaviour::encoding_everything(encoding),
        )
        .await;
        let (store, summary) = import_closure_from(&server.url).await;
        assert!(
            summary.success(),
            "{compression} NARs sent as {}: {summary}\n{:?}",
            encoding.name(),
            summary.failed
        );
        assert_eq!(summary.imported.len(), 3, "{summary}");
        check_imported(&store, fx.cache(compression), &fx.closure.paths()).await;
    }
}

/// A file small on the wire but larger than its bound once decoded is
/// refused, naming its URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_bounds_apply_to_decoded_bytes() {
    let mut padded = String::from("StoreDir: /nix/store\n");
    while padded.len() <= 1 << 20 {
        padded.push_str("Padding: all of this compresses to almost nothing\n");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("nix-cache-info"), &padded).unwrap();
    let server =
        TestServer::start_with(dir.path(), Behaviour::encoding_everything(Encoding::Br)).await;
    let err = open(&server.url).await.unwrap_err();
    assert!(
        matches!(&err, CacheError::TooLarge { url, .. } if url.ends_with("/nix-cache-info")),
        "{err:?}"
    );

    // A narinfo over MAX_NARINFO_SIZE decoded.
    let fx = fixture();
    let cache = fx.cache_copy("none");
    let narinfo = narinfo_file(cache.path(), &fx.closure.a);
    let text = std::fs::read_to_string(&narinfo).unwrap();
    std::fs::write(&narinfo, text + &padded).unwrap();
    let server =
        TestServer::start_with(cache.path(), Behaviour::encoding_everything(Encoding::Zstd)).await;
    let store = Store::memory();
    let summary = import(&store, options(vec![server.url.clone()]), &[&fx.closure.a]).await;
    let failed = &summary.failed[0];
    assert!(
        matches!(
            &failed.kind,
            PathErrorKind::NarInfoFetch {
                source: CacheError::TooLarge { url, .. },
                ..
            } if url.ends_with(".narinfo")
        ),
        "{failed:?}"
    );
    assert!(!published(&store, &fx.closure.a).await);
}

/// 60 small paths (each referring to the one before) from a cache that
/// answers as cache.nixos.org does, imported and checked against Nix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_60_paths_from_a_cache_that_answers_as_cache_nixos_org() {
    let fx = fixture();
    let paths = build_paths(60);
    let last = paths.last().unwrap().as_str();
    let cache = make_cache(&[last], "xz", Some(&fx.secret_key));
    let server =
        TestServer::start_with(cache.path(), Behaviour::cache_nixos_org(Encoding::Zstd)).await;
    let store = Store::memory();
    let mut opts = options(vec![server.url.clone()]);
    opts.jobs = 8;
    let summary = import(&store, opts, &[last]).await;
    assert!(summary.success(), "{summary}\n{:?}", summary.failed);
    assert_eq!(summary.imported.len(), 60, "{summary}");
    assert_eq!(server.nar_requests(), 60);
    let all: Vec<&str> = paths.iter().map(String::as_str).collect();
    check_imported(&store, cache.path(), &all).await;
}
