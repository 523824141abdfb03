//! `lazystore nix-db`: prints the validity records of store paths and
//! their closures in the form `nix-store --load-db` reads, from the
//! PathInfos of a store or, for paths it lacks, from checked narinfos of
//! upstream binary caches — metadata only, no content is read — so that a
//! builder's Nix treats lazily mounted paths as valid.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use lazystore_importer::{NEGATIVE_TTL, Wanted};
use lazystore_pathinfo::StorePath;
use lazystore_pathinfo::substitute::{Substituter, Substituters, Validity};
use tokio::task::JoinSet;

use crate::remote::RemoteArgs;
use crate::upstream::UpstreamArgs;

/// Lookups in flight at once while walking a closure.
const CONCURRENT_LOOKUPS: usize = 32;

/// Print Nix validity records (`nix-store --load-db` input) for store paths
/// and their closures, from the store's PathInfos or upstream narinfos; no
/// content is read.
///
/// Each record is what `nix-store --dump-db PATH` prints: the store path,
/// its NarHash in base16, its NarSize, its deriver (or an empty line), the
/// number of references and the references. Records come dependencies
/// first. Typical use on a builder whose /nix/store shows a lazystore
/// mount: `lazystore nix-db --store grpc+http://central:7000 PATH... |
/// nix-store --load-db`.
///
/// With --upstream, a path the store lacks is described by its narinfo in
/// the first upstream cache that has it, checked as `lazystore import`
/// checks it (the path asked for, a signature by a trusted key); give the
/// mount the same --upstream caches so that it shows those paths.
#[derive(clap::Args)]
pub struct Args {
    /// Store paths: `/nix/store/<hash>-<name>`, `<hash>-<name>` or the
    /// bare `<hash>`.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<Wanted>,

    /// The store to read PathInfos from (redb:///abs/path/store.redb,
    /// grpc+http://host:port, grpc+unix:///path). Default: the embedded
    /// store under $LAZYSTORE_DIR (~/.local/share/lazystore).
    #[arg(long, value_name = "URL")]
    store: Option<String>,

    /// Print only the paths named, not their references (`nix-store
    /// --load-db` then needs the references to be valid already).
    #[arg(long)]
    no_closure: bool,

    #[command(flatten)]
    remote: RemoteArgs,

    #[command(flatten)]
    upstream: UpstreamArgs,
}

/// One path's validity record: what `nix-store --load-db` reads. Its
/// references are sorted as Nix sorts them (by basename), so records read
/// the same as `nix-store --dump-db`.
type Record = Validity;

/// Appends `record` as Nix 2.8's `makeValidityRegistration(…, true, true)`
/// writes it: NarHash as bare base16, no `sha256:` prefix.
fn write_record(record: &Record, out: &mut String) {
    let _ = writeln!(out, "{}", record.store_path.to_absolute());
    let _ = writeln!(out, "{}", hex_lower(&record.nar_sha256));
    let _ = writeln!(out, "{}", record.nar_size);
    match &record.deriver {
        Some(deriver) => {
            let _ = writeln!(out, "{}", deriver.to_absolute());
        }
        None => out.push('\n'),
    }
    let _ = writeln!(out, "{}", record.references.len());
    for reference in &record.references {
        let _ = writeln!(out, "{}", reference.to_absolute());
    }
}
fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Where records come from, and how to say where they were looked for.
struct Sources {
    store_url: String,
    /// The store, then the upstream caches if any.
    paths: Substituters,
}

impl Sources {
    /// The record of `wanted`, or an error naming where it was looked for
    /// and what to do.
    async fn record(&self, wanted: &Wanted) -> anyhow::Result<Record> {
        let found =
            self.paths.validity(wanted).await.with_context(|| {
                format!("cannot describe {wanted} from {}", self.paths.describe())
            })?;
        let Some(record) = found else {
            let hint = if self.paths.layers().len() > 1 {
                "or add an --upstream cache that has it"
            } else {
                "or describe it from a binary cache that has it (--upstream URL)"
            };
            bail!(
                "{wanted} is in none of {} (or is named otherwise there); import it \
                 (lazystore import --store {url} --from CACHE {wanted}) {hint}",
                self.paths.describe(),
                url = self.store_url
            );
        };
        Ok(record)
    }
}

/// The records of `wanted` and, with `closure`, of everything they refer
/// to, looked up concurrently.
async fn collect(
    sources: Arc<Sources>,
    wanted: &[Wanted],
    closure: bool,
) -> anyhow::Result<BTreeMap<StorePath, Record>> {
    let mut records = BTreeMap::new();
    // Hashes asked for, so a path named twice or reached twice is looked up once.
    let mut asked = BTreeSet::new();
    let mut queue: Vec<Wanted> = wanted
        .iter()
        .filter(|w| asked.insert(w.hash()))
        .cloned()
        .collect();
    let mut tasks = JoinSet::new();
    loop {
        while tasks.len() < CONCURRENT_LOOKUPS {
            let Some(next) = queue.pop() else { break };
            let sources = sources.clone();
            tasks.spawn(async move { sources.record(&next).await });
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        let record = done.context("a lookup task failed")??;
        if closure {
            for reference in &record.references {
                if asked.insert(reference.hash()) {
                    queue.push(reference.clone().into());
                }
            }
        }
        records.insert(record.store_path.clone(), record);
    }
    Ok(records)
}

/// The records, each after the records of its references that are there
/// (Nix does not need the order, but a reader can follow it), otherwise
/// in store path order.
fn dependencies_first(records: &BTreeMap<StorePath, Record>) -> Vec<&Record> {
    fn visit<'a>(
        path: &StorePath,
        records: &'a BTreeMap<StorePath, Record>,
        done: &mut BTreeSet<StorePath>,
        out: &mut Vec<&'a Record>,
    ) {
        // Nix closures are acyclic apart from self-references, so marking
        // on entry only guards against those (and a malformed store).
        let Some(record) = records.get(path) else {
            return;
        };
        if !done.insert(path.clone()) {
            return;
        }
        for reference in &record.references {
            visit(reference, records, done, out);
        }
        out.push(record);
    }
    let mut done = BTreeSet::new();
    let mut out = Vec::with_capacity(records.len());
    for path in records.keys() {
        visit(path, records, &mut done, &mut out);
    }
    out
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (store_url, store) = args.remote.open_store(args.store).await?;
    // Only narinfos are read: the store is never written.
    let paths =
        args.upstream
            .substituters(&store, &store_url, NEGATIVE_TTL, args.remote.ca_certs()?)?;
    let sources = Arc::new(Sources { store_url, paths });
    let records = collect(sources, &args.paths, !args.no_closure).await?;
    let mut out = String::new();
    for record in dependencies_first(&records) {
        write_record(record, &mut out);
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write the records to standard output")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(basename: &str) -> StorePath {
        StorePath::from_basename(basename).unwrap()
    }

    #[test]
    fn writes_nix_dump_db_form() {
        let a = path("4kwjrglaqmx137vy2alkjazg3qaakddl-lazystore-test-a");
        let b = path("bvp61ha8c97b8f21x8rzi34psp99lf64-lazystore-test-b");
        let record = Record {
            store_path: path("195r44c11x4qgfffyhdna7j4098vfipm-lazystore-test-c"),
            nar_sha256: [0xab; 32],
            nar_size: 1064,
            deriver: Some(path(
                "r8csxlga6gll38040m830lvqlkm7wykv-lazystore-test-c.drv",
            )),
            references: vec![a.clone(), b.clone()],
        };
        let mut out = String::new();
        write_record(&record, &mut out);
        assert_eq!(
            out,
            format!(
                "/nix/store/195r44c11x4qgfffyhdna7j4098vfipm-lazystore-test-c\n{}\n1064\n\
                 /nix/store/r8csxlga6gll38040m830lvqlkm7wykv-lazystore-test-c.drv\n2\n\
                 /nix/store/4kwjrglaqmx137vy2alkjazg3qaakddl-lazystore-test-a\n\
                 /nix/store/bvp61ha8c97b8f21x8rzi34psp99lf64-lazystore-test-b\n",
                "ab".repeat(32)
            )
        );
        let mut out = String::new();
        let bare = Record {
            deriver: None,
            references: vec![],
            ..record
        };
        write_record(&bare, &mut out);
        assert!(out.ends_with("\n1064\n\n0\n"), "{out:?}");
    }

    #[test]
    fn orders_dependencies_first() {
        let a = path("4kwjrglaqmx137vy2alkjazg3qaakddl-a");
        let b = path("0vp61ha8c97b8f21x8rzi34psp99lf64-b");
        let c = path("095r44c11x4qgfffyhdna7j4098vfipm-c");
        let record = |p: &StorePath, refs: &[&StorePath]| Record {
            store_path: p.clone(),
            nar_sha256: [0; 32],
            nar_size: 1,
            deriver: None,
            references: refs.iter().map(|r| (*r).clone()).collect(),
        };
        let records: BTreeMap<_, _> = [
            record(&a, &[&a]),
            record(&b, &[&a, &b]),
            record(&c, &[&a, &b]),
        ]
        .into_iter()
        .map(|r| (r.store_path.clone(), r))
        .collect();
        let order: Vec<_> = dependencies_first(&records)
            .iter()
            .map(|r| r.store_path.name().to_owned())
            .collect();
        assert_eq!(order, ["a", "b", "c"]);
    }
}
