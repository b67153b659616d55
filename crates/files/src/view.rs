//! A restore point's disk as random-access bytes, fetched block by block
//! from the repository.
//!
//! [`DiskView`] maps a byte range to the 64 KiB blocks under it, finds each
//! block's id in the restore point's block map (nodes cached per level),
//! reads and checks the block ([`cbtvault_repo::BlobReader::read`] hashes
//! it against its id) and keeps the most recent blocks in a small LRU
//! cache: file system readers go back to the same metadata blocks again
//! and again. Only blocks a reader touches are ever fetched.
//!
//! [`Slice`] is a window on the view (a partition, or the whole disk) with
//! its own position: `Read + Seek` for `ntfs`, `mbrman` and `gptman`,
//! `Read + Write + Seek` for `fatfs` (writes are refused), and
//! `Ext4Read` for `ext4-view`.
//!
//! Every read counts against a **budget** the caller sets per operation:
//! damaged metadata can send a reader round a loop (a FAT chain pointing
//! back, a directory that contains itself), and a reader that has read
//! far more than the operation can need is stopped with an error instead
//! of hanging.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::num::NonZeroUsize;
use std::rc::Rc;
use std::sync::Arc;

use cbtvault_repo::{BLOCK_SIZE, BlobId, BlobReader, FANOUT, Repository, Tree, decode_node};

use crate::error::{Error, Result};

/// Why the last read failed, beyond what an `io::Error` can carry.
#[derive(Debug)]
pub(crate) enum Failure {
    Damaged {
        offset: u64,
        source: Box<cbtvault_repo::Error>,
    },
    Budget {
        read: u64,
    },
}

/// Decoded nodes kept (4 KiB each at most): far more than one walk down
/// needs, and a bound whatever the disk size.
const NODE_CACHE: usize = 1024;

/// Where the blocks come from.
enum Source {
    Repo {
        /// Boxed: it is large, and the in-memory source is small.
        reader: Box<BlobReader>,
        tree: Tree,
        /// Held so that gc cannot delete a block while it is being read.
        _lock: cbtvault_repo::Lock,
    },
    /// An image in memory: the readers' tests and fuzzing, without a
    /// repository in the way.
    Memory(Vec<u8>),
}

/// Decoded block-map nodes by (level, index).
type NodeCache = HashMap<(u32, u64), Rc<Vec<BlobId>>>;

pub(crate) struct DiskView {
    source: Source,
    size: u64,
    restore_point: String,
    nodes: RefCell<NodeCache>,
    blocks: RefCell<lru::LruCache<u64, Rc<Vec<u8>>>>,
    /// Bytes a reader may still read in the current operation.
    budget: Cell<u64>,
    /// Bytes read in the current operation.
    read: Cell<u64>,
    /// Bytes read since the view was opened.
    total: Cell<u64>,
    /// Blocks fetched from the repository since the view was opened.
    fetched: Cell<u64>,
    failure: RefCell<Option<Failure>>,
}

impl DiskView {
    pub(crate) fn open(
        repo: &Arc<Repository>,
        rp: &cbtvault_repo::RestorePointRow,
        cache_blocks: usize,
    ) -> Result<DiskView> {
        let lock = repo.lock_shared()?;
        let source = Source::Repo {
            reader: Box::new(repo.reader()?),
            tree: rp.manifest.tree(),
            _lock: lock,
        };
        Ok(Self::with_source(
            source,
            rp.manifest.virtual_size,
            rp.id.clone(),
            cache_blocks,
        ))
    }

    pub(crate) fn in_memory(image: Vec<u8>, label: String, cache_blocks: usize) -> DiskView {
        let size = image.len() as u64;
        Self::with_source(Source::Memory(image), size, label, cache_blocks)
    }

    fn with_source(source: Source, size: u64, restore_point: String, cache_blocks: usize) -> Self {
        DiskView {
            source,
            size,
            restore_point,
            nodes: RefCell::new(HashMap::new()),
            blocks: RefCell::new(lru::LruCache::new(
                NonZeroUsize::new(cache_blocks.max(1)).unwrap_or(NonZeroUsize::MIN),
            )),
            budget: Cell::new(u64::MAX),
            read: Cell::new(0),
            total: Cell::new(0),
            fetched: Cell::new(0),
            failure: RefCell::new(None),
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn restore_point(&self) -> &str {
        &self.restore_point
    }

    /// Bytes read since the view was opened.
    pub(crate) fn total_read(&self) -> u64 {
        self.total.get()
    }

    pub(crate) fn fetched(&self) -> u64 {
        self.fetched.get()
    }

    /// Starts an operation that may read at most `budget` bytes.
    pub(crate) fn set_budget(&self, budget: u64) {
        self.budget.set(budget);
        self.read.set(0);
        self.failure.borrow_mut().take();
    }

    /// Why the last failed read failed, if the view knows better than the
    /// reader's error.
    pub(crate) fn take_failure(&self) -> Option<Failure> {
        self.failure.borrow_mut().take()
    }

    /// Reads exactly `buf.len()` bytes at `offset`; past the disk's end
    /// is an error (a file system claiming more than its disk holds).
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let len = buf.len() as u64;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {len} bytes at {offset} past the disk's end ({} bytes)",
                        self.size
                    ),
                )
            })?;
        let read = self.read.get().saturating_add(len);
        self.read.set(read);
        self.total.set(self.total.get().saturating_add(len));
        if read > self.budget.get() {
            *self.failure.borrow_mut() = Some(Failure::Budget { read });
            return Err(std::io::Error::other("read budget exhausted"));
        }
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let within = (pos % BLOCK_SIZE) as usize;
            let n = ((end - pos) as usize).min(BLOCK_SIZE as usize - within);
            let at = (pos - offset) as usize;
            let dst = &mut buf[at..at + n];
            match self.block(block) {
                Ok(None) => dst.fill(0),
                Ok(Some(data)) => match data.get(within..within + n) {
                    Some(src) => dst.copy_from_slice(src),
                    None => {
                        return Err(self.damaged(
                            block,
                            cbtvault_repo::Error::InvalidArgument(format!(
                                "block holds {} bytes, too few for its place",
                                data.len()
                            )),
                        ));
                    }
                },
                Err(e) => return Err(self.damaged(block, e)),
            }
            pos += n as u64;
        }
        Ok(())
    }

    fn damaged(&self, block: u64, source: cbtvault_repo::Error) -> std::io::Error {
        let offset = block * BLOCK_SIZE;
        let message = format!("block at disk offset {offset}: {source}");
        *self.failure.borrow_mut() = Some(Failure::Damaged {
            offset,
            source: Box::new(source),
        });
        std::io::Error::other(message)
    }

    /// The content of block `index`, or `None` for a zero block.
    fn block(&self, index: u64) -> cbtvault_repo::Result<Option<Rc<Vec<u8>>>> {
        if let Some(b) = self.blocks.borrow_mut().get(&index) {
            return Ok(Some(b.clone()));
        }
        let data = match &self.source {
            Source::Memory(image) => {
                let start = (index * BLOCK_SIZE) as usize;
                let end = (start + BLOCK_SIZE as usize).min(image.len());
                Rc::new(image.get(start..end).unwrap_or(&[]).to_vec())
            }
            Source::Repo { reader, tree, .. } => {
                let id = self.subtree(tree, reader, 0, index)?;
                if id.is_zero() {
                    return Ok(None);
                }
                // `read` checks the content against its id.
                Rc::new(reader.read(&id)?)
            }
        };
        self.fetched.set(self.fetched.get() + 1);
        self.blocks.borrow_mut().put(index, data.clone());
        Ok(Some(data))
    }

    /// The id of subtree `(level, index)` of the block map.
    fn subtree(
        &self,
        tree: &Tree,
        reader: &BlobReader,
        level: u32,
        index: u64,
    ) -> cbtvault_repo::Result<BlobId> {
        let depth = tree.shape.depth();
        if index >= tree.shape.count_at(level) || level > depth {
            return Ok(BlobId::ZERO);
        }
        if level == depth {
            return Ok(tree.root);
        }
        let children = self.node(tree, reader, level + 1, index / FANOUT)?;
        Ok(children
            .get((index % FANOUT) as usize)
            .copied()
            .unwrap_or(BlobId::ZERO))
    }

    fn node(
        &self,
        tree: &Tree,
        reader: &BlobReader,
        level: u32,
        index: u64,
    ) -> cbtvault_repo::Result<Rc<Vec<BlobId>>> {
        if let Some(n) = self.nodes.borrow().get(&(level, index)) {
            return Ok(n.clone());
        }
        let id = self.subtree(tree, reader, level, index)?;
        let count = tree.shape.children_of(level, index);
        let children = Rc::new(if id.is_zero() {
            vec![BlobId::ZERO; count as usize]
        } else {
            decode_node(&id, &reader.read(&id)?, level, count)?
        });
        let mut nodes = self.nodes.borrow_mut();
        if nodes.len() >= NODE_CACHE {
            nodes.clear();
        }
        nodes.insert((level, index), children.clone());
        Ok(children)
    }

    /// Turns a reader's failure into the error that says most: a damaged
    /// block or an exhausted budget if the view saw one, else the reader's
    /// own complaint about the file system.
    pub(crate) fn explain(
        &self,
        place: &str,
        fs: &'static str,
        path: &str,
        detail: String,
    ) -> Error {
        match self.take_failure() {
            Some(Failure::Damaged { offset, source }) => Error::DamagedBlock {
                restore_point: self.restore_point.clone(),
                offset,
                source,
            },
            Some(Failure::Budget { read }) => Error::ReadBudget {
                place: place.to_string(),
                fs,
                path: path.to_string(),
                read,
            },
            None => Error::Corrupt {
                place: place.to_string(),
                fs,
                path: path.to_string(),
                detail,
            },
        }
    }
}

/// A window `[start, start + len)` on a disk view, with a position.
#[derive(Clone)]
pub(crate) struct Slice {
    view: Rc<DiskView>,
    start: u64,
    len: u64,
    pos: u64,
}

impl Slice {
    pub(crate) fn new(view: Rc<DiskView>, start: u64, len: u64) -> Slice {
        // A partition that claims more than the disk holds ends with it.
        let len = len.min(view.size().saturating_sub(start));
        Slice {
            view,
            start,
            len,
            pos: 0,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Reads exactly `buf.len()` bytes at `offset` within the slice.
    pub(crate) fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {offset} past the end of the partition ({} bytes)",
                    buf.len(),
                    self.len
                ),
            ));
        }
        self.view.read_at(self.start + offset, buf)
    }
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        self.read_exact_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Slice {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
        })?;
        Ok(self.pos)
    }
}

/// `fatfs` wants a writable device; nothing here is ever written.
impl Write for Slice {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "a restore point is read-only",
        ))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ext4_view::Ext4Read for Slice {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(self.read_exact_at(start_byte, dst)?)
    }
}
