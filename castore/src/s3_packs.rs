//! Writing packs on the object store: how an `s3://` store ([`S3Store`])
//! stores chunks, chunk lists and directories. How a replica finds and
//! reads them is in `s3_index.rs`.
//!
//! **Writing.** Every write (a batch of chunks, a chunk list with its last
//! chunks, a run of directories) appends its records to the one open pack
//! of the process and waits until that pack is stored. A pack is sealed
//! once it holds [`PACK_TARGET_BYTES`], once no record has come for
//! [`IDLE`] (its writers are all waiting for it), or [`MAX_AGE`] after its
//! first record, whichever comes first, and then costs two PUTs: the pack
//! (`packs/<name>`, [`pack_name`]), then its index
//! (`index/<millis>-<hash>`), which names the pack and says where each
//! record is. Only an index makes records visible, and it is written after
//! its pack, so no reader finds a record whose bytes are not stored. A
//! write returns once the index is stored; a pack that fails (after the
//! store's retries) fails every write in it, and writing again stores the
//! records in a new pack.
//!
//! **Nothing points at missing data.** A write may name records it needs
//! (a chunk list its chunks, a directory its subdirectories); the check
//! and the append happen under one lock, and a needed record counts as
//! present if it is stored, or in the same open pack (made visible by the
//! same index). One in a sealed pack still uploading is waited for first.
//! So a chunk list is never visible before its chunks are stored, and
//! `put_chunks_and_blob` is one write. Packs carry no order between them.
//!
//! **Cost.** Two PUTs per pack, whatever it holds. Measured
//! (`storing_many_files_costs_a_few_puts_per_pack`: debug build, two
//! cores, three Garage nodes on loopback): 2,004 files, 85 MB of random
//! bytes (some 3,000 chunks), stored 256 files at a time as ingest does,
//! took 31 PUTs in 4.3 s — 363 PUTs per GB stored, where a record per
//! object would have been ~5,000. `lazystore import` of a 97.5 MB NAR
//! through a `serve` on the bucket (`tests/s3_replicas.rs`, same machine)
//! wrote 56 MB in 14 and 24 packs in two runs, an index each and a
//! PathInfo: 29 and 49 PUTs, 300–500 per GB of NAR, where full packs
//! would be 9. The client is the limit there: compressing in a debug
//! build, its batches came further apart than [`IDLE`]. A lone writer (one small put at a time) pays two PUTs and
//! [`IDLE`] per write: batching needs writers in flight.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::watch;

use crate::digest::Digest;
use crate::s3_config::S3Error;
use crate::s3_index::{Entry, Kind, Record, encode_index};
use crate::s3_store::S3Store;

/// A pack is sealed once it holds this many bytes: two PUTs per 16 MiB
/// stored at best, and half the 32 MiB a `Blobs` keeps in flight, so one
/// pack fills while the one before is stored.
pub(crate) const PACK_TARGET_BYTES: usize = 16 << 20;

/// A pack is sealed once no record has come for this long: the writers
/// that fill it are all waiting for it (each write waits for its pack), or
/// there is only one. Short enough for one small write's latency, long
/// enough not to seal between the batches of writers busy compressing:
/// at 20 ms the writes of `castore/tests/s3.rs` (64 at a time, 8 MiB
/// packs then) made packs of 1 MB on average, 173 PUTs against 31 now.
pub(crate) const IDLE: Duration = Duration::from_millis(100);

/// A pack is sealed this long after its first record at the latest, so
/// a steady trickle of writes still returns.
pub(crate) const MAX_AGE: Duration = Duration::from_millis(500);

/// The writer of one process: its open pack and the records not yet
/// visible.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    state: Mutex<WriterState>,
}

impl Writer {
    /// Whether a record is in the open pack or a pack being stored.
    pub(crate) fn is_pending(&self, kind: Kind, digest: &Digest) -> bool {
        let state = self.state.lock().expect("lock poisoned");
        state.pending.contains_key(&(kind, *digest))
    }
}

type Done = watch::Receiver<Option<Result<(), Arc<S3Error>>>>;

#[derive(Debug, Default)]
struct WriterState {
    open: Option<OpenPack>,
    /// Records in the open pack or in sealed packs not yet indexed.
    pending: HashMap<(Kind, Digest), Pending>,
    next_seq: u64,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    size: u64,
    done: Done,
}

#[derive(Debug)]
struct OpenPack {
    seq: u64,
    opened: Instant,
    last_append: Instant,
    bytes: Vec<u8>,
    entries: Vec<((Kind, Digest), Entry)>,
    tx: watch::Sender<Option<Result<(), Arc<S3Error>>>>,
}

/// When a needed record is missing from a write.
pub(crate) enum WriteError<E> {
    /// The check refused the write.
    Refused(E),
    /// The store failed.
    Store(S3Error),
}

/// What a write does next, decided under the writer's lock.
enum Step {
    /// Wait for these packs, which hold needed records, to settle.
    Wait(Vec<Done>),
    /// List every index: a needed record is not known.
    List,
    /// Appended; wait for these packs.
    Appended(Vec<Done>),
}

impl S3Store {
    /// Stores `records` once the records `needs` names pass `check` (given
    /// each one's size, or `None` if it is absent), and returns once they
    /// are visible to every replica. Records already stored or being
    /// stored are not stored again.
    pub(crate) async fn write<E>(
        &self,
        records: Vec<Record>,
        needs: (Kind, &[Digest]),
        check: impl Fn(&[Option<u64>]) -> Result<(), E>,
    ) -> Result<(), WriteError<E>> {
        self.write_records(records, needs, check, false).await
    }

    /// Stores `records` in a new pack even where a copy is stored: how a
    /// collection moves the live records out of a pack it compacts.
    pub(crate) async fn write_copies(&self, records: Vec<Record>) -> Result<(), S3Error> {
        let ok = |_: &[Option<u64>]| Ok::<(), S3Error>(());
        match self
            .write_records(records, (Kind::Chunk, &[]), ok, true)
            .await
        {
            Ok(()) => Ok(()),
            Err(WriteError::Refused(e) | WriteError::Store(e)) => Err(e),
        }
    }

    async fn write_records<E>(
        &self,
        records: Vec<Record>,
        needs: (Kind, &[Digest]),
        check: impl Fn(&[Option<u64>]) -> Result<(), E>,
        copies: bool,
    ) -> Result<(), WriteError<E>> {
        let (kind, needs) = needs;
        let since = Instant::now();
        if !self.index().loaded.load(Ordering::Acquire) {
            let listed = self.list_indexes(true, since).await;
            listed.map_err(WriteError::Store)?;
        }
        // What this write stores itself is there as soon as it is.
        let own: HashMap<Digest, u64> = records
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| (r.digest, r.size))
            .collect();
        let mut listed = false;
        let mut records = Some(records);
        let waits = loop {
            let durable = self.known(kind, needs);
            let step = {
                let mut state = self.writer().state.lock().expect("lock poisoned");
                let open_seq = state.open.as_ref().map(|o| o.seq);
                let mut sizes = Vec::with_capacity(needs.len());
                let mut uploading = Vec::new();
                for (digest, stored) in needs.iter().zip(&durable) {
                    let pending = state.pending.get(&(kind, *digest));
                    match (stored, own.get(digest), pending) {
                        (Some(e), _, _) => sizes.push(Some(e.size)),
                        (None, Some(size), _) => sizes.push(Some(*size)),
                        (None, None, Some(p)) if Some(p.seq) == open_seq => {
                            sizes.push(Some(p.size))
                        }
                        (None, None, Some(p)) => uploading.push(p.done.clone()),
                        (None, None, None) => sizes.push(None),
                    }
                }
                if !uploading.is_empty() {
                    Step::Wait(uploading)
                } else if sizes.iter().any(Option::is_none) && !listed {
                    Step::List
                } else {
                    check(&sizes).map_err(WriteError::Refused)?;
                    let records = records.take().expect("appended once");
                    Step::Appended(self.append(&mut state, records, copies))
                }
            };
            match step {
                Step::Wait(uploading) => {
                    for mut done in uploading {
                        // Either way it is settled: stored, or absent again.
                        let _ = done.wait_for(Option::is_some).await;
                    }
                }
                Step::List => {
                    listed = true;
                    let full = self.list_indexes(true, since).await;
                    full.map_err(WriteError::Store)?;
                }
                Step::Appended(waits) => break waits,
            }
        };
        for mut done in waits {
            let settled = done.wait_for(Option::is_some).await;
            let result = settled.map_err(|_| WriteError::Store(S3Error::WriterGone))?;
            if let Some(Err(e)) = &*result {
                return Err(WriteError::Store(S3Error::PackNotStored(e.clone())));
            }
        }
        Ok(())
    }

    /// Appends the records not yet stored or pending to the open pack
    /// (opening one if needed, sealing it when full); what to wait for.
    fn append(&self, state: &mut WriterState, records: Vec<Record>, copies: bool) -> Vec<Done> {
        let mut waits = Vec::new();
        let keys: Vec<_> = records.iter().map(|r| (r.kind, r.digest)).collect();
        // A directory is written again even when stored: it is small, a
        // put of a stored one is rare, and the newest copy is the one read,
        // so putting a damaged directory again repairs it (as in redb). A
        // record only in a condemned pack is written again too.
        let stored: HashSet<(Kind, Digest)> = {
            let known = self.index().known.read().expect("lock poisoned");
            let is_stored = |k: &&(Kind, Digest)| {
                !copies
                    && k.0 != Kind::Directory
                    && known
                        .records
                        .get(*k)
                        .is_some_and(|e| !known.is_condemned(e))
            };
            keys.iter().filter(is_stored).copied().collect()
        };
        for record in records {
            let key = (record.kind, record.digest);
            if stored.contains(&key) {
                continue;
            }
            if let Some(p) = state.pending.get(&key) {
                waits.push(p.done.clone());
                continue;
            }
            if state.open.is_none() {
                let seq = state.next_seq;
                state.next_seq += 1;
                let (tx, _) = watch::channel(None);
                let now = Instant::now();
                state.open = Some(OpenPack {
                    seq,
                    opened: now,
                    last_append: now,
                    bytes: Vec::new(),
                    entries: Vec::new(),
                    tx,
                });
                let store = self.clone();
                tokio::spawn(async move { store.seal_when_idle(seq).await });
            }
            let open = state.open.as_mut().expect("just opened");
            open.last_append = Instant::now();
            let entry = Entry {
                pack: 0,
                offset: open.bytes.len() as u64,
                len: record.bytes.len() as u32,
                encoding: record.encoding,
                size: record.size,
            };
            open.bytes.extend_from_slice(&record.bytes);
            open.entries.push((key, entry));
            let done = open.tx.subscribe();
            waits.push(done.clone());
            let (seq, size) = (open.seq, record.size);
            state.pending.insert(key, Pending { seq, size, done });
        }
        if state
            .open
            .as_ref()
            .is_some_and(|o| o.bytes.len() >= PACK_TARGET_BYTES)
        {
            self.seal(state, "full");
        }
        waits
    }

    /// Seals pack `seq`, if still open, once it is [`IDLE`] or
    /// [`MAX_AGE`] old.
    async fn seal_when_idle(&self, seq: u64) {
        let mut wake = Instant::now() + IDLE;
        loop {
            tokio::time::sleep_until(wake.into()).await;
            let mut state = self.writer().state.lock().expect("lock poisoned");
            let Some(open) = state.open.as_ref().filter(|o| o.seq == seq) else {
                return;
            };
            wake = (open.last_append + IDLE).min(open.opened + MAX_AGE);
            if wake <= Instant::now() {
                let why = if open.last_append + IDLE <= Instant::now() {
                    "idle"
                } else {
                    "age"
                };
                self.seal(&mut state, why);
                return;
            }
        }
    }

    /// Seals the open pack and starts storing it.
    fn seal(&self, state: &mut WriterState, why: &'static str) {
        let Some(pack) = state.open.take() else {
            return;
        };
        tracing::debug!(
            records = pack.entries.len(),
            bytes = pack.bytes.len(),
            age_ms = pack.opened.elapsed().as_millis() as u64,
            why,
            "sealing an S3 pack"
        );
        let store = self.clone();
        tokio::spawn(async move {
            let OpenPack {
                seq,
                bytes,
                entries,
                tx,
                ..
            } = pack;
            let keys: Vec<_> = entries.iter().map(|(k, _)| *k).collect();
            let result = store.store_pack(bytes, entries).await.map_err(Arc::new);
            let mut state = store.writer().state.lock().expect("lock poisoned");
            for key in keys {
                if state.pending.get(&key).is_some_and(|p| p.seq == seq) {
                    state.pending.remove(&key);
                }
            }
            drop(state);
            tx.send_replace(Some(result));
        });
    }

    /// PUTs a pack, then its index, then knows its records.
    async fn store_pack(
        &self,
        bytes: Vec<u8>,
        entries: Vec<((Kind, Digest), Entry)>,
    ) -> Result<(), S3Error> {
        let bytes = Bytes::from(bytes);
        let hashed = bytes.clone();
        let pack = tokio::task::spawn_blocking(move || pack_name(&hashed))
            .await
            .map_err(|_| S3Error::WriterGone)?
            .to_string();
        self.put(&format!("packs/{pack}"), bytes).await?;
        let index = encode_index(&pack, &entries);
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let name = format!("{millis:013}-{}", &Digest::of(&index).to_string()[..16]);
        self.put(&format!("index/{name}"), index.into()).await?;
        let released: Vec<Digest> = {
            let mut known = self.index().known.write().expect("lock poisoned");
            let chunks = entries.iter().filter(|((kind, _), _)| *kind == Kind::Chunk);
            let bad: Vec<Digest> = chunks
                .map(|((_, d), _)| *d)
                .filter(|d| known.bad.contains_key(d))
                .collect();
            known.add(name, &pack, entries);
            bad
        };
        // Stored anew: no longer missing.
        self.release_quarantined(&released).await
    }
}

/// A pack's name: the BLAKE3 of its bytes and of who wrote it when (the
/// clock, the process, a sequence number), so no two writes share one. A
/// collection condemns a pack by name (`s3_gc.rs`); the same records
/// written again (a path uploaded anew after its packs were condemned)
/// make the same bytes, and must not land in the condemned pack's name.
fn pack_name(bytes: &[u8]) -> Digest {
    static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut hasher = blake3::Hasher::new();
    hasher.update(bytes);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    hasher.update(&nanos.to_le_bytes());
    hasher.update(&std::process::id().to_le_bytes());
    hasher.update(&SEQUENCE.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    Digest::from(hasher.finalize())
}
