//! `lazystore nix-db`: the records of a closure imported into a store are
//! byte for byte what real Nix's `nix-store --dump-db` prints for the same
//! paths, dependencies first; a path may be named in full, by basename or
//! by hash; `--no-closure` prints one record; a path missing from the store
//! fails with a message naming it and the fix; with `--trusted-public-key`
//! the store's paths count only if a trusted key signed them. With
//! `--upstream`, paths the
//! store lacks are described by the cache's narinfos, only when signed by a
//! trusted key.

use std::process::{Command, Output};

use lazystore_testkit::{build_closure, gen_key, make_cache, nix_cmd};

fn lazystore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lazystore"))
        .args(args)
        .env(
            "LAZYSTORE_DIR",
            std::env::temp_dir().join("lazystore-cli-unused"),
        )
        .output()
        .expect("run lazystore")
}

fn ok(args: &[&str]) -> String {
    let out = lazystore(args);
    assert!(
        out.status.success(),
        "lazystore {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The store path of every record in `records`, in order.
fn record_paths(records: &str) -> Vec<String> {
    let mut lines = records.lines();
    let mut paths = Vec::new();
    while let Some(path) = lines.next() {
        paths.push(path.to_owned());
        let _hash = lines.next().unwrap();
        let _size = lines.next().unwrap();
        let _deriver = lines.next().unwrap();
        let count: usize = lines.next().unwrap().parse().unwrap();
        for _ in 0..count {
            lines.next().unwrap();
        }
    }
    paths
}

#[test]
fn records_are_what_nix_dump_db_prints() {
    let closure = build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "nix-db-test-1");
    let cache = make_cache(&[closure.top()], "none", Some(&secret));
    let dir = tempfile::tempdir().unwrap();
    let store = format!("redb://{}/store.redb", dir.path().display());
    ok(&[
        "import",
        "--from",
        &format!("file://{}", cache.path().display()),
        "--trusted-public-key",
        &public,
        "--store",
        &store,
        closure.top(),
    ]);

    let records = ok(&["nix-db", "--store", &store, closure.top()]);
    // Dependencies first: a, then b (refers to a), then c (refers to both).
    assert_eq!(record_paths(&records), closure.paths());
    let mut dump = vec!["nix-store", "--dump-db"];
    dump.extend(closure.paths());
    assert_eq!(records, nix_cmd(dump));

    // The other spellings of the same path.
    let basename = closure.c.strip_prefix("/nix/store/").unwrap();
    assert_eq!(ok(&["nix-db", "--store", &store, basename]), records);
    assert_eq!(ok(&["nix-db", "--store", &store, &basename[..32]]), records);
    // Named twice, printed once.
    assert_eq!(
        ok(&["nix-db", "--store", &store, closure.top(), &closure.a]),
        records
    );

    let one = ok(&["nix-db", "--store", &store, "--no-closure", &closure.b]);
    assert_eq!(one, nix_cmd(["nix-store", "--dump-db", &closure.b]));

    // Missing: named, with the fix.
    let missing = "/nix/store/00000000000000000000000000000000-not-imported";
    let out = lazystore(&["nix-db", "--store", &store, closure.top(), missing]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "printed records despite failing");
    assert!(stderr.contains(missing), "{stderr}");
    assert!(stderr.contains(&store), "{stderr}");
    assert!(stderr.contains("lazystore import"), "{stderr}");

    // Keys given, they guard the store too: its paths signed by a trusted
    // key are described, the others are not there.
    let (_, stranger) = gen_key(keys.path(), "nix-db-stranger-1");
    let trusted = ["nix-db", "--store", &store, "--trusted-public-key"];
    assert_eq!(
        ok(&[&trusted[..], &[&public, closure.top()]].concat()),
        records
    );
    let out = lazystore(&[&trusted[..], &[&stranger, closure.top()]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains(&closure.c) && stderr.contains("by a trusted key"),
        "{stderr}"
    );

    // An empty store and the cache as upstream: the same records.
    let empty = format!("redb://{}/empty.redb", dir.path().display());
    let upstream = format!("file://{}", cache.path().display());
    let from_upstream = [
        "nix-db",
        "--store",
        &empty,
        "--upstream",
        &upstream,
        "--trusted-public-key",
        &public,
        closure.top(),
    ];
    assert_eq!(ok(&from_upstream), records);

    // Signed by a key nobody trusts: refused, naming the path.
    let (_, other) = gen_key(keys.path(), "someone-else-1");
    let mut untrusted = from_upstream;
    untrusted[6] = &other;
    let out = lazystore(&untrusted);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(stderr.contains(&closure.c), "{stderr}");
    assert!(stderr.contains("signature"), "{stderr}");

    // In neither: both named.
    let mut neither = from_upstream;
    neither[7] = missing;
    let out = lazystore(&neither);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(missing), "{stderr}");
    assert!(stderr.contains(&upstream), "{stderr}");
}
