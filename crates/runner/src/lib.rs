//! cbtvault's job runner: everything between a configured job and the
//! engine, so that `cbtvault backup --config F --job J`, the demo and the
//! daemon run the same code and the command line only parses and prints.
//!
//! # A run
//! 1. [`JobSpec`]: a job from the configuration ([`JobSpec::from_config`])
//!    or a one-off from the command line ([`JobSpec::one_off`]): which
//!    disks, where, and the job's limits, retries, bandwidth and retention.
//! 2. [`Runner::run`] takes the job's lock (one run of a job at a time),
//!    logs in to the pool or connects to the QEMU host, and plans its
//!    *captures*: a VDI, the disks of one consistent VM snapshot, or a QEMU
//!    block node.
//! 3. The captures run at once within three limits ([`Runner`] keeps them
//!    across jobs): disks per job (`parallel`), NBD connections per pool
//!    (`max_nbd_connections`; xapi-nbd allows 16 per host) or disks per
//!    QEMU host (`max_disks`), and disks overall (`[limits] disks`).
//! 4. A disk that fails for a reason that may pass (a dropped connection,
//!    a timeout, a busy host: [`Error::is_retryable`]) is tried again after
//!    `retry_delay`, doubling, up to `retries` times; a disk of a consistent
//!    VM snapshot is retried alone, since its siblings are committed. One
//!    failing disk never stops the others.
//! 5. After each committed disk, retention forgets what the job does not
//!    keep (never the disk's newest restore point).
//! 6. The [`JobReport`] says per disk: ok, full and why, retried, or failed
//!    and why, with its [`Alert`]s: a failed CBT audit, or churn far above
//!    the disk's history (judged before retention, see [`Alert`]).
//!
//! Cancellation (the token passed to [`Runner::run`]) stops waiting
//! captures at once; running ones abort through their provider, which
//! leaves the hypervisor clean (no snapshot holding data, QEMU bitmaps
//! merged back).
//!
//! A copy job ([`CopySpec`], [`run_copy`]) sends restore points to
//! another repository and applies the job's retention there.
//!
//! [`restore_to_pool`] brings a restore point back into a pool as a new VDI;
//! [`restore_vm`] rebuilds a whole VM from a VM-level run (its saved
//! metadata and every disk), planned and checked against the pool before
//! anything is made ([`plan_vm_restore`]), and undone if it fails half-way
//! ([`apply_vm_restore`]);
//! [`plan_qemu_vm_restore`] and [`apply_qemu_vm_restore`] do the same for
//! a QEMU VM into a directory: every drive's image and the drive layout
//! saved at backup time (a QEMU run saves what QMP tells of each node:
//! driver, size, guest device, exports), as `layout.json` and ready
//! `--blockdev`/`--device`/`--export` argument files;
//! [`cleanup()`] removes what killed QEMU backups left in QEMU (the filter
//! in the guest's I/O path, the export, the fleece image) without running
//! one.
//!
//! # Crates used
//! `tokio` (semaphores for the limits, timers for retries), `futures`
//! (running captures at once), `tokio-util` (cancellation).

mod alerts;
mod cleanup;
mod copy_job;
mod error;
mod limits;
mod login;
mod qemu_layout;
mod report;
mod restore;
mod restore_vm;
mod restore_vm_qemu;
mod retention;
mod run;
mod saved_vm;
mod spec;

pub use alerts::{Alert, Measure};
pub use cleanup::{Cleaned, cleanup};
pub use copy_job::{CopyJobReport, CopySpec, run_copy};
pub use error::{Error, Result, VmRestoreRefusal};
pub use login::client_options;
pub use report::{DiskReport, DiskStatus, JobReport, Observer, Silent};
pub use restore::{PoolRestore, VdiRollback, restore_to_pool, rollback_vdi};
pub use restore_vm::{
    PlannedDisk, PlannedDrive, PlannedVif, RESTORED_FROM_KEY, RestoredDisk, RestoredVif,
    VmRestorePlan, VmRestoreRequest, VmRestored, apply_vm_restore, plan_vm_restore,
    plan_vm_restore_in_pool, restore_vm,
};
pub use restore_vm_qemu::{
    ImageFormat, PlannedImage, QemuVmRestorePlan, QemuVmRestoreRequest, QemuVmRestored,
    RestoredImage, apply_qemu_vm_restore, is_qemu_vm, plan_qemu_vm_restore,
};
pub use run::Runner;
pub use spec::{JobSpec, QemuNode, Target};
