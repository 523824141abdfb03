//! Access traces and prefetch, with the real binary: a mount given
//! `--trace-dir` records the files a session (a build: Nix starts each
//! in a session of its own) reads, once each, in order; `lazystore
//! prefetch` of that trace fills a fresh local cache with exactly those
//! files, so a mount over that cache reads them without asking the
//! service for a chunk, and asks it for a file the trace does not name;
//! a mount given `--prefetch TRACE` fetches the trace's files once its
//! first is read, and reading them after asks for nothing more.
//!
//! Shared traces: a mount given `--share-traces` puts the trace of a build
//! (a session whose builder was given `out`) into the service under the
//! build's name; another mount, with `--prefetch-shared` and an empty
//! cache, prefetches it when the next version's build starts reading.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Mount, lazystore, serve, stats};
use lazystore_testkit::{add_tree, noise};

/// Reads `files` in one new session, as a build would.
fn read_in_a_session(files: &[PathBuf]) {
    read_in_a_build(files, None)
}

/// Reads `files` in one new session whose leader was given `out` (a Nix
/// build of that output), if any.
fn read_in_a_build(files: &[PathBuf], out: Option<&str>) {
    let mut command = Command::new("setsid");
    if let Some(out) = out {
        command.env("out", out);
    }
    let status = command
        .arg("--wait")
        .arg("cat")
        .args(files)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "cat {files:?}");
}

/// The traces in `dir` that list files, read once they are written out.
fn traces(dir: &Path, at_least_lines: usize) -> Vec<(PathBuf, Vec<String>)> {
    let started = Instant::now();
    loop {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let lines: Vec<String> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            found.push((path, lines));
        }
        if found.iter().map(|(_, l)| l.len()).sum::<usize>() >= at_least_lines {
            return found;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "traces in {} stayed short: {found:?}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A tree of `used/f0…` (what the build reads) and `unused/f0…` (what it
/// does not), small and large files in turn, seeded by `seed`, as a store
/// path in a redb store in `w` served on 127.0.0.1: the server, its URL,
/// the path and every file's contents by its name in the path.
fn served_tree(
    w: &Path,
    used: u64,
    unused: u64,
    seed: u64,
) -> (common::Proc, String, String, Vec<(String, Vec<u8>)>) {
    let tree = w.join("tree");
    let mut contents = Vec::new();
    for (dir, n) in [("used", used), ("unused", unused)] {
        std::fs::create_dir_all(tree.join(dir)).unwrap();
        for i in 0..n {
            let size = if i % 2 == 0 { 5_000 + i } else { 400_000 + i };
            let data = noise(size as usize, seed + contents.len() as u64);
            std::fs::write(tree.join(dir).join(format!("f{i}")), &data).unwrap();
            contents.push((format!("{dir}/f{i}"), data));
        }
    }
    let path = add_tree(&tree);
    let store = format!("redb://{}/store.redb", w.display());
    common::ingest(&store, &[&path]);
    let (server, url) = serve(&store, "127.0.0.1:0");
    (server, url, path, contents)
}

#[test]
fn a_traced_build_s_files_are_prefetched_and_read_from_the_cache() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (server, url, path, contents) = served_tree(w, 6, 6, 7000);

    // A traced build.
    let trace_dir = w.join("traces");
    let mnt = w.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let first_cache = format!("redb://{}/first.redb", w.display());
    let mount = Mount::start(
        &mnt,
        &url,
        &first_cache,
        &["--trace-dir", trace_dir.to_str().unwrap()],
    );
    let inside = mount.path.join(path.strip_prefix("/nix/store/").unwrap());
    let read: Vec<&str> = vec![
        "used/f0", "used/f1", "used/f2", "used/f3", "used/f4", "used/f5",
    ];
    // Twice, backwards the second time: each file once in the trace, in
    // the order of its first read.
    let mut files: Vec<PathBuf> = read.iter().map(|r| inside.join(r)).collect();
    files.extend(read.iter().rev().map(|r| inside.join(r)));
    read_in_a_session(&files);
    let found = traces(&trace_dir, read.len());
    mount.stop();
    assert_eq!(found.len(), 1, "one session, one trace: {found:?}");
    let expected: Vec<String> = read.iter().map(|r| format!("{path}/{r}")).collect();
    assert_eq!(found[0].1, expected);

    // Prefetched into a fresh cache: those files, nothing else.
    let cache = format!("redb://{}/prefetched.redb", w.display());
    let out = lazystore(&[
        "prefetch",
        "--store",
        &url,
        "--cache",
        &cache,
        found[0].0.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(": 6 files, "), "{said}");
    assert!(said.contains("0 paths skipped"), "{said}");

    // A mount over it reads them without a chunk from the service.
    let mount = Mount::start(&mnt, &url, &cache, &["--no-passthrough"]);
    let inside = mount.path.join(path.strip_prefix("/nix/store/").unwrap());
    for (name, data) in &contents {
        if name.starts_with("used/") {
            assert!(&std::fs::read(inside.join(name)).unwrap() == data, "{name}");
        }
    }
    let s = stats(&mount.path);
    assert_eq!(s["remote_chunks"], 0, "{s:?}");
    let (name, data) = contents.iter().find(|(n, _)| n == "unused/f1").unwrap();
    assert!(&std::fs::read(inside.join(name)).unwrap() == data);
    let s = stats(&mount.path);
    assert!(s["remote_chunks"] > 0, "{s:?}");
    mount.stop();

    // A mount given the trace with a fresh cache: the first read of the
    // trace's first file fetches the rest in the background; reading
    // them after asks the service for nothing more.
    let cache = format!("redb://{}/third.redb", w.display());
    let mount = Mount::start(
        &mnt,
        &url,
        &cache,
        &[
            "--no-passthrough",
            "--prefetch",
            trace_dir.to_str().unwrap(),
        ],
    );
    let inside = mount.path.join(path.strip_prefix("/nix/store/").unwrap());
    assert!(std::fs::read(inside.join("used/f0")).unwrap() == contents[0].1);
    wait_prefetched(&mount.path, 6);
    let fetched = stats(&mount.path)["remote_chunks"];
    for (name, data) in &contents {
        if name.starts_with("used/") {
            assert!(&std::fs::read(inside.join(name)).unwrap() == data, "{name}");
        }
    }
    let s = stats(&mount.path);
    assert_eq!(s["remote_chunks"], fetched, "{s:?}");
    mount.stop();
    drop(server);
}

/// Waits until the mount at `mnt` counts `n` prefetched files.
fn wait_prefetched(mnt: &Path, n: u64) {
    let started = Instant::now();
    while stats(mnt)["prefetched_files"] < n {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            stats(mnt)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_shared_trace_is_prefetched_by_the_next_build_of_its_name() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (server, url, path, contents) = served_tree(w, 6, 4, 9000);
    let mnt = w.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let used: Vec<&(String, Vec<u8>)> = contents
        .iter()
        .filter(|(n, _)| n.starts_with("used/"))
        .collect();

    // A build of hello-2.12, traced and shared; and a session that is no
    // build, traced but not shared.
    let hash = "7rjj86a15146cq1d7sbfqbhb9ml0mbyl";
    let cache = format!("redb://{}/first.redb", w.display());
    let trace_dir = w.join("traces");
    let mount = Mount::start(
        &mnt,
        &url,
        &cache,
        &["--trace-dir", trace_dir.to_str().unwrap(), "--share-traces"],
    );
    let inside = mount.path.join(path.strip_prefix("/nix/store/").unwrap());
    let files: Vec<PathBuf> = used.iter().map(|(n, _)| inside.join(n)).collect();
    read_in_a_build(&files, Some(&format!("/nix/store/{hash}-hello-2.12")));
    read_in_a_session(&[inside.join("unused/f0")]);
    let found = traces(&trace_dir, used.len() + 1);
    assert_eq!(found.len(), 2, "{found:?}");
    // Shared at unmount at the latest.
    mount.stop();

    // The next version's build, on a mount with an empty cache: its first
    // read starts the prefetch of what the last build read.
    let cache = format!("redb://{}/second.redb", w.display());
    let mount = Mount::start(&mnt, &url, &cache, &["--prefetch-shared"]);
    let inside = mount.path.join(path.strip_prefix("/nix/store/").unwrap());
    read_in_a_build(
        &[inside.join("used/f0")],
        Some(&format!("/nix/store/{hash}-hello-2.13")),
    );
    wait_prefetched(&mount.path, used.len() as u64);
    let fetched = stats(&mount.path)["remote_chunks"];
    for (name, data) in &used {
        assert!(&std::fs::read(inside.join(name)).unwrap() == data, "{name}");
    }
    let s = stats(&mount.path);
    assert_eq!(
        s["remote_chunks"], fetched,
        "read after the prefetch: {s:?}"
    );

    // A build of another name, and a session that is no build, prefetch
    // nothing: the file they read is the only one fetched.
    read_in_a_build(
        &[inside.join("unused/f2")],
        Some(&format!("/nix/store/{hash}-bash-5.2")),
    );
    read_in_a_session(&[inside.join("unused/f3")]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stats(&mount.path)["prefetched_files"], used.len() as u64);
    mount.stop();
    drop(server);
}
