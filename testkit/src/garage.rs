//! A real Garage cluster on 127.0.0.1 for the S3 store's tests: three
//! nodes, each with its own config, data and metadata directories and
//! free ports, in three zones with replication factor 3 (so every object
//! is on every node, and any two nodes make a quorum); one bucket and one
//! key allowed to read and write it.
//!
//! [`Garage::shared`] is one cluster per test process, for suites that
//! only read and write; [`Garage::start`] a cluster of the caller's own,
//! which it may take a node of down ([`Garage::kill`]). A missing `garage`
//! binary is a failure that says how to install it, never a skip.
//!
//! The nodes are started from one thread that lives as long as the
//! process, with `PR_SET_PDEATHSIG`, so they die with the test process
//! even when the shared cluster is never dropped; a shared cluster's
//! directories are removed by the next process that starts one.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// How to install the binary, for the failure when it is missing.
pub const INSTALL: &str =
    "cargo install garage --no-default-features --features bundled-libs,lmdb,sqlite --locked";

/// The region the cluster's S3 API answers as.
pub const REGION: &str = "garage";

/// Nodes in a cluster.
const NODES: usize = 3;

/// How long a cluster may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Directory names of shared clusters start with this, then the pid.
const DIR_PREFIX: &str = "lazystore-garage-";

/// The key every cluster allows on its bucket: an access key ID is `GK`
/// and 24 hex digits, a secret 64.
const KEY_ID: &str = "GK0123456789abcdef01234567";
const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A running cluster.
pub struct Garage {
    dir: PathBuf,
    /// Remove `dir` on drop (not for the shared cluster, never dropped).
    owned: bool,
    nodes: Vec<Node>,
    bucket: String,
}

struct Node {
    config: PathBuf,
    s3_port: u16,
    child: Mutex<Option<Child>>,
}

/// The `garage` binary: `$GARAGE_BIN`, or `garage` on `PATH`.
fn binary() -> PathBuf {
    let bin = std::env::var_os("GARAGE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("garage"));
    match Command::new(&bin).arg("--version").output() {
        Ok(o) if o.status.success() => bin,
        Ok(o) => panic!(
            "{} --version failed: {}",
            bin.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "cannot run {:?} ({e}): the S3 store's tests run a real Garage cluster. \
             Install it with `{INSTALL}`, or set GARAGE_BIN",
            bin
        ),
    }
}

/// Spawns `command` from a thread that outlives every test, the child
/// killed when this process dies.
fn spawn(mut command: Command) -> Child {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::spawn(move || {
            for (mut command, reply) in rx {
                let _ = reply.send(command.spawn());
            }
        });
        Mutex::new(tx)
    });
    // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    keeper
        .lock()
        .unwrap()
        .send((command, tx))
        .expect("keeper thread");
    rx.recv().expect("keeper thread").expect("spawn garage")
}

/// A port no one listens on, below the kernel's ephemeral range (32768
/// and up here), so no listener on port 0 and no outgoing connection can
/// take it between this check and the node's bind: ports from
/// `bind(":0")` were, now and then, and a node then failed to start.
fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let seed = std::env::temp_dir().join(NEXT.fetch_add(1, Ordering::Relaxed).to_string());
        let port = 10_000 + (rand_u128(&seed) % 20_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Removes the directories of shared clusters whose process is gone.
fn remove_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

impl Garage {
    /// The cluster of this test process, started by the first caller.
    /// Never stopped: its nodes die with the process. Tests share its
    /// bucket; each should work under a prefix of its own
    /// ([`unique_prefix`]).
    pub fn shared() -> &'static Garage {
        static SHARED: OnceLock<Garage> = OnceLock::new();
        SHARED.get_or_init(|| {
            remove_stale_dirs();
            Garage::start_in(false)
        })
    }

    /// A cluster of the caller's own, stopped and removed on drop.
    pub fn start() -> Garage {
        Garage::start_in(true)
    }

    fn start_in(owned: bool) -> Garage {
        let bin = binary_path();
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let secret = format!("{:032x}{:032x}", rand_u128(&dir), rand_u128(&dir));
        let mut nodes = Vec::new();
        let mut rpc_addrs = Vec::new();
        for n in 0..NODES {
            let node_dir = dir.join(format!("node{n}"));
            fs::create_dir_all(&node_dir).unwrap();
            let (rpc, s3, admin) = (free_port(), free_port(), free_port());
            let config = node_dir.join("garage.toml");
            fs::write(
                &config,
                format!(
                    r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = {NODES}
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
                    meta = node_dir.join("meta").display(),
                    data = node_dir.join("data").display(),
                ),
            )
            .unwrap();
            rpc_addrs.push(format!("127.0.0.1:{rpc}"));
            nodes.push(Node {
                config,
                s3_port: s3,
                child: Mutex::new(None),
            });
        }
        let garage = Garage {
            dir,
            owned,
            nodes,
            bucket: "lazystore".to_owned(),
        };
        for n in 0..NODES {
            garage.run_node(bin, n);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        let ids: Vec<String> = (0..NODES)
            .map(|n| {
                let out = garage.until(deadline, n, &["node", "id", "-q"]);
                let id = String::from_utf8_lossy(&out.stdout);
                let id = id.trim().split('@').next().unwrap().to_owned();
                assert!(!id.is_empty(), "no node id from node {n}");
                id
            })
            .collect();
        for n in 1..NODES {
            let peer = format!("{}@{}", ids[n], rpc_addrs[n]);
            garage.until(deadline, 0, &["node", "connect", &peer]);
        }
        for (n, id) in ids.iter().enumerate() {
            let zone = format!("z{n}");
            garage.until(
                deadline,
                0,
                &["layout", "assign", "-z", &zone, "-c", "1G", id],
            );
        }
        garage.until(deadline, 0, &["layout", "apply", "--version", "1"]);
        garage.until(deadline, 0, &["bucket", "create", &garage.bucket]);
        garage.until(
            deadline,
            0,
            &["key", "import", "--yes", "-n", "lazystore", KEY_ID, SECRET],
        );
        garage.until(
            deadline,
            0,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                &garage.bucket,
                "--key",
                KEY_ID,
            ],
        );
        // Healthy: every node sees the others, so any two make a quorum.
        loop {
            let out = garage.cli(0, &["status"]);
            let text = String::from_utf8_lossy(&out.stdout);
            let healthy = text.lines().filter(|l| l.contains("127.0.0.1")).count();
            if out.status.success() && healthy >= NODES && !text.contains("FAILED") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "garage cluster not healthy:\n{text}{}",
                garage.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        garage
    }

    fn run_node(&self, bin: &Path, n: usize) {
        let node = &self.nodes[n];
        let log = fs::File::create(node.config.with_file_name("garage.log")).unwrap();
        let mut command = Command::new(bin);
        command
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        *node.child.lock().unwrap() = Some(spawn(command));
    }

    /// Runs `garage -c <node's config> args…`.
    fn cli(&self, n: usize, args: &[&str]) -> Output {
        Command::new(binary_path())
            .arg("-c")
            .arg(&self.nodes[n].config)
            .args(args)
            .output()
            .expect("run garage")
    }

    /// Runs a CLI command until it succeeds, failing past `deadline`.
    fn until(&self, deadline: Instant, n: usize, args: &[&str]) -> Output {
        loop {
            let out = self.cli(n, args);
            if out.status.success() {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "`garage {}` kept failing: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The tail of every node's log, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        for (n, node) in self.nodes.iter().enumerate() {
            let mut text = String::new();
            if let Ok(mut f) = fs::File::open(node.config.with_file_name("garage.log")) {
                let _ = f.read_to_string(&mut text);
            }
            let tail: String = text
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            out.push_str(&format!("\n--- node {n} log (tail) ---\n{tail}"));
        }
        out
    }

    /// The S3 endpoint of node `n`, `http://127.0.0.1:port`.
    pub fn endpoint(&self, n: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[n].s3_port)
    }

    /// The bucket every key here may use.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The store URL of `prefix` in the bucket, through node 0.
    pub fn store_url(&self, prefix: &str) -> String {
        format!(
            "s3://{}/{prefix}?endpoint={}&region={REGION}",
            self.bucket,
            self.endpoint(0)
        )
    }

    /// The access key ID and secret of the bucket's key.
    pub fn key(&self) -> (&'static str, &'static str) {
        (KEY_ID, SECRET)
    }

    /// The environment a process needs to use the bucket: the standard
    /// AWS variables.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", KEY_ID.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.to_owned()),
            ("AWS_REGION", REGION.to_owned()),
        ]
    }

    /// Kills node `n` (SIGKILL). With replication factor 3 the other two
    /// still make a quorum, so reads and writes go on.
    pub fn kill(&self, n: usize) {
        if let Some(mut child) = self.nodes[n].child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for n in 0..self.nodes.len() {
            self.kill(n);
        }
        if self.owned {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The binary found once.
fn binary_path() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(binary)
}

/// A prefix no other test of any process has used.
pub fn unique_prefix() -> String {
    format!("t-{}", super::nonce())
}

/// 128 bits that differ between calls: the RPC secret only keeps two
/// clusters on one machine apart.
fn rand_u128(seed: &Path) -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut out = 0u128;
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write(seed.as_os_str().as_encoded_bytes());
        out = (out << 64) | u128::from(h.finish());
    }
    out
}
