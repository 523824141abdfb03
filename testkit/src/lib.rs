//! Real Nix for integration tests: running Nix commands as root without a daemon,
//! sandbox or build users, building small closures with references, adding trees,
//! making signing keys, and writing binary caches with `nix copy`; and TLS
//! certificates for servers (`tls`); and a real Garage cluster for the S3
//! store (`garage`).
//!
//! Every helper panics on failure with the command line and Nix's stderr, and a
//! missing `nix` is a failure, never a skip: these tests compare against Nix, and
//! a suite that passes without its oracle proves nothing.
//!
//! A dev-dependency of every crate whose tests need real Nix.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

pub mod garage;
pub mod http;
pub mod tls;

/// `NIX_CONFIG` for every command: the new CLI, builds without a sandbox or
/// build users (we run as root without a daemon), and no substituters, since
/// these machines cannot reach cache.nixos.org.
pub const NIX_CONFIG: &str =
    "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters =";

/// A `Command` for `program` (`nix`, `nix-store`, `nix-build`, …) with
/// [`NIX_CONFIG`] set, for callers that need more control than [`nix_cmd`].
pub fn nix_command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    command.env("NIX_CONFIG", NIX_CONFIG);
    command
}

/// Runs `args` (the program first, e.g. `["nix", "copy", …]`) and returns its
/// output whatever its exit status, for tests that expect Nix to refuse something.
/// Panics only if the program cannot be started.
pub fn nix_output<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let (program, rest) = args
        .split_first()
        .expect("nix_output needs at least a program");
    nix_command(program)
        .args(rest)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {:?}: {e}; the tests need real Nix (try: apt-get install nix-bin)",
                program.as_ref()
            )
        })
}

/// Runs `args` (the program first) and returns its stdout, panicking with the
/// command line and stderr if it fails.
pub fn nix_cmd<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let output = nix_output(&args);
    let line: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    assert!(
        output.status.success(),
        "`{}` failed ({}):\n{}",
        line.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("nix printed non-UTF-8 output")
}

/// Adds a file or directory tree to the store (`nix-store --add`) and returns its
/// store path. The result is content-addressed (`CA: fixed:r:sha256:…`).
pub fn add_tree(path: &Path) -> String {
    nix_cmd([
        OsStr::new("nix-store"),
        OsStr::new("--add"),
        path.as_os_str(),
    ])
    .trim()
    .to_owned()
}

/// A freshly built closure of three store paths: `c` references `b` and `a`, `b`
/// references `a`. `c` is a directory holding a regular file, an executable and a
/// symlink; `a` and `b` are regular files.
#[derive(Debug, Clone)]
pub struct Closure {
    /// `/nix/store/…-lazystore-test-a`, no references.
    pub a: String,
    /// `/nix/store/…-lazystore-test-b`, references `a`.
    pub b: String,
    /// `/nix/store/…-lazystore-test-c`, references `a` and `b`.
    pub c: String,
}

impl Closure {
    /// All three paths, dependencies first.
    pub fn paths(&self) -> [&str; 3] {
        [&self.a, &self.b, &self.c]
    }

    /// The path whose closure is all three.
    pub fn top(&self) -> &str {
        &self.c
    }
}

/// A value no earlier call, in this process or another, has used.
pub(crate) fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_nanos();
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Builds the Nix expression `let mk = …; {bindings} in {result}` with
/// `nix-build --no-out-link` and returns what it prints (the out paths, one
/// a line). `mk name script` is a derivation running `script` with
/// `/bin/sh`: what every test derivation needs, with no nixpkgs.
pub fn nix_build(bindings: &str, result: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let expression = format!(
        r#"
let
  mk = name: script: derivation {{
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  }};
{bindings}
in {result}
"#
    );
    let file = dir.path().join("expression.nix");
    std::fs::write(&file, expression).expect("write the Nix expression");
    nix_cmd([
        OsStr::new("nix-build"),
        OsStr::new("--no-out-link"),
        file.as_os_str(),
    ])
}

/// Builds a new [`Closure`] with `nix-build` (`builder = "/bin/sh"`).
///
/// Each call builds paths that never existed before (the derivations embed a
/// nonce), so no test sees signatures another test or an earlier run added to
/// the same paths in the local Nix database.
pub fn build_closure() -> Closure {
    let bindings = format!(
        r#"  a = mk "lazystore-test-a" "echo '{nonce}' > $out";
  b = mk "lazystore-test-b" "echo ${{a}} > $out";"#,
        nonce = nonce()
    );
    let c = nix_build(
        &bindings,
        r#"mk "lazystore-test-c" ''
  /bin/mkdir -p $out/bin
  echo ${b} ${a} > $out/refs
  printf '#!/bin/sh\necho hi\n' > $out/bin/hi
  /bin/chmod +x $out/bin/hi
  /bin/ln -s ${b} $out/b
''"#,
    )
    .trim()
    .to_owned();
    let requisites = nix_cmd(["nix-store", "--query", "--requisites", &c]);
    let find = |suffix: &str| {
        requisites
            .lines()
            .find(|p| p.ends_with(suffix))
            .unwrap_or_else(|| panic!("no {suffix} in the closure of {c}:\n{requisites}"))
            .to_owned()
    };
    Closure {
        a: find("-lazystore-test-a"),
        b: find("-lazystore-test-b"),
        c,
    }
}

/// Builds `n` new store paths with one `nix-build` and returns them in
/// order: path `i` is a directory holding `share/note` (a file naming `i`),
/// an executable `bin/tool`, a symlink `link` to `share/note`, and, but for
/// the first, `prev`, naming path `i - 1`, which it therefore refers to.
/// The closure of the last path is all of them. Like [`build_closure`], the
/// paths never existed before.
pub fn build_paths(n: usize) -> Vec<String> {
    assert!(n > 0, "build_paths needs at least one path");
    let bindings = format!(
        r#"  paths = builtins.genList (i: mk "lazystore-many-${{toString i}}" (''
    /bin/mkdir -p $out/bin $out/share
    echo '{nonce} ${{toString i}}' > $out/share/note
    printf '#!/bin/sh\necho ${{toString i}}\n' > $out/bin/tool
    /bin/chmod +x $out/bin/tool
    /bin/ln -s share/note $out/link
  '' + (if i == 0 then "" else "echo ${{builtins.elemAt paths (i - 1)}} > $out/prev\n"))) {n};"#,
        nonce = nonce()
    );
    let out = nix_build(&bindings, "paths");
    let mut paths: Vec<(usize, String)> = out
        .lines()
        .map(|p| {
            let index = p
                .rsplit_once("-lazystore-many-")
                .and_then(|(_, i)| i.parse().ok());
            (
                index.expect("nix-build printed a path of ours"),
                p.to_owned(),
            )
        })
        .collect();
    paths.sort();
    assert!(
        paths.iter().map(|(i, _)| *i).eq(0..n),
        "nix-build printed:\n{out}"
    );
    paths.into_iter().map(|(_, p)| p).collect()
}

/// Makes a signing key pair with `nix-store --generate-binary-cache-key` in `dir`;
/// returns the secret key file and the public key (`name:base64`).
pub fn gen_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let secret = dir.join(format!("{name}.secret"));
    let public = dir.join(format!("{name}.public"));
    nix_cmd([
        OsStr::new("nix-store"),
        OsStr::new("--generate-binary-cache-key"),
        OsStr::new(name),
        secret.as_os_str(),
        public.as_os_str(),
    ]);
    let public = std::fs::read_to_string(&public)
        .expect("read public key")
        .trim()
        .to_owned();
    (secret, public)
}

/// Signs the closures of `paths` in the local store with `nix store sign -r`.
pub fn sign_paths(secret_key: &Path, paths: &[&str]) {
    let mut args = vec![
        OsStr::new("nix"),
        OsStr::new("store"),
        OsStr::new("sign"),
        OsStr::new("-r"),
    ];
    args.extend([OsStr::new("-k"), secret_key.as_os_str()]);
    args.extend(paths.iter().map(OsStr::new));
    nix_cmd(args);
}

/// The `file://` URL of a binary cache in `dir` with `compression` (`xz`, `zstd`,
/// `none`, …) and `.ls` listings, as `nix copy --to` takes it.
pub fn cache_url(dir: &Path, compression: &str) -> String {
    format!(
        "file://{}?compression={compression}&write-nar-listing=true",
        dir.display()
    )
}

/// Writes the closures of `paths` to a new binary cache with `nix copy`, after
/// signing them with `secret_key` if given, and returns the cache directory.
pub fn make_cache(paths: &[&str], compression: &str, secret_key: Option<&Path>) -> TempDir {
    if let Some(secret_key) = secret_key {
        sign_paths(secret_key, paths);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let url = cache_url(dir.path(), compression);
    let mut args = vec!["nix", "copy", "--to", &url];
    args.extend(paths);
    nix_cmd(args);
    dir
}

/// The `.narinfo` files of a binary cache, sorted.
pub fn narinfo_files(cache: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(cache)
        .expect("read cache dir")
        .map(|entry| entry.expect("read cache dir").path())
        .filter(|path| path.extension() == Some(OsStr::new("narinfo")))
        .collect();
    files.sort();
    files
}

/// Copies a binary cache (or any tree of plain files and directories) into a new
/// temporary directory, for tests that edit a cache without touching the original.
pub fn copy_tree(from: &Path) -> TempDir {
    fn copy(from: &Path, to: &Path) {
        for entry in std::fs::read_dir(from).expect("read dir") {
            let entry = entry.expect("read dir");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("file type").is_dir() {
                std::fs::create_dir(&target).expect("create dir");
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).expect("copy file");
            }
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    copy(from, dir.path());
    dir
}

/// A new, empty Nix store rooted in a temporary directory; `.1` is its store URL
/// (`local?root=…`) for `nix copy --to`. Its paths land in `<root>/nix/store`.
pub fn fresh_store() -> (TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("local?root={}", dir.path().display());
    (dir, url)
}

/// Deterministic bytes that do not compress: a xorshift stream.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
