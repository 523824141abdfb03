//! The service killed (SIGKILL) and restarted ten times while 32 readers
//! read through a builder's mount: no reader ever gets a wrong byte (each
//! file compared with the original), every error a reader sees is EIO,
//! comes only once the `read(2)` has waited out its --retry-deadline (or
//! the service has been down that long: a read joining a fetch under way
//! fails with it) and no later than 1.5 s past that deadline, counted from
//! the read's start or the outage's, whichever came later — a reader reading again
//! a file it just failed to read fails at once
//! (`fuse/src/failed_reads.rs`); after each restart the mount serves again. Outages alternate
//! between shorter than the deadline (readers ride through them) and
//! longer (readers get EIO).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Mount, serve};
use lazystore_testkit::{add_tree, noise};

const READERS: usize = 32;
const RESTARTS: usize = 10;
/// 64 files of 2 MiB: twice the chunks the mount keeps in memory, so
/// most reads need the service.
const FILES: usize = 64;
const DEADLINE: Duration = Duration::from_secs(3);

/// The whole file, read through the mount in 1 MiB `read(2)`s, or the
/// error of the one that failed and how long that one took. Its pages are
/// dropped from the kernel's cache afterwards (the mount lets the kernel
/// keep them), so the next read of it asks the mount again.
fn read_uncached(path: &Path) -> Result<Vec<u8>, (std::io::Error, Duration)> {
    use std::io::Read as _;
    use std::os::fd::AsRawFd as _;
    let mut file = std::fs::File::open(path).map_err(|e| (e, Duration::ZERO))?;
    let mut bytes = Vec::new();
    let mut buf = vec![0; 1 << 20];
    let result = loop {
        let started = Instant::now();
        match file.read(&mut buf) {
            Ok(0) => break Ok(bytes),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) => break Err((e, started.elapsed())),
        }
    };
    // SAFETY: an advice call on a file descriptor we hold open.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    result
}

/// What the readers saw.
struct Seen {
    reads: AtomicUsize,
    /// EIO after the deadline.
    errors: AtomicUsize,
    /// EIO at once, reading again a file that just failed.
    failed_again: AtomicUsize,
    /// The longest and shortest waits for an EIO, in milliseconds.
    slowest_error: AtomicUsize,
    fastest_error: AtomicUsize,
    /// When the service was last killed.
    killed: std::sync::Mutex<Instant>,
}

/// Reads files at random until `stop`, checking every byte; panics (so the
/// test fails) on a wrong byte, an error other than EIO, or an EIO before
/// the deadline or long after it.
fn reader(
    root: PathBuf,
    files: Arc<Vec<Vec<u8>>>,
    seed: usize,
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
) {
    let mut n = seed;
    let mut last_failure = None;
    while !stop.load(Ordering::Relaxed) {
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let i = (n >> 33) % files.len();
        match read_uncached(&root.join(format!("f{i:02}"))) {
            Ok(got) => {
                assert!(got == files[i], "f{i:02}: wrong bytes");
                seen.reads.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, waited)) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "f{i:02}: {e}");
                // At once only for a file this reader just failed to read
                // (the mount's FAILED_READ_MEMORY).
                let again = last_failure.is_some_and(|(file, at): (usize, Instant)| {
                    file == i && at.elapsed() < Duration::from_secs(1) + waited
                });
                if again {
                    seen.failed_again.fetch_add(1, Ordering::Relaxed);
                } else {
                    // Only once the read has waited out its deadline, or
                    // a fetch it joined has (a fetch under way when the
                    // service was killed, loaded by 32 readers on 2
                    // cores, may have started up to a second before).
                    let down = seen.killed.lock().unwrap().elapsed();
                    assert!(
                        waited >= DEADLINE || down >= DEADLINE - Duration::from_secs(1),
                        "f{i:02}: EIO after {waited:?}, {down:?} into an outage"
                    );
                    // And soon after the deadline, counted from when the
                    // read or the outage began, whichever was later: a
                    // read under way (slow under this load) when the
                    // service was killed has waited before the outage too.
                    assert!(
                        waited.min(down) <= DEADLINE + Duration::from_millis(1500),
                        "f{i:02}: EIO after {waited:?}, {down:?} into an outage; the deadline is {DEADLINE:?}"
                    );
                    seen.errors.fetch_add(1, Ordering::Relaxed);
                    let ms = waited.as_millis() as usize;
                    seen.slowest_error.fetch_max(ms, Ordering::Relaxed);
                    seen.fastest_error.fetch_min(ms, Ordering::Relaxed);
                }
                last_failure = Some((i, Instant::now()));
            }
        }
    }
}

/// Waits until a whole file reads back right through the mount.
fn serves_again(root: &Path, files: &[Vec<u8>]) -> Duration {
    let started = Instant::now();
    loop {
        if read_uncached(&root.join("f00")).is_ok_and(|got| got == files[0]) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the mount does not serve again after a restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn killed_and_restarted_ten_times_under_32_readers() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("files");
    std::fs::create_dir(&tree).unwrap();
    let files: Vec<Vec<u8>> = (0..FILES as u64).map(|i| noise(2 << 20, 500 + i)).collect();
    for (i, f) in files.iter().enumerate() {
        std::fs::write(tree.join(format!("f{i:02}")), f).unwrap();
    }
    let path = add_tree(&tree);
    let store = format!("redb://{}/store.redb", work.path().display());
    common::ingest(&store, &[&path]);

    let (server, url) = serve(&store, "127.0.0.1:0");
    let listen = url.strip_prefix("grpc+http://").unwrap().to_owned();
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    // No local cache and no passthrough: a read goes to the service unless
    // its chunks are among the 64 MiB the mount keeps in memory.
    let deadline = DEADLINE.as_secs().to_string();
    let mount = Mount::start(
        &mountpoint,
        &url,
        "none",
        &["--retry-deadline", &deadline, "--no-passthrough"],
    );
    let root = mount.path.join(path.strip_prefix("/nix/store/").unwrap());

    let files = Arc::new(files);
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen {
        reads: AtomicUsize::new(0),
        errors: AtomicUsize::new(0),
        failed_again: AtomicUsize::new(0),
        slowest_error: AtomicUsize::new(0),
        fastest_error: AtomicUsize::new(usize::MAX),
        killed: std::sync::Mutex::new(Instant::now()),
    });
    let readers: Vec<_> = (0..READERS)
        .map(|seed| {
            let (root, files, stop, seen) =
                (root.clone(), files.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || reader(root, files, seed, stop, seen))
        })
        .collect();

    let mut server = Some(server);
    for restart in 0..RESTARTS {
        std::thread::sleep(Duration::from_millis(700));
        // Killed, not stopped: connections die mid-stream.
        drop(server.take());
        *seen.killed.lock().unwrap() = Instant::now();
        let down = if restart % 2 == 1 {
            DEADLINE + Duration::from_secs(2)
        } else {
            DEADLINE / 3
        };
        std::thread::sleep(down);
        let (restarted, again) = serve(&store, &listen);
        assert_eq!(again, url);
        server = Some(restarted);
        let back = serves_again(&root, &files);
        eprintln!("restart {restart}: down {down:?}, serving again {back:?} after it came back");
        if readers.iter().any(|r| r.is_finished()) {
            break;
        }
    }
    if readers.iter().any(|r| r.is_finished()) {
        stop.store(true, Ordering::Relaxed);
        panic!(
            "a reader failed (see its panic); the mount's log:\n{}",
            mount.stop()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join()
            .expect("a reader saw a wrong byte or a wrong error");
    }
    let (reads, errors) = (
        seen.reads.load(Ordering::Relaxed),
        seen.errors.load(Ordering::Relaxed),
    );
    eprintln!(
        "{reads} whole files read right; {errors} EIO (read(2) waited {} to {} ms), \
         {} at once on a file that had just failed",
        seen.fastest_error.load(Ordering::Relaxed),
        seen.slowest_error.load(Ordering::Relaxed),
        seen.failed_again.load(Ordering::Relaxed)
    );
    // The long outages did make readers wait out their deadline, and most
    // reads went through. How many reads fit between outages depends on
    // the machine's speed, the errors do not (each reader fails about once
    // per long outage): 734 reads against 82 errors on a slow day of the
    // 2-core development VM, so the bound is four to one.
    assert!(errors > 0, "no outage outlasted a read's deadline");
    assert!(reads > 4 * errors, "{reads} reads, {errors} errors");
    let log = mount.stop();
    assert!(!log.contains("panicked"), "{log}");
}
