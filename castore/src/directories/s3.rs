//! Directory backend on an object store ([`S3Store`]): each directory is a
//! record (its canonical encoding) in a pack (`s3_packs.rs`), its index
//! entry carrying its size, so a put checks its subdirectories without
//! reading them.
//!
//! Costs: `get` is one Range GET (and a LIST when the directory is not
//! known here); `get_many` one GET per pack, so `get_recursive` is one
//! GET per pack per level of the tree; `put_all` (how ingest stores
//! a path's directories) is one write, so a path's tree shares the two
//! PUTs of the pack it lands in, and becomes visible at once.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;

use super::{DirectoryError, DirectoryService, check_children};
use crate::digest::Digest;
use crate::nodes::Directory;
use crate::s3_config::S3Error;
use crate::s3_index::{Kind, Miss, Record};
use crate::s3_packs::WriteError;
use crate::s3_store::S3Store;

/// Directories in an [`S3Store`].
#[derive(Clone, Debug)]
pub struct S3DirectoryService {
    store: S3Store,
}

impl S3DirectoryService {
    /// The directory backend of `store`.
    pub fn new(store: S3Store) -> Self {
        S3DirectoryService { store }
    }
}

impl S3DirectoryService {
    /// Flips a byte of a stored directory in its pack, for corruption
    /// tests. False if it is not stored.
    #[doc(hidden)]
    pub async fn corrupt_directory(&self, digest: &Digest) -> Result<bool, DirectoryError> {
        let corrupted = self.store.corrupt_record(Kind::Directory, *digest).await;
        corrupted.map_err(backend)
    }
}

fn backend(e: S3Error) -> DirectoryError {
    DirectoryError::Backend(Box::new(e))
}

#[async_trait]
impl DirectoryService for S3DirectoryService {
    async fn get(&self, digest: &Digest) -> Result<Option<Directory>, DirectoryError> {
        let digests = [*digest];
        let read = self
            .store
            .locate_and_read(Kind::Directory, &digests, Miss::Recent);
        let Some((_, bytes)) = read.await.map_err(backend)?.pop().flatten() else {
            return Ok(None);
        };
        Ok(Some(Directory::decode_verified(*digest, &bytes)?))
    }

    async fn put(&self, dir: Directory) -> Result<Digest, DirectoryError> {
        let digest = dir.digest();
        self.put_all(vec![dir]).await?;
        Ok(digest)
    }

    /// One write for the whole run: every directory lands in one pack.
    async fn put_all(&self, dirs: Vec<Directory>) -> Result<Option<Digest>, DirectoryError> {
        let Some(last) = dirs.last().map(Directory::digest) else {
            return Ok(None);
        };
        // A child in the run must come before its parent (leaves first);
        // the others must be stored.
        let run: HashSet<Digest> = dirs.iter().map(Directory::digest).collect();
        let children: Vec<Digest> = dirs
            .iter()
            .flat_map(|d| d.subdirectories().map(|(_, child, _)| child))
            .filter(|child| !run.contains(child))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let records = dirs
            .iter()
            .map(|d| {
                let bytes = d.encode();
                Record {
                    kind: Kind::Directory,
                    digest: Digest::of(&bytes),
                    encoding: 0,
                    size: d.size(),
                    bytes: bytes.into(),
                }
            })
            .collect();
        let check = |sizes: &[Option<u64>]| {
            let mut stored: HashMap<Digest, u64> = children
                .iter()
                .zip(sizes)
                .filter_map(|(d, size)| Some((*d, (*size)?)))
                .collect();
            for dir in &dirs {
                check_children(dir, |d| Ok(stored.get(d).copied()))?;
                stored.insert(dir.digest(), dir.size());
            }
            Ok(())
        };
        let needs = (Kind::Directory, &children[..]);
        match self.store.write(records, needs, check).await {
            Ok(()) => Ok(Some(last)),
            Err(WriteError::Refused(e)) => Err(e),
            Err(WriteError::Store(e)) => Err(backend(e)),
        }
    }

    /// Every one located and read at once: one GET per pack.
    async fn get_many(&self, digests: &[Digest]) -> Result<Vec<Option<Directory>>, DirectoryError> {
        let read = self
            .store
            .locate_and_read(Kind::Directory, digests, Miss::Recent);
        read.await
            .map_err(backend)?
            .into_iter()
            .zip(digests)
            .map(|(record, digest)| {
                record
                    .map(|(_, bytes)| Directory::decode_verified(*digest, &bytes))
                    .transpose()
                    .map_err(DirectoryError::from)
            })
            .collect()
    }
}
