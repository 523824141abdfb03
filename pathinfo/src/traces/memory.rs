//! Traces in memory, for tests and throwaway stores.

use std::collections::HashMap;
use std::sync::RwLock;

use async_trait::async_trait;

use super::{TraceError, TraceService, check};

/// Traces in a hash map keyed by build name.
#[derive(Default)]
pub struct MemoryTraceService {
    // A std RwLock: critical sections are single map operations, no await.
    traces: RwLock<HashMap<String, Vec<String>>>,
}

#[async_trait]
impl TraceService for MemoryTraceService {
    async fn get(&self, name: &str) -> Result<Option<Vec<String>>, TraceError> {
        Ok(self
            .traces
            .read()
            .expect("lock poisoned")
            .get(name)
            .cloned())
    }

    async fn put(&self, name: &str, files: &[String]) -> Result<(), TraceError> {
        check(name, files)?;
        self.traces
            .write()
            .expect("lock poisoned")
            .insert(name.to_owned(), files.to_vec());
        Ok(())
    }
}
