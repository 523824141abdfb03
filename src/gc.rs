//! `lazystore gc`: deletes the paths the retention rules do not keep,
//! drops what no kept path reaches and gives its space back
//! (`pathinfo::gc::Collector`): in the serving process, over gRPC,
//! offline on a redb store nobody holds, or on an S3 store beside its
//! replicas.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use lazystore_castore::{RedbStore, S3Swept};
use lazystore_pathinfo::gc::{Collector, Retention, live};
use lazystore_pathinfo::pathinfos::{GrpcPathInfoService, PathUses};
use lazystore_pathinfo::proto::{CollectGarbageRequest, CollectGarbageResponse};
use lazystore_pathinfo::{Store, Wanted, default_store_url, is_remote, is_s3};

use crate::remote::RemoteArgs;

/// Collect a store's garbage: delete the published paths the retention
/// rules do not keep (with no rule, none), drop every directory, chunk
/// list and chunk no kept path reaches (what `lazystore delete` left, and
/// what crashes or uploads whose narinfo never came left), and give their
/// space back.
///
/// A served store (--store grpc+…, a write token) is collected by its
/// server, beside imports, uploads and builders' reads: writers' recent
/// touches are kept (docs/design.md, "Garbage collection"). A redb:// store
/// is collected offline, by this process (stop the server holding it).
/// An s3:// store is collected by this process while its replicas serve
/// it: packs nothing needs are condemned, and deleted by a collection at
/// least --grace later (run gc regularly; docs/design.md, "S3 store").
/// A path is kept with its whole closure. Prints what was deleted and
/// dropped, and the pack bytes before and after.
#[derive(clap::Args)]
pub struct Args {
    /// The store: grpc+http://HOST:PORT (its server collects it),
    /// redb:///abs/path/store.redb (offline), s3://BUCKET/PREFIX?… (beside
    /// its replicas; AWS_* credentials) [default: the embedded store under
    /// $LAZYSTORE_DIR].
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Count what would be deleted and dropped; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Keep the paths a builder or Nix client asked for, or that were
    /// published, within DURATION (`90d`, `12h`, `30min`). Paths with no
    /// record of use yet count as used now.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    keep_since: Option<Duration>,
    /// Keep these paths: `/nix/store/<hash>-<name>`, `<hash>-<name>` or
    /// the bare `<hash>`.
    #[arg(long, value_name = "PATH", num_args = 1..)]
    keep_closure_of: Vec<Wanted>,
    /// Keep the paths listed in FILE, one per line (blank lines and `#`
    /// comments ignored).
    #[arg(long, value_name = "FILE")]
    roots: Option<PathBuf>,
    /// For an s3:// store: how long a condemned pack stays before a later
    /// collection deletes it. It must exceed the time between a
    /// replica's check of an upload and its publication, and the clock
    /// skew between machines.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration,
          default_value = "1h")]
    grace: Duration,
    // --token-file (a write token), --ca-file: for a grpc+ store.
    #[command(flatten)]
    remote: RemoteArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let url = match args.store.clone() {
        Some(url) => url,
        None => default_store_url()?,
    };
    let mut retention = Retention {
        keep_since: args.keep_since,
        keep_closure_of: args.keep_closure_of.clone(),
    };
    if let Some(file) = &args.roots {
        retention.keep_closure_of.extend(read_roots(file)?);
    }
    let report = if is_remote(&url) {
        collect_remote(&url, &args, &retention).await?
    } else if is_s3(&url) {
        let (_, store) = args.remote.open_store(Some(url.clone())).await?;
        let s3 = store.s3.context("an s3:// store is an object store")?;
        let collector = Collector::s3(s3, args.grace);
        let report = collector
            .collect(&retention, args.dry_run)
            .await
            .with_context(|| format!("collecting the garbage of {url}"))?;
        if let Some(s) = &report.s3 {
            print_s3(args.dry_run, s);
        }
        report.into()
    } else {
        let Some(redb) = open_redb(&url, "collect through it: --store grpc+http://…").await?
        else {
            bail!(
                "cannot collect garbage in {url}: gc runs on a redb:// store (offline) or through \
                 the grpc+ server of one"
            );
        };
        let uses = Arc::new(PathUses::new(redb.clone()));
        let collector = Collector::new(Store::redb(redb.clone()), redb, None, uses);
        collector
            .collect(&retention, args.dry_run)
            .await
            .with_context(|| {
                format!("collecting the garbage of {url} (lazystore fsck says what is damaged)")
            })?
            .into()
    };
    print(&url, args.dry_run, &report);
    Ok(ExitCode::SUCCESS)
}

async fn collect_remote(
    url: &str,
    args: &Args,
    retention: &Retention,
) -> anyhow::Result<CollectGarbageResponse> {
    let (_, store) = args.remote.open_store(Some(url.to_owned())).await?;
    let connection = store
        .connection
        .clone()
        .context("a grpc+ store has a connection")?;
    let request = CollectGarbageRequest {
        dry_run: args.dry_run,
        keep_since_seconds: retention.keep_since.map(|d| d.as_secs()),
        keep_closure_of: retention
            .keep_closure_of
            .iter()
            .map(ToString::to_string)
            .collect(),
    };
    GrpcPathInfoService::new(connection)
        .collect_garbage(request)
        .await
        .with_context(|| format!("collecting the garbage of {url}"))
}

/// The paths of a roots file. Errors name the file and line.
fn read_roots(file: &std::path::Path) -> anyhow::Result<Vec<Wanted>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the roots file {}", file.display()))?;
    let mut roots = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        roots.push(line.parse::<Wanted>().with_context(|| {
            format!("{}:{}: {line:?} is not a store path", file.display(), n + 1)
        })?);
    }
    Ok(roots)
}

fn print(url: &str, dry_run: bool, r: &CollectGarbageResponse) {
    let (deleted, dropped) = match dry_run {
        true => ("would delete", "would drop"),
        false => ("deleted", "dropped"),
    };
    for path in &r.paths_deleted {
        println!("{deleted} /nix/store/{path}");
    }
    println!(
        "{url}: kept {} paths ({} directories, {} chunk lists, {} chunks); {dropped} {} \
         directories, {} chunk lists, {} chunks ({} bytes stored)",
        r.paths_kept,
        r.live_directories,
        r.live_blobs,
        r.live_chunks,
        r.dropped_directories,
        r.dropped_blobs,
        r.dropped_chunks,
        r.dropped_chunk_bytes
    );
    println!(
        "packs: {} bytes before, {} after ({} reclaimed)",
        r.pack_bytes_before,
        r.pack_bytes_after,
        r.pack_bytes_before.saturating_sub(r.pack_bytes_after)
    );
}

fn print_s3(dry_run: bool, s: &S3Swept) {
    let would = if dry_run { "would be " } else { "" };
    println!(
        "S3 packs: {} ({} bytes); {} {would}condemned ({} compacted: {} records, {} bytes \
         copied); {} condemned earlier {would}deleted ({} bytes, {} records copied first); \
         {} condemned and waiting out the grace period",
        s.packs_before,
        s.bytes_before,
        s.condemned,
        s.compacted,
        s.copied_records,
        s.copied_bytes,
        s.deleted,
        s.deleted_bytes,
        s.rescued,
        s.waiting
    );
}

/// The redb store at `url` opened by this process, or `None` if `url` is
/// not a `redb://` one. Fails if another process holds it, saying `held`:
/// what to do instead.
pub async fn open_redb(url: &str, held: &str) -> anyhow::Result<Option<RedbStore>> {
    let Some(path) = url.strip_prefix("redb://") else {
        return Ok(None);
    };
    let path = std::path::PathBuf::from(path);
    let redb = tokio::task::spawn_blocking(move || RedbStore::open(&path))
        .await?
        .with_context(|| {
            format!("cannot open {url} (is a lazystore serve or mount holding it? {held})")
        })?;
    Ok(Some(redb))
}

/// What a gc would drop from `redb`: the objects no published path
/// reaches and their stored bytes. Nothing is dropped.
pub async fn unreferenced(redb: &RedbStore) -> anyhow::Result<lazystore_castore::Swept> {
    let live = live(&Store::redb(redb.clone()), |_| {}).await?;
    let redb = redb.clone();
    Ok(tokio::task::spawn_blocking(move || redb.sweep(&live, None, true)).await??)
}
