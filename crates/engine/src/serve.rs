//! A restore point served read-only over NBD ("instant restore"): any NBD
//! client (qemu-img, nbdcopy, a VM's disk) reads the backup without a
//! restore first. Every block served is checked against its id.
//!
//! Reads run on a fixed pool of [`READERS`] blob readers (each a catalogue
//! connection and a decompression context), reused by every connection:
//! however many clients come and go, the server holds no more, and no
//! more reads run at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use cbtvault_blockmap::BLOCK_SIZE;
use cbtvault_nbd::server::{Export, Extent};
use cbtvault_repo::{BlobId, BlobReader, Repository, RestorePointRow};
use cbtvault_repo::{FANOUT, Tree, decode_node};
use futures::future::BoxFuture;

use crate::error::BoxError;

/// Decoded block-map nodes by (level, index).
type NodeCache = HashMap<(u32, u64), Arc<Vec<BlobId>>>;

/// Decoded nodes kept in memory (4 KiB each).
const NODE_CACHE: usize = 4096;

/// Blocks read from packs at once within one request.
const BATCH: u64 = 16;

/// Blob readers, and so reads at once, per export.
pub const READERS: usize = 8;

/// A restore point as an NBD export.
pub struct RestorePointExport {
    inner: Arc<Inner>,
}

struct Inner {
    repo: Arc<Repository>,
    tree: Tree,
    size: u64,
    label: String,
    /// Idle readers; at most `READERS` exist, one per `slots` permit.
    readers: Mutex<Vec<BlobReader>>,
    slots: Arc<tokio::sync::Semaphore>,
    nodes: Mutex<NodeCache>,
}

impl RestorePointExport {
    /// Serves `rp` from `repo`.
    pub fn new(repo: Arc<Repository>, rp: &RestorePointRow) -> RestorePointExport {
        RestorePointExport {
            inner: Arc::new(Inner {
                tree: rp.manifest.tree(),
                size: rp.manifest.virtual_size,
                label: format!("restore point {} of disk {:?}", rp.id, rp.manifest.disk),
                repo,
                readers: Mutex::new(Vec::new()),
                slots: Arc::new(tokio::sync::Semaphore::new(READERS)),
                nodes: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl Inner {
    /// Runs `f` with a pooled reader on a blocking thread, waiting for one
    /// of the `READERS` slots first.
    async fn with_reader<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Inner, &BlobReader) -> Result<T, BoxError> + Send + 'static,
    ) -> Result<T, BoxError> {
        let slot = self.slots.clone().acquire_owned().await?;
        let inner = self.clone();
        // SQLite lookups and pack reads are blocking work.
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let reader = inner.reader()?;
            let r = f(&inner, &reader);
            inner.give_back(reader);
            r
        })
        .await?
    }

    /// A pooled reader, or a new one (only while fewer than `READERS`
    /// exist: the caller holds a slot).
    fn reader(&self) -> Result<BlobReader, BoxError> {
        let pooled = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match pooled {
            Some(r) => Ok(r),
            None => Ok(self.repo.reader()?),
        }
    }

    fn give_back(&self, reader: BlobReader) {
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(reader);
    }

    /// The id of subtree `(level, index)`.
    fn subtree(&self, reader: &BlobReader, level: u32, index: u64) -> Result<BlobId, BoxError> {
        let depth = self.tree.shape.depth();
        if index >= self.tree.shape.count_at(level) {
            return Ok(BlobId::ZERO);
        }
        if level == depth {
            return Ok(self.tree.root);
        }
        let children = self.node(reader, level + 1, index / FANOUT)?;
        Ok(children
            .get((index % FANOUT) as usize)
            .copied()
            .unwrap_or(BlobId::ZERO))
    }

    fn node(
        &self,
        reader: &BlobReader,
        level: u32,
        index: u64,
    ) -> Result<Arc<Vec<BlobId>>, BoxError> {
        if let Some(n) = self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(level, index))
        {
            return Ok(n.clone());
        }
        let id = self.subtree(reader, level, index)?;
        let count = self.tree.shape.children_of(level, index);
        let children = Arc::new(if id.is_zero() {
            vec![BlobId::ZERO; count as usize]
        } else {
            decode_node(&id, &reader.read(&id)?, level, count)?
        });
        let mut cache = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= NODE_CACHE {
            // Bounded memory; reads are mostly sequential, so a plain reset is enough.
            cache.clear();
        }
        cache.insert((level, index), children.clone());
        Ok(children)
    }

    /// Reads `len` bytes at `offset`: the whole blocks they lie in are
    /// decoded (and checked) straight into one buffer, zero blocks left as
    /// its zeros, and the answer is a slice of it (no copy).
    fn read_blocking(&self, reader: &BlobReader, offset: u64, len: u32) -> Result<Bytes, BoxError> {
        let end = offset.saturating_add(u64::from(len));
        if end > self.size {
            // The NBD server refuses such requests first; never trusted.
            return Err(format!(
                "{}: a read past the end ({end} > {})",
                self.label, self.size
            )
            .into());
        }
        let (first, last) = (offset / BLOCK_SIZE, (end - 1) / BLOCK_SIZE);
        let start = first * BLOCK_SIZE;
        let stop = ((last + 1) * BLOCK_SIZE).min(self.size);
        let mut out = BytesMut::zeroed((stop - start) as usize);
        let mut batch_start = first;
        for chunk in out.chunks_mut((BATCH * BLOCK_SIZE) as usize) {
            let mut wanted = Vec::with_capacity(BATCH as usize);
            for (i, block) in chunk.chunks_mut(BLOCK_SIZE as usize).enumerate() {
                let id = self.subtree(reader, 0, batch_start + i as u64)?;
                if !id.is_zero() {
                    wanted.push((batch_start + i as u64, id, block));
                }
            }
            let mut slots: Vec<(BlobId, &mut [u8])> = wanted
                .iter_mut()
                .map(|(_, id, b)| (*id, &mut **b))
                .collect();
            let results = reader.read_many_into(&mut slots)?;
            for ((block, _, _), result) in wanted.iter().zip(results) {
                result.map_err(|e| {
                    format!(
                        "{}: block at offset {}: {e}",
                        self.label,
                        block * BLOCK_SIZE
                    )
                })?;
            }
            batch_start += BATCH;
        }
        let from = (offset - start) as usize;
        Ok(out.freeze().slice(from..from + len as usize))
    }

    fn status_blocking(
        &self,
        reader: &BlobReader,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, BoxError> {
        // Answer at most one leaf's worth at a time; the client asks again.
        let end = (offset + len)
            .min(self.size)
            .min((offset / BLOCK_SIZE + FANOUT) * BLOCK_SIZE);
        let mut out: Vec<Extent> = Vec::new();
        let mut cur = offset;
        while cur < end {
            let block = cur / BLOCK_SIZE;
            let next = ((block + 1) * BLOCK_SIZE).min(end);
            let zero = self.subtree(reader, 0, block)?.is_zero();
            let flags = if zero { Extent::HOLE | Extent::ZERO } else { 0 };
            match out.last_mut() {
                Some(e) if e.flags == flags => e.length += next - cur,
                _ => out.push(Extent {
                    length: next - cur,
                    flags,
                }),
            }
            cur = next;
        }
        Ok(out)
    }
}

impl Export for RestorePointExport {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BoxError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            if len == 0 {
                return Ok(Bytes::new());
            }
            inner
                .with_reader(move |i, r| i.read_blocking(r, offset, len))
                .await
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<Extent>, BoxError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            inner
                .with_reader(move |i, r| i.status_blocking(r, offset, len))
                .await
        })
    }
}

/// The whole disk of a restore point as a byte stream, in order, every
/// block checked (for uploads such as XenServer's `/import_raw_vdi`).
/// Errors end the stream with an `io::Error` that names the block.
pub fn restore_point_reader(
    repo: Arc<Repository>,
    rp: &RestorePointRow,
) -> tokio::io::DuplexStream {
    use tokio::io::AsyncWriteExt;
    let export = RestorePointExport::new(repo, rp);
    let size = export.size();
    let (mut writer, reader) = tokio::io::duplex(8 << 20);
    tokio::spawn(async move {
        let chunk = 4u64 << 20;
        let mut offset = 0;
        while offset < size {
            let len = chunk.min(size - offset) as u32;
            let data = match export.read(offset, len).await {
                Ok(d) => d,
                Err(e) => {
                    // Dropping the writer without finishing makes the reader fail short.
                    tracing::error!(offset, error = %e, "restore stream stopped");
                    return;
                }
            };
            if writer.write_all(&data).await.is_err() {
                return;
            }
            offset += u64::from(len);
        }
        let _ = writer.shutdown().await;
    });
    reader
}
