//! The fuser side: turns kernel requests into [`LazyFs`] calls and their
//! results into replies. Every request that may wait on the store runs as
//! a task on the Tokio runtime, so the fuser threads only dispatch and no
//! request waits behind another; requests answered from memory (getattr,
//! readlink, forget) are answered in place.
//!
//! Kernel caching is set up here: entries and attributes of store content
//! are cached for [`CONTENT_TTL`]; opens are skipped altogether where the
//! kernel allows it (an open answered ENOSYS tells it to stop sending
//! them, and it then keeps the page cache across opens) unless passthrough
//! is on, which chooses a backing file at open (`passthrough.rs`), and
//! directory opens are skipped unless the root is listable; readdirplus,
//! symlink caching, parallel directory operations and the largest reads
//! the kernel allows are asked for at init.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::error::FsError;
use crate::failed_reads::FailedReads;
use crate::fs::{Attr, CONTENT_TTL, FileKind, LazyFs};
use crate::inode::Ino;
use crate::passthrough::{MIN_SIZE as PASSTHROUGH_MIN_SIZE, OpenAs};

/// Kernel requests queued in the background (readahead) at most.
const MAX_BACKGROUND: u16 = 64;

/// How long after a release a file read through the chunks is written
/// out whole for passthrough (see `release`).
const WRITE_OUT_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) struct Adapter {
    fs: Arc<LazyFs>,
    /// Reads that just failed, failed again at once when the kernel asks
    /// again for the same reader (`failed_reads.rs`).
    failed_reads: Arc<FailedReads>,
    runtime: tokio::runtime::Handle,
    /// Whether opens are answered ENOSYS (the kernel supports skipping them).
    no_open: bool,
    /// Whether directory opens are answered ENOSYS: when the kernel
    /// supports it and the root is not listable (a listable root needs a
    /// handle, to keep its listing stable, and no kernel caching).
    no_opendir: bool,
}

impl Adapter {
    pub(crate) fn new(fs: Arc<LazyFs>, runtime: tokio::runtime::Handle) -> Self {
        Adapter {
            fs,
            failed_reads: Arc::default(),
            runtime,
            no_open: false,
            no_opendir: false,
        }
    }

    /// Runs a request's task: polled once here, on the fuser thread, and
    /// handed to the runtime only if it must wait (on the store, a fetch
    /// under way, a blocking call). A request answered from memory — most
    /// lookups, and reads of chunks already fetched, as in a walk — is
    /// answered without waking a runtime thread: that handoff (two context
    /// switches a request) was a third of the mount's CPU in a cold walk
    /// of a toolchain. Its first poll runs in the runtime's context, so it
    /// may spawn and set timers; the runtime polls it again with its own
    /// waker, as any future may be.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        use std::task::Context;
        let _runtime = self.runtime.enter();
        let mut task = Box::pin(task);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if task.as_mut().poll(&mut cx).is_pending() {
            self.runtime.spawn(task);
        }
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Directory => FileType::Directory,
        FileKind::File => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino.0),
        size: a.size,
        blocks: a.blocks,
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        // Larger than a page, so tools that size buffers by it read in
        // large pieces; about two average chunks.
        blksize: 128 * 1024,
        flags: 0,
    }
}

/// An entry reply for a name known not to exist, cached like content.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let offered = config.capabilities();
        let wanted = InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_MAX_PAGES
            // Makes the kernel drop cached pages when a file's mtime moves:
            // only the stats file's ever does.
            | InitFlags::FUSE_AUTO_INVAL_DATA;
        // Only what the kernel offers can be asked for.
        let _ = config.add_capabilities(wanted & offered);
        self.no_open = offered.contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
        if let Some(passthrough) = self.fs.passthrough() {
            // SAFETY: geteuid(2) has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            if !root {
                // Backing files need CAP_SYS_ADMIN; without it, answering
                // every open would cost a round trip for nothing.
                passthrough.disable("backing files need root (CAP_SYS_ADMIN)");
            } else if offered.contains(InitFlags::FUSE_PASSTHROUGH)
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                // Backing files on a plain filesystem (depth 0); this mount
                // at depth 1, so an overlay can still stack on it.
                && config.set_max_stack_depth(1).is_ok()
            {
                // Passthrough is chosen at open: opens must be sent.
                self.no_open = false;
            } else {
                passthrough.disable("the kernel does not offer FUSE passthrough");
            }
        }
        self.no_opendir =
            offered.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT) && !self.fs.options().list_root;
        // The largest readahead the kernel accepts; an Err carries it.
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        tracing::debug!(
            no_open = self.no_open,
            no_opendir = self.no_opendir,
            "FUSE session initialised"
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let fs = self.fs.clone();
        let name = name.as_bytes().to_vec();
        self.spawn(async move {
            match fs.lookup(Ino(parent.0), &name).await {
                Ok(a) => reply.entry(&a.ttl, &file_attr(&a), Generation(0)),
                Err(FsError::NotFound { permanent: true }) => {
                    reply.entry(&CONTENT_TTL, &negative_entry(), Generation(0))
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(Ino(ino.0), nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(Ino(ino.0)) {
            Ok(a) => reply.attr(&a.ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(Ino(ino.0)) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if self.no_open {
            // The kernel stops sending opens (and releases) and keeps the
            // page cache of every file: one round trip per file saved.
            return reply.error(Errno::ENOSYS);
        }
        if Ino(ino.0) == Ino::STATS_FILE {
            return reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        }
        if let Some(passthrough) = self.fs.passthrough()
            && let Some((digest, size)) = self.fs.file_blob(Ino(ino.0))
        {
            match passthrough.open(ino.0, &digest, size, |file| reply.open_backing(file)) {
                OpenAs::Backing(id) => {
                    self.fs
                        .counters()
                        .add(&self.fs.counters().passthrough_opens, 1);
                    let cache = passthrough.cache().clone();
                    self.runtime
                        .spawn_blocking(move || cache.touch_file(&digest));
                    return reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), &id);
                }
                OpenAs::Cached => {}
            }
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
        if let Some(passthrough) = self.fs.passthrough()
            && passthrough.release(ino.0)
            && passthrough.usable()
            && let Some((digest, size)) = self.fs.file_blob(Ino(ino.0))
            && size >= PASSTHROUGH_MIN_SIZE
        {
            let (fs, passthrough) = (self.fs.clone(), passthrough.clone());
            let path = self.fs.store_path_of(Ino(ino.0));
            self.spawn(async move {
                // A walk reads each file once: writing its files out whole
                // would read them all again (the first 28 files of a cold
                // walk of a toolchain, before the walk was seen, were 528
                // MB of writes). So a write-out waits a moment and is
                // dropped if the file's path is being streamed by then; a
                // later read through the chunks writes the file out.
                tokio::time::sleep(WRITE_OUT_DELAY).await;
                if path.is_some_and(|p| fs.streaming(&p)) {
                    return;
                }
                let blobs = fs.blobs().clone();
                if passthrough.write_out(blobs, digest, size).await {
                    fs.counters().add(&fs.counters().files_written, 1);
                }
            });
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let pid = req.pid();
        if self.failed_reads.failed_lately(ino.0, pid) {
            return reply.error(Errno::EIO);
        }
        if let Some(traces) = self.fs.traces()
            && Ino(ino.0) != Ino::STATS_FILE
        {
            traces.read(pid, ino.0, || self.fs.store_path_string(Ino(ino.0)));
        }
        let (fs, failed_reads) = (self.fs.clone(), self.failed_reads.clone());
        self.spawn(async move {
            fs.build_started(pid);
            match fs.read(Ino(ino.0), offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    if e.errno() == libc::EIO {
                        failed_reads.record(ino.0, pid);
                    }
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever written; ENOSYS stops the kernel sending flushes.
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.no_opendir {
            // Skipped from now on; listings are cached by the kernel.
            return reply.error(Errno::ENOSYS);
        }
        let fs = self.fs.clone();
        self.spawn(async move {
            let ino = Ino(ino.0);
            match fs.opendir(ino).await {
                // The root's listing changes as paths are added: not cached.
                Ok(fh) if ino == Ino::ROOT => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Ok(fh) => reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
                ),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let fs = self.fs.clone();
        self.spawn(async move {
            let result = fs
                .readdir(Ino(ino.0), fh.0, offset, |e| {
                    reply.add(
                        INodeNo(e.ino.0),
                        e.offset,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    )
                })
                .await;
            match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let fs = self.fs.clone();
        self.spawn(async move {
            let result = fs
                .readdirplus(Ino(ino.0), fh.0, offset, |name, next, a| {
                    reply.add(
                        INodeNo(a.ino.0),
                        next,
                        OsStr::from_bytes(name),
                        &a.ttl,
                        &file_attr(a),
                        Generation(0),
                    )
                })
                .await;
            match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.fs.inode_count() as u64;
        reply.statfs(0, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr_reply(self.fs.getxattr(Ino(ino.0), name.as_bytes()), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(self.fs.listxattr(Ino(ino.0)), size, reply);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Mounted with default_permissions, so the kernel checks modes; it
        // asks only if that option is off.
        if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }

    // Everything below would change the filesystem: EROFS. (The mount is
    // read-only, so the kernel refuses most of these before asking.)

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}

/// Answers an xattr request: the size when asked for it (`size` 0), the
/// value if it fits, else ERANGE.
fn xattr_reply(value: Result<bytes::Bytes, FsError>, size: u32, reply: ReplyXattr) {
    match value {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() <= size as usize => reply.data(&v),
        Ok(_) => reply.error(errno(&FsError::BufferTooSmall)),
        Err(e) => reply.error(errno(&e)),
    }
}
