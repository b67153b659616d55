//! Whole-VM restore into a XenServer pool, plan then apply.
//!
//! [`plan_vm_restore`] reads the VM metadata saved with a VM-level run
//! (the VM record, its VBDs, VIFs and their networks) and checks
//! everything against the pool before anything is made: the SR exists and
//! has room for every disk, every VIF's network is in the pool or mapped
//! to one, each mapping is used and leads somewhere, the record has the
//! settings `VM.create` needs. [`apply_vm_restore`] then creates the VM
//! (halted), one new VDI per disk filled from its restore point and
//! attached at the disk's saved device position, empty CD drives where
//! the VM had them, and the VIFs (MACs kept unless asked otherwise), and
//! starts the VM if asked. Each object made is recorded; a failure undoes
//! them all in reverse order, so nothing half-made stays in the pool.

use std::collections::BTreeMap;
use std::sync::Arc;

use cbtvault_config::Pool;
use cbtvault_repo::{Repository, RestorePointRow};
use cbtvault_xenapi::{
    Client, NetworkRef, SrRef, VbdCreate, VbdRef, VdiRef, VifCreate, VifRef, VmCreate, VmRef,
};
use serde_json::Value as Json;
use tracing::{info, warn};

use crate::error::{Error, Result, VmRestoreRefusal};
use crate::restore::{upload_new_vdi, xapi};
use crate::saved_vm::{find_network, flag, int, saved_networks, short_time, text, to_value};

/// The other_config key a restored VM carries: `VM_UUID@TIME` of the run
/// it came from.
pub const RESTORED_FROM_KEY: &str = "cbtvault_restored_from";

/// What the caller asks of a whole-VM restore.
#[derive(Clone, Debug, Default)]
pub struct VmRestoreRequest {
    /// The SR the new VDIs go to.
    pub sr_uuid: String,
    /// The new VM's name (the saved one if `None`).
    pub name: Option<String>,
    /// `OLD → NEW`: the VIFs on network OLD (its uuid, name or bridge in
    /// the saved metadata) go on the pool's network NEW (uuid, name or
    /// bridge). A network with no mapping must be in the pool (same uuid).
    pub network_map: Vec<(String, String)>,
    /// Give the VIFs new MACs instead of the saved ones.
    pub new_macs: bool,
    /// Start the VM once made.
    pub start: bool,
}

/// A disk to restore.
#[derive(Clone, Debug)]
pub struct PlannedDisk {
    /// The VBD position (`userdevice`).
    pub device: String,
    /// The new VDI's name label.
    pub label: String,
    /// Its size in bytes.
    pub size: u64,
    pub bootable: bool,
    /// `RW` or `RO`.
    pub mode: String,
    /// The restore point it is filled from.
    pub restore_point: RestorePointRow,
}

/// An empty removable drive (a CD drive: the disc is not backed up).
#[derive(Clone, Debug)]
pub struct PlannedDrive {
    pub device: String,
    pub bootable: bool,
    /// `CD` or `Floppy`.
    pub kind: String,
}

/// A network interface to make.
#[derive(Clone, Debug)]
pub struct PlannedVif {
    pub device: String,
    /// The MAC to give (empty: the pool makes one).
    pub mac: String,
    pub mtu: i64,
    /// The network in the backed-up VM's pool, as saved.
    pub from_network: String,
    /// The pool's network it goes on.
    pub network_uuid: String,
    pub network_name: String,
    network: NetworkRef,
    locking_mode: String,
}

/// Everything a whole-VM restore will make, checked against the pool.
#[derive(Clone, Debug)]
pub struct VmRestorePlan {
    /// The backed-up VM's uuid and name.
    pub source_uuid: String,
    pub source_name: String,
    /// When the run took it.
    pub time: jiff::Timestamp,
    /// The new VM's name.
    pub name: String,
    pub vcpus: i64,
    /// `memory_static_max`, bytes.
    pub memory: i64,
    pub disks: Vec<PlannedDisk>,
    pub drives: Vec<PlannedDrive>,
    pub vifs: Vec<PlannedVif>,
    /// What the metadata holds that will not be made, in words.
    pub notes: Vec<String>,
    pub start: bool,
    sr: SrRef,
    create: VmCreate,
}

/// A restored disk.
#[derive(Clone, Debug)]
pub struct RestoredDisk {
    pub device: String,
    pub vdi: String,
    pub label: String,
    pub restore_point: String,
    pub bytes: u64,
}

/// A made network interface.
#[derive(Clone, Debug)]
pub struct RestoredVif {
    pub device: String,
    pub mac: String,
    pub network: String,
}

/// What a whole-VM restore made.
#[derive(Clone, Debug)]
pub struct VmRestored {
    pub vm: String,
    pub name: String,
    pub disks: Vec<RestoredDisk>,
    pub vifs: Vec<RestoredVif>,
    pub started: bool,
    pub notes: Vec<String>,
}

/// Plans and applies a whole-VM restore of `points` (the restore points
/// of one VM-level run) into `pool`: logs in, checks, makes, logs out.
pub async fn restore_vm(
    pool: &Pool,
    repo: Arc<Repository>,
    points: &[RestorePointRow],
    request: &VmRestoreRequest,
) -> Result<VmRestored> {
    let client = crate::login::login(pool).await?;
    let result = async {
        let plan = plan_vm_restore(&client, &pool.name, &repo, points, request).await?;
        apply_vm_restore(&client, &pool.name, &repo, &plan).await
    }
    .await;
    let _ = client.logout().await;
    result
}

/// Logs in and plans the restore of `points` into `pool`, making nothing
/// (a dry run).
pub async fn plan_vm_restore_in_pool(
    pool: &Pool,
    repo: Arc<Repository>,
    points: &[RestorePointRow],
    request: &VmRestoreRequest,
) -> Result<VmRestorePlan> {
    let client = crate::login::login(pool).await?;
    let plan = plan_vm_restore(&client, &pool.name, &repo, points, request).await;
    let _ = client.logout().await;
    plan
}

fn refused(vm: &str, refusal: VmRestoreRefusal, what: String) -> Error {
    Error::VmRestore {
        vm: vm.to_string(),
        what,
        refusal,
    }
}

/// Checks the restore of `points` (one VM-level run) against the pool and
/// returns what will be made. Nothing is created.
pub async fn plan_vm_restore(
    client: &Client,
    pool: &str,
    repo: &Arc<Repository>,
    points: &[RestorePointRow],
    request: &VmRestoreRequest,
) -> Result<VmRestorePlan> {
    let first = points
        .first()
        .ok_or_else(|| Error::Internal("a VM restore of no restore point".into()))?;
    let info = first.manifest.source.vm.clone().ok_or_else(|| {
        refused(
            &first.manifest.disk,
            VmRestoreRefusal::NoMetadata,
            format!(
                "restore point {} was not taken as part of a VM, so there is no VM to rebuild",
                first.id
            ),
        )
    })?;
    let vm_label = info.name.clone();
    let Some(metadata_id) = info.metadata.clone() else {
        return Err(refused(
            &vm_label,
            VmRestoreRefusal::NoMetadata,
            format!(
                "the run of {} saved no VM metadata (CPUs, memory, devices), so the VM cannot be rebuilt",
                first.manifest.time
            ),
        ));
    };
    let repo2 = repo.clone();
    let id2 = metadata_id.clone();
    let saved = tokio::task::spawn_blocking(move || repo2.vm_metadata(&id2))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    let metadata = &saved.json;
    if metadata.get("provider").and_then(Json::as_str) == Some(crate::qemu_layout::PROVIDER) {
        return Err(refused(
            &vm_label,
            VmRestoreRefusal::WrongHypervisor,
            "it was backed up from QEMU: restore it into a directory".into(),
        ));
    }
    let bad = |what: String| refused(&vm_label, VmRestoreRefusal::BadMetadata, what);
    let record = metadata
        .get("vm")
        .ok_or_else(|| bad(format!("VM metadata {metadata_id} holds no VM record")))?;
    let (mut create, lacking) = VmCreate::from_record(&to_value(record));
    if !lacking.is_empty() {
        return Err(bad(format!(
            "the saved VM record lacks {} (saved from a pool that did not report them), so the VM's CPUs and memory are unknown",
            lacking.join(", ")
        )));
    }
    let name = request
        .name
        .clone()
        .unwrap_or_else(|| text(record, "name_label").to_string());
    create.set("name_label", name.as_str());
    create.add_other_config(
        RESTORED_FROM_KEY,
        &format!("{}@{}", info.uuid, first.manifest.time),
    );
    if request.new_macs {
        // xapi makes MACs from the seed: a copy would repeat them.
        create.remove_other_config("mac_seed");
    }
    let mut notes = Vec::new();
    if let Some(missing) = metadata.get("missing").and_then(Json::as_object)
        && !missing.is_empty()
    {
        notes.push(format!(
            "the pool did not answer for {} when the metadata was saved",
            missing.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }

    // The SR, and room on it.
    let sr = client
        .sr()
        .get_by_uuid(&request.sr_uuid)
        .await
        .map_err(|e| match e.xapi().map(|x| x.code()).as_deref() {
            Some("UUID_INVALID") | Some("HANDLE_INVALID") => refused(
                &vm_label,
                VmRestoreRefusal::UnknownSr,
                format!("pool {pool:?} has no SR {}", request.sr_uuid),
            ),
            _ => xapi(pool, &format!("looking up SR {}", request.sr_uuid))(e),
        })?;
    let sr_record = client
        .sr()
        .get_record(&sr)
        .await
        .map_err(xapi(pool, "reading the SR"))?;

    // Disks by device position, from the VBDs saved.
    let empty = Vec::new();
    let vbds = metadata
        .get("vbds")
        .and_then(Json::as_array)
        .unwrap_or(&empty);
    let device_of = |rp: &RestorePointRow| {
        rp.manifest
            .source
            .vm
            .as_ref()
            .and_then(|v| v.device.clone())
            .unwrap_or_default()
    };
    let time = short_time(first.manifest.time);
    let mut disks = Vec::new();
    let mut drives = Vec::new();
    let mut used: Vec<&str> = Vec::new();
    for vbd in vbds {
        let device = text(vbd, "userdevice");
        let kind = text(vbd, "type");
        if !kind.eq_ignore_ascii_case("disk") {
            drives.push(PlannedDrive {
                device: device.to_string(),
                bootable: flag(vbd, "bootable"),
                kind: if kind.eq_ignore_ascii_case("floppy") {
                    "Floppy".into()
                } else {
                    "CD".into()
                },
            });
            if !flag(vbd, "empty") {
                notes.push(format!(
                    "the {kind} drive at device {device} comes back empty (its disc is not backed up)"
                ));
            }
            continue;
        }
        if flag(vbd, "empty") {
            continue;
        }
        let Some(rp) = points.iter().find(|rp| device_of(rp) == device) else {
            notes.push(format!(
                "the disk at device {device} has no restore point in this run and is not restored"
            ));
            continue;
        };
        used.push(device);
        disks.push(planned_disk(
            rp,
            device,
            flag(vbd, "bootable"),
            text(vbd, "mode"),
            &time,
        ));
    }
    for rp in points {
        let device = device_of(rp);
        if !used.contains(&device.as_str()) {
            // Backed up, but not among the saved VBDs: attached all the same.
            notes.push(format!(
                "disk {} was not among the VM's saved devices; it is attached at device {device}",
                rp.manifest.disk
            ));
            disks.push(planned_disk(rp, &device, false, "RW", &time));
        }
    }
    let positions: Vec<&str> = disks
        .iter()
        .map(|d| d.device.as_str())
        .chain(drives.iter().map(|d| d.device.as_str()))
        .collect();
    for (i, p) in positions.iter().enumerate() {
        if p.is_empty() || positions[..i].contains(p) {
            return Err(bad(format!(
                "two devices of the VM share position {p:?}, or one has none"
            )));
        }
    }
    let needed: u64 = disks.iter().map(|d| d.size).sum();
    let free = sr_record
        .physical_size
        .saturating_sub(sr_record.physical_utilisation);
    if needed > free {
        return Err(refused(
            &vm_label,
            VmRestoreRefusal::SrFull,
            format!(
                "SR {:?} ({}) has {free} bytes free and the VM's {} disks need {needed}",
                sr_record.name_label,
                sr_record.uuid,
                disks.len()
            ),
        ));
    }

    // Networks.
    let vifs_saved = metadata
        .get("vifs")
        .and_then(Json::as_array)
        .unwrap_or(&empty);
    let old_networks = saved_networks(metadata);
    let pool_networks = client
        .network()
        .get_all_records()
        .await
        .map_err(xapi(pool, "listing the pool's networks"))?;
    let pool_names = || {
        pool_networks
            .values()
            .map(|n| format!("{:?} ({})", n.name_label, n.uuid))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut mapping_used = vec![false; request.network_map.len()];
    let mut vifs = Vec::new();
    for vif in vifs_saved {
        let old_ref = text(vif, "network");
        let old = old_networks.get(old_ref);
        let old_uuid = old.map(|n| text(n, "uuid")).unwrap_or_default();
        let old_name = old.map(|n| text(n, "name_label")).unwrap_or_default();
        let old_bridge = old.map(|n| text(n, "bridge")).unwrap_or_default();
        let described = if old.is_some() {
            format!("{old_name:?} ({old_uuid})")
        } else {
            format!("{old_ref} (its record was not saved)")
        };
        let device = text(vif, "device").to_string();
        let mapping = request.network_map.iter().position(|(from, _)| {
            [old_ref, old_uuid, old_name, old_bridge]
                .iter()
                .any(|k| !k.is_empty() && (k.eq_ignore_ascii_case(from)))
        });
        let (network, record) = match mapping {
            Some(i) => {
                mapping_used[i] = true;
                let to = &request.network_map[i].1;
                find_network(&pool_networks, to).ok_or_else(|| {
                    refused(
                        &vm_label,
                        VmRestoreRefusal::NetworkNotInPool {
                            network: to.clone(),
                        },
                        format!(
                            "network {to:?} (mapped from {described}) is not in pool {pool:?}; its networks: {}",
                            pool_names()
                        ),
                    )
                })?
            }
            None => pool_networks
                .iter()
                .find(|(_, n)| !old_uuid.is_empty() && n.uuid.eq_ignore_ascii_case(old_uuid))
                .ok_or_else(|| {
                    refused(
                        &vm_label,
                        VmRestoreRefusal::NetworkUnmapped {
                            network: if old_name.is_empty() {
                                old_ref.to_string()
                            } else {
                                old_name.to_string()
                            },
                        },
                        format!(
                            "network {described} of VIF {device} is not in pool {pool:?} and no mapping names it; the pool's networks: {}",
                            pool_names()
                        ),
                    )
                })?,
        };
        let mtu = int(vif, "MTU").unwrap_or(1500);
        vifs.push(PlannedVif {
            device,
            mac: if request.new_macs {
                String::new()
            } else {
                text(vif, "MAC").to_string()
            },
            mtu,
            from_network: described,
            network_uuid: record.uuid.clone(),
            network_name: record.name_label.clone(),
            network: network.clone(),
            locking_mode: match text(vif, "locking_mode") {
                "" => "network_default".into(),
                m => m.to_string(),
            },
        });
    }
    if !request.new_macs && !vifs.is_empty() {
        // Kept MACs clash with the original's if it still runs here.
        let in_use = client
            .vif()
            .get_all_records()
            .await
            .map_err(xapi(pool, "listing the pool's VIFs"))?;
        for v in &vifs {
            if in_use.values().any(|u| u.mac.eq_ignore_ascii_case(&v.mac)) {
                notes.push(format!(
                    "MAC {} of VIF {} is in use by another VIF in this pool: the two VMs must not run on one network together",
                    v.mac, v.device
                ));
            }
        }
    }
    if let Some(i) = mapping_used.iter().position(|u| !u) {
        let from = &request.network_map[i].0;
        let known: Vec<String> = old_networks
            .values()
            .map(|n| format!("{:?} ({})", text(n, "name_label"), text(n, "uuid")))
            .collect();
        return Err(refused(
            &vm_label,
            VmRestoreRefusal::MappingUnused {
                network: from.clone(),
            },
            format!(
                "the mapping of network {from:?} matches none of the VM's networks ({})",
                if known.is_empty() {
                    "it had none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        ));
    }
    Ok(VmRestorePlan {
        source_uuid: info.uuid.clone(),
        source_name: info.name.clone(),
        time: first.manifest.time,
        name,
        vcpus: int(record, "VCPUs_max").unwrap_or_default(),
        memory: int(record, "memory_static_max").unwrap_or_default(),
        disks,
        drives,
        vifs,
        notes,
        start: request.start,
        sr,
        create,
    })
}

fn planned_disk(
    rp: &RestorePointRow,
    device: &str,
    bootable: bool,
    mode: &str,
    time: &str,
) -> PlannedDisk {
    let original = rp
        .manifest
        .source
        .vm
        .as_ref()
        .and_then(|v| v.disk_label.clone())
        .unwrap_or_else(|| rp.manifest.disk.clone());
    PlannedDisk {
        device: device.to_string(),
        label: format!("{original} (restored {time})"),
        size: rp.manifest.virtual_size,
        bootable,
        mode: if mode.eq_ignore_ascii_case("RO") {
            "RO".into()
        } else {
            "RW".into()
        },
        restore_point: rp.clone(),
    }
}

/// An object a restore made, to undo on failure.
enum Made {
    Vm(VmRef),
    Started(VmRef),
    Vdi(VdiRef),
    Vbd(VbdRef),
    Vif(VifRef),
}

/// Makes what `plan` says. On failure everything made is removed again
/// (in reverse order); what could not be is named in the error.
pub async fn apply_vm_restore(
    client: &Client,
    pool: &str,
    repo: &Arc<Repository>,
    plan: &VmRestorePlan,
) -> Result<VmRestored> {
    let mut made = Vec::new();
    match make(client, pool, repo, plan, &mut made).await {
        Ok(done) => Ok(done),
        Err(e) => {
            warn!(vm = %plan.name, error = %e, "whole-VM restore failed; removing what it made");
            let left = undo(client, made).await;
            if left.is_empty() {
                Err(e)
            } else {
                Err(Error::VmRestoreLeftovers {
                    vm: plan.name.clone(),
                    left: left.join(", "),
                    source: Box::new(e),
                })
            }
        }
    }
}

async fn make(
    client: &Client,
    pool: &str,
    repo: &Arc<Repository>,
    plan: &VmRestorePlan,
    made: &mut Vec<Made>,
) -> Result<VmRestored> {
    let vm = client
        .vm()
        .create(&plan.create)
        .await
        .map_err(xapi(pool, &format!("creating VM {:?}", plan.name)))?;
    made.push(Made::Vm(vm.clone()));
    let mut disks = Vec::new();
    for d in &plan.disks {
        let vdi = upload_new_vdi(client, pool, repo, &d.restore_point, &plan.sr, &d.label).await?;
        made.push(Made::Vdi(vdi.clone()));
        let vbd = client
            .vbd()
            .create(&VbdCreate {
                vm: vm.clone(),
                vdi: vdi.clone(),
                userdevice: d.device.clone(),
                bootable: d.bootable,
                mode: d.mode.clone(),
                vbd_type: "Disk".into(),
                empty: false,
                other_config: BTreeMap::new(),
            })
            .await
            .map_err(xapi(pool, &format!("attaching disk {}", d.device)))?;
        made.push(Made::Vbd(vbd));
        let uuid = client
            .vdi()
            .get_uuid(&vdi)
            .await
            .map_err(xapi(pool, "reading a new VDI's uuid"))?;
        info!(vm = %plan.name, device = %d.device, vdi = %uuid, "disk restored");
        disks.push(RestoredDisk {
            device: d.device.clone(),
            vdi: uuid,
            label: d.label.clone(),
            restore_point: d.restore_point.id.clone(),
            bytes: d.size,
        });
    }
    for d in &plan.drives {
        let vbd = client
            .vbd()
            .create(&VbdCreate {
                vm: vm.clone(),
                vdi: VdiRef::null(),
                userdevice: d.device.clone(),
                bootable: d.bootable,
                mode: "RO".into(),
                vbd_type: d.kind.clone(),
                empty: true,
                other_config: BTreeMap::new(),
            })
            .await
            .map_err(xapi(pool, &format!("adding the drive at {}", d.device)))?;
        made.push(Made::Vbd(vbd));
    }
    let mut vifs = Vec::new();
    for v in &plan.vifs {
        let vif = client
            .vif()
            .create(&VifCreate {
                vm: vm.clone(),
                network: v.network.clone(),
                device: v.device.clone(),
                mac: v.mac.clone(),
                mtu: v.mtu,
                other_config: BTreeMap::new(),
                locking_mode: v.locking_mode.clone(),
            })
            .await
            .map_err(xapi(pool, &format!("creating VIF {}", v.device)))?;
        made.push(Made::Vif(vif.clone()));
        let record = client
            .vif()
            .get_record(&vif)
            .await
            .map_err(xapi(pool, "reading a new VIF"))?;
        vifs.push(RestoredVif {
            device: v.device.clone(),
            mac: record.mac,
            network: v.network_uuid.clone(),
        });
    }
    if plan.start {
        client
            .vm()
            .start(&vm, false, false)
            .await
            .map_err(xapi(pool, &format!("starting VM {:?}", plan.name)))?;
        made.push(Made::Started(vm.clone()));
    }
    let uuid = client
        .vm()
        .get_record(&vm)
        .await
        .map_err(xapi(pool, "reading the new VM"))?
        .uuid;
    Ok(VmRestored {
        vm: uuid,
        name: plan.name.clone(),
        disks,
        vifs,
        started: plan.start,
        notes: plan.notes.clone(),
    })
}

/// Removes what a failed restore made, newest first. Returns what could
/// not be removed, in words.
async fn undo(client: &Client, made: Vec<Made>) -> Vec<String> {
    let mut left = Vec::new();
    for m in made.into_iter().rev() {
        let (what, result) = match &m {
            Made::Started(vm) => (
                format!("running VM {vm}"),
                client.vm().hard_shutdown(vm).await,
            ),
            Made::Vif(r) => (format!("VIF {r}"), client.vif().destroy(r).await),
            Made::Vbd(r) => (format!("VBD {r}"), client.vbd().destroy(r).await),
            Made::Vm(r) => (format!("VM {r}"), client.vm().destroy(r).await),
            Made::Vdi(r) => (format!("VDI {r}"), client.vdi().destroy(r).await),
        };
        if let Err(e) = result {
            warn!(object = %what, error = %e, "could not remove what the failed restore made");
            left.push(what);
        }
    }
    left
}
