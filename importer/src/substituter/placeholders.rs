//! Placeholders: the in-memory tree a path is shown as before its NAR is
//! fetched (from the cache's listing, or the NAR's first bytes), its
//! digests keyed by a per-mount secret so no content can collide with one,
//! and the check of that shown tree against the verified one once the NAR
//! is ingested.

use std::sync::Arc;

use lazystore_castore::{Digest, Directory, DirectoryError, Node};
use lazystore_pathinfo::listing::ListingEntry;

use super::{FetchError, UpstreamSubstituter};

impl UpstreamSubstituter {
    /// Checks the shown tree `shown` against the ingested `real` one;
    /// returns each placeholder file with its real digest.
    pub(super) async fn verify(
        &self,
        shown: &Node,
        real: &Node,
    ) -> Result<Vec<(Digest, Digest)>, FetchError> {
        let mut resolved = Vec::new();
        let mut stack = vec![(shown.clone(), real.clone(), String::from("/"))];
        while let Some((shown, real, at)) = stack.pop() {
            let differs = || FetchError::Listing(Arc::from(at.as_str()));
            match (shown, real) {
                (
                    Node::File {
                        digest: placeholder,
                        size: s,
                        executable: x,
                    },
                    Node::File {
                        digest,
                        size,
                        executable,
                    },
                ) if s == size && x == executable => resolved.push((placeholder, digest)),
                (Node::Symlink { target: s }, Node::Symlink { target }) if s == target => {}
                (Node::Directory { digest: s, .. }, Node::Directory { digest, .. }) => {
                    let shown_dir = self.listed_directory(&s).ok_or_else(differs)?;
                    let real_dir = self
                        .directories
                        .get(&digest)
                        .await
                        .map_err(|e| FetchError::Store(Arc::new(e)))?
                        .ok_or_else(|| {
                            FetchError::Store(Arc::new(DirectoryError::NotFound(digest)))
                        })?;
                    if shown_dir.len() != real_dir.len() {
                        return Err(differs());
                    }
                    for ((n1, c1), (n2, c2)) in shown_dir.entries().zip(real_dir.entries()) {
                        let below = format!(
                            "{at}{}{}",
                            String::from_utf8_lossy(n1.as_bytes()),
                            if matches!(c1, Node::Directory { .. }) {
                                "/"
                            } else {
                                ""
                            }
                        );
                        if n1 != n2 {
                            return Err(FetchError::Listing(below.into()));
                        }
                        stack.push((c1.clone(), c2.clone(), below));
                    }
                }
                _ => return Err(differs()),
            }
        }
        Ok(resolved)
    }
}

/// The placeholders a listing's tree is made of.
#[derive(Default)]
pub(super) struct Tree {
    pub(super) files: Vec<Digest>,
    pub(super) dirs: Vec<(Digest, Arc<Directory>)>,
}

impl Tree {
    /// The node for listing entry `entry` at `within` (the store path's
    /// basename, then `/name` per level), collecting placeholders.
    pub(super) fn node(
        &mut self,
        key: &[u8; 32],
        entry: &ListingEntry,
        within: &mut Vec<u8>,
    ) -> Node {
        match entry {
            ListingEntry::Regular {
                size, executable, ..
            } => {
                let digest = placeholder(key, b'f', within);
                self.files.push(digest);
                Node::File {
                    digest,
                    size: *size,
                    executable: *executable,
                }
            }
            ListingEntry::Symlink { target } => Node::Symlink {
                target: target.clone(),
            },
            ListingEntry::Directory { entries } => {
                let mut dir = Directory::new();
                for (name, child) in entries {
                    let len = within.len();
                    within.push(b'/');
                    within.extend_from_slice(name.as_bytes());
                    let node = self.node(key, child, within);
                    within.truncate(len);
                    dir.add(name.clone(), node)
                        .expect("listing names are valid and sorted");
                }
                // A placeholder too: a real digest here could equal a real
                // directory's (every empty directory's, say) elsewhere.
                let digest = placeholder(key, b'd', within);
                let size = dir.size();
                self.dirs.push((digest, Arc::new(dir)));
                Node::Directory { digest, size }
            }
        }
    }
}

/// A placeholder digest for the file (`kind` b'f') or directory (b'd') at
/// `within`, or for a path's unfetched root directory (b'r').
pub(super) fn placeholder(key: &[u8; 32], kind: u8, within: &[u8]) -> Digest {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&[kind]);
    h.update(within);
    Digest::from(h.finalize())
}

/// A key no one else knows, so no content hashes to a placeholder.
pub(super) fn rand_key() -> [u8; 32] {
    use rand::TryRng as _;
    let mut key = [0u8; 32];
    if rand::rngs::SysRng.try_fill_bytes(&mut key).is_err() {
        // No OS randomness: a key from the clock and the process still
        // differs per mount, and content would have to be made for it.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let seed = format!("{}:{}", std::process::id(), now.as_nanos());
        key = *blake3::hash(seed.as_bytes()).as_bytes();
    }
    key
}
