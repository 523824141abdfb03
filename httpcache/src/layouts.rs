//! [`Layouts`]: recently used NAR layouts and `.ls` listings, so that a
//! client reading a NAR in many ranges walks its directories once, not
//! once per range, and a listing is written once, not once per request.
//!
//! Entries are keyed by the NarHash *and* the root node: two PathInfos may
//! claim the same NarHash for different trees (a gRPC client writes both),
//! and each must be served from its own tree. Each entry is built once:
//! requests for an entry being built wait for it (single flight) instead
//! of walking the same tree in parallel. An entry larger than the whole
//! bound is served but not kept.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use lazystore_castore::{DirectoryService, Node};
use lazystore_pathinfo::render::{NarLayout, RenderError, nar_layout, nar_listing};
use tokio::sync::OnceCell;

/// Entries kept, at most.
const MAX_ENTRIES: usize = 256;

/// Bytes of entries kept, at most: a layout is about 200 bytes per entry
/// of its tree, so this holds the layouts of a few hundred thousand files.
pub const MAX_BYTES: usize = 64 << 20;

/// The longest `.ls` listing served: larger ones are 404 (Nix does without
/// a listing).
pub const MAX_LISTING_BYTES: usize = 16 << 20;

/// What an entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Layout,
    Listing,
}

/// An entry's key: what it is, of which NAR, from which tree.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    kind: Kind,
    nar_sha256: [u8; 32],
    root: Node,
}

/// A `.ls` listing as served.
#[derive(Clone, Debug)]
pub enum Listing {
    /// The JSON.
    Json(Bytes),
    /// The tree has names that are not UTF-8, which JSON cannot hold.
    NotUtf8,
    /// The JSON would be longer than [`MAX_LISTING_BYTES`].
    TooLarge,
}

#[derive(Clone)]
enum Value {
    Layout(Arc<NarLayout>),
    Listing(Listing),
}

impl Value {
    fn heap_size(&self) -> usize {
        match self {
            Value::Layout(layout) => layout.heap_size(),
            Value::Listing(Listing::Json(json)) => json.len(),
            Value::Listing(_) => 0,
        }
    }
}

type Cell = Arc<OnceCell<Value>>;

/// A bounded, least-recently-used set of layouts and listings.
#[derive(Default)]
pub struct Layouts {
    /// Most recently used first; an entry being built has an empty cell.
    /// A mutex, not an async lock: it is held only to look up, insert or
    /// evict, never across an await.
    entries: Mutex<VecDeque<(Key, Cell)>>,
}

impl Layouts {
    /// The layout of the NAR with hash `nar_sha256` and tree `root`,
    /// walked now if it is not kept.
    pub async fn get(
        &self,
        nar_sha256: [u8; 32],
        directories: &dyn DirectoryService,
        root: &Node,
    ) -> Result<Arc<NarLayout>, RenderError> {
        let key = Key {
            kind: Kind::Layout,
            nar_sha256,
            root: root.clone(),
        };
        let value = self
            .get_or_build(key, || async {
                Ok(Value::Layout(Arc::new(
                    nar_layout(directories, root).await?,
                )))
            })
            .await?;
        match value {
            Value::Layout(layout) => Ok(layout),
            Value::Listing(_) => unreachable!("keyed by kind"),
        }
    }

    /// The `.ls` listing of the NAR with hash `nar_sha256` and tree
    /// `root`, written now if it is not kept.
    pub async fn listing(
        &self,
        nar_sha256: [u8; 32],
        directories: &dyn DirectoryService,
        root: &Node,
    ) -> Result<Listing, RenderError> {
        let key = Key {
            kind: Kind::Listing,
            nar_sha256,
            root: root.clone(),
        };
        let value = self
            .get_or_build(key, || async {
                let listing = nar_listing(directories, root).await?;
                Ok(Value::Listing(if !listing.is_utf8() {
                    Listing::NotUtf8
                } else {
                    let json = listing.to_json();
                    if json.len() > MAX_LISTING_BYTES {
                        Listing::TooLarge
                    } else {
                        Listing::Json(Bytes::from(json))
                    }
                }))
            })
            .await?;
        match value {
            Value::Listing(listing) => Ok(listing),
            Value::Layout(_) => unreachable!("keyed by kind"),
        }
    }

    /// The value under `key`, built by `build` if no other request is
    /// building it; a failed build is kept by no one, and the next request
    /// (or one waiting) builds again.
    async fn get_or_build<F, Fut>(&self, key: Key, build: F) -> Result<Value, RenderError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Value, RenderError>>,
    {
        let cell = {
            let mut entries = self.entries.lock().expect("no panics while held");
            let cell = match entries.iter().position(|(k, _)| *k == key) {
                Some(i) => entries.remove(i).expect("found").1,
                None => Arc::new(OnceCell::new()),
            };
            entries.push_front((key, cell.clone()));
            cell
        };
        if let Some(value) = cell.get() {
            return Ok(value.clone());
        }
        let value = cell.get_or_try_init(build).await.cloned();
        let mut entries = self.entries.lock().expect("no panics while held");
        if value.is_err() && !cell.initialized() {
            // Forget the empty cell unless another request is building it.
            if Arc::strong_count(&cell) == 2 {
                entries.retain(|(_, c)| !Arc::ptr_eq(c, &cell));
            }
        } else {
            evict(&mut entries);
        }
        value
    }

    /// Bytes held, for tests.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        let entries = self.entries.lock().expect("no panics while held");
        entries
            .iter()
            .map(|(_, c)| c.get().map_or(0, Value::heap_size))
            .sum()
    }
}

/// Drops the least recently used entries beyond the bounds, and any single
/// entry larger than the byte bound. Entries being built weigh nothing.
fn evict(entries: &mut VecDeque<(Key, Cell)>) {
    entries.retain(|(_, c)| c.get().is_none_or(|v| v.heap_size() <= MAX_BYTES));
    let size = |c: &Cell| c.get().map_or(0, Value::heap_size);
    let mut bytes: usize = entries.iter().map(|(_, c)| size(c)).sum();
    while entries.len() > MAX_ENTRIES || bytes > MAX_BYTES {
        let (_, evicted) = entries.pop_back().expect("over a bound, so not empty");
        bytes -= size(&evicted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_over_the_bound_is_not_kept() {
        let layouts = Layouts::default();
        let big = Bytes::from(vec![b' '; MAX_BYTES + 1]);
        let small = Bytes::from_static(b"{}");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let root = Node::Symlink {
            target: (&b"x"[..]).try_into().unwrap(),
        };
        let key = |n: u8| Key {
            kind: Kind::Listing,
            nar_sha256: [n; 32],
            root: root.clone(),
        };
        runtime.block_on(async {
            for (n, json) in [(1, small.clone()), (2, big)] {
                let got = layouts
                    .get_or_build(key(n), || async { Ok(Value::Listing(Listing::Json(json))) })
                    .await
                    .unwrap();
                assert!(matches!(got, Value::Listing(Listing::Json(_))));
            }
        });
        assert_eq!(layouts.bytes(), small.len());
        assert_eq!(layouts.entries.lock().unwrap().len(), 1);
    }

    #[test]
    fn concurrent_requests_build_once() {
        let layouts = Arc::new(Layouts::default());
        let builds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let root = Node::Symlink {
            target: (&b"x"[..]).try_into().unwrap(),
        };
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let (layouts, builds, root) = (layouts.clone(), builds.clone(), root.clone());
                tasks.push(tokio::spawn(async move {
                    let key = Key {
                        kind: Kind::Listing,
                        nar_sha256: [7; 32],
                        root,
                    };
                    layouts
                        .get_or_build(key, || async {
                            builds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            Ok(Value::Listing(Listing::NotUtf8))
                        })
                        .await
                        .unwrap()
                }));
            }
            for task in tasks {
                assert!(matches!(
                    task.await.unwrap(),
                    Value::Listing(Listing::NotUtf8)
                ));
            }
        });
        assert_eq!(builds.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
