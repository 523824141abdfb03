//! `lazystore fsck` on a real closure imported from a real-Nix binary
//! cache: clean, it says so and exits 0; with the bytes of one chunk
//! flipped, it names exactly the path that chunk belongs to (and the
//! chunk), exits 1, and the other paths check out. Online, through a
//! `lazystore serve` of the store, it finds the same; `--repair --from`
//! the cache writes the chunk again, and the next check is clean.

mod common;

use std::process::{Command, Output};

use common::start;
use lazystore_castore::blobs::RedbBlobService;
use lazystore_castore::{Digest, RedbStore};
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
