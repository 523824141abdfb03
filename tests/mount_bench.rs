//! Benchmark, run by hand (`cargo test --test mount_bench -- --ignored
//! --nocapture`): the mount against the native filesystem on the same
//! files: warm sequential read, cold read from the local cache, a warm
//! metadata walk, `nix hash path` warm, first-byte latency of a cold file
//! through a remote store, and the mount's RSS while a 1 GiB path is read.
//! Prints a markdown table.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lazystore_testkit::{add_tree, nix_cmd, noise};

mod common;

const LAZYSTORE: &str = env!("CARGO_BIN_EXE_lazystore");

fn import(url: &str, paths: &[&str]) {
    common::ingest(url, paths);
}

struct Proc(Child, String);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn start(args: &[&str]) -> Proc {
    let mut child = Command::new(LAZYSTORE)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(!line.is_empty(), "lazystore {args:?} failed");
    Proc(child, line.trim().to_owned())
}

/// Drops `path`'s pages from the page cache, so the next read is from disk.
fn evict(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: fadvise on an open descriptor we own.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise({})", path.display());
}

fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// The mount's counter `name`.
fn stat_counter(mountpoint: &Path, name: &str) -> u64 {
    std::fs::read_to_string(mountpoint.join(".lazystore/stats"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no counter {name}"))
}

fn read_file(p: &Path) -> u64 {
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            return n;
        }
        n += k as u64;
    }
}

fn walk(p: &Path) {
    let out = Command::new("find")
        .arg(p)
        .args(["-type", "f", "-exec", "stat", "--format=%s", "{}", "+"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(out.success());
}

fn hash(p: &Path) -> String {
    nix_cmd([
        "nix".as_ref(),
        "hash".as_ref(),
        "path".as_ref(),
        "--type".as_ref(),
        "sha256".as_ref(),
        p.as_os_str(),
    ])
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .map(|v| v.trim().trim_end_matches(" kB").parse().unwrap())
        .unwrap_or(0)
}

/// The peak RSS of `pid` until it exits (at most a minute), in KiB.
fn sample_rss(pid: u32) -> u64 {
    let mut peak = 0;
    for _ in 0..600 {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(100));
        if std::fs::metadata(format!("/proc/{pid}/status")).is_err() {
            break;
        }
    }
    peak
}

fn python_tree(to: &Path) {
    let home = std::env::var("HOME").unwrap();
    let from = PathBuf::from(home).join(".pyenv/versions/3.11.7");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "set -e; mkdir -p {to}; cp -r {from}/bin {from}/include {to}/; \
             tar -C {from} -c --exclude=__pycache__ --exclude=site-packages lib | tar -C {to} -x",
            from = from.display(),
            to = to.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
#[ignore = "a benchmark: run by hand"]
fn mount_against_native() {
    let work = tempfile::tempdir().unwrap();
    let big_dir = work.path().join("big");
    std::fs::create_dir_all(&big_dir).unwrap();
    let big_file = big_dir.join("data.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&big_file).unwrap();
        for i in 0..16 {
            f.write_all(&noise(64 << 20, i)).unwrap();
        }
    }
    std::fs::set_permissions(&big_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let big = add_tree(&big_dir);
    std::fs::remove_dir_all(&big_dir).unwrap();
    let py_dir = work.path().join("python");
    python_tree(&py_dir);
    let py = add_tree(&py_dir);
    std::fs::remove_dir_all(&py_dir).unwrap();
    let store_url = format!("redb://{}/store.redb", work.path().display());
    let t = Instant::now();
    import(&store_url, &[&big, &py]);
    eprintln!("imported in {:?}", t.elapsed());

    let server = start(&["serve", "--listen", "127.0.0.1:0", "--store", &store_url]);
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let cache = format!("redb://{}/cache.redb", work.path().display());
    let base = |p: &str| p.strip_prefix("/nix/store/").unwrap().to_owned();
    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    let ratio = |native: Duration, fuse: Duration| {
        format!("{:.2}×", native.as_secs_f64() / fuse.as_secs_f64())
    };

    // 0. Through the remote with no local cache: the mount's own RSS.
    let mount = start(&[
        "mount",
        mnt.to_str().unwrap(),
        "--store",
        &server.1,
        "--cache",
        "none",
    ]);
    let m = PathBuf::from(&mount.1);
    let pid = mount.0.id();
    let sampler = std::thread::spawn(move || sample_rss(pid));
    read_file(&m.join(base(&big)).join("data.bin"));
    drop(mount);
    let peak_no_cache = sampler.join().unwrap();

    // A mount through the server with the local cache, with or without
    // passthrough, and where it is mounted.
    let mount_cached = |passthrough: bool| {
        let mut args = vec![
            "mount",
            mnt.to_str().unwrap(),
            "--store",
            &server.1,
            "--cache",
            &cache,
        ];
        if passthrough {
            args.push("--passthrough");
        }
        let mount = start(&args);
        let m = PathBuf::from(&mount.1);
        (mount, m)
    };
    // 1. Through the remote, empty cache: first byte, then a cold read
    //    filling the cache, with the mount's RSS sampled.
    let (mount, m) = mount_cached(true);
    let first_byte = time(|| {
        let mut f = std::fs::File::open(m.join(base(&py)).join("bin/python3.11")).unwrap();
        let mut b = [0u8; 1];
        f.read_exact(&mut b).unwrap();
    });
    let pid = mount.0.id();
    let sampler = std::thread::spawn(move || sample_rss(pid));
    let remote_read = time(|| {
        read_file(&m.join(base(&big)).join("data.bin"));
    });
    // Once the reader is done, the mount writes the file out whole for
    // passthrough (counted in the RSS too).
    let started = Instant::now();
    while stat_counter(&m, "files_written") < 1 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not written out"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let write_out = started.elapsed();
    drop(mount);
    let peak = sampler.join().unwrap();

    // 2. New mounts on the now full cache: cold for the kernel, local for
    //    the data; then warm. First every read through the chunks
    //    (the default), then by passthrough from the written-out file.
    let big_n = PathBuf::from(&big).join("data.bin");
    let evict_cache = || {
        evict(&work.path().join("cache.redb"));
        for dir in ["cache.packs", "cache.files"] {
            for file in std::fs::read_dir(work.path().join(dir)).unwrap() {
                evict(&file.unwrap().path());
            }
        }
    };
    for passthrough in [false, true] {
        let (mount, m) = mount_cached(passthrough);
        let big_m = m.join(base(&big)).join("data.bin");
        // Cold: the file (native) and the local cache's files (mount)
        // dropped from the page cache; the mount is new, so the kernel has
        // none of its pages either.
        evict(&big_n);
        let native_cold = time(|| {
            read_file(&big_n);
        });
        let native_warm = time(|| {
            read_file(&big_n);
        });
        evict_cache();
        let cold_local = time(|| {
            read_file(&big_m);
        });
        let fuse_warm = time(|| {
            read_file(&big_m);
        });
        let how = if passthrough {
            "by passthrough (--passthrough)"
        } else {
            "through the chunks (the default)"
        };
        rows.push((
            format!("sequential read, 1 GiB, warm, {how}"),
            format!("{native_warm:.2?}"),
            format!("{fuse_warm:.2?}"),
            ratio(native_warm, fuse_warm),
        ));
        rows.push((
            format!(
                "sequential read, 1 GiB, cold (native: from disk; mount: from the local cache on disk), {how}"
            ),
            format!("{native_cold:.2?}"),
            format!("{cold_local:.2?}"),
            ratio(native_cold, cold_local),
        ));
        if passthrough {
            assert!(stat_counter(&m, "passthrough_opens") >= 2);
        }
        drop(mount);
    }
    rows.push((
        "sequential read, 1 GiB, first read through the remote (loopback)".into(),
        "".into(),
        format!("{remote_read:.2?}"),
        "".into(),
    ));

    let py_n = PathBuf::from(&py);
    for passthrough in [true, false] {
        let (mount, m) = mount_cached(passthrough);
        let how = if passthrough {
            "--passthrough"
        } else {
            "default"
        };
        let py_m = m.join(base(&py));
        // Warm: read once, and let the files of 256 KiB or more be written
        // out for passthrough before timing.
        hash(&py_m);
        let mut written = stat_counter(&m, "files_written");
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = stat_counter(&m, "files_written");
            if now == written {
                break;
            }
            written = now;
        }
        walk(&py_n);
        let walk_n = time(|| walk(&py_n));
        let walk_m = time(|| walk(&py_m));
        rows.push((
            format!("find -type f + stat, Python tree, warm, {how}"),
            format!("{walk_n:.2?}"),
            format!("{walk_m:.2?}"),
            ratio(walk_n, walk_m),
        ));
        hash(&py_n);
        let hash_n = time(|| {
            hash(&py_n);
        });
        let hash_m = time(|| {
            hash(&py_m);
        });
        rows.push((
            format!("nix hash path, Python tree, warm, {how}"),
            format!("{hash_n:.2?}"),
            format!("{hash_m:.2?}"),
            ratio(hash_n, hash_m),
        ));
        hash(&PathBuf::from(&big));
        hash(&m.join(base(&big)));
        let bh_n = time(|| {
            hash(&PathBuf::from(&big));
        });
        let bh_m = time(|| {
            hash(&m.join(base(&big)));
        });
        rows.push((
            format!("nix hash path, 1 GiB path, warm, {how}"),
            format!("{bh_n:.2?}"),
            format!("{bh_m:.2?}"),
            ratio(bh_n, bh_m),
        ));
        drop(mount);
    }
    let files = Command::new("find")
        .arg(&py_n)
        .args(["-type", "f"])
        .output()
        .unwrap();
    let files = files.stdout.iter().filter(|&&b| b == b'\n').count();
    drop(server);

    println!("\n| workload | native | lazystore mount | native/mount |");
    println!("|---|---|---|---|");
    for (w, n, f, r) in rows {
        println!("| {w} | {n} | {f} | {r} |");
    }
    println!(
        "\nfirst byte of a cold file through `lazystore serve` on loopback: {:.1} ms",
        first_byte.as_secs_f64() * 1000.0
    );
    println!(
        "mount RSS peak while reading the 1 GiB path through the remote: {} MiB with no local \
         cache, {} MiB filling the local cache and writing the file out",
        peak_no_cache / 1024,
        peak / 1024
    );
    println!(
        "writing the 1 GiB file out for passthrough after its first read: {:.2} s",
        write_out.as_secs_f64()
    );
    println!("Python tree: {files} files");
    let _ = std::fs::remove_dir_all(work.path().join("mnt"));
}
