//! Retrying store calls made on behalf of a reader, under the shared
//! [`RetryPolicy`]: transient failures (the backend unreachable or failing)
//! are retried with backoff until the deadline, data that fails
//! verification is refetched a few times, and anything else fails at once.
//! How each error is classed is the store's ([`Retryable`]); this module
//! only counts and logs the retries. The caller turns the final error into
//! EIO.

use std::future::Future;

use lazystore_castore::{RetryPolicy, Retryable};

use crate::stats::Stats;

/// Runs `attempt` under `policy` until it succeeds, fails permanently, runs
/// out of corrupt attempts, or the deadline passes; returns the last error.
/// Each retry is logged with `what` and counted in `stats.retries`.
pub(crate) async fn run<T, E, F, Fut>(
    policy: &RetryPolicy,
    stats: &Stats,
    what: &(dyn Fn() -> String + Sync),
    attempt: F,
) -> Result<T, E>
where
    E: Retryable + std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    policy
        .run(attempt, |e: &E, _, wait| {
            stats.add(&stats.retries, 1);
            tracing::warn!(
                "{}: {}; retrying in {wait:?}",
                what(),
                lazystore_castore::error_chain(e)
            );
        })
        .await
}
