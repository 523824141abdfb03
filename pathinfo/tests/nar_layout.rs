//! NAR layout against real Nix: a layout built from the directories alone
//! gives any byte range of the NAR `nix-store --dump` writes (whole, every
//! boundary, random ranges across chunk boundaries), and the listing built
//! by the same walk is the `.ls` Nix writes, byte for byte.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::sync::Arc;

use lazystore_castore::blobs::MemoryBlobService;
use lazystore_castore::directories::MemoryDirectoryService;
use lazystore_castore::{Blobs, ChunkerParams, Node};
use lazystore_pathinfo::NarInfo;
use lazystore_pathinfo::ingest::ingest_nar;
use lazystore_pathinfo::listing::Listing;
use lazystore_pathinfo::render::{RenderError, nar_layout, nar_listing, render_range};
use lazystore_testkit::{add_tree, make_cache, narinfo_files, nix_output, noise};

fn dump(path: &str) -> Vec<u8> {
    let out = nix_output(["nix-store", "--dump", path]);
    assert!(out.status.success(), "nix-store --dump {path} failed");
    out.stdout
}

struct Ingested {
    blobs: Blobs,
    directories: MemoryDirectoryService,
    root: Node,
}

async fn ingest(nar: &[u8]) -> Ingested {
    // Small chunks, so that ranges cross many chunk boundaries.
    let params = ChunkerParams {
        min: 1024,
        avg: 4096,
        max: 16384,
    }
    .validate()
    .unwrap();
    let blobs = Blobs::new(Arc::new(MemoryBlobService::new()), params);
    let directories = MemoryDirectoryService::new();
    let root = ingest_nar(&blobs, &directories, nar).await.unwrap().root;
    Ingested {
        blobs,
        directories,
        root,
    }
}

/// A small tree with every kind of node, names that need padding, empty
/// and executable files, nested and empty directories.
fn small_tree(root: &Path) {
    let write = |rel: &str, data: &[u8]| std::fs::write(root.join(rel), data).unwrap();
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    write("a/b/c/deep", b"deep\n");
    write("a/seven", b"1234567");
    write("a/eight", b"12345678");
    write("empty-file", b"");
    write("run", b"#!/bin/sh\n");
    std::fs::set_permissions(root.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    symlink("a/b/c/deep", root.join("link")).unwrap();
    write("ünï", "x".as_bytes());
}

#[tokio::test]
async fn every_range_of_a_small_nar() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("small");
    std::fs::create_dir(&tree).unwrap();
    small_tree(&tree);
    let nar = dump(&add_tree(&tree));
    let store = ingest(&nar).await;
    let layout = Arc::new(nar_layout(&store.directories, &store.root).await.unwrap());
    assert_eq!(layout.size(), nar.len() as u64);
    let n = nar.len();
    for start in 0..=n {
        for len in [0, 1, 3, 8, 9, 100, n - start] {
            let end = (start + len).min(n);
            let got = render_range(&store.blobs, &layout, start as u64..end as u64, Vec::new())
                .await
                .unwrap();
            assert!(got == nar[start..end], "range {start}..{end} of {n}");
        }
    }
    let err = render_range(&store.blobs, &layout, 0..n as u64 + 1, Vec::new())
        .await
        .unwrap_err();
    assert!(matches!(err, RenderError::OutOfRange { .. }), "{err}");
}

#[tokio::test]
async fn random_ranges_of_a_large_nar() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("large");
    std::fs::create_dir_all(tree.join("d")).unwrap();
    for i in 0..20u64 {
        std::fs::write(
            tree.join(format!("d/f{i:02}")),
            noise(50_000 + i as usize * 7_919, i),
        )
        .unwrap();
    }
    std::fs::write(tree.join("big"), noise(3_000_001, 99)).unwrap();
    let nar = dump(&add_tree(&tree));
    let store = ingest(&nar).await;
    let layout = Arc::new(nar_layout(&store.directories, &store.root).await.unwrap());
    let whole = render_range(&store.blobs, &layout, 0..nar.len() as u64, Vec::new())
        .await
        .unwrap();
    assert!(
        whole == nar,
        "the whole range differs from nix-store --dump"
    );
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |bound: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % bound
    };
    let n = nar.len() as u64;
    for _ in 0..300 {
        let start = next(n);
        let end = start + next((n - start).min(200_000) + 1);
        let got = render_range(&store.blobs, &layout, start..end, Vec::new())
            .await
            .unwrap();
        assert!(
            got == nar[start as usize..end as usize],
            "range {start}..{end} of {n}"
        );
    }
}

#[tokio::test]
async fn single_file_and_symlink_nars() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, noise(100_000, 3)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let link = dir.path().join("link");
    symlink("/nix/store/elsewhere", &link).unwrap();
    for path in [&file, &empty, &link] {
        let nar = dump(&add_tree(path));
        let store = ingest(&nar).await;
        let layout = Arc::new(nar_layout(&store.directories, &store.root).await.unwrap());
        let n = nar.len();
        for (start, end) in [(0, n), (1, n - 1), (100, 200.min(n)), (n, n)] {
            let got = render_range(&store.blobs, &layout, start as u64..end as u64, Vec::new())
                .await
                .unwrap();
            assert!(got == nar[start..end], "{}: {start}..{end}", path.display());
        }
    }
}

/// The listing of what we ingested from Nix's NAR is the listing Nix wrote.
#[tokio::test]
async fn listing_is_what_nix_writes() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("listed");
    std::fs::create_dir(&tree).unwrap();
    small_tree(&tree);
    std::fs::write(tree.join("a/big"), noise(200_000, 5)).unwrap();
    let single = dir.path().join("single");
    std::fs::write(&single, b"one file").unwrap();
    let paths = [add_tree(&tree), add_tree(&single)];
    let cache = make_cache(&[&paths[0], &paths[1]], "none", None);
    let files = narinfo_files(cache.path());
    assert_eq!(files.len(), 2);
    for file in files {
        let info = NarInfo::parse(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let nar = std::fs::read(cache.path().join(&info.url)).unwrap();
        let ls = std::fs::read(file.with_extension("ls")).unwrap();
        let store = ingest(&nar).await;
        let listing = nar_listing(&store.directories, &store.root).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&listing.to_json()),
            String::from_utf8_lossy(&ls),
            "{}",
            info.store_path
        );
        assert_eq!(listing, Listing::parse(&ls).unwrap());
        // The NAR a listing describes is as long as Nix's.
        assert_eq!(listing.nar_size(), info.nar_size, "{}", info.store_path);
        assert_eq!(listing.nar_size(), nar.len() as u64);
    }
}

/// A directory may claim any file sizes (a gRPC client writes them): sizes
/// that add up past a `u64` make the layout and the listing fail, not
/// wrap around or panic.
#[tokio::test]
async fn file_sizes_that_overflow_are_an_error() {
    use lazystore_castore::{Directory, DirectoryService, PathComponent};
    let file = |size: u64| Node::File {
        digest: lazystore_castore::Digest::of(b"never read"),
        size,
        executable: false,
    };
    let directories = MemoryDirectoryService::new();
    let mut dir = Directory::new();
    for name in ["a", "b"] {
        dir.add(PathComponent::try_from(name).unwrap(), file(u64::MAX / 2))
            .unwrap();
    }
    let root = Node::directory(&dir);
    directories.put(dir).await.unwrap();
    for root in [root, file(u64::MAX - 8)] {
        let layout = nar_layout(&directories, &root).await;
        assert!(
            matches!(layout, Err(RenderError::TooLarge)),
            "{:?}",
            layout.map(|l| l.size())
        );
        let listing = nar_listing(&directories, &root).await;
        assert!(matches!(listing, Err(RenderError::TooLarge)), "{listing:?}");
    }
}
