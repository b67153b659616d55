//! VMware disks as [`Provider`]s, over the vSphere JSON API
//! (`cbtvault-vsphere`): [`VmwareVm`] backs up every disk of a VM from one
//! VM snapshot, [`VmwareFcd`] one First Class Disk from its own snapshot.
//!
//! # One run
//! *prepare* locks the disks, removes snapshots an interrupted run of this
//! job left (found by their description tag, [`snapshot_tag`]), switches
//! CBT on if it is off (that run is a full, and says so), takes the
//! snapshot (no memory; quiesced if asked) and asks, per disk, for the
//! areas changed since the changeId kept with the disk's last restore
//! point (`details["change_id"]` of its manifest's source), page by page,
//! widened to 64 KiB blocks. *open* reads the snapshot's disk over NBD
//! through [`NbdAccess`]. *finish* removes the snapshot, after every disk
//! is committed and checked, or on abort.
//!
//! The new changeId is recorded in the restore point's manifest, so it is
//! kept exactly when the data it describes is durable; a run that fails
//! before the commit leaves the previous changeId in force, and the next
//! run asks for changes since it (a superset: nothing is lost).
//!
//! # Fulls
//! A first backup reads the snapshot's allocated blocks (NBD
//! `base:allocation`, which VDDK ≥ 6.7 serves) rather than asking
//! `QueryChangedDiskAreas` with `"*"`: VMware documents that `"*"` may fail
//! or return the whole disk off VMFS, and backup tools stopped relying on
//! it. A changeId vSphere no longer accepts (`FileFault`, `InvalidState`,
//! `InvalidArgument` on `changeId`: CBT reset by a storage migration, a
//! crash, CBT switched off and on), a disk whose size changed (KB2090639),
//! or a snapshot without a changeId give a full with the reason.
//! `NotFound` and other faults fail the capture with the disk named.

use std::collections::BTreeMap;
use std::sync::Arc;

use cbtvault_nbd::ConnectOptions;
use cbtvault_repo::{Repository, RestorePointRow, SourceInfo, VmInfo};
use cbtvault_vsphere::{ChangedAreas, Client, DiskChangeInfo};
use tracing::{info, warn};

use crate::backup::{Changes, DiskLocks};
use crate::error::{Error, Result};
use crate::nbd::NbdSource;
use crate::provider::{PreparedDisk, Provider};
use crate::rename::DiskName;

/// Where the snapshots' disks are read: an NBD URI template with
/// `{export}` (`{snapshot}/{disk_key}` for a VM disk, `fcd/{fcd}/{snapshot}`
/// for an FCD), and also `{vm}`, `{snapshot}`, `{disk_key}`, `{fcd}`.
/// TLS settings go in the URI's query, as for any NBD source.
#[derive(Clone, Debug)]
pub struct NbdAccess {
    pub template: String,
}

impl NbdAccess {
    fn uri(&self, vars: &[(&str, &str)]) -> String {
        vars.iter().fold(self.template.clone(), |uri, (k, v)| {
            uri.replace(&format!("{{{k}}}"), v)
        })
    }
}

/// How to back up VMware disks.
#[derive(Clone, Debug)]
pub struct VmwareOptions {
    /// The job's name: tags its snapshots.
    pub job: String,
    /// The vCenter's name in the repository (`vmware-NAME/...` disks) and
    /// manifests.
    pub server: String,
    pub nbd: NbdAccess,
    /// Quiesce the guest's file systems (VMware Tools) for the snapshot.
    pub quiesce: bool,
}

/// The description every snapshot of `job` carries: how the next run
/// recognises a leftover of an interrupted one.
pub fn snapshot_tag(job: &str) -> String {
    format!("cbtvault:{job}")
}

fn vsphere(disk: &str, what: &str) -> impl FnOnce(cbtvault_vsphere::Error) -> Error {
    let (disk, what) = (disk.to_string(), what.to_string());
    move |e| Error::Source {
        disk,
        what,
        source: Some(Box::new(e)),
    }
}

/// A snapshot disk to read.
pub struct VmwareView {
    disk: String,
    uri: String,
    info: SourceInfo,
    size: u64,
}

/// What a disk's read needs: a full (with its reason), or the changed
/// areas since a changeId.
enum Plan {
    Full(Option<String>),
    Since(String),
}

/// Decides from the last restore point (`previous`: its changeId and size)
/// and the snapshot's disk.
fn plan(previous: Option<(String, u64)>, new_change_id: Option<&str>, capacity: u64) -> Plan {
    let Some((since, size)) = previous else {
        return Plan::Full(None);
    };
    if new_change_id.is_none() {
        return Plan::Full(Some(
            "the snapshot has no changeId: changed-block tracking is not active on the disk".into(),
        ));
    }
    if size != capacity {
        return Plan::Full(Some(format!(
            "the disk's size changed from {size} to {capacity} bytes (VMware's changed areas are not trusted across a resize)"
        )));
    }
    Plan::Since(since)
}

/// Asks for the changed areas page by page (`query(startOffset)`); a
/// changeId vSphere refuses gives a full with the reason.
async fn ask<F, Fut>(disk: &str, capacity: u64, query: F) -> Result<Changes>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = cbtvault_vsphere::Result<DiskChangeInfo>>,
{
    match cbtvault_vsphere::changed_blocks(capacity, disk, query).await {
        Ok(ChangedAreas {
            map,
            pages,
            changed_bytes,
        }) => {
            info!(
                disk,
                pages,
                changed_bytes,
                blocks = map.count_set(),
                "changed areas"
            );
            Ok(Changes::Blocks {
                map,
                origin: "vmware-cbt".into(),
            })
        }
        Err(e) if e.fault().is_some_and(|f| f.invalidates_change_id()) => Ok(Changes::Full {
            reason: Some(format!(
                "vSphere no longer accepts the changeId of the last backup ({}): changed-block tracking was reset",
                e.fault().map(|f| f.to_string()).unwrap_or_default()
            )),
        }),
        Err(e) => Err(vsphere(disk, "asking vSphere for the changed areas")(e)),
    }
}

/// The newest restore point of `disk` from this source: its changeId and size.
async fn previous(
    repo: &Arc<Repository>,
    disk: &str,
    location: &str,
) -> Result<Option<(String, u64)>> {
    let here = location.to_owned();
    let latest = crate::rename::latest(repo, &DiskName::new(disk), move |m| {
        m.source.provider == "vmware" && m.source.location == here
    })
    .await?;
    Ok(latest.and_then(|rp| {
        let m = rp.manifest;
        let id = m.source.details.get("change_id")?.clone();
        (m.source.provider == "vmware").then_some((id, m.virtual_size))
    }))
}

async fn open_view(view: &VmwareView) -> Result<NbdSource> {
    let options = ConnectOptions::from_uri(&view.uri).map_err(|e| Error::Source {
        disk: view.disk.clone(),
        what: format!("the NBD address {}", view.uri),
        source: Some(Box::new(e)),
    })?;
    let source = NbdSource::connect(options, view.info.location.clone()).await?;
    let client = source.client().clone();
    match source.with_size(view.size) {
        Ok(mut s) => {
            s.set_info(view.info.clone());
            Ok(s)
        }
        Err(e) => {
            client.disconnect().await;
            Err(e)
        }
    }
}

/// Every disk of a VM from one VM snapshot.
pub struct VmwareVm<'a> {
    client: &'a Client,
    vm: String,
    options: VmwareOptions,
    snapshot: Option<String>,
    /// By device key.
    locks: BTreeMap<i32, Arc<DiskLocks>>,
}

impl<'a> VmwareVm<'a> {
    pub fn new(client: &'a Client, vm: &str, options: &VmwareOptions) -> Self {
        VmwareVm {
            client,
            vm: vm.to_owned(),
            options: options.clone(),
            snapshot: None,
            locks: BTreeMap::new(),
        }
    }

    fn disk_name(&self, key: i32) -> String {
        format!("vmware-{}/{}/{key}", self.options.server, self.vm)
    }

    fn location(&self, key: i32) -> String {
        format!("{}/vm/{}/disk/{key}", self.options.server, self.vm)
    }

    /// Removes this job's snapshots an interrupted run left.
    async fn reap(&self, label: &str) -> Result<()> {
        let tag = snapshot_tag(&self.options.job);
        let snapshots = self
            .client
            .vm_snapshots(&self.vm)
            .await
            .map_err(vsphere(label, "listing the VM's snapshots"))?;
        for s in snapshots.iter().filter(|s| s.description == tag) {
            info!(vm = %self.vm, snapshot = %s.snapshot.value, name = %s.name, "removing a snapshot an interrupted run left");
            self.client
                .remove_vm_snapshot(&s.snapshot.value)
                .await
                .map_err(vsphere(label, "removing a leftover snapshot"))?;
        }
        Ok(())
    }

    async fn remove_snapshot(&mut self) -> Result<()> {
        let Some(snap) = self.snapshot.take() else {
            return Ok(());
        };
        self.client.remove_vm_snapshot(&snap).await.map_err(vsphere(
            &format!("VM {}", self.vm),
            "removing the backup's snapshot",
        ))
    }

    async fn prepare_disks(
        &mut self,
        repo: &Arc<Repository>,
        snapshot: &str,
        cbt_reason: Option<String>,
        config: &cbtvault_vsphere::VmConfig,
    ) -> Result<Vec<PreparedDisk<VmwareView>>> {
        let label = format!("VM {}", self.vm);
        let disks = self
            .client
            .snapshot_disks(snapshot)
            .await
            .map_err(vsphere(&label, "reading the snapshot's disks"))?;
        let time = jiff::Timestamp::now();
        let mut prepared = Vec::new();
        for d in &disks {
            let disk = self.disk_name(d.key);
            // A disk added since the VM's config was read is locked now.
            let locks = match self.locks.get(&d.key) {
                Some(l) => l.clone(),
                None => {
                    let l = crate::backup::lock_disk(repo, &disk).await?;
                    self.locks.insert(d.key, l.clone());
                    l
                }
            };
            let location = self.location(d.key);
            let previous = previous(repo, &disk, &location).await?;
            let mut changes = match plan(previous, d.change_id.as_deref(), d.capacity) {
                Plan::Full(reason) => Changes::Full { reason },
                Plan::Since(since) => {
                    let (client, vm, key) = (self.client, &self.vm, d.key);
                    ask(&disk, d.capacity, |off| {
                        client.query_changed_disk_areas(vm, snapshot, key, off, &since)
                    })
                    .await?
                }
            };
            if let (Changes::Full { reason }, Some(why)) = (&mut changes, &cbt_reason) {
                reason.get_or_insert_with(|| why.clone());
            }
            let key = d.key.to_string();
            let uri = self.options.nbd.uri(&[
                ("export", &format!("{snapshot}/{key}")),
                ("vm", &self.vm),
                ("snapshot", snapshot),
                ("disk_key", &key),
            ]);
            let vm_info = VmInfo {
                uuid: config.uuid.clone().unwrap_or_else(|| self.vm.clone()),
                name: config.name.clone(),
                host: self.options.server.clone(),
                disk_label: d.label.clone(),
                device: Some(key.clone()),
                metadata: None,
            };
            let mut details = BTreeMap::from([
                ("job".to_string(), self.options.job.clone()),
                ("vm".to_string(), self.vm.clone()),
                ("device_key".to_string(), key.clone()),
                ("file".to_string(), d.file_name.clone()),
            ]);
            if let Some(c) = &d.change_id {
                details.insert("change_id".into(), c.clone());
            }
            prepared.push(PreparedDisk {
                disk: disk.clone(),
                id: format!("{}/{key}", self.vm),
                locks,
                changes,
                time,
                connections: 1,
                vm: Some(vm_info.clone()),
                // A VMware snapshot is removed whole on abort: no resume.
                resume: None,
                suspend_as: None,
                view: VmwareView {
                    disk,
                    uri,
                    info: SourceInfo {
                        provider: "vmware".into(),
                        location,
                        snapshot: Some(snapshot.to_owned()),
                        details,
                        vm: Some(vm_info),
                    },
                    size: d.capacity,
                },
            });
        }
        Ok(prepared)
    }
}

impl Provider for VmwareVm<'_> {
    type View = VmwareView;

    fn label(&self) -> String {
        format!("VM {}", self.vm)
    }

    async fn prepare(&mut self, repo: &Arc<Repository>) -> Result<Vec<PreparedDisk<VmwareView>>> {
        let label = self.label();
        let client = self.client;
        let config = client
            .vm_config(&self.vm)
            .await
            .map_err(vsphere(&label, "reading the VM's configuration"))?;
        if config.disks.is_empty() {
            return Err(Error::Source {
                disk: label,
                what: "the VM has no virtual disk".into(),
                source: None,
            });
        }
        // Held across the vSphere steps: no two runs reap each other.
        for d in &config.disks {
            let locks = crate::backup::lock_disk(repo, &self.disk_name(d.key)).await?;
            self.locks.insert(d.key, locks);
        }
        self.reap(&label).await?;
        let mut cbt_reason = None;
        if !config.change_tracking_enabled {
            let supported = client
                .vm_supports_cbt(&self.vm)
                .await
                .map_err(vsphere(&label, "reading the VM's capabilities"))?;
            if !supported {
                return Err(Error::Source {
                    disk: label,
                    what: "the VM does not support changed-block tracking (virtual hardware older than version 7); upgrade its hardware".into(),
                    source: None,
                });
            }
            client
                .enable_vm_cbt(&self.vm)
                .await
                .map_err(vsphere(&label, "switching changed-block tracking on"))?;
            cbt_reason = Some(
                "changed-block tracking was off on the VM; cbtvault switched it on, so this backup reads every allocated block".to_string(),
            );
        }
        let name = format!(
            "cbtvault-{}-{}",
            self.options.job,
            jiff::Timestamp::now().as_second()
        );
        let snapshot = client
            .create_vm_snapshot(
                &self.vm,
                &name,
                &snapshot_tag(&self.options.job),
                self.options.quiesce,
            )
            .await
            .map_err(vsphere(&label, "creating the snapshot"))?;
        self.snapshot = Some(snapshot.clone());
        match self
            .prepare_disks(repo, &snapshot, cbt_reason, &config)
            .await
        {
            Ok(p) => Ok(p),
            Err(e) => {
                if let Err(r) = self.remove_snapshot().await {
                    warn!(error = %r, "could not remove the snapshot; the next run removes it");
                }
                Err(e)
            }
        }
    }

    async fn open(&self, view: &VmwareView) -> Result<NbdSource> {
        open_view(view).await
    }

    async fn finish(
        &mut self,
        outcomes: Vec<(VmwareView, Option<RestorePointRow>)>,
    ) -> Vec<Result<()>> {
        // Committed or not, the snapshot goes: each committed restore
        // point was checked against it already, and an aborted disk keeps
        // its previous changeId, from which the next run asks again.
        if let Err(e) = self.remove_snapshot().await {
            warn!(error = %e, "could not remove the snapshot; the next run removes it");
        }
        self.locks.clear();
        outcomes.iter().map(|_| Ok(())).collect()
    }
}

/// One First Class Disk from its own snapshot.
pub struct VmwareFcd<'a> {
    client: &'a Client,
    id: String,
    datastore: String,
    options: VmwareOptions,
    snapshot: Option<String>,
    locks: Option<Arc<DiskLocks>>,
}

impl<'a> VmwareFcd<'a> {
    pub fn new(client: &'a Client, id: &str, datastore: &str, options: &VmwareOptions) -> Self {
        VmwareFcd {
            client,
            id: id.to_owned(),
            datastore: datastore.to_owned(),
            options: options.clone(),
            snapshot: None,
            locks: None,
        }
    }

    fn disk_name(&self) -> String {
        format!("vmware-{}/fcd/{}", self.options.server, self.id)
    }

    async fn remove_snapshot(&mut self) -> Result<()> {
        let Some(snap) = self.snapshot.take() else {
            return Ok(());
        };
        self.client
            .delete_fcd_snapshot(&self.id, &self.datastore, &snap)
            .await
            .map_err(vsphere(&self.label(), "deleting the backup's snapshot"))
    }

    async fn prepare_disk(
        &mut self,
        repo: &Arc<Repository>,
        snapshot: &str,
        capacity: u64,
        name: &str,
        cbt_reason: Option<String>,
    ) -> Result<PreparedDisk<VmwareView>> {
        let disk = self.disk_name();
        let (client, id, ds) = (self.client, &self.id, &self.datastore);
        let change_id = client
            .fcd_snapshot_change_id(id, ds, snapshot)
            .await
            .map_err(vsphere(&disk, "reading the snapshot's changeId"))?;
        let location = format!("{}/fcd/{}", self.options.server, self.id);
        let previous = previous(repo, &disk, &location).await?;
        let mut changes = match plan(previous, change_id.as_deref(), capacity) {
            Plan::Full(reason) => Changes::Full { reason },
            Plan::Since(since) => {
                ask(&disk, capacity, |off| {
                    client.query_fcd_changed_disk_areas(id, ds, snapshot, off, &since)
                })
                .await?
            }
        };
        if let (Changes::Full { reason }, Some(why)) = (&mut changes, cbt_reason) {
            reason.get_or_insert(why);
        }
        let uri = self.options.nbd.uri(&[
            ("export", &format!("fcd/{id}/{snapshot}")),
            ("fcd", id),
            ("snapshot", snapshot),
        ]);
        let mut details = BTreeMap::from([
            ("job".to_string(), self.options.job.clone()),
            ("fcd".to_string(), id.clone()),
            ("fcd_name".to_string(), name.to_owned()),
            ("datastore".to_string(), ds.clone()),
        ]);
        if let Some(c) = change_id {
            details.insert("change_id".into(), c);
        }
        let locks = self
            .locks
            .clone()
            .ok_or_else(|| Error::Internal("FCD prepared without its lock".into()))?;
        Ok(PreparedDisk {
            disk: disk.clone(),
            id: id.clone(),
            locks,
            changes,
            time: jiff::Timestamp::now(),
            connections: 1,
            vm: None,
            resume: None,
            suspend_as: None,
            view: VmwareView {
                disk,
                uri,
                info: SourceInfo {
                    provider: "vmware".into(),
                    location,
                    snapshot: Some(snapshot.to_owned()),
                    details,
                    vm: None,
                },
                size: capacity,
            },
        })
    }
}

impl Provider for VmwareFcd<'_> {
    type View = VmwareView;

    fn label(&self) -> String {
        format!("FCD {} on {}", self.id, self.datastore)
    }

    async fn prepare(&mut self, repo: &Arc<Repository>) -> Result<Vec<PreparedDisk<VmwareView>>> {
        let label = self.label();
        let client = self.client;
        let fcd = client
            .fcd(&self.id, &self.datastore)
            .await
            .map_err(vsphere(&label, "reading the disk"))?;
        self.locks = Some(crate::backup::lock_disk(repo, &self.disk_name()).await?);
        let tag = snapshot_tag(&self.options.job);
        let snapshots = client
            .fcd_snapshots(&self.id, &self.datastore)
            .await
            .map_err(vsphere(&label, "listing the disk's snapshots"))?;
        for s in snapshots.iter().filter(|s| s.description == tag) {
            info!(fcd = %self.id, snapshot = %s.id, "removing a snapshot an interrupted run left");
            client
                .delete_fcd_snapshot(&self.id, &self.datastore, &s.id)
                .await
                .map_err(vsphere(&label, "removing a leftover snapshot"))?;
        }
        let mut cbt_reason = None;
        if !fcd.change_tracking_enabled {
            client
                .enable_fcd_cbt(&self.id, &self.datastore)
                .await
                .map_err(vsphere(&label, "switching changed-block tracking on"))?;
            cbt_reason = Some(
                "changed-block tracking was off on the disk; cbtvault switched it on, so this backup reads every allocated block".to_string(),
            );
        }
        let snapshot = client
            .create_fcd_snapshot(&self.id, &self.datastore, &tag)
            .await
            .map_err(vsphere(&label, "creating the snapshot"))?;
        self.snapshot = Some(snapshot.clone());
        match self
            .prepare_disk(repo, &snapshot, fcd.capacity, &fcd.name, cbt_reason)
            .await
        {
            Ok(p) => Ok(vec![p]),
            Err(e) => {
                if let Err(r) = self.remove_snapshot().await {
                    warn!(error = %r, "could not delete the snapshot; the next run deletes it");
                }
                Err(e)
            }
        }
    }

    async fn open(&self, view: &VmwareView) -> Result<NbdSource> {
        open_view(view).await
    }

    async fn finish(
        &mut self,
        outcomes: Vec<(VmwareView, Option<RestorePointRow>)>,
    ) -> Vec<Result<()>> {
        if let Err(e) = self.remove_snapshot().await {
            warn!(error = %e, "could not delete the snapshot; the next run deletes it");
        }
        self.locks = None;
        outcomes.iter().map(|_| Ok(())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        assert!(matches!(plan(None, Some("x/1"), 10), Plan::Full(None)));
        assert!(matches!(
            plan(Some(("x/1".into(), 10)), None, 10),
            Plan::Full(Some(_))
        ));
        assert!(
            matches!(plan(Some(("x/1".into(), 10)), Some("x/2"), 20), Plan::Full(Some(r)) if r.contains("size"))
        );
        assert!(
            matches!(plan(Some(("x/1".into(), 10)), Some("x/2"), 10), Plan::Since(s) if s == "x/1")
        );
    }

    #[test]
    fn uri_template() {
        let a = NbdAccess {
            template: "nbd://h:1/{export}?tls-pin=/p".into(),
        };
        assert_eq!(
            a.uri(&[("export", "snapshot-1/2000")]),
            "nbd://h:1/snapshot-1/2000?tls-pin=/p"
        );
    }
}
