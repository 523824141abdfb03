//! The validated data model: entry names, symlink targets, nodes and
//! directories, and their conversion from and to the wire types in
//! [`crate::proto`].
//!
//! A value of these types is valid by construction: names and targets are
//! checked when made, and a [`Directory`] keeps its entries unique and in
//! bytewise order. Wire values become domain values only through `TryFrom`,
//! so nothing past that boundary has to check again.

use std::collections::BTreeMap;
use std::collections::btree_map;
use std::fmt;

use bytes::Bytes;
use prost::Message;

use crate::digest::{Digest, InvalidDigest};
use crate::proto;

/// Longest entry name, as on Linux filesystems (`NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target (`PATH_MAX` minus the terminating NUL).
pub const MAX_TARGET_LEN: usize = 4095;

/// Why an entry name is not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("empty")]
    Empty,
    /// The name is `.` or `..`, which every directory has implicitly.
    #[error("is . or ..")]
    Dot,
    /// The name contains `/`, so it would be a path, not a name.
    #[error("contains /")]
    Slash,
    /// The name contains a NUL byte, which no file system name can.
    #[error("contains NUL")]
    Nul,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("{len} bytes long, more than {MAX_NAME_LEN}")]
    TooLong {
        /// Its length.
        len: u64,
    },
}

/// Why a symlink target is not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The target is empty.
    #[error("empty")]
    Empty,
    /// The target contains a NUL byte.
    #[error("contains NUL")]
    Nul,
    /// The target is longer than [`MAX_TARGET_LEN`] bytes.
    #[error("{len} bytes long, more than {MAX_TARGET_LEN}")]
    TooLong {
        /// Its length.
        len: u64,
    },
}

/// Checks an entry name: the rules Nix's NAR format and castore share.
pub fn validate_name(name: &[u8]) -> Result<(), NameError> {
    match name {
        [] => Err(NameError::Empty),
        b"." | b".." => Err(NameError::Dot),
        _ if name.len() > MAX_NAME_LEN => Err(NameError::TooLong {
            len: name.len() as u64,
        }),
        _ if name.contains(&b'/') => Err(NameError::Slash),
        _ if name.contains(&0) => Err(NameError::Nul),
        _ => Ok(()),
    }
}

/// Checks a symlink target: what a Linux `symlink(2)` could have created.
pub fn validate_target(target: &[u8]) -> Result<(), TargetError> {
    if target.is_empty() {
        Err(TargetError::Empty)
    } else if target.len() > MAX_TARGET_LEN {
        Err(TargetError::TooLong {
            len: target.len() as u64,
        })
    } else if target.contains(&0) {
        Err(TargetError::Nul)
    } else {
        Ok(())
    }
}

/// Why a wire value is not a valid domain value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidateError {
    /// An entry name breaks the naming rules.
    #[error("invalid entry name {name:?}: {reason}")]
    InvalidName {
        /// The offending name, lossily decoded.
        name: String,
        /// Which rule it breaks.
        reason: NameError,
    },
    /// A symlink target breaks the target rules.
    #[error("invalid symlink target {target:?}: {reason}")]
    InvalidTarget {
        /// The offending target, lossily decoded.
        target: String,
        /// Which rule it breaks.
        reason: TargetError,
    },
    /// A digest field is not 32 bytes.
    #[error("entry {name:?}: {source}")]
    InvalidDigest {
        /// The entry holding it ("" for a root node).
        name: String,
        /// The length error.
        #[source]
        source: InvalidDigest,
    },
    /// Entries of one list are not strictly ascending.
    #[error("entries not strictly sorted: {name:?} follows {previous:?}")]
    NotSorted {
        /// The entry that came too early.
        name: String,
        /// The entry before it.
        previous: String,
    },
    /// The same name appears in two lists.
    #[error("duplicate entry name {name:?}")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },
    /// A `Node` message with no variant set.
    #[error("node has no type")]
    EmptyNode,
    /// Directory sizes add up beyond `u64`.
    #[error("directory size overflows")]
    SizeOverflow,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One name in a directory: non-empty, at most 255 bytes, no `/`, no NUL,
/// not `.` or `..`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathComponent(Bytes);

impl PathComponent {
    /// The raw bytes of the name.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The name as `Bytes` (a cheap clone).
    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }
}

impl TryFrom<Bytes> for PathComponent {
    type Error = ValidateError;
    fn try_from(name: Bytes) -> Result<Self, Self::Error> {
        match validate_name(&name) {
            Ok(()) => Ok(PathComponent(name)),
            Err(reason) => Err(ValidateError::InvalidName {
                name: lossy(&name),
                reason,
            }),
        }
    }
}

impl TryFrom<&[u8]> for PathComponent {
    type Error = ValidateError;
    fn try_from(name: &[u8]) -> Result<Self, Self::Error> {
        PathComponent::try_from(Bytes::copy_from_slice(name))
    }
}

impl TryFrom<&str> for PathComponent {
    type Error = ValidateError;
    fn try_from(name: &str) -> Result<Self, Self::Error> {
        PathComponent::try_from(name.as_bytes())
    }
}

impl fmt::Debug for PathComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", lossy(&self.0))
    }
}

impl fmt::Display for PathComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&lossy(&self.0))
    }
}

/// Where a symlink points: non-empty, at most 4095 bytes, no NUL. It may be
/// relative, absolute or dangling; the store never follows it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SymlinkTarget(Bytes);

impl SymlinkTarget {
    /// The raw bytes of the target.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The target as `Bytes` (a cheap clone).
    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }
}

impl TryFrom<Bytes> for SymlinkTarget {
    type Error = ValidateError;
    fn try_from(target: Bytes) -> Result<Self, Self::Error> {
        match validate_target(&target) {
            Ok(()) => Ok(SymlinkTarget(target)),
            Err(reason) => Err(ValidateError::InvalidTarget {
                target: lossy(&target),
                reason,
            }),
        }
    }
}

impl TryFrom<&[u8]> for SymlinkTarget {
    type Error = ValidateError;
    fn try_from(target: &[u8]) -> Result<Self, Self::Error> {
        SymlinkTarget::try_from(Bytes::copy_from_slice(target))
    }
}

impl fmt::Debug for SymlinkTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", lossy(&self.0))
    }
}

/// What a name points at, or what a store path is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    /// A directory, by the digest of its encoding.
    Directory {
        /// BLAKE3 of the directory's encoding.
        digest: Digest,
        /// Entries in it and, recursively, in its subdirectories.
        size: u64,
    },
    /// A regular file, by the digest of its contents.
    File {
        /// BLAKE3 of the file's bytes.
        digest: Digest,
        /// Length in bytes.
        size: u64,
        /// Whether the file is executable (mode 0555 rather than 0444).
        executable: bool,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points.
        target: SymlinkTarget,
    },
}

impl Node {
    /// The node a directory is referred to by.
    pub fn directory(dir: &Directory) -> Node {
        Node::Directory {
            digest: dir.digest(),
            size: dir.size(),
        }
    }
}

impl TryFrom<proto::Node> for Node {
    type Error = ValidateError;
    fn try_from(node: proto::Node) -> Result<Self, Self::Error> {
        use proto::node::Node as N;
        let digest = |d: &Bytes| {
            Digest::try_from(d).map_err(|source| ValidateError::InvalidDigest {
                name: String::new(),
                source,
            })
        };
        Ok(match node.node.ok_or(ValidateError::EmptyNode)? {
            N::Directory(d) => Node::Directory {
                digest: digest(&d.digest)?,
                size: d.size,
            },
            N::File(f) => Node::File {
                digest: digest(&f.digest)?,
                size: f.size,
                executable: f.executable,
            },
            N::Symlink(s) => Node::Symlink {
                target: SymlinkTarget::try_from(s.target)?,
            },
        })
    }
}

impl From<&Node> for proto::Node {
    fn from(node: &Node) -> Self {
        use proto::node::{DirectoryNode, FileNode, Node as N, SymlinkNode};
        let node = match node {
            Node::Directory { digest, size } => N::Directory(DirectoryNode {
                digest: (*digest).into(),
                size: *size,
            }),
            Node::File {
                digest,
                size,
                executable,
            } => N::File(FileNode {
                digest: (*digest).into(),
                size: *size,
                executable: *executable,
            }),
            Node::Symlink { target } => N::Symlink(SymlinkNode {
                target: target.to_bytes(),
            }),
        };
        proto::Node { node: Some(node) }
    }
}

/// A directory: uniquely named entries, kept in bytewise name order.
///
/// Its digest is the BLAKE3 of its canonical encoding (three lists, each
/// sorted); its size is its number of entries plus the sizes of its
/// subdirectories.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    entries: BTreeMap<PathComponent, Node>,
    size: u64,
}

impl Directory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry. Fails if the name is taken or the size would overflow.
    pub fn add(&mut self, name: PathComponent, node: Node) -> Result<(), ValidateError> {
        let grows_by = match &node {
            Node::Directory { size, .. } => size.checked_add(1),
            _ => Some(1),
        };
        let size = grows_by
            .and_then(|n| self.size.checked_add(n))
            .ok_or(ValidateError::SizeOverflow)?;
        match self.entries.entry(name) {
            btree_map::Entry::Occupied(e) => Err(ValidateError::DuplicateName {
                name: e.key().to_string(),
            }),
            btree_map::Entry::Vacant(e) => {
                e.insert(node);
                self.size = size;
                Ok(())
            }
        }
    }

    /// The entries, in bytewise name order (the order of a NAR).
    pub fn entries(&self) -> impl ExactSizeIterator<Item = (&PathComponent, &Node)> {
        self.entries.iter()
    }

    /// The entries from `from` on, in name order.
    pub fn entries_from(
        &self,
        from: std::ops::Bound<&[u8]>,
    ) -> impl Iterator<Item = (&PathComponent, &Node)> {
        self.entries
            .range::<[u8], _>((from, std::ops::Bound::Unbounded))
    }

    /// The entry called `name`.
    pub fn get(&self, name: &[u8]) -> Option<&Node> {
        // PathComponent orders like its bytes, so a borrowed lookup would do;
        // BTreeMap needs Borrow<[u8]>, which PathComponent implements.
        self.entries.get(name)
    }

    /// Number of direct entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the directory has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries here plus the sizes of all subdirectories.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Digests of the direct subdirectories.
    pub fn subdirectories(&self) -> impl Iterator<Item = (&PathComponent, Digest, u64)> {
        self.entries.iter().filter_map(|(name, node)| match node {
            Node::Directory { digest, size } => Some((name, *digest, *size)),
            _ => None,
        })
    }

    /// The canonical encoding, whose BLAKE3 is the digest.
    pub fn encode(&self) -> Vec<u8> {
        proto::Directory::from(self).encode_to_vec()
    }

    /// BLAKE3 of the canonical encoding.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.encode())
    }
}

impl std::borrow::Borrow<[u8]> for PathComponent {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl From<&Directory> for proto::Directory {
    fn from(dir: &Directory) -> Self {
        let mut out = proto::Directory::default();
        for (name, node) in &dir.entries {
            let name = name.to_bytes();
            match node {
                Node::Directory { digest, size } => out.directories.push(proto::DirectoryEntry {
                    name,
                    digest: (*digest).into(),
                    size: *size,
                }),
                Node::File {
                    digest,
                    size,
                    executable,
                } => out.files.push(proto::FileEntry {
                    name,
                    digest: (*digest).into(),
                    size: *size,
                    executable: *executable,
                }),
                Node::Symlink { target } => out.symlinks.push(proto::SymlinkEntry {
                    name,
                    target: target.to_bytes(),
                }),
            }
        }
        out
    }
}

/// Checks one wire list is strictly ascending and returns its validated names.
fn sorted_names<'a>(
    names: impl Iterator<Item = &'a Bytes>,
) -> Result<Vec<PathComponent>, ValidateError> {
    let mut out: Vec<PathComponent> = Vec::new();
    for name in names {
        let name = PathComponent::try_from(name.clone())?;
        if let Some(previous) = out.last()
            && previous >= &name
        {
            return Err(ValidateError::NotSorted {
                name: name.to_string(),
                previous: previous.to_string(),
            });
        }
        out.push(name);
    }
    Ok(out)
}

impl TryFrom<proto::Directory> for Directory {
    type Error = ValidateError;
    fn try_from(wire: proto::Directory) -> Result<Self, Self::Error> {
        let digest = |name: &PathComponent, d: &Bytes| {
            Digest::try_from(d).map_err(|source| ValidateError::InvalidDigest {
                name: name.to_string(),
                source,
            })
        };
        let mut dir = Directory::new();
        let names = sorted_names(wire.directories.iter().map(|e| &e.name))?;
        for (name, e) in names.into_iter().zip(&wire.directories) {
            let node = Node::Directory {
                digest: digest(&name, &e.digest)?,
                size: e.size,
            };
            dir.add(name, node)?;
        }
        let names = sorted_names(wire.files.iter().map(|e| &e.name))?;
        for (name, e) in names.into_iter().zip(&wire.files) {
            let node = Node::File {
                digest: digest(&name, &e.digest)?,
                size: e.size,
                executable: e.executable,
            };
            dir.add(name, node)?;
        }
        let names = sorted_names(wire.symlinks.iter().map(|e| &e.name))?;
        for (name, e) in names.into_iter().zip(wire.symlinks) {
            dir.add(
                name,
                Node::Symlink {
                    target: SymlinkTarget::try_from(e.target)?,
                },
            )?;
        }
        Ok(dir)
    }
}

/// Why stored or received directory bytes can't be used.
#[derive(Debug, thiserror::Error)]
pub enum DecodeDirectoryError {
    /// The bytes are not a `Directory` message.
    #[error("directory {digest} does not decode")]
    Decode {
        /// The digest it was stored under.
        digest: Digest,
        /// The protobuf error.
        #[source]
        source: prost::DecodeError,
    },
    /// The message decodes but breaks the data model.
    #[error("directory {digest} is invalid")]
    Invalid {
        /// The digest it was stored under.
        digest: Digest,
        /// The rule it breaks.
        #[source]
        source: ValidateError,
    },
    /// Its canonical encoding hashes to something else.
    #[error("directory {expected} has digest {actual}")]
    Mismatch {
        /// The digest it was asked for by.
        expected: Digest,
        /// The digest of what came back.
        actual: Digest,
    },
}

impl Directory {
    /// Decodes `bytes` and checks the result is the directory named
    /// `expected`: the canonical re-encoding must hash to it.
    pub fn decode_verified(expected: Digest, bytes: &[u8]) -> Result<Self, DecodeDirectoryError> {
        let wire =
            proto::Directory::decode(bytes).map_err(|source| DecodeDirectoryError::Decode {
                digest: expected,
                source,
            })?;
        Directory::from_wire_verified(expected, wire)
    }

    /// Validates a wire directory and checks it is the one named `expected`.
    pub fn from_wire_verified(
        expected: Digest,
        wire: proto::Directory,
    ) -> Result<Self, DecodeDirectoryError> {
        let dir = Directory::try_from(wire).map_err(|source| DecodeDirectoryError::Invalid {
            digest: expected,
            source,
        })?;
        let actual = dir.digest();
        if actual != expected {
            return Err(DecodeDirectoryError::Mismatch { expected, actual });
        }
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> PathComponent {
        PathComponent::try_from(s).unwrap()
    }

    fn file(size: u64) -> Node {
        Node::File {
            digest: Digest::of(b"x"),
            size,
            executable: false,
        }
    }

    #[test]
    fn empty_directory_digest() {
        let d = Directory::new();
        assert_eq!(
            d.digest().to_string(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(d.size(), 0);
    }

    #[test]
    fn name_rules() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(PathComponent::try_from(bad).is_err(), "{bad:?}");
        }
        assert!(PathComponent::try_from("x".repeat(256).as_str()).is_err());
        assert!(PathComponent::try_from("x".repeat(255).as_str()).is_ok());
        for good in ["...", ".a", "ü", "a b", "-"] {
            assert!(PathComponent::try_from(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn target_rules() {
        assert!(SymlinkTarget::try_from(&b""[..]).is_err());
        assert!(SymlinkTarget::try_from(&b"a\0"[..]).is_err());
        assert!(SymlinkTarget::try_from(vec![b'a'; 4096].as_slice()).is_err());
        assert!(SymlinkTarget::try_from(vec![b'a'; 4095].as_slice()).is_ok());
        assert!(SymlinkTarget::try_from(&b"/nix/store/../x"[..]).is_ok());
    }

    #[test]
    fn size_counts_entries_and_subdirectories() {
        let mut inner = Directory::new();
        inner.add(name("a"), file(1)).unwrap();
        inner.add(name("b"), file(2)).unwrap();
        let mut outer = Directory::new();
        outer.add(name("sub"), Node::directory(&inner)).unwrap();
        outer.add(name("f"), file(3)).unwrap();
        assert_eq!(inner.size(), 2);
        assert_eq!(outer.size(), 2 + 2);
        assert!(matches!(
            outer.add(name("f"), file(1)),
            Err(ValidateError::DuplicateName { .. })
        ));
    }

    #[test]
    fn wire_round_trip_and_verification() {
        let mut d = Directory::new();
        d.add(name("z"), file(1)).unwrap();
        d.add(
            name("a"),
            Node::Symlink {
                target: SymlinkTarget::try_from(&b"z"[..]).unwrap(),
            },
        )
        .unwrap();
        d.add(name("m"), Node::directory(&Directory::new()))
            .unwrap();
        let bytes = d.encode();
        let back = Directory::decode_verified(d.digest(), &bytes).unwrap();
        assert_eq!(back, d);
        assert!(matches!(
            Directory::decode_verified(Digest::EMPTY, &bytes),
            Err(DecodeDirectoryError::Mismatch { .. })
        ));
    }

    #[test]
    fn wire_rejects_unsorted_duplicates_and_bad_digests() {
        let entry = |n: &str| proto::FileEntry {
            name: Bytes::copy_from_slice(n.as_bytes()),
            digest: Digest::EMPTY.into(),
            size: 0,
            executable: false,
        };
        let unsorted = proto::Directory {
            files: vec![entry("b"), entry("a")],
            ..Default::default()
        };
        assert!(matches!(
            Directory::try_from(unsorted),
            Err(ValidateError::NotSorted { .. })
        ));
        let repeated = proto::Directory {
            files: vec![entry("a"), entry("a")],
            ..Default::default()
        };
        assert!(matches!(
            Directory::try_from(repeated),
            Err(ValidateError::NotSorted { .. })
        ));
        let across = proto::Directory {
            files: vec![entry("a")],
            symlinks: vec![proto::SymlinkEntry {
                name: "a".into(),
                target: "t".into(),
            }],
            ..Default::default()
        };
        assert!(matches!(
            Directory::try_from(across),
            Err(ValidateError::DuplicateName { .. })
        ));
        let mut short = entry("a");
        short.digest = Bytes::from_static(&[0; 31]);
        let short = proto::Directory {
            files: vec![short],
            ..Default::default()
        };
        assert!(matches!(
            Directory::try_from(short),
            Err(ValidateError::InvalidDigest { .. })
        ));
        assert_eq!(
            Node::try_from(proto::Node::default()),
            Err(ValidateError::EmptyNode)
        );
    }
}
