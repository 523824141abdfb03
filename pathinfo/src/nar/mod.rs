//! NAR (Nix ARchive): the streaming [`NarReader`], the canonical [`NarWriter`]
//! and [`copy_nar`] between them.
//!
//! A NAR is the serialisation Nix hashes (`NarHash`) and ships in binary
//! caches. It has exactly one encoding per file system tree, which is what
//! lets lazystore split a NAR into castore nodes and render it back bit for
//! bit. Both halves hold to the same rules, so the writer cannot produce a
//! NAR the reader rejects, and both work in constant memory whatever the
//! size of the files: contents stream through, and every other string is
//! bounded before anything is allocated for it.
//!
//! # Byte layout
//!
//! Every token is a string `str(s)`:
//!
//! ```text
//! offset  size          field
//! 0       8             len, u64 little-endian
//! 8       len           the bytes of s
//! 8+len   (8-len%8)%8   zero padding to a multiple of 8
//! ```
//!
//! A NAR is `str("nix-archive-1")` followed by one node:
//!
//! ```text
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" str(file bytes)
//! symlink   = "symlink" "target" str(target)
//! directory = "directory" { "entry" "(" "name" str(name) "node" node ")" }
//! ```
//!
//! Directory entries come strictly sorted by name, bytewise. This is the
//! grammar of Nix's `parseDump` (`src/libutil/archive.cc`); this module
//! is stricter in the ways listed in [`NarErrorKind`] (entry name and target
//! lengths, nesting depth, bytes after the root node).

mod error;
mod reader;
mod writer;

#[cfg(test)]
mod tests;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

pub use error::{CopyNarError, NarError, NarErrorKind, NarWriteError};
// The entry-name and symlink-target rules are castore's: a NAR holds
// exactly what castore can represent.
pub use lazystore_castore::nodes::{
    MAX_NAME_LEN, MAX_TARGET_LEN, NameError, TargetError, validate_name, validate_target,
};
pub use reader::{ContentReader, NarReader};
pub use writer::NarWriter;

/// Most directories open at once, the root included: a NAR with directories
/// nested 64 deep is rejected. Nix has no such limit, but no store path comes
/// near it and every consumer of the events (castore, FUSE) can then recurse
/// without fear.
pub const MAX_DIRECTORY_DEPTH: usize = 63;

/// Size of the buffers between the NAR and the underlying reader or writer:
/// large enough that the many small tokens cost one syscall per 64 KiB.
const IO_BUFFER_SIZE: usize = 64 * 1024;

/// The tokens of the grammar, as they appear inside `str()`.
pub(crate) mod token {
    pub const MAGIC: &[u8] = b"nix-archive-1";
    pub const OPEN: &[u8] = b"(";
    pub const CLOSE: &[u8] = b")";
    pub const TYPE: &[u8] = b"type";
    pub const REGULAR: &[u8] = b"regular";
    pub const SYMLINK: &[u8] = b"symlink";
    pub const DIRECTORY: &[u8] = b"directory";
    pub const EXECUTABLE: &[u8] = b"executable";
    pub const CONTENTS: &[u8] = b"contents";
    pub const TARGET: &[u8] = b"target";
    pub const ENTRY: &[u8] = b"entry";
    pub const NAME: &[u8] = b"name";
    pub const NODE: &[u8] = b"node";

    /// Longest token: `nix-archive-1`. A longer string where a token is
    /// expected is rejected without being read.
    pub const MAX_LEN: usize = MAGIC.len();
}

/// Zero bytes that follow a string of `len` bytes.
fn padding_len(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// One step of a NAR walk, in NAR order: a depth-first walk with the entries
/// of each directory in bytewise name order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A regular file. Its contents follow through
    /// [`NarReader::read_content`].
    File {
        /// `None` for the root node, the entry name inside a directory.
        name: Option<Bytes>,
        /// Whether the file has the executable bit.
        executable: bool,
        /// Length of the contents in bytes.
        size: u64,
    },
    /// A symbolic link.
    Symlink {
        /// `None` for the root node, the entry name inside a directory.
        name: Option<Bytes>,
        /// Where it points; may be relative, absolute or dangling.
        target: Bytes,
    },
    /// A directory opens; its entries follow, then [`Event::DirectoryEnd`].
    DirectoryStart {
        /// `None` for the root node, the entry name inside a directory.
        name: Option<Bytes>,
    },
    /// The innermost open directory closes.
    DirectoryEnd,
}

/// Copies a NAR event by event from `reader` to `writer` and returns the
/// writer, flushed. Because the writer is canonical, the output equals the
/// input byte for byte for every NAR the reader accepts; tests and the fuzzer
/// hold the two halves to that.
pub async fn copy_nar<R, W>(reader: R, writer: W) -> Result<W, CopyNarError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = NarReader::new(reader);
    let mut writer = NarWriter::new(writer);
    let mut buf = vec![0; IO_BUFFER_SIZE];
    while let Some(event) = reader.next().await? {
        match event {
            Event::File {
                name,
                executable,
                size,
            } => {
                writer.file(name.as_deref(), executable, size).await?;
                loop {
                    let n = reader.read_content(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    writer.write_content(&buf[..n]).await?;
                }
            }
            Event::Symlink { name, target } => writer.symlink(name.as_deref(), &target).await?,
            Event::DirectoryStart { name } => writer.start_directory(name.as_deref()).await?,
            Event::DirectoryEnd => writer.end_directory().await?,
        }
    }
    Ok(writer.finish().await?)
}
