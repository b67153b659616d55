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

impl Repository {
    /// Quarantines the blobs of packs the catalogue lists but storage no
    /// longer holds (a deleted or lost pack file), so that backups store
    /// those blobs again rather than deduplicate against nothing. Returns
    /// how many blobs were quarantined.
    ///
    /// Safe beside backups: the catalogue is read before storage is
    /// listed, and a pack is on storage before it is indexed, so a pack
    /// written meanwhile is never taken for a missing one (gc, which
    /// removes packs, cannot run beside a backup).
    pub(crate) fn quarantine_missing_packs(&self) -> Result<usize> {
        if self.is_read_only() {
            return Ok(0);
        }
        let known = self.catalogue().packs()?;
        let present: HashSet<String> = self.backend().list(FileKind::Pack)?.into_iter().collect();
        let mut quarantined = 0;
        for (name, _) in known.iter().filter(|(n, _)| !present.contains(n)) {
            tracing::warn!(pack = %name, "pack file missing from storage; its blobs are quarantined");
            quarantined += self
                .catalogue()
                .quarantine_pack(name, "its pack file is missing from storage")?;
        }
        Ok(quarantined)
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
