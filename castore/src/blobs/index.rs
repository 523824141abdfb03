//! [`ChunkIndex`] and [`cut`]: finding the chunks of a blob that a byte
//! range overlaps, and cutting that range out of them — the arithmetic
//! every ranged reader (the verified reader, the filesystem, NAR ranges)
//! shares.

use std::ops::Range;

use bytes::Bytes;

use super::BlobMeta;

/// A blob's chunk list with the offset each chunk starts at, so the chunks
/// a range overlaps are found by binary search.
#[derive(Clone, Debug)]
pub struct ChunkIndex {
    /// The chunk list.
    pub meta: BlobMeta,
    /// `starts[i]`: the offset of chunk `i` in the blob.
    starts: Vec<u64>,
}

impl ChunkIndex {
    /// The index of `meta`.
    pub fn new(meta: BlobMeta) -> Self {
        let mut starts = Vec::with_capacity(meta.chunks.len());
        let mut at = 0;
        for c in &meta.chunks {
            starts.push(at);
            at += c.size;
        }
        ChunkIndex { meta, starts }
    }

    /// Chunks in the blob.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// Whether the blob has no chunk (it is empty).
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Where chunk `i` starts in the blob.
    pub fn start(&self, i: usize) -> u64 {
        self.starts[i]
    }

    /// The indices of the chunks overlapping `offset..end`: empty if the
    /// range is, or lies past the blob's end.
    pub fn overlapping(&self, offset: u64, end: u64) -> Range<usize> {
        let end = end.min(self.meta.size);
        if offset >= end {
            return 0..0;
        }
        let first = self.starts.partition_point(|&s| s <= offset) - 1;
        let last = self.starts.partition_point(|&s| s < end);
        first..last
    }
}

/// Bytes `from..to` of the concatenation of `chunks`, as slices of them
/// (no copy). Chunks wholly outside the range give nothing.
pub fn cut(chunks: impl IntoIterator<Item = Bytes>, from: u64, to: u64) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut start = 0u64;
    for chunk in chunks {
        let end = start + chunk.len() as u64;
        if end > from && start < to && from < to {
            let lo = from.saturating_sub(start) as usize;
            let hi = (to.min(end) - start) as usize;
            out.push(chunk.slice(lo..hi));
        }
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Digest;
    use crate::blobs::ChunkMeta;

    fn index(sizes: &[u64]) -> ChunkIndex {
        let chunks = sizes
            .iter()
            .map(|&size| ChunkMeta {
                digest: Digest::from(blake3::hash(&size.to_le_bytes())),
                size,
            })
            .collect();
        ChunkIndex::new(BlobMeta {
            size: sizes.iter().sum(),
            chunks,
        })
    }

    #[test]
    fn overlapping_chunks_at_every_boundary() {
        let i = index(&[10, 20, 30]);
        assert_eq!(i.overlapping(0, 1), 0..1);
        assert_eq!(i.overlapping(9, 10), 0..1);
        assert_eq!(i.overlapping(9, 11), 0..2);
        assert_eq!(i.overlapping(10, 30), 1..2);
        assert_eq!(i.overlapping(10, 31), 1..3);
        assert_eq!(i.overlapping(0, 60), 0..3);
        assert_eq!(i.overlapping(59, 1000), 2..3);
        assert_eq!(i.overlapping(5, 5), 0..0);
        assert_eq!(i.overlapping(60, 70), 0..0);
        assert_eq!(index(&[]).overlapping(0, 1), 0..0);
        assert_eq!((i.start(2), i.len()), (30, 3));
    }

    #[test]
    fn cuts_slices_out_of_chunks() {
        let chunks = || {
            [&b"abc"[..], b"defg", b"h"]
                .into_iter()
                .map(Bytes::from_static)
        };
        let joined = |v: Vec<Bytes>| v.concat();
        assert_eq!(joined(cut(chunks(), 0, 8)), b"abcdefgh");
        assert_eq!(joined(cut(chunks(), 2, 4)), b"cd");
        assert_eq!(cut(chunks(), 3, 7), vec![Bytes::from_static(b"defg")]);
        assert_eq!(joined(cut(chunks(), 7, 8)), b"h");
        assert!(cut(chunks(), 4, 4).is_empty());
    }
}
