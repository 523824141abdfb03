//! `lazystore import` as a user runs it: a real Nix closure from a signed
//! file:// cache, the summary on stdout, and a non-zero exit with a message
//! naming the path and the fix when a signature is not trusted.

use std::process::{Command, Output};

use lazystore_testkit::{build_closure, gen_key, make_cache};

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

#[test]
fn imports_a_closure_and_fails_on_untrusted_signatures() {
    let closure = build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = gen_key(keys.path(), "cli-test-1");
    let cache = make_cache(&[closure.top()], "zstd", Some(&secret));
    let url = format!("file://{}", cache.path().display());

    let out = lazystore(&[
        "import",
        "--from",
        &url,
        "--trusted-public-key",
        &public,
        "--store",
        "memory://",
        closure.top(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("paths: 3 imported, 0 already present, 0 deduplicated, 0 failed"),
        "{stdout}"
    );
    // Not a terminal: one plain line per imported path.
    for path in closure.paths() {
        assert!(stderr.contains(&format!("imported {path}")), "{stderr}");
    }

    // Trusting another key: every path fails, and the message says why and
    // what to do.
    let (_, other) = gen_key(keys.path(), "someone-else-1");
    let out = lazystore(&[
        "import",
        "--from",
        &url,
        "--trusted-public-key",
        &other,
        "--store",
        "memory://",
        closure.top(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&closure.c), "{stderr}");
    assert!(
        stderr.contains("no valid signature by a trusted key"),
        "{stderr}"
    );
    assert!(stderr.contains("--trusted-public-key"), "{stderr}");
    // Only the path asked for fails: its references are never learnt
    // from a narinfo that is not trusted.
    assert!(stderr.contains("1 of the paths failed"), "{stderr}");

    // --no-check-sigs imports, and says so.
    let out = lazystore(&[
        "import",
        "--from",
        &url,
        "--no-check-sigs",
        "--store",
        "memory://",
        closure.top(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("signature checks are off"), "{stderr}");
}

#[test]
fn unreachable_cache_is_a_clear_error() {
    let out = lazystore(&[
        "import",
        "--from",
        "file:///nonexistent/lazystore-cache",
        "--store",
        "memory://",
        "00bgd045z0d4icpbc2yyz4gx48ak44la-x",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("file:///nonexistent/lazystore-cache")
            && stderr.contains("not a Nix binary cache"),
        "{stderr}"
    );
}
