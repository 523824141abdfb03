//! [`NarRoots`]: the castore root each NAR was ingested as, by NarHash and
//! NarSize, kept in a redb file so that a later process — a restarted
//! mount, another builder sharing the local cache, the next import — finds
//! a NAR it would otherwise download again.
//!
//! The index is kept in the redb file nearest to the process: the local
//! cache's when the [`Store`](crate::Store) has one, else the store's own
//! when it is `redb://`. A memory store, and a remote one without a local
//! cache, keep none ([`NarRoots::none`] finds nothing and keeps nothing).
//!
//! An entry is a hint, not a promise: garbage collection or the cache's
//! eviction may since have dropped part of the tree it names, and nothing
//! ties the two. A reader checks that the tree is whole before it uses one
//! (the importer walks it with `Store::find_missing`).
//!
//! Records are committed without an fsync: the next durable commit to the
//! file, or closing it, makes them durable. A crash may lose the newest;
//! their NARs are then downloaded again.

use std::path::Path;

use lazystore_castore::{CacheStore, Digest, Node, RedbStore, proto};
use prost::Message;
use redb::{ReadableDatabase, TableDefinition, TableError};

use crate::narinfo::format_sha256;

/// Key of `nar-roots-v1`: the NarHash (32 bytes) then the NarSize (u64
/// little endian).
const KEY_LEN: usize = 40;

/// NarHash ‖ NarSize → root record.
///
/// A record is the BLAKE3 of the key and the rest (32 bytes), then the
/// protobuf encoding of `castore.v1.Node`, the form a PathInfo's root has
/// on the wire. On every read the checksum is checked and the node decoded
/// and validated; a record that fails is logged and taken as absent, never
/// as a root. The key is in the checksum, so a record under another NAR's
/// key fails too.
const NAR_ROOTS: TableDefinition<&[u8; KEY_LEN], &[u8]> = TableDefinition::new("nar-roots-v1");

/// Length of a record's checksum.
const CHECKSUM_LEN: usize = 32;

/// Where the index of a [`Store`](crate::Store) is kept: set by the
/// constructor that opens the store, replaced by
/// [`Store::with_cache`](crate::Store::with_cache). Cheap to clone.
#[derive(Clone, Debug)]
pub struct NarRoots {
    file: File,
}

#[derive(Clone, Debug)]
enum File {
    None,
    Store(RedbStore),
    Cache(CacheStore),
}

/// Why the index could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NarRootsError {
    /// redb failed.
    #[error("the NAR root index in {path:?} failed")]
    Backend {
        /// The redb file.
        path: Box<Path>,
        /// redb's error.
        #[source]
        source: redb::Error,
    },
    /// The blocking task did not finish.
    #[error("the NAR root index's task failed")]
    Internal(#[source] tokio::task::JoinError),
}

/// A stored record that is not a root.
#[derive(Debug, thiserror::Error)]
enum Damaged {
    #[error("it fails its checksum")]
    Checksum,
    #[error("it does not decode")]
    Decode(#[source] prost::DecodeError),
    #[error("it is not a valid node")]
    Node(#[source] lazystore_castore::ValidateError),
}

impl NarRoots {
    /// No index: [`NarRoots::get`] finds nothing, [`NarRoots::put`] keeps
    /// nothing.
    pub fn none() -> Self {
        NarRoots { file: File::None }
    }

    /// The index in a redb store's file.
    pub fn in_store(store: RedbStore) -> Self {
        NarRoots {
            file: File::Store(store),
        }
    }

    /// The index in a local cache's file.
    pub fn in_cache(cache: CacheStore) -> Self {
        NarRoots {
            file: File::Cache(cache),
        }
    }

    /// The redb file the index is in, if any.
    pub fn path(&self) -> Option<&Path> {
        match &self.file {
            File::None => None,
            File::Store(s) => Some(s.path()),
            File::Cache(c) => Some(c.path()),
        }
    }

    /// The root recorded for the NAR with `nar_sha256` and `nar_size`. A
    /// damaged record is logged and taken as absent.
    pub async fn get(
        &self,
        nar_sha256: &[u8; 32],
        nar_size: u64,
    ) -> Result<Option<Node>, NarRootsError> {
        if matches!(self.file, File::None) {
            return Ok(None);
        }
        let key = key(nar_sha256, nar_size);
        let file = self.file.clone();
        let read = tokio::task::spawn_blocking(move || file.read(&key))
            .await
            .map_err(NarRootsError::Internal)?;
        let Some(record) = read.map_err(|source| self.backend(source))? else {
            return Ok(None);
        };
        match decode(&key, &record) {
            Ok(root) => Ok(Some(root)),
            Err(damaged) => {
                tracing::warn!(
                    path = %self.path().unwrap_or(Path::new("")).display(),
                    "NAR root index: ignoring the record of {} ({nar_size} bytes): {damaged}",
                    format_sha256(nar_sha256),
                );
                Ok(None)
            }
        }
    }

    /// Records `root` as the tree of the NAR with `nar_sha256` and
    /// `nar_size`, replacing what was recorded.
    pub async fn put(
        &self,
        nar_sha256: &[u8; 32],
        nar_size: u64,
        root: &Node,
    ) -> Result<(), NarRootsError> {
        if matches!(self.file, File::None) {
            return Ok(());
        }
        let key = key(nar_sha256, nar_size);
        let record = encode(&key, root);
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.write(&key, &record))
            .await
            .map_err(NarRootsError::Internal)?
            .map_err(|source| self.backend(source))
    }

    fn backend(&self, source: redb::Error) -> NarRootsError {
        NarRootsError::Backend {
            path: self.path().unwrap_or(Path::new("")).into(),
            source,
        }
    }

    /// Rewrites a stored record, for corruption tests. False if there is
    /// none. Blocks.
    #[doc(hidden)]
    pub fn corrupt_record(
        &self,
        nar_sha256: &[u8; 32],
        nar_size: u64,
        f: impl FnOnce(&mut Vec<u8>),
    ) -> Result<bool, redb::Error> {
        let key = key(nar_sha256, nar_size);
        let Some(mut record) = self.file.read(&key)? else {
            return Ok(false);
        };
        f(&mut record);
        self.file.write(&key, &record)?;
        Ok(true)
    }
}

impl File {
    fn database(&self) -> Option<&redb::Database> {
        match self {
            File::None => None,
            File::Store(s) => Some(s.database()),
            File::Cache(c) => Some(c.database()),
        }
    }

    /// The record under `key`. Blocks.
    fn read(&self, key: &[u8; KEY_LEN]) -> Result<Option<Vec<u8>>, redb::Error> {
        let Some(db) = self.database() else {
            return Ok(None);
        };
        let txn = db.begin_read()?;
        let table = match txn.open_table(NAR_ROOTS) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Writes `record` under `key`, committed without an fsync. Blocks.
    fn write(&self, key: &[u8; KEY_LEN], record: &[u8]) -> Result<(), redb::Error> {
        let Some(db) = self.database() else {
            return Ok(());
        };
        let txn = db.begin_write()?;
        txn.open_table(NAR_ROOTS)?.insert(key, record)?;
        match self {
            File::None => Ok(()),
            // Through the store, which flushes its packs first.
            File::Store(s) => s.commit(txn, redb::Durability::None),
            File::Cache(c) => c.commit(txn),
        }
    }
}

fn key(nar_sha256: &[u8; 32], nar_size: u64) -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    key[..32].copy_from_slice(nar_sha256);
    key[32..].copy_from_slice(&nar_size.to_le_bytes());
    key
}

fn checksum(key: &[u8; KEY_LEN], encoded: &[u8]) -> Digest {
    let mut keyed = Vec::with_capacity(KEY_LEN + encoded.len());
    keyed.extend_from_slice(key);
    keyed.extend_from_slice(encoded);
    Digest::of(&keyed)
}

fn encode(key: &[u8; KEY_LEN], root: &Node) -> Vec<u8> {
    let encoded = proto::Node::from(root).encode_to_vec();
    let mut record = Vec::with_capacity(CHECKSUM_LEN + encoded.len());
    record.extend_from_slice(checksum(key, &encoded).as_bytes());
    record.extend_from_slice(&encoded);
    record
}

fn decode(key: &[u8; KEY_LEN], record: &[u8]) -> Result<Node, Damaged> {
    let (sum, encoded) = record
        .split_first_chunk::<CHECKSUM_LEN>()
        .ok_or(Damaged::Checksum)?;
    if checksum(key, encoded).as_bytes() != sum {
        return Err(Damaged::Checksum);
    }
    let wire = proto::Node::decode(encoded).map_err(Damaged::Decode)?;
    Node::try_from(wire).map_err(Damaged::Node)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use lazystore_castore::CacheOptions;

    use super::*;

    fn dir(n: u8) -> Node {
        Node::Directory {
            digest: Digest::of(&[n]),
            size: 3,
        }
    }

    fn file(n: u8) -> Node {
        Node::File {
            digest: Digest::of(&[n]),
            size: 1 << 20,
            executable: true,
        }
    }

    /// The index in a new redb store and in a new cache.
    fn both(dir: &Path) -> [NarRoots; 2] {
        let store = RedbStore::open(dir.join("store.redb")).unwrap();
        let cache = CacheStore::open(dir.join("cache.redb"), CacheOptions::default()).unwrap();
        [NarRoots::in_store(store), NarRoots::in_cache(cache)]
    }

    #[tokio::test]
    async fn roots_round_trip_and_outlive_the_file_being_closed() {
        let tmp = tempfile::tempdir().unwrap();
        let symlink = Node::Symlink {
            target: b"/nix/store/x"[..].try_into().unwrap(),
        };
        for roots in both(tmp.path()) {
            let path = roots.path().unwrap().to_owned();
            assert_eq!(roots.get(&[1; 32], 10).await.unwrap(), None);
            roots.put(&[1; 32], 10, &dir(1)).await.unwrap();
            roots.put(&[1; 32], 11, &file(2)).await.unwrap();
            roots.put(&[2; 32], 10, &symlink).await.unwrap();
            assert_eq!(roots.get(&[1; 32], 10).await.unwrap(), Some(dir(1)));
            assert_eq!(roots.get(&[1; 32], 11).await.unwrap(), Some(file(2)));
            assert_eq!(
                roots.get(&[2; 32], 10).await.unwrap(),
                Some(symlink.clone())
            );
            // A later put replaces.
            roots.put(&[1; 32], 10, &dir(3)).await.unwrap();
            assert_eq!(
                roots.get(&[1; 32], 10).await.unwrap(),
                Some(dir(3)),
                "{path:?}"
            );
        }
        // Closed and opened again.
        for roots in both(tmp.path()) {
            assert_eq!(roots.get(&[1; 32], 10).await.unwrap(), Some(dir(3)));
            assert_eq!(roots.get(&[1; 32], 11).await.unwrap(), Some(file(2)));
        }
        let none = NarRoots::none();
        none.put(&[1; 32], 10, &dir(1)).await.unwrap();
        assert_eq!(none.get(&[1; 32], 10).await.unwrap(), None);
        assert_eq!(none.path(), None);
    }

    /// Warnings, as formatted lines.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_damaged_record_is_ignored_with_a_warning() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let tmp = tempfile::tempdir().unwrap();
        for roots in both(tmp.path()) {
            roots.put(&[5; 32], 7, &file(5)).await.unwrap();
            // A flipped bit of the digest: the protobuf still decodes, to
            // another node.
            let flipped = roots
                .corrupt_record(&[5; 32], 7, |record| {
                    let digest = Digest::of(&[5]);
                    let at = record
                        .windows(32)
                        .position(|w| w == digest.as_bytes())
                        .unwrap();
                    record[at] ^= 1;
                })
                .unwrap();
            assert!(flipped);
            assert_eq!(roots.get(&[5; 32], 7).await.unwrap(), None);
            // A record moved under another NAR's key.
            roots.put(&[6; 32], 7, &file(6)).await.unwrap();
            let good = {
                let mut good = Vec::new();
                roots
                    .corrupt_record(&[6; 32], 7, |r| good.clone_from(r))
                    .unwrap();
                good
            };
            roots
                .corrupt_record(&[5; 32], 7, |r| *r = good.clone())
                .unwrap();
            assert_eq!(roots.get(&[5; 32], 7).await.unwrap(), None);
            // Too short to hold a checksum.
            roots
                .corrupt_record(&[5; 32], 7, |r| r.truncate(5))
                .unwrap();
            assert_eq!(roots.get(&[5; 32], 7).await.unwrap(), None);
            // Mended by the next put.
            roots.put(&[5; 32], 7, &file(5)).await.unwrap();
            assert_eq!(roots.get(&[5; 32], 7).await.unwrap(), Some(file(5)));
        }
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let warnings: Vec<_> = log.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warnings.len(), 6, "{log}");
        let hash = format_sha256(&[5; 32]);
        assert!(
            warnings
                .iter()
                .all(|l| l.contains("ignoring the record") && l.contains(&hash)),
            "{log}"
        );
        assert!(warnings[0].contains("checksum"), "{log}");
    }
}
