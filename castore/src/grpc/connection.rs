//! [`Connection`]: one lazily connected HTTP/2 channel to a gRPC store
//! (cleartext, TLS or a Unix socket), the retry policy for calls over it,
//! how long one attempt may wait, and the token every call carries. The
//! blob and directory clients (and any other service's client on the same
//! server) share one.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::call::{AttemptError, AttemptTimeout, CallError, Outage, Retry};
use crate::auth::{AUTHORIZATION, Token, bearer_value};
use crate::retry::RetryPolicy;
use crate::tls::{self, CaCerts};

/// How long to wait for a TCP connection to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 pings on a busy connection, so a server that vanished without
/// closing it (power loss, network partition) is noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A store URL that is not a gRPC address this client can use.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid gRPC store URL {url:?}: {reason} (expected grpc+http://HOST:PORT, \
     grpc+https://HOST:PORT or grpc+unix:///PATH)"
)]
pub struct InvalidUrl {
    /// The URL given.
    pub url: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A server that did not answer a health check in time
/// ([`Connection::probe`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "no lazystore serve answers at {url} (waited {waited:?}: {last}); {}",
    hint.unwrap_or("is it running and listening there?")
)]
pub struct Unreachable {
    /// The URL asked.
    pub url: String,
    /// How long it was asked.
    pub waited: Duration,
    /// The last failure, with its causes.
    pub last: String,
    /// What the failure suggests, when TLS explains it: a certificate the
    /// client does not trust, or cleartext and TLS meeting.
    pub hint: Option<&'static str>,
}

/// The channel every client of a [`Connection`] calls through: each call
/// carries the connection's token, if it has one.
pub type AuthChannel = InterceptedService<Channel, SendToken>;

/// Adds `authorization: Bearer TOKEN` to every call (nothing without a
/// token). The value is marked sensitive, so it is not logged.
#[derive(Clone, Debug, Default)]
pub struct SendToken(Option<AsciiMetadataValue>);

impl SendToken {
    fn new(token: Option<&Token>) -> SendToken {
        SendToken(token.map(|token| {
            // A token is printable ASCII (`Token` checks it when read), so
            // this parses.
            let mut value: AsciiMetadataValue =
                MetadataValue::try_from(bearer_value(token)).expect("a token is printable ASCII");
            value.set_sensitive(true);
            value
        }))
    }
}

impl Interceptor for SendToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

/// A lazily connected channel to a gRPC store, with the retry policy and
/// attempt timeout its clients use and the token their calls carry. Cheap
/// to clone; clones share the HTTP/2 connection.
#[derive(Clone, Debug)]
pub struct Connection {
    channel: Channel,
    url: Arc<str>,
    retry: RetryPolicy,
    timeout: AttemptTimeout,
    /// Whether the server is answering, shared by every call on it.
    outage: Arc<Outage>,
    token: SendToken,
    /// Whether the channel speaks TLS (`grpc+https://`), for hints.
    tls: bool,
}

impl Connection {
    /// A channel to `url`, connected on first use (and reconnected after the
    /// server restarts). `url` is one of
    ///
    /// - `grpc+http://HOST:PORT` (or plain `http://HOST:PORT`): TCP,
    ///   cleartext HTTP/2;
    /// - `grpc+https://HOST:PORT`: TCP, HTTP/2 over TLS, the server's
    ///   certificate checked against the system's CA certificates;
    /// - `grpc+unix:///PATH`: a Unix socket at the absolute `PATH`.
    ///
    /// Must be called within a Tokio runtime: the channel's worker task is
    /// spawned here.
    pub fn lazy(url: &str) -> Result<Self, InvalidUrl> {
        Connection::lazy_with_ca(url, None)
    }

    /// [`Connection::lazy`], a `grpc+https://` server's certificate also
    /// trusted if `ca` signed it (other schemes ignore `ca`).
    pub fn lazy_with_ca(url: &str, ca: Option<&CaCerts>) -> Result<Self, InvalidUrl> {
        let invalid = |reason| InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let mut tls = false;
        let endpoint = if let Some(path) = url.strip_prefix("grpc+unix://") {
            if !path.starts_with('/') || path.len() < 2 {
                return Err(invalid("the socket path must be absolute"));
            }
            Endpoint::from_shared(format!("unix://{path}"))
                .map_err(|_| invalid("bad socket path"))?
        } else {
            let (scheme, rest) = if let Some(rest) = url.strip_prefix("grpc+https://") {
                tls = true;
                ("https", rest)
            } else {
                let rest = url
                    .strip_prefix("grpc+http://")
                    .or_else(|| url.strip_prefix("http://"))
                    .ok_or_else(|| invalid("unsupported scheme"))?;
                ("http", rest)
            };
            let uri: tonic::codegen::http::Uri = format!("{scheme}://{rest}")
                .parse()
                .map_err(|_| invalid("not a URL"))?;
            if uri.host().is_none_or(str::is_empty) {
                return Err(invalid("no host"));
            }
            if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
                return Err(invalid("a gRPC store URL has no path or query"));
            }
            let endpoint = Endpoint::from(uri).connect_timeout(CONNECT_TIMEOUT);
            if tls {
                // The server name checked is the URL's host (an IP address
                // must be among the certificate's IP addresses).
                let config = tls::client_config(ca).map_err(invalid)?;
                endpoint
                    .tls_config(config)
                    .map_err(|_| invalid("cannot set up TLS for this host"))?
            } else {
                endpoint
            }
        };
        // Fixed, large windows, as the server's (`grpc::serve`): h2 closes
        // a connection whose buffered small DATA frames pass half its
        // connection window. With an adaptive window (64 KiB at first) the
        // replies to a few hundred concurrent small Puts, waiting for busy
        // tasks to read them, were enough.
        let channel = endpoint
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .http2_adaptive_window(false)
            .initial_connection_window_size(super::serve::CONNECTION_WINDOW)
            .initial_stream_window_size(super::serve::STREAM_WINDOW)
            .connect_lazy();
        Ok(Connection {
            channel,
            url: url.into(),
            retry: RetryPolicy::default(),
            timeout: AttemptTimeout::default(),
            outage: Arc::default(),
            token: SendToken::default(),
            tls,
        })
    }

    /// The same channel, every call carrying `token` (as
    /// `authorization: Bearer TOKEN`), or none. A server that wants a
    /// token refuses calls without the right one with `UNAUTHENTICATED`,
    /// which is not retried.
    pub fn with_token(mut self, token: Option<&Token>) -> Self {
        self.token = SendToken::new(token);
        self
    }

    /// The same channel with another retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The same channel with another limit on one attempt's wait for the
    /// server.
    pub fn with_attempt_timeout(mut self, limit: Duration) -> Self {
        self.timeout = AttemptTimeout { limit };
        self
    }

    /// The channel, for building clients of other services on this
    /// server; their calls carry the token.
    pub fn channel(&self) -> AuthChannel {
        InterceptedService::new(self.channel.clone(), self.token.clone())
    }

    /// The URL it was made from, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How calls are retried.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// How long one attempt may wait for the server: every attempt awaits
    /// the server through it.
    pub fn attempt_timeout(&self) -> AttemptTimeout {
        self.timeout
    }

    /// Outages of this server seen so far: spells of transient failures,
    /// each logged when it begins and when a call succeeds again.
    pub fn outages(&self) -> u64 {
        self.outage.count()
    }

    /// Calls that gave up at their deadline during those outages: what
    /// the outages cost the callers.
    pub fn outage_failed_calls(&self) -> u64 {
        self.outage.failed_calls()
    }

    /// Asks the server's health service until it answers that it is
    /// serving, or `wait` has passed: a client that must not start against
    /// a dead address (a mount) learns so in seconds, not after its first
    /// call's retry deadline. Attempts are a connect timeout apart at most.
    pub async fn probe(&self, wait: Duration) -> Result<(), Unreachable> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let started = std::time::Instant::now();
        let mut client = HealthClient::new(self.channel.clone());
        let mut pause = Duration::from_millis(50);
        loop {
            let asked = client.check(HealthCheckRequest {
                service: String::new(),
            });
            let last = match tokio::time::timeout(CONNECT_TIMEOUT, asked).await {
                Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving => return Ok(()),
                Ok(Ok(r)) => format!("it reports {:?}", r.get_ref().status()),
                Ok(Err(status)) => crate::error_chain(&status),
                Err(_) => format!("no answer within {CONNECT_TIMEOUT:?}"),
            };
            let waited = started.elapsed();
            // Asking again will not make an untrusted certificate trusted.
            if waited + pause > wait || tls::untrusted(&last) {
                return Err(Unreachable {
                    url: self.url.to_string(),
                    waited,
                    hint: tls::hint(&last, self.tls),
                    last,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Retry state for one call, for calls that keep state across attempts.
    pub(crate) fn retry(&self, call: &'static str) -> Retry {
        Retry::new(self.retry, self.url.clone(), call, self.outage.clone())
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retry
    /// deadline passes. Only for idempotent calls. Each attempt should await
    /// the server through [`AttemptTimeout::timed`], so a server that stops
    /// answering fails the attempt instead of hanging the call.
    pub async fn call<T, F, Fut>(&self, call: &'static str, mut attempt: F) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        let mut retry = self.retry(call);
        loop {
            match attempt().await {
                Ok(v) => {
                    retry.succeeded();
                    return Ok(v);
                }
                Err(e) => retry.failed(e).await?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls() {
        for good in [
            "grpc+http://127.0.0.1:8000",
            "grpc+http://localhost:8000/",
            "http://[::1]:8000",
            "grpc+unix:///run/lazystore.sock",
            "grpc+https://localhost:8000",
            "grpc+https://127.0.0.1:8000",
        ] {
            assert!(Connection::lazy(good).is_ok(), "{good}");
        }
        for bad in [
            "grpcs://host:1",
            "redb:///x",
            "grpc+http://",
            "grpc+http://host:1/path",
            "grpc+unix://relative.sock",
            "grpc+unix:///",
        ] {
            assert!(Connection::lazy(bad).is_err(), "{bad}");
        }
    }
}
