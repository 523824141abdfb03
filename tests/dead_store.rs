//! Commands against a grpc+ store where no server listens fail in seconds
//! with a message naming the URL; they used to wait out a 30 s retry
//! deadline (`import`), or mount as if all were well and fail every read
//! later (`mount`).

use std::process::Command;
use std::time::{Duration, Instant};

const LAZYSTORE: &str = env!("CARGO_BIN_EXE_lazystore");

/// A grpc+http URL on 127.0.0.1 where nothing listens: a port just bound
/// and released.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("grpc+http://{addr}")
}

/// Runs lazystore with `args`; its stderr and how long it took.
fn fails(args: &[&str]) -> (String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(LAZYSTORE)
        .args(args)
        .env("LAZYSTORE_DIR", dir.path())
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(!out.status.success(), "lazystore {args:?} succeeded");
    (String::from_utf8_lossy(&out.stderr).into_owned(), took)
}

#[test]
fn mount_and_import_fail_fast_naming_the_address() {
    let url = dead_url();
    let dir = tempfile::tempdir().unwrap();
    let mountpoint = dir.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let mount = ["mount", mountpoint.to_str().unwrap(), "--store", &url];
    let import = [
        "import",
        "--store",
        &url,
        "--from",
        "file:///nonexistent",
        "/nix/store/4kwjrglaqmx137vy2alkjazg3qaakddl-a",
    ];
    let nix_db = [
        "nix-db",
        "--store",
        &url,
        "/nix/store/4kwjrglaqmx137vy2alkjazg3qaakddl-a",
    ];
    for args in [&mount[..], &import[..], &nix_db[..]] {
        let (stderr, took) = fails(args);
        assert!(
            stderr.contains(&url) && stderr.contains("no lazystore serve answers"),
            "{args:?}: {stderr}"
        );
        assert!(took < Duration::from_secs(9), "{args:?} took {took:?}");
    }
    // The mount left nothing mounted.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(mountpoint.to_str().unwrap()), "{mounts}");
}
