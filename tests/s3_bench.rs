//! Benchmark, run by hand (`cargo test --release --test s3_bench --
//! --ignored --nocapture`, as root): the same real tree (a Python install,
//! `$PYTHON_TREE` or ~/.pyenv/versions/3.12.1, made a store path with real
//! Nix) ingested from its NAR into the embedded redb store and into the S3
//! store on a real 3-node Garage cluster on 127.0.0.1, then read back cold
//! (a fresh store handle, the page cache dropped) by rendering its NAR and
//! hashing it. Prints a markdown table: throughput of each, and for S3 the
//! requests and objects per imported GB and the bytes stored against the
//! NAR's.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use lazystore_castore::{RedbStore, S3Options, S3Store};
use lazystore_pathinfo::ingest::ingest_nar;
use lazystore_pathinfo::render::nar_hash;
use lazystore_pathinfo::{Store, nixbase32};
use lazystore_testkit::garage::{Garage, unique_prefix};
use lazystore_testkit::nix_cmd;

fn drop_caches() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches (run as root)");
}

async fn ingest(store: &Store, path: &str) -> (lazystore_castore::Node, u64, [u8; 32]) {
    let mut child = tokio::process::Command::new("nix-store")
        .args(["--dump", path])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let nar = tokio::io::BufReader::with_capacity(1 << 20, child.stdout.take().unwrap());
    let ingested = ingest_nar(&store.blobs, &*store.directories, nar)
        .await
        .unwrap();
    assert!(child.wait().await.unwrap().success());
    (ingested.root, ingested.nar_size, ingested.nar_sha256)
}

fn open_s3(garage: &Garage, url: &str) -> (S3Store, Store) {
    let (key_id, secret) = garage.key();
    let options = S3Options::with_key(key_id, secret);
    let s3 = S3Store::open(url, options).unwrap();
    (s3.clone(), Store::s3(s3, None))
}

#[test]
#[ignore]
fn s3_against_redb() {
    let tree = std::env::var_os("PYTHON_TREE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".pyenv/versions/3.12.1")
        });
    assert!(
        tree.is_dir(),
        "no tree at {} (set PYTHON_TREE)",
        tree.display()
    );
    let path = nix_cmd([
        "nix".as_ref(),
        "store".as_ref(),
        "add-path".as_ref(),
        "--name".as_ref(),
        "lazystore-s3-bench".as_ref(),
        tree.as_os_str(),
    ])
    .trim()
    .to_owned();
    let garage = Garage::shared();
    let work = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = garage.store_url(&unique_prefix());

    runtime.block_on(async {
        // Import, each store fresh.
        let redb_file = work.path().join("store.redb");
        let redb = Store::redb(RedbStore::open(&redb_file).unwrap());
        let started = Instant::now();
        let (root, nar_size, sha) = ingest(&redb, &path).await;
        let redb_import = started.elapsed().as_secs_f64();
        eprintln!("redb import: {redb_import:.2} s");
        drop(redb);
        let (s3, s3_store) = open_s3(garage, &url);
        let started = Instant::now();
        let (s3_root, _, s3_sha) = ingest(&s3_store, &path).await;
        let s3_import = started.elapsed().as_secs_f64();
        eprintln!("S3 import: {s3_import:.2} s");
        assert_eq!((&s3_root, s3_sha), (&root, sha));
        let imported = s3.requests();
        drop(s3_store);

        // Cold reads: fresh handles, the page cache dropped.
        drop_caches();
        let redb = Store::redb(RedbStore::open(&redb_file).unwrap());
        let started = Instant::now();
        let (size, hash) = nar_hash(&redb.blobs, &*redb.directories, &root).await.unwrap();
        let redb_read = started.elapsed().as_secs_f64();
        eprintln!("redb cold read: {redb_read:.2} s");
        assert_eq!((size, hash), (nar_size, sha));
        drop(redb);
        drop_caches();
        let (s3, s3_store) = open_s3(garage, &url);
        let started = Instant::now();
        let (size, hash) = nar_hash(&s3_store.blobs, &*s3_store.directories, &root)
            .await
            .unwrap();
        let s3_read = started.elapsed().as_secs_f64();
        assert_eq!((size, hash), (nar_size, sha));
        let read = s3.requests();
        let redb_bytes: u64 = std::fs::read_dir(work.path().join("store.packs"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum::<u64>()
            + std::fs::metadata(&redb_file).unwrap().len();

        let gb = nar_size as f64 / 1e9;
        let mb = |secs: f64| nar_size as f64 / 1e6 / secs;
        println!();
        println!(
            "{path}: NAR {nar_size} bytes (sha256:{})",
            nixbase32::encode(&sha)
        );
        println!("| store | import | cold read (render + SHA-256) | bytes stored / NAR |");
        println!("|---|---:|---:|---:|");
        println!(
            "| redb (embedded) | {:.0} MB/s ({redb_import:.2} s) | {:.0} MB/s ({redb_read:.2} s) | {:.2} |",
            mb(redb_import),
            mb(redb_read),
            redb_bytes as f64 / nar_size as f64
        );
        println!(
            "| S3 (Garage, 3 nodes, replication 3) | {:.0} MB/s ({s3_import:.2} s) | {:.0} MB/s ({s3_read:.2} s) | {:.2} |",
            mb(s3_import),
            mb(s3_read),
            imported.put_bytes as f64 / nar_size as f64
        );
        println!(
            "| S3 / redb | {:.2} × | {:.2} × | |",
            redb_import / s3_import,
            redb_read / s3_read
        );
        println!();
        println!(
            "S3 import: {} PUTs ({:.0} per GB of NAR; each PUT one object), {} LISTs, {} GETs; \
             cold read: {} GETs ({:.0} per GB), {} LISTs, {} bytes received",
            imported.puts,
            imported.puts as f64 / gb,
            imported.lists,
            imported.gets,
            read.gets,
            read.gets as f64 / gb,
            read.lists,
            read.get_bytes
        );
    });
}
