//! PathInfos over gRPC: [`PathInfoServer`], the server side, which a
//! castore server runs beside the blob and directory services; and
//! [`GrpcPathInfoService`], the client, a backend like any other, sharing
//! the castore clients' [`Connection`] and retry policy. Errors cross the
//! wire through the one mapping in `status.rs`.
//!
//! [`Connection`]: lazystore_castore::grpc::Connection

mod client;
mod server;
mod status;

pub use client::GrpcPathInfoService;
pub use server::{PathInfoServer, REPLACE};

/// Largest PathInfo message either side encodes or decodes. A PathInfo is
/// small (a store path's references and signatures: a few KiB, rarely
/// more); 16 MiB holds some 200 000 references, and anything larger is
/// refused before it is allocated.
pub const MAX_PATH_INFO_SIZE: usize = 16 * 1024 * 1024;
