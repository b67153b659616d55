//! Advisory file locks between cbtvault processes of one host, each with
//! the lock object that shows it to other hosts where one is needed (see
//! the locking table in the crate documentation and `lease.rs`).

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::lease::Lease;

/// A held lock; released when dropped (or when the process dies, which is
/// why these are kernel locks and not lock files that could go stale),
/// with its lock object in the repository when it has one (removed when
/// dropped, stale when the process dies).
#[derive(Debug)]
pub struct Lock {
    // Dropped first: the lock object goes before the kernel lock.
    lease: Option<Lease>,
    _file: File,
    path: PathBuf,
}

impl Lock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock object that shows this lock to other hosts, if any.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    pub(crate) fn with_lease(mut self, lease: Option<Lease>) -> Lock {
        self.lease = lease;
        self
    }
}

/// How a lock is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Many holders at once.
    Shared,
    /// One holder, and no shared holders.
    Exclusive,
}

/// Takes `mode` on `path`, retrying for up to `wait`.
pub fn acquire(path: &Path, what: &str, mode: LockMode, wait: Duration) -> Result<Lock> {
    if let Some(dir) = path.parent() {
        crate::backend::create_private_dir(dir)?;
    }
    let file = OpenOptions::new()
        .mode(0o600)
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(Error::io(path))?;
    let deadline = Instant::now() + wait;
    loop {
        let attempt = match mode {
            LockMode::Shared => file.try_lock_shared(),
            LockMode::Exclusive => file.try_lock(),
        };
        match attempt {
            Ok(()) => {
                return Ok(Lock {
                    lease: None,
                    _file: file,
                    path: path.to_path_buf(),
                });
            }
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(Error::Locked {
                    what: what.to_string(),
                    holder: match mode {
                        LockMode::Shared => "an exclusive operation such as repair".into(),
                        LockMode::Exclusive => "a backup, restore or other operation".into(),
                    },
                });
            }
            Err(TryLockError::Error(source)) => {
                return Err(Error::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}
