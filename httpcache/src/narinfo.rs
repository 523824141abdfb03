//! What the cache says about its paths: `nix-cache-info`, narinfos written
//! from PathInfos, and the NAR URLs they point at.
//!
//! A NAR URL names the store path and the NarHash,
//! `nar/<path hash>-<NarHash in nixbase32>.nar[.zst]`, so a URL always means
//! the same bytes: if the path is published again with other contents, the
//! old URL stops resolving instead of serving different bytes.

use std::fmt;
use std::str::FromStr;

use lazystore_pathinfo::pathinfos::PathInfo;
use lazystore_pathinfo::{Compression, NarInfo, SigningKey, StorePath, StorePathHash, nixbase32};

/// How NARs are served: what the narinfos' `URL` and `Compression` say.
/// Both forms are always available at their URLs; this picks the one
/// clients are sent to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NarCompression {
    /// Uncompressed: `FileHash`/`FileSize` are the NAR's own, and Range
    /// requests work.
    #[default]
    None,
    /// zstd at this level, compressed as it streams; no `FileHash` or
    /// `FileSize` (they are not known before the NAR is sent).
    Zstd {
        /// zstd level (1–19; 3 is zstd's default).
        level: i32,
    },
}

impl FromStr for NarCompression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(NarCompression::None),
            "zstd" => Ok(NarCompression::Zstd { level: 3 }),
            other => match other.strip_prefix("zstd:").map(str::parse::<i32>) {
                Some(Ok(level)) if (1..=19).contains(&level) => Ok(NarCompression::Zstd { level }),
                _ => Err(format!(
                    "unknown NAR compression {other:?}: expected none, zstd or zstd:LEVEL (1-19)"
                )),
            },
        }
    }
}

impl fmt::Display for NarCompression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NarCompression::None => f.write_str("none"),
            NarCompression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

/// The `nix-cache-info` file.
pub fn cache_info(want_mass_query: bool, priority: u32) -> String {
    format!(
        "StoreDir: {}\nWantMassQuery: {}\nPriority: {priority}\n",
        lazystore_pathinfo::STORE_DIR,
        u8::from(want_mass_query)
    )
}

/// The NAR URL of `info`, relative to the cache root.
pub fn nar_url(info: &PathInfo, compressed: bool) -> String {
    format!(
        "nar/{}-{}.nar{}",
        info.store_path.hash_str(),
        nixbase32::encode(&info.nar_sha256),
        if compressed { ".zst" } else { "" }
    )
}

/// A NAR URL this cache wrote, parsed.
#[derive(Debug, PartialEq, Eq)]
pub struct NarName {
    /// The store path's hash.
    pub path_hash: StorePathHash,
    /// The NarHash the URL was written for.
    pub nar_sha256: [u8; 32],
    /// `.nar.zst` rather than `.nar`.
    pub zstd: bool,
}

/// Parses the file name under `nar/` of a NAR URL this cache writes;
/// `None` for any other name (which is then not found).
pub fn parse_nar_name(file: &str) -> Option<NarName> {
    let (stem, zstd) = match file.strip_suffix(".nar.zst") {
        Some(stem) => (stem, true),
        None => (file.strip_suffix(".nar")?, false),
    };
    let (path_hash, nar_hash) = stem.split_once('-')?;
    Some(NarName {
        path_hash: StorePath::parse_hash(path_hash).ok()?,
        nar_sha256: nixbase32::decode_fixed(nar_hash).ok()?,
        zstd,
    })
}

/// The narinfo of `info` as served: upstream signatures kept, ours added
/// when there is a key.
pub fn narinfo(info: &PathInfo, compression: NarCompression, key: Option<&SigningKey>) -> NarInfo {
    let (compressed, file_hash, file_size) = match compression {
        NarCompression::None => (false, Some(info.nar_sha256), Some(info.nar_size)),
        NarCompression::Zstd { .. } => (true, None, None),
    };
    let mut narinfo = NarInfo {
        store_path: info.store_path.clone(),
        url: nar_url(info, compressed),
        compression: if compressed {
            Compression::Zstd
        } else {
            Compression::None
        },
        file_hash,
        file_size,
        nar_hash: info.nar_sha256,
        nar_size: info.nar_size,
        references: info.references.clone(),
        deriver: info.deriver.clone(),
        signatures: info.signatures.clone(),
        ca: info.ca.clone(),
    };
    if let Some(key) = key {
        narinfo.sign(key);
    }
    narinfo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nar_names() {
        let hash = "0c0j9j3kzqm9k6xqw0qjzs2n8cs9lfwk";
        let nar = "1b3pxvmbvcyr0prbqgb3d4bw3r3zbrc2ngjxnhkp88qpfvbrcqzh";
        let name = parse_nar_name(&format!("{hash}-{nar}.nar")).unwrap();
        assert!(!name.zstd);
        assert_eq!(nixbase32::encode(&name.nar_sha256), nar);
        assert_eq!(name.path_hash, StorePath::parse_hash(hash).unwrap());
        assert!(
            parse_nar_name(&format!("{hash}-{nar}.nar.zst"))
                .unwrap()
                .zstd
        );
        for bad in [
            format!("{hash}-{nar}.nar.xz"),
            format!("{hash}{nar}.nar"),
            format!("{hash}-{nar}"),
            format!("{nar}.nar"),
            "x.nar".to_owned(),
        ] {
            assert_eq!(parse_nar_name(&bad), None, "{bad}");
        }
    }

    #[test]
    fn compression_flags() {
        assert_eq!("none".parse(), Ok(NarCompression::None));
        assert_eq!("zstd".parse(), Ok(NarCompression::Zstd { level: 3 }));
        assert_eq!("zstd:19".parse(), Ok(NarCompression::Zstd { level: 19 }));
        assert!("zstd:20".parse::<NarCompression>().is_err());
        assert!("xz".parse::<NarCompression>().is_err());
    }

    #[test]
    fn cache_info_text() {
        assert_eq!(
            cache_info(true, 40),
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
        );
        assert_eq!(
            cache_info(false, 7),
            "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 7\n"
        );
    }
}
