//! Malformed NARs: one case per rule the reader enforces, each rejected with
//! that rule's error kind at the offset of the offending string.
//!
//! Real Nix (`nix nar ls`, which must be installed) judges the same inputs,
//! so the table also records where the reader is stricter than the Nix on
//! these machines (Debian's 2.8). It is stricter in two ways: rules of its
//! own (name and target limits, depth, trailing bytes), and rules of the
//! current Nix grammar that 2.8 lacks. Nix 2.8 read the fields of a node in
//! any order, repeats included, and its sort check never fired because the
//! previous name was reset for every entry; later Nix reads the fixed
//! grammar and rejects unsorted and duplicate entries.

use std::process::{Command, Stdio};

use lazystore_pathinfo::nar::{
    MAX_DIRECTORY_DEPTH, NameError, NarErrorKind as K, NarReader, NarWriter, TargetError,
};

const NIX_CONFIG: &str =
    "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters =";

/// Builds a NAR string by string and remembers where the offending one
/// starts.
#[derive(Clone, Default)]
struct Nar {
    bytes: Vec<u8>,
    mark: Option<u64>,
}

impl Nar {
    /// Nothing at all, not even the magic.
    fn empty() -> Self {
        Nar::default()
    }

    /// The magic, then whatever follows.
    fn new() -> Self {
        Nar::empty().s("nix-archive-1")
    }

    /// A root directory, open.
    fn root_dir() -> Self {
        Nar::new().ss(&["(", "type", "directory"])
    }

    /// The next string is the offending one.
    fn mark(mut self) -> Self {
        assert!(self.mark.is_none(), "one mark per case");
        self.mark = Some(self.bytes.len() as u64);
        self
    }

    /// `str(s)` with correct padding.
    fn s(self, s: impl AsRef<[u8]>) -> Self {
        let s = s.as_ref();
        let padding = vec![0; (8 - s.len() % 8) % 8];
        self.padded(s, &padding)
    }

    fn ss(self, items: &[&str]) -> Self {
        items.iter().fold(self, |nar, s| nar.s(s))
    }

    /// `str(s)` with the given padding bytes.
    fn padded(mut self, s: &[u8], padding: &[u8]) -> Self {
        self.bytes
            .extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.bytes.extend_from_slice(s);
        self.bytes.extend_from_slice(padding);
        self
    }

    /// A length field alone: the string it announces never comes.
    fn len_only(mut self, len: u64) -> Self {
        self.bytes.extend_from_slice(&len.to_le_bytes());
        self
    }

    fn raw(mut self, bytes: &[u8]) -> Self {
        self.bytes.extend_from_slice(bytes);
        self
    }

    /// `entry ( name <name> node`: what precedes a child node.
    fn entry(self, name: impl AsRef<[u8]>) -> Self {
        self.ss(&["entry", "(", "name"]).s(name).s("node")
    }

    /// A complete child: an empty regular file.
    fn file_entry(self, name: impl AsRef<[u8]>) -> Self {
        self.entry(name)
            .ss(&["(", "type", "regular", "contents", "", ")", ")"])
    }
}

struct Case {
    name: &'static str,
    nar: Nar,
    check: fn(&K) -> bool,
    /// Nix 2.8 accepts this NAR.
    nix_2_8_accepts: bool,
}

/// A rule every Nix enforces.
fn case(name: &'static str, nar: Nar, check: fn(&K) -> bool) -> Case {
    Case {
        name,
        nar,
        check,
        nix_2_8_accepts: false,
    }
}

/// A rule of lazystore's own.
fn stricter_than_nix(name: &'static str, nar: Nar, check: fn(&K) -> bool) -> Case {
    Case {
        name,
        nar,
        check,
        nix_2_8_accepts: true,
    }
}

/// A rule of the current Nix grammar that Nix 2.8 did not enforce.
fn newer_nix_rule(name: &'static str, nar: Nar, check: fn(&K) -> bool) -> Case {
    Case {
        name,
        nar,
        check,
        nix_2_8_accepts: true,
    }
}

fn unexpected(k: &K, want: &[&str], got: Option<&[u8]>) -> bool {
    matches!(k, K::UnexpectedToken { expected, found }
        if *expected == want && found.as_deref() == got)
}

/// A NAR with directories nested `depth` deep, the deepest marked.
fn nested(depth: usize) -> Nar {
    let mut nar = Nar::new().ss(&["(", "type"]);
    for _ in 1..depth {
        nar = nar.s("directory").entry("d").ss(&["(", "type"]);
    }
    nar = nar.mark().s("directory");
    for _ in 1..depth {
        nar = nar.ss(&[")", ")"]);
    }
    nar.s(")")
}

fn cases() -> Vec<Case> {
    let valid = Nar::root_dir().file_entry("a").s(")");
    vec![
        // The magic.
        case("empty input", Nar::empty().mark(), |k| {
            matches!(k, K::UnexpectedEof)
        }),
        case(
            "wrong magic",
            Nar::empty()
                .mark()
                .s("nix-archive-2")
                .ss(&["(", "type", "directory", ")"]),
            |k| matches!(k, K::BadMagic),
        ),
        case(
            "magic length absurd",
            Nar::empty().mark().len_only(1 << 40),
            |k| matches!(k, K::BadMagic),
        ),
        case(
            "not a NAR at all",
            Nar::empty().mark().raw(b"<!DOCTYPE html><html></html>\n"),
            |k| matches!(k, K::BadMagic),
        ),
        // Padding.
        case(
            "non-zero padding after the magic",
            Nar::empty()
                .mark()
                .padded(b"nix-archive-1", &[0, 0, 1])
                .ss(&["(", "type", "directory", ")"]),
            |k| matches!(k, K::NonZeroPadding),
        ),
        case(
            "non-zero padding after a token",
            Nar::new()
                .mark()
                .padded(b"(", &[0, 0, 0, 0, 0, 0, 0x80])
                .ss(&["type", "directory", ")"]),
            |k| matches!(k, K::NonZeroPadding),
        ),
        case(
            "non-zero padding after contents",
            Nar::new()
                .ss(&["(", "type", "regular", "contents"])
                .mark()
                .padded(b"abc", &[0, 0, 0, 0, 1])
                .s(")"),
            |k| matches!(k, K::NonZeroPadding),
        ),
        case(
            "non-zero padding after a name",
            Nar::root_dir()
                .ss(&["entry", "(", "name"])
                .mark()
                .padded(b"a", &[0, 0, 0, 0, 0, 0, 9])
                .ss(&[
                    "node", "(", "type", "regular", "contents", "", ")", ")", ")",
                ]),
            |k| matches!(k, K::NonZeroPadding),
        ),
        // Tokens.
        case(
            "node without (",
            Nar::new().mark().ss(&["type", "directory", ")"]),
            |k| unexpected(k, &["("], Some(b"type")),
        ),
        case(
            "node without type",
            Nar::new()
                .s("(")
                .mark()
                .ss(&["regular", "contents", "", ")"]),
            |k| unexpected(k, &["type"], Some(b"regular")),
        ),
        case(
            "regular without contents",
            Nar::new()
                .ss(&["(", "type", "regular"])
                .mark()
                .ss(&["target", "x", ")"]),
            |k| unexpected(k, &["executable", "contents"], Some(b"target")),
        ),
        newer_nix_rule(
            "executable twice",
            Nar::new()
                .ss(&["(", "type", "regular", "executable", ""])
                .mark()
                .ss(&["executable", "", "contents", "", ")"]),
            |k| unexpected(k, &["contents"], Some(b"executable")),
        ),
        newer_nix_rule(
            "executable after contents",
            Nar::new()
                .ss(&["(", "type", "regular", "contents", "x"])
                .mark()
                .ss(&["executable", "", ")"]),
            |k| unexpected(k, &[")"], Some(b"executable")),
        ),
        case(
            "token longer than any token",
            Nar::new().s("(").mark().len_only(1 << 62),
            |k| unexpected(k, &["type"], None),
        ),
        case(
            "directory with a tag other than entry",
            Nar::root_dir()
                .mark()
                .ss(&["name", "a", "node", "(", "type", "directory", ")", ")"]),
            |k| unexpected(k, &["entry", ")"], Some(b"name")),
        ),
        case(
            "entry without (",
            Nar::root_dir()
                .s("entry")
                .mark()
                .ss(&["name", "a", ")", ")"]),
            |k| unexpected(k, &["("], Some(b"name")),
        ),
        case(
            "entry without name",
            Nar::root_dir().ss(&["entry", "("]).mark().ss(&[
                "node",
                "(",
                "type",
                "directory",
                ")",
                ")",
                ")",
            ]),
            |k| unexpected(k, &["name"], Some(b"node")),
        ),
        case(
            "entry without node",
            Nar::root_dir()
                .ss(&["entry", "(", "name", "a"])
                .mark()
                .ss(&["(", "type", "directory", ")", ")", ")"]),
            |k| unexpected(k, &["node"], Some(b"(")),
        ),
        case(
            "entry not closed",
            Nar::root_dir()
                .entry("a")
                .ss(&["(", "type", "directory", ")"])
                .mark()
                .entry("b")
                .ss(&["(", "type", "directory", ")", ")", ")"]),
            |k| unexpected(k, &[")"], Some(b"entry")),
        ),
        case(
            "symlink without target",
            Nar::new()
                .ss(&["(", "type", "symlink"])
                .mark()
                .ss(&["contents", "x", ")"]),
            |k| unexpected(k, &["target"], Some(b"contents")),
        ),
        newer_nix_rule(
            "symlink with a second target",
            Nar::new()
                .ss(&["(", "type", "symlink", "target", "x"])
                .mark()
                .ss(&["target", "y", ")"]),
            |k| unexpected(k, &[")"], Some(b"target")),
        ),
        // The executable marker and node types.
        case(
            "non-empty executable marker",
            Nar::new()
                .ss(&["(", "type", "regular", "executable"])
                .mark()
                .ss(&["1", "contents", "", ")"]),
            |k| matches!(k, K::NonEmptyExecutable),
        ),
        case(
            "unknown node type",
            Nar::new().ss(&["(", "type"]).mark().ss(&["fifo", ")"]),
            |k| matches!(k, K::UnknownNodeType { found: Some(f) } if f == "fifo"),
        ),
        // Entry names.
        case(
            "empty name",
            Nar::root_dir()
                .ss(&["entry", "(", "name"])
                .mark()
                .file_tail(""),
            |k| matches!(k, K::InvalidName(NameError::Empty)),
        ),
        case(
            "name .",
            Nar::root_dir()
                .ss(&["entry", "(", "name"])
                .mark()
                .file_tail("."),
            |k| matches!(k, K::InvalidName(NameError::Dot)),
        ),
        case(
            "name ..",
            Nar::root_dir()
                .ss(&["entry", "(", "name"])
                .mark()
                .file_tail(".."),
            |k| matches!(k, K::InvalidName(NameError::Dot)),
        ),
        case(
            "name with /",
            Nar::root_dir()
                .ss(&["entry", "(", "name"])
                .mark()
                .file_tail("a/b"),
            |k| matches!(k, K::InvalidName(NameError::Slash)),
        ),
        case(
            "name with NUL",
            Nar::root_dir()
                .ss(&["entry", "(", "name"])
                .mark()
                .file_tail("a\0b"),
            |k| matches!(k, K::InvalidName(NameError::Nul)),
        ),
        stricter_than_nix(
            "name of 256 bytes",
            Nar::root_dir()
                .ss(&["entry", "(", "name"])
                .mark()
                .file_tail(&"n".repeat(256)),
            |k| matches!(k, K::InvalidName(NameError::TooLong { len: 256 })),
        ),
        case(
            "name length absurd",
            Nar::root_dir()
                .ss(&["entry", "(", "name"])
                .mark()
                .len_only(1 << 60),
            |k| matches!(k, K::InvalidName(NameError::TooLong { len }) if *len == 1 << 60),
        ),
        // Entry order.
        newer_nix_rule(
            "entries unsorted",
            Nar::root_dir().file_entry("b").mark_entry("a").s(")"),
            |k| matches!(k, K::NotSorted { previous, name } if previous == "b" && name == "a"),
        ),
        newer_nix_rule(
            "entries duplicated",
            Nar::root_dir().file_entry("a").mark_entry("a").s(")"),
            |k| matches!(k, K::NotSorted { previous, name } if previous == "a" && name == "a"),
        ),
        newer_nix_rule(
            "entries in case-insensitive order",
            Nar::root_dir().file_entry("a").mark_entry("B").s(")"),
            |k| matches!(k, K::NotSorted { .. }),
        ),
        newer_nix_rule(
            "entries unsorted in a subdirectory",
            Nar::root_dir()
                .entry("sub")
                .ss(&["(", "type", "directory"])
                .file_entry("y")
                .mark_entry("x")
                .ss(&[")", ")", ")"]),
            |k| matches!(k, K::NotSorted { .. }),
        ),
        // Symlink targets.
        stricter_than_nix(
            "empty target",
            Nar::new()
                .ss(&["(", "type", "symlink", "target"])
                .mark()
                .ss(&["", ")"]),
            |k| matches!(k, K::InvalidTarget(TargetError::Empty)),
        ),
        stricter_than_nix(
            "target with NUL",
            Nar::new()
                .ss(&["(", "type", "symlink", "target"])
                .mark()
                .ss(&["a\0b", ")"]),
            |k| matches!(k, K::InvalidTarget(TargetError::Nul)),
        ),
        stricter_than_nix(
            "target of 4096 bytes",
            Nar::new()
                .ss(&["(", "type", "symlink", "target"])
                .mark()
                .s("t".repeat(4096))
                .s(")"),
            |k| matches!(k, K::InvalidTarget(TargetError::TooLong { len: 4096 })),
        ),
        case(
            "target length absurd",
            Nar::new()
                .ss(&["(", "type", "symlink", "target"])
                .mark()
                .len_only(1 << 60),
            |k| matches!(k, K::InvalidTarget(TargetError::TooLong { len }) if *len == 1 << 60),
        ),
        // Depth.
        stricter_than_nix(
            "directories nested 64 deep",
            nested(MAX_DIRECTORY_DEPTH + 1),
            |k| matches!(k, K::TooDeep),
        ),
        // Truncation.
        case(
            "truncated inside a length field",
            Nar::new().s("(").mark().raw(&[4, 0, 0]),
            |k| matches!(k, K::UnexpectedEof),
        ),
        case(
            "truncated inside a token",
            Nar::new().s("(").mark().len_only(4).raw(b"ty"),
            |k| matches!(k, K::UnexpectedEof),
        ),
        case(
            "truncated inside contents",
            Nar::new()
                .ss(&["(", "type", "regular", "contents"])
                .mark()
                .len_only(10)
                .raw(b"12345"),
            |k| matches!(k, K::UnexpectedEof),
        ),
        case(
            "contents length absurd",
            Nar::new()
                .ss(&["(", "type", "regular", "contents"])
                .mark()
                .len_only(1 << 62)
                .raw(b"abc"),
            |k| matches!(k, K::UnexpectedEof),
        ),
        case(
            "truncated inside padding",
            Nar::new()
                .ss(&["(", "type", "regular", "contents"])
                .mark()
                .len_only(3)
                .raw(b"abc\0\0"),
            |k| matches!(k, K::UnexpectedEof),
        ),
        case(
            "truncated before the root closes",
            Nar::root_dir().file_entry("a").mark(),
            |k| matches!(k, K::UnexpectedEof),
        ),
        // Trailing bytes.
        stricter_than_nix(
            "one byte after the root node",
            valid.clone().mark().raw(b"x"),
            |k| matches!(k, K::TrailingData),
        ),
        stricter_than_nix(
            "zero bytes after the root node",
            valid.clone().mark().raw(&[0; 8]),
            |k| matches!(k, K::TrailingData),
        ),
        stricter_than_nix(
            "a second NAR after the first",
            valid.clone().mark().raw(&valid.bytes),
            |k| matches!(k, K::TrailingData),
        ),
    ]
}

impl Nar {
    /// The rest of an entry whose name is the next string: the name, then
    /// an empty file, then the root's `)`.
    fn file_tail(self, name: &str) -> Self {
        self.s(name).ss(&[
            "node", "(", "type", "regular", "contents", "", ")", ")", ")",
        ])
    }

    /// A file entry whose name is the offending string.
    fn mark_entry(self, name: &str) -> Self {
        self.ss(&["entry", "(", "name"])
            .mark()
            .s(name)
            .ss(&["node", "(", "type", "regular", "contents", "", ")", ")"])
    }
}

/// Reads the whole NAR, contents included, and returns the first error.
async fn read_nar(bytes: &[u8]) -> Result<(), lazystore_pathinfo::nar::NarError> {
    let mut reader = NarReader::new(bytes);
    while reader.next().await?.is_some() {
        let mut sink = Vec::new();
        reader.read_content_to_end(&mut sink).await?;
    }
    Ok(())
}

#[tokio::test]
async fn malformed_nars_are_rejected() {
    let mut failures = Vec::new();
    for Case {
        name, nar, check, ..
    } in cases()
    {
        let mark = nar.mark.unwrap_or_else(|| panic!("{name}: no mark"));
        match read_nar(&nar.bytes).await {
            Ok(()) => failures.push(format!("{name}: accepted")),
            Err(e) if !check(&e.kind) => failures.push(format!("{name}: wrong kind: {e}")),
            Err(e) if e.offset != mark => failures.push(format!(
                "{name}: offset {} instead of {mark}: {e}",
                e.offset
            )),
            Err(e) if !e.to_string().contains(&format!("byte {mark}:")) => {
                failures.push(format!("{name}: message lacks the offset: {e}"))
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Nix's verdict on a NAR, from `nix nar ls`, which parses it whole.
fn nix_accepts(bytes: &[u8]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("case.nar");
    std::fs::write(&file, bytes).unwrap();
    let status = Command::new("nix")
        .args(["nar", "ls", "--recursive", file.to_str().unwrap(), "/"])
        .env("NIX_CONFIG", NIX_CONFIG)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("nix must be installed for this test: apt-get install nix-bin");
    status.success()
}

#[test]
fn malformed_nars_match_nix_verdicts() {
    let mut disagreements = Vec::new();
    for Case {
        name,
        nar,
        nix_2_8_accepts: expected,
        ..
    } in cases()
    {
        let actual = nix_accepts(&nar.bytes);
        if actual != expected {
            disagreements.push(format!(
                "{name}: Nix accepts it: {actual}, table says {expected}"
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

#[tokio::test]
async fn nar_boundaries_just_inside_the_rules_are_accepted() {
    let mut w = NarWriter::new(Vec::new());
    w.start_directory(None).await.unwrap();
    w.file(Some("n".repeat(255).as_bytes()), false, 0)
        .await
        .unwrap();
    w.symlink(Some(b"t"), "t".repeat(4095).as_bytes())
        .await
        .unwrap();
    w.end_directory().await.unwrap();
    read_nar(&w.finish().await.unwrap()).await.unwrap();

    let mut deepest = nested(MAX_DIRECTORY_DEPTH);
    deepest.mark = None;
    read_nar(&deepest.bytes).await.unwrap();
}

#[tokio::test]
async fn every_truncated_nar_is_rejected() {
    let mut w = NarWriter::new(Vec::new());
    w.start_directory(None).await.unwrap();
    w.file(Some(b"exe"), true, 11).await.unwrap();
    w.write_content(b"hello world").await.unwrap();
    w.start_directory(Some(b"sub")).await.unwrap();
    w.symlink(Some(b"link"), b"../exe").await.unwrap();
    w.end_directory().await.unwrap();
    w.end_directory().await.unwrap();
    let nar = w.finish().await.unwrap();
    read_nar(&nar).await.unwrap();
    for len in 0..nar.len() {
        let err = read_nar(&nar[..len]).await.unwrap_err();
        assert!(
            matches!(err.kind, K::UnexpectedEof),
            "prefix of {len} bytes: {err}"
        );
        assert!(err.offset <= len as u64, "prefix of {len} bytes: {err}");
    }
}
