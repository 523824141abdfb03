//! How the cache writes: one transaction stores and drops records with
//! their entries, writes the recency updates held in memory and evicts
//! what no longer fits, then the space of what it removed is freed; and
//! the last such write, when the store closes.
//!
//! Durability: a cache can lose its newest writes, so commits skip the
//! fsync, and the packs are never fsynced: a chunk whose bytes a crash lost
//! fails its check when read and is fetched again. redb reuses the pages a
//! commit frees only after a durable commit, so a commit is made durable
//! once a sixteenth of the bound (at most [`DURABLE_EVERY_BYTES`]) has been
//! written since the last one, and closing the store makes everything
//! durable. Evicted chunks' blocks are punched out after the commit that
//! forgets them; a reader holding an older snapshot then reads zeros (or
//! finds the pack deleted), fails the check, and refetches.

use redb::{Durability, WriteTransaction};

use super::Inner;
use super::accounting::Entry;
use super::files::file_path;
use super::layout::{Key, Record, Tables, entry_bytes};
use crate::digest::Digest;
use crate::packs::Location;

/// Most bytes written by commits without an fsync before one is made
/// durable, letting redb reuse the pages the commits since the last one
/// freed (a sixteenth of the bound, for smaller caches).
const DURABLE_EVERY_BYTES: u64 = 16 << 20;

/// What a write frees once it has committed.
#[derive(Default)]
pub(super) struct Freed {
    /// Chunk bytes in the packs.
    pub(super) chunks: Vec<Location>,
    /// Files in the files directory.
    pub(super) files: Vec<Digest>,
}

impl Inner {
    /// Stores `inserts` and removes `drops` in one transaction, together
    /// with their entries, the recency updates still in memory and the
    /// eviction of whatever no longer fits. Commits without an fsync unless
    /// `durable` or [`DURABLE_EVERY_BYTES`] have been written since the last
    /// durable commit; commits nothing if there is nothing to write (and
    /// `durable` is false).
    pub(super) fn write(
        &self,
        inserts: &[Record],
        drops: &[Key],
        durable: bool,
    ) -> Result<(), redb::Error> {
        self.write_touched(inserts, drops, &[], durable)
    }

    /// [`Inner::write`], and counts a use of each of `touched` after the
    /// inserts: records used while they were queued (`queue.rs`).
    pub(super) fn write_touched(
        &self,
        inserts: &[Record],
        drops: &[Key],
        touched: &[Key],
        durable: bool,
    ) -> Result<(), redb::Error> {
        let mut txn = self.db.begin_write()?;
        let mut freed = Freed::default();
        let planned = self
            .fill(&txn, inserts, drops, touched, &mut freed)
            .and_then(|written| {
                let Some(written) = written.or(durable.then_some(0)) else {
                    return Ok(None);
                };
                let every = DURABLE_EVERY_BYTES.min(self.max_bytes / 16);
                let durable = durable || self.index().undurable + written >= every;
                let level = if durable {
                    Durability::Immediate
                } else {
                    Durability::None
                };
                txn.set_durability(level)?;
                Ok(Some((written, durable)))
            });
        let (written, durable) = match planned {
            // Nothing changed, in the file or the index: the transaction is
            // dropped, which aborts it.
            Ok(None) => return Ok(()),
            Ok(Some(p)) => p,
            Err(e) => {
                drop(txn);
                self.reload();
                return Err(e);
            }
        };
        // Readers of the committed index must find its bytes in the files.
        if let Err(e) = self.packs.flush() {
            drop(txn);
            self.reload();
            return Err(e.into());
        }
        if let Err(e) = txn.commit() {
            self.reload();
            return Err(e.into());
        }
        // Only now that nothing names them: a reader still holding an older
        // snapshot finds zeros or no file, fails the check, and refetches.
        if let Err(e) = self.packs.punch(&freed.chunks) {
            tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "cache: cannot free the space of evicted chunks"
            );
        }
        for digest in freed.files {
            let path = file_path(&self.files_dir, &digest);
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "cache: cannot remove an evicted file");
            }
        }
        let mut index = self.index();
        index.undurable = if durable {
            0
        } else {
            index.undurable + written
        };
        Ok(())
    }

    /// The body of [`Inner::write`]: returns the bytes written, or `None`
    /// if there was nothing to do.
    fn fill(
        &self,
        txn: &WriteTransaction,
        inserts: &[Record],
        drops: &[Key],
        touched: &[Key],
        freed: &mut Freed,
    ) -> Result<Option<u64>, redb::Error> {
        let mut t = Tables::new(txn)?;
        // A record larger than the whole cache would only push everything
        // else out, itself next.
        let inserts: Vec<&Record> = inserts
            .iter()
            .filter(|r| r.cost() <= self.max_bytes)
            .collect();
        for &key in drops {
            t.remove(key, freed)?;
        }
        let mut written = 0;
        for r in &inserts {
            r.insert(&mut t, &self.packs, freed)?;
            written += r.len() as u64;
        }
        let (victims, entries) = {
            let mut index = self.index();
            for key in drops {
                index.remove(key);
            }
            for r in &inserts {
                index.upsert(r.key(), r.cost());
            }
            for &key in touched {
                index.touch(key);
            }
            let victims = index.evict_to(self.max_bytes);
            self.evictions
                .fetch_add(victims.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let mut keys = std::mem::take(&mut index.dirty);
            keys.extend(inserts.iter().map(|r| r.key()));
            let entries: Vec<(Key, Entry)> = keys
                .into_iter()
                .filter_map(|k| index.entries.get(&k).map(|e| (k, *e)))
                .collect();
            (victims, entries)
        };
        if drops.is_empty() && inserts.is_empty() && victims.is_empty() && entries.is_empty() {
            return Ok(None);
        }
        for key in victims {
            t.remove(key, freed)?;
        }
        for (key, e) in entries {
            t.lru
                .insert(&key.to_bytes(), &entry_bytes(e.cost, e.tick))?;
        }
        Ok(Some(written))
    }
}

impl Drop for Inner {
    /// Writes the uses still in memory, durably. What was queued is
    /// written already: the writer stops, writing it, before the last
    /// handle lets go of the cache (`queue.rs`).
    fn drop(&mut self) {
        let pending = {
            let index = self.index();
            !index.dirty.is_empty() || index.undurable > 0
        };
        if pending && let Err(e) = self.write(&[], &[], true) {
            tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "cache: closing lost recency updates"
            );
        }
    }
}
