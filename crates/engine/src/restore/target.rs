//! Where a restore writes: the [`DiskTarget`] trait and the local
//! [`FileTarget`] (new files, existing files, block devices).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cbtvault_blockmap::BLOCK_SIZE;

use crate::error::{Error, Result};

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
    /// Writers queue here instead of spinning on the kernel's inode lock;
    /// it holds the bytes written since writeback was last started.
    write_lock: Mutex<u64>,
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
    /// An existing file or device that a rollback reads and rewrites in
    /// place, block by block: nothing is truncated or assumed zero.
    InPlace { device: bool },
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
            write_lock: Mutex::new(0),
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
            write_lock: Mutex::new(0),
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
            write_lock: Mutex::new(0),
            kind: TargetKind::BlockDevice,
            path: path.to_path_buf(),
        })
    }

    /// An existing file or block device, opened to be read and rewritten
    /// in place by a rollback (`restore --only-changed`): nothing is
    /// truncated; a device is opened with `O_EXCL`, so a mounted one is
    /// refused.
    pub fn open_in_place(path: &Path) -> Result<FileTarget> {
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| {
            Error::Target(if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "{shown} does not exist; --only-changed rewrites an existing disk (restore without it to make a new file)"
                )
            } else {
                format!("cannot inspect {shown}: {e}")
            })
        })?;
        let file_type = meta.file_type();
        if !crate::source::holds_a_disk(&file_type) {
            return Err(Error::Target(format!(
                "{shown} is {}; a rollback writes to a regular file, a block device or an NBD export",
                crate::source::describe(&file_type)
            )));
        }
        let device = std::os::unix::fs::FileTypeExt::is_block_device(&file_type);
        let flags = if device { libc::O_EXCL } else { 0 };
        let file = open_read_write(path, flags).map_err(|e| {
            Error::Target(if e.raw_os_error() == Some(libc::EBUSY) {
                format!("{shown} is mounted or in use; unmount it (or stop what holds it) first")
            } else {
                format!("cannot open {shown} for reading and writing: {e}")
            })
        })?;
        check_kind(&file, path, device)?;
        Ok(FileTarget {
            file,
            write_lock: Mutex::new(0),
            kind: TargetKind::InPlace { device },
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

/// Opens an existing file or device to read and write it in place (see
/// [`open_in_place`] for O_NONBLOCK).
fn open_read_write(path: &Path, extra_flags: i32) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
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

/// Bytes a restore writes before it asks the kernel to start writing them
/// back: the disk then works while blocks are still being decoded, and the
/// final fsync has little left to wait for.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// Starts writeback of the file's dirty pages without waiting for it. A
/// hint only: an error here is reported by the fsync that ends the restore.
fn start_writeback(file: &File) {
    // SAFETY: sync_file_range on a descriptor we own; no memory is passed.
    unsafe {
        libc::sync_file_range(
            std::os::fd::AsRawFd::as_raw_fd(file),
            0,
            0,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

impl DiskTarget for FileTarget {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut unflushed = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.file.write_all_at(data, offset)?;
        *unflushed += data.len() as u64;
        if *unflushed >= WRITEBACK_EVERY {
            *unflushed = 0;
            start_writeback(&self.file);
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let done = match self.kind {
            TargetKind::BlockDevice | TargetKind::InPlace { device: true } => {
                zero_range(&self.file, offset, len)
            }
            // A hole reads as zeros and keeps the file as sparse as the disk.
            TargetKind::InPlace { device: false } => punch_hole(&self.file, offset, len),
            _ => false,
        };
        if done {
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
        !matches!(
            self.kind,
            TargetKind::BlockDevice | TargetKind::InPlace { .. }
        )
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

/// Deallocates a range of a regular file so that it reads as zeros;
/// false when the file system cannot, and the caller writes zeros.
fn punch_hole(file: &File, offset: u64, len: u64) -> bool {
    use std::os::unix::io::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return false;
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) == 0 }
}

/// A target whose current contents can be read back, and whose size can
/// be set where the target allows: what a rollback needs. Called from
/// several threads at once.
pub trait ReadableTarget: DiskTarget {
    /// The target's size in bytes.
    fn size(&self) -> std::io::Result<u64>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Makes the target `size` bytes long, or says why it cannot.
    fn set_size(&self, size: u64) -> Result<()>;
}

impl ReadableTarget for FileTarget {
    fn size(&self) -> std::io::Result<u64> {
        use std::io::Seek;
        let mut f = &self.file;
        f.seek(std::io::SeekFrom::End(0))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn set_size(&self, size: u64) -> Result<()> {
        let current = self.size().map_err(|e| {
            Error::Target(format!(
                "cannot read the size of {}: {e}",
                self.path.display()
            ))
        })?;
        match self.kind {
            TargetKind::BlockDevice | TargetKind::InPlace { device: true } if current < size => {
                Err(Error::Target(format!(
                    "block device {} holds {current} bytes; the restore point needs {size}",
                    self.path.display()
                )))
            }
            // Bytes past the disk's end on a larger device are left as they are.
            TargetKind::BlockDevice | TargetKind::InPlace { device: true } => Ok(()),
            _ => self
                .file
                .set_len(size)
                .map_err(|e| Error::Target(format!("cannot resize {}: {e}", self.path.display()))),
        }
    }
}
