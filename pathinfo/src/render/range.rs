//! Any byte range of a NAR, by seeking: the structure between files comes
//! from a [`NarLayout`], and only the chunks of the files the range
//! overlaps are read.
//!
//! **Reads travel in batches across files.** Chunks are gathered into
//! batches of up to [`RANGE_BATCH_MAX`] whatever file they belong to, and
//! up to [`RANGE_READ_AHEAD`] batches are read at once, each by a task of
//! its own: a directory of small files costs one request per batch, not
//! one (or two, with its chunk list) per file. Chunk lists are asked
//! ahead of the file being planned, [`STAT_BATCH`] in one request. A file no
//! longer than the chunker's minimum is one chunk whose digest is the
//! file's, so a served range needs no chunk list for it at all; a whole
//! rendering ([`super::render_nar`], which fsck uses) still asks every
//! chunk list, so a missing one is found.
//!
//! Measured (`tests/s3_bench.rs`, release build, an 8,762-file Python
//! tree, NAR 303 MB, on a three-node Garage cluster on loopback, page
//! cache dropped): a whole rendering file by file, two requests each, had
//! not finished after 13 minutes; in batches with chunk lists asked ahead
//! it took 15.7 s and 9,259 GETs with one chunk list per request, 6.7 s
//! and 736 GETs with 64, and 4.6–4.9 s with eight batches in flight. From
//! the embedded redb store the same rendering went from 1.64 s to 0.59 s.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use lazystore_castore::Blobs;
// Chunk lists are asked ahead in batches as a walk asks them
// (`Blobs::stat_batches`).
use lazystore_castore::Digest;
use lazystore_castore::blobs::{BlobError, BlobMeta, ChunkIndex, cut};
use lazystore_castore::blobs::{STAT_BATCH, STAT_BATCHES};
use tokio::task::JoinHandle;

use super::RenderError;
use super::layout::{FileSpan, NarLayout};

/// Chunks read at once when a range starts: few, so the first byte comes
/// soon; doubled per batch up to [`RANGE_BATCH_MAX`] as the range goes on.
const RANGE_BATCH_FIRST: usize = 2;
const RANGE_BATCH_MAX: usize = 64;

/// Bytes of chunks in one batch at most (one chunk more if it is larger):
/// a quarter of [`RANGE_READ_AHEAD_BYTES`], so that large files are read
/// and decoded by several batches at once, on every core.
const BATCH_BYTES: u64 = 1 << 20;

/// Chunk batches read ahead of the one being sent, each read and verified
/// by a task of its own, so that reading, decompressing and hashing use
/// every core while the bytes before them are sent.
const RANGE_READ_AHEAD: usize = 8;

/// Bytes of chunks read ahead per range, at most: a batch is cut short to
/// stay within it, and none is started past it. A single chunk larger than
/// what is left is still read (alone), so at most this plus one chunk is
/// held per range, whatever the chunk size.
pub const RANGE_READ_AHEAD_BYTES: u64 = 4 << 20;

/// The most bytes any range has held read ahead, for the tests of the
/// bound.
#[cfg(test)]
pub(super) static MAX_AHEAD_SEEN: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Pieces of NAR queued between the task reading them and the consumer.
const RANGE_QUEUE: usize = 8;

/// Bytes `range` of the NAR laid out by `layout`, as a stream of pieces in
/// order, read by seeking: the structure between files comes from the
/// layout (without a copy), and only the chunks of the files the range
/// overlaps are read, each verified, several batches at once. A task of
/// its own produces the pieces; dropping the stream stops it.
///
/// Each chunk is checked against its digest. A whole file is not also
/// checked against its blob digest, as [`super::render_nar`] does: that
/// would hash every byte twice and forbid starting mid-file; a wrong chunk
/// list is caught by the NarHash a client checks.
pub fn stream_range(
    blobs: Blobs,
    layout: Arc<NarLayout>,
    range: Range<u64>,
) -> Result<impl Stream<Item = Result<Bytes, RenderError>> + Send + 'static, RenderError> {
    spawn_range(blobs, layout, range, Check::Chunks)
}

/// How much of what it reads a range checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Check {
    /// Every chunk against its digest.
    Chunks,
    /// Every chunk, every chunk list, and every file the range holds whole
    /// against its blob digest.
    Whole,
}

pub(super) fn spawn_range(
    blobs: Blobs,
    layout: Arc<NarLayout>,
    range: Range<u64>,
    check: Check,
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
        let mut producer = Producer::new(&blobs, &layout, range, check).await;
        if let Err(e) = producer.run(&sender).await {
            let _ = sender.send(Err(e)).await;
        }
    });
    Ok(futures::stream::unfold(
        receiver,
        |mut receiver| async move { receiver.recv().await.map(|piece| (piece, receiver)) },
    ))
}

/// One piece of a range being produced: bytes ready now, or some chunks of
/// a batch, to be cut to `from..to` of their concatenation.
enum Piece {
    Ready(Bytes),
    Chunks {
        batch: u64,
        chunks: Range<usize>,
        from: u64,
        to: u64,
        /// Bytes of the chunks.
        bytes: u64,
        /// When the file is checked whole: its index in the layout, and
        /// whether this piece ends it.
        file: Option<(usize, bool)>,
    },
}

type Reading<T> = JoinHandle<Result<T, BlobError>>;

/// A chunk list, or `None` for a blob not stored.
type Stat = Option<BlobMeta>;

/// Plans the pieces of a range and reads their chunks.
struct Producer<'a> {
    blobs: &'a Blobs,
    layout: &'a NarLayout,
    range: Range<u64>,
    check: Check,
    /// Files up to this size are one chunk, digest the file's; `None` when
    /// every chunk list is asked.
    one_chunk_up_to: Option<u64>,
    /// Where planning is.
    pos: u64,
    /// Pieces planned, not yet sent.
    pending: VecDeque<Piece>,
    /// Batches being read, oldest first, with their numbers.
    reading: VecDeque<(u64, Reading<Vec<Bytes>>)>,
    /// The batch being gathered (number `next_batch`).
    open: Vec<Digest>,
    /// Bytes of the chunks of the batch being gathered.
    open_bytes: u64,
    next_batch: u64,
    batch_len: usize,
    /// The batch read last, whose chunks are being sent.
    read: Option<(u64, Vec<Bytes>)>,
    /// Batches of chunk lists being asked, with their files' indexes.
    asking: VecDeque<(Vec<usize>, Reading<Vec<Stat>>)>,
    /// Chunk lists answered, by file index, in order.
    stats: VecDeque<(usize, Stat)>,
    /// The next file whose chunk list may be asked ahead.
    stat_next: usize,
    /// The file being planned: its index, chunk index and next chunk.
    current: Option<(usize, ChunkIndex, usize)>,
    /// Bytes of the chunks planned, not yet sent.
    ahead: u64,
    /// The file being checked whole and its hash so far.
    hashing: Option<(usize, blake3::Hasher)>,
}

impl<'a> Producer<'a> {
    async fn new(
        blobs: &'a Blobs,
        layout: &'a NarLayout,
        range: Range<u64>,
        check: Check,
    ) -> Producer<'a> {
        // Asked once per `Blobs` (a round trip to a remote store the first
        // time); if the store cannot say, every chunk list is asked.
        let one_chunk_up_to = match check {
            Check::Chunks => blobs.write_params().await.ok().map(|p| u64::from(p.min)),
            Check::Whole => None,
        };
        Producer {
            blobs,
            layout,
            pos: range.start,
            range,
            check,
            one_chunk_up_to,
            pending: VecDeque::new(),
            reading: VecDeque::new(),
            open: Vec::new(),
            open_bytes: 0,
            next_batch: 0,
            batch_len: RANGE_BATCH_FIRST,
            read: None,
            asking: VecDeque::new(),
            stats: VecDeque::new(),
            stat_next: 0,
            current: None,
            ahead: 0,
            hashing: None,
        }
    }

    /// A file known to be one chunk without asking.
    fn one_chunk(&self, file: &FileSpan) -> Option<BlobMeta> {
        let min = self.one_chunk_up_to?;
        BlobMeta::one_chunk(file.digest, file.size, min)
    }

    /// Plans and sends every piece, reading ahead within the bounds.
    /// Returns early, without error, once the consumer is gone.
    async fn run(
        &mut self,
        sender: &tokio::sync::mpsc::Sender<Result<Bytes, RenderError>>,
    ) -> Result<(), RenderError> {
        loop {
            while self.pos < self.range.end
                && self.ahead < RANGE_READ_AHEAD_BYTES
                && self.reading.len() < RANGE_READ_AHEAD
            {
                self.plan().await?;
            }
            self.seal();
            let Some(piece) = self.pending.pop_front() else {
                return Ok(());
            };
            let (pieces, held) = match piece {
                Piece::Ready(bytes) => (vec![bytes], 0),
                Piece::Chunks {
                    batch,
                    chunks,
                    from,
                    to,
                    bytes,
                    file,
                } => {
                    let read = self.batch(batch).await?;
                    let pieces = cut(read[chunks].to_vec(), from, to);
                    if let Some((i, ends)) = file {
                        self.hash(i, ends, &pieces)?;
                    }
                    (pieces, bytes)
                }
            };
            for bytes in pieces {
                if !bytes.is_empty() && sender.send(Ok(bytes)).await.is_err() {
                    // The consumer is gone; the reads still pending stop.
                    return Ok(());
                }
            }
            self.ahead -= held;
        }
    }

    /// Plans the next piece at `pos`.
    async fn plan(&mut self) -> Result<(), RenderError> {
        let files = &self.layout.files;
        // The last file starting at or before `pos`: `pos` is in its
        // contents or in the structure after it.
        let k = files.partition_point(|f| f.nar_offset <= self.pos);
        let i = match k.checked_sub(1) {
            Some(i) if self.pos < files[i].nar_end() => i,
            previous => {
                let (resume, resumes_at) =
                    previous.map_or((0, 0), |i| (files[i].resume, files[i].nar_end()));
                let next = files.get(k).map_or(self.layout.size, |f| f.nar_offset);
                let to = self.range.end.min(next);
                let from = resume + (self.pos - resumes_at) as usize;
                self.pending.push_back(Piece::Ready(
                    self.layout
                        .structure
                        .slice(from..from + (to - self.pos) as usize),
                ));
                self.pos = to;
                return Ok(());
            }
        };
        let file = &files[i];
        if self.current.as_ref().is_none_or(|(at, ..)| *at != i) {
            let meta = match self.one_chunk(file) {
                Some(meta) => meta,
                None => self
                    .stat(i)
                    .await?
                    .ok_or(RenderError::MissingBlob(file.digest))?,
            };
            if meta.size != file.size {
                return Err(RenderError::BlobSize {
                    digest: file.digest,
                    recorded: file.size,
                    actual: meta.size,
                });
            }
            // The first chunk overlapping `pos`.
            let within = self.pos - file.nar_offset;
            let index = ChunkIndex::new(meta);
            let first = index.overlapping(within, within + 1).start;
            self.current = Some((i, index, first));
        }
        if self.open.len() >= self.batch_len || self.open_bytes >= BATCH_BYTES {
            self.seal();
        }
        let (_, index, next) = self.current.as_mut().expect("just set");
        let from = self.pos - file.nar_offset;
        let to = (self.range.end - file.nar_offset).min(file.size);
        let first_start = index.start(*next);
        let first_chunk = self.open.len();
        let mut batch_end = first_start;
        while self.open.len() < self.batch_len && batch_end < to {
            let chunk = index.meta.chunks[*next];
            let bytes = batch_end - first_start;
            if bytes > 0
                && (self.ahead + bytes + chunk.size > RANGE_READ_AHEAD_BYTES
                    || self.open_bytes + bytes + chunk.size > BATCH_BYTES)
            {
                break;
            }
            self.open.push(chunk.digest);
            batch_end += chunk.size;
            *next += 1;
        }
        let bytes = batch_end - first_start;
        self.open_bytes += bytes;
        self.ahead += bytes;
        #[cfg(test)]
        MAX_AHEAD_SEEN.fetch_max(self.ahead, std::sync::atomic::Ordering::Relaxed);
        // A file checked whole: one the range holds whole, and not one
        // chunk (whose digest, checked, is the file's).
        let whole = self.check == Check::Whole
            && file.nar_offset >= self.range.start
            && file.nar_end() <= self.range.end
            && index.meta.chunks.len() > 1;
        self.pending.push_back(Piece::Chunks {
            batch: self.next_batch,
            chunks: first_chunk..self.open.len(),
            from: from - first_start,
            to: to.min(batch_end) - first_start,
            bytes,
            file: whole.then_some((i, batch_end >= file.size)),
        });
        self.pos = file.nar_offset + to.min(batch_end);
        Ok(())
    }

    /// Starts reading the batch being gathered, if any.
    fn seal(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let digests = std::mem::take(&mut self.open);
        self.open_bytes = 0;
        let blobs = self.blobs.clone();
        self.reading.push_back((
            self.next_batch,
            tokio::spawn(async move { blobs.read_chunks_verified(&digests).await }),
        ));
        self.next_batch += 1;
        self.batch_len = (self.batch_len * 2).min(RANGE_BATCH_MAX);
    }

    /// The chunks of batch `number`, read.
    async fn batch(&mut self, number: u64) -> Result<&[Bytes], RenderError> {
        if self.read.as_ref().is_none_or(|(at, _)| *at != number) {
            let (at, reading) = self
                .reading
                .pop_front()
                .expect("a planned piece's batch is sealed before it is sent");
            debug_assert_eq!(at, number);
            let chunks = reading
                .await
                .map_err(|e| RenderError::Blob(BlobError::Internal(e.into())))??;
            self.read = Some((at, chunks));
        }
        Ok(&self.read.as_ref().expect("just read").1)
    }

    /// File `i`'s chunk list. Chunk lists are asked in batches of up to
    /// [`STAT_BATCH`] files ahead, [`STAT_BATCHES`] batches at once.
    async fn stat(&mut self, i: usize) -> Result<Option<BlobMeta>, RenderError> {
        loop {
            while self.stats.front().is_some_and(|(at, _)| *at < i) {
                self.stats.pop_front();
            }
            if let Some((at, _)) = self.stats.front()
                && *at == i
            {
                return Ok(self.stats.pop_front().expect("just seen").1);
            }
            self.stat_next = self.stat_next.max(i);
            let files = &self.layout.files;
            while self.asking.len() < STAT_BATCHES {
                let mut batch = Vec::new();
                while batch.len() < STAT_BATCH
                    && self.stat_next < files.len()
                    && files[self.stat_next].nar_offset < self.range.end
                {
                    if self.one_chunk(&files[self.stat_next]).is_none() {
                        batch.push(self.stat_next);
                    }
                    self.stat_next += 1;
                }
                if batch.is_empty() {
                    break;
                }
                let digests: Vec<Digest> = batch.iter().map(|&k| files[k].digest).collect();
                let blobs = self.blobs.clone();
                self.asking.push_back((
                    batch,
                    tokio::spawn(async move { blobs.stat_many(&digests).await }),
                ));
            }
            let (batch, asking) = self
                .asking
                .pop_front()
                .expect("file i is asked if its chunk list is needed");
            let metas = asking
                .await
                .map_err(|e| RenderError::Blob(BlobError::Internal(e.into())))??;
            self.stats.extend(batch.into_iter().zip(metas));
        }
    }

    /// Hashes a piece of file `i`, checked whole; at its end, compares.
    fn hash(&mut self, i: usize, ends: bool, pieces: &[Bytes]) -> Result<(), RenderError> {
        if self.hashing.as_ref().is_none_or(|(at, _)| *at != i) {
            self.hashing = Some((i, blake3::Hasher::new()));
        }
        let (_, hasher) = self.hashing.as_mut().expect("just set");
        for piece in pieces {
            hasher.update(piece);
        }
        if ends {
            let (_, hasher) = self.hashing.take().expect("just set");
            let actual = Digest::from(hasher.finalize());
            let expected = self.layout.files[i].digest;
            if actual != expected {
                return Err(RenderError::Blob(BlobError::BlobMismatch {
                    expected,
                    actual,
                }));
            }
        }
        Ok(())
    }
}

impl Drop for Producer<'_> {
    /// A range given up stops its reads.
    fn drop(&mut self) {
        for (_, reading) in self.reading.drain(..) {
            reading.abort();
        }
        for (_, asking) in self.asking.drain(..) {
            asking.abort();
        }
    }
}

/// Writes bytes `range` of the NAR laid out by `layout` into `writer`, as
/// [`stream_range`] reads them. Returns the writer, flushed.
pub async fn render_range<W>(
    blobs: &Blobs,
    layout: &Arc<NarLayout>,
    range: Range<u64>,
    writer: W,
) -> Result<W, RenderError>
where
    W: tokio::io::AsyncWrite + Unpin + Send,
{
    let pieces = stream_range(blobs.clone(), layout.clone(), range)?;
    super::write_pieces(pieces, writer).await
}
