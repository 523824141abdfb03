//! NAR → castore → NAR against real Nix: every NAR feature, taken from
//! `nix-store --dump` of real store paths, is ingested and rendered back bit
//! for bit, and the NarHash computed on the way equals Nix's.

use lazystore_testkit as common;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::sync::Arc;

use common::{add_tree, build_closure, make_cache, narinfo_files, nix_cmd};
use lazystore_castore::blobs::MemoryBlobService;
use lazystore_castore::directories::MemoryDirectoryService;
use lazystore_castore::{Blobs, ChunkerParams, Node};
use lazystore_pathinfo::ingest::ingest_nar;
use lazystore_pathinfo::render::{nar_hash, render_nar};
use lazystore_pathinfo::{NarInfo, nixbase32};
use sha2::{Digest as _, Sha256};

/// A tree with every feature a NAR can hold.
fn feature_tree(root: &Path) {
    let write = |rel: &str, data: &[u8]| std::fs::write(root.join(rel), data).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::create_dir_all(root.join("a/b/c/d")).unwrap();
    write("a/b/c/d/deep.txt", b"deep\n");
    write("empty-file", b"");
    write("run.sh", b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write("big.bin", &big);
    // The same bytes again: deduplicated into the same chunks.
    write("a/big-copy.bin", &big);
    write("ünïcødé-名前.txt", "non-ASCII\n".as_bytes());
    symlink("a/b/c/d/deep.txt", root.join("relative-link")).unwrap();
    symlink("/etc/hostname", root.join("absolute-link")).unwrap();
    symlink("does/not/exist", root.join("dangling-link")).unwrap();
    // Names that sort differently as bytes than as case-folded text.
    write("Zebra", b"Z");
    write("apple", b"a");
    write("a-", b"-");
}

fn dump(path: &str) -> Vec<u8> {
    let out = common::nix_output(["nix-store", "--dump", path]);
    assert!(out.status.success(), "nix-store --dump {path} failed");
    out.stdout
}

async fn round_trip(path: &str) {
    let nar = dump(path);
    let backend = Arc::new(MemoryBlobService::new());
    let blobs = Blobs::new(backend, ChunkerParams::default());
    let directories = MemoryDirectoryService::new();

    let ingested = ingest_nar(&blobs, &directories, &nar[..]).await.unwrap();
    assert_eq!(ingested.nar_size, nar.len() as u64, "{path}");
    assert_eq!(
        ingested.nar_sha256,
        <[u8; 32]>::from(Sha256::digest(&nar)),
        "{path}"
    );

    let nix_hash = nix_cmd(["nix", "hash", "path", "--type", "sha256", "--base32", path]);
    assert_eq!(
        nixbase32::encode(&ingested.nar_sha256),
        nix_hash.trim(),
        "{path}"
    );

    let rendered = render_nar(&blobs, &directories, &ingested.root, Vec::new())
        .await
        .unwrap();
    assert!(
        rendered == nar,
        "{path}: rendered NAR differs from nix-store --dump"
    );
    assert_eq!(
        nar_hash(&blobs, &directories, &ingested.root)
            .await
            .unwrap(),
        (ingested.nar_size, ingested.nar_sha256)
    );
}

#[tokio::test]
async fn every_nar_feature_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("features");
    std::fs::create_dir(&tree).unwrap();
    feature_tree(&tree);
    round_trip(&add_tree(&tree)).await;
}

#[tokio::test]
async fn empty_directory_store_path_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("empty");
    std::fs::create_dir(&tree).unwrap();
    let path = add_tree(&tree);
    round_trip(&path).await;
}

#[tokio::test]
async fn single_file_and_symlink_store_paths_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("single-file");
    std::fs::write(&file, b"just a file\n").unwrap();
    let exe = dir.path().join("single-exe");
    std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = dir.path().join("single-link");
    symlink("/nix/store/somewhere-else", &link).unwrap();
    for p in [&file, &exe, &link] {
        let path = add_tree(p);
        round_trip(&path).await;
    }
    // The root of a single-file path is a nameless file node.
    let nar = dump(&add_tree(&file));
    let blobs = Blobs::new(Arc::new(MemoryBlobService::new()), ChunkerParams::default());
    let ingested = ingest_nar(&blobs, &MemoryDirectoryService::new(), &nar[..])
        .await
        .unwrap();
    assert!(matches!(
        ingested.root,
        Node::File {
            size: 12,
            executable: false,
            ..
        }
    ));
}

#[tokio::test]
async fn narinfo_nar_hash_matches_ingest_of_cached_nar() {
    let closure = build_closure();
    let paths = [closure.a.as_str(), closure.b.as_str(), closure.c.as_str()];
    let cache = make_cache(&paths, "none", None);
    let files = narinfo_files(cache.path());
    assert_eq!(files.len(), 3);
    for file in files {
        let info = NarInfo::parse(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let nar = std::fs::read(cache.path().join(&info.url)).unwrap();
        let blobs = Blobs::new(Arc::new(MemoryBlobService::new()), ChunkerParams::default());
        let directories = MemoryDirectoryService::new();
        let ingested = ingest_nar(&blobs, &directories, &nar[..]).await.unwrap();
        assert_eq!(ingested.nar_sha256, info.nar_hash, "{}", info.store_path);
        assert_eq!(ingested.nar_size, info.nar_size, "{}", info.store_path);
        let rendered = render_nar(&blobs, &directories, &ingested.root, Vec::new())
            .await
            .unwrap();
        assert!(rendered == nar);
        round_trip(&info.store_path.to_absolute()).await;
    }
}
