//! The commands written in README.md and docs/*.md work as written.
//!
//! - Every `lazystore` command line in a shell block names a real
//!   subcommand and real flags (checked against `lazystore <sub> --help`),
//!   so a renamed flag fails here rather than in a reader's terminal.
//! - Every command that can run offline is run, in the order a reader
//!   meets them, against real servers, mounts and real Nix: placeholders
//!   (`/nix/store/…-foo`, `central:7000`, `/etc/lazystore/…`) are replaced
//!   by paths and files made here, a `serve` or `mount` keeps running (on
//!   127.0.0.1 port 0) until the next one, and each other command must
//!   exit 0. What can't run here (cache.nixos.org, a placeholder build) is
//!   named in [`NOT_RUN`] with why; a command neither run nor named there
//!   fails the test, so a new documented command is run from its first day.
//! - `scripts/quickstart.sh`, the README's first command, runs end to end.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{LAZYSTORE, Proc, spawn_lines};
use lazystore_testkit::garage::{Garage, unique_prefix};
use lazystore_testkit::tls::test_pki;
use lazystore_testkit::{NIX_CONFIG, add_tree, gen_key};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Documented commands this test does not run, by how they start, and why.
const NOT_RUN: &[(&str, &str)] = &[
    (
        "scripts/quickstart.sh",
        "run whole by quickstart_runs_end_to_end",
    ),
    ("scripts/test.sh", "the test suite itself"),
    (
        "scripts/lazystore-builder",
        "run with a real nix-build by tests/builder_nix_build.rs",
    ),
    ("nix-build …", "a placeholder build"),
    (
        "lazystore import /nix/store/…-hello-2.12.1",
        "imports from cache.nixos.org, out of reach offline",
    ),
    (
        "lazystore import --store grpc+http://127.0.0.1:7000",
        "imports from cache.nixos.org (the default --from), out of reach offline",
    ),
    (
        "lazystore import --store grpc+https://central:7000",
        "imports from cache.nixos.org (the default --from), out of reach offline",
    ),
    (
        "lazystore import --from https://cache.example.org",
        "a cache on the internet",
    ),
    (
        "lazystore nix-db --store grpc+http://central:7000 --upstream https://cache.example.org",
        "a cache on the internet",
    ),
];

/// The documentation files, README first.
fn doc_files() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    docs.insert(0, root.join("README.md"));
    docs
}

/// A documented command line, and why it is not run if its block says
/// so: `<!-- not run: REASON -->` on the line before the block.
struct Documented {
    line: String,
    not_run: Option<String>,
    /// Which shell block of its file it is in.
    block: usize,
}

/// The command lines of the shell blocks of `text`: comment lines dropped,
/// continuation lines joined.
fn commands(text: &str) -> Vec<Documented> {
    let mut found = Vec::new();
    let mut in_shell = false;
    let mut current: Option<String> = None;
    let mut not_run: Option<String> = None;
    let mut block_not_run: Option<String> = None;
    let mut block = 0;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(why) = trimmed
            .strip_prefix("<!-- not run:")
            .and_then(|rest| rest.strip_suffix("-->"))
        {
            not_run = Some(why.trim().to_owned());
            continue;
        }
        if trimmed.starts_with("```") {
            in_shell = matches!(trimmed, "```sh" | "```bash" | "```console" | "```shell");
            block_not_run = if in_shell { not_run.take() } else { None };
            block += usize::from(in_shell);
            continue;
        }
        if !trimmed.is_empty() && !in_shell {
            not_run = None;
        }
        if !in_shell || (current.is_none() && (trimmed.is_empty() || trimmed.starts_with('#'))) {
            continue;
        }
        let trimmed = trimmed.trim_start_matches("$ ");
        let part = trimmed.trim_end_matches('\\').trim_end();
        match current.as_mut() {
            Some(cmd) => {
                cmd.push(' ');
                cmd.push_str(part);
            }
            None => current = Some(part.to_owned()),
        }
        if !trimmed.ends_with('\\') {
            found.extend(current.take().map(|line| Documented {
                line,
                not_run: block_not_run.clone(),
                block,
            }));
        }
    }
    found
}

/// The `lazystore` subcommand and its arguments in `command` (after
/// environment settings, `runuser … --` or a pipe), if it runs one.
fn lazystore_words(command: &str) -> Option<(String, Vec<String>)> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "lazystore")?;
    let sub = words.get(at + 1).filter(|w| !w.starts_with('-'))?;
    let args = words[at + 2..]
        .iter()
        .take_while(|w| !matches!(**w, "|" | "#" | "&&" | ";"))
        .map(|w| w.to_string())
        .collect();
    Some((sub.to_string(), args))
}

fn help(subcommand: &str) -> String {
    let out = Command::new(LAZYSTORE)
        .args([subcommand, "--help"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`lazystore {subcommand} --help` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn documented_commands_name_real_flags() {
    let mut helps: BTreeMap<String, String> = BTreeMap::new();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for Documented { line: command, .. } in commands(&text) {
            let Some((sub, args)) = lazystore_words(&command) else {
                continue;
            };
            let help = helps.entry(sub.clone()).or_insert_with(|| help(&sub));
            for word in &args {
                let flag = word
                    .split('=')
                    .next()
                    .unwrap()
                    .trim_end_matches([',', ';', ')']);
                if flag.starts_with("--") && flag.len() > 2 && !help.contains(flag) {
                    wrong.push(format!(
                        "{}: `{command}`: no {flag} in `lazystore {sub} --help`",
                        file.display()
                    ));
                }
            }
            checked += 1;
        }
    }
    eprintln!("{checked} documented commands checked against their --help");
    assert!(checked >= 10, "only {checked} commands found in the docs");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A `lazystore serve` started from the docs, and the URLs it printed.
struct Server {
    /// Stopped at the end of its shell block.
    scoped: bool,
    proc: Proc,
    grpc: Option<String>,
    http: Option<String>,
}

/// Where the documented commands run: the files, paths and processes their
/// placeholders stand for.
struct Stage {
    dir: tempfile::TempDir,
    /// Placeholder → what it stands for here, applied in order.
    fixed: Vec<(String, String)>,
    server: Option<Server>,
    last_serve: Option<String>,
    mount: Option<Proc>,
}

impl Stage {
    fn new() -> Stage {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let etc = d.join("etc");
        let keys = d.join("keys");
        let garage = Garage::shared();
        let cwd = d.join("cwd");
        for sub in [&etc, &keys, &cwd, &d.join("mnt"), &d.join("trees")] {
            std::fs::create_dir_all(sub).unwrap();
        }
        let write = |path: PathBuf, text: &str| std::fs::write(path, text).unwrap();

        // Store paths for the placeholders, in the store every documented
        // server serves (the default under $LAZYSTORE_DIR, and
        // /var/lib/lazystore/store.redb).
        let mut fixed = Vec::new();
        let mut paths = Vec::new();
        for name in ["foo", "hello", "sdk", "old"] {
            let tree = d.join("trees").join(name);
            std::fs::create_dir(&tree).unwrap();
            write(
                tree.join("README"),
                &format!("the {name} of the docs test\n"),
            );
            let path = add_tree(&tree);
            fixed.push((format!("/nix/store/…-{name}"), path.clone()));
            paths.push(path);
        }
        let store = d.join("store.redb");
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        common::ingest(&format!("redb://{}", store.display()), &refs);

        // Keys, tokens, certificates and the files the docs name.
        let (secret, public) = gen_key(d, "cache.example.org-1");
        std::fs::copy(secret, etc.join("cache.secret")).unwrap();
        write(cwd.join("cache.public"), &public);
        fixed.push(("cache.example.org-1:…".into(), public));
        let (secret, public) = gen_key(d, "builders-1");
        std::fs::copy(secret, etc.join("builders.secret")).unwrap();
        write(etc.join("builders.public"), &public);
        write(
            etc.join("write.tokens"),
            "# writers\nwrite-token-1\nwrite-token-2\n",
        );
        write(etc.join("read.tokens"), "read-token-1\n");
        write(etc.join("my.token"), "write-token-1\n");
        write(cwd.join("write.token"), "write-token-2\n");
        write(keys.join("lazystore-gc.token"), "write-token-2\n");
        write(etc.join("builder.token"), "read-token-1\n");
        write(
            d.join("netrc"),
            "machine 127.0.0.1 login nix password write-token-1\n",
        );
        write(
            etc.join("gc-roots"),
            &format!("{}\n{}\n{}\n", paths[0], paths[1], paths[2]),
        );
        let pki = test_pki("docs");
        for (from, to) in [
            (&pki.ca, "ca.pem"),
            (&pki.cert, "cert.pem"),
            (&pki.key, "key.pem"),
        ] {
            std::fs::copy(from, etc.join(to)).unwrap();
        }

        let dir_s = |p: PathBuf| p.to_str().unwrap().to_owned();
        fixed.extend([
            ("runuser -u lazystore -- ".into(), String::new()),
            ("/var/lib/lazystore/store.redb".into(), dir_s(store)),
            ("/var/lib/lazystore/".into(), format!("{}/", d.display())),
            ("/etc/lazystore/".into(), format!("{}/", etc.display())),
            ("/run/keys/".into(), format!("{}/", keys.display())),
            ("/var/cache/lazystore/".into(), format!("{}/", d.display())),
            (
                "'s3://lazystore/main?endpoint=https://s3.example.org&region=garage'".into(),
                format!("'{}'", garage.store_url(&unique_prefix())),
            ),
            ("/root/.netrc".into(), dir_s(d.join("netrc"))),
            ("/mnt/lazy".into(), dir_s(d.join("mnt"))),
        ]);
        Stage {
            dir,
            fixed,
            server: None,
            last_serve: None,
            mount: None,
        }
    }

    /// A shell running `line` where the docs' reader would: `lazystore` on
    /// the PATH, the default store and keys here, a token and a CA file
    /// for clients of a server that wants them.
    fn shell(&self, line: &str) -> Command {
        let d = self.dir.path();
        let bin = Path::new(LAZYSTORE).parent().unwrap();
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(line)
            .current_dir(d.join("cwd"))
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            )
            .env("LAZYSTORE_DIR", d)
            .env("LAZYSTORE_TOKEN_FILE", d.join("etc/my.token"))
            .env("LAZYSTORE_CA_FILE", d.join("etc/ca.pem"))
            .env("NIX_CONFIG", NIX_CONFIG)
            .envs(Garage::shared().env());
        let (key_id, secret) = Garage::shared().key();
        command.env("KEY_ID", key_id).env("SECRET", secret);
        command
    }

    fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.proc.stop();
        }
    }

    /// A shell block ended: its own server stops.
    fn block_ends(&mut self) {
        if self.server.as_ref().is_some_and(|s| s.scoped) {
            self.stop_server();
        }
    }

    fn stop_mount(&mut self) {
        if let Some(mount) = self.mount.take() {
            mount.stop();
        }
    }

    /// Starts a documented `serve` line, its listeners on port 0.
    fn serve(&mut self, line: &str) -> Result<(), String> {
        self.stop_server();
        let mut line = line.to_owned();
        for addr in ["0.0.0.0:7000", "0.0.0.0:8080", "127.0.0.1:7000"] {
            line = line.replace(addr, "127.0.0.1:0");
        }
        let listeners = line.matches("--listen ").count() + line.matches("--http-listen ").count();
        let (proc, urls) = spawn_lines(self.shell(&exec(&line)), listeners)?;
        self.server = Some(Server {
            scoped: false,
            proc,
            grpc: urls.iter().find(|u| u.starts_with("grpc+")).cloned(),
            http: urls.iter().find(|u| u.starts_with("http")).cloned(),
        });
        Ok(())
    }

    /// `line` with the documented server addresses replaced by the running
    /// server's (the last one started, again if it was stopped).
    fn with_server(&mut self, line: &str) -> Result<String, String> {
        const GRPC: [&str; 4] = [
            "grpc+http://central:7000",
            "grpc+https://central:7000",
            "grpc+http://127.0.0.1:7000",
            "grpc+https://lazystore.example.org:7000",
        ];
        const HTTP: [&str; 2] = ["https://central:8080", "http://central:8080"];
        if !GRPC.iter().chain(&HTTP).any(|p| line.contains(p)) {
            return Ok(line.to_owned());
        }
        if self.server.is_none() {
            let last = self
                .last_serve
                .clone()
                .ok_or("names a server before any `lazystore serve`")?;
            self.serve(&last)?;
        }
        let server = self.server.as_ref().unwrap();
        let mut line = line.to_owned();
        for (patterns, url) in [(&GRPC[..], &server.grpc), (&HTTP[..], &server.http)] {
            for p in patterns {
                if line.contains(p) {
                    let url = url
                        .as_ref()
                        .ok_or_else(|| format!("the running server has no listener for {p}"))?;
                    line = line.replace(p, url);
                }
            }
        }
        Ok(line)
    }

    /// Runs one documented command line; the error says what went wrong.
    fn run(&mut self, raw: &str, readme: bool) -> Result<(), String> {
        // A trailing comment is the reader's, not the shell's.
        let mut line = match raw.find(" #") {
            Some(at) => raw[..at].trim_end().to_owned(),
            None => raw.to_owned(),
        };
        for (placeholder, here) in &self.fixed {
            line = line.replace(placeholder, here);
        }
        let sub = lazystore_words(&line).map(|(sub, _)| sub);
        if sub.as_deref() == Some("serve") {
            if line.contains('…') {
                return Err("a placeholder (…) this test has no stand-in for".into());
            }
            // The README's servers are the reader's central service, which
            // later commands anywhere may name; the guides' other servers
            // (an S3 replica) serve their own block.
            if readme {
                self.last_serve = Some(line.clone());
            }
            self.serve(&line)?;
            self.server.as_mut().unwrap().scoped = !readme;
            return Ok(());
        }
        let line = self.with_server(&line)?;
        if line.contains('…') {
            return Err("a placeholder (…) this test has no stand-in for".into());
        }
        if sub.as_deref() == Some("mount") {
            self.stop_mount();
            let (proc, _) = spawn_lines(self.shell(&exec(&line)), 1)?;
            self.mount = Some(proc);
            return Ok(());
        }
        // A prefetch fills the cache a mount will read: before the mount.
        if sub.as_deref() == Some("prefetch") {
            self.stop_mount();
        }
        // An offline command on the embedded store needs it free.
        if line.contains(&format!("redb://{}", self.dir.path().display())) {
            self.stop_server();
        }
        let started = Instant::now();
        let out = self.shell(&line).output().unwrap();
        if !out.status.success() {
            return Err(format!(
                "exit {} after {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                out.status,
                started.elapsed(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }
}

/// `line` run by `exec`, after its environment settings, so that a signal
/// to the shell's process reaches the command.
fn exec(line: &str) -> String {
    let words: Vec<&str> = line.split(' ').collect();
    let settings = words
        .iter()
        .take_while(|w| w.contains('=') && !w.starts_with('-'))
        .count();
    format!(
        "{} exec {}",
        words[..settings].join(" "),
        words[settings..].join(" ")
    )
}

impl Drop for Stage {
    fn drop(&mut self) {
        drop(self.mount.take());
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(self.dir.path().join("mnt"))
            .status();
    }
}

#[test]
fn documented_commands_run_offline() {
    let mut stage = Stage::new();
    let mut ran = 0;
    let mut blocks_not_run = 0;
    let mut not_run_used = vec![false; NOT_RUN.len()];
    let mut failed = Vec::new();
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.strip_prefix(ROOT).unwrap().display().to_string();
        let readme = file.ends_with("README.md");
        let mut last_block = None;
        for Documented {
            line: command,
            not_run,
            block,
        } in commands(&text)
        {
            if last_block.replace(block) != Some(block) {
                stage.block_ends();
            }
            if not_run.is_some() {
                blocks_not_run += 1;
                continue;
            }
            let skip = NOT_RUN
                .iter()
                .position(|(start, _)| command.trim_start().starts_with(start));
            if let Some(i) = skip {
                not_run_used[i] = true;
                continue;
            }
            match stage.run(&command, readme) {
                Ok(()) => {
                    eprintln!("ran {name}: {command}");
                    ran += 1;
                }
                Err(why) => failed.push(format!("{name}: `{command}`: {why}")),
            }
        }
        stage.block_ends();
    }
    stage.stop_mount();
    stage.stop_server();
    let stale: Vec<_> = NOT_RUN
        .iter()
        .zip(&not_run_used)
        .filter(|(_, used)| !**used)
        .map(|((start, _), _)| *start)
        .collect();
    assert!(
        failed.is_empty(),
        "{} documented commands failed:\n\n{}",
        failed.len(),
        failed.join("\n\n")
    );
    assert!(
        stale.is_empty(),
        "NOT_RUN names commands the docs no longer have: {stale:?}"
    );
    eprintln!(
        "{ran} documented commands ran; {blocks_not_run} in blocks marked not run; {} not run here: {}",
        NOT_RUN.len(),
        NOT_RUN
            .iter()
            .map(|(c, why)| format!("`{c}` ({why})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(ran >= 30, "only {ran} documented commands ran");
}

#[test]
fn quickstart_runs_end_to_end() {
    let started = Instant::now();
    let out = Command::new(Path::new(ROOT).join("scripts/quickstart.sh"))
        .env("LAZYSTORE_BIN", LAZYSTORE)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scripts/quickstart.sh failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("hello from a lazy store"),
        "the quick start's program did not run from the mount:\n{stdout}"
    );
    assert!(started.elapsed() < Duration::from_secs(300));
}
