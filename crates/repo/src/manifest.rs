//! Restore point manifests: one JSON document per restore point, the
//! authoritative record of what it holds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::BlobId;
use crate::crypto::{Crypto, OpenError, Sealed};
use crate::error::Result;
use crate::tree::{Tree, TreeShape};
use crate::vm::VmInfo;

/// The manifest format this build writes.
pub const MANIFEST_FORMAT: u32 = 1;

/// The largest disk a manifest may describe: 1 PiB, far above any
/// hypervisor's limit (XenServer 2 TiB, VMware 62 TiB) yet small enough
/// that block counts and byte offsets never overflow.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 50;

/// The largest manifest file read, in bytes (real ones are about 1 KiB).
pub const MAX_MANIFEST_LEN: usize = 1 << 20;

/// The longest disk name, in bytes.
pub const MAX_DISK_NAME: usize = 255;

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
    /// Parses and validates a manifest read from storage: every field a
    /// reader relies on is checked, so no input can make it divide by zero,
    /// overflow or walk a tree of the wrong shape.
    pub fn from_json(bytes: &[u8]) -> std::result::Result<Manifest, String> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks the fields against what this build reads.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "manifest format {} is not supported (this build reads format {MANIFEST_FORMAT})",
                self.format
            ));
        }
        if self.block_size != crate::repository::BLOCK_SIZE {
            return Err(format!(
                "block size {} (only {} is supported)",
                self.block_size,
                crate::repository::BLOCK_SIZE
            ));
        }
        if self.fanout != crate::tree::FANOUT {
            return Err(format!(
                "block-map fan-out {} (only {} is supported)",
                self.fanout,
                crate::tree::FANOUT
            ));
        }
        if self.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(format!(
                "disk size {} is larger than the supported {MAX_VIRTUAL_SIZE} bytes",
                self.virtual_size
            ));
        }
        validate_disk_name(&self.disk)?;
        if self.virtual_size == 0 && !self.root.is_zero() {
            return Err("an empty disk with a non-empty block map".into());
        }
        if let Some(parent) = &self.parent
            && !is_restore_point_id(parent)
        {
            return Err(format!("parent {parent:?} is not a restore point id"));
        }
        Ok(())
    }

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
    /// The VM the disk belonged to, when the provider knows it. Written
    /// only when present, so manifests without it keep their ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmInfo>,
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

/// Checks a disk name: not empty, at most [`MAX_DISK_NAME`] bytes, no
/// control characters, and not ending in `@latest` (which selects a
/// disk's newest restore point).
pub fn validate_disk_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("the disk name is empty".into());
    }
    if name.len() > MAX_DISK_NAME {
        return Err(format!(
            "the disk name is longer than {MAX_DISK_NAME} bytes"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("the disk name {name:?} holds control characters"));
    }
    if name.ends_with("@latest") {
        return Err(format!("the disk name {name:?} ends in @latest"));
    }
    Ok(())
}

/// True when `name` has the form of a restore point id (64 lowercase hex).
pub fn is_restore_point_id(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Serialises a manifest, computes its id (the hex hash of the JSON,
/// keyed in an encrypted repository) and seals it: the file to write.
pub fn encode(manifest: &Manifest, crypto: &Crypto) -> Result<(String, Vec<u8>)> {
    // Serialising plain structs to a Vec cannot fail.
    let mut bytes = serde_json::to_vec_pretty(manifest).unwrap_or_default();
    let id = crypto.hex_id(&bytes)?;
    crypto.seal(Sealed::Manifest, id.as_bytes(), &mut bytes)?;
    Ok((id, bytes))
}

/// A manifest's id, without sealing it.
pub fn id_of(manifest: &Manifest, crypto: &Crypto) -> Result<String> {
    crypto.hex_id(&serde_json::to_vec_pretty(manifest).unwrap_or_default())
}

/// Opens a manifest file named `id` and checks it against its id: the
/// JSON, not yet parsed. The error says what is wrong, in words, or is
/// [`crate::Error::KeyRequired`].
pub(crate) fn open(
    id: &str,
    bytes: &[u8],
    crypto: &Crypto,
) -> Result<std::result::Result<Vec<u8>, String>> {
    let plain = match crypto.open(Sealed::Manifest, id.as_bytes(), bytes) {
        Ok(plain) => plain,
        Err(OpenError::Key(e)) => return Err(e),
        Err(OpenError::Damaged(what)) => {
            return Ok(Err(format!(
                "cannot be opened ({what}; damaged, or another restore point's manifest)"
            )));
        }
    };
    if crypto.hex_id(&plain)? != id {
        return Ok(Err(
            "content does not match its id (the file is damaged)".into()
        ));
    }
    Ok(Ok(plain))
}
