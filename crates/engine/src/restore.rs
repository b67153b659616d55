//! Restoring a restore point to a target, checking every block.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cbtvault_blockmap::BLOCK_SIZE;
use cbtvault_repo::{BlobId, Repository, RestorePointRow};
use cbtvault_repo::{Visitor, walk};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::progress::Progress;

/// Where a restore writes. Called from several threads at once.
pub trait DiskTarget: Send + Sync {
    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// True when the target reads as zeros already (a new sparse file), so
    /// zero blocks need no write.
    fn is_zeroed(&self) -> bool;
    /// Makes everything written durable and final.
    fn finish(&self) -> std::io::Result<()>;
}

/// A restore target on the local machine.
///
/// - A new file is written under a temporary name beside the destination
///   (mode 0600, whatever the umask: it holds a VM's disk) and renamed over
///   it only when the restore succeeded, so a failed restore never leaves a
///   half-written file under the real name.
/// - An existing regular file (with `overwrite`) is written in place: same
///   inode, owner, mode and links, truncated to the disk's size.
/// - A block device (with `overwrite`) is written in place, opened with
///   `O_EXCL` so that a mounted device is refused; it must hold at least
///   the disk's size, and bytes past it are left as they were.
///
/// Anything else (character devices such as `/dev/null`, FIFOs, sockets,
/// directories) is refused: a restore there would report success and keep
/// nothing.
#[derive(Debug)]
pub struct FileTarget {
    file: File,
    /// Writers queue here instead of spinning on the kernel's inode lock.
    write_lock: Mutex<()>,
    kind: TargetKind,
    path: PathBuf,
}

#[derive(Debug)]
enum TargetKind {
    /// A new file under this temporary name until `finish`.
    New { tmp: PathBuf },
    /// An existing regular file, truncated, so it reads as zeros.
    ExistingFile,
    /// A block device, whose old contents must be overwritten with zeros.
    BlockDevice,
}

impl FileTarget {
    /// Prepares a target of `size` bytes at `path` (see the type's
    /// documentation); an existing file or device is an error unless
    /// `overwrite`.
    pub fn create(path: &Path, size: u64, overwrite: bool) -> Result<FileTarget> {
        let shown = path.display();
        let existing = match std::fs::metadata(path) {
            Ok(meta) => Some(meta.file_type()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::Target(format!("cannot inspect {shown}: {e}"))),
        };
        let Some(file_type) = existing else {
            return Self::create_new(path, size);
        };
        if !crate::source::holds_a_disk(&file_type) {
            return Err(Error::Target(format!(
                "{shown} is {}; restore writes to a regular file, a block device or an NBD export (nbd://…)",
                crate::source::describe(&file_type)
            )));
        }
        let device = std::os::unix::fs::FileTypeExt::is_block_device(&file_type);
        if !overwrite {
            return Err(Error::Target(if device {
                format!("{shown} is a block device; pass --force to overwrite its contents")
            } else {
                format!("{shown} exists; pass --force to overwrite it")
            }));
        }
        if device {
            Self::open_device(path, size)
        } else {
            Self::open_existing(path, size)
        }
    }

    fn create_new(path: &Path, size: u64) -> Result<FileTarget> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let name = path
            .file_name()
            .ok_or_else(|| Error::Target(format!("{} is not a file name", path.display())))?;
        let tmp = path.with_file_name(format!(".{}.cbtvault-partial", name.to_string_lossy()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            // An older partial file keeps its mode on open: set it exactly.
            .and_then(|f| {
                f.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .map(|()| f)
            })
            .and_then(|f| f.set_len(size).map(|()| f))
            .map_err(|e| Error::Target(format!("cannot create {}: {e}", tmp.display())))?;
        Ok(FileTarget {
            file,
            write_lock: Mutex::new(()),
            kind: TargetKind::New { tmp },
            path: path.to_path_buf(),
        })
    }

    fn open_existing(path: &Path, size: u64) -> Result<FileTarget> {
        let file = open_in_place(path, 0).map_err(|e| {
            Error::Target(format!("cannot open {} for writing: {e}", path.display()))
        })?;
        check_kind(&file, path, false)?;
        // Emptied first, so blocks the restore point holds as zeros need
        // no write and the file stays as sparse as the disk.
        file.set_len(0)
            .and_then(|()| file.set_len(size))
            .map_err(|e| Error::Target(format!("cannot resize {}: {e}", path.display())))?;
        Ok(FileTarget {
            file,
            write_lock: Mutex::new(()),
            kind: TargetKind::ExistingFile,
            path: path.to_path_buf(),
        })
    }

    fn open_device(path: &Path, size: u64) -> Result<FileTarget> {
        // O_EXCL on a block device: refused while it is mounted or held.
        let file = open_in_place(path, libc::O_EXCL).map_err(|e| {
            Error::Target(if e.raw_os_error() == Some(libc::EBUSY) {
                format!(
                    "{} is mounted or in use; unmount it (or stop what holds it) first",
                    path.display()
                )
            } else {
                format!("cannot open {} for writing: {e}", path.display())
            })
        })?;
        check_kind(&file, path, true)?;
        let device_size = {
            use std::io::Seek;
            let mut f = &file;
            f.seek(std::io::SeekFrom::End(0)).map_err(|e| {
                Error::Target(format!("cannot read the size of {}: {e}", path.display()))
            })?
        };
        if device_size < size {
            return Err(Error::Target(format!(
                "block device {} holds {device_size} bytes; the restore point needs {size}",
                path.display()
            )));
        }
        if device_size > size {
            tracing::info!(
                device = %path.display(),
                device_size,
                size,
                "the device is larger than the disk; bytes past the disk's end are left as they are"
            );
        }
        Ok(FileTarget {
            file,
            write_lock: Mutex::new(()),
            kind: TargetKind::BlockDevice,
            path: path.to_path_buf(),
        })
    }

    /// Whether the target is written in place (an existing file or a
    /// device): after a failure it holds a partial restore.
    pub fn in_place(&self) -> bool {
        !matches!(self.kind, TargetKind::New { .. })
    }

    /// Removes the temporary file after a failure. A target written in
    /// place cannot be put back; it is left as it is.
    pub fn abandon(self) {
        if let TargetKind::New { tmp } = &self.kind {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Opens an existing file or device for writing, never creating it.
/// O_NONBLOCK: should the path have become a FIFO since it was inspected,
/// the open fails at once instead of waiting for a reader (`check_kind`
/// clears the flag once the type is confirmed).
fn open_in_place(path: &Path, extra_flags: i32) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(extra_flags | libc::O_NONBLOCK)
        .open(path)
}

/// Checks what was opened is still what was inspected before opening, and
/// makes its writes blocking again.
fn check_kind(file: &File, path: &Path, device: bool) -> Result<()> {
    let file_type = file
        .metadata()
        .map_err(|e| Error::Target(format!("cannot inspect {}: {e}", path.display())))?
        .file_type();
    let is_device = std::os::unix::fs::FileTypeExt::is_block_device(&file_type);
    if (device && !is_device) || (!device && !file_type.is_file()) {
        return Err(Error::Target(format!(
            "{} changed while it was being opened (it is now {}); try again",
            path.display(),
            crate::source::describe(&file_type)
        )));
    }
    crate::source::clear_nonblocking(file).map_err(|e| {
        Error::Target(format!(
            "cannot prepare {} for writing: {e}",
            path.display()
        ))
    })
}

impl DiskTarget for FileTarget {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let _turn = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.file.write_all_at(data, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if matches!(self.kind, TargetKind::BlockDevice) && zero_range(&self.file, offset, len) {
            return Ok(());
        }
        let zeros = vec![0u8; BLOCK_SIZE as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(BLOCK_SIZE);
            self.file
                .write_all_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    fn is_zeroed(&self) -> bool {
        !matches!(self.kind, TargetKind::BlockDevice)
    }

    fn finish(&self) -> std::io::Result<()> {
        self.file.sync_all()?;
        let TargetKind::New { tmp } = &self.kind else {
            return Ok(());
        };
        std::fs::rename(tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Zeroes a range of a block device without sending the zeros (the device
/// may unmap or offload it); false when the device cannot, e.g. a range
/// not aligned to its sectors, and the caller writes zeros instead.
fn zero_range(file: &File, offset: u64, len: u64) -> bool {
    use std::os::unix::io::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return false;
    };
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, off, n) == 0 }
}

/// What a restore did.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RestoreStats {
    pub blocks_written: u64,
    pub bytes_written: u64,
    pub blocks_zero: u64,
    pub duration_ms: u64,
}

/// One level-1 node's worth of work.
struct Leaf {
    first: u64,
    ids: Vec<BlobId>,
}

/// Restores `rp` into `target` on `workers` threads. Every block is
/// checked against its id; the first damaged block stops the restore with
/// an error naming its disk offset.
pub fn restore(
    repo: &Repository,
    rp: &RestorePointRow,
    target: &dyn DiskTarget,
    workers: usize,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<RestoreStats> {
    let started = std::time::Instant::now();
    let _lock = repo.lock_shared()?;
    let manifest = &rp.manifest;
    let tree = manifest.tree();
    let size = manifest.virtual_size;
    progress.start("restore", size);
    let (tx, rx) = flume::bounded::<Leaf>(workers * 4);
    let stats = Mutex::new(RestoreStats::default());
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    };
    let damaged = |offset: u64, source: cbtvault_repo::Error| Error::DamagedBlock {
        disk: manifest.disk.clone(),
        restore_point: rp.id.clone(),
        offset,
        source: Box::new(source),
    };

    let totals = &stats;
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            let rx = rx.clone();
            s.spawn(move || {
                let reader = match repo.reader() {
                    Ok(r) => r,
                    Err(e) => return fail(e.into()),
                };
                for leaf in rx.iter() {
                    if cancel.is_cancelled() {
                        return fail(Error::Cancelled);
                    }
                    let mut local = RestoreStats::default();
                    let wanted: Vec<(u64, BlobId)> = leaf
                        .ids
                        .iter()
                        .enumerate()
                        .map(|(i, id)| (leaf.first + i as u64, *id))
                        .filter(|(_, id)| !id.is_zero())
                        .collect();
                    local.blocks_zero = leaf.ids.len() as u64 - wanted.len() as u64;
                    let ids: Vec<BlobId> = wanted.iter().map(|(_, id)| *id).collect();
                    let contents = match reader.read_many(&ids) {
                        Ok(c) => c,
                        Err(e) => return fail(damaged(wanted[0].0 * BLOCK_SIZE, e)),
                    };
                    // Adjacent blocks go out as one write: fewer system calls
                    // and far less contention on the target's inode lock.
                    let mut run: Vec<u8> = Vec::new();
                    let mut run_start = 0u64;
                    for ((block, _), content) in wanted.iter().zip(contents) {
                        let offset = block * BLOCK_SIZE;
                        let content = match content {
                            Ok(c) => c,
                            Err(e) => return fail(damaged(offset, e)),
                        };
                        let expected = BLOCK_SIZE.min(size - offset);
                        if content.len() as u64 != expected {
                            return fail(damaged(
                                offset,
                                cbtvault_repo::Error::InvalidArgument(format!(
                                    "block holds {} bytes where {expected} belong",
                                    content.len()
                                )),
                            ));
                        }
                        if !run.is_empty() && run_start + run.len() as u64 != offset {
                            if let Err(source) = target.write_at(run_start, &run) {
                                return fail(Error::TargetWrite {
                                    offset: run_start,
                                    source,
                                });
                            }
                            run.clear();
                        }
                        if run.is_empty() {
                            run_start = offset;
                        }
                        run.extend_from_slice(&content);
                        local.blocks_written += 1;
                        local.bytes_written += content.len() as u64;
                    }
                    if !run.is_empty()
                        && let Err(source) = target.write_at(run_start, &run)
                    {
                        return fail(Error::TargetWrite {
                            offset: run_start,
                            source,
                        });
                    }
                    if !target.is_zeroed() {
                        for (i, id) in leaf.ids.iter().enumerate() {
                            if id.is_zero() {
                                let offset = (leaf.first + i as u64) * BLOCK_SIZE;
                                if let Err(source) =
                                    target.write_zeroes(offset, BLOCK_SIZE.min(size - offset))
                                {
                                    return fail(Error::TargetWrite { offset, source });
                                }
                            }
                        }
                    }
                    progress.advance(leaf.ids.len() as u64 * BLOCK_SIZE);
                    let mut total = totals.lock().unwrap_or_else(|p| p.into_inner());
                    total.blocks_written += local.blocks_written;
                    total.bytes_written += local.bytes_written;
                    total.blocks_zero += local.blocks_zero;
                }
            });
        }
        drop(rx);
        // The walk runs here, feeding the workers; zero subtrees that the
        // walk skips are zeroed explicitly when the target needs it.
        let walked = (|| -> Result<()> {
            let reader = repo.reader()?;
            let mut feed = Feed {
                tx: &tx,
                target,
                size,
                next: 0,
                progress,
            };
            walk(&tree, &reader, &mut feed).map_err(|e| damaged(feed.next * BLOCK_SIZE, e))?;
            feed.zero_to(tree.shape.blocks)
        })();
        drop(tx);
        if let Err(e) = walked {
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
    let mut stats = stats.into_inner().unwrap_or_else(|p| p.into_inner());
    // Zero blocks of all-zero subtrees are never visited: every block not
    // written is a zero block.
    stats.blocks_zero = manifest
        .virtual_size
        .div_ceil(BLOCK_SIZE)
        .saturating_sub(stats.blocks_written);
    stats.duration_ms = started.elapsed().as_millis() as u64;
    Ok(stats)
}

struct Feed<'a> {
    tx: &'a flume::Sender<Leaf>,
    target: &'a dyn DiskTarget,
    size: u64,
    next: u64,
    progress: &'a dyn Progress,
}

impl Feed<'_> {
    /// Accounts for (and, on a target that needs it, zeroes) the blocks
    /// of skipped zero subtrees up to `block`.
    fn zero_to(&mut self, block: u64) -> Result<()> {
        if block > self.next {
            let offset = self.next * BLOCK_SIZE;
            let len = (block * BLOCK_SIZE).min(self.size) - offset;
            if !self.target.is_zeroed() {
                self.target
                    .write_zeroes(offset, len)
                    .map_err(|source| Error::TargetWrite { offset, source })?;
            }
            self.progress.advance(len);
            self.next = block;
        }
        Ok(())
    }
}

impl Visitor for Feed<'_> {
    fn leaf(&mut self, first: u64, ids: &[BlobId]) -> cbtvault_repo::Result<()> {
        self.zero_to(first)
            .map_err(|e| cbtvault_repo::Error::InvalidArgument(e.to_string()))?;
        self.next = first + ids.len() as u64;
        self.tx
            .send(Leaf {
                first,
                ids: ids.to_vec(),
            })
            .map_err(|_| cbtvault_repo::Error::InvalidArgument("restore workers stopped".into()))
    }
}
