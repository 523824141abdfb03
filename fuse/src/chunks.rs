//! The mount's chunk fetching: a bounded in-memory LRU of verified chunks,
//! one fetch per chunk however many readers want it at once, and batched
//! fetches from the store (retried per the [`RetryPolicy`]), either for a
//! reader or ahead of it.
//!
//! The LRU is what lets the kernel's reads, which never line up with chunk
//! boundaries, take each chunk from the store once, and where readahead
//! leaves the chunks it fetched before the reader asks for them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use lazystore_castore::{BlobError, Blobs, Digest, RetryPolicy};

use crate::stats::Stats;
use crate::stats::retried;

/// What a batch fetch resolves to: the chunks in the order asked, or why
/// they could not be had.
type BatchResult = Result<Arc<Vec<Bytes>>, Arc<BlobError>>;
type Batch = Shared<BoxFuture<'static, BatchResult>>;

/// A chunk being fetched: its batch and its place in it.
#[derive(Clone)]
struct Pending {
    batch: Batch,
    index: usize,
}

/// Fetches chunks, sharing fetches and keeping recent chunks in memory.
pub(crate) struct ChunkFetcher {
    blobs: Blobs,
    retry: RetryPolicy,
    stats: Arc<Stats>,
    // A std Mutex: every critical section is a few map operations, never
    // held across an await, and the fetch tasks need it from any thread.
    state: Mutex<State>,
    /// Bytes being fetched ahead of readers, to bound readahead overall.
    ahead_in_flight: AtomicU64,
    /// Most bytes fetched ahead at once, over all files.
    ahead_limit: u64,
}

struct State {
    lru: Lru,
    in_flight: HashMap<Digest, Pending>,
}

impl ChunkFetcher {
    pub(crate) fn new(
        blobs: Blobs,
        retry: RetryPolicy,
        stats: Arc<Stats>,
        memory_bytes: u64,
        ahead_limit: u64,
    ) -> Self {
        ChunkFetcher {
            blobs,
            retry,
            stats,
            state: Mutex::new(State {
                lru: Lru::new(memory_bytes),
                in_flight: HashMap::new(),
            }),
            ahead_in_flight: AtomicU64::new(0),
            ahead_limit,
        }
    }

    /// The verified bytes of `chunks`, in order: from memory, from a fetch
    /// already running, or fetched now in one batch. `what` names the file
    /// for log lines.
    pub(crate) async fn get(
        self: &Arc<Self>,
        chunks: &[Digest],
        what: &Arc<str>,
    ) -> Result<Vec<Bytes>, Arc<BlobError>> {
        enum Slot {
            Ready(Bytes),
            Wait(Pending),
            New(usize),
        }
        let mut slots = Vec::with_capacity(chunks.len());
        {
            let mut state = self.state.lock().expect("chunk state poisoned");
            let mut to_fetch: Vec<Digest> = Vec::new();
            let mut new_index: HashMap<Digest, usize> = HashMap::new();
            for d in chunks {
                if let Some(b) = state.lru.get(d) {
                    self.stats.add(&self.stats.memory_cache_hits, 1);
                    slots.push(Slot::Ready(b));
                } else if let Some(p) = state.in_flight.get(d) {
                    slots.push(Slot::Wait(p.clone()));
                } else {
                    let i = *new_index.entry(*d).or_insert_with(|| {
                        to_fetch.push(*d);
                        to_fetch.len() - 1
                    });
                    slots.push(Slot::New(i));
                }
            }
            if !to_fetch.is_empty() {
                let batch = self.start_batch(&mut state, to_fetch, what.clone(), false);
                for s in &mut slots {
                    if let Slot::New(index) = *s {
                        *s = Slot::Wait(Pending {
                            batch: batch.clone(),
                            index,
                        });
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(slots.len());
        for s in slots {
            out.push(match s {
                Slot::Ready(b) => b,
                Slot::Wait(p) => p.batch.await?[p.index].clone(),
                Slot::New(_) => unreachable!("every new chunk was given a batch"),
            });
        }
        Ok(out)
    }

    /// Starts fetching `chunks` ahead of a reader, in batches of about
    /// `batch_bytes`, unless they are in memory or being fetched, or
    /// readahead over all files is at its limit. Returns at once.
    pub(crate) fn prefetch(
        self: &Arc<Self>,
        chunks: &[(Digest, u64)],
        batch_bytes: u64,
        what: &Arc<str>,
    ) {
        let mut state = self.state.lock().expect("chunk state poisoned");
        let mut batch: Vec<Digest> = Vec::new();
        let mut bytes = 0u64;
        for (d, size) in chunks {
            if state.lru.contains(d) || state.in_flight.contains_key(d) || batch.contains(d) {
                continue;
            }
            if self.ahead_in_flight.load(Ordering::Relaxed) + bytes + size > self.ahead_limit {
                break;
            }
            batch.push(*d);
            bytes += size;
            if bytes >= batch_bytes {
                self.ahead_in_flight.fetch_add(bytes, Ordering::Relaxed);
                self.start_ahead(&mut state, std::mem::take(&mut batch), bytes, what);
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            self.ahead_in_flight.fetch_add(bytes, Ordering::Relaxed);
            self.start_ahead(&mut state, batch, bytes, what);
        }
    }

    /// Starts fetching, in one batch, those of `chunks` neither in memory
    /// nor being fetched, for a walk's stream (`fs/walk.rs`), which paces
    /// itself: the future resolves once they are in memory or have failed
    /// (a reader asking for them then fetches them itself). Not counted
    /// against the readahead bound.
    pub(crate) fn fetch_ahead(
        self: &Arc<Self>,
        chunks: &[Digest],
        what: &Arc<str>,
    ) -> Option<BoxFuture<'static, ()>> {
        let mut state = self.state.lock().expect("chunk state poisoned");
        let mut batch: Vec<Digest> = Vec::new();
        for d in chunks {
            if !state.lru.contains(d) && !state.in_flight.contains_key(d) && !batch.contains(d) {
                batch.push(*d);
            }
        }
        if batch.is_empty() {
            return None;
        }
        let fut = self.start_batch(&mut state, batch, what.clone(), true);
        Some(fut.map(|_| ()).boxed())
    }

    fn start_ahead(
        self: &Arc<Self>,
        state: &mut State,
        batch: Vec<Digest>,
        bytes: u64,
        what: &Arc<str>,
    ) {
        let fut = self.start_batch(state, batch, what.clone(), true);
        let this = self.clone();
        // Keep the batch polled to completion so the counter comes back down
        // (the batch runs in its own task either way).
        tokio::spawn(async move {
            let _ = fut.await;
            this.ahead_in_flight.fetch_sub(bytes, Ordering::Relaxed);
        });
    }

    /// Registers `chunks` as in flight and spawns their fetch. The task
    /// puts them in memory and clears them from `in_flight` when done.
    fn start_batch(
        self: &Arc<Self>,
        state: &mut State,
        chunks: Vec<Digest>,
        what: Arc<str>,
        ahead: bool,
    ) -> Batch {
        let this = self.clone();
        let digests = chunks.clone();
        let task = tokio::spawn(async move {
            let describe = || format!("{what}: fetching {} chunks", digests.len());
            let result = retried(&this.retry, &this.stats, &describe, || {
                this.blobs.read_chunks_verified(&digests)
            })
            .await;
            let mut state = this.state.lock().expect("chunk state poisoned");
            for d in &digests {
                state.in_flight.remove(d);
            }
            match result {
                Ok(got) => {
                    let s = &this.stats;
                    s.add(&s.chunks_fetched, got.len() as u64);
                    s.add(
                        &s.chunk_bytes_fetched,
                        got.iter().map(|b| b.len() as u64).sum(),
                    );
                    if ahead {
                        s.add(&s.readahead_chunks, got.len() as u64);
                    }
                    for (d, b) in digests.iter().zip(&got) {
                        state.lru.insert(*d, b.clone());
                    }
                    Ok(Arc::new(got))
                }
                Err(e) => Err(Arc::new(e)),
            }
        });
        let batch: Batch = async move {
            match task.await {
                Ok(r) => r,
                Err(e) => Err(Arc::new(BlobError::Internal(e.into()))),
            }
        }
        .boxed()
        .shared();
        for (index, d) in chunks.iter().enumerate() {
            state.in_flight.insert(
                *d,
                Pending {
                    batch: batch.clone(),
                    index,
                },
            );
        }
        batch
    }

    /// Bytes held in memory now.
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.state.lock().expect("chunk state poisoned").lru.bytes
    }
}

/// A least-recently-used map of chunks bounded by their total size.
struct Lru {
    map: HashMap<Digest, (Bytes, u64)>,
    /// Use tick → digest, oldest first.
    order: BTreeMap<u64, Digest>,
    tick: u64,
    bytes: u64,
    capacity: u64,
}

impl Lru {
    fn new(capacity: u64) -> Self {
        Lru {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            bytes: 0,
            capacity,
        }
    }

    fn contains(&self, d: &Digest) -> bool {
        self.map.contains_key(d)
    }

    fn get(&mut self, d: &Digest) -> Option<Bytes> {
        let (b, t) = self.map.get_mut(d)?;
        self.order.remove(t);
        self.tick += 1;
        *t = self.tick;
        self.order.insert(self.tick, *d);
        Some(b.clone())
    }

    fn insert(&mut self, d: Digest, b: Bytes) {
        let len = b.len() as u64;
        if len > self.capacity || self.map.contains_key(&d) {
            return;
        }
        while self.bytes + len > self.capacity {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((ob, _)) = self.map.remove(&old) {
                self.bytes -= ob.len() as u64;
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, d);
        self.map.insert(d, (b, self.tick));
        self.bytes += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_oldest_and_stays_bounded() {
        let mut lru = Lru::new(10);
        let d = |i: u8| Digest::of(&[i]);
        lru.insert(d(1), Bytes::from_static(b"aaaa"));
        lru.insert(d(2), Bytes::from_static(b"bbbb"));
        assert!(lru.get(&d(1)).is_some()); // 1 is now newer than 2
        lru.insert(d(3), Bytes::from_static(b"cccc"));
        assert!(lru.contains(&d(1)) && lru.contains(&d(3)) && !lru.contains(&d(2)));
        assert_eq!(lru.bytes, 8);
        lru.insert(d(4), Bytes::from(vec![0; 11]));
        assert!(!lru.contains(&d(4)), "larger than the whole cache");
    }
}
