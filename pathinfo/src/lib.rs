//! The Nix layer.

/// Wire types generated from `proto/pathinfo.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("lazystore.pathinfo.v1");
}
