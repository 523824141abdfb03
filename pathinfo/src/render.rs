//! castore → NAR: renders a tree back into the canonical NAR it came from.
//!
//! NAR order is bytewise name order, which is the order [`Directory`] keeps,
//! so rendering walks the tree depth first and reproduces the original NAR
//! bit for bit. Directories are fetched (and verified) one at a time as the
//! walk reaches them; file contents stream chunk by chunk, each verified, and
//! each file's bytes are checked against its digest at its end.
//!
//! [`nar_layout`] lays a NAR out without reading any file: from the
//! directories alone it records where each file's contents sit in the NAR
//! and keeps every other byte (tokens, names, targets, padding), so that
//! [`render_range`] can serve any byte range by seeking — to the right file
//! and the right chunk of it — instead of rendering from the start.
//! [`nar_listing`] is the same walk written as a [`Listing`] (`.ls`).

use std::collections::BTreeMap;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use lazystore_castore::blobs::{BlobError, ChunkIndex, cut};
use lazystore_castore::{
    Blobs, Digest, Directory, DirectoryError, DirectoryService, Node, PathComponent,
};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::listing::{Listing, ListingEntry};
use crate::nar::{NarWriteError, NarWriter, token};

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

/// Where everything is in the NAR of a tree: every byte that is not file
/// contents (kept, in order, as `structure`) and where each file's contents
/// go between them. Built by [`nar_layout`] from the directories alone;
/// [`render_range`] reads any range of the NAR from it and the blobs.
///
/// Its memory is the NAR's structure (about 200 bytes per entry, a few
/// hundred KiB for a large package) plus one record per non-empty file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarLayout {
    /// NarSize.
    size: u64,
    /// The NAR with every file's contents cut out.
    structure: Bytes,
    /// Non-empty files, in NAR order.
    files: Vec<FileSpan>,
}

/// One file's contents in a [`NarLayout`].
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileSpan {
    /// Where its contents start in the NAR.
    nar_offset: u64,
    /// Length of its contents.
    size: u64,
    /// Where the NAR resumes in `structure` after the contents.
    resume: usize,
    /// Its blob.
    digest: Digest,
}

impl FileSpan {
    fn nar_end(&self) -> u64 {
        self.nar_offset + self.size
    }
}

impl NarLayout {
    /// Length of the NAR (NarSize).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of memory it holds, for caches that bound them.
    pub fn heap_size(&self) -> usize {
        self.structure.len() + self.files.capacity() * std::mem::size_of::<FileSpan>()
    }
}

fn padding(len: u64) -> u64 {
    (8 - len % 8) % 8
}

/// A directory being listed: its name in its parent (none at the root) and
/// its entries so far.
type OpenListing = (Option<PathComponent>, BTreeMap<PathComponent, ListingEntry>);

/// Walks a tree in NAR order, counting NAR offsets, and records the
/// structure bytes, the file spans and the listing entries its users want.
struct Walk {
    /// NAR bytes so far.
    offset: u64,
    /// Whether `offset` went past [`MAX_NAR_SIZE`]: the walk stops with
    /// [`RenderError::TooLarge`] at the next node.
    too_large: bool,
    /// The structure so far, and the file spans, when a layout is wanted.
    layout: Option<(Vec<u8>, Vec<FileSpan>)>,
    /// Open directories' entries with their names, when a listing is
    /// wanted; the finished root lands in `root`.
    listing: Option<Vec<OpenListing>>,
    root: Option<ListingEntry>,
}

impl Walk {
    fn raw(&mut self, bytes: &[u8]) {
        self.advance(bytes.len() as u64);
        if let Some((structure, _)) = &mut self.layout {
            structure.extend_from_slice(bytes);
        }
    }

    /// Counts `n` bytes of NAR, never past [`MAX_NAR_SIZE`].
    fn advance(&mut self, n: u64) {
        match self.offset.checked_add(n) {
            Some(offset) if offset <= MAX_NAR_SIZE => self.offset = offset,
            _ => self.too_large = true,
        }
    }

    fn zeros(&mut self, n: u64) {
        self.raw(&[0; 8][..n as usize]);
    }

    fn str(&mut self, s: &[u8]) {
        self.raw(&(s.len() as u64).to_le_bytes());
        self.raw(s);
        self.zeros(padding(s.len() as u64));
    }

    /// What precedes a node's type: the magic at the root, the entry
    /// header in a directory.
    fn open_node(&mut self, name: Option<&PathComponent>) {
        match name {
            None => self.str(token::MAGIC),
            Some(name) => {
                for t in [token::ENTRY, token::OPEN, token::NAME] {
                    self.str(t);
                }
                self.str(name.as_bytes());
                self.str(token::NODE);
            }
        }
        self.str(token::OPEN);
        self.str(token::TYPE);
    }

    /// After a node's `)`: the entry's `)` if inside a directory.
    fn close_node(&mut self, in_directory: bool) {
        if in_directory {
            self.str(token::CLOSE);
        }
    }

    /// Adds a finished entry to the listing being built.
    fn listed(&mut self, name: Option<&PathComponent>, entry: ListingEntry) {
        let Some(open) = &mut self.listing else {
            return;
        };
        match (open.last_mut(), name) {
            (Some((_, entries)), Some(name)) => {
                entries.insert(name.clone(), entry);
            }
            _ => self.root = Some(entry),
        }
    }

    async fn node(
        &mut self,
        directories: &dyn DirectoryService,
        stack: &mut Vec<(Directory, usize)>,
        name: Option<&PathComponent>,
        node: &Node,
    ) -> Result<(), RenderError> {
        if self.too_large {
            return Err(RenderError::TooLarge);
        }
        let in_directory = name.is_some();
        self.open_node(name);
        match node {
            Node::Directory { digest, .. } => {
                let dir = directories
                    .get(digest)
                    .await?
                    .ok_or(RenderError::MissingDirectory(*digest))?;
                self.str(token::DIRECTORY);
                if let Some(open) = &mut self.listing {
                    open.push((name.cloned(), BTreeMap::new()));
                }
                stack.push((dir, 0));
            }
            Node::File {
                digest,
                size,
                executable,
            } => {
                self.str(token::REGULAR);
                if *executable {
                    self.str(token::EXECUTABLE);
                    self.str(b"");
                }
                self.str(token::CONTENTS);
                self.raw(&size.to_le_bytes());
                let nar_offset = self.offset;
                self.advance(*size);
                if self.too_large {
                    return Err(RenderError::TooLarge);
                }
                if let Some((structure, files)) = &mut self.layout
                    && *size > 0
                {
                    files.push(FileSpan {
                        nar_offset,
                        size: *size,
                        resume: structure.len(),
                        digest: *digest,
                    });
                }
                self.zeros(padding(*size));
                self.str(token::CLOSE);
                self.close_node(in_directory);
                self.listed(
                    name,
                    ListingEntry::Regular {
                        size: *size,
                        executable: *executable,
                        nar_offset: Some(nar_offset),
                    },
                );
            }
            Node::Symlink { target } => {
                self.str(token::SYMLINK);
                self.str(token::TARGET);
                self.str(target.as_bytes());
                self.str(token::CLOSE);
                self.close_node(in_directory);
                self.listed(
                    name,
                    ListingEntry::Symlink {
                        target: target.clone(),
                    },
                );
            }
        }
        Ok(())
    }

    /// Walks the tree at `root`, fetching (and verifying) each directory
    /// once, in NAR order.
    async fn run(
        mut self,
        directories: &dyn DirectoryService,
        root: &Node,
    ) -> Result<Walk, RenderError> {
        let mut stack: Vec<(Directory, usize)> = Vec::new();
        self.node(directories, &mut stack, None, root).await?;
        while let Some((dir, next)) = stack.last_mut() {
            let Some((name, node)) = dir.entries().nth(*next) else {
                stack.pop();
                self.str(token::CLOSE);
                self.close_node(!stack.is_empty());
                if let Some(open) = &mut self.listing {
                    let (name, entries) = open.pop().expect("opened with the directory");
                    self.listed(name.as_ref(), ListingEntry::Directory { entries });
                }
                continue;
            };
            *next += 1;
            let (name, node) = (name.clone(), node.clone());
            self.node(directories, &mut stack, Some(&name), &node)
                .await?;
        }
        if self.too_large {
            return Err(RenderError::TooLarge);
        }
        Ok(self)
    }
}

/// Lays out the NAR of the tree at `root` from its directories alone (no
/// file is read): see [`NarLayout`].
pub async fn nar_layout(
    directories: &dyn DirectoryService,
    root: &Node,
) -> Result<NarLayout, RenderError> {
    let walk = Walk {
        offset: 0,
        too_large: false,
        layout: Some((Vec::new(), Vec::new())),
        listing: None,
        root: None,
    }
    .run(directories, root)
    .await?;
    let (structure, mut files) = walk.layout.expect("asked for");
    files.shrink_to_fit();
    Ok(NarLayout {
        size: walk.offset,
        structure: Bytes::from(structure),
        files,
    })
}

/// The `.ls` listing of the tree at `root`, with every file's `narOffset`,
/// as Nix writes it for the same NAR.
pub async fn nar_listing(
    directories: &dyn DirectoryService,
    root: &Node,
) -> Result<Listing, RenderError> {
    let walk = Walk {
        offset: 0,
        too_large: false,
        layout: None,
        listing: Some(Vec::new()),
        root: None,
    }
    .run(directories, root)
    .await?;
    Ok(Listing {
        root: walk.root.expect("the walk lists the root"),
    })
}

/// Chunks read at once when a range starts: few, so the first byte comes
/// soon; doubled per read up to [`RANGE_BATCH_MAX`] as the range goes on.
const RANGE_BATCH_FIRST: usize = 2;
const RANGE_BATCH_MAX: usize = 16;

/// Chunk batches read ahead of the one being sent, each read and verified
/// by a task of its own, so that reading, decompressing and hashing use
/// every core while the bytes before them are sent.
const RANGE_READ_AHEAD: usize = 4;

/// Bytes of chunks read ahead per range, at most: a batch is cut short to
/// stay within it, and none is started past it. A single chunk larger than
/// what is left is still read (alone), so at most this plus one chunk is
/// held per range, whatever the chunk size.
pub const RANGE_READ_AHEAD_BYTES: u64 = 4 << 20;

/// The most bytes any range has held read ahead, for the tests of the
/// bound.
#[cfg(test)]
static MAX_AHEAD_SEEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Pieces of NAR queued between the task reading them and the consumer.
const RANGE_QUEUE: usize = 8;

/// Bytes `range` of the NAR laid out by `layout`, as a stream of pieces in
/// order, read by seeking: the structure between files comes from the
/// layout (without a copy), and only the chunks of the files the range
/// overlaps are read, each verified, several batches at once. A task of
/// its own produces the pieces; dropping the stream stops it.
///
/// Each chunk is checked against its digest. A whole file is not also
/// checked against its blob digest, as [`render_nar`] does: that would hash
/// every byte twice and forbid starting mid-file; a wrong chunk list is
/// caught by the NarHash a client checks.
pub fn stream_range(
    blobs: Blobs,
    layout: Arc<NarLayout>,
    range: Range<u64>,
) -> Result<impl Stream<Item = Result<Bytes, RenderError>> + Send + 'static, RenderError> {
    if range.start > range.end || range.end > layout.size {
        return Err(RenderError::OutOfRange {
            start: range.start,
            end: range.end,
            size: layout.size,
        });
    }
    let (sender, receiver) = tokio::sync::mpsc::channel(RANGE_QUEUE);
    tokio::spawn(async move {
        if let Err(e) = produce_range(&blobs, &layout, range, &sender).await {
            let _ = sender.send(Err(e)).await;
        }
    });
    Ok(futures::stream::unfold(
        receiver,
        |mut receiver| async move { receiver.recv().await.map(|piece| (piece, receiver)) },
    ))
}

/// One piece of a range being produced: bytes ready now, or a batch of
/// chunks being read, to be cut to `from..to` of their concatenation.
enum Piece {
    Ready(Bytes),
    Chunks {
        reading: tokio::task::JoinHandle<Result<Vec<Bytes>, BlobError>>,
        from: u64,
        to: u64,
        /// Bytes of the chunks.
        bytes: u64,
    },
}

/// Plans the pieces of `range`, starting the chunk reads up to
/// [`RANGE_READ_AHEAD`] batches ahead, and sends them in order. Returns
/// early, without error, once the consumer is gone.
async fn produce_range(
    blobs: &Blobs,
    layout: &NarLayout,
    range: Range<u64>,
    sender: &tokio::sync::mpsc::Sender<Result<Bytes, RenderError>>,
) -> Result<(), RenderError> {
    let files = &layout.files;
    let mut pending: std::collections::VecDeque<Piece> = std::collections::VecDeque::new();
    let mut pos = range.start;
    let mut batch = RANGE_BATCH_FIRST;
    // The file being planned: its chunk index and the next chunk.
    let mut current: Option<(usize, ChunkIndex, usize)> = None;
    // Bytes of the chunks being read or read, not yet sent.
    let mut ahead: u64 = 0;
    loop {
        // Plan until enough is read ahead or the range is planned.
        while pos < range.end
            && ahead < RANGE_READ_AHEAD_BYTES
            && pending
                .iter()
                .filter(|p| matches!(p, Piece::Chunks { .. }))
                .count()
                < RANGE_READ_AHEAD
        {
            // The last file starting at or before `pos`: `pos` is in its
            // contents or in the structure after it.
            let k = files.partition_point(|f| f.nar_offset <= pos);
            match k.checked_sub(1) {
                Some(i) if pos < files[i].nar_end() => {
                    let file = &files[i];
                    if current.as_ref().is_none_or(|(at, ..)| *at != i) {
                        let meta = blobs
                            .stat(&file.digest)
                            .await?
                            .ok_or(RenderError::MissingBlob(file.digest))?;
                        if meta.size != file.size {
                            return Err(RenderError::BlobSize {
                                digest: file.digest,
                                recorded: file.size,
                                actual: meta.size,
                            });
                        }
                        // The first chunk overlapping `pos`.
                        let within = pos - file.nar_offset;
                        let index = ChunkIndex::new(meta);
                        let first = index.overlapping(within, within + 1).start;
                        current = Some((i, index, first));
                    }
                    let (_, index, next) = current.as_mut().expect("just set");
                    let from = pos - file.nar_offset;
                    let to = (range.end - file.nar_offset).min(file.size);
                    let mut digests = Vec::with_capacity(batch);
                    let first_start = index.start(*next);
                    let mut batch_end = first_start;
                    while digests.len() < batch && batch_end < to {
                        let chunk = index.meta.chunks[*next];
                        let bytes = batch_end - first_start;
                        if !digests.is_empty()
                            && ahead + bytes + chunk.size > RANGE_READ_AHEAD_BYTES
                        {
                            break;
                        }
                        digests.push(chunk.digest);
                        batch_end += chunk.size;
                        *next += 1;
                    }
                    let bytes = batch_end - first_start;
                    ahead += bytes;
                    #[cfg(test)]
                    MAX_AHEAD_SEEN.fetch_max(ahead, std::sync::atomic::Ordering::Relaxed);
                    let reader = blobs.clone();
                    pending.push_back(Piece::Chunks {
                        reading: tokio::spawn(async move {
                            reader.read_chunks_verified(&digests).await
                        }),
                        from: from - first_start,
                        to: to.min(batch_end) - first_start,
                        bytes,
                    });
                    pos = file.nar_offset + to.min(batch_end);
                    batch = (batch * 2).min(RANGE_BATCH_MAX);
                }
                previous => {
                    let (resume, resumes_at) =
                        previous.map_or((0, 0), |i| (files[i].resume, files[i].nar_end()));
                    let next = files.get(k).map_or(layout.size, |f| f.nar_offset);
                    let to = range.end.min(next);
                    let from = resume + (pos - resumes_at) as usize;
                    pending.push_back(Piece::Ready(
                        layout.structure.slice(from..from + (to - pos) as usize),
                    ));
                    pos = to;
                }
            }
        }
        let Some(piece) = pending.pop_front() else {
            return Ok(());
        };
        let (pieces, held) = match piece {
            Piece::Ready(bytes) => (vec![bytes], 0),
            Piece::Chunks {
                reading,
                from,
                to,
                bytes,
            } => {
                let chunks = reading
                    .await
                    .map_err(|e| RenderError::Blob(BlobError::Internal(e.into())))??;
                (cut(chunks, from, to), bytes)
            }
        };
        for bytes in pieces {
            if !bytes.is_empty() && sender.send(Ok(bytes)).await.is_err() {
                // The consumer is gone; the reads still pending stop with
                // their tasks' results unused.
                for piece in pending {
                    if let Piece::Chunks { reading, .. } = piece {
                        reading.abort();
                    }
                }
                return Ok(());
            }
        }
        ahead -= held;
    }
}

/// Writes bytes `range` of the NAR laid out by `layout` into `writer`, as
/// [`stream_range`] reads them. Returns the writer, flushed.
pub async fn render_range<W>(
    blobs: &Blobs,
    layout: &Arc<NarLayout>,
    range: Range<u64>,
    mut writer: W,
) -> Result<W, RenderError>
where
    W: AsyncWrite + Unpin + Send,
{
    let mut pieces = std::pin::pin!(stream_range(blobs.clone(), layout.clone(), range)?);
    while let Some(piece) = pieces.next().await {
        writer.write_all(&piece?).await.map_err(RenderError::Io)?;
    }
    writer.flush().await.map_err(RenderError::Io)?;
    Ok(writer)
}

#[cfg(test)]
mod tests {
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
