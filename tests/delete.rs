//! `lazystore delete` on a closure imported from a real-Nix binary cache
//! (c refers to b and a, b to a), through a served store: a path others
//! refer to is refused, naming them, and nothing is deleted; the top of
//! the closure is deleted and no longer found, its references stay;
//! `--recursive` deletes the referrers too; the write token is needed.

mod common;

use std::process::{Command, Output};

use common::start;
use lazystore_testkit::{build_closure, gen_key, make_cache};

fn lazystore(args: &[&str]) -> Output {
    Command::new(common::LAZYSTORE)
        .args(args)
        .env_remove("LAZYSTORE_TOKEN_FILE")
        .output()
        .unwrap()
}

#[test]
fn delete_refuses_what_others_need_unless_recursive() {
    let closure = build_closure();
    let dir = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(dir.path(), "delete-test-1");
    let cache = make_cache(&[closure.top()], "zstd", Some(&secret));
    let tokens = dir.path().join("write.tokens");
    std::fs::write(&tokens, "writer\n").unwrap();
    let token = tokens.to_str().unwrap();
    let store = format!("redb://{}/store.redb", dir.path().display());
    let (_server, url) = start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--store",
        &store,
        "--write-token-file",
        token,
    ]);
    let from = format!("file://{}", cache.path().display());
    let out = lazystore(&[
        "import",
        "--from",
        &from,
        "--trusted-public-key",
        &public,
        "--store",
        &url,
        "--token-file",
        token,
        closure.top(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found = |path: &str| {
        lazystore(&[
            "nix-db",
            "--store",
            &url,
            "--token-file",
            token,
            "--no-closure",
            path,
        ])
        .status
        .success()
    };
    let delete = |args: &[&str]| {
        let mut all = vec!["delete", "--store", &url, "--token-file", token];
        all.extend(args);
        lazystore(&all)
    };

    // a is needed by b and c.
    let out = delete(&[&closure.a]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&closure.b) && stderr.contains(&closure.c),
        "{stderr}"
    );
    assert!(stderr.contains("--recursive"), "{stderr}");
    assert!(closure.paths().iter().all(|p| found(p)));

    // Without the write token: refused.
    let out = lazystore(&["delete", "--store", &url, closure.top()]);
    assert!(!out.status.success());
    assert!(found(closure.top()));

    // c: nobody needs it.
    let out = delete(&[closure.top()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("deleted {}", closure.c)
    );
    assert!(!found(&closure.c));
    assert!(found(&closure.a) && found(&closure.b));

    // a with everything that needs it.
    let out = delete(&["--recursive", &closure.a]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&closure.a) && stdout.contains(&closure.b),
        "{stdout}"
    );
    assert!(!found(&closure.a) && !found(&closure.b));
}
