//! Directory backend in the embedded redb store (`directories-v1`).
//!
//! Puts check their subdirectories inside the write transaction, so a
//! concurrent writer can't slip a dangling directory in between check and
//! insert; gets decode and verify the stored bytes every time. Commits are
//! as durable as the store's [`SyncMode`] says.
//!
//! [`SyncMode`]: crate::SyncMode

use std::collections::{HashSet, VecDeque};

use async_trait::async_trait;
use redb::{ReadableDatabase, ReadableTable};

use super::{DirectoryError, DirectoryService, check_children};
use crate::digest::Digest;
use crate::nodes::Directory;
use crate::redb_store::{ReadTables, RedbStore, Tables};

// Directory record (`directories-v1`, keyed by the directory digest):
//
// | offset | size | field                                              |
// |--------|------|----------------------------------------------------|
// | 0      | 8    | directory size (`Directory::size`), u64 little endian |
// | 8      | n    | canonical encoding, whose BLAKE3 is the key        |
//
// The size is kept beside the encoding so a parent's put checks a child's
// size without decoding it.
const DIR_SIZE_AT: usize = 0;
const DIR_ENCODING_AT: usize = 8;

/// A stored record too short to hold a directory.
#[derive(Debug, thiserror::Error)]
#[error("stored record of directory {0} is truncated")]
struct TruncatedRecord(Digest);

/// Directories in a [`RedbStore`].
#[derive(Clone, Debug)]
pub struct RedbDirectoryService {
    store: RedbStore,
}

impl RedbDirectoryService {
    /// The directory backend of `store`.
    pub fn new(store: RedbStore) -> Self {
        RedbDirectoryService { store }
    }

    /// The store it writes to.
    pub fn store(&self) -> &RedbStore {
        &self.store
    }

    /// Runs `f` on a read transaction's tables on a blocking thread.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ReadTables) -> Result<T, DirectoryError> + Send + 'static,
    ) -> Result<T, DirectoryError> {
        let db = self.store.database().clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(backend)?;
            let tables = ReadTables::new(&txn).map_err(backend)?;
            f(&tables)
        })
        .await
        .map_err(|e| DirectoryError::Internal(e.into()))?
    }

    /// Replaces the stored encoding of a directory, for corruption tests.
    /// False if it is not stored.
    #[doc(hidden)]
    pub fn corrupt_directory(
        &self,
        digest: &Digest,
        f: impl FnOnce(&mut Vec<u8>),
    ) -> Result<bool, DirectoryError> {
        let txn = self.store.database().begin_write().map_err(backend)?;
        {
            let mut tables = Tables::new(&txn).map_err(backend)?;
            let Some(mut record) = tables
                .directories
                .get(digest.as_bytes())
                .map_err(backend)?
                .map(|v| v.value().to_vec())
            else {
                return Ok(false);
            };
            let mut encoding = record.split_off(DIR_ENCODING_AT.min(record.len()));
            f(&mut encoding);
            record.extend_from_slice(&encoding);
            tables
                .directories
                .insert(digest.as_bytes(), &record[..])
                .map_err(backend)?;
        }
        self.store
            .commit(txn, redb::Durability::Immediate)
            .map_err(backend)?;
        Ok(true)
    }
}

fn backend(e: impl Into<redb::Error>) -> DirectoryError {
    DirectoryError::Backend(Box::new(e.into()))
}

/// The stored size of `record`'s directory.
fn record_size(digest: &Digest, record: &[u8]) -> Result<u64, DirectoryError> {
    record
        .get(DIR_SIZE_AT..DIR_ENCODING_AT)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| DirectoryError::Corrupt(Box::new(TruncatedRecord(*digest))))
}

/// Decodes and verifies a stored record.
pub(crate) fn decode(digest: Digest, record: &[u8]) -> Result<Directory, DirectoryError> {
    record_size(&digest, record)?;
    Ok(Directory::decode_verified(
        digest,
        &record[DIR_ENCODING_AT..],
    )?)
}

fn get(tables: &ReadTables, digest: Digest) -> Result<Option<Directory>, DirectoryError> {
    tables
        .directories
        .get(digest.as_bytes())
        .map_err(backend)?
        .map(|v| decode(digest, v.value()))
        .transpose()
}

/// A directory as stored, and its digest.
fn encode(dir: &Directory) -> (Digest, Vec<u8>) {
    let encoding = dir.encode();
    let mut record = Vec::with_capacity(DIR_ENCODING_AT + encoding.len());
    record.extend_from_slice(&dir.size().to_le_bytes());
    record.extend_from_slice(&encoding);
    (Digest::of(&encoding), record)
}

/// Stores `dirs` in order, leaves first; returns their digests. All of
/// them are checked and inserted in one write transaction, so a later one
/// may name an earlier one as a subdirectory and a refused one stores none.
fn put_dirs(store: &RedbStore, dirs: Vec<Directory>) -> Result<Vec<Digest>, DirectoryError> {
    let encoded: Vec<(Digest, Vec<u8>)> = dirs.iter().map(encode).collect();
    // Directories stored already (shared by many store paths) cost a read,
    // not a commit; a damaged one is rewritten. They were committed as
    // durably as these would be: the sync mode is the store's.
    {
        let txn = store.database().begin_read().map_err(backend)?;
        let tables = ReadTables::new(&txn).map_err(backend)?;
        let mut all_stored = true;
        for (digest, record) in &encoded {
            let stored = tables.directories.get(digest.as_bytes()).map_err(backend)?;
            all_stored = stored.is_some_and(|v| v.value() == &record[..]);
            if !all_stored {
                break;
            }
        }
        if all_stored {
            return Ok(encoded.into_iter().map(|(d, _)| d).collect());
        }
    }
    let txn = store.database().begin_write().map_err(backend)?;
    {
        let mut tables = Tables::new(&txn).map_err(backend)?;
        for (dir, (digest, record)) in dirs.iter().zip(&encoded) {
            check_children(dir, |child| {
                tables
                    .directories
                    .get(child.as_bytes())
                    .map_err(backend)?
                    .map(|v| record_size(child, v.value()))
                    .transpose()
            })?;
            tables
                .directories
                .insert(digest.as_bytes(), &record[..])
                .map_err(backend)?;
        }
    }
    store.commit(txn, store.durability()).map_err(backend)?;
    Ok(encoded.into_iter().map(|(d, _)| d).collect())
}

#[async_trait]
impl DirectoryService for RedbDirectoryService {
    async fn get(&self, digest: &Digest) -> Result<Option<Directory>, DirectoryError> {
        let digest = *digest;
        self.read(move |t| get(t, digest)).await
    }

    /// In one read transaction.
    async fn get_many(&self, digests: &[Digest]) -> Result<Vec<Option<Directory>>, DirectoryError> {
        let digests = digests.to_vec();
        self.read(move |t| digests.into_iter().map(|d| get(t, d)).collect())
            .await
    }

    async fn put(&self, dir: Directory) -> Result<Digest, DirectoryError> {
        let store = self.store.clone();
        let digests = tokio::task::spawn_blocking(move || put_dirs(&store, vec![dir]))
            .await
            .map_err(|e| DirectoryError::Internal(e.into()))??;
        Ok(digests[0])
    }

    /// All in one transaction: one commit for a whole tree, and none of it
    /// stored if any directory is refused.
    async fn put_all(&self, dirs: Vec<Directory>) -> Result<Option<Digest>, DirectoryError> {
        if dirs.is_empty() {
            return Ok(None);
        }
        let store = self.store.clone();
        let digests = tokio::task::spawn_blocking(move || put_dirs(&store, dirs))
            .await
            .map_err(|e| DirectoryError::Internal(e.into()))??;
        Ok(digests.last().copied())
    }

    /// One read transaction for the whole walk, so it sees one snapshot.
    async fn get_recursive(&self, root: &Digest) -> Result<Vec<Directory>, DirectoryError> {
        let root = *root;
        self.read(move |t| {
            let mut out = Vec::new();
            let mut seen = HashSet::from([root]);
            let mut queue = VecDeque::from([root]);
            while let Some(d) = queue.pop_front() {
                let dir = get(t, d)?.ok_or(DirectoryError::NotFound(d))?;
                for (_, child, _) in dir.subdirectories() {
                    if seen.insert(child) {
                        queue.push_back(child);
                    }
                }
                out.push(dir);
            }
            Ok(out)
        })
        .await
    }
}
