//! The data objects cbtvault reads and sends, with their JSON forms.
//!
//! Answers are read leniently from `serde_json::Value`: only the fields a
//! backup needs are required, unknown fields are ignored, and a managed
//! object reference is accepted inline (`{"type","value"}`, what govmomi
//! and the OpenAPI schema use) or boxed in `_value` (as one VMware guide
//! shows it).

use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// A managed object reference: `VirtualMachine` / `vm-42`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MoRef {
    pub kind: String,
    pub value: String,
}

impl MoRef {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> MoRef {
        MoRef {
            kind: kind.into(),
            value: value.into(),
        }
    }

    pub fn vm(value: impl Into<String>) -> MoRef {
        MoRef::new("VirtualMachine", value)
    }

    pub fn datastore(value: impl Into<String>) -> MoRef {
        MoRef::new("Datastore", value)
    }

    /// The JSON form sent in requests.
    pub fn to_json(&self) -> Value {
        json!({"_typeName": "ManagedObjectReference", "type": self.kind, "value": self.value})
    }

    /// Reads either JSON form.
    pub fn from_json(v: &Value) -> Option<MoRef> {
        let v = match v.get("_value") {
            Some(inner) if inner.is_object() => inner,
            _ => v,
        };
        Some(MoRef::new(
            v.get("type")?.as_str()?,
            v.get("value")?.as_str()?,
        ))
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// A First Class Disk or FCD snapshot identifier (`ID{id}`).
pub(crate) fn id_json(id: &str) -> Value {
    json!({"_typeName": "ID", "id": id})
}

/// A VM's virtual disk as its (or its snapshot's) config lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualDisk {
    /// The device key (2000, 2001...): names the disk in
    /// `QueryChangedDiskAreas`.
    pub key: i32,
    /// The disk's label (`Hard disk 1`), when given.
    pub label: Option<String>,
    pub capacity: u64,
    /// `backing.fileName`: `[datastore1] vm/vm.vmdk`.
    pub file_name: String,
    /// `backing.changeId`: empty or absent when CBT is not active.
    pub change_id: Option<String>,
    /// Stable across snapshots.
    pub disk_object_id: Option<String>,
}

/// The facts of a VM a backup needs.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub name: String,
    pub uuid: Option<String>,
    pub change_tracking_enabled: bool,
    pub disks: Vec<VirtualDisk>,
}

/// One snapshot in a VM's snapshot tree.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    pub snapshot: MoRef,
    pub name: String,
    pub description: String,
}

/// One page of `QueryChangedDiskAreas`: the areas in
/// `[start_offset, start_offset + length)` that changed.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DiskChangeInfo {
    pub start_offset: i64,
    pub length: i64,
    #[serde(default)]
    pub changed_area: Vec<DiskChangeExtent>,
}

/// A changed byte range (no alignment promised).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub struct DiskChangeExtent {
    pub start: i64,
    pub length: i64,
}

/// A First Class Disk as `RetrieveVStorageObject` describes it.
#[derive(Clone, Debug)]
pub struct Fcd {
    pub id: String,
    pub name: String,
    pub capacity: u64,
    pub change_tracking_enabled: bool,
    pub file_path: Option<String>,
}

/// An FCD snapshot (`RetrieveSnapshotInfo`).
#[derive(Clone, Debug)]
pub struct FcdSnapshot {
    pub id: String,
    pub description: String,
}

pub(crate) fn str_field(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(|s| s.as_str()).map(str::to_owned)
}

pub(crate) fn parse_disks(config: &Value) -> Vec<VirtualDisk> {
    let devices = config
        .pointer("/hardware/device")
        .and_then(|d| d.as_array())
        .cloned()
        .unwrap_or_default();
    devices
        .iter()
        .filter(|d| d.get("_typeName").and_then(|t| t.as_str()) == Some("VirtualDisk"))
        .filter_map(|d| {
            let key = i32::try_from(d.get("key")?.as_i64()?).ok()?;
            let capacity = match d.get("capacityInBytes").and_then(|c| c.as_u64()) {
                Some(b) => b,
                None => d.get("capacityInKB")?.as_u64()?.checked_mul(1024)?,
            };
            let backing = d.get("backing")?;
            Some(VirtualDisk {
                key,
                label: d
                    .pointer("/deviceInfo/label")
                    .and_then(|l| l.as_str())
                    .map(str::to_owned),
                capacity,
                file_name: str_field(backing, "fileName").unwrap_or_default(),
                change_id: str_field(backing, "changeId").filter(|c| !c.is_empty()),
                disk_object_id: str_field(d, "diskObjectId"),
            })
        })
        .collect()
}

pub(crate) fn parse_vm_config(config: &Value) -> Result<VmConfig> {
    Ok(VmConfig {
        name: str_field(config, "name")
            .ok_or_else(|| Error::protocol("VirtualMachine.config", "no name"))?,
        uuid: str_field(config, "uuid"),
        change_tracking_enabled: config
            .get("changeTrackingEnabled")
            .and_then(|c| c.as_bool())
            .unwrap_or(false),
        disks: parse_disks(config),
    })
}

/// Flattens `VirtualMachine.snapshot.rootSnapshotList` (a tree).
pub(crate) fn parse_snapshot_tree(info: &Value) -> Vec<SnapshotInfo> {
    fn walk(list: Option<&Value>, out: &mut Vec<SnapshotInfo>) {
        for node in list.and_then(|l| l.as_array()).into_iter().flatten() {
            if let Some(snapshot) = node.get("snapshot").and_then(MoRef::from_json) {
                out.push(SnapshotInfo {
                    snapshot,
                    name: str_field(node, "name").unwrap_or_default(),
                    description: str_field(node, "description").unwrap_or_default(),
                });
            }
            walk(node.get("childSnapshotList"), out);
        }
    }
    let mut out = Vec::new();
    walk(info.get("rootSnapshotList"), &mut out);
    out
}

pub(crate) fn parse_fcd(v: &Value) -> Result<Fcd> {
    let config = v
        .get("config")
        .ok_or_else(|| Error::protocol("RetrieveVStorageObject", "no config"))?;
    let id = config
        .pointer("/id/id")
        .and_then(|s| s.as_str())
        .ok_or_else(|| Error::protocol("RetrieveVStorageObject", "no config.id"))?;
    let mb = config
        .get("capacityInMB")
        .and_then(|c| c.as_u64())
        .ok_or_else(|| Error::protocol("RetrieveVStorageObject", "no config.capacityInMB"))?;
    Ok(Fcd {
        id: id.to_owned(),
        name: str_field(config, "name").unwrap_or_default(),
        capacity: mb.saturating_mul(1 << 20),
        change_tracking_enabled: config
            .get("changedBlockTrackingEnabled")
            .and_then(|c| c.as_bool())
            .unwrap_or(false),
        file_path: config
            .pointer("/backing/filePath")
            .and_then(|s| s.as_str())
            .map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moref_both_forms() {
        let inline = json!({"_typeName": "ManagedObjectReference", "type": "VirtualMachineSnapshot", "value": "snapshot-7"});
        let boxed = json!({"_typeName": "ManagedObjectReference", "_value": {"type": "VirtualMachineSnapshot", "value": "snapshot-7"}});
        let want = MoRef::new("VirtualMachineSnapshot", "snapshot-7");
        assert_eq!(MoRef::from_json(&inline), Some(want.clone()));
        assert_eq!(MoRef::from_json(&boxed), Some(want));
    }

    #[test]
    fn disks_from_a_config() {
        let config = json!({"name": "web", "changeTrackingEnabled": true, "hardware": {"device": [
            {"_typeName": "VirtualIDEController", "key": 200},
            {"_typeName": "VirtualDisk", "key": 2000, "capacityInBytes": 1048576,
             "backing": {"_typeName": "VirtualDiskFlatVer2BackingInfo", "fileName": "[ds] web/web.vmdk",
                         "changeId": "52 aa-bb/3"}},
            {"_typeName": "VirtualDisk", "key": 2001, "capacityInKB": 2,
             "backing": {"_typeName": "VirtualDiskFlatVer2BackingInfo", "fileName": "[ds] web/web_1.vmdk", "changeId": ""}}
        ]}});
        let c = parse_vm_config(&config).unwrap();
        assert!(c.change_tracking_enabled);
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].change_id.as_deref(), Some("52 aa-bb/3"));
        assert_eq!(c.disks[1].capacity, 2048);
        assert_eq!(c.disks[1].change_id, None);
    }

    #[test]
    fn change_info_without_areas() {
        let d: DiskChangeInfo = serde_json::from_value(
            json!({"_typeName": "DiskChangeInfo", "startOffset": 0, "length": 10}),
        )
        .unwrap();
        assert!(d.changed_area.is_empty());
    }
}
