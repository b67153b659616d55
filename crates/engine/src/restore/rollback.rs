//! Rollback (`restore --only-changed`): bring a disk that holds another
//! state of the same disk to a restore point by writing only the blocks
//! that differ.
//!
//! Which blocks differ is found one of two ways:
//! - **From the block maps**, when the caller knows what the target holds
//!   (it was restored from, or backed up as, restore point A):
//!   `Repository::diff(A, B)` walks both Merkle maps, skipping shared
//!   subtrees, and nothing is read from the target. Blocks written to the
//!   target since, as its hypervisor's changed-block tracking reports them
//!   (a XenAPI bitmap), are added. The caller vouches for the target's
//!   state; a change nobody reports is not detected.
//! - **By hashing the target** otherwise: worker threads read it a
//!   level-1 node's worth (128 blocks, 8 MiB) at a time, several at once,
//!   hash each 64 KiB block with BLAKE3 and compare it with the restore
//!   point's id (an all-zero block with the zero id), so each block is
//!   read once and only mismatches are written.
//!
//! Either way, blocks to write are read from the repository and checked
//! against their ids, as in a full restore, and zero blocks are written
//! as zeroes (a hole in a file). A file target is resized to the restore
//! point's size first; an NBD export must have its size already.

use std::sync::Mutex;

use cbtvault_blockmap::{BLOCK_SIZE, BlockMap};
use cbtvault_repo::{BlobId, Cursor, FANOUT, Repository, RestorePointRow, Visitor, walk};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::target::ReadableTarget;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// What the target holds before a rollback.
#[derive(Clone, Copy)]
pub enum TargetState<'a> {
    /// Restore point `holds`, except for the blocks `changed_since` marks
    /// (the target's own changed-block tracking since it held it, e.g.
    /// XenServer CBT or a QEMU dirty bitmap): the blocks to write are
    /// those the two block maps differ in plus those, and nothing is read
    /// from the target.
    Known {
        holds: &'a RestorePointRow,
        changed_since: Option<&'a BlockMap>,
    },
    /// Unknown: every block of the target is read, hashed and compared.
    Unknown,
}

/// What a rollback did.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RollbackStats {
    /// `block-maps` or `hashing`.
    pub method: &'static str,
    /// Blocks whose content was compared (every block of the restore
    /// point, from the maps or by hashing the target).
    pub blocks_compared: u64,
    /// Blocks that differed and were written (zeroed ones included).
    pub blocks_written: u64,
    /// Bytes written (zeroed blocks count their length).
    pub bytes_written: u64,
    /// Of the blocks written, those written as zeros.
    pub blocks_zeroed: u64,
    /// Bytes read from the target to compare them.
    pub target_bytes_read: u64,
    /// The target's size before, if the rollback resized it.
    pub resized_from: Option<u64>,
    pub duration_ms: u64,
}

/// A run of blocks for one worker: compared with the target first
/// (`check`), or known to differ.
struct Unit {
    first: u64,
    ids: Vec<BlobId>,
    check: bool,
}

/// Rolls `target` to `rp` on `workers` threads, writing only blocks that
/// differ (see the module documentation).
pub fn rollback(
    repo: &Repository,
    rp: &RestorePointRow,
    target: &dyn ReadableTarget,
    state: TargetState<'_>,
    workers: usize,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<RollbackStats> {
    let started = std::time::Instant::now();
    let _lock = repo.lock_shared()?;
    let size = rp.manifest.virtual_size;
    let blocks = size.div_ceil(BLOCK_SIZE);
    let before = target
        .size()
        .map_err(|e| Error::Target(format!("cannot read the target's size: {e}")))?;
    // The block maps tell what to write only when the target is the held
    // restore point's disk at its size, and that size is the restore
    // point's: past a smaller disk's end the maps say "zero" while the
    // target may hold anything. Otherwise the target is hashed.
    let state = match state {
        TargetState::Known { holds, .. }
            if holds.manifest.disk != rp.manifest.disk
                || holds.manifest.virtual_size != size
                || before != size =>
        {
            tracing::warn!(
                holds = %holds.id,
                held_disk = %holds.manifest.disk,
                held_size = holds.manifest.virtual_size,
                target_size = before,
                size,
                "the target's stated state does not match this restore point's disk and size; hashing the target instead"
            );
            TargetState::Unknown
        }
        known => known,
    };
    let mut stats = RollbackStats {
        method: match state {
            TargetState::Known {
                changed_since: None,
                ..
            } => "block-maps",
            TargetState::Known { .. } => "block-maps+changed-blocks",
            TargetState::Unknown => "hashing",
        },
        ..RollbackStats::default()
    };
    if before != size {
        target.set_size(size)?;
        stats.resized_from = Some(before);
    }
    let changes = match state {
        TargetState::Known {
            holds,
            changed_since,
        } => Some(to_write(repo.diff(holds, rp)?, changed_since, blocks)),
        TargetState::Unknown => None,
    };
    progress.start(
        "rollback",
        match &changes {
            Some(runs) => {
                runs.iter()
                    .map(|r| r.end.min(blocks).saturating_sub(r.start))
                    .sum::<u64>()
                    * BLOCK_SIZE
            }
            None => size,
        },
    );
    let totals = Mutex::new(RollbackStats::default());
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    };
    let damaged = |offset: u64, source: cbtvault_repo::Error| Error::DamagedBlock {
        disk: rp.manifest.disk.clone(),
        restore_point: rp.id.clone(),
        offset,
        source: Box::new(source),
    };
    let (tx, rx) = flume::bounded::<Unit>(workers.max(1) * 2);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            let rx = rx.clone();
            let (totals, fail, damaged) = (&totals, &fail, &damaged);
            s.spawn(move || {
                let reader = match repo.reader() {
                    Ok(r) => r,
                    Err(e) => return fail(e.into()),
                };
                for unit in rx.iter() {
                    if cancel.is_cancelled() {
                        return fail(Error::Cancelled);
                    }
                    match apply(&reader, target, size, &unit, damaged) {
                        Ok(local) => {
                            progress.advance(unit.ids.len() as u64 * BLOCK_SIZE);
                            let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                            t.blocks_compared += local.blocks_compared;
                            t.blocks_written += local.blocks_written;
                            t.bytes_written += local.bytes_written;
                            t.blocks_zeroed += local.blocks_zeroed;
                            t.target_bytes_read += local.target_bytes_read;
                        }
                        Err(e) => return fail(e),
                    }
                }
            });
        }
        drop(rx);
        let fed = (|| -> Result<()> {
            let reader = repo.reader()?;
            match &changes {
                Some(runs) => {
                    let mut cursor = Cursor::new(rp.manifest.tree(), &reader);
                    for run in runs {
                        let mut b = run.start;
                        let end = run.end.min(blocks);
                        while b < end {
                            let n = (end - b).min(FANOUT);
                            let ids = (b..b + n)
                                .map(|i| cursor.subtree(0, i))
                                .collect::<cbtvault_repo::Result<Vec<_>>>()
                                .map_err(|e| damaged(b * BLOCK_SIZE, e))?;
                            send(
                                &tx,
                                Unit {
                                    first: b,
                                    ids,
                                    check: false,
                                },
                            )?;
                            b += n;
                        }
                    }
                    Ok(())
                }
                None => {
                    let mut feed = Feed { tx: &tx, next: 0 };
                    walk(&rp.manifest.tree(), &reader, &mut feed)
                        .map_err(|e| damaged(feed.next * BLOCK_SIZE, e))?;
                    feed.zeros_to(blocks)
                }
            }
        })();
        drop(tx);
        if let Err(e) = fed {
            fail(e);
        }
    });
    progress.finish();
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    target.finish().map_err(|source| Error::TargetWrite {
        offset: size,
        source,
    })?;
    let t = totals.into_inner().unwrap_or_else(|p| p.into_inner());
    stats.blocks_written = t.blocks_written;
    stats.bytes_written = t.bytes_written;
    stats.blocks_zeroed = t.blocks_zeroed;
    stats.target_bytes_read = t.target_bytes_read;
    // From the maps, every block was compared (shared subtrees at once).
    stats.blocks_compared = match state {
        TargetState::Known { .. } => blocks,
        TargetState::Unknown => t.blocks_compared,
    };
    stats.duration_ms = started.elapsed().as_millis() as u64;
    Ok(stats)
}

/// The runs of blocks (below `blocks`) that differ between the maps or
/// that the target's own tracking marks.
fn to_write(
    differ: Vec<std::ops::Range<u64>>,
    changed_since: Option<&BlockMap>,
    blocks: u64,
) -> Vec<std::ops::Range<u64>> {
    let Some(changed) = changed_since else {
        return differ;
    };
    let mut map = BlockMap::empty(blocks);
    for run in differ {
        let end = run.end.min(blocks);
        if run.start < end {
            map.set_range(run.start..end);
        }
    }
    map.union_with(changed);
    map.runs(0)
        .filter(|r| r.start < blocks)
        .map(|r| r.start..r.end.min(blocks))
        .collect()
}

fn send(tx: &flume::Sender<Unit>, unit: Unit) -> Result<()> {
    tx.send(unit)
        .map_err(|_| Error::Internal("rollback workers stopped".into()))
}

/// Compares one unit with the target (if asked) and writes the blocks
/// that differ.
fn apply(
    reader: &cbtvault_repo::BlobReader,
    target: &dyn ReadableTarget,
    size: u64,
    unit: &Unit,
    damaged: &dyn Fn(u64, cbtvault_repo::Error) -> Error,
) -> Result<RollbackStats> {
    let mut local = RollbackStats::default();
    let start = unit.first * BLOCK_SIZE;
    let end = ((unit.first + unit.ids.len() as u64) * BLOCK_SIZE).min(size);
    let block_len = |b: u64| BLOCK_SIZE.min(size - b * BLOCK_SIZE) as usize;
    let mut differ: Vec<(u64, BlobId)> = Vec::new();
    if unit.check {
        let mut buf = vec![0u8; (end - start) as usize];
        target
            .read_at(start, &mut buf)
            .map_err(|e| Error::Target(format!("reading the target at offset {start}: {e}")))?;
        local.target_bytes_read = buf.len() as u64;
        for (i, id) in unit.ids.iter().enumerate() {
            let b = unit.first + i as u64;
            let at = i * BLOCK_SIZE as usize;
            let Some(have) = buf.get(at..at + block_len(b)) else {
                break;
            };
            local.blocks_compared += 1;
            let same = if id.is_zero() {
                cbtvault_repo::is_all_zero(have)
            } else {
                reader.blob_id(have)? == *id
            };
            if !same {
                differ.push((b, *id));
            }
        }
    } else {
        differ.extend(
            unit.ids
                .iter()
                .enumerate()
                .map(|(i, id)| (unit.first + i as u64, *id)),
        );
    }
    let wanted: Vec<BlobId> = differ
        .iter()
        .map(|(_, id)| *id)
        .filter(|id| !id.is_zero())
        .collect();
    let mut contents = if wanted.is_empty() {
        Vec::new()
    } else {
        reader.read_many(&wanted).map_err(|e| damaged(start, e))?
    }
    .into_iter();
    for (b, id) in differ {
        let offset = b * BLOCK_SIZE;
        let len = block_len(b);
        if id.is_zero() {
            target
                .write_zeroes(offset, len as u64)
                .map_err(|source| Error::TargetWrite { offset, source })?;
            local.blocks_zeroed += 1;
        } else {
            let content = contents
                .next()
                .ok_or_else(|| Error::Internal("a block missing from its batch".into()))?
                .map_err(|e| damaged(offset, e))?;
            if content.len() != len {
                return Err(damaged(
                    offset,
                    cbtvault_repo::Error::InvalidArgument(format!(
                        "block holds {} bytes where {len} belong",
                        content.len()
                    )),
                ));
            }
            target
                .write_at(offset, &content)
                .map_err(|source| Error::TargetWrite { offset, source })?;
        }
        local.blocks_written += 1;
        local.bytes_written += len as u64;
    }
    Ok(local)
}

/// Turns the walk of the restore point's map into units to compare,
/// including the all-zero subtrees the walk skips (the target must read
/// as zeros there too).
struct Feed<'a> {
    tx: &'a flume::Sender<Unit>,
    next: u64,
}

impl Feed<'_> {
    fn zeros_to(&mut self, block: u64) -> Result<()> {
        while self.next < block {
            let n = (block - self.next).min(FANOUT);
            send(
                self.tx,
                Unit {
                    first: self.next,
                    ids: vec![BlobId::ZERO; n as usize],
                    check: true,
                },
            )?;
            self.next += n;
        }
        Ok(())
    }
}

impl Visitor for Feed<'_> {
    fn leaf(&mut self, first: u64, ids: &[BlobId]) -> cbtvault_repo::Result<()> {
        let stopped = |e: Error| cbtvault_repo::Error::InvalidArgument(e.to_string());
        self.zeros_to(first).map_err(stopped)?;
        send(
            self.tx,
            Unit {
                first,
                ids: ids.to_vec(),
                check: true,
            },
        )
        .map_err(stopped)?;
        self.next = first + ids.len() as u64;
        Ok(())
    }
}
