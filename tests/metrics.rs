//! Prometheus metrics scraped from `serve` and `mount` after known
//! actions: a builder reads a 3 MiB file through the service, and the
//! mount reports exactly those bytes fetched, its fetches timed, and a
//! second read served from its caches with nothing more fetched; the
//! service reports the `ReadChunks` calls answered and the chunk bytes it
//! read, equal to what crossed to the mount. A pull-through service whose
//! upstream lost a NAR counts that failure once.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{Mount, http_get, start_lines};
use lazystore_pathinfo::NarInfo;
use lazystore_testkit::http::{Fault, TestServer};
use lazystore_testkit::{add_tree, build_closure, gen_key, make_cache, noise};

/// The samples of a scrape, by name with labels.
fn scrape(url: &str) -> HashMap<String, f64> {
    let (status, body) = http_get(url);
    assert_eq!(status, "200", "{body}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

fn drop_pages(path: &Path) {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: an advice call on a file descriptor we hold open.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

#[test]
fn serve_and_mount_count_what_happened() {
    let work = tempfile::tempdir().unwrap();
    let bytes = noise(3 << 20, 9301);
    let dir = work.path().join("tree");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("big"), &bytes).unwrap();
    let path = add_tree(&dir);
    let store = format!("redb://{}", work.path().join("store.redb").display());
    common::ingest(&store, &[&path]);
    let (service, urls) = start_lines(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &store,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        2,
    );
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let cache = format!("redb://{}", work.path().join("cache.redb").display());
    let (mount, lines) = Mount::start_lines(
        &mountpoint,
        &urls[0],
        &cache,
        &["--metrics-listen", "127.0.0.1:0"],
        2,
    );
    let file = mount
        .path
        .join(path.rsplit('/').next().unwrap())
        .join("big");

    assert_eq!(std::fs::read(&file).unwrap(), bytes);
    let m = scrape(&lines[1]);
    assert_eq!(
        m["lazystore_mount_remote_bytes_total"],
        (3 << 20) as f64,
        "{m:?}"
    );
    assert!(m["lazystore_mount_fetch_seconds_count"] >= 1.0, "{m:?}");
    assert!(m["lazystore_local_cache_misses_total"] >= 1.0, "{m:?}");
    let wire = m["lazystore_mount_remote_wire_bytes_total"];

    // Again, from the caches: nothing more fetched, hits counted.
    drop_pages(&file);
    assert_eq!(std::fs::read(&file).unwrap(), bytes);
    let again = scrape(&lines[1]);
    assert_eq!(
        again["lazystore_mount_remote_bytes_total"],
        (3 << 20) as f64
    );
    let hits = again["lazystore_mount_memory_cache_hits_total"]
        + again["lazystore_local_cache_hits_total"];
    let hits_before =
        m["lazystore_mount_memory_cache_hits_total"] + m["lazystore_local_cache_hits_total"];
    assert!(hits > hits_before, "{again:?}");

    let s = scrape(&urls[1]);
    let read_chunks = "lazystore_grpc_requests_total{method=\"/lazystore.castore.v1.BlobService/ReadChunks\",code=\"Ok\"}";
    assert!(s[read_chunks] >= 1.0, "{s:?}");
    assert_eq!(s["lazystore_store_chunk_bytes_read_total"], wire, "{s:?}");
    assert!(
        s.keys().any(|k| k.starts_with("lazystore_gc_runs_total")),
        "{s:?}"
    );
    mount.stop();
    service.stop();
}

#[test]
fn an_upstream_failure_is_counted_once() {
    let closure = build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "metrics-upstream-1");
    let cache = make_cache(&[&closure.a], "none", Some(&secret));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(TestServer::start(cache.path()));
    let hash = &closure.a.rsplit('/').next().unwrap()[..32];
    let narinfo = std::fs::read_to_string(cache.path().join(format!("{hash}.narinfo"))).unwrap();
    let nar = format!("/{}", NarInfo::parse(&narinfo).unwrap().url);
    upstream.inject(&nar, vec![Fault::Status(404)]);
    let (service, urls) = start_lines(
        &[
            "serve",
            "--http-listen",
            "127.0.0.1:0",
            "--store",
            "memory://",
            "--upstream",
            &upstream.url,
            "--trusted-public-key",
            &public,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        2,
    );
    assert_eq!(http_get(&format!("{}/{hash}.narinfo", urls[0])).0, "502");
    let m = scrape(&urls[1]);
    assert_eq!(m["lazystore_upstream_failures_total"], 1.0, "{m:?}");
    assert_eq!(m["lazystore_upstream_nar_downloads_total"], 1.0, "{m:?}");
    service.stop();
}
