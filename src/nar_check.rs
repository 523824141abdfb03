//! `lazystore nar-check`: ingests a NAR into a throwaway in-memory store,
//! renders it back and checks the two are the same NAR, printing what the
//! store made of it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use lazystore_castore::blobs::MemoryBlobService;
use lazystore_castore::directories::MemoryDirectoryService;
use lazystore_castore::{Blobs, ChunkerParams, Node};
use lazystore_pathinfo::ingest::ingest_nar;
use lazystore_pathinfo::nixbase32;
use lazystore_pathinfo::render::nar_hash;

/// Split a NAR into chunks, directories and a root node in memory, render
/// it back, and check the round trip reproduces it bit for bit.
///
/// Prints the NarHash (as in a narinfo), NarSize, the root node and how
/// many chunks the contents became. Exits non-zero if the NAR is
/// malformed or the round trip differs.
#[derive(clap::Args)]
pub struct Args {
    /// The NAR file; `-` reads standard input (e.g. `nix-store --dump PATH | lazystore nar-check -`).
    nar: PathBuf,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let input: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if args.nar.as_os_str() == "-" {
        Box::new(tokio::io::stdin())
    } else {
        Box::new(
            tokio::fs::File::open(&args.nar)
                .await
                .with_context(|| format!("cannot open NAR {}", args.nar.display()))?,
        )
    };
    let backend = Arc::new(MemoryBlobService::new());
    let blobs = Blobs::new(backend.clone(), ChunkerParams::default());
    let directories = MemoryDirectoryService::new();
    let ingested = ingest_nar(&blobs, &directories, tokio::io::BufReader::new(input))
        .await
        .with_context(|| format!("{} is not a valid NAR", args.nar.display()))?;

    let (size, sha256) = nar_hash(&blobs, &directories, &ingested.root)
        .await
        .context("rendering the stored tree back to a NAR")?;
    if size != ingested.nar_size || sha256 != ingested.nar_sha256 {
        bail!(
            "round trip differs: ingested {} bytes, rendered {size} bytes",
            ingested.nar_size
        );
    }

    let stats = backend.stats();
    println!(
        "NarHash: sha256:{}",
        nixbase32::encode(&ingested.nar_sha256)
    );
    println!("NarSize: {}", ingested.nar_size);
    match &ingested.root {
        Node::Directory { digest, size } => println!("root: directory {digest} ({size} entries)"),
        Node::File {
            digest,
            size,
            executable,
        } => {
            println!("root: file {digest} ({size} bytes, executable: {executable})")
        }
        Node::Symlink { target } => println!("root: symlink -> {target:?}"),
    }
    println!(
        "chunks: {} unique, {} bytes, {} bytes stored",
        stats.chunks, stats.chunk_bytes, stats.stored_bytes
    );
    println!("round trip: identical");
    Ok(ExitCode::SUCCESS)
}
