//! Blob backend on an object store ([`S3Store`]): chunks and chunk lists
//! are records in packs (`s3_packs.rs`), found through the indexes.
//!
//! Costs: `stat` is one Range GET (and a LIST when the list is not known
//! here); `read_chunks` one GET per pack its chunks are in; `missing_chunks`
//! nothing when every chunk is known, else one LIST; writes share the
//! two PUTs of the pack they land in. `put_chunks_and_blob` is one write:
//! the chunk list is in the same pack as the chunks sent with it, and the
//! others are stored already (or waited for), so it is never visible
//! before its chunks.
//!
//! A chunk list record is the BLAKE3 of the blob digest and the list, then
//! the list as `blobs-v1` keeps it (`encode_chunk_list`): a damaged or
//! misfiled record is an error, never another blob's chunks.
//!
//! Quarantine (`s3_quarantine.rs`): a chunk reported corrupt is read
//! again from its pack and, if that copy fails too, recorded and no longer
//! read by any replica, so it reads as missing until it is stored again.

use async_trait::async_trait;
use bytes::Bytes;

use super::{BlobError, BlobMeta, BlobService, EncodedChunk, decode_chunk_list, encode_chunk_list};
use crate::chunker::ChunkerParams;
use crate::digest::{DIGEST_LEN, Digest};
use crate::proto::ChunkEncoding;
use crate::s3_config::S3Error;
use crate::s3_index::{Entry, Kind, Miss, Record};
use crate::s3_packs::WriteError;
use crate::s3_store::S3Store;

/// Chunks and chunk lists in an [`S3Store`].
#[derive(Clone, Debug)]
pub struct S3BlobService {
    store: S3Store,
    params: Option<ChunkerParams>,
}

impl S3BlobService {
    /// The blob backend of `store`; a store that records no chunker
    /// parameters yet records `params` (the defaults if `None`) on first
    /// use.
    pub fn new(store: S3Store, params: Option<ChunkerParams>) -> Self {
        S3BlobService { store, params }
    }
}

impl S3BlobService {
    /// Flips a byte of a stored chunk in its pack, for corruption tests.
    /// False if it is not stored.
    #[doc(hidden)]
    pub async fn corrupt_chunk(&self, chunk: &Digest) -> Result<bool, BlobError> {
        let corrupted = self.store.corrupt_record(Kind::Chunk, *chunk).await;
        corrupted.map_err(backend)
    }
}

fn backend(e: S3Error) -> BlobError {
    BlobError::Backend(Box::new(e))
}

/// A chunk as stored at `entry`.
fn encoded(digest: Digest, entry: &Entry, data: Bytes) -> Result<EncodedChunk, BlobError> {
    let encoding = match entry.encoding {
        0 => ChunkEncoding::Raw,
        1 => ChunkEncoding::Zstd,
        _ => {
            return Err(BlobError::Corrupt {
                chunk: digest,
                reason: "unknown encoding in the S3 index",
            });
        }
    };
    Ok(EncodedChunk {
        digest,
        encoding,
        size: entry.size,
        data,
    })
}

fn chunk_record(chunk: EncodedChunk) -> Record {
    Record {
        kind: Kind::Chunk,
        digest: chunk.digest,
        encoding: chunk.encoding as i32 as u8,
        size: chunk.size,
        bytes: chunk.data,
    }
}

fn list_record(blob: Digest, meta: &BlobMeta) -> Result<Record, BlobError> {
    let mut list = Vec::new();
    encode_chunk_list(meta, &mut list)
        .map_err(|reason| BlobError::BadChunkList { blob, reason })?;
    let mut bytes = checksum(blob, &list).as_bytes().to_vec();
    bytes.extend_from_slice(&list);
    Ok(Record {
        kind: Kind::ChunkList,
        digest: blob,
        encoding: 0,
        size: meta.size,
        bytes: bytes.into(),
    })
}

fn checksum(blob: Digest, list: &[u8]) -> Digest {
    let mut hasher = blake3::Hasher::new();
    hasher.update(blob.as_bytes());
    hasher.update(list);
    Digest::from(hasher.finalize())
}

fn decode_list(blob: Digest, record: &[u8]) -> Result<BlobMeta, BlobError> {
    let bad = |reason| BlobError::BadChunkList { blob, reason };
    let (sum, list) = record
        .split_first_chunk::<DIGEST_LEN>()
        .ok_or(bad("record is truncated"))?;
    if checksum(blob, list).as_bytes() != sum {
        return Err(bad("record fails its checksum"));
    }
    let (size, chunks) = decode_chunk_list(list).map_err(bad)?;
    BlobMeta::new(blob, size, chunks)
}

impl S3BlobService {
    /// The chunks at `entries`, as stored; a chunk whose index entry names
    /// an unknown encoding is an error of its own.
    async fn read_entries(
        &self,
        chunks: &[Digest],
        entries: &[Entry],
    ) -> Result<Vec<Result<EncodedChunk, BlobError>>, BlobError> {
        let bytes = self.store.read(entries).await.map_err(backend)?;
        Ok((chunks.iter().zip(entries).zip(bytes))
            .map(|((digest, entry), data)| encoded(*digest, entry, data))
            .collect())
    }

    /// Stores `records`, refusing them unless every chunk of `list` is
    /// stored or among them.
    async fn write(&self, records: Vec<Record>, list: &[Digest]) -> Result<(), BlobError> {
        let check = |sizes: &[Option<u64>]| match sizes.iter().position(Option::is_none) {
            Some(i) => Err(BlobError::ChunkNotFound(list[i])),
            None => Ok(()),
        };
        match self.store.write(records, (Kind::Chunk, list), check).await {
            Ok(()) => Ok(()),
            Err(WriteError::Refused(e)) => Err(e),
            Err(WriteError::Store(e)) => Err(backend(e)),
        }
    }
}

#[async_trait]
impl BlobService for S3BlobService {
    async fn chunker_params(&self) -> Result<Option<ChunkerParams>, BlobError> {
        let params = self.store.chunker_params(self.params).await;
        params.map(Some).map_err(backend)
    }

    async fn stat(&self, blob: &Digest) -> Result<Option<BlobMeta>, BlobError> {
        Ok(self.stat_many(&[*blob]).await?.pop().flatten())
    }

    /// One LIST at most to find them, then one GET per pack they are in.
    async fn stat_many(&self, blobs: &[Digest]) -> Result<Vec<Option<BlobMeta>>, BlobError> {
        let read = self
            .store
            .locate_and_read(Kind::ChunkList, blobs, Miss::Recent);
        let read = read.await.map_err(backend)?;
        (blobs.iter().zip(read))
            .map(|(blob, record)| {
                record
                    .map(|(_, bytes)| decode_list(*blob, &bytes))
                    .transpose()
            })
            .collect()
    }

    async fn read_chunks(&self, chunks: &[Digest]) -> Result<Vec<EncodedChunk>, BlobError> {
        let read = self
            .store
            .locate_and_read(Kind::Chunk, chunks, Miss::Everything);
        let read = read.await.map_err(backend)?;
        (chunks.iter().zip(read))
            .map(|(digest, record)| {
                let (entry, data) = record.ok_or(BlobError::ChunkNotFound(*digest))?;
                encoded(*digest, &entry, data)
            })
            .collect()
    }

    async fn missing_chunks(&self, chunks: &[Digest]) -> Result<Vec<Digest>, BlobError> {
        let present = self.store.present(Kind::Chunk, chunks).await;
        let present = present.map_err(backend)?;
        Ok(chunks
            .iter()
            .zip(present)
            .filter(|(_, p)| !p)
            .map(|(d, _)| *d)
            .collect())
    }

    async fn put_chunks(&self, chunks: Vec<EncodedChunk>) -> Result<(), BlobError> {
        self.write(chunks.into_iter().map(chunk_record).collect(), &[])
            .await
    }

    async fn put_chunks_and_blob(
        &self,
        chunks: Vec<EncodedChunk>,
        blob: Digest,
        meta: BlobMeta,
    ) -> Result<(), BlobError> {
        let list: Vec<Digest> = meta.chunks.iter().map(|c| c.digest).collect();
        let mut records: Vec<Record> = chunks.into_iter().map(chunk_record).collect();
        records.push(list_record(blob, &meta)?);
        self.write(records, &list).await
    }

    async fn put_blob(&self, blob: Digest, meta: BlobMeta) -> Result<(), BlobError> {
        self.put_chunks_and_blob(Vec::new(), blob, meta).await
    }

    /// Each chunk's stored copy is read again (one GET per pack) and
    /// decoded; those that fail are recorded, one PUT each.
    async fn quarantine(&self, chunks: &[Digest]) -> Result<Vec<Digest>, BlobError> {
        let found = self.store.locate(Kind::Chunk, chunks, Miss::Known);
        let found = found.await.map_err(backend)?;
        let (digests, entries): (Vec<Digest>, Vec<_>) = chunks
            .iter()
            .zip(found)
            .filter_map(|(d, e)| Some((*d, e?)))
            .unzip();
        let stored = self.read_entries(&digests, &entries).await?;
        let mut bad = Vec::new();
        for ((digest, entry), chunk) in digests.into_iter().zip(entries).zip(stored) {
            if chunk.and_then(|c| c.decode()).is_err() {
                let recorded = self.store.quarantine_chunk(digest, entry).await;
                recorded.map_err(backend)?;
                bad.push(digest);
            }
        }
        Ok(bad)
    }

    async fn quarantined(&self) -> Result<u64, BlobError> {
        self.store.quarantined().await.map_err(backend)
    }

    fn uploads_travel(&self) -> bool {
        true
    }
}
