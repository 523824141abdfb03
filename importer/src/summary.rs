//! The account of an import run: what was imported, skipped or failed, what
//! it cost in bytes and time.

use std::fmt;
use std::time::Duration;

use lazystore_pathinfo::StorePath;

use crate::error::PathError;
use crate::progress::bytes;

/// What an import run did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Paths downloaded, verified and published, in publication order.
    pub imported: Vec<StorePath>,
    /// Paths published without a download because the store already held
    /// an identical NAR (same NarHash and NarSize) under another path.
    pub deduplicated: Vec<StorePath>,
    /// Paths that were already in the store (their NARs not downloaded).
    pub present: usize,
    /// Paths that failed, each with why. Nothing was published for them.
    pub failed: Vec<PathError>,
    /// NarSize of the paths downloaded, in bytes.
    pub nar_bytes: u64,
    /// Bytes received from the caches: narinfo files and compressed NARs,
    /// retried downloads included.
    pub downloaded_bytes: u64,
    /// NAR downloads started, retries included.
    pub nar_downloads: u64,
    /// Chunks the store did not have before, when the store can tell.
    pub new_chunks: Option<u64>,
    /// Bytes of those chunks as stored, when the store can tell.
    pub new_bytes: Option<u64>,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
}

impl Summary {
    /// Whether every path asked for, and its closure, is now in the store.
    pub fn success(&self) -> bool {
        self.failed.is_empty()
    }

    /// NAR bytes imported per second.
    pub fn throughput(&self) -> f64 {
        self.nar_bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "paths: {} imported, {} already present, {} deduplicated, {} failed",
            self.imported.len(),
            self.present,
            self.deduplicated.len(),
            self.failed.len()
        )?;
        writeln!(
            f,
            "NAR: {} ({} bytes), downloaded {} in {} NAR downloads",
            bytes(self.nar_bytes),
            self.nar_bytes,
            bytes(self.downloaded_bytes),
            self.nar_downloads
        )?;
        match (self.new_chunks, self.new_bytes) {
            (Some(chunks), Some(stored)) => {
                let ratio = self.nar_bytes as f64 / (stored.max(1)) as f64;
                writeln!(
                    f,
                    "stored: {chunks} new chunks, {} new bytes, dedup ratio {ratio:.2}",
                    bytes(stored)
                )?;
            }
            _ => writeln!(f, "stored: new chunk counts not available from this store")?,
        }
        write!(
            f,
            "time: {:.2} s, {}/s of NAR",
            self.elapsed.as_secs_f64(),
            bytes(self.throughput() as u64)
        )
    }
}
