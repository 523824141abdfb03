//! `lazystore compact`: a redb store's chunks compressed together at rest
//! (`pathinfo::compact`, castore's `compaction.rs`).

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use lazystore_castore::{CompactOptions, FRAME_BYTES, FRAME_LEVEL};
use lazystore_pathinfo::{Store, default_store_url};

use crate::gc::open_redb;

/// Compact a redb store: the chunks of every published path, in NAR order,
/// are compressed together in frames of about 1 MiB (zstd level 6), which
/// takes fewer bytes than the same chunks compressed one by one as an
/// import stores them (on the benchmark's real Nix paths, less than their
/// zstd NARs from `nix copy`). Reads stay per chunk: a chunk in a frame is
/// cut out of it when read. Chunks that did not compress on their own,
/// and frames that would not be smaller, are left as they are; running it
/// again compacts what was imported since. Offline: stop the server or
/// mount holding the store. Prints what it moved and the pack bytes before
/// and after; `lazystore stats` shows the store's ratios.
#[derive(clap::Args)]
pub struct Args {
    /// The store: redb:///abs/path/store.redb [default: the embedded store
    /// under $LAZYSTORE_DIR].
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// zstd level of the frames (1–22).
    #[arg(long, default_value_t = FRAME_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=22))]
    level: i32,
    /// Decoded bytes per frame, in KiB: larger frames compress better and
    /// cost a reader of one chunk more (64 KiB–16 MiB).
    #[arg(long, value_name = "KIB", default_value_t = (FRAME_BYTES >> 10) as u32,
          value_parser = clap::value_parser!(u32).range(64..=16384))]
    frame_kib: u32,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let url = match args.store {
        Some(url) => url,
        None => default_store_url()?,
    };
    let held = "compaction runs offline: stop it, compact, start it again";
    let Some(redb) = open_redb(&url, held).await? else {
        bail!("cannot compact {url}: compact runs on a redb:// store, offline");
    };
    let options = CompactOptions {
        frame_bytes: (args.frame_kib as usize) << 10,
        level: args.level,
    };
    let started = std::time::Instant::now();
    let store = Store::redb(redb.clone());
    let last = std::sync::Mutex::new(std::time::Instant::now());
    let report = lazystore_pathinfo::compact::compact(
        &store,
        redb.clone(),
        options,
        move |what, done, total| {
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            if done == total || last.elapsed().as_secs() >= 2 {
                *last = std::time::Instant::now();
                eprintln!("lazystore compact: {done} of {total} {what}");
            }
        },
    )
    .await
    .with_context(|| format!("compacting {url} (lazystore fsck says what is damaged)"))?;
    // The index too, once nothing else holds the store.
    drop(store);
    let mut redb = redb;
    let index = tokio::task::spawn_blocking(move || redb.compact_index())
        .await?
        .with_context(|| format!("compacting the index of {url}"))?;
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "{url}: {} chunks ({:.2} MB) moved into {} frames: {:.2} MB stored before, {:.2} MB \
         after ({:.3}×) in {:.1} s; {} chunks left as they were",
        report.chunks,
        mb(report.chunk_bytes),
        report.frames,
        mb(report.bytes_before),
        mb(report.bytes_after),
        report.bytes_after as f64 / report.bytes_before.max(1) as f64,
        started.elapsed().as_secs_f64(),
        report.left,
    );
    if report.patched > 0 {
        println!(
            "{} of them stored without their store path hashes, {} of those on bytes stored \
             already (a rebuild's)",
            report.patched, report.shared_base,
        );
    }
    match index {
        Some((before, after)) => println!(
            "index file: {:.2} MB before, {:.2} MB after",
            mb(before),
            mb(after)
        ),
        None => println!("index file: not compacted (the store is still held)"),
    }
    if report.absent > 0 {
        println!(
            "{} chunks named by paths are not stored (lazystore fsck)",
            report.absent
        );
    }
    if !report.damaged.is_empty() {
        for d in &report.damaged {
            println!("damaged chunk {d}, left in place");
        }
        println!(
            "{} damaged chunks left in place: lazystore fsck --repair --from CACHE",
            report.damaged.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
