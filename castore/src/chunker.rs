//! Content-defined chunking: cuts a byte stream into FastCDC (v2020) chunks
//! as it arrives, holding at most one maximum-size chunk plus one input
//! buffer, so blobs of any size stream through in bounded memory.
//!
//! Cut points are chosen on the bytes with their store path hashes
//! replaced (`store_hashes.rs`), and never inside `/nix/store/<hash>`: a
//! rebuild that changes only those hashes is cut at the same offsets, so
//! its chunks differ from the first build's only where the hashes are,
//! which compaction stores once (`compaction.rs`). Bytes without a store path
//! are cut exactly as FastCDC cuts them.

use bytes::{Bytes, BytesMut};
use fastcdc::v2020::{self, Normalization};

use crate::store_hashes;

/// FastCDC size bounds in bytes. Part of a store's identity: the same bytes
/// chunked with other parameters give other chunks, so a store records the
/// parameters it was made with and refuses to mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkerParams {
    /// No chunk is shorter, except a blob's last (or only) one.
    pub min: u32,
    /// The size chunks normalise towards.
    pub avg: u32,
    /// No chunk is longer.
    pub max: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            min: 16 * 1024,
            avg: 64 * 1024,
            max: 256 * 1024,
        }
    }
}

/// Chunker parameters fastcdc can't work with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid chunker parameters min={min} avg={avg} max={max}: need even sizes, \
     min <= avg <= max, min in 64..=1MiB, avg in 256..=4MiB, max in 1KiB..=16MiB"
)]
pub struct InvalidChunkerParams {
    /// The minimum given.
    pub min: u32,
    /// The average given.
    pub avg: u32,
    /// The maximum given.
    pub max: u32,
}

impl ChunkerParams {
    /// Checks the bounds fastcdc v2020 accepts.
    pub fn validate(self) -> Result<Self, InvalidChunkerParams> {
        let (min, avg, max) = (self.min as usize, self.avg as usize, self.max as usize);
        let ok = (v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min)
            && (v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg)
            && (v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max)
            && min <= avg
            && avg <= max
            && [min, avg, max].iter().all(|n| n % 2 == 0);
        if ok {
            Ok(self)
        } else {
            Err(InvalidChunkerParams {
                min: self.min,
                avg: self.avg,
                max: self.max,
            })
        }
    }
}

/// Cuts pushed bytes into chunks. A cut point depends only on the bytes
/// before it within the current chunk and on at most a store path after
/// it, and the scan never looks past `max`, so once `max` plus a store
/// path's bytes are buffered the next cut is final.
pub struct Chunker {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    buf: BytesMut,
    /// The bytes a cut is chosen on when they hold store path hashes.
    normalised: Vec<u8>,
}

impl Chunker {
    /// A chunker with (validated) `params`.
    pub fn new(params: ChunkerParams) -> Self {
        let (mask_s, mask_l) = v2020::select_masks(params.avg as usize, Normalization::Level1);
        Chunker {
            params,
            mask_s,
            mask_l,
            buf: BytesMut::new(),
            normalised: Vec::new(),
        }
    }

    /// The length of the next chunk.
    fn cut(&mut self) -> usize {
        // Every byte a cut at up to `max` can depend on.
        let window = self
            .buf
            .len()
            .min(self.params.max as usize + store_hashes::SPAN);
        let hashes = store_hashes::find(&self.buf[..window]);
        let len = if hashes.is_empty() {
            self.fastcdc(&self.buf)
        } else {
            self.normalised.clear();
            self.normalised.extend_from_slice(&self.buf[..window]);
            store_hashes::normalise(&mut self.normalised, &hashes);
            self.fastcdc(&self.normalised)
        };
        // The window holds every store path a cut at up to `max` could
        // split, so the hashes found in it are all that can be split.
        match store_hashes::split_by(&hashes, len) {
            // Before the store path, or after it if the chunk would be
            // empty.
            Some(0) => store_hashes::SPAN,
            Some(start) => start,
            None => len,
        }
    }

    /// FastCDC's cut of `data`.
    fn fastcdc(&self, data: &[u8]) -> usize {
        let p = self.params;
        let (_, len) = v2020::cut(
            data,
            p.min as usize,
            p.avg as usize,
            p.max as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        len
    }

    /// Feeds `data`; appends every chunk that is now final to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<Bytes>) {
        let max = self.params.max as usize;
        while !data.is_empty() {
            // Top the buffer up to two maximum chunks, so each cut leaves at
            // least `max` bytes behind it only rarely and copies stay small.
            let room = (2 * max).saturating_sub(self.buf.len()).max(1);
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            while self.buf.len() >= max + store_hashes::SPAN {
                let len = self.cut();
                out.push(self.buf.split_to(len).freeze());
            }
        }
    }

    /// Ends the stream: appends the remaining chunks to `out`.
    pub fn finish(&mut self, out: &mut Vec<Bytes>) {
        while !self.buf.is_empty() {
            let len = self.cut();
            out.push(self.buf.split_to(len).freeze());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngExt;

    fn chunk_all(data: &[u8], piece: usize) -> Vec<Bytes> {
        let mut c = Chunker::new(ChunkerParams::default());
        let mut out = Vec::new();
        for p in data.chunks(piece.max(1)) {
            c.push(p, &mut out);
        }
        c.finish(&mut out);
        out
    }

    #[test]
    fn same_cuts_as_fastcdc_whatever_the_pieces() {
        let mut data = vec![0u8; 3 * 1024 * 1024 + 17];
        rand::rng().fill(&mut data[..]);
        let p = ChunkerParams::default();
        let reference: Vec<usize> =
            v2020::FastCDC::new(&data, p.min as usize, p.avg as usize, p.max as usize)
                .map(|c| c.length)
                .collect();
        for piece in [1 << 20, 4096, 777, data.len()] {
            let lens: Vec<usize> = chunk_all(&data, piece).iter().map(|c| c.len()).collect();
            assert_eq!(lens, reference, "piece size {piece}");
        }
    }

    /// `n` random bytes with a store path of `hash` every 1,000 or so.
    fn with_store_paths(n: usize, hash: &[u8; 32], seed: &[u8]) -> Vec<u8> {
        let mut data = vec![0u8; n];
        // Deterministic "random" bytes, the same for both builds.
        let mut x = blake3::Hasher::new();
        x.update(seed);
        x.finalize_xof().fill(&mut data);
        let mut at = 0;
        while at + 60 < n {
            data[at..at + 11].copy_from_slice(b"/nix/store/");
            data[at + 11..at + 43].copy_from_slice(hash);
            at += 700 + usize::from(data[at + 50]) * 4;
        }
        data
    }

    #[test]
    fn a_rebuild_with_other_store_hashes_is_cut_at_the_same_offsets() {
        let first = with_store_paths(2 << 20, b"0c9k8m1v5dz0qh4x3a6rj2wyb7sil5nf", b"t");
        let rebuild = with_store_paths(2 << 20, b"1111111111aaaaaaaaaa2222222222zz", b"t");
        let a = chunk_all(&first, 4096);
        let b = chunk_all(&rebuild, 100_000);
        let lens = |c: &[Bytes]| c.iter().map(|c| c.len()).collect::<Vec<_>>();
        assert_eq!(lens(&a), lens(&b));
        assert!(a.len() > 10, "{} chunks", a.len());
        let p = ChunkerParams::default();
        // No cut is inside a store path, and none makes a chunk too long.
        let found = store_hashes::find(&first);
        let mut at = 0;
        for c in &a[..a.len() - 1] {
            at += c.len();
            assert_eq!(store_hashes::split_by(&found, at), None, "cut at {at}");
            assert!(c.len() <= p.max as usize);
        }
        assert_eq!(a.concat(), first);
    }

    #[test]
    fn params_are_validated() {
        assert!(ChunkerParams::default().validate().is_ok());
        assert!(
            ChunkerParams {
                min: 10,
                avg: 64,
                max: 128
            }
            .validate()
            .is_err()
        );
        assert!(
            ChunkerParams {
                min: 4096,
                avg: 2048,
                max: 8192
            }
            .validate()
            .is_err()
        );
    }
}
