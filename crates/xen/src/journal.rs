//! The crash journal: notes of the snapshots that existed before a run
//! takes one, so that a snapshot whose run died before tagging it is still
//! recognised as that run's and reaped.

use crate::error::BoxError;

/// What a note is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoteKind {
    /// A `VDI.snapshot` (or a VM snapshot's VDI) of one disk.
    VdiSnapshot,
    /// A `VM.snapshot`.
    VmSnapshot,
}

impl NoteKind {
    /// A stable name, for storage.
    pub fn as_str(self) -> &'static str {
        match self {
            NoteKind::VdiSnapshot => "xen-snapshot",
            NoteKind::VmSnapshot => "xen-vm-snapshot",
        }
    }
}

/// Where notes are kept: it must outlive the process (a crash is what the
/// notes are for), and a subject's notes are only read while the caller
/// holds that subject's lock.
pub trait Journal: Send + Sync {
    /// Notes that a run is about to snapshot `subject`, whose snapshots
    /// are now `known` (XenAPI references). Returns the note's id.
    fn note(&self, kind: NoteKind, subject: &str, known: &[String]) -> Result<i64, BoxError>;

    /// Notes of `kind` on `subject` that were never closed (their run
    /// died), with the snapshots they list.
    fn unfinished(
        &self,
        kind: NoteKind,
        subject: &str,
    ) -> Result<Vec<(i64, Vec<String>)>, BoxError>;

    /// Closes a note: `done` once the snapshot is tagged, `reaped` once an
    /// orphan was looked for.
    fn close(&self, note: i64, status: &str) -> Result<(), BoxError>;
}
