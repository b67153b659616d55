//! All disks of a VM from one consistent `VM.snapshot`.
//!
//! Every disk is prepared as for a single VDI (locked, reaped, CBT on, base
//! found), then one `VM.snapshot` captures them at the same instant. Each
//! snapshot VDI is backed up and checked; the snapshot VM is destroyed (its
//! VBDs would keep the VDIs in use), and only then are the snapshots
//! `data_destroy`ed — or, for a disk that failed, destroyed: the others
//! still complete.

use std::sync::Arc;

use cbtvault_repo::{Repository, RestorePointRow, VmInfo, VmMetadata};
use cbtvault_xen::{VmBackup, VmSnapshot, vm_subject};
use cbtvault_xenapi::Client;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{
    RepoJournal, XenDisk, XenOptions, XenView, from_xen, open_view, pool_uuid, prepare_disk, xapi,
};
use crate::backup::BackupOutcome;
use crate::error::{Error, Result};
use crate::nbd::NbdSource;
use crate::progress::Progress;
use crate::provider::{PreparedDisk, Provider, drive};

/// Every disk of a VM from one VM snapshot.
pub struct XenVm<'a> {
    client: &'a Client,
    vm_uuid: String,
    options: XenOptions,
    state: Option<VmState>,
}

struct VmState {
    /// Held until finish: another run reaping would destroy this run's VM
    /// snapshot under it.
    _lock: (cbtvault_repo::Lock, cbtvault_repo::Lock),
    vm: VmBackup,
    snapshot: VmSnapshot,
    disks: Vec<XenDisk>,
}

impl<'a> XenVm<'a> {
    pub fn new(client: &'a Client, vm_uuid: &str, options: &XenOptions) -> Self {
        XenVm {
            client,
            vm_uuid: vm_uuid.to_string(),
            options: options.clone(),
            state: None,
        }
    }
}

impl Provider for XenVm<'_> {
    type View = XenView;

    fn label(&self) -> String {
        format!("VM {}", self.vm_uuid)
    }

    async fn prepare(&mut self, repo: &Arc<Repository>) -> Result<Vec<PreparedDisk<XenView>>> {
        let client = self.client;
        let label = vm_subject(&self.vm_uuid);
        let lock = lock_vm(repo, &label).await?;
        let journal = RepoJournal(repo.clone());
        let xen = self.options.xen();
        let vm = VmBackup::prepare(client, &self.vm_uuid, &xen, &journal)
            .await
            .map_err(from_xen)?;
        let pool = pool_uuid(client)
            .await
            .map_err(xapi(&label, "reading the pool's uuid"))?;
        let vm_disks = vm.disks(client).await.map_err(from_xen)?;
        let mut disks = Vec::new();
        for d in &vm_disks {
            disks.push(prepare_disk(client, repo, &pool, &d.vdi_uuid, &self.options).await?);
        }
        let backups: Vec<_> = disks.iter().map(|d| &d.backup).collect();
        // What a whole-VM restore rebuilds the VM from, as it is now.
        let metadata = save_vm_metadata(client, repo, &self.vm_uuid).await;
        let (snapshot, captures) = vm
            .snapshot(client, &backups, &xen, &journal)
            .await
            .map_err(from_xen)?;
        let prepared = disks
            .iter()
            .zip(&vm_disks)
            .zip(captures)
            .map(|((disk, d), capture)| {
                let identity = VmInfo {
                    uuid: self.vm_uuid.clone(),
                    name: vm.record().name_label.clone(),
                    host: pool.clone(),
                    disk_label: Some(d.name_label.clone()).filter(|l| !l.is_empty()),
                    device: Some(d.position.clone()),
                    metadata: metadata.clone(),
                };
                {
                    let mut prepared = disk.prepared(capture, &self.options, Some(identity));
                    // The VM snapshot goes whole on abort: no resume.
                    prepared.suspend_as = None;
                    prepared
                }
            })
            .collect();
        self.state = Some(VmState {
            _lock: lock,
            vm,
            snapshot,
            disks,
        });
        Ok(prepared)
    }

    async fn open(&self, view: &XenView) -> Result<NbdSource> {
        open_view(self.client, view, &self.options).await
    }

    async fn finish(
        &mut self,
        outcomes: Vec<(XenView, Option<RestorePointRow>)>,
    ) -> Vec<Result<()>> {
        // Taken: the VM's and the disks' locks go when finish is done.
        let Some(state) = self.state.take() else {
            return outcomes
                .iter()
                .map(|_| Err(Error::Internal("finish before prepare".into())))
                .collect();
        };
        // The snapshot VM's VBDs hold its VDIs: it goes before data_destroy.
        state
            .vm
            .destroy_snapshot(self.client, &state.snapshot)
            .await;
        let mut out = Vec::new();
        for (disk, (view, committed)) in state.disks.iter().zip(outcomes) {
            out.push(
                disk.finish(self.client, None, &view, committed.is_some(), &self.options)
                    .await,
            );
        }
        out
    }
}

/// Backs up every disk of VM `vm_uuid` from one VM snapshot, `parallel`
/// disks at a time. Returns each disk's VDI uuid and outcome.
pub async fn backup_vm(
    xapi_client: &Client,
    repo: Arc<Repository>,
    vm_uuid: &str,
    options: &XenOptions,
    parallel: usize,
    progress: Arc<dyn Progress>,
    cancel: CancellationToken,
) -> Result<Vec<(String, Result<BackupOutcome>)>> {
    let mut provider = XenVm::new(xapi_client, vm_uuid, options);
    let ctx = options.drive_context(parallel, progress, cancel);
    let runs = drive(&mut provider, repo, &ctx).await?;
    Ok(runs.into_iter().map(|r| (r.id, r.outcome)).collect())
}

/// The VM's lock (beside the shared repository lock): one run at a time
/// takes and reaps its VM snapshots. A second run is refused at once,
/// before it touches anything.
async fn lock_vm(
    repo: &Arc<Repository>,
    label: &str,
) -> Result<(cbtvault_repo::Lock, cbtvault_repo::Lock)> {
    let (repo, label) = (repo.clone(), label.to_string());
    tokio::task::spawn_blocking(move || {
        let shared = repo.lock_shared()?;
        let vm = repo.lock_vm(&label).map_err(|e| match e {
            cbtvault_repo::Error::Locked { .. } => Error::Source {
                disk: label.clone(),
                what: "another cbtvault run is backing up this VM; this run stops without touching it (try again when that run has finished)".into(),
                source: None,
            },
            other => other.into(),
        })?;
        Ok((shared, vm))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
}

/// Saves the VM's record, VBDs, VIFs and networks in the repository and
/// returns the metadata's id. Best effort: the disks' backups matter more,
/// so a failure is logged and the restore points go without it.
pub async fn save_vm_metadata(
    client: &Client,
    repo: &Arc<Repository>,
    vm_uuid: &str,
) -> Option<String> {
    let json = match cbtvault_xen::vm_metadata(client, vm_uuid).await {
        Ok(json) => json,
        Err(e) => {
            warn!(vm = %vm_uuid, error = %e, "could not read the VM's metadata; its restore points go without it");
            return None;
        }
    };
    let metadata = VmMetadata {
        vm_uuid: vm_uuid.to_string(),
        time: jiff::Timestamp::now(),
        json,
    };
    let repo = repo.clone();
    match tokio::task::spawn_blocking(move || repo.save_vm_metadata(&metadata)).await {
        Ok(Ok(id)) => Some(id),
        Ok(Err(e)) => {
            warn!(vm = %vm_uuid, error = %e, "could not save the VM's metadata; its restore points go without it");
            None
        }
        Err(e) => {
            warn!(vm = %vm_uuid, error = %e, "saving the VM's metadata failed");
            None
        }
    }
}
