//! Lazy substitution: one path at a time, on demand, from upstream binary
//! caches — what a mount uses for paths its store lacks.
//!
//! [`UpstreamCaches::narinfo`] finds a path's narinfo and checks it exactly as an
//! import does (the path asked for, a trusted signature);
//! [`UpstreamCaches::listing`] fetches the cache's `.ls` listing of its NAR, from
//! which a tree can be shown without the NAR (decoded as its
//! `Content-Encoding` says, then by its magic bytes: caches store listings
//! compressed, and not all of them say so); [`UpstreamCaches::fetch`]
//! downloads the NAR, checks NarHash and NarSize while ingesting it into
//! the store, and returns the PathInfo — without publishing it, since the
//! path's references may be missing from the store (the caller decides).
//!
//! Caches are opened (their `nix-cache-info` read) on first use, and again
//! after a failed open, so a mount starts while an upstream is down and
//! uses it once it is back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lazystore_castore::{Node, Retryable};
use lazystore_pathinfo::ingest::IngestError;
use lazystore_pathinfo::listing::{Listing, MAX_LISTING_SIZE};
use lazystore_pathinfo::nar::{Event, NarError, NarErrorKind, NarReader};
use lazystore_pathinfo::pathinfos::{Facts, PathInfo};
use lazystore_pathinfo::{Compression, NarInfo, Store};
use tokio::io::AsyncReadExt as _;
use tokio::sync::OnceCell;

use crate::cache::{BinaryCache, http_client};
use crate::error::{PathError, PathErrorKind, SetupError};
use crate::import::{Miss, Options, Outcome, Shared, classify};
use crate::progress::{Progress, ProgressMode};
use crate::source::Source;
use crate::stream::decompress;
use lazystore_pathinfo::Wanted;

/// Upstream caches a mount substitutes single paths from.
pub struct UpstreamCaches {
    shared: Shared,
    caches: Vec<(String, OnceCell<BinaryCache>)>,
    client: reqwest::Client,
    options: Options,
    progress: Arc<Progress>,
    peeks: AtomicU64,
}

/// What a path's root is, read from the start of its NAR
/// ([`UpstreamCaches::peek`]). Not verified: only the whole NAR can be checked
/// against the NarHash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peeked {
    /// A regular file.
    File {
        /// Length of its contents.
        size: u64,
        /// Whether it has the executable bit.
        executable: bool,
    },
    /// A directory.
    Directory,
    /// A symlink.
    Symlink,
}

/// Compressed bytes a peek asks for: enough for the first block of every
/// compression but bzip2's (which then reads on).
const PEEK_BYTES: u64 = 256 << 10;

/// A path a [`Source`] found: its checked facts, and where it is.
#[derive(Clone, Debug)]
pub struct Found {
    /// From its narinfo, signature and store path checked.
    pub facts: Facts,
    pub(crate) via: Via,
}

/// Where a found path is.
#[derive(Clone, Debug)]
pub(crate) enum Via {
    /// In a binary cache: its narinfo, and the cache's index in
    /// [`Options::caches`].
    Cache { narinfo: Box<NarInfo>, cache: usize },
    /// Behind a pull-through service.
    Service,
}

impl Found {
    /// The narinfo and cache of a path found in a binary cache.
    fn in_cache(&self) -> (&NarInfo, usize) {
        match &self.via {
            Via::Cache { narinfo, cache } => (narinfo, *cache),
            // Each source is handed back only what it found.
            Via::Service => unreachable!("a service's path handed to binary caches"),
        }
    }
}

impl UpstreamCaches {
    /// Upstream caches `options.caches` (tried in order), storing fetched
    /// NARs in `store`. Only `caches`, `trusted_keys`, `check_signatures`,
    /// `retry` and `http` of `options` are used. Opens nothing yet.
    pub fn new(store: Store, options: Options) -> Result<UpstreamCaches, SetupError> {
        let client = http_client(&options.http).map_err(SetupError::HttpClient)?;
        let shared = Shared::new(store, Vec::new(), &options)?;
        if !options.check_signatures {
            tracing::warn!(
                "signature checks are off: upstream paths are shown whoever signed them, or nobody"
            );
        }
        Ok(UpstreamCaches {
            shared,
            caches: options
                .caches
                .iter()
                .map(|url| (url.clone(), OnceCell::new()))
                .collect(),
            client,
            options,
            progress: Progress::new(ProgressMode::Quiet),
            peeks: AtomicU64::new(0),
        })
    }

    /// The cache URLs, in order.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.caches.iter().map(|(url, _)| url.as_str())
    }

    /// Compressed NAR, listing and narinfo bytes received so far.
    pub fn downloaded_bytes(&self) -> u64 {
        self.shared.downloaded.load(Ordering::Relaxed)
    }

    /// NAR downloads started so far (retries count again).
    pub fn nar_downloads(&self) -> u64 {
        self.shared.nar_downloads.load(Ordering::Relaxed)
    }

    /// Whether narinfos must carry a trusted signature.
    pub fn checks_signatures(&self) -> bool {
        self.options.check_signatures
    }

    /// NAR peeks started so far (see [`UpstreamCaches::peek`]).
    pub fn nar_peeks(&self) -> u64 {
        self.peeks.load(Ordering::Relaxed)
    }

    async fn cache(&self, i: usize) -> Result<&BinaryCache, PathErrorKind> {
        let (url, cell) = &self.caches[i];
        cell.get_or_try_init(|| {
            BinaryCache::open(url, &self.client, &self.options.http, self.options.retry)
        })
        .await
        .map_err(|source| PathErrorKind::NarInfoFetch {
            cache: url.clone(),
            source,
        })
    }

    /// The checked narinfo of `wanted` from the first cache that has one:
    /// `None` if no cache has it, an error if a cache failed (unreachable,
    /// a bad signature, another store path…) and no later one had it.
    pub async fn narinfo(&self, wanted: &Wanted) -> Result<Option<Found>, PathError> {
        let mut first_failure = None;
        for i in 0..self.caches.len() {
            let result = match self.cache(i).await {
                Ok(cache) => self.shared.narinfo_from(cache, wanted).await,
                Err(kind) => Err(Miss::Failed(kind)),
            };
            match result {
                Ok(narinfo) => {
                    return Ok(Some(Found {
                        facts: Facts::from(narinfo.clone()),
                        via: Via::Cache {
                            narinfo: Box::new(narinfo),
                            cache: i,
                        },
                    }));
                }
                Err(Miss::NotThere) => {}
                Err(Miss::Failed(kind)) => {
                    if first_failure.is_some() {
                        tracing::warn!("{wanted}: {}", lazystore_castore::error_chain(&kind));
                    } else {
                        first_failure = Some(kind);
                    }
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

    /// The `.ls` listing of `found`'s NAR from its cache, decoded as the
    /// response's `Content-Encoding` says and then, if it is still not
    /// JSON, by its magic bytes: `None` if the cache has none or it is not
    /// a listing this reads (logged with the reason; the path is then shown
    /// from the start of its NAR).
    pub async fn listing(&self, found: &Found) -> Option<Listing> {
        let (narinfo, cache) = found.in_cache();
        let path = narinfo.store_path.to_absolute();
        let file = format!("{}.ls", narinfo.store_path.hash_str());
        let cache = self.cache(cache).await.ok()?;
        let raw = match cache.read_small(&file, MAX_LISTING_SIZE).await {
            Ok(Some(raw)) => raw,
            Ok(None) => {
                tracing::debug!("{path}: the cache has no listing {}", cache.file_url(&file));
                return None;
            }
            Err(e) => {
                tracing::warn!(
                    "{path}: cannot fetch its listing: {}",
                    lazystore_castore::error_chain(&e)
                );
                return None;
            }
        };
        self.shared
            .downloaded
            .fetch_add(raw.received, Ordering::Relaxed);
        let json = match decompress_listing(raw.data).await {
            Ok(json) => json,
            Err(e) => {
                tracing::warn!(
                    "{path}: ignoring the listing {}: {e}",
                    cache.file_url(&file)
                );
                return None;
            }
        };
        // A large listing is CPU work: off the runtime's threads.
        let parsed = tokio::task::spawn_blocking(move || Listing::parse(&json))
            .await
            .expect("parsing a listing does not panic");
        match parsed {
            Ok(listing) => Some(listing),
            Err(e) => {
                tracing::warn!(
                    "{path}: ignoring the listing {}: {e}",
                    cache.file_url(&file)
                );
                None
            }
        }
    }

    /// What `found`'s root is (a file with its size, a directory, a
    /// symlink), read from the start of its NAR: the first 256 KiB asked
    /// for with a `Range` request, and the whole NAR (read only as far as
    /// the root's header) if the decoder needs more. Transient failures are
    /// retried as downloads are; a NAR already stored (by this mount, or
    /// before, as the store's index of NARs says) is not asked for at all.
    /// Nothing is stored.
    pub async fn peek(&self, found: &Found) -> Result<Peeked, PathError> {
        let (narinfo, cache) = found.in_cache();
        if let Some(root) = self.shared.known_root(narinfo, &self.progress).await {
            return Ok(match root {
                Node::File {
                    size, executable, ..
                } => Peeked::File { size, executable },
                Node::Directory { .. } => Peeked::Directory,
                Node::Symlink { .. } => Peeked::Symlink,
            });
        }
        let error = |kind| PathError {
            path: narinfo.store_path.to_absolute(),
            kind,
        };
        let cache = self.cache(cache).await.map_err(error)?;
        let nar_url = cache.file_url(&narinfo.url);
        if !narinfo.compression.supported() {
            return Err(error(PathErrorKind::UnsupportedCompression {
                url: nar_url,
                compression: narinfo.compression,
            }));
        }
        let mut backoff = self.shared.retry().backoff();
        let mut prefix = Some(PEEK_BYTES);
        loop {
            let kind = match self.peek_once(cache, narinfo, &nar_url, prefix).await {
                Ok(peeked) => return Ok(peeked),
                Err(kind) => kind,
            };
            match kind {
                // The prefix ended inside the decoder's first block.
                PathErrorKind::Decompress { .. } if prefix.take().is_some() => {}
                kind => match backoff.next(kind.class()) {
                    Some(wait) => {
                        tracing::warn!(
                            "{}: {}; trying again in {wait:?}",
                            narinfo.store_path.to_absolute(),
                            lazystore_castore::error_chain(&kind)
                        );
                        tokio::time::sleep(wait).await;
                    }
                    None => return Err(error(kind)),
                },
            }
        }
    }

    async fn peek_once(
        &self,
        cache: &BinaryCache,
        narinfo: &NarInfo,
        nar_url: &str,
        prefix: Option<u64>,
    ) -> Result<Peeked, PathErrorKind> {
        self.peeks.fetch_add(1, Ordering::Relaxed);
        let nar = self
            .shared
            .open_nar(cache, narinfo, nar_url, prefix)
            .await?;
        let mut nar = NarReader::new(nar);
        match nar.next().await {
            Ok(Some(Event::File {
                size, executable, ..
            })) => Ok(Peeked::File { size, executable }),
            Ok(Some(Event::DirectoryStart { .. })) => Ok(Peeked::Directory),
            Ok(Some(Event::Symlink { .. })) => Ok(Peeked::Symlink),
            // The reader's first event is always the root's.
            Ok(Some(Event::DirectoryEnd) | None) => Err(classify(
                IngestError::Nar(NarError {
                    offset: 0,
                    kind: NarErrorKind::Io(std::io::Error::other("no root node")),
                }),
                nar_url,
            )),
            Err(e) => Err(classify(IngestError::Nar(e), nar_url)),
        }
    }

    /// Downloads `found`'s NAR, checks its NarSize and NarHash while
    /// ingesting it into the store, and returns its PathInfo, unpublished.
    /// Transient failures are retried; nothing is kept of a NAR that fails.
    pub async fn fetch(&self, found: &Found) -> Result<PathInfo, PathError> {
        let (narinfo, cache) = found.in_cache();
        let error = |kind| PathError {
            path: narinfo.store_path.to_absolute(),
            kind,
        };
        let cache = self.cache(cache).await.map_err(error)?;
        match self
            .shared
            .nar_from(cache, narinfo.clone(), &self.progress)
            .await
        {
            Ok(Outcome::Ready { info, .. } | Outcome::Present(info)) => Ok(info),
            Err(Miss::Failed(kind)) => Err(error(kind)),
            Err(Miss::NotThere) => Err(error(PathErrorKind::NotFound {
                caches: vec![cache.url().to_owned()],
            })),
        }
    }
}

#[async_trait::async_trait]
impl Source for UpstreamCaches {
    fn describe(&self) -> String {
        self.urls().collect::<Vec<_>>().join(", ")
    }

    /// Checked paths only: unchecked signatures vouch for nothing, so such
    /// paths stay the mount's own.
    fn publishes_fetched(&self) -> bool {
        self.checks_signatures()
    }

    async fn find(&self, wanted: &Wanted) -> Result<Option<Found>, PathError> {
        self.narinfo(wanted).await
    }

    async fn listing(&self, found: &Found) -> Option<Listing> {
        UpstreamCaches::listing(self, found).await
    }

    async fn peek(&self, found: &Found) -> Result<Option<Peeked>, PathError> {
        UpstreamCaches::peek(self, found).await.map(Some)
    }

    async fn fetch(&self, found: &Found) -> Result<PathInfo, PathError> {
        UpstreamCaches::fetch(self, found).await
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("upstream_nar_peeks", self.nar_peeks()),
            ("upstream_nar_downloads", self.nar_downloads()),
            ("upstream_bytes_downloaded", self.downloaded_bytes()),
        ]
    }
}

/// A listing's JSON from the bytes a cache sent, its `Content-Encoding`
/// already undone: as they are if they start as every listing does (`{`),
/// else decompressed by their magic bytes, else as brotli, which has none.
/// Caches written with `ls-compression` store listings compressed without
/// saying so when read as files, and a copy of cache.nixos.org's files has
/// its brotli listings without the header that named the coding. No
/// compressed stream starts with `{`: xz, zstd, bzip2 and gzip have other
/// magic bytes, and a brotli stream whose first byte is `{` is empty.
pub(crate) async fn decompress_listing(raw: Vec<u8>) -> std::io::Result<Vec<u8>> {
    if raw.starts_with(b"{") {
        return Ok(raw);
    }
    let compression = if raw.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else if raw.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if raw.starts_with(b"BZh") {
        Compression::Bzip2
    } else if raw.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else {
        Compression::Brotli
    };
    let mut out = Vec::new();
    let decoded = decompress(std::io::Cursor::new(raw), compression)
        .take(MAX_LISTING_SIZE as u64 + 1)
        .read_to_end(&mut out)
        .await;
    match decoded {
        Ok(_) if out.len() > MAX_LISTING_SIZE => Err(std::io::Error::other(format!(
            "larger than {MAX_LISTING_SIZE} bytes decompressed"
        ))),
        Ok(_) => Ok(out),
        Err(_) if compression == Compression::Brotli => Err(std::io::Error::other(
            "neither JSON nor compressed by any method this reads \
             (Content-Encoding, xz, zstd, bzip2, gzip or brotli)",
        )),
        Err(e) => Err(std::io::Error::other(format!(
            "cannot decompress it as {compression}: {}",
            lazystore_castore::error_chain(&e)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;

    async fn compress(data: &[u8], compression: Compression) -> Vec<u8> {
        use async_compression::tokio::bufread::{
            BrotliEncoder, BzEncoder, GzipEncoder, XzEncoder, ZstdEncoder,
        };
        let mut out = Vec::new();
        let encoded = match compression {
            Compression::Brotli => BrotliEncoder::new(data).read_to_end(&mut out).await,
            Compression::Zstd => ZstdEncoder::new(data).read_to_end(&mut out).await,
            Compression::Xz => XzEncoder::new(data).read_to_end(&mut out).await,
            Compression::Bzip2 => BzEncoder::new(data).read_to_end(&mut out).await,
            Compression::Gzip => GzipEncoder::new(data).read_to_end(&mut out).await,
            other => panic!("no encoder for {other}"),
        };
        encoded.unwrap();
        out
    }

    #[tokio::test]
    async fn listings_are_sniffed_and_brotli_is_the_last_resort() {
        let json = br#"{"version":1,"root":{"type":"regular","size":3}}"#.to_vec();
        assert_eq!(decompress_listing(json.clone()).await.unwrap(), json);
        for compression in [
            Compression::Brotli,
            Compression::Zstd,
            Compression::Xz,
            Compression::Bzip2,
            Compression::Gzip,
        ] {
            let compressed = compress(&json, compression).await;
            assert!(!compressed.starts_with(b"{"), "{compression}");
            assert_eq!(
                decompress_listing(compressed).await.unwrap(),
                json,
                "{compression}"
            );
        }
        let e = decompress_listing(b"<html>not found</html>".to_vec())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("neither JSON"), "{e}");
        let mut truncated = compress(&json, Compression::Zstd).await;
        truncated.truncate(truncated.len() / 2);
        let e = decompress_listing(truncated).await.unwrap_err();
        assert!(e.to_string().contains("as zstd"), "{e}");
    }
}
