//! A chunk's index record: where its bytes are in the packs (`packs.rs`)
//! and how they are encoded, on its own or in a frame (`frames.rs`). The
//! same layout in a store (`chunks-v2`) and in the local cache
//! (`cache-chunks-v2`).

use crate::packs::Location;
use crate::proto::ChunkEncoding;

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

#[cfg(test)]
mod tests {
    use super::*;

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
