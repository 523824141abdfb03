//! TLS end to end, with the real binary and real Nix. One `lazystore
//! serve --tls-cert --tls-key` serves gRPC and the binary cache over TLS
//! with a certificate from a test CA: `lazystore import` into its
//! `grpc+https://` URL with `--ca-file` works, a mount over `grpc+https://`
//! reads a file, and `nix copy --from https://…` with Nix's
//! `NIX_SSL_CERT_FILE` copies the closure and checks our signatures. A
//! cleartext client at the TLS listener and a client that does not trust
//! the certificate fail saying why and what to do.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{LAZYSTORE, Mount, start_lines};
use lazystore_testkit::tls::test_pki;
use lazystore_testkit::{build_closure, fresh_store, gen_key, make_cache, nix_cmd};

/// `lazystore ARGS`, with no client settings from the test's environment.
fn lazystore(args: &[&str]) -> Output {
    Command::new(LAZYSTORE)
        .args(args)
        .env_remove("LAZYSTORE_CA_FILE")
        .env_remove("LAZYSTORE_TOKEN_FILE")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn grpc_and_http_over_tls() {
    let pki = test_pki("lazystore");
    let ca = pki.ca.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let closure = build_closure();
    let (upstream_secret, upstream_public) = gen_key(d, "upstream-tls");
    let cache = make_cache(&closure.paths(), "zstd", Some(&upstream_secret));
    let from = format!("file://{}", cache.path().display());
    let (secret, public) = gen_key(d, "served-tls");
    let store = format!("redb://{}/store.redb", d.display());
    let (server, urls) = start_lines(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--store",
            &store,
            "--tls-cert",
            pki.cert.to_str().unwrap(),
            "--tls-key",
            pki.key.to_str().unwrap(),
            "--signing-key",
            secret.to_str().unwrap(),
        ],
        2,
    );
    let (grpc, http) = (&urls[0], &urls[1]);
    assert!(grpc.starts_with("grpc+https://127.0.0.1:"), "{grpc}");
    assert!(http.starts_with("https://127.0.0.1:"), "{http}");
    let import = |store: &str, extra: &[&str]| {
        let mut args = vec![
            "import",
            "--from",
            &from,
            "--trusted-public-key",
            &upstream_public,
            "--store",
            store,
        ];
        args.extend(extra);
        args.push(closure.top());
        lazystore(&args)
    };

    // Without --ca-file the server's certificate is not trusted: refused
    // at once (no retrying an answer that will not change), saying so.
    let started = Instant::now();
    let out = import(grpc, &[]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(4), "{err}");
    assert!(
        err.contains(grpc.as_str()) && err.contains("not trusted") && err.contains("--ca-file"),
        "{err}"
    );

    // A cleartext client at the TLS listener is told it may be TLS.
    let cleartext = grpc.replace("grpc+https://", "grpc+http://");
    let out = import(&cleartext, &["--ca-file", ca]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&cleartext) && err.contains("TLS") && err.contains("use grpc+https://"),
        "{err}"
    );

    // With the CA, the closure is imported.
    let out = import(grpc, &["--ca-file", ca]);
    assert!(out.status.success(), "{}", stderr(&out));

    // `nix-db` finds it, the CA from the environment this time.
    let out = Command::new(LAZYSTORE)
        .args(["nix-db", "--store", grpc, closure.top()])
        .env("LAZYSTORE_CA_FILE", ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&closure.a));

    // A mount over grpc+https:// reads a file.
    let a_name = closure.a.trim_start_matches("/nix/store/");
    let mountpoint = tempfile::tempdir().unwrap();
    let mount = Mount::start(mountpoint.path(), grpc, "none", &["--ca-file", ca]);
    assert_eq!(
        std::fs::read(mount.path.join(a_name)).unwrap(),
        std::fs::read(&closure.a).unwrap()
    );
    mount.stop();

    // At the HTTPS listener: a cleartext request fails its handshake, and
    // a client that connects and says nothing is dropped after the
    // handshake timeout; neither stops the server.
    let authority = http.trim_start_matches("https://");
    let mut plain = TcpStream::connect(authority).unwrap();
    plain
        .write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = plain.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    let silent = TcpStream::connect(authority).unwrap();
    let silent_since = Instant::now();

    // Nix over HTTPS, trusting the test CA (NIX_SSL_CERT_FILE: Nix 2.8
    // applies `--option ssl-cert-file` too late for its downloads): copies
    // the closure, checking our key's signatures.
    let (_to_dir, to) = fresh_store();
    let home = tempfile::tempdir().unwrap();
    let out = lazystore_testkit::nix_command("nix")
        .env("XDG_CACHE_HOME", home.path())
        .env("NIX_SSL_CERT_FILE", &pki.ca)
        .args(["copy", "--from", http, "--to", &to])
        .args(["--option", "trusted-public-keys", &public])
        .arg(closure.top())
        .output()
        .unwrap();
    assert!(out.status.success(), "nix copy: {}", stderr(&out));
    let paths = nix_cmd(["nix", "path-info", "--store", &to, "-r", closure.top()]);
    for path in closure.paths() {
        assert!(paths.lines().any(|p| p == path), "{path} missing:\n{paths}");
    }
    nix_cmd(["nix-store", "--store", &to, "--verify", "--check-contents"]);

    let mut silent = silent;
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(silent.read(&mut [0; 1]).unwrap_or(0), 0);
    let held = silent_since.elapsed();
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(20)).contains(&held),
        "{held:?}"
    );

    // The server took every refused handshake in its stride.
    let log = server.stop();
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn bad_certificate_files_are_named() {
    let pki = test_pki("files");
    let dir = tempfile::tempdir().unwrap();
    let serve = |cert: &Path, key: &Path, listen: &str| {
        lazystore(&[
            "serve",
            "--listen",
            listen,
            "--store",
            "memory://",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ])
    };
    // The key given as the certificate, a missing key, a key that is not
    // the certificate's (the CA's certificate with the server's key).
    let missing = dir.path().join("missing.pem");
    for (cert, key, named, says) in [
        (&pki.key, &pki.key, &pki.key, "holds no PEM certificate"),
        (&pki.cert, &missing, &missing, "cannot read TLS key"),
        (&pki.ca, &pki.key, &pki.ca, "is the key the one"),
    ] {
        let out = serve(cert, key, "127.0.0.1:0");
        let err = stderr(&out);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains(named.to_str().unwrap()) && err.contains(says),
            "{err}"
        );
    }
    // TLS on a Unix socket is refused, saying why.
    let socket = format!("unix:{}", dir.path().join("s.sock").display());
    let out = serve(&pki.cert, &pki.key, &socket);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("TCP listeners"), "{err}");
}
