//! PathInfo backend in the embedded redb store: one table, `pathinfo-v2`,
//! in the same file as the castore's tables.
//!
//! Sharing the file is what makes publication safe: redb has one linear
//! commit history per file, and a PathInfo is committed with redb's default
//! `Durability::Immediate`, so the fsync that makes it durable also makes
//! durable every chunk, chunk list and directory committed before it, even
//! those a [`SyncMode::Deferred`](lazystore_castore::SyncMode) store left
//! unsynced. A crash can lose a PathInfo together with its data, never
//! keep one without it.
//!
//! The castore does not know about this table: it is opened here, in
//! [`RedbStore::database`], and created by the first put. A store with no
//! PathInfos yet has no such table, which reads treat as empty.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use lazystore_castore::{Digest, RedbStore};
use prost::Message;
use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::{PathInfo, PathInfoError, PathInfoService};
use crate::proto;
use crate::store_path::{STORE_PATH_HASH_LEN, StorePathHash};

/// Key of `pathinfo-v2`: the 20-byte hash part of the store path, as raw
/// bytes (redb's fixed-size array key; the on-disk format).
type HashKey = &'static [u8; STORE_PATH_HASH_LEN];

/// Store path hash → PathInfo record.
///
/// A record is the BLAKE3 of the rest (32 bytes), then the protobuf
/// encoding of `proto::PathInfo` (`proto/pathinfo.proto`), exactly as sent
/// on the wire. On every read the checksum is checked, the PathInfo
/// decoded and validated (`TryFrom`), and its store path checked against
/// the key, so damaged bytes are an error and never a wrong PathInfo —
/// a flipped bit in a NarHash included, which decodes fine: every other
/// record of the store is checked against a digest too (chunks,
/// directories and chunk lists by the digest that is their key).
const PATH_INFOS: TableDefinition<HashKey, &[u8]> = TableDefinition::new("pathinfo-v2");

/// The table of stores written before records carried a checksum: the
/// protobuf alone. Moved into `pathinfo-v2` on first use.
const PATH_INFOS_V1: TableDefinition<HashKey, &[u8]> = TableDefinition::new("pathinfo-v1");

/// Length of a record's checksum.
const CHECKSUM_LEN: usize = 32;

/// PathInfos sent ahead of a slow `list` consumer.
const LIST_BUFFER: usize = 64;

/// A stored record that is not the PathInfo its key names.
#[derive(Debug, thiserror::Error)]
enum CorruptRecord {
    /// The bytes are not a protobuf `PathInfo`.
    #[error("stored PathInfo {hash} does not decode")]
    Decode {
        /// The key, in nixbase32.
        hash: String,
        /// prost's error.
        #[source]
        source: prost::DecodeError,
    },
    /// The bytes are not those written: the checksum does not match.
    #[error("stored PathInfo {hash} fails its checksum")]
    Checksum {
        /// The key, in nixbase32.
        hash: String,
    },
    /// A valid PathInfo, stored under another path's hash.
    #[error("stored PathInfo {hash} is the PathInfo of {found}")]
    WrongKey {
        /// The key, in nixbase32.
        hash: String,
        /// The store path in the record.
        found: String,
    },
}

/// PathInfos in a [`RedbStore`], beside its blobs and directories.
#[derive(Clone, Debug)]
pub struct RedbPathInfoService {
    store: RedbStore,
    /// Whether `pathinfo-v1` records were moved into `pathinfo-v2` (or
    /// there were none) in this process: read on every call without a
    /// lock; the mutex is taken only until it is true.
    upgraded: Arc<AtomicBool>,
    upgrading: Arc<Mutex<()>>,
}

impl RedbPathInfoService {
    /// The PathInfo backend of `store`.
    pub fn new(store: RedbStore) -> Self {
        RedbPathInfoService {
            store,
            upgraded: Arc::default(),
            upgrading: Arc::default(),
        }
    }

    /// Moves the records of a store written before checksums into
    /// `pathinfo-v2`, once; each keeps its bytes, with their checksum in
    /// front. Blocks.
    fn upgrade(&self) -> Result<(), PathInfoError> {
        if self.upgraded.load(Ordering::Acquire) {
            return Ok(());
        }
        let _upgrading = self.upgrading.lock().unwrap_or_else(|p| p.into_inner());
        if self.upgraded.load(Ordering::Acquire) {
            return Ok(());
        }
        let has_v1 = {
            let txn = self.store.database().begin_read().map_err(backend)?;
            match txn.open_table(PATH_INFOS_V1) {
                Ok(_) => true,
                Err(TableError::TableDoesNotExist(_)) => false,
                Err(e) => return Err(backend(e)),
            }
        };
        if has_v1 {
            let txn = self.store.database().begin_write().map_err(backend)?;
            let mut moved = 0usize;
            {
                let old = txn.open_table(PATH_INFOS_V1).map_err(backend)?;
                let mut new = txn.open_table(PATH_INFOS).map_err(backend)?;
                for entry in old.iter().map_err(backend)? {
                    let (key, value) = entry.map_err(backend)?;
                    new.insert(key.value(), &with_checksum(value.value())[..])
                        .map_err(backend)?;
                    moved += 1;
                }
            }
            txn.delete_table(PATH_INFOS_V1).map_err(backend)?;
            self.store
                .commit(txn, redb::Durability::Immediate)
                .map_err(backend)?;
            tracing::info!(
                store = %self.store.path().display(),
                "{moved} PathInfo records now carry a checksum (pathinfo-v1 -> pathinfo-v2)"
            );
        }
        self.upgraded.store(true, Ordering::Release);
        Ok(())
    }

    /// The store it writes to.
    pub fn store(&self) -> &RedbStore {
        &self.store
    }

    /// Rewrites the stored record of a PathInfo, for corruption tests.
    /// False if it is not stored. Blocks.
    #[doc(hidden)]
    pub fn corrupt_record(
        &self,
        hash: &StorePathHash,
        f: impl FnOnce(&mut Vec<u8>),
    ) -> Result<bool, PathInfoError> {
        self.upgrade()?;
        let txn = self.store.database().begin_write().map_err(backend)?;
        {
            let mut table = txn.open_table(PATH_INFOS).map_err(backend)?;
            let Some(mut record) = table
                .get(hash.as_bytes())
                .map_err(backend)?
                .map(|v| v.value().to_vec())
            else {
                return Ok(false);
            };
            f(&mut record);
            table
                .insert(hash.as_bytes(), &record[..])
                .map_err(backend)?;
        }
        self.store
            .commit(txn, redb::Durability::Immediate)
            .map_err(backend)?;
        Ok(true)
    }
}

fn backend(e: impl Into<redb::Error>) -> PathInfoError {
    PathInfoError::Backend(Box::new(e.into()))
}

fn join_error(e: tokio::task::JoinError) -> PathInfoError {
    PathInfoError::Internal(Box::new(e))
}

/// `encoded` with its checksum in front: a record.
pub(super) fn with_checksum(encoded: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(CHECKSUM_LEN + encoded.len());
    record.extend_from_slice(Digest::of(encoded).as_bytes());
    record.extend_from_slice(encoded);
    record
}

/// Checks a stored record's checksum, decodes and validates it, and checks
/// it against its key.
pub(super) fn decode(hash: StorePathHash, record: &[u8]) -> Result<PathInfo, PathInfoError> {
    let checksum_fails = || {
        PathInfoError::Corrupt(Box::new(CorruptRecord::Checksum {
            hash: hash.to_string(),
        }))
    };
    let (checksum, encoded) = record
        .split_first_chunk::<CHECKSUM_LEN>()
        .ok_or_else(checksum_fails)?;
    if Digest::of(encoded).as_bytes() != checksum {
        return Err(checksum_fails());
    }
    let wire = proto::PathInfo::decode(encoded).map_err(|source| {
        PathInfoError::Corrupt(Box::new(CorruptRecord::Decode {
            hash: hash.to_string(),
            source,
        }))
    })?;
    let info = PathInfo::try_from(wire)?;
    if info.store_path.hash() != hash {
        return Err(PathInfoError::Corrupt(Box::new(CorruptRecord::WrongKey {
            hash: hash.to_string(),
            found: info.store_path.to_string(),
        })));
    }
    Ok(info)
}

/// Every record, decoded, into `tx`, until the receiver goes away. Runs on
/// a blocking thread, inside one read transaction: a consistent snapshot.
fn list_into(
    store: &RedbStore,
    tx: &tokio::sync::mpsc::Sender<Result<PathInfo, PathInfoError>>,
) -> Result<(), PathInfoError> {
    let txn = store.database().begin_read().map_err(backend)?;
    let table = match txn.open_table(PATH_INFOS) {
        Ok(table) => table,
        Err(TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(backend(e)),
    };
    for entry in table.iter().map_err(backend)? {
        let (key, value) = entry.map_err(backend)?;
        // A damaged record is reported and the listing goes on: one bad
        // record should not hide the others.
        if tx
            .blocking_send(decode(StorePathHash::from(*key.value()), value.value()))
            .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

#[async_trait]
impl PathInfoService for RedbPathInfoService {
    async fn get(&self, hash: &StorePathHash) -> Result<Option<PathInfo>, PathInfoError> {
        let store = self.store.clone();
        let hash = *hash;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.upgrade()?;
            let txn = store.database().begin_read().map_err(backend)?;
            let table = match txn.open_table(PATH_INFOS) {
                Ok(table) => table,
                Err(TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(backend(e)),
            };
            let record = table.get(hash.as_bytes()).map_err(backend)?;
            record.map(|v| decode(hash, v.value())).transpose()
        })
        .await
        .map_err(join_error)?
    }

    /// One write transaction, committed with `Durability::Immediate`: when
    /// this returns the PathInfo, and everything committed to the file
    /// before it, is on disk.
    async fn put(&self, info: PathInfo) -> Result<(), PathInfoError> {
        let store = self.store.clone();
        let record = with_checksum(&proto::PathInfo::from(&info).encode_to_vec());
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.upgrade()?;
            let txn = store.database().begin_write().map_err(backend)?;
            {
                let mut table = txn.open_table(PATH_INFOS).map_err(backend)?;
                table
                    .insert(info.store_path.hash().as_bytes(), &record[..])
                    .map_err(backend)?;
            }
            store
                .commit(txn, redb::Durability::Immediate)
                .map_err(backend)
        })
        .await
        .map_err(join_error)?
    }

    async fn delete(&self, hash: &StorePathHash) -> Result<bool, PathInfoError> {
        let store = self.store.clone();
        let hash = *hash;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.upgrade()?;
            let txn = store.database().begin_write().map_err(backend)?;
            let deleted = {
                let mut table = txn.open_table(PATH_INFOS).map_err(backend)?;
                table.remove(hash.as_bytes()).map_err(backend)?.is_some()
            };
            store
                .commit(txn, redb::Durability::Immediate)
                .map_err(backend)?;
            Ok(deleted)
        })
        .await
        .map_err(join_error)?
    }

    /// Streams from one read transaction on a blocking thread, started when
    /// the stream is first polled; in key order, which is no order a caller
    /// may rely on.
    fn list(&self) -> BoxStream<'static, Result<PathInfo, PathInfoError>> {
        let store = self.store.clone();
        let this = self.clone();
        let start = async move {
            let (tx, rx) = tokio::sync::mpsc::channel(LIST_BUFFER);
            tokio::task::spawn_blocking(move || {
                if let Err(e) = this.upgrade().and_then(|()| list_into(&store, &tx)) {
                    let _ = tx.blocking_send(Err(e));
                }
            });
            stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            })
        };
        stream::once(start).flatten().boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazystore_castore::Node;

    use crate::store_path::StorePath;

    fn info() -> PathInfo {
        PathInfo {
            store_path: StorePath::from_basename("00bgd045z0d4icpbc2yyz4gx48ak44la-hello").unwrap(),
            root: Node::Symlink {
                target: b"/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-other"[..]
                    .try_into()
                    .unwrap(),
            },
            references: Vec::new(),
            nar_size: 120,
            nar_sha256: [7; 32],
            signatures: Vec::new(),
            deriver: None,
            ca: None,
        }
    }

    fn service() -> (tempfile::TempDir, RedbPathInfoService) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
        (dir, RedbPathInfoService::new(store))
    }

    #[tokio::test]
    async fn a_flipped_bit_that_still_decodes_is_caught() {
        let (_dir, svc) = service();
        let info = info();
        let hash = info.store_path.hash();
        svc.put(info.clone()).await.unwrap();
        // A bit of the NarHash: the protobuf still decodes, to another hash.
        let flipped = svc
            .corrupt_record(&hash, |record| {
                let at = record.windows(32).position(|w| w == [7; 32]).unwrap();
                record[at] ^= 1;
            })
            .unwrap();
        assert!(flipped);
        let e = svc.get(&hash).await.unwrap_err();
        assert!(matches!(e, PathInfoError::Corrupt(_)), "{e}");
        assert!(
            lazystore_castore::error_chain(&e).contains("checksum"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn records_written_before_checksums_are_moved_on_first_use() {
        let (_dir, svc) = service();
        let info = info();
        let hash = info.store_path.hash();
        {
            let db = svc.store().database();
            let txn = db.begin_write().unwrap();
            {
                let mut v1 = txn.open_table(PATH_INFOS_V1).unwrap();
                let record = proto::PathInfo::from(&info).encode_to_vec();
                v1.insert(hash.as_bytes(), &record[..]).unwrap();
            }
            txn.commit().unwrap();
        }
        assert_eq!(svc.get(&hash).await.unwrap(), Some(info));
        let txn = svc.store().database().begin_read().unwrap();
        assert!(matches!(
            txn.open_table(PATH_INFOS_V1),
            Err(TableError::TableDoesNotExist(_))
        ));
    }
}
