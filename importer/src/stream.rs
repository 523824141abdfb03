//! The byte pipeline between a cache and the NAR reader: count what comes
//! off the wire, decompress it, and cut the decompressed stream off at
//! NarSize + 1 bytes.
//!
//! Each stage is an `AsyncRead` that reports its own failures as an
//! [`io::Error`] carrying a [`StreamError`], so that after the NAR reader has
//! failed the importer can tell a transport failure (worth a retry) from a
//! decompression failure or a decompression bomb (not worth one) by looking
//! at the error alone; see [`StreamError::find`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use lazystore_pathinfo::Compression;
use lazystore_pathinfo::decompress::Decompressed;
use lazystore_pathinfo::ingest::{HashedNar, NarDigest};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::cache::CacheError;

/// A failure of one stage of the pipeline, carried inside an [`io::Error`].
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The transport failed mid-body (reset, timeout, truncated response).
    #[error("download failed")]
    Transport(#[source] CacheError),
    /// The compressed data is corrupt or truncated.
    #[error("{compression} decompression failed")]
    Decompress {
        /// The method.
        compression: Compression,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },
    /// The decompressed stream went on past the NarSize the narinfo states.
    #[error("NAR is longer than its NarSize of {nar_size} bytes (stopped at byte {})", nar_size + 1)]
    TooLong {
        /// The NarSize from the narinfo.
        nar_size: u64,
    },
    /// The compressed file is far larger than any compression of a NAR of
    /// this NarSize could be.
    #[error("compressed file exceeds {limit} bytes for a NAR of {nar_size} bytes")]
    CompressedTooLong {
        /// The limit that was hit.
        limit: u64,
        /// The NarSize from the narinfo.
        nar_size: u64,
    },
}

impl StreamError {
    fn into_io(self) -> io::Error {
        let kind = match &self {
            StreamError::Transport(_) => io::ErrorKind::ConnectionAborted,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }

    /// The first `StreamError` in `error`'s source chain, if any. `io::Error`
    /// hides the error it wraps from `source()`, so each one met is opened.
    pub fn find<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a StreamError> {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(found) = e.downcast_ref::<StreamError>() {
                return Some(found);
            }
            if let Some(found) = e
                .downcast_ref::<io::Error>()
                .and_then(io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<StreamError>())
            {
                return Some(found);
            }
            next = e.source();
        }
        None
    }
}

/// Wraps a transport failure for the pipeline.
pub(crate) fn transport_error(error: CacheError) -> io::Error {
    StreamError::Transport(error).into_io()
}

/// The [`StreamError`] `e` carries, or `e` itself if it carries none.
pub(crate) fn take_stream_error(e: io::Error) -> Result<StreamError, io::Error> {
    if !e.get_ref().is_some_and(|inner| inner.is::<StreamError>()) {
        return Err(e);
    }
    let inner = e.into_inner().expect("checked above");
    Ok(*inner.downcast::<StreamError>().expect("checked above"))
}

/// The most compressed bytes accepted for a NAR of `nar_size` bytes:
/// incompressible data grows by well under 1/8 in every supported format,
/// plus headers. Stops a server that streams forever without the
/// decompressed side ever growing (padding, skippable frames).
pub fn compressed_limit(nar_size: u64) -> u64 {
    nar_size
        .saturating_add(nar_size / 8)
        .saturating_add(1024 * 1024)
}

/// Counts bytes read through it into a shared counter and fails once more
/// than `limit` have passed.
pub struct Counted<R> {
    inner: R,
    counter: Arc<AtomicU64>,
    read: u64,
    limit: u64,
    nar_size: u64,
}

impl<R> Counted<R> {
    /// Counts into `counter`; fails past `compressed_limit(nar_size)`.
    pub fn new(inner: R, counter: Arc<AtomicU64>, nar_size: u64) -> Self {
        Counted {
            inner,
            counter,
            read: 0,
            limit: compressed_limit(nar_size),
            nar_size,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        self.read += n;
        self.counter.fetch_add(n, Ordering::Relaxed);
        if self.read > self.limit {
            // A read that fails hands out nothing.
            buf.set_filled(before);
            let (limit, nar_size) = (self.limit, self.nar_size);
            return Poll::Ready(Err(
                StreamError::CompressedTooLong { limit, nar_size }.into_io()
            ));
        }
        Poll::Ready(Ok(()))
    }
}

/// Decompresses `compressed` as `compression`, tagging decoder failures.
/// Must only be called when [`Compression::supported`] says so.
pub fn decompress<R>(compressed: R, compression: Compression) -> Decompressed
where
    R: AsyncRead + Send + 'static,
{
    let decoder = lazystore_pathinfo::decompress::decompress(compressed, compression)
        .expect("callers check `Compression::supported` first");
    if compression == Compression::None {
        return decoder;
    }
    Box::pin(Tagged {
        inner: decoder,
        compression,
    })
}

/// Tags a decoder's own errors as [`StreamError::Decompress`], passing
/// through errors that already carry a [`StreamError`] from below.
struct Tagged {
    inner: Decompressed,
    compression: Compression,
}

impl AsyncRead for Tagged {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match ready!(self.inner.as_mut().poll_read(cx, buf)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) if StreamError::find(&e).is_some() => Poll::Ready(Err(e)),
            Err(source) => Poll::Ready(Err(StreamError::Decompress {
                compression: self.compression,
                source,
            }
            .into_io())),
        }
    }
}

/// Passes through exactly the first `nar_size` bytes and fails on byte
/// `nar_size + 1`, never asking the inner reader for more than that one
/// byte past the limit: a decompression bomb costs NarSize + 1 bytes of
/// output, whatever it would expand to.
pub struct Bounded<R> {
    inner: R,
    nar_size: u64,
    /// Bytes passed through so far; never more than `nar_size`.
    read: u64,
    /// Byte `nar_size + 1` has been seen; every later read fails.
    overflowed: bool,
    /// Counter for progress reporting.
    progress: Arc<AtomicU64>,
}

impl<R> Bounded<R> {
    /// Bounds `inner` at `nar_size`, adding each byte passed to `progress`.
    pub fn new(inner: R, nar_size: u64, progress: Arc<AtomicU64>) -> Self {
        Bounded {
            inner,
            nar_size,
            read: 0,
            overflowed: false,
            progress,
        }
    }

    fn too_long(&self) -> io::Error {
        StreamError::TooLong {
            nar_size: self.nar_size,
        }
        .into_io()
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Bounded<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.overflowed {
            return Poll::Ready(Err(self.too_long()));
        }
        // One byte more than allowed, so that an overlong stream shows.
        let allowed = self.nar_size - self.read + 1;
        let room = buf
            .remaining()
            .min(usize::try_from(allowed).unwrap_or(usize::MAX));
        let mut limited = buf.take(room);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut limited))?;
        let mut n = limited.filled().len();
        if n as u64 == allowed {
            // Hand out the bytes within the limit; the next read fails.
            self.overflowed = true;
            n -= 1;
            if n == 0 {
                return Poll::Ready(Err(self.too_long()));
            }
        }
        // SAFETY: `limited` is a view of `buf`'s unfilled part, and the
        // inner reader initialised and filled its first `n` bytes (or more).
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        self.read += n as u64;
        self.progress.fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

/// Bytes of decompressed NAR handed from the decompressing thread to the
/// hashing task and from it to the ingesting one at a time, and how many
/// such blocks may wait at each hand-off: 2 MiB per download.
const PIPE_BLOCK: usize = 256 * 1024;
const PIPE_DEPTH: usize = 4;

/// Runs `reader` (download and decompression) on a thread of its own and
/// SHA-256-hashes its output in a task of its own, and returns a reader of
/// the output that knows its NarSize and NarHash at the end
/// ([`HashedNar`]). Decompression, hashing and ingest (parsing, chunking)
/// then run on different cores, and the decoder (xz: the limit of an
/// import) never waits behind other tasks on a runtime worker. Errors pass
/// through as they are; dropping the returned reader stops both.
pub fn pipelined<R>(mut reader: R) -> Pipelined
where
    R: AsyncRead + Send + Unpin + 'static,
{
    let (tx, mut decoded) = tokio::sync::mpsc::channel::<io::Result<bytes::Bytes>>(PIPE_DEPTH);
    let decode = async move {
        loop {
            let mut block = bytes::BytesMut::with_capacity(PIPE_BLOCK);
            let item = match reader.read_buf(&mut block).await {
                Ok(0) => return,
                Ok(_) => Ok(block.freeze()),
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    };
    let runtime = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("nar-decoder".into())
        .spawn(move || runtime.block_on(decode));
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<bytes::Bytes>>(PIPE_DEPTH);
    let digest = Arc::new(std::sync::Mutex::new(None));
    let result = digest.clone();
    if let Err(e) = spawned {
        // No thread to decode on: the reader fails at once.
        let _ = tx.try_send(Err(e));
    } else {
        tokio::spawn(async move {
            let mut hasher = NarDigest::new();
            while let Some(item) = decoded.recv().await {
                if let Ok(block) = &item {
                    hasher.update(block);
                }
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
            // Set before `tx` is dropped, so the reader sees the end of the
            // stream only after the digest is in place.
            *result.lock().expect("lock poisoned") = Some(hasher.finish());
        });
    }
    Pipelined {
        inner: tokio_util::io::StreamReader::new(receiver_stream(rx)),
        digest,
    }
}

/// The reading end of [`pipelined`].
pub struct Pipelined {
    inner: tokio_util::io::StreamReader<
        Pin<Box<dyn futures::Stream<Item = io::Result<bytes::Bytes>> + Send>>,
        bytes::Bytes,
    >,
    /// NarSize and NarHash, set by the hashing task once the stream ended.
    digest: Arc<std::sync::Mutex<Option<SizeAndHash>>>,
}

/// A NAR's size and SHA-256.
type SizeAndHash = (u64, [u8; 32]);

impl AsyncRead for Pipelined {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl HashedNar for Pipelined {
    fn finish(self) -> (u64, [u8; 32]) {
        // Only absent if the stream did not end as it should; a size no NAR
        // has then fails the NarSize check.
        self.digest
            .lock()
            .expect("lock poisoned")
            .take()
            .unwrap_or((u64::MAX, [0; 32]))
    }
}

/// The receiving end of a pipe as a `Stream`.
fn receiver_stream<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> Pin<Box<dyn futures::Stream<Item = T> + Send>> {
    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endless stream of zeros that counts what it hands out.
    struct Zeros(Arc<AtomicU64>);

    impl AsyncRead for Zeros {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = buf.remaining();
            buf.put_slice(&vec![0; n]);
            self.0.fetch_add(n as u64, Ordering::Relaxed);
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn bounded_stops_at_nar_size_plus_one() {
        for nar_size in [1u64, 7, 8, 4096, 1 << 20] {
            let produced = Arc::new(AtomicU64::new(0));
            let progress = Arc::new(AtomicU64::new(0));
            let mut r = Bounded::new(Zeros(produced.clone()), nar_size, progress.clone());
            let mut out = Vec::new();
            let err = r.read_to_end(&mut out).await.unwrap_err();
            assert_eq!(out.len() as u64, nar_size);
            assert_eq!(progress.load(Ordering::Relaxed), nar_size);
            // The inner reader was never asked for more than one byte past.
            assert_eq!(produced.load(Ordering::Relaxed), nar_size + 1);
            assert!(matches!(
                StreamError::find(&err),
                Some(StreamError::TooLong { nar_size: n }) if *n == nar_size
            ));
        }
    }

    #[tokio::test]
    async fn bounded_passes_exact_length() {
        let data = vec![5u8; 1000];
        let progress = Arc::new(AtomicU64::new(0));
        let mut r = Bounded::new(&data[..], 1000, progress);
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, data);
        // Shorter is not this reader's business: the NAR reader and the
        // NarSize check see it.
        let mut r = Bounded::new(&data[..], 2000, Arc::new(AtomicU64::new(0)));
        out.clear();
        r.read_to_end(&mut out).await.unwrap();
        assert_eq!(out.len(), 1000);
    }

    #[tokio::test]
    async fn counted_limits_compressed_bytes() {
        let counter = Arc::new(AtomicU64::new(0));
        let mut r = Counted::new(Zeros(Arc::new(AtomicU64::new(0))), counter.clone(), 10);
        let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(matches!(
            StreamError::find(&err),
            Some(StreamError::CompressedTooLong { nar_size: 10, .. })
        ));
        assert!(counter.load(Ordering::Relaxed) > compressed_limit(10));
    }

    #[tokio::test]
    async fn pipelined_passes_bytes_and_errors() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        pipelined(std::io::Cursor::new(data.clone()))
            .read_to_end(&mut out)
            .await
            .unwrap();
        assert_eq!(out, data);

        let bounded = Bounded::new(
            Zeros(Arc::new(AtomicU64::new(0))),
            1 << 20,
            Arc::new(AtomicU64::new(0)),
        );
        let mut out = Vec::new();
        let err = pipelined(bounded).read_to_end(&mut out).await.unwrap_err();
        assert_eq!(out.len(), 1 << 20);
        assert!(matches!(
            StreamError::find(&err),
            Some(StreamError::TooLong { .. })
        ));
    }

    #[tokio::test]
    async fn decoder_errors_are_tagged() {
        let garbage: &'static [u8] = b"definitely not xz";
        let mut r = decompress(garbage, Compression::Xz);
        let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(matches!(
            StreamError::find(&err),
            Some(StreamError::Decompress {
                compression: Compression::Xz,
                ..
            })
        ));
    }
}
