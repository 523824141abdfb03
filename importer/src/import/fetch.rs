//! One path from one cache (the tasks of an import run): its narinfo
//! fetched and checked (the path asked for, a signature by a trusted key),
//! its NAR downloaded, decompressed and ingested as it streams, and its
//! NarSize and NarHash checked, giving a PathInfo ready to publish. Runs at
//! once that want one NAR take turns, so it is downloaded once. A NAR
//! stored already is not downloaded: one this importer stored, or one the
//! store's durable index names (`Store::nar_roots`, kept across processes)
//! whose tree is checked whole first.

use super::*;

/// How one try at one cache ended, short of success.
pub(crate) enum Miss {
    /// The cache has no narinfo for the path.
    NotThere,
    /// It has one, and something about it or its NAR is wrong.
    Failed(PathErrorKind),
}

impl Shared {
    /// The state of runs with `caches` (opened) into `store`.
    pub(crate) fn new(
        store: Store,
        caches: Vec<BinaryCache>,
        options: &Options,
    ) -> Result<Shared, SetupError> {
        if options.caches.is_empty() {
            return Err(SetupError::NoCaches);
        }
        Ok(Shared {
            store,
            caches,
            trusted_keys: options.trusted_keys.clone(),
            check_signatures: options.check_signatures,
            retry: options.retry,
            downloaded: Arc::new(AtomicU64::new(0)),
            nar_downloads: AtomicU64::new(0),
            nar_index: Mutex::new(HashMap::new()),
            downloading: Mutex::new(HashMap::new()),
            may_lack_data: AtomicBool::new(false),
        })
    }

    /// Takes one path as far as a verified PathInfo.
    pub(super) async fn import_one(
        &self,
        wanted: &Wanted,
        references: &mpsc::UnboundedSender<Vec<StorePath>>,
        progress: &Progress,
    ) -> Result<Outcome, PathError> {
        let error = |kind| PathError {
            path: wanted.to_string(),
            kind,
        };
        if let Some(info) = self
            .store
            .path_infos
            .get(&wanted.hash())
            .await
            .map_err(|e| error(PathErrorKind::Lookup(e)))?
            && self.whole(&info, progress).await
        {
            return Ok(Outcome::Present(info));
        }
        let mut first_failure = None;
        for cache in &self.caches {
            match self.fetch_from(cache, wanted, references, progress).await {
                Ok(outcome) => return Ok(outcome),
                Err(Miss::NotThere) => {}
                Err(Miss::Failed(kind)) => {
                    if first_failure.is_some() {
                        // The first failure is the one reported; say what
                        // went wrong with later caches too.
                        progress.warn(&format!("{wanted}: {kind}"));
                    } else {
                        first_failure = Some(kind);
                    }
                }
            }
        }
        Err(error(first_failure.unwrap_or_else(|| {
            PathErrorKind::NotFound {
                caches: self.caches.iter().map(|c| c.url().to_owned()).collect(),
            }
        })))
    }

    /// Whether a path the store holds has all its data. Walks its tree
    /// only when the store has quarantined something this run (see
    /// `lazystore_pathinfo::whole`); a walk that fails is warned about and
    /// the path taken as whole, as it was before the check.
    async fn whole(&self, info: &PathInfo, progress: &Progress) -> bool {
        if !self.may_lack_data.load(Ordering::Relaxed) {
            return true;
        }
        let path = info.store_path.to_absolute();
        match self.store.find_missing(&info.root).await {
            Ok(None) => true,
            Ok(Some(missing)) => {
                progress.warn(&format!(
                    "{path} is in the store but incomplete ({missing}); importing it again"
                ));
                false
            }
            Err(e) => {
                progress.warn(&format!(
                    "{path}: cannot check that its data is all stored: {}",
                    error_chain(&e)
                ));
                true
            }
        }
    }

    /// Fetches, checks and ingests one path from one cache.
    async fn fetch_from(
        &self,
        cache: &BinaryCache,
        wanted: &Wanted,
        references: &mpsc::UnboundedSender<Vec<StorePath>>,
        progress: &Progress,
    ) -> Result<Outcome, Miss> {
        let narinfo = self.narinfo_from(cache, wanted).await?;
        // The references are trustworthy now (they are signed); the
        // coordinator can queue them while the NAR downloads.
        let _ = references.send(narinfo.references.clone());
        self.nar_from(cache, narinfo, progress).await
    }

    /// Fetches a path's narinfo from one cache and checks it: the path
    /// asked for, signed by a trusted key (unless checks are off).
    pub(crate) async fn narinfo_from(
        &self,
        cache: &BinaryCache,
        wanted: &Wanted,
    ) -> Result<NarInfo, Miss> {
        let narinfo_file = format!("{}.narinfo", wanted.hash_str());
        let url = cache.file_url(&narinfo_file);
        let file = cache
            .read_small(&narinfo_file, MAX_NARINFO_SIZE)
            .await
            .map_err(|source| {
                Miss::Failed(PathErrorKind::NarInfoFetch {
                    cache: cache.url().to_owned(),
                    source,
                })
            })?
            .ok_or(Miss::NotThere)?;
        self.downloaded.fetch_add(file.received, Ordering::Relaxed);
        let text = String::from_utf8(file.data)
            .map_err(|_| Miss::Failed(PathErrorKind::NarInfoText { url: url.clone() }))?;
        let narinfo = NarInfo::parse(&text).map_err(|source| {
            Miss::Failed(PathErrorKind::NarInfo {
                url: url.clone(),
                source,
            })
        })?;
        if !wanted.matches(&narinfo.store_path) {
            return Err(Miss::Failed(PathErrorKind::WrongStorePath {
                url,
                found: narinfo.store_path,
            }));
        }
        if self.check_signatures {
            narinfo.verify(&self.trusted_keys).map_err(|source| {
                Miss::Failed(PathErrorKind::Untrusted {
                    url: url.clone(),
                    trusted: self
                        .trusted_keys
                        .iter()
                        .map(|k| k.name().to_owned())
                        .collect(),
                    source,
                })
            })?;
        }
        Ok(narinfo)
    }

    /// Fetches, checks and ingests the NAR of a checked narinfo (unless an
    /// identical NAR is stored already, [`Shared::known_root`]); publishes
    /// nothing.
    pub(crate) async fn nar_from(
        &self,
        cache: &BinaryCache,
        narinfo: NarInfo,
        progress: &Progress,
    ) -> Result<Outcome, Miss> {
        // Runs at once (a pull-through server's lookups) that want one NAR
        // take turns: the first downloads it, the others then find it
        // stored. One that failed lets the next try.
        let key = (narinfo.nar_hash, narinfo.nar_size);
        let turn = self
            .downloading
            .lock()
            .expect("lock poisoned")
            .entry(key)
            .or_default()
            .clone();
        let _turn = turn.lock().await;
        let result = self.nar_from_once(cache, narinfo, progress).await;
        let mut downloading = self.downloading.lock().expect("lock poisoned");
        // Ours and the map's: nobody else waits for this NAR.
        if Arc::strong_count(&turn) == 2 {
            downloading.remove(&key);
        }
        result
    }

    async fn nar_from_once(
        &self,
        cache: &BinaryCache,
        narinfo: NarInfo,
        progress: &Progress,
    ) -> Result<Outcome, Miss> {
        if let Some(root) = self.known_root(&narinfo, progress).await {
            return Ok(Outcome::Ready {
                info: PathInfo::from_narinfo(narinfo, root),
                downloaded: false,
            });
        }

        let nar_url = cache.file_url(&narinfo.url);
        if !narinfo.compression.supported() {
            return Err(Miss::Failed(PathErrorKind::UnsupportedCompression {
                url: nar_url,
                compression: narinfo.compression,
            }));
        }
        progress.nar_expected(narinfo.nar_size);
        let ingested = self
            .fetch_nar(cache, &narinfo, &nar_url, progress)
            .await
            .map_err(Miss::Failed)?;
        if ingested.nar_size != narinfo.nar_size {
            return Err(Miss::Failed(PathErrorKind::NarSize {
                url: nar_url,
                expected: narinfo.nar_size,
                actual: ingested.nar_size,
            }));
        }
        if ingested.nar_sha256 != narinfo.nar_hash {
            return Err(Miss::Failed(PathErrorKind::NarHash {
                url: nar_url,
                expected: narinfo.nar_hash,
                actual: ingested.nar_sha256,
            }));
        }
        let info = PathInfo::from_narinfo(narinfo, ingested.root);
        self.remember_nar(&info, progress).await;
        Ok(Outcome::Ready {
            info,
            downloaded: true,
        })
    }

    /// Downloads and ingests a NAR, starting again after transient failures.
    async fn fetch_nar(
        &self,
        cache: &BinaryCache,
        narinfo: &NarInfo,
        nar_url: &str,
        progress: &Progress,
    ) -> Result<Ingested, PathErrorKind> {
        self.retry
            .run(
                || self.fetch_nar_once(cache, narinfo, nar_url, progress),
                |kind, _, wait| {
                    progress.warn(&format!(
                        "{}: {}; trying again in {wait:?}",
                        narinfo.store_path.to_absolute(),
                        error_chain(&kind)
                    ));
                },
            )
            .await
    }

    async fn fetch_nar_once(
        &self,
        cache: &BinaryCache,
        narinfo: &NarInfo,
        nar_url: &str,
        progress: &Progress,
    ) -> Result<Ingested, PathErrorKind> {
        self.nar_downloads.fetch_add(1, Ordering::Relaxed);
        let nar = pipelined(Bounded::new(
            self.open_nar(cache, narinfo, nar_url, None).await?,
            narinfo.nar_size,
            progress.nar_counter(),
        ));
        ingest_hashed_nar(&self.store.blobs, &*self.store.directories, nar)
            .await
            .map_err(|e| classify(e, nar_url))
    }

    /// `narinfo`'s NAR (at `nar_url`), decompressed as it arrives (the
    /// response's `Content-Encoding` undone first, then the narinfo's
    /// `Compression`), the bytes received counted and bounded; over HTTP
    /// only its first `prefix` bytes, if given.
    pub(crate) async fn open_nar(
        &self,
        cache: &BinaryCache,
        narinfo: &NarInfo,
        nar_url: &str,
        prefix: Option<u64>,
    ) -> Result<Decompressed, PathErrorKind> {
        let opened = cache
            .open_nar(&narinfo.url, prefix)
            .await
            .map_err(|source| PathErrorKind::Download {
                url: nar_url.to_owned(),
                source,
            })?
            .ok_or_else(|| PathErrorKind::NarMissing {
                url: nar_url.to_owned(),
                cache: cache.url().to_owned(),
            })?;
        let downloaded = self.downloaded.clone();
        let compressed = opened.decoded(|body| Counted::new(body, downloaded, narinfo.nar_size));
        Ok(decompress(compressed, narinfo.compression))
    }

    /// The root of a NAR already stored with `narinfo`'s NarHash and
    /// NarSize, if any and still whole: one this importer stored or found,
    /// else one the store's durable index names ([`Store::nar_roots`],
    /// written by earlier processes). Either is checked before use, since
    /// a garbage collection (this importer may live as long as a
    /// pull-through server) or a cache's eviction may have dropped part of
    /// it: the check reads every directory and chunk list of the tree and
    /// asks the store which of their chunks it lacks, in batches — calls
    /// that also renew a collected store's leases on the tree. A root that
    /// fails is forgotten and the NAR downloaded again.
    pub(crate) async fn known_root(&self, narinfo: &NarInfo, progress: &Progress) -> Option<Node> {
        let key = (narinfo.nar_hash, narinfo.nar_size);
        let path = narinfo.store_path.to_absolute();
        let remembered = self
            .nar_index
            .lock()
            .expect("lock poisoned")
            .get(&key)
            .cloned();
        let root = match remembered {
            Some(root) => root,
            None => match self.store.nar_roots.get(&key.0, key.1).await {
                Ok(root) => root?,
                Err(e) => {
                    progress.warn(&format!(
                        "{path}: cannot look its NAR up in the index of stored NARs: {}",
                        error_chain(&e)
                    ));
                    return None;
                }
            },
        };
        let forget = || {
            self.nar_index.lock().expect("lock poisoned").remove(&key);
        };
        match self.store.find_missing(&root).await {
            Ok(None) => {
                self.remember_root(key, root.clone());
                Some(root)
            }
            Ok(Some(missing)) => {
                forget();
                tracing::info!(
                    "{path}: its NAR was stored before, but part of the tree is gone \
                     ({missing}); downloading it again"
                );
                None
            }
            Err(e) => {
                forget();
                progress.warn(&format!(
                    "{path}: its NAR was stored before, but checking that its tree is whole \
                     failed: {}; downloading it again",
                    error_chain(&e)
                ));
                None
            }
        }
    }

    /// The retry policy of transient download failures.
    pub(crate) fn retry(&self) -> RetryPolicy {
        self.retry
    }

    /// Indexes a NAR just stored, in memory and in the store's durable
    /// index, so that an identical one is not downloaded again, by this
    /// importer or by a later process. The durable record is best effort:
    /// a failure is warned about and costs a download later, never this
    /// import.
    pub(super) async fn remember_nar(&self, info: &PathInfo, progress: &Progress) {
        self.remember_in_memory(info);
        let recorded = self
            .store
            .nar_roots
            .put(&info.nar_sha256, info.nar_size, &info.root)
            .await;
        if let Err(e) = recorded {
            progress.warn(&format!(
                "{}: cannot record its NAR in the index of stored NARs: {}",
                info.store_path.to_absolute(),
                error_chain(&e)
            ));
        }
    }

    /// Indexes a stored NAR in memory only: that of a path found present,
    /// which a later process finds published without looking its NAR up.
    pub(super) fn remember_in_memory(&self, info: &PathInfo) {
        self.remember_root((info.nar_sha256, info.nar_size), info.root.clone());
    }

    /// An importer that lives as long as a pull-through server would
    /// otherwise keep one entry per NAR it ever stored: past
    /// [`MAX_REMEMBERED_NARS`] the map starts again (it only saves
    /// downloads of identical NARs, and the durable index still has them).
    fn remember_root(&self, key: NarKey, root: Node) {
        let mut index = self.nar_index.lock().expect("lock poisoned");
        if index.len() >= MAX_REMEMBERED_NARS {
            index.clear();
        }
        index.insert(key, root);
    }
}

/// Says which stage an ingest failure came from: the transport, the
/// decoder, the size bound, the NAR itself or the store.
pub(crate) fn classify(error: IngestError, url: &str) -> PathErrorKind {
    let url = url.to_owned();
    let (offset, io) = match error {
        IngestError::Nar(NarError {
            offset,
            kind: NarErrorKind::Io(io),
        }) => (offset, io),
        e @ (IngestError::Blob(_) | IngestError::Directory(_)) => return PathErrorKind::Store(e),
        source => return PathErrorKind::InvalidNar { url, source },
    };
    match take_stream_error(io) {
        Ok(StreamError::Transport(source)) => PathErrorKind::Download { url, source },
        Ok(StreamError::Decompress {
            compression,
            source,
        }) => PathErrorKind::Decompress {
            url,
            compression,
            source,
        },
        Ok(StreamError::TooLong { nar_size }) => PathErrorKind::NarTooLong { url, nar_size },
        Ok(StreamError::CompressedTooLong { limit, .. }) => {
            PathErrorKind::CompressedTooLong { url, limit }
        }
        Err(io) => PathErrorKind::InvalidNar {
            url,
            source: IngestError::Nar(NarError {
                offset,
                kind: NarErrorKind::Io(io),
            }),
        },
    }
}
