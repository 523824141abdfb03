//! `lazystore compact` on a real Nix path whose files resemble each other
//! (as a Python install's modules and their `.pyc` twins do): the store
//! takes fewer bytes afterwards, `lazystore stats` says so, and nothing
//! read changes: fsck renders Nix's NarHash, a builder's mount through
//! `serve` hashes to it too, a second compaction moves nothing, and a gc
//! after it drops nothing a path needs.

mod common;

use common::{Mount, lazystore, nix_hash_path, number_before, tree};
use lazystore_testkit::{nix_cmd, noise};

/// Modules that share most of their text, each with two near twins.
fn modules() -> Vec<(String, Vec<u8>)> {
    let hex = |b: Vec<u8>| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let common = hex(noise(24_000, 9100));
    let mut files = Vec::new();
    for i in 0..60u64 {
        let own = hex(noise(2_000, 9200 + i));
        let text = format!("# module {i}\n{common}\n{own}\n");
        for (suffix, flag) in [("py", ""), ("opt-1.pyc", "O1"), ("opt-2.pyc", "O2")] {
            files.push((
                format!("m{i:02}.{suffix}"),
                format!("{flag}{text}").into_bytes(),
            ));
        }
    }
    files
}

/// The number after `word` in `text`.
fn stored_mb(text: &str) -> f64 {
    let at = text.find("stored ").unwrap_or_else(|| panic!("{text}")) + "stored ".len();
    text[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn compacted_store_is_smaller_and_reads_the_same() {
    let work = tempfile::tempdir().unwrap();
    let files = modules();
    let named: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), &b[..])).collect();
    let path = tree(&work.path().join("lib"), &named);
    let nar_hash = nix_cmd(["nix-store", "--query", "--hash", &path]);
    let store = format!("redb://{}", work.path().join("store.redb").display());
    common::ingest(&store, &[&path]);

    let before =
        String::from_utf8(lazystore(&["stats", "--store", &store, "--summary"]).stdout).unwrap();
    let out = lazystore(&["compact", "--store", &store]);
    let report = String::from_utf8(out.stdout).unwrap();
    eprintln!("{report}");
    assert!(number_before(&report, "chunks (") >= 60, "{report}");
    assert_eq!(number_before(&report, "chunks left"), 0, "{report}");
    let after =
        String::from_utf8(lazystore(&["stats", "--store", &store, "--summary"]).stdout).unwrap();
    // Each module compressed alone keeps its copy of the shared text; in
    // frames it is stored about once per frame.
    assert!(
        stored_mb(&after) * 3.0 < stored_mb(&before),
        "before: {before}\nafter: {after}"
    );

    let fsck = String::from_utf8(lazystore(&["fsck", "--store", &store]).stdout).unwrap();
    assert!(fsck.contains("0 damaged"), "{fsck}");

    let again = String::from_utf8(lazystore(&["compact", "--store", &store]).stdout).unwrap();
    assert!(again.contains(": 0 chunks"), "{again}");
    let gc = String::from_utf8(lazystore(&["gc", "--store", &store]).stdout).unwrap();
    assert!(
        gc.contains("dropped 0 directories, 0 chunk lists, 0 chunks"),
        "{gc}"
    );

    // A builder reads it through the service: the chunks cut from frames
    // and checked on the way; they travel raw, or compressed with
    // `serve --compress-wire`.
    let name = path.strip_prefix("/nix/store/").unwrap();
    let mut wire = Vec::new();
    for (i, extra) in [&[][..], &["--compress-wire"][..]].into_iter().enumerate() {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--store", &store];
        args.extend(extra);
        let (server, grpc) = common::start(&args);
        // Through the service, stats count what the store keeps, not what
        // it sends.
        let served = lazystore(&["stats", "--store", &grpc, "--summary"]).stdout;
        let served = String::from_utf8(served).unwrap();
        assert_eq!(stored_mb(&served), stored_mb(&after), "{served}\n{after}");
        let mnt = work.path().join(format!("mnt{i}"));
        std::fs::create_dir_all(&mnt).unwrap();
        let cache = format!(
            "redb://{}",
            work.path().join(format!("cache{i}.redb")).display()
        );
        let mount = Mount::start(&mnt, &grpc, &cache, &[]);
        assert_eq!(nix_hash_path(&mount.path.join(name)), nar_hash.trim());
        for (file, bytes) in files.iter().step_by(7) {
            assert_eq!(
                &std::fs::read(mount.path.join(name).join(file)).unwrap(),
                bytes
            );
        }
        let counters = common::stats(&mount.path);
        wire.push((counters["remote_bytes"], counters["remote_wire_bytes"]));
        mount.stop();
        server.stop();
    }
    let [(raw, raw_wire), (decoded, compressed_wire)] = wire[..] else {
        unreachable!()
    };
    assert_eq!(raw, decoded, "{wire:?}");
    assert!(raw_wire >= raw, "{wire:?}");
    // Hex text: about half its size, chunk by chunk.
    assert!(compressed_wire * 3 < raw_wire * 2, "{wire:?}");
}
