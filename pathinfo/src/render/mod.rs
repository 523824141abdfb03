//! castore → NAR: renders a tree back into the canonical NAR it came from.
//!
//! NAR order is bytewise name order, which is the order [`Directory`]
//! keeps, so a depth-first walk reproduces the original NAR bit for bit.
//! Every rendering is laid out first from the directories alone
//! (`layout.rs`: where each file's contents go, every other byte kept),
//! then the file contents are read in that order (`range.rs`), in batches
//! across files and several at once, each chunk verified. [`render_nar`]
//! renders a whole NAR and also checks every chunk list and every file
//! against its blob digest; [`stream_range`] serves any byte range by
//! seeking to the right file and chunk.
//!
//! [`Directory`]: lazystore_castore::Directory

mod layout;
mod range;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use lazystore_castore::blobs::BlobError;
use lazystore_castore::{Blobs, Digest, DirectoryError, DirectoryService, Node};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::nar::NarWriteError;

pub use layout::{NarLayout, nar_layout, nar_listing};
pub use range::{RANGE_READ_AHEAD_BYTES, render_range, stream_range};

/// Why a tree could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// Reading a file's contents failed.
    #[error("reading file contents")]
    Blob(#[from] BlobError),
    /// Reading a directory failed.
    #[error("reading a directory")]
    Directory(#[from] DirectoryError),
    /// A directory the tree refers to is not stored.
    #[error("directory {0} is not stored")]
    MissingDirectory(Digest),
    /// A file's blob is not stored.
    #[error("blob {0} is not stored")]
    MissingBlob(Digest),
    /// A stored blob's length differs from its file entry's.
    #[error("blob {digest} has {actual} bytes, its entry says {recorded}")]
    BlobSize {
        /// The blob.
        digest: Digest,
        /// Size in the entry.
        recorded: u64,
        /// Size of the stored blob.
        actual: u64,
    },
    /// Writing the NAR failed.
    #[error(transparent)]
    Write(#[from] NarWriteError),
    /// Writing a range of the NAR failed.
    #[error("writing the NAR")]
    Io(#[source] std::io::Error),
    /// The tree's file sizes add up past what a NAR can hold: a directory
    /// (as a gRPC client may write one) claims impossible sizes.
    #[error("the tree's NAR would be longer than {MAX_NAR_SIZE} bytes")]
    TooLarge,
    /// A range that is not inside the NAR.
    #[error("range {start}..{end} is not inside the NAR of {size} bytes")]
    OutOfRange {
        /// First byte asked for.
        start: u64,
        /// One past the last byte asked for.
        end: u64,
        /// NarSize.
        size: u64,
    },
}

/// The longest NAR laid out or listed: far beyond any real one, and low
/// enough that no offset in it can overflow a `u64`.
pub const MAX_NAR_SIZE: u64 = u64::MAX / 2;

/// Renders the tree at `root` as a NAR into `writer` and returns the
/// writer, flushed. Every chunk, every chunk list and every file is
/// checked: a tree that renders is whole.
pub async fn render_nar<W>(
    blobs: &Blobs,
    directories: &dyn DirectoryService,
    root: &Node,
    writer: W,
) -> Result<W, RenderError>
where
    W: AsyncWrite + Unpin + Send,
{
    let layout = Arc::new(nar_layout(directories, root).await?);
    let size = layout.size();
    let pieces = range::spawn_range(blobs.clone(), layout, 0..size, range::Check::Whole)?;
    write_pieces(pieces, writer).await
}

/// Writes every piece into `writer`, then flushes it.
async fn write_pieces<W>(
    pieces: impl Stream<Item = Result<Bytes, RenderError>>,
    mut writer: W,
) -> Result<W, RenderError>
where
    W: AsyncWrite + Unpin + Send,
{
    let mut pieces = std::pin::pin!(pieces);
    while let Some(piece) = pieces.next().await {
        writer.write_all(&piece?).await.map_err(RenderError::Io)?;
    }
    writer.flush().await.map_err(RenderError::Io)?;
    Ok(writer)
}

/// Renders the tree at `root` only to measure it: its NarSize and NarHash
/// (SHA-256), as Nix would compute them from the files.
pub async fn nar_hash(
    blobs: &Blobs,
    directories: &dyn DirectoryService,
    root: &Node,
) -> Result<(u64, [u8; 32]), RenderError> {
    let sink = render_nar(blobs, directories, root, HashingWriter::default()).await?;
    Ok((sink.count, sink.hasher.finalize().into()))
}

/// Counts and SHA-256-hashes what is written to it.
#[derive(Default)]
struct HashingWriter {
    hasher: Sha256,
    count: u64,
}

impl AsyncWrite for HashingWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.hasher.update(buf);
        self.count += buf.len() as u64;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::range::MAX_AHEAD_SEEN;
    use super::*;
    use lazystore_castore::ChunkerParams;
    use lazystore_castore::blobs::MemoryBlobService;
    use lazystore_castore::directories::MemoryDirectoryService;

    /// With large chunks and a consumer that stops reading, a range holds
    /// no more than [`RANGE_READ_AHEAD_BYTES`] and one chunk read ahead.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_ahead_is_bounded_in_bytes() {
        let params = ChunkerParams {
            min: 256 << 10,
            avg: 1 << 20,
            max: 4 << 20,
        }
        .validate()
        .unwrap();
        let blobs = Blobs::new(Arc::new(MemoryBlobService::new()), params);
        let data = lazystore_testkit::noise(64 << 20, 5);
        let digest = blobs.put(&data).await.unwrap();
        let root = Node::File {
            digest,
            size: data.len() as u64,
            executable: false,
        };
        let layout = Arc::new(
            nar_layout(&MemoryDirectoryService::new(), &root)
                .await
                .unwrap(),
        );
        let size = layout.size();
        let mut pieces = std::pin::pin!(stream_range(blobs, layout, 0..size).unwrap());
        // One piece, then nothing: the producer fills what it may.
        pieces.next().await.unwrap().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let seen = MAX_AHEAD_SEEN.load(std::sync::atomic::Ordering::Relaxed);
        assert!(seen > 0);
        assert!(
            seen <= RANGE_READ_AHEAD_BYTES + u64::from(params.max),
            "{seen} bytes read ahead"
        );
        // The rest still comes whole.
        let mut total = 0u64;
        while let Some(piece) = pieces.next().await {
            total += piece.unwrap().len() as u64;
        }
        assert!(total > 0 && total < size);
    }
}
