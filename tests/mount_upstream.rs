//! `lazystore mount --upstream` for real: a path never imported, in a
//! real-Nix binary cache with `.ls` listings served over HTTP, appears on
//! lookup; `ls -lR` over it downloads no NAR; 16 processes reading a file
//! at once cause one NAR download; `nix hash path` through the mount gives
//! Nix's NarHash.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Mount, stats};
use lazystore_pathinfo::{NarInfo, SigningKey};
use lazystore_testkit::http::TestServer;
use lazystore_testkit::{build_closure, gen_key, make_cache, nix_cmd};

fn basename(path: &str) -> &str {
    path.strip_prefix("/nix/store/").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_paths_appear_on_lookup_and_download_once_on_read() {
    let closure = build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "lazystore-mount-upstream-1");
    let cache = make_cache(&[closure.top()], "zstd", Some(&secret));
    let server = TestServer::start(cache.path()).await;

    let work = tempfile::tempdir().unwrap();
    let mountpoint = work.path().join("store");
    std::fs::create_dir(&mountpoint).unwrap();
    let store = format!("redb://{}/store.redb", work.path().display());
    let url = server.url.clone();
    let mount = tokio::task::spawn_blocking(move || {
        Mount::start(
            &mountpoint,
            &store,
            "none",
            &["--upstream", &url, "--trusted-public-key", &public],
        )
    })
    .await
    .unwrap();
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

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn nix_hash_path(path: &Path) -> String {
    let out = lazystore_testkit::nix_command("nix")
        .args(["hash", "path", "--type", "sha256", "--base32"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("sha256:{}", String::from_utf8(out.stdout).unwrap().trim())
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
