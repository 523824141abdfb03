//! Fuzzes the NAR reader with arbitrary bytes. It must never panic; it must
//! give the same events, contents and error (kind and offset) whether the
//! input arrives whole or a few bytes per read; and a NAR it accepts must
//! come out of `copy_nar` byte for byte as it went in, which holds the
//! writer to the reader's rules and the reader to canonical encoding.

#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

use lazystore_pathinfo::nar::{Event, NarReader, copy_nar};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::runtime::Runtime;

static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
});

/// Hands out its input 1 to 7 bytes per read, so every token straddles
/// reads somewhere.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.step = self.step % 7 + 1;
        let n = self.step.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// What a whole read of a NAR yields: every event with its file contents,
/// then either the NAR's size or the error's kind and offset.
#[derive(Debug, PartialEq)]
struct Outcome {
    events: Vec<(Event, Vec<u8>)>,
    end: Result<u64, (String, u64)>,
}

async fn read_all<R: AsyncRead + Unpin>(input: R, content_buf: usize) -> Outcome {
    let mut reader = NarReader::new(input);
    let mut events = Vec::new();
    let mut buf = vec![0; content_buf];
    let end = loop {
        match reader.next().await {
            Ok(None) => break Ok(reader.offset()),
            Ok(Some(event)) => {
                let mut contents = Vec::new();
                let size = match &event {
                    Event::File { size, .. } => *size,
                    _ => 0,
                };
                let mut failed = None;
                loop {
                    match reader.read_content(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => contents.extend_from_slice(&buf[..n]),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if failed.is_none() {
                    assert_eq!(contents.len() as u64, size, "contents differ from the size");
                }
                events.push((event, contents));
                if let Some(e) = failed {
                    break Err((format!("{:?}", e.kind), e.offset));
                }
            }
            Err(e) => break Err((format!("{:?}", e.kind), e.offset)),
        }
    };
    Outcome { events, end }
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.block_on(async {
        let whole = read_all(data, 64 * 1024).await;
        let trickled = read_all(Trickle { data, step: 0 }, 3).await;
        assert_eq!(
            whole, trickled,
            "the result depends on how the input is split"
        );
        match whole.end {
            Ok(size) => {
                assert_eq!(
                    size,
                    data.len() as u64,
                    "accepted without reading to the end"
                );
                let copy = copy_nar(data, Vec::new())
                    .await
                    .expect("copy_nar of an accepted NAR");
                assert!(copy == data, "copy_nar changed an accepted NAR");
            }
            Err((_, offset)) => {
                assert!(offset <= data.len() as u64, "error offset past the input");
                assert!(
                    copy_nar(data, Vec::new()).await.is_err(),
                    "copy_nar of a rejected NAR"
                );
            }
        }
    });
});
