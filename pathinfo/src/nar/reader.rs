//! The pull-based NAR reader: turns a byte stream into [`Event`]s and the
//! contents of each file, checking every rule of the format on the way.
//!
//! It holds one 64 KiB buffer and a stack of at most
//! [`MAX_DIRECTORY_DEPTH`] directory frames (each the last entry name seen,
//! for the sort check), so memory stays constant whatever the NAR holds.

use std::cmp;
use std::future::poll_fn;
use std::io;
use std::mem;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader, ReadBuf};

use super::error::{NarError, NarErrorKind};
use super::{
    Event, IO_BUFFER_SIZE, MAX_DIRECTORY_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN, padding_len, token,
    validate_name, validate_target,
};

/// Reads a NAR one [`Event`] at a time.
///
/// Call [`NarReader::next`] until it returns `Ok(None)`; after an
/// [`Event::File`], [`NarReader::read_content`] (or
/// [`NarReader::content_reader`]) yields the file's bytes. An error from
/// `next` is final: later calls return [`NarErrorKind::Poisoned`].
///
/// `next` is not cancel-safe: dropping its future mid-way poisons the
/// reader. `read_content` is cancel-safe.
pub struct NarReader<R> {
    inner: BufReader<R>,
    /// Bytes consumed from `inner` so far.
    offset: u64,
    state: State,
    /// One frame per open directory, the root first.
    dirs: Vec<DirFrame>,
}

/// Where the reader stands between two calls.
enum State {
    /// Nothing read yet.
    Magic,
    /// A node follows: its `(`, type and the rest.
    Node { name: Option<Bytes> },
    /// Inside a file's contents; padding and `)` follow them.
    Contents {
        size: u64,
        remaining: u64,
        /// Offset of the contents string, for errors.
        start: u64,
    },
    /// Inside a directory: `entry` or `)` follows.
    DirectoryBody,
    /// A node's `)` has been read: an entry's `)` or the end of input
    /// follows.
    NodeClosed,
    /// The root node is closed and the input has ended.
    Done,
    /// An error happened, or a `next` future was dropped mid-way.
    Poisoned,
}

struct DirFrame {
    /// The previous entry's name, which the next one must sort after.
    last_name: Option<Bytes>,
}

/// A string read where a token is expected. Tokens are tiny, so it lives on
/// the stack.
struct Token {
    start: u64,
    buf: [u8; token::MAX_LEN],
    /// `None` if the string was longer than any token and left unread.
    len: Option<usize>,
}

impl Token {
    fn is(&self, expected: &[u8]) -> bool {
        self.len.is_some_and(|len| &self.buf[..len] == expected)
    }

    fn found(&self) -> Option<Bytes> {
        self.len.map(|len| Bytes::copy_from_slice(&self.buf[..len]))
    }

    fn unexpected(&self, expected: &'static [&'static str]) -> NarError {
        NarError::new(
            self.start,
            NarErrorKind::UnexpectedToken {
                expected,
                found: self.found(),
            },
        )
    }
}

impl<R: AsyncRead + Unpin> NarReader<R> {
    /// A reader of the NAR that `reader` yields from its current position.
    pub fn new(reader: R) -> Self {
        NarReader {
            inner: BufReader::with_capacity(IO_BUFFER_SIZE, reader),
            offset: 0,
            state: State::Magic,
            dirs: Vec::new(),
        }
    }

    /// Bytes of NAR consumed so far. After `next` returned `Ok(None)` this is
    /// the NAR's size (its `NarSize`).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The underlying reader. Bytes it yielded that the reader has buffered
    /// but not consumed are lost; there are none once `next` has returned
    /// `Ok(None)`, since the end of input was verified.
    pub fn into_inner(self) -> R {
        self.inner.into_inner()
    }

    /// The next event in NAR order, or `Ok(None)` once the root node is
    /// closed and the end of input is verified (a byte after the root node
    /// is an error). Contents of the current file not read yet are skipped,
    /// and their padding checked.
    pub async fn next(&mut self) -> Result<Option<Event>, NarError> {
        // Taken out so that an error or a dropped future leaves `Poisoned`.
        let mut state = mem::replace(&mut self.state, State::Poisoned);
        loop {
            state = match state {
                State::Magic => {
                    self.read_magic().await?;
                    State::Node { name: None }
                }
                State::Node { name } => {
                    let (event, next) = self.read_node(name).await?;
                    self.state = next;
                    return Ok(Some(event));
                }
                State::Contents {
                    size,
                    remaining,
                    start,
                } => {
                    self.skip(remaining, start).await?;
                    self.read_padding(size, start).await?;
                    self.expect(token::CLOSE, &[")"]).await?;
                    State::NodeClosed
                }
                State::DirectoryBody => {
                    let tag = self.read_token().await?;
                    if tag.is(token::CLOSE) {
                        self.dirs.pop();
                        self.state = State::NodeClosed;
                        return Ok(Some(Event::DirectoryEnd));
                    }
                    if !tag.is(token::ENTRY) {
                        return Err(tag.unexpected(&["entry", ")"]));
                    }
                    self.expect(token::OPEN, &["("]).await?;
                    self.expect(token::NAME, &["name"]).await?;
                    let name = self.read_entry_name().await?;
                    self.expect(token::NODE, &["node"]).await?;
                    State::Node { name: Some(name) }
                }
                State::NodeClosed => {
                    if self.dirs.is_empty() {
                        self.expect_eof().await?;
                        State::Done
                    } else {
                        // The `)` that closes the `entry`.
                        self.expect(token::CLOSE, &[")"]).await?;
                        State::DirectoryBody
                    }
                }
                State::Done => {
                    self.state = State::Done;
                    return Ok(None);
                }
                State::Poisoned => {
                    return Err(NarError::new(self.offset, NarErrorKind::Poisoned));
                }
            };
        }
    }

    /// Reads the current file's contents into `buf`: `Ok(0)` at the end of
    /// the file, or when the last event was not an [`Event::File`]. Large
    /// reads bypass the internal buffer.
    pub async fn read_content(&mut self, buf: &mut [u8]) -> Result<usize, NarError> {
        poll_fn(|cx| {
            let mut buf = ReadBuf::new(&mut *buf);
            ready!(self.poll_read_content(cx, &mut buf))?;
            Poll::Ready(Ok(buf.filled().len()))
        })
        .await
    }

    /// Appends the rest of the current file's contents to `out` and returns
    /// how many bytes that was. This holds the whole file in memory: use it
    /// for files whose `size` the caller has bounded.
    pub async fn read_content_to_end(&mut self, out: &mut Vec<u8>) -> Result<u64, NarError> {
        let mut total = 0;
        let mut buf = [0; 8192];
        loop {
            let n = self.read_content(&mut buf).await?;
            if n == 0 {
                return Ok(total);
            }
            out.extend_from_slice(&buf[..n]);
            total += n as u64;
        }
    }

    /// The current file's remaining contents as an [`AsyncRead`], for
    /// `tokio::io::copy` and friends. NAR errors surface as `io::Error`s
    /// wrapping the [`NarError`].
    pub fn content_reader(&mut self) -> ContentReader<'_, R> {
        ContentReader { reader: self }
    }

    fn poll_read_content(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<Result<(), NarError>> {
        let (remaining, start) = match &mut self.state {
            State::Contents {
                remaining, start, ..
            } => (remaining, start),
            State::Poisoned => {
                return Poll::Ready(Err(NarError::new(self.offset, NarErrorKind::Poisoned)));
            }
            _ => return Poll::Ready(Ok(())),
        };
        if *remaining == 0 || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let want = cmp::min(buf.remaining() as u64, *remaining) as usize;
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(want));
        let polled = Pin::new(&mut self.inner).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        match polled {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => {
                return Poll::Ready(Err(NarError::new(*start, NarErrorKind::Io(e))));
            }
            Poll::Ready(Ok(())) if n == 0 => {
                return Poll::Ready(Err(NarError::new(*start, NarErrorKind::UnexpectedEof)));
            }
            Poll::Ready(Ok(())) => {}
        }
        *remaining -= n as u64;
        self.offset += n as u64;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }

    /// Reads one node up to its first event and returns that event and the
    /// state after it.
    async fn read_node(&mut self, name: Option<Bytes>) -> Result<(Event, State), NarError> {
        self.expect(token::OPEN, &["("]).await?;
        self.expect(token::TYPE, &["type"]).await?;
        let node_type = self.read_token().await?;
        if node_type.is(token::REGULAR) {
            let mut tag = self.read_token().await?;
            let executable = tag.is(token::EXECUTABLE);
            if executable {
                let (start, len) = self.read_len().await?;
                if len != 0 {
                    return Err(NarError::new(start, NarErrorKind::NonEmptyExecutable));
                }
                tag = self.read_token().await?;
                if !tag.is(token::CONTENTS) {
                    return Err(tag.unexpected(&["contents"]));
                }
            } else if !tag.is(token::CONTENTS) {
                return Err(tag.unexpected(&["executable", "contents"]));
            }
            let (start, size) = self.read_len().await?;
            let state = State::Contents {
                size,
                remaining: size,
                start,
            };
            Ok((
                Event::File {
                    name,
                    executable,
                    size,
                },
                state,
            ))
        } else if node_type.is(token::SYMLINK) {
            self.expect(token::TARGET, &["target"]).await?;
            let (start, len) = self.read_len().await?;
            if len > MAX_TARGET_LEN as u64 {
                let kind = NarErrorKind::InvalidTarget(super::TargetError::TooLong { len });
                return Err(NarError::new(start, kind));
            }
            let target = self.read_body(start, len as usize).await?;
            validate_target(&target)
                .map_err(|e| NarError::new(start, NarErrorKind::InvalidTarget(e)))?;
            self.expect(token::CLOSE, &[")"]).await?;
            Ok((Event::Symlink { name, target }, State::NodeClosed))
        } else if node_type.is(token::DIRECTORY) {
            if self.dirs.len() >= MAX_DIRECTORY_DEPTH {
                return Err(NarError::new(node_type.start, NarErrorKind::TooDeep));
            }
            self.dirs.push(DirFrame { last_name: None });
            Ok((Event::DirectoryStart { name }, State::DirectoryBody))
        } else {
            let kind = NarErrorKind::UnknownNodeType {
                found: node_type.found(),
            };
            Err(NarError::new(node_type.start, kind))
        }
    }

    /// Reads an entry name, checks it and that it sorts after the previous
    /// entry of the innermost directory.
    async fn read_entry_name(&mut self) -> Result<Bytes, NarError> {
        let (start, len) = self.read_len().await?;
        if len > MAX_NAME_LEN as u64 {
            let kind = NarErrorKind::InvalidName(super::NameError::TooLong { len });
            return Err(NarError::new(start, kind));
        }
        let name = self.read_body(start, len as usize).await?;
        validate_name(&name).map_err(|e| NarError::new(start, NarErrorKind::InvalidName(e)))?;
        let frame = self
            .dirs
            .last_mut()
            .expect("entries are read inside a directory");
        if let Some(previous) = &frame.last_name
            && name <= *previous
        {
            let kind = NarErrorKind::NotSorted {
                previous: previous.clone(),
                name,
            };
            return Err(NarError::new(start, kind));
        }
        frame.last_name = Some(name.clone());
        Ok(name)
    }

    async fn read_magic(&mut self) -> Result<(), NarError> {
        let (start, len) = self.read_len().await?;
        if len != token::MAGIC.len() as u64 {
            return Err(NarError::new(start, NarErrorKind::BadMagic));
        }
        let mut buf = [0; token::MAGIC.len()];
        self.read_exact(&mut buf, start).await?;
        self.read_padding(len, start).await?;
        if buf != token::MAGIC {
            return Err(NarError::new(start, NarErrorKind::BadMagic));
        }
        Ok(())
    }

    async fn expect(
        &mut self,
        expected: &[u8],
        display: &'static [&'static str],
    ) -> Result<(), NarError> {
        let tag = self.read_token().await?;
        if tag.is(expected) {
            Ok(())
        } else {
            Err(tag.unexpected(display))
        }
    }

    async fn read_token(&mut self) -> Result<Token, NarError> {
        let (start, len) = self.read_len().await?;
        let mut token = Token {
            start,
            buf: [0; token::MAX_LEN],
            len: None,
        };
        if len <= token::MAX_LEN as u64 {
            let len = len as usize;
            self.read_exact(&mut token.buf[..len], start).await?;
            self.read_padding(len as u64, start).await?;
            token.len = Some(len);
        }
        Ok(token)
    }

    /// Reads a string's length field; returns where the string starts.
    async fn read_len(&mut self) -> Result<(u64, u64), NarError> {
        let start = self.offset;
        let mut buf = [0; 8];
        self.read_exact(&mut buf, start).await?;
        Ok((start, u64::from_le_bytes(buf)))
    }

    /// Reads the bytes and padding of a string whose length the caller
    /// has bounded.
    async fn read_body(&mut self, start: u64, len: usize) -> Result<Bytes, NarError> {
        let mut buf = BytesMut::zeroed(len);
        self.read_exact(&mut buf, start).await?;
        self.read_padding(len as u64, start).await?;
        Ok(buf.freeze())
    }

    async fn read_padding(&mut self, len: u64, start: u64) -> Result<(), NarError> {
        let mut buf = [0; 8];
        let padding = &mut buf[..padding_len(len)];
        self.read_exact(padding, start).await?;
        if padding.iter().any(|&b| b != 0) {
            return Err(NarError::new(start, NarErrorKind::NonZeroPadding));
        }
        Ok(())
    }

    /// Like `AsyncReadExt::read_exact`, with errors attributed to the
    /// string starting at `start` and end of input told apart from I/O
    /// errors.
    async fn read_exact(&mut self, buf: &mut [u8], start: u64) -> Result<(), NarError> {
        let mut filled = 0;
        while filled < buf.len() {
            let n = self
                .inner
                .read(&mut buf[filled..])
                .await
                .map_err(|e| NarError::new(start, NarErrorKind::Io(e)))?;
            if n == 0 {
                return Err(NarError::new(start, NarErrorKind::UnexpectedEof));
            }
            filled += n;
            self.offset += n as u64;
        }
        Ok(())
    }

    /// Discards `len` bytes of contents without copying them out of the
    /// buffer.
    async fn skip(&mut self, mut len: u64, start: u64) -> Result<(), NarError> {
        while len > 0 {
            let available = self
                .inner
                .fill_buf()
                .await
                .map_err(|e| NarError::new(start, NarErrorKind::Io(e)))?;
            if available.is_empty() {
                return Err(NarError::new(start, NarErrorKind::UnexpectedEof));
            }
            let n = cmp::min(available.len() as u64, len) as usize;
            self.inner.consume(n);
            self.offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }

    async fn expect_eof(&mut self) -> Result<(), NarError> {
        let available = self
            .inner
            .fill_buf()
            .await
            .map_err(|e| NarError::new(self.offset, NarErrorKind::Io(e)))?;
        if available.is_empty() {
            Ok(())
        } else {
            Err(NarError::new(self.offset, NarErrorKind::TrailingData))
        }
    }
}

/// The current file's remaining contents as an [`AsyncRead`]; see
/// [`NarReader::content_reader`].
pub struct ContentReader<'a, R> {
    reader: &'a mut NarReader<R>,
}

impl<R: AsyncRead + Unpin> AsyncRead for ContentReader<'_, R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut()
            .reader
            .poll_read_content(cx, buf)
            .map_err(io::Error::from)
    }
}
