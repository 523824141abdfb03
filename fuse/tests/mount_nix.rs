//! Real mounts of store paths made with real Nix: `nix hash path` over the
//! mount gives Nix's NarHash and `diff -r` finds no difference, for every
//! NAR feature and a path over 100 MB; attributes are Nix's canonical ones;
//! programs run from the mount.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use common::{TestMount, diff_trees, import, nix_hash_path};
use lazystore_fuse::FsOptions;
use lazystore_pathinfo::{Store, nixbase32};
use lazystore_testkit::noise;
use lazystore_testkit::{add_tree, build_closure};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn write(path: &Path, bytes: &[u8], executable: bool) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
    let mode = if executable { 0o755 } else { 0o644 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with every NAR feature: regular, executable and empty files,
/// empty and deep directories, relative, absolute, dangling and directory
/// symlinks, odd names, sizes around the chunker's boundaries, compressible
/// and repeated contents, many small files.
fn feature_tree(root: &Path) {
    let script = b"#!/bin/sh\necho \"hello from $0\"\n";
    write(&root.join("bin/run.sh"), script, true);
    write(&root.join("bin/same-not-exec"), script, false);
    write(&root.join("empty"), b"", false);
    write(&root.join("empty-exec"), b"", true);
    fs::create_dir_all(root.join("emptydir")).unwrap();
    write(&root.join("a/b/c/d/e/f/g/deep.txt"), b"deep\n", false);
    symlink("bin/run.sh", root.join("rel-link")).unwrap();
    symlink(
        "/nix/store/00000000000000000000000000000000-absent",
        root.join("abs-link"),
    )
    .unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();
    symlink("a/b", root.join("dir-link")).unwrap();
    for name in [
        "with space",
        "ünïcödé",
        "-dash",
        ".hidden",
        "back\\slash",
        "x=y+z?",
    ] {
        write(&root.join("names").join(name), name.as_bytes(), false);
    }
    write(
        &root.join("names").join("l".repeat(255)),
        b"long name\n",
        false,
    );
    for (i, size) in [
        1usize,
        16383,
        16384,
        16385,
        65536,
        262143,
        262144,
        262145,
        1 << 20,
    ]
    .into_iter()
    .enumerate()
    {
        write(
            &root.join(format!("sizes/{size}")),
            &noise(size, i as u64 + 100),
            false,
        );
    }
    write(&root.join("zeros"), &vec![0u8; 5 << 20], false);
    let block = noise(300_000, 9);
    write(&root.join("repeated"), &block.repeat(4), false);
    for i in 0..300 {
        write(
            &root.join(format!("many/{i:03}")),
            format!("file {i}\n").as_bytes(),
            i % 7 == 0,
        );
    }
}

fn getxattr(path: &Path, name: &str) -> String {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of the given size.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(n >= 0, "getxattr: {}", std::io::Error::last_os_error());
    buf.truncate(n as usize);
    String::from_utf8(buf).unwrap()
}

fn stat_mode(p: &Path) -> (u32, u32, u32, i64, u64) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.mode() & 0o7777, m.uid(), m.gid(), m.mtime(), m.nlink())
}

#[test]
fn nix_sees_the_same_store_paths_through_the_mount() {
    let work = tempfile::tempdir().unwrap();
    let closure = build_closure();
    let tree = work.path().join("features");
    feature_tree(&tree);
    let features = add_tree(&tree);
    let single = work.path().join("single-file");
    write(&single, b"#!/bin/sh\necho single\n", true);
    let single = add_tree(&single);
    let link = work.path().join("just-a-link");
    symlink("/nix/store/00000000000000000000000000000000-target", &link).unwrap();
    let link = add_tree(&link);
    // Over 100 MB, made fast: incompressible noise and a repeat of it.
    let big = work.path().join("big");
    write(&big.join("noise.bin"), &noise(96 << 20, 42), false);
    write(&big.join("tail.bin"), &noise(8 << 20, 43), true);
    let big = add_tree(&big);
    let _ = fs::remove_dir_all(work.path().join("big"));

    let mut paths: Vec<String> = closure.paths().iter().map(|p| p.to_string()).collect();
    paths.extend([features.clone(), single.clone(), link.clone(), big.clone()]);

    let runtime = runtime();
    let store = Store::memory();
    let started = std::time::Instant::now();
    let infos: Vec<_> = runtime.block_on(async {
        let mut infos = Vec::new();
        for p in &paths {
            infos.push(import(&store, p).await);
        }
        infos
    });
    eprintln!("imported {} paths in {:?}", infos.len(), started.elapsed());
    let mount = TestMount::new(runtime, store, FsOptions::default());

    for (p, info) in paths.iter().zip(&infos) {
        let started = std::time::Instant::now();
        let through = mount.join(p);
        assert_eq!(
            nix_hash_path(&through),
            nixbase32::encode(&info.nar_sha256),
            "nix hash path of {}",
            through.display()
        );
        diff_trees(Path::new(p), &through);
        eprintln!("{p}: hash and diff in {:?}", started.elapsed());
    }

    // Nix's canonical attributes.
    let f = mount.join(&features);
    assert_eq!(stat_mode(&f.join("bin/run.sh")), (0o555, 0, 0, 1, 1));
    assert_eq!(stat_mode(&f.join("bin/same-not-exec")), (0o444, 0, 0, 1, 1));
    assert_eq!(stat_mode(&f.join("empty-exec")).0, 0o555);
    assert_eq!(stat_mode(&f.join("emptydir")), (0o555, 0, 0, 1, 2));
    // bin, emptydir, a, names, sizes, many.
    assert_eq!(stat_mode(&f).4, 2 + 6, "2 + subdirectories");
    let m = fs::metadata(f.join("sizes/262145")).unwrap();
    assert_eq!((m.len(), m.blocks()), (262145, 262145u64.div_ceil(512)));
    assert_eq!(
        fs::read_link(f.join("dangling")).unwrap(),
        Path::new("does/not/exist")
    );
    assert_eq!(stat_mode(&mount.join(&single)).0, 0o555);

    // Read-only everywhere.
    let err = fs::write(f.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = fs::OpenOptions::new()
        .write(true)
        .open(f.join("empty"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = fs::create_dir(f.join("d")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    // The root is not listable without --list-root; lookups work.
    let err = fs::read_dir(mount.path())
        .and_then(|mut d| d.next().transpose())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    let hash = &features["/nix/store/".len()..][..32];
    assert!(!mount.path().join(format!("{hash}-other-name")).exists());

    // A shell script runs from the mount, and so does a single-file path.
    let out = Command::new(mount.join(&closure.c).join("bin/hi"))
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"hi\n");
    let out = Command::new(mount.join(&single)).output().unwrap();
    assert_eq!(out.stdout, b"single\n");

    // The digest xattr.
    let expected = lazystore_castore::Digest::of(&vec![0u8; 5 << 20]).to_string();
    assert_eq!(
        getxattr(&f.join("zeros"), lazystore_fuse::DIGEST_XATTR),
        expected
    );

    // The counters, through the stats file, and it changes as reads happen.
    let before = mount.stats();
    assert!(before.bytes_read >= 104 << 20, "{before:?}");
    assert!(before.chunks_fetched > 0 && before.lookups > 0);
    fs::read(f.join("sizes/1048576")).unwrap();
    let after = mount.stats();
    assert!(after.reads > before.reads, "{before:?} then {after:?}");
}
