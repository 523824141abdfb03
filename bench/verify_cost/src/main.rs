//! Prints, in decoded bytes per second on one thread, what a server pays
//! per chunk it sends: copying the stored bytes (what it does now), and
//! decoding them and checking their BLAKE3 (what verifying before sending
//! would add), beside BLAKE3 alone.

use std::time::Instant;
fn walk(dir: &std::path::Path, out: &mut Vec<u8>, budget: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let Ok(ft) = e.file_type() else { continue };
        if out.len() >= budget {
            return;
        }
        if ft.is_dir() {
            walk(&e.path(), out, budget);
        } else if ft.is_file() {
            if let Ok(d) = std::fs::read(e.path()) {
                out.extend_from_slice(&d);
            }
        }
    }
}
fn main() {
    let mut corpus = Vec::new();
    walk(std::path::Path::new("/usr/lib"), &mut corpus, 128 << 20);
    corpus.truncate(128 << 20);
    let mut c = zstd::bulk::Compressor::new(1).unwrap();
    let chunks: Vec<(Vec<u8>, bool, usize)> = corpus
        .chunks(64 << 10)
        .map(|r| {
            let z = c.compress(r).unwrap();
            if z.len() < r.len() {
                (z, true, r.len())
            } else {
                (r.to_vec(), false, r.len())
            }
        })
        .collect();
    let stored: usize = chunks.iter().map(|c| c.0.len()).sum();
    let bytes = corpus.len() as f64;
    for round in 0..3 {
        let t = Instant::now();
        let mut sink = 0usize;
        for (d, _, _) in &chunks {
            let v = d.clone();
            sink += v.len();
            std::hint::black_box(&v);
        }
        let copy = bytes / t.elapsed().as_secs_f64() / 1e9;
        let t = Instant::now();
        for (d, z, n) in &chunks {
            let raw = if *z {
                zstd::bulk::decompress(d, *n).unwrap()
            } else {
                d.clone()
            };
            std::hint::black_box(blake3::hash(&raw));
        }
        let verify = bytes / t.elapsed().as_secs_f64() / 1e9;
        std::hint::black_box(sink);
        let t = Instant::now();
        for r in corpus.chunks(64 << 10) {
            std::hint::black_box(blake3::hash(r));
        }
        let hash = bytes / t.elapsed().as_secs_f64() / 1e9;
        eprintln!(
            "round {round}: {} MiB decoded ({} MiB stored): copy stored bytes {copy:.2} GB/s, decode+BLAKE3 {verify:.2} GB/s, BLAKE3 alone {hash:.2} GB/s (decoded bytes per second, one thread)",
            corpus.len() >> 20,
            stored >> 20
        );
    }
}
