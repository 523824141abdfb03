//! `lazystore mount --upstream` for real: a path never imported, in a
//! real-Nix binary cache with `.ls` listings served over HTTP, appears on
//! lookup; `ls -lR` over it downloads no NAR, also over 20 paths whose
//! listings are served as cache.nixos.org serves them (brotli, said so only
//! in `Content-Encoding`); 16 processes reading a file
//! at once cause one NAR download; `nix hash path` through the mount gives
//! Nix's NarHash; bad upstream input of every kind is logged with the path
//! and the reason, publishes nothing, and is asked again; a mount started
//! again over the same store and local cache reads a path it substituted
//! before but could not publish without downloading its NAR again.

mod common;

use std::process::Command;

use common::{Mount, nix_hash_path, stats};
use lazystore_pathinfo::{NarInfo, SigningKey};
use lazystore_testkit::http::{Behaviour, Encoding, TestServer};
use lazystore_testkit::{build_closure, build_paths, gen_key, make_cache, nix_cmd};

fn basename(path: &str) -> &str {
    path.strip_prefix("/nix/store/").unwrap()
}

/// A mount at `work`/store of a new redb store in `work`, with no local
/// cache, substituting from the cache at `url` signed by `public`.
async fn mount_with_upstream(work: &std::path::Path, url: &str, public: &str) -> Mount {
    let mountpoint = work.join("store");
    std::fs::create_dir(&mountpoint).unwrap();
    let store = format!("redb://{}/store.redb", work.display());
    let (url, public) = (url.to_owned(), public.to_owned());
    tokio::task::spawn_blocking(move || {
        Mount::start(
            &mountpoint,
            &store,
            "none",
            &["--upstream", &url, "--trusted-public-key", &public],
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_paths_appear_on_lookup_and_download_once_on_read() {
    let closure = build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "lazystore-mount-upstream-1");
    let cache = make_cache(&[closure.top()], "zstd", Some(&secret));
    let server = TestServer::start(cache.path()).await;

    let work = tempfile::tempdir().unwrap();
    let mount = mount_with_upstream(work.path(), &server.url, &public).await;
    let c = mount.path.join(basename(&closure.c));

    let listing = blocking(move || {
        let out = Command::new("ls").arg("-lR").arg(&c).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    })
    .await;
    assert!(
        listing.contains(" hi\n") && listing.contains(" refs\n"),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("b -> {}", closure.b)),
        "{listing}"
    );
    assert_eq!(server.nar_requests(), 0, "ls -lR downloaded a NAR");

    let refs = mount.path.join(basename(&closure.c)).join("refs");
    let want = std::fs::read(format!("{}/refs", closure.c)).unwrap();
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let refs = refs.clone();
            std::thread::spawn(move || std::fs::read(refs).unwrap())
        })
        .collect();
    for reader in readers {
        let got = blocking(move || reader.join().unwrap()).await;
        assert_eq!(got, want);
    }
    assert_eq!(server.nar_requests(), 1, "16 readers, one NAR download");
    let counters = stats(&mount.path);
    assert_eq!(counters["upstream_nar_downloads"], 1, "{counters:?}");

    // The whole path, hashed through the mount, is what Nix has.
    let c = mount.path.join(basename(&closure.c));
    let hash = blocking(move || nix_hash_path(&c)).await;
    let expected = nix_cmd(["nix-store", "--query", "--hash", &closure.c]);
    assert_eq!(hash, expected.trim());
    assert_eq!(server.nar_requests(), 1);

    // A path whose NAR does not match its signed NarHash: shown (from its
    // listing), but reads fail with EIO and the log says which and why.
    let a_narinfo = cache
        .path()
        .join(format!("{}.narinfo", &basename(&closure.a)[..32]));
    let mut info = NarInfo::parse(&std::fs::read_to_string(&a_narinfo).unwrap()).unwrap();
    info.nar_hash[0] ^= 1;
    info.signatures.clear();
    info.sign(&SigningKey::load(&secret).unwrap());
    std::fs::write(&a_narinfo, info.render()).unwrap();
    let a = mount.path.join(basename(&closure.a));
    let err = blocking(move || std::fs::read(a).unwrap_err()).await;
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    // A path no upstream has is not there.
    let absent = mount.path.join("00000000000000000000000000000000-absent");
    assert!(!absent.exists());
    let log = blocking(move || mount.stop()).await;
    assert!(log.contains("unmounted"), "{log}");
    // c's download, and a's that failed its NarHash (the kernel may try
    // a failed read twice, and each try downloads again).
    let downloads: u64 = log
        .split_once("upstream_nar_downloads=")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no upstream counters in the exit log:\n{log}"));
    assert!((2..=3).contains(&downloads), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains(&closure.a) && l.contains("EIO"))
        .unwrap_or_else(|| panic!("no log line names {}:\n{log}", closure.a));
    assert!(line.contains("NarHash"), "{line}");
}

/// The acceptance test of cache.nixos.org's listings: `ls -lR` of 20
/// listed, never-fetched paths whose listings are brotli-compressed and say
/// so only in `Content-Encoding` downloads no NAR; reading one file
/// downloads that path's NAR, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_lr_over_brotli_listings_downloads_no_nar() {
    let paths = build_paths(20);
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "lazystore-mount-brotli-1");
    let cache = make_cache(&[paths.last().unwrap()], "xz", Some(&secret));
    let server =
        TestServer::start_with(cache.path(), Behaviour::cache_nixos_org(Encoding::Br)).await;

    let work = tempfile::tempdir().unwrap();
    let mount = mount_with_upstream(work.path(), &server.url, &public).await;
    let dirs: Vec<_> = paths.iter().map(|p| mount.path.join(basename(p))).collect();
    let listing = blocking(move || {
        let out = Command::new("ls").arg("-lR").args(&dirs).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    })
    .await;
    assert_eq!(listing.matches(" tool\n").count(), 20, "{listing}");
    assert_eq!(
        listing.matches("link -> share/note").count(),
        20,
        "{listing}"
    );
    assert_eq!(server.listing_requests(), 20);
    assert_eq!(server.nar_requests(), 0, "ls -lR downloaded a NAR");
    let counters = stats(&mount.path);
    assert_eq!(counters["upstream_nar_downloads"], 0, "{counters:?}");
    assert_eq!(counters["upstream_nar_peeks"], 0, "{counters:?}");
    assert_eq!(counters["upstream_listing_fallbacks"], 0, "{counters:?}");

    let note = mount.path.join(basename(&paths[3])).join("share/note");
    let want = std::fs::read(format!("{}/share/note", paths[3])).unwrap();
    let got = blocking(move || std::fs::read(note).unwrap()).await;
    assert_eq!(got, want);
    assert_eq!(server.nar_requests(), 1);
    let counters = stats(&mount.path);
    assert_eq!(counters["upstream_nar_downloads"], 1, "{counters:?}");
    let log = blocking(move || mount.stop()).await;
    assert!(log.contains("upstream_listing_fallbacks=0"), "{log}");
    assert!(!log.contains("ignoring the listing"), "{log}");
}

/// The acceptance test of the durable NAR index: a path read through a
/// mount whose references are not published is not published; a mount
/// started again over the same store (and local cache) reads it without
/// downloading its NAR again, from the root its first download was
/// recorded under. Reading its references then publishes them, and the
/// path with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_mount_reads_an_unpublished_path_without_downloading_it() {
    restarted_mount_reads_without_downloading(false).await;
}

/// The same over a `lazystore serve` store: the index is in the local
/// cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_mount_over_grpc_reads_an_unpublished_path_without_downloading_it() {
    restarted_mount_reads_without_downloading(true).await;
}

async fn restarted_mount_reads_without_downloading(over_grpc: bool) {
    let closure = build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "lazystore-mount-restart-1");
    let cache = make_cache(&[closure.top()], "zstd", Some(&secret));
    let upstream = TestServer::start(cache.path()).await;

    let work = tempfile::tempdir().unwrap();
    let redb = format!("redb://{}/store.redb", work.path().display());
    let (server, store, local_cache) = if over_grpc {
        let (server, grpc) = blocking(move || common::serve(&redb, "127.0.0.1:0")).await;
        let cache = format!("redb://{}/cache.redb", work.path().display());
        (Some(server), grpc, cache)
    } else {
        (None, redb, "none".to_owned())
    };
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let start = || {
        let (mountpoint, store, cache) = (mountpoint.clone(), store.clone(), local_cache.clone());
        let (url, public) = (upstream.url.clone(), public.clone());
        blocking(move || {
            Mount::start(
                &mountpoint,
                &store,
                &cache,
                &["--upstream", &url, "--trusted-public-key", &public],
            )
        })
    };
    let read = |mount: &Mount, file: String| {
        let path = mount.path.join(file.trim_start_matches("/nix/store/"));
        blocking(move || std::fs::read(&path).unwrap())
    };
    let refs = format!("{}/refs", closure.c);
    let want = std::fs::read(&refs).unwrap();

    let mount = start().await;
    assert_eq!(read(&mount, refs.clone()).await, want);
    assert_eq!(upstream.nar_requests(), 1);
    let log = blocking(move || mount.stop()).await;
    assert!(log.contains("upstream_nar_downloads=1"), "{log}");

    let mount = start().await;
    let narinfos = upstream.narinfo_requests();
    assert_eq!(read(&mount, refs.clone()).await, want);
    assert_eq!(
        upstream.nar_requests(),
        1,
        "the restarted mount downloaded the NAR"
    );
    assert!(upstream.narinfo_requests() > narinfos);
    let counters = stats(&mount.path);
    assert_eq!(
        (
            counters["upstream_nar_downloads"],
            counters["upstream_nar_peeks"],
            counters["io_errors"]
        ),
        (0, 0, 0),
        "{counters:?}"
    );

    // b, then a: a is published at once, then b, then c, pending since it
    // was read.
    assert_eq!(
        read(&mount, closure.b.clone()).await,
        std::fs::read(&closure.b).unwrap()
    );
    assert_eq!(
        read(&mount, closure.a.clone()).await,
        std::fs::read(&closure.a).unwrap()
    );
    assert_eq!(upstream.nar_requests(), 3);
    let log = blocking(move || mount.stop()).await;
    for path in closure.paths() {
        assert!(
            log.lines()
                .any(|l| l.contains(path) && l.contains("substituted from upstream and published")),
            "{path} not published:\n{log}"
        );
    }
    let store =
        lazystore_pathinfo::Store::open(&store, lazystore_pathinfo::StoreOptions::default())
            .await
            .unwrap();
    for path in closure.paths() {
        let hash = lazystore_pathinfo::StorePath::from_absolute_path(path)
            .unwrap()
            .hash();
        assert!(
            store.path_infos.get(&hash).await.unwrap().is_some(),
            "{path}"
        );
    }
    drop(server);
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// A path of thousands of small files, substituted by a mount whose store
/// is a `lazystore serve` over gRPC: its NAR is stored through hundreds of
/// small concurrent Puts. With HTTP/2's adaptive windows, h2 closed the
/// connection ("too_many_data_frames") and the read failed with EIO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_files_substitute_through_a_grpc_store() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("many-small");
    for d in 0..40 {
        let dir = tree.join(format!("d{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            let text = format!("file {d}/{f}\n").repeat(1 + (d * 100 + f) % 17);
            std::fs::write(dir.join(format!("f{f:03}")), text).unwrap();
        }
    }
    let path = lazystore_testkit::add_tree(&tree);
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "lazystore-many-small-1");
    let cache = make_cache(&[&path], "zstd", Some(&secret));
    let upstream = TestServer::start(cache.path()).await;

    let store = format!("redb://{}/store.redb", work.path().display());
    let (_server, grpc) = blocking(move || common::serve(&store, "127.0.0.1:0")).await;
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let cache_url = format!("redb://{}/cache.redb", work.path().display());
    let url = upstream.url.clone();
    let mount = blocking(move || {
        Mount::start(
            &mountpoint,
            &grpc,
            &cache_url,
            &["--upstream", &url, "--trusted-public-key", &public],
        )
    })
    .await;
    let file = mount.path.join(basename(&path)).join("d39/f099");
    let got = blocking(move || std::fs::read(file)).await;
    let want = std::fs::read(tree.join("d39/f099")).unwrap();
    assert_eq!(got.expect("reading through the mount"), want);
    let counters = stats(&mount.path);
    assert_eq!(
        (counters["upstream_nar_downloads"], counters["io_errors"]),
        (1, 0),
        "{counters:?}"
    );
    blocking(move || mount.stop()).await;
}

/// Bad upstream input, one case after another through a real mount (a
/// server down, an untrusted signature, a narinfo for another path, a
/// narinfo 404, a NAR 404): each lookup fails with ENOENT, the log names
/// the path and the reason, the next lookup once the cache is mended
/// works (after the negative TTL for a 404), and nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upstream_input_is_logged_and_retried() {
    let closure = build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "lazystore-bad-upstream-1");
    let (other_secret, _) = gen_key(keys.path(), "someone-else-1");
    let cache = make_cache(&[closure.top()], "zstd", Some(&secret));
    let narinfo = |path: &str| {
        cache
            .path()
            .join(format!("{}.narinfo", &basename(path)[..32]))
    };
    let original = |path: &str| std::fs::read_to_string(narinfo(path)).unwrap();
    let (a_info, b_info, c_info) = (
        original(&closure.a),
        original(&closure.b),
        original(&closure.c),
    );
    // Nobody listens on this port yet.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };

    let work = tempfile::tempdir().unwrap();
    let mountpoint = work.path().join("store");
    std::fs::create_dir(&mountpoint).unwrap();
    let store = format!("redb://{}/store.redb", work.path().display());
    let url = format!("http://127.0.0.1:{port}");
    let store_url = store.clone();
    let mount = blocking(move || {
        Mount::start(
            &mountpoint,
            &store_url,
            "none",
            &[
                "--upstream",
                &url,
                "--trusted-public-key",
                &public,
                "--upstream-negative-ttl",
                "1",
            ],
        )
    })
    .await;
    let root = mount.path.clone();
    let exists = |path: &str| {
        let p = root.join(basename(path));
        async move {
            blocking(move || match std::fs::symlink_metadata(&p) {
                Ok(_) => true,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => false,
                Err(e) => panic!("{}: {e}", p.display()),
            })
            .await
        }
    };

    // The server is down.
    assert!(!exists(&closure.c).await);
    let server = TestServer::serve(
        tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap(),
        cache.path(),
    );

    // b signed by a key nobody trusts, then a narinfo for a in b's place.
    let mut info = NarInfo::parse(&b_info).unwrap();
    info.signatures.clear();
    info.sign(&SigningKey::load(&other_secret).unwrap());
    std::fs::write(narinfo(&closure.b), info.render()).unwrap();
    assert!(!exists(&closure.b).await);
    std::fs::write(narinfo(&closure.b), &a_info).unwrap();
    assert!(!exists(&closure.b).await);
    std::fs::write(narinfo(&closure.b), &b_info).unwrap();
    assert!(exists(&closure.b).await, "a mended narinfo is found");

    // a's narinfo missing: believed for the negative TTL, then asked again.
    std::fs::remove_file(narinfo(&closure.a)).unwrap();
    assert!(!exists(&closure.a).await);
    std::fs::write(narinfo(&closure.a), &a_info).unwrap();
    let asked = |hash: String| server.count(move |p| p.contains(&hash) && p.ends_with(".narinfo"));
    let a_hash = basename(&closure.a)[..32].to_owned();
    assert!(!exists(&closure.a).await, "a 404 is believed for a while");
    assert_eq!(asked(a_hash.clone()), 1);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert!(
        exists(&closure.a).await,
        "asked again after the negative TTL"
    );
    assert_eq!(asked(a_hash), 2);

    // c's NAR missing (and no listing: the lookup reads the NAR's start).
    let nar_file = cache.path().join(&NarInfo::parse(&c_info).unwrap().url);
    let hidden = work.path().join("c.nar");
    std::fs::rename(&nar_file, &hidden).unwrap();
    let listing = cache
        .path()
        .join(format!("{}.ls", &basename(&closure.c)[..32]));
    std::fs::remove_file(&listing).unwrap();
    assert!(!exists(&closure.c).await);
    std::fs::rename(&hidden, &nar_file).unwrap();
    let refs = root.join(basename(&closure.c)).join("refs");
    let got = blocking(move || std::fs::read(refs).unwrap()).await;
    assert_eq!(got, std::fs::read(format!("{}/refs", closure.c)).unwrap());

    let log = blocking(move || mount.stop()).await;
    let line_for = |path: &str, reason: &str| {
        assert!(
            log.lines().any(|l| l.contains(path) && l.contains(reason)),
            "no log line names {path} and says {reason:?}:\n{log}"
        );
    };
    line_for(
        &closure.c,
        &format!("cannot read its narinfo from http://127.0.0.1:{port}"),
    );
    line_for(&closure.b, "no valid signature by a trusted key");
    line_for(
        &closure.b,
        &format!("is for {}, not for the path asked for", closure.a),
    );
    line_for(&closure.a, "in no upstream cache");
    line_for(&closure.c, "is missing from");
    // Nothing published, whatever was shown.
    let store =
        lazystore_pathinfo::Store::open(&store, lazystore_pathinfo::StoreOptions::default())
            .await
            .unwrap();
    for path in [&closure.a, &closure.b, &closure.c] {
        let hash = lazystore_pathinfo::StorePath::from_absolute_path(path)
            .unwrap()
            .hash();
        assert!(
            store.path_infos.get(&hash).await.unwrap().is_none(),
            "{path}"
        );
    }
}
