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
    modules_from(9100, 60)
}

/// `n` modules made from `seed`.
fn modules_from(seed: u64, n: u64) -> Vec<(String, Vec<u8>)> {
    let hex = |b: Vec<u8>| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let common = hex(noise(24_000, seed));
    let mut files = Vec::new();
    for i in 0..n {
        let own = hex(noise(2_000, seed + 100 + i));
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
        if i == 0 {
            // The served store cannot be compacted; the error says why.
            let held = std::process::Command::new(common::LAZYSTORE)
                .args(["compact", "--store", &store])
                .output()
                .unwrap();
            let why = String::from_utf8_lossy(&held.stderr);
            assert!(
                !held.status.success() && why.contains("compaction runs offline"),
                "{why}"
            );
        }
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

/// A build of `modules_from(seed, 30)` and a copy of `/bin/bash` against
/// the dependency `dep`: every module starts with a `#!` naming it and
/// names it and the build's `lib` again (as `.pyc` files name their
/// source), and the "library" names it in its middle (as an ELF's RUNPATH
/// does). Under `dir`, as a real store path named `python`.
fn built_against(dir: &std::path::Path, dep: &str) -> String {
    let mut files = Vec::new();
    for (name, text) in modules_from(9300, 30) {
        let (head, tail) = text.split_at(text.len() / 3);
        let mut bytes = format!("#!{dep}/bin/python3\n").into_bytes();
        bytes.extend_from_slice(head);
        bytes.extend_from_slice(format!("\n{dep}/lib/python3.12\n").as_bytes());
        bytes.extend_from_slice(tail);
        files.push((name, bytes));
    }
    let bash = std::fs::read("/bin/bash").unwrap();
    let mut lib = bash[..bash.len() / 2].to_vec();
    lib.extend_from_slice(format!("\0{dep}/lib\0").as_bytes());
    lib.extend_from_slice(&bash[bash.len() / 2..]);
    files.push(("libpython3.12.so".into(), lib));
    let named: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), &b[..])).collect();
    tree(&dir.join("python"), &named)
}

/// A rebuild against another dependency (every file that names it
/// changed, binary included) costs almost nothing once compacted: its
/// chunks differ from the first build's only in the dependency's hash, so
/// they are stored as the first build's normalised bytes and a record of
/// the hash. Both builds still render Nix's NarHash (fsck), read through a
/// builder's mount, and survive a gc.
#[test]
fn a_rebuild_against_another_dependency_costs_its_records() {
    let work = tempfile::tempdir().unwrap();
    let dep = |v: &str| {
        tree(
            &work.path().join(v).join("dep"),
            &[("version", v.as_bytes())],
        )
    };
    let (dep1, dep2) = (dep("1"), dep("2"));
    assert_eq!(dep1.len(), dep2.len());
    let first = built_against(&work.path().join("b1"), &dep1);
    let rebuild = built_against(&work.path().join("b2"), &dep2);
    let store = format!("redb://{}", work.path().join("store.redb").display());
    let stored = || {
        let out = lazystore(&["stats", "--store", &store, "--summary"]).stdout;
        stored_mb(&String::from_utf8(out).unwrap())
    };
    common::ingest(&store, &[&first]);
    lazystore(&["compact", "--store", &store]);
    let alone = stored();

    common::ingest(&store, &[&rebuild]);
    let imported = stored();
    let out = lazystore(&["compact", "--store", &store]);
    let report = String::from_utf8(out.stdout).unwrap();
    eprintln!("{report}");
    // Every module and the library's middle chunk: on bytes stored already.
    assert!(
        number_before(&report, "of those on bytes stored already") >= 90,
        "{report}"
    );
    let both = stored();
    eprintln!(
        "first build {alone} MB; with the rebuild {imported} MB imported, {both} MB compacted"
    );
    assert!(both - alone <= 0.05 * alone, "{alone} {both}");
    assert!(
        imported - alone > 4.0 * (both - alone),
        "{alone} {imported} {both}"
    );

    let fsck = String::from_utf8(lazystore(&["fsck", "--store", &store]).stdout).unwrap();
    assert!(fsck.contains("0 damaged"), "{fsck}");
    let gc = String::from_utf8(lazystore(&["gc", "--store", &store]).stdout).unwrap();
    assert!(
        gc.contains("dropped 0 directories, 0 chunk lists, 0 chunks"),
        "{gc}"
    );

    let (server, grpc) = common::start(&["serve", "--listen", "127.0.0.1:0", "--store", &store]);
    // Through the service too, each base is counted once.
    let served = lazystore(&["stats", "--store", &grpc, "--summary"]).stdout;
    assert_eq!(stored_mb(&String::from_utf8(served).unwrap()), both);
    let mnt = work.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let cache = format!("redb://{}", work.path().join("cache.redb").display());
    let mount = Mount::start(&mnt, &grpc, &cache, &[]);
    for path in [&first, &rebuild] {
        let nar_hash = nix_cmd(["nix-store", "--query", "--hash", path]);
        let name = path.strip_prefix("/nix/store/").unwrap();
        assert_eq!(nix_hash_path(&mount.path.join(name)), nar_hash.trim());
    }
    mount.stop();
    server.stop();
}

/// `lazystore compact` killed (SIGKILL) part way, each time with a freshly
/// imported path to move: every path still renders to Nix's NarHash, fsck
/// finds nothing damaged, and a compaction run to its end leaves a store
/// fsck finds whole.
#[test]
fn a_compaction_killed_part_way_loses_nothing() {
    use std::time::Duration;

    let work = tempfile::tempdir().unwrap();
    let store = format!("redb://{}", work.path().join("store.redb").display());
    let mut paths = Vec::new();
    let mut killed_running = 0;
    let mut delay_ms = 40u64;
    for round in 0..24u64 {
        if killed_running == 8 {
            break;
        }
        let files = modules_from(20_000 + round * 1000, 40);
        let named: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), &b[..])).collect();
        let path = tree(&work.path().join(format!("lib{round}")), &named);
        common::ingest(&store, &[&path]);
        paths.push(path);
        let compact = ["compact", "--store", &store];
        if common::killed_part_way(&compact, Duration::from_millis(delay_ms)) {
            killed_running += 1;
            // Spread the next kill over another moment of the run.
            delay_ms = 5 + (delay_ms + 53) % 300;
        } else {
            delay_ms = delay_ms * 2 / 3;
        }
        let fsck = String::from_utf8(lazystore(&["fsck", "--store", &store]).stdout).unwrap();
        assert!(
            fsck.contains(&format!("{} paths", paths.len())) && fsck.contains("0 damaged"),
            "after round {round}: {fsck}"
        );
    }
    assert_eq!(
        killed_running, 8,
        "only {killed_running} compactions were running at their kill"
    );
    let done = String::from_utf8(lazystore(&["compact", "--store", &store]).stdout).unwrap();
    eprintln!("{killed_running} compactions killed while running; then {done}");
    let fsck = String::from_utf8(lazystore(&["fsck", "--store", &store]).stdout).unwrap();
    assert!(fsck.contains("0 damaged"), "{fsck}");
    // fsck rendered every path and checked it against its NarHash, which
    // the ingest took from Nix's own dump; and every path is still listed.
    let stats = String::from_utf8(lazystore(&["stats", "--store", &store]).stdout).unwrap();
    for path in &paths {
        assert!(stats.contains(path.as_str()), "{path} missing: {stats}");
    }
    let again = String::from_utf8(lazystore(&["compact", "--store", &store]).stdout).unwrap();
    assert!(again.contains(": 0 chunks"), "{again}");
}
