//! `lazystore serve --upstream` for real: a signed binary cache built with
//! real Nix, served over HTTP, behind a service that has nothing imported.
//! Two builder mounts, each with its own empty local cache and no
//! `--upstream` of their own, read every file of a closure at once: every
//! byte is the original's, `nix hash path` through each mount is Nix's
//! NarHash, and the cache sees each NAR downloaded once. `nix copy --from`
//! the service's HTTP cache verifies against the service's key. A path no
//! cache has is absent (and asked for once in the negative TTL); a cache
//! whose signatures are not trusted, a NAR missing, cut short or not the
//! signed NarHash publish nothing: 502, the log says why, and the next
//! lookup asks again (and publishes once the cache is right). Metadata
//! first: `nix-db` and `ls`/`stat` through the service download no NAR,
//! and a first read waits for its own path's NAR, not its closure's.

mod common;

use std::path::{Path, PathBuf};

use common::{Mount, start_lines};
use lazystore_pathinfo::{NarInfo, SigningKey};
use lazystore_testkit::http::{Fault, TestServer};
use lazystore_testkit::{build_closure, fresh_store, gen_key, make_cache, nix_cmd};

fn basename(path: &str) -> &str {
    path.strip_prefix("/nix/store/").unwrap()
}

/// Every regular file below `dir`, recursively, relative to it.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = dir.join(&rel);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(rel.join(entry.unwrap().file_name()));
            }
        } else if meta.is_file() {
            out.push(rel);
        }
    }
    out
}

#[test]
fn builders_see_the_upstream_cache_and_each_nar_is_downloaded_once() {
    let closure = build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "pull-through-upstream-1");
    let (own_secret, own_public) = gen_key(keys.path(), "pull-through-service-1");
    let cache = make_cache(&[closure.top()], "xz", Some(&secret));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(TestServer::start(cache.path()));

    let (service, urls) = start_lines(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--store",
            "memory://",
            "--upstream",
            &upstream.url,
            "--trusted-public-key",
            &public,
            "--signing-key",
            own_secret.to_str().unwrap(),
        ],
        2,
    );
    let (grpc, http) = (&urls[0], &urls[1]);

    // Two builders, nothing of their own upstream, reading everything at once.
    let work = tempfile::tempdir().unwrap();
    let mounts: Vec<Mount> = (0..2)
        .map(|i| {
            let mountpoint = work.path().join(format!("builder{i}"));
            std::fs::create_dir(&mountpoint).unwrap();
            let cache = format!("redb://{}/cache{i}.redb", work.path().display());
            Mount::start(&mountpoint, grpc, &cache, &[])
        })
        .collect();
    // In different orders: the first builder's lookup of c pulls c, b and
    // a while the second's of b pulls b and a, two imports wanting the
    // same NARs at once.
    let orders = [
        [&closure.c, &closure.b, &closure.a],
        [&closure.b, &closure.a, &closure.c],
    ];
    let readers: Vec<_> = mounts
        .iter()
        .zip(orders)
        .map(|(mount, order)| {
            let root = mount.path.clone();
            let paths = order.map(String::clone);
            std::thread::spawn(move || {
                for path in &paths {
                    let on_mount = root.join(basename(path));
                    let original = Path::new(path);
                    if original.is_file() {
                        assert_eq!(
                            std::fs::read(&on_mount).unwrap(),
                            std::fs::read(original).unwrap()
                        );
                        continue;
                    }
                    for file in files(original) {
                        let got = std::fs::read(on_mount.join(&file)).unwrap();
                        assert_eq!(
                            got,
                            std::fs::read(original.join(&file)).unwrap(),
                            "{path}/{file:?}"
                        );
                    }
                }
            })
        })
        .collect();
    for reader in readers {
        reader.join().expect("a builder read wrong bytes");
    }
    for mount in &mounts {
        for path in closure.paths() {
            let on_mount = mount.path.join(basename(path));
            let hash = nix_cmd([
                "nix".as_ref(),
                "hash".as_ref(),
                "path".as_ref(),
                "--type".as_ref(),
                "sha256".as_ref(),
                "--base32".as_ref(),
                on_mount.as_os_str(),
            ]);
            let nar_hash = nix_cmd(["nix-store", "--query", "--hash", path]);
            assert_eq!(format!("sha256:{}", hash.trim()), nar_hash.trim(), "{path}");
        }
    }
    assert_eq!(
        upstream.nar_requests(),
        closure.paths().len(),
        "each NAR downloaded once for both builders"
    );

    // Plain Nix through the service's HTTP cache, checking our signature.
    let (_fresh, fresh_url) = fresh_store();
    let out = lazystore_testkit::nix_command("nix")
        .args(["copy", "--from", http, "--to", &fresh_url, closure.top()])
        .args(["--option", "trusted-public-keys", &own_public])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(upstream.nar_requests(), closure.paths().len());

    // A path no cache has: absent, and not asked for again at once.
    let missing = mounts[0]
        .path
        .join("00000000000000000000000000000000-not-anywhere");
    assert!(!missing.exists());
    let narinfos = upstream.narinfo_requests();
    let other = mounts[1]
        .path
        .join("00000000000000000000000000000000-not-anywhere");
    assert!(!other.exists());
    assert_eq!(
        upstream.narinfo_requests(),
        narinfos,
        "the miss was remembered"
    );

    for mount in mounts {
        mount.stop();
    }
    let log = service.stop();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn untrusted_upstream_paths_are_not_published_and_asked_again() {
    let closure = build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (secret, _public) = gen_key(keys.path(), "pull-through-signer-1");
    let (_, stranger) = gen_key(keys.path(), "pull-through-stranger-1");
    let cache = make_cache(&[&closure.a], "zstd", Some(&secret));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(TestServer::start(cache.path()));
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
            &stranger,
        ],
        1,
    );
    let hash = &basename(&closure.a)[..32];
    let narinfo_url = format!("{}/{hash}.narinfo", urls[0]);
    for attempt in 1..=2 {
        assert_eq!(http_status(&narinfo_url), "502", "attempt {attempt}");
        assert_eq!(upstream.narinfo_requests(), attempt, "asked again");
    }
    assert_eq!(upstream.nar_requests(), 0);
    let log = service.stop();
    assert!(
        log.contains(hash) && log.contains("trusted key"),
        "the log names the path and the reason:\n{log}"
    );
}

/// The status code of a GET of `url` (http://HOST:PORT/PATH).
fn http_status(url: &str) -> String {
    common::http_get(url).0
}

#[test]
fn bad_nars_publish_nothing_and_the_next_lookup_tries_again() {
    let closure = build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "pull-through-bad-nars-1");
    let cache = make_cache(&[&closure.a, &closure.b], "none", Some(&secret));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(TestServer::start(cache.path()));
    let narinfo = |path: &str| {
        let file = cache
            .path()
            .join(format!("{}.narinfo", &basename(path)[..32]));
        NarInfo::parse(&std::fs::read_to_string(file).unwrap()).unwrap()
    };
    // b's narinfo signed again over a NarHash its NAR does not have.
    let mut wrong = narinfo(&closure.b);
    wrong.nar_hash[0] ^= 1;
    wrong.signatures.clear();
    wrong.sign(&SigningKey::load(&secret).unwrap());
    let b_narinfo = cache
        .path()
        .join(format!("{}.narinfo", &basename(&closure.b)[..32]));
    let good_b = std::fs::read_to_string(&b_narinfo).unwrap();
    std::fs::write(&b_narinfo, wrong.to_string()).unwrap();

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
        ],
        1,
    );
    let narinfo_url = |path: &str| format!("{}/{}.narinfo", urls[0], &basename(path)[..32]);

    // a's NAR missing, then cut short on every attempt: 502 each time,
    // and asked again each time.
    let a_nar = format!("/{}", narinfo(&closure.a).url);
    upstream.inject(&a_nar, vec![Fault::Status(404)]);
    assert_eq!(http_status(&narinfo_url(&closure.a)), "502");
    upstream.inject(&a_nar, vec![Fault::Truncate(40); 5]);
    assert_eq!(http_status(&narinfo_url(&closure.a)), "502");
    assert_eq!(upstream.count(|r| r.ends_with(&a_nar)), 6, "asked again");
    // Whole at last: published.
    assert_eq!(http_status(&narinfo_url(&closure.a)), "200");

    // b's NAR is not what its signed narinfo says: 502, nothing published,
    // and with the narinfo fixed upstream, the next lookup gets it.
    assert_eq!(http_status(&narinfo_url(&closure.b)), "502");
    std::fs::write(&b_narinfo, good_b).unwrap();
    assert_eq!(http_status(&narinfo_url(&closure.b)), "200");

    let log = service.stop();
    assert!(log.contains(&a_nar[1..]), "the log names the NAR:\n{log}");
    assert!(log.contains("NarHash"), "the log says why:\n{log}");
}

/// A builder's first read of a path waits for that path's own NAR, not
/// for its closure: with the NAR of `a` (which `c` refers to) stalled
/// upstream for 10 s, a file of `c` reads through a mount of the service
/// in well under that, and `a` reads too once its NAR comes. b's and c's
/// NARs are downloaded once each (c's is not downloaded again by the
/// closure's import).
#[test]
fn a_first_read_waits_for_its_own_nar_not_the_closure() {
    let closure = build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "pull-through-first-read-1");
    let cache = make_cache(&[closure.top()], "zstd", Some(&secret));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(TestServer::start(cache.path()));
    let a_narinfo = cache
        .path()
        .join(format!("{}.narinfo", &basename(&closure.a)[..32]));
    let a_nar = format!(
        "/{}",
        NarInfo::parse(&std::fs::read_to_string(a_narinfo).unwrap())
            .unwrap()
            .url
    );
    const STALL: std::time::Duration = std::time::Duration::from_secs(10);
    upstream.inject(&a_nar, vec![Fault::Stall(0, STALL)]);

    let (service, urls) = start_lines(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "memory://",
            "--upstream",
            &upstream.url,
            "--trusted-public-key",
            &public,
        ],
        1,
    );
    let work = tempfile::tempdir().unwrap();
    let mountpoint = work.path().join("builder");
    std::fs::create_dir(&mountpoint).unwrap();
    let local = format!("redb://{}/cache.redb", work.path().display());
    let mount = Mount::start(&mountpoint, &urls[0], &local, &[]);

    let started = std::time::Instant::now();
    let refs = std::fs::read(mount.path.join(basename(&closure.c)).join("refs")).unwrap();
    let took = started.elapsed();
    assert_eq!(
        refs,
        std::fs::read(Path::new(&closure.c).join("refs")).unwrap()
    );
    assert!(
        took < STALL / 2,
        "the read of c waited {took:?}, as if for a's stalled NAR"
    );
    // a comes once its NAR does, and then everything is published.
    let a = std::fs::read(mount.path.join(basename(&closure.a))).unwrap();
    assert_eq!(a, std::fs::read(&closure.a).unwrap());
    // b's and c's NAR once each; a's once, or again if the download
    // gave up on the stalled one.
    let a_requests = upstream.count(|r| r == a_nar);
    assert_eq!(
        upstream.nar_requests() - a_requests,
        2,
        "b's and c's NAR once each"
    );
    assert!(
        (1..=2).contains(&a_requests),
        "a's NAR asked {a_requests} times"
    );
    mount.stop();
    let log = service.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// A builder registering a closure's validity through a pull-through
/// service (`lazystore nix-db --store grpc+…`) gets exactly what real Nix
/// has for it, from the upstream narinfos: no NAR is downloaded, and
/// nothing is published.
#[test]
fn validity_through_the_service_downloads_no_nar() {
    let closure = build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "pull-through-validity-1");
    let cache = make_cache(&[closure.top()], "xz", Some(&secret));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(TestServer::start(cache.path()));
    let (service, urls) = start_lines(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "memory://",
            "--upstream",
            &upstream.url,
            "--trusted-public-key",
            &public,
        ],
        1,
    );
    let out = std::process::Command::new(common::LAZYSTORE)
        .args([
            "nix-db",
            "--store",
            &urls[0],
            "--trusted-public-key",
            &public,
        ])
        .arg(closure.top())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut dump = vec!["nix-store", "--dump-db"];
    dump.extend(closure.paths());
    assert_eq!(String::from_utf8_lossy(&out.stdout), nix_cmd(dump));
    assert_eq!(upstream.nar_requests(), 0, "a NAR was downloaded");
    assert_eq!(upstream.narinfo_requests(), closure.paths().len());
    let log = service.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// Through a pull-through service, a builder's `ls` and `stat` of a path
/// cost no NAR download anywhere: the mount shows the tree from the
/// service's facts and the upstream's listing; the first read of a file
/// has the service fetch that path's NAR, and the bytes are the original's.
#[test]
fn listing_a_path_through_the_service_downloads_no_nar() {
    let closure = build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "pull-through-listing-1");
    let cache = make_cache(&[closure.top()], "zstd", Some(&secret));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(TestServer::start(cache.path()));
    let (service, urls) = start_lines(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "memory://",
            "--upstream",
            &upstream.url,
            "--trusted-public-key",
            &public,
        ],
        1,
    );
    let work = tempfile::tempdir().unwrap();
    let mountpoint = work.path().join("builder");
    std::fs::create_dir(&mountpoint).unwrap();
    let local = format!("redb://{}/cache.redb", work.path().display());
    let mount = Mount::start(&mountpoint, &urls[0], &local, &[]);
    let c = mount.path.join(basename(&closure.c));

    let mut names: Vec<String> = std::fs::read_dir(&c)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["b", "bin", "refs"]);
    let refs = Path::new(&closure.c).join("refs");
    assert_eq!(
        std::fs::metadata(c.join("refs")).unwrap().len(),
        std::fs::metadata(&refs).unwrap().len()
    );
    assert!(std::fs::metadata(c.join("bin/hi")).unwrap().is_file());
    assert_eq!(upstream.nar_requests(), 0, "ls and stat downloaded a NAR");
    assert!(upstream.listing_requests() >= 1);

    assert_eq!(
        std::fs::read(c.join("refs")).unwrap(),
        std::fs::read(&refs).unwrap()
    );
    assert!(upstream.nar_requests() >= 1);
    let stats = common::stats(&mount.path);
    assert_eq!(stats["service_fetches"], 1, "{stats:?}");
    assert_eq!(stats["io_errors"], 0, "{stats:?}");
    mount.stop();
    let log = service.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// More bad upstream input, each a 502 with the path and the reason in the
/// service's log, nothing published, and the next request asking again: a
/// narinfo with no signature, a narinfo naming another store path under
/// the hash asked for, and an upstream that is down.
#[test]
fn unsigned_mismatched_and_unreachable_upstreams_are_502() {
    let closure = build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (_, public) = gen_key(keys.path(), "pull-through-unsigned-1");
    // No key: narinfos carry no signature.
    let cache = make_cache(&[&closure.b], "zstd", None);
    // a's hash, b's narinfo.
    let (a_hash, b_hash) = (&basename(&closure.a)[..32], &basename(&closure.b)[..32]);
    std::fs::copy(
        cache.path().join(format!("{b_hash}.narinfo")),
        cache.path().join(format!("{a_hash}.narinfo")),
    )
    .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(TestServer::start(cache.path()));
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    for (upstream_url, hash, reason) in [
        (upstream.url.as_str(), b_hash, "trusted key"),
        (upstream.url.as_str(), a_hash, "lazystore-test-b"),
        (down.as_str(), b_hash, down.as_str()),
    ] {
        let (service, urls) = start_lines(
            &[
                "serve",
                "--http-listen",
                "127.0.0.1:0",
                "--store",
                "memory://",
                "--upstream",
                upstream_url,
                "--trusted-public-key",
                &public,
            ],
            1,
        );
        let narinfo_url = format!("{}/{hash}.narinfo", urls[0]);
        let before = upstream.narinfo_requests();
        for attempt in 1..=2 {
            assert_eq!(
                http_status(&narinfo_url),
                "502",
                "{reason}: attempt {attempt}"
            );
        }
        if upstream_url == upstream.url {
            assert_eq!(
                upstream.narinfo_requests(),
                before + 2,
                "{reason}: asked again"
            );
        }
        let log = service.stop();
        assert!(
            log.contains(hash) && log.contains(reason),
            "the log names the path and the reason ({reason}):\n{log}"
        );
    }
    assert_eq!(
        upstream.nar_requests(),
        0,
        "a NAR of a refused path was downloaded"
    );
}
