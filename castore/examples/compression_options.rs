//! What each way of compressing a store path's chunks would store: the
//! figures behind `frames.rs` and docs/design.md, "Frames".
//!
//! Usage: `cargo run --release -p lazystore-castore --example
//! compression_options -- DIR`, where DIR is a store path's tree (for a
//! path in a binary cache: `zstd -dc NAR.nar.zst | nix-store --restore
//! DIR`). Cuts every file into chunks as an import does (FastCDC, the
//! default parameters), keeps each distinct chunk once, in NAR order, and
//! prints the bytes each scheme stores with its compression ratio and
//! time; compare with the path's zstd NAR (its narinfo's FileSize).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lazystore_castore::ChunkerParams;

/// The regular files under `p`, in NAR order (names in byte order).
fn files_in_nar_order(p: &Path, out: &mut Vec<PathBuf>) {
    let meta = std::fs::symlink_metadata(p).expect("readable tree");
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .expect("readable directory")
            .map(|e| e.expect("readable entry").path())
            .collect();
        entries.sort();
        for e in entries {
            files_in_nar_order(&e, out);
        }
    } else if meta.is_file() {
        out.push(p.to_owned());
    }
}

fn report(name: &str, raw: usize, stored: usize, started: Instant) {
    println!(
        "{name:<46} {:>12} bytes {:>6.3}× {:>8.2} s",
        stored,
        raw as f64 / stored as f64,
        started.elapsed().as_secs_f64()
    );
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: compression_options DIR");
    let mut files = Vec::new();
    files_in_nar_order(Path::new(&dir), &mut files);
    let params = ChunkerParams::default();
    let mut seen = HashSet::new();
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    for f in &files {
        let data = std::fs::read(f).expect("readable file");
        let (min, avg, max) = (
            params.min as usize,
            params.avg as usize,
            params.max as usize,
        );
        let cuts = fastcdc::v2020::FastCDC::new(&data, min, avg, max);
        for c in cuts {
            let bytes = &data[c.offset..c.offset + c.length];
            if seen.insert(blake3::hash(bytes)) {
                chunks.push(bytes.to_vec());
            }
        }
    }
    let raw: usize = chunks.iter().map(Vec::len).sum();
    println!(
        "{} files, {} distinct chunks, {raw} bytes",
        files.len(),
        chunks.len()
    );
    // What a chunk stores as: compressed if that is smaller.
    let stored = |z: usize, c: &[u8]| z.min(c.len());

    for level in [1, 3, 9, 19] {
        let t = Instant::now();
        let mut z = zstd::bulk::Compressor::new(level).unwrap();
        let total = chunks
            .iter()
            .map(|c| stored(z.compress(c).unwrap().len(), c))
            .sum();
        report(&format!("per chunk, zstd {level}"), raw, total, t);
    }
    for (dict_size, level) in [(112 << 10, 3), (512 << 10, 9)] {
        let t = Instant::now();
        // Samples: the first 16 KiB of chunks spread over the path, up to
        // 100 times the dictionary's size.
        let step = (chunks.len() / 20_000).max(1);
        let mut samples: Vec<&[u8]> = Vec::new();
        let mut sampled = 0;
        for c in chunks.iter().step_by(step) {
            let s = &c[..c.len().min(16 << 10)];
            samples.push(s);
            sampled += s.len();
            if sampled > dict_size * 100 {
                break;
            }
        }
        let dict = zstd::dict::from_samples(&samples, dict_size).unwrap();
        let mut z = zstd::bulk::Compressor::with_dictionary(level, &dict).unwrap();
        let total = dict.len()
            + chunks
                .iter()
                .map(|c| stored(z.compress(c).unwrap().len(), c))
                .sum::<usize>();
        report(
            &format!(
                "per chunk, {} KiB dictionary, zstd {level}",
                dict_size >> 10
            ),
            raw,
            total,
            t,
        );
    }
    {
        // Each chunk against the chunks stored on their own before it (up
        // to 1 MiB of them), when that saves a tenth: one level deep, so a
        // reader needs at most those chunks besides. 32 bytes name them.
        let t = Instant::now();
        let level = 3;
        let mut z = zstd::bulk::Compressor::new(level).unwrap();
        let (mut total, mut anchors) = (0, Vec::<usize>::new());
        for (i, c) in chunks.iter().enumerate() {
            let alone = stored(z.compress(c).unwrap().len(), c);
            let mut prefix = Vec::new();
            for &a in anchors.iter().rev() {
                if prefix.len() + chunks[a].len() > 1 << 20 {
                    break;
                }
                let mut p = chunks[a].clone();
                p.extend_from_slice(&prefix);
                prefix = p;
            }
            let delta = if prefix.is_empty() {
                usize::MAX
            } else {
                let mut d = zstd::bulk::Compressor::with_dictionary(level, &prefix).unwrap();
                d.compress(c).unwrap().len() + 32
            };
            if delta < alone * 9 / 10 {
                total += delta;
            } else {
                total += alone;
                anchors.push(i);
            }
        }
        report(
            "per chunk, against the chunks before, zstd 3",
            raw,
            total,
            t,
        );
    }
    for (frame, level) in [
        (256 << 10, 3),
        (1 << 20, 3),
        (1 << 20, 5),
        (1 << 20, 6),
        (1 << 20, 9),
        (2 << 20, 6),
        (4 << 20, 3),
    ] {
        let t = Instant::now();
        let mut z = zstd::bulk::Compressor::new(level).unwrap();
        let mut frames = Vec::new();
        let mut buf = Vec::new();
        for c in &chunks {
            buf.extend_from_slice(c);
            if buf.len() >= frame {
                frames.push((z.compress(&buf).unwrap(), buf.len()));
                buf.clear();
            }
        }
        if !buf.is_empty() {
            frames.push((z.compress(&buf).unwrap(), buf.len()));
        }
        let total = frames.iter().map(|(f, _)| f.len()).sum();
        report(
            &format!("{} KiB frames, zstd {level}", frame >> 10),
            raw,
            total,
            t,
        );
        let t = Instant::now();
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let decoded: usize = frames
            .iter()
            .map(|(f, len)| d.decompress(f, *len).unwrap().len())
            .sum();
        println!(
            "{:<46} {:>8.0} MB/s",
            "  decoded, one core",
            decoded as f64 / t.elapsed().as_secs_f64() / 1e6
        );
    }
}
