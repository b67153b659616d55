//! Restore point manifests: one JSON document per restore point, the
//! authoritative record of what it holds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::BlobId;
use crate::tree::{Tree, TreeShape};

/// The manifest format this build writes.
pub const MANIFEST_FORMAT: u32 = 1;

/// A restore point's manifest. Its id is the hex BLAKE3 of its JSON bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The disk's name in the repository.
    pub disk: String,
    /// Where the data came from.
    pub source: SourceInfo,
    /// When the source was captured (snapshot time), RFC 3339.
    pub time: jiff::Timestamp,
    /// Size of the disk in bytes.
    pub virtual_size: u64,
    /// Block size in bytes (64 KiB).
    pub block_size: u64,
    /// Root of the block map.
    pub root: BlobId,
    /// Children per block-map node.
    pub fanout: u64,
    /// The restore point this one was taken against, if any.
    pub parent: Option<String>,
    /// How the blocks were chosen.
    pub mode: BackupMode,
    /// What the backup did.
    pub stats: BackupStats,
}

impl Manifest {
    /// The block map.
    pub fn tree(&self) -> Tree {
        Tree {
            root: self.root,
            shape: TreeShape {
                blocks: self.virtual_size.div_ceil(self.block_size),
            },
        }
    }
}

/// Where a restore point's data came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// `file`, `nbd`, `xenserver`, `qemu`, `vmware`.
    pub provider: String,
    /// A path or URI, without credentials.
    pub location: String,
    /// The snapshot's identity at the provider (a VDI uuid, a bitmap name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Anything else worth keeping (VM uuid, change id, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

/// How the blocks of a restore point were chosen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum BackupMode {
    /// Every block was read (zero blocks and holes skipped).
    Full {
        /// Why a full was taken when an incremental was possible or asked for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Only the blocks a changed-block source marked were read.
    Incremental {
        /// Where the changed blocks came from (`bitmap-file`, `xenapi-cbt`, ...).
        changes: String,
        /// Blocks the source marked.
        changed_blocks: u64,
    },
}

/// What a backup did. The field names are a stable, documented interface
/// (`list --json`, `show --json`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Blocks of the disk.
    pub blocks_total: u64,
    /// Blocks read from the source.
    pub blocks_read: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Blocks read that were all zeros.
    pub blocks_zero: u64,
    /// Blocks read whose content was already stored.
    pub blocks_dedup: u64,
    /// Blocks newly stored.
    pub blocks_new: u64,
    /// Uncompressed size of the newly stored blocks.
    pub bytes_new: u64,
    /// Stored (compressed) size of the newly stored blocks.
    pub bytes_stored: u64,
    /// Block-map nodes written.
    pub nodes_new: u64,
    /// Wall-clock time of the backup.
    pub duration_ms: u64,
}

/// Serialises a manifest and computes its id.
pub fn encode(manifest: &Manifest) -> (String, Vec<u8>) {
    // Serialising plain structs to a Vec cannot fail.
    let bytes = serde_json::to_vec_pretty(manifest).unwrap_or_default();
    (hex::encode(blake3::hash(&bytes).as_bytes()), bytes)
}
