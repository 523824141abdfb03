//! The server's door, end to end with the real binary and real Nix: a
//! `lazystore serve --trusted-public-key` publishes a PathInfo over gRPC
//! only if a trusted key signed it and the tree the server holds renders
//! to the signed NarHash. A writer holding the write token who stores a
//! tree with one byte changed and puts the signed PathInfo over it is
//! refused, nothing is published, and the server's log names the path and
//! the reason; unsigned or foreign-signed PathInfos are refused; the true
//! tree is published. `nix copy --to` the HTTP cache is held to the same
//! keys, and an upload over --max-upload-size gets 413 and stages nothing.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;

use common::start;
use lazystore_castore::auth::Token;
use lazystore_pathinfo::ingest::{Ingested, ingest_nar};
use lazystore_pathinfo::pathinfos::{PathInfo, PathInfoError};
use lazystore_pathinfo::{NarInfo, SigningKey, Store, StoreOptions, StorePath};
use lazystore_testkit::{build_closure, gen_key, make_cache, narinfo_files};

/// `nix-store --dump PATH`.
fn dump(path: &str) -> Vec<u8> {
    let out = std::process::Command::new("nix-store")
        .args(["--dump", path])
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

/// The narinfo of `path` in the cache at `cache`.
fn narinfo(cache: &Path, path: &str) -> NarInfo {
    let name = path.trim_start_matches("/nix/store/");
    let hash = &name[..32];
    let file = narinfo_files(cache)
        .into_iter()
        .find(|f| f.file_name().unwrap().to_str().unwrap().starts_with(hash))
        .unwrap();
    NarInfo::parse(&std::fs::read_to_string(file).unwrap()).unwrap()
}

/// The PathInfo a narinfo describes, over `tree`.
fn path_info(narinfo: &NarInfo, tree: &Ingested) -> PathInfo {
    PathInfo::from_narinfo(narinfo.clone(), tree.root.clone())
}

#[test]
fn only_signed_trees_are_published_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tokens = d.join("write.tokens");
    std::fs::write(&tokens, "writer-token\n").unwrap();
    let closure = build_closure();
    let (secret, public) = gen_key(d, "publish-trusted");
    let cache = make_cache(&[&closure.a], "none", Some(&secret));
    let (mut server, url) = start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--store",
        "memory://",
        "--write-token-file",
        tokens.to_str().unwrap(),
        "--trusted-public-key",
        &public,
    ]);

    let narinfo = narinfo(cache.path(), &closure.a);
    let true_nar = dump(&closure.a);
    // One byte of the file's contents changed.
    let contents = std::fs::read(&closure.a).unwrap();
    let at = true_nar
        .windows(contents.len())
        .position(|w| w == contents)
        .unwrap();
    let mut forged_nar = true_nar.clone();
    forged_nar[at] ^= 1;

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let options = StoreOptions {
            token: Some(Token::from_file(&tokens).unwrap()),
            ..StoreOptions::default()
        };
        let store = Store::open(&url, options).await.unwrap();
        let ingest = |nar: Vec<u8>| {
            let store = store.clone();
            async move {
                ingest_nar(&store.blobs, &*store.directories, &nar[..])
                    .await
                    .unwrap()
            }
        };
        let forged_tree = ingest(forged_nar).await;
        let true_tree = ingest(true_nar).await;
        let published = || async {
            store
                .path_infos
                .get(&narinfo.store_path.hash())
                .await
                .unwrap()
        };

        // The signed PathInfo over the forged tree: refused.
        let e = store
            .path_infos
            .put(path_info(&narinfo, &forged_tree))
            .await
            .unwrap_err();
        assert!(matches!(e, PathInfoError::NarMismatch { .. }), "{e}");
        assert!(e.to_string().contains("renders to a NAR"), "{e}");
        assert_eq!(published().await, None);

        // Unsigned, and signed by a key the server does not trust.
        let mut unsigned = path_info(&narinfo, &true_tree);
        unsigned.signatures.clear();
        let mut foreign = unsigned.clone();
        let stranger = SigningKey::generate("stranger-1").unwrap();
        foreign
            .signatures
            .push(stranger.sign(foreign.fingerprint()));
        for (info, says) in [(unsigned, "is not signed"), (foreign, "by a trusted key")] {
            let e = store.path_infos.put(info).await.unwrap_err();
            assert!(matches!(e, PathInfoError::Untrusted(_)), "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
        assert_eq!(published().await, None);

        // The true tree: published, as signed.
        let true_info = path_info(&narinfo, &true_tree);
        store.path_infos.put(true_info.clone()).await.unwrap();
        assert_eq!(published().await, Some(true_info));
    });

    // The log names the path and why, for each refusal.
    server.signal(libc::SIGTERM);
    server.child().wait().unwrap();
    let log = server.stderr();
    let refusals: Vec<_> = log
        .lines()
        .filter(|l| l.contains("refused") && l.contains(&narinfo.store_path.to_string()))
        .collect();
    assert_eq!(refusals.len(), 3, "{log}");
    assert!(refusals[0].contains("renders to a NAR"), "{log}");
}

/// `PUT path` with `body` and the write token.
fn put(addr: &str, path: &str, body: &[u8], chunked: bool) -> u16 {
    request(addr, "PUT", path, body, chunked)
}

/// `METHOD path` with `body`, `Content-Length` unless `chunked`, and the
/// write token: the answer's status code.
fn request(addr: &str, method: &str, path: &str, body: &[u8], chunked: bool) -> u16 {
    let mut stream = TcpStream::connect(addr).unwrap();
    let length = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {}", body.len())
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer writer-token\r\n\
         {length}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    // The server may answer (413) and close before the whole body is sent.
    let _ = if chunked {
        stream
            .write_all(format!("{:x}\r\n", body.len()).as_bytes())
            .and_then(|()| stream.write_all(body))
            .and_then(|()| stream.write_all(b"\r\n0\r\n\r\n"))
    } else {
        stream.write_all(body)
    };
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"))
}

#[test]
fn http_uploads_are_bounded_and_held_to_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tokens = d.join("write.tokens");
    std::fs::write(&tokens, "writer-token\n").unwrap();
    let closure = build_closure();
    let (secret, public) = gen_key(d, "publish-http");
    let cache = make_cache(&[&closure.a], "none", Some(&secret));
    let nar = dump(&closure.a);
    let narinfo_text = {
        let name = closure.a.trim_start_matches("/nix/store/");
        let file = narinfo_files(cache.path())
            .into_iter()
            .find(|f| {
                f.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with(&name[..32])
            })
            .unwrap();
        std::fs::read_to_string(file).unwrap()
    };
    let parsed = NarInfo::parse(&narinfo_text).unwrap();
    let limit = nar.len() as u64 - 1;
    let (_server, url) = start(&[
        "serve",
        "--http-listen",
        "127.0.0.1:0",
        "--store",
        "memory://",
        "--write-token-file",
        tokens.to_str().unwrap(),
        "--allow-upload",
        "--trusted-public-key",
        &public,
        "--max-upload-size",
        &limit.to_string(),
    ]);
    let addr = url.trim_start_matches("http://");
    let nar_url = format!("/{}", parsed.url);
    let narinfo_url = format!("/{}.narinfo", parsed.store_path.hash());

    // One byte over the limit, announced or not: 413, and nothing is
    // staged for the narinfo to publish (409: no NAR was uploaded).
    for chunked in [false, true] {
        assert_eq!(put(addr, &nar_url, &nar, chunked), 413);
        let status = put(addr, &narinfo_url, narinfo_text.as_bytes(), false);
        assert_eq!(status, 409, "chunked: {chunked}");
    }
    drop(_server);

    // Under the limit, `nix copy --to` publishes what the trusted key
    // signed, and is refused what it did not.
    let (_server, url) = start(&[
        "serve",
        "--http-listen",
        "127.0.0.1:0",
        "--store",
        "memory://",
        "--write-token-file",
        tokens.to_str().unwrap(),
        "--allow-upload",
        "--trusted-public-key",
        &public,
    ]);
    let netrc = d.join("netrc");
    let host = url.trim_start_matches("http://").split(':').next().unwrap();
    std::fs::write(&netrc, format!("machine {host} password writer-token\n")).unwrap();
    let copy_to = |path: &str| {
        lazystore_testkit::nix_command("nix")
            .args(["copy", "--to", &url, path])
            .args(["--option", "netrc-file", netrc.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = copy_to(&closure.a);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A path nobody signed (added now, unsigned).
    let unsigned_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        unsigned_dir.path().join("f"),
        format!("{:?}", std::time::SystemTime::now()),
    )
    .unwrap();
    let unsigned = lazystore_testkit::add_tree(unsigned_dir.path());
    let out = copy_to(&unsigned);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unsigned path was published");
    assert!(stderr.contains("403"), "{stderr}");
    let hash = StorePath::from_basename(unsigned.trim_start_matches("/nix/store/"))
        .unwrap()
        .hash();
    let addr = url.trim_start_matches("http://");
    let status = request(addr, "GET", &format!("/{hash}.narinfo"), b"", false);
    assert_eq!(status, 404);
}

#[test]
fn a_bad_signing_key_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such.secret");
    let garbage = dir.path().join("garbage.secret");
    std::fs::write(&garbage, "not a key\n").unwrap();
    for file in [&missing, &garbage] {
        let out = std::process::Command::new(common::LAZYSTORE)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--store",
                "memory://",
                "--sign-with",
            ])
            .arg(file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("--sign-with") && stderr.contains(file.to_str().unwrap()),
            "{stderr}"
        );
        assert!(
            stderr.contains("nix-store --generate-binary-cache-key"),
            "{stderr}"
        );
    }
}
