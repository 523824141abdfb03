//! The embedded store: one redb file holding the chunk index, blob chunk
//! lists and directories, with the chunker parameters it was made with, and
//! the chunk bytes in pack files beside it (`packs.rs`).
//!
//! [`RedbStore`] owns the shared `Arc<Database>`; the blob and directory
//! backends (and the path-info backend in `lazystore-pathinfo`, which adds its
//! own table to the same file) are built from it. Keeping everything in one
//! file gives one linear commit history, so a commit that publishes something
//! also makes durable everything committed before it.
//!
//! That history is also what makes deferred fsyncs safe: a crash loses a
//! suffix of commits, never one from the middle. Every durable commit goes
//! through [`RedbStore::commit`], which fsyncs the pack files first, so a
//! durable index never names chunk bytes that are not on disk. Chunks are
//! always written without an fsync (a chunk list is checked against the chunks in its own
//! transaction, so losing chunks can't leave a list pointing at nothing);
//! [`SyncMode`] says whether chunk lists and directories are fsynced before
//! they are acknowledged.
//!
//! Tables are declared here, once, with the format version in their names;
//! a layout change gets a new name rather than a silent reinterpretation.
//! The byte layout of each record is documented beside the code that reads
//! it: chunk and blob records in `blobs/redb.rs`, directory records in
//! `directories/redb.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, Table, TableError, TableHandle,
    WriteTransaction,
};

use crate::chunker::{ChunkerParams, InvalidChunkerParams};
use crate::digest::DIGEST_LEN;
use crate::frames::FrameCache;
use crate::packs::Packs;

/// Key of every content-addressed table: a raw BLAKE3 digest.
pub(crate) type DigestKey = &'static [u8; DIGEST_LEN];

/// Chunk digest → where its encoded bytes are in the packs (layout in
/// `blobs/redb.rs`).
pub(crate) const CHUNKS: redb::TableDefinition<DigestKey, &[u8]> =
    redb::TableDefinition::new("chunks-v2");

/// The chunk table of stores that kept chunk bytes inline in redb.
const INLINE_CHUNKS_V1: &str = "chunks-v1";

/// Blob digest → chunk list record (layout in `blobs/redb.rs`).
pub(crate) const BLOBS: redb::TableDefinition<DigestKey, &[u8]> =
    redb::TableDefinition::new("blobs-v1");

/// Directory digest → directory record (layout in `directories/redb.rs`).
pub(crate) const DIRECTORIES: redb::TableDefinition<DigestKey, &[u8]> =
    redb::TableDefinition::new("directories-v1");

/// Chunk digest → when it was quarantined: chunks whose stored bytes
/// failed verification, removed from `chunks-v2` and not written since
/// (`blobs/quarantine.rs`). Storing the chunk again removes its record, so
/// an empty table means nothing is known to be missing.
///
/// Record layout, 8 bytes: seconds since the Unix epoch, u64 little endian.
pub(crate) const QUARANTINE: redb::TableDefinition<DigestKey, u64> =
    redb::TableDefinition::new("quarantine-v1");

/// Store-wide settings, written when the file is created. Only opening the
/// store reads or writes it, so it is not part of [`Tables`].
const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta-v1");

/// `meta-v1` key of the chunker parameters.
///
/// Record layout, 12 bytes, little endian:
///
/// | offset | size | field |
/// |--------|------|-------|
/// | 0      | 4    | min   |
/// | 4      | 4    | avg   |
/// | 8      | 4    | max   |
const META_CHUNKER: &str = "chunker-params";
const CHUNKER_MIN_AT: usize = 0;
const CHUNKER_AVG_AT: usize = 4;
const CHUNKER_MAX_AT: usize = 8;
const CHUNKER_LEN: usize = 12;

/// The castore tables of one write transaction, opened together.
pub(crate) struct Tables<'txn> {
    pub chunks: Table<'txn, DigestKey, &'static [u8]>,
    pub blobs: Table<'txn, DigestKey, &'static [u8]>,
    pub directories: Table<'txn, DigestKey, &'static [u8]>,
    pub quarantine: Table<'txn, DigestKey, u64>,
}

impl<'txn> Tables<'txn> {
    pub fn new(txn: &'txn WriteTransaction) -> Result<Self, TableError> {
        Ok(Tables {
            chunks: txn.open_table(CHUNKS)?,
            blobs: txn.open_table(BLOBS)?,
            directories: txn.open_table(DIRECTORIES)?,
            quarantine: txn.open_table(QUARANTINE)?,
        })
    }
}

/// The castore tables of one read transaction, opened together.
pub(crate) struct ReadTables {
    pub chunks: ReadOnlyTable<DigestKey, &'static [u8]>,
    pub blobs: ReadOnlyTable<DigestKey, &'static [u8]>,
    pub directories: ReadOnlyTable<DigestKey, &'static [u8]>,
    pub quarantine: ReadOnlyTable<DigestKey, u64>,
}

impl ReadTables {
    pub fn new(txn: &ReadTransaction) -> Result<Self, TableError> {
        Ok(ReadTables {
            chunks: txn.open_table(CHUNKS)?,
            blobs: txn.open_table(BLOBS)?,
            directories: txn.open_table(DIRECTORIES)?,
            quarantine: txn.open_table(QUARANTINE)?,
        })
    }
}

/// Why a redb store could not be opened. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Store paths must be absolute, so a store never depends on the
    /// working directory of whoever opens it.
    #[error("redb store path {0:?} is not absolute")]
    NotAbsolute(PathBuf),
    /// The directory the file goes in could not be created.
    #[error("cannot create the directory of redb store {path:?}")]
    CreateDir {
        /// The store file.
        path: PathBuf,
        /// The filesystem error.
        #[source]
        source: std::io::Error,
    },
    /// The file is open already, in this process or another.
    #[error(
        "redb store {path:?} is already open (by another lazystore?); stop that or use another path"
    )]
    AlreadyOpen {
        /// The store file.
        path: PathBuf,
    },
    /// redb failed: I/O, a file that is not a redb database, corruption.
    #[error("cannot open redb store {path:?}")]
    Database {
        /// The store file.
        path: PathBuf,
        /// redb's error.
        #[source]
        source: redb::Error,
    },
    /// Parameters given for a new store are unusable.
    #[error("cannot create redb store {path:?}")]
    InvalidParams {
        /// The store file.
        path: PathBuf,
        /// What is wrong with them.
        #[source]
        source: InvalidChunkerParams,
    },
    /// The store was made with other chunker parameters. Chunking with these
    /// would store the same files as other chunks, so this is refused.
    #[error(
        "redb store {path:?} was created with chunker parameters {stored:?}, not {requested:?}; \
         open it with the stored parameters or use another path"
    )]
    ParamsMismatch {
        /// The store file.
        path: PathBuf,
        /// What the store records.
        stored: ChunkerParams,
        /// What the caller asked for.
        requested: ChunkerParams,
    },
    /// The store keeps chunk bytes inline (`chunks-v1`), as lazystore did
    /// before pack files. Its contents came from binary caches: import them
    /// again into a new store.
    #[error(
        "redb store {path:?} has the old inline chunk layout; move it away and import the paths again into a new store"
    )]
    OldLayout {
        /// The store file.
        path: PathBuf,
    },
    /// A directory beside the store file (its packs; a cache's packs or
    /// whole files) cannot be used.
    #[error("cannot use the directory {dir:?} beside redb store {path:?}")]
    Packs {
        /// The store file.
        path: PathBuf,
        /// The directory.
        dir: PathBuf,
        /// The filesystem error.
        #[source]
        source: std::io::Error,
    },
    /// The store's settings are unreadable.
    #[error("redb store {path:?} has a malformed {key:?} setting: {reason}")]
    BadMeta {
        /// The store file.
        path: PathBuf,
        /// The `meta-v1` key.
        key: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

/// When a write of a chunk list or directory reaches the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncMode {
    /// Each is fsynced before it is acknowledged: what a caller was told is
    /// stored is still there after a crash. For a store whose writers run in
    /// other processes (a gRPC server) and go on to publish what they were
    /// told is stored. Costs an fsync per blob, 1.5–2 ms on the development
    /// machine: some 500–700 files a second from one writer.
    #[default]
    EveryCommit,
    /// Acknowledged before it reaches the disk, and made durable by the next
    /// durable commit to the same file: a path info published with redb's
    /// default `Durability::Immediate`, [`RedbStore::sync`], or closing the
    /// store (dropping its last clone). A crash loses
    /// the writes since then, newest first, together with the writer that
    /// made them if it runs in the same process, so nobody goes on to publish
    /// on the strength of a lost write. For an importer in the same process
    /// as its store, and for caches. Pages a deferred commit rewrites are
    /// only reused after the next durable one, so sync at least once per
    /// published store path.
    Deferred,
}

/// How to open a [`RedbStore`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedbOptions {
    /// Chunker parameters: used to create a new store, and checked against
    /// an existing one. `None` creates with the defaults and opens an
    /// existing store with whatever it records.
    pub params: Option<ChunkerParams>,
    /// When chunk lists and directories reach the disk.
    pub sync: SyncMode,
}

/// One redb file holding a castore: chunks, blobs and directories.
///
/// Cheap to clone; every clone shares one `Database`. Build the services
/// with [`RedbBlobService::new`] and [`RedbDirectoryService::new`], and
/// [`Blobs`] with [`RedbStore::params`].
///
/// [`RedbBlobService::new`]: crate::blobs::RedbBlobService::new
/// [`RedbDirectoryService::new`]: crate::directories::RedbDirectoryService::new
/// [`Blobs`]: crate::Blobs
#[derive(Clone, Debug)]
pub struct RedbStore {
    // Before `db`: the last clone syncs the packs (dropping them) before it
    // closes the database, whose close may make the index durable.
    packs: Arc<Packs>,
    /// Frames read lately (`frames.rs`).
    frames: Arc<FrameCache>,
    db: Arc<Database>,
    path: Arc<Path>,
    params: ChunkerParams,
    sync: SyncMode,
}

impl RedbStore {
    /// Opens the store at `path` with the default [`RedbOptions`]: creates
    /// it (and its directory) with the default chunker parameters if it does
    /// not exist; an existing store keeps the parameters it was made with
    /// (see [`RedbStore::params`]); every commit is fsynced.
    ///
    /// Blocks on file I/O (and on a repair after a crash): call it before
    /// serving, or from `spawn_blocking`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        Self::open_with(path, RedbOptions::default())
    }

    /// Opens the store at `path` with `options`. Fails if `options.params`
    /// differ from the parameters an existing store was made with.
    pub fn open_with(path: impl AsRef<Path>, options: RedbOptions) -> Result<Self, OpenError> {
        let path = path.as_ref();
        let requested = options.params;
        if !path.is_absolute() {
            return Err(OpenError::NotAbsolute(path.to_owned()));
        }
        // Checked before anything is created, so bad parameters leave no file.
        if let Some(params) = requested {
            params
                .validate()
                .map_err(|source| OpenError::InvalidParams {
                    path: path.to_owned(),
                    source,
                })?;
        }
        let db_err = |source: redb::Error| OpenError::Database {
            path: path.to_owned(),
            source,
        };
        let db = create_database(path, Some(REDB_CACHE_BYTES))?;

        // Read the recorded parameters first, so an existing store is opened
        // without a write.
        let (stored, has_quarantine) = {
            let txn = db.begin_read().map_err(|e| db_err(e.into()))?;
            let tables: Vec<String> = txn
                .list_tables()
                .map_err(|e| db_err(e.into()))?
                .map(|t| t.name().to_owned())
                .collect();
            if tables.iter().any(|t| t == INLINE_CHUNKS_V1) {
                return Err(OpenError::OldLayout {
                    path: path.to_owned(),
                });
            }
            let stored = match txn.open_table(META) {
                Ok(meta) => read_params(path, &meta)?,
                Err(TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(db_err(e.into())),
            };
            (stored, tables.iter().any(|t| t == QUARANTINE.name()))
        };
        let params = match (stored, requested) {
            (Some(stored), Some(requested)) if stored != requested => {
                return Err(OpenError::ParamsMismatch {
                    path: path.to_owned(),
                    stored,
                    requested,
                });
            }
            (Some(stored), _) => {
                // A store made before quarantine gets the table once, so
                // read transactions can open it from then on.
                if !has_quarantine {
                    create_tables(&db).map_err(db_err)?;
                }
                stored
            }
            (None, requested) => {
                let params = requested.unwrap_or_default();
                create(&db, params).map_err(db_err)?;
                params
            }
        };
        let dir = packs_dir(path);
        // Unaligned, and fsynced before every durable commit.
        let packs = Packs::open(&dir, 1, true).map_err(|source| OpenError::Packs {
            path: path.to_owned(),
            dir,
            source,
        })?;
        Ok(RedbStore {
            packs: Arc::new(packs),
            frames: Arc::default(),
            db: Arc::new(db),
            path: path.into(),
            params,
            sync: options.sync,
        })
    }

    /// Makes every commit so far durable: an empty commit with an fsync.
    /// Blocks: call it from `spawn_blocking`.
    pub fn sync(&self) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        self.commit(txn, redb::Durability::Immediate)
    }

    /// Commits `txn` with `durability`. Every commit to the store's file
    /// goes through here: a durable one fsyncs the pack files first, inside
    /// the transaction (so no append can slip in between), and only then
    /// makes the index durable.
    pub fn commit(
        &self,
        mut txn: redb::WriteTransaction,
        durability: redb::Durability,
    ) -> Result<(), redb::Error> {
        txn.set_durability(durability)?;
        if matches!(durability, redb::Durability::None) {
            self.packs.flush()?;
        } else {
            self.packs.sync()?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Gives the index file's free pages back (redb's `compact`): what
    /// rewriting records left behind (a compaction moves every chunk's
    /// record). The file's size before and after, or `None` if another
    /// handle on the store (a service, a clone) is still open. Blocks;
    /// call it on a blocking thread, offline.
    pub fn compact_index(&mut self) -> Result<Option<(u64, u64)>, redb::Error> {
        let size = || std::fs::metadata(&*self.path).map(|m| m.len());
        let before = size().map_err(redb::Error::Io)?;
        let Some(db) = Arc::get_mut(&mut self.db) else {
            return Ok(None);
        };
        while db.compact().map_err(redb::Error::from)? {}
        Ok(Some((before, size().map_err(redb::Error::Io)?)))
    }

    /// The pack files of the chunk bytes.
    pub(crate) fn packs(&self) -> &Packs {
        &self.packs
    }

    pub(crate) fn frames(&self) -> &FrameCache {
        &self.frames
    }

    /// When chunk lists and directories reach the disk.
    pub fn sync_mode(&self) -> SyncMode {
        self.sync
    }

    /// The durability of a chunk-list or directory commit.
    pub(crate) fn durability(&self) -> redb::Durability {
        match self.sync {
            SyncMode::EveryCommit => redb::Durability::Immediate,
            SyncMode::Deferred => redb::Durability::None,
        }
    }

    /// The chunker parameters this store was made with; chunk every blob
    /// written to it with these.
    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// The database, for backends of other crates that keep their tables in
    /// the same file. Commit writes with [`RedbStore::commit`], never
    /// `WriteTransaction::commit`: a durable commit must sync the packs.
    pub fn database(&self) -> &Arc<Database> {
        &self.db
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pack directory of the store file `path`: `store.redb` → `store.packs`.
fn packs_dir(path: &Path) -> PathBuf {
    path.with_extension("packs")
}

/// Memory redb may use to cache pages of one file: the chunk index, chunk
/// lists and directories, whose pages are read again and again while
/// importing (is this chunk stored?). redb's default (1 GiB) would dominate
/// the resident size of an import.
const REDB_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Opens or creates the redb file at `path` (and its directory), with a
/// page cache of `cache_bytes` (redb's default when `None`); the errors
/// name the file.
pub(crate) fn create_database(
    path: &Path,
    cache_bytes: Option<usize>,
) -> Result<Database, OpenError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
            path: path.to_owned(),
            source,
        })?;
    }
    let mut builder = Database::builder();
    if let Some(bytes) = cache_bytes {
        builder.set_cache_size(bytes);
    }
    match builder.create(path) {
        Ok(db) => Ok(db),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(OpenError::AlreadyOpen {
            path: path.to_owned(),
        }),
        Err(e) => Err(OpenError::Database {
            path: path.to_owned(),
            source: e.into(),
        }),
    }
}

/// Creates every castore table the file lacks.
fn create_tables(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    Tables::new(&txn)?;
    txn.commit()?;
    Ok(())
}

/// Records `params` and creates every table, in one transaction, so read
/// transactions can open the tables from then on.
fn create(db: &Database, params: ChunkerParams) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        let mut record = [0u8; CHUNKER_LEN];
        record[CHUNKER_MIN_AT..CHUNKER_AVG_AT].copy_from_slice(&params.min.to_le_bytes());
        record[CHUNKER_AVG_AT..CHUNKER_MAX_AT].copy_from_slice(&params.avg.to_le_bytes());
        record[CHUNKER_MAX_AT..CHUNKER_LEN].copy_from_slice(&params.max.to_le_bytes());
        meta.insert(META_CHUNKER, &record[..])?;
        Tables::new(&txn)?;
    }
    txn.commit()?;
    Ok(())
}

/// The parameters recorded in `meta`, or `None` for a store never finished
/// being created.
fn read_params(
    path: &Path,
    meta: &ReadOnlyTable<&str, &[u8]>,
) -> Result<Option<ChunkerParams>, OpenError> {
    let bad = |reason| OpenError::BadMeta {
        path: path.to_owned(),
        key: META_CHUNKER,
        reason,
    };
    let guard = meta.get(META_CHUNKER).map_err(|e| OpenError::Database {
        path: path.to_owned(),
        source: e.into(),
    })?;
    let Some(guard) = guard else {
        return Ok(None);
    };
    let record: [u8; CHUNKER_LEN] = guard.value().try_into().map_err(|_| bad("not 12 bytes"))?;
    let u32_at = |at: usize| u32::from_le_bytes(record[at..at + 4].try_into().expect("4 bytes"));
    let params = ChunkerParams {
        min: u32_at(CHUNKER_MIN_AT),
        avg: u32_at(CHUNKER_AVG_AT),
        max: u32_at(CHUNKER_MAX_AT),
    };
    params
        .validate()
        .map(Some)
        .map_err(|_| bad("parameters out of range"))
}
