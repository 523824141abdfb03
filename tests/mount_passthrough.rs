//! FUSE passthrough from the local cache (`mount --passthrough`; off by
//! default): a file of 256 KiB or more whose
//! chunks are all cached once a reader is done is written out whole, and later
//! opens read that plain file through the kernel — the same bytes, a
//! program runs from it (mmap), and `--no-passthrough` keeps every read
//! going through the chunks.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lazystore_castore::Digest;
use lazystore_testkit::{add_tree, noise};

mod common;

use common::{Mount, serve, stats};

/// Waits (at most 30 s) until the mount's counter `name` reaches `at_least`.
fn wait_for(mountpoint: &Path, name: &str, at_least: u64) {
    let started = Instant::now();
    loop {
        let s = stats(mountpoint);
        if s[name] >= at_least {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{name} stayed below {at_least}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn whole_cached_files_are_read_by_passthrough() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("pt");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    let data = noise(3 << 20, 7);
    std::fs::write(tree.join("data.bin"), &data).unwrap();
    // A real program over 256 KiB: run from the mount, it is mapped.
    let bash = std::fs::read("/usr/bin/bash").unwrap();
    assert!(bash.len() >= 256 << 10);
    std::fs::write(tree.join("bin/bash"), &bash).unwrap();
    std::fs::set_permissions(tree.join("bin/bash"), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(tree.join("small.txt"), b"small\n").unwrap();
    let path = add_tree(&tree);
    std::fs::remove_dir_all(&tree).unwrap();

    let store_url = format!("redb://{}/store.redb", work.path().display());
    common::ingest(&store_url, &[&path]);
    let (_server, url) = serve(&store_url, "127.0.0.1:0");
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let cache = format!("redb://{}/cache.redb", work.path().display());
    let files_dir = work.path().join("cache.files");
    let base = path.strip_prefix("/nix/store/").unwrap();

    let mount = Mount::start(&mountpoint, &url, &cache, &["--passthrough"]);
    let root = mount.path.join(base);
    let run_bash = || {
        let out = Command::new(root.join("bin/bash"))
            .args(["-c", "echo ran"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(out.stdout, b"ran\n");
    };
    assert_eq!(
        stats(&mount.path)["passthrough"],
        1,
        "the kernel did not offer FUSE passthrough (Linux 6.9+ built with \
         CONFIG_FUSE_PASSTHROUGH, and root, are needed)"
    );
    // First reads fetch the chunks into the cache; once they are done,
    // the files are written out, in the background.
    assert_eq!(std::fs::read(root.join("data.bin")).unwrap(), data);
    run_bash();
    assert_eq!(std::fs::read(root.join("small.txt")).unwrap(), b"small\n");
    wait_for(&mount.path, "files_written", 2);
    let s = stats(&mount.path);
    assert_eq!(s["passthrough_opens"], 0, "{s:?}");
    for kept in [&data, &bash] {
        let file = files_dir.join(Digest::of(kept).to_string());
        assert_eq!(&std::fs::read(&file).unwrap(), kept, "{}", file.display());
    }
    // Smaller files are not written out.
    assert!(!files_dir.join(Digest::of(b"small\n").to_string()).exists());

    // From now on the kernel reads the plain files.
    assert_eq!(std::fs::read(root.join("data.bin")).unwrap(), data);
    run_bash();
    let s = stats(&mount.path);
    assert!(s["passthrough_opens"] >= 2, "{s:?}");
    mount.stop();

    // Kept across mounts; and with --no-passthrough nothing is read from
    // them or written.
    let mount = Mount::start(&mountpoint, &url, &cache, &["--no-passthrough"]);
    let root = mount.path.join(base);
    for _ in 0..2 {
        assert_eq!(std::fs::read(root.join("data.bin")).unwrap(), data);
    }
    let s = stats(&mount.path);
    assert_eq!(
        (s["passthrough_opens"], s["files_written"]),
        (0, 0),
        "{s:?}"
    );
    mount.stop();

    let mount = Mount::start(&mountpoint, &url, &cache, &["--passthrough"]);
    let root = mount.path.join(base);
    assert_eq!(std::fs::read(root.join("data.bin")).unwrap(), data);
    let s = stats(&mount.path);
    assert_eq!(
        (s["passthrough_opens"], s["files_written"]),
        (1, 0),
        "{s:?}"
    );
    mount.stop();
}
