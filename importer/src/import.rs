//! The import run: walks the closure of the paths asked for, fetches and
//! verifies each missing path from the first cache that has it, and
//! publishes PathInfos in dependency order.
//!
//! One coordinator owns the plan (every path's state); up to `jobs` tasks
//! each take one path through lookup → narinfo → signature → NAR download,
//! decompression and ingest → NarSize/NarHash check, and hand back a
//! PathInfo ready to publish. The coordinator publishes it once all its
//! references are present, so the store never shows a path whose closure
//! is incomplete; a path whose reference failed is not published. Memory
//! is bounded by `jobs` streams, whatever the NAR sizes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazystore_castore::error_chain;
use lazystore_castore::{Node, RetryPolicy};
use lazystore_pathinfo::decompress::Decompressed;
use lazystore_pathinfo::ingest::{IngestError, Ingested, ingest_hashed_nar};
use lazystore_pathinfo::listing::MAX_LISTING_SIZE;
use lazystore_pathinfo::nar::{NarError, NarErrorKind};
use lazystore_pathinfo::pathinfos::PathInfo;
use lazystore_pathinfo::{MAX_NARINFO_SIZE, NarInfo, PublicKey, Store, StorePath, StorePathHash};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::cache::{BinaryCache, HttpOptions, http_client};
use crate::error::{PathError, PathErrorKind, SetupError};
use crate::progress::{Progress, ProgressMode, bytes};
use crate::stream::{Bounded, Counted, StreamError, decompress, pipelined, take_stream_error};
use crate::summary::Summary;
use lazystore_pathinfo::Wanted;

mod fetch;

pub(crate) use fetch::{Miss, classify};

/// The cache Nix substitutes from by default.
pub const DEFAULT_CACHE: &str = "https://cache.nixos.org";

/// The key cache.nixos.org signs with.
pub const DEFAULT_TRUSTED_KEY: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

/// How an import runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Binary cache URLs, tried in order for each path.
    pub caches: Vec<String>,
    /// Keys whose signatures are trusted.
    pub trusted_keys: Vec<PublicKey>,
    /// Require a valid signature by a trusted key on every narinfo.
    pub check_signatures: bool,
    /// Paths fetched at once; at least 1.
    pub jobs: usize,
    /// Import the references of every path too, recursively.
    pub closure: bool,
    /// Retries of transient HTTP failures: of reads of small files, and of
    /// whole NAR downloads.
    pub retry: RetryPolicy,
    /// HTTP timeouts.
    pub http: HttpOptions,
    /// How progress is shown.
    pub progress: ProgressMode,
}

impl Default for Options {
    /// cache.nixos.org with its key, signatures checked, 4 jobs, closures.
    fn default() -> Self {
        Options {
            caches: vec![DEFAULT_CACHE.to_owned()],
            trusted_keys: vec![DEFAULT_TRUSTED_KEY.parse().expect("valid built-in key")],
            check_signatures: true,
            jobs: 4,
            closure: true,
            // Five tries, waiting about 0.25 s, 0.5 s, 1 s, 2 s in between:
            // rides out a server restart or a dropped connection without
            // hiding an outage. No deadline: a NAR download may take long.
            // Nothing the importer retries is ever classed corrupt (a NAR
            // that fails its hash fails its path).
            retry: RetryPolicy {
                initial_backoff: Duration::from_millis(250),
                max_backoff: Duration::from_secs(8),
                deadline: Duration::MAX,
                max_attempts: Some(5),
                corrupt_attempts: 1,
            },
            http: HttpOptions::default(),
            progress: ProgressMode::Quiet,
        }
    }
}

/// Imports store paths from binary caches into a [`Store`].
pub struct Importer {
    shared: Arc<Shared>,
    jobs: usize,
    closure: bool,
    progress: ProgressMode,
}

/// What every task of a run needs.
pub(crate) struct Shared {
    pub(crate) store: Store,
    caches: Vec<BinaryCache>,
    trusted_keys: Vec<PublicKey>,
    check_signatures: bool,
    retry: RetryPolicy,
    /// Compressed bytes and narinfo bytes received.
    pub(crate) downloaded: Arc<AtomicU64>,
    /// NAR downloads started.
    pub(crate) nar_downloads: AtomicU64,
    /// Root node of every NAR seen by this importer, by (NarHash, NarSize):
    /// a path whose NAR is already stored is published without a download.
    /// In front of the store's durable index (`Store::nar_roots`), which
    /// outlives the process.
    // A std Mutex: each use is one map operation, never held across await.
    nar_index: Mutex<HashMap<NarKey, Node>>,
    /// NARs being downloaded: one download at a time for each, across runs.
    downloading: Mutex<HashMap<NarKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Whether the store had quarantined chunks when this run began, so
    /// that paths found present are checked for missing data.
    may_lack_data: AtomicBool,
}

/// A cache's `Priority` when its `nix-cache-info` gives none (Nix's).
const DEFAULT_PRIORITY: u32 = 50;

/// NARs remembered for deduplication at most: some 10 MiB of index.
const MAX_REMEMBERED_NARS: usize = 100_000;

/// A NAR by its NarHash and NarSize.
type NarKey = ([u8; 32], u64);

/// How a task ended for one path.
pub(crate) enum Outcome {
    /// The store has it already.
    Present(PathInfo),
    /// Verified and ready to publish.
    Ready {
        info: PathInfo,
        /// Whether its NAR was downloaded (false: an identical NAR was stored).
        downloaded: bool,
    },
}

/// A path's place in the plan.
enum State {
    /// Waiting for a task.
    Queued,
    /// A task is on it.
    Running,
    /// Verified, waiting for `missing` references to be published.
    Waiting {
        info: Box<PathInfo>,
        downloaded: bool,
        missing: usize,
    },
    /// In the store (found, imported or deduplicated).
    Done,
    /// Not imported.
    Failed,
}

/// The coordinator's view of a run.
struct Plan {
    closure: bool,
    states: HashMap<StorePathHash, State>,
    /// How each path was asked for, for messages.
    names: HashMap<StorePathHash, Wanted>,
    queue: VecDeque<Wanted>,
    /// Paths waiting for the key to be published.
    dependents: HashMap<StorePathHash, Vec<StorePathHash>>,
    summary: Summary,
}

impl Importer {
    /// Opens every cache (reading each `nix-cache-info` once) and prepares a
    /// run into `store`.
    pub async fn new(store: Store, options: Options) -> Result<Importer, SetupError> {
        let client = http_client(&options.http).map_err(SetupError::HttpClient)?;
        let mut caches = Vec::with_capacity(options.caches.len());
        for url in &options.caches {
            let cache = BinaryCache::open(url, &client, &options.http, options.retry)
                .await
                .map_err(|source| SetupError::Cache {
                    url: url.clone(),
                    source,
                })?;
            caches.push(cache);
        }
        // Nix asks its substituters in the order of their `Priority`
        // (lower first, 50 when a cache gives none); the order given
        // breaks ties.
        caches.sort_by_key(|cache| cache.priority().unwrap_or(DEFAULT_PRIORITY));
        Ok(Importer {
            shared: Arc::new(Shared::new(store, caches, &options)?),
            jobs: options.jobs.max(1),
            closure: options.closure,
            progress: options.progress,
        })
    }

    /// NAR downloads started by this importer so far (retries count again).
    pub fn nar_downloads(&self) -> u64 {
        self.shared.nar_downloads.load(Ordering::Relaxed)
    }

    /// Compressed NAR and narinfo bytes received so far.
    pub fn downloaded_bytes(&self) -> u64 {
        self.shared.downloaded.load(Ordering::Relaxed)
    }

    /// Takes `wanted` alone as far as a verified, stored PathInfo — its
    /// narinfo checked, its NAR downloaded (once, shared with any run that
    /// wants it), checked and ingested — and returns it unpublished, its
    /// references not looked at: what a pull-through server answers with
    /// while the closure is imported behind it.
    pub async fn fetch_one(&self, wanted: &Wanted) -> Result<PathInfo, PathError> {
        let (references, _) = mpsc::unbounded_channel();
        let progress = Progress::new(ProgressMode::Quiet);
        match self
            .shared
            .import_one(wanted, &references, &progress)
            .await?
        {
            Outcome::Present(info) | Outcome::Ready { info, .. } => Ok(info),
        }
    }

    /// The checked narinfo of `wanted` from the first cache (in priority
    /// order) that has it — signature and store path checked as an import
    /// checks them — with no NAR downloaded; `None` if no cache has it.
    pub async fn narinfo_one(&self, wanted: &Wanted) -> Result<Option<NarInfo>, PathError> {
        let mut first_failure = None;
        for cache in &self.shared.caches {
            match self.shared.narinfo_from(cache, wanted).await {
                Ok(narinfo) => return Ok(Some(narinfo)),
                Err(Miss::NotThere) => {}
                Err(Miss::Failed(kind)) => {
                    first_failure.get_or_insert(kind);
                }
            }
        }
        match first_failure {
            None => Ok(None),
            Some(kind) => Err(PathError {
                path: wanted.to_string(),
                kind,
            }),
        }
    }

    /// The JSON `.ls` listing of `wanted`'s NAR from the first cache (in
    /// priority order) with a checked narinfo for it, decompressed; `None`
    /// if that cache has none (or no cache has the path). Not parsed: the
    /// reader checks it against the signed NarSize.
    pub async fn listing_json(&self, wanted: &Wanted) -> Result<Option<Vec<u8>>, PathError> {
        for cache in &self.shared.caches {
            match self.shared.narinfo_from(cache, wanted).await {
                Ok(_) => {}
                Err(Miss::NotThere) => continue,
                Err(Miss::Failed(kind)) => {
                    return Err(PathError {
                        path: wanted.to_string(),
                        kind,
                    });
                }
            }
            let file = format!("{}.ls", wanted.hash_str());
            let raw = match cache.read_small(&file, MAX_LISTING_SIZE).await {
                Ok(Some(raw)) => raw,
                Ok(None) => return Ok(None),
                Err(e) => {
                    tracing::warn!("{wanted}: cannot fetch its listing: {}", error_chain(&e));
                    return Ok(None);
                }
            };
            self.shared
                .downloaded
                .fetch_add(raw.received, Ordering::Relaxed);
            return Ok(crate::upstream::decompress_listing(raw.data).await.ok());
        }
        Ok(None)
    }

    /// Imports `wanted` (and their closures, unless disabled) and returns
    /// what happened. Failures of single paths are in the summary; the run
    /// itself does not fail. May be called again: paths imported by an
    /// earlier run are found present.
    pub async fn run(&self, wanted: &[Wanted]) -> Summary {
        let start = Instant::now();
        let shared = &self.shared;
        let progress = Progress::new(self.progress);
        let downloaded_before = shared.downloaded.load(Ordering::Relaxed);
        let nar_downloads_before = shared.nar_downloads.load(Ordering::Relaxed);
        if !shared.check_signatures {
            progress.warn(
                "signature checks are off (--no-check-sigs): paths are imported \
                 whoever signed them, or nobody",
            );
        }
        // Asked once a run: with an intact store, the only cost of noticing
        // incomplete paths.
        let may_lack_data = shared.store.may_lack_data().await.unwrap_or_else(|e| {
            progress.warn(&format!(
                "cannot ask the store whether it lacks data: {}; paths found present are \
                 taken as whole",
                error_chain(&e)
            ));
            false
        });
        shared.may_lack_data.store(may_lack_data, Ordering::Relaxed);
        let mut plan = Plan {
            closure: self.closure,
            states: HashMap::new(),
            names: HashMap::new(),
            queue: VecDeque::new(),
            dependents: HashMap::new(),
            summary: Summary::default(),
        };
        for w in wanted {
            plan.enqueue(w.clone(), &progress);
        }
        let (references_tx, mut references_rx) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        loop {
            // References found by a task arrive before its result does.
            while let Ok(references) = references_rx.try_recv() {
                plan.discovered(references, &progress);
            }
            while tasks.len() < self.jobs {
                let Some(next) = plan.queue.pop_front() else {
                    break;
                };
                plan.states.insert(next.hash(), State::Running);
                let shared = self.shared.clone();
                let tx = references_tx.clone();
                let progress = progress.clone();
                tasks.spawn(async move {
                    let hash = next.hash();
                    (hash, shared.import_one(&next, &tx, &progress).await)
                });
            }
            tokio::select! {
                biased;
                Some(references) = references_rx.recv() => {
                    plan.discovered(references, &progress);
                }
                joined = tasks.join_next() => match joined {
                    None => break,
                    Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Some(Err(e)) => unreachable!("import tasks are never cancelled: {e}"),
                    Some(Ok((hash, result))) => {
                        plan.finished(shared, &progress, hash, result).await;
                    }
                },
            }
        }
        plan.fail_cycles(&progress);
        progress.finish();
        let mut summary = plan.summary;
        summary.downloaded_bytes = shared.downloaded.load(Ordering::Relaxed) - downloaded_before;
        summary.nar_downloads = shared.nar_downloads.load(Ordering::Relaxed) - nar_downloads_before;
        summary.elapsed = start.elapsed();
        summary
    }
}

impl Plan {
    /// Adds a path to the plan unless it is there already.
    fn enqueue(&mut self, wanted: Wanted, progress: &Progress) {
        let hash = wanted.hash();
        if self.states.contains_key(&hash) {
            return;
        }
        progress.path_found();
        self.states.insert(hash, State::Queued);
        self.names.insert(hash, wanted.clone());
        self.queue.push_back(wanted);
    }

    /// A task learnt a path's references from its verified narinfo.
    fn discovered(&mut self, references: Vec<StorePath>, progress: &Progress) {
        if self.closure {
            for reference in references {
                self.enqueue(reference.into(), progress);
            }
        }
    }

    fn name(&self, hash: &StorePathHash) -> String {
        self.names
            .get(hash)
            .map_or_else(|| "?".to_owned(), ToString::to_string)
    }

    /// A task ended.
    async fn finished(
        &mut self,
        shared: &Shared,
        progress: &Progress,
        hash: StorePathHash,
        result: Result<Outcome, PathError>,
    ) {
        match result {
            Err(error) => self.fail(hash, error, progress),
            Ok(Outcome::Present(info)) => {
                self.names.insert(hash, info.store_path.clone().into());
                shared.remember_in_memory(&info);
                self.discovered(info.references.clone(), progress);
                self.summary.present += 1;
                progress.path_done(&format!("present {}", info.store_path.to_absolute()), false);
                self.states.insert(hash, State::Done);
                self.published(shared, progress, hash).await;
            }
            Ok(Outcome::Ready { info, downloaded }) => {
                self.names.insert(hash, info.store_path.clone().into());
                self.discovered(info.references.clone(), progress);
                let mut missing = 0;
                if self.closure {
                    for reference in &info.references {
                        let r = reference.hash();
                        if r == hash {
                            continue;
                        }
                        match self.states.get(&r) {
                            Some(State::Done) => {}
                            Some(State::Failed) => {
                                let error = PathError {
                                    path: self.name(&hash),
                                    kind: PathErrorKind::Reference {
                                        reference: reference.to_absolute(),
                                    },
                                };
                                self.fail(hash, error, progress);
                                return;
                            }
                            _ => {
                                missing += 1;
                                self.dependents.entry(r).or_default().push(hash);
                            }
                        }
                    }
                }
                self.states.insert(
                    hash,
                    State::Waiting {
                        info: Box::new(info),
                        downloaded,
                        missing,
                    },
                );
                if missing == 0 {
                    self.publish(shared, progress, hash).await;
                }
            }
        }
    }

    /// Publishes `hash`, which must be waiting with nothing missing, then
    /// every dependent that was waiting only for it, and so on.
    async fn publish(&mut self, shared: &Shared, progress: &Progress, hash: StorePathHash) {
        let mut ready = vec![hash];
        while let Some(hash) = ready.pop() {
            let Some(State::Waiting {
                info, downloaded, ..
            }) = self.states.remove(&hash)
            else {
                unreachable!("only waiting paths are published");
            };
            let path = info.store_path.clone();
            let nar_size = info.nar_size;
            if let Err(source) = shared.store.path_infos.put(*info).await {
                let error = PathError {
                    path: path.to_absolute(),
                    kind: PathErrorKind::Publish(source),
                };
                self.states.insert(hash, State::Queued);
                self.fail(hash, error, progress);
                continue;
            }
            self.states.insert(hash, State::Done);
            if downloaded {
                self.summary.nar_bytes += nar_size;
                progress.path_done(
                    &format!("imported {} ({} NAR)", path.to_absolute(), bytes(nar_size)),
                    true,
                );
                self.summary.imported.push(path);
            } else {
                progress.path_done(
                    &format!(
                        "imported {} (identical NAR already stored)",
                        path.to_absolute()
                    ),
                    true,
                );
                self.summary.deduplicated.push(path);
            }
            ready.extend(self.release_dependents(hash));
        }
    }

    /// Counts `hash` as present for the paths waiting on it; returns those
    /// now waiting for nothing.
    fn release_dependents(&mut self, hash: StorePathHash) -> Vec<StorePathHash> {
        let mut ready = Vec::new();
        for dependent in self.dependents.remove(&hash).unwrap_or_default() {
            if let Some(State::Waiting { missing, .. }) = self.states.get_mut(&dependent) {
                *missing -= 1;
                if *missing == 0 {
                    ready.push(dependent);
                }
            }
        }
        ready
    }

    /// A path that was already present: release what waited on it.
    async fn published(&mut self, shared: &Shared, progress: &Progress, hash: StorePathHash) {
        for dependent in self.release_dependents(hash) {
            self.publish(shared, progress, dependent).await;
        }
    }

    /// Records a failure and fails every path waiting on it, recursively.
    fn fail(&mut self, hash: StorePathHash, error: PathError, progress: &Progress) {
        let mut failures = vec![(hash, error)];
        while let Some((hash, error)) = failures.pop() {
            if matches!(self.states.insert(hash, State::Failed), Some(State::Failed)) {
                continue;
            }
            progress.error(&error);
            self.summary.failed.push(error);
            let reference = self.name(&hash);
            for dependent in self.dependents.remove(&hash).unwrap_or_default() {
                if let Some(State::Waiting { .. }) = self.states.get(&dependent) {
                    let error = PathError {
                        path: self.name(&dependent),
                        kind: PathErrorKind::Reference {
                            reference: reference.clone(),
                        },
                    };
                    failures.push((dependent, error));
                }
            }
        }
    }

    /// Fails whatever still waits once nothing runs: its references can
    /// only be waiting on each other.
    fn fail_cycles(&mut self, progress: &Progress) {
        let stuck: Vec<_> = self
            .states
            .iter()
            .filter_map(|(hash, state)| match state {
                State::Waiting { info, .. } => Some((*hash, info.store_path.to_absolute())),
                _ => None,
            })
            .collect();
        for (hash, path) in stuck {
            let error = PathError {
                path,
                kind: PathErrorKind::ReferenceCycle,
            };
            self.fail(hash, error, progress);
        }
    }
}
