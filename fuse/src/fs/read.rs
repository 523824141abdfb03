//! Reads: a file's chunk list fetched on its first read (its real digest
//! first, for a file a substituter showed before its contents were
//! stored), the chunks a read overlaps fetched and verified, and
//! readahead for sequential readers.

use lazystore_castore::BlobMeta;

use super::*;

/// Reads within this distance of the previous read's end count as
/// sequential: the kernel sends a sequential reader's requests in parallel
/// and they may arrive out of order.
const SEQUENTIAL_SLACK: u64 = 2 << 20;

/// Readahead starts at this window and doubles on each sequential read.
const READAHEAD_INITIAL: u64 = 1 << 20;

/// Chunks fetched ahead are asked for in batches of about this many bytes,
/// so they arrive in parallel.
const READAHEAD_BATCH: u64 = 1 << 20;

/// Most bytes of a directory's small files in the first window fetched
/// ahead: a few dozen headers or modules.
const SMALL_FILES_BYTES: u64 = 256 << 10;

/// How much larger than the first a window of a directory being walked
/// grows, four times at each: a walk of a large directory gets 16 MiB and
/// 512 chunk lists ahead.
const WINDOW_GROWTH: usize = 64;

/// Most chunk lists of a directory's larger files in the first window.
const CHUNK_LISTS_AHEAD: usize = 8;

impl LazyFs {
    /// Reads up to `size` bytes of file `ino` at `offset`: only the chunks
    /// overlapping the range are fetched (each verified), and a sequential
    /// reader has the following chunks fetched ahead.
    pub async fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Bytes, FsError> {
        let started = Instant::now();
        self.stats.add(&self.stats.reads, 1);
        if ino == Ino::STATS_FILE {
            let text = Bytes::from(self.stats_text());
            let from = (offset as usize).min(text.len());
            let to = (from + size as usize).min(text.len());
            return Ok(text.slice(from..to));
        }
        let inode = self.inode(ino)?;
        let Kind::File {
            digest,
            size: file_size,
            index,
            read_state,
            ..
        } = &inode.kind
        else {
            return Err(match inode.kind {
                Kind::Directory { .. } => FsError::IsADirectory,
                _ => FsError::NotAFile,
            });
        };
        let end = offset.saturating_add(size as u64).min(*file_size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let index = index
            .get_or_try_init(|| self.chunk_index(&inode, digest, *file_size, started))
            .await?;
        let range = index.overlapping(offset, end);
        self.walked(&inode, digest, end);
        self.read_ahead(&inode, index, read_state, offset, end, range.end - 1);
        let digests: Vec<Digest> = index.meta.chunks[range.clone()]
            .iter()
            .map(|c| c.digest)
            .collect();
        let chunks = self
            .chunks
            .get(&digests, &inode.path)
            .await
            .map_err(|e| self.io_error(&inode.path, "reading", &*e))?;
        // A chunk verified against its digest can still contradict the
        // chunk list's sizes, if the store's list is wrong.
        let sizes_match = chunks
            .iter()
            .zip(&index.meta.chunks[range.clone()])
            .all(|(c, entry)| c.len() as u64 == entry.size);
        if !sizes_match {
            return Err(self.io_error(
                &inode.path,
                "reading",
                &Inconsistent("a chunk's length differs from its chunk list entry"),
            ));
        }
        let first_start = index.start(range.start);
        let mut pieces = cut(chunks, offset - first_start, end - first_start);
        let out = if pieces.len() == 1 {
            pieces.pop().expect("one piece")
        } else {
            let mut out = BytesMut::with_capacity((end - offset) as usize);
            for piece in &pieces {
                out.extend_from_slice(piece);
            }
            out.freeze()
        };
        self.stats.add(&self.stats.bytes_read, out.len() as u64);
        Ok(out)
    }

    pub(super) async fn chunk_index(
        &self,
        inode: &Inode,
        digest: &Digest,
        size: u64,
        started: Instant,
    ) -> Result<Arc<ChunkIndex>, FsError> {
        let shown = *digest;
        let traced = self.prefetch_traces(inode);
        let digest = &self.real_file(inode, digest, started).await?;
        let min = self.one_chunk_up_to();
        // Shown as stored (not a placeholder of a path being fetched): its
        // directory's files are stored too. A file a trace being prefetched
        // names has its build's next reads coming already.
        if let Some(min) = min
            && *digest == shown
            && !traced
        {
            self.fetch_neighbours(inode, min);
            self.first_read(inode, digest, min);
        }
        // A file no longer than the chunker's minimum is one chunk, whose
        // digest is the file's (both are the BLAKE3 of the same bytes): its
        // chunk list is known without asking, and its chunk is checked
        // against that digest as any is. One round trip less per small file.
        if let Some(meta) = min.and_then(|min| BlobMeta::one_chunk(*digest, size, min)) {
            return Ok(Arc::new(ChunkIndex::new(meta)));
        }
        let ahead = self
            .chunk_lists_ahead
            .lock()
            .expect("lock poisoned")
            .take(digest);
        if let Some(meta) = ahead.filter(|meta| meta.size == size) {
            return Ok(Arc::new(ChunkIndex::new(meta)));
        }
        let what = || format!("{}: fetching its chunk list", inode.path);
        let meta = retried(&self.options.retry, &self.stats, &what, || {
            self.store.blobs.stat(digest)
        })
        .await
        .map_err(|e| self.io_error(&inode.path, "fetching its chunk list", &e))?;
        self.stats.add(&self.stats.chunk_lists_fetched, 1);
        match meta {
            Some(meta) if meta.size == size => Ok(Arc::new(ChunkIndex::new(meta))),
            Some(_) => Err(self.io_error(
                &inode.path,
                "fetching its chunk list",
                &Inconsistent("the chunk list's size differs from the file's"),
            )),
            None => Err(self.io_error(
                &inode.path,
                "fetching its chunk list",
                &Inconsistent("blob missing from the store"),
            )),
        }
    }

    /// Fetches a directory's files ahead of a build walking it, in
    /// windows: the second file of the directory read asks for the window
    /// from that file on, a read past the middle of the last window for
    /// the next, four times as large (up to [`WINDOW_GROWTH`] times). A
    /// window holds the small files (one chunk each) up to
    /// [`SMALL_FILES_BYTES`], fetched in batches of [`READAHEAD_BATCH`]
    /// within the overall readahead bound, and the chunk lists of up to
    /// [`CHUNK_LISTS_AHEAD`] larger files in one `stat_many`, kept until
    /// their first reads. A build that opens two headers or modules of a
    /// directory opens more of them next, and each would otherwise cost
    /// round trips of its own; one that reads a file here and a file there
    /// pays nothing ahead (500 small files read across 270 directories of a
    /// 1.6 GB closure fetched 86 MB when the first read of each directory
    /// opened a window).
    fn fetch_neighbours(&self, inode: &Inode, min: u64) {
        let Ok(parent) = self.inode(inode.parent) else {
            return;
        };
        let Kind::Directory { dir, ahead, .. } = &parent.kind else {
            return;
        };
        let Some(dir) = dir.get() else {
            return;
        };
        let name = inode.path.rsplit('/').next().unwrap_or_default().as_bytes();
        let (mut small, mut large, mut bytes) = (Vec::new(), Vec::new(), 0);
        {
            let mut ahead = ahead.lock().expect("lock poisoned");
            // The first window from this file on, the next after the last.
            // Each window of a directory being walked is twice the last,
            // up to [`WINDOW_GROWTH`] times the first.
            let resume: Bytes;
            let (from, scale) = match &*ahead {
                Neighbours::None => {
                    *ahead = Neighbours::Seen;
                    return;
                }
                Neighbours::Seen => (std::ops::Bound::Included(name), 1),
                Neighbours::Until {
                    refill_at,
                    resume_after,
                    scale,
                } if name >= &refill_at[..] => {
                    resume = resume_after.clone();
                    let scale = (scale * 4).min(WINDOW_GROWTH);
                    (std::ops::Bound::Excluded(&resume[..]), scale)
                }
                _ => return,
            };
            let mut visited: Vec<&[u8]> = Vec::new();
            let mut full = false;
            for (entry, node) in dir.entries_from(from) {
                match node {
                    Node::File { digest, size, .. } if *size > 0 && *size <= min => {
                        bytes += size;
                        small.push((*digest, *size));
                    }
                    Node::File { digest, size, .. } if *size > min => large.push(*digest),
                    _ => {}
                }
                visited.push(entry.as_bytes());
                if bytes >= SMALL_FILES_BYTES * scale as u64
                    || large.len() >= CHUNK_LISTS_AHEAD * scale
                {
                    full = true;
                    break;
                }
            }
            *ahead = match visited.last() {
                Some(last) if full => Neighbours::Until {
                    refill_at: Bytes::copy_from_slice(visited[visited.len() / 2]),
                    resume_after: Bytes::copy_from_slice(last),
                    scale,
                },
                _ => Neighbours::All,
            };
        }
        self.chunks.prefetch(&small, READAHEAD_BATCH, &parent.path);
        if !large.is_empty() {
            let (blobs, ahead) = (self.store.blobs.clone(), self.chunk_lists_ahead.clone());
            tokio::spawn(async move {
                // A failure costs nothing: each file asks for itself.
                if let Ok(metas) = blobs.stat_many(&large).await {
                    let mut ahead = ahead.lock().expect("lock poisoned");
                    for (digest, meta) in large.into_iter().zip(metas) {
                        if let Some(meta) = meta {
                            ahead.insert(digest, meta);
                        }
                    }
                }
            });
        }
    }

    /// Starts prefetching the traces whose first file `inode` is, if any
    /// (`mount --prefetch`): in the background, into the local cache.
    /// Tells whether a trace being prefetched names the file.
    fn prefetch_traces(&self, inode: &Inode) -> bool {
        let Some(prefetch) = &self.prefetch else {
            return false;
        };
        let path = format!("{}/{}", lazystore_pathinfo::STORE_DIR, inode.path);
        let Some(files) = prefetch.start(&path) else {
            return prefetch.covers(&path);
        };
        self.prefetcher()
            .spawn(format!("the trace starting with {path}"), files);
        true
    }

    /// On the first read of a build session (`mount --prefetch-shared`):
    /// asks the store for the trace of the last build of its name, and
    /// prefetches it, in the background. The read does not wait.
    pub(crate) fn build_started(&self, pid: u32) {
        let Some(prefetch) = &self.prefetch else {
            return;
        };
        let Some((shared, name)) = prefetch.new_build(pid) else {
            return;
        };
        let (prefetcher, prefetch) = (self.prefetcher(), prefetch.clone());
        tokio::spawn(async move {
            match shared.get(&name).await {
                Ok(Some(files)) => {
                    prefetch.add_started(files.clone());
                    prefetcher.spawn(format!("the shared trace of {name}"), files);
                }
                Ok(None) => tracing::debug!("no shared trace of builds named {name}"),
                // Nothing lost: each read fetches what it needs.
                Err(e) => tracing::warn!(
                    "cannot get the shared trace of builds named {name}: {}",
                    error_chain(&e)
                ),
            }
        });
    }

    /// What a prefetch needs, to run in the background: the store and the
    /// counters.
    fn prefetcher(&self) -> Prefetcher {
        Prefetcher {
            store: self.store.clone(),
            stats: self.stats.clone(),
        }
    }

    /// The store chunker's minimum chunk size; `None` while it is not
    /// known (then every chunk list is fetched). Asked of the store once,
    /// in the background, so no read waits on the question (a failed one
    /// is asked again by a later read).
    fn one_chunk_up_to(&self) -> Option<u64> {
        if let Some(known) = self.one_chunk_up_to.get() {
            return Some(*known);
        }
        if !self.asking_chunker.swap(true, Ordering::AcqRel) {
            let (known, asking) = (self.one_chunk_up_to.clone(), self.asking_chunker.clone());
            let blobs = self.store.blobs.clone();
            tokio::spawn(async move {
                // The store's parameters, or those writes to it use when
                // it records none: what cut its files either way.
                match blobs.write_params().await {
                    Ok(params) => {
                        let _ = known.set(u64::from(params.min));
                    }
                    Err(_) => asking.store(false, Ordering::Release),
                }
            });
        }
        None
    }

    /// The real digest of a file shown as `digest`: itself, or for a
    /// substituter's placeholder, the file at its place in the path's
    /// verified contents, once fetched (here, if nobody has).
    ///
    /// `started` is when the read asking began: a download that failed after
    /// it began (while it waited) fails it too, without a download of its own.
    pub(super) async fn real_file(
        &self,
        inode: &Inode,
        digest: &Digest,
        started: Instant,
    ) -> Result<Digest, FsError> {
        match self.paths.file(digest, started).await {
            Ok(Some(real)) => Ok(real),
            Ok(None) => Ok(*digest),
            Err(e) => Err(self.io_error(&inode.path, SUBSTITUTING, &e)),
        }
    }

    /// Updates the reader's position and, if it reads sequentially, starts
    /// fetching the chunks after `last` up to the (doubling) window.
    pub(super) fn read_ahead(
        &self,
        inode: &Inode,
        index: &ChunkIndex,
        state: &Mutex<ReadState>,
        offset: u64,
        end: u64,
        last: usize,
    ) {
        let max = self.options.readahead_bytes;
        let (from, to) = {
            let mut s = state.lock().expect("read state poisoned");
            if offset == 0 {
                // A pass from the start: sequential from here.
                *s = ReadState::default();
            }
            let jump = |s: &mut ReadState| {
                *s = ReadState {
                    started: true,
                    next: end,
                    window: 0,
                    ahead_until: last + 1,
                };
            };
            if max == 0 || (!s.started && offset != 0) {
                jump(&mut s);
                return;
            }
            if s.started {
                if offset + SEQUENTIAL_SLACK < s.next || offset > s.next + SEQUENTIAL_SLACK {
                    jump(&mut s);
                    return;
                }
                if end <= s.next {
                    // Behind the furthest read (a parallel read arriving
                    // late, or a re-read): nothing new to fetch ahead.
                    return;
                }
            }
            s.started = true;
            s.window = (s.window * 2).clamp(READAHEAD_INITIAL.min(max), max);
            s.next = s.next.max(end);
            let limit = s.next + s.window;
            let from = s.ahead_until.max(last + 1);
            let mut to = from;
            while to < index.len() && index.start(to) < limit {
                to += 1;
            }
            s.ahead_until = s.ahead_until.max(to);
            (from, to)
        };
        if from < to {
            let ahead: Vec<(Digest, u64)> = index.meta.chunks[from..to]
                .iter()
                .map(|c| (c.digest, c.size))
                .collect();
            self.chunks.prefetch(&ahead, READAHEAD_BATCH, &inode.path);
        }
    }
}

/// Fetches traces' files into the local cache, counting them.
struct Prefetcher {
    store: lazystore_pathinfo::Store,
    stats: Arc<Stats>,
}

impl Prefetcher {
    /// Prefetches `files` in the background; `what` names them in logs.
    fn spawn(self, what: String, files: Vec<String>) {
        let Prefetcher { store, stats } = self;
        tokio::spawn(async move {
            match lazystore_pathinfo::prefetch::prefetch(&store, &files).await {
                Ok(done) => {
                    stats.add(&stats.prefetched_files, done.files);
                    tracing::info!(
                        "prefetched {what}: {} files, {} bytes, {} requests in {:?}",
                        done.files,
                        done.bytes,
                        done.requests,
                        done.elapsed
                    );
                }
                // Nothing lost: each read fetches what it needs.
                Err(e) => tracing::warn!("prefetching {what}: {}", error_chain(&e)),
            }
        });
    }
}
