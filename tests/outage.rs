//! A mount with `--retry-deadline 5` over a service that is then killed:
//! a read of a file not yet cached fails with EIO within 6 s, a lookup of
//! a path not yet seen with ENOENT or EIO within 6 s; with the service
//! restarted on the same port the same reads succeed with the right
//! bytes, and the outage is in the mount's log (when it began and when it
//! ended) and in its `outages` counter.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Mount, serve, stats};
use lazystore_testkit::{add_tree, noise};

const LIMIT: Duration = Duration::from_secs(6);

/// Retries `f` for up to 20 s (a read that just failed fails again at once
/// until none has for a second, and the client reconnects with backoff).
fn eventually<T>(what: &str, mut f: impl FnMut() -> std::io::Result<T>) -> T {
    let started = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if started.elapsed() < Duration::from_secs(20) => {
                eprintln!("{what}: {e}; again");
                // Past the mount's memory of the failure (FAILED_READ_MEMORY,
                // renewed by every read that fails within it).
                std::thread::sleep(Duration::from_millis(1100));
            }
            Err(e) => panic!("{what} still fails after 20 s: {e}"),
        }
    }
}

fn tree(work: &Path, name: &str, seed: u64) -> (String, Vec<u8>) {
    let dir = work.join(name);
    std::fs::create_dir(&dir).unwrap();
    let bytes = noise(1 << 20, seed);
    std::fs::write(dir.join("f"), &bytes).unwrap();
    (add_tree(&dir), bytes)
}

#[test]
fn reads_and_lookups_fail_within_the_deadline_and_recover() {
    let work = tempfile::tempdir().unwrap();
    let (seen, seen_bytes) = tree(work.path(), "outage-seen", 71);
    let (unseen, unseen_bytes) = tree(work.path(), "outage-unseen", 72);
    let store = format!("redb://{}/store.redb", work.path().display());
    common::ingest(&store, &[&seen, &unseen]);

    let (server, url) = serve(&store, "127.0.0.1:0");
    let listen = url.strip_prefix("grpc+http://").unwrap().to_owned();
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let mount = Mount::start(
        &mountpoint,
        &url,
        "none",
        &["--retry-deadline", "5", "--no-passthrough"],
    );
    let file = mount
        .path
        .join(seen.strip_prefix("/nix/store/").unwrap())
        .join("f");
    let other = mount.path.join(unseen.strip_prefix("/nix/store/").unwrap());
    // Looked up, not read: its chunks are fetched by the read below.
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 1 << 20);

    drop(server);
    let started = Instant::now();
    let err = std::fs::read(&file).unwrap_err();
    let read_took = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(read_took <= LIMIT, "the read failed after {read_took:?}");

    let started = Instant::now();
    let err = std::fs::metadata(&other).unwrap_err();
    let lookup_took = started.elapsed();
    assert!(
        matches!(err.raw_os_error(), Some(libc::ENOENT | libc::EIO)),
        "{err}"
    );
    assert!(
        lookup_took <= LIMIT,
        "the lookup failed after {lookup_took:?}"
    );
    eprintln!(
        "with the service down: read EIO after {read_took:?}, lookup {err} after {lookup_took:?}"
    );

    let (_server, again) = serve(&store, &listen);
    assert_eq!(again, url);
    let got = eventually("reading the file again", || std::fs::read(&file));
    assert!(got == seen_bytes, "wrong bytes after the restart");
    let got = eventually("reading the other path", || std::fs::read(other.join("f")));
    assert!(got == unseen_bytes, "wrong bytes after the restart");

    let s = stats(&mount.path);
    assert!(s["outages"] >= 1, "{s:?}");
    assert!(s["outage_failed_calls"] >= 1, "{s:?}");
    let log = mount.stop();
    assert!(log.contains(&format!("{url}: not answering")), "{log}");
    assert!(
        log.contains(&format!("{url}: answering again after")),
        "{log}"
    );
    assert!(log.contains("outages="), "{log}");
}
