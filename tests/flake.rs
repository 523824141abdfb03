//! The flake and its NixOS modules (`flake.nix`, `nix/`), checked with the
//! real Nix this machine has and no nixpkgs: every Nix file parses; the
//! flake's outputs and the modules evaluate against the stub of `lib`,
//! `pkgs` and the module system in `nix/tests/stub.nix`
//! (`nix/tests/eval.nix` makes sample configurations and reports the units
//! they make); the package is built from `./Cargo.lock` at the workspace's
//! version; the units' command lines carry the flags the configuration
//! asks for, each a flag the binary has; configurations that cannot work
//! are refused with a message.
//!
//! And the units' commands run here, as systemd would run them (the command
//! lines parsed as systemd parses them, credentials in a directory of their
//! own, the mount with only CAP_SYS_ADMIN and no new privileges): the
//! server from its ExecStart with TLS and tokens, an import into it, the gc
//! unit, then, in a private mount namespace, the builder's mount, overlay
//! and registration units and the `lazystore-register` command, an
//! unmodified `nix-build` over the lazy paths, and the overlay's stop,
//! which leaves the store and Nix's database as they were. What is not
//! checked here (systemd itself: ordering, restarts, the sandboxing
//! options; the real nixpkgs) is what `checks.<system>.vm` checks on a
//! machine with Nix and KVM.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::LAZYSTORE;
use lazystore_testkit::{
    NIX_CONFIG, gen_key, make_cache, nix_build, nix_cmd, nix_command, nix_output,
};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs `nix-instantiate ARGS…` in the repository and returns its standard
/// output and error, and whether it succeeded.
fn nix_instantiate(args: &[&str]) -> (bool, String, String) {
    let out = nix_command("nix-instantiate")
        .args(args)
        .current_dir(ROOT)
        .output()
        .expect("run nix-instantiate (apt-get install nix-bin)");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `nix/tests/eval.nix`'s attribute `attr`, evaluated strictly, as JSON;
/// `args` are nix-instantiate's `--arg`/`--argstr` arguments.
fn eval(attr: &str, args: &[&str]) -> Value {
    let mut all = vec![
        "--eval",
        "--strict",
        "--json",
        "nix/tests/eval.nix",
        "-A",
        attr,
    ];
    all.extend(args);
    let (ok, stdout, stderr) = nix_instantiate(&all);
    assert!(ok, "nix-instantiate {all:?} failed:\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn results() -> Value {
    eval("results", &[])
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// The workspace's version: `[workspace.package]`'s `version` in Cargo.toml.
fn workspace_version() -> String {
    let toml = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap();
    let section = toml
        .split("\n[")
        .find(|s| s.starts_with("workspace.package]"))
        .expect("Cargo.toml has [workspace.package]");
    section
        .lines()
        .find_map(|l| l.trim().strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("[workspace.package] has a version")
        .to_owned()
}

/// The workspace's members, as `members = [...]` in Cargo.toml lists them.
fn workspace_members() -> Vec<String> {
    let toml = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap();
    let list = toml
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .expect("Cargo.toml lists its members")
        .0;
    list.split(',')
        .map(|m| m.trim().trim_matches('"').to_owned())
        .filter(|m| !m.is_empty())
        .collect()
}

/// An ExecStart= line split into words as systemd splits it, for what the
/// modules write: words apart by spaces; double-quoted words with C
/// escapes; `%%` is `%` and `$$` is `$`; `${NAME}` is the value of NAME in
/// `env` (systemd expands those it sets, such as CREDENTIALS_DIRECTORY). A
/// leading `-` (failure ignored) is returned apart.
fn systemd_words(line: &str, env: &HashMap<&str, String>) -> (bool, Vec<String>) {
    let (ignore_failure, line) = match line.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut word = String::new();
        let mut quoted = false;
        while let Some(c) = chars.next() {
            match c {
                ' ' if !quoted => break,
                '"' => quoted = !quoted,
                '\\' if quoted => match chars.next().expect("an escape") {
                    'n' => word.push('\n'),
                    't' => word.push('\t'),
                    'u' => {
                        let hex: String = (0..4).map(|_| chars.next().unwrap()).collect();
                        word.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                    }
                    other => word.push(other),
                },
                '%' => match chars.next() {
                    Some('%') => word.push('%'),
                    other => panic!("unexpected specifier %{other:?} in {line}"),
                },
                '$' => match chars.next() {
                    Some('$') => word.push('$'),
                    Some('{') => {
                        let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                        let value = env
                            .get(name.as_str())
                            .unwrap_or_else(|| panic!("${{{name}}} is not set, in {line}"));
                        word.push_str(value);
                    }
                    other => panic!("unexpected ${other:?} in {line}"),
                },
                c => word.push(c),
            }
        }
        assert!(!quoted, "unterminated quote in {line}");
        words.push(word);
    }
    (ignore_failure, words)
}

/// The words of a command line, credentials not expanded.
fn words(line: &str) -> Vec<String> {
    let env = HashMap::from([(
        "CREDENTIALS_DIRECTORY",
        "${CREDENTIALS_DIRECTORY}".to_owned(),
    )]);
    systemd_words(line, &env).1
}

/// Whether `words` has `flag` followed by `value`.
fn has_pair(words: &[String], flag: &str, value: &str) -> bool {
    words.windows(2).any(|w| w[0] == flag && w[1] == value)
}

/// Every `--flag` of `words` is a flag `lazystore SUBCOMMAND --help` describes.
fn assert_real_flags(subcommand: &str, words: &[String]) {
    let help = Command::new(LAZYSTORE)
        .args([subcommand, "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for flag in words.iter().filter(|w| w.starts_with("--")) {
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "lazystore {subcommand} has no {flag}: {words:?}"
        );
    }
}

#[test]
fn every_nix_file_parses() {
    let mut files = vec![Path::new(ROOT).join("flake.nix")];
    let mut dirs = vec![Path::new(ROOT).join("nix")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "nix") {
                files.push(path);
            }
        }
    }
    for module in ["server", "builder", "exec-line"] {
        let file = Path::new(ROOT).join(format!("nix/modules/{module}.nix"));
        assert!(files.contains(&file), "{} is missing", file.display());
    }
    for file in &files {
        let (ok, _, stderr) = nix_instantiate(&["--parse", file.to_str().unwrap()]);
        assert!(ok, "{} does not parse:\n{stderr}", file.display());
    }
}

#[test]
fn the_flake_builds_the_workspace_from_its_lock_file() {
    let flake = &results()["flake"];
    assert_eq!(flake["pname"], "lazystore");
    assert_eq!(
        flake["version"].as_str().unwrap(),
        workspace_version(),
        "the package's version is the workspace's"
    );
    assert_eq!(
        flake["lockFileIsCargoLock"], true,
        "cargoLock.lockFile = ./Cargo.lock"
    );
    assert_eq!(
        Path::new(flake["lockFile"].as_str().unwrap()),
        Path::new(ROOT).join("Cargo.lock")
    );
    assert_eq!(flake["mainProgram"], "lazystore");

    // The source holds every member of the workspace.
    let src = strings(&flake["src"]);
    assert_eq!(
        Path::new(flake["srcRoot"].as_str().unwrap()),
        Path::new(ROOT)
    );
    let held = |path: PathBuf| src.iter().any(|f| Path::new(f) == path);
    for member in workspace_members() {
        let needed = match member.as_str() {
            "." => vec!["Cargo.toml", "Cargo.lock", "src"],
            member => vec![member],
        };
        for path in needed {
            assert!(
                held(Path::new(ROOT).join(path)),
                "the source lacks {path}: {src:?}"
            );
        }
    }
    for file in &src {
        assert!(
            Path::new(file).exists(),
            "{file} is in the source but not here"
        );
    }

    // The package builds without its tests; the check runs those a
    // sandbox can run: the named castore suites exist, the skipped tests too.
    assert_eq!(flake["doCheck"], false);
    assert_eq!(flake["checkDoCheck"], true);
    let flags = strings(&flake["cargoTestFlags"]);
    assert!(
        flags.starts_with(&["--workspace".into(), "--lib".into(), "--bins".into()]),
        "{flags:?}"
    );
    for pair in flags.windows(2).filter(|w| w[0] == "--test") {
        let file = Path::new(ROOT).join(format!("castore/tests/{}.rs", pair[1]));
        assert!(file.exists(), "{} is not a castore test", pair[1]);
    }
    for skip in strings(&flake["checkFlags"]) {
        let name = skip.strip_prefix("--skip=").expect("--skip=NAME");
        let function = name.rsplit("::").next().unwrap();
        let found = ["pathinfo/src/listing.rs", "pathinfo/src/nar/tests.rs"]
            .iter()
            .any(|f| {
                std::fs::read_to_string(Path::new(ROOT).join(f))
                    .unwrap()
                    .contains(&format!("fn {function}()"))
            });
        assert!(found, "{name} is skipped but no such test exists");
    }

    for system in ["x86_64-linux", "aarch64-linux"] {
        assert_eq!(
            strings(&flake["packages"][system]),
            ["default", "lazystore"]
        );
        assert_eq!(strings(&flake["checks"][system]), ["package", "vm"]);
        assert_eq!(strings(&flake["devShells"][system]), ["default"]);
    }
    assert_eq!(strings(&flake["nixosModules"]), ["builder", "server"]);
    assert_eq!(strings(&flake["vm"]["nodes"]), ["builder", "server"]);
    let script = flake["vm"]["testScript"].as_str().unwrap();
    for step in [
        "lazystore import",
        "lazystore-register",
        "nix-build",
        "lazystore-gc.service",
    ] {
        assert!(script.contains(step), "the VM test does not run {step}");
    }

    // The flake's module runs the flake's package.
    let exec = words(flake["moduleExecStart"].as_str().unwrap());
    assert_eq!(
        exec[0],
        format!(
            "{}/bin/lazystore",
            flake["packageOutPath"].as_str().unwrap()
        )
    );
    assert_eq!(exec[1], "serve");
}

#[test]
fn the_server_module_makes_its_units() {
    let all = results();
    let server = &all["server"];
    let unit = &server["services"]["lazystore-server"];
    let exec = words(unit["execStart"].as_str().unwrap());
    assert!(
        exec[0].ends_with("/bin/lazystore") && exec[1] == "serve",
        "{exec:?}"
    );
    assert_real_flags("serve", &exec);
    for (flag, value) in [
        ("--store", "redb:///var/lib/lazystore/store.redb"),
        ("--listen", "0.0.0.0:7000"),
        ("--http-listen", "0.0.0.0:8080"),
        ("--upstream", "https://cache.example.org/with%20space"),
        (
            "--trusted-public-key",
            "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",
        ),
        ("--signing-key", "${CREDENTIALS_DIRECTORY}/signing-key"),
        (
            "--write-token-file",
            "${CREDENTIALS_DIRECTORY}/write-tokens",
        ),
        ("--read-token-file", "${CREDENTIALS_DIRECTORY}/read-tokens"),
        ("--gc-lease", "2h"),
        ("--max-upload-size", "8589934592"),
    ] {
        assert!(
            has_pair(&exec, flag, value),
            "no {flag} {value} in {exec:?}"
        );
    }
    assert!(exec.contains(&"--allow-upload".to_owned()), "{exec:?}");
    // A `%` reaches the program as written.
    assert!(
        unit["execStart"]
            .as_str()
            .unwrap()
            .contains("with%%20space"),
        "{unit}"
    );
    // Secrets are credentials, read by systemd, never in the command line.
    let mut credentials = strings(&unit["loadCredential"]);
    credentials.sort();
    assert_eq!(
        credentials,
        [
            "read-tokens:/run/keys/read.tokens",
            "signing-key:/run/keys/cache.secret",
            "write-tokens:/run/keys/write.tokens"
        ]
    );
    let settings = &unit["settings"];
    for (key, value) in [
        ("User", "lazystore"),
        ("StateDirectory", "lazystore"),
        ("StateDirectoryMode", "0700"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "1"),
        ("PrivateTmp", "1"),
        ("PrivateDevices", "1"),
        ("NoNewPrivileges", "1"),
        ("CapabilityBoundingSet", ""),
        ("MemoryDenyWriteExecute", "1"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(settings[key], value, "{key} in {settings}");
    }
    assert_eq!(
        strings(&settings["RestrictAddressFamilies"]),
        ["AF_UNIX", "AF_INET", "AF_INET6"]
    );
    assert_eq!(
        strings(&settings["SystemCallFilter"]),
        ["@system-service", "~@privileged"]
    );
    assert_eq!(unit["environment"]["LAZYSTORE_DIR"], "/var/lib/lazystore");
    assert_eq!(server["firewallPorts"], serde_json::json!([7000, 8080]));
    assert_eq!(strings(&server["users"]), ["lazystore"]);
    assert_eq!(server["assertions"], serde_json::json!([]));

    // The gc timer: through the gRPC listener on this machine, with a token.
    let gc = &server["services"]["lazystore-gc"];
    let gc_exec = words(gc["execStart"].as_str().unwrap());
    assert_eq!(gc_exec[1], "gc");
    assert_real_flags("gc", &gc_exec);
    for (flag, value) in [
        ("--store", "grpc+http://127.0.0.1:7000"),
        ("--token-file", "${CREDENTIALS_DIRECTORY}/token"),
        ("--keep-since", "90d"),
        (
            "--keep-closure-of",
            "/nix/store/00000000000000000000000000000000-pinned",
        ),
    ] {
        assert!(
            has_pair(&gc_exec, flag, value),
            "no {flag} {value} in {gc_exec:?}"
        );
    }
    assert_eq!(strings(&gc["loadCredential"]), ["token:/run/keys/gc.token"]);
    assert_eq!(gc["settings"]["Type"], "oneshot");
    assert_eq!(gc["settings"]["ProtectSystem"], "strict");
    let timer = &server["timers"]["lazystore-gc"];
    assert_eq!(timer["OnCalendar"], "weekly");
    assert_eq!(timer["Persistent"], true);
    assert_eq!(strings(&timer["wantedBy"]), ["timers.target"]);

    // An S3 store is passed through whole, its credentials from the environment file.
    let s3 = &all["s3Server"];
    let s3_unit = &s3["services"]["lazystore-server"];
    let s3_exec = words(s3_unit["execStart"].as_str().unwrap());
    assert!(has_pair(
        &s3_exec,
        "--store",
        "s3://lazystore/main?endpoint=https://s3.example.org&region=garage"
    ));
    assert!(has_pair(
        &s3_exec,
        "--listen",
        "unix:/run/lazystore/grpc.sock"
    ));
    assert_eq!(strings(&s3_unit["environmentFile"]), ["/run/keys/s3.env"]);
    assert_eq!(s3_unit["settings"]["RuntimeDirectory"], "lazystore");
    let s3_gc = words(
        s3["services"]["lazystore-gc"]["execStart"]
            .as_str()
            .unwrap(),
    );
    assert!(
        has_pair(&s3_gc, "--store", "grpc+unix:///run/lazystore/grpc.sock"),
        "{s3_gc:?}"
    );
    assert_eq!(s3["firewallPorts"], serde_json::json!([]));

    // TLS: certificate and key as credentials; gc told where and whom to trust.
    let tls = &all["tlsServer"];
    let tls_exec = words(
        tls["services"]["lazystore-server"]["execStart"]
            .as_str()
            .unwrap(),
    );
    assert!(has_pair(&tls_exec, "--listen", "[::]:7443"), "{tls_exec:?}");
    assert!(has_pair(
        &tls_exec,
        "--tls-cert",
        "${CREDENTIALS_DIRECTORY}/tls-cert.pem"
    ));
    assert!(has_pair(
        &tls_exec,
        "--tls-key",
        "${CREDENTIALS_DIRECTORY}/tls-key.pem"
    ));
    let tls_gc = words(
        tls["services"]["lazystore-gc"]["execStart"]
            .as_str()
            .unwrap(),
    );
    assert!(has_pair(
        &tls_gc,
        "--store",
        "grpc+https://lazystore.example.org:7443"
    ));
    assert!(has_pair(
        &tls_gc,
        "--ca-file",
        "${CREDENTIALS_DIRECTORY}/ca.pem"
    ));

    // Disabled, it makes nothing.
    assert_eq!(all["disabled"]["services"], serde_json::json!({}));
}

#[test]
fn configurations_that_cannot_work_are_refused() {
    let refused = &results()["refused"];
    for (case, message) in [
        (
            "uploadWithoutTokens",
            "allowUpload needs httpListen and writeTokenFile",
        ),
        ("certWithoutKey", "tls.certFile and tls.keyFile go together"),
        ("noListener", "set listen or httpListen"),
        ("gcWithoutToken", "set gc.tokenFile"),
        ("gcOverTlsWithoutStore", "set gc.store"),
        ("signingWithoutHttp", "set httpListen"),
        ("stateDirWithComma", "overlayfs splits its options"),
    ] {
        let messages = strings(&refused[case]);
        assert!(
            messages.len() == 1 && messages[0].contains(message),
            "{case}: {messages:?}"
        );
    }
    // The stub checks types and names as the module system does.
    let (ok, _, stderr) = nix_instantiate(&[
        "--eval",
        "--strict",
        "nix/tests/eval.nix",
        "-A",
        "typeError",
    ]);
    assert!(
        !ok && stderr.contains("services.lazystore.server.listen")
            && stderr.contains("not of type"),
        "{stderr}"
    );
    let (ok, _, stderr) = nix_instantiate(&[
        "--eval",
        "--strict",
        "nix/tests/eval.nix",
        "-A",
        "undeclared",
    ]);
    assert!(
        !ok && stderr.contains("services.lazystore.server.listenn' does not exist"),
        "{stderr}"
    );
}

#[test]
fn the_builder_module_makes_its_units() {
    let all = results();
    let builder = &all["builder"];
    let state = "/var/lib/lazystore-builder";

    let mount = &builder["services"]["lazystore-mount"];
    let exec = words(mount["execStart"].as_str().unwrap());
    assert_eq!(exec[1..3], ["mount".to_owned(), format!("{state}/lazy")]);
    assert_real_flags("mount", &exec);
    for (flag, value) in [
        ("--store", "grpc+http://127.0.0.1:7000"),
        ("--cache", &format!("redb://{state}/cache.redb")),
        ("--cache-size", "20G"),
        ("--token-file", "${CREDENTIALS_DIRECTORY}/token"),
        ("--ca-file", "${CREDENTIALS_DIRECTORY}/ca.pem"),
        ("--upstream", "https://cache.example.org/with%20space"),
    ] {
        assert!(
            has_pair(&exec, flag, value),
            "no {flag} {value} in {exec:?}"
        );
    }
    for flag in ["--allow-other", "--list-root"] {
        assert!(exec.contains(&flag.to_owned()), "no {flag} in {exec:?}");
    }
    let mut credentials = strings(&mount["loadCredential"]);
    credentials.sort();
    assert_eq!(
        credentials,
        ["ca.pem:/run/keys/ca.pem", "token:/run/keys/builder.token"]
    );
    // The mount is made in the machine's mount namespace: no option that
    // would give the unit one of its own.
    let settings = mount["settings"].as_object().unwrap();
    for namespacing in [
        "PrivateTmp",
        "ProtectSystem",
        "ProtectHome",
        "PrivateDevices",
        "PrivateMounts",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "ReadWritePaths",
        "MountFlags",
    ] {
        assert!(
            !settings.contains_key(namespacing),
            "{namespacing} in {settings:?}"
        );
    }
    assert_eq!(
        strings(&settings["CapabilityBoundingSet"]),
        ["CAP_SYS_ADMIN"]
    );
    assert_eq!(strings(&settings["DeviceAllow"]), ["/dev/fuse rw"]);
    assert_eq!(settings["NoNewPrivileges"], "1");
    assert!(strings(&mount["execStartPost"])[0].ends_with(&format!(" {state}/lazy")));

    let overlay = &builder["services"]["lazystore-overlay"];
    let start = words(overlay["execStart"].as_str().unwrap());
    assert!(start[0].ends_with("-lazystore-overlay") && start[1..] == ["setup", state]);
    let stop = words(strings(&overlay["execStopPost"])[0].as_str());
    assert_eq!(stop[1..], ["teardown", state]);
    assert_eq!(strings(&overlay["bindsTo"]), ["lazystore-mount.service"]);
    assert!(strings(&overlay["wantedBy"]).contains(&"lazystore-mount.service".to_owned()));

    let register = &builder["services"]["lazystore-register"];
    let script = register["script"].as_str().unwrap();
    assert!(
        script.contains("/bin/lazystore nix-db --store grpc+http://127.0.0.1:7000 --token-file \"$CREDENTIALS_DIRECTORY/token\" --ca-file \"$CREDENTIALS_DIRECTORY/ca.pem\""),
        "{script}"
    );
    assert!(
        script.contains("/bin/nix-store --load-db <\"$records\""),
        "{script}"
    );
    assert_eq!(
        register["scriptArgs"],
        "/nix/store/00000000000000000000000000000000-toolchain"
    );
    assert_eq!(strings(&register["bindsTo"]), ["lazystore-overlay.service"]);

    // The command for registering more by hand reads the secrets in place.
    let commands = builder["commands"].as_array().unwrap();
    assert_eq!(commands.len(), 1);
    assert_eq!(commands[0]["name"], "lazystore-register");
    let text = commands[0]["text"].as_str().unwrap();
    assert!(
        text.contains("--token-file /run/keys/builder.token --ca-file /run/keys/ca.pem"),
        "{text}"
    );
    assert_eq!(builder["assertions"], serde_json::json!([]));
    assert_eq!(builder["warnings"], serde_json::json!([]));

    // Without the overlay, only the mount.
    let alone = &all["builderNoOverlay"]["services"];
    assert_eq!(
        alone.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["lazystore-mount"]
    );
}

/// A command line as bash words, single-quoted.
fn shell_line(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A command line of a unit as bash would run it: a script the stub wrote
/// to the store is not executable, so bash runs it.
fn runnable(words: Vec<String>) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let program = Path::new(&words[0]);
    let executable = std::fs::metadata(program)
        .map(|m| m.permissions().mode() & 0o111 != 0)
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    if executable {
        words
    } else {
        std::iter::once("bash".to_owned()).chain(words).collect()
    }
}

/// Copies what a unit's LoadCredential= names into a new directory, as
/// systemd does, and returns it.
fn credentials(unit: &Value, under: &Path, name: &str) -> PathBuf {
    let dir = under.join(format!("credentials-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in strings(&unit["loadCredential"]) {
        let (id, path) = entry.split_once(':').unwrap();
        std::fs::copy(path, dir.join(id)).unwrap_or_else(|e| panic!("credential {entry}: {e}"));
    }
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_units_commands_run_on_this_machine() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();

    // The inputs: `data` holds the file the build reads, `top` refers to it.
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let greeting = format!("read through the units of the builder module, {nonce}");
    let built = nix_build(
        &format!(
            r#"  data = mk "lazystore-flake-data" "/bin/mkdir $out; echo '{greeting}' > $out/greeting";"#
        ),
        r#"[ data (mk "lazystore-flake-top" "echo ${data} > $out") ]"#,
    );
    let find = |suffix: &str| {
        built
            .lines()
            .find(|p| p.ends_with(suffix))
            .unwrap_or_else(|| panic!("nix-build printed no {suffix}: {built}"))
            .to_owned()
    };
    let (data, top) = (find("-lazystore-flake-data"), find("-lazystore-flake-top"));

    // Secrets: tokens, the cache's signing key, a CA and the server's certificate.
    let secrets = dir.join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let (secret, public) = gen_key(dir, "flake-test-1");
    let pki = lazystore_testkit::tls::test_pki("flake-test");
    let write_token = "flake-test-write-token-0123456789";
    let read_token = "flake-test-read-token-9876543210";
    for (file, text) in [
        (
            "write.tokens",
            format!("# writers\n{write_token}\nanother-writer-token\n"),
        ),
        ("read.tokens", format!("{read_token}\n")),
        ("gc.token", format!("{write_token}\n")),
        ("builder.token", format!("{read_token}\n")),
    ] {
        std::fs::write(secrets.join(file), text).unwrap();
    }
    std::fs::copy(&secret, secrets.join("cache.secret")).unwrap();
    for (from, to) in [
        (&pki.ca, "ca.pem"),
        (&pki.cert, "cert.pem"),
        (&pki.key, "key.pem"),
    ] {
        std::fs::copy(from, secrets.join(to)).unwrap();
    }

    // The package: bin/lazystore.
    let package = dir.join("package");
    std::fs::create_dir_all(package.join("bin")).unwrap();
    std::os::unix::fs::symlink(LAZYSTORE, package.join("bin/lazystore")).unwrap();

    let port = free_port();
    let state = dir.join("builder");
    // The server's state directory, as StateDirectory= makes it.
    let server_state = dir.join("server");
    std::fs::create_dir(&server_state).unwrap();
    let server_store = format!("redb://{}/store.redb", server_state.display());
    // `--argstr NAME VALUE` when `string`, else `--arg NAME EXPR`.
    let args = [
        ("lazystore", true, package.display().to_string()),
        ("tools", true, "/usr".to_owned()),
        ("secrets", true, secrets.display().to_string()),
        ("listenHost", true, "127.0.0.1".to_owned()),
        ("port", false, port.to_string()),
        ("httpPort", false, "0".to_owned()),
        ("withTls", false, "true".to_owned()),
        ("upstreams", false, "[ ]".to_owned()),
        ("trustedPublicKeys", false, format!("[ \"{public}\" ]")),
        ("builderState", true, state.display().to_string()),
        ("serverStore", true, server_store),
        ("registerPaths", false, format!("[ \"{data}\" ]")),
        ("keepClosureOf", false, format!("[ \"{data}\" ]")),
    ];
    // The scripts are written to the store (builtins.toFile).
    let mut argv = vec!["--read-write-mode"];
    for (name, string, value) in &args {
        argv.extend([if *string { "--argstr" } else { "--arg" }, name, value]);
    }
    let report = eval("results", &argv);

    // lazystore-server.service, from its ExecStart and credentials.
    let server_unit = &report["server"]["services"]["lazystore-server"];
    let server_env = HashMap::from([(
        "CREDENTIALS_DIRECTORY",
        credentials(server_unit, dir, "server")
            .display()
            .to_string(),
    )]);
    let (_, server_words) = systemd_words(server_unit["execStart"].as_str().unwrap(), &server_env);
    assert_eq!(
        server_words[0],
        package.join("bin/lazystore").to_str().unwrap()
    );
    let server_args: Vec<&str> = server_words[1..].iter().map(String::as_str).collect();
    let (server, urls) = common::start_lines(&server_args, 2);
    assert_eq!(
        urls[0],
        format!("grpc+https://127.0.0.1:{port}"),
        "{urls:?}"
    );
    assert!(urls[1].starts_with("https://127.0.0.1:"), "{urls:?}");
    let grpc = &urls[0];

    // An import with a write token; the path is published (trusted key).
    let cache = make_cache(&[&top], "zstd", Some(&secret));
    let import = Command::new(LAZYSTORE)
        .args(["import", "--store", grpc, "--from"])
        .arg(format!("file://{}", cache.path().display()))
        .args(["--trusted-public-key", &public, "--token-file"])
        .arg(secrets.join("gc.token"))
        .arg("--ca-file")
        .arg(secrets.join("ca.pem"))
        .arg(&top)
        .output()
        .unwrap();
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );

    // lazystore-gc.service collects beside the server and keeps what was just published.
    let gc_unit = &report["server"]["services"]["lazystore-gc"];
    let gc_env = HashMap::from([(
        "CREDENTIALS_DIRECTORY",
        credentials(gc_unit, dir, "gc").display().to_string(),
    )]);
    let (_, gc_words) = systemd_words(gc_unit["execStart"].as_str().unwrap(), &gc_env);
    let gc = Command::new(&gc_words[0])
        .args(&gc_words[1..])
        .output()
        .unwrap();
    assert!(
        gc.status.success(),
        "gc: {}\n{}",
        String::from_utf8_lossy(&gc.stdout),
        String::from_utf8_lossy(&gc.stderr)
    );

    // Only the service has the closure now.
    nix_cmd(["nix-store", "--delete", &top, &data]);
    assert!(!Path::new(&data).exists());

    // The builder's units, in a private mount namespace, in systemd's order.
    let builder = &report["builder"]["services"];
    let mount = &builder["lazystore-mount"];
    let mount_env = HashMap::from([(
        "CREDENTIALS_DIRECTORY",
        credentials(mount, dir, "mount").display().to_string(),
    )]);
    let line = |unit_line: &str, env: &HashMap<&str, String>| {
        let (ignore, words) = systemd_words(unit_line, env);
        let line = shell_line(&runnable(words));
        if ignore {
            format!("{line} || true")
        } else {
            line
        }
    };
    let no_env = HashMap::new();
    let pre: Vec<String> = strings(&mount["execStartPre"])
        .iter()
        .map(|l| line(l, &no_env))
        .collect();
    let register = &builder["lazystore-register"];
    let register_credentials = credentials(register, dir, "register");
    let register_script = dir.join("register.sh");
    std::fs::write(&register_script, register["script"].as_str().unwrap()).unwrap();
    let command = &report["builder"]["commands"][0];
    let reader = dir.join("reader.nix");
    std::fs::write(
        &reader,
        format!(
            r#"derivation {{
  name = "lazystore-flake-reader";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  top = builtins.storePath "{top}";
  args = [ "-c" "read -r line < ${{builtins.storePath "{data}"}}/greeting; echo \"$line\" > $out" ];
}}"#
        ),
    )
    .unwrap();
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    let script = format!(
        r#"set -euo pipefail
out={out}
# lazystore-mount.service: ExecStartPre, ExecStart (CapabilityBoundingSet=CAP_SYS_ADMIN,
# NoNewPrivileges=yes), ExecStartPost.
{pre}
setpriv --no-new-privs --inh-caps=-all --bounding-set=-all,+sys_admin {mount} >"$out/mount.out" 2>"$out/mount.log" &
mount_pid=$!
trap 'kill -TERM $mount_pid 2>/dev/null || true' EXIT
{post}
# lazystore-overlay.service
{overlay}
# lazystore-register.service: the registerPaths (data); the command adds top.
CREDENTIALS_DIRECTORY={register_credentials} bash -e {register_script} {register_args}
bash {command} {top} 2>"$out/command.log"
nix-store --check-validity {data} {top}
cat {data}/greeting >"$out/read"
nix-build --no-out-link {reader} >"$out/result-path"
cat "$(cat "$out/result-path")" >"$out/result"
cat {state}/lazy/.lazystore/stats >"$out/stats"
# Stopping the overlay: ExecStopPost.
{teardown}
if [ -e {top} ]; then echo present; else echo absent; fi >"$out/after"
if nix-store --check-validity {top} 2>/dev/null; then echo valid; else echo invalid; fi >>"$out/after"
# Stopping the mount: SIGTERM, and it unmounts itself.
kill -TERM $mount_pid
wait $mount_pid
trap - EXIT
mountpoint -q {state}/lazy && echo mounted >>"$out/after" || echo unmounted >>"$out/after"
"#,
        out = out.display(),
        pre = pre.join("\n"),
        mount = line(mount["execStart"].as_str().unwrap(), &mount_env),
        post = line(&strings(&mount["execStartPost"])[0], &no_env),
        overlay = line(
            builder["lazystore-overlay"]["execStart"].as_str().unwrap(),
            &no_env
        ),
        register_credentials = register_credentials.display(),
        register_script = register_script.display(),
        register_args = register["scriptArgs"].as_str().unwrap(),
        command = command["path"].as_str().unwrap(),
        top = top,
        data = data,
        reader = reader.display(),
        state = state.display(),
        teardown = line(
            &strings(&builder["lazystore-overlay"]["execStopPost"])[0],
            &no_env
        ),
    );
    let run = Command::new("timeout")
        .args(["300", "unshare", "--mount", "--propagation", "private"])
        .args(["bash", "-c", &script])
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    assert!(
        run.status.success(),
        "the units failed ({}):\nstdout:\n{}\nstderr:\n{}\nmount log:\n{}\nserver log:\n{}\nscript:\n{script}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
        read("mount.log"),
        server.stderr(),
    );
    eprintln!(
        "the units' stderr:\n{}\nthe mount's counters:\n{}",
        String::from_utf8_lossy(&run.stderr),
        read("stats")
    );
    assert_eq!(read("read"), format!("{greeting}\n"));
    assert_eq!(
        read("result"),
        format!("{greeting}\n"),
        "the build's output"
    );
    let stats: HashMap<String, u64> = read("stats")
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect();
    assert!(stats["chunks_fetched"] > 0, "{stats:?}");
    assert_eq!(read("after"), "absent\ninvalid\nunmounted\n");
    assert!(read("command.log").contains("valid until lazystore-overlay.service stops"));

    // The host is as it was: no mount of the state directory, the paths
    // neither there nor valid, the upper layers gone, the cache kept.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(state.to_str().unwrap()), "{mounts}");
    for path in [&top, &data] {
        assert!(!Path::new(path).exists(), "{path} is in the host's store");
        let valid = nix_output(["nix-store", "--check-validity", path.as_str()]);
        assert!(
            !valid.status.success(),
            "{path} is valid in the host's database"
        );
    }
    assert!(!state.join("store-upper").exists());
    assert!(state.join("cache.redb").exists(), "the chunk cache is kept");
    drop(server);
}
