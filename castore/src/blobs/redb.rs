//! Blob backend in the embedded redb store: chunk bytes in the store's pack
//! files (`packs.rs`), indexed in `chunks-v2`; chunk lists in `blobs-v1`.
//!
//! Figures (import throughput, file size against the bytes stored) are in
//! `docs/design.md`, "Chunk store".
//!
//! Durability: chunk writes commit without an fsync; chunk lists as the
//! store's [`SyncMode`] says. Both live in one file with one commit history,
//! so a durable commit also makes every chunk before it durable (and
//! [`RedbStore::commit`] fsyncs the packs before any durable commit); after
//! a crash a chunk written since the last durable commit may be gone, but
//! `put_blob` checks its chunks in its own transaction, so no stored blob
//! lacks one.
//!
//! [`SyncMode`]: crate::SyncMode

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::{
    BlobError, BlobMeta, BlobService, EncodedChunk, StoredSize, decode_chunk_list,
    encode_chunk_list, quarantine,
};
use crate::chunk_record::{IndexRecord, StoredRecord};
use crate::chunker::ChunkerParams;
use crate::digest::Digest;
use crate::proto::ChunkEncoding;
use crate::redb_store::{DigestKey, ReadTables, RedbStore, Tables};

// Chunk index record (`chunks-v2`, keyed by the chunk digest): an
// `IndexRecord` (`chunk_record.rs`), where the encoded bytes are in the
// packs, or a `PatchedRecord`, which names the chunk of its bytes with
// their store path hashes taken out.

// Blob record (`blobs-v1`, keyed by the blob digest): a fixed-width chunk
// list, so the number of chunks follows from the record length.
//
// | offset      | size | field                                  |
// |-------------|------|----------------------------------------|
// | 0           | 8    | blob size, u64 little endian           |
// | 8 + 36·i    | 32   | digest of chunk i                      |
// | 8 + 36·i+32 | 4    | size of chunk i, u32 little endian     |
//
// Written and read by `encode_chunk_list` and `decode_chunk_list`
// (`blobs/encoding.rs`), which the local cache uses too.

/// Chunks and chunk lists in a [`RedbStore`].
#[derive(Clone, Debug)]
pub struct RedbBlobService {
    store: RedbStore,
    writes: GroupCommit,
}

impl RedbBlobService {
    /// The blob backend of `store`.
    pub fn new(store: RedbStore) -> Self {
        let writes = GroupCommit::start();
        RedbBlobService { store, writes }
    }

    /// The store it writes to.
    pub fn store(&self) -> &RedbStore {
        &self.store
    }

    /// Runs `f` on a read transaction's tables on a blocking thread.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ReadTables) -> Result<T, BlobError> + Send + 'static,
    ) -> Result<T, BlobError> {
        let db = self.store.database().clone();
        tokio::task::spawn_blocking(move || {
            let txn: ReadTransaction = db.begin_read().map_err(backend)?;
            let tables = ReadTables::new(&txn).map_err(backend)?;
            f(&tables)
        })
        .await
        .map_err(|e| BlobError::Internal(e.into()))?
    }

    /// `f` of each chunk's index record, in the order asked, in one read
    /// transaction (whose tables `f` gets too); [`BlobError::ChunkNotFound`]
    /// for the first not stored.
    async fn map_records<T: Send + 'static>(
        &self,
        chunks: &[Digest],
        f: impl Fn(&ReadTables, Digest, &[u8]) -> Result<T, BlobError> + Send + 'static,
    ) -> Result<Vec<T>, BlobError> {
        let chunks = chunks.to_vec();
        self.read(move |t| {
            chunks
                .iter()
                .map(|d| {
                    let v = t
                        .chunks
                        .get(d.as_bytes())
                        .map_err(backend)?
                        .ok_or(BlobError::ChunkNotFound(*d))?;
                    f(t, *d, v.value())
                })
                .collect()
        })
        .await
    }

    /// Replaces a stored chunk, for corruption tests: `f` gets the chunk as
    /// stored and what it leaves is written back. False if it is not stored.
    #[doc(hidden)]
    pub fn corrupt_chunk(
        &self,
        digest: &Digest,
        f: impl FnOnce(&mut EncodedChunk),
    ) -> Result<bool, BlobError> {
        let txn = self.store.database().begin_write().map_err(backend)?;
        {
            let mut tables = Tables::new(&txn).map_err(backend)?;
            let Some(mut chunk) = tables
                .chunks
                .get(digest.as_bytes())
                .map_err(backend)?
                .map(|v| read_chunk(&self.store, &tables.chunks, *digest, v.value()))
                .transpose()?
            else {
                return Ok(false);
            };
            f(&mut chunk);
            insert_chunk(&self.store, &mut tables, &chunk)?;
        }
        self.store
            .commit(txn, Durability::Immediate)
            .map_err(backend)?;
        Ok(true)
    }
}

pub(crate) fn backend(e: impl Into<redb::Error>) -> BlobError {
    BlobError::Backend(Box::new(e.into()))
}

/// Whether `digest` is indexed in `tables`.
fn has_chunk(tables: &Tables<'_>, digest: &Digest) -> Result<bool, BlobError> {
    Ok(tables
        .chunks
        .get(digest.as_bytes())
        .map_err(backend)?
        .is_some())
}

/// Appends `chunk`'s bytes to the packs and indexes them; visible once the
/// transaction commits through [`RedbStore::commit`].
fn insert_chunk(
    store: &RedbStore,
    tables: &mut Tables<'_>,
    chunk: &EncodedChunk,
) -> Result<(), BlobError> {
    let at = store.packs().append(&chunk.data).map_err(backend)?;
    let record = IndexRecord {
        encoding: chunk.encoding,
        size: chunk.size,
        at,
        frame: None,
    };
    tables
        .chunks
        .insert(chunk.digest.as_bytes(), &record.to_bytes()[..])
        .map_err(backend)?;
    // Written again: no longer missing. A lookup in a table that is empty
    // unless something was quarantined.
    tables
        .quarantine
        .remove(chunk.digest.as_bytes())
        .map_err(backend)?;
    Ok(())
}

/// The chunk an index record names, read from its pack (a patched one's
/// base looked up in `chunks`, the index it came from). A record that is
/// not one is [`BlobError::Corrupt`]; the bytes are checked by whoever
/// decodes them ([`Blobs`](crate::Blobs) checks every chunk's BLAKE3).
pub(crate) fn read_chunk(
    store: &RedbStore,
    chunks: &impl ReadableTable<DigestKey, &'static [u8]>,
    digest: Digest,
    record: &[u8],
) -> Result<EncodedChunk, BlobError> {
    let corrupt = |reason| BlobError::Corrupt {
        chunk: digest,
        reason,
    };
    let patched = match StoredRecord::from_bytes(record).map_err(corrupt)? {
        StoredRecord::Placed(record) => return read_placed(store, digest, &record),
        StoredRecord::Patched(p) => p,
    };
    let base = chunks
        .get(patched.base.as_bytes())
        .map_err(backend)?
        .ok_or(corrupt("the chunk of its normalised bytes is not stored"))?;
    let base = match StoredRecord::from_bytes(base.value()) {
        Ok(StoredRecord::Placed(record)) => read_placed(store, patched.base, &record)?,
        _ => {
            return Err(corrupt(
                "the chunk of its normalised bytes has a bad record",
            ));
        }
    };
    // Not checked on its own: the chunk made of it is, by its reader.
    let data = patched.apply(base.decode_unchecked()?).map_err(corrupt)?;
    Ok(EncodedChunk {
        digest,
        encoding: ChunkEncoding::Raw,
        size: patched.size,
        data,
    })
}

/// The chunk a record with bytes of its own names.
fn read_placed(
    store: &RedbStore,
    digest: Digest,
    record: &IndexRecord,
) -> Result<EncodedChunk, BlobError> {
    if let Some(in_frame) = record.frame {
        return crate::frames::read_framed(store, digest, record, in_frame);
    }
    let data = store.packs().read(record.at).map_err(backend)?;
    Ok(EncodedChunk {
        digest,
        encoding: record.encoding,
        size: record.size,
        data: Bytes::from(data),
    })
}

fn encode_blob(blob: Digest, meta: &BlobMeta) -> Result<Vec<u8>, BlobError> {
    let mut record = Vec::new();
    encode_chunk_list(meta, &mut record)
        .map_err(|reason| BlobError::BadChunkList { blob, reason })?;
    Ok(record)
}

pub(crate) fn decode_blob(blob: Digest, record: &[u8]) -> Result<BlobMeta, BlobError> {
    let (size, chunks) =
        decode_chunk_list(record).map_err(|reason| BlobError::BadChunkList { blob, reason })?;
    // Checks the sizes add up, so a damaged record is an error, not a
    // chunk list that reads the wrong bytes.
    BlobMeta::new(blob, size, chunks)
}

#[async_trait]
impl BlobService for RedbBlobService {
    async fn chunker_params(&self) -> Result<Option<ChunkerParams>, BlobError> {
        Ok(Some(self.store.params()))
    }

    async fn stat(&self, blob: &Digest) -> Result<Option<BlobMeta>, BlobError> {
        let blob = *blob;
        self.read(move |t| {
            t.blobs
                .get(blob.as_bytes())
                .map_err(backend)?
                .map(|v| decode_blob(blob, v.value()))
                .transpose()
        })
        .await
    }

    /// All in one read transaction (a `Stat` each would open one per blob).
    async fn stat_many(&self, blobs: &[Digest]) -> Result<Vec<Option<BlobMeta>>, BlobError> {
        let blobs = blobs.to_vec();
        self.read(move |t| {
            blobs
                .into_iter()
                .map(|blob| {
                    t.blobs
                        .get(blob.as_bytes())
                        .map_err(backend)?
                        .map(|v| decode_blob(blob, v.value()))
                        .transpose()
                })
                .collect()
        })
        .await
    }

    async fn read_chunks(&self, chunks: &[Digest]) -> Result<Vec<EncodedChunk>, BlobError> {
        let store = self.store.clone();
        self.map_records(chunks, move |t, d, record| {
            read_chunk(&store, &t.chunks, d, record)
        })
        .await
    }

    /// From the index alone; a chunk in a frame counts its share of the
    /// frame's bytes (`frames.rs`), a patched one its record and names its
    /// base (`chunk_record.rs`).
    async fn stored_sizes(&self, chunks: &[Digest]) -> Result<Vec<StoredSize>, BlobError> {
        self.map_records(chunks, |_, chunk, record| {
            let record = StoredRecord::from_bytes(record)
                .map_err(|reason| BlobError::Corrupt { chunk, reason })?;
            Ok(StoredSize {
                bytes: record.stored_bytes(),
                base: match record {
                    StoredRecord::Patched(p) => Some(p.base),
                    StoredRecord::Placed(_) => None,
                },
            })
        })
        .await
    }

    async fn missing_chunks(&self, chunks: &[Digest]) -> Result<Vec<Digest>, BlobError> {
        let chunks = chunks.to_vec();
        self.read(move |t| {
            let mut missing = Vec::new();
            for d in chunks {
                if t.chunks.get(d.as_bytes()).map_err(backend)?.is_none() {
                    missing.push(d);
                }
            }
            Ok(missing)
        })
        .await
    }

    /// Each chunk's stored copy checked in the writer's transaction, so a
    /// copy written again since the reader's is never the one removed.
    async fn quarantine(&self, chunks: &[Digest]) -> Result<Vec<Digest>, BlobError> {
        let (chunks, found) = (chunks.to_vec(), Arc::new(std::sync::Mutex::new(Vec::new())));
        let out = found.clone();
        self.writes
            .submit(&self.store, true, move |store, tables| {
                let mut bad = Vec::new();
                for d in &chunks {
                    if quarantine::stored_copy_fails(store, tables, d)? {
                        bad.push(*d);
                    }
                }
                quarantine::record(tables, &bad)?;
                *out.lock().expect("not poisoned") = bad;
                Ok(())
            })
            .await?;
        Ok(std::mem::take(&mut *found.lock().expect("not poisoned")))
    }

    async fn quarantined(&self) -> Result<u64, BlobError> {
        self.read(|t| t.quarantine.len().map_err(backend)).await
    }

    async fn put_chunks(&self, chunks: Vec<EncodedChunk>) -> Result<(), BlobError> {
        if chunks.is_empty() {
            return Ok(());
        }
        // No fsync: see the module doc for why that is safe.
        self.writes
            .submit(&self.store, false, move |store, tables| {
                for c in &chunks {
                    // Idempotent, and a chunk already stored is not rewritten.
                    if !has_chunk(tables, &c.digest)? {
                        insert_chunk(store, tables, c)?;
                    }
                }
                Ok(())
            })
            .await
    }

    async fn put_chunks_and_blob(
        &self,
        chunks: Vec<EncodedChunk>,
        blob: Digest,
        meta: BlobMeta,
    ) -> Result<(), BlobError> {
        let meta = BlobMeta::new(blob, meta.size, meta.chunks)?;
        let record = encode_blob(blob, &meta)?;
        let listed: Vec<Digest> = meta.chunks.iter().map(|c| c.digest).collect();
        // One write for both, and no read before it: the blob stored
        // already is found inside the write. A small file is then one
        // write of its group commit instead of a read and two writes.
        self.writes
            .submit(&self.store, true, move |store, tables| {
                if tables
                    .blobs
                    .get(blob.as_bytes())
                    .map_err(backend)?
                    .is_some_and(|v| v.value() == &record[..])
                {
                    // The list is stored; a chunk sent with it may not be
                    // (quarantined since), and is written again.
                    let mut written = std::collections::HashSet::new();
                    for c in &chunks {
                        if !has_chunk(tables, &c.digest)? && written.insert(c.digest) {
                            insert_chunk(store, tables, c)?;
                        }
                    }
                    return Ok(());
                }
                // Every chunk of the list is either stored or about to be,
                // checked before anything is written.
                let mut absent = Vec::new();
                for c in &chunks {
                    if !has_chunk(tables, &c.digest)? {
                        absent.push(c);
                    }
                }
                for listed in &listed {
                    if !chunks.iter().any(|c| c.digest == *listed) && !has_chunk(tables, listed)? {
                        return Err(BlobError::ChunkNotFound(*listed));
                    }
                }
                let mut written = std::collections::HashSet::new();
                for c in absent {
                    if written.insert(c.digest) {
                        insert_chunk(store, tables, c)?;
                    }
                }
                tables
                    .blobs
                    .insert(blob.as_bytes(), &record[..])
                    .map_err(backend)?;
                Ok(())
            })
            .await
    }

    async fn put_blob(&self, blob: Digest, meta: BlobMeta) -> Result<(), BlobError> {
        let meta = BlobMeta::new(blob, meta.size, meta.chunks)?;
        let record = encode_blob(blob, &meta)?;
        let listed: Vec<Digest> = meta.chunks.iter().map(|c| c.digest).collect();
        // A blob stored already (the same file again, in this or another
        // store path) costs a read, not a commit. It was committed as
        // durably as this one would be: the sync mode is the store's.
        let (key, same) = (blob, record.clone());
        let stored = self
            .read(move |t| {
                let v = t.blobs.get(key.as_bytes()).map_err(backend)?;
                Ok(v.is_some_and(|v| v.value() == &same[..]))
            })
            .await?;
        if stored {
            return Ok(());
        }
        self.writes
            .submit(&self.store, true, move |_, tables| {
                // Checked in the transaction that writes the list, so no
                // chunk can be missing once it is committed.
                for listed in &listed {
                    if !has_chunk(tables, listed)? {
                        return Err(BlobError::ChunkNotFound(*listed));
                    }
                }
                tables
                    .blobs
                    .insert(blob.as_bytes(), &record[..])
                    .map_err(backend)?;
                Ok(())
            })
            .await
    }
}

/// Why a write got no answer from the writer thread.
#[derive(Debug, thiserror::Error)]
enum WriterGone {
    /// The thread no longer takes writes: it panicked, or its queue closed.
    #[error("the redb writer thread has stopped")]
    Stopped,
    /// The thread took the write and dropped it unanswered: it panicked.
    #[error("the redb writer thread failed before answering")]
    NoAnswer(#[source] tokio::sync::oneshot::error::RecvError),
}

/// A write whose group failed to commit, through another write's failure
/// or the commit's own: none of the group is stored. Every writer of the
/// group shares the one cause.
#[derive(Debug, thiserror::Error)]
#[error("the redb write group this write was part of failed")]
struct GroupCommitFailed(#[source] Arc<BlobError>);

/// A write applied inside a shared transaction. It must not change the
/// tables before it has decided to succeed, so that its refusal (a missing
/// chunk) leaves the other writes of the group intact; a `Backend` error
/// (or an `Internal` one) aborts the whole group.
type WriteOp = Box<dyn FnOnce(&RedbStore, &mut Tables<'_>) -> Result<(), BlobError> + Send>;

struct PendingWrite {
    /// The store to write to. Carried by each write rather than held by the
    /// writer thread, so the file is closed as soon as the last service
    /// handle and the last write are gone, and can be reopened at once.
    store: RedbStore,
    op: WriteOp,
    /// Whether the write must be as durable as the store's sync mode says
    /// (chunk lists), or may wait for a later durable commit (chunks).
    durable: bool,
    done: tokio::sync::oneshot::Sender<Result<(), BlobError>>,
}

/// Group commit: writes from every task are queued to one thread, which
/// applies all that are waiting in one transaction and one commit. Many
/// small files ingested at once otherwise cost two commits each, and
/// redb's single writer would serialise them anyway.
#[derive(Clone, Debug)]
struct GroupCommit {
    queue: std::sync::mpsc::Sender<PendingWrite>,
}

impl std::fmt::Debug for PendingWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingWrite")
            .field("durable", &self.durable)
            .finish()
    }
}

/// Most writes one transaction takes, so one commit's latency stays bounded.
const MAX_GROUP: usize = 256;

impl GroupCommit {
    /// Starts the writer thread; it ends when the last handle is dropped.
    fn start() -> Self {
        let (queue, rx) = std::sync::mpsc::channel::<PendingWrite>();
        std::thread::Builder::new()
            .name("redb-blob-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut group = vec![first];
                    while group.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(next) => group.push(next),
                            Err(_) => break,
                        }
                    }
                    commit_group(group);
                }
            })
            .expect("spawning the redb writer thread");
        GroupCommit { queue }
    }

    /// Queues `op` and waits until its group has committed.
    async fn submit(
        &self,
        store: &RedbStore,
        durable: bool,
        op: impl FnOnce(&RedbStore, &mut Tables<'_>) -> Result<(), BlobError> + Send + 'static,
    ) -> Result<(), BlobError> {
        let (done, result) = tokio::sync::oneshot::channel();
        let pending = PendingWrite {
            store: store.clone(),
            op: Box::new(op),
            durable,
            done,
        };
        if self.queue.send(pending).is_err() {
            return Err(BlobError::Internal(Box::new(WriterGone::Stopped)));
        }
        result
            .await
            .unwrap_or_else(|e| Err(BlobError::Internal(Box::new(WriterGone::NoAnswer(e)))))
    }
}

/// Applies a group of writes in one transaction and tells each how it went.
fn commit_group(mut group: Vec<PendingWrite>) {
    let store = group[0].store.clone();
    let durability = if group.iter().any(|w| w.durable) {
        store.durability()
    } else {
        Durability::None
    };
    let (ops, dones): (Vec<WriteOp>, Vec<_>) = group.drain(..).map(|w| (w.op, w.done)).unzip();
    let mut outcomes = Vec::with_capacity(ops.len());
    let committed = (|| -> Result<(), BlobError> {
        let txn = store.database().begin_write().map_err(backend)?;
        {
            let mut tables = Tables::new(&txn).map_err(backend)?;
            for op in ops {
                match op(&store, &mut tables) {
                    Err(e @ (BlobError::Backend(_) | BlobError::Internal(_))) => return Err(e),
                    outcome => outcomes.push(outcome),
                }
            }
        }
        store.commit(txn, durability).map_err(backend)
    })();
    // Let go of the file before anyone hears back, so a caller that drops
    // its handles next can reopen it.
    drop(store);
    match committed {
        Ok(()) => {
            for (done, outcome) in dones.into_iter().zip(outcomes) {
                let _ = done.send(outcome);
            }
        }
        Err(e) => {
            // Nothing of the group is stored; every writer hears why.
            tracing::error!(error = %e, "redb write group failed");
            let cause = Arc::new(e);
            for done in dones {
                let failed = GroupCommitFailed(cause.clone());
                let _ = done.send(Err(BlobError::Internal(Box::new(failed))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blobs::ChunkMeta;

    fn chunk(data: &'static [u8]) -> EncodedChunk {
        EncodedChunk::encode(Bytes::from_static(data))
    }

    fn meta_of(chunks: &[&EncodedChunk]) -> BlobMeta {
        let size = chunks.iter().map(|c| c.size).sum();
        let list = chunks
            .iter()
            .map(|c| ChunkMeta {
                digest: c.digest,
                size: c.size,
            })
            .collect();
        BlobMeta::new(Digest::of(b"blob"), size, list).unwrap()
    }

    #[tokio::test]
    async fn chunks_and_blob_in_one_write_refuse_a_missing_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let service = RedbBlobService::new(RedbStore::open(dir.path().join("s.redb")).unwrap());
        let (a, b, c) = (chunk(b"first"), chunk(b"second"), chunk(b"third"));
        service.put_chunks(vec![a.clone()]).await.unwrap();

        // b is sent along, a is stored already, c is neither: nothing is
        // written, not even b.
        let blob = Digest::of(b"blob");
        let err = service
            .put_chunks_and_blob(vec![b.clone()], blob, meta_of(&[&a, &b, &c]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, BlobError::ChunkNotFound(d) if d == c.digest),
            "{err}"
        );
        assert!(service.stat(&blob).await.unwrap().is_none());
        assert_eq!(
            service.missing_chunks(&[a.digest, b.digest]).await.unwrap(),
            vec![b.digest]
        );

        // With every chunk stored or sent, both land; again is a no-op.
        let meta = meta_of(&[&a, &b, &c]);
        for _ in 0..2 {
            service
                .put_chunks_and_blob(vec![b.clone(), c.clone(), c.clone()], blob, meta.clone())
                .await
                .unwrap();
        }
        assert_eq!(service.stat(&blob).await.unwrap(), Some(meta));
        let read = service
            .read_chunks(&[a.digest, b.digest, c.digest])
            .await
            .unwrap();
        assert_eq!(read, vec![a, b, c]);
    }
}
