//! A VM's properties as the JSON API returns them, its reconfiguration,
//! and `QueryChangedDiskAreas`.

use serde_json::{Value, json};

use crate::api::Answer;
use crate::cbt::{QueryShape, fmt_epoch};
use crate::fault::SimFault;
use crate::model::{State, Vm};

fn moref(kind: &str, value: &str) -> Value {
    json!({"_typeName": "ManagedObjectReference", "type": kind, "value": value})
}

/// A stun (snapshot create or delete, power on): CBT enabled in the config
/// becomes effective on every disk.
pub(crate) fn stun(v: &mut Vm) {
    if v.cbt_enabled && v.cbt_supported {
        for d in &mut v.disks {
            if !d.cbt.active {
                d.cbt.reset();
            }
        }
    }
}

struct DiskView<'a> {
    key: i32,
    capacity: u64,
    file_name: String,
    change_id: Option<String>,
    object_id: &'a str,
}

fn disk_json(d: &DiskView<'_>, index: usize) -> Value {
    let mut backing = json!({"_typeName": "VirtualDiskFlatVer2BackingInfo",
        "fileName": d.file_name, "datastore": moref("Datastore", "datastore-11"),
        "diskMode": "persistent", "thinProvisioned": true,
        "uuid": format!("6000C29{:025x}", d.key)});
    if let (Some(c), Some(o)) = (&d.change_id, backing.as_object_mut()) {
        o.insert("changeId".into(), json!(c));
    }
    json!({"_typeName": "VirtualDisk", "key": d.key,
        "deviceInfo": {"_typeName": "Description", "label": format!("Hard disk {}", index + 1),
            "summary": format!("{} KB", d.capacity / 1024)},
        "backing": backing, "controllerKey": 1000, "unitNumber": index,
        "capacityInKB": d.capacity / 1024, "capacityInBytes": d.capacity,
        "diskObjectId": d.object_id})
}

fn config_json(v: &Vm, disks: &[DiskView<'_>]) -> Value {
    let mut devices = vec![
        json!({"_typeName": "VirtualLsiLogicController", "key": 1000,
        "deviceInfo": {"_typeName": "Description", "label": "SCSI controller 0", "summary": "LSI Logic"},
        "busNumber": 0, "sharedBus": "noSharing"}),
    ];
    devices.extend(disks.iter().enumerate().map(|(i, d)| disk_json(d, i)));
    json!({"_typeName": "VirtualMachineConfigInfo", "name": v.name, "uuid": v.uuid,
        "guestId": "otherLinux64Guest", "version": if v.cbt_supported { "vmx-19" } else { "vmx-04" },
        "changeTrackingEnabled": v.cbt_enabled,
        "hardware": {"_typeName": "VirtualHardware", "numCPU": 1, "memoryMB": 1024, "device": devices}})
}

pub(crate) fn property(s: &State, id: &str, prop: &str) -> Answer {
    let v = match s.vm(id) {
        Ok(v) => v,
        Err(f) => return Answer::Fault(f),
    };
    match prop {
        "config" => {
            let disks: Vec<DiskView<'_>> = v
                .disks
                .iter()
                .map(|d| DiskView {
                    key: d.key,
                    capacity: d.capacity,
                    file_name: d.file_name(),
                    // The running disk's changeId: the last snapshot's
                    // generation, so writes since then count as changes.
                    change_id: d.cbt.active.then(|| {
                        format!(
                            "{}/{}",
                            fmt_epoch(&d.cbt.epoch),
                            d.cbt.generation.saturating_sub(1)
                        )
                    }),
                    object_id: &d.object_id,
                })
                .collect();
            Answer::Value(config_json(v, &disks))
        }
        "capability" => Answer::Value(json!({"_typeName": "VirtualMachineCapability",
            "snapshotOperationsSupported": true, "changeTrackingSupported": v.cbt_supported,
            "diskSharesSupported": true})),
        "runtime" => Answer::Value(json!({"_typeName": "VirtualMachineRuntimeInfo",
            "powerState": if v.powered_on { "poweredOn" } else { "poweredOff" },
            "connectionState": "connected"})),
        "name" => Answer::Value(json!(v.name)),
        "snapshot" => {
            if v.snapshots.is_empty() {
                return Answer::Empty;
            }
            // A chain: each snapshot the only child of the one before.
            let mut tree: Option<Value> = None;
            for sid in v.snapshots.iter().rev() {
                let Some(snap) = s.snapshots.get(sid) else {
                    continue;
                };
                let children: Vec<Value> = tree.take().into_iter().collect();
                tree = Some(json!({"_typeName": "VirtualMachineSnapshotTree",
                    "snapshot": moref("VirtualMachineSnapshot", sid), "vm": moref("VirtualMachine", id),
                    "name": snap.name, "description": snap.description,
                    "id": sid.trim_start_matches("snapshot-").parse::<i64>().unwrap_or(0),
                    "createTime": snap.created, "state": if v.powered_on { "poweredOn" } else { "poweredOff" },
                    "quiesced": snap.quiesced, "childSnapshotList": children}));
            }
            let current = v
                .snapshots
                .last()
                .map(|c| moref("VirtualMachineSnapshot", c));
            Answer::Value(json!({"_typeName": "VirtualMachineSnapshotInfo",
                "currentSnapshot": current, "rootSnapshotList": tree.into_iter().collect::<Vec<_>>()}))
        }
        _ => Answer::Fault(SimFault::invalid_argument(prop)),
    }
}

pub(crate) fn snapshot_config(s: &State, id: &str) -> Result<Value, SimFault> {
    let snap = s
        .snapshots
        .get(id)
        .ok_or_else(|| SimFault::object_not_found("VirtualMachineSnapshot", id))?;
    let v = s.vm(&snap.vm)?;
    let disks: Vec<DiskView<'_>> = snap
        .disks
        .iter()
        .map(|d| DiskView {
            key: d.key,
            capacity: d.capacity,
            file_name: d.file_name.clone(),
            change_id: d.change_id.clone(),
            object_id: &d.object_id,
        })
        .collect();
    Ok(config_json(v, &disks))
}

pub(crate) fn reconfigure(s: &mut State, id: &str, body: &Value) -> Result<(), SimFault> {
    let v = s.vm_mut(id)?;
    if let Some(on) = body
        .pointer("/spec/changeTrackingEnabled")
        .and_then(|b| b.as_bool())
    {
        if on && !v.cbt_supported {
            return Err(SimFault::new(
                "NotSupported",
                "Changed block tracking is not supported by this virtual machine's hardware version",
            ));
        }
        v.cbt_enabled = on;
        if !on {
            for d in &mut v.disks {
                d.cbt.active = false;
            }
        } else if !v.powered_on {
            // A powered-off VM needs no stun (the next power-on is one).
            stun(v);
        }
    }
    Ok(())
}

pub(crate) fn change_info(start: u64, length: u64, areas: &[(u64, u64)]) -> Value {
    let areas: Vec<Value> = areas
        .iter()
        .map(|&(s, l)| json!({"_typeName": "DiskChangeExtent", "start": s, "length": l}))
        .collect();
    json!({"_typeName": "DiskChangeInfo", "startOffset": start, "length": length, "changedArea": areas})
}

pub(crate) fn query(
    s: &State,
    id: &str,
    body: &Value,
    shape: QueryShape,
) -> Result<Value, SimFault> {
    let v = s.vm(id)?;
    let key = body
        .get("deviceKey")
        .and_then(|k| k.as_i64())
        .ok_or_else(|| SimFault::invalid_argument("deviceKey"))?;
    let start = body
        .get("startOffset")
        .and_then(|k| k.as_u64())
        .ok_or_else(|| SimFault::invalid_argument("startOffset"))?;
    let change_id = body
        .get("changeId")
        .and_then(|k| k.as_str())
        .ok_or_else(|| SimFault::invalid_argument("changeId"))?;
    let disk = v
        .disks
        .iter()
        .find(|d| i64::from(d.key) == key)
        .ok_or_else(|| SimFault::invalid_argument("deviceKey"))?;
    if !v.cbt_supported {
        return Err(SimFault::invalid_argument("deviceKey"));
    }
    let snap_ref = body.get("snapshot").map(|m| m.get("_value").unwrap_or(m));
    let (snap_change_id, snap_gen, capacity) = match snap_ref
        .and_then(|m| m.get("value"))
        .and_then(|x| x.as_str())
    {
        Some(sid) => {
            let snap = s
                .snapshots
                .get(sid)
                .filter(|snap| snap.vm == id)
                .ok_or_else(|| SimFault::not_found(&format!("snapshot {sid}")))?;
            let d = snap
                .disks
                .iter()
                .find(|d| i64::from(d.key) == key)
                .ok_or_else(|| SimFault::invalid_argument("deviceKey"))?;
            (d.change_id.clone(), d.generation, d.capacity)
        }
        None if v.powered_on => {
            return Err(SimFault::file_fault_key(
                "vim.hostd.vmsvc.cbt.cannotGetChanges",
                "A running VM's disk needs a snapshot to be queried",
            ));
        }
        None => (
            disk.cbt
                .active
                .then(|| format!("{}/{}", fmt_epoch(&disk.cbt.epoch), disk.cbt.generation)),
            disk.cbt.generation,
            disk.capacity,
        ),
    };
    let (length, areas) = disk.cbt.query(
        snap_change_id.as_deref(),
        snap_gen,
        capacity,
        start,
        change_id,
        shape,
    )?;
    Ok(change_info(start, length, &areas))
}
