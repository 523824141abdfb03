//! Access traces kept in the store, so that every builder benefits from the
//! first build (`mount --share-traces`): a builder's mount puts the trace
//! of each build it saw, under the build's name, and a mount that sees a
//! build of that name start fetches what the trace names ahead of it.
//!
//! A trace is keyed by the build's *name*: its output's name without the
//! version ([`build_name`]: `hello` for `/nix/store/…-hello-2.12`), so the
//! next version of a package finds the trace of the last one; builds of
//! one family read nearly the same files. A name holds one trace, the
//! latest put: the newest build is the best guess of the next.
//!
//! A trace is only a hint of what to fetch ahead. Every chunk it leads to
//! is checked against its digest as any read's, so a wrong or hostile
//! trace costs bandwidth and cache space, never a wrong byte; and puts
//! need what every other put of the store needs (a write token on a
//! server that has them). Bounds keep one trace from costing much:
//! [`MAX_FILES`] files, [`MAX_BYTES`] bytes of text, names as store path
//! names are.
//!
//! Backends: one per store backend ([`MemoryTraceService`],
//! [`RedbTraceService`], [`S3TraceService`], [`GrpcTraceService`] and its
//! server [`TraceServer`]); [`Store::traces`](crate::Store::traces) is the
//! one of the store opened.

mod grpc;
mod memory;
mod redb;
mod s3;

use async_trait::async_trait;
use lazystore_castore::{ErrorClass, Retryable};

pub use self::grpc::{GrpcTraceService, TraceServer};
pub use self::memory::MemoryTraceService;
pub use self::redb::RedbTraceService;
pub use self::s3::S3TraceService;

/// Most files a trace names: a build reading a whole 52,000-file toolchain
/// fits.
pub const MAX_FILES: usize = 200_000;

/// Most bytes of a trace's text (its files, one a line).
pub const MAX_BYTES: usize = 16 << 20;

/// Longest name, as Nix bounds a store path's name.
pub const MAX_NAME_LEN: usize = 211;

/// What a trace backend stores: one trace per build name.
#[async_trait]
pub trait TraceService: Send + Sync {
    /// The trace of the last build named `name`, if one was put.
    async fn get(&self, name: &str) -> Result<Option<Vec<String>>, TraceError>;

    /// Keeps `files` as the trace of builds named `name`, replacing the
    /// one before. Checked first ([`check`]).
    async fn put(&self, name: &str, files: &[String]) -> Result<(), TraceError>;
}

/// Why a trace could not be had or kept.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The name or the trace breaks a rule of [`check`].
    #[error("invalid trace: {0}")]
    Invalid(String),
    /// The backend, or the way to it, failed; classed by its source.
    #[error("trace store backend failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored trace does not decode.
    #[error("trace store holds a damaged trace for {name:?}")]
    Corrupt {
        /// The name it is stored under.
        name: String,
        /// Why it does not decode.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Retryable for TraceError {
    fn class(&self) -> ErrorClass {
        match self {
            TraceError::Invalid(_) => ErrorClass::Permanent,
            TraceError::Backend(source) => ErrorClass::of_backend(&**source),
            TraceError::Corrupt { .. } => ErrorClass::Corrupt,
        }
    }
}

/// The name builds of `output` (an output path, `/nix/store/<hash>-<name>`)
/// are traced under: its name up to the version, which starts at the
/// first `-` not followed by a letter, as Nix splits a derivation name
/// (`python3-3.12.1` → `python3`, `rust-toolchain` → `rust-toolchain`).
/// `None` if `output` is not a store path.
pub fn build_name(output: &str) -> Option<String> {
    let path = crate::StorePath::from_absolute_path(output).ok()?;
    let name = path.name();
    let bytes = name.as_bytes();
    let end = (0..bytes.len())
        .find(|&i| bytes[i] == b'-' && !bytes.get(i + 1).is_some_and(u8::is_ascii_alphabetic))
        .unwrap_or(bytes.len());
    (end > 0).then(|| name[..end].to_owned())
}

/// Checks a trace before it is kept or used: a name of 1 to
/// [`MAX_NAME_LEN`] characters of a store path name, at most
/// [`MAX_FILES`] files of at most [`MAX_BYTES`] in all, each an absolute
/// path under the store directory with no newline.
pub fn check(name: &str, files: &[String]) -> Result<(), TraceError> {
    let name_ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b));
    if !name_ok {
        return Err(TraceError::Invalid(format!(
            "{name:?} is not a build name (1 to {MAX_NAME_LEN} characters of a store path name)"
        )));
    }
    if files.len() > MAX_FILES {
        return Err(TraceError::Invalid(format!(
            "{} files, more than {MAX_FILES}",
            files.len()
        )));
    }
    let bytes: usize = files.iter().map(|f| f.len() + 1).sum();
    if bytes > MAX_BYTES {
        return Err(TraceError::Invalid(format!(
            "{bytes} bytes of paths, more than {MAX_BYTES}"
        )));
    }
    let store = format!("{}/", crate::STORE_DIR);
    if let Some(bad) = files
        .iter()
        .find(|f| !f.starts_with(&store) || f.contains('\n'))
    {
        return Err(TraceError::Invalid(format!(
            "{bad:?} is not a file under {}",
            crate::STORE_DIR
        )));
    }
    Ok(())
}

/// A trace as backends store it: its files one a line, zstd-compressed
/// (paths share long prefixes: a toolchain's 52,000 lines shrink about
/// twentyfold).
fn encode(files: &[String]) -> Vec<u8> {
    let text = files.join("\n");
    zstd::bulk::compress(text.as_bytes(), 3).expect("compressing into memory")
}

/// The files of a stored trace.
fn decode(name: &str, stored: &[u8]) -> Result<Vec<String>, TraceError> {
    let corrupt = |source: Box<dyn std::error::Error + Send + Sync>| TraceError::Corrupt {
        name: name.to_owned(),
        source,
    };
    let text = zstd::bulk::decompress(stored, MAX_BYTES).map_err(|e| corrupt(Box::new(e)))?;
    let text = String::from_utf8(text).map_err(|e| corrupt(Box::new(e)))?;
    let files: Vec<String> = text
        .split('\n')
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    check(name, &files).map_err(|e| corrupt(Box::new(e)))?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_drop_the_hash_and_the_version() {
        let p = |name: &str| format!("/nix/store/7rjj86a15146cq1d7sbfqbhb9ml0mbyl-{name}");
        assert_eq!(build_name(&p("hello-2.12")).as_deref(), Some("hello"));
        assert_eq!(build_name(&p("python3-3.12.1")).as_deref(), Some("python3"));
        assert_eq!(
            build_name(&p("rust-toolchain")).as_deref(),
            Some("rust-toolchain")
        );
        assert_eq!(
            build_name(&p("foo-bar-1.0-dev")).as_deref(),
            Some("foo-bar")
        );
        assert_eq!(build_name("/tmp/x-hello"), None);
        assert_eq!(build_name("/nix/store/short-hello"), None);
    }

    #[test]
    fn checks_refuse_what_is_not_a_trace() {
        let ok = vec!["/nix/store/7rjj86a15146cq1d7sbfqbhb9ml0mbyl-a/b".to_owned()];
        check("hello", &ok).unwrap();
        for name in ["", "../x", "a/b", "a b", ".hidden", &"x".repeat(212)] {
            assert!(check(name, &ok).is_err(), "{name:?}");
        }
        for files in [
            vec!["/etc/passwd".to_owned()],
            vec!["/nix/store/a\nb".to_owned()],
            vec!["/nix/store/x".to_owned(); MAX_FILES + 1],
        ] {
            assert!(matches!(
                check("hello", &files),
                Err(TraceError::Invalid(_))
            ));
        }
    }

    #[test]
    fn stored_traces_round_trip_and_damage_is_reported() {
        let files = vec![
            "/nix/store/7rjj86a15146cq1d7sbfqbhb9ml0mbyl-a/b".to_owned(),
            "/nix/store/7rjj86a15146cq1d7sbfqbhb9ml0mbyl-a/c d".to_owned(),
        ];
        let stored = encode(&files);
        assert_eq!(decode("hello", &stored).unwrap(), files);
        let mut bad = stored.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(matches!(
            decode("hello", &bad),
            Err(TraceError::Corrupt { .. })
        ));
        assert!(matches!(
            decode("hello", &encode(&["/etc/passwd".to_owned()])),
            Err(TraceError::Corrupt { .. })
        ));
    }
}
