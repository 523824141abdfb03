//! Tokens end to end, with the real binary and real Nix. A `lazystore
//! serve` with --write-token-file and --read-token-file refuses an import
//! without a token, with a wrong one and with a read token, at once and
//! naming the URL and --token-file, and stores nothing; with a write token
//! (the second of its file) the import works. `nix-db` and a mount need a
//! read token.
//! A second `lazystore serve`, a binary cache in front of the first (the
//! token to reach it in its own --token-file), guards HTTP the same way:
//! `nix copy --from` needs a read token in a netrc file, `nix copy --to` a
//! write token; `nix-cache-info` stays open.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{LAZYSTORE, Mount, start};
use lazystore_castore::Digest;
use lazystore_castore::auth::Token;
use lazystore_pathinfo::{Store, StoreOptions, StorePath};
use lazystore_testkit::{build_closure, fresh_store, gen_key, make_cache, nix_output};

/// Writes `text` to `name` in `dir`.
fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `lazystore ARGS`, with `LAZYSTORE_TOKEN_FILE` set to `env_token` if
/// given (and unset otherwise, whatever the test's environment says).
fn lazystore(args: &[&str], env_token: Option<&Path>) -> Output {
    let mut command = Command::new(LAZYSTORE);
    command.args(args).env_remove("LAZYSTORE_TOKEN_FILE");
    if let Some(token) = env_token {
        command.env("LAZYSTORE_TOKEN_FILE", token);
    }
    command.output().unwrap()
}

/// The store paths a client holding `token` finds at `url`, and whether
/// it finds the blob of `contents`.
fn stored(url: &str, token: &Path, contents: &[u8]) -> (Vec<StorePath>, bool) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let options = StoreOptions {
            token: Some(Token::from_file(token).unwrap()),
            ..StoreOptions::default()
        };
        let store = Store::open(url, options).await.unwrap();
        let paths = listed_paths(&store).await;
        let blob = store.blobs.stat(&Digest::of(contents)).await.unwrap();
        (paths, blob.is_some())
    })
}

async fn listed_paths(store: &Store) -> Vec<StorePath> {
    use futures::TryStreamExt as _;
    store
        .path_infos
        .list()
        .map_ok(|info| info.store_path)
        .try_collect()
        .await
        .unwrap()
}

#[test]
fn grpc_and_http_need_their_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write_tokens = file(d, "write.tokens", "# rotating\nold-write\n\nnew-write\n");
    let read_tokens = file(d, "read.tokens", "read-1\n");
    let writer = file(d, "writer", "new-write\n");
    let reader = file(d, "reader", "# for the builders\nread-1\n");
    let wrong = file(d, "wrong", "guess\n");
    let store = format!("redb://{}/store.redb", d.display());
    let (grpc, url) = start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--store",
        &store,
        "--write-token-file",
        write_tokens.to_str().unwrap(),
        "--read-token-file",
        read_tokens.to_str().unwrap(),
    ]);

    let closure = build_closure();
    let (secret, public) = gen_key(d, "upstream-tokens");
    let cache = make_cache(&closure.paths(), "zstd", Some(&secret));
    let from = format!("file://{}", cache.path().display());
    let a_contents = std::fs::read(&closure.a).unwrap();
    let import = |token: Option<&Path>, env_token: Option<&Path>| {
        let mut args = vec![
            "import",
            "--from",
            &from,
            "--trusted-public-key",
            &public,
            "--store",
            &url,
        ];
        if let Some(token) = token {
            args.extend(["--token-file", token.to_str().unwrap()]);
        }
        args.push(closure.top());
        lazystore(&args, env_token)
    };

    // No token, a wrong one, a read token (from the environment): refused
    // at once (the client's retries would take 30 s), naming the URL and
    // the flag, and nothing is stored.
    for (token, env_token) in [
        (None, None),
        (Some(wrong.as_path()), None),
        (None, Some(reader.as_path())),
    ] {
        let started = Instant::now();
        let out = import(token, env_token);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{token:?} {env_token:?}: {stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        assert!(stderr.contains(&url), "{stderr}");
        assert!(stderr.contains("--token-file"), "{stderr}");
        assert!(stderr.contains("Unauthenticated"), "{stderr}");
        assert_eq!(stored(&url, &writer, &a_contents), (vec![], false));
    }
    // A file with no token is refused before anything is sent.
    let empty = file(d, "empty", "# nothing yet\n");
    let out = import(Some(&empty), None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(empty.to_str().unwrap()) && stderr.contains("holds no token"),
        "{stderr}"
    );

    // The write token imports.
    let out = import(Some(&writer), None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (paths, has_a) = stored(&url, &writer, &a_contents);
    assert_eq!(paths.len(), 3, "{paths:?}");
    assert!(has_a);

    // Reads need a read token (or a write token).
    let nix_db = |token: Option<&Path>| {
        let mut args = vec!["nix-db", "--store", &url, closure.top()];
        if let Some(token) = token {
            args.extend(["--token-file", token.to_str().unwrap()]);
        }
        lazystore(&args, None)
    };
    for token in [None, Some(wrong.as_path())] {
        let out = nix_db(token);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&url) && stderr.contains("--token-file"),
            "{stderr}"
        );
        assert!(out.stdout.is_empty());
    }
    for token in [&reader, &writer] {
        let out = nix_db(Some(token));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(closure.top()));
    }

    // A mount reads with a read token; without one, a lookup fails at once
    // and the mount's log says why.
    let a_name = closure.a.trim_start_matches("/nix/store/");
    let mountpoint = tempfile::tempdir().unwrap();
    let mount = Mount::start(
        mountpoint.path(),
        &url,
        "none",
        &["--token-file", reader.to_str().unwrap()],
    );
    assert_eq!(std::fs::read(mount.path.join(a_name)).unwrap(), a_contents);
    mount.stop();
    let mount = Mount::start(mountpoint.path(), &url, "none", &[]);
    let started = Instant::now();
    assert!(std::fs::read(mount.path.join(a_name)).is_err());
    assert!(started.elapsed() < Duration::from_secs(10));
    let log = mount.stop();
    assert!(log.contains("Unauthenticated"), "{log}");

    // A binary cache in front of the gRPC store, reaching it with a write
    // token, guarding its own reads and uploads with the same files.
    let (http, http_url) = start(&[
        "serve",
        "--http-listen",
        "127.0.0.1:0",
        "--store",
        &url,
        "--token-file",
        writer.to_str().unwrap(),
        "--write-token-file",
        write_tokens.to_str().unwrap(),
        "--read-token-file",
        read_tokens.to_str().unwrap(),
        "--allow-upload",
    ]);
    let host = http_url
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap();
    let netrc = |name: &str, password: &str| {
        file(
            d,
            name,
            &format!("machine {host} login nix password {password}\n"),
        )
    };
    let reader_netrc = netrc("reader.netrc", "read-1");
    let writer_netrc = netrc("writer.netrc", "new-write");
    let wrong_netrc = netrc("wrong.netrc", "guess");

    // nix copy --from, as a client that never saw this cache.
    let copy_from = |netrc: Option<&Path>| {
        let (fresh, fresh_url) = fresh_store();
        let home = tempfile::tempdir().unwrap();
        let mut command = lazystore_testkit::nix_command("nix");
        command
            .env("XDG_CACHE_HOME", home.path())
            .args(["copy", "--from", &http_url, "--to", &fresh_url])
            .args(["--option", "trusted-public-keys", &public]);
        if let Some(netrc) = netrc {
            command.args(["--option", "netrc-file", netrc.to_str().unwrap()]);
        }
        let out = command.arg(closure.top()).output().unwrap();
        (fresh, out)
    };
    for netrc in [None, Some(wrong_netrc.as_path())] {
        let (_fresh, out) = copy_from(netrc);
        assert!(
            !out.status.success(),
            "nix copy --from with {netrc:?} worked"
        );
    }
    for netrc in [&reader_netrc, &writer_netrc] {
        let (_fresh, out) = copy_from(Some(netrc));
        assert!(
            out.status.success(),
            "nix copy --from with {}: {}",
            netrc.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // nix copy --to needs a write token; a read token is not enough.
    let second = build_closure();
    let copy_to = |netrc: Option<&Path>| {
        let mut args = vec!["nix", "copy", "--to", &http_url];
        if let Some(netrc) = netrc {
            args.extend(["--option", "netrc-file", netrc.to_str().unwrap()]);
        }
        args.push(second.top());
        nix_output(args)
    };
    let second_a = std::fs::read(&second.a).unwrap();
    for netrc in [
        None,
        Some(wrong_netrc.as_path()),
        Some(reader_netrc.as_path()),
    ] {
        let out = copy_to(netrc);
        assert!(!out.status.success(), "nix copy --to with {netrc:?} worked");
        let (paths, has_a) = stored(&url, &writer, &second_a);
        assert_eq!((paths.len(), has_a), (3, false), "{netrc:?}");
    }
    let out = copy_to(Some(&writer_netrc));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (paths, has_a) = stored(&url, &writer, &second_a);
    assert_eq!((paths.len(), has_a), (6, true));

    // nix-cache-info stays open: Nix asks for it before anything else.
    let mut stream = TcpStream::connect(http_url.trim_start_matches("http://")).unwrap();
    write!(
        stream,
        "GET /nix-cache-info HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.contains("StoreDir: /nix/store"),
        "{reply}"
    );

    let log = http.stop();
    assert!(log.contains("status=401"), "{log}");
    let log = grpc.stop();
    assert!(log.contains("refused"), "{log}");
}
