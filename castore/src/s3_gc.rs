//! Garbage collection of an `s3://` store ([`S3Store::sweep`]): packs no
//! kept path needs are deleted, packs mostly dead are compacted, while
//! replicas on other machines go on reading and writing. Nothing
//! coordinates replicas but time, so a pack is deleted in two steps, a
//! grace period apart:
//!
//! 1. **Condemn.** A pack older than the grace period whose records are all
//!    dead is condemned: `condemned/<millis>-<pack>`, an empty object (so a
//!    LIST says everything). A pack whose live records are less than
//!    [`COMPACT_BELOW`] of its bytes has them copied into a new pack (and
//!    index) first, then is condemned. Replicas read the condemned packs
//!    with the quarantine records: on a full listing, and at most every
//!    10 s (`STALE_AFTER`) when they list anyway, which a writer asking
//!    what is missing does. From then on a record whose only copy is in a
//!    condemned pack is absent to them: a writer stores it again, a
//!    publication that needs it is refused ("upload the path again"), a
//!    lookup lists for a newer copy (a compaction's).
//! 2. **Delete**, in a later collection, once the condemnation is older
//!    than the grace period. That collection marked first, through a
//!    handle that still sees condemned packs: a record a path came to need
//!    meanwhile (a publication that checked before its replica knew) is
//!    copied out first. Then the pack's index objects are deleted, then
//!    the pack. The condemnation stays [`FORGET_AFTER`] longer, so a
//!    replica that knew the pack's records still counts them absent until
//!    its next full listing (every 6 hours at least) forgets them. A
//!    replica that reads the pack meanwhile gets `PackGone`, lists every
//!    index again and reads the copy. A collection cut short deletes the
//!    rest next time.
//!
//! What this rests on: a publication's check and its PUT are less than the
//! grace period apart (they are one request apart; the grace period is an
//! hour by default), and clocks agree within it (condemnation times are
//! the collector's clock, pack ages the writers').

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::digest::Digest;
use crate::s3_config::S3Error;
use crate::s3_index::{Entry, Kind, Record};
use crate::s3_store::S3Store;
use crate::sweep::Live;

const DIR: &str = "condemned/";

/// How long a deleted pack's condemnation is kept: longer than replicas go
/// between full listings (`FULL_EVERY`, 6 hours).
pub const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

/// A pack whose live records take less than this share of its bytes is
/// compacted: its live records copied into a new pack, it condemned.
/// Half: copying costs each live byte once, and a store never holds more
/// than about twice its live bytes in packs older than the grace period.
pub const COMPACT_BELOW: f64 = 0.5;

/// What a collection of an S3 store did (or, dry, would do).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct S3Swept {
    /// Packs and their bytes before.
    pub packs_before: u64,
    pub bytes_before: u64,
    /// Packs condemned now, of which compacted (live records copied).
    pub condemned: u64,
    pub compacted: u64,
    /// Records and bytes copied out of compacted packs.
    pub copied_records: u64,
    pub copied_bytes: u64,
    /// Dead records in the packs condemned now, by kind.
    pub dead_directories: u64,
    pub dead_blobs: u64,
    pub dead_chunks: u64,
    /// Condemned packs deleted (condemned a grace period ago or more), and
    /// their bytes.
    pub deleted: u64,
    pub deleted_bytes: u64,
    /// Records a path came to need after their pack was condemned, copied
    /// before it was deleted.
    pub rescued: u64,
    /// Packs condemned and not yet old enough to delete.
    pub waiting: u64,
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// One pack as the collection sees it.
#[derive(Default)]
struct Pack {
    bytes: u64,
    /// When its first index was written (the writer's clock).
    written: u64,
    /// Records whose copy read is this pack's: live ones, dead ones.
    live: Vec<((Kind, Digest), Entry)>,
    live_bytes: u64,
    dead: [u64; 3],
}

impl S3Store {
    /// Condemns what `live` does not need, compacts packs mostly dead,
    /// and deletes packs condemned `grace` ago or more (see the module
    /// docs). `live` must come from a mark through
    /// [`S3Store::seeing_condemned`] begun after this store's last
    /// writes. With `dry_run`, only counts.
    pub async fn sweep(
        &self,
        live: &Live,
        grace: Duration,
        dry_run: bool,
    ) -> Result<S3Swept, S3Error> {
        self.list_indexes(true, Instant::now()).await?;
        let now = now_millis();
        let grace_ms = grace.as_millis() as u64;
        let (mut packs, condemned) = self.packs(live);
        let mut swept = S3Swept {
            packs_before: packs.len() as u64,
            bytes_before: packs.values().map(|p| p.bytes).sum(),
            ..S3Swept::default()
        };

        // Delete what was condemned a grace period ago.
        for (pack, at) in &condemned {
            let age = now.saturating_sub(*at);
            if age < grace_ms {
                swept.waiting += 1;
                continue;
            }
            let Some(info) = packs.remove(pack) else {
                // Deleted already: forget it once no replica can still
                // count on it.
                if age >= grace_ms + FORGET_AFTER.as_millis() as u64 && !dry_run {
                    self.delete(&format!("{DIR}{at:013}-{pack}")).await?;
                    let mut known = self.index().known.write().expect("lock poisoned");
                    known.condemned.remove(pack);
                }
                continue;
            };
            swept.deleted += 1;
            swept.deleted_bytes += info.bytes;
            swept.rescued += info.live.len() as u64;
            if dry_run {
                continue;
            }
            if !info.live.is_empty() {
                tracing::warn!(
                    %pack,
                    records = info.live.len(),
                    "copying records a path came to need after their S3 pack was condemned"
                );
                self.copy(&info.live).await?;
            }
            self.delete_pack(pack).await?;
        }

        // Condemn what is dead, compact what is mostly dead.
        let mut order: Vec<(Arc<str>, Pack)> = packs
            .into_iter()
            .filter(|(pack, p)| {
                !condemned.contains_key(pack) && now.saturating_sub(p.written) >= grace_ms
            })
            .collect();
        order.sort_by_key(|(_, p)| p.written);
        for (pack, info) in order {
            if info.live_bytes as f64 >= COMPACT_BELOW * info.bytes as f64 && info.live_bytes > 0 {
                continue;
            }
            swept.condemned += 1;
            swept.dead_directories += info.dead[Kind::Directory as usize];
            swept.dead_blobs += info.dead[Kind::ChunkList as usize];
            swept.dead_chunks += info.dead[Kind::Chunk as usize];
            if !info.live.is_empty() {
                swept.compacted += 1;
                swept.copied_records += info.live.len() as u64;
                swept.copied_bytes += info.live_bytes;
            }
            if dry_run {
                continue;
            }
            if !info.live.is_empty() {
                self.copy(&info.live).await?;
            }
            let at = now_millis();
            self.put(&format!("{DIR}{at:013}-{pack}"), Default::default())
                .await?;
            let mut known = self.index().known.write().expect("lock poisoned");
            known.condemned.insert(pack.clone(), at);
        }
        Ok(swept)
    }

    /// Every known pack with its live and dead records by `live`, and the
    /// condemned ones with when.
    fn packs(&self, live: &Live) -> (HashMap<Arc<str>, Pack>, HashMap<Arc<str>, u64>) {
        let known = self.index().known.read().expect("lock poisoned");
        let mut packs: HashMap<Arc<str>, Pack> = HashMap::new();
        for (pack, bytes) in &known.pack_bytes {
            let written = known.pack_indexes.get(pack).into_iter().flatten();
            let written = written
                .filter_map(|index| index.split('-').next()?.parse().ok())
                .min()
                .unwrap_or(0);
            packs.insert(
                pack.clone(),
                Pack {
                    bytes: *bytes,
                    written,
                    ..Pack::default()
                },
            );
        }
        for (&(kind, digest), entry) in &known.records {
            let pack = &known.packs[entry.pack as usize];
            let Some(p) = packs.get_mut(pack) else {
                continue;
            };
            let needed = match kind {
                Kind::Chunk => live.chunks.contains(&digest),
                Kind::ChunkList => live.blobs.contains(&digest),
                Kind::Directory => live.directories.contains(&digest),
            };
            if needed {
                p.live.push(((kind, digest), *entry));
                p.live_bytes += u64::from(entry.len);
            } else {
                p.dead[kind as usize] += 1;
            }
        }
        (packs, known.condemned.clone())
    }

    /// Stores `records` again, in a new pack.
    async fn copy(&self, records: &[((Kind, Digest), Entry)]) -> Result<(), S3Error> {
        let entries: Vec<Entry> = records.iter().map(|(_, e)| *e).collect();
        let bytes = self.read(&entries).await?;
        let copies = records
            .iter()
            .zip(bytes)
            .map(|(((kind, digest), entry), bytes)| Record {
                kind: *kind,
                digest: *digest,
                encoding: entry.encoding,
                size: entry.size,
                bytes,
            })
            .collect();
        self.write_copies(copies).await
    }

    /// Deletes a condemned pack: its indexes, then the pack.
    async fn delete_pack(&self, pack: &Arc<str>) -> Result<(), S3Error> {
        let indexes = {
            let known = self.index().known.read().expect("lock poisoned");
            known.pack_indexes.get(pack).cloned().unwrap_or_default()
        };
        for index in &indexes {
            self.delete(&format!("index/{index}")).await?;
        }
        self.delete(&format!("packs/{pack}")).await?;
        (self.index().known.write().expect("lock poisoned")).drop_pack(pack);
        Ok(())
    }

    /// Lists the condemned packs now (one LIST), for a check that must
    /// see the latest collection.
    pub async fn refresh_condemned(&self) -> Result<(), S3Error> {
        self.list_condemned().await
    }

    /// Reads the condemned packs (names and times, from one LIST).
    pub(crate) async fn list_condemned(&self) -> Result<(), S3Error> {
        let names = self.list(DIR, None).await?;
        let mut known = self.index().known.write().expect("lock poisoned");
        known.condemned = names
            .iter()
            .filter_map(|name| {
                let (at, pack) = name.split_once('-')?;
                Some((Arc::from(pack), at.parse().ok()?))
            })
            .collect();
        Ok(())
    }
}
