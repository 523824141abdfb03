//! When each published path was last asked for ([`PathUses`]), so that
//! "not used for 90 days" is a retention rule `lazystore gc` can apply,
//! and the layer that records it ([`UsedPathInfos`]): a serving store's
//! PathInfo service with every successful `get` (a builder's lookup, a Nix
//! client's narinfo) and `put` noted.
//!
//! Uses are gathered in memory and written to the store's redb file at
//! most every [`FLUSH_EVERY`], in one transaction with `Durability::None`
//! (a use is a hint, not data: the next durable commit of the file, a
//! PathInfo put or the durable flush at shutdown) makes it durable): a crash
//! loses the uses since then, which makes those paths look older than they
//! are by that much. A path with no record (published before
//! uses were kept, or by another process) counts as used when a
//! collection first sees it, and ages from then.
//!
//! Record, `path-uses-v1`: key the 20-byte store path hash; value 16 bytes,
//! the seconds since the Unix epoch (u64 little endian) then the first 8
//! bytes of the BLAKE3 of key and seconds, so a damaged record is noticed
//! (and counts as "used now", the safe side) instead of aging a path.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::stream::BoxStream;
use lazystore_castore::RedbStore;
use redb::{ReadableDatabase, ReadableTable as _, TableDefinition, TableError};

use super::{Facts, PathInfo, PathInfoError, PathInfoService};
use crate::store_path::{STORE_PATH_HASH_LEN, StorePathHash};

const PATH_USES: TableDefinition<&[u8; STORE_PATH_HASH_LEN], &[u8; 16]> =
    TableDefinition::new("path-uses-v1");

/// Uses gathered in memory are written at most this often.
pub const FLUSH_EVERY: Duration = Duration::from_secs(60);

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn record(hash: &StorePathHash, secs: u64) -> [u8; 16] {
    let mut out = [0; 16];
    out[..8].copy_from_slice(&secs.to_le_bytes());
    out[8..].copy_from_slice(&check(hash, secs));
    out
}

fn check(hash: &StorePathHash, secs: u64) -> [u8; 8] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(hash.as_bytes());
    hasher.update(&secs.to_le_bytes());
    hasher.finalize().as_bytes()[..8]
        .try_into()
        .expect("8 bytes")
}

fn decode(hash: &StorePathHash, value: &[u8; 16]) -> Option<u64> {
    let secs = u64::from_le_bytes(value[..8].try_into().expect("8 bytes"));
    (value[8..] == check(hash, secs)).then_some(secs)
}

fn backend(e: impl Into<redb::Error>) -> PathInfoError {
    PathInfoError::Backend(Box::new(e.into()))
}

/// The last-use record of a redb store's paths.
pub struct PathUses {
    store: RedbStore,
    /// Uses not written yet.
    pending: Mutex<HashMap<StorePathHash, u64>>,
}

impl PathUses {
    /// The record in `store`'s file.
    pub fn new(store: RedbStore) -> Self {
        PathUses {
            store,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Notes that `hash` was asked for now.
    pub fn used(&self, hash: &StorePathHash) {
        self.used_at(hash, now_secs());
    }

    /// Notes that `hash` was asked for at `secs`.
    pub fn used_at(&self, hash: &StorePathHash, secs: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let at = pending.entry(*hash).or_insert(secs);
        *at = (*at).max(secs);
    }

    /// Writes the uses gathered so far; `durable`: on disk when this
    /// returns (else with the file's next durable commit). Blocks: call
    /// from `spawn_blocking`.
    pub fn flush(&self, durable: bool) -> Result<(), PathInfoError> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if pending.is_empty() && !durable {
            return Ok(());
        }
        let written = self.write(&pending, durable);
        if written.is_err() {
            // Not lost: written with the next flush.
            for (hash, secs) in pending {
                self.used_at(&hash, secs);
            }
        }
        written
    }

    fn write(
        &self,
        pending: &HashMap<StorePathHash, u64>,
        durable: bool,
    ) -> Result<(), PathInfoError> {
        let txn = self.store.database().begin_write().map_err(backend)?;
        {
            let mut table = txn.open_table(PATH_USES).map_err(backend)?;
            for (hash, secs) in pending {
                let stored = table
                    .get(hash.as_bytes())
                    .map_err(backend)?
                    .and_then(|v| decode(hash, v.value()));
                if stored.is_none_or(|stored| stored < *secs) {
                    table
                        .insert(hash.as_bytes(), &record(hash, *secs))
                        .map_err(backend)?;
                }
            }
        }
        self.store
            .commit(
                txn,
                if durable {
                    redb::Durability::Immediate
                } else {
                    redb::Durability::None
                },
            )
            .map_err(backend)
    }

    /// The last use of each of `hashes`, flushing first; a path with no
    /// readable record is recorded as used at `now` (and so reported).
    /// Blocks: call from `spawn_blocking`.
    pub fn last_uses(
        &self,
        hashes: &[StorePathHash],
        now: u64,
    ) -> Result<HashMap<StorePathHash, u64>, PathInfoError> {
        self.flush(false)?;
        let mut uses = HashMap::with_capacity(hashes.len());
        {
            let txn = self.store.database().begin_read().map_err(backend)?;
            match txn.open_table(PATH_USES) {
                Ok(table) => {
                    for hash in hashes {
                        if let Some(secs) = table
                            .get(hash.as_bytes())
                            .map_err(backend)?
                            .and_then(|v| decode(hash, v.value()))
                        {
                            uses.insert(*hash, secs);
                        }
                    }
                }
                Err(TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(backend(e)),
            }
        }
        for hash in hashes {
            if !uses.contains_key(hash) {
                self.used_at(hash, now);
                uses.insert(*hash, now);
            }
        }
        self.flush(true)?;
        Ok(uses)
    }
}

/// A PathInfo service whose successful gets and puts are noted in a
/// [`PathUses`].
pub struct UsedPathInfos {
    inner: std::sync::Arc<dyn PathInfoService>,
    uses: std::sync::Arc<PathUses>,
}

impl UsedPathInfos {
    /// `inner`, its uses noted in `uses`.
    pub fn new(inner: std::sync::Arc<dyn PathInfoService>, uses: std::sync::Arc<PathUses>) -> Self {
        UsedPathInfos { inner, uses }
    }
}

#[async_trait]
impl PathInfoService for UsedPathInfos {
    async fn get(&self, hash: &StorePathHash) -> Result<Option<PathInfo>, PathInfoError> {
        let got = self.inner.get(hash).await?;
        if got.is_some() {
            self.uses.used(hash);
        }
        Ok(got)
    }

    async fn get_published(&self, hash: &StorePathHash) -> Result<Option<PathInfo>, PathInfoError> {
        let got = self.inner.get_published(hash).await?;
        if got.is_some() {
            self.uses.used(hash);
        }
        Ok(got)
    }

    async fn listing(&self, hash: &StorePathHash) -> Result<Option<Vec<u8>>, PathInfoError> {
        self.inner.listing(hash).await
    }

    async fn facts(&self, hash: &StorePathHash) -> Result<Option<Facts>, PathInfoError> {
        let got = self.inner.facts(hash).await?;
        if got.is_some() {
            self.uses.used(hash);
        }
        Ok(got)
    }

    async fn put(&self, info: PathInfo) -> Result<(), PathInfoError> {
        let hash = info.store_path.hash();
        self.inner.put(info).await?;
        self.uses.used(&hash);
        Ok(())
    }

    fn list(&self) -> BoxStream<'static, Result<PathInfo, PathInfoError>> {
        self.inner.list()
    }

    async fn delete(&self, hash: &StorePathHash) -> Result<bool, PathInfoError> {
        self.inner.delete(hash).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_keep_the_latest_and_damaged_records_count_as_now() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
        let uses = PathUses::new(store.clone());
        let (a, b) = (StorePathHash::from([1; 20]), StorePathHash::from([2; 20]));
        uses.used_at(&a, 100);
        uses.flush(false).unwrap();
        uses.used_at(&a, 50);
        uses.used_at(&b, 70);
        let got = uses.last_uses(&[a, b], 1000).unwrap();
        assert_eq!((got[&a], got[&b]), (100, 70));
        // Damage a's record: it counts as used now.
        let txn = store.database().begin_write().unwrap();
        {
            let mut table = txn.open_table(PATH_USES).unwrap();
            let mut bad = record(&a, 100);
            bad[0] ^= 1;
            table.insert(a.as_bytes(), &bad).unwrap();
        }
        txn.commit().unwrap();
        let got = uses.last_uses(&[a, b], 1000).unwrap();
        assert_eq!((got[&a], got[&b]), (1000, 70));
        let unknown = StorePathHash::from([3; 20]);
        assert_eq!(uses.last_uses(&[unknown], 2000).unwrap()[&unknown], 2000);
    }
}
