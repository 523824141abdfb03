//! `lazystore stats`: what a store's paths cost (`pathinfo::stats`).

use std::process::ExitCode;

use lazystore_pathinfo::stats::store_stats;

use crate::remote::RemoteArgs;

/// Report what the store's paths cost: for each published path its NAR
/// bytes, the bytes of the distinct chunks its files are made of (and of
/// those no other path shares), and their bytes as stored; then the same
/// for the whole store with the dedup ratio (NAR bytes per distinct chunk
/// byte) and the compression ratio (distinct chunk bytes per stored
/// byte). Reads every directory, chunk list and distinct chunk once, as
/// fsck does (without decoding); progress on standard error.
#[derive(clap::Args)]
pub struct Args {
    /// The store: redb:///abs/path/store.redb, s3://BUCKET/PREFIX?…,
    /// grpc+http://HOST:PORT, grpc+https://…, grpc+unix:///PATH [default:
    /// the embedded store under $LAZYSTORE_DIR].
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Print the store's totals only, not a line per path.
    #[arg(long)]
    summary: bool,
    // --token-file, --ca-file: for a grpc+ store.
    #[command(flatten)]
    remote: RemoteArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (url, store) = args.remote.open_store(args.store).await?;
    let stats = store_stats(&store, |what, done, total| {
        if done == total || done % 1000 == 0 {
            eprintln!("lazystore stats: {done} of {total} {what}");
        }
    })
    .await?;
    let mb = |b: u64| b as f64 / 1e6;
    if !args.summary {
        println!("path\tNAR MB\tchunk MB\town chunk MB\tstored MB\tstored/NAR");
        for p in &stats.paths {
            println!(
                "{}\t{:.2}\t{:.2}\t{:.2}\t{:.2}\t{:.3}",
                p.store_path.to_absolute(),
                mb(p.nar_bytes),
                mb(p.chunk_bytes),
                mb(p.own_chunk_bytes),
                mb(p.stored_bytes),
                p.stored_bytes as f64 / p.nar_bytes.max(1) as f64
            );
        }
    }
    println!(
        "{url}: {} paths, {:.2} MB of NAR; {} distinct chunks, {:.2} MB; stored {:.2} MB; \
         dedup {:.2}×, compression {:.2}×, stored/NAR {:.3}",
        stats.paths.len(),
        mb(stats.nar_bytes),
        stats.chunks,
        mb(stats.chunk_bytes),
        mb(stats.stored_bytes),
        stats.dedup_ratio(),
        stats.compression_ratio(),
        stats.stored_bytes as f64 / stats.nar_bytes.max(1) as f64
    );
    Ok(ExitCode::SUCCESS)
}
