//! `lazystore fsck` on a real closure imported from a real-Nix binary
//! cache: clean, it says so and exits 0; with the bytes of one chunk
//! flipped, it names exactly the path that chunk belongs to (and the
//! chunk), exits 1, and the other paths check out. Online, through a
//! `lazystore serve` of the store, it finds the same; `--repair --from`
//! the cache writes the chunk again, and the next check is clean. With ten
//! chunks of two paths flipped, a mount never serves them (EIO, the chunk
//! in its log), fsck names exactly those ten, each once, and the paths
//! they belong to; the repair restores them all.

mod common;

use std::process::{Command, Output};

use common::start;
use lazystore_castore::blobs::RedbBlobService;
use lazystore_castore::{BlobService, Digest, RedbStore};
use lazystore_testkit::{build_closure, gen_key, make_cache};

fn lazystore(args: &[&str]) -> Output {
    Command::new(common::LAZYSTORE).args(args).output().unwrap()
}

#[test]
fn fsck_names_the_damaged_path() {
    let closure = build_closure();
    let dir = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(dir.path(), "fsck-test-1");
    let cache = make_cache(&[closure.top()], "zstd", Some(&secret));
    let store = format!("redb://{}/store.redb", dir.path().display());
    let from = format!("file://{}", cache.path().display());
    let out = lazystore(&[
        "import",
        "--from",
        &from,
        "--trusted-public-key",
        &public,
        "--store",
        &store,
        closure.top(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = lazystore(&["fsck", "--store", &store]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("3 paths") && stdout.contains("0 damaged"),
        "{stdout}"
    );

    // One byte of a's only chunk flipped.
    let contents = std::fs::read(&closure.a).unwrap();
    let chunk = Digest::of(&contents);
    {
        let blobs = RedbBlobService::new(RedbStore::open(dir.path().join("store.redb")).unwrap());
        let flipped = blobs
            .corrupt_chunk(&chunk, |c| {
                let mut data = c.data.to_vec();
                let last = data.len() - 1;
                data[last] ^= 1;
                c.data = data.into();
            })
            .unwrap();
        assert!(flipped, "a's chunk is not stored");
    }
    let check = |store: &str| {
        let out = lazystore(&["fsck", "--store", store]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        let damaged: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("damaged: "))
            .collect();
        // a itself; b and c only refer to it, their trees are whole.
        assert_eq!(damaged.len(), 1, "{stdout}");
        assert!(damaged[0].contains(&closure.a), "{stdout}");
        assert!(damaged[0].contains(&chunk.to_string()), "{stdout}");
        assert!(
            stdout.contains("3 paths") && stdout.contains("1 damaged"),
            "{stdout}"
        );
    };
    check(&store);
    // Online, through the server holding the store.
    let (_server, url) = start(&["serve", "--listen", "127.0.0.1:0", "--store", &store]);
    check(&url);

    // Repaired from the binary cache, online: the chunk written again, and
    // a second check is clean.
    let out = lazystore(&[
        "fsck",
        "--store",
        &url,
        "--repair",
        "--from",
        &from,
        "--trusted-public-key",
        &public,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("repaired: {}", closure.a)),
        "{stdout}"
    );
    assert!(stdout.contains("1 of 1 damaged paths repaired"), "{stdout}");
    let out = lazystore(&["fsck", "--store", &url]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("0 damaged"), "{stdout}");
}

#[test]
fn ten_corrupt_chunks_are_named_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Two paths of four 1 MiB files each: some 130 chunks.
    let paths: Vec<String> = (0..2u64)
        .map(|p| {
            let tree = d.join(format!("tree{p}"));
            std::fs::create_dir(&tree).unwrap();
            for f in 0..4 {
                std::fs::write(
                    tree.join(format!("f{f}")),
                    lazystore_testkit::noise(1 << 20, 9000 + p * 10 + f),
                )
                .unwrap();
            }
            lazystore_testkit::add_tree(&tree)
        })
        .collect();
    let (secret, public) = gen_key(d, "fsck-ten-1");
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let cache = make_cache(&refs, "zstd", Some(&secret));
    let from = format!("file://{}", cache.path().display());
    let store = format!("redb://{}/store.redb", d.display());
    let mut args = vec![
        "import",
        "--from",
        &from,
        "--trusted-public-key",
        &public,
        "--store",
        &store,
    ];
    args.extend(&refs);
    let out = lazystore(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every chunk, with the path it belongs to; ten of them flipped.
    let redb = RedbStore::open(d.join("store.redb")).unwrap();
    let blobs = RedbBlobService::new(redb);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut chunks: Vec<(Digest, usize, usize)> = Vec::new();
    for (p, path) in paths.iter().enumerate() {
        for f in 0..4 {
            let contents = std::fs::read(format!("{path}/f{f}")).unwrap();
            let meta = runtime
                .block_on(blobs.stat(&Digest::of(&contents)))
                .unwrap()
                .unwrap();
            chunks.extend(meta.chunks.iter().map(|c| (c.digest, p, f)));
        }
    }
    assert!(chunks.len() > 40, "{} chunks", chunks.len());
    let step = chunks.len() / 10;
    let flipped: Vec<(Digest, usize, usize)> =
        chunks.iter().step_by(step).take(10).copied().collect();
    for (chunk, _, _) in &flipped {
        let done = blobs
            .corrupt_chunk(chunk, |c| {
                let mut data = c.data.to_vec();
                data[0] ^= 0x80;
                c.data = data.into();
            })
            .unwrap();
        assert!(done);
    }
    drop(blobs);

    // A mount never serves them: each file holding one is EIO, and the
    // mount's log names the chunk.
    let mountpoint = d.join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let mount = common::Mount::start(&mountpoint, &store, "none", &["--no-passthrough"]);
    for (_, p, f) in &flipped {
        let file = mount
            .path
            .join(paths[*p].trim_start_matches("/nix/store/"))
            .join(format!("f{f}"));
        let err = std::fs::read(&file).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EIO),
            "{}: {err}",
            file.display()
        );
    }
    // A read stops at the first bad chunk of its file: each file's EIO is
    // logged with one of its flipped chunks.
    let log = mount.stop();
    for (_, p, f) in &flipped {
        let named = flipped
            .iter()
            .filter(|(_, p2, f2)| (p2, f2) == (p, f))
            .any(|(chunk, _, _)| log.contains(&chunk.to_string()));
        assert!(
            named,
            "no flipped chunk of {p}/f{f} in the mount's log:\n{log}"
        );
    }

    let out = lazystore(&["fsck", "--store", &store]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for (chunk, _, _) in &flipped {
        assert_eq!(
            stdout.matches(&chunk.to_string()).count(),
            1,
            "{chunk} named once:\n{stdout}"
        );
    }
    let damaged: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("damaged: "))
        .collect();
    let hit: std::collections::BTreeSet<usize> = flipped.iter().map(|(_, p, _)| *p).collect();
    assert_eq!(damaged.len(), hit.len(), "{stdout}");
    for p in hit {
        assert!(damaged.iter().any(|l| l.contains(&paths[p])), "{stdout}");
    }

    let out = lazystore(&[
        "fsck",
        "--store",
        &store,
        "--repair",
        "--from",
        &from,
        "--trusted-public-key",
        &public,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lazystore(&["fsck", "--store", &store]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("0 damaged"),
        "{stdout}"
    );
}
