//! NBD as a source and a target: any NBD server (qemu-nbd, QEMU's fleecing
//! exports, nbdkit, XenServer's xapi-nbd) feeds a backup, and any writable
//! export receives a restore.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use cbtvault_blockmap::{BLOCK_SIZE, BlockMap, Extent, block_count};
pub use cbtvault_nbd::{BASE_ALLOCATION, dirty_bitmap_context};
use cbtvault_nbd::{Client, ConnectOptions, StatusExtent};
use cbtvault_repo::SourceInfo;

use crate::error::{BoxError, Error, Result};
use crate::restore::DiskTarget;
use crate::source::DiskSource;

/// A disk read over NBD.
pub struct NbdSource {
    client: Client,
    info: SourceInfo,
    /// The disk's size: the export's, or the hypervisor's when it is not a
    /// whole number of the server's blocks (see [`NbdSource::with_size`]).
    size: u64,
    /// Bytes at the disk's end that no aligned read could reach, stored as
    /// zeros (recorded in the manifest).
    unreadable: AtomicU64,
}

impl NbdSource {
    /// Connects, asking for `base:allocation` (and any contexts already in
    /// `options`). `location` is what the manifest records (no secrets).
    pub async fn connect(mut options: ConnectOptions, location: String) -> Result<NbdSource> {
        if !options.meta_contexts.iter().any(|c| c == BASE_ALLOCATION) {
            options.meta_contexts.push(BASE_ALLOCATION.into());
        }
        let client = Client::connect(&options).await.map_err(|e| Error::Source {
            disk: location.clone(),
            what: "cannot connect to the NBD server".into(),
            source: Some(Box::new(e)),
        })?;
        Ok(NbdSource::from_client(
            client,
            SourceInfo {
                provider: "nbd".into(),
                location,
                ..Default::default()
            },
        ))
    }

    /// Wraps a connected client.
    pub fn from_client(client: Client, info: SourceInfo) -> NbdSource {
        NbdSource {
            size: client.size(),
            client,
            info,
            unreadable: AtomicU64::new(0),
        }
    }

    /// Takes the disk's size from the hypervisor rather than the export.
    /// xapi-nbd exports a VDI as its dom0 block device, a whole number of
    /// 512-byte sectors, while the VDI's `virtual_size` need not be: the
    /// disk is then a little shorter than the export. A disk a little
    /// longer (less than one of the server's blocks) is accepted too; its
    /// unreachable tail reads as zeros, with a warning.
    pub fn with_size(mut self, size: u64) -> Result<NbdSource> {
        let export = self.client.size();
        let align = u64::from(self.client.block_sizes().0.max(1));
        if size > export && size - export >= align {
            return Err(Error::Source {
                disk: self.info.location.clone(),
                what: format!(
                    "the disk is {size} bytes but its NBD export only {export}; is the export the right disk?"
                ),
                source: None,
            });
        }
        self.size = size;
        Ok(self)
    }

    /// The client, for callers that need more of the protocol.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Sets what the manifest records about this source.
    pub fn set_info(&mut self, info: SourceInfo) {
        self.info = info;
    }

    /// Blocks marked dirty in the QEMU dirty bitmap `bitmap`, which must
    /// have been asked for at connect time (`qemu:dirty-bitmap:NAME`).
    pub async fn dirty_blocks(&self, bitmap: &str) -> Result<BlockMap> {
        let context = dirty_bitmap_context(bitmap);
        if !self.client.meta_contexts().contains(&context) {
            return Err(Error::Source {
                disk: self.info.location.clone(),
                what: format!(
                    "the server does not offer {context}; is the bitmap exported (qemu-nbd -B {bitmap})?"
                ),
                source: None,
            });
        }
        check_disk_size(&self.info.location, self.size)?;
        let extents = self.status(&context).await?;
        let dirty = extents
            .into_iter()
            .filter(StatusExtent::is_dirty)
            .map(|e| Extent::new(e.offset, e.length));
        BlockMap::from_extents(block_count(self.size), dirty).map_err(|e| Error::Source {
            disk: self.info.location.clone(),
            what: "the dirty bitmap does not fit the disk".into(),
            source: Some(Box::new(e)),
        })
    }

    async fn status(&self, context: &str) -> Result<Vec<StatusExtent>> {
        let size = self.client.size();
        let mut out = Vec::new();
        let step = 1u64 << 32;
        let mut offset = 0;
        while offset < size {
            let len = step.min(size - offset);
            let part = self
                .client
                .block_status(context, offset, len)
                .await
                .map_err(|e| Error::Source {
                    disk: self.info.location.clone(),
                    what: format!("block status ({context}) at offset {offset}"),
                    source: Some(Box::new(e)),
                })?;
            out.extend(part);
            offset += len;
        }
        Ok(out)
    }
}

/// Refuses a disk larger than any manifest may describe, before a block
/// map is sized from it: an export size is only what the server claims.
pub(crate) fn check_disk_size(disk: &str, size: u64) -> Result<()> {
    if size > cbtvault_repo::MAX_VIRTUAL_SIZE {
        return Err(Error::Source {
            disk: disk.to_string(),
            what: format!(
                "the source claims {size} bytes, more than the {} a disk may have",
                cbtvault_repo::MAX_VIRTUAL_SIZE
            ),
            source: None,
        });
    }
    Ok(())
}

impl DiskSource for NbdSource {
    fn info(&self) -> SourceInfo {
        let mut info = self.info.clone();
        let unreadable = self.unreadable.load(Ordering::Relaxed);
        if unreadable > 0 {
            info.details
                .insert("unreadable_tail_bytes".into(), unreadable.to_string());
        }
        info
    }

    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, BoxError> {
        let (data, zeroed) = read_aligned(&self.client, offset, len).await?;
        if zeroed > 0 && self.unreadable.swap(zeroed, Ordering::Relaxed) == 0 {
            tracing::warn!(
                disk = %self.info.location,
                bytes = zeroed,
                "the last bytes of the disk lie in a partial block the NBD server cannot read; they are stored as zeros"
            );
        }
        Ok(data)
    }

    async fn allocated(&self) -> Result<Option<BlockMap>, BoxError> {
        if !self
            .client
            .meta_contexts()
            .iter()
            .any(|c| c == BASE_ALLOCATION)
        {
            return Ok(None);
        }
        check_disk_size(&self.info.location, self.size)?;
        // Extents that read as zeros need not be read at all.
        let extents = self.status(BASE_ALLOCATION).await?;
        let data = extents
            .into_iter()
            .filter(|e| !e.is_zero())
            .map(|e| Extent::new(e.offset, e.length));
        Ok(Some(BlockMap::from_extents(block_count(self.size), data)?))
    }
}

/// Reads `len` bytes at `offset` with requests the server accepts, and
/// says how many bytes at the end it had to fill with zeros.
///
/// A server with a minimum block size (xapi-nbd: 512 bytes, without
/// saying so) refuses a request that does not cover whole blocks, so the
/// last, partial block of a disk whose size is not a multiple of it cannot
/// be read as such: the read is rounded up to whole blocks when the export
/// holds them (xapi-nbd exports whole sectors), and otherwise the bytes
/// past the last whole block are returned as zeros.
pub(crate) async fn read_aligned(
    client: &Client,
    offset: u64,
    len: usize,
) -> Result<(Bytes, u64), cbtvault_nbd::Error> {
    let export = client.size();
    let align = u64::from(client.block_sizes().0.max(1));
    let end = offset + len as u64;
    if end.div_ceil(align) * align <= export {
        return Ok((client.read(offset, len).await?, 0));
    }
    // What aligned requests can reach.
    let reachable = export / align * align;
    let mut out = bytes::BytesMut::zeroed(len);
    if offset < reachable {
        let n = (reachable.min(end) - offset) as usize;
        out[..n].copy_from_slice(&client.read(offset, n).await?);
    }
    let zeroed = end - reachable.max(offset);
    Ok((out.freeze(), zeroed))
}

/// A writable NBD export as a restore target. Its methods are called from
/// the restore's worker threads and block on the async client.
pub struct NbdTarget {
    client: Arc<Client>,
    runtime: tokio::runtime::Handle,
    zeroed: bool,
}

impl NbdTarget {
    /// A target on a connected client. `known_zero` says the export reads
    /// as zeros already (a fresh image), so zero blocks are not written.
    pub fn new(
        client: Client,
        runtime: tokio::runtime::Handle,
        known_zero: bool,
    ) -> Result<NbdTarget> {
        if client.is_read_only() {
            return Err(Error::Target("the NBD export is read-only".into()));
        }
        Ok(NbdTarget {
            client: Arc::new(client),
            runtime,
            zeroed: known_zero,
        })
    }

    /// The export's size.
    pub fn size(&self) -> u64 {
        self.client.size()
    }
}

fn io(e: cbtvault_nbd::Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl DiskTarget for NbdTarget {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.runtime
            .block_on(self.client.write(offset, data))
            .map_err(io)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut done = 0;
        // Bounded pieces keep each request within the server's limits.
        while done < len {
            let n = (len - done).min(1024 * BLOCK_SIZE);
            self.runtime
                .block_on(self.client.write_zeroes(offset + done, n))
                .map_err(io)?;
            done += n;
        }
        Ok(())
    }

    fn is_zeroed(&self) -> bool {
        self.zeroed
    }

    fn finish(&self) -> std::io::Result<()> {
        self.runtime.block_on(self.client.flush()).map_err(io)
    }
}

/// Reads `samples` blocks from `nbd` (the snapshot a restore point was
/// taken from) and checks that the restore point holds exactly them, and
/// that the repository returns them intact. Run before any irreversible
/// step on the snapshot. The blocks are spread over `focus` (the blocks an
/// incremental read) when given, else over the disk, preferring blocks
/// that hold data.
pub async fn verify_sample(
    nbd: &Client,
    repo: &Arc<cbtvault_repo::Repository>,
    restore_point: &str,
    manifest: &cbtvault_repo::Manifest,
    samples: usize,
    focus: Option<&BlockMap>,
) -> Result<()> {
    use cbtvault_repo::BlobId;
    let tree = manifest.tree();
    let disk = manifest.disk.clone();
    let repo2 = repo.clone();
    let changed: Option<Vec<u64>> = focus
        .filter(|m| m.any_set())
        .map(|m| m.set_blocks().collect());
    let picks = tokio::task::spawn_blocking(move || -> Result<Vec<(u64, BlobId)>> {
        let reader = repo2.reader()?;
        let mut cursor = cbtvault_repo::Cursor::new(tree, &reader);
        let blocks = tree.shape.blocks;
        let positions: Vec<u64> = match &changed {
            Some(list) => {
                let step = (list.len() / samples.max(1)).max(1);
                list.iter().step_by(step).take(samples).copied().collect()
            }
            None => {
                let step = (blocks / samples.max(1) as u64).max(1);
                (0..blocks).step_by(step as usize).take(samples).collect()
            }
        };
        let mut out = Vec::new();
        for start in positions {
            // Prefer a block with data near the chosen place (in order, so
            // the cursor's cache keeps this cheap).
            let mut pick = (start, cursor.subtree(0, start)?);
            let mut b = start + 1;
            while pick.1.is_zero() && changed.is_none() && b < blocks.min(start + 128) {
                pick = (b, cursor.subtree(0, b)?);
                b += 1;
            }
            if !pick.1.is_zero() {
                // The stored copy must read back whole, too.
                reader.read(&pick.1)?;
            }
            out.push(pick);
        }
        Ok(out)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    for (block, id) in picks {
        let offset = block * BLOCK_SIZE;
        let len = BLOCK_SIZE.min(manifest.virtual_size - offset) as usize;
        let (data, _) = read_aligned(nbd, offset, len)
            .await
            .map_err(|e| Error::SourceRead {
                disk: disk.clone(),
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
            return Err(Error::Source {
                disk: disk.clone(),
                what: format!(
                    "check before the irreversible step failed: the block at offset {offset} of the snapshot differs from restore point {restore_point}; the snapshot is kept"
                ),
                source: None,
            });
        }
    }
    Ok(())
}
