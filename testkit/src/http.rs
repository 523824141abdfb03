//! A local HTTP/1.1 server for tests: serves a directory (a binary cache)
//! on 127.0.0.1, counts requests and injects faults per path.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

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
    // std Mutexes: held for one map operation, never across an await.
    requests: Mutex<Vec<String>>,
    faults: Mutex<HashMap<String, VecDeque<Fault>>>,
}

impl TestServer {
    /// Serves `root` on a new port until the test's runtime ends.
    pub async fn start(root: &Path) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        TestServer::serve(listener, root)
    }

    /// Serves `root` on `listener` until the test's runtime ends.
    pub fn serve(listener: TcpListener, root: &Path) -> TestServer {
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        let state = Arc::new(ServerState {
            root: root.to_owned(),
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
    state.requests.lock().unwrap().push(path.clone());
    let fault = state
        .faults
        .lock()
        .unwrap()
        .get_mut(&path)
        .and_then(VecDeque::pop_front);
    let file = state.root.join(path.trim_start_matches('/'));
    let body = if path.contains("..") {
        None
    } else {
        tokio::fs::read(&file).await.ok()
    };
    let response = match (fault, body) {
        (Some(Fault::Status(status)), _) => status_response(status),
        (None, None) => status_response(404),
        (Some(Fault::Truncate(n)), Some(body)) => {
            let mut r = ok_head(body.len());
            r.extend_from_slice(&body[..n.min(body.len())]);
            r
        }
        (Some(Fault::Stall(n, pause)), Some(body)) => {
            let mut r = ok_head(body.len());
            r.extend_from_slice(&body[..n.min(body.len())]);
            let _ = socket.write_all(&r).await;
            tokio::time::sleep(pause).await;
            r.clear();
            r
        }
        (Some(Fault::Truncate(_) | Fault::Stall(..)), None) => status_response(404),
        (None, Some(body)) => {
            let mut r = ok_head(body.len());
            r.extend_from_slice(&body);
            r
        }
    };
    let _ = socket.write_all(&response).await;
    let _ = socket.shutdown().await;
}

fn ok_head(len: usize) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n").into_bytes()
}

fn status_response(status: u16) -> Vec<u8> {
    format!("HTTP/1.1 {status} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .into_bytes()
}
