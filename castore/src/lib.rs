//! The content-addressed store under lazystore.
//!
//! Everything is named by a BLAKE3 [`Digest`]: a file's contents are a blob,
//! stored as FastCDC chunks each named by its own digest; a directory is
//! named by the digest of its canonical encoding. The [`nodes`] types are the
//! validated data model; [`blobs`] and [`directories`] are the stores, each a
//! backend trait with one file per backend. [`retry`] is the one retry
//! policy every retrying client of the workspace uses, and the classes
//! ([`ErrorClass`]) the store's errors fall into. [`auth`] holds the access
//! tokens both servers (gRPC and the HTTP cache) check and clients send;
//! [`tls`] the certificates they present and the CAs clients trust.

pub mod auth;
pub mod blobs;
mod cache_store;
mod chunk_record;
mod chunker;
mod compaction;
mod digest;
pub mod directories;
mod error;
mod frames;
pub mod grpc;
pub mod leases;
pub mod nodes;
mod packs;
mod redb_store;
pub mod retry;
mod s3_config;
mod s3_gc;
mod s3_index;
mod s3_packs;
mod s3_quarantine;
mod s3_store;
mod store_hashes;
mod sweep;
pub mod tls;

/// Wire types generated from `proto/castore.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("lazystore.castore.v1");
}

pub use blobs::{BlobError, BlobMeta, BlobService, Blobs, StoredSize};
pub use cache_store::{CacheOptions, CacheStats, CacheStore, DEFAULT_CACHE_SIZE};
pub use chunker::{Chunker, ChunkerParams, InvalidChunkerParams};
pub use compaction::{CompactOptions, Compacted, FRAME_BYTES, FRAME_LEVEL};
pub use digest::{DIGEST_LEN, Digest, InvalidDigest};
pub use directories::{DirectoryError, DirectoryService};
pub use error::error_chain;
pub use leases::{LeasedDirectories, Leases, leased_blobs};
pub use nodes::{Directory, Node, PathComponent, SymlinkTarget, ValidateError};
pub use redb_store::{OpenError, RedbOptions, RedbStore, SyncMode};
pub use retry::{Backoff, ErrorClass, RetryPolicy, Retryable};
pub use s3_config::{OpenS3Error, S3Credentials, S3Error, S3Options};
pub use s3_gc::{COMPACT_BELOW, S3Swept};
pub use s3_store::{S3Requests, S3Store};
pub use sweep::{Live, SweepError, Swept};
