//! Two `lazystore serve` replicas on one S3 bucket (a real 3-node Garage
//! cluster, `lazystore_testkit::garage`): a closure imported through one
//! from a `file://` binary cache is mounted through the other with an
//! empty local cache, and `nix hash path` on the mount is Nix's NarHash;
//! with a Garage node killed, a fresh mount reads it again. Prints what the
//! import cost in objects written.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use lazystore_testkit::garage::{Garage, unique_prefix};
use lazystore_testkit::{add_tree, gen_key, make_cache, nix_cmd, noise};

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

#[test]
fn replicas_share_one_bucket_and_survive_a_node_down() {
    let garage = Garage::start();
    for (name, value) in garage.env() {
        // SAFETY: the only test of this binary, and no thread of its own
        // runs yet: nothing reads the environment meanwhile.
        unsafe { std::env::set_var(name, value) };
    }
    let store = garage.store_url(&unique_prefix());

    // A path of 96 MB: incompressible, compressible and many small files.
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    write(&tree.join("data/noise.bin"), &noise(48 << 20, 7));
    let text: Vec<u8> = (0..)
        .flat_map(|i: u64| format!("line {i} of a log that compresses\n").into_bytes())
        .take(40 << 20)
        .collect();
    write(&tree.join("data/log.txt"), &text);
    for i in 0..500 {
        let bytes = noise(1024 + i * 37, 100 + i as u64);
        write(&tree.join(format!("small/{}/{i}.bin", i % 20)), &bytes);
    }
    let path = add_tree(&tree);
    let nar_hash = nix_cmd(["nix-store", "--query", "--hash", &path]);
    let nar_size: u64 = nix_cmd(["nix-store", "--query", "--size", &path])
        .trim()
        .parse()
        .unwrap();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "s3-replicas-1");
    let cache = make_cache(&[&path], "zstd", Some(&secret));

    let (writer, writer_url) = serve(&store, "127.0.0.1:0");
    let out = Command::new(common::LAZYSTORE)
        .args(["import", "--from"])
        .arg(format!("file://{}", cache.path().display()))
        .args([
            "--trusted-public-key",
            &public,
            "--store",
            &writer_url,
            &path,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (packs, pack_bytes) = objects(&store, "packs/");
    let (indexes, _) = objects(&store, "index/");
    let (infos, _) = objects(&store, "pathinfo/");
    let written = packs + indexes + infos;
    eprintln!(
        "imported a {:.1} MB NAR: {written} objects written ({packs} packs of \
         {:.1} MB in all, {indexes} indexes, {infos} PathInfo), {:.0} per GB of NAR",
        nar_size as f64 / 1e6,
        pack_bytes as f64 / 1e6,
        written as f64 * 1e9 / nar_size as f64
    );
    // A debug build on two cores wrote 29–49 (ideally 4 packs of 16 MiB,
    // and an index each); one object per record would be some 2,000.
    assert!(written < 100, "{written} objects");
    let log = writer.stop();
    assert!(!log.contains("panicked"), "{log}");

    // The other replica has never seen any of it; its mount's cache is
    // empty.
    let (reader, reader_url) = serve(&store, "127.0.0.1:0");
    let root_of = |mount: &Mount| mount.path.join(path.strip_prefix("/nix/store/").unwrap());
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let cache_url = |name: &str| format!("redb://{}/{name}.redb", work.path().display());
    let mount = Mount::start(&mountpoint, &reader_url, &cache_url("cache1"), &[]);
    assert_eq!(nix_hash_path(&root_of(&mount)), nar_hash.trim());
    mount.stop();

    // One Garage node down (not the endpoint the replicas use): a fresh
    // mount with an empty cache reads everything from S3 again.
    garage.kill(2);
    let mount = Mount::start(&mountpoint, &reader_url, &cache_url("cache2"), &[]);
    assert_eq!(nix_hash_path(&root_of(&mount)), nar_hash.trim());
    mount.stop();
    let log = reader.stop();
    assert!(!log.contains("panicked"), "{log}");
}
