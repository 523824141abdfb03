//! The one retry policy of the workspace: which failures are worth another
//! attempt ([`ErrorClass`], [`Retryable`]), how long to wait between
//! attempts and when to give up ([`RetryPolicy`], [`Backoff`]).
//!
//! Every retrying client uses it: the gRPC clients per call, the FUSE
//! frontend per store call made for a reader, the importer per download.
//! Each picks its own [`RetryPolicy`] values; how errors are classed lives
//! next to the errors ([`BlobError`], [`DirectoryError`], `tonic::Status`,
//! and the other crates' own).

use std::error::Error;
use std::future::Future;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use crate::grpc::GrpcError;
use crate::s3_config::S3Error;
use crate::{BlobError, DirectoryError};

/// How a failure is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The backend or the way to it failed (unreachable, overloaded, a
    /// connection dropped): retried with backoff until the deadline.
    Transient,
    /// Data failed verification, or an answer broke the protocol: retried a
    /// few times ([`RetryPolicy::corrupt_attempts`]), since another attempt
    /// (or another source behind a cache) may get it right while the same
    /// one twice rarely does.
    Corrupt,
    /// Retrying would not change anything: the thing is not there, the
    /// request is wrong, or this process is broken (a task panicked, a
    /// worker thread is gone).
    Permanent,
}

impl ErrorClass {
    /// The class of a backend failure (the source of a `Backend` variant):
    /// that of the first error in its source chain that knows its class (a
    /// [`GrpcError`], an [`S3Error`], or a store error wrapped by another
    /// store's backend),
    /// or else [`Transient`](ErrorClass::Transient): a database or I/O
    /// error may heal.
    pub fn of_backend(error: &(dyn Error + 'static)) -> ErrorClass {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(e) = e.downcast_ref::<GrpcError>() {
                return e.class();
            }
            if let Some(e) = e.downcast_ref::<BlobError>() {
                return e.class();
            }
            if let Some(e) = e.downcast_ref::<DirectoryError>() {
                return e.class();
            }
            if let Some(e) = e.downcast_ref::<S3Error>() {
                return e.class();
            }
            next = e.source();
        }
        ErrorClass::Transient
    }
}

/// An error that knows its [`ErrorClass`].
pub trait Retryable {
    /// How the failure should be retried.
    fn class(&self) -> ErrorClass;
}

/// How long and how often a failing call is retried.
///
/// Waits start at `initial_backoff` and double after every failure up to
/// `max_backoff`, each jittered to between half and all of itself so that
/// clients that failed together do not all come back at the same instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before the second attempt; it doubles after every failure.
    pub initial_backoff: Duration,
    /// Longest wait between two attempts.
    pub max_backoff: Duration,
    /// Attempts go on until this long after the first one started, the
    /// last starting at the deadline; none starts later. Zero: a single
    /// attempt; [`Duration::MAX`]: no deadline.
    pub deadline: Duration,
    /// Most attempts in all, the first included (`Some(1)`: no retries);
    /// `None`: only the deadline bounds them.
    pub max_attempts: Option<u32>,
    /// Attempts in all for failures of class [`ErrorClass::Corrupt`]; 1 or
    /// less: they are not retried.
    pub corrupt_attempts: u32,
}

impl Default for RetryPolicy {
    /// 50 ms doubling to 2 s, for up to 30 s, with no limit on the number of
    /// attempts; 3 attempts on corruption.
    fn default() -> Self {
        RetryPolicy {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            deadline: Duration::from_secs(30),
            max_attempts: None,
            corrupt_attempts: 3,
        }
    }
}

impl RetryPolicy {
    /// One attempt per call.
    pub fn no_retries() -> Self {
        RetryPolicy {
            max_attempts: Some(1),
            ..RetryPolicy::default()
        }
    }

    /// A fresh retry state for one call, its clock starting now.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(*self)
    }

    /// Runs `attempt` until it succeeds, fails with a
    /// [`Permanent`](ErrorClass::Permanent) error, or [`Backoff::next`]
    /// gives up; returns the last result. Before each wait `on_retry` gets
    /// the error, the number of attempts made so far and the wait, to log
    /// or count the retry.
    pub async fn run<T, E, F, Fut>(
        &self,
        mut attempt: F,
        mut on_retry: impl FnMut(&E, u32, Duration),
    ) -> Result<T, E>
    where
        E: Retryable,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut backoff = self.backoff();
        loop {
            let e = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let Some(wait) = backoff.next(e.class()) else {
                return Err(e);
            };
            on_retry(&e, backoff.attempts(), wait);
            tokio::time::sleep(wait).await;
        }
    }
}

/// The retry state of one call under a [`RetryPolicy`]: attempts so far,
/// the time since the first, and the next wait. For loops that do more
/// between attempts than [`RetryPolicy::run`] allows.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: RetryPolicy,
    started: Instant,
    /// Failed attempts so far.
    attempts: u32,
    /// Of which failed with [`ErrorClass::Corrupt`].
    corrupt: u32,
    /// The next wait before jitter.
    wait: Duration,
}

impl Backoff {
    /// The state before the first attempt; the deadline counts from now.
    pub fn new(policy: RetryPolicy) -> Self {
        Backoff {
            policy,
            started: Instant::now(),
            attempts: 0,
            corrupt: 0,
            wait: policy.initial_backoff,
        }
    }

    /// After an attempt failed with an error of `class`: how long to wait
    /// before the next attempt, or `None` to give up (a permanent failure,
    /// the attempts used up, or the deadline passed; the last wait ends at
    /// the deadline). Does not sleep.
    pub fn next(&mut self, class: ErrorClass) -> Option<Duration> {
        self.attempts = self.attempts.saturating_add(1);
        match class {
            ErrorClass::Permanent => return None,
            ErrorClass::Corrupt => {
                self.corrupt += 1;
                if self.corrupt >= self.policy.corrupt_attempts {
                    return None;
                }
            }
            ErrorClass::Transient => {}
        }
        if self
            .policy
            .max_attempts
            .is_some_and(|max| self.attempts >= max)
        {
            return None;
        }
        // The last wait is cut to end at the deadline, and one more
        // attempt starts there: a caller that gives up has waited out its
        // whole deadline (a server back just before it still answers),
        // and no attempt starts after it.
        let remaining = self.policy.deadline.saturating_sub(self.elapsed());
        if remaining.is_zero() {
            return None;
        }
        let wait = jitter(self.wait).min(remaining);
        self.wait = self.wait.saturating_mul(2).min(self.policy.max_backoff);
        Some(wait)
    }

    /// Attempts that failed so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Time since the state was made (before the first attempt).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Between half and all of `backoff`, so clients that failed together do
/// not all come back at the same instant.
fn jitter(backoff: Duration) -> Duration {
    // RandomState is seeded per process and per instance: enough randomness
    // for spreading retries, without a dependency.
    let r = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    let half = backoff / 2;
    half + half.mul_f64((r % 1024) as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(initial_ms: u64, max_ms: u64) -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_millis(initial_ms),
            max_backoff: Duration::from_millis(max_ms),
            deadline: Duration::MAX,
            max_attempts: None,
            corrupt_attempts: 3,
        }
    }

    /// Each wait is the doubled, capped backoff after jitter: between half
    /// of it and all of it.
    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = policy(100, 1000).backoff();
        for expected in [100, 200, 400, 800, 1000, 1000, 1000] {
            let wait = b.next(ErrorClass::Transient).unwrap().as_millis();
            assert!(
                (expected / 2..=expected).contains(&wait),
                "{wait} ms for {expected} ms"
            );
        }
        assert_eq!(b.attempts(), 7);
    }

    #[test]
    fn jitter_stays_between_half_and_all() {
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(100));
            assert!(j >= Duration::from_millis(50) && j <= Duration::from_millis(100));
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn max_attempts_stops() {
        let mut b = RetryPolicy {
            max_attempts: Some(3),
            ..policy(1, 1)
        }
        .backoff();
        assert!(b.next(ErrorClass::Transient).is_some());
        assert!(b.next(ErrorClass::Transient).is_some());
        assert_eq!(b.next(ErrorClass::Transient), None, "3 attempts made");
        let mut once = RetryPolicy::no_retries().backoff();
        assert_eq!(once.next(ErrorClass::Transient), None);
    }

    #[test]
    fn corrupt_attempts_stop_corruption_only() {
        let mut b = policy(1, 1).backoff();
        assert!(b.next(ErrorClass::Corrupt).is_some());
        // Transient failures in between neither count nor end the retries.
        for _ in 0..10 {
            assert!(b.next(ErrorClass::Transient).is_some());
        }
        assert!(b.next(ErrorClass::Corrupt).is_some());
        assert_eq!(b.next(ErrorClass::Corrupt), None, "the third corrupt one");
        let mut never = RetryPolicy {
            corrupt_attempts: 1,
            ..policy(1, 1)
        }
        .backoff();
        assert_eq!(never.next(ErrorClass::Corrupt), None);
    }

    #[test]
    fn permanent_failures_are_not_retried() {
        let mut b = policy(1, 1).backoff();
        assert_eq!(b.next(ErrorClass::Permanent), None);
        assert_eq!(b.attempts(), 1);
    }

    #[test]
    fn a_zero_deadline_allows_one_attempt() {
        let mut b = RetryPolicy {
            deadline: Duration::ZERO,
            ..policy(10, 10)
        }
        .backoff();
        assert_eq!(b.next(ErrorClass::Transient), None);
    }

    struct Failure(ErrorClass);

    impl Retryable for Failure {
        fn class(&self) -> ErrorClass {
            self.0
        }
    }

    #[tokio::test]
    async fn the_deadline_bounds_the_total() {
        let policy = RetryPolicy {
            deadline: Duration::from_millis(200),
            ..policy(10, 1000)
        };
        let started = Instant::now();
        let mut attempts = 0usize;
        let mut retries = Vec::new();
        let result: Result<(), Failure> = policy
            .run(
                || {
                    attempts += 1;
                    async { Err(Failure(ErrorClass::Transient)) }
                },
                |_, n, wait| retries.push((n, wait)),
            )
            .await;
        assert!(result.is_err());
        let elapsed = started.elapsed();
        // Waits of at most 10 + 20 + 40 + 80 ms, then one cut to end at
        // 200 ms, and the last attempt there; jitter may fit a few more of
        // the shorter ones.
        assert!((6..=9).contains(&attempts), "{attempts} attempts");
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(300), "{elapsed:?}");
        assert_eq!(retries.len(), attempts - 1);
        assert_eq!(retries[0].0, 1, "on_retry gets the attempts so far");
        let waited: Duration = retries.iter().map(|r| r.1).sum();
        assert!(waited <= Duration::from_millis(200), "{waited:?}");
    }

    #[tokio::test]
    async fn run_returns_at_the_first_success_or_permanent_failure() {
        let policy = policy(1, 1);
        let mut attempts = 0;
        let result: Result<u32, Failure> = policy
            .run(
                || {
                    attempts += 1;
                    let n = attempts;
                    async move {
                        if n < 3 {
                            Err(Failure(ErrorClass::Transient))
                        } else {
                            Ok(n)
                        }
                    }
                },
                |_, _, _| {},
            )
            .await;
        assert_eq!(result.ok(), Some(3));
        attempts = 0;
        let result: Result<(), Failure> = policy
            .run(
                || {
                    attempts += 1;
                    async { Err(Failure(ErrorClass::Permanent)) }
                },
                |_, _, _| panic!("not retried"),
            )
            .await;
        assert!(result.is_err());
        assert_eq!(attempts, 1);
    }
}
