//! The HTTP cache in process, over loopback, with a plain client: a NAR
//! whose data is missing breaks the response instead of ending it short and
//! complete-looking; a request holds its slot until its body is sent, so
//! the limit bounds downloads, not just handlers; uploads that lie about
//! their NAR publish nothing; a client that stops reading is cut off and
//! frees its slot; equal NarHashes of different trees are served apart;
//! HEAD answers as GET does.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use lazystore_castore::auth::{Access, Tokens};
use lazystore_castore::blobs::{
    BlobObserver, EncodedChunk, MemoryBlobService, ObservedBlobService,
};
use lazystore_castore::{Blobs, ChunkerParams, Digest, Node};
use lazystore_httpcache::{HttpCache, Options, serve_with_send_timeout};
use lazystore_pathinfo::pathinfos::PathInfo;
use lazystore_pathinfo::{NarInfo, Signature, SigningKey, Store, StorePath};
use lazystore_testkit::noise;
use tokio::net::TcpListener;

/// Access where writes need `token` (one of a file's tokens) and reads
/// are open.
fn writers(token: &str) -> Access {
    let file = format!("# the old one\nold-token\n{token}\n");
    Access {
        read: None,
        write: Some(Tokens::parse(std::path::Path::new("write.tokens"), &file).unwrap()),
    }
}

struct Running {
    addr: String,
    runtime: tokio::runtime::Runtime,
    store: Store,
}

fn start(options: Options) -> Running {
    start_with(options, lazystore_httpcache::SEND_TIMEOUT)
}

fn start_with(options: Options, send_timeout: Duration) -> Running {
    start_on(Store::memory(), options, send_timeout)
}

fn start_on(store: Store, options: Options, send_timeout: Duration) -> Running {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cache = HttpCache::new(store.clone(), options);
    runtime.spawn(serve_with_send_timeout(
        listener,
        cache,
        std::future::pending(),
        send_timeout,
    ));
    Running {
        addr,
        runtime,
        store,
    }
}

/// A store path named `name`, whose hash is made from the name, so that
/// paths of different names are different paths.
fn path(name: &str) -> StorePath {
    const NIXBASE32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let hash: String = blake3::hash(name.as_bytes()).as_bytes()[..32]
        .iter()
        .map(|b| NIXBASE32[usize::from(b % 32)] as char)
        .collect();
    StorePath::from_basename(&format!("{hash}-{name}")).unwrap()
}

/// The NarHash every published path claims.
const NAR_SHA256: [u8; 32] = [7; 32];

/// Publishes `root` as a path with a NAR of `nar_size` bytes.
fn publish(running: &Running, name: &str, root: Node, nar_size: u64) -> StorePath {
    publish_signed(running, name, root, nar_size, Vec::new())
}

/// [`publish`], with signatures.
fn publish_signed(
    running: &Running,
    name: &str,
    root: Node,
    nar_size: u64,
    signatures: Vec<Signature>,
) -> StorePath {
    let store_path = path(name);
    running
        .runtime
        .block_on(running.store.path_infos.put(PathInfo {
            store_path: store_path.clone(),
            root,
            references: Vec::new(),
            nar_size,
            nar_sha256: NAR_SHA256,
            signatures,
            deriver: None,
            ca: None,
        }))
        .unwrap();
    store_path
}

fn nar_url(running: &Running, store_path: &StorePath) -> String {
    let (status, body) = get(
        &running.addr,
        &format!("/{}.narinfo", store_path.hash_str()),
    );
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let url = text.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
    format!("/{url}")
}

fn send(addr: &str, request: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    stream
}

/// Status and body of a GET; the body is whatever came before the server
/// closed the connection.
fn get(addr: &str, path: &str) -> (u16, Vec<u8>) {
    let mut stream = send(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    );
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let status = String::from_utf8_lossy(&raw[9..12]).parse().unwrap();
    (status, raw[end..].to_vec())
}

#[test]
fn missing_data_breaks_the_response() {
    let running = start(Options::default());
    // A file whose blob is not stored: the NAR of 1,000 bytes of contents
    // is 1,112 bytes, and none of it can be rendered past the header.
    let root = Node::File {
        digest: Digest::from(blake3::hash(b"not stored")),
        size: 1000,
        executable: false,
    };
    let store_path = publish(&running, "missing", root, 1112);
    let url = nar_url(&running, &store_path);
    let (status, body) = get(&running.addr, &url);
    assert_eq!(status, 200);
    assert!(body.len() < 1112, "a broken NAR was sent whole");
    let mut stream = send(
        &running.addr,
        &format!(
            "GET {url} HTTP/1.1\r\nHost: x\r\nRange: bytes=500-999\r\nConnection: close\r\n\r\n"
        ),
    );
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 206"), "{text}");
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(raw.len() - end < 500, "a broken range was sent whole");
}

#[test]
fn a_request_holds_its_slot_until_its_body_is_sent() {
    let running = start(Options {
        max_requests: 1,
        ..Options::default()
    });
    let data = noise(48 << 20, 9);
    let digest = running
        .runtime
        .block_on(running.store.blobs.put(&data))
        .unwrap();
    let root = Node::File {
        digest,
        size: data.len() as u64,
        executable: false,
    };
    let store_path = publish(&running, "big", root, data.len() as u64 + 112);
    let url = nar_url(&running, &store_path);

    // A download nobody reads: it keeps the only slot while its body waits.
    let mut stalled = send(
        &running.addr,
        &format!("GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    );
    let mut first = [0u8; 1];
    stalled.read_exact(&mut first).unwrap();
    let mut waiting = send(
        &running.addr,
        "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    waiting
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut reply = Vec::new();
    let err = waiting.read_to_end(&mut reply).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    assert!(reply.is_empty(), "answered while the slot was taken");

    // The stalled client goes away: its slot is free, the waiting request
    // is answered.
    drop(stalled);
    waiting
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    waiting.read_to_end(&mut reply).unwrap();
    assert!(
        String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
}

#[test]
fn uploads_that_do_not_match_publish_nothing() {
    let running = start(Options {
        allow_upload: true,
        access: writers("t0ken"),
        ..Options::default()
    });
    let put = |path: &str, auth: &str, body: &[u8]| -> u16 {
        let mut stream = send(
            &running.addr,
            &format!(
                "PUT {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            ),
        );
        stream.write_all(body).unwrap();
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        String::from_utf8_lossy(&raw[9..12]).parse().unwrap()
    };
    // A NAR of one file, "hi".
    let mut nar = Vec::new();
    for token in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"hi",
        b")",
    ] {
        nar.extend_from_slice(&(token.len() as u64).to_le_bytes());
        nar.extend_from_slice(token);
        nar.resize(nar.len().next_multiple_of(8), 0);
    }
    let bearer = "Authorization: Bearer t0ken\r\n";
    let stored = || {
        running
            .runtime
            .block_on(running.store.blobs.stat(&Digest::of(b"hi")))
            .unwrap()
            .is_some()
    };
    assert_eq!(put("/nar/abc.nar", "", &nar), 401);
    assert_eq!(
        put("/nar/abc.nar", "Authorization: Bearer nope\r\n", &nar),
        403
    );
    // A read token's worth, or the token under another scheme: refused.
    assert_eq!(
        put("/nar/abc.nar", "Authorization: Digest t0ken\r\n", &nar),
        403
    );
    assert!(!stored(), "a refused upload stored its file");
    // user:t0ken
    assert_eq!(
        put(
            "/nar/abc.nar",
            "Authorization: Basic dXNlcjp0MGtlbg==\r\n",
            &nar
        ),
        200
    );
    assert!(stored());
    assert_eq!(put("/nar/abc.nar.lz4", bearer, &nar), 415);
    assert_eq!(put("/nar/bad.nar", bearer, b"not a nar"), 400);

    let store_path = path("hi");
    let narinfo = |nar_size: usize| {
        format!(
            "StorePath: {}\nURL: nar/abc.nar\nCompression: none\nNarHash: sha256:1b3pxvmbvcyr0prbqgb3d4bw3r3zbrc2ngjxnhkp88qpfvbrcqzh\nNarSize: {nar_size}\nReferences: \n",
            store_path.to_absolute()
        )
    };
    let narinfo_url = format!("/{}.narinfo", store_path.hash_str());
    // The staged NAR does not have that NarHash: refused, each time.
    assert_eq!(
        put(&narinfo_url, bearer, narinfo(nar.len()).as_bytes()),
        409
    );
    assert_eq!(
        put(&narinfo_url, bearer, narinfo(nar.len()).as_bytes()),
        409
    );
    assert_eq!(get(&running.addr, &narinfo_url).0, 404);
    // A narinfo for another path than its file name.
    assert_eq!(
        put(
            "/00000000000000000000000000000000.narinfo",
            bearer,
            narinfo(nar.len()).as_bytes()
        ),
        400
    );
}

/// Status and headers of a HEAD.
fn head(addr: &str, path: &str) -> (u16, String) {
    let mut stream = send(
        addr,
        &format!("HEAD {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    );
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    (text[9..12].parse().unwrap(), text)
}

/// A file of `data`, stored.
fn stored_file(running: &Running, data: &[u8]) -> Node {
    let digest = running
        .runtime
        .block_on(running.store.blobs.put(data))
        .unwrap();
    Node::File {
        digest,
        size: data.len() as u64,
        executable: false,
    }
}

fn stored_dir(running: &Running, dir: lazystore_castore::Directory) -> Node {
    let node = Node::directory(&dir);
    running
        .runtime
        .block_on(running.store.directories.put(dir))
        .unwrap();
    node
}

/// A client that asks for a NAR and never reads is cut off after the send
/// timeout, and its slot goes to the next request.
#[test]
fn a_client_that_stops_reading_loses_its_slot() {
    let running = start_with(
        Options {
            max_requests: 1,
            ..Options::default()
        },
        Duration::from_secs(1),
    );
    let data = noise(48 << 20, 9);
    let root = stored_file(&running, &data);
    let store_path = publish(&running, "big", root, data.len() as u64 + 112);
    let url = nar_url(&running, &store_path);

    let mut stalled = send(
        &running.addr,
        &format!("GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    );
    let mut first = [0u8; 1];
    stalled.read_exact(&mut first).unwrap();
    let started = std::time::Instant::now();
    let mut waiting = send(
        &running.addr,
        "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let mut reply = Vec::new();
    waiting.read_to_end(&mut reply).unwrap();
    assert!(
        String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(20),
        "answered after {waited:?}"
    );
    // The stalled connection was closed: reading it ends, short.
    stalled
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    assert!((rest.len() as u64) < data.len() as u64, "sent whole");
    drop(stalled);
}

/// Two PathInfos with the same NarHash and NarSize but different trees (a
/// gRPC client can write both): each path's NAR, ranges and listing come
/// from its own tree.
#[test]
fn equal_nar_hashes_of_different_trees_are_served_apart() {
    let running = start(Options::default());
    let one = noise(4096, 1);
    let two = noise(4096, 2);
    let first = publish(&running, "one", stored_file(&running, &one), 4096 + 112);
    let second = publish(&running, "two", stored_file(&running, &two), 4096 + 112);
    for (store_path, data) in [(&first, &one), (&second, &two), (&first, &one)] {
        let url = nar_url(&running, store_path);
        let (status, body) = get(&running.addr, &url);
        assert_eq!(status, 200);
        assert_eq!(body.len(), 4096 + 112);
        assert!(
            body[96..96 + 4096] == data[..],
            "{store_path}: another tree's NAR"
        );
    }
}

/// HEAD answers with GET's status: a listing GET refuses (names that are
/// not UTF-8) is 404 to HEAD too, and a tree whose NAR is not NarSize
/// long is a 500 to HEAD and GET, uncompressed and zstd alike.
#[test]
fn head_answers_as_get_does() {
    let running = start(Options::default());
    let mut dir = lazystore_castore::Directory::new();
    dir.add(
        (&b"caf\xe9"[..]).try_into().unwrap(),
        stored_file(&running, b"x"),
    )
    .unwrap();
    let root = stored_dir(&running, dir);
    let latin1 = publish(&running, "latin1", root, 0);
    let ls = format!("/{}.ls", latin1.hash_str());
    assert_eq!(get(&running.addr, &ls).0, 404);
    assert_eq!(head(&running.addr, &ls).0, 404);

    let data = noise(4096, 3);
    let wrong = publish(&running, "wrong", stored_file(&running, &data), 4096 + 113);
    let url = nar_url(&running, &wrong);
    let zst = format!("{url}.zst");
    for url in [&url, &zst] {
        assert_eq!(get(&running.addr, url).0, 500, "GET {url}");
        let (status, text) = head(&running.addr, url);
        assert_eq!(status, 500, "HEAD {url}: {text}");
    }

    // A good path: HEAD and GET agree on 200 and the length.
    let good = publish(&running, "good", stored_file(&running, &data), 4096 + 112);
    let url = nar_url(&running, &good);
    let (status, text) = head(&running.addr, &url);
    assert_eq!(status, 200);
    assert!(
        text.to_ascii_lowercase().contains("content-length: 4208"),
        "{text}"
    );
    let ls = format!("/{}.ls", good.hash_str());
    assert_eq!(head(&running.addr, &ls).0, 200);
    let (status, body) = get(&running.addr, &ls);
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("\"narOffset\":96"));
}

/// A narinfo refused because a reference is not here yet leaves its NAR
/// staged: once the reference is uploaded, the same narinfo publishes.
#[test]
fn a_narinfo_refused_for_a_missing_reference_can_be_sent_again() {
    use sha2::Digest as _;
    let running = start(Options {
        allow_upload: true,
        access: writers("t0ken"),
        ..Options::default()
    });
    let put = |path: &str, body: &[u8]| -> (u16, String) {
        let mut stream = send(
            &running.addr,
            &format!(
                "PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            ),
        );
        stream.write_all(body).unwrap();
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw).into_owned();
        (text[9..12].parse().unwrap(), text)
    };
    let mut nar = Vec::new();
    for token in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"hi",
        b")",
    ] {
        nar.extend_from_slice(&(token.len() as u64).to_le_bytes());
        nar.extend_from_slice(token);
        nar.resize(nar.len().next_multiple_of(8), 0);
    }
    let nar_hash: [u8; 32] = sha2::Sha256::digest(&nar).into();
    assert_eq!(put("/nar/hi.nar", &nar).0, 200);

    let store_path = path("hi");
    let dependency = path("dependency");
    let narinfo = format!(
        "StorePath: {}\nURL: nar/hi.nar\nCompression: none\nNarHash: sha256:{}\nNarSize: {}\nReferences: {}\n",
        store_path.to_absolute(),
        lazystore_pathinfo::nixbase32::encode(&nar_hash),
        nar.len(),
        dependency,
    );
    let narinfo_url = format!("/{}.narinfo", store_path.hash_str());
    let (status, text) = put(&narinfo_url, narinfo.as_bytes());
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("upload it first"), "{text}");
    assert_eq!(get(&running.addr, &narinfo_url).0, 404);

    // The reference arrives; the same narinfo now publishes.
    publish(&running, "dependency", stored_file(&running, b"x"), 120);
    let (status, text) = put(&narinfo_url, narinfo.as_bytes());
    assert_eq!(status, 200, "{text}");
    assert_eq!(get(&running.addr, &narinfo_url).0, 200);
    let (status, body) = get(&running.addr, &nar_url(&running, &store_path));
    assert_eq!(status, 200);
    assert!(body == nar);
    // Published, the NAR is no longer staged.
    let (status, text) = put(&narinfo_url, narinfo.as_bytes());
    assert_eq!(status, 409, "{text}");
}

/// A narinfo answers HEAD as GET, keeps the signatures the path came with
/// and adds ours: Nix can check both.
#[test]
fn narinfos_keep_upstream_signatures_and_add_ours() {
    let ours = std::sync::Arc::new(SigningKey::generate("ours-1").unwrap());
    let upstream = SigningKey::generate("upstream-1").unwrap();
    let running = start(Options {
        signing_key: Some(ours.clone()),
        ..Options::default()
    });
    let data = noise(1000, 1);
    let root = stored_file(&running, &data);
    let nar_size = 1000 + 112;
    let signature = upstream.sign(lazystore_pathinfo::fingerprint(
        &path("signed"),
        &NAR_SHA256,
        nar_size,
        [],
    ));
    let store_path = publish_signed(&running, "signed", root, nar_size, vec![signature]);
    let url = format!("/{}.narinfo", store_path.hash_str());
    let (status, body) = get(&running.addr, &url);
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let (head_status, head_text) = head(&running.addr, &url);
    assert_eq!(head_status, 200);
    assert!(
        head_text
            .to_ascii_lowercase()
            .contains(&format!("content-length: {}", text.len())),
        "{head_text}"
    );
    let narinfo = NarInfo::parse(&text).unwrap();
    assert_eq!(narinfo.signatures.len(), 2, "{text}");
    for key in [&upstream, &*ours] {
        let signed_by = narinfo.verify(&[key.public_key()]).unwrap();
        assert_eq!(signed_by.key_name(), key.name(), "{text}");
    }
}

/// Counts the bytes of the chunks read through it.
#[derive(Default)]
struct CountingReads {
    bytes: std::sync::atomic::AtomicU64,
}

impl BlobObserver for CountingReads {
    fn after_read(&self, got: &[EncodedChunk]) {
        let n: u64 = got.iter().map(|c| c.size).sum();
        self.bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A range is served by seeking: one near the end of a 32 MiB NAR reads
/// the chunks it overlaps, as one near the start does, not the NAR before it.
#[test]
fn a_range_reads_only_the_chunks_it_overlaps() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    let counting = Arc::new(CountingReads::default());
    let observed = ObservedBlobService::new(Arc::new(MemoryBlobService::new()), counting.clone());
    let mut store = Store::memory();
    store.blobs = Blobs::new(Arc::new(observed), ChunkerParams::default());
    let running = start_on(store, Options::default(), lazystore_httpcache::SEND_TIMEOUT);
    let mut dir = lazystore_castore::Directory::new();
    for i in 0..32u64 {
        let file = stored_file(&running, &noise(1 << 20, i));
        dir.add(format!("f{i:02}").as_str().try_into().unwrap(), file)
            .unwrap();
    }
    let root = stored_dir(&running, dir);
    let total = running
        .runtime
        .block_on(lazystore_pathinfo::render::nar_layout(
            &*running.store.directories,
            &root,
        ))
        .unwrap()
        .size();
    let store_path = publish(&running, "ranges", root, total);
    let url = nar_url(&running, &store_path);
    let max_chunk = u64::from(ChunkerParams::default().max);
    for start in [1 << 20, total - (2 << 20)] {
        let before = counting.bytes.load(Ordering::Relaxed);
        let mut stream = send(
            &running.addr,
            &format!(
                "GET {url} HTTP/1.1\r\nHost: x\r\nRange: bytes={start}-{}\r\nConnection: close\r\n\r\n",
                start + (64 << 10) - 1
            ),
        );
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        assert_eq!(
            &raw[9..12],
            b"206",
            "{}",
            String::from_utf8_lossy(&raw[..200])
        );
        let read = counting.bytes.load(Ordering::Relaxed) - before;
        assert!(
            read > 0 && read <= (64 << 10) + 2 * max_chunk,
            "a 64 KiB range at {start} of {total} read {read} bytes of chunks"
        );
    }
}

/// Status and the whole reply of a request of `method` with `headers`.
fn request(addr: &str, method: &str, path: &str, headers: &str) -> (u16, String) {
    let mut stream = send(
        addr,
        &format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"),
    );
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    (text[9..12].parse().unwrap(), text)
}

/// With read tokens, every read needs one (a write token does too), but
/// `nix-cache-info`; no token is 401 asking for Basic auth, a wrong one
/// 403. Uploads are refused without a write token even when a read token
/// is sent.
#[test]
fn reads_need_a_read_token_when_configured() {
    let tokens = |text: &str| Tokens::parse(std::path::Path::new("t"), text).unwrap();
    let running = start(Options {
        allow_upload: true,
        access: Access {
            read: Some(tokens("reader\nreader-2\n")),
            write: Some(tokens("writer\n")),
        },
        ..Options::default()
    });
    let root = stored_file(&running, b"secret contents");
    let store_path = publish(&running, "guarded", root, 120);
    let narinfo = format!("/{}.narinfo", store_path.hash_str());
    let ls = format!("/{}.ls", store_path.hash_str());
    let addr = &running.addr;

    assert_eq!(request(addr, "GET", "/nix-cache-info", "").0, 200);
    for url in [
        narinfo.as_str(),
        ls.as_str(),
        "/nar/anything.nar",
        "/unknown",
    ] {
        for method in ["GET", "HEAD"] {
            let (status, text) = request(addr, method, url, "");
            assert_eq!(status, 401, "{method} {url}: {text}");
            assert!(
                text.contains("WWW-Authenticate: Basic realm=")
                    || text.contains("www-authenticate: Basic realm="),
                "{text}"
            );
            let (status, text) =
                request(addr, method, url, "Authorization: Bearer not-a-token\r\n");
            assert_eq!(status, 403, "{method} {url}: {text}");
        }
    }
    let (status, text) = request(addr, "GET", &narinfo, "");
    assert!(status == 401 && text.contains("read token"), "{text}");
    assert!(!text.contains("StorePath"), "{text}");

    // The second token of the file, a write token, and Basic auth as Nix
    // sends it (nix:reader): all read.
    for auth in [
        "Authorization: Bearer reader-2\r\n",
        "Authorization: Bearer writer\r\n",
        "Authorization: Basic bml4OnJlYWRlcg==\r\n",
    ] {
        let (status, text) = request(addr, "GET", &narinfo, auth);
        assert_eq!(status, 200, "{auth}: {text}");
        assert!(text.contains("StorePath:"), "{text}");
        assert_eq!(request(addr, "GET", &ls, auth).0, 200, "{auth}");
    }

    // A read token does not upload.
    let (status, text) = request(
        addr,
        "PUT",
        "/nar/x.nar",
        "Authorization: Bearer reader\r\nContent-Length: 0\r\n",
    );
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("write token"), "{text}");
}
