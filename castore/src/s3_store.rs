//! The store on an S3-compatible object store (`s3://bucket/prefix`): what
//! replicas share, so that several `lazystore serve` processes can serve
//! one store without talking to each other.
//!
//! Objects under the prefix:
//!
//! | key                     | what                                                          |
//! |-------------------------|---------------------------------------------------------------|
//! | `packs/<name>`          | records back to back: chunks, chunk lists, directories        |
//! | `index/<millis>-<hash>` | where each record of one pack is (format in `s3_index.rs`)    |
//! | `meta/chunker-params`   | the chunker parameters, 12 bytes as in redb's `meta-v1`       |
//! | `pathinfo/<nixbase32>`  | one PathInfo, BLAKE3 + protobuf as in redb's `pathinfo-v2`    |
//! | `quarantine/<digest>`   | a chunk whose copy failed, naming its pack (`s3_quarantine.rs`) |
//! | `condemned/<millis>-<pack>` | a pack a collection condemned, and when (`s3_gc.rs`)      |
//!
//! Everything but a PathInfo is content-addressed and never changes, so
//! writes are idempotent and replicas need no coordination: two replicas
//! storing the same chunk at once store it twice, in two packs, and
//! readers take either copy. A PathInfo is written by its own PUT once
//! everything its root reaches is stored, so a reader that finds one finds
//! its data.
//!
//! Cost per object is what shapes the layout: an object store charges (in
//! money and latency, 10–50 ms a request) per request, not per byte. So
//! records are never one object each: writes are gathered into packs of
//! up to 16 MiB (`s3_packs.rs`) and each pack costs two PUTs (its bytes, then its
//! index); reads are Range GETs of the records asked for, nearby ranges of
//! one pack merged into one request (`s3_index.rs`). What each operation
//! costs is in the backends' docs and `docs/design.md` ("S3 store").
//!
//! Every request goes through [`S3Store`]'s helpers, which retry under the
//! store's [`RetryPolicy`] (object_store's own retries are off, so there is
//! one policy) and count requests by kind ([`S3Requests`]).
//!
//! Credentials come from the standard AWS environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_REGION`, `AWS_ENDPOINT_URL`), read by [`S3Options::from_env`]; the
//! URL's `endpoint=` and `region=` take precedence.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use crate::chunker::ChunkerParams;
use crate::retry::RetryPolicy;
use crate::s3_config::{OpenS3Error, S3Error, S3Options, parse_url};
use crate::s3_index::Index;
use crate::s3_packs::Writer;

/// Key of the chunker parameters, under the prefix.
const CHUNKER_KEY: &str = "meta/chunker-params";

/// Requests made at once when many objects are read (index objects on a
/// listing, PathInfos on a `list`).
pub(crate) const PARALLEL_GETS: usize = 16;

/// Requests made so far, by kind, and the bytes they moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct S3Requests {
    /// PUTs.
    pub puts: u64,
    /// Bytes PUT.
    pub put_bytes: u64,
    /// GETs, ranged or whole (a merged range is one).
    pub gets: u64,
    /// Bytes received by GETs.
    pub get_bytes: u64,
    /// LIST pages.
    pub lists: u64,
    /// HEADs and DELETEs.
    pub others: u64,
}

#[derive(Default, Debug)]
struct Counters {
    puts: AtomicU64,
    put_bytes: AtomicU64,
    gets: AtomicU64,
    get_bytes: AtomicU64,
    lists: AtomicU64,
    others: AtomicU64,
}

/// One open `s3://` store: the client, and what the blob and directory
/// backends share (the index of records, the pack writer). Cheap to clone.
#[derive(Clone, Debug)]
pub struct S3Store {
    inner: Arc<Inner>,
    /// Whether records only in condemned packs count (for a collection's
    /// mark), or are absent (everyone else).
    sees_condemned: bool,
}

#[derive(Debug)]
struct Inner {
    url: String,
    client: AmazonS3,
    prefix: String,
    retry: RetryPolicy,
    counters: Counters,
    index: Index,
    writer: Writer,
    params: tokio::sync::OnceCell<ChunkerParams>,
}

impl S3Store {
    /// Opens the store at `url` (`s3://bucket/prefix?endpoint=…&region=…`).
    /// Makes no request: the bucket is first read when the store is.
    pub fn open(url: &str, options: S3Options) -> Result<S3Store, OpenS3Error> {
        let parts = parse_url(url)?;
        let credentials = options
            .credentials
            .ok_or_else(|| OpenS3Error::NoCredentials {
                url: url.to_owned(),
            })?;
        // reqwest's rustls takes the process's provider: ring, as
        // everywhere else (a provider installed already stays).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let endpoint = parts.endpoint.or(options.endpoint);
        let region = parts.region.or(options.region);
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&parts.bucket)
            .with_access_key_id(credentials.key_id)
            .with_secret_access_key(credentials.secret)
            .with_region(region.unwrap_or_else(|| "us-east-1".to_owned()))
            // One retry policy: ours, around every request.
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(60)),
            );
        if let Some(token) = credentials.session_token {
            builder = builder.with_token(token);
        }
        if let Some(endpoint) = endpoint {
            builder = builder
                .with_allow_http(endpoint.starts_with("http://"))
                .with_endpoint(endpoint);
        }
        let client = builder.build().map_err(|source| OpenS3Error::Client {
            url: url.to_owned(),
            source,
        })?;
        Ok(S3Store {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                client,
                prefix: parts.prefix,
                retry: options.retry,
                counters: Counters::default(),
                index: Index::default(),
                writer: Writer::default(),
                params: tokio::sync::OnceCell::new(),
            }),
            sees_condemned: false,
        })
    }

    /// The same store, sharing everything, for which records only in
    /// packs a collection condemned still count: what a collection marks
    /// through, so that a record a path came to need after its pack was
    /// condemned is found, and copied before the pack is deleted.
    pub fn seeing_condemned(&self) -> S3Store {
        S3Store {
            inner: self.inner.clone(),
            sees_condemned: true,
        }
    }

    pub(crate) fn sees_condemned(&self) -> bool {
        self.sees_condemned
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Requests made so far.
    pub fn requests(&self) -> S3Requests {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        S3Requests {
            puts: get(&c.puts),
            put_bytes: get(&c.put_bytes),
            gets: get(&c.gets),
            get_bytes: get(&c.get_bytes),
            lists: get(&c.lists),
            others: get(&c.others),
        }
    }

    pub(crate) fn index(&self) -> &Index {
        &self.inner.index
    }

    pub(crate) fn writer(&self) -> &Writer {
        &self.inner.writer
    }

    /// The chunker parameters the store records; the first call on a
    /// store that records none writes `wanted` (the defaults if `None`).
    /// Two replicas creating a store at once with different parameters
    /// race; the store is meant to be created once, by one process.
    pub async fn chunker_params(
        &self,
        wanted: Option<ChunkerParams>,
    ) -> Result<ChunkerParams, S3Error> {
        let params = self.inner.params.get_or_try_init(|| async {
            if let Some(bytes) = self.get(CHUNKER_KEY).await? {
                return params_from_record(&bytes).ok_or_else(|| S3Error::Corrupt {
                    key: self.full_key(CHUNKER_KEY),
                    reason: "not 12 bytes of valid chunker parameters",
                });
            }
            let params = wanted.unwrap_or_default();
            self.put(CHUNKER_KEY, params_record(params)).await?;
            Ok(params)
        });
        params.await.copied()
    }

    fn full_key(&self, key: &str) -> String {
        match self.inner.prefix.as_str() {
            "" => key.to_owned(),
            prefix => format!("{prefix}/{key}"),
        }
    }

    fn path(&self, key: &str) -> Path {
        Path::from(self.full_key(key))
    }

    /// Runs one request under the retry policy.
    async fn retried<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> Result<T, S3Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, object_store::Error>>,
    {
        let attempt = || async {
            f().await.map_err(|source| S3Error::Request {
                op,
                key: self.full_key(key),
                source,
            })
        };
        let on_retry = |e: &S3Error, attempts: u32, wait: Duration| {
            tracing::debug!(
                error = %crate::error_chain(e),
                attempts,
                ?wait,
                "S3 request failed; retrying"
            );
        };
        self.inner.retry.run(attempt, on_retry).await
    }

    /// Writes an object whole.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), S3Error> {
        let path = self.path(key);
        let c = &self.inner.counters;
        self.retried("PUT", key, || {
            c.puts.fetch_add(1, Ordering::Relaxed);
            c.put_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.inner
                .client
                .put(&path, PutPayload::from_bytes(bytes.clone()))
        })
        .await
        .map(drop)
    }

    /// An object whole, or `None` if there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, S3Error> {
        let path = self.path(key);
        let c = &self.inner.counters;
        let got = self
            .retried("GET", key, || async {
                c.gets.fetch_add(1, Ordering::Relaxed);
                match self.inner.client.get(&path).await {
                    Ok(r) => r.bytes().await.map(Some),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        if let Some(b) = &got {
            c.get_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        }
        Ok(got)
    }

    /// Byte ranges of one object, in the order asked; ranges that are
    /// near each other are read by one request.
    pub(crate) async fn get_ranges(
        &self,
        key: &str,
        ranges: &[Range<u64>],
    ) -> Result<Vec<Bytes>, S3Error> {
        let path = self.path(key);
        let c = &self.inner.counters;
        let requests = merged_requests(ranges);
        let got = self
            .retried("GET", key, || {
                c.gets.fetch_add(requests, Ordering::Relaxed);
                self.inner.client.get_ranges(&path, ranges)
            })
            .await?;
        let bytes: usize = got.iter().map(Bytes::len).sum();
        c.get_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(got)
    }

    /// Whether an object exists.
    pub async fn exists(&self, key: &str) -> Result<bool, S3Error> {
        let path = self.path(key);
        let c = &self.inner.counters;
        self.retried("HEAD", key, || async {
            c.others.fetch_add(1, Ordering::Relaxed);
            match self.inner.client.head(&path).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Deletes an object (a missing one too).
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        let path = self.path(key);
        let c = &self.inner.counters;
        self.retried("DELETE", key, || {
            c.others.fetch_add(1, Ordering::Relaxed);
            self.inner.client.delete(&path)
        })
        .await
    }

    /// The keys under `dir` (a key prefix ending in `/`), relative to it,
    /// sorted; only those after `dir` + `after` when given.
    pub async fn list(&self, dir: &str, after: Option<&str>) -> Result<Vec<String>, S3Error> {
        let prefix = self.path(dir.trim_end_matches('/'));
        let offset = after.map(|a| self.path(&format!("{dir}{a}")));
        let full_dir = format!("{}/", prefix.as_ref());
        let c = &self.inner.counters;
        self.retried("LIST", dir, || async {
            // object_store pages by 1000 keys; count a page per 1000.
            let listed = match &offset {
                Some(o) => self.inner.client.list_with_offset(Some(&prefix), o),
                None => self.inner.client.list(Some(&prefix)),
            };
            let mut keys: Vec<String> = listed
                .map_ok(|meta| meta.location.as_ref().to_owned())
                .try_collect()
                .await?;
            c.lists
                .fetch_add(keys.len() as u64 / 1000 + 1, Ordering::Relaxed);
            keys.retain_mut(|k| match k.strip_prefix(&full_dir) {
                Some(rest) => {
                    *k = rest.to_owned();
                    true
                }
                None => false,
            });
            keys.sort();
            Ok(keys)
        })
        .await
    }

    /// The objects of `keys`, fetched [`PARALLEL_GETS`] at a time, in the
    /// order given; `None` for one deleted since it was listed.
    pub async fn get_many(&self, keys: Vec<String>) -> Result<Vec<Option<Bytes>>, S3Error> {
        futures::stream::iter(keys)
            .map(|k| async move { self.get(&k).await })
            .buffered(PARALLEL_GETS)
            .try_collect()
            .await
    }
}

/// The chunker parameters as `meta/chunker-params` holds them: min, avg,
/// max, each u32 little endian (the layout of redb's `meta-v1` record).
fn params_record(params: ChunkerParams) -> Bytes {
    [params.min, params.avg, params.max]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

/// What [`params_record`] wrote, if valid.
fn params_from_record(bytes: &[u8]) -> Option<ChunkerParams> {
    let v: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    let [min, avg, max] = v[..] else { return None };
    if bytes.len() != 12 {
        return None;
    }
    ChunkerParams { min, avg, max }.validate().ok()
}

/// How many requests object_store's `get_ranges` makes for `ranges`: it
/// merges ranges less than 1 MiB apart (its default), and splits nothing.
fn merged_requests(ranges: &[Range<u64>]) -> u64 {
    const COALESCE: u64 = 1024 * 1024;
    let mut sorted: Vec<_> = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    let mut requests = 0;
    let mut end = None::<u64>;
    for r in sorted {
        match end {
            Some(e) if r.start <= e.saturating_add(COALESCE) => end = Some(e.max(r.end)),
            _ => {
                requests += 1;
                end = Some(r.end);
            }
        }
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_key_the_open_says_which_variables() {
        let none = S3Options::default();
        let e = S3Store::open("s3://b/p", none).err().unwrap().to_string();
        assert!(e.contains("AWS_ACCESS_KEY_ID"), "{e}");
    }

    #[test]
    fn merged_ranges_count_requests() {
        assert_eq!(merged_requests(&[0..10, 20..30, (3 << 20)..(4 << 20)]), 2);
        assert_eq!(merged_requests(&[]), 0);
    }
}
