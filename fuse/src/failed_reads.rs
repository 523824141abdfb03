//! Reads that just failed, so that one `read(2)` waits out its deadline
//! once, not once per request the kernel makes for it.
//!
//! A reader's `read(2)` reaches the mount as readahead requests for the
//! pages around it. When one fails (EIO after `--retry-deadline`), the
//! kernel does not give up: it asks again, synchronously, for the page the
//! reader waits on, and that request waited out a whole deadline of its
//! own. In a store outage one `read(2)` took up to four deadlines (12 s
//! with a 3 s deadline, in `tests/restarts.rs`). A request from the same
//! thread (the kernel sends the reader's thread id with readahead too) for
//! the same file within [`FAILED_READ_MEMORY`] of a failure fails at once
//! instead; other readers, and the same one later, wait as usual.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a failed read is remembered. The kernel asks again as soon as
/// the failure reaches it; a second is far more than that takes.
pub const FAILED_READ_MEMORY: Duration = Duration::from_secs(1);

/// Failures remembered at most: beyond it the old ones are swept out, and
/// if all are recent, all are forgotten (which costs a reader at most one
/// more deadline).
const MAX_REMEMBERED: usize = 4096;

/// Failed reads by (inode, thread id), with when they failed.
#[derive(Default)]
pub(crate) struct FailedReads {
    failed: Mutex<HashMap<(u64, u32), Instant>>,
}

impl FailedReads {
    /// Whether thread `pid`'s read of `ino` failed within
    /// [`FAILED_READ_MEMORY`]; if so the memory is renewed, as this read
    /// fails too.
    pub(crate) fn failed_lately(&self, ino: u64, pid: u32) -> bool {
        let mut failed = self.failed.lock().expect("no panics while held");
        match failed.get_mut(&(ino, pid)) {
            Some(at) if at.elapsed() < FAILED_READ_MEMORY => {
                *at = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Thread `pid`'s read of `ino` failed now.
    pub(crate) fn record(&self, ino: u64, pid: u32) {
        let mut failed = self.failed.lock().expect("no panics while held");
        if failed.len() >= MAX_REMEMBERED {
            failed.retain(|_, at| at.elapsed() < FAILED_READ_MEMORY);
            if failed.len() >= MAX_REMEMBERED {
                failed.clear();
            }
        }
        failed.insert((ino, pid), Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_thread_on_the_same_file_soon_after() {
        let reads = FailedReads::default();
        assert!(!reads.failed_lately(7, 100));
        reads.record(7, 100);
        assert!(reads.failed_lately(7, 100));
        assert!(!reads.failed_lately(7, 101), "another reader waits");
        assert!(!reads.failed_lately(8, 100), "another file waits");
    }

    #[test]
    fn forgotten_after_the_memory() {
        let reads = FailedReads::default();
        reads.record(7, 100);
        std::thread::sleep(FAILED_READ_MEMORY + Duration::from_millis(50));
        assert!(!reads.failed_lately(7, 100));
    }

    #[test]
    fn bounded() {
        let reads = FailedReads::default();
        for ino in 0..(MAX_REMEMBERED as u64 * 3) {
            reads.record(ino, 1);
            assert!(reads.failed.lock().unwrap().len() <= MAX_REMEMBERED);
        }
        let last = MAX_REMEMBERED as u64 * 3 - 1;
        assert!(reads.failed_lately(last, 1));
    }
}
