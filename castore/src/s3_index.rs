//! Finding and reading records on the object store: the indexes a replica
//! of an `s3://` store ([`S3Store`]) keeps, and the Range GETs that read
//! records out of packs. How packs are written is in `s3_packs.rs`.
//!
//! **Finding records.** A replica keeps every index it has read in memory,
//! about 90 bytes a record (a 33-byte key, a 32-byte entry, the hash
//! map's share): 1 GB stored in 64 KiB chunks is 16,000 records, 1.4 MB;
//! a store of many TB would want the index on disk, which is not built.
//! The first lookup lists `index/` and reads
//! every index; a lookup that misses lists again, from [`LIST_WINDOW`]
//! before the newest index it knows (index keys start with the writer's
//! clock at the time of writing, so one written late by a slow or skewed
//! writer still sorts within the window), and reads only new indexes: one
//! LIST request when nothing changed. A chunk that is still missing for a
//! read, or a needed record for a write, lists everything before the store
//! says it is absent, so a clock skewed past the window costs time, never
//! a wrong answer. Two replicas that store one record both keep it; the
//! index read last (the newest, as listings go in key order) wins.
//!
//! **Reading.** A record is a Range GET of its pack; records of one pack
//! asked together are merged into one request when less than 1 MiB apart
//! (object_store's `get_ranges`), so reading a file's chunks costs about
//! one GET per pack they are in.
//!
//! Costs per operation are in the backends' docs; measured figures in
//! `docs/design.md`, "S3 store".

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::digest::{DIGEST_LEN, Digest};
use crate::s3_config::S3Error;
use crate::s3_store::{PARALLEL_GETS, S3Store};

/// How far before the newest index it knows a replica lists again.
pub(crate) const LIST_WINDOW: Duration = Duration::from_secs(300);

/// How old a replica's last listing may be before it lists again to
/// answer which chunks are missing.
pub(crate) const STALE_AFTER: Duration = Duration::from_secs(10);

/// How old a replica's last full listing may be before its next listing
/// is a full one: what bounds how long it may count a record in a pack a
/// collection deleted as stored (a read finds out at once). Collections
/// keep a deleted pack's condemnation [`s3_gc::FORGET_AFTER`], more than
/// this, so a replica that lists in between still sees the pack as
/// condemned.
///
/// [`s3_gc::FORGET_AFTER`]: crate::s3_gc::FORGET_AFTER
pub(crate) const FULL_EVERY: Duration = Duration::from_secs(6 * 3600);

/// First bytes of an index object.
const INDEX_MAGIC: &[u8; 8] = b"LZS3IX01";

/// One entry of an index object, 54 bytes, little endian:
///
/// | offset | size | field                                                 |
/// |--------|------|-------------------------------------------------------|
/// | 0      | 1    | kind: 0 chunk, 1 chunk list, 2 directory              |
/// | 1      | 32   | digest                                                |
/// | 33     | 8    | offset in the pack                                    |
/// | 41     | 4    | length in the pack                                    |
/// | 45     | 1    | a chunk's encoding (`ChunkEncoding`), else 0          |
/// | 46     | 8    | a chunk's decoded size, a blob's size, a directory's  |
///
/// An index is [`INDEX_MAGIC`], the pack's name (u16 length, then UTF-8),
/// the number of entries (u32), the entries, and the BLAKE3 of everything
/// before it.
const ENTRY_LEN: usize = 1 + DIGEST_LEN + 8 + 4 + 1 + 8;

/// What a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// A chunk, in its stored encoding.
    Chunk = 0,
    /// A chunk list: BLAKE3 of (blob digest, list) then the list
    /// (`encode_chunk_list`).
    ChunkList = 1,
    /// A directory's canonical encoding.
    Directory = 2,
}

/// A record to store.
pub(crate) struct Record {
    pub kind: Kind,
    pub digest: Digest,
    pub encoding: u8,
    pub size: u64,
    pub bytes: Bytes,
}

/// Where a stored record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The pack's number in this replica's list of packs.
    pub pack: u32,
    /// Where the record starts in the pack.
    pub offset: u64,
    /// Its length in the pack.
    pub len: u32,
    /// A chunk's encoding.
    pub encoding: u8,
    /// A chunk's decoded size, a blob's size, a directory's size.
    pub size: u64,
}

/// The records a replica knows of.
#[derive(Debug, Default)]
pub(crate) struct Index {
    pub(crate) known: RwLock<Known>,
    pub(crate) loaded: AtomicBool,
    /// When the last listing started.
    last_listed: std::sync::Mutex<Option<Instant>>,
    /// Held while listing; when the last listing of each kind started.
    listing: tokio::sync::Mutex<Listed>,
}

#[derive(Debug, Default)]
pub(crate) struct Known {
    pub(crate) records: HashMap<(Kind, Digest), Entry>,
    pub(crate) packs: Vec<Arc<str>>,
    /// Quarantined chunks, with the pack of the copy that failed
    /// (`s3_quarantine.rs`): that copy is never read again.
    pub(crate) bad: HashMap<Digest, Arc<str>>,
    /// Index objects read (or found damaged), by name.
    indexes: HashSet<String>,
    /// The index objects naming each pack.
    pub(crate) pack_indexes: HashMap<Arc<str>, Vec<String>>,
    /// Bytes of each pack, as its indexes say.
    pub(crate) pack_bytes: HashMap<Arc<str>, u64>,
    /// Packs a collection condemned (`s3_gc.rs`), with when: their
    /// records count as absent, except to a collection.
    pub(crate) condemned: HashMap<Arc<str>, u64>,
    newest_millis: u64,
}

#[derive(Debug, Default)]
struct Listed {
    any: Option<Instant>,
    full: Option<Instant>,
    quarantine: Option<Instant>,
}

impl Known {
    pub(crate) fn add(&mut self, index: String, pack: &str, entries: Vec<((Kind, Digest), Entry)>) {
        if let Some(millis) = index.split('-').next().and_then(|m| m.parse().ok()) {
            self.newest_millis = self.newest_millis.max(millis);
        }
        self.indexes.insert(index.clone());
        let number = self.packs.len() as u32;
        let pack: Arc<str> = pack.into();
        self.packs.push(pack.clone());
        self.pack_indexes
            .entry(pack.clone())
            .or_default()
            .push(index);
        *self.pack_bytes.entry(pack.clone()).or_default() +=
            entries.iter().map(|(_, e)| u64::from(e.len)).sum::<u64>();
        let condemned = self.condemned.contains_key(&pack);
        // The newest index read wins: listings read indexes oldest first,
        // so a record stored again (a directory put to repair it, a
        // collection's copy) is read from its new copy. A condemned pack
        // never takes a record from one that is not.
        for (key, entry) in entries {
            if key.0 == Kind::Chunk && self.bad.get(&key.1).is_some_and(|p| *p == pack) {
                continue;
            }
            if condemned
                && self
                    .records
                    .get(&key)
                    .is_some_and(|e| !self.is_condemned(e))
            {
                continue;
            }
            let entry = Entry {
                pack: number,
                ..entry
            };
            self.records.insert(key, entry);
        }
    }

    /// Whether `entry`'s pack is condemned.
    pub(crate) fn is_condemned(&self, entry: &Entry) -> bool {
        !self.condemned.is_empty()
            && self
                .condemned
                .contains_key(&self.packs[entry.pack as usize])
    }

    /// Forgets every record of a pack that is gone (deleted by a
    /// collection), so a lookup finds another copy or none.
    pub(crate) fn forget_pack(&mut self, pack: &str) {
        let numbers: HashSet<u32> = (self.packs.iter().enumerate())
            .filter(|(_, p)| &***p == pack)
            .map(|(i, _)| i as u32)
            .collect();
        self.records.retain(|_, e| !numbers.contains(&e.pack));
    }

    /// Forgets a deleted pack whole: its records, its size and its
    /// indexes (which a later listing no longer finds).
    pub(crate) fn drop_pack(&mut self, pack: &str) {
        self.forget_pack(pack);
        self.pack_bytes.remove(pack);
        for name in self.pack_indexes.remove(pack).unwrap_or_default() {
            self.indexes.remove(&name);
        }
    }
}

/// How hard a lookup tries before it calls a record absent.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Miss {
    /// What this replica knows is the answer.
    Known,
    /// List new indexes within the window.
    Recent,
    /// Then list every index.
    Everything,
}

impl S3Store {
    /// Where each of `digests` is, listing again as `miss` says for those
    /// not known; `None` for each still absent.
    pub(crate) async fn locate(
        &self,
        kind: Kind,
        digests: &[Digest],
        miss: Miss,
    ) -> Result<Vec<Option<Entry>>, S3Error> {
        let since = Instant::now();
        if !self.index().loaded.load(Ordering::Acquire) {
            self.list_indexes(true, since).await?;
        }
        let mut found = self.known(kind, digests);
        for full in [false, true] {
            let enough = match miss {
                Miss::Known => true,
                Miss::Recent => full,
                Miss::Everything => false,
            };
            if found.iter().all(Option::is_some) || enough {
                break;
            }
            self.list_indexes(full, since).await?;
            found = self.known(kind, digests);
        }
        Ok(found)
    }

    /// Where each of `digests` is as far as this replica knows. A record
    /// whose copy is in a condemned pack is absent, unless this handle
    /// sees condemned packs ([`S3Store::seeing_condemned`]).
    pub(crate) fn known(&self, kind: Kind, digests: &[Digest]) -> Vec<Option<Entry>> {
        let known = self.index().known.read().expect("lock poisoned");
        let all = self.sees_condemned();
        let get = |d: &Digest| {
            let entry = known.records.get(&(kind, *d)).copied()?;
            (all || !known.is_condemned(&entry)).then_some(entry)
        };
        digests.iter().map(get).collect()
    }

    /// The stored bytes of each of `digests`, located as [`locate`] does
    /// (`None` for one absent), with where each was. A pack deleted by a
    /// collection since this replica read its index is forgotten, the
    /// indexes listed again, and the read made once more: a collection
    /// copies a live record elsewhere before it deletes its pack.
    ///
    /// [`locate`]: S3Store::locate
    pub(crate) async fn locate_and_read(
        &self,
        kind: Kind,
        digests: &[Digest],
        miss: Miss,
    ) -> Result<Vec<Option<(Entry, Bytes)>>, S3Error> {
        let mut again = true;
        loop {
            let found = self.locate(kind, digests, miss).await?;
            let entries: Vec<Entry> = found.iter().flatten().copied().collect();
            match self.read(&entries).await {
                Ok(bytes) => {
                    let mut bytes = bytes.into_iter();
                    return Ok(found
                        .into_iter()
                        .map(|e| e.map(|e| (e, bytes.next().expect("one per entry"))))
                        .collect());
                }
                Err(S3Error::PackGone { pack }) if again => {
                    again = false;
                    tracing::debug!(%pack, "an S3 pack was deleted; listing the indexes again");
                    (self.index().known.write().expect("lock poisoned")).forget_pack(&pack);
                    self.list_indexes(true, Instant::now()).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether each of `digests` is stored or being stored by this
    /// process, as far as this replica knows: it lists again only if its
    /// last listing is over [`STALE_AFTER`] old. A chunk another replica
    /// stored since is called missing and sent again (stored twice, read
    /// either way); a LIST per call made every writer of small files
    /// wait on the one before (`present` is asked for every batch).
    pub(crate) async fn present(
        &self,
        kind: Kind,
        digests: &[Digest],
    ) -> Result<Vec<bool>, S3Error> {
        let pending = |d: &Digest| self.writer().is_pending(kind, d);
        let stale = {
            let last = self.index().last_listed.lock().expect("lock poisoned");
            last.is_none_or(|t| t.elapsed() >= STALE_AFTER)
        };
        let miss = if stale { Miss::Recent } else { Miss::Known };
        let found = self.locate(kind, digests, miss).await?;
        Ok(digests
            .iter()
            .zip(found)
            .map(|(d, f)| f.is_some() || pending(d))
            .collect())
    }

    /// The stored bytes of `entries`, in order: one request per pack for
    /// ranges near each other, [`PARALLEL_GETS`] packs at once.
    pub(crate) async fn read(&self, entries: &[Entry]) -> Result<Vec<Bytes>, S3Error> {
        let mut by_pack: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            // The empty directory is zero bytes: nothing to ask for.
            if e.len > 0 {
                by_pack.entry(e.pack).or_default().push(i);
            }
        }
        let packs: Vec<(Arc<str>, Vec<usize>)> = {
            let known = self.index().known.read().expect("lock poisoned");
            let name = |p: u32| known.packs[p as usize].clone();
            by_pack.into_iter().map(|(p, at)| (name(p), at)).collect()
        };
        let reads = packs.into_iter().map(|(pack, at)| async move {
            let ranges: Vec<_> = at
                .iter()
                .map(|&i| entries[i].offset..entries[i].offset + u64::from(entries[i].len))
                .collect();
            let got = match self.get_ranges(&format!("packs/{pack}"), &ranges).await {
                Err(S3Error::Request {
                    source: object_store::Error::NotFound { .. },
                    ..
                }) => Err(S3Error::PackGone {
                    pack: pack.to_string(),
                }),
                got => got,
            }?;
            Ok::<_, S3Error>(at.into_iter().zip(got))
        });
        let mut out = vec![Bytes::new(); entries.len()];
        let mut reads = futures::stream::iter(reads).buffer_unordered(PARALLEL_GETS);
        while let Some(got) = reads.try_next().await? {
            for (i, bytes) in got {
                out[i] = bytes;
            }
        }
        Ok(out)
    }

    /// Flips one byte in the middle of a stored record, in its pack, for
    /// corruption tests; false if it is not stored (or has no bytes).
    pub(crate) async fn corrupt_record(&self, kind: Kind, digest: Digest) -> Result<bool, S3Error> {
        let digests = [digest];
        let Some(entry) = self.locate(kind, &digests, Miss::Everything).await?[0] else {
            return Ok(false);
        };
        if entry.len == 0 {
            return Ok(false);
        }
        let key = {
            let known = self.index().known.read().expect("lock poisoned");
            format!("packs/{}", known.packs[entry.pack as usize])
        };
        let Some(pack) = self.get(&key).await? else {
            return Ok(false);
        };
        let mut pack = pack.to_vec();
        pack[(entry.offset + u64::from(entry.len) / 2) as usize] ^= 1;
        self.put(&key, pack.into()).await?;
        Ok(true)
    }

    /// Lists `index/` (everything, or from [`LIST_WINDOW`] before the
    /// newest known index) and reads the indexes not yet known. Skipped
    /// if a listing of that reach started after `since`.
    pub(crate) async fn list_indexes(&self, full: bool, since: Instant) -> Result<(), S3Error> {
        let index = self.index();
        let mut listed = index.listing.lock().await;
        let loaded = index.loaded.load(Ordering::Acquire);
        // A replica lists everything at least every FULL_EVERY, so it
        // learns of packs deleted even if it never misses a record.
        let full = full || listed.full.is_none_or(|t| t.elapsed() >= FULL_EVERY);
        let last = if full || !loaded {
            listed.full
        } else {
            listed.any
        };
        if last.is_some_and(|t| t >= since) {
            return Ok(());
        }
        let started = Instant::now();
        let (after, known): (Option<String>, HashSet<String>) = {
            let known = index.known.read().expect("lock poisoned");
            let window = LIST_WINDOW.as_millis() as u64;
            let after = (loaded && !full)
                .then(|| known.newest_millis.checked_sub(window))
                .flatten()
                .map(|m| format!("{m:013}"));
            (after, known.indexes.clone())
        };
        let listed_names = self.list("index/", after.as_deref()).await?;
        // On a full listing, the packs whose every index is gone were
        // deleted by a collection: forgotten, so that no copy of theirs
        // counts as stored.
        if after.is_none() {
            let present: HashSet<&str> = listed_names.iter().map(String::as_str).collect();
            let mut known = index.known.write().expect("lock poisoned");
            let gone: Vec<Arc<str>> = (known.pack_indexes.iter())
                .filter(|(_, names)| names.iter().all(|n| !present.contains(n.as_str())))
                .map(|(pack, _)| pack.clone())
                .collect();
            for pack in gone {
                known.drop_pack(&pack);
            }
        }
        let names: Vec<String> = listed_names
            .into_iter()
            .filter(|n| !known.contains(n))
            .collect();
        let keys = names.iter().map(|n| format!("index/{n}")).collect();
        let objects = self.get_many(keys).await?;
        // Records of damaged chunks: on every full listing, else at most
        // every STALE_AFTER (a replica that reads a damaged copy finds out
        // itself anyway).
        // The same for condemned packs, listed first so that no index of
        // one read now takes a record from a pack that is not.
        if full || !loaded || listed.quarantine.is_none_or(|t| t.elapsed() >= STALE_AFTER) {
            self.list_quarantine().await?;
            self.list_condemned().await?;
            listed.quarantine = Some(started);
        }
        let mut known = index.known.write().expect("lock poisoned");
        for (name, object) in names.into_iter().zip(objects) {
            let Some(bytes) = object else { continue };
            match decode_index(&bytes) {
                Ok((pack, entries)) => known.add(name, &pack, entries),
                Err(reason) => {
                    // Its records read as absent, so writers store them again.
                    tracing::warn!(index = %name, reason, "skipping a damaged S3 index");
                    known.indexes.insert(name);
                }
            }
        }
        index.loaded.store(true, Ordering::Release);
        listed.any = Some(started);
        *index.last_listed.lock().expect("lock poisoned") = Some(started);
        if full || !loaded {
            listed.full = Some(started);
        }
        Ok(())
    }
}

pub(crate) fn encode_index(pack: &str, entries: &[((Kind, Digest), Entry)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + pack.len() + entries.len() * ENTRY_LEN);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&(pack.len() as u16).to_le_bytes());
    out.extend_from_slice(pack.as_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for ((kind, digest), e) in entries {
        out.push(*kind as u8);
        out.extend_from_slice(digest.as_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        out.push(e.encoding);
        out.extend_from_slice(&e.size.to_le_bytes());
    }
    let checksum = Digest::of(&out);
    out.extend_from_slice(checksum.as_bytes());
    out
}

type Decoded = (String, Vec<((Kind, Digest), Entry)>);

fn decode_index(bytes: &[u8]) -> Result<Decoded, &'static str> {
    let (body, checksum) = bytes.split_last_chunk::<DIGEST_LEN>().ok_or("truncated")?;
    if Digest::of(body).as_bytes() != checksum {
        return Err("checksum mismatch");
    }
    let rest = body.strip_prefix(INDEX_MAGIC).ok_or("not an index")?;
    let (len, rest) = rest.split_first_chunk::<2>().ok_or("truncated")?;
    let (pack, rest) = rest
        .split_at_checked(u16::from_le_bytes(*len).into())
        .ok_or("truncated")?;
    let pack = std::str::from_utf8(pack).map_err(|_| "pack name is not UTF-8")?;
    if pack.is_empty() || !pack.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err("pack name is not a digest");
    }
    let (count, rest) = rest.split_first_chunk::<4>().ok_or("truncated")?;
    if rest.len() != u32::from_le_bytes(*count) as usize * ENTRY_LEN {
        return Err("wrong number of entries");
    }
    let entries = rest
        .chunks_exact(ENTRY_LEN)
        .map(|e| {
            let kind = match e[0] {
                0 => Kind::Chunk,
                1 => Kind::ChunkList,
                2 => Kind::Directory,
                _ => return Err("unknown record kind"),
            };
            let digest = Digest::try_from(&e[1..33]).expect("32 bytes");
            let u64_at = |at: usize| u64::from_le_bytes(e[at..at + 8].try_into().expect("8"));
            let entry = Entry {
                pack: 0,
                offset: u64_at(33),
                len: u32::from_le_bytes(e[41..45].try_into().expect("4 bytes")),
                encoding: e[45],
                size: u64_at(46),
            };
            Ok(((kind, digest), entry))
        })
        .collect::<Result<_, _>>()?;
    Ok((pack.to_owned(), entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trip_and_damage() {
        let entry = |offset, size| Entry {
            pack: 0,
            offset,
            len: 7,
            encoding: 1,
            size,
        };
        let entries = vec![
            ((Kind::Chunk, Digest::of(b"a")), entry(0, 9)),
            ((Kind::Directory, Digest::of(b"b")), entry(7, 3)),
        ];
        let pack = Digest::of(b"pack").to_string();
        let bytes = encode_index(&pack, &entries);
        assert_eq!(decode_index(&bytes).unwrap(), (pack, entries));
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert_eq!(decode_index(&flipped), Err("checksum mismatch"));
        assert_eq!(decode_index(&bytes[..40]), Err("checksum mismatch"));
        assert_eq!(decode_index(&[]), Err("truncated"));
    }
}
