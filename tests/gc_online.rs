//! Garbage collection of a served store, beside its writers and readers:
//! path A is deleted, and while `lazystore gc --store grpc+…` runs again
//! and again, C — which holds a copy of A's own file, so its import is
//! told A's chunks are stored and skips them — is imported through the
//! server, and a builder's mount reads B (which shares a file with A).
//! Nothing is lost: afterwards fsck of the served store is clean, and B and
//! C hash, through the mount, to Nix's NarHash. A's file that nobody else
//! holds is dropped, its bytes reclaimed.
//!
//! Also: the retention rules (`--keep-since`, `--keep-closure-of`,
//! `--roots`) of a served store, with the last-use record the server keeps.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Mount, lazystore, nix_hash_path, number_before, serve, tree};
use lazystore_testkit::{nix_cmd, noise};

fn nar_hash(path: &str) -> String {
    nix_cmd(["nix-store", "--query", "--hash", path])
        .trim()
        .to_owned()
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap()
}

#[test]
fn gc_beside_an_import_and_a_mount_loses_nothing() {
    let work = tempfile::tempdir().unwrap();
    let shared = noise(1 << 20, 8101);
    let only_a = noise(4 << 20, 8102);
    let gone = noise(4 << 20, 8103);
    let a = tree(
        &work.path().join("a"),
        &[
            ("shared", &shared),
            ("again-in-c", &only_a),
            ("gone", &gone),
        ],
    );
    let b = tree(
        &work.path().join("b"),
        &[("shared", &shared), ("mine", &noise(1 << 20, 8104))],
    );
    let mut c_files: Vec<(String, Vec<u8>)> = (0..48)
        .map(|i| (format!("f{i}"), noise(1 << 20, 8200 + i)))
        .collect();
    c_files.push(("from-a".into(), only_a.clone()));
    let c_refs: Vec<(&str, &[u8])> = c_files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let c = tree(&work.path().join("c"), &c_refs);

    let store = format!("redb://{}", work.path().join("store.redb").display());
    common::ingest(&store, &[&a, &b]);
    let (server, url) = serve(&store, "127.0.0.1:0");
    lazystore(&["delete", "--store", &url, &a]);

    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let cache = format!("redb://{}", work.path().join("cache.redb").display());
    let mount = Mount::start(&mountpoint, &url, &cache, &[]);
    let b_on_mount = mount.path.join(basename(&b));

    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (done, reads, dir) = (done.clone(), reads.clone(), b_on_mount.clone());
        let (shared, mine) = (shared.clone(), std::fs::read(format!("{b}/mine")).unwrap());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                assert_eq!(std::fs::read(dir.join("shared")).unwrap(), shared);
                assert_eq!(std::fs::read(dir.join("mine")).unwrap(), mine);
                reads.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let collections = Arc::new(AtomicUsize::new(0));
    let dropped_bytes = Arc::new(AtomicUsize::new(0));
    let collector = {
        let (done, url) = (done.clone(), url.clone());
        let (collections, dropped_bytes) = (collections.clone(), dropped_bytes.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) || collections.load(Ordering::SeqCst) < 3 {
                let out = lazystore(&["gc", "--store", &url]);
                let text = String::from_utf8_lossy(&out.stdout);
                let bytes = number_before(&text, "bytes stored)");
                dropped_bytes.fetch_add(bytes as usize, Ordering::SeqCst);
                collections.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // C through the server, while collections run.
    common::ingest(&url, &[&c]);
    done.store(true, Ordering::SeqCst);
    collector.join().unwrap();
    reader.join().unwrap();
    let collections = collections.load(Ordering::SeqCst);
    eprintln!(
        "{collections} collections, {} reads of b",
        reads.load(Ordering::SeqCst)
    );
    // One more, with nothing running.
    let out = lazystore(&["gc", "--store", &url]);
    let last = String::from_utf8_lossy(&out.stdout).into_owned();
    let dropped =
        dropped_bytes.load(Ordering::SeqCst) as u64 + number_before(&last, "bytes stored)");
    // A's files were dropped (the one C holds too, if a collection came
    // before C's import asked for it: C then sent it again).
    assert!(dropped >= 4 << 20, "dropped {dropped} bytes: {last}");

    let out = lazystore(&["fsck", "--store", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2 paths") && text.contains("0 damaged"),
        "{text}"
    );
    assert_eq!(nix_hash_path(&b_on_mount), nar_hash(&b));
    assert_eq!(nix_hash_path(&mount.path.join(basename(&c))), nar_hash(&c));
    mount.stop();
    server.stop();
}

#[test]
fn retention_rules_keep_what_was_used_and_named() {
    let work = tempfile::tempdir().unwrap();
    let paths: Vec<String> = (0..4)
        .map(|i| {
            tree(
                &work.path().join(format!("p{i}")),
                &[("f", &noise(64 << 10, 8300 + i))],
            )
        })
        .collect();
    let store = format!("redb://{}", work.path().join("store.redb").display());
    common::ingest(
        &store,
        &paths.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let (server, url) = serve(&store, "127.0.0.1:0");

    // Uses are recorded from the first collection that sees a path: all
    // four count as used now.
    let out = lazystore(&["gc", "--store", &url, "--keep-since", "1h", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("kept 4 paths"), "{text}");
    std::thread::sleep(Duration::from_secs(6));
    // p0 asked for by a client since.
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let cache = format!("redb://{}", work.path().join("cache.redb").display());
    let mount = Mount::start(&mountpoint, &url, &cache, &[]);
    assert!(mount.path.join(basename(&paths[0])).join("f").exists());
    mount.stop();
    let roots = work.path().join("roots");
    std::fs::write(&roots, format!("# kept by hand\n{}\n\n", paths[1])).unwrap();

    let out = lazystore(&[
        "gc",
        "--store",
        &url,
        "--keep-since",
        "4s",
        "--keep-closure-of",
        &paths[2],
        "--roots",
        roots.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("kept 3 paths"), "{text}");
    assert!(text.contains(&format!("deleted {}", paths[3])), "{text}");
    let out = lazystore(&["fsck", "--store", &url]);
    let fsck = String::from_utf8_lossy(&out.stdout);
    assert!(
        fsck.contains("3 paths") && fsck.contains("0 damaged"),
        "{fsck}"
    );

    // A path to keep that is not published is an error naming it.
    let out = std::process::Command::new(common::LAZYSTORE)
        .args(["gc", "--store", &url, "--keep-closure-of", &paths[3]])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(basename(&paths[3])) && stderr.contains("not published"),
        "{stderr}"
    );
    server.stop();
}
