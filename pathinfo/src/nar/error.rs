//! The errors of the NAR reader, the NAR writer and `copy_nar`: one variant
//! per rule of the format, so callers and tests can tell which rule broke.

use std::fmt;
use std::io;

use bytes::Bytes;

use super::{NameError, TargetError};

/// A NAR the [`super::NarReader`] rejects, and where.
#[derive(Debug)]
pub struct NarError {
    /// Byte offset in the NAR where the offending string starts (its length
    /// field), or where the trailing bytes start for
    /// [`NarErrorKind::TrailingData`].
    pub offset: u64,
    /// The rule that was broken.
    pub kind: NarErrorKind,
}

impl NarError {
    pub(crate) fn new(offset: u64, kind: NarErrorKind) -> Self {
        NarError { offset, kind }
    }
}

impl fmt::Display for NarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid NAR at byte {}: {}", self.offset, self.kind)
    }
}

impl std::error::Error for NarError {
    // The kind's message is already part of ours, so the chain continues
    // with what the kind wraps rather than repeating the kind.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.kind)
    }
}

impl From<NarError> for io::Error {
    /// For the `AsyncRead` adapter: truncation stays `UnexpectedEof`, an I/O
    /// error keeps its kind, and a format violation is `InvalidData`.
    fn from(e: NarError) -> Self {
        let kind = match &e.kind {
            NarErrorKind::UnexpectedEof => io::ErrorKind::UnexpectedEof,
            NarErrorKind::Io(inner) => inner.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// The rule a NAR breaks.
#[derive(Debug, thiserror::Error)]
pub enum NarErrorKind {
    /// The input does not start with `str("nix-archive-1")`.
    #[error("not a NAR (no nix-archive-1 magic)")]
    BadMagic,
    /// The zero padding after a string holds a non-zero byte. Accepting it
    /// would give one tree two encodings, and two NarHashes.
    #[error("non-zero padding")]
    NonZeroPadding,
    /// A token other than the ones the grammar allows at this point.
    #[error("expected {}, found {}", one_of(expected), show_found(found))]
    UnexpectedToken {
        /// The tokens allowed here.
        expected: &'static [&'static str],
        /// The string found, or `None` if it was longer than any token and
        /// therefore not read.
        found: Option<Bytes>,
    },
    /// The `executable` marker is followed by a non-empty string.
    #[error("executable marker has a non-empty value")]
    NonEmptyExecutable,
    /// A node type other than `regular`, `symlink` and `directory`.
    #[error("unknown node type {}", show_found(found))]
    UnknownNodeType {
        /// The type found, or `None` if it was longer than any token.
        found: Option<Bytes>,
    },
    /// A directory entry name breaks the naming rules.
    #[error("invalid entry name: {0}")]
    InvalidName(NameError),
    /// A directory entry does not sort strictly after the one before it;
    /// equal names (duplicates) are rejected too.
    #[error("entry \"{}\" does not sort after \"{}\"", name.escape_ascii(), previous.escape_ascii())]
    NotSorted {
        /// The entry before.
        previous: Bytes,
        /// The entry that came too early.
        name: Bytes,
    },
    /// A symlink target breaks the target rules.
    #[error("invalid symlink target: {0}")]
    InvalidTarget(TargetError),
    /// A directory nested deeper than [`super::MAX_DIRECTORY_DEPTH`]; the
    /// offset is that of its `directory` type token.
    #[error("directories nested more than {} deep", super::MAX_DIRECTORY_DEPTH)]
    TooDeep,
    /// Bytes follow the root node; a NAR ends with its root node.
    #[error("data after the end of the archive")]
    TrailingData,
    /// The input ends inside the NAR.
    #[error("truncated NAR")]
    UnexpectedEof,
    /// The underlying reader failed.
    #[error("read error")]
    Io(#[source] io::Error),
    /// An earlier call returned an error or was cancelled mid-way, so the
    /// position inside the NAR is unknown.
    #[error("reader unusable after an earlier error or cancellation")]
    Poisoned,
}

fn one_of(expected: &[&str]) -> String {
    let quoted: Vec<String> = expected.iter().map(|t| format!("\"{t}\"")).collect();
    quoted.join(" or ")
}

fn show_found(found: &Option<Bytes>) -> String {
    match found {
        Some(s) => format!("\"{}\"", s.escape_ascii()),
        None => "a string longer than any token".to_owned(),
    }
}

/// A call to [`super::NarWriter`] that would not produce a valid NAR. Apart
/// from [`NarWriteError::Io`] and [`NarWriteError::Poisoned`], nothing was
/// written and the writer can be used on.
#[derive(Debug, thiserror::Error)]
pub enum NarWriteError {
    /// An entry name breaks the naming rules.
    #[error("invalid entry name \"{}\": {reason}", name.escape_ascii())]
    InvalidName {
        /// The name given.
        name: Bytes,
        /// The rule it breaks.
        reason: NameError,
    },
    /// A symlink target breaks the target rules.
    #[error("invalid symlink target: {0}")]
    InvalidTarget(TargetError),
    /// An entry does not sort strictly after the previous one in its
    /// directory.
    #[error("entry \"{}\" does not sort after \"{}\"", name.escape_ascii(), previous.escape_ascii())]
    NotSorted {
        /// The entry before.
        previous: Bytes,
        /// The entry given.
        name: Bytes,
    },
    /// The root node was given a name.
    #[error("the root node has no name")]
    NamedRoot,
    /// A node inside a directory was given no name.
    #[error("a directory entry needs a name")]
    MissingName,
    /// A directory would be nested deeper than
    /// [`super::MAX_DIRECTORY_DEPTH`].
    #[error("directories nested more than {} deep", super::MAX_DIRECTORY_DEPTH)]
    TooDeep,
    /// A node was started after the root node was complete.
    #[error("the root node is already complete")]
    RootComplete,
    /// `end_directory` was called with no directory open.
    #[error("no directory is open")]
    NoOpenDirectory,
    /// `write_content` was called while no file was being written.
    #[error("no file is being written")]
    NoFile,
    /// `write_content` was given more bytes than the file's declared size.
    #[error("{len} more bytes for a file with only {remaining} left of {size}")]
    ContentTooLong {
        /// The size given to `file`.
        size: u64,
        /// Bytes still expected.
        remaining: u64,
        /// Bytes offered.
        len: u64,
    },
    /// The next call came before the file's declared size was written.
    #[error("file of {size} bytes ended after {written}")]
    ContentTooShort {
        /// The size given to `file`.
        size: u64,
        /// Bytes written.
        written: u64,
    },
    /// `finish` was called before the root node was complete.
    #[error("the NAR is not complete")]
    Incomplete,
    /// The underlying writer failed.
    #[error("write error")]
    Io(#[source] io::Error),
    /// An earlier write failed or was cancelled mid-way, so the output is
    /// not a valid prefix of a NAR any more.
    #[error("writer unusable after an earlier I/O error or cancellation")]
    Poisoned,
}

/// Why [`super::copy_nar`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyNarError {
    /// The input is not a valid NAR, or could not be read.
    #[error(transparent)]
    Read(#[from] NarError),
    /// The output could not be written.
    #[error(transparent)]
    Write(#[from] NarWriteError),
}
