//! In-memory directory backend, for tests and throwaway stores.

use std::collections::HashMap;
use std::sync::RwLock;

use async_trait::async_trait;
use bytes::Bytes;

use super::{DirectoryError, DirectoryService, check_children};
use crate::digest::Digest;
use crate::nodes::Directory;

/// Encoded directories in a hash map, with each one's size beside it.
#[derive(Default)]
pub struct MemoryDirectoryService {
    // A std RwLock: critical sections are single map operations, no await.
    dirs: RwLock<HashMap<Digest, (Bytes, u64)>>,
}

impl MemoryDirectoryService {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the stored encoding of a directory, for corruption tests.
    /// False if it is not stored.
    #[doc(hidden)]
    pub fn corrupt_directory(&self, digest: &Digest, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        let mut dirs = self.dirs.write().expect("lock poisoned");
        let Some((bytes, _)) = dirs.get_mut(digest) else {
            return false;
        };
        let mut damaged = bytes.to_vec();
        f(&mut damaged);
        *bytes = damaged.into();
        true
    }
}

#[async_trait]
impl DirectoryService for MemoryDirectoryService {
    async fn get(&self, digest: &Digest) -> Result<Option<Directory>, DirectoryError> {
        // Stored encoded, and decoded and verified on every get, like any
        // backend whose bytes could have been damaged.
        let bytes = match self.dirs.read().expect("lock poisoned").get(digest) {
            Some((b, _)) => b.clone(),
            None => return Ok(None),
        };
        Ok(Some(Directory::decode_verified(*digest, &bytes)?))
    }

    async fn put(&self, dir: Directory) -> Result<Digest, DirectoryError> {
        let mut dirs = self.dirs.write().expect("lock poisoned");
        check_children(&dir, |d| Ok(dirs.get(d).map(|(_, size)| *size)))?;
        let bytes = Bytes::from(dir.encode());
        let digest = Digest::of(&bytes);
        dirs.insert(digest, (bytes, dir.size()));
        Ok(digest)
    }
}
