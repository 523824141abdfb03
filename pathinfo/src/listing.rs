//! NAR listings: the `.ls` files a binary cache serves beside its narinfos,
//! in the JSON format of Nix's `listNar` (`nix copy --to
//! 'file://…?write-nar-listing=true'`).
//!
//! ```text
//! listing = {"version":1,"root":entry}
//! entry   = {"type":"regular","size":N[,"executable":true][,"narOffset":N]}
//!         | {"type":"directory","entries":{"name":entry,…}}
//!         | {"type":"symlink","target":"…"}
//! ```
//!
//! `narOffset` is where the file's contents start in the NAR, which is what
//! lets a reader fetch one file with an HTTP Range request. Parsing is
//! strict, since listings come from caches we do not control: the input is
//! bounded ([`MAX_LISTING_SIZE`]), so is the nesting
//! ([`MAX_DIRECTORY_DEPTH`]), unknown or repeated keys are errors, and every
//! name and target is validated as castore validates them, so a listing can
//! never name `..`, `/` or an empty entry. [`Listing::to_json`] writes the
//! keys in the order Nix writes them, byte for byte.

use std::collections::BTreeMap;
use std::fmt;

use lazystore_castore::{PathComponent, SymlinkTarget};
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};

use crate::nar::{MAX_DIRECTORY_DEPTH, token};

/// Largest listing [`Listing::parse`] accepts. Nix's listing of a store path
/// with a million files is about 100 MiB; none we fetch comes near this.
pub const MAX_LISTING_SIZE: usize = 64 << 20;

/// The only listing format version there is.
pub const LISTING_VERSION: u64 = 1;

/// The listing of one NAR: its root node and, recursively, everything in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The store path's own node.
    pub root: ListingEntry,
}

/// One node of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListingEntry {
    /// A regular file.
    Regular {
        /// Length of the contents in bytes.
        size: u64,
        /// Whether the file has the executable bit.
        executable: bool,
        /// Where the contents start in the NAR, when the listing says.
        nar_offset: Option<u64>,
    },
    /// A directory and its entries, in bytewise name order (NAR order).
    Directory {
        /// The entries by name.
        entries: BTreeMap<PathComponent, ListingEntry>,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points.
        target: SymlinkTarget,
    },
}

/// Why a listing was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ListingError {
    /// The input is larger than [`MAX_LISTING_SIZE`].
    #[error("listing is {len} bytes, more than the {MAX_LISTING_SIZE} accepted")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// The input is not a listing: bad JSON, a missing, unknown or repeated
    /// key, a wrong version, an invalid name or target, or nesting deeper
    /// than [`MAX_DIRECTORY_DEPTH`]. The message says which, and where.
    #[error("invalid NAR listing")]
    Invalid(#[source] serde_json::Error),
}

impl Listing {
    /// Length of the NAR this listing describes, from the NAR grammar: a
    /// listing that does not add up to a narinfo's NarSize is not its NAR's.
    /// Saturates instead of overflowing.
    pub fn nar_size(&self) -> u64 {
        /// `str()` of `len` bytes: the length, the bytes, padding to 8.
        fn s(len: usize) -> u64 {
            8u64.saturating_add((len as u64).div_ceil(8).saturating_mul(8))
        }
        fn t(token: &[u8]) -> u64 {
            s(token.len())
        }
        fn node(e: &ListingEntry) -> u64 {
            let body = match e {
                ListingEntry::Regular {
                    size, executable, ..
                } => {
                    let x = if *executable {
                        t(token::EXECUTABLE) + s(0)
                    } else {
                        0
                    };
                    let contents = 8u64.saturating_add(size.div_ceil(8).saturating_mul(8));
                    (t(token::REGULAR) + x + t(token::CONTENTS)).saturating_add(contents)
                }
                ListingEntry::Symlink { target } => {
                    t(token::SYMLINK) + t(token::TARGET) + s(target.as_bytes().len())
                }
                ListingEntry::Directory { entries } => {
                    entries
                        .iter()
                        .fold(t(token::DIRECTORY), |total, (name, child)| {
                            total
                                .saturating_add(t(token::ENTRY) + t(token::OPEN) + t(token::NAME))
                                .saturating_add(s(name.as_bytes().len()))
                                .saturating_add(t(token::NODE))
                                .saturating_add(node(child))
                                .saturating_add(t(token::CLOSE))
                        })
                }
            };
            (t(token::OPEN) + t(token::TYPE))
                .saturating_add(body)
                .saturating_add(t(token::CLOSE))
        }
        t(token::MAGIC).saturating_add(node(&self.root))
    }

    /// Parses a `.ls` file.
    pub fn parse(bytes: &[u8]) -> Result<Listing, ListingError> {
        if bytes.len() > MAX_LISTING_SIZE {
            return Err(ListingError::TooLarge { len: bytes.len() });
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        // Nesting is bounded by our own depth count (directories, not JSON
        // levels), so serde_json's fixed limit of 128 levels, which a NAR at
        // the largest depth we accept would hit, is replaced by it.
        de.disable_recursion_limit();
        let listing = ListingSeed
            .deserialize(&mut de)
            .map_err(ListingError::Invalid)?;
        de.end().map_err(ListingError::Invalid)?;
        Ok(listing)
    }

    /// The listing as Nix writes it: compact JSON, keys in Nix's order.
    ///
    /// JSON strings are Unicode: a name or target that is not UTF-8 (which
    /// Nix cannot write a listing for either) is written with U+FFFD in
    /// place of the invalid bytes. [`Listing::parse`] of such output gives
    /// a different listing; producers that care check
    /// [`Listing::is_utf8`] first.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(br#"{"version":1,"root":"#);
        write_entry(&mut out, &self.root);
        out.push(b'}');
        out
    }

    /// Whether every name and target is UTF-8, so that [`Listing::to_json`]
    /// is exact.
    pub fn is_utf8(&self) -> bool {
        fn entry_is_utf8(entry: &ListingEntry) -> bool {
            match entry {
                ListingEntry::Regular { .. } => true,
                ListingEntry::Symlink { target } => std::str::from_utf8(target.as_bytes()).is_ok(),
                ListingEntry::Directory { entries } => entries.iter().all(|(name, entry)| {
                    std::str::from_utf8(name.as_bytes()).is_ok() && entry_is_utf8(entry)
                }),
            }
        }
        entry_is_utf8(&self.root)
    }

    /// The entry at `path` (`/`-separated, relative to the root; empty for
    /// the root itself), if the listing has one. Symlinks are not followed.
    pub fn get(&self, path: &[u8]) -> Option<&ListingEntry> {
        let mut entry = &self.root;
        for name in path.split(|&b| b == b'/').filter(|n| !n.is_empty()) {
            match entry {
                ListingEntry::Directory { entries } => entry = entries.get(name)?,
                _ => return None,
            }
        }
        Some(entry)
    }
}

fn write_entry(out: &mut Vec<u8>, entry: &ListingEntry) {
    match entry {
        ListingEntry::Regular {
            size,
            executable,
            nar_offset,
        } => {
            out.extend_from_slice(format!(r#"{{"type":"regular","size":{size}"#).as_bytes());
            if *executable {
                out.extend_from_slice(br#","executable":true"#);
            }
            if let Some(offset) = nar_offset {
                out.extend_from_slice(format!(r#","narOffset":{offset}"#).as_bytes());
            }
            out.push(b'}');
        }
        ListingEntry::Directory { entries } => {
            out.extend_from_slice(br#"{"type":"directory","entries":{"#);
            for (i, (name, entry)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(out, name.as_bytes());
                out.push(b':');
                write_entry(out, entry);
            }
            out.extend_from_slice(b"}}");
        }
        ListingEntry::Symlink { target } => {
            out.extend_from_slice(br#"{"type":"symlink","target":"#);
            write_string(out, target.as_bytes());
            out.push(b'}');
        }
    }
}

/// A JSON string, escaped as Nix escapes it (control characters as `\n`,
/// `\t`, … or `\u00XX`; everything else as is).
fn write_string(out: &mut Vec<u8>, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    serde_json::to_writer(&mut *out, text.as_ref()).expect("writing to a Vec cannot fail");
}

/// The top-level object: `version` and `root`, in any order, each once.
struct ListingSeed;

impl<'de> DeserializeSeed<'de> for ListingSeed {
    type Value = Listing;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Listing, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ListingSeed {
    type Value = Listing;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(r#"a NAR listing {"version":1,"root":…}"#)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Listing, A::Error> {
        let mut version = None;
        let mut root = None;
        while let Some(key) = map.next_key::<Key>()? {
            match key.0.as_str() {
                "version" => {
                    once(&version, "version")?;
                    let v: u64 = map.next_value()?;
                    if v != LISTING_VERSION {
                        return Err(de::Error::custom(format_args!(
                            "listing version {v}, only {LISTING_VERSION} is known"
                        )));
                    }
                    version = Some(v);
                }
                "root" => {
                    once(&root, "root")?;
                    root = Some(map.next_value_seed(EntrySeed { depth: 0 })?);
                }
                other => return Err(de::Error::unknown_field(other, &["version", "root"])),
            }
        }
        version.ok_or_else(|| de::Error::missing_field("version"))?;
        let root = root.ok_or_else(|| de::Error::missing_field("root"))?;
        Ok(Listing { root })
    }
}

/// An object key, owned (names may contain escapes).
struct Key(String);

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        String::deserialize(d).map(Key)
    }
}

fn once<T, E: de::Error>(slot: &Option<T>, key: &'static str) -> Result<(), E> {
    match slot {
        Some(_) => Err(E::duplicate_field(key)),
        None => Ok(()),
    }
}

/// One entry, `depth` directories below the top (the root entry is 0).
struct EntrySeed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for EntrySeed {
    type Value = ListingEntry;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<ListingEntry, D::Error> {
        d.deserialize_map(self)
    }
}

const ENTRY_KEYS: &[&str] = &[
    "type",
    "size",
    "executable",
    "narOffset",
    "entries",
    "target",
];

impl<'de> Visitor<'de> for EntrySeed {
    type Value = ListingEntry;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a listing entry {\"type\":…}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ListingEntry, A::Error> {
        let mut kind: Option<String> = None;
        let mut size: Option<u64> = None;
        let mut executable: Option<bool> = None;
        let mut nar_offset: Option<u64> = None;
        let mut entries = None;
        let mut target: Option<SymlinkTarget> = None;
        while let Some(key) = map.next_key::<Key>()? {
            match key.0.as_str() {
                "type" => {
                    once(&kind, "type")?;
                    kind = Some(map.next_value()?);
                }
                "size" => {
                    once(&size, "size")?;
                    size = Some(map.next_value()?);
                }
                "executable" => {
                    once(&executable, "executable")?;
                    executable = Some(map.next_value()?);
                }
                "narOffset" => {
                    once(&nar_offset, "narOffset")?;
                    nar_offset = Some(map.next_value()?);
                }
                "entries" => {
                    once(&entries, "entries")?;
                    entries = Some(map.next_value_seed(EntriesSeed {
                        depth: self.depth + 1,
                    })?);
                }
                "target" => {
                    once(&target, "target")?;
                    let text: String = map.next_value()?;
                    target =
                        Some(SymlinkTarget::try_from(text.as_bytes()).map_err(de::Error::custom)?);
                }
                other => return Err(de::Error::unknown_field(other, ENTRY_KEYS)),
            }
        }
        let kind = kind.ok_or_else(|| de::Error::missing_field("type"))?;
        let stray = |present: bool, key: &str| {
            if present {
                Err(de::Error::custom(format_args!(
                    "a {kind} entry has no \"{key}\""
                )))
            } else {
                Ok(())
            }
        };
        match kind.as_str() {
            "regular" => {
                stray(entries.is_some(), "entries")?;
                stray(target.is_some(), "target")?;
                Ok(ListingEntry::Regular {
                    size: size.ok_or_else(|| de::Error::missing_field("size"))?,
                    executable: executable.unwrap_or(false),
                    nar_offset,
                })
            }
            "directory" => {
                stray(size.is_some(), "size")?;
                stray(executable.is_some(), "executable")?;
                stray(nar_offset.is_some(), "narOffset")?;
                stray(target.is_some(), "target")?;
                Ok(ListingEntry::Directory {
                    entries: entries.ok_or_else(|| de::Error::missing_field("entries"))?,
                })
            }
            "symlink" => {
                stray(size.is_some(), "size")?;
                stray(executable.is_some(), "executable")?;
                stray(nar_offset.is_some(), "narOffset")?;
                stray(entries.is_some(), "entries")?;
                Ok(ListingEntry::Symlink {
                    target: target.ok_or_else(|| de::Error::missing_field("target"))?,
                })
            }
            other => Err(de::Error::unknown_variant(
                other,
                &["regular", "directory", "symlink"],
            )),
        }
    }
}

/// The `entries` of a directory that is `depth` directories deep (the root
/// directory is 1).
struct EntriesSeed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for EntriesSeed {
    type Value = BTreeMap<PathComponent, ListingEntry>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        if self.depth > MAX_DIRECTORY_DEPTH {
            return Err(de::Error::custom(format_args!(
                "directories nested more than {MAX_DIRECTORY_DEPTH} deep"
            )));
        }
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed {
    type Value = BTreeMap<PathComponent, ListingEntry>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("directory entries {\"name\":entry,…}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = BTreeMap::new();
        while let Some(Key(name)) = map.next_key::<Key>()? {
            let name = PathComponent::try_from(name.as_str()).map_err(de::Error::custom)?;
            let entry = map.next_value_seed(EntrySeed { depth: self.depth })?;
            if entries.insert(name.clone(), entry).is_some() {
                return Err(de::Error::custom(format_args!(
                    "entry {name:?} appears twice"
                )));
            }
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    use lazystore_testkit::{make_cache, nix_cmd};

    use super::*;

    /// Written by Nix 2.8 for a tree with a file, an empty directory, a
    /// symlink and an executable (`nix copy --to 'file://…?write-nar-listing=true'`).
    const NIX_LISTING: &str = r#"{"version":1,"root":{"type":"directory","entries":{"a":{"type":"regular","size":6,"narOffset":232},"empty":{"type":"directory","entries":{}},"sub":{"type":"directory","entries":{"l":{"type":"symlink","target":"../a"},"x":{"type":"regular","size":10,"executable":true,"narOffset":952}}}}}}"#;

    fn name(s: &str) -> PathComponent {
        PathComponent::try_from(s).unwrap()
    }

    fn dir(entries: impl IntoIterator<Item = (&'static str, ListingEntry)>) -> ListingEntry {
        ListingEntry::Directory {
            entries: entries.into_iter().map(|(n, e)| (name(n), e)).collect(),
        }
    }

    #[test]
    fn parses_and_writes_nix_listing() {
        let listing = Listing::parse(NIX_LISTING.as_bytes()).unwrap();
        let expected = Listing {
            root: dir([
                (
                    "a",
                    ListingEntry::Regular {
                        size: 6,
                        executable: false,
                        nar_offset: Some(232),
                    },
                ),
                ("empty", dir([])),
                (
                    "sub",
                    dir([
                        (
                            "l",
                            ListingEntry::Symlink {
                                target: SymlinkTarget::try_from(&b"../a"[..]).unwrap(),
                            },
                        ),
                        (
                            "x",
                            ListingEntry::Regular {
                                size: 10,
                                executable: true,
                                nar_offset: Some(952),
                            },
                        ),
                    ]),
                ),
            ]),
        };
        assert_eq!(listing, expected);
        assert!(listing.is_utf8());
        assert_eq!(String::from_utf8(listing.to_json()).unwrap(), NIX_LISTING);
        assert_eq!(listing.get(b"sub/x"), expected.get(b"/sub//x"));
        assert!(matches!(
            listing.get(b"sub/x"),
            Some(ListingEntry::Regular { size: 10, .. })
        ));
        assert_eq!(listing.get(b""), Some(&listing.root));
        assert_eq!(listing.get(b"a/b"), None);
        assert_eq!(listing.get(b"nope"), None);
    }

    #[test]
    fn key_order_and_optional_fields_are_free_when_parsing() {
        let listing =
            Listing::parse(br#" {"root":{"size":3,"type":"regular"} , "version":1 } "#).unwrap();
        let root = ListingEntry::Regular {
            size: 3,
            executable: false,
            nar_offset: None,
        };
        assert_eq!(listing.root, root);
        assert_eq!(
            listing.to_json(),
            br#"{"version":1,"root":{"type":"regular","size":3}}"#
        );
    }

    #[test]
    fn rejects_what_is_not_a_listing() {
        let cases: &[&str] = &[
            "",
            "[]",
            r#"{"version":1}"#,
            r#"{"root":{"type":"regular","size":1}}"#,
            r#"{"version":2,"root":{"type":"regular","size":1}}"#,
            r#"{"version":1,"version":1,"root":{"type":"regular","size":1}}"#,
            r#"{"version":1,"root":{"type":"regular","size":1},"extra":0}"#,
            r#"{"version":1,"root":{"type":"regular","size":1}} x"#,
            r#"{"version":1,"root":{"type":"regular"}}"#,
            r#"{"version":1,"root":{"type":"regular","size":-1}}"#,
            r#"{"version":1,"root":{"type":"regular","size":1,"size":1}}"#,
            r#"{"version":1,"root":{"type":"regular","size":1,"entries":{}}}"#,
            r#"{"version":1,"root":{"type":"regular","size":1,"mode":1}}"#,
            r#"{"version":1,"root":{"type":"fifo"}}"#,
            r#"{"version":1,"root":{"type":"directory"}}"#,
            r#"{"version":1,"root":{"type":"directory","entries":{},"size":0}}"#,
            r#"{"version":1,"root":{"type":"directory","entries":{"..":{"type":"regular","size":1}}}}"#,
            r#"{"version":1,"root":{"type":"directory","entries":{".":{"type":"regular","size":1}}}}"#,
            r#"{"version":1,"root":{"type":"directory","entries":{"a/b":{"type":"regular","size":1}}}}"#,
            r#"{"version":1,"root":{"type":"directory","entries":{"":{"type":"regular","size":1}}}}"#,
            r#"{"version":1,"root":{"type":"directory","entries":{"a\u0000":{"type":"regular","size":1}}}}"#,
            r#"{"version":1,"root":{"type":"directory","entries":{"a":{"type":"regular","size":1},"a":{"type":"regular","size":1}}}}"#,
            r#"{"version":1,"root":{"type":"symlink"}}"#,
            r#"{"version":1,"root":{"type":"symlink","target":""}}"#,
            r#"{"version":1,"root":{"type":"symlink","target":"a","size":1}}"#,
        ];
        for case in cases {
            let err = Listing::parse(case.as_bytes()).unwrap_err();
            assert!(matches!(err, ListingError::Invalid(_)), "{case}: {err}");
        }
        let long = format!(
            r#"{{"version":1,"root":{{"type":"directory","entries":{{"{}":{{"type":"regular","size":1}}}}}}}}"#,
            "n".repeat(256)
        );
        assert!(Listing::parse(long.as_bytes()).is_err());
    }

    fn nested(depth: usize) -> String {
        let mut json = String::from(r#"{"type":"regular","size":0}"#);
        for _ in 0..depth {
            json = format!(r#"{{"type":"directory","entries":{{"d":{json}}}}}"#);
        }
        format!(r#"{{"version":1,"root":{json}}}"#)
    }

    #[test]
    fn depth_is_bounded_as_nars_are() {
        let listing = Listing::parse(nested(MAX_DIRECTORY_DEPTH).as_bytes()).unwrap();
        assert_eq!(listing.to_json(), nested(MAX_DIRECTORY_DEPTH).as_bytes());
        let err = Listing::parse(nested(MAX_DIRECTORY_DEPTH + 1).as_bytes()).unwrap_err();
        assert!(format!("{:?}", err).contains("nested more than"), "{err:?}");
        // Far deeper input fails on the bound, not the stack.
        assert!(Listing::parse(nested(100_000).as_bytes()).is_err());
    }

    #[test]
    fn size_is_bounded() {
        let mut big = nested(1).into_bytes();
        big.resize(MAX_LISTING_SIZE + 1, b' ');
        assert!(matches!(
            Listing::parse(&big),
            Err(ListingError::TooLarge { .. })
        ));
    }

    #[test]
    fn non_utf8_names_are_flagged() {
        let listing = Listing {
            root: ListingEntry::Directory {
                entries: [(
                    PathComponent::try_from(&b"\xff"[..]).unwrap(),
                    ListingEntry::Regular {
                        size: 0,
                        executable: false,
                        nar_offset: None,
                    },
                )]
                .into(),
            },
        };
        assert!(!listing.is_utf8());
    }

    /// Real Nix writes the listings; ours must be the same bytes, escapes
    /// included (quotes, backslashes, control characters, DEL, non-ASCII).
    #[test]
    fn same_bytes_as_nix_writes() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path().join("t");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        let odd = OsStr::from_bytes("q\"b\\s\tt\x01u\x7fé✓\n".as_bytes());
        std::fs::write(root.join(odd), b"x").unwrap();
        std::fs::write(root.join("sub/deeper/big"), vec![7u8; 100_003]).unwrap();
        std::fs::write(root.join("sub/empty"), b"").unwrap();
        std::os::unix::fs::symlink("tgt\n\"x", root.join("link")).unwrap();
        let path = nix_cmd([
            OsStr::new("nix-store"),
            OsStr::new("--add"),
            root.as_os_str(),
        ]);
        let single = tree.path().join("single");
        std::fs::write(&single, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&single, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let single = nix_cmd([
            OsStr::new("nix-store"),
            OsStr::new("--add"),
            single.as_os_str(),
        ]);
        let cache = make_cache(&[path.trim(), single.trim()], "none", None);
        let mut seen = 0;
        for entry in std::fs::read_dir(cache.path()).unwrap() {
            let file = entry.unwrap().path();
            if file.extension() != Some(OsStr::new("ls")) {
                continue;
            }
            let bytes = std::fs::read(&file).unwrap();
            let listing =
                Listing::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e:?}", file.display()));
            assert!(listing.is_utf8());
            assert_eq!(
                String::from_utf8_lossy(&listing.to_json()),
                String::from_utf8_lossy(&bytes),
                "{}",
                file.display()
            );
            seen += 1;
        }
        assert_eq!(
            seen,
            2,
            "nix wrote no listings in {}",
            cache.path().display()
        );
    }
}
