//! What the cache's records cost against its bound, and the in-memory
//! index of their entries by last use, which picks what is evicted.
//!
//! Accounting. Each cached record has an entry in `cache-lru-v1`: what it
//! costs and when it was last used (a logical clock, one tick per use). The
//! cost is the space it takes on disk, so that the bound holds for the
//! disk: a chunk's bytes take whole 4 KiB blocks of a pack (it starts on
//! one, and eviction punches its blocks out of the file), plus its small
//! index record; a chunk list or directory lives in redb, which packs small
//! records together and gives a record of more than half a page a
//! power-of-two run of 4 KiB pages; each also has its key and entry. The
//! entry is written in the same transaction as the record and removed with
//! it, so after a crash the two still agree: redb loses a suffix of
//! commits, never part of one. On open the entries are read into an
//! in-memory index, ordered by last use; from then on the index answers
//! "how full" and "who goes next" without touching the file. The price is
//! memory: some 125 bytes per cached record, so about 40 MB for a full
//! 10 GiB cache of 64 KiB chunks that compress to 40% (330,000 of them),
//! and an open that reads 16 MB of entries. A table ordered by last use
//! would need no memory but cost two more writes per use (batched, still a
//! rewrite of the index pages); an approximate order (clock, sampling)
//! would save about half the memory for an order nobody can predict.
//! Neither pays at this size.
//!
//! Reads must not cost a write each, so a hit only moves its entry in the
//! index and marks it dirty. Dirty entries are written with the next
//! transaction that writes anyway (every fetch from the remote writes its
//! result back), or on their own once [`TOUCHES_PER_FLUSH`] have piled up,
//! and when the store closes. A crash loses recent recency updates only: the
//! order is a little stale, the accounting still exact.
//!
//! Measured with a 64 MiB bound and 160 MiB of random bytes read through
//! twice (`file_levels_off_near_the_bound`, `tests/cache.rs`): the disk
//! use (redb file and pack blocks) levels off at 1.01 times the bound.
//! With the chunk bytes inline in redb it levelled off at 1.27 times the
//! bound on an idle machine and 1.63 on a busy one, where freed pages wait
//! for the readers that can still see them.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::layout::{Key, LRU_KEY_LEN, LRU_VALUE_LEN};
use crate::digest::DIGEST_LEN;

/// Recency updates kept in memory before they are written on their own:
/// one small commit (some 50 KB) per this many distinct chunks read from
/// the cache, when nothing else writes.
pub(super) const TOUCHES_PER_FLUSH: usize = 1024;

/// Cost of a small record beyond its own bytes: its key, and its entry in
/// `cache-lru-v1` (key and value).
pub(super) const ENTRY_OVERHEAD: u64 = (DIGEST_LEN + LRU_KEY_LEN + LRU_VALUE_LEN) as u64;

/// redb's page size.
const PAGE: u64 = 4096;

/// A record at least this long gets a leaf of its own: a run of pages, a
/// power of two of them (redb's allocator), so it is charged for the run.
/// Shorter ones share pages with their neighbours.
const OWN_LEAF_AT: u64 = PAGE / 2;

/// What a leaf holding one record costs beyond the record: page header,
/// value length, key.
const LEAF_OVERHEAD: u64 = 8 + DIGEST_LEN as u64;

/// What a record of `len` bytes takes in the file: its share of pages, and
/// its entry.
pub(super) fn cost_of(len: u64) -> u64 {
    if len < OWN_LEAF_AT {
        return len + ENTRY_OVERHEAD;
    }
    let pages = (len + LEAF_OVERHEAD).div_ceil(PAGE);
    pages.next_power_of_two() * PAGE + (LRU_KEY_LEN + LRU_VALUE_LEN) as u64
}

/// A record's accounting.
#[derive(Clone, Copy, Debug)]
pub(super) struct Entry {
    pub(super) cost: u64,
    pub(super) tick: u64,
}

/// What is cached, by last use: the file's `cache-lru-v1` in memory, plus
/// the uses not yet written to it.
#[derive(Default)]
pub(super) struct Index {
    pub(super) entries: HashMap<Key, Entry>,
    /// The same entries, least recently used first. A tick names one use,
    /// so ticks are unique; the key in the pair only guards against a file
    /// that repeats one.
    by_age: BTreeSet<(u64, Key)>,
    pub(super) bytes: u64,
    next_tick: u64,
    /// Entries whose tick changed since it was last written.
    pub(super) dirty: HashSet<Key>,
    /// Bytes written since the last durable commit.
    pub(super) undurable: u64,
}

impl Index {
    pub(super) fn insert_entry(&mut self, key: Key, entry: Entry) {
        if let Some(old) = self.entries.insert(key, entry) {
            self.by_age.remove(&(old.tick, key));
            self.bytes -= old.cost;
        }
        self.by_age.insert((entry.tick, key));
        self.bytes += entry.cost;
        self.next_tick = self.next_tick.max(entry.tick + 1);
    }

    fn tick(&mut self) -> u64 {
        let t = self.next_tick;
        self.next_tick += 1;
        t
    }

    /// Records a use of `key`, if it is cached.
    pub(super) fn touch(&mut self, key: Key) {
        if let Some(e) = self.entries.get(&key).copied() {
            let tick = self.tick();
            self.by_age.remove(&(e.tick, key));
            self.by_age.insert((tick, key));
            self.entries.insert(key, Entry { tick, ..e });
            self.dirty.insert(key);
        }
    }

    pub(super) fn upsert(&mut self, key: Key, cost: u64) {
        let tick = self.tick();
        self.insert_entry(key, Entry { cost, tick });
        self.dirty.remove(&key);
    }

    pub(super) fn remove(&mut self, key: &Key) {
        if let Some(e) = self.entries.remove(key) {
            self.by_age.remove(&(e.tick, *key));
            self.bytes -= e.cost;
        }
        self.dirty.remove(key);
    }

    /// Removes least recently used entries until the rest fit `max_bytes`,
    /// and returns them.
    pub(super) fn evict_to(&mut self, max_bytes: u64) -> Vec<Key> {
        let mut victims = Vec::new();
        while self.bytes > max_bytes {
            let (_, key) = *self.by_age.first().expect("bytes > 0 means entries");
            self.remove(&key);
            victims.push(key);
        }
        victims
    }
}
