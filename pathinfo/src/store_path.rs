//! Store paths: the `<hash>-<name>` entries of `/nix/store`, validated the way Nix
//! validates them, so that no invalid name or hash is representable past parsing.
//!
//! A basename is 32 nixbase32 characters (a 20-byte hash), a `-`, and a name of 1
//! to 211 characters from `[0-9a-zA-Z+-._?=]`. Current Nix also rejects the names
//! `.` and `..` and names whose first dash-separated component is `.` or `..`
//! (`.-foo`, `..-foo`), because such a basename could be mistaken for a path
//! component; Nix 2.8 still accepts them, but no store path of that form is valid
//! for the Nix of today, so we reject them too.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::nixbase32::{self, Nixbase32Error};

/// The store directory lazystore serves; paths in narinfo files are absolute under it.
pub const STORE_DIR: &str = "/nix/store";

/// Bytes in a store path hash (not to be confused with castore's 32-byte
/// BLAKE3 `DIGEST_LEN`).
pub const STORE_PATH_HASH_LEN: usize = 20;

/// Characters in the nixbase32 form of a store path hash.
pub const ENCODED_STORE_PATH_HASH_LEN: usize = nixbase32::encoded_len(STORE_PATH_HASH_LEN);

/// Longest name Nix accepts: 255 (the usual file name limit) minus the hash and dash.
pub const MAX_NAME_LEN: usize = 211;

/// Why a string is not a store path, a store path hash or a store path name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StorePathError {
    /// The hash part is not 32 nixbase32 characters.
    #[error("invalid store path hash")]
    InvalidHash(#[source] Nixbase32Error),
    /// The basename is too short to hold a hash, a dash and a name.
    #[error("store path basename is {len} bytes, too short for `<hash>-<name>`")]
    TooShort {
        /// Length of the basename in bytes.
        len: usize,
    },
    /// The character after the 32-character hash is not `-`.
    #[error("expected '-' after the store path hash, found {found:?}")]
    MissingDash {
        /// The character found instead.
        found: char,
    },
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("store path name is {len} bytes, more than the {MAX_NAME_LEN} allowed")]
    NameTooLong {
        /// Length of the name in bytes.
        len: usize,
    },
    /// The name is empty (only reachable through [`StorePath::from_parts`]).
    #[error("store path name is empty")]
    EmptyName,
    /// The name holds a character outside `[0-9a-zA-Z+-._?=]`.
    #[error("invalid character {found:?} at position {position} of the store path name")]
    InvalidNameCharacter {
        /// Offset of the character in the name, in bytes.
        position: usize,
        /// The character.
        found: char,
    },
    /// The name is `.` or `..`, or its first dash-separated component is.
    #[error("store path name must not be `.` or `..` or start with `.-` or `..-`")]
    DotName,
    /// An absolute path is not directly inside [`STORE_DIR`].
    #[error("path is not directly inside {STORE_DIR}")]
    NotInStoreDir,
}

/// The 20-byte hash part of a store path: what stores key PathInfos by
/// (not to be confused with a 32-byte BLAKE3 content [`Digest`]).
///
/// [`Digest`]: lazystore_castore::Digest
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePathHash([u8; STORE_PATH_HASH_LEN]);

impl StorePathHash {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; STORE_PATH_HASH_LEN] {
        &self.0
    }
}

impl From<[u8; STORE_PATH_HASH_LEN]> for StorePathHash {
    fn from(bytes: [u8; STORE_PATH_HASH_LEN]) -> Self {
        StorePathHash(bytes)
    }
}

/// Bytes that are not a store path hash: not [`STORE_PATH_HASH_LEN`] long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{len} bytes, not {STORE_PATH_HASH_LEN}")]
pub struct StorePathHashLenError {
    /// The length found.
    pub len: usize,
}

impl TryFrom<&[u8]> for StorePathHash {
    type Error = StorePathHashLenError;

    /// The hash in raw bytes, as on the wire (`GetPathInfoRequest.hash`).
    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        <[u8; STORE_PATH_HASH_LEN]>::try_from(bytes)
            .map(StorePathHash)
            .map_err(|_| StorePathHashLenError { len: bytes.len() })
    }
}

impl fmt::Display for StorePathHash {
    /// The 32 nixbase32 characters of a basename.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&nixbase32::encode(&self.0))
    }
}

impl fmt::Debug for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePathHash({self})")
    }
}

/// A store path: a 20-byte hash and a validated name.
///
/// Ordered like Nix orders store paths (by the basename as a string), which is
/// the order of `References` in narinfo files and of the signature fingerprint.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StorePath {
    hash: StorePathHash,
    name: Box<str>,
}

impl StorePath {
    /// Builds a store path from a hash and a name, checking the name.
    pub fn from_parts(hash: StorePathHash, name: &str) -> Result<Self, StorePathError> {
        check_name(name)?;
        Ok(Self {
            hash,
            name: name.into(),
        })
    }

    /// Parses a basename, `<32 nixbase32 chars>-<name>`, as found in `References`.
    pub fn from_basename(basename: &str) -> Result<Self, StorePathError> {
        let bytes = basename.as_bytes();
        if bytes.len() < ENCODED_STORE_PATH_HASH_LEN + 2 {
            return Err(StorePathError::TooShort { len: bytes.len() });
        }
        let hash = parse_hash_bytes(&bytes[..ENCODED_STORE_PATH_HASH_LEN])?;
        if bytes[ENCODED_STORE_PATH_HASH_LEN] != b'-' {
            // Slicing a &str there could split a UTF-8 sequence; take the char instead.
            let found = basename[ENCODED_STORE_PATH_HASH_LEN..]
                .chars()
                .next()
                .unwrap_or('\0');
            return Err(StorePathError::MissingDash { found });
        }
        Self::from_parts(hash, &basename[ENCODED_STORE_PATH_HASH_LEN + 1..])
    }

    /// Parses an absolute path, `/nix/store/<basename>`, as found in `StorePath`.
    /// Nothing may follow the basename: not a subpath, not a trailing slash.
    pub fn from_absolute_path(path: &str) -> Result<Self, StorePathError> {
        let basename = path
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|rest| !rest.contains('/'))
            .ok_or(StorePathError::NotInStoreDir)?;
        Self::from_basename(basename)
    }

    /// The hash part, as stores key it.
    pub fn hash(&self) -> StorePathHash {
        self.hash
    }

    /// The name after the dash.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The hash in nixbase32, as it appears in the basename and in narinfo file names.
    pub fn hash_str(&self) -> String {
        self.hash.to_string()
    }

    /// The absolute path, `/nix/store/<basename>`.
    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{self}")
    }

    /// Whether this is the path of a derivation (`.drv`).
    pub fn is_derivation(&self) -> bool {
        self.name.ends_with(".drv")
    }

    /// Parses a bare store path hash: the 32 nixbase32 characters of a basename or
    /// of a `<hash>.narinfo` file name.
    pub fn parse_hash(hash: &str) -> Result<StorePathHash, StorePathError> {
        parse_hash_bytes(hash.as_bytes())
    }

    /// Checks a store path name against Nix's rules (see the module documentation).
    pub fn validate_name(name: &str) -> Result<(), StorePathError> {
        check_name(name)
    }

    /// The nixbase32 hash without allocating, for comparisons.
    fn hash_array(&self) -> [u8; ENCODED_STORE_PATH_HASH_LEN] {
        let mut out = [0; ENCODED_STORE_PATH_HASH_LEN];
        let mut at = 0;
        nixbase32::encode_with(self.hash.as_bytes(), |c| {
            out[at] = c;
            at += 1;
        });
        out
    }
}

fn parse_hash_bytes(hash: &[u8]) -> Result<StorePathHash, StorePathError> {
    nixbase32::decode_fixed(hash)
        .map(StorePathHash)
        .map_err(StorePathError::InvalidHash)
}

fn check_name(name: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong { len: name.len() });
    }
    let first_component = name.split('-').next().unwrap_or(name);
    if first_component == "." || first_component == ".." {
        return Err(StorePathError::DotName);
    }
    let valid = |c: char| c.is_ascii_alphanumeric() || "+-._?=".contains(c);
    match name.char_indices().find(|&(_, c)| !valid(c)) {
        Some((position, found)) => Err(StorePathError::InvalidNameCharacter { position, found }),
        None => Ok(()),
    }
}

impl fmt::Display for StorePath {
    /// Writes the basename, `<hash>-<name>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hash = self.hash_array();
        // The alphabet is ASCII, so this cannot fail.
        let hash = std::str::from_utf8(&hash).map_err(|_| fmt::Error)?;
        write!(f, "{hash}-{}", self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;

    /// Parses a basename; use [`StorePath::from_absolute_path`] for `/nix/store/…`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_basename(s)
    }
}

impl Ord for StorePath {
    fn cmp(&self, other: &Self) -> Ordering {
        // Nix compares basename strings; nixbase32 does not preserve byte order, so
        // compare the encoded hashes, then the names (the dash is common to both).
        self.hash_array()
            .cmp(&other.hash_array())
            .then_with(|| self.name.cmp(&other.name))
    }
}

impl PartialOrd for StorePath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "qdbvz8kr5favd6rq5fpqb84n3yjbr87y";

    #[test]
    fn parses_and_prints_basenames_and_absolute_paths() {
        let p = StorePath::from_basename(&format!("{HASH}-hello-2.12.1")).unwrap();
        assert_eq!(p.name(), "hello-2.12.1");
        assert_eq!(p.hash_str(), HASH);
        assert_eq!(p.to_string(), format!("{HASH}-hello-2.12.1"));
        assert_eq!(p.to_absolute(), format!("/nix/store/{HASH}-hello-2.12.1"));
        assert_eq!(StorePath::from_absolute_path(&p.to_absolute()).unwrap(), p);
        assert_eq!(p.to_string().parse::<StorePath>().unwrap(), p);
        assert_eq!(nixbase32::encode(p.hash().as_bytes()), HASH);
        assert_eq!(p.hash().to_string(), HASH);
        assert_eq!(StorePath::from_parts(p.hash(), p.name()).unwrap(), p);
        assert!(!p.is_derivation());
        assert!(
            StorePath::from_basename(&format!("{HASH}-a.drv"))
                .unwrap()
                .is_derivation()
        );
    }

    /// Name rule table: (name, accepted). Nix 2.8 agrees on every row except the
    /// dot rows, which it accepts and current Nix rejects.
    #[test]
    fn name_rules() {
        let max = "x".repeat(MAX_NAME_LEN);
        let too_long = "x".repeat(MAX_NAME_LEN + 1);
        let table: &[(&str, Result<(), StorePathError>)] = &[
            ("a", Ok(())),
            ("hello-2.12.1", Ok(())),
            ("a?=+_.-", Ok(())),
            ("ABCxyz0189", Ok(())),
            (".foo", Ok(())),
            ("..foo", Ok(())),
            ("...", Ok(())),
            ("...-foo", Ok(())),
            ("foo-.", Ok(())),
            ("foo-..", Ok(())),
            ("-", Ok(())),
            ("-.", Ok(())),
            (&max, Ok(())),
            ("", Err(StorePathError::EmptyName)),
            (
                &too_long,
                Err(StorePathError::NameTooLong {
                    len: MAX_NAME_LEN + 1,
                }),
            ),
            (".", Err(StorePathError::DotName)),
            ("..", Err(StorePathError::DotName)),
            (".-foo", Err(StorePathError::DotName)),
            ("..-foo", Err(StorePathError::DotName)),
            (".-", Err(StorePathError::DotName)),
            (
                "a b",
                Err(StorePathError::InvalidNameCharacter {
                    position: 1,
                    found: ' ',
                }),
            ),
            (
                "a/b",
                Err(StorePathError::InvalidNameCharacter {
                    position: 1,
                    found: '/',
                }),
            ),
            (
                "a:b",
                Err(StorePathError::InvalidNameCharacter {
                    position: 1,
                    found: ':',
                }),
            ),
            (
                "a\nb",
                Err(StorePathError::InvalidNameCharacter {
                    position: 1,
                    found: '\n',
                }),
            ),
            (
                "ab~",
                Err(StorePathError::InvalidNameCharacter {
                    position: 2,
                    found: '~',
                }),
            ),
            (
                "é",
                Err(StorePathError::InvalidNameCharacter {
                    position: 0,
                    found: 'é',
                }),
            ),
        ];
        for (name, expected) in table {
            assert_eq!(&StorePath::validate_name(name), expected, "name {name:?}");
            let parsed = StorePath::from_basename(&format!("{HASH}-{name}")).map(|_| ());
            let expected = match expected {
                // An empty name makes the basename too short before the name is looked at.
                Err(StorePathError::EmptyName) => Err(StorePathError::TooShort { len: 33 }),
                other => other.clone(),
            };
            assert_eq!(parsed, expected, "basename with name {name:?}");
        }
    }

    #[test]
    fn hash_rules() {
        assert_eq!(
            StorePath::from_basename("qdbvz8kr5favd6rq5fpqb84n3yjbr87e-foo"),
            Err(StorePathError::InvalidHash(
                Nixbase32Error::InvalidCharacter {
                    position: 31,
                    byte: 'e'
                }
            ))
        );
        assert!(matches!(
            StorePath::from_basename("QDBVZ8KR5FAVD6RQ5FPQB84N3YJBR87Y-foo"),
            Err(StorePathError::InvalidHash(
                Nixbase32Error::InvalidCharacter { .. }
            ))
        ));
        assert_eq!(
            StorePath::from_basename(HASH),
            Err(StorePathError::TooShort { len: 32 })
        );
        assert_eq!(
            StorePath::from_basename(&format!("{HASH}_foo")),
            Err(StorePathError::MissingDash { found: '_' })
        );
        assert_eq!(
            StorePath::from_basename(&format!("{HASH}éfoo")),
            Err(StorePathError::MissingDash { found: 'é' })
        );
        assert_eq!(
            StorePath::from_basename("qdbvz8kr5favd6rq5fpqb84n3yjbr87-foo"),
            Err(StorePathError::InvalidHash(
                Nixbase32Error::InvalidCharacter {
                    position: 31,
                    byte: '-'
                }
            ))
        );
        assert_eq!(
            StorePath::parse_hash(HASH).map(|h| h.to_string()),
            Ok(HASH.to_owned())
        );
        assert_eq!(
            StorePath::parse_hash(&HASH[1..]),
            Err(StorePathError::InvalidHash(Nixbase32Error::WrongLength {
                expected: 32,
                actual: 31
            }))
        );
    }

    #[test]
    fn hash_from_wire_bytes() {
        let hash = StorePath::parse_hash(HASH).unwrap();
        assert_eq!(StorePathHash::try_from(&hash.as_bytes()[..]), Ok(hash));
        assert_eq!(
            StorePathHash::try_from(&hash.as_bytes()[1..]),
            Err(StorePathHashLenError { len: 19 })
        );
        assert_eq!(
            StorePathHash::try_from(&[0u8; 32][..])
                .unwrap_err()
                .to_string(),
            "32 bytes, not 20"
        );
    }

    #[test]
    fn absolute_path_rules() {
        let ok = format!("/nix/store/{HASH}-foo");
        assert!(StorePath::from_absolute_path(&ok).is_ok());
        for bad in [
            format!("/nix/store/{HASH}-foo/"),
            format!("/nix/store/{HASH}-foo/bin/foo"),
            format!("/nix/store//{HASH}-foo"),
            format!("/nix/storex/{HASH}-foo"),
            format!("/gnu/store/{HASH}-foo"),
            format!("nix/store/{HASH}-foo"),
            format!("{HASH}-foo"),
        ] {
            assert_eq!(
                StorePath::from_absolute_path(&bad),
                Err(StorePathError::NotInStoreDir),
                "{bad}"
            );
        }
        assert_eq!(
            StorePath::from_absolute_path("/nix/store/"),
            Err(StorePathError::TooShort { len: 0 })
        );
    }

    #[test]
    fn orders_like_nix_by_basename_string() {
        // Byte order of the hashes disagrees with the string order of their encodings:
        // hash 00..01 encodes as "008…", hash ff00..00 as "…7z".
        let mut low_bit = [0u8; STORE_PATH_HASH_LEN];
        low_bit[STORE_PATH_HASH_LEN - 1] = 1;
        let mut high_first = [0u8; STORE_PATH_HASH_LEN];
        high_first[0] = 0xff;
        let a = StorePath::from_parts(low_bit.into(), "a").unwrap();
        let b = StorePath::from_parts(high_first.into(), "a").unwrap();
        assert!(a.hash() < b.hash());
        assert!(a > b, "{a} sorts after {b} as a string");
        assert_eq!(a.cmp(&b), a.to_string().cmp(&b.to_string()));
        let mut paths = [
            StorePath::from_basename(&format!("{HASH}-b")).unwrap(),
            StorePath::from_basename(&format!("{HASH}-a")).unwrap(),
            a.clone(),
            b.clone(),
        ];
        paths.sort();
        let strings: Vec<String> = paths.iter().map(ToString::to_string).collect();
        let mut sorted = strings.clone();
        sorted.sort();
        assert_eq!(strings, sorted);
    }
}
