//! The content-addressed store.

/// Wire types generated from `proto/castore.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("lazystore.castore.v1");
}
