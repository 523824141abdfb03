//! Happy paths of the reader and writer, the writer's refusals, and round
//! trips against real Nix (`nix-store --dump` and `--restore`), which must
//! be installed: these tests fail without it.

use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};

use super::*;

const NIX_CONFIG: &str =
    "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters =";

/// Encodes each item as `str(item)`: every NAR is such a sequence.
fn strs(items: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        out.extend_from_slice(&(item.len() as u64).to_le_bytes());
        out.extend_from_slice(item);
        out.resize(out.len() + padding_len(item.len() as u64), 0);
    }
    out
}

fn name(s: &str) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(s.as_bytes()))
}

/// Every event of a NAR, with each file's contents read whole.
async fn read_all(nar: &[u8]) -> Result<Vec<(Event, Vec<u8>)>, NarError> {
    let mut reader = NarReader::new(nar);
    let mut events = Vec::new();
    while let Some(event) = reader.next().await? {
        let mut contents = Vec::new();
        reader.read_content_to_end(&mut contents).await?;
        events.push((event, contents));
    }
    assert_eq!(reader.offset(), nar.len() as u64);
    Ok(events)
}

async fn copy(nar: &[u8]) -> Vec<u8> {
    copy_nar(nar, Vec::new()).await.expect("copy_nar")
}

#[tokio::test]
async fn nar_regular_file_root() {
    let mut w = NarWriter::new(Vec::new());
    w.file(None, false, 5).await.unwrap();
    w.write_content(b"hello").await.unwrap();
    let nar = w.finish().await.unwrap();
    let expected = strs(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"hello",
        b")",
    ]);
    assert_eq!(nar, expected);
    let events = read_all(&nar).await.unwrap();
    let file = Event::File {
        name: None,
        executable: false,
        size: 5,
    };
    assert_eq!(events, vec![(file, b"hello".to_vec())]);
    assert_eq!(copy(&nar).await, nar);
}

#[tokio::test]
async fn nar_executable_file() {
    let mut w = NarWriter::new(Vec::new());
    w.file(None, true, 8).await.unwrap();
    w.write_content(b"#!/bin/s").await.unwrap();
    let nar = w.finish().await.unwrap();
    let expected = strs(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"executable",
        b"",
        b"contents",
        b"#!/bin/s",
        b")",
    ]);
    assert_eq!(nar, expected);
    let events = read_all(&nar).await.unwrap();
    let file = Event::File {
        name: None,
        executable: true,
        size: 8,
    };
    assert_eq!(events, vec![(file, b"#!/bin/s".to_vec())]);
}

#[tokio::test]
async fn nar_empty_file() {
    let mut w = NarWriter::new(Vec::new());
    w.file(None, false, 0).await.unwrap();
    let nar = w.finish().await.unwrap();
    let expected = strs(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"",
        b")",
    ]);
    assert_eq!(nar, expected);
    let events = read_all(&nar).await.unwrap();
    let file = Event::File {
        name: None,
        executable: false,
        size: 0,
    };
    assert_eq!(events, vec![(file, Vec::new())]);
}

#[tokio::test]
async fn nar_symlink_root() {
    let mut w = NarWriter::new(Vec::new());
    w.symlink(None, b"../some/where").await.unwrap();
    let nar = w.finish().await.unwrap();
    let expected = strs(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"symlink",
        b"target",
        b"../some/where",
        b")",
    ]);
    assert_eq!(nar, expected);
    let events = read_all(&nar).await.unwrap();
    let link = Event::Symlink {
        name: None,
        target: Bytes::from_static(b"../some/where"),
    };
    assert_eq!(events, vec![(link, Vec::new())]);
}

#[tokio::test]
async fn nar_empty_directory() {
    let mut w = NarWriter::new(Vec::new());
    w.start_directory(None).await.unwrap();
    w.end_directory().await.unwrap();
    let nar = w.finish().await.unwrap();
    assert_eq!(
        nar,
        strs(&[b"nix-archive-1", b"(", b"type", b"directory", b")"])
    );
    let events = read_all(&nar).await.unwrap();
    let expected = vec![
        (Event::DirectoryStart { name: None }, vec![]),
        (Event::DirectoryEnd, vec![]),
    ];
    assert_eq!(events, expected);
}

#[tokio::test]
async fn nar_nested_directories() {
    let mut w = NarWriter::new(Vec::new());
    w.start_directory(None).await.unwrap();
    w.file(Some(b"a"), false, 1).await.unwrap();
    w.write_content(b"A").await.unwrap();
    w.start_directory(Some(b"b")).await.unwrap();
    w.start_directory(Some(b"c")).await.unwrap();
    w.end_directory().await.unwrap();
    w.symlink(Some(b"d"), b"/abs").await.unwrap();
    w.end_directory().await.unwrap();
    w.file(Some(b"e"), true, 0).await.unwrap();
    w.end_directory().await.unwrap();
    let size = w.offset();
    let nar = w.finish().await.unwrap();
    assert_eq!(size, nar.len() as u64);

    let entry = |n: &'static [u8]| [b"entry" as &[u8], b"(", b"name", n, b"node"];
    let mut tokens: Vec<&[u8]> = vec![b"nix-archive-1", b"(", b"type", b"directory"];
    tokens.extend(entry(b"a"));
    tokens.extend([
        b"(" as &[u8],
        b"type",
        b"regular",
        b"contents",
        b"A",
        b")",
        b")",
    ]);
    tokens.extend(entry(b"b"));
    tokens.extend([b"(" as &[u8], b"type", b"directory"]);
    tokens.extend(entry(b"c"));
    tokens.extend([b"(" as &[u8], b"type", b"directory", b")", b")"]);
    tokens.extend(entry(b"d"));
    tokens.extend([
        b"(" as &[u8],
        b"type",
        b"symlink",
        b"target",
        b"/abs",
        b")",
        b")",
    ]);
    tokens.extend([b")" as &[u8], b")"]);
    tokens.extend(entry(b"e"));
    tokens.extend([
        b"(" as &[u8],
        b"type",
        b"regular",
        b"executable",
        b"",
        b"contents",
        b"",
        b")",
    ]);
    tokens.extend([b")" as &[u8], b")"]);
    assert_eq!(nar, strs(&tokens));

    let events: Vec<Event> = read_all(&nar)
        .await
        .unwrap()
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    let expected = vec![
        Event::DirectoryStart { name: None },
        Event::File {
            name: name("a"),
            executable: false,
            size: 1,
        },
        Event::DirectoryStart { name: name("b") },
        Event::DirectoryStart { name: name("c") },
        Event::DirectoryEnd,
        Event::Symlink {
            name: name("d"),
            target: Bytes::from_static(b"/abs"),
        },
        Event::DirectoryEnd,
        Event::File {
            name: name("e"),
            executable: true,
            size: 0,
        },
        Event::DirectoryEnd,
    ];
    assert_eq!(events, expected);
    assert_eq!(copy(&nar).await, nar);
}

/// A byte pattern that a misplaced or repeated piece would break.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[tokio::test]
async fn nar_big_file_streamed_in_pieces() {
    let data = pattern(3 * 1024 * 1024 + 5);
    let mut w = NarWriter::new(Vec::new());
    w.file(None, false, data.len() as u64).await.unwrap();
    let mut rest = &data[..];
    for piece in [1, 7, 100_000, 65_536, 200_000] {
        w.write_content(&rest[..piece]).await.unwrap();
        rest = &rest[piece..];
    }
    w.write_content(rest).await.unwrap();
    let nar = w.finish().await.unwrap();
    let header = strs(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    assert_eq!(
        nar.len(),
        header.len() + 8 + data.len() + 3 + strs(&[b")"]).len()
    );

    let mut reader = NarReader::new(&nar[..]);
    let event = reader.next().await.unwrap().unwrap();
    assert_eq!(
        event,
        Event::File {
            name: None,
            executable: false,
            size: data.len() as u64
        }
    );
    let mut got = Vec::new();
    let mut buf = vec![0; 1024 * 1024];
    for len in [3, 13, 70_000, 1024 * 1024].into_iter().cycle() {
        let n = reader.read_content(&mut buf[..len]).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got == data, "contents differ");
    assert_eq!(reader.next().await.unwrap(), None);
    assert_eq!(reader.offset(), nar.len() as u64);
    assert_eq!(copy(&nar).await, nar);
}

#[tokio::test]
async fn nar_unread_contents_are_skipped() {
    let first = pattern(200_001);
    let second = pattern(150_000);
    let mut w = NarWriter::new(Vec::new());
    w.start_directory(None).await.unwrap();
    for (n, data) in [(b"x", &first), (b"y", &second)] {
        w.file(Some(n), false, data.len() as u64).await.unwrap();
        w.write_content(data).await.unwrap();
    }
    w.symlink(Some(b"z"), b"x").await.unwrap();
    w.end_directory().await.unwrap();
    let nar = w.finish().await.unwrap();

    let mut reader = NarReader::new(&nar[..]);
    assert_eq!(
        reader.next().await.unwrap(),
        Some(Event::DirectoryStart { name: None })
    );
    let x = reader.next().await.unwrap().unwrap();
    assert_eq!(
        x,
        Event::File {
            name: name("x"),
            executable: false,
            size: 200_001
        }
    );
    // None of x read, then part of y.
    let y = reader.next().await.unwrap().unwrap();
    assert_eq!(
        y,
        Event::File {
            name: name("y"),
            executable: false,
            size: 150_000
        }
    );
    let mut buf = [0; 1000];
    assert_eq!(reader.read_content(&mut buf).await.unwrap(), 1000);
    assert_eq!(buf[..], second[..1000]);
    let z = reader.next().await.unwrap().unwrap();
    assert_eq!(
        z,
        Event::Symlink {
            name: name("z"),
            target: Bytes::from_static(b"x")
        }
    );
    assert_eq!(
        reader.read_content(&mut buf).await.unwrap(),
        0,
        "a symlink has no contents"
    );
    assert_eq!(reader.next().await.unwrap(), Some(Event::DirectoryEnd));
    assert_eq!(reader.next().await.unwrap(), None);
    assert_eq!(reader.next().await.unwrap(), None, "the end is sticky");
    assert_eq!(reader.offset(), nar.len() as u64);
}

#[tokio::test]
async fn nar_content_reader_adapter() {
    let data = pattern(100_000);
    let mut w = NarWriter::new(Vec::new());
    w.file(None, false, data.len() as u64).await.unwrap();
    w.write_content(&data).await.unwrap();
    let nar = w.finish().await.unwrap();

    let mut reader = NarReader::new(&nar[..]);
    reader.next().await.unwrap();
    let mut got = Vec::new();
    let copied = tokio::io::copy(&mut reader.content_reader(), &mut got)
        .await
        .unwrap();
    assert_eq!(copied, data.len() as u64);
    assert!(got == data);
    assert_eq!(reader.next().await.unwrap(), None);
}

#[tokio::test]
async fn nar_truncated_contents_through_adapter_are_unexpected_eof() {
    let mut w = NarWriter::new(Vec::new());
    w.file(None, false, 100).await.unwrap();
    w.write_content(&[1; 100]).await.unwrap();
    let nar = w.finish().await.unwrap();
    let truncated = &nar[..nar.len() - 60];
    let mut reader = NarReader::new(truncated);
    reader.next().await.unwrap();
    let mut sink = Vec::new();
    let err = tokio::io::copy(&mut reader.content_reader(), &mut sink)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    let inner = err.into_inner().unwrap().downcast::<NarError>().unwrap();
    assert!(matches!(inner.kind, NarErrorKind::UnexpectedEof));
}

#[tokio::test]
async fn nar_reader_is_poisoned_after_an_error() {
    let mut nar = strs(&[b"nix-archive-1", b"(", b"type", b"directory", b")"]);
    nar.push(0);
    let mut reader = NarReader::new(&nar[..]);
    reader.next().await.unwrap();
    reader.next().await.unwrap();
    let err = reader.next().await.unwrap_err();
    assert!(matches!(err.kind, NarErrorKind::TrailingData), "{err}");
    let err = reader.next().await.unwrap_err();
    assert!(matches!(err.kind, NarErrorKind::Poisoned), "{err}");
    let err = reader.read_content(&mut [0; 8]).await.unwrap_err();
    assert!(matches!(err.kind, NarErrorKind::Poisoned), "{err}");
}

#[tokio::test]
async fn nar_cancelled_next_poisons_but_cancelled_read_content_does_not() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::time::timeout;

    let mut w = NarWriter::new(Vec::new());
    w.file(None, false, 6).await.unwrap();
    w.write_content(b"abcdef").await.unwrap();
    let nar = w.finish().await.unwrap();
    // The contents, then their padding, then `)`.
    let contents_at = nar.len() - 8 - 16;

    // Contents cut short: a cancelled read resumes where it left off.
    let (mut tx, rx) = tokio::io::duplex(1024);
    tx.write_all(&nar[..contents_at + 3]).await.unwrap();
    let mut reader = NarReader::new(rx);
    reader.next().await.unwrap();
    let mut buf = [0; 16];
    assert_eq!(reader.read_content(&mut buf).await.unwrap(), 3);
    let pending = timeout(Duration::from_millis(20), reader.read_content(&mut buf)).await;
    assert!(pending.is_err(), "no more bytes yet");
    tx.write_all(&nar[contents_at + 3..]).await.unwrap();
    drop(tx);
    assert_eq!(reader.read_content(&mut buf).await.unwrap(), 3);
    assert_eq!(&buf[..3], b"def");
    assert_eq!(reader.next().await.unwrap(), None);

    // A token cut short: a cancelled `next` cannot resume.
    let (mut tx, rx) = tokio::io::duplex(1024);
    tx.write_all(&nar[..20]).await.unwrap();
    let mut reader = NarReader::new(rx);
    assert!(
        timeout(Duration::from_millis(20), reader.next())
            .await
            .is_err()
    );
    tx.write_all(&nar[20..]).await.unwrap();
    let err = reader.next().await.unwrap_err();
    assert!(matches!(err.kind, NarErrorKind::Poisoned), "{err}");
}

/// Yields `header`, then `len` zero bytes, then `trailer`, without ever
/// holding the zeros.
struct SyntheticNar {
    header: Vec<u8>,
    zeros: u64,
    trailer: Vec<u8>,
    pos: u64,
}

impl AsyncRead for SyntheticNar {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        static ZEROS: [u8; 65536] = [0; 65536];
        let this = &mut *self;
        let header_len = this.header.len() as u64;
        let body_end = header_len + this.zeros;
        let end = body_end + this.trailer.len() as u64;
        let room = buf.remaining() as u64;
        let n = if this.pos < header_len {
            let n = room.min(header_len - this.pos);
            buf.put_slice(&this.header[this.pos as usize..(this.pos + n) as usize]);
            n
        } else if this.pos < body_end {
            let n = room.min(body_end - this.pos).min(ZEROS.len() as u64);
            buf.put_slice(&ZEROS[..n as usize]);
            n
        } else if this.pos < end {
            let at = (this.pos - body_end) as usize;
            let n = room.min(end - this.pos);
            buf.put_slice(&this.trailer[at..at + n as usize]);
            n
        } else {
            0
        };
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn nar_huge_file_streams_in_constant_memory() {
    // Past 4 GiB, so no length or offset fits 32 bits.
    let size: u64 = (4 << 30) + 3;
    let mut header = strs(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    header.extend_from_slice(&size.to_le_bytes());
    let mut trailer = vec![0; padding_len(size)];
    trailer.extend(strs(&[b")"]));
    let total = header.len() as u64 + size + trailer.len() as u64;
    let nar = SyntheticNar {
        header,
        zeros: size,
        trailer,
        pos: 0,
    };

    let mut reader = NarReader::new(nar);
    let event = reader.next().await.unwrap().unwrap();
    assert_eq!(
        event,
        Event::File {
            name: None,
            executable: false,
            size
        }
    );
    let mut buf = [1; 4096];
    assert_eq!(reader.read_content(&mut buf).await.unwrap(), 4096);
    assert_eq!(buf, [0; 4096]);
    assert_eq!(reader.next().await.unwrap(), None);
    assert_eq!(reader.offset(), total);
}

#[tokio::test]
async fn nar_depth_limit() {
    let mut w = NarWriter::new(Vec::new());
    w.start_directory(None).await.unwrap();
    for _ in 1..MAX_DIRECTORY_DEPTH {
        w.start_directory(Some(b"d")).await.unwrap();
    }
    let err = w.start_directory(Some(b"d")).await.unwrap_err();
    assert!(matches!(err, NarWriteError::TooDeep), "{err}");
    // Still usable: a file at the deepest level is fine.
    w.file(Some(b"f"), false, 0).await.unwrap();
    for _ in 0..MAX_DIRECTORY_DEPTH {
        w.end_directory().await.unwrap();
    }
    let nar = w.finish().await.unwrap();
    let events = read_all(&nar).await.unwrap();
    assert_eq!(events.len(), 2 * MAX_DIRECTORY_DEPTH + 1);
    assert_eq!(copy(&nar).await, nar);
}

#[tokio::test]
async fn nar_writer_refuses_invalid_calls() {
    use NarWriteError as E;

    let mut w = NarWriter::new(Vec::new());
    assert!(matches!(w.write_content(b"x").await, Err(E::NoFile)));
    assert!(matches!(w.end_directory().await, Err(E::NoOpenDirectory)));
    assert!(matches!(
        w.start_directory(Some(b"a")).await,
        Err(E::NamedRoot)
    ));
    w.start_directory(None).await.unwrap();
    assert!(matches!(w.file(None, false, 0).await, Err(E::MissingName)));
    for (bad, reason) in [
        (&b""[..], NameError::Empty),
        (b".", NameError::Dot),
        (b"..", NameError::Dot),
        (b"a/b", NameError::Slash),
        (b"a\0b", NameError::Nul),
        (&[b'n'; 256], NameError::TooLong { len: 256 }),
    ] {
        let err = w.symlink(Some(bad), b"t").await.unwrap_err();
        assert!(
            matches!(err, E::InvalidName { reason: r, .. } if r == reason),
            "{err}"
        );
    }
    for (bad, reason) in [
        (&b""[..], TargetError::Empty),
        (b"a\0b", TargetError::Nul),
        (&[b't'; 4096], TargetError::TooLong { len: 4096 }),
    ] {
        let err = w.symlink(Some(b"s"), bad).await.unwrap_err();
        assert!(matches!(err, E::InvalidTarget(r) if r == reason), "{err}");
    }
    w.file(Some(b"m"), false, 3).await.unwrap();
    let err = w.write_content(b"abcd").await.unwrap_err();
    assert!(
        matches!(
            err,
            E::ContentTooLong {
                size: 3,
                remaining: 3,
                len: 4
            }
        ),
        "{err}"
    );
    w.write_content(b"ab").await.unwrap();
    let err = w.end_directory().await.unwrap_err();
    assert!(
        matches!(
            err,
            E::ContentTooShort {
                size: 3,
                written: 2
            }
        ),
        "{err}"
    );
    w.write_content(b"c").await.unwrap();
    for earlier in [&b"m"[..], b"a", b"B"] {
        let err = w.file(Some(earlier), false, 0).await.unwrap_err();
        assert!(matches!(err, E::NotSorted { .. }), "{err}");
    }
    let long = [b'n'; 255];
    w.file(Some(b"n"), false, 0).await.unwrap();
    w.file(Some(&long), false, 0).await.unwrap();
    w.symlink(Some("ü".as_bytes()), &[b't'; 4095])
        .await
        .unwrap();
    // Refused calls wrote nothing; an incomplete NAR cannot be finished.
    let mut unfinished = NarWriter::new(Vec::new());
    unfinished.start_directory(None).await.unwrap();
    assert!(matches!(unfinished.finish().await, Err(E::Incomplete)));
    assert!(matches!(
        NarWriter::new(Vec::new()).finish().await,
        Err(E::Incomplete)
    ));

    w.end_directory().await.unwrap();
    assert!(matches!(w.end_directory().await, Err(E::NoOpenDirectory)));
    assert!(matches!(w.symlink(None, b"t").await, Err(E::RootComplete)));
    let nar = w.finish().await.unwrap();
    let names: Vec<Option<Bytes>> = read_all(&nar)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|(e, _)| match e {
            Event::File { name, .. } | Event::Symlink { name, .. } => Some(name),
            _ => None,
        })
        .collect();
    let expected = vec![
        name("m"),
        name("n"),
        Some(Bytes::copy_from_slice(&long)),
        name("ü"),
    ];
    assert_eq!(names, expected);
}

/// A writer whose every write fails.
struct BrokenPipe;

impl tokio::io::AsyncWrite for BrokenPipe {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn nar_writer_is_poisoned_after_an_io_error() {
    let mut w = NarWriter::new(BrokenPipe);
    w.file(None, false, 1 << 20).await.unwrap();
    // Bigger than the buffer, so it reaches the broken writer.
    let err = w.write_content(&vec![0; 1 << 20]).await.unwrap_err();
    assert!(matches!(err, NarWriteError::Io(_)), "{err}");
    let err = w.write_content(b"x").await.unwrap_err();
    assert!(matches!(err, NarWriteError::Poisoned), "{err}");
    assert!(matches!(w.finish().await, Err(NarWriteError::Poisoned)));
}

// Round trips against real Nix.

fn nix(args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    let mut child = Command::new("nix-store")
        .args(args)
        .env("NIX_CONFIG", NIX_CONFIG)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nix-store must be installed for these tests: apt-get install nix-bin");
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nix-store {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A tree with every feature a NAR can express.
fn make_tree(root: &Path) {
    use std::fs;
    fs::create_dir(root).unwrap();
    fs::create_dir(root.join("empty-dir")).unwrap();
    fs::create_dir_all(root.join("a/b/c/d")).unwrap();
    fs::write(root.join("a/b/c/d/deep"), b"deep\n").unwrap();
    fs::write(root.join("a/b/sibling"), b"").unwrap();
    fs::write(root.join("empty-file"), b"").unwrap();
    fs::write(root.join("tool"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("tool"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("big"), pattern(1024 * 1024 + 12_345)).unwrap();
    for len in 1..=9 {
        fs::write(root.join(format!("len{len}")), &pattern(len)[..]).unwrap();
    }
    symlink("a/b/sibling", root.join("link-relative")).unwrap();
    symlink("/etc/hostname", root.join("link-absolute")).unwrap();
    symlink("../does/not/exist", root.join("link-dangling")).unwrap();
    symlink("t".repeat(MAX_TARGET_LEN), root.join("link-longest")).unwrap();
    // Bytewise order differs from locale order for these.
    fs::write(root.join("Zebra"), b"Z").unwrap();
    fs::write(root.join("ärger"), b"\xc3\xa4").unwrap();
    fs::write(root.join("日本語"), b"nihongo").unwrap();
    fs::create_dir(root.join("ünïcødé dir")).unwrap();
    fs::write(root.join("ünïcødé dir/naïve"), b"x").unwrap();
    fs::write(root.join("n".repeat(MAX_NAME_LEN)), b"longest name").unwrap();
}

/// Dumps a tree through the writer, the way `nix-store --dump` walks it.
async fn dump_with_writer(path: &Path) -> Vec<u8> {
    async fn walk(w: &mut NarWriter<Vec<u8>>, path: &Path, name: Option<&[u8]>) {
        use std::os::unix::ffi::OsStrExt;
        let meta = std::fs::symlink_metadata(path).unwrap();
        if meta.is_symlink() {
            let target = std::fs::read_link(path).unwrap();
            w.symlink(name, target.as_os_str().as_bytes())
                .await
                .unwrap();
        } else if meta.is_file() {
            let data = std::fs::read(path).unwrap();
            let executable = meta.permissions().mode() & 0o100 != 0;
            w.file(name, executable, data.len() as u64).await.unwrap();
            for piece in data.chunks(10_000) {
                w.write_content(piece).await.unwrap();
            }
        } else {
            w.start_directory(name).await.unwrap();
            let mut names: Vec<_> = std::fs::read_dir(path)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for child in names {
                Box::pin(walk(w, &path.join(&child), Some(child.as_bytes()))).await;
            }
            w.end_directory().await.unwrap();
        }
    }
    let mut w = NarWriter::new(Vec::new());
    walk(&mut w, path, None).await;
    w.finish().await.unwrap()
}

#[tokio::test]
async fn nar_round_trips_nix_dump() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    make_tree(&root);
    let nar = nix(&["--dump", root.to_str().unwrap()], None);

    let events = read_all(&nar).await.unwrap();
    let find = |n: &str| {
        events
            .iter()
            .find(|(e, _)| match e {
                Event::File { name, .. }
                | Event::Symlink { name, .. }
                | Event::DirectoryStart { name } => name.as_deref() == Some(n.as_bytes()),
                Event::DirectoryEnd => false,
            })
            .unwrap_or_else(|| panic!("no entry {n}"))
    };
    assert_eq!(
        find("tool").0,
        Event::File {
            name: name("tool"),
            executable: true,
            size: 18
        }
    );
    assert_eq!(find("big").1, pattern(1024 * 1024 + 12_345));
    assert_eq!(
        find("empty-file").0,
        Event::File {
            name: name("empty-file"),
            executable: false,
            size: 0
        }
    );
    let dangling = Event::Symlink {
        name: name("link-dangling"),
        target: Bytes::from_static(b"../does/not/exist"),
    };
    assert_eq!(find("link-dangling").0, dangling);
    assert!(matches!(find("日本語").0, Event::File { size: 7, .. }));
    let starts = events
        .iter()
        .filter(|(e, _)| matches!(e, Event::DirectoryStart { .. }))
        .count();
    let ends = events
        .iter()
        .filter(|(e, _)| matches!(e, Event::DirectoryEnd))
        .count();
    assert_eq!((starts, ends), (7, 7));

    assert!(copy(&nar).await == nar, "copy_nar changed the NAR");
    assert!(
        dump_with_writer(&root).await == nar,
        "the writer's dump differs from Nix's"
    );
}

#[tokio::test]
async fn nar_writer_output_restores_with_nix() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    make_tree(&root);
    let nar = dump_with_writer(&root).await;
    let restored = tmp.path().join("restored");
    nix(&["--restore", restored.to_str().unwrap()], Some(&nar));
    let again = nix(&["--dump", restored.to_str().unwrap()], None);
    assert!(
        again == nar,
        "Nix restored a different tree from the writer's NAR"
    );
}
