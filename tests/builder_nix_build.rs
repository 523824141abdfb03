//! An unmodified `nix-build` over lazily fetched inputs, end to end through
//! the central service: a closure built with real Nix is imported into
//! `lazystore serve`, deleted from this machine's store, and brought back
//! by `scripts/lazystore-builder setup` and `register` (the mount through
//! gRPC with an empty local cache as a lower layer of an overlay at
//! /nix/store, validity registered with `lazystore nix-db | nix-store
//! --load-db`) inside a private mount namespace, after a setup asked for a
//! path the service lacks has failed naming it and undone itself; a derivation whose builder reads one small file
//! of the closure builds with the right output while the mount fetches a
//! sliver of the closure's bytes; another user reads the lazy paths through
//! the overlay; `teardown` leaves no mount, no process and no registered
//! path behind. The same build with the service empty and only an
//! `--upstream` binary cache downloads the NAR of the one path read from,
//! not those of the closure's other paths. And with the cache behind a
//! pull-through service (`serve --upstream`) and the builder knowing only
//! the service, the build works, the service downloads each NAR of the
//! closure once, and the builder fetches only what the build reads.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{LAZYSTORE, serve};
use lazystore_testkit::http::TestServer;
use lazystore_testkit::{NIX_CONFIG, gen_key, make_cache, nix_build, nix_cmd, nix_output, noise};

const BUILDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/lazystore-builder");

/// Bytes of the file in the closure that nothing reads.
const BIG: usize = 24 << 20;

/// One test at a time: each builds and deletes paths in this machine's
/// store, which the other's overlay has as a lower layer (and overlayfs
/// does not promise what is seen when a lower layer changes under it).
static SERIAL: Mutex<()> = Mutex::new(());

/// The closure the builds read from, built with real Nix in this machine's
/// store: `data` holds the small file the build reads; `lib` refers to
/// `data` and holds a big file nobody reads; `top` refers to both.
struct Inputs {
    top: String,
    data: String,
    /// The small file's content: what the build's output must be.
    small: String,
    /// Every path of `top`'s closure.
    closure: Vec<String>,
    /// Their NARs' total size.
    nar_bytes: u64,
}

fn build_inputs(dir: &Path) -> Inputs {
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let big = dir.join("big.bin");
    std::fs::write(&big, noise(BIG, 6)).unwrap();
    let small = format!("the one file the build reads ({nonce})");
    let bindings = format!(
        r#"  data = mk "lazystore-builder-data" "/bin/mkdir -p $out/share; echo '{small}' > $out/share/small.txt";
  lib = mk "lazystore-builder-lib" ''
    /bin/mkdir -p $out/share
    /bin/cp {big} $out/share/big.bin
    echo ${{data}} > $out/data-path
  '';"#,
        big = big.display()
    );
    let top = nix_build(
        &bindings,
        r#"mk "lazystore-builder-top" "/bin/mkdir -p $out; echo ${lib} ${data} > $out/refs""#,
    )
    .trim()
    .to_owned();
    let closure: Vec<String> = nix_cmd(["nix-store", "--query", "--requisites", &top])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(closure.len(), 3, "{closure:?}");
    let data = closure
        .iter()
        .find(|p| p.ends_with("-lazystore-builder-data"))
        .unwrap()
        .clone();
    let nar_bytes = closure
        .iter()
        .map(|p| {
            nix_cmd(["nix-store", "--query", "--size", p])
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    Inputs {
        top,
        data,
        small: format!("{small}\n"),
        closure,
        nar_bytes,
    }
}

impl Inputs {
    /// Deletes the closure from this machine's store, so that only the
    /// lazy mount can bring it back (the store is a lower layer of the
    /// overlay: a path left in it would be read locally).
    fn forget(&self) {
        let mut delete = vec!["nix-store", "--delete"];
        delete.extend(self.closure.iter().map(String::as_str));
        nix_cmd(delete);
        for path in &self.closure {
            assert!(!Path::new(path).exists(), "{path} is still in the store");
        }
    }

    /// A derivation whose inputs are `top`'s closure and whose builder
    /// reads the small file of `data`.
    fn reader(&self, dir: &Path) -> PathBuf {
        let build = dir.join("build.nix");
        std::fs::write(
            &build,
            format!(
                r#"derivation {{
  name = "lazystore-builder-reader";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  closure = builtins.storePath "{top}";
  args = [ "-c" "/bin/cat ${{builtins.storePath "{data}"}}/share/small.txt > $out" ];
}}"#,
                top = self.top,
                data = self.data
            ),
        )
        .unwrap();
        build
    }
}

/// The command line of every process, arguments NUL-separated.
fn running() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).into_owned())
        .collect()
}

/// Counters as the mount's stats file has them (read inside the namespace).
fn stats(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

/// In a private mount namespace: `lazystore-builder setup --store URL
/// SETUP_ARGS… TOP`, `nix-build` of the reader, a read by another user,
/// the mount's counters, teardown, then checks that teardown left nothing
/// behind, in the namespace and on the host. Returns the counters.
fn build_in_namespace(
    dir: &Path,
    url: &str,
    setup_args: &[&str],
    inputs: &Inputs,
) -> HashMap<String, u64> {
    let build = inputs.reader(dir);
    let state = dir.join("state");
    // Teardown runs whatever fails.
    let script = r#"
set -euo pipefail
state=$1 url=$2 top=$3 data=$4 build=$5 out=$6
shift 6
# A setup that cannot register what it is asked for fails, naming the
# path, and undoes itself.
missing=/nix/store/00000000000000000000000000000000-in-no-store
if "$BUILDER" setup --state-dir "$state" --store "$url" "$@" "$missing" 2>"$out/failed-setup.log"; then
  echo "setup registered $missing" >&2
  exit 1
fi
if [ -e "$state/session" ] || grep -q "$state" /proc/self/mountinfo; then
  echo "the failed setup left a session or mounts behind" >&2
  exit 1
fi
trap '"$BUILDER" teardown --state-dir "$state" >"$out/teardown.log" 2>&1' EXIT
# Setup registers data's closure, register adds top's.
"$BUILDER" setup --state-dir "$state" --store "$url" "$@" "$data" >"$out/setup.log"
"$BUILDER" register --state-dir "$state" "$top" >>"$out/setup.log"
nix-build --no-out-link "$build" >"$out/result-path"
cat "$(cat "$out/result-path")" >"$out/result"
# Another user (as a build user would be) reads a lazy path through the overlay.
setpriv --reuid=65534 --regid=65534 --clear-groups cat "$data/share/small.txt" >"$out/other-user"
cat "$state/lazy/.lazystore/stats" >"$out/stats"
trap - EXIT
"$BUILDER" teardown --state-dir "$state" >"$out/teardown.log" 2>&1
# After teardown, in the same namespace: the paths are neither there nor valid.
if [ -e "$top" ]; then echo present; else echo absent; fi >"$out/after"
if nix-store --check-validity "$top" 2>/dev/null; then echo valid; else echo invalid; fi >>"$out/after"
"#;
    let run = Command::new("timeout")
        .args(["300", "unshare", "--mount", "--propagation", "private"])
        .args(["bash", "-c", script, "builder-test"])
        .arg(&state)
        .args([url, &inputs.top, &inputs.data])
        .arg(&build)
        .arg(dir)
        .args(setup_args)
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("LAZYSTORE", LAZYSTORE)
        .env("BUILDER", BUILDER)
        .output()
        .unwrap();
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    assert!(
        run.status.success(),
        "the namespace script failed ({}):\nstdout:\n{}\nstderr:\n{}\nteardown:\n{}\nmount log:\n{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
        read("teardown.log"),
        read("state/mount.log"),
    );
    let failed = read("failed-setup.log");
    assert!(
        failed.contains("in-no-store") && failed.contains("lazystore import"),
        "{failed}"
    );
    assert!(failed.contains("undoing it"), "{failed}");
    let setup = read("setup.log");
    assert!(
        setup.contains("; 1 path(s) registered") && setup.contains("; 3 path(s) registered"),
        "{setup}"
    );
    assert_eq!(read("result"), inputs.small, "the build's output");
    assert_eq!(read("other-user"), inputs.small, "read by another user");

    // Torn down: nothing mounted, the mount stopped, the host untouched.
    assert_eq!(read("after"), "absent\ninvalid\n");
    assert!(read("teardown.log").contains("torn down"));
    assert!(!state.join("session").exists());
    assert!(!state.join("store-upper").exists());
    assert!(state.join("cache.redb").exists(), "the chunk cache is kept");
    for path in &inputs.closure {
        assert!(
            !Path::new(path).exists(),
            "{path} appeared in the host store"
        );
        let valid = nix_output(["nix-store", "--check-validity", path.as_str()]);
        assert!(
            !valid.status.success(),
            "{path} is valid in the host's database"
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&*state.to_string_lossy()), "{mounts}");
    let lazy = format!("mount\0{}\0", state.join("lazy").display());
    assert!(
        !running().iter().any(|cmdline| cmdline.contains(&lazy)),
        "the mount is still running"
    );
    stats(&read("stats"))
}

#[test]
fn nix_build_over_a_lazy_closure_in_a_private_mount_namespace() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let inputs = build_inputs(dir);

    // Into the central service, through a signed binary cache.
    let (secret, public) = gen_key(dir, "builder-test-1");
    let cache = make_cache(&[&inputs.top], "zstd", Some(&secret));
    let (_server, url) = serve(
        &format!("redb://{}/server.redb", dir.display()),
        "127.0.0.1:0",
    );
    let import = Command::new(LAZYSTORE)
        .args(["import", "--from"])
        .arg(format!("file://{}", cache.path().display()))
        .args([
            "--trusted-public-key",
            &public,
            "--store",
            &url,
            &inputs.top,
        ])
        .output()
        .unwrap();
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    inputs.forget();

    // Traced and shared: Nix gives its builder `out`, which names the trace.
    let traces = dir.join("traces");
    let stats = build_in_namespace(
        dir,
        &url,
        &["--trace-dir", traces.to_str().unwrap(), "--share-traces"],
        &inputs,
    );
    let traced: Vec<String> = std::fs::read_dir(&traces)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let small = format!("{}/share/small.txt", inputs.data);
    assert!(
        traced.iter().any(|t| t.starts_with("# lazystore trace v1")
            && t.lines()
                .next()
                .unwrap()
                .ends_with(", a build of lazystore-builder-reader")
            && t.lines().any(|l| l == small)),
        "no trace of the build names it and its read of {small}: {traced:?}"
    );
    let fetched = stats["chunk_bytes_fetched"];
    let nar_bytes = inputs.nar_bytes;
    eprintln!("fetched {fetched} of {nar_bytes} bytes of NAR; counters: {stats:?}");
    assert!(fetched > 0, "nothing was fetched: {stats:?}");
    // The build read a few dozen bytes of a closure of over 24 MiB.
    assert!(
        fetched * 1000 < nar_bytes,
        "fetched {fetched} of {nar_bytes} bytes of NAR: {stats:?}"
    );
    assert!(stats["remote_wire_bytes"] * 1000 < nar_bytes, "{stats:?}");
}

#[test]
fn nix_build_with_only_an_upstream_cache() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let inputs = build_inputs(dir);
    let (secret, public) = gen_key(dir, "builder-upstream-test-1");
    // zstd with .ls listings: paths are shown without their NARs.
    let cache = make_cache(&[&inputs.top], "zstd", Some(&secret));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(TestServer::start(cache.path()));
    // The service is empty: every path comes from the upstream cache.
    let (_server, url) = serve(
        &format!("redb://{}/server.redb", dir.display()),
        "127.0.0.1:0",
    );
    inputs.forget();

    let stats = build_in_namespace(
        dir,
        &url,
        &["--upstream", &upstream.url, "--trusted-public-key", &public],
        &inputs,
    );
    let data_nar = std::fs::read_to_string(cache.path().join(format!(
        "{}.narinfo",
        &inputs.data["/nix/store/".len()..][..32]
    )))
    .unwrap()
    .lines()
    .find_map(|l| l.strip_prefix("URL: ").map(|u| format!("/{u}")))
    .unwrap();
    let downloaded = stats["upstream_bytes_downloaded"];
    eprintln!(
        "upstream only: {} NAR download(s), {downloaded} bytes downloaded, closure {} bytes of NAR; counters: {stats:?}",
        stats["upstream_nar_downloads"], inputs.nar_bytes
    );
    // Only the NAR of the path read from: not lib's, not top's.
    assert_eq!(upstream.nar_requests(), 1, "{stats:?}");
    assert_eq!(
        upstream.count(|p| p == data_nar),
        1,
        "{data_nar} was not the one"
    );
    assert_eq!(stats["upstream_nar_downloads"], 1, "{stats:?}");
    assert!(downloaded * 1000 < inputs.nar_bytes, "{stats:?}");
}

#[test]
fn nix_build_through_a_pull_through_service() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let inputs = build_inputs(dir);
    let (secret, public) = gen_key(dir, "builder-pull-through-test-1");
    let cache = make_cache(&[&inputs.top], "zstd", Some(&secret));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(TestServer::start(cache.path()));
    // The service has nothing imported and pulls from the cache; the
    // builder knows only the service.
    let (_server, url) = common::start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--store",
        &format!("redb://{}/server.redb", dir.display()),
        "--upstream",
        &upstream.url,
        "--trusted-public-key",
        &public,
    ]);
    inputs.forget();

    let stats = build_in_namespace(dir, &url, &[], &inputs);
    eprintln!(
        "pull-through: {} NAR download(s) by the service; builder counters: {stats:?}",
        upstream.nar_requests()
    );
    // The service fetched the NAR of the path the build read from (and
    // perhaps, behind, some of its closure), each at most once; the
    // builder fetched only what the build read.
    assert!(
        (1..=inputs.closure.len()).contains(&upstream.nar_requests()),
        "{} NAR requests: {stats:?}",
        upstream.nar_requests()
    );
    assert!(
        stats["chunk_bytes_fetched"] * 1000 < inputs.nar_bytes,
        "{stats:?}"
    );
}
