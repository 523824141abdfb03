//! NAR → castore: splits a NAR stream into blobs and directories while
//! computing its NarHash and NarSize.
//!
//! Everything is written bottom-up: a file's chunks and chunk list while the
//! NAR streams on (up to [`MAX_FILES_IN_FLIGHT`] files are being stored at
//! once, so a NAR of many small files is not one round trip per file), and
//! the directories, leaves first, once every file is stored. The caller
//! publishes a PathInfo only after checking the returned hash and size, so a
//! failed or interrupted ingest leaves unreferenced data at worst, never a
//! path pointing at missing data.

use std::pin::Pin;
use std::task::{Context, Poll};

use lazystore_castore::blobs::BlobError;
use lazystore_castore::{
    Blobs, Directory, DirectoryError, DirectoryService, Node, PathComponent, SymlinkTarget,
    ValidateError,
};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

use crate::nar::{Event, NarError, NarReader};

/// Files whose last chunks and chunk list are being stored while the NAR
/// is read on. Their bytes count against the blob writers' shared
/// in-flight budget, so this bounds tasks, not memory; more of them make
/// larger group commits when a NAR holds many small files. An object
/// store's pack waits for its writers to pause before it is stored, so
/// this decides its size: importing an 8,762-file, 303 MB Python tree
/// into Garage (`tests/s3_bench.rs`, release) took 9.9 s and 77 PUTs with
/// 256, 4.9 s and 31 PUTs with 1,024; the redb store is unchanged.
pub const MAX_FILES_IN_FLIGHT: usize = 1024;

/// Bytes moved from the NAR into a blob writer per read: a chunk's worth.
const CONTENT_BUFFER: usize = 256 * 1024;

/// What ingesting a NAR produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ingested {
    /// The root node of the tree.
    pub root: Node,
    /// Length of the NAR in bytes.
    pub nar_size: u64,
    /// SHA-256 of the NAR.
    pub nar_sha256: [u8; 32],
}

impl Ingested {
    /// The PathInfo publishing this tree as `store_path`, with its
    /// NarHash and NarSize and nothing else: no references, signatures,
    /// deriver or CA (a caller sets those it knows).
    pub fn path_info(&self, store_path: crate::StorePath) -> crate::pathinfos::PathInfo {
        crate::pathinfos::PathInfo {
            store_path,
            root: self.root.clone(),
            references: Vec::new(),
            nar_size: self.nar_size,
            nar_sha256: self.nar_sha256,
            signatures: Vec::new(),
            deriver: None,
            ca: None,
        }
    }
}

/// Why a NAR could not be ingested.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The NAR is malformed or could not be read.
    #[error(transparent)]
    Nar(#[from] NarError),
    /// Storing file contents failed.
    #[error("storing file contents")]
    Blob(#[from] BlobError),
    /// Storing a directory failed.
    #[error("storing a directory")]
    Directory(#[from] DirectoryError),
    /// The NAR holds something castore can't represent.
    #[error(transparent)]
    Validate(#[from] ValidateError),
    /// A file's contents were not the length its header said.
    #[error("file contents ended after {got} of {size} bytes")]
    ShortFile {
        /// Length in the NAR header.
        size: u64,
        /// Bytes read.
        got: u64,
    },
}

/// Reads a NAR from `reader` into the stores and returns its root node,
/// NarSize and NarHash. The NAR is checked as Nix checks it, in constant
/// memory apart from the directories still open.
pub async fn ingest_nar<R>(
    blobs: &Blobs,
    directories: &dyn DirectoryService,
    reader: R,
) -> Result<Ingested, IngestError>
where
    R: AsyncRead + Unpin + Send,
{
    ingest_hashed_nar(blobs, directories, HashingReader::new(reader)).await
}

/// A NAR stream that counts and hashes the bytes it yields itself, so the
/// SHA-256 can be computed off the ingesting task (on the thread that
/// decompresses, say).
pub trait HashedNar: AsyncRead + Unpin + Send {
    /// The number of bytes yielded and their SHA-256. Called only after
    /// the stream has ended (a read returned no bytes); it must cover
    /// exactly the bytes yielded.
    fn finish(self) -> (u64, [u8; 32]);
}

/// Counts and SHA-256-hashes NAR bytes, for a [`HashedNar`] to use.
#[derive(Clone, Default)]
pub struct NarDigest {
    hasher: Sha256,
    count: u64,
}

impl NarDigest {
    /// Nothing hashed yet.
    pub fn new() -> Self {
        NarDigest::default()
    }

    /// Adds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.count += bytes.len() as u64;
    }

    /// The number of bytes and their SHA-256.
    pub fn finish(self) -> (u64, [u8; 32]) {
        (self.count, self.hasher.finalize().into())
    }
}

/// [`ingest_nar`] for a stream that hashes itself.
pub async fn ingest_hashed_nar<R: HashedNar>(
    blobs: &Blobs,
    directories: &dyn DirectoryService,
    reader: R,
) -> Result<Ingested, IngestError> {
    let mut nar = NarReader::new(reader);
    // Directories still open, innermost last, with the name each has in its
    // parent (None for the root).
    let mut open: Vec<(Option<PathComponent>, Directory)> = Vec::new();
    // Closed directories, leaves first: stored once every file is.
    let mut closed: Vec<Directory> = Vec::new();
    let mut files_in_flight = tokio::task::JoinSet::new();
    let mut root = None;
    let mut buf = vec![0u8; CONTENT_BUFFER];

    while let Some(event) = nar.next().await? {
        let (name, node) = match event {
            Event::DirectoryStart { name } => {
                open.push((
                    name.map(PathComponent::try_from).transpose()?,
                    Directory::new(),
                ));
                continue;
            }
            Event::DirectoryEnd => {
                let (name, dir) = open.pop().expect("the reader balances directories");
                let node = Node::directory(&dir);
                closed.push(dir);
                (name, node)
            }
            Event::File {
                name,
                executable,
                size,
            } => {
                let mut writer = blobs.writer().await?;
                let mut got = 0u64;
                loop {
                    let n = nar.read_content(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    got += n as u64;
                    writer.write(&buf[..n]).await?;
                }
                if got != size {
                    return Err(IngestError::ShortFile { size, got });
                }
                let (digest, _, stored) = writer.finish_in_background().await?;
                files_in_flight.spawn(stored);
                while files_in_flight.len() > MAX_FILES_IN_FLIGHT {
                    join_file(&mut files_in_flight).await?;
                }
                let name = name.map(PathComponent::try_from).transpose()?;
                (
                    name,
                    Node::File {
                        digest,
                        size,
                        executable,
                    },
                )
            }
            Event::Symlink { name, target } => {
                let name = name.map(PathComponent::try_from).transpose()?;
                (
                    name,
                    Node::Symlink {
                        target: SymlinkTarget::try_from(target)?,
                    },
                )
            }
        };
        match (open.last_mut(), name) {
            (Some((_, parent)), Some(name)) => parent.add(name, node)?,
            // The reader only produces a nameless node at the root.
            _ => root = Some(node),
        }
    }
    while !files_in_flight.is_empty() {
        join_file(&mut files_in_flight).await?;
    }
    directories.put_all(closed).await?;
    let hashing = nar.into_inner();
    let (nar_size, nar_sha256) = hashing.finish();
    Ok(Ingested {
        root: root.expect("a complete NAR has a root node"),
        nar_size,
        nar_sha256,
    })
}

/// Waits for one file being stored in the background.
async fn join_file(
    files: &mut tokio::task::JoinSet<Result<Result<(), BlobError>, tokio::task::JoinError>>,
) -> Result<(), IngestError> {
    match files.join_next().await {
        Some(Ok(Ok(stored))) => Ok(stored?),
        Some(Ok(Err(e)) | Err(e)) => Err(BlobError::Internal(e.into()).into()),
        None => Ok(()),
    }
}

/// Counts and SHA-256-hashes the bytes read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R> HashingReader<R> {
    /// Hashes what is read from `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes read so far and their SHA-256.
    pub fn finish(self) -> (u64, [u8; 32]) {
        (self.count, self.hasher.finalize().into())
    }
}

impl<R: AsyncRead + Unpin + Send> HashedNar for HashingReader<R> {
    fn finish(self) -> (u64, [u8; 32]) {
        HashingReader::finish(self)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for HashingReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let new = &buf.filled()[before..];
            self.count += new.len() as u64;
            self.hasher.update(new);
        }
        poll
    }
}
