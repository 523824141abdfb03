//! The `.narinfo` text format of Nix binary caches: parsing untrusted narinfo files
//! into typed values, and rendering them back the way Nix writes them.
//!
//! A narinfo is a list of `Key: value` lines, each ending in `\n`. Parsing is
//! stricter than Nix where Nix's leniency is an accident (a missing space after the
//! colon, a repeated single-valued key, a value Nix would only reject when it is
//! used) and as lenient as Nix where caches in the wild rely on it (unknown keys,
//! a missing `Compression`, hashes in hex or base64, unsorted `References`).
//! Also here: the `sha256:` hash notation that narinfo files, fingerprints and
//! content addresses share.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use thiserror::Error;

use crate::nixbase32::{self, Nixbase32Error};
use crate::signature::{Signature, SignatureError};
use crate::store_path::{StorePath, StorePathError};

/// Largest narinfo [`NarInfo::parse`] accepts. Real ones are a few hundred bytes; a
/// path with thousands of references stays far below this.
pub const MAX_NARINFO_SIZE: usize = 1 << 20;

/// What Nix writes for a path whose deriver it does not know; it means no deriver.
const UNKNOWN_DERIVER: &str = "unknown-deriver";

/// How the file at [`NarInfo::url`] is compressed. Nix names these in the
/// `Compression` line; a narinfo without one is bzip2, the format's first default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// `none`: the file is the NAR itself.
    None,
    /// `xz`, Nix's default for `file://` and S3 caches.
    Xz,
    /// `bzip2`, also meant by a missing `Compression` line.
    Bzip2,
    /// `zstd`.
    Zstd,
    /// `br` (Brotli).
    Brotli,
    /// `gzip`.
    Gzip,
    /// `lzip`.
    Lzip,
    /// `lz4`.
    Lz4,
}

impl Compression {
    /// The name Nix uses in `Compression` lines and `?compression=` cache options.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Xz => "xz",
            Self::Bzip2 => "bzip2",
            Self::Zstd => "zstd",
            Self::Brotli => "br",
            Self::Gzip => "gzip",
            Self::Lzip => "lzip",
            Self::Lz4 => "lz4",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" => Self::None,
            "xz" => Self::Xz,
            "bzip2" => Self::Bzip2,
            "zstd" => Self::Zstd,
            "br" => Self::Brotli,
            "gzip" => Self::Gzip,
            "lzip" => Self::Lzip,
            "lz4" => Self::Lz4,
            _ => return Err(FieldError::UnknownCompression),
        })
    }
}

/// A parsed narinfo.
///
/// Fields are public so that a cache server can build one. [`NarInfo::parse`]
/// enforces the invariants documented per field; rendering writes fields as they
/// are, so whoever builds a `NarInfo` by hand must keep them (a URL holding a
/// newline would add a line to the rendered text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// `StorePath`: the path this narinfo describes (written absolute).
    pub store_path: StorePath,
    /// `URL`: where the (compressed) NAR is, relative to the cache root. Non-empty,
    /// without control characters.
    pub url: String,
    /// `Compression` of the file at `url`.
    pub compression: Compression,
    /// `FileHash`: sha256 of the file at `url`.
    pub file_hash: Option<[u8; 32]>,
    /// `FileSize`: size of the file at `url` in bytes.
    pub file_size: Option<u64>,
    /// `NarHash`: sha256 of the uncompressed NAR.
    pub nar_hash: [u8; 32],
    /// `NarSize`: size of the uncompressed NAR in bytes; never zero.
    pub nar_size: u64,
    /// `References`, in file order (Nix writes them sorted). No duplicates.
    pub references: Vec<StorePath>,
    /// `Deriver`: the `.drv` that built the path, if known.
    pub deriver: Option<StorePath>,
    /// `Sig` lines, in file order (Nix writes them sorted).
    pub signatures: Vec<Signature>,
    /// `CA`: the content address of a content-addressed path, kept as Nix wrote it
    /// (`fixed:…` or `text:…`).
    pub ca: Option<String>,
}

/// Why a narinfo was rejected. Line numbers count from 1.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum NarInfoError {
    /// The input is longer than [`MAX_NARINFO_SIZE`]; nothing of it was parsed.
    #[error("narinfo is {size} bytes, more than the {MAX_NARINFO_SIZE} allowed")]
    TooLarge {
        /// Size of the input in bytes.
        size: usize,
    },
    /// A line is not `Key: value` with a non-empty key free of `:`.
    #[error("narinfo line {line}: expected `Key: value`")]
    MalformedLine {
        /// The line.
        line: usize,
    },
    /// The last line does not end in `\n` (Nix requires it too).
    #[error("narinfo line {line}: missing final newline")]
    MissingNewline {
        /// The line.
        line: usize,
    },
    /// A key that may appear once appears again.
    #[error("narinfo line {line}: duplicate `{key}`")]
    DuplicateKey {
        /// The line of the second occurrence.
        line: usize,
        /// The key.
        key: &'static str,
    },
    /// A value does not parse.
    #[error("narinfo line {line}: invalid `{key}`")]
    InvalidValue {
        /// The line.
        line: usize,
        /// The key.
        key: &'static str,
        /// What is wrong with the value.
        #[source]
        source: FieldError,
    },
    /// A required key (`StorePath`, `URL`, `NarHash`, `NarSize`) is absent.
    #[error("narinfo has no `{key}` line")]
    MissingKey {
        /// The key.
        key: &'static str,
    },
}

/// Why one narinfo value was rejected.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum FieldError {
    /// Not a store path (absolute for `StorePath`, a basename elsewhere).
    #[error("invalid store path")]
    StorePath(#[source] StorePathError),
    /// Not a sha256 hash in a notation Nix reads.
    #[error("invalid hash")]
    Hash(#[source] HashError),
    /// Not a decimal number that fits 64 bits (no sign, no spaces).
    #[error("not a decimal number below 2^64")]
    InvalidNumber,
    /// `NarSize` is zero, which Nix treats as missing.
    #[error("NarSize must not be zero")]
    ZeroNarSize,
    /// `URL` is empty or holds a control character.
    #[error("URL is empty or holds a control character")]
    InvalidUrl,
    /// `Compression` names a method this crate does not know.
    #[error("unknown compression method")]
    UnknownCompression,
    /// A reference is listed twice.
    #[error("reference {0} is listed twice")]
    DuplicateReference(StorePath),
    /// `Sig` is not `name:base64` of 64 bytes.
    #[error("invalid signature")]
    Signature(#[source] SignatureError),
    /// `CA` does not start with `fixed:` or `text:`, or holds a control character.
    #[error("content address must start with `fixed:` or `text:`")]
    ContentAddress,
}

/// Why a string is not a sha256 hash in one of the notations Nix reads.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum HashError {
    /// Neither `<algo>:<hash>` nor SRI `<algo>-<base64>`.
    #[error("hash has no `sha256:` or `sha256-` prefix")]
    MissingAlgorithm,
    /// An algorithm other than sha256 (Nix only signs and checks sha256 NAR hashes).
    #[error("hash algorithm {algorithm:?} is not sha256")]
    UnsupportedAlgorithm {
        /// The algorithm named by the prefix.
        algorithm: String,
    },
    /// Not 64 (hex), 52 (nixbase32) or 44 (base64) characters after the prefix.
    #[error("sha256 hash of {len} characters: expected 64 (hex), 52 (nixbase32) or 44 (base64)")]
    InvalidLength {
        /// Length after the prefix, in bytes.
        len: usize,
    },
    /// Bad hex digits.
    #[error("invalid hex")]
    Hex(#[source] hex::FromHexError),
    /// Bad nixbase32.
    #[error("invalid nixbase32")]
    Nixbase32(#[source] Nixbase32Error),
    /// Bad base64.
    #[error("invalid base64")]
    Base64(#[source] base64::DecodeError),
    /// Base64 that decodes to something other than 32 bytes.
    #[error("base64 decodes to {decoded} bytes, not 32")]
    Base64Size {
        /// Decoded size in bytes.
        decoded: usize,
    },
}

/// Parses a sha256 hash the way Nix reads hashes in narinfo files:
/// `sha256:<52 nixbase32>` (what Nix writes), `sha256:<64 hex>` (either case),
/// `sha256:<44 base64>`, or SRI `sha256-<44 base64>`. Nix 2.8 reads all four.
pub fn parse_sha256(s: &str) -> Result<[u8; 32], HashError> {
    // Nix looks for ':' first and only then for an SRI '-'.
    let (algorithm, digest, sri) = match s.split_once(':') {
        Some((algorithm, digest)) => (algorithm, digest, false),
        None => match s.split_once('-') {
            Some((algorithm, digest)) => (algorithm, digest, true),
            None => return Err(HashError::MissingAlgorithm),
        },
    };
    if algorithm != "sha256" {
        return Err(HashError::UnsupportedAlgorithm {
            algorithm: algorithm.to_owned(),
        });
    }
    let mut out = [0; 32];
    match digest.len() {
        64 if !sri => hex::decode_to_slice(digest, &mut out).map_err(HashError::Hex)?,
        52 if !sri => out = nixbase32::decode_fixed(digest).map_err(HashError::Nixbase32)?,
        44 => {
            // The engine rejects non-canonical padding and trailing bits; 44
            // characters without padding decode to 33 bytes.
            let bytes = BASE64.decode(digest).map_err(HashError::Base64)?;
            let decoded = bytes.len();
            out = bytes
                .try_into()
                .map_err(|_| HashError::Base64Size { decoded })?;
        }
        len => return Err(HashError::InvalidLength { len }),
    }
    Ok(out)
}

/// Formats a sha256 hash as Nix writes it in narinfo files and fingerprints:
/// `sha256:<nixbase32>`.
pub fn format_sha256(hash: &[u8; 32]) -> String {
    format!("sha256:{}", nixbase32::encode(hash))
}

/// The single-valued keys seen so far, with their parsed values.
#[derive(Default)]
struct Fields {
    store_path: Option<StorePath>,
    url: Option<String>,
    compression: Option<Compression>,
    file_hash: Option<[u8; 32]>,
    file_size: Option<u64>,
    nar_hash: Option<[u8; 32]>,
    nar_size: Option<u64>,
    references: Option<Vec<StorePath>>,
    deriver: Option<Option<StorePath>>,
    ca: Option<String>,
}

/// Stores the value of a key that may appear once, parsing it only if it is new.
fn set_once<T>(
    slot: &mut Option<T>,
    line: usize,
    key: &'static str,
    parse: impl FnOnce() -> Result<T, FieldError>,
) -> Result<(), NarInfoError> {
    if slot.is_some() {
        return Err(NarInfoError::DuplicateKey { line, key });
    }
    *slot = Some(parse().map_err(|source| NarInfoError::InvalidValue { line, key, source })?);
    Ok(())
}

fn parse_u64(value: &str) -> Result<u64, FieldError> {
    // u64::from_str alone would take a leading '+'.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FieldError::InvalidNumber);
    }
    value.parse().map_err(|_| FieldError::InvalidNumber)
}

fn parse_hash_field(value: &str) -> Result<[u8; 32], FieldError> {
    parse_sha256(value).map_err(FieldError::Hash)
}

fn parse_basename(value: &str) -> Result<StorePath, FieldError> {
    StorePath::from_basename(value).map_err(FieldError::StorePath)
}

fn parse_references(value: &str) -> Result<Vec<StorePath>, FieldError> {
    let mut references = Vec::new();
    // A basename has one spelling (nixbase32 is canonical), so equal strings are
    // equal paths; a set keeps the check linear on hostile inputs.
    let mut seen = HashSet::new();
    // Like Nix, split on single spaces and skip empty pieces: an empty list is
    // written `References: ` with nothing after the space.
    for basename in value.split(' ').filter(|s| !s.is_empty()) {
        let reference = parse_basename(basename)?;
        if !seen.insert(basename) {
            return Err(FieldError::DuplicateReference(reference));
        }
        references.push(reference);
    }
    Ok(references)
}

fn has_control(value: &str) -> bool {
    value.chars().any(char::is_control)
}

impl NarInfo {
    /// Parses a narinfo file. See the module documentation for what is accepted.
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        if text.len() > MAX_NARINFO_SIZE {
            return Err(NarInfoError::TooLarge { size: text.len() });
        }
        let mut fields = Fields::default();
        let mut signatures = Vec::new();
        for (index, raw) in text.split_inclusive('\n').enumerate() {
            let line = index + 1;
            let content = raw
                .strip_suffix('\n')
                .ok_or(NarInfoError::MissingNewline { line })?;
            let (key, value) = content
                .split_once(": ")
                .filter(|(key, _)| !key.is_empty() && !key.contains(':'))
                .ok_or(NarInfoError::MalformedLine { line })?;
            match key {
                "StorePath" => set_once(&mut fields.store_path, line, "StorePath", || {
                    StorePath::from_absolute_path(value).map_err(FieldError::StorePath)
                })?,
                "URL" => set_once(&mut fields.url, line, "URL", || {
                    if value.is_empty() || has_control(value) {
                        return Err(FieldError::InvalidUrl);
                    }
                    Ok(value.to_owned())
                })?,
                "Compression" => set_once(&mut fields.compression, line, "Compression", || {
                    value.parse()
                })?,
                "FileHash" => set_once(&mut fields.file_hash, line, "FileHash", || {
                    parse_hash_field(value)
                })?,
                "FileSize" => {
                    set_once(&mut fields.file_size, line, "FileSize", || parse_u64(value))?
                }
                "NarHash" => set_once(&mut fields.nar_hash, line, "NarHash", || {
                    parse_hash_field(value)
                })?,
                "NarSize" => {
                    set_once(&mut fields.nar_size, line, "NarSize", || {
                        match parse_u64(value)? {
                            0 => Err(FieldError::ZeroNarSize),
                            n => Ok(n),
                        }
                    })?
                }
                "References" => set_once(&mut fields.references, line, "References", || {
                    parse_references(value)
                })?,
                "Deriver" => set_once(&mut fields.deriver, line, "Deriver", || match value {
                    UNKNOWN_DERIVER => Ok(None),
                    _ => parse_basename(value).map(Some),
                })?,
                "Sig" => {
                    signatures.push(value.parse().map_err(|source| NarInfoError::InvalidValue {
                        line,
                        key: "Sig",
                        source: FieldError::Signature(source),
                    })?)
                }
                "CA" => set_once(&mut fields.ca, line, "CA", || {
                    let known = value.starts_with("fixed:") || value.starts_with("text:");
                    if !known || has_control(value) {
                        return Err(FieldError::ContentAddress);
                    }
                    Ok(value.to_owned())
                })?,
                // Newer Nix versions add keys; readers that ignore what they do not
                // know keep working, and Nix does the same.
                _ => {}
            }
        }
        Ok(Self {
            store_path: fields
                .store_path
                .ok_or(NarInfoError::MissingKey { key: "StorePath" })?,
            url: fields.url.ok_or(NarInfoError::MissingKey { key: "URL" })?,
            compression: fields.compression.unwrap_or(Compression::Bzip2),
            file_hash: fields.file_hash,
            file_size: fields.file_size,
            nar_hash: fields
                .nar_hash
                .ok_or(NarInfoError::MissingKey { key: "NarHash" })?,
            nar_size: fields
                .nar_size
                .ok_or(NarInfoError::MissingKey { key: "NarSize" })?,
            references: fields.references.unwrap_or_default(),
            deriver: fields.deriver.flatten(),
            signatures,
            ca: fields.ca,
        })
    }

    /// Renders the narinfo as Nix writes it: same keys, same order, hashes as
    /// `sha256:<nixbase32>`. Same as `to_string()`.
    pub fn render(&self) -> String {
        self.to_string()
    }
}

impl FromStr for NarInfo {
    type Err = NarInfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_path.to_absolute())?;
        writeln!(f, "URL: {}", self.url)?;
        writeln!(f, "Compression: {}", self.compression)?;
        if let Some(hash) = &self.file_hash {
            writeln!(f, "FileHash: {}", format_sha256(hash))?;
        }
        if let Some(size) = self.file_size {
            writeln!(f, "FileSize: {size}")?;
        }
        writeln!(f, "NarHash: {}", format_sha256(&self.nar_hash))?;
        writeln!(f, "NarSize: {}", self.nar_size)?;
        // Always present, with the space even when empty, as Nix writes it.
        f.write_str("References: ")?;
        for (i, reference) in self.references.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{reference}")?;
        }
        f.write_str("\n")?;
        if let Some(deriver) = &self.deriver {
            writeln!(f, "Deriver: {deriver}")?;
        }
        for signature in &self.signatures {
            writeln!(f, "Sig: {signature}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(f, "CA: {ca}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Nix 2.8: `nix copy --to 'file://…?compression=xz'`.
    const NIX_XZ: &str = "\
StorePath: /nix/store/cmf6kjvpb6w0660lmkvrbp14s03144sv-c
URL: nar/1rcmk6d5k25py2xlgzigpmms9jcxyhkravxs99fy7rg8isa79wm6.nar.xz
Compression: xz
FileHash: sha256:1rcmk6d5k25py2xlgzigpmms9jcxyhkravxs99fy7rg8isa79wm6
FileSize: 204
NarHash: sha256:052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip
NarSize: 208
References: lg82kdw0qw11sm45914jsrp9l0cinhr0-b qdbvz8kr5favd6rq5fpqb84n3yjbr87y-a
Deriver: zxa5rl464b4iz5ffq65s12k3x22c95ny-c.drv
Sig: test-key-1:5MhDLClarHABz45hyHJy/RU9OhdVKm/fsNwIoJOi2qO4NS03QYHMRhT9G4YbcbCL8Lwz9c6Mur9jJg7SPhNTDw==
";

    /// The NarHash above in hex: `nix hash to-base16 --type sha256 052l44…`.
    const NAR_HASH_HEX: &str = "373ee80db6cdaa76d017583496ce7de612453d63957b95fc5db513111b215414";

    fn replace_line(text: &str, key: &str, new_line: Option<&str>) -> String {
        let mut out = String::new();
        for line in text.lines() {
            if line.starts_with(&format!("{key}: ")) {
                if let Some(new_line) = new_line {
                    out.push_str(new_line);
                    out.push('\n');
                }
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    #[test]
    fn parses_and_renders_nix_output_exactly() {
        let info = NarInfo::parse(NIX_XZ).unwrap();
        assert_eq!(
            info.store_path.to_absolute(),
            "/nix/store/cmf6kjvpb6w0660lmkvrbp14s03144sv-c"
        );
        assert_eq!(
            info.url,
            "nar/1rcmk6d5k25py2xlgzigpmms9jcxyhkravxs99fy7rg8isa79wm6.nar.xz"
        );
        assert_eq!(info.compression, Compression::Xz);
        assert_eq!(info.file_size, Some(204));
        assert_eq!(hex::encode(info.nar_hash), NAR_HASH_HEX);
        assert_eq!(info.nar_size, 208);
        assert_eq!(info.references.len(), 2);
        assert_eq!(info.references[1].name(), "a");
        assert_eq!(info.deriver.as_ref().map(|d| d.name()), Some("c.drv"));
        assert_eq!(info.signatures.len(), 1);
        assert_eq!(info.signatures[0].key_name(), "test-key-1");
        assert_eq!(info.ca, None);
        assert_eq!(info.render(), NIX_XZ);
        assert_eq!(NarInfo::parse(&info.render()).unwrap(), info);
    }

    #[test]
    fn optional_keys_and_defaults() {
        let minimal = "StorePath: /nix/store/qdbvz8kr5favd6rq5fpqb84n3yjbr87y-a\nURL: nar/x.nar\n\
                       NarHash: sha256:052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip\nNarSize: 1\n";
        let info = NarInfo::parse(minimal).unwrap();
        assert_eq!(info.compression, Compression::Bzip2);
        assert_eq!((info.file_hash, info.file_size), (None, None));
        assert!(info.references.is_empty() && info.signatures.is_empty());
        assert_eq!((info.deriver.clone(), info.ca.clone()), (None, None));
        let rendered = info.render();
        assert!(rendered.contains("Compression: bzip2\n") && rendered.contains("References: \n"));
        assert_eq!(NarInfo::parse(&rendered).unwrap(), info);

        let with_ca = format!(
            "{minimal}References: \nDeriver: unknown-deriver\nCA: fixed:r:sha256:052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip\n"
        );
        let info = NarInfo::parse(&with_ca).unwrap();
        assert_eq!(info.deriver, None);
        assert!(info.ca.as_deref().unwrap().starts_with("fixed:r:sha256:"));
        assert_eq!(NarInfo::parse(&info.render()).unwrap(), info);
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let text = format!("Future: whatever: it is\n{NIX_XZ}System: x86_64-linux\nSig2: a:b\n");
        assert_eq!(
            NarInfo::parse(&text).unwrap(),
            NarInfo::parse(NIX_XZ).unwrap()
        );
    }

    #[test]
    fn duplicate_single_valued_keys_are_rejected() {
        let keys = [
            "StorePath",
            "URL",
            "Compression",
            "FileHash",
            "FileSize",
            "NarHash",
            "NarSize",
            "References",
            "Deriver",
        ];
        for key in keys {
            let line = NIX_XZ
                .lines()
                .find(|l| l.starts_with(&format!("{key}: ")))
                .unwrap();
            let text = format!("{NIX_XZ}{line}\n");
            assert_eq!(
                NarInfo::parse(&text),
                Err(NarInfoError::DuplicateKey { line: 11, key }),
                "{key}"
            );
        }
        let ca = "CA: text:sha256:052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip\n";
        assert_eq!(
            NarInfo::parse(&format!("{NIX_XZ}{ca}{ca}")),
            Err(NarInfoError::DuplicateKey {
                line: 12,
                key: "CA"
            })
        );
        // Sig may repeat.
        let sig = NIX_XZ.lines().find(|l| l.starts_with("Sig: ")).unwrap();
        assert_eq!(
            NarInfo::parse(&format!("{NIX_XZ}{sig}\n"))
                .unwrap()
                .signatures
                .len(),
            2
        );
    }

    #[test]
    fn missing_required_keys_are_named() {
        for key in ["StorePath", "URL", "NarHash", "NarSize"] {
            let text = replace_line(NIX_XZ, key, None);
            assert_eq!(
                NarInfo::parse(&text),
                Err(NarInfoError::MissingKey { key }),
                "{key}"
            );
        }
        assert_eq!(
            NarInfo::parse(""),
            Err(NarInfoError::MissingKey { key: "StorePath" })
        );
    }

    #[test]
    fn invalid_values_name_line_and_key() {
        let cases: &[(&str, &str, FieldError)] = &[
            (
                "StorePath",
                "StorePath: qdbvz8kr5favd6rq5fpqb84n3yjbr87y-a",
                FieldError::StorePath(StorePathError::NotInStoreDir),
            ),
            ("URL", "URL: ", FieldError::InvalidUrl),
            ("URL", "URL: nar/a\rb", FieldError::InvalidUrl),
            (
                "Compression",
                "Compression: rar",
                FieldError::UnknownCompression,
            ),
            ("FileSize", "FileSize: +204", FieldError::InvalidNumber),
            (
                "FileSize",
                "FileSize: 18446744073709551616",
                FieldError::InvalidNumber,
            ),
            ("NarSize", "NarSize: 0", FieldError::ZeroNarSize),
            ("NarSize", "NarSize:  208", FieldError::InvalidNumber),
            ("NarSize", "NarSize: -1", FieldError::InvalidNumber),
            (
                "NarHash",
                "NarHash: 052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip",
                FieldError::Hash(HashError::MissingAlgorithm),
            ),
            ("CA", "CA: sha256:abc", FieldError::ContentAddress),
            (
                "References",
                "References: qdbvz8kr5favd6rq5fpqb84n3yjbr87y-a qdbvz8kr5favd6rq5fpqb84n3yjbr87y-a",
                FieldError::DuplicateReference(
                    "qdbvz8kr5favd6rq5fpqb84n3yjbr87y-a".parse().unwrap(),
                ),
            ),
            (
                "Deriver",
                "Deriver: /nix/store/zxa5rl464b4iz5ffq65s12k3x22c95ny-c.drv",
                // Deriver is a basename: the hash check meets the '/'.
                FieldError::StorePath(StorePathError::InvalidHash(
                    Nixbase32Error::InvalidCharacter {
                        position: 10,
                        byte: '/',
                    },
                )),
            ),
        ];
        for (key, new_line, expected) in cases {
            let text = format!("{}{new_line}\n", replace_line(NIX_XZ, key, None));
            let line = text.lines().count();
            match NarInfo::parse(&text) {
                Err(NarInfoError::InvalidValue {
                    line: l,
                    key: k,
                    source,
                }) => {
                    assert_eq!((l, k, &source), (line, *key, expected), "{new_line}");
                }
                other => panic!("{new_line}: {other:?}"),
            }
        }
        let text = replace_line(NIX_XZ, "Sig", Some("Sig: test-key-1:AAAA"));
        assert!(matches!(
            NarInfo::parse(&text),
            Err(NarInfoError::InvalidValue {
                line: 10,
                key: "Sig",
                source: FieldError::Signature(_)
            })
        ));
    }

    #[test]
    fn line_structure_is_strict() {
        assert_eq!(
            NarInfo::parse(NIX_XZ.trim_end_matches('\n')),
            Err(NarInfoError::MissingNewline { line: 10 })
        );
        for bad in [
            "NarSize:208\n",
            "NarSize 208\n",
            ": 208\n",
            "\n",
            "Nar:Size: 208\n",
        ] {
            assert_eq!(
                NarInfo::parse(&format!("{NIX_XZ}{bad}")),
                Err(NarInfoError::MalformedLine { line: 11 }),
                "{bad:?}"
            );
        }
        let crlf = NIX_XZ.replace('\n', "\r\n");
        assert!(NarInfo::parse(&crlf).is_err());
    }

    #[test]
    fn size_is_bounded_before_parsing() {
        let mut text = String::from(NIX_XZ);
        let filler = format!("Comment: {}\n", "x".repeat(1000));
        while text.len() <= MAX_NARINFO_SIZE {
            text.push_str(&filler);
        }
        assert_eq!(
            NarInfo::parse(&text),
            Err(NarInfoError::TooLarge { size: text.len() })
        );
        text.truncate(MAX_NARINFO_SIZE - filler.len());
        text.truncate(text.rfind('\n').unwrap() + 1);
        assert!(NarInfo::parse(&text).is_ok());
    }

    #[test]
    fn hash_notations_nix_accepts() {
        let expected: [u8; 32] = hex::decode(NAR_HASH_HEX).unwrap().try_into().unwrap();
        // The hex, SRI and base64 forms from `nix hash to-base16/to-sri`; Nix 2.8
        // substitutes from a narinfo whose NarHash is written in any of them.
        let accepted = [
            "sha256:052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip".to_owned(),
            format!("sha256:{NAR_HASH_HEX}"),
            format!("sha256:{}", NAR_HASH_HEX.to_uppercase()),
            "sha256-Nz7oDbbNqnbQF1g0ls595hJFPWOVe5X8XbUTERshVBQ=".to_owned(),
            "sha256:Nz7oDbbNqnbQF1g0ls595hJFPWOVe5X8XbUTERshVBQ=".to_owned(),
        ];
        for s in &accepted {
            assert_eq!(parse_sha256(s), Ok(expected), "{s}");
            let text = replace_line(NIX_XZ, "NarHash", Some(&format!("NarHash: {s}")));
            let info = NarInfo::parse(&text).unwrap();
            assert_eq!(info.render(), NIX_XZ, "renders back as nixbase32: {s}");
        }
        assert_eq!(format_sha256(&expected), accepted[0]);

        let rejected: &[(&str, HashError)] = &[
            (
                "052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip",
                HashError::MissingAlgorithm,
            ),
            (
                "sha1:052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip",
                HashError::UnsupportedAlgorithm {
                    algorithm: "sha1".into(),
                },
            ),
            (
                "sha256:052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgi",
                HashError::InvalidLength { len: 51 },
            ),
            (
                "sha256-052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip",
                HashError::InvalidLength { len: 52 },
            ),
            (
                "sha256:252l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip",
                HashError::Nixbase32(Nixbase32Error::NonZeroPadding),
            ),
            ("sha256:", HashError::InvalidLength { len: 0 }),
        ];
        for (s, err) in rejected {
            assert_eq!(parse_sha256(s).as_ref(), Err(err), "{s}");
        }
        assert!(matches!(
            parse_sha256(&format!("sha256:{}", "g".repeat(64))),
            Err(HashError::Hex(_))
        ));
        // 44 base64 characters that do not decode to 32 bytes.
        assert_eq!(
            parse_sha256(&format!("sha256-{}", "A".repeat(44))),
            Err(HashError::Base64Size { decoded: 33 })
        );
        // Non-zero trailing bits: Nix's lenient decoder would take it, we do not.
        assert!(parse_sha256("sha256-Nz7oDbbNqnbQF1g0ls595hJFPWOVe5X8XbUTERshVBR=").is_err());
    }

    #[test]
    fn many_references() {
        let references: Vec<String> = (0u32..15_000)
            .map(|i| {
                let mut hash = [0u8; crate::STORE_PATH_HASH_LEN];
                hash[..4].copy_from_slice(&i.to_le_bytes());
                StorePath::from_parts(hash.into(), "dep")
                    .unwrap()
                    .to_string()
            })
            .collect();
        let line = format!("References: {}", references.join(" "));
        let text = replace_line(NIX_XZ, "References", Some(&line));
        assert!(text.len() < MAX_NARINFO_SIZE);
        let info = NarInfo::parse(&text).unwrap();
        assert_eq!(info.references.len(), 15_000);
        assert_eq!(info.render(), text);
    }

    #[test]
    fn unsorted_references_keep_their_order() {
        let text = NIX_XZ.replace(
            "References: lg82kdw0qw11sm45914jsrp9l0cinhr0-b qdbvz8kr5favd6rq5fpqb84n3yjbr87y-a",
            "References: qdbvz8kr5favd6rq5fpqb84n3yjbr87y-a  lg82kdw0qw11sm45914jsrp9l0cinhr0-b",
        );
        let info = NarInfo::parse(&text).unwrap();
        assert_eq!(info.references[0].name(), "a");
        assert!(
            info.render()
                .contains("References: qdbvz8kr5favd6rq5fpqb84n3yjbr87y-a lg82")
        );
    }
}
