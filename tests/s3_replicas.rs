//! Two `lazystore serve` replicas on one S3 bucket (a real 3-node Garage
//! cluster, `lazystore_testkit::garage`): a 330 MB closure of four paths
//! imported through one from a `file://` binary cache is mounted through
//! the other with an empty local cache, and `nix hash path` of every path
//! on the mount is Nix's NarHash, though a Garage node is killed two
//! seconds into the reads; an import and a read with the node down work
//! too, as do `lazystore fsck` and `lazystore gc` of the bucket. The
//! reading replica keeps a local chunk cache in front of the bucket. Prints
//! what the import cost in objects written.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use lazystore_testkit::garage::{Garage, unique_prefix};
use lazystore_testkit::{add_tree, gen_key, make_cache, nix_build, nix_cmd, noise};

mod common;

use common::{Mount, serve};

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn nix_hash_path(path: &Path) -> String {
    let hash = nix_cmd([
        "nix".as_ref(),
        "hash".as_ref(),
        "path".as_ref(),
        "--type".as_ref(),
        "sha256".as_ref(),
        "--base32".as_ref(),
        path.as_os_str(),
    ]);
    format!("sha256:{}", hash.trim())
}

/// Objects under `dir/` of the store at `url`, and their bytes.
fn objects(url: &str, dir: &str) -> (usize, u64) {
    let out = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let options = lazystore_castore::S3Options::from_env(Default::default());
        let store = lazystore_castore::S3Store::open(url, options).unwrap();
        let keys = store.list(dir, None).await.unwrap();
        let keys = keys.iter().map(|k| format!("{dir}{k}")).collect();
        store.get_many(keys).await.unwrap()
    });
    let bytes = out.iter().flatten().map(|b| b.len() as u64).sum();
    (out.len(), bytes)
}

/// A tree of `mb` MB: half incompressible, half a compressible log, and
/// 500 small files.
fn tree(at: &Path, mb: usize, seed: u64) {
    write(&at.join("data/noise.bin"), &noise((mb / 2) << 20, seed));
    let text: Vec<u8> = (0..)
        .flat_map(|i: u64| format!("line {i} of log {seed} that compresses\n").into_bytes())
        .take((mb / 2) << 20)
        .collect();
    write(&at.join("data/log.txt"), &text);
    for i in 0..500 {
        let bytes = noise(1024 + i * 37, seed * 1000 + i as u64);
        write(&at.join(format!("small/{}/{i}.bin", i % 20)), &bytes);
    }
}

/// `nix hash path` of every path of `closure` on `mount`, against Nix's.
fn hashes_match(mount: &Mount, closure: &[(String, String)]) {
    for (path, nar_hash) in closure {
        let on_mount = mount.path.join(path.strip_prefix("/nix/store/").unwrap());
        assert_eq!(&nix_hash_path(&on_mount), nar_hash, "{path}");
    }
}

fn lazystore(args: &[&str]) -> String {
    let out = Command::new(common::LAZYSTORE).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "lazystore {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn replicas_share_one_bucket_and_survive_a_node_down() {
    let garage = Garage::start();
    for (name, value) in garage.env() {
        // SAFETY: the only test of this binary, and no thread of its own
        // runs yet: nothing reads the environment meanwhile.
        unsafe { std::env::set_var(name, value) };
    }
    let store = garage.store_url(&unique_prefix());
    let started = std::time::Instant::now();
    let phase = |what: &str| eprintln!("{:6.1} s: {what}", started.elapsed().as_secs_f64());

    // Three trees of 96, 110 and 120 MB, and a path built to refer to
    // them: a closure of four paths, 330 MB of NAR.
    let work = tempfile::tempdir().unwrap();
    let trees: Vec<String> = [(96, 7), (110, 8), (120, 9)]
        .iter()
        .map(|&(mb, seed)| {
            let at = work.path().join(format!("tree{seed}"));
            tree(&at, mb, seed);
            add_tree(&at)
        })
        .collect();
    let refs: Vec<String> = trees
        .iter()
        .map(|t| format!("${{builtins.storePath \"{t}\"}}"))
        .collect();
    let top = nix_build(
        "",
        &format!(
            r#"mk "lazystore-s3-top-{}" "echo {} > $out""#,
            std::process::id(),
            refs.join(" ")
        ),
    )
    .trim()
    .to_owned();
    let requisites = nix_cmd(["nix-store", "--query", "--requisites", &top]);
    let closure: Vec<(String, String)> = requisites
        .lines()
        .map(|p| {
            let hash = nix_cmd(["nix-store", "--query", "--hash", p]);
            (p.to_owned(), hash.trim().to_owned())
        })
        .collect();
    assert_eq!(closure.len(), 4, "{requisites}");
    let nar_size: u64 = closure
        .iter()
        .map(|(p, _)| {
            let size = nix_cmd(["nix-store", "--query", "--size", p]);
            size.trim().parse::<u64>().unwrap()
        })
        .sum();
    assert!(nar_size >= 300_000_000, "{nar_size}");
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "s3-replicas-1");
    let paths: Vec<&str> = closure.iter().map(|(p, _)| p.as_str()).collect();
    let cache = make_cache(&paths, "zstd", Some(&secret));
    let cache_from = format!("file://{}", cache.path().display());
    phase("closure built and in a binary cache");

    let (writer, writer_url) = serve(&store, "127.0.0.1:0");
    let import = |url: &str, path: &str| {
        let key = ["--trusted-public-key", &public];
        lazystore(
            &[
                &["import", "--from", &cache_from][..],
                &key,
                &["--store", url, path],
            ]
            .concat(),
        );
    };
    import(&writer_url, &top);
    phase("imported");
    let (packs, pack_bytes) = objects(&store, "packs/");
    let (indexes, _) = objects(&store, "index/");
    let (infos, _) = objects(&store, "pathinfo/");
    let written = packs + indexes + infos;
    eprintln!(
        "imported {:.1} MB of NAR: {written} objects written ({packs} packs of \
         {:.1} MB in all, {indexes} indexes, {infos} PathInfos), {:.0} per GB of NAR",
        nar_size as f64 / 1e6,
        pack_bytes as f64 / 1e6,
        written as f64 * 1e9 / nar_size as f64
    );
    // About 60 packs of 16 MiB and an index each at best; one object per
    // record would be some 6,000.
    assert!(written < 400, "{written} objects");
    let log = writer.stop();
    assert!(!log.contains("panicked"), "{log}");

    // The other replica has never seen any of it; its mount's cache is
    // empty. One Garage node (not the endpoint the replicas use) is killed
    // two seconds into the reads.
    // The reader keeps a local chunk cache in front of the bucket.
    let replica_cache = work.path().join("replica-cache.redb");
    let replica_cache_url = format!("redb://{}", replica_cache.display());
    let (reader, reader_url) = common::start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--store",
        &store,
        "--cache",
        &replica_cache_url,
    ]);
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let cache_url = |name: &str| format!("redb://{}/{name}.redb", work.path().display());
    let mount = Mount::start(&mountpoint, &reader_url, &cache_url("cache1"), &[]);
    std::thread::scope(|s| {
        let reading = s.spawn(|| hashes_match(&mount, &closure));
        std::thread::sleep(std::time::Duration::from_secs(2));
        garage.kill(2);
        reading.join().unwrap();
    });
    mount.stop();
    phase("read through the other replica, a node killed");
    let cached: u64 = std::fs::read_dir(replica_cache.with_extension("packs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        cached > pack_bytes / 2,
        "the replica's cache holds {cached} bytes of {pack_bytes} read"
    );

    // With the node down, writes too (quorum 2 of 3): a new path imported
    // through a writer and read through the reader.
    let extra_tree = work.path().join("extra");
    tree(&extra_tree, 8, 10);
    let extra = add_tree(&extra_tree);
    let extra_hash = nix_cmd(["nix-store", "--query", "--hash", &extra]);
    let extra_cache = make_cache(&[&extra], "zstd", Some(&secret));
    let (writer, writer_url) = serve(&store, "127.0.0.1:0");
    let key = ["--trusted-public-key", &public];
    let from = format!("file://{}", extra_cache.path().display());
    lazystore(
        &[
            &["import", "--from", &from][..],
            &key,
            &["--store", &writer_url, &extra],
        ]
        .concat(),
    );
    phase("imported with the node down");
    let mount = Mount::start(&mountpoint, &reader_url, &cache_url("cache2"), &[]);
    hashes_match(&mount, &[(extra.clone(), extra_hash.trim().to_owned())]);
    mount.stop();
    let log = writer.stop();
    assert!(!log.contains("panicked"), "{log}");
    let log = reader.stop();
    assert!(!log.contains("panicked"), "{log}");

    // fsck and gc of the bucket itself, the node still down.
    phase("read with the node down");
    let fsck = lazystore(&["fsck", "--store", &store]);
    phase("fsck");
    assert!(
        fsck.contains("5 paths") && !fsck.contains("damaged:"),
        "{fsck}"
    );
    let gc = lazystore(&["gc", "--store", &store, "--dry-run"]);
    assert!(
        gc.contains("S3 packs:") && gc.contains("kept 5 paths"),
        "{gc}"
    );
}
