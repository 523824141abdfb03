//! What a user can name as a path to import: a full store path, a basename,
//! or the bare 32-character hash.

use std::fmt;
use std::str::FromStr;

use crate::{StorePath, StorePathError, StorePathHash};

/// A store path to import, known by its hash and, unless it was given as a
/// bare hash, by its full name too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    hash: StorePathHash,
    path: Option<StorePath>,
}

impl Wanted {
    /// The 20-byte hash that keys the narinfo and the PathInfo.
    pub fn hash(&self) -> StorePathHash {
        self.hash
    }

    /// The full store path, unless only the hash was given.
    pub fn path(&self) -> Option<&StorePath> {
        self.path.as_ref()
    }

    /// The hash in nixbase32, as in `<hash>.narinfo`.
    pub fn hash_str(&self) -> String {
        self.hash.to_string()
    }

    /// Whether `found` is the path asked for: the same hash and, if a name
    /// was given, the same name.
    pub fn matches(&self, found: &StorePath) -> bool {
        match &self.path {
            Some(path) => path == found,
            None => found.hash() == self.hash,
        }
    }
}

impl From<StorePath> for Wanted {
    fn from(path: StorePath) -> Self {
        Wanted {
            hash: path.hash(),
            path: Some(path),
        }
    }
}

impl FromStr for Wanted {
    type Err = StorePathError;

    /// Accepts `/nix/store/<hash>-<name>`, `<hash>-<name>` or `<hash>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with('/') {
            return StorePath::from_absolute_path(s).map(Wanted::from);
        }
        if s.contains('-') {
            return StorePath::from_basename(s).map(Wanted::from);
        }
        Ok(Wanted {
            hash: StorePath::parse_hash(s)?,
            path: None,
        })
    }
}

impl fmt::Display for Wanted {
    /// The absolute path, or the bare hash if that is all that is known.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(path) => f.write_str(&path.to_absolute()),
            None => f.write_str(&self.hash_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASENAME: &str = "00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432";

    #[test]
    fn parses_the_three_forms() {
        let full: Wanted = format!("/nix/store/{BASENAME}").parse().unwrap();
        let base: Wanted = BASENAME.parse().unwrap();
        let hash: Wanted = BASENAME[..32].parse().unwrap();
        assert_eq!(full, base);
        assert_eq!(full.hash(), hash.hash());
        assert!(hash.path().is_none());
        assert_eq!(full.to_string(), format!("/nix/store/{BASENAME}"));
        assert_eq!(hash.to_string(), &BASENAME[..32]);

        let path = full.path().unwrap().clone();
        assert!(full.matches(&path) && hash.matches(&path));
        let renamed = StorePath::from_parts(path.hash(), "other").unwrap();
        assert!(!full.matches(&renamed) && hash.matches(&renamed));
    }

    #[test]
    fn rejects_other_strings() {
        for bad in [
            "",
            "/tmp/x",
            "/nix/store/short-x",
            "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
            &format!("/nix/store/{BASENAME}/bin"),
        ] {
            assert!(bad.parse::<Wanted>().is_err(), "{bad:?}");
        }
    }
}
