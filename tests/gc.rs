//! `lazystore gc` on two paths that share a file: the one deleted loses
//! its unique chunks and their space, the other keeps everything and
//! renders to its exact NarHash (Nix's). `fsck` counts what no path
//! reaches before, and nothing after; `--dry-run` changes nothing; a
//! second gc finds nothing to drop.

mod common;

use std::process::Command;

use common::{lazystore, number_before, tree};
use lazystore_castore::blobs::RedbBlobService;
use lazystore_castore::{BlobService, Digest, RedbStore};
use lazystore_testkit::{nix_cmd, noise};

#[test]
fn gc_reclaims_what_only_deleted_paths_reached() {
    let work = tempfile::tempdir().unwrap();
    let shared = noise(1 << 20, 7001);
    let only_a = noise(4 << 20, 7002);
    let only_b = noise(1 << 20, 7003);
    let a = tree(
        &work.path().join("a"),
        &[("shared", &shared), ("mine", &only_a)],
    );
    let b = tree(
        &work.path().join("b"),
        &[("shared", &shared), ("mine", &only_b)],
    );
    let store_file = work.path().join("store.redb");
    let store = format!("redb://{}", store_file.display());
    let ingested = common::ingest(&store, &[&a, &b]);
    // The NarHash fsck checks b against is Nix's.
    let b_hash = lazystore_pathinfo::nixbase32::encode(&ingested[1].nar_sha256);
    assert_eq!(
        nix_cmd(["nix-store", "--query", "--hash", &b]).trim(),
        format!("sha256:{b_hash}")
    );

    let out = lazystore(&["gc", "--store", &store, "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("would drop 0 directories, 0 chunk lists, 0 chunks"),
        "{text}"
    );

    lazystore(&["delete", "--store", &store, &a]);
    // fsck counts what no path reaches now.
    let out = lazystore(&["fsck", "--store", &store]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("unreferenced: 1 directories, 1 chunk lists"),
        "{text}"
    );
    let out = lazystore(&["gc", "--store", &store, "--dry-run"]);
    let dry = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dry.contains("would drop 1 directories, 1 chunk lists"),
        "{dry}"
    );
    assert_eq!(number_before(&dry, "reclaimed"), 0, "{dry}");

    let out = lazystore(&["gc", "--store", &store]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let stored = number_before(&text, "bytes stored)");
    let reclaimed = number_before(&text, "reclaimed");
    // a's own file, 4 MiB of noise, stored as it is.
    assert!(stored >= 4 << 20, "{text}");
    assert!(
        reclaimed * 10 >= stored * 8,
        "reclaimed {reclaimed} of {stored}: {text}"
    );
    eprintln!("{text}");

    // b whole, to Nix's NarHash; a's own file gone, the shared one kept.
    let out = lazystore(&["fsck", "--store", &store]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("unreferenced: 0 directories, 0 chunk lists, 0 chunks"),
        "{text}"
    );
    assert!(
        text.contains("1 paths") && text.contains("0 damaged"),
        "{text}"
    );
    let blobs = RedbBlobService::new(RedbStore::open(&store_file).unwrap());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        assert!(blobs.stat(&Digest::of(&only_a)).await.unwrap().is_none());
        assert!(blobs.stat(&Digest::of(&shared)).await.unwrap().is_some());
        assert!(blobs.stat(&Digest::of(&only_b)).await.unwrap().is_some());
    });
    drop(blobs);

    let out = lazystore(&["gc", "--store", &store]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("dropped 0 directories, 0 chunk lists, 0 chunks"),
        "{text}"
    );
}

#[test]
fn gc_refuses_a_store_it_cannot_hold() {
    let out = Command::new(common::LAZYSTORE)
        .args(["gc", "--store", "memory://"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("memory://") && stderr.contains("redb://"),
        "{stderr}"
    );
}
