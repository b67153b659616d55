//! A VM's disks from one consistent `VM.snapshot`, and what a whole-VM
//! restore needs to know about the VM.

use cbtvault_xenapi::{Client, Value, VdiRef, VmRecord, VmRef};
use tracing::{info, warn};

use crate::error::{Error, Result, journal_error, xapi};
use crate::journal::{Journal, NoteKind};
use crate::vdi::{Capture, TAG_JOB, VdiBackup, XenOptions};

/// One disk of a VM: a VBD of type disk with a VDI in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDisk {
    pub vdi: VdiRef,
    pub vdi_uuid: String,
    /// The VDI's name label.
    pub name_label: String,
    /// The VBD's position (`userdevice`, e.g. `0`).
    pub position: String,
}

/// The disks of a VM, in VBD order (not CD drives, not empty drives).
pub async fn vm_disks(client: &Client, vm_uuid: &str) -> Result<Vec<VmDisk>> {
    let subject = vm_subject(vm_uuid);
    let vm = client
        .vm()
        .get_by_uuid(vm_uuid)
        .await
        .map_err(xapi(&subject, "looking up the VM"))?;
    let record = client
        .vm()
        .get_record(&vm)
        .await
        .map_err(xapi(&subject, "reading the VM"))?;
    disks_of(client, &subject, &record).await
}

async fn disks_of(client: &Client, subject: &str, record: &VmRecord) -> Result<Vec<VmDisk>> {
    let mut out = Vec::new();
    for vbd in &record.vbds {
        let v = client
            .vbd()
            .get_record(vbd)
            .await
            .map_err(xapi(subject, "reading a VBD"))?;
        if !v.vbd_type.eq_ignore_ascii_case("disk") || v.empty || v.vdi.is_null() {
            continue;
        }
        let vdi = client
            .vdi()
            .get_record(&v.vdi)
            .await
            .map_err(xapi(subject, "reading a VDI"))?;
        out.push(VmDisk {
            vdi: v.vdi.clone(),
            vdi_uuid: vdi.uuid,
            name_label: vdi.name_label,
            position: v.userdevice,
        });
    }
    // XAPI lists a VM's VBDs in no promised order: by device position, so
    // that reports and plans read the same every night.
    out.sort_by(|a, b| {
        let key = |d: &VmDisk| {
            (
                d.position.parse::<u32>().unwrap_or(u32::MAX),
                d.position.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    Ok(out)
}

/// How errors and journal notes name a VM.
pub fn vm_subject(vm_uuid: &str) -> String {
    format!("vm-{vm_uuid}")
}

/// What a whole-VM restore needs: the VM record, its VBDs, VIFs and their
/// networks, as XAPI returned them (JSON). A class the pool does not
/// answer for is listed under `"missing"` with the reason, and the rest is
/// still returned.
pub async fn vm_metadata(client: &Client, vm_uuid: &str) -> Result<serde_json::Value> {
    let subject = vm_subject(vm_uuid);
    let vm = client
        .vm()
        .get_by_uuid(vm_uuid)
        .await
        .map_err(xapi(&subject, "looking up the VM"))?;
    let record = client
        .call("VM.get_record", vec![Value::from(vm.as_str())])
        .await
        .map_err(xapi(&subject, "reading the VM record"))?;
    let mut missing = serde_json::Map::new();
    let refs = |field: &str| -> Vec<String> {
        record
            .as_struct()
            .and_then(|s| s.get(field))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let vbds = records(client, "VBD", refs("VBDs"), &mut missing).await;
    let vif_refs = refs("VIFs");
    let has_vifs = record.as_struct().is_some_and(|s| s.contains_key("VIFs"));
    let vifs = records(client, "VIF", vif_refs, &mut missing).await;
    if !has_vifs {
        missing.insert("VIFs".into(), "the VM record has no VIFs field".into());
    }
    let mut network_refs: Vec<String> = vifs
        .iter()
        .filter_map(|v| {
            v.get("network")
                .and_then(|n| n.as_str())
                .map(str::to_string)
        })
        .collect();
    network_refs.sort();
    network_refs.dedup();
    let networks = records(client, "network", network_refs, &mut missing).await;
    Ok(serde_json::json!({
        "vm": to_json(&record),
        "vbds": vbds,
        "vifs": vifs,
        "networks": networks,
        "missing": missing,
    }))
}

/// The records of `refs` of `class`; those XAPI refuses are listed in
/// `missing` with the reason.
async fn records(
    client: &Client,
    class: &str,
    refs: Vec<String>,
    missing: &mut serde_json::Map<String, serde_json::Value>,
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for r in refs {
        match client
            .call(
                &format!("{class}.get_record"),
                vec![Value::from(r.as_str())],
            )
            .await
        {
            Ok(v) => out.push(to_json(&v)),
            Err(e) => {
                missing.insert(format!("{class} {r}"), e.to_string().into());
            }
        }
    }
    out
}

fn to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Struct(m) => m.iter().map(|(k, v)| (k.clone(), to_json(v))).collect(),
        Value::Array(a) => a.iter().map(to_json).collect(),
        other => other
            .as_str()
            .map(|s| serde_json::Value::String(s.to_string()))
            .or_else(|| other.as_bool().map(serde_json::Value::Bool))
            .or_else(|| other.as_i64().map(serde_json::Value::from))
            .or_else(|| other.as_f64().map(serde_json::Value::from))
            .unwrap_or(serde_json::Value::Null),
    }
}

/// A VM about to be snapshotted: leftovers of interrupted runs reaped.
/// The caller holds the VM's lock from [`VmBackup::prepare`] until
/// [`VmBackup::destroy_snapshot`] is done: another run reaping would
/// destroy this run's snapshot under it.
#[derive(Debug)]
pub struct VmBackup {
    subject: String,
    vm: VmRef,
    record: VmRecord,
}

/// The one snapshot of a VM, and the snapshot VDI of each disk.
#[derive(Debug)]
pub struct VmSnapshot {
    pub vm: VmRef,
    /// In the order of the disks given to [`VmBackup::snapshot`].
    pub vdis: Vec<VdiRef>,
}

impl VmBackup {
    /// Looks the VM up and destroys the snapshot VMs that interrupted runs
    /// of this job left.
    pub async fn prepare(
        client: &Client,
        vm_uuid: &str,
        options: &XenOptions,
        journal: &dyn Journal,
    ) -> Result<VmBackup> {
        let subject = vm_subject(vm_uuid);
        let vms = client.vm();
        let vm = vms
            .get_by_uuid(vm_uuid)
            .await
            .map_err(xapi(&subject, "looking up the VM"))?;
        reap_vm_snapshots(client, &subject, &vm, options, journal).await?;
        let record = vms
            .get_record(&vm)
            .await
            .map_err(xapi(&subject, "reading the VM"))?;
        Ok(VmBackup {
            subject,
            vm,
            record,
        })
    }

    /// The VM's record (name label, VBDs) as read after reaping.
    pub fn record(&self) -> &VmRecord {
        &self.record
    }

    /// The VM's disks.
    pub async fn disks(&self, client: &Client) -> Result<Vec<VmDisk>> {
        disks_of(client, &self.subject, &self.record).await
    }

    /// Notes what exists, takes the one `VM.snapshot` and tags it and its
    /// disks' snapshot VDIs, and returns each disk's capture (in `disks`
    /// order). On any failure the snapshot VM and its disks go.
    pub async fn snapshot(
        &self,
        client: &Client,
        disks: &[&VdiBackup],
        options: &XenOptions,
        journal: &dyn Journal,
    ) -> Result<(VmSnapshot, Vec<Capture>)> {
        let subject = &self.subject;
        let vms = client.vm();
        let known: Vec<String> = self
            .record
            .snapshots
            .iter()
            .map(|r| r.as_str().to_string())
            .collect();
        let vm_note = journal
            .note(NoteKind::VmSnapshot, subject, &known)
            .map_err(journal_error(
                subject,
                "noting the VM snapshot about to be taken",
            ))?;
        let disk_notes = disks
            .iter()
            .map(|d| d.note(journal))
            .collect::<Result<Vec<_>>>()?;
        let name = format!("cbtvault {} {}", options.job, jiff::Timestamp::now());
        let snap_vm = vms.snapshot(&self.vm, &name).await;
        let tagged = match &snap_vm {
            Ok(s) => vms.add_to_other_config(s, TAG_JOB, &options.job).await,
            Err(_) => Ok(()),
        };
        let snap_vm = snap_vm.map_err(xapi(subject, "VM.snapshot"))?;
        tagged.map_err(xapi(subject, "tagging the VM snapshot"))?;
        journal
            .close(vm_note, "done")
            .map_err(journal_error(subject, "closing the VM snapshot's note"))?;
        let paired = self.pair(client, &snap_vm, disks, options).await;
        for (disk, note) in disks.iter().zip(disk_notes) {
            disk.close(journal, note)?;
        }
        let vdis = match paired {
            Ok(v) => v,
            Err(e) => {
                let _ = vms.destroy(&snap_vm).await;
                return Err(e);
            }
        };
        let snapshot = VmSnapshot { vm: snap_vm, vdis };
        let mut captures = Vec::new();
        for (disk, snap) in disks.iter().zip(&snapshot.vdis) {
            match disk.changes(client, snap).await {
                Ok(c) => captures.push(c),
                Err(e) => {
                    self.destroy_snapshot(client, &snapshot).await;
                    for (d, s) in disks.iter().zip(&snapshot.vdis) {
                        d.abort(client, s, options).await;
                    }
                    return Err(e);
                }
            }
        }
        Ok((snapshot, captures))
    }

    /// Pairs each disk with its snapshot VDI, and tags those too.
    async fn pair(
        &self,
        client: &Client,
        snap_vm: &VmRef,
        disks: &[&VdiBackup],
        options: &XenOptions,
    ) -> Result<Vec<VdiRef>> {
        let subject = &self.subject;
        let snap_record = client
            .vm()
            .get_record(snap_vm)
            .await
            .map_err(xapi(subject, "reading the VM snapshot"))?;
        let mut pairs: Vec<Option<VdiRef>> = vec![None; disks.len()];
        for vbd in &snap_record.vbds {
            let v = client
                .vbd()
                .get_record(vbd)
                .await
                .map_err(xapi(subject, "reading a VBD"))?;
            if v.vdi.is_null() {
                continue;
            }
            let snap = client
                .vdi()
                .get_record(&v.vdi)
                .await
                .map_err(xapi(subject, "reading a VDI"))?;
            if let Some(i) = disks.iter().position(|d| *d.vdi() == snap.snapshot_of) {
                client
                    .vdi()
                    .add_to_other_config(&v.vdi, TAG_JOB, &options.job)
                    .await
                    .map_err(xapi(subject, "tagging a snapshot VDI"))?;
                pairs[i] = Some(v.vdi.clone());
            }
        }
        let found = pairs.iter().flatten().count();
        if found != disks.len() {
            return Err(Error::Refused {
                subject: subject.clone(),
                what: format!(
                    "the VM snapshot holds {found} of the VM's {} disks",
                    disks.len()
                ),
            });
        }
        Ok(pairs.into_iter().flatten().collect())
    }

    /// Destroys the snapshot VM (not its VDIs): its VBDs would keep the
    /// VDIs in use, so this comes before any `data_destroy`. A failure is
    /// logged: the disks keep their data until the next run reaps them.
    pub async fn destroy_snapshot(&self, client: &Client, snapshot: &VmSnapshot) {
        if let Err(e) = client.vm().destroy(&snapshot.vm).await {
            warn!(error = %e, "could not destroy the VM snapshot; its disks keep their data until the next run");
        }
    }
}

/// Destroys snapshot VMs an interrupted run of this job left: tagged ones,
/// and the one a run that died before tagging made (found through its note).
async fn reap_vm_snapshots(
    client: &Client,
    subject: &str,
    vm: &VmRef,
    options: &XenOptions,
    journal: &dyn Journal,
) -> Result<()> {
    let vms = client.vm();
    let all = vms
        .get_all_records()
        .await
        .map_err(xapi(subject, "listing VMs"))?;
    let mut doomed: Vec<VmRef> = all
        .iter()
        .filter(|(_, r)| {
            r.is_a_snapshot
                && r.snapshot_of == *vm
                && r.other_config.get(TAG_JOB) == Some(&options.job)
        })
        .map(|(r, _)| r.clone())
        .collect();
    let unfinished = journal
        .unfinished(NoteKind::VmSnapshot, subject)
        .map_err(journal_error(
            subject,
            "reading the notes of interrupted runs",
        ))?;
    for (note, known) in unfinished {
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
        journal.close(note, "reaped").map_err(journal_error(
            subject,
            "closing a note of an interrupted run",
        ))?;
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
