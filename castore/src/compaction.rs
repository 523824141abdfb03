//! Compaction ([`RedbStore::compact`], `lazystore compact`): a redb store's
//! chunks gathered into frames (`frames.rs` says why and how they are
//! read). The chunks of every published path, in NAR order, each once,
//! are gathered into frames of [`FRAME_BYTES`] decoded bytes, compressed at
//! [`FRAME_LEVEL`], appended to the packs, and each chunk's index record
//! moved to its frame (`chunk_record.rs`, record encoding 2). A frame is
//! kept only where it takes fewer bytes than its chunks did; chunks stored
//! raw (they did not compress on their own) stay as they are. Imports stay
//! as fast as before.
//!
//! Compaction checks every chunk it moves. Crash safety is the packs'
//! rule: the frame is in the packs and fsynced before the transaction
//! moving the records commits, and the chunks' old bytes are freed only
//! after it has.
//!
//! Compaction also takes store path hashes out (reference normalisation,
//! `store_hashes.rs`): a chunk holding `/nix/store/<hash>` goes into its
//! frame with those hashes replaced, as a chunk of its own (its base,
//! under the digest of the replaced bytes), and its record becomes the
//! base's digest and the hashes it had (`chunk_record.rs`, encoding 3).
//! A rebuild that changed only the hashes of its dependencies (and so its
//! own) has chunks with the same bases, since the chunker cut it at the
//! same offsets: each of them then costs its record (41 bytes and 36 per
//! hash), not its bytes. Reading such a chunk reads its base, puts the
//! hashes back and sends the chunk raw, checked by its reader against the
//! digest of the real bytes as every chunk is; the base is never sent for
//! it. A garbage collection keeps the base of every chunk it keeps
//! (`sweep.rs`).

use std::collections::HashSet;

use redb::{ReadableDatabase, ReadableTable};

use crate::blobs::BlobError;
use crate::blobs::redb::{backend, read_chunk};
use crate::chunk_record::{InFrame, IndexRecord, PatchedRecord, StoredRecord};
use crate::digest::Digest;
use crate::proto::ChunkEncoding;
use crate::redb_store::{ReadTables, RedbStore, Tables};
use crate::store_hashes::{self, HASH_LEN};

/// Decoded bytes gathered into one frame (it ends with the chunk that
/// passes this, so a frame is at most this plus one chunk).
pub const FRAME_BYTES: usize = 1 << 20;

/// zstd level of frames. Level 3 gives 1.03 × the zstd NAR on the Python
/// install and takes half the time; level 6 is the cheapest that is below
/// 1.0 × on both benchmark paths; level 9 saves 1.5 % more for 40 % more
/// time. Decoding speed is the same for all three.
pub const FRAME_LEVEL: i32 = 6;

/// Frames compressed between two commits.
const FRAMES_PER_COMMIT: usize = 32;

/// How [`RedbStore::compact`] frames.
#[derive(Clone, Copy, Debug)]
pub struct CompactOptions {
    /// Decoded bytes per frame.
    pub frame_bytes: usize,
    /// zstd level.
    pub level: i32,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            frame_bytes: FRAME_BYTES,
            level: FRAME_LEVEL,
        }
    }
}

/// What a compaction did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Chunks moved into frames, and their decoded bytes.
    pub chunks: u64,
    pub chunk_bytes: u64,
    /// Frames written.
    pub frames: u64,
    /// Pack bytes of the moved chunks before, and of their frames.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Of the moved chunks, those stored as their normalised bytes (their
    /// base) and the store path hashes taken out of them; and of those,
    /// the ones whose base was stored already (a rebuild's), which took
    /// only their record.
    pub patched: u64,
    pub shared_base: u64,
    /// Chunks left as they were: in a frame already, stored raw, or in a
    /// frame that would not have been smaller.
    pub left: u64,
    /// Chunks named but not stored (`lazystore fsck` says more).
    pub absent: u64,
    /// Chunks whose stored bytes failed their check: left in place for
    /// `lazystore fsck --repair`.
    pub damaged: Vec<Digest>,
}

/// A chunk to move: its digest, its record as stored, parsed.
struct Move {
    digest: Digest,
    stored: Vec<u8>,
    record: IndexRecord,
}

/// Where a moved chunk goes.
enum Placement {
    /// Its bytes at this offset of the frame.
    Own(u32),
    /// Its normalised bytes at this offset of the frame, as the chunk
    /// `base`, and a record of the hashes.
    Base(u32, Patch),
    /// A record of the hashes; its base is stored already.
    Shared(Patch),
}

/// A chunk's hashes, taken out, and the digest of what is left.
struct Patch {
    base: Digest,
    hashes: Vec<(u32, [u8; HASH_LEN])>,
}

/// One frame being built: its chunks (index into the moves, where each
/// goes) and the decoded bytes.
#[derive(Default)]
struct Frame {
    members: Vec<(usize, Placement)>,
    bytes: Vec<u8>,
}

impl RedbStore {
    /// Compacts the chunks `order` names, in that order, each once, into
    /// frames (see the module doc); `progress` is called with the decoded
    /// bytes done and the total. Offline: nothing else may read the store
    /// meanwhile (readers holding an old record would find its bytes
    /// freed), which the store's file lock ensures across processes.
    /// Blocks; call it on a blocking thread.
    pub fn compact(
        &self,
        order: &[Digest],
        options: CompactOptions,
        progress: &dyn Fn(u64, u64),
    ) -> Result<Compacted, BlobError> {
        let mut report = Compacted::default();
        let moves = self.plan(order, &mut report)?;
        let total: u64 = moves.iter().map(|m| m.record.size).sum();
        let mut done = 0;
        let mut next = 0;
        // Bases put in a frame by this compaction.
        let mut placed = HashSet::new();
        while next < moves.len() {
            let mut frames = Vec::new();
            // Bases stored before are looked up as of the last commit.
            let txn = self.database().begin_read().map_err(backend)?;
            let tables = ReadTables::new(&txn).map_err(backend)?;
            while frames.len() < FRAMES_PER_COMMIT && next < moves.len() {
                let mut frame = Frame::default();
                while frame.bytes.len() < options.frame_bytes && next < moves.len() {
                    let m = &moves[next];
                    match read_chunk(self, &tables.chunks, m.digest, &m.stored)?.decode() {
                        Ok(raw) => {
                            let placement = place(&raw, &mut frame.bytes, |base| {
                                Ok(!placed.insert(*base)
                                    || tables
                                        .chunks
                                        .get(base.as_bytes())
                                        .map_err(backend)?
                                        .is_some())
                            })?;
                            frame.members.push((next, placement));
                        }
                        Err(_) => report.damaged.push(m.digest),
                    }
                    done += m.record.size;
                    next += 1;
                }
                if !frame.members.is_empty() {
                    frames.push(frame);
                }
            }
            drop((tables, txn));
            let compressed = compress_all(&frames, options.level)?;
            self.write_frames(&moves, &frames, compressed, &mut report)?;
            progress(done, total);
        }
        Ok(report)
    }

    /// The chunks of `order` to move, in order, each once.
    fn plan(&self, order: &[Digest], report: &mut Compacted) -> Result<Vec<Move>, BlobError> {
        let txn = self.database().begin_read().map_err(backend)?;
        let tables = ReadTables::new(&txn).map_err(backend)?;
        let mut seen = HashSet::with_capacity(order.len());
        let mut moves = Vec::new();
        for digest in order {
            if !seen.insert(*digest) {
                continue;
            }
            let Some(value) = tables.chunks.get(digest.as_bytes()).map_err(backend)? else {
                report.absent += 1;
                continue;
            };
            let stored = value.value().to_vec();
            let record = match StoredRecord::from_bytes(&stored) {
                Ok(StoredRecord::Placed(record)) => record,
                Ok(StoredRecord::Patched(_)) => {
                    report.left += 1;
                    continue;
                }
                Err(_) => {
                    report.damaged.push(*digest);
                    continue;
                }
            };
            if record.frame.is_some() || record.encoding == ChunkEncoding::Raw {
                report.left += 1;
                continue;
            }
            moves.push(Move {
                digest: *digest,
                stored,
                record,
            });
        }
        Ok(moves)
    }

    /// Appends the frames that pay, moves their chunks' records to them in
    /// one durable commit, then frees the chunks' old bytes.
    fn write_frames(
        &self,
        moves: &[Move],
        frames: &[Frame],
        compressed: Vec<Vec<u8>>,
        report: &mut Compacted,
    ) -> Result<(), BlobError> {
        let txn = self.database().begin_write().map_err(backend)?;
        let mut freed = Vec::new();
        {
            let mut tables = Tables::new(&txn).map_err(backend)?;
            for (frame, z) in frames.iter().zip(compressed) {
                let has_bytes = |p: &Placement| !matches!(p, Placement::Shared(_));
                let with_bytes = frame.members.iter().filter(|(_, p)| has_bytes(p));
                let before: u64 = with_bytes
                    .clone()
                    .map(|(i, _)| u64::from(moves[*i].record.at.len))
                    .sum();
                // The frame, where it pays; a chunk whose base is stored
                // already is moved either way.
                let at = if before > z.len() as u64 {
                    let at = self.packs().append(&z).map_err(backend)?;
                    report.frames += 1;
                    report.bytes_after += z.len() as u64;
                    Some(at)
                } else {
                    report.left += with_bytes.count() as u64;
                    None
                };
                let in_frame = |offset: u32| IndexRecord {
                    encoding: ChunkEncoding::Zstd,
                    size: 0,
                    at: at.expect("only with a frame"),
                    frame: Some(InFrame {
                        offset,
                        frame_len: frame.bytes.len() as u32,
                    }),
                };
                for (i, placement) in &frame.members {
                    let m = &moves[*i];
                    // Moved only if still as planned (written again or
                    // quarantined since: left alone).
                    let current = tables.chunks.get(m.digest.as_bytes()).map_err(backend)?;
                    if current.is_none_or(|v| v.value() != &m.stored[..]) {
                        continue;
                    }
                    let patched = |p: &Patch| PatchedRecord {
                        size: m.record.size,
                        base: p.base,
                        hashes: p.hashes.clone(),
                    };
                    let record = match placement {
                        _ if at.is_none() && has_bytes(placement) => continue,
                        Placement::Own(offset) => IndexRecord {
                            size: m.record.size,
                            ..in_frame(*offset)
                        }
                        .to_bytes(),
                        Placement::Base(offset, p) => {
                            let base = IndexRecord {
                                size: m.record.size,
                                ..in_frame(*offset)
                            };
                            tables
                                .chunks
                                .insert(p.base.as_bytes(), &base.to_bytes()[..])
                                .map_err(backend)?;
                            report.patched += 1;
                            patched(p).to_bytes()
                        }
                        Placement::Shared(p) => {
                            // Its base went into a frame that did not pay.
                            if tables
                                .chunks
                                .get(p.base.as_bytes())
                                .map_err(backend)?
                                .is_none()
                            {
                                report.left += 1;
                                continue;
                            }
                            report.patched += 1;
                            report.shared_base += 1;
                            let record = patched(p);
                            report.bytes_after += record.record_len() as u64;
                            record.to_bytes()
                        }
                    };
                    tables
                        .chunks
                        .insert(m.digest.as_bytes(), &record[..])
                        .map_err(backend)?;
                    freed.push(m.record.at);
                    report.chunks += 1;
                    report.chunk_bytes += m.record.size;
                    report.bytes_before += u64::from(m.record.at.len);
                }
            }
        }
        self.commit(txn, redb::Durability::Immediate)
            .map_err(backend)?;
        self.packs().punch(&freed).map_err(backend)
    }
}

/// Where the chunk `raw` goes: appended to `frame` as it is, or with its
/// store path hashes replaced (unless `stored(base)` says those bytes are
/// stored or placed already; it is asked once per chunk with hashes).
fn place(
    raw: &[u8],
    frame: &mut Vec<u8>,
    stored: impl FnOnce(&Digest) -> Result<bool, BlobError>,
) -> Result<Placement, BlobError> {
    let offset = frame.len() as u32;
    let found = store_hashes::find(raw);
    if found.is_empty() {
        frame.extend_from_slice(raw);
        return Ok(Placement::Own(offset));
    }
    let hashes = found
        .iter()
        .map(|&at| {
            let hash = raw[at..at + HASH_LEN].try_into().expect("32 bytes");
            (at as u32, hash)
        })
        .collect();
    let mut normalised = raw.to_vec();
    store_hashes::normalise(&mut normalised, &found);
    let base = Digest::of(&normalised);
    let patch = Patch { base, hashes };
    if stored(&base)? {
        return Ok(Placement::Shared(patch));
    }
    frame.extend_from_slice(&normalised);
    Ok(Placement::Base(offset, patch))
}

/// Compresses each frame at `level`, on every core.
fn compress_all(frames: &[Frame], level: i32) -> Result<Vec<Vec<u8>>, BlobError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = frames.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let workers: Vec<_> = frames
            .chunks(per_thread)
            .map(|part| {
                s.spawn(move || -> std::io::Result<Vec<Vec<u8>>> {
                    let mut z = zstd::bulk::Compressor::new(level)?;
                    part.iter().map(|f| z.compress(&f.bytes)).collect()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(frames.len());
        for w in workers {
            out.extend(
                w.join()
                    .expect("compression does not panic")
                    .map_err(backend)?,
            );
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::blobs::{EncodedChunk, RedbBlobService};
    use crate::{BlobService, Leases, Live};

    /// Chunks of text that resemble each other (as a path's files do) and
    /// compress better together than one by one.
    fn texts(n: u32) -> Vec<Bytes> {
        let hex = |b: Vec<u8>| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let common = hex(lazystore_testkit::noise(6000, 7));
        (0..n)
            .map(|i| {
                let own = hex(lazystore_testkit::noise(500, u64::from(i) + 100));
                Bytes::from(format!("# module {i}\n{common}\n{own}\n"))
            })
            .collect()
    }

    async fn stored(store: &RedbStore, chunks: &[Bytes]) -> (RedbBlobService, Vec<Digest>) {
        let blobs = RedbBlobService::new(store.clone());
        let encoded: Vec<EncodedChunk> = chunks.iter().cloned().map(EncodedChunk::encode).collect();
        let digests = encoded.iter().map(|c| c.digest).collect();
        blobs.put_chunks(encoded).await.unwrap();
        (blobs, digests)
    }

    async fn read_back(blobs: &RedbBlobService, digests: &[Digest]) -> Vec<Bytes> {
        let read = blobs.read_chunks(digests).await.unwrap();
        read.iter().map(|c| c.decode().unwrap()).collect()
    }

    /// What `digests` take in the store, besides any base.
    async fn stored_bytes(blobs: &RedbBlobService, digests: &[Digest]) -> u64 {
        let sizes = blobs.stored_sizes(digests).await.unwrap();
        sizes.iter().map(|s| s.bytes).sum()
    }

    fn options(frame_bytes: usize) -> CompactOptions {
        CompactOptions {
            frame_bytes,
            level: 3,
        }
    }

    /// Compacted chunks read back as they were, before and after the store
    /// is opened again, take fewer bytes, and are counted at their share of
    /// their frame; a raw chunk, and chunks in frames, are left alone.
    #[tokio::test]
    async fn compacted_chunks_read_back_smaller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = RedbStore::open(&path).unwrap();
        let mut chunks = texts(40);
        chunks.push(Bytes::from(lazystore_testkit::noise(50_000, 1)));
        let (blobs, digests) = stored(&store, &chunks).await;
        let before = stored_bytes(&blobs, &digests).await;

        // Named twice, and one absent chunk: each moved once.
        let mut order = digests.clone();
        order.extend_from_slice(&digests[..3]);
        order.push(Digest::of(b"not stored"));
        let report = store
            .compact(&order, options(64 << 10), &|_, _| {})
            .unwrap();
        assert_eq!(report.chunks, 40, "{report:?}");
        assert_eq!((report.left, report.absent), (1, 1), "{report:?}");
        assert!(report.frames >= 2, "{report:?}");
        assert!(report.damaged.is_empty());
        assert!(report.bytes_after * 3 < report.bytes_before, "{report:?}");
        assert_eq!(read_back(&blobs, &digests).await, chunks);
        let after = stored_bytes(&blobs, &digests).await;
        let raw = chunks.last().unwrap().len() as u64;
        assert!(after < before, "{after} {before}");
        // Shares of frames add up to the frames' bytes, give or take the
        // rounding of each share.
        assert!(
            after.abs_diff(report.bytes_after + raw) <= 40,
            "{after} {report:?}"
        );

        // Again: nothing left to move.
        let again = store
            .compact(&digests, options(64 << 10), &|_, _| {})
            .unwrap();
        assert_eq!((again.chunks, again.left), (0, 41), "{again:?}");

        drop((blobs, store));
        let store = RedbStore::open(&path).unwrap();
        let blobs = RedbBlobService::new(store.clone());
        assert_eq!(read_back(&blobs, &digests).await, chunks);
        // And a fresh open after a sweep that kept everything.
        let live = Live {
            chunks: digests.iter().copied().collect(),
            ..Live::default()
        };
        store.sweep(&live, None, false).unwrap();
        assert_eq!(read_back(&blobs, &digests).await, chunks);
    }

    /// A damaged frame fails the check of every chunk in it, as a damaged
    /// chunk does: no wrong byte is read.
    #[tokio::test]
    async fn a_damaged_frame_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = RedbStore::open(&path).unwrap();
        let chunks = texts(8);
        let (blobs, digests) = stored(&store, &chunks).await;
        store
            .compact(&digests, options(1 << 20), &|_, _| {})
            .unwrap();
        drop((blobs, store));
        // Flip a byte in the middle of the newest pack's last frame.
        let packs = dir.path().join("s.packs");
        let mut last: Vec<_> = std::fs::read_dir(&packs)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        last.sort();
        let last = last.pop().unwrap();
        let mut bytes = std::fs::read(&last).unwrap();
        let at = bytes.len() - 200;
        bytes[at] ^= 0x55;
        std::fs::write(&last, bytes).unwrap();

        let store = RedbStore::open(&path).unwrap();
        let blobs = RedbBlobService::new(store.clone());
        let mut caught = 0;
        for d in &digests {
            match blobs.read_chunks(&[*d]).await {
                Ok(read) => {
                    if read[0].decode().is_err() {
                        caught += 1;
                    }
                }
                Err(BlobError::Decompress { chunk, .. } | BlobError::Corrupt { chunk, .. }) => {
                    assert_eq!(chunk, *d);
                    caught += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(caught > 0, "the damage went unseen");
    }

    /// An online sweep drops a frame's bytes only with its last chunk: a
    /// `texts(n)` naming a store path of `hash` here and there, as a
    /// build's files name their dependencies and their own path.
    fn built(n: u32, hash: &str) -> Vec<Bytes> {
        texts(n)
            .into_iter()
            .map(|t| {
                let path = format!("/nix/store/{hash}-python3-3.12/lib");
                let (head, tail) = t.split_at(t.len() / 2);
                let mut b = format!("#!{path}/bin/python\n").into_bytes();
                b.extend_from_slice(head);
                b.extend_from_slice(format!("{path}/site-packages:{path}").as_bytes());
                b.extend_from_slice(tail);
                Bytes::from(b)
            })
            .collect()
    }

    /// A rebuild whose chunks differ only in store path hashes costs their
    /// records once compacted; both builds read back whole; a sweep keeps
    /// the bases of the chunks it keeps, whoever stored them, and frees
    /// them with the last.
    #[tokio::test]
    async fn a_rebuild_with_other_hashes_takes_only_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = RedbStore::open(&path).unwrap();
        let first = built(30, "0c9k8m1v5dz0qh4x3a6rj2wyb7sil5nf");
        let (blobs, a) = stored(&store, &first).await;
        let report = store.compact(&a, options(1 << 20), &|_, _| {}).unwrap();
        assert_eq!(
            (report.chunks, report.patched, report.shared_base),
            (30, 30, 0)
        );
        let first_bytes = report.bytes_after;

        let rebuild = built(30, "1111111111aaaaaaaaaa2222222222zz");
        let (_, b) = stored(&store, &rebuild).await;
        let report = store.compact(&b, options(1 << 20), &|_, _| {}).unwrap();
        assert_eq!((report.patched, report.shared_base), (30, 30), "{report:?}");
        assert_eq!(report.frames, 0);
        // Each chunk: its record (41 bytes and 36 per hash), three hashes.
        assert_eq!(report.bytes_after, 30 * (41 + 3 * 36));
        assert!(report.bytes_after * 20 < report.bytes_before, "{report:?}");
        assert!(report.bytes_after < first_bytes, "{report:?}");
        assert_eq!(read_back(&blobs, &a).await, first);
        assert_eq!(read_back(&blobs, &b).await, rebuild);
        let sizes = blobs.stored_sizes(&b).await.unwrap();
        let base = sizes[0].base.expect("patched");
        assert_eq!(
            blobs.stored_sizes(&a[..1]).await.unwrap()[0].base,
            Some(base)
        );
        assert_eq!(sizes[0].bytes, 41 + 3 * 36);

        // Only the rebuild kept: its bases (placed for the first build)
        // stay; then nothing kept: they go, and their frame's bytes.
        drop(blobs);
        drop(store);
        let store = RedbStore::open(&path).unwrap();
        let blobs = RedbBlobService::new(store.clone());
        let live = Live {
            chunks: b.iter().copied().collect(),
            ..Live::default()
        };
        let swept = store.sweep(&live, None, false).unwrap();
        assert_eq!(swept.chunks, 30, "{swept:?}");
        assert_eq!(read_back(&blobs, &b).await, rebuild);
        let swept = store.sweep(&Live::default(), None, false).unwrap();
        assert_eq!(swept.chunks, 60, "{swept:?}");
        assert!(swept.packs_after < 4096, "{swept:?}");
    }

    /// A damaged base fails every chunk read from it, by the check of the
    /// chunk's own digest: no wrong byte leaves the store, and the chunk is
    /// quarantined (then healed like any damaged chunk, whole).
    #[tokio::test]
    async fn a_damaged_base_fails_the_chunks_read_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
        let chunks = built(4, "0c9k8m1v5dz0qh4x3a6rj2wyb7sil5nf");
        let (blobs, digests) = stored(&store, &chunks).await;
        store
            .compact(&digests, options(1 << 20), &|_, _| {})
            .unwrap();
        let base = blobs.stored_sizes(&digests[..1]).await.unwrap()[0]
            .base
            .expect("patched");
        assert!(
            blobs
                .corrupt_chunk(&base, |c| {
                    let mut data = c.data.to_vec();
                    data[100] ^= 1;
                    c.data = data.into();
                })
                .unwrap()
        );
        let read = blobs.read_chunks(&digests[..1]).await.unwrap();
        let err = read[0].decode().unwrap_err();
        assert!(err.corrupt_chunk() == Some(digests[0]), "{err}");
        assert_eq!(
            blobs.quarantine(&digests[..1]).await.unwrap(),
            digests[..1].to_vec()
        );
        // Written again (a repair), it reads whole, on its own.
        blobs
            .put_chunks(vec![EncodedChunk::encode(chunks[0].clone())])
            .await
            .unwrap();
        assert_eq!(read_back(&blobs, &digests[..1]).await, chunks[..1].to_vec());
        assert_eq!(
            blobs.stored_sizes(&digests[..1]).await.unwrap()[0].base,
            None
        );
    }

    /// frame whose other chunks are kept still reads.
    #[tokio::test]
    async fn a_sweep_frees_a_frame_with_its_last_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
        let chunks = texts(20);
        let (blobs, digests) = stored(&store, &chunks).await;
        store
            .compact(&digests, options(1 << 20), &|_, _| {})
            .unwrap();
        let leases = Leases::new(Duration::from_secs(60));

        let keep: Vec<Digest> = digests[..10].to_vec();
        let live = Live {
            chunks: keep.iter().copied().collect(),
            ..Live::default()
        };
        let before = store.packs().allocated_bytes().unwrap();
        let swept = store.sweep(&live, Some(&leases), false).unwrap();
        assert_eq!(swept.chunks, 10);
        assert_eq!(read_back(&blobs, &keep).await, chunks[..10].to_vec());
        assert!(store.packs().allocated_bytes().unwrap() >= before - 4096);

        let swept = store.sweep(&Live::default(), Some(&leases), false).unwrap();
        assert_eq!(swept.chunks, 10);
        assert!(blobs.read_chunks(&keep[..1]).await.is_err());
        assert!(
            store.packs().allocated_bytes().unwrap() + 4096 < before,
            "the frame's bytes were not freed"
        );
    }
}
