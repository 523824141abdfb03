//! Response bodies: a rendering task writes into a [`ChannelWriter`] and
//! the response streams what it sends ([`streamed`]); [`Tracked`] wraps
//! every response to hold its request slot until the body is sent and to
//! write the access log line when it ends.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::PollSender;

/// Blocks of body waiting between a rendering task and the connection: a
/// few, so rendering runs ahead of the socket without buffering a NAR.
const BODY_QUEUE: usize = 16;

type Item = Result<Bytes, io::Error>;

/// An [`AsyncWrite`] whose writes become blocks of a response body.
pub struct ChannelWriter {
    sender: PollSender<Item>,
}

impl AsyncWrite for ChannelWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if ready!(self.sender.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(client_gone()));
        }
        self.sender
            .send_item(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| client_gone())?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn client_gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the client went away")
}

/// A body fed by `render`, run in a task of its own with a writer into the
/// body. If it fails, the body ends in an error, so the client sees a
/// broken response (never a short one that looks complete), and the error
/// is logged with `what`.
pub fn streamed<F, Fut>(what: String, render: F) -> Body
where
    F: FnOnce(ChannelWriter) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Send,
{
    let (sender, receiver) = mpsc::channel::<Item>(BODY_QUEUE);
    let errors = sender.clone();
    tokio::spawn(async move {
        let writer = ChannelWriter {
            sender: PollSender::new(sender),
        };
        if let Err(e) = render(writer).await {
            let text = lazystore_castore::error_chain(&*e);
            if !text.contains("the client went away") {
                tracing::error!(target: "lazystore::http", "{what}: {text}");
            }
            let _ = errors
                .send(Err(io::Error::other(format!("{what}: {text}"))))
                .await;
        }
    });
    Body::from_stream(ReceiverStream::new(receiver))
}

/// What the access log line says about a request, kept until its body
/// ends.
pub struct LogLine {
    /// The client's address, when the server knows it.
    pub client: Option<std::net::SocketAddr>,
    pub method: Method,
    pub path: String,
    pub range: Option<String>,
    pub status: StatusCode,
    /// Content-Length, when the response has one: a body that sent all of
    /// it is complete even if the connection never polled its end.
    pub length: Option<u64>,
    pub start: Instant,
}

/// A response body that holds its request's slot and counts what it sends;
/// it writes the access log line when the body ends or is dropped.
pub struct Tracked {
    inner: Body,
    _permit: OwnedSemaphorePermit,
    sent: u64,
    failed: bool,
    log: Option<LogLine>,
}

impl Tracked {
    pub fn new(inner: Body, permit: OwnedSemaphorePermit, log: LogLine) -> Tracked {
        Tracked {
            inner,
            _permit: permit,
            sent: 0,
            failed: false,
            log: Some(log),
        }
    }

    fn finish(&mut self, complete: bool) {
        let Some(line) = self.log.take() else {
            return;
        };
        let complete = complete
            || line.method == Method::HEAD
            || line.length.is_some_and(|length| length == self.sent);
        let outcome = match (complete, self.failed) {
            (_, true) => "failed",
            (true, false) => "done",
            (false, false) => "aborted",
        };
        tracing::info!(
            target: "lazystore::http",
            client = %line.client.map_or("-".to_owned(), |a| a.to_string()),
            method = %line.method,
            path = %line.path,
            range = line.range.as_deref().unwrap_or("-"),
            status = line.status.as_u16(),
            bytes = self.sent,
            ms = line.start.elapsed().as_millis() as u64,
            outcome,
            "request"
        );
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
            }
            Some(Err(_)) => {
                self.failed = true;
                self.finish(false);
            }
            None => self.finish(true),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let complete = http_body::Body::is_end_stream(&self.inner);
        self.finish(complete);
    }
}
