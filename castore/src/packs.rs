//! Pack files: the chunk bytes of a [`RedbStore`], appended to files beside
//! its redb file, which keeps only where each chunk is.
//!
//! Why not inline in redb: the importer's writer thread spent most of its
//! time in redb's B-tree, re-reading leaf pages full of chunk data to find
//! where the next key goes, and redb gives each large value a power-of-two
//! run of pages (a compacted file was 1.45× the chunk bytes, 2× before
//! compaction). An index of 25-byte entries stays in redb's page cache, and
//! appending to a file is a copy into the kernel's. Figures in
//! `docs/design.md` ("Chunk store").
//!
//! Layout: the directory `<store file stem>.packs/` beside the store file
//! holds `00000001.pack`, `00000002.pack`, …; each starts with
//! [`PACK_MAGIC`] and is a run of encoded chunks back to back, found only
//! through the index. A pack is written until it passes [`PACK_TARGET_BYTES`],
//! then the next one is started. Packs are only appended to: a chunk
//! rewritten (the corruption test hook) is appended again and the index
//! moved.
//!
//! Crash safety rests on one ordering: chunk bytes are in the file before
//! the transaction that indexes them commits, and are fsynced before any
//! commit that makes an index durable ([`Packs::sync`], called by
//! [`RedbStore::commit`] inside the write transaction, which excludes every
//! other writer and so every append). A crash can therefore leave bytes no
//! index names (appended, their transaction lost) but never an index naming
//! bytes that are not on disk. Unnamed bytes are wasted space, as much as
//! the writes a crash loses; appending resumes at the end of the file.
//!
//! One process opens a store at a time (redb's lock on the store file), so
//! one [`Packs`] appends.
//!
//! The local cache keeps its chunk bytes in packs too, aligned to 4 KiB
//! blocks so that evicting a chunk punches its blocks out of the file
//! (`fallocate(PUNCH_HOLE)`) and the space is free at once; a pack left
//! with nothing but its header is deleted. The cache trusts nothing it
//! reads back (every chunk is checked against its digest), so it never
//! fsyncs its packs.
//!
//! [`RedbStore`]: crate::RedbStore
//! [`RedbStore::commit`]: crate::RedbStore::commit

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// First bytes of every pack file.
pub(crate) const PACK_MAGIC: &[u8; 8] = b"LZPACK01";

/// A pack is closed and the next one started once it is this long. Large
/// enough that a 1 TB store is some 2000 files, small enough that a pack
/// is quick to copy or check on its own.
const PACK_TARGET_BYTES: u64 = 512 << 20;

/// Appends are gathered into writes of this size.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

/// Where a chunk's bytes are: pack number, offset in it, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Location {
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
}

/// The pack files of one store.
#[derive(Debug)]
pub(crate) struct Packs {
    dir: PathBuf,
    /// Every chunk starts at a multiple of this (1: none).
    align: u64,
    /// Whether [`Packs::sync`] fsyncs. A cache's packs are never fsynced,
    /// so keeping a handle of each pack written for it would only hold
    /// descriptors (and deleted packs) open for the life of the mount.
    fsync: bool,
    writer: Mutex<Writer>,
    /// Read handles, opened on first use.
    readers: RwLock<HashMap<u32, Arc<File>>>,
}

#[derive(Debug)]
struct Writer {
    /// The pack being appended to: number, buffered handle, length
    /// including what is still buffered. `None` until the first append.
    current: Option<(u32, BufWriter<File>, u64)>,
    /// The highest pack number in the directory.
    last: u32,
    /// Packs written since their last fsync.
    unsynced: Vec<(u32, File)>,
}

impl Packs {
    /// Opens (creating it if need be) the pack directory `dir`; chunks
    /// start at multiples of `align` bytes, and [`Packs::sync`] fsyncs only
    /// if `fsync`.
    pub fn open(dir: &Path, align: u64, fsync: bool) -> io::Result<Packs> {
        std::fs::create_dir_all(dir)?;
        let mut last = 0;
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".pack"))
                .and_then(|n| n.parse::<u32>().ok())
            {
                last = last.max(n);
            }
        }
        Ok(Packs {
            dir: dir.to_owned(),
            align: align.max(1),
            fsync,
            writer: Mutex::new(Writer {
                current: None,
                last,
                unsynced: Vec::new(),
            }),
            readers: RwLock::new(HashMap::new()),
        })
    }

    fn path_of(&self, pack: u32) -> PathBuf {
        self.dir.join(format!("{pack:08}.pack"))
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A panic while appending leaves at worst unnamed bytes.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `data`; where it went. Visible to [`Packs::read`] after the
    /// next [`Packs::flush`].
    pub fn append(&self, data: &[u8]) -> io::Result<Location> {
        let len = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "chunk over 4 GiB"))?;
        let mut w = self.writer();
        if w.current
            .as_ref()
            .is_none_or(|(_, _, end)| *end >= PACK_TARGET_BYTES)
        {
            self.start_pack(&mut w)?;
        }
        let (pack, file, end) = w.current.as_mut().expect("a pack is open");
        let pad = end.next_multiple_of(self.align) - *end;
        if pad > 0 {
            file.write_all(&vec![0; pad as usize])?;
            *end += pad;
        }
        let offset = *end;
        file.write_all(data)?;
        *end += data.len() as u64;
        Ok(Location {
            pack: *pack,
            offset,
            len,
        })
    }

    /// Continues the last pack if it has room, or starts the next.
    fn start_pack(&self, w: &mut Writer) -> io::Result<()> {
        if let Some((pack, file, _)) = w.current.take() {
            let file = file.into_inner().map_err(|e| e.into_error())?;
            if self.fsync && !w.unsynced.iter().any(|(p, _)| *p == pack) {
                w.unsynced.push((pack, file));
            }
        }
        if w.last > 0 {
            let path = self.path_of(w.last);
            match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(file) => {
                    let end = file.metadata()?.len();
                    if end >= PACK_MAGIC.len() as u64 && end < PACK_TARGET_BYTES {
                        w.current = Some((w.last, append_at_end(file, end)?, end));
                        return Ok(());
                    }
                }
                // Emptied by eviction and deleted (a cache's packs): the
                // next number starts a new one.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let pack = w
            .last
            .checked_add(1)
            .ok_or_else(|| io::Error::other("pack numbers exhausted"))?;
        let path = self.path_of(pack);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.write_all(PACK_MAGIC)?;
        // The new name must survive a crash as surely as the bytes in it.
        File::open(&self.dir)?.sync_all()?;
        w.last = pack;
        let end = PACK_MAGIC.len() as u64;
        w.current = Some((pack, append_at_end(file, end)?, end));
        Ok(())
    }

    /// Hands the buffered appends to the kernel, so reads see them. Call
    /// before committing the transaction that indexes them.
    pub fn flush(&self) -> io::Result<()> {
        let mut w = self.writer();
        let Some((pack, file, _)) = w.current.as_mut() else {
            return Ok(());
        };
        let pack = *pack;
        file.flush()?;
        if self.fsync && !w.unsynced.iter().any(|(p, _)| *p == pack) {
            let (_, file, _) = w.current.as_ref().expect("checked above");
            let handle = file.get_ref().try_clone()?;
            w.unsynced.push((pack, handle));
        }
        Ok(())
    }

    /// Flushes, then fsyncs every pack written since its last fsync (if
    /// opened to fsync). Call inside a write transaction, before committing
    /// it durably.
    pub fn sync(&self) -> io::Result<()> {
        self.flush()?;
        let unsynced = std::mem::take(&mut self.writer().unsynced);
        for (_, file) in &unsynced {
            file.sync_data()?;
        }
        Ok(())
    }

    /// The `len` bytes at `at`. Errors name the pack file.
    pub fn read(&self, at: Location) -> io::Result<Vec<u8>> {
        let file = self.reader(at.pack)?;
        read_exact_at(&file, at.len as usize, at.offset).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "reading {} bytes at {} of {}: {e}",
                    at.len,
                    at.offset,
                    self.path_of(at.pack).display()
                ),
            )
        })
    }

    /// Frees the blocks of the chunks at `locations` (in an unaligned pack,
    /// the blocks wholly inside a chunk; the bytes of the others are zeroed)
    /// and, in aligned packs, deletes those left with nothing but their
    /// header, other than the one being written. Reads of them fail from
    /// then on.
    pub fn punch(&self, locations: &[Location]) -> io::Result<()> {
        let mut by_pack: HashMap<u32, Vec<Location>> = HashMap::new();
        for at in locations {
            by_pack.entry(at.pack).or_default().push(*at);
        }
        let current = self.writer().current.as_ref().map(|(p, _, _)| *p);
        for (pack, locations) in by_pack {
            let path = self.path_of(pack);
            let file = match OpenOptions::new().write(true).open(&path) {
                Ok(f) => f,
                // Deleted already: nothing left to free.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("opening {}: {e}", path.display()),
                    ));
                }
            };
            // Neighbours freed together, as one range: a block two small
            // chunks share is freed only by a range covering it whole (one
            // chunk at a time, compacting the builder benchmark's store
            // left 134 MB of 449 allocated).
            let mut ranges: Vec<(u64, u64)> = locations
                .iter()
                .map(|at| {
                    let len = u64::from(at.len).next_multiple_of(self.align);
                    (at.offset, at.offset + len)
                })
                .collect();
            ranges.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
            for (start, end) in ranges {
                match merged.last_mut() {
                    Some(last) if start <= last.1 => last.1 = last.1.max(end),
                    _ => merged.push((start, end)),
                }
            }
            for (start, end) in merged {
                let len = end - start;
                punch_hole(&file, start, len).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("freeing {len} bytes at {start} of {}: {e}", path.display()),
                    )
                })?;
            }
            // Only the header's block left: nothing in it is named any more.
            // Only in aligned packs, where no chunk shares the header's
            // block (in a store's packs a small chunk may sit in it).
            let allocated = std::os::unix::fs::MetadataExt::blocks(&file.metadata()?) * 512;
            if self.align >= 4096 && Some(pack) != current && allocated <= self.align {
                std::fs::remove_file(&path)?;
                self.readers
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&pack);
            }
        }
        Ok(())
    }

    /// Keeps only the bytes of the chunks at `live` (by pack): a pack with
    /// none is deleted, and every byte of the others that no live chunk
    /// takes — chunks dropped from the index, and bytes a crash appended
    /// without indexing them — is punched out. Only with no appends under
    /// way (the caller holds the store, and appends nothing meanwhile).
    pub fn keep_only(&self, live: &HashMap<u32, Vec<Location>>) -> io::Result<()> {
        if self.writer().current.is_some() {
            return Err(io::Error::other(
                "packs were appended to by this process: sweep them from a fresh open",
            ));
        }
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(pack) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pack"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(chunks) = live.get(&pack) else {
                std::fs::remove_file(&path)?;
                self.readers
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&pack);
                continue;
            };
            let mut ranges: Vec<(u64, u64)> = chunks
                .iter()
                .map(|at| (at.offset, at.offset + u64::from(at.len)))
                .collect();
            ranges.sort_unstable();
            let file = OpenOptions::new().write(true).open(&path)?;
            let end = file.metadata()?.len();
            let mut free_from = PACK_MAGIC.len() as u64;
            for (start, stop) in ranges.into_iter().chain([(end, end)]) {
                if start > free_from {
                    punch_hole(&file, free_from, start - free_from).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("freeing space in {}: {e}", path.display()),
                        )
                    })?;
                }
                free_from = free_from.max(stop);
            }
        }
        Ok(())
    }

    /// Bytes the packs take on disk (allocated blocks).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        let mut total = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            total += std::os::unix::fs::MetadataExt::blocks(&entry?.metadata()?) * 512;
        }
        Ok(total)
    }

    fn reader(&self, pack: u32) -> io::Result<Arc<File>> {
        if let Some(f) = self
            .readers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pack)
        {
            return Ok(f.clone());
        }
        let path = self.path_of(pack);
        let file = File::open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
        let file = Arc::new(file);
        self.readers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pack, file.clone());
        Ok(file)
    }
}

/// `len` bytes of `file` at `offset`, read into a buffer that is not zeroed
/// first: zeroing it cost a twentieth of a cold read's CPU.
fn read_exact_at(file: &File, len: usize, offset: u64) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    let mut filled = 0;
    while filled < len {
        let at = libc::off_t::try_from(offset + filled as u64)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
        // SAFETY: pread(2) writes at most `len - filled` bytes into the
        // spare capacity starting at `filled`, which the Vec owns.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().add(filled).cast(),
                len - filled,
                at,
            )
        };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => filled += n as usize,
        }
    }
    // SAFETY: the first `len` bytes were written by pread above.
    unsafe { buf.set_len(len) };
    Ok(buf)
}

/// Deallocates `len` bytes at `offset`, keeping the file's size.
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range out of bounds",
        ));
    };
    // SAFETY: fallocate(2) on an open descriptor; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn append_at_end(mut file: File, end: u64) -> io::Result<BufWriter<File>> {
    use std::io::Seek;
    file.seek(io::SeekFrom::Start(end))?;
    Ok(BufWriter::with_capacity(WRITE_BUFFER_BYTES, file))
}

impl Drop for Packs {
    /// Whatever was appended reaches the disk before the store's last
    /// commit can be made durable by closing it.
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::error!(dir = %self.dir.display(), error = %e, "syncing pack files on close failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_read_back_and_continue_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let packs_dir = dir.path().join("s.packs");
        let a;
        {
            let packs = Packs::open(&packs_dir, 1, true).unwrap();
            a = packs.append(b"hello").unwrap();
            packs.flush().unwrap();
            assert_eq!(packs.read(a).unwrap(), b"hello");
            packs.sync().unwrap();
        }
        let packs = Packs::open(&packs_dir, 1, true).unwrap();
        let b = packs.append(b"world").unwrap();
        packs.flush().unwrap();
        assert_eq!((b.pack, b.offset), (a.pack, a.offset + 5));
        assert_eq!(packs.read(a).unwrap(), b"hello");
        assert_eq!(packs.read(b).unwrap(), b"world");
        let raw = std::fs::read(packs_dir.join("00000001.pack")).unwrap();
        assert_eq!(&raw[..8], PACK_MAGIC);

        // A read past the end names the file.
        let err = packs
            .read(Location {
                pack: 1,
                offset: 1 << 20,
                len: 4,
            })
            .unwrap_err();
        assert!(err.to_string().contains("00000001.pack"), "{err}");
    }

    #[test]
    fn punched_chunks_free_their_blocks_and_empty_packs_go() {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open(&dir.path().join("c.packs"), 4096, false).unwrap();
        let data = vec![0x5a; 10_000];
        let a = packs.append(&data).unwrap();
        let b = packs.append(&data).unwrap();
        assert_eq!((a.offset % 4096, b.offset % 4096), (0, 0));
        packs.flush().unwrap();
        let full = packs.allocated_bytes().unwrap();
        packs.punch(&[a]).unwrap();
        assert_eq!(packs.read(b).unwrap(), data);
        assert!(packs.allocated_bytes().unwrap() <= full - 8192);
        // The pack being written stays even when empty.
        packs.punch(&[b]).unwrap();
        assert!(dir.path().join("c.packs/00000001.pack").exists());
        // Once it is not being written (as after reopening), an empty pack
        // is deleted, and the next append starts a new one.
        packs.writer().current = None;
        packs.punch(&[b]).unwrap();
        assert!(!dir.path().join("c.packs/00000001.pack").exists());
        assert!(packs.read(b).is_err());
        let c = packs.append(&data).unwrap();
        packs.flush().unwrap();
        assert_eq!(c.pack, 2);
        assert_eq!(packs.read(c).unwrap(), data);
    }

    /// In an unaligned pack, small neighbours freed in one call free the
    /// blocks they share; a chunk beside them keeps its bytes.
    #[test]
    fn small_neighbours_punched_together_free_their_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open(&dir.path().join("s.packs"), 1, false).unwrap();
        let small: Vec<Location> = (0..40).map(|_| packs.append(&[7; 1000]).unwrap()).collect();
        let kept = packs.append(&[9; 3000]).unwrap();
        packs.flush().unwrap();
        let full = packs.allocated_bytes().unwrap();
        packs.punch(&small).unwrap();
        // 40,000 bytes in a row hold at least eight whole 4 KiB blocks;
        // one chunk at a time (1,000 bytes each) would free none.
        assert!(packs.allocated_bytes().unwrap() + 8 * 4096 <= full);
        assert_eq!(packs.read(kept).unwrap(), vec![9; 3000]);
    }
}
