//! Whole files for FUSE passthrough: a blob's contents as a plain file in
//! the files directory beside the cache file, named by the blob's digest,
//! with an entry like any cached record, so it counts against the bound and
//! is evicted like one.

use std::path::{Path, PathBuf};

use super::CacheStore;
use super::accounting::Index;
use super::layout::{Key, Record};
use crate::digest::Digest;

/// Where the file of blob `digest` goes in `dir`.
pub(super) fn file_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join(digest.to_string())
}

/// Creates the files directory, and removes what in it has no entry: a
/// file written but not yet recorded when the process stopped, or a
/// temporary one.
pub(super) fn remove_unlisted_files(dir: &Path, index: &Index) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let listed = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<Digest>().ok())
            .is_some_and(|d| index.entries.contains_key(&Key::file(d)));
        if !listed {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

impl CacheStore {
    /// Where the whole file of blob `digest` is kept, if
    /// [`CacheStore::has_file`] says it is. Write it elsewhere in the same
    /// directory ([`CacheStore::files_dir`]) and rename it here, then
    /// [`CacheStore::add_file`] it.
    pub fn file_path(&self, digest: &Digest) -> PathBuf {
        file_path(&self.inner.files_dir, digest)
    }

    /// The directory of whole files; anything in it without an entry is
    /// removed when the cache is next opened.
    pub fn files_dir(&self) -> &Path {
        &self.inner.files_dir
    }

    /// Whether the whole file of blob `digest` is kept.
    pub fn has_file(&self, digest: &Digest) -> bool {
        self.inner.index().entries.contains_key(&Key::file(*digest))
    }

    /// Records the file at [`CacheStore::file_path`] (`size` bytes, checked
    /// against `digest` by the caller) against the bound, evicting what no
    /// longer fits. Blocks: call it from `spawn_blocking`.
    pub fn add_file(&self, digest: &Digest, size: u64) -> Result<(), redb::Error> {
        self.inner.write(&[Record::File(*digest, size)], &[], false)
    }

    /// Counts a use of the whole file of `digest`, for eviction order. May
    /// write a batch of uses: call it from `spawn_blocking`.
    pub fn touch_file(&self, digest: &Digest) {
        self.touch([Key::file(*digest)]);
    }

    /// Forgets the whole file of `digest` (it is gone or unusable) and
    /// removes it. Blocks: call it from `spawn_blocking`.
    pub fn drop_file(&self, digest: &Digest) -> Result<(), redb::Error> {
        self.inner.write(&[], &[Key::file(*digest)], false)
    }
}
