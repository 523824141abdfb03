//! [`Layouts`]: recently used NAR layouts, so that a client reading a NAR
//! in many ranges walks its directories once, not once per range.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use lazystore_castore::{DirectoryService, Node};
use lazystore_pathinfo::render::{NarLayout, RenderError, nar_layout};

/// Layouts kept, at most.
const MAX_ENTRIES: usize = 256;

/// Bytes of layouts kept, at most: a layout is about 200 bytes per entry
/// of its tree, so this holds the layouts of a few hundred thousand files.
const MAX_BYTES: usize = 64 << 20;

/// A bounded, least-recently-used set of layouts keyed by NarHash (equal
/// NARs have equal layouts, whatever path they belong to).
#[derive(Default)]
pub struct Layouts {
    /// Most recently used first. A mutex, not an async lock: it is held
    /// only to look up or insert, never across an await.
    entries: Mutex<VecDeque<([u8; 32], Arc<NarLayout>)>>,
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
        {
            let mut entries = self.entries.lock().expect("no panics while held");
            if let Some(i) = entries.iter().position(|(k, _)| *k == nar_sha256) {
                let entry = entries.remove(i).expect("found");
                let layout = entry.1.clone();
                entries.push_front(entry);
                return Ok(layout);
            }
        }
        // Two requests for a new NAR may both walk it; the second insert
        // replaces the first. Cheaper than making one wait on the other.
        let layout = Arc::new(nar_layout(directories, root).await?);
        let mut entries = self.entries.lock().expect("no panics while held");
        entries.retain(|(k, _)| *k != nar_sha256);
        entries.push_front((nar_sha256, layout.clone()));
        let mut bytes: usize = entries.iter().map(|(_, l)| l.heap_size()).sum();
        while entries.len() > MAX_ENTRIES || (bytes > MAX_BYTES && entries.len() > 1) {
            let (_, evicted) = entries.pop_back().expect("not empty");
            bytes -= evicted.heap_size();
        }
        Ok(layout)
    }
}
