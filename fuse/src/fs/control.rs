//! What the mount says about itself: the control directory with its stats
//! file (the counters, the substituters' counters), and the digest xattr of
//! every file and directory whose contents are known.

use super::*;

/// Name of the control directory at the root. Not a valid store path name,
/// so it can't hide one.
pub const CONTROL_DIR_NAME: &str = ".lazystore";

/// Name of the stats file in the control directory.
pub const STATS_FILE_NAME: &str = "stats";

/// The xattr holding a file's or directory's BLAKE3 digest (hex).
pub const DIGEST_XATTR: &str = "user.lazystore.blake3";

impl LazyFs {
    pub(super) fn fixed_attr(&self, ino: Ino) -> Attr {
        let dir = Attr {
            ino,
            kind: FileKind::Directory,
            size: 0,
            blocks: 0,
            perm: 0o555,
            nlink: 2,
            mtime: canonical_mtime(),
            ttl: CONTENT_TTL,
        };
        match ino {
            Ino::CONTROL_DIR => Attr { size: 1, ..dir },
            Ino::STATS_FILE => {
                let size = self.stats_text().len() as u64;
                // The contents change, so: no caching of the attributes,
                // and an mtime that moves, which makes the kernel drop the
                // cached pages (the mount asks for FUSE_AUTO_INVAL_DATA).
                Attr {
                    kind: FileKind::File,
                    size,
                    blocks: size.div_ceil(512),
                    perm: 0o444,
                    nlink: 1,
                    mtime: SystemTime::now(),
                    ttl: Duration::ZERO,
                    ..dir
                }
            }
            _ => dir,
        }
    }

    /// The value of xattr `name` of `ino`.
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Bytes, FsError> {
        if name != DIGEST_XATTR.as_bytes() {
            return Err(FsError::NoAttribute);
        }
        match &self.inode(ino).map(|i| self.digest_of(&i)) {
            Ok(Some(d)) => Ok(Bytes::from(d.to_string())),
            _ => Err(FsError::NoAttribute),
        }
    }

    /// The xattr names of `ino`, each NUL-terminated.
    pub fn listxattr(&self, ino: Ino) -> Result<Bytes, FsError> {
        match self.inodes.get(ino).and_then(|i| self.digest_of(&i)) {
            Some(_) => Ok(Bytes::from(format!("{DIGEST_XATTR}\0"))),
            None => Ok(Bytes::new()),
        }
    }

    pub(super) fn digest_of(&self, inode: &Inode) -> Option<Digest> {
        match &inode.kind {
            Kind::Directory { digest, .. } | Kind::File { digest, .. } => {
                (!self.paths.is_placeholder(digest)).then_some(*digest)
            }
            _ => None,
        }
    }

    pub(super) fn stats_text(&self) -> String {
        let mut text = self.stats.snapshot().to_string();
        text.push_str(&format!(
            "inodes {}\nmemory_cache_bytes {}\n",
            self.inodes.len(),
            self.chunks.memory_bytes()
        ));
        if let Some(p) = &self.passthrough {
            // 1 while the kernel takes backing files, 0 once it refused.
            text.push_str(&format!("passthrough {}\n", u8::from(p.usable())));
        }
        for (name, value) in self
            .paths
            .counters()
            .into_iter()
            .chain(self.more_counters())
        {
            text.push_str(&format!("{name} {value}\n"));
        }
        text
    }
}
