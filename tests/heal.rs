//! Bytes flipped in one stored chunk of a served redb store: a read through
//! a mount fails with EIO and a log line naming the chunk, and the store
//! quarantines it; `lazystore import` of the path again then writes it and
//! the file reads back whole. The same with `nix copy --to` the HTTP cache
//! instead of the import: the cache answers 404 for the incomplete path's
//! narinfo, so Nix uploads it again.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{LAZYSTORE, Mount, start_lines};
use lazystore_castore::blobs::RedbBlobService;
use lazystore_castore::{Digest, Node, RedbStore};
use lazystore_pathinfo::{Store, StorePath};
use lazystore_testkit::{add_tree, make_cache, nix_command, noise};

/// Flips a byte of the second chunk of file `name` of `path` in the redb
/// store at `file` (no one else may have it open); returns the chunk.
fn corrupt(file: &Path, path: &str, name: &str) -> Digest {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let redb = RedbStore::open(file).unwrap();
        let store = Store::redb(redb.clone());
        let hash = StorePath::from_absolute_path(path).unwrap().hash();
        let info = store.path_infos.get(&hash).await.unwrap().unwrap();
        let Node::Directory { digest, .. } = info.root else {
            panic!("{path} is not a directory")
        };
        let dir = store.directories.get(&digest).await.unwrap().unwrap();
        let (_, node) = dir
            .entries()
            .find(|(n, _)| n.as_bytes() == name.as_bytes())
            .unwrap();
        let Node::File { digest, .. } = node else {
            panic!("{name} is not a file")
        };
        let meta = store.blobs.stat(digest).await.unwrap().unwrap();
        let victim = meta.chunks[1].digest;
        let flipped = RedbBlobService::new(redb)
            .corrupt_chunk(&victim, |c| {
                let mut d = c.data.to_vec();
                d[100] ^= 0x40;
                c.data = d.into();
            })
            .unwrap();
        assert!(flipped);
        assert_eq!(store.blobs.service().quarantined().await.unwrap(), 0);
        victim
    })
}

/// Reads `file` until it reads right, for up to 10 s (a read that just
/// failed fails again at once until none has for a second).
fn reads_back(file: &Path, want: &[u8]) {
    let started = Instant::now();
    loop {
        match std::fs::read(file) {
            Ok(got) => {
                assert!(got == want, "{}: wrong bytes", file.display());
                return;
            }
            Err(e) if started.elapsed() < Duration::from_secs(10) => {
                eprintln!("{}: {e}; again", file.display());
                // Past the mount's memory of the failure (FAILED_READ_MEMORY,
                // renewed by every read that fails within it).
                std::thread::sleep(Duration::from_millis(1100));
            }
            Err(e) => panic!("{} still fails: {e}", file.display()),
        }
    }
}

fn serve(store: &str, grpc: &str, http: &str, token_file: &Path) -> (common::Proc, Vec<String>) {
    start_lines(
        &[
            "serve",
            "--store",
            store,
            "--listen",
            grpc,
            "--http-listen",
            http,
            "--allow-upload",
            "--write-token-file",
            token_file.to_str().unwrap(),
        ],
        2,
    )
}

#[test]
fn a_corrupt_chunk_fails_reads_and_heals_by_import_or_upload() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let tree = w.join("heal-tree");
    std::fs::create_dir(&tree).unwrap();
    let (one, two) = (noise(1 << 20, 81), noise(1 << 20, 82));
    std::fs::write(tree.join("one"), &one).unwrap();
    std::fs::write(tree.join("two"), &two).unwrap();
    let path = add_tree(&tree);
    let cache = make_cache(&[&path], "none", None);
    let from = format!("file://{}", cache.path().display());
    let token_file = w.join("token");
    std::fs::write(&token_file, "heal-token\n").unwrap();
    let redb_file = w.join("store.redb");
    let store = format!("redb://{}", redb_file.display());
    let import = |to: &str| {
        let out = Command::new(LAZYSTORE)
            .args(["import", "--from", &from, "--no-check-sigs", "--store", to])
            .args(["--token-file", token_file.to_str().unwrap(), &path])
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "{stdout}\n{stderr}");
        (stdout, stderr)
    };
    import(&store);
    let victim = corrupt(&redb_file, &path, "one");

    let (server, urls) = serve(&store, "127.0.0.1:0", "127.0.0.1:0", &token_file);
    let (grpc, http) = (urls[0].clone(), urls[1].clone());
    let mountpoint = w.join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let mount = Mount::start(
        &mountpoint,
        &grpc,
        "none",
        &["--no-passthrough", "--retry-deadline", "5"],
    );
    let root = mount.path.join(path.strip_prefix("/nix/store/").unwrap());

    // The read fails, never with wrong bytes, and the store lets go of the
    // chunk: the import finds the path incomplete and writes it.
    let err = std::fs::read(root.join("one")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let (stdout, stderr) = import(&grpc);
    assert!(stderr.contains("incomplete"), "{stderr}");
    assert!(stdout.contains("1 imported"), "{stdout}");
    reads_back(&root.join("one"), &one);

    // Again, healed by an upload this time.
    let log = server.stop();
    assert!(log.contains(&format!("chunk {victim}")), "{log}");
    let victim = corrupt(&redb_file, &path, "two");
    let listen = |url: &str| url.split("://").nth(1).unwrap().to_owned();
    let (server, again) = serve(&store, &listen(&grpc), &listen(&http), &token_file);
    assert_eq!(again, urls);
    let err = std::fs::read(root.join("two")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let host = listen(&http);
    let host = host.split(':').next().unwrap();
    let netrc = w.join("netrc");
    std::fs::write(
        &netrc,
        format!("machine {host} login nix password heal-token\n"),
    )
    .unwrap();
    // A Nix that never saw this cache: it keeps the narinfos it found.
    let nix_cache = tempfile::tempdir().unwrap();
    let out = nix_command("nix")
        .env("XDG_CACHE_HOME", nix_cache.path())
        .args(["copy", "--to", &http, "--option", "netrc-file"])
        .arg(&netrc)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    reads_back(&root.join("two"), &two);

    let log = mount.stop();
    for needle in [format!("chunk {victim}"), "returning EIO".into()] {
        assert!(
            log.contains(&needle),
            "no {needle:?} in the mount's log:\n{log}"
        );
    }
    let log = server.stop();
    assert!(log.contains("quarantined"), "{log}");
    assert!(log.contains("published an uploaded path"), "{log}");
}
