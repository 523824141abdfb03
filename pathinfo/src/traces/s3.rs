//! Traces on an object store ([`S3Store`]): one object per build name,
//! `traces/<name>`, holding what [`encode`] makes; a put is one PUT, which
//! replaces the object whole, and a get one GET.

use async_trait::async_trait;
use lazystore_castore::{S3Error, S3Store};

use super::{TraceError, TraceService, check, decode, encode};

/// The prefix of trace keys, under the store's.
const DIR: &str = "traces/";

/// Traces in an [`S3Store`], beside its packs and PathInfos.
#[derive(Clone, Debug)]
pub struct S3TraceService {
    store: S3Store,
}

impl S3TraceService {
    /// The trace backend of `store`.
    pub fn new(store: S3Store) -> Self {
        S3TraceService { store }
    }
}

fn backend(e: S3Error) -> TraceError {
    TraceError::Backend(Box::new(e))
}

#[async_trait]
impl TraceService for S3TraceService {
    async fn get(&self, name: &str) -> Result<Option<Vec<String>>, TraceError> {
        // Checked first: the name becomes part of an object key.
        check(name, &[])?;
        let stored = self
            .store
            .get(&format!("{DIR}{name}"))
            .await
            .map_err(backend)?;
        stored.map(|s| decode(name, &s)).transpose()
    }

    async fn put(&self, name: &str, files: &[String]) -> Result<(), TraceError> {
        check(name, files)?;
        self.store
            .put(&format!("{DIR}{name}"), encode(files).into())
            .await
            .map_err(backend)
    }
}
