//! `lazystore serve --http-listen` as a Nix binary cache, with real Nix as
//! the client: `nix copy --from` into a fresh store with our key trusted
//! (and refused with another key), `nix store ls|cat`, `.ls` listings equal
//! to Nix's, Range requests on a NAR over 100 MB equal to `nix-store
//! --dump`, uploads with `nix copy --to` (and refused without the token),
//! 404s and `nix-cache-info`. The throughput benchmark against
//! `python3 -m http.server` is `bench_nar_throughput`, run by hand.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, start};
use lazystore_testkit::{
    Closure, build_closure, fresh_store, gen_key, make_cache, nix_cmd, nix_output, noise,
};

/// A closure imported from a signed file:// cache into a redb store.
struct Imported {
    dir: tempfile::TempDir,
    closure: Closure,
    store: String,
    /// The file:// cache Nix wrote (with `.ls` listings).
    cache: tempfile::TempDir,
}

fn imported() -> Imported {
    let dir = tempfile::tempdir().unwrap();
    let closure = build_closure();
    let (upstream_sk, upstream_pk) = gen_key(dir.path(), "upstream");
    let cache = make_cache(&closure.paths(), "xz", Some(&upstream_sk));
    let store = format!("redb://{}/store.redb", dir.path().display());
    let from = format!("file://{}", cache.path().display());
    let out = Command::new(common::LAZYSTORE)
        .args([
            "import",
            "--from",
            &from,
            "--trusted-public-key",
            &upstream_pk,
        ])
        .args(["--store", &store, closure.top()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lazystore import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Imported {
        dir,
        closure,
        store,
        cache,
    }
}

fn serve_http(store: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["serve", "--http-listen", "127.0.0.1:0", "--store", store];
    args.extend(extra);
    let (proc, url) = start(&args);
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    (proc, url)
}

/// `nix copy --from URL --to STORE PATH` trusting `key`, as a client that
/// never saw this cache: with a cache directory of its own, since Nix
/// keeps the narinfos it uploaded (unsigned) in its narinfo cache and would
/// read those back instead of ours.
fn nix_copy_from(url: &str, to: &str, key: &str, path: &str) -> std::process::Output {
    let home = tempfile::tempdir().unwrap();
    lazystore_testkit::nix_command("nix")
        .env("XDG_CACHE_HOME", home.path())
        .args(["copy", "--from", url, "--to", to])
        .args(["--option", "trusted-public-keys", key, path])
        .output()
        .unwrap()
}

fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The fresh store has all of `closure`, and Nix finds every path's
/// contents equal to its NarHash.
fn assert_verified(store_url: &str, closure: &Closure) {
    let paths = nix_cmd([
        "nix",
        "path-info",
        "--store",
        store_url,
        "-r",
        closure.top(),
    ]);
    for path in closure.paths() {
        assert!(paths.lines().any(|p| p == path), "{path} missing:\n{paths}");
    }
    let out = nix_output([
        "nix-store",
        "--store",
        store_url,
        "--verify",
        "--check-contents",
    ]);
    assert_ok(&out, "nix-store --verify --check-contents");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("modified") && !stderr.contains("error"),
        "{stderr}"
    );
}

#[test]
fn nix_copies_from_the_cache_with_our_key_only() {
    let imported = imported();
    let (ours_sk, ours_pk) = gen_key(imported.dir.path(), "ours");
    let (_, other_pk) = gen_key(imported.dir.path(), "other");
    let (server, url) = serve_http(
        &imported.store,
        &["--signing-key", ours_sk.to_str().unwrap()],
    );

    let (_wrong, wrong_url) = fresh_store();
    let out = nix_copy_from(&url, &wrong_url, &other_pk, imported.closure.top());
    assert!(
        !out.status.success(),
        "nix copy trusted a cache it has no key for"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lacks a valid signature"), "{stderr}");

    let (_fresh, fresh_url) = fresh_store();
    let out = nix_copy_from(&url, &fresh_url, &ours_pk, imported.closure.top());
    assert_ok(&out, "nix copy --from");
    assert_verified(&fresh_url, &imported.closure);
    server.stop();

    // The same through zstd NARs.
    let (server, url) = serve_http(
        &imported.store,
        &[
            "--signing-key",
            ours_sk.to_str().unwrap(),
            "--nar-compression",
            "zstd",
        ],
    );
    let narinfo = get(
        &url,
        &format!("/{}.narinfo", hash_of(imported.closure.top())),
        &[],
    );
    assert!(
        String::from_utf8_lossy(&narinfo.body).contains("Compression: zstd"),
        "{}",
        String::from_utf8_lossy(&narinfo.body)
    );
    let (_fresh, fresh_url) = fresh_store();
    let out = nix_copy_from(&url, &fresh_url, &ours_pk, imported.closure.top());
    assert_ok(&out, "nix copy --from (zstd)");
    assert_verified(&fresh_url, &imported.closure);
    server.stop();
}

/// gRPC and HTTP from one process: a closure imported through the gRPC
/// URL is at once a binary cache Nix substitutes from; one SIGTERM stops
/// both.
#[test]
fn grpc_and_http_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let closure = build_closure();
    let (upstream_sk, upstream_pk) = gen_key(dir.path(), "upstream");
    let cache = make_cache(&closure.paths(), "zstd", Some(&upstream_sk));
    let (ours_sk, ours_pk) = gen_key(dir.path(), "ours");
    let store = format!("redb://{}/store.redb", dir.path().display());
    let mut child = Command::new(common::LAZYSTORE)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--store",
            &store,
            "--signing-key",
            ours_sk.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let grpc = lines.next().unwrap().unwrap();
    let http = lines.next().unwrap().unwrap();
    assert!(grpc.starts_with("grpc+http://127.0.0.1:"), "{grpc}");
    assert!(http.starts_with("http://127.0.0.1:"), "{http}");

    let from = format!("file://{}", cache.path().display());
    let out = Command::new(common::LAZYSTORE)
        .args([
            "import",
            "--from",
            &from,
            "--trusted-public-key",
            &upstream_pk,
        ])
        .args(["--store", &grpc, closure.top()])
        .output()
        .unwrap();
    assert_ok(&out, "lazystore import through gRPC");
    let (_fresh, fresh_url) = fresh_store();
    let out = nix_copy_from(&http, &fresh_url, &ours_pk, closure.top());
    assert_ok(&out, "nix copy --from");
    assert_verified(&fresh_url, &closure);

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "lazystore serve exited with {status}");
}

#[test]
fn nix_store_ls_and_cat_and_listings() {
    let imported = imported();
    let (server, url) = serve_http(&imported.store, &[]);
    let top = imported.closure.top();

    let remote = nix_cmd(["nix", "store", "ls", "--store", &url, "-lR", top]);
    let local = nix_cmd(["nix", "store", "ls", "-lR", top]);
    assert_eq!(remote, local);
    assert!(remote.contains("./bin/hi"), "{remote}");
    let refs = format!("{top}/refs");
    assert_eq!(
        nix_cmd(["nix", "store", "cat", "--store", &url, &refs]),
        std::fs::read_to_string(&refs).unwrap()
    );

    // Our listings are the bytes Nix wrote for the same paths.
    for path in imported.closure.paths() {
        let hash = hash_of(path);
        let ours = get(&url, &format!("/{hash}.ls"), &[]);
        assert_eq!(ours.status, 200);
        let nix = std::fs::read(imported.cache.path().join(format!("{hash}.ls"))).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ours.body),
            String::from_utf8_lossy(&nix),
            "{path}"
        );
    }
    server.stop();
}

#[test]
fn not_found_cache_info_and_refused_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("redb://{}/store.redb", dir.path().display());
    let (server, url) = serve_http(&store, &["--priority", "7", "--want-mass-query", "false"]);
    let info = get(&url, "/nix-cache-info", &[]);
    assert_eq!(info.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&info.body),
        "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 7\n"
    );
    for path in [
        "/0c0j9j3kzqm9k6xqw0qjzs2n8cs9lfwk.narinfo",
        "/0c0j9j3kzqm9k6xqw0qjzs2n8cs9lfwk.ls",
        "/not-a-hash.narinfo",
        "/nar/0c0j9j3kzqm9k6xqw0qjzs2n8cs9lfwk-1b3pxvmbvcyr0prbqgb3d4bw3r3zbrc2ngjxnhkp88qpfvbrcqzh.nar",
        "/nar/whatever.nar.xz",
        "/log/x",
    ] {
        let response = get(&url, path, &[]);
        assert_eq!(response.status, 404, "{path}");
        let head = request(&url, "HEAD", path, &[], None);
        assert_eq!(head.status, 404, "HEAD {path}");
    }
    let put = request(
        &url,
        "PUT",
        "/0c0j9j3kzqm9k6xqw0qjzs2n8cs9lfwk.narinfo",
        &[("Authorization", "Bearer anything")],
        Some(b"StorePath: x\n"),
    );
    assert_eq!(put.status, 403);
    assert!(
        String::from_utf8_lossy(&put.body).contains("--allow-upload"),
        "{}",
        String::from_utf8_lossy(&put.body)
    );
    // The access log is on by default: a line per request, with its status.
    let log = server.stop();
    let line = log
        .lines()
        .find(|l| l.contains("path=/nix-cache-info"))
        .unwrap_or_else(|| panic!("no access log line for /nix-cache-info in:\n{log}"));
    assert!(
        line.contains("client=127.0.0.1:")
            && line.contains("method=GET")
            && line.contains("status=200")
            && line.contains("bytes=50"),
        "{line}"
    );
    assert!(
        log.contains("method=HEAD path=/log/x range=\"-\" status=404"),
        "{log}"
    );
}

#[test]
fn uploads_round_trip_with_the_token_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("redb://{}/store.redb", dir.path().display());
    let (ours_sk, ours_pk) = gen_key(dir.path(), "ours");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let (server, url) = serve_http(
        &store,
        &[
            "--allow-upload",
            "--upload-token-file",
            token_file.to_str().unwrap(),
            "--signing-key",
            ours_sk.to_str().unwrap(),
        ],
    );
    let host = url.trim_start_matches("http://");
    let host = host.split(':').next().unwrap();
    let netrc = |name: &str, password: &str| {
        let file = dir.path().join(name);
        std::fs::write(
            &file,
            format!("machine {host} login nix password {password}\n"),
        )
        .unwrap();
        file
    };
    let right = netrc("right.netrc", "s3cret-token");
    let wrong = netrc("wrong.netrc", "guess");
    let closure = build_closure();
    let copy_to = |to: &str, netrc: Option<&Path>| {
        let mut args = vec![
            "nix".to_owned(),
            "copy".to_owned(),
            "--to".to_owned(),
            to.to_owned(),
        ];
        if let Some(netrc) = netrc {
            args.extend([
                "--option".into(),
                "netrc-file".into(),
                netrc.display().to_string(),
            ]);
        }
        args.push(closure.top().to_owned());
        nix_output(args)
    };

    for netrc in [None, Some(wrong.as_path())] {
        let out = copy_to(&url, netrc);
        assert!(
            !out.status.success(),
            "an upload without the token was taken"
        );
        let narinfo = get(&url, &format!("/{}.narinfo", hash_of(closure.top())), &[]);
        assert_eq!(narinfo.status, 404);
    }

    // xz, Nix's default, and zstd.
    assert_ok(&copy_to(&url, Some(&right)), "nix copy --to (xz)");
    let second = build_closure();
    let out = nix_output([
        "nix",
        "copy",
        "--to",
        &format!("{url}?compression=zstd"),
        "--option",
        "netrc-file",
        right.to_str().unwrap(),
        second.top(),
    ]);
    assert_ok(&out, "nix copy --to (zstd)");

    for closure in [&closure, &second] {
        let (_fresh, fresh_url) = fresh_store();
        let out = nix_copy_from(&url, &fresh_url, &ours_pk, closure.top());
        assert_ok(&out, "nix copy --from after the upload");
        assert_verified(&fresh_url, closure);
    }

    // A narinfo whose NAR was never uploaded, and one that lies about it.
    let bearer = [("Authorization", "Bearer s3cret-token")];
    let narinfo = get(&url, &format!("/{}.narinfo", hash_of(closure.top())), &[]);
    let text = String::from_utf8(narinfo.body).unwrap();
    let put = request(
        &url,
        "PUT",
        &format!("/{}.narinfo", hash_of(closure.top())),
        &bearer,
        Some(text.as_bytes()),
    );
    assert_eq!(put.status, 409, "{}", String::from_utf8_lossy(&put.body));
    server.stop();
}

/// A store path of more than 100 MB of NAR: big files, many small ones.
fn large_path(dir: &Path) -> String {
    let tree = dir.join("large");
    std::fs::create_dir_all(tree.join("small")).unwrap();
    std::fs::write(tree.join("a-big"), noise(48 << 20, 1)).unwrap();
    std::fs::write(tree.join("b-big"), noise(40 << 20, 2)).unwrap();
    for i in 0..300u64 {
        std::fs::write(
            tree.join(format!("small/{i:03}")),
            noise(1000 + (i as usize * 997) % 50_000, i),
        )
        .unwrap();
    }
    std::fs::write(tree.join("z-last"), noise(14 << 20, 3)).unwrap();
    lazystore_testkit::add_tree(&tree)
}

/// Ingests `paths` (from the local Nix store) into the store at `url` and
/// publishes them, in this process.
fn ingest(url: &str, paths: &[&str]) {
    common::ingest(url, paths);
}

/// The NAR URL the narinfo of `path` names.
fn nar_url(url: &str, path: &str) -> String {
    let narinfo = get(url, &format!("/{}.narinfo", hash_of(path)), &[]);
    assert_eq!(narinfo.status, 200);
    let text = String::from_utf8(narinfo.body).unwrap();
    let nar = text
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned();
    format!("/{nar}")
}

#[test]
fn range_requests_seek_in_a_large_nar() {
    let dir = tempfile::tempdir().unwrap();
    let path = large_path(dir.path());
    let nar = nix_output(["nix-store", "--dump", &path]).stdout;
    assert!(nar.len() > 100 << 20, "{} bytes", nar.len());
    let store = format!("redb://{}/store.redb", dir.path().display());
    ingest(&store, &[&path]);
    let (server, url) = serve_http(&store, &[]);
    let nar_path = nar_url(&url, &path);
    let n = nar.len() as u64;

    let head = request(&url, "HEAD", &nar_path, &[], None);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some(n.to_string().as_str()));
    assert_eq!(head.header("accept-ranges"), Some("bytes"));

    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = |bound: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % bound
    };
    for i in 0..100 {
        let start = next(n);
        let len = 1 + next((n - start).min(if i % 10 == 0 { 8 << 20 } else { 256 << 10 }));
        let end = start + len;
        let range = format!("bytes={start}-{}", end - 1);
        let response = get(&url, &nar_path, &[("Range", &range)]);
        assert_eq!(response.status, 206, "{range}");
        assert_eq!(
            response.header("content-range"),
            Some(format!("bytes {start}-{}/{n}", end - 1).as_str())
        );
        assert!(
            response.body == nar[start as usize..end as usize],
            "{range}: bytes differ from nix-store --dump"
        );
    }
    let tail = get(&url, &nar_path, &[("Range", "bytes=-1000")]);
    assert!(tail.body == nar[nar.len() - 1000..]);
    let from = get(
        &url,
        &nar_path,
        &[("Range", &format!("bytes={}-", n - 5000))],
    );
    assert!(from.body == nar[nar.len() - 5000..]);
    let past = get(&url, &nar_path, &[("Range", &format!("bytes={n}-"))]);
    assert_eq!(past.status, 416);
    assert_eq!(
        past.header("content-range"),
        Some(format!("bytes */{n}").as_str())
    );

    // First byte near the end comes as soon as near the start: the server
    // seeks instead of rendering what comes before.
    let (near_start, near_end) = first_byte_times(&url, &nar_path, n, 9);
    eprintln!("first byte: near the start {near_start:?}, near the end {near_end:?}");
    assert!(
        near_end <= near_start * 2 + Duration::from_millis(20),
        "first byte near the end {near_end:?}, near the start {near_start:?}"
    );
    server.stop();
}

/// Median first-byte times of 64 KiB ranges near the start and near the
/// end of the NAR, alternating, after one warm-up of each.
fn first_byte_times(url: &str, nar_path: &str, n: u64, samples: usize) -> (Duration, Duration) {
    let range_at = |start: u64| format!("bytes={start}-{}", start + (64 << 10) - 1);
    let (early, late) = (range_at(1 << 20), range_at(n - (2 << 20)));
    get(url, nar_path, &[("Range", &early)]);
    get(url, nar_path, &[("Range", &late)]);
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    for _ in 0..samples {
        starts.push(get(url, nar_path, &[("Range", &early)]).first_byte);
        ends.push(get(url, nar_path, &[("Range", &late)]).first_byte);
    }
    starts.sort();
    ends.sort();
    (starts[samples / 2], ends[samples / 2])
}

/// Benchmark, run by hand (release build): `cargo test --release --test
/// http_cache -- --ignored --nocapture bench_nar_throughput`. Serves the
/// same NAR (about 1 GiB) from lazystore and from `python3 -m
/// http.server` over the file `nix-store --dump` wrote, fetches it whole
/// three times from each over loopback, and prints a table.
#[test]
#[ignore]
fn bench_nar_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("bench");
    std::fs::create_dir_all(tree.join("files")).unwrap();
    for i in 0..8u64 {
        std::fs::write(tree.join(format!("big{i}")), noise(100 << 20, 10 + i)).unwrap();
    }
    for i in 0..2000u64 {
        std::fs::write(
            tree.join(format!("files/{i:04}")),
            noise(4096 + (i as usize * 7919) % 200_000, i),
        )
        .unwrap();
    }
    let path = lazystore_testkit::add_tree(&tree);
    let nar_file = dir.path().join("path.nar");
    let out = nix_output(["nix-store", "--dump", &path]).stdout;
    std::fs::write(&nar_file, &out).unwrap();
    let n = out.len() as u64;
    drop(out);
    let store = format!("redb://{}/store.redb", dir.path().display());
    ingest(&store, &[&path]);

    let (server, url) = serve_http(&store, &[]);
    let nar_path = nar_url(&url, &path);
    let mut python = Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", "0"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(python.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "Serving HTTP on 127.0.0.1 port PORT (http://127.0.0.1:PORT/) ..."
    let port = line
        .split("port ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let python_url = format!("http://127.0.0.1:{port}");

    // MB/s of NAR; a zstd body (chunked) is not the NAR's length.
    let fetch = |url: &str, path: &str| -> f64 {
        let t = Instant::now();
        let got = fetch_discard(url, path);
        let secs = t.elapsed().as_secs_f64();
        if !path.ends_with(".zst") {
            assert_eq!(got, n, "{url}{path}");
        }
        n as f64 / secs / 1e6
    };
    let runs = 3;
    let ours: Vec<f64> = (0..runs).map(|_| fetch(&url, &nar_path)).collect();
    let theirs: Vec<f64> = (0..runs).map(|_| fetch(&python_url, "/path.nar")).collect();
    let zstd_path = format!("{nar_path}.zst");
    let zstd: Vec<f64> = (0..runs).map(|_| fetch(&url, &zstd_path)).collect();
    let (near_start, near_end) = first_byte_times(&url, &nar_path, n, 15);
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    println!(
        "\nNAR of {:.2} GB, loopback, {runs} runs each (best):\n",
        n as f64 / 1e9
    );
    println!("| server | MB/s |");
    println!("|---|---|");
    println!(
        "| lazystore serve --http-listen (rendered from redb) | {:.0} |",
        best(&ours)
    );
    println!(
        "| python3 -m http.server (the NAR file) | {:.0} |",
        best(&theirs)
    );
    println!(
        "| ratio lazystore / python | {:.2} |",
        best(&ours) / best(&theirs)
    );
    println!(
        "| lazystore, the .nar.zst (zstd level 3 as it streams) | {:.0} |",
        best(&zstd)
    );
    println!(
        "\nfirst byte of a 64 KiB range: near the start {:.2} ms, near the end {:.2} ms",
        near_start.as_secs_f64() * 1e3,
        near_end.as_secs_f64() * 1e3
    );
    println!("all runs: lazystore {ours:.0?}, python {theirs:.0?}, zstd {zstd:.0?}");
    let _ = python.kill();
    let _ = python.wait();
    server.stop();
}

/// Fetches `path` whole and returns how many body bytes came.
fn fetch_discard(url: &str, path: &str) -> u64 {
    let mut stream = connect(url);
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        authority(url)
    )
    .unwrap();
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let got = reader.read(&mut buf).unwrap();
        if got == 0 {
            return total;
        }
        total += got as u64;
    }
}

fn hash_of(path: &str) -> &str {
    &path.trim_start_matches("/nix/store/")[..32]
}

fn authority(url: &str) -> &str {
    url.trim_start_matches("http://").trim_end_matches('/')
}

fn connect(url: &str) -> TcpStream {
    let stream = TcpStream::connect(authority(url)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    stream
}

/// An HTTP response, read whole.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// From sending the request to the first byte of the body (or the end
    /// of the headers, when there is no body).
    first_byte: Duration,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn get(url: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    request(url, "GET", path, headers, None)
}

/// One HTTP/1.1 request on a new connection (`Connection: close`), with a
/// plain client, so that the tests see exactly what the server sends.
fn request(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut stream = connect(url);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        authority(url)
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let sent = Instant::now();
    stream.write_all(head.as_bytes()).unwrap();
    if let Some(body) = body {
        stream.write_all(body).unwrap();
    }
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut first_byte = None;
    let mut header_end = None;
    loop {
        let got = stream.read(&mut buf).unwrap();
        if got == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..got]);
        if header_end.is_none() {
            header_end = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
        }
        if first_byte.is_none()
            && let Some(end) = header_end
            && (raw.len() > end || method == "HEAD")
        {
            first_byte = Some(sent.elapsed());
        }
    }
    let end = header_end.unwrap_or_else(|| panic!("{method} {path}: no response headers"));
    let text = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
        first_byte: first_byte.unwrap_or_else(|| sent.elapsed()),
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = std::str::from_utf8(&data[..line_end]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
