//! gRPC's part of retrying idempotent calls: which statuses are transient
//! (server unreachable, connection dropped, no answer in time), the
//! per-attempt [`AttemptTimeout`], and how a call that failed is reported
//! ([`CallError`]). When to try again and how long to wait is the shared
//! [`RetryPolicy`]'s, through [`Backoff`].
//!
//! Every call the clients make is idempotent, so every call is retried:
//! reads trivially, and writes because the store is content-addressed (a
//! chunk, chunk list or directory stored twice is stored once).

use std::error::Error as _;
use std::future::Future;
use std::time::Duration;

use tonic::{Code, Status};

use super::wire::BadMessage;
use crate::retry::{Backoff, ErrorClass, RetryPolicy, Retryable};

/// How long one attempt of a gRPC call may wait for the server: the
/// transport-only part of retrying, which [`RetryPolicy`] (shared with
/// clients of other transports) does not know about. A server that stops
/// answering then fails the attempt instead of hanging the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptTimeout {
    /// Longest wait, within one attempt, for the server's answer or its next
    /// streamed message (uploads get one more second per MiB sent). When it
    /// passes, the attempt fails with `DEADLINE_EXCEEDED` and is retried.
    pub limit: Duration,
}

impl Default for AttemptTimeout {
    /// 10 s per answer.
    fn default() -> Self {
        AttemptTimeout {
            limit: Duration::from_secs(10),
        }
    }
}

impl AttemptTimeout {
    /// Awaits one step of an attempt (an answer, or the next message of a
    /// stream), failing it with `DEADLINE_EXCEEDED` after `limit`.
    pub async fn timed<T>(
        &self,
        step: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        self.timed_for(self.limit, step).await
    }

    /// Like [`timed`](Self::timed) for an upload of `bytes`: large uploads
    /// are allowed one more second per MiB.
    pub(crate) async fn timed_upload<T>(
        &self,
        bytes: usize,
        step: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let extra = Duration::from_secs((bytes >> 20) as u64);
        self.timed_for(self.limit + extra, step).await
    }

    async fn timed_for<T>(
        &self,
        limit: Duration,
        step: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(limit, step).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer from the server within {limit:?}"
            ))),
        }
    }
}

/// Why one attempt of a call failed (see [`Connection::call`]).
///
/// [`Connection::call`]: super::Connection::call
#[derive(Debug)]
pub enum AttemptError {
    /// The call failed; retried if the status is transient.
    Status(Status),
    /// The server answered something the protocol does not allow; not
    /// retried.
    BadReply(BadMessage),
}

impl From<Status> for AttemptError {
    fn from(s: Status) -> Self {
        AttemptError::Status(s)
    }
}

impl From<BadMessage> for AttemptError {
    fn from(b: BadMessage) -> Self {
        AttemptError::BadReply(b)
    }
}

/// Why a call failed, after any retries; turned into the store's errors in
/// `status.rs`, or by a client of another service (such as PathInfo) into
/// its own, from [`CallError::rejection`] and [`CallError::into_grpc_error`].
#[derive(Debug)]
pub struct CallError {
    /// The RPC, for messages.
    pub(crate) call: &'static str,
    /// What went wrong.
    pub(crate) failure: Failure,
}

impl CallError {
    /// The status code the server refused the call with, if it did.
    pub fn code(&self) -> Option<tonic::Code> {
        match &self.failure {
            Failure::Rejected(status) => Some(status.code()),
            _ => None,
        }
    }

    /// An answer found invalid after the call itself succeeded.
    pub fn bad_reply(call: &'static str, b: BadMessage) -> Self {
        CallError {
            call,
            failure: Failure::BadReply(b),
        }
    }

    /// A failure that is not retried: a streamed answer broken off part
    /// way, which the caller can't resume.
    pub fn not_retried(call: &'static str, error: AttemptError) -> Self {
        let failure = match error {
            AttemptError::Status(s) => Failure::Rejected(s),
            AttemptError::BadReply(b) => Failure::BadReply(b),
        };
        CallError { call, failure }
    }

    /// The RPC that failed.
    pub fn call(&self) -> &'static str {
        self.call
    }

    /// The status the server refused the call with, if it did (rather than
    /// staying unreachable or answering nonsense): its code and metadata say
    /// which of the service's errors it was.
    pub fn rejection(&self) -> Option<&Status> {
        match &self.failure {
            Failure::Rejected(status) => Some(status),
            Failure::GaveUp { .. } | Failure::BadReply(_) => None,
        }
    }
}

#[derive(Debug)]
pub(crate) enum Failure {
    /// The server refused, for a reason retrying would not change.
    Rejected(Status),
    /// Transient failures until the deadline.
    GaveUp {
        attempts: u32,
        elapsed: Duration,
        last: Status,
    },
    /// The server's answer broke the protocol.
    BadReply(BadMessage),
}

/// The retry state of one call: the call's [`Backoff`], and what to name in
/// messages and errors.
pub(crate) struct Retry {
    backoff: Backoff,
    url: std::sync::Arc<str>,
    call: &'static str,
    outage: std::sync::Arc<Outage>,
}

/// Whether a server is failing its calls transiently: an outage is logged
/// once when it begins and once when a call succeeds again (with what it
/// cost), not once per retried call.
#[derive(Debug, Default)]
pub(crate) struct Outage {
    // A std Mutex: a few field updates per failed or first successful
    // call, no await.
    state: std::sync::Mutex<Option<Spell>>,
    /// Whether `state` holds a spell, so a successful call (every call,
    /// mostly) takes no lock when there is no outage to end.
    ongoing: std::sync::atomic::AtomicBool,
    count: std::sync::atomic::AtomicU64,
    /// Calls that gave up at their deadline during an outage, over all.
    failed: std::sync::atomic::AtomicU64,
    /// Wakes the calls waiting to retry when one gets through: the server
    /// is back, and a call asleep in its backoff (up to its longest wait)
    /// would otherwise miss a short window in which it answers.
    back: tokio::sync::Notify,
}

/// One outage in progress.
#[derive(Debug)]
struct Spell {
    since: std::time::Instant,
    retried: u64,
    failed: u64,
}

impl Outage {
    /// A call failed transiently and is retried.
    fn retried(&self, url: &str, call: &str, status: &Status) {
        let mut state = self.state.lock().expect("outage state poisoned");
        let spell = state.get_or_insert_with(|| {
            self.count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.ongoing
                .store(true, std::sync::atomic::Ordering::Release);
            tracing::warn!(
                "{url}: not answering ({call}: {:?}, {}); retrying",
                status.code(),
                status.message()
            );
            Spell {
                since: std::time::Instant::now(),
                retried: 0,
                failed: 0,
            }
        });
        spell.retried += 1;
    }

    /// A call gave up at its deadline during an outage.
    fn gave_up(&self) {
        if let Some(spell) = self.state.lock().expect("outage state poisoned").as_mut() {
            spell.failed += 1;
            self.failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A call succeeded: ends the outage, if one is in progress.
    fn answered(&self, url: &str) {
        if !self.ongoing.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let ended = {
            let mut state = self.state.lock().expect("outage state poisoned");
            self.ongoing
                .store(false, std::sync::atomic::Ordering::Release);
            state.take()
        };
        if let Some(spell) = ended {
            self.back.notify_waiters();
            tracing::warn!(
                "{url}: answering again after {:.1?} ({} retries, {} calls failed)",
                spell.since.elapsed(),
                spell.retried,
                spell.failed
            );
        }
    }

    /// Outages begun so far.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Calls that gave up during outages so far.
    pub(crate) fn failed_calls(&self) -> u64 {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Retry {
    pub(crate) fn new(
        policy: RetryPolicy,
        url: std::sync::Arc<str>,
        call: &'static str,
        outage: std::sync::Arc<Outage>,
    ) -> Self {
        Retry {
            backoff: policy.backoff(),
            url,
            call,
            outage,
        }
    }

    /// After a failed attempt: waits (its backoff, or until another call
    /// to the server gets through) and returns `Ok` if another attempt
    /// should be made, or the error the call fails with.
    ///
    /// Only statuses are retried here, by their [`Retryable`] class; an
    /// answer that breaks the protocol fails the call at once, and the
    /// caller's own retries (which see it as corrupt) decide whether to ask
    /// again.
    pub(crate) async fn failed(&mut self, error: AttemptError) -> Result<(), CallError> {
        let status = match error {
            AttemptError::Status(s) => s,
            AttemptError::BadReply(b) => return Err(self.error(Failure::BadReply(b))),
        };
        let class = status.class();
        let Some(wait) = self.backoff.next(class) else {
            let failure = if class == ErrorClass::Permanent {
                Failure::Rejected(status)
            } else {
                self.outage.gave_up();
                Failure::GaveUp {
                    attempts: self.backoff.attempts(),
                    elapsed: self.backoff.elapsed(),
                    last: status,
                }
            };
            return Err(self.error(failure));
        };
        self.outage.retried(&self.url, self.call, &status);
        tracing::debug!(
            url = %self.url,
            call = self.call,
            attempt = self.backoff.attempts(),
            code = ?status.code(),
            message = status.message(),
            "transient failure, retrying in {wait:?}",
        );
        // Created before sleeping, so a call getting through at any time
        // from now on wakes it.
        let back = self.outage.back.notified();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = back => {}
        }
        Ok(())
    }

    /// After an attempt that succeeded: ends an outage of the server, if
    /// one is in progress. Every retried call says so, streams included,
    /// so an outage is seen to end by whichever call gets through first.
    pub(crate) fn succeeded(self) {
        self.outage.answered(&self.url);
    }

    fn error(&self, failure: Failure) -> CallError {
        CallError {
            call: self.call,
            failure,
        }
    }
}

impl Retryable for Status {
    /// [`Transient`](ErrorClass::Transient) if the server is unreachable
    /// or restarting, the connection broke, or no answer came in time; else
    /// [`Permanent`](ErrorClass::Permanent): a status the server chose to
    /// send is its final word, whatever its code.
    fn class(&self) -> ErrorClass {
        if is_transient(self) {
            ErrorClass::Transient
        } else {
            ErrorClass::Permanent
        }
    }
}

/// Whether a failed call may succeed if tried again: the server is
/// unreachable or restarting, the connection broke, or no answer came in
/// time. Errors the server chose to return are final.
pub(crate) fn is_transient(status: &Status) -> bool {
    match status.code() {
        // Asking again will not make an untrusted certificate trusted.
        Code::Unavailable => !crate::tls::untrusted(&crate::error_chain(status)),
        Code::Cancelled | Code::DeadlineExceeded => true,
        // A connection dropped mid-call surfaces as UNKNOWN or INTERNAL, with
        // the transport error as its source.
        Code::Unknown | Code::Internal => connection_broke(status),
        _ => false,
    }
}

fn connection_broke(status: &Status) -> bool {
    use std::io::ErrorKind;
    let mut source = status.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
                    | ErrorKind::NotConnected
                    | ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        source = e.source();
    }
    // hyper and h2 errors are not dependencies of this crate; recognise
    // them by their messages, the status's own and its sources'. A server
    // shutting down gracefully sends GOAWAY, which h2 reports as
    // "connection error received: not a result of an error".
    let mut messages = vec![status.message().to_ascii_lowercase()];
    let mut source = status.source();
    while let Some(e) = source {
        messages.push(e.to_string().to_ascii_lowercase());
        source = e.source();
    }
    const BROKEN: [&str; 8] = [
        "connection reset",
        "connection closed",
        "broken pipe",
        "error reading a body from connection",
        "connection error",
        "stream closed because of a broken pipe",
        "not a result of an error",
        "go away",
    ];
    messages
        .iter()
        .any(|message| BROKEN.iter().any(|m| message.contains(m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_begins_once_and_ends_with_the_first_success() {
        let outage = Outage::default();
        outage.answered("u");
        assert_eq!(outage.count(), 0);
        for _ in 0..3 {
            outage.retried("u", "Stat", &Status::unavailable("down"));
        }
        outage.gave_up();
        assert_eq!(outage.count(), 1);
        let spell = outage.state.lock().unwrap();
        assert!(matches!(
            *spell,
            Some(Spell {
                retried: 3,
                failed: 1,
                ..
            })
        ));
        drop(spell);
        outage.answered("u");
        assert!(outage.state.lock().unwrap().is_none());
        outage.retried("u", "Stat", &Status::unavailable("down again"));
        assert_eq!(outage.count(), 2);
    }

    #[test]
    fn classification() {
        assert!(is_transient(&Status::unavailable("tcp connect error")));
        assert!(is_transient(&Status::cancelled("")));
        assert!(is_transient(&Status::deadline_exceeded("")));
        assert!(is_transient(&Status::unknown(
            "error reading a body from connection"
        )));
        assert!(is_transient(&Status::internal(
            "h2 protocol error: connection error received: not a result of an error"
        )));
        let goaway = std::io::Error::other("connection error received: not a result of an error");
        assert!(is_transient(&Status::from_error(Box::new(goaway))));
        assert!(!is_transient(&Status::unknown("something else")));
        assert!(!is_transient(&Status::not_found("blob")));
        assert!(!is_transient(&Status::invalid_argument("digest")));
    }

    #[tokio::test]
    async fn a_call_getting_through_wakes_the_waiting_ones() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_secs(20),
            max_backoff: Duration::from_secs(20),
            deadline: Duration::from_secs(60),
            ..RetryPolicy::default()
        };
        let outage = std::sync::Arc::new(Outage::default());
        let url: std::sync::Arc<str> = "grpc+http://x".into();
        let waiting = {
            let (outage, url) = (outage.clone(), url.clone());
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let mut retry = Retry::new(policy, url, "ReadChunks", outage);
                retry
                    .failed(Status::unavailable("down").into())
                    .await
                    .unwrap();
                started.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        Retry::new(policy, url, "Stat", outage).succeeded();
        let waited = waiting.await.unwrap();
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            deadline: Duration::from_millis(200),
            ..RetryPolicy::default()
        };
        assert_eq!(Status::unavailable("down").class(), ErrorClass::Transient);
        assert_eq!(Status::data_loss("x").class(), ErrorClass::Permanent);
        let mut retry = Retry::new(policy, "grpc+http://x".into(), "Stat", Default::default());
        let mut attempts = 0;
        let err = loop {
            attempts += 1;
            match retry.failed(Status::unavailable("down").into()).await {
                Ok(()) => continue,
                Err(e) => break e,
            }
        };
        assert!(matches!(err.failure, Failure::GaveUp { .. }), "{err:?}");
        // 10 + 20 + 40 + 80 ms (at most), one wait cut to end at 200 ms and
        // the attempt there.
        assert!((6..=9).contains(&attempts), "{attempts} attempts");
        let err = Retry::new(policy, "u".into(), "Stat", Default::default())
            .failed(Status::not_found("x").into())
            .await
            .unwrap_err();
        assert!(matches!(err.failure, Failure::Rejected(_)));
    }
}
