//! Garbage collection of an S3 store on a real 3-node Garage cluster,
//! with another replica reading and writing beside it: a deleted path's
//! packs are condemned (a pack shared with a kept path compacted), a
//! replica that knew the old packs still reads the kept path before and
//! after they are deleted, a publication that needs a condemned record is
//! refused until the path is uploaded again, and the bucket shrinks.

use std::time::Duration;

use lazystore_castore::S3Store;
use lazystore_pathinfo::gc::{Collector, Retention};
use lazystore_pathinfo::ingest::ingest_nar;
use lazystore_pathinfo::pathinfos::{PathInfo, PathInfoError};
use lazystore_pathinfo::render::nar_hash;
use lazystore_pathinfo::{Store, StorePath};
use lazystore_testkit::garage::{Garage, unique_prefix};
use lazystore_testkit::noise;

mod common;

use common::{nar_of, s3_options as options};

/// Ingests `nar` through `store` and publishes it as `path`.
async fn publish(store: &Store, path: &str, nar: &[u8]) -> Result<PathInfo, PathInfoError> {
    let ingested = ingest_nar(&store.blobs, &*store.directories, nar)
        .await
        .unwrap();
    let info = ingested.path_info(path.parse::<StorePath>().unwrap());
    store.path_infos.put(info.clone()).await?;
    Ok(info)
}

async fn unpublish(store: &Store, info: &PathInfo) -> bool {
    store
        .path_infos
        .delete(&info.store_path.hash())
        .await
        .unwrap()
}

async fn hashes_to(store: &Store, info: &PathInfo) {
    let rendered = nar_hash(&store.blobs, &*store.directories, &info.root)
        .await
        .unwrap();
    assert_eq!(rendered, (info.nar_size, info.nar_sha256));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collections_beside_a_replica() {
    let garage = tokio::task::spawn_blocking(Garage::shared).await.unwrap();
    let url = garage.store_url(&unique_prefix());
    let open = || S3Store::open(&url, options(garage)).unwrap();
    let (writer, reader) = (open(), open());
    let (writes, reads) = (Store::s3(writer, None), Store::s3(reader.clone(), None));

    // X: 6 MB of its own with a 256 KiB file Y shares in the middle (in
    // NAR order); Y: 1 MB of its own too. Stored one after the other, so
    // X's packs are X's. Packs are sealed by time as well as size, so the
    // shared file is written between two of X's own: whichever pack holds
    // it holds more of X's own bytes than of it, unless X's writes were
    // slower than 0.5 MB/s (with the shared file last, a pack sealed just
    // before it left it mostly live, one run in three on a busy machine).
    let shared = noise(256 << 10, 7);
    let x_nar = nar_of(&[
        ("a-own", noise(3 << 20, 1)),
        ("b-shared", shared.clone()),
        ("c-own", noise(3 << 20, 3)),
    ])
    .await;
    let y_nar = nar_of(&[("b-shared", shared), ("mine", noise(1 << 20, 2))]).await;
    let x_path = "00bgd045z0d4icpbc2yyz4gx48ak44la-x";
    let x = publish(&writes, x_path, &x_nar).await.unwrap();
    let y = publish(&writes, "0c6kzph7l0dcbq4iddc1ngabvk2c6y5f-y", &y_nar)
        .await
        .unwrap();
    // The other replica reads Y: it knows Y's records in their packs.
    hashes_to(&reads, &y).await;

    assert!(unpublish(&writes, &x).await);
    let collect = || async {
        Collector::s3(open(), Duration::ZERO)
            .collect(&Retention::default(), false)
            .await
            .unwrap()
    };
    let first = collect().await;
    let s3 = first.s3.unwrap();
    eprintln!("first collection: {s3:?}");
    assert!(s3.condemned >= 1, "{s3:?}");
    assert!(
        s3.compacted >= 1,
        "the pack X shares with Y is compacted: {s3:?}"
    );
    assert_eq!(s3.deleted, 0, "nothing was condemned before: {s3:?}");
    // Y reads on, through the replica and through a fresh one.
    hashes_to(&reads, &y).await;
    hashes_to(&Store::s3(open(), None), &y).await;

    // X's data is condemned: publishing X again without its data is
    // refused, even through the replica that wrote it; uploading it again
    // stores it anew and publishes.
    let refused = writes.path_infos.put(x.clone()).await.unwrap_err();
    assert!(
        matches!(
            refused,
            PathInfoError::Incomplete { .. } | PathInfoError::MissingRoot { .. }
        ),
        "{refused}"
    );
    let again = Store::s3(open(), None);
    let x = publish(&again, x_path, &x_nar).await.unwrap();

    // The next collection deletes the condemned packs; both replicas read
    // X and Y from the copies.
    let second = collect().await;
    let s3 = second.s3.unwrap();
    eprintln!("second collection: {s3:?}");
    assert!(s3.deleted >= 1 && s3.deleted_bytes > 0, "{s3:?}");
    hashes_to(&reads, &y).await;
    hashes_to(&reads, &x).await;
    hashes_to(&Store::s3(open(), None), &x).await;

    // X deleted for good: the bucket gives its bytes back.
    assert!(unpublish(&writes, &x).await);
    let before = collect().await.s3.unwrap();
    let after = collect().await.s3.unwrap();
    eprintln!("X deleted: {before:?}, then {after:?}");
    let live_after = after.bytes_before - after.deleted_bytes + after.copied_bytes;
    let dry = Collector::s3(open(), Duration::ZERO)
        .collect(&Retention::default(), true)
        .await
        .unwrap();
    assert_eq!(dry.s3.unwrap().bytes_before, live_after);
    assert!(
        live_after < (y_nar.len() as u64) * 3 / 2,
        "{live_after} bytes of packs left for a {}-byte NAR",
        y_nar.len()
    );
    hashes_to(&reads, &y).await;
    let fresh = Store::s3(open(), None);
    hashes_to(&fresh, &y).await;
    let report = lazystore_pathinfo::fsck::check_path(&fresh, &y).await;
    assert_eq!(report, Ok(()));
}

/// Collections every two seconds (grace 12 s, above the 10 s a replica's
/// view of condemned packs may lag) while another replica keeps
/// publishing paths that share files with paths deleted 15 s before:
/// every publication either lands or is refused and goes through once
/// uploaded again, and every published path renders to its NarHash at the
/// end, through the writer and through a fresh replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collections_while_a_replica_publishes() {
    let garage = tokio::task::spawn_blocking(Garage::shared).await.unwrap();
    let url = garage.store_url(&unique_prefix());
    let open = || S3Store::open(&url, options(garage)).unwrap();
    let writes = Store::s3(open(), None);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let (stop, gc) = (stop.clone(), Collector::s3(open(), Duration::from_secs(12)));
        tokio::spawn(async move {
            let mut runs = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                runs.push(gc.collect(&Retention::default(), false).await.unwrap());
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            runs
        })
    };
    let names = ["a", "b", "c", "d", "f", "g", "h", "i", "j", "k"];
    let mut kept = Vec::new();
    let mut refused = 0;
    let started = std::time::Instant::now();
    for round in 0u64.. {
        if started.elapsed() > Duration::from_secs(45) {
            break;
        }
        // A path with a file of its own and a file of the path twenty
        // rounds back (some 15 s): every other round's path is deleted as
        // soon as published, so an even round shares a file whose packs a
        // collection may have condemned by now while the writer still
        // dedups against them.
        let mut files = vec![("own", noise(500_000, round))];
        files.push(("shared", noise(300_000, 1000 + round)));
        if round >= 20 {
            files.push(("tail", noise(300_000, 1000 + round - 20)));
        }
        let nar = nar_of(&files).await;
        // Hashes of their own: a PathInfo is stored under its hash.
        let (tens, ones) = (round as usize / 10 % 10, round as usize % 10);
        let path = format!(
            "{}{}6kzph7l0dcbq4iddc1ngabvk2c6y5f-r{round}",
            names[tens], names[ones]
        );
        let info = loop {
            match publish(&writes, &path, &nar).await {
                Ok(info) => break info,
                Err(PathInfoError::Incomplete { .. } | PathInfoError::MissingRoot { .. }) => {
                    refused += 1;
                }
                Err(e) => panic!("{path}: {e}"),
            }
        };
        if round % 2 == 0 {
            assert!(
                writes
                    .path_infos
                    .delete(&info.store_path.hash())
                    .await
                    .unwrap()
            );
        } else {
            kept.push(info);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = collector.await.unwrap();
    let s3: Vec<_> = runs.iter().filter_map(|r| r.s3).collect();
    let condemned: u64 = s3.iter().map(|s| s.condemned).sum();
    let deleted: u64 = s3.iter().map(|s| s.deleted).sum();
    eprintln!(
        "{} collections: {condemned} packs condemned, {deleted} deleted; {} paths kept, \
         {refused} publications refused and uploaded again",
        runs.len(),
        kept.len()
    );
    assert!(condemned > 0 && deleted > 0, "{s3:?}");
    for info in &kept {
        hashes_to(&writes, info).await;
        hashes_to(&Store::s3(open(), None), info).await;
    }
}
