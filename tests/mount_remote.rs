//! `lazystore mount` of a remote store (`lazystore serve`) with an empty
//! local cache: stat'ing a path of over 100 MB fetches no chunk, reading a
//! file fetches its chunks and no more, `nix hash path` through the mount
//! gives Nix's NarHash; a server stopped mid-read and restarted within the
//! retry deadline costs readers nothing, one left down fails reads with
//! EIO (never wrong bytes) and a log line naming the file; a corrupted
//! chunk in the local cache is fetched again.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lazystore_castore::{CacheOptions, CacheStore, Digest, Node};
use lazystore_pathinfo::{Store, nixbase32};
use lazystore_testkit::{add_tree, nix_cmd, noise};

mod common;

use common::{Mount, serve, stats};

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// Ingests `path` from the local Nix store into the redb store at `url`
/// and publishes it; returns its NarHash (nixbase32), checked against
/// Nix's, and root node.
fn import(url: &str, path: &str) -> (String, Node) {
    let ingested = common::ingest(url, &[path]).remove(0);
    let hash = nixbase32::encode(&ingested.nar_sha256);
    assert_eq!(
        nix_cmd(["nix-store", "--query", "--hash", path]).trim(),
        format!("sha256:{hash}")
    );
    (hash, ingested.root)
}

fn chunk_count(store_url: &str, digest: Digest) -> (usize, Vec<Digest>) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = Store::open(store_url, lazystore_pathinfo::StoreOptions::default())
            .await
            .unwrap();
        let meta = store.blobs.stat(&digest).await.unwrap().unwrap();
        (
            meta.chunks.len(),
            meta.chunks.iter().map(|c| c.digest).collect(),
        )
    })
}

#[test]
fn a_remote_store_is_fetched_only_when_read() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("big");
    write(&tree.join("data/noise.bin"), &noise(100 << 20, 1));
    let one_mib = noise(1 << 20, 2);
    write(&tree.join("lib/one-mib.so"), &one_mib);
    for i in 0..40 {
        write(
            &tree.join(format!("share/doc/{i}.txt")),
            format!("doc {i}\n").repeat(i * 50).as_bytes(),
        );
    }
    let path = add_tree(&tree);
    std::fs::remove_dir_all(&tree).unwrap();
    let store_url = format!("redb://{}/store.redb", work.path().display());
    let (nar_hash, _) = import(&store_url, &path);
    let (one_mib_chunks, _) = chunk_count(&store_url, Digest::of(&one_mib));

    let (server, url) = serve(&store_url, "127.0.0.1:0");
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let cache = format!("redb://{}/cache.redb", work.path().display());
    let mount = Mount::start(&mountpoint, &url, &cache, &[]);
    let root = mount.path.join(path.strip_prefix("/nix/store/").unwrap());

    // Walk and stat every file: metadata only.
    let started = Instant::now();
    let out = Command::new("find")
        .arg(&root)
        .args(["-type", "f", "-exec", "stat", "--format=%s", "{}", "+"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let walk = started.elapsed();
    let total: u64 = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse::<u64>().unwrap())
        .sum();
    assert!(total >= 100 << 20, "{total}");
    let s = stats(&mount.path);
    assert_eq!(
        (
            s["chunks_fetched"],
            s["remote_chunks"],
            s["chunk_lists_fetched"]
        ),
        (0, 0, 0),
        "{s:?}"
    );
    assert_eq!(s["bytes_presented"], total, "{s:?}");

    // One 1 MiB file: its chunks and nothing else, from the remote.
    let started = Instant::now();
    let mut f = std::fs::File::open(root.join("lib/one-mib.so")).unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut f, &mut first).unwrap();
    let first_byte = started.elapsed();
    drop(f);
    let got = std::fs::read(root.join("lib/one-mib.so")).unwrap();
    assert!(got == one_mib);
    let s = stats(&mount.path);
    assert_eq!(s["remote_bytes"], 1 << 20, "{s:?}");
    assert_eq!(s["remote_chunks"] as usize, one_mib_chunks, "{s:?}");
    assert_eq!(s["chunks_fetched"] as usize, one_mib_chunks, "{s:?}");
    eprintln!(
        "find+stat of {total} bytes in {walk:?}; first byte of a cold file through the remote in {first_byte:?}"
    );

    // The whole path through the mount is what Nix says it is.
    let hash = nix_cmd([
        "nix".as_ref(),
        "hash".as_ref(),
        "path".as_ref(),
        "--type".as_ref(),
        "sha256".as_ref(),
        "--base32".as_ref(),
        root.as_os_str(),
    ]);
    assert_eq!(hash.trim(), nar_hash);
    let s = stats(&mount.path);
    assert!(
        s["remote_bytes"] >= total && s["remote_bytes"] < total + (1 << 20),
        "{s:?}"
    );
    let log = mount.stop();
    assert!(log.contains("lazystore: unmounted"), "{log}");
    drop(server);
}

#[test]
fn server_outages_cost_readers_time_never_wrong_bytes() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("files");
    let files: Vec<Vec<u8>> = (0..24).map(|i| noise(512 << 10, 100 + i)).collect();
    for (i, f) in files.iter().enumerate() {
        write(&tree.join(format!("f{i:02}")), f);
    }
    let path = add_tree(&tree);
    let store_url = format!("redb://{}/store.redb", work.path().display());
    import(&store_url, &path);

    let (server, url) = serve(&store_url, "127.0.0.1:0");
    let listen = url.strip_prefix("grpc+http://").unwrap().to_owned();
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let cache = format!("redb://{}/cache.redb", work.path().display());
    // Every read through the chunks: this is about fetching them.
    let mount = Mount::start(
        &mountpoint,
        &url,
        &cache,
        &["--retry-deadline", "8", "--no-passthrough"],
    );
    let root = mount.path.join(path.strip_prefix("/nix/store/").unwrap());

    // Readers go through the files while the server stops and restarts.
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = {
        let (root, files) = (root.clone(), files.clone());
        std::thread::spawn(move || {
            for (i, want) in files.iter().enumerate().take(16) {
                let got = std::fs::read(root.join(format!("f{i:02}")))
                    .unwrap_or_else(|e| panic!("reading f{i:02}: {e}"));
                assert!(&got == want, "f{i:02}: wrong bytes");
                tx.send(i).unwrap();
                // Slow enough that most reads fall in the outage.
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    for _ in 0..3 {
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
    }
    let log = server.stop();
    assert!(!log.contains("panicked"), "{log}");
    let before_outage = 3 + rx.try_iter().count();
    assert!(
        before_outage < 12,
        "the readers were done before the outage"
    );
    std::thread::sleep(Duration::from_secs(2));
    let (server, url2) = serve(&store_url, &listen);
    assert_eq!(url2, url);
    reader
        .join()
        .expect("readers saw an error or wrong bytes while the server restarted");
    let s = stats(&mount.path);
    assert_eq!(s["io_errors"], 0, "{s:?}");

    // Down for good: EIO after the deadline, never bytes.
    drop(server);
    let started = Instant::now();
    let err = std::fs::read(root.join("f20")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(7) && waited < Duration::from_secs(40),
        "{waited:?}"
    );
    let log = mount.stop();
    let line = log
        .lines()
        .find(|l| l.contains("returning EIO"))
        .unwrap_or_else(|| panic!("no log line for the EIO:\n{log}"));
    assert!(line.contains(&path) && line.contains("/f20"), "{line}");

    // A corrupted chunk in the local cache is fetched again.
    let victim = Digest::of(&files[0]);
    let (_, chunks) = chunk_count(&store_url, victim);
    let cache_path = work.path().join("cache.redb");
    let local = CacheStore::open(
        &cache_path,
        CacheOptions {
            max_bytes: 10 << 30,
        },
    )
    .unwrap();
    let flipped = local
        .corrupt_chunk(&chunks[1], |c| {
            let mut d = c.data.to_vec();
            d[100] ^= 0x40;
            c.data = d.into();
        })
        .unwrap();
    assert!(flipped, "the chunk was not in the local cache");
    drop(local);
    let (_server, url) = serve(&store_url, "127.0.0.1:0");
    let mount = Mount::start(&mountpoint, &url, &cache, &["--no-passthrough"]);
    let got = std::fs::read(
        mount
            .path
            .join(path.strip_prefix("/nix/store/").unwrap())
            .join("f00"),
    )
    .unwrap();
    assert!(got == files[0], "wrong bytes after a corrupted cache chunk");
    let s = stats(&mount.path);
    assert_eq!(
        s["remote_chunks"], 1,
        "only the corrupted chunk is fetched again: {s:?}"
    );
    assert_eq!(s["io_errors"], 0, "{s:?}");
    mount.stop();
}

/// A small file (no longer than the store chunker's minimum) is one chunk
/// whose digest is the file's: once the mount knows the chunker, reading
/// one costs its chunk and no chunk-list fetch.
#[test]
fn small_files_are_read_without_their_chunk_lists() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("small-files");
    let files: Vec<Vec<u8>> = (0..40)
        .map(|i| noise(100 + i * 37, 9400 + i as u64))
        .collect();
    for (i, bytes) in files.iter().enumerate() {
        write(&dir.join(format!("f{i:02}")), bytes);
    }
    let path = add_tree(&dir);
    let store = format!("redb://{}/store.redb", work.path().display());
    import(&store, &path);
    let (_server, url) = serve(&store, "127.0.0.1:0");
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let mount = Mount::start(&mountpoint, &url, "none", &["--no-passthrough"]);
    let on_mount = mount.path.join(path.strip_prefix("/nix/store/").unwrap());
    // The first read has the mount ask the store's chunker in the
    // background.
    assert_eq!(std::fs::read(on_mount.join("f00")).unwrap(), files[0]);
    std::thread::sleep(Duration::from_millis(500));
    let before = stats(&mount.path);
    for (i, bytes) in files.iter().enumerate().skip(1) {
        assert_eq!(
            &std::fs::read(on_mount.join(format!("f{i:02}"))).unwrap(),
            bytes
        );
    }
    let after = stats(&mount.path);
    assert_eq!(
        after["chunk_lists_fetched"], before["chunk_lists_fetched"],
        "{after:?}"
    );
    assert_eq!(
        after["chunks_fetched"] - before["chunks_fetched"],
        files.len() as u64 - 1,
        "{after:?}"
    );
    assert_eq!(after["io_errors"], 0);
    mount.stop();
}
