//! The canonical NAR writer: the mirror of the reader's events, producing
//! the one encoding Nix would produce for the same tree.
//!
//! Every call is checked against the rules the reader enforces before a
//! byte is written, so whatever the writer emits, the reader accepts.

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};

use super::error::NarWriteError;
use super::{
    IO_BUFFER_SIZE, MAX_DIRECTORY_DEPTH, padding_len, token, validate_name, validate_target,
};

const ZEROS: [u8; 8] = [0; 8];

/// Writes a NAR from a depth-first walk of a tree.
///
/// Call [`NarWriter::start_directory`], [`NarWriter::file`] (then
/// [`NarWriter::write_content`] until `size` bytes are written) and
/// [`NarWriter::symlink`] for each node, entries of a directory in strictly
/// ascending bytewise name order, [`NarWriter::end_directory`] after a
/// directory's entries, and [`NarWriter::finish`] once the root node is
/// complete. Output is buffered; `finish` flushes it.
pub struct NarWriter<W> {
    inner: BufWriter<W>,
    /// Bytes handed to `inner` so far.
    offset: u64,
    /// Every call that writes sets this to `Poisoned` until its writes are
    /// done, so an I/O error or a dropped future leaves the writer unusable
    /// rather than halfway through a token.
    state: State,
    /// One frame per open directory, the root first.
    dirs: Vec<DirFrame>,
}

enum State {
    /// Nothing written: the root node comes next.
    Empty,
    /// Inside a directory: an entry or the directory's end comes next.
    InDirectory,
    /// Inside a file's contents.
    Contents { size: u64, remaining: u64 },
    /// The root node is complete.
    Complete,
    /// A write failed or was cancelled.
    Poisoned,
}

struct DirFrame {
    /// The previous entry's name, which the next one must sort after.
    last_name: Option<Bytes>,
}

impl<W: AsyncWrite + Unpin> NarWriter<W> {
    /// A writer that writes one NAR to `writer`.
    pub fn new(writer: W) -> Self {
        NarWriter {
            inner: BufWriter::with_capacity(IO_BUFFER_SIZE, writer),
            offset: 0,
            state: State::Empty,
            dirs: Vec::new(),
        }
    }

    /// Bytes of NAR written so far, some perhaps still buffered; once the
    /// root node is complete, the NAR's size (its `NarSize`).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Opens a directory: the root node if `name` is `None`, else an entry
    /// of the innermost open directory.
    pub async fn start_directory(&mut self, name: Option<&[u8]>) -> Result<(), NarWriteError> {
        self.close_file().await?;
        let name = self.check_node(name)?;
        if self.dirs.len() >= MAX_DIRECTORY_DEPTH {
            return Err(NarWriteError::TooDeep);
        }
        self.state = State::Poisoned;
        self.open_node(name).await?;
        self.write_str(token::DIRECTORY).await?;
        self.dirs.push(DirFrame { last_name: None });
        self.state = State::InDirectory;
        Ok(())
    }

    /// Closes the innermost open directory.
    pub async fn end_directory(&mut self) -> Result<(), NarWriteError> {
        self.close_file().await?;
        if !matches!(self.state, State::InDirectory) {
            return Err(self.poisoned_or(NarWriteError::NoOpenDirectory));
        }
        self.state = State::Poisoned;
        self.dirs.pop();
        self.write_str(token::CLOSE).await?;
        self.state = self.close_node().await?;
        Ok(())
    }

    /// Starts a regular file of exactly `size` bytes, which
    /// [`NarWriter::write_content`] must supply before the next call.
    pub async fn file(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        size: u64,
    ) -> Result<(), NarWriteError> {
        self.close_file().await?;
        let name = self.check_node(name)?;
        self.state = State::Poisoned;
        self.open_node(name).await?;
        self.write_str(token::REGULAR).await?;
        if executable {
            self.write_str(token::EXECUTABLE).await?;
            self.write_str(b"").await?;
        }
        self.write_str(token::CONTENTS).await?;
        self.write_raw(&size.to_le_bytes()).await?;
        self.state = State::Contents {
            size,
            remaining: size,
        };
        Ok(())
    }

    /// Writes the next bytes of the current file. Large slices go straight
    /// to the underlying writer.
    pub async fn write_content(&mut self, data: &[u8]) -> Result<(), NarWriteError> {
        let State::Contents { size, remaining } = self.state else {
            return Err(self.poisoned_or(NarWriteError::NoFile));
        };
        let len = data.len() as u64;
        if len > remaining {
            return Err(NarWriteError::ContentTooLong {
                size,
                remaining,
                len,
            });
        }
        self.state = State::Poisoned;
        self.write_raw(data).await?;
        self.state = State::Contents {
            size,
            remaining: remaining - len,
        };
        Ok(())
    }

    /// Writes a symlink: the root node if `name` is `None`, else an entry of
    /// the innermost open directory.
    pub async fn symlink(
        &mut self,
        name: Option<&[u8]>,
        target: &[u8],
    ) -> Result<(), NarWriteError> {
        self.close_file().await?;
        let name = self.check_node(name)?;
        validate_target(target).map_err(NarWriteError::InvalidTarget)?;
        self.state = State::Poisoned;
        self.open_node(name).await?;
        self.write_str(token::SYMLINK).await?;
        self.write_str(token::TARGET).await?;
        self.write_str(target).await?;
        self.write_str(token::CLOSE).await?;
        self.state = self.close_node().await?;
        Ok(())
    }

    /// Flushes the NAR and returns the underlying writer; fails unless
    /// exactly one root node is complete.
    pub async fn finish(mut self) -> Result<W, NarWriteError> {
        self.close_file().await?;
        match self.state {
            State::Complete => {}
            State::Poisoned => return Err(NarWriteError::Poisoned),
            _ => return Err(NarWriteError::Incomplete),
        }
        self.inner.flush().await.map_err(NarWriteError::Io)?;
        Ok(self.inner.into_inner())
    }

    /// Ends the current file if one is open: it must have all its bytes.
    async fn close_file(&mut self) -> Result<(), NarWriteError> {
        match self.state {
            State::Contents { size, remaining: 0 } => {
                self.state = State::Poisoned;
                self.write_raw(&ZEROS[..padding_len(size)]).await?;
                self.write_str(token::CLOSE).await?;
                self.state = self.close_node().await?;
                Ok(())
            }
            State::Contents { size, remaining } => Err(NarWriteError::ContentTooShort {
                size,
                written: size - remaining,
            }),
            _ => Ok(()),
        }
    }

    /// Checks that a node may start here with this name; returns the name
    /// for the sort check to record.
    fn check_node(&self, name: Option<&[u8]>) -> Result<Option<Bytes>, NarWriteError> {
        match (&self.state, name) {
            (State::Empty, None) => Ok(None),
            (State::Empty, Some(_)) => Err(NarWriteError::NamedRoot),
            (State::InDirectory, None) => Err(NarWriteError::MissingName),
            (State::InDirectory, Some(name)) => {
                let name = Bytes::copy_from_slice(name);
                validate_name(&name).map_err(|reason| NarWriteError::InvalidName {
                    name: name.clone(),
                    reason,
                })?;
                let frame = self.dirs.last().expect("InDirectory has an open directory");
                if let Some(previous) = &frame.last_name
                    && name <= *previous
                {
                    return Err(NarWriteError::NotSorted {
                        previous: previous.clone(),
                        name,
                    });
                }
                Ok(Some(name))
            }
            (State::Complete, _) => Err(NarWriteError::RootComplete),
            (State::Poisoned, _) => Err(NarWriteError::Poisoned),
            (State::Contents { .. }, _) => unreachable!("close_file ran first"),
        }
    }

    /// Writes what precedes a node's type: the magic for the root node, the
    /// entry header inside a directory.
    async fn open_node(&mut self, name: Option<Bytes>) -> Result<(), NarWriteError> {
        match name {
            None => self.write_str(token::MAGIC).await?,
            Some(name) => {
                for t in [token::ENTRY, token::OPEN, token::NAME] {
                    self.write_str(t).await?;
                }
                self.write_str(&name).await?;
                self.write_str(token::NODE).await?;
                let frame = self.dirs.last_mut().expect("checked by check_node");
                frame.last_name = Some(name);
            }
        }
        self.write_str(token::OPEN).await?;
        self.write_str(token::TYPE).await
    }

    /// After a node's `)`: closes its entry, if it is one, and says what
    /// comes next.
    async fn close_node(&mut self) -> Result<State, NarWriteError> {
        if self.dirs.is_empty() {
            Ok(State::Complete)
        } else {
            self.write_str(token::CLOSE).await?;
            Ok(State::InDirectory)
        }
    }

    fn poisoned_or(&self, e: NarWriteError) -> NarWriteError {
        if matches!(self.state, State::Poisoned) {
            NarWriteError::Poisoned
        } else {
            e
        }
    }

    async fn write_str(&mut self, s: &[u8]) -> Result<(), NarWriteError> {
        self.write_raw(&(s.len() as u64).to_le_bytes()).await?;
        self.write_raw(s).await?;
        self.write_raw(&ZEROS[..padding_len(s.len() as u64)]).await
    }

    async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), NarWriteError> {
        self.inner
            .write_all(bytes)
            .await
            .map_err(NarWriteError::Io)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }
}
