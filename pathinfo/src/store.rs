//! [`Store`]: the three services a store is made of — blobs, directories,
//! path infos — opened together from one URL.

use std::sync::Arc;

use lazystore_castore::blobs::MemoryBlobService;
use lazystore_castore::directories::MemoryDirectoryService;
use lazystore_castore::{Blobs, ChunkerParams, DirectoryService};

use crate::pathinfos::{MemoryPathInfoService, PathInfoService};

/// A whole store: chunked blobs, directories and path infos.
#[derive(Clone)]
pub struct Store {
    /// File contents, verified on read.
    pub blobs: Blobs,
    /// Directories, verified on get.
    pub directories: Arc<dyn DirectoryService>,
    /// Store paths, published last.
    pub path_infos: Arc<dyn PathInfoService>,
}

/// Why a store URL can't be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    /// The URL's scheme is not one [`Store::open`] knows.
    #[error(
        "unsupported store URL {0:?}: expected memory://, redb:///abs/path/store.redb, \
         grpc+http://host:port or grpc+unix:///path/to.sock"
    )]
    UnknownScheme(String),
}

impl Store {
    /// A fresh in-memory store.
    pub fn memory() -> Store {
        Store {
            blobs: Blobs::new(Arc::new(MemoryBlobService::new()), ChunkerParams::default()),
            directories: Arc::new(MemoryDirectoryService::new()),
            path_infos: Arc::new(MemoryPathInfoService::new()),
        }
    }

    /// Opens the store at `url`:
    ///
    /// - `memory://` — a fresh store in memory, gone when the process exits.
    pub async fn open(url: &str) -> Result<Store, OpenStoreError> {
        match url {
            "memory://" => Ok(Store::memory()),
            _ => Err(OpenStoreError::UnknownScheme(url.to_owned())),
        }
    }
}
