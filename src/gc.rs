//! `lazystore gc`: drops what no published path reaches and gives its
//! space back (`pathinfo::gc` marks, `RedbStore::sweep` sweeps).

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use lazystore_castore::RedbStore;
use lazystore_pathinfo::gc::live;
use lazystore_pathinfo::{Store, default_store_url};

/// Delete from a store every directory, chunk list and chunk no published
/// path reaches (what `lazystore delete` left, and what crashes or uploads
/// whose narinfo never came left), and give their space back.
///
/// Runs offline on a redb store: stop the server holding it first (redb
/// admits one process, and no import may run between the mark and the
/// sweep). Prints what it dropped and the pack bytes before and after.
#[derive(clap::Args)]
pub struct Args {
    /// The store: redb:///abs/path/store.redb [default: the embedded store
    /// under $LAZYSTORE_DIR].
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Count what would be dropped; drop nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let url = match args.store {
        Some(url) => url,
        None => default_store_url()?,
    };
    let Some(redb) = open_redb(&url).await? else {
        bail!(
            "cannot collect garbage in {url}: gc runs on a redb:// store, offline (stop the \
             lazystore serve holding it, and give its --store)"
        );
    };
    let store = Store::redb(redb.clone());
    let live = live(&store, |_| {})
        .await
        .with_context(|| format!("marking what the paths of {url} reach; nothing was dropped (lazystore fsck says what is damaged)"))?;
    let dry_run = args.dry_run;
    let (live_counts, swept) = tokio::task::spawn_blocking(move || {
        let counts = (live.directories.len(), live.blobs.len(), live.chunks.len());
        redb.sweep(&live, dry_run).map(|swept| (counts, swept))
    })
    .await?
    .with_context(|| format!("sweeping {url}"))?;
    let verb = if dry_run { "would drop" } else { "dropped" };
    println!(
        "{url}: kept {} directories, {} chunk lists, {} chunks; {verb} {} directories, {} chunk \
         lists, {} chunks ({} bytes stored)",
        live_counts.0,
        live_counts.1,
        live_counts.2,
        swept.directories,
        swept.blobs,
        swept.chunks,
        swept.chunk_bytes
    );
    println!(
        "packs: {} bytes before, {} after ({} reclaimed)",
        swept.packs_before,
        swept.packs_after,
        swept.packs_before.saturating_sub(swept.packs_after)
    );
    Ok(ExitCode::SUCCESS)
}

/// The redb store at `url` opened by this process, or `None` if `url` is
/// not a `redb://` one. Fails if another process holds it.
pub async fn open_redb(url: &str) -> anyhow::Result<Option<RedbStore>> {
    let Some(path) = url.strip_prefix("redb://") else {
        return Ok(None);
    };
    let path = std::path::PathBuf::from(path);
    let redb = tokio::task::spawn_blocking(move || RedbStore::open(&path))
        .await?
        .with_context(|| {
            format!("cannot open {url} (is a lazystore serve or mount holding it?)")
        })?;
    Ok(Some(redb))
}

/// What a gc would drop from `redb`: the objects no published path
/// reaches and their stored bytes. Nothing is dropped.
pub async fn unreferenced(redb: &RedbStore) -> anyhow::Result<lazystore_castore::Swept> {
    let live = live(&Store::redb(redb.clone()), |_| {}).await?;
    let redb = redb.clone();
    Ok(tokio::task::spawn_blocking(move || redb.sweep(&live, true)).await??)
}
