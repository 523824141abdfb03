//! Retrying transient failures with exponential backoff.

use std::future::Future;
use std::time::Duration;

/// How often and how patiently to retry a transient failure.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Tries in all, the first included; at least 1.
    pub attempts: u32,
    /// Wait before the second try; doubled before each later one.
    pub initial_backoff: Duration,
    /// Longest wait between two tries.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// Five tries, waiting 0.25 s, 0.5 s, 1 s, 2 s in between: rides out a
    /// server restart or a dropped connection without hiding an outage.
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(8),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed try number `failed` (0 for the first).
    pub fn backoff(&self, failed: u32) -> Duration {
        self.initial_backoff
            .saturating_mul(1u32.checked_shl(failed).unwrap_or(u32::MAX))
            .min(self.max_backoff)
    }

    /// Whether a try numbered `failed` (0 for the first) may be followed by
    /// another.
    pub fn may_retry(&self, failed: u32) -> bool {
        failed + 1 < self.attempts.max(1)
    }

    /// Runs `attempt` until it succeeds, fails with an error `transient`
    /// does not accept, or the tries are used up; returns the last result.
    pub async fn run<T, E, F, Fut>(
        &self,
        transient: impl Fn(&E) -> bool,
        mut attempt: F,
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let mut failed = 0;
        loop {
            match attempt().await {
                Err(e) if transient(&e) && self.may_retry(failed) => {
                    let wait = self.backoff(failed);
                    tracing::debug!("retrying in {wait:?} after: {e}");
                    tokio::time::sleep(wait).await;
                    failed += 1;
                }
                result => return result,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = RetryPolicy {
            attempts: 40,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        let waits: Vec<_> = (0..6).map(|n| policy.backoff(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.backoff(39), Duration::from_secs(1));
        assert!(policy.may_retry(38) && !policy.may_retry(39));
    }

    #[tokio::test]
    async fn retries_only_transient_errors() {
        let policy = RetryPolicy {
            attempts: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
        };
        let mut calls = 0;
        let result: Result<(), &str> = policy
            .run(
                |e| *e == "transient",
                || {
                    calls += 1;
                    async { Err("transient") }
                },
            )
            .await;
        assert_eq!((result, calls), (Err("transient"), 3));
        calls = 0;
        let result: Result<(), &str> = policy
            .run(
                |e| *e == "transient",
                || {
                    calls += 1;
                    async { Err("fatal") }
                },
            )
            .await;
        assert_eq!((result, calls), (Err("fatal"), 1));
    }
}
