//! Disks whose repository name changed.
//!
//! Provider disks were once named without their host: `qemu-NODE` and
//! `xen-VDI`. Two QEMU hosts with a node of the same name then shared one
//! repository disk (every run a false full, one host's retention pruning
//! the other's points). Names now carry the host or pool
//! (`qemu-HOST/NODE`, `xen-POOL/VDI`); restore points under the former name
//! stay where they are and keep their ids.
//!
//! The first run under a new name finds the newest restore point of the
//! former name that this very source made (same provider and location: the
//! other host's points are never taken) and registers it under the new name
//! — the same block map, time and source, a new manifest that records where
//! it came from. It then serves as the parent of an ordinary incremental,
//! so the upgrade costs no full read and loses no changed-block base.

use std::sync::Arc;

use cbtvault_repo::{Manifest, Repository, RestorePointRow};
use tracing::info;

use crate::error::{Error, Result};

/// A disk's name and, when it had one, its former name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskName {
    /// The name restore points are committed under.
    pub name: String,
    /// The name an earlier version used for the same disk.
    pub former: Option<String>,
}

impl DiskName {
    /// A name that never changed (given by the user, say).
    pub fn new(name: impl Into<String>) -> Self {
        DiskName {
            name: name.into(),
            former: None,
        }
    }
}

/// The newest restore point of `disk`: under its name, or else the newest
/// one under its former name that `ours` accepts, registered under the
/// new name first (see the module documentation). The caller holds the
/// disk's lock.
pub(crate) async fn latest(
    repo: &Arc<Repository>,
    disk: &DiskName,
    ours: impl Fn(&Manifest) -> bool + Send + 'static,
) -> Result<Option<RestorePointRow>> {
    let (repo, disk) = (repo.clone(), disk.clone());
    tokio::task::spawn_blocking(move || {
        if let Some(rp) = repo.latest(&disk.name)? {
            return Ok(Some(rp));
        }
        let Some(former) = disk.former.as_deref().filter(|f| *f != disk.name) else {
            return Ok(None);
        };
        let points = repo.catalogue().restore_points(Some(former))?;
        let Some(old) = points.into_iter().rev().find(|rp| ours(&rp.manifest)) else {
            return Ok(None);
        };
        let registered = repo.register_renamed(&old, &disk.name)?;
        let id = registered.id.clone();
        info!(
            disk = %disk.name,
            former = %former,
            restore_point = %old.id,
            registered_as = %id,
            "this disk was stored under its former name; its newest restore point there is the parent of this run (the restore points under the former name are kept; forget them with `cbtvault forget --disk {former}` when no longer needed)"
        );
        Ok(Some(registered))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
}
