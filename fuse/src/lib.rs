//! The lazy `/nix/store` FUSE frontend: store paths appear from metadata,
//! directories are fetched when first looked up or listed, and file
//! contents are fetched per chunk, verified, only when read.
//!
//! [`LazyFs`] is the filesystem as async operations on inode numbers; tests
//! drive it without mounting. [`mount`](mount()) puts it under a mountpoint
//! through fuser (the kernel talks to a thin adapter that runs each request
//! as a task on a Tokio runtime, so no request waits for another).
//! [`Stats`] counts what was presented and what was fetched; a mount shows
//! them in `MOUNT/.lazystore/stats`.

mod adapter;
mod chunks;
mod error;
mod failed_reads;
mod fs;
mod inode;
mod mount;
mod passthrough;
mod stats;
mod trace;

pub use error::FsError;
pub use fs::{
    Attr, CONTENT_TTL, CONTROL_DIR_NAME, DIGEST_XATTR, DirEntry, FileKind, FsOptions, LazyFs,
    STATS_FILE_NAME,
};
pub use inode::Ino;
/// The store's one retry policy, which [`FsOptions::retry`] is.
pub use lazystore_castore::RetryPolicy;
pub use mount::{MountConfig, MountError, Mounted, mount};
pub use stats::{CounterSource, CountingBlobService, RemoteReads, Stats, StatsSnapshot};
pub use trace::{QUIET as TRACE_QUIET, TracePrefetch, Traces, read_trace};
