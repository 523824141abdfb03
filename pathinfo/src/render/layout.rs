//! Where everything is in a tree's NAR, from its directories alone:
//! [`nar_layout`] records where each file's contents sit in the NAR and
//! keeps every other byte (tokens, names, targets, padding), so that a
//! range of the NAR can be served by seeking (`range.rs`) instead of
//! rendering from the start. [`nar_listing`] is the same walk written as a
//! [`Listing`] (`.ls`).

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use lazystore_castore::{Digest, Directory, DirectoryError, DirectoryService, Node, PathComponent};

use super::{MAX_NAR_SIZE, RenderError};
use crate::listing::{Listing, ListingEntry};
use crate::nar::token;

/// Where everything is in the NAR of a tree: every byte that is not file
/// contents (kept, in order, as `structure`) and where each file's contents
/// go between them. Built by [`nar_layout`] from the directories alone;
/// [`render_range`](super::render_range) reads any range of the NAR from it and the blobs.
///
/// Its memory is the NAR's structure (about 200 bytes per entry, a few
/// hundred KiB for a large package) plus one record per non-empty file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarLayout {
    /// NarSize.
    pub(super) size: u64,
    /// The NAR with every file's contents cut out.
    pub(super) structure: Bytes,
    /// Non-empty files, in NAR order.
    pub(super) files: Vec<FileSpan>,
}

/// One file's contents in a [`NarLayout`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct FileSpan {
    /// Where its contents start in the NAR.
    pub(super) nar_offset: u64,
    /// Length of its contents.
    pub(super) size: u64,
    /// Where the NAR resumes in `structure` after the contents.
    pub(super) resume: usize,
    /// Its blob.
    pub(super) digest: Digest,
}

impl FileSpan {
    pub(super) fn nar_end(&self) -> u64 {
        self.nar_offset + self.size
    }
}

impl NarLayout {
    /// Length of the NAR (NarSize).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of memory it holds, for caches that bound them.
    pub fn heap_size(&self) -> usize {
        self.structure.len() + self.files.capacity() * std::mem::size_of::<FileSpan>()
    }
}

fn padding(len: u64) -> u64 {
    (8 - len % 8) % 8
}

/// A directory being listed: its name in its parent (none at the root) and
/// its entries so far.
type OpenListing = (Option<PathComponent>, BTreeMap<PathComponent, ListingEntry>);

/// Walks a tree in NAR order, counting NAR offsets, and records the
/// structure bytes, the file spans and the listing entries its users want.
struct Walk {
    /// NAR bytes so far.
    offset: u64,
    /// Whether `offset` went past [`MAX_NAR_SIZE`]: the walk stops with
    /// [`RenderError::TooLarge`] at the next node.
    too_large: bool,
    /// The structure so far, and the file spans, when a layout is wanted.
    layout: Option<(Vec<u8>, Vec<FileSpan>)>,
    /// Open directories' entries with their names, when a listing is
    /// wanted; the finished root lands in `root`.
    listing: Option<Vec<OpenListing>>,
    root: Option<ListingEntry>,
}

impl Walk {
    fn raw(&mut self, bytes: &[u8]) {
        self.advance(bytes.len() as u64);
        if let Some((structure, _)) = &mut self.layout {
            structure.extend_from_slice(bytes);
        }
    }

    /// Counts `n` bytes of NAR, never past [`MAX_NAR_SIZE`].
    fn advance(&mut self, n: u64) {
        match self.offset.checked_add(n) {
            Some(offset) if offset <= MAX_NAR_SIZE => self.offset = offset,
            _ => self.too_large = true,
        }
    }

    fn zeros(&mut self, n: u64) {
        self.raw(&[0; 8][..n as usize]);
    }

    fn str(&mut self, s: &[u8]) {
        self.raw(&(s.len() as u64).to_le_bytes());
        self.raw(s);
        self.zeros(padding(s.len() as u64));
    }

    /// What precedes a node's type: the magic at the root, the entry
    /// header in a directory.
    fn open_node(&mut self, name: Option<&PathComponent>) {
        match name {
            None => self.str(token::MAGIC),
            Some(name) => {
                for t in [token::ENTRY, token::OPEN, token::NAME] {
                    self.str(t);
                }
                self.str(name.as_bytes());
                self.str(token::NODE);
            }
        }
        self.str(token::OPEN);
        self.str(token::TYPE);
    }

    /// After a node's `)`: the entry's `)` if inside a directory.
    fn close_node(&mut self, in_directory: bool) {
        if in_directory {
            self.str(token::CLOSE);
        }
    }

    /// Adds a finished entry to the listing being built.
    fn listed(&mut self, name: Option<&PathComponent>, entry: ListingEntry) {
        let Some(open) = &mut self.listing else {
            return;
        };
        match (open.last_mut(), name) {
            (Some((_, entries)), Some(name)) => {
                entries.insert(name.clone(), entry);
            }
            _ => self.root = Some(entry),
        }
    }

    fn node(
        &mut self,
        tree: &HashMap<Digest, Directory>,
        stack: &mut Vec<(Directory, usize)>,
        name: Option<&PathComponent>,
        node: &Node,
    ) -> Result<(), RenderError> {
        if self.too_large {
            return Err(RenderError::TooLarge);
        }
        let in_directory = name.is_some();
        self.open_node(name);
        match node {
            Node::Directory { digest, .. } => {
                let dir = tree
                    .get(digest)
                    .cloned()
                    .ok_or(RenderError::MissingDirectory(*digest))?;
                self.str(token::DIRECTORY);
                if let Some(open) = &mut self.listing {
                    open.push((name.cloned(), BTreeMap::new()));
                }
                stack.push((dir, 0));
            }
            Node::File {
                digest,
                size,
                executable,
            } => {
                self.str(token::REGULAR);
                if *executable {
                    self.str(token::EXECUTABLE);
                    self.str(b"");
                }
                self.str(token::CONTENTS);
                self.raw(&size.to_le_bytes());
                let nar_offset = self.offset;
                self.advance(*size);
                if self.too_large {
                    return Err(RenderError::TooLarge);
                }
                if let Some((structure, files)) = &mut self.layout
                    && *size > 0
                {
                    files.push(FileSpan {
                        nar_offset,
                        size: *size,
                        resume: structure.len(),
                        digest: *digest,
                    });
                }
                self.zeros(padding(*size));
                self.str(token::CLOSE);
                self.close_node(in_directory);
                self.listed(
                    name,
                    ListingEntry::Regular {
                        size: *size,
                        executable: *executable,
                        nar_offset: Some(nar_offset),
                    },
                );
            }
            Node::Symlink { target } => {
                self.str(token::SYMLINK);
                self.str(token::TARGET);
                self.str(target.as_bytes());
                self.str(token::CLOSE);
                self.close_node(in_directory);
                self.listed(
                    name,
                    ListingEntry::Symlink {
                        target: target.clone(),
                    },
                );
            }
        }
        Ok(())
    }

    /// Walks the tree at `root` in NAR order, its directories fetched (and
    /// verified) first, all at once: one request to a gRPC store, a level
    /// of the tree at a time from an object store, where one request per
    /// directory in walk order cost a round trip each.
    async fn run(
        mut self,
        directories: &dyn DirectoryService,
        root: &Node,
    ) -> Result<Walk, RenderError> {
        let tree = match root {
            Node::Directory { digest, .. } => directories
                .get_recursive(digest)
                .await
                .map_err(|e| match e {
                    DirectoryError::NotFound(d) => RenderError::MissingDirectory(d),
                    e => RenderError::Directory(e),
                })?
                .into_iter()
                .map(|d| (d.digest(), d))
                .collect(),
            _ => HashMap::new(),
        };
        let mut stack: Vec<(Directory, usize)> = Vec::new();
        self.node(&tree, &mut stack, None, root)?;
        while let Some((dir, next)) = stack.last_mut() {
            let Some((name, node)) = dir.entries().nth(*next) else {
                stack.pop();
                self.str(token::CLOSE);
                self.close_node(!stack.is_empty());
                if let Some(open) = &mut self.listing {
                    let (name, entries) = open.pop().expect("opened with the directory");
                    self.listed(name.as_ref(), ListingEntry::Directory { entries });
                }
                continue;
            };
            *next += 1;
            let (name, node) = (name.clone(), node.clone());
            self.node(&tree, &mut stack, Some(&name), &node)?;
        }
        if self.too_large {
            return Err(RenderError::TooLarge);
        }
        Ok(self)
    }
}

/// Lays out the NAR of the tree at `root` from its directories alone (no
/// file is read): see [`NarLayout`].
pub async fn nar_layout(
    directories: &dyn DirectoryService,
    root: &Node,
) -> Result<NarLayout, RenderError> {
    let walk = Walk {
        offset: 0,
        too_large: false,
        layout: Some((Vec::new(), Vec::new())),
        listing: None,
        root: None,
    }
    .run(directories, root)
    .await?;
    let (structure, mut files) = walk.layout.expect("asked for");
    files.shrink_to_fit();
    Ok(NarLayout {
        size: walk.offset,
        structure: Bytes::from(structure),
        files,
    })
}

/// The `.ls` listing of the tree at `root`, with every file's `narOffset`,
/// as Nix writes it for the same NAR.
pub async fn nar_listing(
    directories: &dyn DirectoryService,
    root: &Node,
) -> Result<Listing, RenderError> {
    let walk = Walk {
        offset: 0,
        too_large: false,
        layout: None,
        listing: Some(Vec::new()),
        root: None,
    }
    .run(directories, root)
    .await?;
    Ok(Listing {
        root: walk.root.expect("the walk lists the root"),
    })
}
