//! The changed-block-tracking logs, as the storage manager keeps them: one
//! log per VDI (`<uuid>.cbtlog` on a real SR), doubly linked into a chain
//! by parent/child UUIDs, each with the virtual size it covers and a
//! bitmap of the 64 KiB blocks written while it was the leaf.
//!
//! * `enable`: a fresh zeroed log, unlinked.
//! * guest writes: every block a write touches is marked in the leaf's log.
//! * `snapshot`: the leaf's log becomes the snapshot's (renamed), a fresh
//!   zeroed log is made for the leaf, linked old-parent → snapshot → leaf.
//!   So snapshot N's bitmap holds the blocks written between N-1 and N.
//!   A snapshot of a CBT snapshot does the same in the middle of the
//!   chain (the copy takes the bitmap, the original keeps its child).
//! * `destroy`: the node is unlinked and its bitmap ORed into its child.
//! * `data_destroy`: nothing happens to the log.
//! * `disable`: the leaf's log is deleted and its parent's child pointer
//!   cleared, which cuts the chain.
//! * `changed_blocks(from, to)`: OR of the bitmaps of the nodes after
//!   `from` up to and including `to`, walking child pointers; older maps
//!   are zero-extended when the size grew. Same VDI, a missing log, or
//!   never reaching `to` are errors (the SM's `CBTChangedBlocksError`).

use std::collections::BTreeMap;

use cbtvault_blockmap::{BLOCK_SIZE, BlockMap, block_count};
use serde::{Deserialize, Serialize};

/// One log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "LogOnDisk", into = "LogOnDisk")]
pub struct CbtLog {
    /// UUID of the previous node (older snapshot).
    pub parent: Option<String>,
    /// UUID of the next node (newer snapshot or the leaf).
    pub child: Option<String>,
    /// Virtual size covered, in bytes.
    pub size: u64,
    /// Blocks written; always `block_count(size)` blocks.
    pub bitmap: BlockMap,
}

/// The persisted form: the bitmap as XenAPI base64.
#[derive(Serialize, Deserialize)]
struct LogOnDisk {
    parent: Option<String>,
    child: Option<String>,
    size: u64,
    bitmap: String,
}

impl TryFrom<LogOnDisk> for CbtLog {
    type Error = cbtvault_blockmap::Error;
    fn try_from(d: LogOnDisk) -> Result<Self, Self::Error> {
        Ok(CbtLog {
            bitmap: BlockMap::from_xenapi_base64(&d.bitmap, d.size)?,
            parent: d.parent,
            child: d.child,
            size: d.size,
        })
    }
}

impl From<CbtLog> for LogOnDisk {
    fn from(l: CbtLog) -> Self {
        LogOnDisk {
            bitmap: l.bitmap.to_xenapi_base64(),
            parent: l.parent,
            child: l.child,
            size: l.size,
        }
    }
}

/// Why changed blocks cannot be computed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// `vdi_from == vdi_to`.
    Same,
    /// No log, or `to` is not after `from` in the chain.
    Unrelated,
    /// A log in the walk is inconsistent (size shrank).
    Inconsistent,
}

/// All logs, by VDI UUID.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CbtLogs {
    logs: BTreeMap<String, CbtLog>,
}

impl CbtLogs {
    /// Whether `uuid` has a log.
    pub fn has(&self, uuid: &str) -> bool {
        self.logs.contains_key(uuid)
    }

    /// The log of `uuid`.
    pub fn get(&self, uuid: &str) -> Option<&CbtLog> {
        self.logs.get(uuid)
    }

    /// Creates a zeroed, unlinked log (no-op if one exists).
    pub fn enable(&mut self, uuid: &str, size: u64) {
        self.logs.entry(uuid.to_owned()).or_insert_with(|| CbtLog {
            parent: None,
            child: None,
            size,
            bitmap: BlockMap::empty(block_count(size)),
        });
    }

    /// Deletes the leaf's log and cuts the chain behind it.
    pub fn disable(&mut self, uuid: &str) {
        if let Some(log) = self.logs.remove(uuid) {
            if let Some(parent) = log.parent.and_then(|p| self.logs.get_mut(&p)) {
                parent.child = None;
            }
            if let Some(child) = log.child.and_then(|c| self.logs.get_mut(&c)) {
                child.parent = None;
            }
        }
    }

    /// Marks every block that the write of `len` bytes at `offset` touches.
    /// Returns whether `uuid` has a log.
    pub fn mark_write(&mut self, uuid: &str, offset: u64, len: u64) -> bool {
        let Some(log) = self.logs.get_mut(uuid) else {
            return false;
        };
        if len == 0 {
            return true;
        }
        let end = offset.saturating_add(len).min(log.size);
        if offset < end {
            log.bitmap
                .set_range(offset / BLOCK_SIZE..(end - 1) / BLOCK_SIZE + 1);
        }
        true
    }

    /// VDI `vdi` (the leaf, or a snapshot with CBT enabled) was
    /// snapshotted as `snap`: its log moves to the snapshot and `vdi` starts
    /// a fresh one right after it, keeping its old child (sm `VDI.py`
    /// `_cbt_snapshot`). So a snapshot of a snapshot joins the chain with
    /// the blocks of the original, and the original's bitmap is empty.
    /// Returns whether `vdi` had a log (and so the snapshot has CBT enabled).
    pub fn snapshot(&mut self, vdi: &str, snap: &str) -> bool {
        let Some(mut moved) = self.logs.remove(vdi) else {
            return false;
        };
        if let Some(parent) = moved.parent.as_ref().and_then(|p| self.logs.get_mut(p)) {
            parent.child = Some(snap.to_owned());
        }
        let size = moved.size;
        let old_child = moved.child.replace(vdi.to_owned());
        self.logs.insert(snap.to_owned(), moved);
        self.logs.insert(
            vdi.to_owned(),
            CbtLog {
                parent: Some(snap.to_owned()),
                child: old_child,
                size,
                bitmap: BlockMap::empty(block_count(size)),
            },
        );
        true
    }

    /// `uuid` was destroyed: unlink it, ORing its bitmap into its child.
    pub fn destroy(&mut self, uuid: &str) {
        let Some(log) = self.logs.remove(uuid) else {
            return;
        };
        if let Some(child) = log.child.as_ref().and_then(|c| self.logs.get_mut(c)) {
            child.bitmap.union_with(&log.bitmap);
            if child.bitmap.block_count() > block_count(child.size) {
                // Cannot happen while sizes only grow; keep the invariant anyway.
                child.size = child.bitmap.block_count() * BLOCK_SIZE;
            }
            child.parent = log.parent.clone();
        }
        if let Some(parent) = log.parent.as_ref().and_then(|p| self.logs.get_mut(p)) {
            parent.child = log.child.clone();
        }
    }

    /// The leaf grew to `size` (the log's bitmap is zero-extended).
    pub fn resize(&mut self, uuid: &str, size: u64) {
        if let Some(log) = self.logs.get_mut(uuid)
            && size > log.size
        {
            log.size = size;
            if let Ok(grown) = log.bitmap.grown_to(block_count(size)) {
                log.bitmap = grown;
            }
        }
    }

    /// Blocks written after `from` up to and including `to`.
    pub fn changed_blocks(&self, from: &str, to: &str) -> Result<BlockMap, ChainError> {
        if from == to {
            return Err(ChainError::Same);
        }
        let (Some(start), true) = (self.logs.get(from), self.logs.contains_key(to)) else {
            return Err(ChainError::Unrelated);
        };
        let mut merged = BlockMap::empty(block_count(start.size));
        let mut size = start.size;
        let mut next = start.child.clone();
        // A chain has at most as many nodes as there are logs; a longer walk
        // would mean a cycle.
        for _ in 0..=self.logs.len() {
            let Some(uuid) = next else {
                return Err(ChainError::Unrelated);
            };
            let Some(node) = self.logs.get(&uuid) else {
                return Err(ChainError::Unrelated);
            };
            if node.size < size {
                return Err(ChainError::Inconsistent);
            }
            size = node.size;
            merged = merged
                .grown_to(block_count(size))
                .map_err(|_| ChainError::Inconsistent)?;
            merged.union_with(&node.bitmap);
            if uuid == to {
                return Ok(merged);
            }
            next = node.child.clone();
        }
        Err(ChainError::Inconsistent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn blocks(m: &BlockMap) -> Vec<u64> {
        m.set_blocks().collect()
    }

    #[test]
    fn snapshot_moves_the_leaf_bitmap() {
        let mut c = CbtLogs::default();
        c.enable("leaf", 4 * MB);
        c.mark_write("leaf", 0, 1);
        c.mark_write("leaf", BLOCK_SIZE - 1, 2); // touches blocks 0 and 1
        assert!(c.snapshot("leaf", "s1"));
        c.mark_write("leaf", 10 * BLOCK_SIZE, BLOCK_SIZE);
        assert!(c.snapshot("leaf", "s2"));
        c.mark_write("leaf", 20 * BLOCK_SIZE, 1);
        assert!(c.snapshot("leaf", "s3"));
        assert_eq!(blocks(&c.get("s1").unwrap().bitmap), [0, 1]);
        assert_eq!(blocks(&c.get("s2").unwrap().bitmap), [10]);
        assert_eq!(blocks(&c.changed_blocks("s1", "s2").unwrap()), [10]);
        assert_eq!(blocks(&c.changed_blocks("s1", "s3").unwrap()), [10, 20]);
        assert_eq!(blocks(&c.changed_blocks("s2", "leaf").unwrap()), [20]);
        assert_eq!(c.changed_blocks("s2", "s1"), Err(ChainError::Unrelated));
        assert_eq!(c.changed_blocks("s2", "s2"), Err(ChainError::Same));
        assert_eq!(c.changed_blocks("s2", "nope"), Err(ChainError::Unrelated));
    }

    #[test]
    fn destroy_coalesces_into_the_child() {
        let mut c = CbtLogs::default();
        c.enable("leaf", MB);
        c.snapshot("leaf", "s1");
        c.mark_write("leaf", 3 * BLOCK_SIZE, 1);
        c.snapshot("leaf", "s2");
        c.mark_write("leaf", 5 * BLOCK_SIZE, 1);
        c.snapshot("leaf", "s3");
        c.destroy("s2");
        assert_eq!(blocks(&c.changed_blocks("s1", "s3").unwrap()), [3, 5]);
        assert_eq!(c.get("s1").unwrap().child.as_deref(), Some("s3"));
        assert_eq!(c.get("s3").unwrap().parent.as_deref(), Some("s1"));
    }

    #[test]
    fn disable_cuts_and_growth_zero_extends() {
        let mut c = CbtLogs::default();
        c.enable("leaf", 20 * BLOCK_SIZE);
        c.snapshot("leaf", "s1");
        c.resize("leaf", 40 * BLOCK_SIZE);
        c.mark_write("leaf", 35 * BLOCK_SIZE, 1);
        c.snapshot("leaf", "s2");
        let m = c.changed_blocks("s1", "s2").unwrap();
        assert_eq!(m.block_count(), 40);
        assert_eq!(blocks(&m), [35]);
        c.disable("leaf");
        assert!(!c.has("leaf"));
        c.enable("leaf", 40 * BLOCK_SIZE);
        c.snapshot("leaf", "s3");
        assert_eq!(c.changed_blocks("s2", "s3"), Err(ChainError::Unrelated));
        assert!(c.changed_blocks("s1", "s2").is_ok());
    }

    #[test]
    fn persists_as_base64() {
        let mut c = CbtLogs::default();
        c.enable("a", 20 * BLOCK_SIZE);
        for b in [0, 9, 19] {
            c.mark_write("a", b * BLOCK_SIZE, 1);
        }
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("gEAQ"), "{json}");
        let back: CbtLogs = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
    }
}
