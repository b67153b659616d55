//! The QEMU backup provider: pull-mode incremental backups of a disk held
//! by QEMU or qemu-storage-daemon (QSD), driven over QMP.
//!
//! It hands the engine a consistent point-in-time view of the disk over
//! NBD, plus, for an incremental, the changed 64 KiB blocks as an NBD
//! meta context. It knows nothing of the repository or the engine: the
//! caller reads the export (with `base:allocation` for a full, the
//! dirty-bitmap context for an incremental) and then calls
//! [`QemuDisk::commit`] or [`QemuDisk::abort`].
//!
//! # The recipe
//! [`QemuDisk::prepare`] follows the atomic snapshot-access recipe that
//! was verified with QEMU 10 (shared/specs/qemu-backup.md, §3c):
//! 1. Create a qcow2 fleece image of the disk's size (`blockdev-create`,
//!    so QEMU owns the file) and add it as a node.
//! 2. One `transaction`: `block-dirty-bitmap-add` of the new persistent
//!    checkpoint (granularity 64 KiB), `block-dirty-bitmap-disable` of the
//!    previous one (incremental only), and `blockdev-backup sync=none`
//!    into the fleece with a named copy-before-write filter. That instant
//!    is the backup's point in time; the filter sits above the disk in
//!    all its parents, so guest writes from then on first copy the old
//!    data into the fleece.
//! 3. A `snapshot-access` node on the filter presents that frozen view,
//!    exported read-only over NBD (`block-export-add`, with the frozen
//!    previous checkpoint attached as `qemu:dirty-bitmap:NAME`). QEMU's
//!    NBD server is started on our unix socket if none runs.
//!
//! The teardown order is export, snapshot-access node, backup job
//! (`block-job-cancel`, which removes the filter), fleece nodes, fleece
//! file. QEMU older than 7.0 has no snapshot-access and is refused at
//! [`QemuDisk::connect`].
//!
//! # Checkpoints
//! A checkpoint is a persistent dirty bitmap named `cbtv-<job>-<millis>`.
//! Checkpoints rotate: at most two exist per job, and only during a
//! backup. On commit the old one is removed. On abort the new one's bits
//! are merged back into the old one and the old one is re-enabled in one
//! transaction, so the `previous` the caller holds stays valid and no
//! write is lost; the new one is then removed. (Merging the old into the
//! new instead would lose nothing either, but would make the caller
//! switch checkpoints after a failure, which a crash could prevent.)
//!
//! `prepare` checks `previous` first. A bitmap QEMU reports
//! `inconsistent` (the image was open when QEMU was killed) or that is
//! missing (QEMU writes runtime-created persistent bitmaps to the image
//! only on a clean close) cannot be trusted: it is removed and the backup
//! becomes [`BackupKind::NeedsFull`]. A run killed between `prepare` and
//! `commit`/`abort` leaves `previous` frozen and a newer checkpoint
//! recording; the next `prepare` merges them back (or, if the caller's
//! `previous` is the newer one, because the restore point was recorded,
//! just removes the older). So the job's other checkpoints are removed on
//! every `prepare`: one job name must stand for one disk and one
//! repository.
//!
//! # Leftovers
//! Every QEMU object of a job is named `cbtv-<job>-...` (node names are at
//! most 31 bytes, hence job names of at most 20). `prepare` refuses to run
//! when any exists, since another backup of the job may be running;
//! [`QemuDisk::cleanup_leftovers`] removes them after a crash. All removal
//! is driven by what QEMU reports, so it is idempotent. A failed `prepare`
//! undoes itself the same way.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> cbtvault_qemu::Result<()> {
//! use cbtvault_qemu::{CheckpointName, QemuDisk};
//! let disk = QemuDisk::connect("/run/qsd/qmp.sock", "disk0").await?;
//! // The checkpoint recorded with the last restore point, if any.
//! let previous: Option<CheckpointName> = None;
//! let export = disk.prepare("vm1-disk0", previous.as_ref()).await?;
//! // Read export.nbd_uri(): every allocated block, or, for an incremental,
//! // only those export.dirty_bitmap_context() marks dirty. Record
//! // export.checkpoint() with the restore point, then:
//! disk.commit(export).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Crates used
//! `cbtvault-qmp` (the QMP client), `tokio` (async I/O and timers, and a
//! unix-socket probe that the running NBD server is ours), `serde` and
//! `serde_json` (QMP arguments; checkpoint names serialise as strings),
//! `thiserror` (the error enum), `tracing` (what was created and removed).

mod disk;
mod error;
mod finish;
mod names;

pub use cbtvault_qmp::{Address, DirtyBitmap, Qmp};
pub use disk::{
    BackupExport, BackupKind, CheckpointState, DiskOptions, GRANULARITY, NBD_SOCKET_NAME, QemuDisk,
};
pub use error::{Error, Result};
pub use names::{CheckpointName, MAX_JOB_NAME};
