//! cbtvault's engine: the pipelines that move disks in and out of a
//! repository.
//!
//! - [`backup()`] reads a [`DiskSource`] — all blocks, or only those a
//!   changed-block map marks — and commits a restore point, with bounded
//!   memory on all cores.
//! - [`restore()`] writes a restore point to a [`DiskTarget`], checking every
//!   block against its id; [`rollback()`] brings a [`ReadableTarget`] that
//!   holds another state of the disk to it writing only the blocks that
//!   differ (found from the block maps, or by hashing the target).
//!
//! - [`provider`]: one lifecycle for every hypervisor — a [`Provider`]
//!   prepares point-in-time views and their changed blocks, [`drive`]
//!   reads, commits and checks each disk, and the provider commits or
//!   aborts. [`xenserver`] (over `cbtvault-xen`), [`qemu`] (over
//!   `cbtvault-qemu`) and [`vmware`] (over `cbtvault-vsphere`) implement it.
//! - [`audit`]: the CBT audit `drive` runs after an incremental — blocks
//!   the change source called unchanged, re-read and compared; a mismatch
//!   fails the disk and makes its next backup a full.
//!
//! Sources and targets are traits so that NBD, XenServer, QEMU and VMware
//! providers plug in beside the local file ones here. Long operations take
//! a [`CancellationToken`](tokio_util::sync::CancellationToken) and report
//! through a [`Progress`].
//!
//! # Crates used
//! `tokio` and `futures` for pipelined source reads and per-disk
//! concurrency, `flume` for bounded channels that connect async tasks to
//! worker threads in both directions, `tokio-util` for cancellation,
//! `cbtvault-xen`, `cbtvault-qemu` and `cbtvault-vsphere` for the
//! hypervisors' sides of a backup, `cbtvault-nbd` to read their views.

pub mod audit;
pub mod backup;
pub mod error;
pub mod nbd;
pub mod progress;
pub mod provider;
pub mod qemu;
pub mod rename;
pub mod restore;
pub mod serve;
pub mod source;
pub mod throttle;
pub mod vmware;
pub mod xenserver;

pub use backup::{
    BackupJob, BackupOptions, BackupOutcome, Changes, DiskLocks, Parent, backup, lock_disk,
};
pub use error::{Error, Result, is_retryable_cause};
pub use progress::{NoProgress, Progress};
pub use provider::{
    DiskRun, DriveContext, Limit, PreparedDisk, ProgressFactory, Provider, SharedProgress, Slots,
    drive,
};
pub use rename::DiskName;
pub use restore::{
    DiskTarget, FileTarget, NbdInPlace, ReadableTarget, RestoreStats, RollbackStats, TargetState,
    check_blocks, restore, restore_point_vhd, rollback, vdi_rollback_blocks,
};
pub use source::{DiskSource, FileSource};
pub use throttle::Throttle;
