//! FUSE passthrough for files the local cache holds whole.
//!
//! A warm read through FUSE is served from the kernel's page cache for the
//! mount, in 4 KiB pages on this kernel (6.18), and runs at a third to a
//! half of a native read; a cold one crosses into this process for every
//! 1 MiB. With passthrough (Linux 6.9+, `CAP_SYS_ADMIN`), an open names a
//! plain backing file and the kernel reads it directly, as fast as any
//! local file.
//!
//! So with `lazystore mount --passthrough` (off by default: the backing
//! file is chosen at open, so every open and release of every file becomes
//! a round trip to the mount, and builds open thousands of files; warm
//! `nix hash path` of a toolchain ran at 0.33× native with it, 0.93×
//! without, `bench/warm.sh`), a file of at least [`MIN_SIZE`], once every chunk of it is in the
//! local cache when a handle that read through the chunks is released, is
//! written out whole into the cache's files directory
//! (`CacheStore::file_path`), in the background (after the reader, not
//! beside it, so the two never fetch a chunk twice), checked against its
//! BLAKE3 as it is written, and only then renamed into place and recorded
//! against the cache's bound (evicted like any record, least recently used
//! first). Later opens of it are passthrough opens. What that trades: the
//! file's bytes were verified once, when written, not on every read, as
//! the kernel's page cache trusts what it holds; without `--passthrough`
//! every read goes through the chunk checks.
//!
//! The kernel refuses (EIO, to the reader) an open whose mode differs from
//! other opens of the same inode that are still open, and wants one backing
//! file per inode, so the mode and the backing file are chosen at the first
//! open and kept until the last release.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuser::BackingId;
use lazystore_castore::{Blobs, CacheStore, Digest};

/// Smaller files stay in the FUSE page cache: their reads are few, and
/// writing each out would cost more than it saves.
pub(crate) const MIN_SIZE: u64 = 256 << 10;

/// A file is read from the cache and written out in pieces of this size.
const PIECE: u64 = 8 << 20;

/// How an inode's open handles read.
enum Mode {
    /// Through this process and the kernel's page cache for the mount.
    Cached,
    /// From this backing file.
    Backing(Arc<BackingId>),
}

struct Open {
    mode: Mode,
    handles: u64,
}

/// Passthrough state of one mount.
pub struct Passthrough {
    cache: CacheStore,
    /// Cleared for good when the kernel refuses a backing file (no
    /// passthrough support, not privileged), so the refusal is logged once.
    usable: AtomicBool,
    // std Mutexes: a map operation per open and release, no await.
    opens: Mutex<HashMap<u64, Open>>,
    /// Files being written out.
    writing: Mutex<HashSet<Digest>>,
    /// One file written at a time: it competes with reads for the disk.
    writer: tokio::sync::Semaphore,
}

/// What an open should reply.
pub(crate) enum OpenAs {
    Cached,
    Backing(Arc<BackingId>),
}

impl Passthrough {
    /// Passthrough from the whole files `cache` keeps.
    pub fn new(cache: CacheStore) -> Self {
        Passthrough {
            cache,
            usable: AtomicBool::new(true),
            opens: Mutex::new(HashMap::new()),
            writing: Mutex::new(HashSet::new()),
            writer: tokio::sync::Semaphore::new(1),
        }
    }

    /// Whether the kernel has not refused passthrough.
    pub(crate) fn usable(&self) -> bool {
        self.usable.load(Ordering::Relaxed)
    }

    /// Turns passthrough off for the mount, saying why once.
    pub(crate) fn disable(&self, why: &str) {
        if self.usable.swap(false, Ordering::Relaxed) {
            tracing::warn!("passthrough off: {why}; every read goes through the chunks");
        }
    }

    /// Chooses how an open of inode `ino` (file `digest`, `size` bytes)
    /// reads: the mode of its handles still open, else a backing file if
    /// the cache has the whole file (`open_backing` registers it with the
    /// kernel), else cached.
    pub(crate) fn open(
        &self,
        ino: u64,
        digest: &Digest,
        size: u64,
        open_backing: impl FnOnce(&File) -> std::io::Result<BackingId>,
    ) -> OpenAs {
        let mut opens = self.opens.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = opens.get_mut(&ino) {
            open.handles += 1;
            return match &open.mode {
                Mode::Cached => OpenAs::Cached,
                Mode::Backing(id) => OpenAs::Backing(id.clone()),
            };
        }
        // Smaller files are never written out: no need to ask the cache.
        let backing = (size >= MIN_SIZE)
            .then(|| self.backing(digest, open_backing))
            .flatten();
        let mode = match backing {
            Some(id) => Mode::Backing(Arc::new(id)),
            None => Mode::Cached,
        };
        let reply = match &mode {
            Mode::Cached => OpenAs::Cached,
            Mode::Backing(id) => OpenAs::Backing(id.clone()),
        };
        opens.insert(ino, Open { mode, handles: 1 });
        reply
    }

    fn backing(
        &self,
        digest: &Digest,
        open_backing: impl FnOnce(&File) -> std::io::Result<BackingId>,
    ) -> Option<BackingId> {
        if !self.usable() || !self.cache.has_file(digest) {
            return None;
        }
        let path = self.cache.file_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "passthrough: cannot open a cached file; reading through the chunks");
                return None;
            }
        };
        match open_backing(&file) {
            Ok(id) => Some(id),
            Err(e) => {
                self.disable(&format!(
                    "the kernel refused a backing file ({e}; it needs CAP_SYS_ADMIN)"
                ));
                None
            }
        }
    }

    /// A handle of inode `ino` was released. True if it read through the
    /// chunks: the file may now be cached whole, to write out.
    pub(crate) fn release(&self, ino: u64) -> bool {
        let mut opens = self.opens.lock().unwrap_or_else(|p| p.into_inner());
        let Some(open) = opens.get_mut(&ino) else {
            return false;
        };
        let cached = matches!(open.mode, Mode::Cached);
        open.handles -= 1;
        if open.handles == 0 {
            // Drops the backing id (the kernel closes its reference).
            opens.remove(&ino);
        }
        cached
    }

    /// The cache (for counting uses of files).
    pub(crate) fn cache(&self) -> &CacheStore {
        &self.cache
    }

    /// Writes the file of blob `digest` (`size` bytes) out whole if it is
    /// large enough, not yet kept or being written, small enough for the
    /// bound, and every chunk of it is in the local cache (so this reads
    /// nothing from the remote). Failures are logged; the file keeps being
    /// read through the chunks.
    /// True if it wrote the file.
    pub(crate) async fn write_out(
        self: Arc<Self>,
        blobs: Blobs,
        digest: Digest,
        size: u64,
    ) -> bool {
        if !self.usable()
            || size < MIN_SIZE
            || size > self.cache.max_bytes() / 4
            || self.cache.has_file(&digest)
        {
            return false;
        }
        if !self
            .writing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest)
        {
            return false;
        }
        let result = self.write_file(&blobs, digest, size).await;
        self.writing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&digest);
        result.unwrap_or_else(|e| {
            tracing::warn!(blob = %digest, error = %e, "passthrough: cannot write out a cached file");
            false
        })
    }

    /// Whether it wrote the file.
    async fn write_file(
        &self,
        blobs: &Blobs,
        digest: Digest,
        size: u64,
    ) -> Result<bool, WriteError> {
        let _turn = self
            .writer
            .acquire()
            .await
            .map_err(|_| WriteError::Closed)?;
        let Some(meta) = blobs.stat(&digest).await? else {
            return Ok(false);
        };
        if meta.size != size
            || !meta
                .chunks
                .iter()
                .all(|c| self.cache.contains_chunk(&c.digest))
        {
            return Ok(false);
        }
        // Named by the blob, which only one task writes at a time; the
        // cache removes leftovers (a crash) when it is next opened.
        let tmp = self.cache.files_dir().join(format!(".tmp-{digest}"));
        let created = tmp.clone();
        let file = tokio::task::spawn_blocking(move || File::create(created))
            .await
            .map_err(|e| WriteError::Io(std::io::Error::other(e)))??;
        let mut file = Some(file);
        let mut hasher = blake3::Hasher::new();
        let mut offset = 0;
        while offset < size {
            let len = PIECE.min(size - offset);
            let piece = blobs.read_range(&digest, &meta, offset, len).await?;
            hasher.update(&piece);
            let mut f = file.take().expect("returned by the last write");
            file = Some(
                tokio::task::spawn_blocking(move || f.write_all(&piece).map(|()| f))
                    .await
                    .map_err(|e| WriteError::Io(std::io::Error::other(e)))??,
            );
            offset += len;
        }
        let cache = self.cache.clone();
        let matches = Digest::from_bytes(*hasher.finalize().as_bytes()) == digest;
        tokio::task::spawn_blocking(move || -> Result<(), WriteError> {
            drop(file);
            if !matches {
                let _ = std::fs::remove_file(&tmp);
                return Err(WriteError::Mismatch);
            }
            std::fs::rename(&tmp, cache.file_path(&digest))?;
            cache
                .add_file(&digest, size)
                .map_err(|e| WriteError::Cache(e.into()))
        })
        .await
        .map_err(|e| WriteError::Io(std::io::Error::other(e)))??;
        Ok(true)
    }
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("the mount is stopping")]
    Closed,
    #[error(transparent)]
    Blob(#[from] lazystore_castore::BlobError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("recording it in the cache failed")]
    Cache(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("its contents do not hash to its digest")]
    Mismatch,
}
