//! The CBT audit: a check that the hypervisor's changed-block tracking
//! missed nothing.
//!
//! An incremental takes every block the hypervisor reports unchanged from
//! the parent restore point. If the hypervisor under-reports (a write that
//! bypassed its log), the new restore point silently holds stale data, and
//! so does every later one built on it. So after an incremental is
//! committed, and before the irreversible steps, [`provider::drive`]
//! re-reads a sample of those *unchanged* blocks from the point-in-time
//! view and compares them with the committed restore point (which took
//! them from its parent).
//!
//! A mismatch fails the disk with [`Error::CbtAudit`] (not retryable: a new
//! snapshot would be wrong the same way), and:
//! - the capture is aborted, so the hypervisor keeps the previous base and
//!   takes no irreversible step (invariants 4 and 5);
//! - a note in the repository's crash journal (kind [`NOTE_KIND`], subject
//!   the disk) says the disk's next backup must read the whole disk;
//!   `drive` reads it after `prepare` and turns that backup into a full
//!   whose reason names the failed audit, then closes the note once the
//!   full is committed and finished. The note is written before anything
//!   else, so a crash right after still forces the full;
//! - the restore point is forgotten (its manifest removed, as `forget`
//!   does; its blocks stay until gc), so nobody restores it and it is
//!   nobody's parent. A restore point that cannot be forgotten is named in
//!   the error.
//!
//! [`provider::drive`]: crate::provider::drive

use std::sync::Arc;

use cbtvault_blockmap::{BLOCK_SIZE, BlockMap};
use cbtvault_nbd::Client;
use cbtvault_repo::{BlobId, ForgetSelection, Manifest, Repository};
use tracing::warn;

use crate::error::{Error, Result};

/// The crash-journal kind of the note that a disk's next backup must be a
/// full because an audit failed.
pub const NOTE_KIND: &str = "cbt-audit";

/// Offsets an error names at most (the count says how many differ).
const MAX_NAMED: usize = 8;

/// `65536, 131072, … (12 in all)`.
pub(crate) fn offsets_text(offsets: &[u64]) -> String {
    let mut text: Vec<String> = offsets.iter().take(MAX_NAMED).map(u64::to_string).collect();
    if offsets.len() > MAX_NAMED {
        text.push("…".into());
    }
    text.join(", ")
}

/// Up to `samples` blocks of a disk of `blocks` blocks that `changed` does
/// not mark, spread evenly over the disk from a start that `seed` picks
/// (so successive backups audit different blocks); every unmarked block
/// when the disk has no more than `samples` blocks. Ascending.
pub fn pick_unchanged(changed: &BlockMap, blocks: u64, samples: usize, seed: u64) -> Vec<u64> {
    if samples == 0 || blocks == 0 {
        return Vec::new();
    }
    let samples = samples as u64;
    if samples >= blocks {
        return (0..blocks).filter(|&b| !changed.is_set(b)).collect();
    }
    let step = blocks / samples;
    let start = seed % step;
    let mut out = Vec::new();
    for i in 0..samples {
        let from = start + i * step;
        // The first unmarked block of this sample's stretch, if any.
        if let Some(b) = (from..(from + step).min(blocks)).find(|&b| !changed.is_set(b)) {
            out.push(b);
        }
    }
    out
}

/// A seed from a restore point's id (hex), so the sample is the same
/// whenever that restore point is audited.
fn seed_of(restore_point: &str) -> u64 {
    restore_point
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// Reads up to `samples` blocks that `changed` does not mark from `nbd`
/// (the view the restore point was taken from) and returns the byte
/// offsets of those that differ from the committed restore point.
pub async fn audit_unchanged(
    nbd: &Client,
    repo: &Arc<Repository>,
    restore_point: &str,
    manifest: &Manifest,
    changed: &BlockMap,
    samples: usize,
) -> Result<Vec<u64>> {
    let tree = manifest.tree();
    let picks = pick_unchanged(changed, tree.shape.blocks, samples, seed_of(restore_point));
    if picks.is_empty() {
        return Ok(Vec::new());
    }
    let repo2 = repo.clone();
    let expected = tokio::task::spawn_blocking(move || -> Result<Vec<(u64, BlobId)>> {
        let reader = repo2.reader()?;
        let mut cursor = cbtvault_repo::Cursor::new(tree, &reader);
        picks
            .into_iter()
            .map(|b| Ok((b, cursor.subtree(0, b)?)))
            .collect()
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    let mut differ = Vec::new();
    for (block, id) in expected {
        let offset = block * BLOCK_SIZE;
        let len = BLOCK_SIZE.min(manifest.virtual_size.saturating_sub(offset)) as usize;
        let (data, _) = crate::nbd::read_aligned(nbd, offset, len)
            .await
            .map_err(|e| Error::SourceRead {
                disk: manifest.disk.clone(),
                offset,
                len,
                source: Box::new(e),
            })?;
        let actual = if cbtvault_repo::is_all_zero(&data) {
            BlobId::ZERO
        } else {
            repo.blob_id(&data)?
        };
        if actual != id {
            differ.push(offset);
        }
    }
    Ok(differ)
}

/// Records a failed audit of `restore_point` (see the module
/// documentation) and returns the disk's error.
pub(crate) async fn failed(
    repo: &Arc<Repository>,
    disk: &str,
    restore_point: &str,
    offsets: Vec<u64>,
) -> Error {
    warn!(
        disk,
        restore_point,
        blocks = offsets.len(),
        "CBT audit failed: blocks reported unchanged differ from the snapshot"
    );
    let reason = format!(
        "the CBT audit of restore point {restore_point} found {} block(s) changed that the hypervisor reported unchanged (offsets {})",
        offsets.len(),
        offsets_text(&offsets)
    );
    let (repo2, disk2, id) = (repo.clone(), disk.to_string(), restore_point.to_string());
    let forgotten = tokio::task::spawn_blocking(move || -> Result<()> {
        // The note first: if anything below fails, the next run is still full.
        repo2.journal_note(NOTE_KIND, &disk2, &reason)?;
        let plan = repo2.forget_plan(&ForgetSelection::Ids(vec![id]), true)?;
        repo2.forget(&plan)?;
        Ok(())
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))
    .and_then(|r| r);
    if let Err(e) = &forgotten {
        warn!(disk, restore_point, error = %e, "could not record the failed CBT audit");
    }
    Error::CbtAudit {
        disk: disk.to_string(),
        restore_point: restore_point.to_string(),
        offsets,
        forgotten: forgotten.is_ok(),
    }
}

/// A disk's notes that its next backup must be full, and why.
pub(crate) struct Pending {
    pub notes: Vec<i64>,
    pub reason: String,
}

/// The failed audits of `disk` not yet followed by a full. A journal that
/// cannot be read forces the full too: the audit may have failed.
pub(crate) async fn pending(repo: &Arc<Repository>, disk: &str) -> Option<Pending> {
    let (repo, disk) = (repo.clone(), disk.to_string());
    let notes = tokio::task::spawn_blocking(move || repo.journal_unfinished(NOTE_KIND, &disk))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    match notes {
        Ok(notes) if notes.is_empty() => None,
        Ok(notes) => Some(Pending {
            reason: notes.last().map(|(_, why)| why.clone()).unwrap_or_default(),
            notes: notes.into_iter().map(|(id, _)| id).collect(),
        }),
        Err(e) => Some(Pending {
            notes: Vec::new(),
            reason: format!("the notes of failed CBT audits cannot be read ({e})"),
        }),
    }
}

/// Closes `notes` once the full they asked for is committed and finished.
pub(crate) async fn close(repo: &Arc<Repository>, disk: &str, notes: Vec<i64>) {
    let repo = repo.clone();
    let closed = tokio::task::spawn_blocking(move || -> Result<()> {
        for note in notes {
            repo.journal_close(note)?;
        }
        Ok(())
    })
    .await;
    if !matches!(closed, Ok(Ok(()))) {
        // Harmless: the next backup is one more full.
        warn!(
            disk,
            "could not close the note of a failed CBT audit; the next backup is full again"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_as_large_as_the_disk_takes_every_unchanged_block() {
        let mut changed = BlockMap::empty(10);
        changed.set(3);
        changed.set(7);
        assert_eq!(
            pick_unchanged(&changed, 10, 10, 42),
            vec![0, 1, 2, 4, 5, 6, 8, 9]
        );
        assert!(pick_unchanged(&changed, 10, 0, 42).is_empty());
    }

    #[test]
    fn a_small_sample_is_spread_never_changed_and_rotates_with_the_seed() {
        let mut changed = BlockMap::empty(1000);
        changed.set_range(0..500);
        for seed in [0, 1, 99, u64::MAX] {
            let picks = pick_unchanged(&changed, 1000, 10, seed);
            assert!(picks.iter().all(|&b| b < 1000 && !changed.is_set(b)));
            assert!(picks.windows(2).all(|w| w[0] < w[1]));
            // The stretches within the changed half have no unchanged block.
            assert!((5..=6).contains(&picks.len()), "{picks:?}");
        }
        assert_ne!(
            pick_unchanged(&changed, 1000, 10, 0),
            pick_unchanged(&changed, 1000, 10, 7)
        );
    }

    #[test]
    fn offsets_are_named_up_to_a_few() {
        assert_eq!(offsets_text(&[0, 65536]), "0, 65536");
        let many: Vec<u64> = (0..20).collect();
        assert!(offsets_text(&many).ends_with("7, …"));
    }
}
