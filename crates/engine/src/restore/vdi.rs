//! Rolling an existing XenServer VDI to a restore point with only the
//! blocks that differ.
//!
//! xapi-nbd serves VDIs read-only, so the blocks go up as a sparse VHD
//! (`PUT /import_raw_vdi?format=vhd`, see `cbtvault_xenapi::vhd`), which
//! vhd-tool writes onto the VDI sector by sector, leaving every sector the
//! VHD does not hold as it is. Which blocks: those the block maps of the
//! restore point and of the state the VDI is known to hold differ in,
//! plus those the VDI's changed-block tracking reports written since that
//! state's snapshot ([`vdi_rollback_blocks`]). The caller checks every
//! block against its id first ([`check_blocks`]), so a damaged repository
//! stops the rollback before the VDI is touched, then streams the VHD
//! ([`restore_point_vhd`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use cbtvault_blockmap::{BLOCK_SIZE, BlockMap};
use cbtvault_nbd::server::Export;
use cbtvault_repo::{Repository, RestorePointRow};
use cbtvault_xenapi::vhd::SparseVhd;

use crate::error::{Error, Result};
use crate::serve::RestorePointExport;

/// The 64 KiB blocks to write to a VDI that holds restore point `holds`
/// except for the blocks its CBT reports written since (`changed`, the
/// base64 bitmap `VDI.list_changed_blocks(snapshot of holds, VDI)`
/// returns) so that it holds `rp`. The outer error is the repository's;
/// the inner one says why the blocks cannot be known this way (a
/// different disk or size, an unreadable bitmap): the caller falls back to
/// a full upload.
pub fn vdi_rollback_blocks(
    repo: &Repository,
    rp: &RestorePointRow,
    holds: &RestorePointRow,
    changed: &str,
) -> Result<std::result::Result<BTreeSet<u64>, String>> {
    let size = rp.manifest.virtual_size;
    if holds.manifest.virtual_size != size {
        return Ok(Err(format!(
            "restore point {} is {} bytes, {} is {size}",
            holds.id, holds.manifest.virtual_size, rp.id
        )));
    }
    let changed = match BlockMap::from_xenapi_base64(changed, size) {
        Ok(m) => m,
        Err(e) => return Ok(Err(format!("the VDI's changed-block bitmap: {e}"))),
    };
    let blocks = size.div_ceil(BLOCK_SIZE);
    let mut out = BTreeSet::new();
    for run in repo.diff(holds, rp)? {
        out.extend(run.start..run.end.min(blocks));
    }
    for run in changed.runs(0) {
        out.extend(run.start..run.end.min(blocks));
    }
    Ok(Ok(out))
}

/// Reads every block of `grains` from restore point `rp`, checking each
/// against its id, and discards it: run before a rollback writes anything.
pub async fn check_blocks(
    repo: Arc<Repository>,
    rp: &RestorePointRow,
    grains: &BTreeSet<u64>,
) -> Result<()> {
    let export = RestorePointExport::new(repo, rp);
    let size = export.size();
    for g in grains {
        let at = g * BLOCK_SIZE;
        let len = BLOCK_SIZE.min(size.saturating_sub(at)) as u32;
        if let Err(e) = export.read(at, len).await {
            return Err(match e.downcast::<cbtvault_repo::Error>() {
                Ok(source) => Error::DamagedBlock {
                    disk: rp.manifest.disk.clone(),
                    restore_point: rp.id.clone(),
                    offset: at,
                    source,
                },
                Err(e) => Error::Internal(format!("reading block {g} of {}: {e}", rp.id)),
            });
        }
    }
    Ok(())
}

/// A sparse VHD of restore point `rp` holding `grains` (64 KiB blocks,
/// each checked against its id as it is read) as a byte stream, and its
/// length. A failure ends the stream short, so the upload fails.
pub fn restore_point_vhd(
    repo: Arc<Repository>,
    rp: &RestorePointRow,
    grains: BTreeSet<u64>,
) -> Result<(tokio::io::DuplexStream, u64)> {
    use tokio::io::AsyncWriteExt;
    let vhd = SparseVhd::new(rp.manifest.virtual_size, grains)
        .map_err(|e| Error::Target(e.to_string()))?;
    let len = vhd.len();
    let export = RestorePointExport::new(repo, rp);
    let (writer, reader) = tokio::io::duplex(8 << 20);
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut out = Pipe {
            writer,
            handle: handle.clone(),
            buf: Vec::with_capacity(PIPE_CHUNK),
        };
        let written = vhd.write_to(&mut out, |g, buf| {
            let data = handle
                .block_on(export.read(g * BLOCK_SIZE, buf.len() as u32))
                .map_err(std::io::Error::other)?;
            if data.len() != buf.len() {
                return Err(std::io::Error::other("short read from the repository"));
            }
            buf.copy_from_slice(&data);
            Ok(())
        });
        let flushed = written.and_then(|_| std::io::Write::flush(&mut out));
        match flushed {
            Ok(()) => {
                let _ = handle.block_on(out.writer.shutdown());
            }
            // Dropping the writer unfinished makes the upload fail short.
            Err(e) => tracing::error!(error = %e, "VHD stream stopped"),
        }
    });
    Ok((reader, len))
}

const PIPE_CHUNK: usize = 1 << 20;

/// A blocking `Write` into the async half of a pipe.
struct Pipe {
    writer: tokio::io::DuplexStream,
    handle: tokio::runtime::Handle,
    buf: Vec<u8>,
}

impl std::io::Write for Pipe {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PIPE_CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        if !self.buf.is_empty() {
            self.handle.block_on(self.writer.write_all(&self.buf))?;
            self.buf.clear();
        }
        Ok(())
    }
}
