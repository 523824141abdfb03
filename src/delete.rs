//! `lazystore delete`: unpublishes store paths.

use std::collections::{BTreeSet, HashMap};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use futures::TryStreamExt as _;
use lazystore_pathinfo::{StorePath, StorePathHash, Wanted};

use crate::remote::RemoteArgs;

/// Unpublish store paths: builders and Nix clients no longer find them.
///
/// A path another published path refers to is refused (naming the
/// referrers) unless --recursive, which deletes the referrers too, and
/// theirs. The data stays in the store, shared with other paths or not,
/// until a garbage collection. Prints each path deleted.
#[derive(clap::Args)]
pub struct Args {
    /// Store paths to delete: `/nix/store/<hash>-<name>`, `<hash>-<name>`
    /// or the bare `<hash>`.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<Wanted>,
    /// Delete the paths that refer to them too, and so on.
    #[arg(long)]
    recursive: bool,
    /// The store: redb:///abs/path/store.redb, grpc+http://HOST:PORT, …
    /// [default: the embedded store under $LAZYSTORE_DIR].
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    // --token-file (a write token), --ca-file: for a grpc+ store.
    #[command(flatten)]
    remote: RemoteArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (url, store) = args
        .remote
        .open_store(args.store)
        .await
        .context("cannot delete from the store")?;
    // Who refers to whom, from every PathInfo.
    let mut referrers: HashMap<StorePathHash, Vec<StorePath>> = HashMap::new();
    let mut published: HashMap<StorePathHash, StorePath> = HashMap::new();
    let mut infos = store.path_infos.list();
    while let Some(info) = infos
        .try_next()
        .await
        .with_context(|| format!("listing the paths of {url}"))?
    {
        for reference in &info.references {
            if *reference != info.store_path {
                referrers
                    .entry(reference.hash())
                    .or_default()
                    .push(info.store_path.clone());
            }
        }
        published.insert(info.store_path.hash(), info.store_path);
    }
    let mut doomed = BTreeSet::new();
    let mut queue = Vec::new();
    for wanted in &args.paths {
        match published.get(&wanted.hash()) {
            Some(path) if wanted.matches(path) => queue.push(path.clone()),
            _ => bail!("{wanted} is not published in {url}"),
        }
    }
    while let Some(path) = queue.pop() {
        if !doomed.insert(path.clone()) {
            continue;
        }
        let users = referrers.get(&path.hash()).cloned().unwrap_or_default();
        if args.recursive {
            queue.extend(users);
        }
    }
    if !args.recursive {
        let mut kept_users = Vec::new();
        for path in &doomed {
            for user in referrers.get(&path.hash()).into_iter().flatten() {
                if !doomed.contains(user) {
                    kept_users.push(format!(
                        "{} (refers to {})",
                        user.to_absolute(),
                        path.to_absolute()
                    ));
                }
            }
        }
        if !kept_users.is_empty() {
            bail!(
                "refusing to delete: published paths refer to it: {}; delete those too, or give \
                 --recursive",
                kept_users.join(", ")
            );
        }
    }
    for path in &doomed {
        let deleted = store
            .path_infos
            .delete(&path.hash())
            .await
            .with_context(|| format!("deleting {} from {url}", path.to_absolute()))?;
        if deleted {
            println!("deleted {}", path.to_absolute());
        }
    }
    Ok(ExitCode::SUCCESS)
}
