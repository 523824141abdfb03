//! Quarantine: a chunk whose stored bytes fail verification stops being
//! reported present, so the next write of any blob holding it stores it
//! again and the store heals.
//!
//! Verification stays where it was, above the backends ([`Blobs`] checks
//! every chunk it hands out), and a failure found there is reported back
//! down: [`Blobs`] calls [`BlobService::quarantine`] with the chunk, and
//! the store that holds the bytes checks *its own copy* before it drops
//! anything — a redb store in the writer's transaction (so a copy written
//! again since the reader's is never the one dropped), a gRPC client by
//! passing the report to its server (`ReportCorrupt`), a cache to the
//! store behind it. A copy damaged on the way, not at rest, is then never
//! quarantined, and a client cannot make a server forget a good chunk.
//!
//! The alternative weighed was a server that verifies every chunk before
//! it sends it. It would find corruption without a report, but at the cost
//! of a zstd decode and a BLAKE3 pass on the server for every chunk every
//! client reads, work each client does anyway. Measured with
//! `bench/verify_cost` (release, one thread of the 2-core development
//! machine, 128 MiB of `/usr/lib` in 64 KiB chunks stored as 53 MiB,
//! in decoded bytes per second): copying the stored bytes, which is what
//! sending them costs the server now, 17–25 GB/s; decoding and hashing
//! them 0.78–0.98 GB/s; BLAKE3 alone 3.2–4.5 GB/s. Verifying on send would
//! cost about 1.1 ms of server CPU per MB read, so two cores would serve
//! at most ~2 GB/s to all their clients together, whatever the network;
//! a report costs one round trip, only when a chunk is bad.
//!
//! A quarantined chunk is recorded (`quarantine-v1`, with the time) until
//! it is written again. [`BlobService::quarantined`] counts the records, so
//! a writer can tell cheaply whether anything the store holds may be
//! incomplete: while the count is zero, a present store path lacks no chunk.
//!
//! Not quarantined (yet): a chunk list whose chunks do not hash to its
//! blob digest, and a directory that fails its check. They fail reads with
//! EIO, as before, and stay. A damaged directory would fit the same scheme
//! (the walk in `lazystore_pathinfo`'s `whole.rs` already reports a missing
//! one, and an ingest writes a directory it does not find), but needs the
//! directory service to take reports as the blob service does: a trait
//! method, an RPC and the cache's pass-through. A chunk list is harder:
//! its digest is the blob's, so a wrong list cannot be told from wrong
//! chunks without reading the whole blob.

use std::time::{Duration, SystemTime};

use redb::ReadableTable;

use super::redb::{backend, read_chunk};
use super::{BlobError, Blobs};
use crate::digest::Digest;
use crate::error::error_chain;
use crate::redb_store::{RedbStore, Tables};

/// How long a read waits for its report of a corrupt chunk to be taken:
/// the read fails anyway, and a store that does not answer in this time is
/// asked again by the next read that finds the chunk.
const REPORT_WAIT: Duration = Duration::from_secs(2);

impl BlobError {
    /// The chunk whose bytes failed verification, if that is this error.
    pub fn corrupt_chunk(&self) -> Option<Digest> {
        match self {
            BlobError::Corrupt { chunk, .. } | BlobError::Decompress { chunk, .. } => Some(*chunk),
            _ => None,
        }
    }
}

impl Blobs {
    /// Reports the chunk `error` names as corrupt to the backend, which
    /// quarantines it if its own copy fails too, and logs the outcome with
    /// the chunk's digest. Does nothing for other errors.
    pub(super) async fn report_corrupt(&self, error: &BlobError) {
        let Some(chunk) = error.corrupt_chunk() else {
            return;
        };
        let reported = tokio::time::timeout(REPORT_WAIT, self.service.quarantine(&[chunk])).await;
        match reported {
            Ok(Ok(quarantined)) if quarantined.contains(&chunk) => tracing::error!(
                %chunk,
                "chunk {chunk} failed verification ({}); quarantined: the store no longer \
                 counts it present, and importing or uploading again a path that holds it \
                 writes it anew",
                error_chain(error)
            ),
            Ok(Ok(_)) => tracing::warn!(
                %chunk,
                "chunk {chunk} failed verification ({}); the store's own copy checks out (or \
                 it cannot quarantine), so it stays",
                error_chain(error)
            ),
            Ok(Err(e)) => tracing::warn!(
                %chunk,
                "chunk {chunk} failed verification ({}); quarantining it failed: {}",
                error_chain(error),
                error_chain(&e)
            ),
            Err(_) => tracing::warn!(
                %chunk,
                "chunk {chunk} failed verification ({}); the store did not take the report \
                 within {REPORT_WAIT:?}",
                error_chain(error)
            ),
        }
    }
}

/// Whether the copy of `digest` a redb store holds fails verification:
/// its index record or its bytes. False for a chunk not stored (already
/// quarantined, or never there). An I/O error is returned, not taken for
/// corruption: it may heal.
pub(super) fn stored_copy_fails(
    store: &RedbStore,
    tables: &Tables<'_>,
    digest: &Digest,
) -> Result<bool, BlobError> {
    let Some(record) = tables.chunks.get(digest.as_bytes()).map_err(backend)? else {
        return Ok(false);
    };
    let checked =
        read_chunk(store, &tables.chunks, *digest, record.value()).and_then(|c| c.decode());
    match checked {
        Ok(_) => Ok(false),
        Err(e) if e.corrupt_chunk().is_some() => Ok(true),
        Err(e) => Err(e),
    }
}

/// Removes `chunks` from a redb store's chunk index and records them as
/// quarantined, now.
pub(super) fn record(tables: &mut Tables<'_>, chunks: &[Digest]) -> Result<(), BlobError> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for d in chunks {
        tables.chunks.remove(d.as_bytes()).map_err(backend)?;
        tables
            .quarantine
            .insert(d.as_bytes(), now)
            .map_err(backend)?;
    }
    Ok(())
}
