//! Traces in the embedded redb store: one table, `traces-v1`, in the same
//! file as the castore's tables, created by the first put (a store with no
//! such table has no traces). A trace is not part of any store path, so
//! gc and fsck leave the table alone; it is bounded by names, one trace
//! each.

use async_trait::async_trait;
use lazystore_castore::RedbStore;
use redb::{ReadableDatabase, TableDefinition, TableError};

use super::{TraceError, TraceService, check, decode, encode};

/// Build name → its trace, as [`encode`] stores it.
const TRACES: TableDefinition<&str, &[u8]> = TableDefinition::new("traces-v1");

/// Traces in a [`RedbStore`], beside its blobs, directories and PathInfos.
#[derive(Clone, Debug)]
pub struct RedbTraceService {
    store: RedbStore,
}

impl RedbTraceService {
    /// The trace backend of `store`.
    pub fn new(store: RedbStore) -> Self {
        RedbTraceService { store }
    }
}

fn backend(e: impl Into<redb::Error>) -> TraceError {
    TraceError::Backend(Box::new(e.into()))
}

fn join_error(e: tokio::task::JoinError) -> TraceError {
    TraceError::Backend(Box::new(e))
}

#[async_trait]
impl TraceService for RedbTraceService {
    async fn get(&self, name: &str) -> Result<Option<Vec<String>>, TraceError> {
        let (store, name) = (self.store.clone(), name.to_owned());
        tokio::task::spawn_blocking(move || {
            let txn = store.database().begin_read().map_err(backend)?;
            let table = match txn.open_table(TRACES) {
                Ok(table) => table,
                Err(TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(backend(e)),
            };
            let Some(stored) = table.get(name.as_str()).map_err(backend)? else {
                return Ok(None);
            };
            decode(&name, stored.value()).map(Some)
        })
        .await
        .map_err(join_error)?
    }

    /// One transaction, committed durably (a trace is small and rare).
    async fn put(&self, name: &str, files: &[String]) -> Result<(), TraceError> {
        check(name, files)?;
        let (store, name, stored) = (self.store.clone(), name.to_owned(), encode(files));
        tokio::task::spawn_blocking(move || {
            let txn = store.database().begin_write().map_err(backend)?;
            {
                let mut table = txn.open_table(TRACES).map_err(backend)?;
                table.insert(name.as_str(), &stored[..]).map_err(backend)?;
            }
            store
                .commit(txn, redb::Durability::Immediate)
                .map_err(backend)
        })
        .await
        .map_err(join_error)?
    }
}
