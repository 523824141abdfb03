//! Why an import could not start ([`SetupError`]) and why one path was not
//! imported ([`PathError`]). Every message names the path and the cache or
//! URL involved.

use std::fmt;

use lazystore_castore::{ErrorClass, Retryable};
use lazystore_pathinfo::ingest::IngestError;
use lazystore_pathinfo::pathinfos::PathInfoError;
use lazystore_pathinfo::{Compression, NarInfoError, StorePath, VerifyError, format_sha256};

use crate::cache::CacheError;

/// Why an import run could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// No cache URL was given.
    #[error("no binary cache to import from")]
    NoCaches,
    /// The HTTP client could not be built (TLS setup).
    #[error("cannot set up the HTTP client")]
    HttpClient(#[source] reqwest::Error),
    /// A cache could not be opened.
    #[error("cannot use binary cache {url}")]
    Cache {
        /// The cache URL.
        url: String,
        /// Why.
        #[source]
        source: CacheError,
    },
}

/// Why one store path was not imported. Nothing is published for it.
#[derive(Debug)]
pub struct PathError {
    /// The path as asked for (absolute, or the bare hash).
    pub path: String,
    /// What went wrong.
    pub kind: PathErrorKind,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.kind)
    }
}

impl std::error::Error for PathError {
    // The kind's message is part of ours; the chain goes on with its cause.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.kind)
    }
}

/// What went wrong with one path.
#[derive(Debug, thiserror::Error)]
pub enum PathErrorKind {
    /// No cache has a narinfo for the path.
    #[error("not found in {}", list(caches))]
    NotFound {
        /// The caches asked, in order.
        caches: Vec<String>,
    },
    /// Looking the path up in the store failed.
    #[error("looking it up in the store failed")]
    Lookup(#[source] PathInfoError),
    /// The narinfo could not be downloaded.
    #[error("cannot read its narinfo from {cache}")]
    NarInfoFetch {
        /// The cache.
        cache: String,
        /// Why.
        #[source]
        source: CacheError,
    },
    /// The narinfo is not valid UTF-8 text.
    #[error("narinfo {url} is not UTF-8 text")]
    NarInfoText {
        /// The narinfo URL.
        url: String,
    },
    /// The narinfo does not parse.
    #[error("narinfo {url} is malformed")]
    NarInfo {
        /// The narinfo URL.
        url: String,
        /// The parse error.
        #[source]
        source: NarInfoError,
    },
    /// The narinfo describes another store path than the one asked for.
    #[error("narinfo {url} is for {}, not for the path asked for", found.to_absolute())]
    WrongStorePath {
        /// The narinfo URL.
        url: String,
        /// The path it names.
        found: StorePath,
    },
    /// No valid signature by a trusted key.
    #[error(
        "narinfo {url} has no valid signature by a trusted key (trusted: {}); \
         add the cache's key with --trusted-public-key, or pass --no-check-sigs",
        list(trusted)
    )]
    Untrusted {
        /// The narinfo URL.
        url: String,
        /// Names of the trusted keys.
        trusted: Vec<String>,
        /// What the check found.
        #[source]
        source: VerifyError,
    },
    /// The NAR is compressed with a method not supported here.
    #[error("NAR {url} is compressed with {compression}, which lazystore cannot decompress")]
    UnsupportedCompression {
        /// The NAR URL.
        url: String,
        /// The method.
        compression: Compression,
    },
    /// The cache has the narinfo but not the NAR it points to.
    #[error("NAR {url} is missing from {cache} (not found)")]
    NarMissing {
        /// The NAR URL.
        url: String,
        /// The cache.
        cache: String,
    },
    /// Downloading the NAR failed, after retries if the failure was transient.
    #[error("downloading NAR {url} failed")]
    Download {
        /// The NAR URL.
        url: String,
        /// Why.
        #[source]
        source: CacheError,
    },
    /// The compressed file is corrupt or truncated.
    #[error("{compression} stream {url} is corrupt or truncated")]
    Decompress {
        /// The NAR URL.
        url: String,
        /// The method.
        compression: Compression,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },
    /// The decompressed NAR goes on past its NarSize; reading stopped at
    /// byte NarSize + 1.
    #[error(
        "NAR {url} is longer than its NarSize of {nar_size} bytes \
         (stopped at byte {})",
        nar_size + 1
    )]
    NarTooLong {
        /// The NAR URL.
        url: String,
        /// The NarSize from the narinfo.
        nar_size: u64,
    },
    /// The compressed file is far longer than a NAR of this size needs.
    #[error("NAR {url} is more than {limit} bytes compressed, too many for its NarSize")]
    CompressedTooLong {
        /// The NAR URL.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// The NAR is malformed (Nix would reject it too).
    #[error("NAR {url} is invalid")]
    InvalidNar {
        /// The NAR URL.
        url: String,
        /// The reader's or the castore's objection.
        #[source]
        source: IngestError,
    },
    /// The NAR is shorter than its NarSize.
    #[error("NAR {url} has {actual} bytes, its narinfo says NarSize {expected}")]
    NarSize {
        /// The NAR URL.
        url: String,
        /// NarSize from the narinfo.
        expected: u64,
        /// Bytes the NAR had.
        actual: u64,
    },
    /// The NAR's SHA-256 differs from the narinfo's NarHash.
    #[error(
        "NAR {url} has hash {}, its narinfo says NarHash {}",
        format_sha256(actual),
        format_sha256(expected)
    )]
    NarHash {
        /// The NAR URL.
        url: String,
        /// NarHash from the narinfo.
        expected: [u8; 32],
        /// SHA-256 of the NAR received.
        actual: [u8; 32],
    },
    /// Writing the path's contents into the store failed.
    #[error("storing its contents failed")]
    Store(#[source] IngestError),
    /// Publishing the PathInfo failed.
    #[error("publishing it failed")]
    Publish(#[source] PathInfoError),
    /// A path it refers to was not imported, so it is not published either:
    /// a published path's references are always present.
    #[error("not published: its reference {reference} was not imported")]
    Reference {
        /// The reference that failed, as asked for.
        reference: String,
    },
    /// Its references refer back to it, so none can be published first.
    #[error("not published: its references form a cycle")]
    ReferenceCycle,
}

impl Retryable for PathErrorKind {
    /// A download is classed by its [`CacheError`]; anything else (a NAR
    /// that does not match its narinfo, a store that refused it, a missing
    /// reference) fails the path without another try.
    fn class(&self) -> ErrorClass {
        match self {
            PathErrorKind::Download { source, .. } => source.class(),
            _ => ErrorClass::Permanent,
        }
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}
