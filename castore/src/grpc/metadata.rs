//! The error metadata of a `tonic::Status`: the keys and their encoding,
//! for every service's mapping between its errors and statuses (the
//! castore's in `status`, the PathInfo service's in `pathinfo`).
//!
//! A status that a client should turn back into a typed error carries the
//! variant's name under [`KIND`] (each service names its own variants) and
//! the variant's fields under the other keys, as text (`-bin` keys as
//! bytes). A status without [`KIND`], or with fields a client cannot read,
//! stays an untyped failure naming the server.

use std::error::Error;
use std::str::FromStr;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::error_chain;

/// The variant: a name from the service's own vocabulary.
pub const KIND: &str = "lazystore-error";
/// A BLAKE3 digest (hex): the chunk, blob or directory concerned.
pub const DIGEST: &str = "lazystore-digest";
/// The digest of the directory that names a missing or mis-sized child.
pub const PARENT: &str = "lazystore-parent";
/// The name of that child, as bytes (names need not be UTF-8).
pub const CHILD: &str = "lazystore-child-bin";
/// A size as recorded (in a chunk list, a directory entry or a root node).
pub const RECORDED: &str = "lazystore-recorded";
/// The size actually found.
pub const ACTUAL: &str = "lazystore-actual";
/// Why data was refused, one of the service's known reasons.
pub const REASON: &str = "lazystore-reason";
/// A store path (its basename).
pub const STORE_PATH: &str = "lazystore-store-path";

/// A status carrying `err`'s message (with its causes) and, if `kind` is
/// given, the metadata a client needs to rebuild it.
pub struct ErrorStatus(Status);

impl ErrorStatus {
    /// A status of `code` for `err`, its variant named `kind`.
    pub fn new(code: Code, err: &dyn Error, kind: Option<&'static str>) -> Self {
        let mut status = Status::new(code, error_chain(err));
        if let Some(kind) = kind {
            status
                .metadata_mut()
                .insert(KIND, MetadataValue::from_static(kind));
        }
        ErrorStatus(status)
    }

    /// With the field `key` (a text key) set to `value`; a value that is
    /// not valid metadata text is left out.
    pub fn field(mut self, key: &'static str, value: impl ToString) -> Self {
        if let Ok(v) = MetadataValue::try_from(value.to_string()) {
            self.0.metadata_mut().insert(key, v);
        }
        self
    }

    /// With the binary field `key` (a `-bin` key) set to `bytes`.
    pub fn bytes(mut self, key: &'static str, bytes: &[u8]) -> Self {
        self.0
            .metadata_mut()
            .insert_bin(key, MetadataValue::from_bytes(bytes));
        self
    }

    /// The status.
    pub fn into_status(self) -> Status {
        self.0
    }
}

/// The variant a status names, if it names one.
pub fn kind(m: &MetadataMap) -> Option<&str> {
    m.get(KIND)?.to_str().ok()
}

/// The text field `key`, parsed.
pub fn field<T: FromStr>(m: &MetadataMap, key: &'static str) -> Option<T> {
    m.get(key)?.to_str().ok()?.parse().ok()
}

/// The binary field `key`.
pub fn bytes(m: &MetadataMap, key: &'static str) -> Option<Vec<u8>> {
    Some(m.get_bin(key)?.to_bytes().ok()?.to_vec())
}
