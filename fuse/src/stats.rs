//! Counters of what the mount presented and what it fetched, readable while
//! mounted (`MOUNT/.lazystore/stats`) and logged at exit, and
//! [`CountingBlobService`], which counts what crosses from a remote store;
//! `retried`, which runs a store call under the shared retry policy and
//! counts (and logs) its retries.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use lazystore_castore::blobs::{BlobObserver, EncodedChunk, ObservedBlobService};
use lazystore_castore::{RetryPolicy, Retryable};

/// Counters kept outside the filesystem that its stats file and exit log
/// show after its own — a remote store's outages, say — so the filesystem
/// shows them without knowing where they come from (the fuse crate knows
/// no gRPC). Asked each time the stats are read.
pub trait CounterSource: Send + Sync {
    /// The counters by name, in display order; each only grows.
    fn counters(&self) -> Vec<(&'static str, u64)>;
}

/// The mount's counters. Every field only grows.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    /// FUSE lookups answered (including the entries of readdirplus).
    pub lookups: AtomicU64,
    /// Store paths resolved through the path-info service.
    pub path_infos_fetched: AtomicU64,
    /// Directories fetched from the store.
    pub directories_fetched: AtomicU64,
    /// Regular files presented (an inode made for them).
    pub files_presented: AtomicU64,
    /// Sum of the sizes of the files presented: what `stat` showed.
    pub bytes_presented: AtomicU64,
    /// Read requests answered.
    pub reads: AtomicU64,
    /// Bytes returned by reads.
    pub bytes_read: AtomicU64,
    /// Chunk lists fetched (one per file read).
    pub chunk_lists_fetched: AtomicU64,
    /// Chunks fetched from the store (local cache or remote), verified.
    pub chunks_fetched: AtomicU64,
    /// Their decoded bytes.
    pub chunk_bytes_fetched: AtomicU64,
    /// Of the chunks fetched, those fetched ahead of the reader.
    pub readahead_chunks: AtomicU64,
    /// Chunks a read found in the mount's memory cache.
    pub memory_cache_hits: AtomicU64,
    /// Store paths read in NAR order and so streamed (`fs/walk.rs`).
    pub walks_streamed: AtomicU64,
    /// Files fetched ahead because a trace named them (`mount --prefetch`).
    pub prefetched_files: AtomicU64,
    /// Opens served by passthrough from a whole file in the local cache.
    pub passthrough_opens: AtomicU64,
    /// Whole files written into the local cache for passthrough.
    pub files_written: AtomicU64,
    /// Chunks read from the remote store, under any local cache.
    pub remote_chunks: AtomicU64,
    /// Their decoded bytes.
    pub remote_bytes: AtomicU64,
    /// Their bytes as sent (compressed where that was smaller).
    pub remote_wire_bytes: AtomicU64,
    /// Store calls retried.
    pub retries: AtomicU64,
    /// Operations that failed with EIO.
    pub io_errors: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            lookups: AtomicU64::new(0),
            path_infos_fetched: AtomicU64::new(0),
            directories_fetched: AtomicU64::new(0),
            files_presented: AtomicU64::new(0),
            bytes_presented: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            chunk_lists_fetched: AtomicU64::new(0),
            chunks_fetched: AtomicU64::new(0),
            chunk_bytes_fetched: AtomicU64::new(0),
            readahead_chunks: AtomicU64::new(0),
            memory_cache_hits: AtomicU64::new(0),
            walks_streamed: AtomicU64::new(0),
            prefetched_files: AtomicU64::new(0),
            passthrough_opens: AtomicU64::new(0),
            files_written: AtomicU64::new(0),
            remote_chunks: AtomicU64::new(0),
            remote_bytes: AtomicU64::new(0),
            remote_wire_bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            io_errors: AtomicU64::new(0),
        }
    }
}

impl Stats {
    /// Fresh counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `n` to `counter`.
    pub(crate) fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            uptime_secs: self.started.elapsed().as_secs(),
            lookups: get(&self.lookups),
            path_infos_fetched: get(&self.path_infos_fetched),
            directories_fetched: get(&self.directories_fetched),
            files_presented: get(&self.files_presented),
            bytes_presented: get(&self.bytes_presented),
            reads: get(&self.reads),
            bytes_read: get(&self.bytes_read),
            chunk_lists_fetched: get(&self.chunk_lists_fetched),
            chunks_fetched: get(&self.chunks_fetched),
            chunk_bytes_fetched: get(&self.chunk_bytes_fetched),
            readahead_chunks: get(&self.readahead_chunks),
            memory_cache_hits: get(&self.memory_cache_hits),
            walks_streamed: get(&self.walks_streamed),
            prefetched_files: get(&self.prefetched_files),
            passthrough_opens: get(&self.passthrough_opens),
            files_written: get(&self.files_written),
            remote_chunks: get(&self.remote_chunks),
            remote_bytes: get(&self.remote_bytes),
            remote_wire_bytes: get(&self.remote_wire_bytes),
            retries: get(&self.retries),
            io_errors: get(&self.io_errors),
        }
    }
}

/// The counters at one moment; see [`Stats`] for what each counts.
/// Displayed as one `name value` line per counter, the format of the
/// stats file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct StatsSnapshot {
    pub uptime_secs: u64,
    pub lookups: u64,
    pub path_infos_fetched: u64,
    pub directories_fetched: u64,
    pub files_presented: u64,
    pub bytes_presented: u64,
    pub reads: u64,
    pub bytes_read: u64,
    pub chunk_lists_fetched: u64,
    pub chunks_fetched: u64,
    pub chunk_bytes_fetched: u64,
    pub readahead_chunks: u64,
    pub memory_cache_hits: u64,
    pub walks_streamed: u64,
    pub prefetched_files: u64,
    pub passthrough_opens: u64,
    pub files_written: u64,
    pub remote_chunks: u64,
    pub remote_bytes: u64,
    pub remote_wire_bytes: u64,
    pub retries: u64,
    pub io_errors: u64,
}

impl StatsSnapshot {
    /// The counters by name, in display order.
    pub fn fields(&self) -> [(&'static str, u64); 22] {
        [
            ("uptime_secs", self.uptime_secs),
            ("lookups", self.lookups),
            ("path_infos_fetched", self.path_infos_fetched),
            ("directories_fetched", self.directories_fetched),
            ("files_presented", self.files_presented),
            ("bytes_presented", self.bytes_presented),
            ("reads", self.reads),
            ("bytes_read", self.bytes_read),
            ("chunk_lists_fetched", self.chunk_lists_fetched),
            ("chunks_fetched", self.chunks_fetched),
            ("chunk_bytes_fetched", self.chunk_bytes_fetched),
            ("readahead_chunks", self.readahead_chunks),
            ("memory_cache_hits", self.memory_cache_hits),
            ("walks_streamed", self.walks_streamed),
            ("prefetched_files", self.prefetched_files),
            ("passthrough_opens", self.passthrough_opens),
            ("files_written", self.files_written),
            ("remote_chunks", self.remote_chunks),
            ("remote_bytes", self.remote_bytes),
            ("remote_wire_bytes", self.remote_wire_bytes),
            ("retries", self.retries),
            ("io_errors", self.io_errors),
        ]
    }

    /// Parses what [`Display`](fmt::Display) wrote; unknown lines are
    /// skipped, so readers keep working when counters are added.
    pub fn parse(text: &str) -> StatsSnapshot {
        let mut s = StatsSnapshot::default();
        for line in text.lines() {
            let Some((name, value)) = line.split_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<u64>() else {
                continue;
            };
            let slot = match name {
                "uptime_secs" => &mut s.uptime_secs,
                "lookups" => &mut s.lookups,
                "path_infos_fetched" => &mut s.path_infos_fetched,
                "directories_fetched" => &mut s.directories_fetched,
                "files_presented" => &mut s.files_presented,
                "bytes_presented" => &mut s.bytes_presented,
                "reads" => &mut s.reads,
                "bytes_read" => &mut s.bytes_read,
                "chunk_lists_fetched" => &mut s.chunk_lists_fetched,
                "chunks_fetched" => &mut s.chunks_fetched,
                "chunk_bytes_fetched" => &mut s.chunk_bytes_fetched,
                "readahead_chunks" => &mut s.readahead_chunks,
                "memory_cache_hits" => &mut s.memory_cache_hits,
                "walks_streamed" => &mut s.walks_streamed,
                "prefetched_files" => &mut s.prefetched_files,
                "passthrough_opens" => &mut s.passthrough_opens,
                "files_written" => &mut s.files_written,
                "remote_chunks" => &mut s.remote_chunks,
                "remote_bytes" => &mut s.remote_bytes,
                "remote_wire_bytes" => &mut s.remote_wire_bytes,
                "retries" => &mut s.retries,
                "io_errors" => &mut s.io_errors,
                _ => continue,
            };
            *slot = value;
        }
        s
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, value) in self.fields() {
            writeln!(f, "{name} {value}")?;
        }
        Ok(())
    }
}

/// A [`BlobService`](lazystore_castore::BlobService) that counts the chunks read through it into
/// [`Stats`]' `remote_*` counters: put it around the remote store, under
/// the local cache, and the counters tell what crossed the network.
pub type CountingBlobService = ObservedBlobService<RemoteReads>;

/// Counts the chunks read into [`Stats`]' `remote_*` counters.
pub struct RemoteReads(pub Arc<Stats>);

impl BlobObserver for RemoteReads {
    fn after_read(&self, got: &[EncodedChunk]) {
        let s = &self.0;
        s.add(&s.remote_chunks, got.len() as u64);
        s.add(&s.remote_bytes, got.iter().map(|c| c.size).sum());
        s.add(
            &s.remote_wire_bytes,
            got.iter().map(|c| c.data.len() as u64).sum(),
        );
    }
}

/// Runs `attempt` under `policy` until it succeeds, fails permanently, runs
/// out of corrupt attempts, or the deadline passes; returns the last error.
/// Each retry is logged with `what` and counted in `stats.retries`.
pub(crate) async fn retried<T, E, F, Fut>(
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
