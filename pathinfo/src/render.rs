//! castore → NAR: renders a tree back into the canonical NAR it came from.
//!
//! NAR order is bytewise name order, which is the order [`Directory`] keeps,
//! so rendering walks the tree depth first and reproduces the original NAR
//! bit for bit. Directories are fetched (and verified) one at a time as the
//! walk reaches them; file contents stream chunk by chunk, each verified, and
//! each file's bytes are checked against its digest at its end.

use std::pin::Pin;
use std::task::{Context, Poll};

use lazystore_castore::blobs::BlobError;
use lazystore_castore::{Blobs, Digest, Directory, DirectoryError, DirectoryService, Node};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWrite;

use crate::nar::{NarWriteError, NarWriter};

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
}

/// Renders the tree at `root` as a NAR into `writer` and returns the writer.
pub async fn render_nar<W>(
    blobs: &Blobs,
    directories: &dyn DirectoryService,
    root: &Node,
    writer: W,
) -> Result<W, RenderError>
where
    W: AsyncWrite + Unpin + Send,
{
    let mut nar = NarWriter::new(writer);
    // Open directories with the index of their next entry to render.
    let mut stack: Vec<(Directory, usize)> = Vec::new();
    write_node(blobs, directories, &mut nar, &mut stack, None, root).await?;
    while let Some((dir, next)) = stack.last_mut() {
        let Some((name, node)) = dir.entries().nth(*next) else {
            nar.end_directory().await?;
            stack.pop();
            continue;
        };
        *next += 1;
        let (name, node) = (name.to_bytes(), node.clone());
        write_node(blobs, directories, &mut nar, &mut stack, Some(&name), &node).await?;
    }
    Ok(nar.finish().await?)
}

/// Writes one node; a directory is opened and pushed for the caller's loop.
async fn write_node<W>(
    blobs: &Blobs,
    directories: &dyn DirectoryService,
    nar: &mut NarWriter<W>,
    stack: &mut Vec<(Directory, usize)>,
    name: Option<&[u8]>,
    node: &Node,
) -> Result<(), RenderError>
where
    W: AsyncWrite + Unpin + Send,
{
    match node {
        Node::Directory { digest, .. } => {
            let dir = directories
                .get(digest)
                .await?
                .ok_or(RenderError::MissingDirectory(*digest))?;
            nar.start_directory(name).await?;
            stack.push((dir, 0));
        }
        Node::File {
            digest,
            size,
            executable,
        } => {
            let meta = blobs
                .stat(digest)
                .await?
                .ok_or(RenderError::MissingBlob(*digest))?;
            if meta.size != *size {
                return Err(RenderError::BlobSize {
                    digest: *digest,
                    recorded: *size,
                    actual: meta.size,
                });
            }
            nar.file(name, *executable, *size).await?;
            let mut reader = blobs.reader(*digest, meta);
            while let Some(chunk) = reader.next_chunk().await? {
                nar.write_content(&chunk).await?;
            }
        }
        Node::Symlink { target } => nar.symlink(name, target.as_bytes()).await?,
    }
    Ok(())
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
