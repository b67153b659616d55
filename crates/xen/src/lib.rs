//! XenServer's side of a changed-block-tracking backup, over XenAPI: what
//! `cbtvault-qemu` is for QEMU. It knows nothing of the repository or the
//! engine; the caller reads the snapshot over NBD, commits and checks the
//! restore point, and then calls [`VdiBackup::commit`] — or
//! [`VdiBackup::abort`] when nothing was committed.
//!
//! # One VDI
//! 1. [`VdiBackup::prepare`] reaps what an interrupted run of the job left
//!    (tagged snapshots holding data, stale `cbt_metadata` bases, and an
//!    untagged snapshot a [`Journal`] note identifies), makes sure CBT is
//!    on — where the pool cannot track the VDI (SR, licence, RAW format)
//!    every run is a full read with the reason —, and finds the previous
//!    snapshot (the base). A base that was committed but never
//!    `data_destroy`ed is handed back ([`VdiBackup::unfinished_base`]) for
//!    the caller to check before it is finished.
//! 2. [`VdiBackup::snapshot`]: a journal note of the snapshots that exist,
//!    `VDI.snapshot`, a tag in `other_config` with the job; then
//!    `VDI.list_changed_blocks(base, snapshot)` before NBD is opened. A
//!    broken chain (error 460, a vanished or shrunk base) falls back to a
//!    full read, with the reason ([`XenChanges::Full`]).
//! 3. [`connect_nbd`] opens the snapshot over NBD (TLS, the host's
//!    certificate pinned, as `VDI.get_nbd_info` says).
//! 4. [`VdiBackup::commit`]: `VDI.data_destroy` of the new snapshot
//!    (retrying `VDI_IN_USE`, which the NBD connection's dom0 VBD causes
//!    for a moment), then `destroy` of the previous base. Without CBT the
//!    snapshot is destroyed whole. [`VdiBackup::abort`] destroys the new
//!    snapshot: its changed-block log merges into the disk's, so nothing
//!    is lost and the previous base still works.
//!
//! # A VM, consistently
//! [`VmBackup::prepare`] reaps the job's leftover snapshot VMs; each disk is
//! prepared as above; [`VmBackup::snapshot`] takes one `VM.snapshot` that
//! captures every disk at the same instant and tags it and its VDIs. After
//! reading, [`VmBackup::destroy_snapshot`] must come before any
//! `data_destroy`: the snapshot VM's VBDs keep its VDIs in use.
//! [`vm_disks`] lists a VM's disks with their device positions, and
//! [`vm_metadata`] collects what a whole-VM restore needs.
//!
//! # Crates used
//! `cbtvault-xenapi` (the XenAPI client), `cbtvault-nbd` (connect options
//! and the client for `VDI.get_nbd_info`'s hosts), `cbtvault-blockmap`
//! (the changed-block bitmap), `serde_json` (VM metadata), `jiff` (the
//! snapshot's name), `tokio` (backoff between retries), `thiserror` (the
//! error enum), `tracing` (what was reaped and why a run is full).

mod error;
mod journal;
mod vdi;
mod vm;

pub use error::{BoxError, Error, Result};
pub use journal::{Journal, NoteKind};
pub use vdi::{
    Capture, Previous, TAG_JOB, VdiBackup, XenChanges, XenOptions, connect_nbd, disk_name,
    former_disk_name, nbd_connect_options, pool_uuid,
};
pub use vm::{VmBackup, VmDisk, VmSnapshot, vm_disks, vm_metadata, vm_subject};
