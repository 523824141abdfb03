//! Closure import from Nix binary caches into a lazystore [`Store`].
//!
//! An [`Importer`] opens the caches it is given (reading each
//! `nix-cache-info` once), then [`Importer::run`] takes store paths and
//! their closures into the store: a path already present costs one lookup;
//! a missing one is fetched from the first cache that has it, its narinfo
//! checked (the right store path, a valid signature by a trusted key), its
//! NAR streamed through decompression into the castore while NarHash and
//! NarSize are computed, and its PathInfo published only once both match
//! and all its references are present. Nothing is published for a path
//! that fails any check. Downloads run in parallel, retry transient HTTP
//! failures with backoff, and use memory bounded by the number of jobs,
//! whatever the size of the NARs.
//!
//! [`Store`]: lazystore_pathinfo::Store

mod cache;
mod error;
mod import;
mod progress;
mod pull_through;
mod source;
mod stream;
mod substituter;
mod summary;
mod upstream;

pub use cache::{BinaryCache, CacheError, HttpOptions, Opened, SmallFile, http_client};
pub use error::{PathError, PathErrorKind, SetupError};
pub use import::{DEFAULT_CACHE, DEFAULT_TRUSTED_KEY, Importer, Options};
/// The store's one retry policy, which [`Options::retry`] is.
pub use lazystore_castore::RetryPolicy;
pub use lazystore_pathinfo::Wanted;
pub use progress::ProgressMode;
pub use pull_through::PullThrough;
pub use source::{ServiceSource, Source};
pub use stream::StreamError;
pub use substituter::{NEGATIVE_TTL, UpstreamSubstituter};
pub use summary::Summary;
pub use upstream::{Found, Peeked, UpstreamCaches};
