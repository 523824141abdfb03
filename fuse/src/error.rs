//! [`FsError`]: why a filesystem operation failed, and its one mapping to an
//! errno ([`FsError::errno`]).

use std::sync::Arc;

/// Why a filesystem operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    /// No such entry. `permanent` when the name was looked up in an
    /// immutable directory, so the kernel may cache the absence; a store
    /// path missing at the root may appear later, so that is not permanent.
    #[error("no such file or directory")]
    NotFound {
        /// Whether the absence can never change.
        permanent: bool,
    },
    /// The inode is not (or no longer) known: the kernel forgot it.
    #[error("unknown inode {0}")]
    UnknownInode(u64),
    /// A directory operation on something that is not a directory.
    #[error("not a directory")]
    NotADirectory,
    /// A file operation on a directory.
    #[error("is a directory")]
    IsADirectory,
    /// `read` on a symlink.
    #[error("not a regular file")]
    NotAFile,
    /// `readlink` on something that is not a symlink.
    #[error("not a symlink")]
    NotASymlink,
    /// The root lists no store paths unless mounted with `--list-root`.
    #[error("the store root is not listable (mount with --list-root)")]
    RootNotListable,
    /// Anything that would change the filesystem.
    #[error("read-only filesystem")]
    ReadOnly,
    /// No extended attribute of that name.
    #[error("no such attribute")]
    NoAttribute,
    /// An xattr value is larger than the caller's buffer.
    #[error("attribute value too large for the buffer")]
    BufferTooSmall,
    /// The store failed (after retries) or holds inconsistent data; the
    /// failure has been logged with the store path and file.
    #[error("{path}: {message}")]
    Io {
        /// `<hash>-<name>/path/inside`, for the log line.
        path: Arc<str>,
        /// What failed, with its causes.
        message: String,
    },
}

impl FsError {
    /// The errno returned to the kernel for this error. The only place
    /// errors become errnos.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound { .. } => libc::ENOENT,
            FsError::UnknownInode(_) => libc::ESTALE,
            FsError::NotADirectory => libc::ENOTDIR,
            FsError::IsADirectory => libc::EISDIR,
            FsError::NotAFile | FsError::NotASymlink => libc::EINVAL,
            // EPERM, as `ls` shows it: "Operation not permitted". The
            // root can still be entered and looked up by name.
            FsError::RootNotListable => libc::EPERM,
            FsError::ReadOnly => libc::EROFS,
            FsError::NoAttribute => libc::ENODATA,
            FsError::BufferTooSmall => libc::ERANGE,
            FsError::Io { .. } => libc::EIO,
        }
    }
}
