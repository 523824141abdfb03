//! A local HTTP/1.1 server for tests: serves a directory (a binary cache)
//! on 127.0.0.1, counts requests and injects faults per path; and, with a
//! [`Behaviour`], answers as cache.nixos.org does (listings compressed and
//! said so only in `Content-Encoding`, `Range` answered, its
//! `nix-cache-info`) or as a server that encodes every response.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, XzEncoder, ZstdEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// cache.nixos.org's `nix-cache-info`.
pub const NIXOS_CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";

/// A content coding the server applies to a response body, naming it in
/// `Content-Encoding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// `br`: cache.nixos.org's older listings. Brotli has no magic bytes.
    Br,
    /// `zstd`: cache.nixos.org's newer listings.
    Zstd,
    /// `gzip`.
    Gzip,
    /// `xz`.
    Xz,
}

impl Encoding {
    /// The `Content-Encoding` value.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Br => "br",
            Encoding::Zstd => "zstd",
            Encoding::Gzip => "gzip",
            Encoding::Xz => "xz",
        }
    }

    /// `data`, encoded.
    pub async fn encode(self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let read = match self {
            Encoding::Br => BrotliEncoder::new(data).read_to_end(&mut out).await,
            Encoding::Zstd => ZstdEncoder::new(data).read_to_end(&mut out).await,
            Encoding::Gzip => GzipEncoder::new(data).read_to_end(&mut out).await,
            Encoding::Xz => XzEncoder::new(data).read_to_end(&mut out).await,
        };
        read.expect("encoding in memory does not fail");
        out
    }
}

/// How the server answers, beyond sending files as they are stored. The
/// default sends every file as it is, whole, whatever the request's
/// `Range`.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// `.ls` listings are sent encoded so, with `Content-Encoding`.
    pub listings: Option<Encoding>,
    /// Every other file (`nix-cache-info`, narinfos, NARs) is sent encoded
    /// so, with `Content-Encoding`.
    pub others: Option<Encoding>,
    /// A `Range: bytes=…` request gets `206 Partial Content` and those
    /// bytes of the file as sent (encoded, if it is).
    pub ranges: bool,
    /// `nix-cache-info` is [`NIXOS_CACHE_INFO`] (`Priority: 40`), whatever
    /// the directory holds.
    pub nixos_cache_info: bool,
}

impl Behaviour {
    /// As cache.nixos.org answers in everything a test can reach: listings
    /// stored compressed with `listings` (brotli for older paths, zstd for
    /// newer ones) and sent with `Content-Encoding` whatever the request's
    /// `Accept-Encoding`; narinfos and NARs (xz, in a cache written so) as
    /// stored, with no `Content-Encoding`; 404 for a missing file; `Range`
    /// requests answered; its `nix-cache-info`, with `Priority: 40`.
    pub fn cache_nixos_org(listings: Encoding) -> Behaviour {
        Behaviour {
            listings: Some(listings),
            others: None,
            ranges: true,
            nixos_cache_info: true,
        }
    }

    /// A server that encodes every response with `encoding`, listings
    /// included, and answers ranges of the encoded bytes.
    pub fn encoding_everything(encoding: Encoding) -> Behaviour {
        Behaviour {
            listings: Some(encoding),
            others: Some(encoding),
            ranges: true,
            nixos_cache_info: false,
        }
    }
}

/// What the test server does with one request instead of serving the file.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and an empty body.
    Status(u16),
    /// Announce the whole file but send only this many bytes, then close.
    Truncate(usize),
    /// Send the headers and this many bytes, then nothing for this long.
    Stall(usize, Duration),
}

/// An HTTP/1.1 server on 127.0.0.1 serving a directory, one request per
/// connection, counting requests and injecting faults per path.
pub struct TestServer {
    pub url: String,
    state: Arc<ServerState>,
}

struct ServerState {
    root: PathBuf,
    behaviour: Behaviour,
    // std Mutexes: held for one map operation, never across an await.
    requests: Mutex<Vec<String>>,
    faults: Mutex<HashMap<String, VecDeque<Fault>>>,
}

impl TestServer {
    /// Serves `root` on a new port until the test's runtime ends.
    pub async fn start(root: &Path) -> TestServer {
        TestServer::start_with(root, Behaviour::default()).await
    }

    /// Serves `root` as `behaviour` says on a new port until the test's
    /// runtime ends.
    pub async fn start_with(root: &Path, behaviour: Behaviour) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        TestServer::serve_with(listener, root, behaviour)
    }

    /// Serves `root` on `listener` until the test's runtime ends.
    pub fn serve(listener: TcpListener, root: &Path) -> TestServer {
        TestServer::serve_with(listener, root, Behaviour::default())
    }

    /// Serves `root` as `behaviour` says on `listener` until the test's
    /// runtime ends.
    pub fn serve_with(listener: TcpListener, root: &Path, behaviour: Behaviour) -> TestServer {
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        let state = Arc::new(ServerState {
            root: root.to_owned(),
            behaviour,
            requests: Mutex::new(Vec::new()),
            faults: Mutex::new(HashMap::new()),
        });
        let server = state.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve(server.clone(), socket));
            }
        });
        TestServer { url, state }
    }

    /// Makes the next requests of `path` (e.g. `/nar/….nar.xz`) fail with
    /// `faults`, in order; later ones are served normally.
    pub fn inject(&self, path: &str, faults: Vec<Fault>) {
        self.state
            .faults
            .lock()
            .unwrap()
            .insert(path.to_owned(), faults.into());
    }

    /// Requests whose path satisfies `filter`.
    pub fn count(&self, filter: impl Fn(&str) -> bool) -> usize {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|p| filter(p))
            .count()
    }

    /// NAR requests so far.
    pub fn nar_requests(&self) -> usize {
        self.count(|p| p.starts_with("/nar/"))
    }

    /// narinfo requests so far.
    pub fn narinfo_requests(&self) -> usize {
        self.count(|p| p.ends_with(".narinfo"))
    }

    /// Listing (`.ls`) requests so far.
    pub fn listing_requests(&self) -> usize {
        self.count(|p| p.ends_with(".ls"))
    }
}

async fn serve(state: Arc<ServerState>, mut socket: tokio::net::TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let Some(path) = head.split(' ').nth(1).map(str::to_owned) else {
        return;
    };
    let range = head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("range")
            .then(|| value.trim().to_owned())
    });
    state.requests.lock().unwrap().push(path.clone());
    let fault = state
        .faults
        .lock()
        .unwrap()
        .get_mut(&path)
        .and_then(VecDeque::pop_front);
    let behaviour = &state.behaviour;
    let body = if path.contains("..") {
        None
    } else if path == "/nix-cache-info" && behaviour.nixos_cache_info {
        Some(NIXOS_CACHE_INFO.as_bytes().to_vec())
    } else {
        let file = state.root.join(path.trim_start_matches('/'));
        tokio::fs::read(&file).await.ok()
    };
    let encoding = if path.ends_with(".ls") {
        behaviour.listings
    } else {
        behaviour.others
    };
    let body = match (body, encoding) {
        (Some(body), Some(encoding)) => Some(encoding.encode(&body).await),
        (body, _) => body,
    };
    let mut headers = String::new();
    if let (Some(encoding), Some(_)) = (encoding, &body) {
        headers.push_str(&format!("Content-Encoding: {}\r\n", encoding.name()));
    }
    let response = match (fault, body) {
        (Some(Fault::Status(status)), _) => status_response(status),
        (None, None) => status_response(404),
        (Some(Fault::Truncate(n)), Some(body)) => {
            let mut r = ok_head(body.len(), &headers);
            r.extend_from_slice(&body[..n.min(body.len())]);
            r
        }
        (Some(Fault::Stall(n, pause)), Some(body)) => {
            let mut r = ok_head(body.len(), &headers);
            r.extend_from_slice(&body[..n.min(body.len())]);
            let _ = socket.write_all(&r).await;
            tokio::time::sleep(pause).await;
            r.clear();
            r
        }
        (Some(Fault::Truncate(_) | Fault::Stall(..)), None) => status_response(404),
        (None, Some(body)) => match range.filter(|_| behaviour.ranges) {
            Some(range) => ranged(&body, &range, &headers),
            None => {
                let mut r = ok_head(body.len(), &headers);
                r.extend_from_slice(&body);
                r
            }
        },
    };
    let _ = socket.write_all(&response).await;
    let _ = socket.shutdown().await;
}

/// The answer to `Range: {range}` for `body`: 206 with the bytes asked
/// for, 416 if they start past its end, the whole body (200) for a range
/// this server does not read (several ranges, another unit).
fn ranged(body: &[u8], range: &str, headers: &str) -> Vec<u8> {
    let len = body.len() as u64;
    let whole = || {
        let mut r = ok_head(body.len(), headers);
        r.extend_from_slice(body);
        r
    };
    let Some((first, last)) = range
        .strip_prefix("bytes=")
        .filter(|spec| !spec.contains(','))
        .and_then(|spec| spec.split_once('-'))
    else {
        return whole();
    };
    let (first, last) = match (first.trim(), last.trim()) {
        // The last `n` bytes.
        ("", n) => match n.parse::<u64>() {
            Ok(n) => (len.saturating_sub(n), len.saturating_sub(1)),
            Err(_) => return whole(),
        },
        (first, "") => match first.parse::<u64>() {
            Ok(first) => (first, len.saturating_sub(1)),
            Err(_) => return whole(),
        },
        (first, last) => match (first.parse::<u64>(), last.parse::<u64>()) {
            (Ok(first), Ok(last)) if first <= last => (first, last.min(len.saturating_sub(1))),
            _ => return whole(),
        },
    };
    if first >= len {
        return format!(
            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
    }
    let part = &body[first as usize..=last as usize];
    let mut r = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {first}-{last}/{len}\r\n\
         Content-Length: {}\r\n{headers}Connection: close\r\n\r\n",
        part.len()
    )
    .into_bytes();
    r.extend_from_slice(part);
    r
}

fn ok_head(len: usize, headers: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n{headers}Connection: close\r\n\r\n")
        .into_bytes()
}

fn status_response(status: u16) -> Vec<u8> {
    let reason = if status == 404 {
        "Not Found"
    } else {
        "Injected"
    };
    format!("HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use async_compression::tokio::bufread::{BrotliDecoder, ZstdDecoder};
    use tokio::net::TcpStream;

    use super::*;

    /// A response: its status, its headers (names lowercased), its body.
    struct Response {
        status: u16,
        headers: HashMap<String, String>,
        body: Vec<u8>,
    }

    async fn get(server: &TestServer, path: &str, extra: &str) -> Response {
        let address = server.url.strip_prefix("http://").unwrap();
        let mut socket = TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n{extra}\r\n");
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        socket.read_to_end(&mut raw).await.unwrap();
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8(raw[..end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let body = raw[end + 4..].to_vec();
        Response {
            status,
            headers,
            body,
        }
    }

    fn cache_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
        std::fs::write(dir.path().join("abc.ls"), r#"{"version":1}"#).unwrap();
        std::fs::write(dir.path().join("abc.narinfo"), "StorePath: x\n").unwrap();
        std::fs::create_dir(dir.path().join("nar")).unwrap();
        std::fs::write(dir.path().join("nar/abc.nar.xz"), b"0123456789").unwrap();
        dir
    }

    #[tokio::test]
    async fn answers_as_cache_nixos_org() {
        let dir = cache_dir();
        for encoding in [Encoding::Br, Encoding::Zstd] {
            let server =
                TestServer::start_with(dir.path(), Behaviour::cache_nixos_org(encoding)).await;
            // Listings: compressed, and said so only in the header.
            let listing = get(&server, "/abc.ls", "Accept-Encoding: identity\r\n").await;
            assert_eq!(listing.status, 200);
            assert_eq!(listing.headers["content-encoding"], encoding.name());
            assert_ne!(listing.body, br#"{"version":1}"#);
            let mut decoded = Vec::new();
            match encoding {
                Encoding::Br => BrotliDecoder::new(&listing.body[..])
                    .read_to_end(&mut decoded)
                    .await
                    .unwrap(),
                _ => ZstdDecoder::new(&listing.body[..])
                    .read_to_end(&mut decoded)
                    .await
                    .unwrap(),
            };
            assert_eq!(decoded, br#"{"version":1}"#);

            // narinfos and NARs as stored.
            let narinfo = get(&server, "/abc.narinfo", "").await;
            assert_eq!(
                (narinfo.status, &narinfo.body[..]),
                (200, &b"StorePath: x\n"[..])
            );
            assert!(!narinfo.headers.contains_key("content-encoding"));
            assert_eq!(get(&server, "/missing.narinfo", "").await.status, 404);

            // Ranges of NARs.
            let part = get(&server, "/nar/abc.nar.xz", "Range: bytes=2-4\r\n").await;
            assert_eq!((part.status, &part.body[..]), (206, &b"234"[..]));
            assert_eq!(part.headers["content-range"], "bytes 2-4/10");
            let past = get(&server, "/nar/abc.nar.xz", "Range: bytes=5-99\r\n").await;
            assert_eq!((past.status, &past.body[..]), (206, &b"56789"[..]));
            let open = get(&server, "/nar/abc.nar.xz", "range: bytes=8-\r\n").await;
            assert_eq!(&open.body[..], b"89");
            let none = get(&server, "/nar/abc.nar.xz", "Range: bytes=10-\r\n").await;
            assert_eq!(none.status, 416);
            let whole = get(&server, "/nar/abc.nar.xz", "").await;
            assert_eq!((whole.status, &whole.body[..]), (200, &b"0123456789"[..]));

            let info = get(&server, "/nix-cache-info", "").await;
            assert_eq!(info.body, NIXOS_CACHE_INFO.as_bytes());
            assert!(NIXOS_CACHE_INFO.contains("Priority: 40"));
            assert_eq!(server.listing_requests(), 1);
        }
    }

    #[tokio::test]
    async fn plain_servers_ignore_ranges_and_encode_nothing() {
        let dir = cache_dir();
        let server = TestServer::start(dir.path()).await;
        let listing = get(&server, "/abc.ls", "").await;
        assert_eq!(listing.body, br#"{"version":1}"#);
        assert!(!listing.headers.contains_key("content-encoding"));
        let nar = get(&server, "/nar/abc.nar.xz", "Range: bytes=2-4\r\n").await;
        assert_eq!((nar.status, &nar.body[..]), (200, &b"0123456789"[..]));
        assert_eq!(
            get(&server, "/nix-cache-info", "").await.body,
            b"StoreDir: /nix/store\n"
        );
    }

    #[tokio::test]
    async fn encoding_everything_encodes_narinfos_and_nars_too() {
        let dir = cache_dir();
        let server =
            TestServer::start_with(dir.path(), Behaviour::encoding_everything(Encoding::Gzip))
                .await;
        for path in [
            "/abc.narinfo",
            "/nar/abc.nar.xz",
            "/nix-cache-info",
            "/abc.ls",
        ] {
            let response = get(&server, path, "").await;
            assert_eq!(response.headers["content-encoding"], "gzip", "{path}");
            assert!(response.body.starts_with(&[0x1f, 0x8b]), "{path}");
        }
    }
}
