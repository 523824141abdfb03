//! Mounting: checks what a mount needs (the FUSE device, `fusermount3`, a
//! free directory to mount on) so a failure says what to fix, then runs a
//! fuser session over a [`LazyFs`] until [`Mounted::unmount`].
//!
//! Mounts are read-only, `default_permissions` (the kernel checks modes
//! itself, with no round trip per access), `nodev,nosuid`, and
//! `auto_unmount`: `fusermount3` stays beside the process and unmounts
//! when it dies, however it dies. `auto_unmount` needs `allow_other` or
//! `allow_root` at the kernel; without `--allow-other` the session lets
//! only its owner and root in.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use crate::adapter::Adapter;
use crate::fs::LazyFs;

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// Let every user in (`allow_other`); otherwise the owner and root.
    /// For a non-root owner this needs `user_allow_other` in
    /// `/etc/fuse.conf`.
    pub allow_other: bool,
    /// Threads reading requests from the kernel. Requests that wait run
    /// on the Tokio runtime; one thread is the default, since two on the
    /// same queue contend for it (a cold walk of a toolchain through the
    /// service: 7.5–8.3 s with one, 8.5–9.8 s with two, on two cores).
    pub threads: usize,
    /// The kernel's readahead for the mount, in KiB (its
    /// `/sys/class/bdi/*/read_ahead_kb`, 128 by default). Larger windows
    /// make the kernel send reads of up to `max_pages` (1 MiB) and keep
    /// larger folios: measured here, 4096 reads a cold file 1.9 times and
    /// a cached one 1.35 times as fast as 128. 0 leaves it alone.
    pub readahead_kb: u32,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            allow_other: false,
            threads: 1,
            readahead_kb: 4096,
        }
    }
}

/// Why a mount could not be made or unmade. Every message names what to
/// fix.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// `/dev/fuse` is missing or cannot be opened.
    #[error(
        "cannot open /dev/fuse: is the fuse kernel module loaded (try: modprobe fuse)? \
         In a container, pass the device (e.g. --device /dev/fuse)"
    )]
    NoFuseDevice(#[source] io::Error),
    /// No `fusermount3` to mount and auto-unmount with.
    #[error(
        "fusermount3 not found ({0}): it mounts the filesystem and unmounts it when lazystore \
         exits; is fuse3 installed? try: apt-get install fuse3"
    )]
    NoFusermount(String),
    /// The mountpoint does not exist or cannot be reached.
    #[error("mountpoint {path} is not accessible (create it first: mkdir -p {path})", path = .path.display())]
    Mountpoint {
        /// The mountpoint.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The mountpoint is not a directory.
    #[error("mountpoint {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// Something is already mounted there.
    #[error("mountpoint {path} is busy: something is already mounted there (unmount it first: umount {path}, or fusermount3 -u {path})", path = .0.display())]
    Busy(PathBuf),
    /// A FUSE mount whose process is gone is still there.
    #[error("mountpoint {path} is a FUSE mount whose server has gone (transport endpoint is not connected); unmount it first: fusermount3 -u {path}", path = .0.display())]
    Stale(PathBuf),
    /// The mount itself failed.
    #[error("mounting {path} failed: {message}", path = .path.display())]
    Mount {
        /// The mountpoint.
        path: PathBuf,
        /// What fusermount3 or the kernel said, and the fix when known.
        message: String,
    },
    /// The session failed or could not be unmounted.
    #[error("unmounting {} failed", .path.display())]
    Unmount {
        /// The mountpoint.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A live mount. Dropping it unmounts (and waits for the session to end).
pub struct Mounted {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    fs: Arc<LazyFs>,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

/// Mounts `fs` at `mountpoint`; requests run on `runtime`. Returns once
/// the kernel has the mount: paths under it work at once.
pub fn mount(
    fs: Arc<LazyFs>,
    runtime: tokio::runtime::Handle,
    mountpoint: &Path,
    config: &MountConfig,
) -> Result<Mounted, MountError> {
    check_device()?;
    check_fusermount()?;
    let mountpoint = check_mountpoint(mountpoint)?;
    let mut options = Config::default();
    options.mount_options = vec![
        MountOption::FSName("lazystore".to_owned()),
        MountOption::Subtype("lazystore".to_owned()),
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
        MountOption::AutoUnmount,
    ];
    options.acl = if config.allow_other {
        SessionACL::All
    } else {
        SessionACL::RootAndOwner
    };
    options.n_threads = Some(config.threads.max(1));
    options.clone_fd = true;
    let adapter = Adapter::new(fs.clone(), runtime);
    let session = fuser::Session::new(adapter, &mountpoint, &options)
        .and_then(|s| s.spawn())
        .map_err(|e| mount_failed(&mountpoint, e))?;
    tracing::info!("mounted {}", mountpoint.display());
    if config.readahead_kb > 0
        && let Err(e) = set_readahead(&mountpoint, config.readahead_kb)
    {
        // Needs root (sysfs); the mount works without it, only slower.
        tracing::debug!("cannot set the readahead of {}: {e}", mountpoint.display());
    }
    Ok(Mounted {
        session: Some(session),
        mountpoint,
        fs,
    })
}

impl Mounted {
    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The filesystem it serves.
    pub fn fs(&self) -> &Arc<LazyFs> {
        &self.fs
    }

    /// Whether the session has ended: someone unmounted it (e.g.
    /// `fusermount3 -u`) or the kernel connection was aborted.
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Unmounts and waits for the session to end. Blocks: from async code,
    /// call it in `spawn_blocking`. A file still open under the mount
    /// keeps the session alive (the unmount is lazy) until it is closed.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<(), MountError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        // fusermount3's auto_unmount unmounts only a dead filesystem (one
        // it can no longer open), so closing its socket, which is how
        // fuser unmounts, leaves a live session mounted: detach it here.
        // The kernel then ends the connection and the session threads
        // return; fusermount3 finds nothing left to unmount and exits.
        if !session.guard.is_finished()
            && let Err(source) = detach(&self.mountpoint)
        {
            return Err(MountError::Unmount {
                path: self.mountpoint.clone(),
                source,
            });
        }
        let result = session.umount_and_join();
        tracing::info!("unmounted {}", self.mountpoint.display());
        result.map_err(|source| MountError::Unmount {
            path: self.mountpoint.clone(),
            source,
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::warn!("{e}");
        }
    }
}

/// Lazily unmounts `path`: `umount2(MNT_DETACH)` as root, else
/// `fusermount3 -u -z`.
fn detach(path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // Already gone (unmounted from outside).
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
        Some(libc::EPERM) => {
            let status = std::process::Command::new("fusermount3")
                .args(["-u", "-z", "--"])
                .arg(path)
                .status()?;
            if status.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "fusermount3 -u -z failed ({status})"
                )))
            }
        }
        _ => Err(e),
    }
}

/// Sets the readahead of the mount's backing device info, found by the
/// device number of the mounted root.
fn set_readahead(mountpoint: &Path, kb: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint)?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    std::fs::write(
        format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
        kb.to_string(),
    )
}

fn check_device() -> Result<(), MountError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(drop)
        .map_err(MountError::NoFuseDevice)
}

/// Finds `fusermount3` where fuser will look: `$FUSERMOUNT_PATH` if set,
/// else `fusermount3` or `fusermount` on `$PATH` or in `/bin`, `/sbin`.
fn check_fusermount() -> Result<(), MountError> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if let Some(p) = std::env::var_os("FUSERMOUNT_PATH") {
        let p = PathBuf::from(p);
        return if executable(&p) {
            Ok(())
        } else {
            Err(MountError::NoFusermount(format!(
                "$FUSERMOUNT_PATH is {}, which is not an executable file",
                p.display()
            )))
        };
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/bin", "/sbin"].map(PathBuf::from));
    let found = dirs.iter().any(|d| {
        ["fusermount3", "fusermount"]
            .iter()
            .any(|name| executable(&d.join(name)))
    });
    if found {
        Ok(())
    } else {
        Err(MountError::NoFusermount(
            "not on $PATH nor in /bin or /sbin".to_owned(),
        ))
    }
}

/// Checks the mountpoint is a reachable directory with nothing mounted on
/// it, and returns its canonical path.
fn check_mountpoint(path: &Path) -> Result<PathBuf, MountError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(MountError::NotADirectory(path.to_owned())),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(MountError::Stale(path.to_owned()));
        }
        Err(source) => {
            return Err(MountError::Mountpoint {
                path: path.to_owned(),
                source,
            });
        }
    }
    let canonical = path
        .canonicalize()
        .map_err(|source| MountError::Mountpoint {
            path: path.to_owned(),
            source,
        })?;
    if is_mount_point(&canonical) {
        return Err(MountError::Busy(canonical));
    }
    Ok(canonical)
}

/// Whether `path` (canonical) is a mount point, per `/proc/self/mountinfo`.
fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.as_os_str().as_encoded_bytes();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| unescape_mountinfo(p) == wanted)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn mount_failed(path: &Path, e: io::Error) -> MountError {
    let said = e.to_string();
    let hint = if said.contains("user_allow_other") {
        " (allow_other for a non-root user needs user_allow_other in /etc/fuse.conf)"
    } else if e.kind() == io::ErrorKind::NotFound {
        " (is fuse3 installed? try: apt-get install fuse3)"
    } else if e.kind() == io::ErrorKind::PermissionDenied {
        " (mounting needs root, or fusermount3 installed setuid)"
    } else {
        ""
    };
    MountError::Mount {
        path: path.to_owned(),
        message: format!("{}{hint}", said.trim()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), b"/a b");
        assert_eq!(unescape_mountinfo(r"/a\\b"), br"/a\\b");
        assert_eq!(unescape_mountinfo("/plain"), b"/plain");
    }

    #[test]
    fn root_is_a_mount_point() {
        assert!(is_mount_point(Path::new("/")));
        assert!(!is_mount_point(Path::new("/nonexistent-lazystore-dir")));
    }
}
