//! Bad caches, one test each: every one gives a clear error naming the path
//! and publishes nothing for it (nor for the paths that refer to it); and
//! transient HTTP failures are retried.

mod common;

use std::time::Duration;

use common::*;
use lazystore_importer::{PathErrorKind, Summary};
use lazystore_pathinfo::{Compression, NarInfoError, Store, VerifyError};
use tokio::io::AsyncReadExt;

/// The failure reported for `path`.
fn failure<'a>(summary: &'a Summary, path: &str) -> &'a PathErrorKind {
    &summary
        .failed
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("{path} did not fail: {summary}\n{:?}", summary.failed))
        .kind
}

/// Imports the fixture closure from `cache`, expecting `a` to fail; checks
/// nothing of the closure was published and returns the summary.
async fn import_expecting_failure(url: String) -> Summary {
    let fx = fixture();
    let store = Store::memory();
    let summary = import(&store, options(vec![url]), &[fx.closure.top()]).await;
    assert!(!summary.success());
    for path in fx.closure.paths() {
        assert!(!published(&store, path).await, "{path} was published");
    }
    // `b` refers to `a` and `c` to both, so they are refused too, naming
    // the reference that failed first.
    for (path, refs) in [
        (&fx.closure.b, vec![&fx.closure.a]),
        (&fx.closure.c, vec![&fx.closure.a, &fx.closure.b]),
    ] {
        let kind = failure(&summary, path);
        assert!(
            matches!(kind, PathErrorKind::Reference { reference } if refs.contains(&reference)),
            "{path}: {kind:?}"
        );
    }
    let message = summary
        .failed
        .iter()
        .find(|e| e.path == fx.closure.a)
        .unwrap()
        .to_string();
    assert!(message.starts_with(&fx.closure.a), "{message}");
    summary
}

fn file_url(dir: &tempfile::TempDir) -> String {
    format!("file://{}", dir.path().display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_nar_hash() {
    let fx = fixture();
    let cache = fx.cache_copy("xz");
    edit_narinfo(cache.path(), &fx.closure.a, true, |info| {
        info.nar_hash = [7; 32]
    });
    let summary = import_expecting_failure(file_url(&cache)).await;
    let kind = failure(&summary, &fx.closure.a);
    assert!(
        matches!(kind, PathErrorKind::NarHash { expected, .. } if *expected == [7; 32]),
        "{kind:?}"
    );
    assert!(kind.to_string().contains("NarHash"), "{kind}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_nar_size() {
    let fx = fixture();
    let cache = fx.cache_copy("zstd");
    let real = read_narinfo(cache.path(), &fx.closure.a).nar_size;
    edit_narinfo(cache.path(), &fx.closure.a, true, |info| info.nar_size += 8);
    let summary = import_expecting_failure(file_url(&cache)).await;
    let kind = failure(&summary, &fx.closure.a);
    assert!(
        matches!(kind, PathErrorKind::NarSize { expected, actual, .. } if *expected == real + 8 && *actual == real),
        "{kind:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_nar() {
    let fx = fixture();
    let cache = fx.cache_copy("none");
    let nar = nar_file(cache.path(), &fx.closure.a);
    let bytes = std::fs::read(&nar).unwrap();
    std::fs::write(&nar, &bytes[..bytes.len() - 16]).unwrap();
    let summary = import_expecting_failure(file_url(&cache)).await;
    let kind = failure(&summary, &fx.closure.a);
    assert!(matches!(kind, PathErrorKind::InvalidNar { .. }), "{kind:?}");
    let chain = lazystore_castore::error_chain(kind);
    assert!(chain.contains("truncated NAR"), "{chain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_compressed_stream() {
    let fx = fixture();
    let cache = fx.cache_copy("xz");
    let nar = nar_file(cache.path(), &fx.closure.a);
    let bytes = std::fs::read(&nar).unwrap();
    std::fs::write(&nar, &bytes[..bytes.len() / 2]).unwrap();
    let summary = import_expecting_failure(file_url(&cache)).await;
    let kind = failure(&summary, &fx.closure.a);
    assert!(
        matches!(
            kind,
            PathErrorKind::Decompress {
                compression: Compression::Xz,
                ..
            }
        ),
        "{kind:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_signature() {
    let fx = fixture();
    let cache = fx.cache_copy("none");
    edit_narinfo(cache.path(), &fx.closure.a, false, |info| {
        info.signatures.clear()
    });
    let summary = import_expecting_failure(file_url(&cache)).await;
    let kind = failure(&summary, &fx.closure.a);
    assert!(
        matches!(
            kind,
            PathErrorKind::Untrusted {
                source: VerifyError::Unsigned { .. },
                ..
            }
        ),
        "{kind:?}"
    );
    assert!(kind.to_string().contains("--trusted-public-key"), "{kind}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_by_untrusted_key() {
    let fx = fixture();
    let cache = fx.cache_copy("none");
    let stranger = lazystore_pathinfo::SigningKey::generate("stranger-1").unwrap();
    edit_narinfo(cache.path(), &fx.closure.a, false, |info| {
        info.signatures.clear();
        info.sign(&stranger);
    });
    let summary = import_expecting_failure(file_url(&cache)).await;
    let kind = failure(&summary, &fx.closure.a);
    assert!(
        matches!(kind, PathErrorKind::Untrusted { source: VerifyError::NoTrustedSignature { .. }, trusted, .. } if trusted == &["lazystore-test-1"]),
        "{kind:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narinfo_for_another_store_path() {
    let fx = fixture();
    let cache = fx.cache_copy("none");
    // a's narinfo file holds b's (validly signed) narinfo.
    std::fs::copy(
        narinfo_file(cache.path(), &fx.closure.b),
        narinfo_file(cache.path(), &fx.closure.a),
    )
    .unwrap();
    let summary = import_expecting_failure(file_url(&cache)).await;
    let kind = failure(&summary, &fx.closure.a);
    assert!(
        matches!(kind, PathErrorKind::WrongStorePath { found, .. } if found.to_absolute() == fx.closure.b),
        "{kind:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_narinfo() {
    let fx = fixture();
    let cache = fx.cache_copy("none");
    let file = narinfo_file(cache.path(), &fx.closure.a);
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("NarSize: ", "NarSize:")).unwrap();
    let summary = import_expecting_failure(file_url(&cache)).await;
    let kind = failure(&summary, &fx.closure.a);
    assert!(
        matches!(
            kind,
            PathErrorKind::NarInfo {
                source: NarInfoError::MalformedLine { .. },
                ..
            }
        ),
        "{kind:?}"
    );
}

/// An oversized narinfo is refused before it is parsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_narinfo() {
    let fx = fixture();
    let cache = fx.cache_copy("none");
    let file = narinfo_file(cache.path(), &fx.closure.a);
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str(&"X-Padding: 0123456789abcdef\n".repeat(50_000));
    std::fs::write(&file, text).unwrap();
    let summary = import_expecting_failure(file_url(&cache)).await;
    let kind = failure(&summary, &fx.closure.a);
    assert!(
        matches!(
            kind,
            PathErrorKind::NarInfoFetch {
                source: lazystore_importer::CacheError::TooLarge { .. },
                ..
            }
        ),
        "{kind:?}"
    );
}

/// Imports a crafted single-path cache and returns the failure.
async fn crafted_failure(cache: &CraftedCache, path: &lazystore_pathinfo::StorePath) -> String {
    let store = Store::memory();
    let summary = import(&store, cache.options(), &[&path.to_absolute()]).await;
    assert!(!published(&store, &path.to_absolute()).await);
    assert_eq!(summary.failed.len(), 1, "{summary}");
    let kind = failure(&summary, &path.to_absolute());
    assert!(matches!(kind, PathErrorKind::InvalidNar { .. }), "{kind:?}");
    lazystore_castore::error_chain(kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nar_with_unsorted_entries() {
    let cache = CraftedCache::new();
    let path = crafted_path("unsorted");
    cache.add_nar(&path, &nar::directory(&[("b", b"1"), ("a", b"2")]));
    let chain = crafted_failure(&cache, &path).await;
    assert!(chain.contains("does not sort after"), "{chain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nar_with_dot_dot_entry() {
    let cache = CraftedCache::new();
    let path = crafted_path("dotdot");
    cache.add_nar(&path, &nar::directory(&[("..", b"escape")]));
    let chain = crafted_failure(&cache, &path).await;
    assert!(chain.contains("invalid entry name"), "{chain}");

    // The same cache with a valid NAR imports: the failure was the `..`.
    let good = crafted_path("good");
    cache.add_nar(&good, &nar::directory(&[("a", b"1"), ("b", b"2")]));
    let store = Store::memory();
    let summary = import(&store, cache.options(), &[&good.to_absolute()]).await;
    assert!(summary.success(), "{summary}");
}

/// A tiny xz stream that expands to 64 MiB, under a narinfo claiming 4 KiB:
/// decompression stops at byte 4097.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xz_bomb_stops_at_nar_size_plus_one() {
    const CLAIMED: u64 = 4096;
    const REAL: u64 = 64 << 20;
    let mut header = Vec::new();
    nar::tokens(
        &mut header,
        &["nix-archive-1", "(", "type", "regular", "contents"],
    );
    header.extend_from_slice(&REAL.to_le_bytes());
    let stream = header.as_slice().chain(tokio::io::repeat(0).take(REAL));
    let mut xz = Vec::new();
    async_compression::tokio::bufread::XzEncoder::new(tokio::io::BufReader::new(stream))
        .read_to_end(&mut xz)
        .await
        .unwrap();
    assert!(xz.len() < 64 * 1024, "{} bytes of xz", xz.len());

    let cache = CraftedCache::new();
    let path = crafted_path("bomb");
    cache.add(&path, &xz, Compression::Xz, CLAIMED, [0; 32]);
    let store = Store::memory();
    let started = std::time::Instant::now();
    let summary = import(&store, cache.options(), &[&path.to_absolute()]).await;
    assert!(!published(&store, &path.to_absolute()).await);
    let kind = failure(&summary, &path.to_absolute());
    assert!(
        matches!(
            kind,
            PathErrorKind::NarTooLong {
                nar_size: CLAIMED,
                ..
            }
        ),
        "{kind:?}"
    );
    assert!(kind.to_string().contains("stopped at byte 4097"), "{kind}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // Nothing of the bomb's size was counted as NAR.
    assert_eq!(summary.nar_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_500_twice_then_success() {
    let fx = fixture();
    let server = TestServer::start(fx.cache("xz")).await;
    let nar = format!("/{}", read_narinfo(fx.cache("xz"), &fx.closure.a).url);
    let narinfo = format!("/{}.narinfo", store_path(&fx.closure.b).hash_str());
    server.inject(&nar, vec![Fault::Status(500), Fault::Status(503)]);
    server.inject(&narinfo, vec![Fault::Status(500), Fault::Status(502)]);
    let (store, summary) = import_closure_from(&server.url).await;
    assert!(summary.success(), "{summary}\n{:?}", summary.failed);
    assert_eq!(summary.imported.len(), 3);
    assert_eq!(server.count(|p| p == nar), 3);
    assert_eq!(server.count(|p| p == narinfo), 3);
    check_imported(&store, fx.cache("xz"), &fx.closure.paths()).await;
}

/// A body cut short is a transport failure: the download starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_http_body_is_retried() {
    let fx = fixture();
    let server = TestServer::start(fx.cache("zstd")).await;
    let nar = format!("/{}", read_narinfo(fx.cache("zstd"), fx.closure.top()).url);
    server.inject(&nar, vec![Fault::Truncate(40)]);
    let (store, summary) = import_closure_from(&server.url).await;
    assert!(summary.success(), "{summary}\n{:?}", summary.failed);
    assert_eq!(server.count(|p| p == nar), 2);
    assert_eq!(summary.nar_downloads, 4);
    check_imported(&store, fx.cache("zstd"), &fx.closure.paths()).await;
}

/// A server that stops sending mid-body: the read timeout fires (it counts
/// only time spent waiting on the server) and the download starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http_body_is_retried() {
    let fx = fixture();
    let server = TestServer::start(fx.cache("none")).await;
    let nar = format!("/{}", read_narinfo(fx.cache("none"), fx.closure.top()).url);
    server.inject(&nar, vec![Fault::Stall(100, Duration::from_secs(3))]);
    let store = Store::memory();
    let mut opts = options(vec![server.url.clone()]);
    opts.http.read_timeout = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let summary = import(&store, opts, &[fx.closure.top()]).await;
    assert!(summary.success(), "{summary}\n{:?}", summary.failed);
    assert_eq!(server.count(|p| p == nar), 2);
    assert!(started.elapsed() < Duration::from_secs(3));
    check_imported(&store, fx.cache("none"), &fx.closure.paths()).await;
}

/// A server that keeps failing: the retries run out and the error says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_500_forever_fails_after_retries() {
    let fx = fixture();
    let server = TestServer::start(fx.cache("xz")).await;
    let nar = format!("/{}", read_narinfo(fx.cache("xz"), &fx.closure.a).url);
    server.inject(&nar, vec![Fault::Status(500); 10]);
    let summary = import_expecting_failure(server.url.clone()).await;
    let kind = failure(&summary, &fx.closure.a);
    assert!(matches!(kind, PathErrorKind::Download { .. }), "{kind:?}");
    assert!(
        lazystore_castore::error_chain(kind).contains("500"),
        "{kind}"
    );
    assert_eq!(server.count(|p| p == nar), 4, "one try and three retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_404_for_nar() {
    let fx = fixture();
    let server = TestServer::start(fx.cache("xz")).await;
    let nar = format!("/{}", read_narinfo(fx.cache("xz"), &fx.closure.a).url);
    server.inject(&nar, vec![Fault::Status(404)]);
    let summary = import_expecting_failure(server.url.clone()).await;
    let kind = failure(&summary, &fx.closure.a);
    assert!(
        matches!(kind, PathErrorKind::NarMissing { cache, .. } if *cache == server.url),
        "{kind:?}"
    );
    let message = kind.to_string();
    assert!(
        message.contains(&nar[1..]) && message.contains(&server.url),
        "{message}"
    );
    assert_eq!(server.count(|p| p == nar), 1, "a 404 is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_404_for_narinfo() {
    let fx = fixture();
    let server = TestServer::start(fx.cache("xz")).await;
    let narinfo = format!("/{}.narinfo", store_path(&fx.closure.a).hash_str());
    server.inject(&narinfo, vec![Fault::Status(404)]);
    let summary = import_expecting_failure(server.url.clone()).await;
    let kind = failure(&summary, &fx.closure.a);
    assert!(
        matches!(kind, PathErrorKind::NotFound { caches } if *caches == [server.url.clone()]),
        "{kind:?}"
    );
    assert!(kind.to_string().contains(&server.url), "{kind}");
}

/// A narinfo's `URL` is not signed, so one that leaves the cache — to
/// another host (`\\host\…`, read as `//host/…`), above the cache's path
/// (`..` written with `\` or `%2e`) — is refused before anything is
/// fetched, with an error naming it, and nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nar_url_leaving_the_cache() {
    let fx = fixture();
    for bad in [
        r"\\evil.example\nar.xz",
        r"nar\..\..\secret",
        "nar/%2e%2e/%2e%2e/secret",
        "nar/%2E%2E/secret",
        "nar/../../secret",
        "nar/./../secret",
    ] {
        let dir = fx.cache_copy("none");
        edit_narinfo(dir.path(), &fx.closure.a, true, |info| {
            info.url = bad.to_owned()
        });
        let server = TestServer::start(dir.path()).await;
        let summary = import_expecting_failure(server.url.clone()).await;
        let kind = failure(&summary, &fx.closure.a);
        let message = lazystore_castore::error_chain(kind);
        assert!(
            message.contains(bad) && message.contains("is not a file inside"),
            "{bad}: {message}"
        );
        assert_eq!(
            server.count(|p| p.contains("secret") || p.contains("evil")),
            0,
            "{bad}: the URL is not fetched"
        );
    }
}
