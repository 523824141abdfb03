//! In-memory PathInfo backend, for tests and throwaway stores.

use std::collections::HashMap;
use std::sync::RwLock;

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};

use super::{PathInfo, PathInfoError, PathInfoService};
use crate::store_path::StorePathHash;

/// PathInfos in a hash map keyed by store path hash.
#[derive(Default)]
pub struct MemoryPathInfoService {
    // A std RwLock: critical sections are single map operations, no await.
    infos: RwLock<HashMap<StorePathHash, PathInfo>>,
}

impl MemoryPathInfoService {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl PathInfoService for MemoryPathInfoService {
    async fn get(&self, hash: &StorePathHash) -> Result<Option<PathInfo>, PathInfoError> {
        Ok(self.infos.read().expect("lock poisoned").get(hash).cloned())
    }

    async fn put(&self, info: PathInfo) -> Result<(), PathInfoError> {
        let hash = info.store_path.hash();
        self.infos
            .write()
            .expect("lock poisoned")
            .insert(hash, info);
        Ok(())
    }

    async fn delete(&self, hash: &StorePathHash) -> Result<bool, PathInfoError> {
        Ok(self
            .infos
            .write()
            .expect("lock poisoned")
            .remove(hash)
            .is_some())
    }

    fn list(&self) -> BoxStream<'static, Result<PathInfo, PathInfoError>> {
        let all: Vec<_> = self
            .infos
            .read()
            .expect("lock poisoned")
            .values()
            .cloned()
            .collect();
        stream::iter(all.into_iter().map(Ok)).boxed()
    }
}
