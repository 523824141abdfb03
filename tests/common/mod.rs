//! What the CLI tests share: the `lazystore` binary run as a child process
//! (killed when dropped), servers and mounts started from it, a mount's
//! counters, and paths of the local Nix store put into a store directly.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

pub const LAZYSTORE: &str = env!("CARGO_BIN_EXE_lazystore");

/// A child process killed when dropped.
/// Its standard error is read as it is written (so a chatty process never
/// blocks on a full pipe) and kept.
pub struct Proc(
    Option<Child>,
    Arc<Mutex<Vec<u8>>>,
    Option<std::thread::JoinHandle<()>>,
);

impl Proc {
    fn new(mut child: Child) -> Proc {
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let reader = child.stderr.take().map(|mut pipe| {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    stderr.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        });
        Proc(Some(child), stderr, reader)
    }

    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }

    /// What it has written to standard error so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.1.lock().unwrap()).into_owned()
    }

    pub fn signal(&mut self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child().id() as i32, signal) };
    }

    /// SIGTERM, then its stderr once it exits.
    pub fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        self.0.take().unwrap().wait().unwrap();
        if let Some(reader) = self.2.take() {
            reader.join().unwrap();
        }
        self.stderr()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `lazystore ARGS…` and returns it with the first line it prints.
pub fn start(args: &[&str]) -> (Proc, String) {
    let (proc, mut lines) = start_lines(args, 1);
    (proc, lines.remove(0))
}

/// Starts `lazystore ARGS…` and returns it with the first `n` lines it
/// prints (a server on two listeners prints two URLs).
pub fn start_lines(args: &[&str], n: usize) -> (Proc, Vec<String>) {
    let mut command = Command::new(LAZYSTORE);
    command.args(args);
    spawn_lines(command, n).unwrap_or_else(|stderr| panic!("lazystore {args:?} failed: {stderr}"))
}

/// Starts `command` and returns it with the first `n` lines it prints, or
/// what it wrote to standard error if it exits before printing them.
pub fn spawn_lines(mut command: Command, n: usize) -> Result<(Proc, Vec<String>), String> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Standard error is drained from the start, so a child that logs much
    // before its first line is not blocked on a full pipe.
    let mut proc = Proc::new(child);
    let mut stdout = BufReader::new(stdout);
    let mut lines = Vec::new();
    for _ in 0..n {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        if line.is_empty() {
            proc.child().wait().unwrap();
            proc.2.take().unwrap().join().unwrap();
            return Err(proc.stderr());
        }
        lines.push(line.trim().to_owned());
    }
    Ok((proc, lines))
}

pub fn serve(store: &str, listen: &str) -> (Proc, String) {
    start(&["serve", "--listen", listen, "--store", store])
}

/// The mount's counters, by name.
pub fn stats(mountpoint: &Path) -> std::collections::HashMap<String, u64> {
    std::fs::read_to_string(mountpoint.join(".lazystore/stats"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

pub struct Mount {
    proc: Option<Proc>,
    pub path: PathBuf,
}

impl Mount {
    pub fn start(mountpoint: &Path, store: &str, cache: &str, extra: &[&str]) -> Mount {
        let mut args = vec![
            "mount",
            mountpoint.to_str().unwrap(),
            "--store",
            store,
            "--cache",
            cache,
        ];
        args.extend(extra);
        let (proc, path) = start(&args);
        Mount {
            proc: Some(proc),
            path: PathBuf::from(path),
        }
    }

    /// The same, reading `n` lines of its standard output (the mountpoint,
    /// then what options add).
    pub fn start_lines(
        mountpoint: &Path,
        store: &str,
        cache: &str,
        extra: &[&str],
        n: usize,
    ) -> (Mount, Vec<String>) {
        let mut args = vec![
            "mount",
            mountpoint.to_str().unwrap(),
            "--store",
            store,
            "--cache",
            cache,
        ];
        args.extend(extra);
        let (proc, lines) = start_lines(&args, n);
        let mount = Mount {
            proc: Some(proc),
            path: PathBuf::from(&lines[0]),
        };
        (mount, lines)
    }

    pub fn stop(mut self) -> String {
        self.proc.take().unwrap().stop()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        drop(self.proc.take());
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.path)
            .status();
    }
}

/// Ingests `paths` from the local Nix store (`nix-store --dump`) into the
/// store at `url` and publishes each with no references or signatures, in
/// this process; returns what each ingest produced.
pub fn ingest(url: &str, paths: &[&str]) -> Vec<lazystore_pathinfo::ingest::Ingested> {
    use lazystore_pathinfo::ingest::ingest_nar;
    use lazystore_pathinfo::{Store, StorePath};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = Store::open(url, lazystore_pathinfo::StoreOptions::default())
            .await
            .unwrap();
        let mut out = Vec::new();
        for path in paths {
            let mut child = tokio::process::Command::new("nix-store")
                .args(["--dump", path])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let nar = tokio::io::BufReader::with_capacity(1 << 20, child.stdout.take().unwrap());
            let ingested = ingest_nar(&store.blobs, &*store.directories, nar)
                .await
                .unwrap();
            assert!(
                child.wait().await.unwrap().success(),
                "nix-store --dump {path}"
            );
            store
                .path_infos
                .put(ingested.path_info(StorePath::from_absolute_path(path).unwrap()))
                .await
                .unwrap();
            out.push(ingested);
        }
        out
    })
}

/// Starts `lazystore args…` (its output thrown away), kills it (SIGKILL)
/// `after` later, and says whether it was still running then: the crash
/// tests' kill part way.
pub fn killed_part_way(args: &[&str], after: std::time::Duration) -> bool {
    let mut child = Command::new(LAZYSTORE)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    child.wait().unwrap();
    running
}

/// Runs `lazystore args…`, which must succeed; its output.
pub fn lazystore(args: &[&str]) -> std::process::Output {
    let out = Command::new(LAZYSTORE).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "lazystore {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `nix hash path` of `path`, as `sha256:<nixbase32>`.
pub fn nix_hash_path(path: &Path) -> String {
    let out = lazystore_testkit::nix_command("nix")
        .args(["hash", "path", "--type", "sha256", "--base32"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("sha256:{}", String::from_utf8(out.stdout).unwrap().trim())
}

/// `GET url` (`http://HOST:PORT/PATH`) over a fresh connection: the status
/// code and the body (as sent: the servers here announce their lengths).
pub fn http_get(url: &str) -> (String, String) {
    use std::io::Write as _;
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_once('/').unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).unwrap().to_owned();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Writes `files` into `dir` and adds it to the Nix store; its path.
pub fn tree(dir: &Path, files: &[(&str, &[u8])]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    lazystore_testkit::add_tree(dir)
}

/// The number just before `word` in `text` (a command's report).
pub fn number_before(text: &str, word: &str) -> u64 {
    let at = text
        .find(word)
        .unwrap_or_else(|| panic!("no {word:?} in {text}"));
    text[..at]
        .split_whitespace()
        .last()
        .unwrap()
        .trim_start_matches('(')
        .parse()
        .unwrap()
}
