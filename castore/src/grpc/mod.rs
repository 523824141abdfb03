//! The store over gRPC: the server side of the blob and directory services,
//! [`serve`] to run them (with gRPC health, the token check, optional TLS
//! and bounds on what one client may hold) on a TCP or Unix listener, and the plumbing every client shares: a lazily
//! connected [`Connection`] (sending its token with every call), its
//! per-attempt [`AttemptTimeout`] (the [`RetryPolicy`](crate::RetryPolicy)
//! itself is shared with every other retrying client, in [`crate::retry`]),
//! and the one mapping between store errors and `tonic::Status`, in both
//! directions.
//!
//! The clients themselves are backends like any other:
//! [`GrpcBlobService`](crate::blobs::GrpcBlobService) and
//! [`GrpcDirectoryService`](crate::directories::GrpcDirectoryService).
//!
//! Trust does not cross the wire: the server verifies every uploaded chunk
//! and directory before storing it, and the client side verifies what it
//! reads ([`Blobs`](crate::Blobs) decodes and hashes every chunk after it
//! arrives, [`GrpcDirectoryService`](crate::directories::GrpcDirectoryService)
//! checks every directory against its digest).

mod blob_server;
mod call;
mod calls;
mod connection;
mod directory_server;
pub mod metadata;
mod serve;
mod status;
pub(crate) mod wire;

pub use blob_server::{BlobServer, UploadTooLarge};
pub use call::{AttemptError, AttemptTimeout, CallError};
pub use calls::CallCounts;
pub use connection::{AuthChannel, Connection, InvalidUrl, SendToken, Unreachable};
pub use directory_server::DirectoryServer;
pub use serve::{
    DEFAULT_MAX_UPLOAD_SIZE, FIRST_BYTES_TIMEOUT, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, Listener,
    MAX_CONCURRENT_STREAMS, MAX_CONNECTIONS, ServeError, Services, TLS_HANDSHAKE_TIMEOUT, serve,
};
pub use status::GrpcError;
pub use wire::BadMessage;

/// Largest message either side encodes or decodes, set explicitly on every
/// server and client (tonic's default of 4 MiB would refuse large chunks).
///
/// The largest messages are one chunk (at most
/// [`MAX_CHUNK_SIZE`](crate::blobs::MAX_CHUNK_SIZE), 16 MiB, plus a few bytes
/// of framing) and a blob's chunk list (about 40 bytes a chunk, so 64 MiB
/// holds 1.6 million chunks: a blob of some 100 GiB at the 64 KiB average).
/// Anything larger is refused before it is allocated.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Most chunks one `ReadChunks` request may ask for. The answer is streamed
/// and read from the backend in small batches, so this bounds the work one
/// request commits the server to, not its memory. Clients split longer
/// reads into several requests.
pub const MAX_READ_CHUNKS: usize = 1024;

/// Most blobs one `StatMany` request may ask for. The answer is streamed
/// and read from the backend [`STAT_BATCH`](crate::blobs::STAT_BATCH) at a
/// time, so, as for reads, this bounds the work of one request. Clients
/// split longer lists into several requests.
pub const MAX_STAT_BLOBS: usize = 1024;

/// Most digests one `MissingChunks` request may carry (about 2.2 MiB).
/// Clients split longer lists into several requests.
pub const MAX_MISSING_CHUNKS: usize = 65536;
