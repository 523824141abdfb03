//! PathInfo backend on an object store ([`S3Store`]): one object per
//! published path, `pathinfo/<nixbase32 hash>`, holding the record
//! `pathinfo-v2` keeps in redb (BLAKE3 of the rest, then the protobuf),
//! checked the same way on every read.
//!
//! A PathInfo is the one thing in the store that changes, and the one
//! thing that is not packed: it is written by its own PUT after everything
//! its root reaches is stored (the castore backends return only once their
//! packs and indexes are), so a replica that reads one finds its data. A
//! PUT replaces an object whole, so a reader sees the old record or the
//! new one. Costs: `get` one GET, `put` one PUT, `delete` a HEAD (to say
//! whether it was published) and a DELETE, `list` one LIST per 1000 paths
//! and a GET each, 16 at a time.

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use lazystore_castore::{S3Error, S3Store};
use prost::Message;

use super::redb::{decode, with_checksum};
use super::{PathInfo, PathInfoError, PathInfoService};
use crate::proto;
use crate::store_path::{StorePath, StorePathHash};

/// The prefix of PathInfo keys, under the store's.
const DIR: &str = "pathinfo/";

/// PathInfos in an [`S3Store`], beside its packs.
#[derive(Clone, Debug)]
pub struct S3PathInfoService {
    store: S3Store,
}

impl S3PathInfoService {
    /// The PathInfo backend of `store`.
    pub fn new(store: S3Store) -> Self {
        S3PathInfoService { store }
    }

    /// Rewrites the stored record of a path, for corruption tests. False
    /// if it is not stored.
    #[doc(hidden)]
    pub async fn corrupt_record(
        &self,
        hash: &StorePathHash,
        f: impl FnOnce(&mut Vec<u8>),
    ) -> Result<bool, PathInfoError> {
        let key = key(hash);
        let Some(bytes) = self.store.get(&key).await.map_err(backend)? else {
            return Ok(false);
        };
        let mut record = bytes.to_vec();
        f(&mut record);
        self.store.put(&key, record.into()).await.map_err(backend)?;
        Ok(true)
    }
}

fn key(hash: &StorePathHash) -> String {
    format!("{DIR}{hash}")
}

fn backend(e: S3Error) -> PathInfoError {
    PathInfoError::Backend(Box::new(e))
}

#[async_trait]
impl PathInfoService for S3PathInfoService {
    async fn get(&self, hash: &StorePathHash) -> Result<Option<PathInfo>, PathInfoError> {
        let record = self.store.get(&key(hash)).await.map_err(backend)?;
        record.map(|r| decode(*hash, &r)).transpose()
    }

    /// Checks the tree whole, then one PUT: once it returns, the object
    /// store holds the record (Garage on a write quorum of its nodes).
    ///
    /// The check sees the store as replicas see it after the latest
    /// collection: the condemned packs listed first (one LIST), a record
    /// only in one of them missing. So a path never comes to need a pack
    /// about to be deleted (`castore/src/s3_gc.rs`); one refused is
    /// uploaded again, and its writer stores such records anew.
    async fn put(&self, info: PathInfo) -> Result<(), PathInfoError> {
        self.store.refresh_condemned().await.map_err(backend)?;
        let store = crate::Store::s3(self.store.clone(), None);
        store.check_root(&info).await?;
        let missing = store.find_missing(&info.root).await;
        if let Some(missing) = missing.map_err(|e| PathInfoError::Backend(Box::new(e)))? {
            return Err(PathInfoError::Incomplete {
                store_path: info.store_path,
                missing,
            });
        }
        let record = with_checksum(&proto::PathInfo::from(&info).encode_to_vec());
        let key = key(&info.store_path.hash());
        self.store.put(&key, record.into()).await.map_err(backend)
    }

    async fn delete(&self, hash: &StorePathHash) -> Result<bool, PathInfoError> {
        let key = key(hash);
        if !self.store.exists(&key).await.map_err(backend)? {
            return Ok(false);
        }
        self.store.delete(&key).await.map_err(backend)?;
        Ok(true)
    }

    /// Lists the keys when first polled, then reads 16 records at a time;
    /// a damaged record, or a key that is not a store path hash, is
    /// reported and the listing goes on.
    fn list(&self) -> BoxStream<'static, Result<PathInfo, PathInfoError>> {
        let store = self.store.clone();
        let start = async move {
            let keys = match store.list(DIR, None).await {
                Ok(keys) => keys,
                Err(e) => return stream::iter(vec![Err(backend(e))]).boxed(),
            };
            stream::iter(keys)
                .map(move |name| {
                    let store = store.clone();
                    async move {
                        let hash = StorePath::parse_hash(&name).map_err(|e| {
                            PathInfoError::Corrupt(format!("S3 key {DIR}{name}: {e}").into())
                        })?;
                        let record = store.get(&key(&hash)).await.map_err(backend)?;
                        // Deleted since it was listed: not published.
                        record.map(|r| decode(hash, &r)).transpose()
                    }
                })
                .buffered(16)
                .filter_map(|r| async move { r.transpose() })
                .boxed()
        };
        stream::once(start).flatten().boxed()
    }
}
