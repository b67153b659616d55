//! Healing: finding what a damaged repository lacks, so that the next
//! backup stores it again instead of building on it.
//!
//! A blob found damaged is quarantined ([`crate::Catalogue::quarantine`]):
//! it loses its index row, so a backup that reads the same content stores
//! it again, and every restore point that used it restores again. A backup
//! that *reads* the content heals it; an incremental that takes unchanged
//! blocks from its parent would instead carry the damage forward. So before
//! an incremental, [`Repository::blocks_to_heal`] names the parent's blocks
//! that are quarantined or gone, and the engine reads them from the source
//! too (more reads than the changed-block source marked, never fewer).

use std::collections::HashSet;
use std::ops::Range;

use crate::BlobId;
use crate::backend::FileKind;
use crate::error::Result;
use crate::repository::Repository;
use crate::store::BlobReader;
use crate::tree::{self, FANOUT, Tree, TreeShape};

/// What [`Repository::refresh_packs`] found.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RefreshReport {
    /// Packs the store no longer holds.
    pub vanished: usize,
    /// Blobs quarantined because their pack vanished unexplained.
    pub quarantined: usize,
    /// Packs indexed that the catalogue did not know.
    pub indexed: usize,
    /// Blobs whose copy was found in another pack.
    pub relocated: usize,
}

impl Repository {
    /// Brings this host's index of packs up to date with the store, which
    /// other hosts (and gc) change: the condemned set from gc records,
    /// packs that vanished, packs it does not know yet. Runs when a cached
    /// repository opens, before a backup and in gc.
    ///
    /// A vanished pack that gc condemned is forgotten quietly; one nobody
    /// condemned (a deleted or lost file) has its blobs quarantined, so
    /// that backups store them again rather than deduplicate against
    /// nothing. Either way, blobs left without a location are looked for in
    /// the other packs' indexes (gc keeps a blob's live copy in another
    /// pack before it deletes one; a race may have stored it twice), which
    /// reads every pack index once — only after packs vanished.
    ///
    /// Safe beside backups: the catalogue is read before storage is
    /// listed, and a pack is on storage before it is indexed, so a pack
    /// written meanwhile is never taken for a missing one.
    pub(crate) fn refresh_packs(&self) -> Result<RefreshReport> {
        let mut report = RefreshReport::default();
        if self.is_read_only() {
            return Ok(report);
        }
        let records = crate::condemn::load(self.backend().as_ref())?;
        let current: Vec<(String, String)> = records
            .iter()
            .flat_map(|(name, r)| r.packs.iter().map(|p| (p.clone(), name.clone())))
            .collect();
        // Condemned before (a record swept since) or now: either explains
        // a pack that vanished.
        let mut condemned = self.catalogue().condemned_packs()?;
        condemned.extend(current.iter().map(|(p, _)| p.clone()));
        self.catalogue().set_condemned(&current)?;
        let known = self.catalogue().packs()?;
        let present: HashSet<String> = self.backend().list(FileKind::Pack)?.into_iter().collect();
        let mut lost: HashSet<BlobId> = HashSet::new();
        for (name, _) in known.iter().filter(|(n, _)| !present.contains(n)) {
            let entries = self.catalogue().blobs_in_pack(name)?;
            lost.extend(entries.iter().map(|e| e.id));
            if condemned.contains(name) {
                tracing::debug!(pack = %name, "a condemned pack was deleted by gc");
                self.catalogue().drop_pack(name)?;
            } else {
                tracing::warn!(pack = %name, "pack file missing from storage; its blobs are quarantined");
                report.quarantined += self
                    .catalogue()
                    .quarantine_pack(name, "its pack file is missing from storage")?;
            }
            report.vanished += 1;
        }
        report.indexed = crate::gc::index_unknown_packs(self)?;
        if report.indexed > 0 {
            tracing::info!(
                packs = report.indexed,
                "indexed packs the local catalogue did not know"
            );
        }
        lost.retain(|id| self.catalogue().locate(id).ok().flatten().is_none());
        if !lost.is_empty() {
            report.relocated = self.relocate(&mut lost)?;
        }
        Ok(report)
    }

    /// Finds other copies of the blobs in `lost` in the indexes of the
    /// packs the catalogue knows, and indexes them; returns how many.
    fn relocate(&self, lost: &mut HashSet<BlobId>) -> Result<usize> {
        let mut found = 0;
        for (name, size) in self.catalogue().packs()? {
            if lost.is_empty() {
                break;
            }
            let entries = match crate::pack::read_index(self.backend().as_ref(), &name) {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::warn!(pack = %name, error = %e, "pack index unreadable while looking for copies");
                    continue;
                }
            };
            let copies: Vec<_> = entries.into_iter().filter(|e| lost.remove(&e.id)).collect();
            if !copies.is_empty() {
                found += copies.len();
                self.catalogue().insert_pack(&name, size, &copies)?;
            }
        }
        Ok(found)
    }

    /// Blocks of `tree` whose stored copy is quarantined or missing, as
    /// block ranges (a damaged block-map node costs its whole subtree).
    /// Cheap when nothing is quarantined: the walk happens only then.
    pub(crate) fn blocks_to_heal(&self, tree: &Tree) -> Result<Vec<Range<u64>>> {
        let quarantined = self.catalogue().quarantined_ids()?;
        if quarantined.is_empty() || tree.root.is_zero() {
            return Ok(Vec::new());
        }
        let reader = self.reader()?;
        let mut walk = HealWalk {
            reader: &reader,
            quarantined: &quarantined,
            shape: tree.shape,
            found: Vec::new(),
            clean: HashSet::new(),
        };
        walk.subtree(tree.shape.depth(), 0, tree.root)?;
        Ok(walk.found)
    }
}

struct HealWalk<'a> {
    reader: &'a BlobReader,
    quarantined: &'a HashSet<BlobId>,
    shape: TreeShape,
    found: Vec<Range<u64>>,
    /// Nodes already walked without finding anything.
    clean: HashSet<BlobId>,
}

impl HealWalk<'_> {
    fn mark(&mut self, blocks: Range<u64>) {
        match self.found.last_mut() {
            Some(last) if last.end == blocks.start => last.end = blocks.end,
            _ => self.found.push(blocks),
        }
    }

    fn subtree(&mut self, level: u32, index: u64, id: BlobId) -> Result<()> {
        if id.is_zero() || self.clean.contains(&id) {
            return Ok(());
        }
        let span = TreeShape::span(level);
        let start = index.saturating_mul(span);
        let end = start.saturating_add(span).min(self.shape.blocks);
        if level == 0 {
            if self.quarantined.contains(&id) {
                self.mark(start..end);
            }
            return Ok(());
        }
        let before = self.found.len();
        let children = self.reader.read(&id).and_then(|bytes| {
            tree::decode_node(&id, &bytes, level, self.shape.children_of(level, index))
        });
        let children = match children {
            Ok(children) => children,
            Err(e) => {
                tracing::warn!(node = %id, error = %e, "block-map node unreadable; its blocks are read again");
                self.mark(start..end);
                return Ok(());
            }
        };
        for (slot, child) in children.into_iter().enumerate() {
            self.subtree(level - 1, index * FANOUT + slot as u64, child)?;
        }
        if self.found.len() == before && self.found.last().is_none_or(|r| r.end <= start) {
            self.clean.insert(id);
        }
        Ok(())
    }
}
