//! Where disks are read from: the [`DiskSource`] trait and its local-file
//! implementation.

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use cbtvault_blockmap::{BLOCK_SIZE, BlockMap, block_count};
use cbtvault_repo::SourceInfo;

use crate::error::BoxError;

/// A disk to back up: a fixed-size byte array read at offsets. Reads may be
/// issued concurrently; implementations pipeline them where they can.
pub trait DiskSource: Send + Sync + 'static {
    /// What to record about the source in the manifest.
    fn info(&self) -> SourceInfo;
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `len` bytes at `offset`.
    fn read_at(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = Result<Bytes, BoxError>> + Send;
    /// Blocks that may hold data, when the source knows (sparse files,
    /// NBD `base:allocation`); a full backup reads only these.
    fn allocated(&self) -> impl Future<Output = Result<Option<BlockMap>, BoxError>> + Send {
        async { Ok(None) }
    }
}

/// What a path on the local machine is, in the user's words.
pub(crate) fn describe(file_type: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_file() {
        "a regular file"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// Whether a disk can live at a path of this type: a regular file or a
/// block device. Anything else either never ends (`/dev/zero`, a FIFO) or
/// blocks on open, and has no size.
pub(crate) fn holds_a_disk(file_type: &std::fs::FileType) -> bool {
    use std::os::unix::fs::FileTypeExt;
    file_type.is_file() || file_type.is_block_device()
}

/// A raw disk image (or block device) on the local machine.
#[derive(Clone, Debug)]
pub struct FileSource {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    buffers: BufferPool,
}

/// Read buffers that come back when the data read into them is dropped, so
/// that a backup reuses the few the pipeline holds at once instead of
/// taking fresh zeroed pages from the kernel for every read: page faults
/// and page clearing were a fifth of a full backup's CPU.
#[derive(Clone, Debug, Default)]
struct BufferPool(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

/// More than the backup pipeline ever holds at once (its reads in flight
/// plus its queues); a buffer beyond it is freed.
const POOLED_BUFFERS: usize = 64;

impl BufferPool {
    /// A buffer of `len` bytes (old content, about to be overwritten).
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut buf = reused.unwrap_or_default();
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        buf
    }

    /// `buf` as shared bytes that return it here when the last is dropped.
    fn share(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut pool = self.pool.0.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOLED_BUFFERS {
            pool.push(buf);
        }
    }
}

impl FileSource {
    /// Opens `path` for reading: a regular file or a block device, nothing
    /// else (the error says what the path is instead).
    pub fn open(path: &Path) -> std::io::Result<FileSource> {
        use std::os::unix::fs::OpenOptionsExt;
        let refuse = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("it is {what}; a file source must be a regular file or a block device"),
            )
        };
        // Checked before opening: opening a FIFO would wait for a writer.
        let kind = std::fs::metadata(path)?.file_type();
        if !holds_a_disk(&kind) {
            return Err(refuse(describe(&kind)));
        }
        // O_NONBLOCK, and the type checked again on the descriptor: the path
        // may have been swapped for a FIFO in between.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let kind = file.metadata()?.file_type();
        if !holds_a_disk(&kind) {
            return Err(refuse(describe(&kind)));
        }
        clear_nonblocking(&file)?;
        // A block device reports 0 in metadata; seeking to the end gives
        // the size of both.
        let size = {
            use std::io::Seek;
            let mut f = &file;
            f.seek(std::io::SeekFrom::End(0))?
        };
        Ok(FileSource {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size,
            buffers: BufferPool::default(),
        })
    }
}

/// Turns O_NONBLOCK off again, so reads wait for the device as usual.
pub(crate) fn clear_nonblocking(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl DiskSource for FileSource {
    fn info(&self) -> SourceInfo {
        SourceInfo {
            provider: "file".into(),
            location: self.path.display().to_string(),
            ..Default::default()
        }
    }

    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, BoxError> {
        let file = self.file.clone();
        let mut buf = self.buffers.take(len);
        let buf =
            tokio::task::spawn_blocking(move || file.read_exact_at(&mut buf, offset).map(|()| buf))
                .await??;
        Ok(self.buffers.share(buf))
    }

    async fn allocated(&self) -> Result<Option<BlockMap>, BoxError> {
        let file = self.file.clone();
        let size = self.size;
        Ok(tokio::task::spawn_blocking(move || data_extents(&file, size)).await??)
    }
}

/// Maps the data regions of a sparse file with SEEK_DATA/SEEK_HOLE; `None`
/// when the file system cannot tell.
fn data_extents(file: &File, size: u64) -> std::io::Result<Option<BlockMap>> {
    let fd = file.as_raw_fd();
    let mut map = BlockMap::empty(block_count(size));
    let mut pos: i64 = 0;
    let end = size as i64;
    while pos < end {
        // SAFETY: lseek on a valid descriptor we own has no memory effects.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(Some(map)), // no data after pos
                Some(libc::EINVAL) | Some(libc::ENOTSUP) => Ok(None),
                _ => Err(err),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Ok(None);
        }
        let first = data as u64 / BLOCK_SIZE;
        let last = (hole.min(end) as u64).div_ceil(BLOCK_SIZE);
        if last > first {
            map.set_range(first..last);
        }
        pos = hole;
    }
    Ok(Some(map))
}
