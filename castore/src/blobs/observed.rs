//! [`ObservedBlobService`]: a blob service passed through whole, with an
//! observer's hooks around its calls — how counters (a mount's network
//! bytes) and test doubles (delays, injected failures) wrap a store without
//! each forwarding every method by hand, and without dropping a method a
//! backend overrides (`put_chunks_and_blob`'s single write, a cache's
//! `verifies_chunks`).

use std::sync::Arc;

use async_trait::async_trait;

use super::{BlobError, BlobMeta, BlobService, EncodedChunk};
use crate::{ChunkerParams, Digest};

/// What an [`ObservedBlobService`] does around its inner service's calls.
/// Every hook does nothing by default.
#[async_trait]
pub trait BlobObserver: Send + Sync {
    /// Before a read of `chunks` reaches the inner service: may wait, or
    /// fail the read.
    async fn before_read(&self, _chunks: &[Digest]) -> Result<(), BlobError> {
        Ok(())
    }

    /// After a read returned `chunks` (as stored: encoded).
    fn after_read(&self, _chunks: &[EncodedChunk]) {}

    /// After a read that succeeded, how long it took (from the call to the
    /// inner service to its answer).
    fn read_took(&self, _elapsed: std::time::Duration) {}

    /// Before a stat of `blob` reaches the inner service.
    fn before_stat(&self, _blob: &Digest) {}

    /// Before `chunks` are put (alone or with a chunk list).
    fn before_put(&self, _chunks: &[EncodedChunk]) {}

    /// Before the store is asked which of `chunks` it lacks.
    fn before_query(&self, _chunks: &[Digest]) {}

    /// Before the chunk list `meta` of `blob` is put (alone or with its
    /// chunks).
    fn before_put_blob(&self, _blob: &Digest, _meta: &BlobMeta) {}
}

/// `inner`, every call passed through, with `observer`'s hooks around them.
pub struct ObservedBlobService<O> {
    inner: Arc<dyn BlobService>,
    observer: O,
}

impl<O: BlobObserver> ObservedBlobService<O> {
    /// `inner`, observed by `observer`.
    pub fn new(inner: Arc<dyn BlobService>, observer: O) -> Self {
        ObservedBlobService { inner, observer }
    }

    /// The observer.
    pub fn observer(&self) -> &O {
        &self.observer
    }
}

#[async_trait]
impl<O: BlobObserver> BlobService for ObservedBlobService<O> {
    async fn chunker_params(&self) -> Result<Option<ChunkerParams>, BlobError> {
        self.inner.chunker_params().await
    }

    async fn stat(&self, blob: &Digest) -> Result<Option<BlobMeta>, BlobError> {
        self.observer.before_stat(blob);
        self.inner.stat(blob).await
    }

    async fn stat_many(&self, blobs: &[Digest]) -> Result<Vec<Option<BlobMeta>>, BlobError> {
        for blob in blobs {
            self.observer.before_stat(blob);
        }
        self.inner.stat_many(blobs).await
    }

    async fn stored_sizes(&self, chunks: &[Digest]) -> Result<Vec<super::StoredSize>, BlobError> {
        self.inner.stored_sizes(chunks).await
    }

    async fn read_chunks(&self, chunks: &[Digest]) -> Result<Vec<EncodedChunk>, BlobError> {
        self.observer.before_read(chunks).await?;
        let started = std::time::Instant::now();
        let got = self.inner.read_chunks(chunks).await?;
        self.observer.read_took(started.elapsed());
        self.observer.after_read(&got);
        Ok(got)
    }

    async fn missing_chunks(&self, chunks: &[Digest]) -> Result<Vec<Digest>, BlobError> {
        self.observer.before_query(chunks);
        self.inner.missing_chunks(chunks).await
    }

    async fn put_chunks(&self, chunks: Vec<EncodedChunk>) -> Result<(), BlobError> {
        self.observer.before_put(&chunks);
        self.inner.put_chunks(chunks).await
    }

    async fn put_chunks_and_blob(
        &self,
        chunks: Vec<EncodedChunk>,
        blob: Digest,
        meta: BlobMeta,
    ) -> Result<(), BlobError> {
        self.observer.before_put(&chunks);
        self.observer.before_put_blob(&blob, &meta);
        self.inner.put_chunks_and_blob(chunks, blob, meta).await
    }

    async fn put_blob(&self, blob: Digest, meta: BlobMeta) -> Result<(), BlobError> {
        self.observer.before_put_blob(&blob, &meta);
        self.inner.put_blob(blob, meta).await
    }

    async fn quarantine(&self, chunks: &[Digest]) -> Result<Vec<Digest>, BlobError> {
        self.inner.quarantine(chunks).await
    }

    async fn quarantined(&self) -> Result<u64, BlobError> {
        self.inner.quarantined().await
    }

    fn verifies_chunks(&self) -> bool {
        self.inner.verifies_chunks()
    }

    fn uploads_travel(&self) -> bool {
        self.inner.uploads_travel()
    }
}

/// A shared observer, so its owner can read what it saw.
#[async_trait]
impl<T: BlobObserver + ?Sized> BlobObserver for Arc<T> {
    async fn before_read(&self, chunks: &[Digest]) -> Result<(), BlobError> {
        (**self).before_read(chunks).await
    }

    fn after_read(&self, chunks: &[EncodedChunk]) {
        (**self).after_read(chunks)
    }

    fn read_took(&self, elapsed: std::time::Duration) {
        (**self).read_took(elapsed)
    }

    fn before_stat(&self, blob: &Digest) {
        (**self).before_stat(blob)
    }

    fn before_put(&self, chunks: &[EncodedChunk]) {
        (**self).before_put(chunks)
    }

    fn before_query(&self, chunks: &[Digest]) {
        (**self).before_query(chunks)
    }

    fn before_put_blob(&self, blob: &Digest, meta: &BlobMeta) {
        (**self).before_put_blob(blob, meta)
    }
}
