//! A lazystore served as a Nix binary cache over HTTP, for clients without
//! FUSE: `nix copy --from http://…`, `nix store ls|cat --store http://…`,
//! substituters.
//!
//! Nothing is stored twice: a narinfo is written from the PathInfo on each
//! request (upstream signatures kept, ours added with a signing key), a NAR
//! is rendered from the chunk store as it streams, and a Range request on an
//! uncompressed NAR seeks: the NAR's layout comes from the directories alone
//! ([`lazystore_pathinfo::render::nar_layout`], cached), so only the chunks
//! of the files the range overlaps are read. `.ls` listings come from the
//! same walk.
//!
//! Tokens guard reads and writes as the gRPC server's do (the same token
//! files): a request without the token it needs is refused with 401, one
//! with a wrong token with 403; `nix-cache-info` stays open.
//!
//! With uploads enabled and a token, `nix copy --to http://…` works too:
//! each NAR is ingested as it arrives and staged under its URL until its
//! narinfo comes; the PathInfo is published only once the narinfo's NarHash
//! and NarSize match what was ingested (`docs/design.md`, "HTTP binary
//! cache", has the trade-offs).
//!
//! ```text
//! GET  /nix-cache-info                      StoreDir, WantMassQuery, Priority
//! GET  /<hash>.narinfo                      from the PathInfo, signed
//! GET  /<hash>.ls                           listing with narOffsets
//! GET  /nar/<hash>-<narhash>.nar            the NAR; Range requests seek
//! GET  /nar/<hash>-<narhash>.nar.zst        the NAR, zstd-compressed
//! PUT  /nar/<anything>.nar[.xz|.zst|…]      upload: ingest and stage
//! PUT  /<hash>.narinfo                      upload: verify and publish
//! ```
//!
//! HEAD works wherever GET does, with the same status. Requests in flight
//! are bounded (a request holds its slot until its body is sent, or its
//! client has read nothing for [`SEND_TIMEOUT`], when the connection is
//! closed); each is logged when it ends (target `lazystore::http`, level
//! info).

mod auth;
mod body;
mod conn;
mod error;
mod layouts;
mod nar;
mod narinfo;
mod range;
mod server;
mod upload;

pub use conn::TLS_HANDSHAKE_TIMEOUT;
pub use narinfo::NarCompression;
pub use server::{
    DEFAULT_MAX_REQUESTS, DEFAULT_PRIORITY, HttpCache, Options, SEND_TIMEOUT, serve, serve_tls,
    serve_with_send_timeout,
};
