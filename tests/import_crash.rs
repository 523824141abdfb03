//! `lazystore import` killed (SIGKILL) part way, twenty times: the store
//! still opens, whatever it published renders to Nix's NarHash, and
//! importing again completes the path — the pack files carry on after
//! whatever the killed process appended. `fsck` then finds nothing wrong,
//! and `gc` gives back the bytes the killed imports appended without
//! indexing them.

mod common;

use std::process::Command;
use std::time::Duration;

use lazystore_pathinfo::render::nar_hash;
use lazystore_pathinfo::{Store, StorePath, nixbase32};
use lazystore_testkit::{add_tree, make_cache, nix_cmd, noise};

use common::LAZYSTORE;

/// Whether `path` is published in the store at `url`; if it is, its NAR
/// hashes to `want` (nixbase32).
fn published_and_right(url: &str, path: &str, want: &str) -> bool {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = Store::open(url, lazystore_pathinfo::StoreOptions::default())
            .await
            .unwrap_or_else(|e| panic!("the store does not open after the kill: {e}"));
        let sp = StorePath::from_absolute_path(path).unwrap();
        let Some(info) = store.path_infos.get(&sp.hash()).await.unwrap() else {
            return false;
        };
        let (_, hash) = nar_hash(&store.blobs, &*store.directories, &info.root)
            .await
            .unwrap_or_else(|e| panic!("{path} is published but does not render: {e}"));
        assert_eq!(nixbase32::encode(&hash), want, "{path}: rendered NarHash");
        true
    })
}

#[test]
fn an_import_killed_part_way_leaves_a_store_that_imports_again() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("crash");
    std::fs::create_dir_all(tree.join("small")).unwrap();
    for i in 0..4 {
        std::fs::write(tree.join(format!("big{i}.bin")), noise(40 << 20, i)).unwrap();
    }
    for i in 0..400 {
        std::fs::write(
            tree.join(format!("small/{i:03}")),
            format!("file {i}\n").repeat(i + 1),
        )
        .unwrap();
    }
    let path = add_tree(&tree);
    std::fs::remove_dir_all(&tree).unwrap();
    let want = nix_cmd(["nix-store", "--query", "--hash", &path])
        .trim()
        .strip_prefix("sha256:")
        .unwrap()
        .to_owned();
    let cache = make_cache(&[&path], "none", None);
    let from = format!("file://{}", cache.path().display());
    let store = format!("redb://{}/store.redb", work.path().display());
    let import = [
        "import",
        "--no-check-sigs",
        "--from",
        &from,
        "--store",
        &store,
        &path,
    ];

    // Twenty kills at moments spread over the import's first second.
    let mut killed_running = 0;
    for after_ms in (0..20).map(|i| 60 + i * 47 % 900) {
        if common::killed_part_way(&import, Duration::from_millis(after_ms)) {
            killed_running += 1;
        }
        // Opens, and anything published is whole.
        published_and_right(&store, &path, &want);
    }
    assert!(
        killed_running >= 10,
        "only {killed_running} imports were running at their kill"
    );

    let out = Command::new(LAZYSTORE).args(import).output().unwrap();
    assert!(
        out.status.success(),
        "import after the kills failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        published_and_right(&store, &path, &want),
        "{path} not published"
    );
    let packs = std::fs::read_dir(work.path().join("store.packs"))
        .unwrap()
        .count();
    assert!(packs >= 1, "no pack files");

    // fsck finds nothing wrong; gc gives back what the killed imports
    // appended without indexing, and fsck still finds nothing wrong.
    let lazystore = |args: &[&str]| {
        let out = Command::new(LAZYSTORE).args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "lazystore {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let fsck = lazystore(&["fsck", "--store", &store]);
    assert!(
        fsck.contains("1 paths") && fsck.contains("0 damaged"),
        "{fsck}"
    );
    let gc = lazystore(&["gc", "--store", &store]);
    let reclaimed: u64 = gc
        .split_whitespace()
        .rev()
        .skip_while(|w| *w != "reclaimed)")
        .nth(1)
        .and_then(|n| n.trim_start_matches('(').parse().ok())
        .unwrap_or_else(|| panic!("no figure reclaimed: {gc}"));
    eprintln!("{killed_running} imports killed while running; {gc}");
    assert!(reclaimed > 0, "{gc}");
    let fsck = lazystore(&["fsck", "--store", &store]);
    assert!(
        fsck.contains("1 paths") && fsck.contains("0 damaged"),
        "{fsck}"
    );
}

/// `lazystore gc` killed (SIGKILL) part way, ten times, each time with a
/// freshly deleted path's data to drop: the kept path still renders to
/// Nix's NarHash and fsck finds nothing damaged after every kill; a gc
/// run to its end then drops what the killed ones left, and fsck counts
/// nothing unreferenced.
#[test]
fn a_gc_killed_part_way_loses_nothing_kept() {
    let work = tempfile::tempdir().unwrap();
    let make = |name: &str, seed: u64| {
        let dir = work.path().join(name);
        std::fs::create_dir_all(dir.join("small")).unwrap();
        for i in 0..2 {
            std::fs::write(dir.join(format!("big{i}")), noise(20 << 20, seed + i)).unwrap();
        }
        for i in 0..200u64 {
            std::fs::write(
                dir.join(format!("small/{i:03}")),
                noise(1000 + i as usize, seed + 100 + i),
            )
            .unwrap();
        }
        let path = add_tree(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        path
    };
    let kept = make("kept", 9000);
    let want = nix_cmd(["nix-store", "--query", "--hash", &kept])
        .trim()
        .strip_prefix("sha256:")
        .unwrap()
        .to_owned();
    let store = format!("redb://{}/store.redb", work.path().display());
    common::ingest(&store, &[&kept]);
    // Until ten collections were killed while running: a kill that comes
    // after the collection ended makes the next come sooner.
    let mut killed_running = 0;
    let mut delay_ms = 150u64;
    for round in 0..30u64 {
        if killed_running == 10 {
            break;
        }
        let doomed = make(&format!("doomed{round}"), 10_000 + round * 1000);
        common::ingest(&store, &[&doomed]);
        common::lazystore(&["delete", "--store", &store, &doomed]);
        let gc = ["gc", "--store", &store];
        if common::killed_part_way(&gc, Duration::from_millis(delay_ms)) {
            killed_running += 1;
            // Spread the next kill over another moment of the run.
            delay_ms = 5 + (delay_ms + 37) % 200;
        } else {
            delay_ms = delay_ms * 2 / 3;
        }
        assert!(published_and_right(&store, &kept, &want), "{kept} lost");
        let fsck = common::lazystore(&["fsck", "--store", &store]);
        let fsck = String::from_utf8_lossy(&fsck.stdout);
        assert!(
            fsck.contains("1 paths") && fsck.contains("0 damaged"),
            "{fsck}"
        );
    }
    assert_eq!(
        killed_running, 10,
        "only {killed_running} collections were running at their kill"
    );
    let gc = common::lazystore(&["gc", "--store", &store]);
    eprintln!(
        "{killed_running} collections killed while running; {}",
        String::from_utf8_lossy(&gc.stdout)
    );
    let fsck = common::lazystore(&["fsck", "--store", &store]);
    let fsck = String::from_utf8_lossy(&fsck.stdout);
    assert!(
        fsck.contains("1 paths")
            && fsck.contains("0 damaged")
            && fsck.contains("unreferenced: 0 directories, 0 chunk lists, 0 chunks"),
        "{fsck}"
    );
}
