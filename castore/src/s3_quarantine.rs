//! Quarantine on the object store: a chunk whose stored copy fails
//! verification is recorded as `quarantine/<digest>`, naming the pack of
//! the bad copy, until it is stored again.
//!
//! A replica that is told a chunk is corrupt ([`BlobService::quarantine`])
//! reads its own copy again (the reader's may have been damaged on the
//! way) and only if that fails too writes the record and forgets the
//! copy. Every replica reads the records when it lists all indexes, and
//! at most every 10 s when it lists recent ones (one more LIST), and from
//! then on never reads that copy: the chunk is missing, so
//! the next ingest of a path holding it sends it again, into a new pack;
//! once that pack's index is stored the record is deleted. Records cost a
//! PUT each and are only ever as many as chunks found damaged.
//!
//! [`BlobService::quarantine`]: crate::BlobService::quarantine

use std::sync::Arc;

use crate::digest::Digest;
use crate::s3_config::S3Error;
use crate::s3_index::{Entry, Kind};
use crate::s3_store::S3Store;

/// Where the records are, under the prefix.
const DIR: &str = "quarantine/";

impl S3Store {
    /// Records that the copy of `chunk` at `entry` is damaged, and stops
    /// reading it.
    pub(crate) async fn quarantine_chunk(
        &self,
        chunk: Digest,
        entry: Entry,
    ) -> Result<(), S3Error> {
        let pack: Arc<str> = {
            let known = self.index().known.read().expect("lock poisoned");
            known.packs[entry.pack as usize].clone()
        };
        let key = format!("{DIR}{chunk}");
        self.put(&key, pack.as_bytes().to_vec().into()).await?;
        let mut known = self.index().known.write().expect("lock poisoned");
        if known.records.get(&(Kind::Chunk, chunk)) == Some(&entry) {
            known.records.remove(&(Kind::Chunk, chunk));
        }
        known.bad.insert(chunk, pack);
        Ok(())
    }

    /// How many chunks are quarantined and not stored again: one LIST.
    pub(crate) async fn quarantined(&self) -> Result<u64, S3Error> {
        Ok(self.list(DIR, None).await?.len() as u64)
    }

    /// Reads the records not yet known and forgets the copies they name.
    pub(crate) async fn list_quarantine(&self) -> Result<(), S3Error> {
        let names = self.list(DIR, None).await?;
        let new: Vec<String> = {
            let known = self.index().known.read().expect("lock poisoned");
            let is_new = |n: &&String| n.parse().is_ok_and(|d: Digest| !known.bad.contains_key(&d));
            names.iter().filter(is_new).cloned().collect()
        };
        let keys = new.iter().map(|n| format!("{DIR}{n}")).collect();
        let records = self.get_many(keys).await?;
        let mut known = self.index().known.write().expect("lock poisoned");
        for (name, record) in new.iter().zip(records) {
            let (Ok(chunk), Some(record)) = (name.parse::<Digest>(), record) else {
                continue;
            };
            let Ok(pack) = std::str::from_utf8(&record) else {
                continue;
            };
            let pack: Arc<str> = pack.into();
            let copy = known.records.get(&(Kind::Chunk, chunk)).copied();
            if copy.is_some_and(|e| known.packs[e.pack as usize] == pack) {
                known.records.remove(&(Kind::Chunk, chunk));
            }
            known.bad.insert(chunk, pack);
        }
        Ok(())
    }

    /// Deletes the records of `chunks`, just stored again.
    pub(crate) async fn release_quarantined(&self, chunks: &[Digest]) -> Result<(), S3Error> {
        for chunk in chunks {
            self.delete(&format!("{DIR}{chunk}")).await?;
            let mut known = self.index().known.write().expect("lock poisoned");
            known.bad.remove(chunk);
        }
        Ok(())
    }
}
