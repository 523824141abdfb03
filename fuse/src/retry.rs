//! Retrying store calls made on behalf of a reader: transient failures
//! (the backend unreachable or failing) are retried with backoff until a
//! deadline, data that fails verification is refetched a few times, and
//! anything else fails at once. The caller turns the final error into EIO.

use std::future::Future;
use std::time::{Duration, Instant};

use lazystore_castore::{BlobError, DirectoryError};
use lazystore_pathinfo::pathinfos::PathInfoError;

use crate::stats::Stats;

/// How long and how often a failing store call is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// No attempt starts later than this after the first; then the call
    /// fails (EIO). Zero: one attempt.
    pub deadline: Duration,
    /// Wait before the second attempt; doubles after each failure.
    pub initial_backoff: Duration,
    /// Longest wait between two attempts.
    pub max_backoff: Duration,
    /// Attempts for data that failed verification (a corrupt chunk or
    /// directory): a second source may have it right, the same one twice
    /// rarely does.
    pub corrupt_attempts: u32,
}

impl Default for RetryPolicy {
    /// 30 s deadline, 50 ms backoff doubling to 2 s, 3 attempts on corruption.
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            corrupt_attempts: 3,
        }
    }
}

/// How a failure is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// The backend failed: retry until the deadline.
    Transient,
    /// The data failed verification: retry a few times.
    Corrupt,
    /// Retrying would not change anything.
    Permanent,
}

/// Errors the store returns, sorted into [`Class`]es.
pub(crate) trait Classify {
    fn class(&self) -> Class;
}

impl Classify for BlobError {
    fn class(&self) -> Class {
        match self {
            BlobError::Backend(_) => Class::Transient,
            BlobError::Corrupt { .. }
            | BlobError::Decompress { .. }
            | BlobError::BlobMismatch { .. } => Class::Corrupt,
            _ => Class::Permanent,
        }
    }
}

impl Classify for DirectoryError {
    fn class(&self) -> Class {
        match self {
            DirectoryError::Backend(_) => Class::Transient,
            DirectoryError::Invalid(_) => Class::Corrupt,
            _ => Class::Permanent,
        }
    }
}

impl Classify for PathInfoError {
    fn class(&self) -> Class {
        match self {
            PathInfoError::Backend(_) => Class::Transient,
            _ => Class::Permanent,
        }
    }
}

impl Classify for lazystore_pathinfo::substitute::SubstituteError {
    fn class(&self) -> Class {
        match self {
            lazystore_pathinfo::substitute::SubstituteError::Store(e) => e.class(),
            _ => Class::Permanent,
        }
    }
}

impl RetryPolicy {
    /// Runs `attempt` until it succeeds, fails permanently, runs out of
    /// corrupt attempts, or the deadline passes; returns the last error.
    /// Each retry is logged with `what` and counted in `stats`.
    pub(crate) async fn run<T, E, F, Fut>(
        &self,
        stats: &Stats,
        what: &(dyn Fn() -> String + Sync),
        mut attempt: F,
    ) -> Result<T, E>
    where
        E: Classify + std::error::Error + 'static,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let start = Instant::now();
        let mut backoff = self.initial_backoff;
        let mut corrupt = 0u32;
        loop {
            let e = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let give_up = match e.class() {
                Class::Permanent => true,
                Class::Corrupt => {
                    corrupt += 1;
                    corrupt >= self.corrupt_attempts
                }
                Class::Transient => start.elapsed() + backoff > self.deadline,
            };
            if give_up {
                return Err(e);
            }
            stats.add(&stats.retries, 1);
            tracing::warn!(
                "{}: {}; retrying in {backoff:?}",
                what(),
                lazystore_castore::error_chain(&e)
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }
}
