//! PathInfo backend in the embedded redb store: one table, `pathinfo-v1`,
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

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use lazystore_castore::RedbStore;
use prost::Message;
use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::{PathInfo, PathInfoError, PathInfoService};
use crate::proto;
use crate::store_path::{STORE_PATH_HASH_LEN, StorePathHash};

/// Key of `pathinfo-v1`: the 20-byte hash part of the store path, as raw
/// bytes (redb's fixed-size array key; the on-disk format).
type HashKey = &'static [u8; STORE_PATH_HASH_LEN];

/// Store path hash → PathInfo record.
///
/// A record is the protobuf encoding of `proto::PathInfo`
/// (`proto/pathinfo.proto`), exactly as sent on the wire. It is decoded and
/// validated (`TryFrom`) on every read, and its store path checked against
/// the key, so damaged bytes are an error and never a wrong PathInfo.
const PATH_INFOS: TableDefinition<HashKey, &[u8]> = TableDefinition::new("pathinfo-v1");

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
}

impl RedbPathInfoService {
    /// The PathInfo backend of `store`.
    pub fn new(store: RedbStore) -> Self {
        RedbPathInfoService { store }
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

/// Decodes, validates and checks a stored record against its key.
fn decode(hash: StorePathHash, record: &[u8]) -> Result<PathInfo, PathInfoError> {
    let wire = proto::PathInfo::decode(record).map_err(|source| {
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
        tokio::task::spawn_blocking(move || {
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
        let record = proto::PathInfo::from(&info).encode_to_vec();
        tokio::task::spawn_blocking(move || {
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
        tokio::task::spawn_blocking(move || {
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
        let start = async move {
            let (tx, rx) = tokio::sync::mpsc::channel(LIST_BUFFER);
            tokio::task::spawn_blocking(move || {
                if let Err(e) = list_into(&store, &tx) {
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
