//! The calls a VMware backup makes, typed: VM disks (CBT, snapshots,
//! `QueryChangedDiskAreas`) and First Class Disks (`VcenterVStorageObjectManager`).

use serde_json::{Value, json};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::types::{
    DiskChangeInfo, Fcd, FcdSnapshot, MoRef, SnapshotInfo, VirtualDisk, VmConfig, id_json,
    parse_disks, parse_fcd, parse_snapshot_tree, parse_vm_config, str_field,
};

fn snapshot_ref(snapshot: &str) -> MoRef {
    MoRef::new("VirtualMachineSnapshot", snapshot)
}

impl Client {
    /// `VirtualMachine.config`: name, CBT switch, disks.
    pub async fn vm_config(&self, vm: &str) -> Result<VmConfig> {
        let v = self.get(&MoRef::vm(vm), "config").await?.ok_or_else(|| {
            Error::protocol("VirtualMachine.config", format!("{vm} has no config"))
        })?;
        parse_vm_config(&v)
    }

    /// Every VM's moId and name: a container view over the whole inventory
    /// (`ViewManager.CreateContainerView`), its `view`, each VM's `name`,
    /// and the view destroyed.
    pub async fn vm_names(&self) -> Result<Vec<(String, String)>> {
        let (root, views) = self.inventory()?;
        let body =
            json!({"container": root.to_json(), "type": ["VirtualMachine"], "recursive": true});
        let view = self
            .invoke(
                &MoRef::new("ViewManager", views),
                "CreateContainerView",
                body,
            )
            .await?
            .as_ref()
            .and_then(MoRef::from_json)
            .ok_or_else(|| Error::protocol("CreateContainerView", "no view"))?;
        let listed = self.get(&view, "view").await;
        if let Err(e) = self.invoke(&view, "DestroyView", json!({})).await {
            tracing::debug!(error = %e, "could not destroy a container view; it ends with the session");
        }
        let listed = listed?.unwrap_or(Value::Null);
        // A bare array, or boxed as ArrayOfManagedObjectReference.
        let items = listed
            .get("_value")
            .unwrap_or(&listed)
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut out = Vec::new();
        for vm in items.iter().filter_map(MoRef::from_json) {
            let name = self.get(&vm, "name").await?;
            let name = name
                .as_ref()
                .and_then(|n| n.get("_value").unwrap_or(n).as_str())
                .unwrap_or_default()
                .to_owned();
            out.push((vm.value, name));
        }
        Ok(out)
    }

    /// `VirtualMachine.capability.changeTrackingSupported` (hardware ≥ 7).
    pub async fn vm_supports_cbt(&self, vm: &str) -> Result<bool> {
        let v = self.get(&MoRef::vm(vm), "capability").await?;
        Ok(
            v.and_then(|c| c.get("changeTrackingSupported").and_then(|b| b.as_bool()))
                .unwrap_or(false),
        )
    }

    /// Turns CBT on (`ReconfigVM_Task` with `changeTrackingEnabled`). On a
    /// running VM it takes effect at the next stun, which a snapshot is.
    pub async fn enable_vm_cbt(&self, vm: &str) -> Result<()> {
        let spec = json!({"spec": {"_typeName": "VirtualMachineConfigSpec", "changeTrackingEnabled": true}});
        self.run_task(&MoRef::vm(vm), "ReconfigVM_Task", spec)
            .await?;
        Ok(())
    }

    /// `CreateSnapshot_Task` without memory; returns the snapshot's moId.
    pub async fn create_vm_snapshot(
        &self,
        vm: &str,
        name: &str,
        description: &str,
        quiesce: bool,
    ) -> Result<String> {
        let body =
            json!({"name": name, "description": description, "memory": false, "quiesce": quiesce});
        let result = self
            .run_task(&MoRef::vm(vm), "CreateSnapshot_Task", body)
            .await?;
        result
            .as_ref()
            .and_then(MoRef::from_json)
            .map(|m| m.value)
            .ok_or_else(|| {
                Error::protocol("CreateSnapshot_Task", "no snapshot in the task's result")
            })
    }

    /// Every snapshot of `vm` (the tree, flattened).
    pub async fn vm_snapshots(&self, vm: &str) -> Result<Vec<SnapshotInfo>> {
        Ok(self
            .get(&MoRef::vm(vm), "snapshot")
            .await?
            .map(|v| parse_snapshot_tree(&v))
            .unwrap_or_default())
    }

    /// The disks as they are in `snapshot` (paths and changeIds of that
    /// point in time).
    pub async fn snapshot_disks(&self, snapshot: &str) -> Result<Vec<VirtualDisk>> {
        let v = self
            .get(&snapshot_ref(snapshot), "config")
            .await?
            .ok_or_else(|| Error::protocol("VirtualMachineSnapshot.config", "empty"))?;
        Ok(parse_disks(&v))
    }

    /// `RemoveSnapshot_Task` (children kept, consolidated).
    pub async fn remove_vm_snapshot(&self, snapshot: &str) -> Result<()> {
        let body = json!({"removeChildren": false, "consolidate": true});
        self.run_task(&snapshot_ref(snapshot), "RemoveSnapshot_Task", body)
            .await?;
        Ok(())
    }

    /// One page of `QueryChangedDiskAreas` (`change_id` `*`: allocated areas).
    pub async fn query_changed_disk_areas(
        &self,
        vm: &str,
        snapshot: &str,
        device_key: i32,
        start_offset: u64,
        change_id: &str,
    ) -> Result<DiskChangeInfo> {
        let body = json!({
            "snapshot": snapshot_ref(snapshot).to_json(),
            "deviceKey": device_key,
            "startOffset": start_offset,
            "changeId": change_id,
        });
        let v = self
            .invoke(&MoRef::vm(vm), "QueryChangedDiskAreas", body)
            .await?;
        change_info("QueryChangedDiskAreas", v)
    }

    fn vstorage(&self) -> Result<MoRef> {
        Ok(MoRef::new(
            "VcenterVStorageObjectManager",
            self.vstorage_manager()?,
        ))
    }

    /// `RetrieveVStorageObject`.
    pub async fn fcd(&self, id: &str, datastore: &str) -> Result<Fcd> {
        let body = json!({"id": id_json(id), "datastore": MoRef::datastore(datastore).to_json()});
        let v = self
            .invoke(&self.vstorage()?, "RetrieveVStorageObject", body)
            .await?
            .ok_or_else(|| Error::protocol("RetrieveVStorageObject", "empty"))?;
        parse_fcd(&v)
    }

    /// `SetVStorageObjectControlFlags(enableChangedBlockTracking)`.
    pub async fn enable_fcd_cbt(&self, id: &str, datastore: &str) -> Result<()> {
        let body = json!({"id": id_json(id), "datastore": MoRef::datastore(datastore).to_json(),
                          "controlFlags": ["enableChangedBlockTracking"]});
        self.invoke(&self.vstorage()?, "SetVStorageObjectControlFlags", body)
            .await?;
        Ok(())
    }

    /// `VStorageObjectCreateSnapshot_Task`; returns the snapshot's ID.
    pub async fn create_fcd_snapshot(
        &self,
        id: &str,
        datastore: &str,
        description: &str,
    ) -> Result<String> {
        let body = json!({"id": id_json(id), "datastore": MoRef::datastore(datastore).to_json(),
                          "description": description});
        let r = self
            .run_task(&self.vstorage()?, "VStorageObjectCreateSnapshot_Task", body)
            .await?;
        r.as_ref().and_then(|v| str_field(v, "id")).ok_or_else(|| {
            Error::protocol("VStorageObjectCreateSnapshot_Task", "no ID in the result")
        })
    }

    /// `RetrieveSnapshotInfo`.
    pub async fn fcd_snapshots(&self, id: &str, datastore: &str) -> Result<Vec<FcdSnapshot>> {
        let body = json!({"id": id_json(id), "datastore": MoRef::datastore(datastore).to_json()});
        let v = self
            .invoke(&self.vstorage()?, "RetrieveSnapshotInfo", body)
            .await?;
        let list = v
            .as_ref()
            .and_then(|v| v.get("snapshots"))
            .and_then(|s| s.as_array())
            .cloned()
            .unwrap_or_default();
        Ok(list
            .iter()
            .filter_map(|s| {
                Some(FcdSnapshot {
                    id: s.pointer("/id/id")?.as_str()?.to_owned(),
                    description: str_field(s, "description").unwrap_or_default(),
                })
            })
            .collect())
    }

    /// `RetrieveSnapshotDetails`: the snapshot's changeId
    /// (`changedBlockTrackingId`; `None` when CBT is not on).
    pub async fn fcd_snapshot_change_id(
        &self,
        id: &str,
        datastore: &str,
        snapshot: &str,
    ) -> Result<Option<String>> {
        let body = json!({"id": id_json(id), "datastore": MoRef::datastore(datastore).to_json(),
                          "snapshotId": id_json(snapshot)});
        let v = self
            .invoke(&self.vstorage()?, "RetrieveSnapshotDetails", body)
            .await?;
        Ok(v.as_ref()
            .and_then(|v| str_field(v, "changedBlockTrackingId"))
            .filter(|c| !c.is_empty()))
    }

    /// `DeleteSnapshot_Task`.
    pub async fn delete_fcd_snapshot(
        &self,
        id: &str,
        datastore: &str,
        snapshot: &str,
    ) -> Result<()> {
        let body = json!({"id": id_json(id), "datastore": MoRef::datastore(datastore).to_json(),
                          "snapshotId": id_json(snapshot)});
        self.run_task(&self.vstorage()?, "DeleteSnapshot_Task", body)
            .await?;
        Ok(())
    }

    /// One page of `VstorageObjectVCenterQueryChangedDiskAreas`.
    pub async fn query_fcd_changed_disk_areas(
        &self,
        id: &str,
        datastore: &str,
        snapshot: &str,
        start_offset: u64,
        change_id: &str,
    ) -> Result<DiskChangeInfo> {
        let body = json!({"id": id_json(id), "datastore": MoRef::datastore(datastore).to_json(),
                          "snapshotId": id_json(snapshot), "startOffset": start_offset,
                          "changeId": change_id});
        let v = self
            .invoke(
                &self.vstorage()?,
                "VstorageObjectVCenterQueryChangedDiskAreas",
                body,
            )
            .await?;
        change_info("VstorageObjectVCenterQueryChangedDiskAreas", v)
    }
}

fn change_info(what: &str, v: Option<Value>) -> Result<DiskChangeInfo> {
    let v = v.ok_or_else(|| Error::protocol(what, "empty answer"))?;
    serde_json::from_value(v).map_err(|e| Error::protocol(what, e.to_string()))
}
