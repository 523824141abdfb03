//! Connections whose client stops reading: [`IdleListener`] accepts TCP
//! connections as [`IdleWrite`]s, whose writes fail once the socket has
//! taken nothing for the send timeout. The connection is then closed, its
//! response body dropped, and the request's slot freed; without this, a
//! few clients that ask for NARs and never read would hold every slot.
//!
//! With TLS, the listener also runs each connection's handshake, in a task
//! of its own so a slow client holds up no other, within
//! [`TLS_HANDSHAKE_TIMEOUT`]: a client that connects and sends nothing is
//! dropped then. A failed handshake (a cleartext client, an untrusted
//! certificate on the client's side) is logged and the server goes on.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

/// How long a client may take to complete its TLS handshake, from the
/// moment its connection is accepted: a few round trips take well under a
/// second; ten leaves room for a slow link and a loaded server.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes run at once; while this many are in progress no new
/// connection is accepted (they wait in the kernel's accept queue), so
/// clients that connect and stall can't make the server hold an unbounded
/// number of them. Each lasts at most [`TLS_HANDSHAKE_TIMEOUT`].
const MAX_HANDSHAKES: usize = 256;

/// A connection: cleartext, or TLS over TCP.
pub type Stream = Either<TcpStream, TlsStream<TcpStream>>;

/// A finished handshake: the connection and its client's address, or why
/// it failed.
type Handshake = (io::Result<TlsStream<TcpStream>>, SocketAddr);

/// A [`TcpListener`] whose connections are [`IdleWrite`]s, through TLS if
/// it has an acceptor.
pub struct IdleListener {
    inner: TcpListener,
    send_timeout: Duration,
    tls: Option<TlsAcceptor>,
    /// Handshakes in progress; dropped (and so cancelled) with the
    /// listener when the server stops accepting.
    handshakes: JoinSet<Handshake>,
}

impl IdleListener {
    /// Accepts on `inner`, closing connections whose client reads nothing
    /// for `send_timeout`, speaking TLS with `tls` if given.
    pub fn new(inner: TcpListener, send_timeout: Duration, tls: Option<TlsAcceptor>) -> Self {
        IdleListener {
            inner,
            send_timeout,
            tls,
            handshakes: JoinSet::new(),
        }
    }

    fn idle(&self, io: Stream) -> IdleWrite<Stream> {
        IdleWrite {
            inner: io,
            timeout: self.send_timeout,
            stalled: None,
        }
    }
}

impl axum::serve::Listener for IdleListener {
    type Io = IdleWrite<Stream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let Some(acceptor) = self.tls.clone() else {
            let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            return (self.idle(Either::Left(io)), addr);
        };
        loop {
            let room = self.handshakes.len() < MAX_HANDSHAKES;
            tokio::select! {
                // Both branches are cancel safe: accepting (tokio's is, and
                // axum's retries only sleep) and joining.
                (io, addr) = axum::serve::Listener::accept(&mut self.inner), if room => {
                    let acceptor = acceptor.clone();
                    self.handshakes.spawn(async move {
                        let handshake = acceptor.accept(io);
                        let done = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
                            Ok(done) => done,
                            Err(_) => Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!("no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:?}"),
                            )),
                        };
                        (done, addr)
                    });
                }
                Some(joined) = self.handshakes.join_next() => match joined {
                    Ok((Ok(tls), addr)) => return (self.idle(Either::Right(tls)), addr),
                    Ok((Err(e), addr)) => tracing::debug!(
                        target: "lazystore::http",
                        client = %addr,
                        "TLS handshake failed: {e}"
                    ),
                    Err(e) => tracing::warn!("a TLS handshake task failed: {e}"),
                },
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The address a request's connection came from, for the access log.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, IdleListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, IdleListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

/// A connection whose writes fail with `TimedOut` once none has made
/// progress for `timeout`.
pub struct IdleWrite<T> {
    inner: T,
    timeout: Duration,
    /// Armed when a write is first refused (the client is not reading),
    /// disarmed by any write that goes through.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> IdleWrite<T> {
    /// After a write that could not proceed: `Pending` until the timeout
    /// runs out, then the error that closes the connection.
    fn stalled<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let timeout = self.timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                tracing::info!(
                    target: "lazystore::http",
                    "the client read nothing for {timeout:?}: closing its connection"
                );
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client read nothing for {timeout:?}"),
                )))
            }
        }
    }

    fn progressed<R>(
        &mut self,
        result: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        match result {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.stalled(cx),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleWrite<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleWrite<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progressed(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progressed(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.progressed(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
