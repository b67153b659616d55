//! Append-only repositories: chosen at `init`, they take backups and
//! copies but refuse whatever removes history — forget, gc, retention, and
//! repair's setting aside of damaged files.
//!
//! Two layers: the operations that would remove something ask
//! [`Repository::require_removals`] first, so the user hears which command
//! was refused and why; and the repository's backend is wrapped in
//! [`AppendOnlyBackend`], which refuses to remove or move any pack,
//! manifest or VM metadata file whatever code path asks, so a later change
//! that forgets the first check still cannot erase history.
//!
//! Key slots of an encrypted repository count as history: one may be
//! added, none removed (so `key remove` and `key passwd` are refused).
//!
//! What this guards against is a mistake or a cbtvault process turned
//! against its repository. A host that can write the storage directly
//! (delete files, rewrite `cbtvault.json`) is stopped only by the storage:
//! a key that may only add (an S3 policy without `s3:DeleteObject`), or
//! S3 Object Lock retention on the bucket. docs/cli.md says which stores
//! offer it. Crash-journal notes, partial writes, lock objects and gc
//! records are not history and may still be removed (gc itself is
//! refused, so no gc record is ever written).

use crate::backend::{Backend, FileKind};
use crate::error::{Error, Result};
use crate::repository::Repository;

impl Repository {
    /// Refuses `what` (an operation that removes restore points or data)
    /// on an append-only repository.
    pub fn require_removals(&self, what: &str) -> Result<()> {
        if self.config().append_only {
            return Err(Error::AppendOnly {
                path: self.root().to_path_buf(),
                what: what.to_string(),
            });
        }
        Ok(())
    }
}

/// True for the kinds of file that make up a repository's history, or
/// without which it could not be read (an encrypted repository's key
/// slots: removing them, or changing a passphrase, would lock its owner
/// out as surely as deleting the data; adding one is allowed).
fn is_history(kind: FileKind) -> bool {
    matches!(
        kind,
        FileKind::Pack
            | FileKind::Manifest
            | FileKind::VmMetadata
            | FileKind::Config
            | FileKind::Key
    )
}

/// A backend that never removes or moves history (see the module's docs).
#[derive(Debug)]
pub(crate) struct AppendOnlyBackend {
    inner: std::sync::Arc<dyn Backend>,
}

impl AppendOnlyBackend {
    pub(crate) fn new(inner: std::sync::Arc<dyn Backend>) -> AppendOnlyBackend {
        AppendOnlyBackend { inner }
    }

    fn refuse(&self, kind: FileKind, name: &str, what: &str) -> Error {
        Error::AppendOnly {
            path: self.inner.locate(kind, name).into(),
            what: what.to_string(),
        }
    }
}

impl Backend for AppendOnlyBackend {
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        // Writing a name that exists is allowed only with identical content
        // (the trait's rule), so a write never replaces history.
        self.inner.write(kind, name, data)
    }
    fn write_owned(&self, kind: FileKind, name: &str, data: Vec<u8>) -> Result<Vec<u8>> {
        self.inner.write_owned(kind, name, data)
    }
    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        self.inner.read(kind, name)
    }
    fn read_at(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.inner.read_at(kind, name, offset, len)
    }
    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        self.inner.size(kind, name)
    }
    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        self.inner.list(kind)
    }
    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        if is_history(kind) {
            return Err(self.refuse(kind, name, "removing a file"));
        }
        self.inner.remove(kind, name)
    }
    fn create(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<bool> {
        self.inner.create(kind, name, data)
    }
    fn replace(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        if is_history(kind) {
            return Err(self.refuse(kind, name, "replacing a file"));
        }
        self.inner.replace(kind, name, data)
    }
    fn list_dated(&self, kind: FileKind) -> Result<Vec<(String, Option<jiff::Timestamp>)>> {
        self.inner.list_dated(kind)
    }
    fn list_partial(&self) -> Result<Vec<String>> {
        self.inner.list_partial()
    }
    fn remove_partial(&self) -> Result<usize> {
        self.inner.remove_partial()
    }
    fn locate(&self, kind: FileKind, name: &str) -> String {
        self.inner.locate(kind, name)
    }
    fn set_aside(&self, kind: FileKind, name: &str) -> Result<String> {
        if is_history(kind) {
            return Err(self.refuse(kind, name, "setting a damaged file aside"));
        }
        self.inner.set_aside(kind, name)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::MemoryBackend;

    #[test]
    fn history_can_be_added_to_but_not_removed_or_moved() {
        let backend = AppendOnlyBackend::new(Arc::new(MemoryBackend::new()));
        for kind in [FileKind::Pack, FileKind::Manifest, FileKind::VmMetadata] {
            backend.write(kind, "x", b"data").unwrap();
            assert!(matches!(
                backend.remove(kind, "x"),
                Err(Error::AppendOnly { .. })
            ));
            assert!(matches!(
                backend.set_aside(kind, "x"),
                Err(Error::AppendOnly { .. })
            ));
            assert_eq!(backend.read(kind, "x").unwrap(), b"data");
        }
        // Crash-journal notes and lock objects are bookkeeping, not history.
        backend.write(FileKind::Journal, "n", b"note").unwrap();
        backend.remove(FileKind::Journal, "n").unwrap();
        assert!(backend.list(FileKind::Journal).unwrap().is_empty());
        assert!(backend.create(FileKind::Lock, "disk-1", b"{}").unwrap());
        assert!(!backend.create(FileKind::Lock, "disk-1", b"{}").unwrap());
        backend.replace(FileKind::Lock, "disk-1", b"{ }").unwrap();
        backend.remove(FileKind::Lock, "disk-1").unwrap();
        assert!(backend.list(FileKind::Lock).unwrap().is_empty());
    }
}
