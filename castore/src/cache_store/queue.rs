//! Write-behind: records to cache wait in memory and a writer thread
//! stores them in batches, so a cold read pays for no write transaction.
//!
//! A cold walk of a 52,073-file toolchain through the service cached some
//! 70,000 records in about 7,500 transactions, one per fetch: those writes
//! were a fifth of the mount's CPU, and batches of [`BATCH_BYTES`] cut them
//! to half of that (`docs/design.md`, "The local cache"). Grouping the
//! callers that happened to write at the same moment merged too few of
//! them to matter: a walk's fetches come one after another.
//!
//! A queued record is found by lookups as if written, so what was just
//! fetched is not fetched again; it reaches the file within [`DELAY`], or
//! once [`BATCH_BYTES`] are queued, or at a flush or the close.
//! A crash loses what is queued, as it may lose any unsynced write of a
//! cache. Callers wait only when [`MAX_QUEUED_BYTES`] are queued, so a slow
//! disk holds back fetching rather than filling memory.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Inner;
use super::layout::{Key, Record};
use crate::blobs::{BlobMeta, EncodedChunk};

/// A batch is written once this many bytes are queued...
const BATCH_BYTES: u64 = 2 << 20;

/// ... or once its oldest record has waited this long.
const DELAY: Duration = Duration::from_millis(100);

/// Callers wait while this many bytes are queued.
const MAX_QUEUED_BYTES: u64 = 8 << 20;

/// Records to write in one transaction.
#[derive(Default)]
pub(super) struct Batch {
    /// One record per key: two copies of a record are the same bytes, both
    /// verified.
    pub(super) inserts: Vec<Record>,
    pub(super) drops: Vec<Key>,
    /// Records used while queued, in the order used: counted as used after
    /// they are written, so the order of eviction stays that of use.
    pub(super) touched: Vec<Key>,
    /// Where each key's record is in `inserts`.
    at: HashMap<Key, usize>,
    bytes: u64,
    /// When the oldest record came.
    since: Option<Instant>,
}

impl Batch {
    fn find(&self, key: &Key) -> Option<&Record> {
        self.at.get(key).map(|&i| &self.inserts[i])
    }
}

#[derive(Default)]
struct State {
    pending: Batch,
    /// The batch the writer is storing, still found by lookups.
    in_flight: Option<Arc<Batch>>,
    /// Callers waiting for everything queued to be written.
    flushes: usize,
    closing: bool,
}

impl State {
    /// The batches lookups see: the one filling, then the one being written.
    fn batches(&self) -> impl Iterator<Item = &Batch> {
        std::iter::once(&self.pending).chain(self.in_flight.as_deref())
    }
}

/// The queue, shared by the cache and its writer thread.
#[derive(Default)]
pub(super) struct WriteQueue {
    state: Mutex<State>,
    /// Wakes the writer: a batch is due, or the cache closes.
    due: Condvar,
    /// Wakes callers: a batch was written.
    written: Condvar,
}

/// A queued record, as lookups want it.
pub(super) enum Queued {
    Chunk(EncodedChunk),
    Blob(BlobMeta),
    Directory(Vec<u8>),
}

impl WriteQueue {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("lock poisoned")
    }

    /// Queues `inserts` and `drops`; waits while the queue is full.
    pub(super) fn push(&self, inserts: Vec<Record>, drops: Vec<Key>) {
        let mut s = self.lock();
        while s.pending.bytes >= MAX_QUEUED_BYTES && !s.closing {
            s = self.written.wait(s).expect("lock poisoned");
        }
        let b = &mut s.pending;
        for r in inserts {
            let key = r.key();
            if b.at.contains_key(&key) {
                continue;
            }
            b.bytes += r.len() as u64;
            b.at.insert(key, b.inserts.len());
            b.inserts.push(r);
        }
        b.drops.extend(drops);
        if b.since.is_none() && !(b.inserts.is_empty() && b.drops.is_empty()) {
            b.since = Some(Instant::now());
        }
        if b.bytes >= BATCH_BYTES {
            self.due.notify_one();
        }
    }

    /// The record queued under `key`, if any.
    pub(super) fn find(&self, key: &Key) -> Option<Queued> {
        let s = self.lock();
        let record = s.batches().find_map(|b| b.find(key))?;
        Some(match record {
            Record::Chunk(c) => Queued::Chunk(c.clone()),
            Record::Blob(_, meta) => Queued::Blob(meta.clone()),
            Record::Directory(_, encoding) => Queued::Directory(encoding.clone()),
            Record::File(..) => return None,
        })
    }

    /// Waits until everything queued before the call is written.
    pub(super) fn flush(&self) {
        let mut s = self.lock();
        s.flushes += 1;
        self.due.notify_one();
        while !s.closing && (s.pending.since.is_some() || s.in_flight.is_some()) {
            s = self.written.wait(s).expect("lock poisoned");
        }
        s.flushes -= 1;
    }

    /// Counts a use of `key` if it is queued to be written: for the
    /// batch after the one holding it, when it is in the file.
    pub(super) fn touch(&self, key: Key) {
        let mut s = self.lock();
        if s.batches().any(|b| b.at.contains_key(&key)) {
            s.pending.touched.push(key);
        }
    }

    /// Whether `key` is queued: `Some(true)` to be written, `Some(false)`
    /// to be dropped (and nothing to be written in its place).
    pub(super) fn queued(&self, key: &Key) -> Option<bool> {
        let s = self.lock();
        let mut dropped = false;
        for b in s.batches() {
            if b.at.contains_key(key) {
                return Some(true);
            }
            dropped |= b.drops.contains(key);
        }
        dropped.then_some(false)
    }

    /// The writer thread: writes each batch when it is due, and what is
    /// queued (uses of written records included) when told to stop
    /// ([`Writer`]'s drop), durably.
    fn run(&self, cache: Arc<Inner>) {
        loop {
            let (batch, last) = {
                let mut s = self.lock();
                loop {
                    if s.closing {
                        if s.pending.since.is_none() && s.pending.touched.is_empty() {
                            return;
                        }
                        break;
                    }
                    match s.pending.since {
                        None => s = self.due.wait(s).expect("lock poisoned"),
                        Some(since) => {
                            let waited = since.elapsed();
                            if s.pending.bytes >= BATCH_BYTES || waited >= DELAY || s.flushes > 0 {
                                break;
                            }
                            s = self
                                .due
                                .wait_timeout(s, DELAY - waited)
                                .expect("lock poisoned")
                                .0;
                        }
                    }
                }
                let batch = Arc::new(std::mem::take(&mut s.pending));
                s.in_flight = Some(batch.clone());
                (batch, s.closing)
            };
            if let Err(e) = cache.write_touched(&batch.inserts, &batch.drops, &batch.touched, last)
            {
                tracing::warn!(
                    path = %cache.path.display(),
                    error = %e,
                    "cache: cannot write fetched records; they will be fetched again"
                );
            }
            drop(batch);
            self.lock().in_flight = None;
            self.written.notify_all();
        }
    }
}

/// The writer thread of one cache, stopped when the last handle to the
/// cache goes: it writes what is queued, and the drop waits for it, so a
/// closed cache is closed when the drop returns.
pub(super) struct Writer {
    queue: Arc<WriteQueue>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Starts the writer of `cache`.
    pub(super) fn start(cache: Arc<Inner>) -> Self {
        let queue = cache.queue.clone();
        let q = queue.clone();
        let thread = std::thread::Builder::new()
            .name("cache-writer".into())
            .spawn(move || q.run(cache))
            // As `std::thread::spawn`: only an exhausted system fails here.
            .expect("cannot start the cache's writer thread");
        Writer {
            queue,
            thread: Some(thread),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        {
            let mut s = self.queue.lock();
            s.closing = true;
            self.queue.due.notify_one();
            self.queue.written.notify_all();
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("cache: the writer thread panicked; queued records are lost");
        }
    }
}
