//! The `lazystore` commands written in README.md and docs/*.md name real
//! subcommands and real flags: each command line in a shell block is
//! checked against `lazystore <subcommand> --help`, so a renamed or removed
//! flag fails here rather than in a reader's terminal.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const LAZYSTORE: &str = env!("CARGO_BIN_EXE_lazystore");

/// The `lazystore …` command lines of the shell blocks of `text`, with
/// continuation lines joined.
fn commands(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut in_shell = false;
    let mut current: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            in_shell = matches!(trimmed, "```sh" | "```bash" | "```console" | "```shell");
            continue;
        }
        if !in_shell {
            continue;
        }
        let trimmed = trimmed.trim_start_matches("$ ").trim_start_matches("# ");
        if let Some(cmd) = current.as_mut() {
            cmd.push(' ');
            cmd.push_str(trimmed.trim_end_matches('\\'));
        } else if trimmed.starts_with("lazystore ") {
            current = Some(trimmed.trim_end_matches('\\').to_owned());
        } else {
            continue;
        }
        if !trimmed.ends_with('\\') {
            found.extend(current.take());
        }
    }
    found
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
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let mut helps: BTreeMap<String, String> = BTreeMap::new();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for command in commands(&text) {
            let words: Vec<&str> = command.split_whitespace().collect();
            let Some(sub) = words.get(1).filter(|w| !w.starts_with('-')) else {
                continue;
            };
            let help = helps.entry(sub.to_string()).or_insert_with(|| help(sub));
            for word in &words[2..] {
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
