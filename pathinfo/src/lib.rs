//! The Nix layer.

pub mod compact;
pub mod decompress;
pub mod fsck;
pub mod gc;
pub mod ingest;
pub mod listing;
pub mod nar;
mod nar_roots;
pub mod pathinfos;
pub mod prefetch;
pub mod publish;
pub mod render;
pub mod stats;
mod store;
pub mod substitute;
pub mod traces;

mod narinfo;
pub mod nixbase32;
mod signature;
mod store_path;
mod wanted;
mod whole;

pub use nar_roots::{NarRoots, NarRootsError};
pub use narinfo::{
    Compression, FieldError, HashError, MAX_NARINFO_SIZE, NarInfo, NarInfoError, format_sha256,
    parse_sha256,
};
pub use signature::{
    KeyError, PUBLIC_KEY_LEN, PublicKey, SECRET_KEY_LEN, SIGNATURE_LEN, Signature, SignatureError,
    SigningKey, VerifyError, fingerprint,
};
pub use store::{
    BlobLayer, LAZYSTORE_CA_FILE, LAZYSTORE_DIR, LAZYSTORE_TOKEN_FILE, LocalCache, OpenStoreError,
    SERVER_WAIT, Store, StoreOptions, default_cache_url, default_store_url, grpc_https_url,
    grpc_tcp_url, grpc_unix_url, is_ephemeral, is_remote, is_s3,
};
pub use store_path::{
    ENCODED_STORE_PATH_HASH_LEN, MAX_NAME_LEN, STORE_DIR, STORE_PATH_HASH_LEN, StorePath,
    StorePathError, StorePathHash, StorePathHashLenError,
};
pub use wanted::Wanted;
pub use whole::{CheckError, Missing};

/// Wire types generated from `proto/pathinfo.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("lazystore.pathinfo.v1");
}
