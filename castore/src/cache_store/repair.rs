//! Bringing the cache file and its in-memory index into agreement: on
//! open, the chunk table of the old inline layout is dropped with its
//! entries and every entry is read into the index (those of an unknown
//! kind removed); after a write that failed part way, the index is read
//! again from the file.

use redb::{ReadableTable, Table, WriteTransaction};

use super::Inner;
use super::accounting::Index;
use super::layout::{
    INLINE_CHUNKS_V1, Key, Kind, LRU, LRU_KEY_LEN, LRU_VALUE_LEN, entry_from_bytes,
};

/// Empties a cache of the inline layout of its chunks (the table and their
/// entries); its chunk lists and directories stay.
pub(super) fn drop_inline_chunks(
    txn: &WriteTransaction,
    lru: &mut Table<'_, &'static [u8; LRU_KEY_LEN], &'static [u8; LRU_VALUE_LEN]>,
) -> Result<(), redb::Error> {
    if !txn.delete_table(INLINE_CHUNKS_V1)? {
        return Ok(());
    }
    let chunks: Vec<[u8; LRU_KEY_LEN]> = lru
        .iter()?
        .filter_map(|item| item.ok().map(|(k, _)| *k.value()))
        .filter(|k| Key::from_bytes(k).is_some_and(|k| k.kind == Kind::Chunk))
        .collect();
    for k in chunks {
        lru.remove(&k)?;
    }
    Ok(())
}

/// Reads every entry into an index, removing any of an unknown kind.
pub(super) fn load_index(
    lru: &mut Table<'_, &'static [u8; LRU_KEY_LEN], &'static [u8; LRU_VALUE_LEN]>,
) -> Result<Index, redb::Error> {
    let mut index = Index::default();
    let mut unknown = Vec::new();
    for item in lru.iter()? {
        let (k, v) = item?;
        match Key::from_bytes(k.value()) {
            Some(key) => index.insert_entry(key, entry_from_bytes(v.value())),
            None => unknown.push(*k.value()),
        }
    }
    for k in unknown {
        lru.remove(&k)?;
    }
    Ok(index)
}

impl Inner {
    /// Rebuilds the index from the file after a write failed part way, so
    /// the two agree again. Holds a write transaction meanwhile, so no other
    /// writer changes either.
    pub(super) fn reload(&self) {
        let result = (|| {
            let txn = self.db.begin_write()?;
            let mut lru = txn.open_table(LRU)?;
            let index = load_index(&mut lru)?;
            drop(lru);
            txn.commit()?;
            Ok::<_, redb::Error>(index)
        })();
        match result {
            Ok(index) => *self.index() = index,
            Err(e) => tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "cache: cannot reload the index after a failed write; its accounting may be off until reopened"
            ),
        }
    }
}
