//! All disks of a VM from one consistent `VM.snapshot`.
//!
//! Every disk is prepared as for a single VDI (locked, reaped, CBT on, base
//! found), then one `VM.snapshot` captures them at the same instant. Each
//! snapshot VDI is backed up and checked; the snapshot VM is destroyed (its
//! VBDs would keep the VDIs in use), and only then are the snapshots
//! `data_destroy`ed. A disk that failed loses its snapshot at once, as in the
//! single-VDI path, and the others still complete.

use std::sync::Arc;

use cbtvault_repo::Repository;
use cbtvault_xenapi::{Client, VmRef};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use super::{Prepared, TAG_JOB, XenOptions, prepare, xapi};
use crate::backup::BackupOutcome;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// The run kind that notes a VM snapshot being taken.
const VM_SNAPSHOT_RUN: &str = "xen-vm-snapshot";

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
    let span = tracing::info_span!("vm", job = %options.job, vm = %vm_uuid);
    async move {
        let label = format!("vm-{vm_uuid}");
        let vms = xapi_client.vm();
        let vm = vms.get_by_uuid(vm_uuid).await.map_err(xapi(&label, "looking up the VM"))?;
        // Held for the whole run: another run reaping would destroy this
        // run's VM snapshot under it.
        let _vm_lock = lock_vm(&repo, &label).await?;
        reap_vm_snapshots(xapi_client, &repo, &label, &vm, options).await?;
        let record = vms.get_record(&vm).await.map_err(xapi(&label, "reading the VM"))?;

        let mut disks: Vec<(String, Prepared)> = Vec::new();
        for vbd in &record.vbds {
            let v = xapi_client.vbd().get_record(vbd).await.map_err(xapi(&label, "reading a VBD"))?;
            if !v.vbd_type.eq_ignore_ascii_case("disk") || v.empty || v.vdi.is_null() {
                continue;
            }
            let uuid = xapi_client.vdi().get_uuid(&v.vdi).await.map_err(xapi(&label, "reading a VDI"))?;
            let prepared = prepare(xapi_client, &repo, &uuid, options).await?;
            disks.push((uuid, prepared));
        }

        // Note what exists, then take the one snapshot and tag it at once.
        let vm_intent = {
            let cat = repo.catalogue();
            let run = cat.start_run(VM_SNAPSHOT_RUN, Some(&label))?;
            let known: Vec<&str> = record.snapshots.iter().map(|r| r.as_str()).collect();
            cat.set_run_detail(run, &serde_json::to_string(&known).unwrap_or_default())?;
            run
        };
        let disk_intents = disks.iter().map(|(_, p)| p.note_intent(&repo)).collect::<Result<Vec<_>>>()?;
        let name = format!("cbtvault {} {}", options.job, jiff::Timestamp::now());
        let snap_vm = vms.snapshot(&vm, &name).await;
        let tagged = match &snap_vm {
            Ok(s) => vms.add_to_other_config(s, TAG_JOB, &options.job).await,
            Err(_) => Ok(()),
        };
        let snap_vm = snap_vm.map_err(xapi(&label, "VM.snapshot"))?;
        tagged.map_err(xapi(&label, "tagging the VM snapshot"))?;
        repo.catalogue().finish_run(vm_intent, "done", None, "")?;

        // Pair each disk with its snapshot VDI, and tag those too.
        let snap_record = vms.get_record(&snap_vm).await.map_err(xapi(&label, "reading the VM snapshot"))?;
        let mut pairs = Vec::new();
        for vbd in &snap_record.vbds {
            let v = xapi_client.vbd().get_record(vbd).await.map_err(xapi(&label, "reading a VBD"))?;
            if v.vdi.is_null() {
                continue;
            }
            let snap = xapi_client.vdi().get_record(&v.vdi).await.map_err(xapi(&label, "reading a VDI"))?;
            if let Some(i) = disks.iter().position(|(_, p)| p.vdi == snap.snapshot_of) {
                xapi_client
                    .vdi()
                    .add_to_other_config(&v.vdi, TAG_JOB, &options.job)
                    .await
                    .map_err(xapi(&label, "tagging a snapshot VDI"))?;
                pairs.push((i, v.vdi.clone()));
            }
        }
        for run in disk_intents {
            repo.catalogue().finish_run(run, "done", None, "")?;
        }
        if pairs.len() != disks.len() {
            let _ = vms.destroy(&snap_vm).await;
            return Err(Error::Source {
                disk: label,
                what: format!("the VM snapshot holds {} of the VM's {} disks", pairs.len(), disks.len()),
                source: None,
            });
        }

        let outcomes: Vec<(usize, Result<BackupOutcome>)> = futures::stream::iter(pairs.iter())
            .map(|(i, snap)| {
                let (repo, progress, cancel) = (repo.clone(), progress.clone(), cancel.clone());
                let prepared = &disks[*i].1;
                async move {
                    let r = prepared.back_up(xapi_client, &repo, snap, options, progress, cancel, false).await;
                    (*i, r)
                }
            })
            .buffer_unordered(parallel.max(1))
            .collect()
            .await;

        // The snapshot VM's VBDs hold its VDIs: it goes before data_destroy.
        if let Err(e) = vms.destroy(&snap_vm).await {
            warn!(error = %e, "could not destroy the VM snapshot; its disks keep their data until the next run");
        }
        let mut results = Vec::new();
        for (i, outcome) in outcomes {
            let (uuid, prepared) = &disks[i];
            let Some(snap) = pairs.iter().find(|(j, _)| *j == i).map(|(_, s)| s) else {
                continue;
            };
            let outcome = match outcome {
                Ok(o) => prepared.finish(xapi_client, snap, options).await.map(|()| o),
                Err(e) => {
                    // Nothing committed: the snapshot goes, its log merging into the disk's.
                    if let Err(d) = xapi_client.vdi().destroy(snap).await {
                        warn!(error = %d, "could not destroy the snapshot of a failed disk; the next run reaps it");
                    }
                    Err(e)
                }
            };
            results.push((uuid.clone(), outcome));
        }
        Ok(results)
    }
    .instrument(span)
    .await
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

/// Destroys snapshot VMs an interrupted run of this job left: tagged ones,
/// and the one a run that died before tagging made (found through its note).
async fn reap_vm_snapshots(
    xapi_client: &Client,
    repo: &Repository,
    label: &str,
    vm: &VmRef,
    options: &XenOptions,
) -> Result<()> {
    let vms = xapi_client.vm();
    let all = vms
        .get_all_records()
        .await
        .map_err(xapi(label, "listing VMs"))?;
    let mut doomed: Vec<VmRef> = all
        .iter()
        .filter(|(_, r)| {
            r.is_a_snapshot
                && r.snapshot_of == *vm
                && r.other_config.get(TAG_JOB) == Some(&options.job)
        })
        .map(|(r, _)| r.clone())
        .collect();
    // Bound first, so the catalogue guard is dropped before the loop takes
    // it again (a `for` over `repo.catalogue().…` would hold it throughout
    // and deadlock on the mutex).
    let unfinished = repo.catalogue().unfinished_runs(VM_SNAPSHOT_RUN, label)?;
    for (run, detail) in unfinished {
        let known: Vec<String> = serde_json::from_str(&detail).unwrap_or_default();
        let orphan = all
            .iter()
            .filter(|(r, rec)| {
                rec.is_a_snapshot
                    && rec.snapshot_of == *vm
                    && !rec.other_config.contains_key(TAG_JOB)
                    && !known.iter().any(|k| k == r.as_str())
            })
            .min_by(|a, b| a.1.snapshot_time.cmp(&b.1.snapshot_time));
        if let Some((r, _)) = orphan {
            doomed.push(r.clone());
        }
        repo.catalogue().finish_run(run, "reaped", None, "")?;
    }
    for r in doomed {
        match vms.destroy(&r).await {
            Ok(()) => {
                info!(snapshot = %r.as_str(), "destroyed a VM snapshot left by an interrupted run")
            }
            Err(e) => {
                warn!(snapshot = %r.as_str(), error = %e, "could not destroy a leftover VM snapshot")
            }
        }
    }
    Ok(())
}
