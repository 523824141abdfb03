//! A chunk's index record: where its bytes are in the packs (`packs.rs`)
//! and how they are encoded, on its own or in a frame (`frames.rs`). The
//! same layout in a store (`chunks-v2`) and in the local cache
//! (`cache-chunks-v2`).

use bytes::Bytes;

use crate::digest::{DIGEST_LEN, Digest};
use crate::packs::Location;
use crate::proto::ChunkEncoding;
use crate::store_hashes::{self, HASH_LEN};

/// A chunk's index record, the same in a store (`chunks-v2`) and in the
/// local cache (`cache-chunks-v2`), 25 bytes, little endian:
///
/// | offset | size | field                                        |
/// |--------|------|----------------------------------------------|
/// | 0      | 1    | encoding: 0 raw, 1 zstd (`ChunkEncoding`), 2 in a frame |
/// | 1      | 8    | decoded size                                 |
/// | 9      | 4    | pack number                                  |
/// | 13     | 8    | offset of the encoded bytes in the pack      |
/// | 21     | 4    | length of the encoded bytes                  |
///
/// A chunk compacted into a frame (`frames.rs`; only a store's, never the
/// cache's) has encoding 2, the frame's place in the pack as its location,
/// and 8 more bytes (33 in all):
///
/// | offset | size | field                                        |
/// |--------|------|----------------------------------------------|
/// | 25     | 4    | offset of the chunk in the decoded frame     |
/// | 29     | 4    | decoded length of the whole frame            |
///
/// A chunk whose store path hashes compaction took out (record encoding
/// 3, [`PatchedRecord`]) has no bytes of its own: it names the chunk of
/// its normalised bytes.
///
/// Stores written before frames existed hold only 25-byte records, which
/// read as they always did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexRecord {
    /// How the bytes at `at` are encoded; `Zstd` for a frame.
    pub encoding: ChunkEncoding,
    pub size: u64,
    pub at: Location,
    /// Set when `at` is a frame holding this chunk among others.
    pub frame: Option<InFrame>,
}

/// Where a chunk is in the decoded bytes of its frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InFrame {
    /// The chunk's first byte in the decoded frame.
    pub offset: u32,
    /// The decoded frame's length.
    pub frame_len: u32,
}

const RECORD_ENCODING_AT: usize = 0;
const RECORD_SIZE_AT: usize = 1;
const RECORD_PACK_AT: usize = 9;
const RECORD_OFFSET_AT: usize = 13;
const RECORD_LEN_AT: usize = 21;
/// Length of an [`IndexRecord`] of a chunk stored on its own.
pub(crate) const INDEX_RECORD_LEN: usize = 25;
const RECORD_IN_FRAME_AT: usize = 25;
const RECORD_FRAME_LEN_AT: usize = 29;
/// Length of an [`IndexRecord`] of a chunk in a frame.
pub(crate) const FRAMED_RECORD_LEN: usize = 33;

impl IndexRecord {
    pub fn to_bytes(self) -> Vec<u8> {
        let len = match self.frame {
            None => INDEX_RECORD_LEN,
            Some(_) => FRAMED_RECORD_LEN,
        };
        let mut record = vec![0u8; len];
        record[RECORD_ENCODING_AT] = match (self.frame, self.encoding) {
            (Some(_), _) => 2,
            (None, ChunkEncoding::Raw) => 0,
            (None, ChunkEncoding::Zstd) => 1,
        };
        record[RECORD_SIZE_AT..RECORD_PACK_AT].copy_from_slice(&self.size.to_le_bytes());
        record[RECORD_PACK_AT..RECORD_OFFSET_AT].copy_from_slice(&self.at.pack.to_le_bytes());
        record[RECORD_OFFSET_AT..RECORD_LEN_AT].copy_from_slice(&self.at.offset.to_le_bytes());
        record[RECORD_LEN_AT..INDEX_RECORD_LEN].copy_from_slice(&self.at.len.to_le_bytes());
        if let Some(f) = self.frame {
            record[RECORD_IN_FRAME_AT..RECORD_FRAME_LEN_AT]
                .copy_from_slice(&f.offset.to_le_bytes());
            record[RECORD_FRAME_LEN_AT..].copy_from_slice(&f.frame_len.to_le_bytes());
        }
        record
    }

    /// Parses a record; the error says what is wrong with it.
    pub fn from_bytes(record: &[u8]) -> Result<Self, &'static str> {
        let expected = match record.first() {
            Some(0 | 1) => INDEX_RECORD_LEN,
            Some(2) => FRAMED_RECORD_LEN,
            Some(_) => return Err("index record has an unknown encoding"),
            None => return Err("index record is empty"),
        };
        if record.len() != expected {
            return Err("index record has the wrong length for its encoding");
        }
        let field = |from: usize, to: usize| &record[from..to];
        let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let size = u64_of(field(RECORD_SIZE_AT, RECORD_PACK_AT));
        let frame = (record[RECORD_ENCODING_AT] == 2).then(|| InFrame {
            offset: u32_of(field(RECORD_IN_FRAME_AT, RECORD_FRAME_LEN_AT)),
            frame_len: u32_of(field(RECORD_FRAME_LEN_AT, FRAMED_RECORD_LEN)),
        });
        if let Some(f) = frame
            && u64::from(f.offset) + size > u64::from(f.frame_len)
        {
            return Err("index record places its chunk past its frame's end");
        }
        Ok(IndexRecord {
            encoding: match record[RECORD_ENCODING_AT] {
                0 => ChunkEncoding::Raw,
                _ => ChunkEncoding::Zstd,
            },
            size,
            at: Location {
                pack: u32_of(field(RECORD_PACK_AT, RECORD_OFFSET_AT)),
                offset: u64_of(field(RECORD_OFFSET_AT, RECORD_LEN_AT)),
                len: u32_of(field(RECORD_LEN_AT, INDEX_RECORD_LEN)),
            },
            frame,
        })
    }

    /// The bytes of the packs this chunk accounts for: its own, or its
    /// share of its frame's by decoded length.
    pub fn stored_bytes(&self) -> u64 {
        match self.frame {
            None => u64::from(self.at.len),
            Some(f) => {
                (u128::from(self.at.len) * u128::from(self.size) / u128::from(f.frame_len.max(1)))
                    as u64
            }
        }
    }
}

/// A chunk stored as its bytes with their store path hashes replaced (its
/// base: a chunk of its own, under the digest of those bytes, shared by
/// every rebuild that differs only in the hashes) and the hashes taken out
/// (`store_hashes.rs`, `compaction.rs`). Record encoding 3, little endian:
///
/// | offset    | size | field                                  |
/// |-----------|------|----------------------------------------|
/// | 0         | 1    | encoding: 3                            |
/// | 1         | 8    | decoded size                           |
/// | 9         | 32   | the base's digest                      |
/// | 41 + 36·i | 4    | offset of hash i in the chunk          |
/// | 45 + 36·i | 32   | hash i, as it was (nixbase32 text)     |
///
/// At least one hash; offsets ascending, hashes apart and inside the
/// chunk. Binaries from before this encoding refuse such records ("unknown
/// encoding") rather than misread them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PatchedRecord {
    pub size: u64,
    pub base: Digest,
    pub hashes: Vec<(u32, [u8; HASH_LEN])>,
}

const PATCHED_BASE_AT: usize = 9;
const PATCHED_HASHES_AT: usize = PATCHED_BASE_AT + DIGEST_LEN;
const PATCHED_HASH_LEN: usize = 4 + HASH_LEN;

impl PatchedRecord {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut record = Vec::with_capacity(self.record_len());
        record.push(3);
        record.extend_from_slice(&self.size.to_le_bytes());
        record.extend_from_slice(self.base.as_bytes());
        for (at, hash) in &self.hashes {
            record.extend_from_slice(&at.to_le_bytes());
            record.extend_from_slice(hash);
        }
        record
    }

    /// The record's length: what the chunk takes in the store besides its
    /// base.
    pub fn record_len(&self) -> usize {
        PATCHED_HASHES_AT + PATCHED_HASH_LEN * self.hashes.len()
    }

    /// Parses a record of encoding 3; the error says what is wrong.
    pub fn from_bytes(record: &[u8]) -> Result<Self, &'static str> {
        if record.first() != Some(&3) {
            return Err("index record is not a patched one");
        }
        let entries = record
            .get(PATCHED_HASHES_AT..)
            .filter(|e| !e.is_empty() && e.len() % PATCHED_HASH_LEN == 0)
            .ok_or("index record has the wrong length for its encoding")?;
        let size = u64::from_le_bytes(record[1..PATCHED_BASE_AT].try_into().expect("8 bytes"));
        let base = Digest::try_from(&record[PATCHED_BASE_AT..PATCHED_HASHES_AT]).expect("32 bytes");
        let mut hashes = Vec::with_capacity(entries.len() / PATCHED_HASH_LEN);
        let mut free_from = 0u64;
        for e in entries.chunks_exact(PATCHED_HASH_LEN) {
            let at = u32::from_le_bytes(e[..4].try_into().expect("4 bytes"));
            let hash: [u8; HASH_LEN] = e[4..].try_into().expect("32 bytes");
            let end = u64::from(at) + HASH_LEN as u64;
            if u64::from(at) < free_from || end > size {
                return Err("index record places a hash out of order or past its chunk");
            }
            if !store_hashes::is_hash(&hash) {
                return Err("index record holds a hash that is not nixbase32");
            }
            free_from = end;
            hashes.push((at, hash));
        }
        Ok(PatchedRecord { size, base, hashes })
    }

    /// The chunk: `base`'s bytes with the hashes put back. Its digest is
    /// checked by whoever decodes it, as for every chunk read.
    pub fn apply(&self, base: Bytes) -> Result<Bytes, &'static str> {
        if base.len() as u64 != self.size {
            return Err("its base has the wrong length");
        }
        // The base as read is this reader's own copy (cut from its frame,
        // or decompressed): written in place, not copied again.
        let mut chunk = Vec::from(base);
        for (at, hash) in &self.hashes {
            let at = *at as usize;
            chunk[at..at + HASH_LEN].copy_from_slice(hash);
        }
        Ok(chunk.into())
    }
}

/// Any record of a store's chunk index (`chunks-v2`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StoredRecord {
    /// Bytes of its own in the packs, alone or in a frame.
    Placed(IndexRecord),
    /// Its base's bytes with hashes put back.
    Patched(PatchedRecord),
}

impl StoredRecord {
    /// Parses any record; the error says what is wrong with it.
    pub fn from_bytes(record: &[u8]) -> Result<Self, &'static str> {
        match record.first() {
            Some(3) => PatchedRecord::from_bytes(record).map(StoredRecord::Patched),
            _ => IndexRecord::from_bytes(record).map(StoredRecord::Placed),
        }
    }

    /// The bytes of the store this chunk accounts for, besides a base it
    /// names: its own or its share of its frame's, or its patch record.
    pub fn stored_bytes(&self) -> u64 {
        match self {
            StoredRecord::Placed(r) => r.stored_bytes(),
            StoredRecord::Patched(p) => p.record_len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patched_records_round_trip_and_bad_ones_are_named() {
        let hash = *b"0c9k8m1v5dz0qh4x3a6rj2wyb7sil5nf";
        let p = PatchedRecord {
            size: 100,
            base: Digest::of(b"base"),
            hashes: vec![(0, hash), (32, hash), (68, hash)],
        };
        let bytes = p.to_bytes();
        assert_eq!(bytes.len(), p.record_len());
        assert_eq!(
            StoredRecord::from_bytes(&bytes),
            Ok(StoredRecord::Patched(p.clone()))
        );
        let base = vec![b'e'; 100];
        let chunk = p.apply(Bytes::from(base.clone())).unwrap();
        assert_eq!(&chunk[68..100], &hash);
        assert_eq!(&chunk[64..68], b"eeee");
        assert!(p.apply(Bytes::copy_from_slice(&base[..99])).is_err());
        // Truncated, without hashes, overlapping, past the end, not a hash.
        assert!(StoredRecord::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        assert!(StoredRecord::from_bytes(&bytes[..PATCHED_HASHES_AT]).is_err());
        for bad in [
            vec![(0, hash), (31, hash)],
            vec![(69, hash)],
            vec![(0, *b"0c9k8m1v5dz0qh4x3a6rj2wyb7sil5ne")],
        ] {
            let r = PatchedRecord {
                hashes: bad.clone(),
                ..p.clone()
            };
            assert!(StoredRecord::from_bytes(&r.to_bytes()).is_err(), "{bad:?}");
        }
        // An old reader's parser refuses it.
        assert!(IndexRecord::from_bytes(&bytes).is_err());
    }

    #[test]
    fn index_records_round_trip_and_bad_ones_are_named() {
        let r = IndexRecord {
            encoding: ChunkEncoding::Zstd,
            size: 65536,
            at: Location {
                pack: 7,
                offset: 1 << 33,
                len: 12345,
            },
            frame: None,
        };
        assert_eq!(IndexRecord::from_bytes(&r.to_bytes()), Ok(r));
        assert!(IndexRecord::from_bytes(&r.to_bytes()[..24]).is_err());
        let mut bad = r.to_bytes();
        bad[0] = 9;
        assert!(IndexRecord::from_bytes(&bad).is_err());
        let framed = IndexRecord {
            frame: Some(InFrame {
                offset: 1000,
                frame_len: 1 << 20,
            }),
            ..r
        };
        assert_eq!(framed.to_bytes().len(), FRAMED_RECORD_LEN);
        assert_eq!(IndexRecord::from_bytes(&framed.to_bytes()), Ok(framed));
        // A framed record cut to the old length, an old one marked framed,
        // and a chunk that would end past its frame are refused.
        assert!(IndexRecord::from_bytes(&framed.to_bytes()[..INDEX_RECORD_LEN]).is_err());
        let mut marked = r.to_bytes();
        marked[0] = 2;
        assert!(IndexRecord::from_bytes(&marked).is_err());
        let past = IndexRecord {
            frame: Some(InFrame {
                offset: (1 << 20) - 10,
                frame_len: 1 << 20,
            }),
            ..r
        };
        assert!(IndexRecord::from_bytes(&past.to_bytes()).is_err());
    }
}
