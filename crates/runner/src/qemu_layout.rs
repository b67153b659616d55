//! A QEMU VM's drive layout, saved as the VM metadata of a QEMU run and
//! read back by a whole-VM restore into a directory.
//!
//! At backup time [`save_layout`] asks QMP what places each backed-up
//! node in the VM: `query-named-block-nodes` (driver, size, read-only,
//! image file), `query-block` (the guest drive the node is inserted in:
//! BlockBackend name, QOM path, removable; a qemu-storage-daemon has none),
//! `qom-get … type` of that guest device (`virtio-blk-pci`, `ide-hd`, …)
//! and `query-block-exports` (the exports that serve the node: how a
//! qemu-storage-daemon hands drives to a VM). The document is
//! `{"provider": "qemu", "host", "name", "uuid", "drives": […],
//! "missing": {…}}`; what QMP did not answer is named in `missing`, so a
//! layout is saved even when a query fails.

use std::collections::BTreeMap;
use std::sync::Arc;

use cbtvault_qmp::{Qmp, VmIdentity};
use cbtvault_repo::{Repository, VmMetadata};
use serde::{Deserialize, Serialize};
use tracing::warn;

/// The `provider` of a QEMU layout document.
pub(crate) const PROVIDER: &str = "qemu";

/// A QEMU VM's saved metadata.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct SavedQemuVm {
    pub provider: String,
    /// The configured QEMU host.
    pub host: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default)]
    pub drives: Vec<SavedDrive>,
    /// `what → why` for each query QMP did not answer.
    #[serde(default)]
    pub missing: BTreeMap<String, String>,
}

/// One backed-up node and its place in the VM.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct SavedDrive {
    /// The node name (what the restore point's `device` holds).
    pub node: String,
    /// Its driver: `qcow2`, `raw`, `file`, ….
    #[serde(default)]
    pub driver: String,
    /// Virtual size, bytes.
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub read_only: bool,
    /// The image file it was opened from.
    #[serde(default)]
    pub filename: String,
    /// The guest drive's BlockBackend name (`-drive id=`), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The guest device's QOM path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qdev: Option<String>,
    /// The guest device's id (`-device …,id=`), from its QOM path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The guest device's type (`virtio-blk-pci`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    #[serde(default)]
    pub removable: bool,
    /// The block exports serving the node (a qemu-storage-daemon's).
    #[serde(default)]
    pub exports: Vec<SavedExport>,
}

/// A block export of a node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct SavedExport {
    pub id: String,
    /// `nbd`, `vhost-user-blk`, `fuse`, ….
    #[serde(rename = "type")]
    pub kind: String,
}

/// `/machine/peripheral/ID/…` → `ID`.
pub(crate) fn device_id(qdev: &str) -> Option<String> {
    qdev.strip_prefix("/machine/peripheral/")
        .and_then(|rest| rest.split('/').next())
        .filter(|id| !id.is_empty())
        .map(str::to_string)
}

/// Asks QMP where each of `nodes` sits in the VM.
pub(crate) async fn collect(
    qmp: &Qmp,
    host: &str,
    vm: &VmIdentity,
    nodes: &[String],
) -> SavedQemuVm {
    let mut missing = BTreeMap::new();
    let named = qmp
        .query_named_block_nodes()
        .await
        .map_err(|e| missing.insert("query-named-block-nodes".into(), e.to_string()))
        .unwrap_or_default();
    let blocks = qmp
        .query_block()
        .await
        .map_err(|e| missing.insert("query-block".into(), e.to_string()))
        .unwrap_or_default();
    let exports = qmp
        .query_block_exports()
        .await
        .map_err(|e| missing.insert("query-block-exports".into(), e.to_string()))
        .unwrap_or_default();
    let mut drives = Vec::new();
    for node in nodes {
        let mut drive = SavedDrive {
            node: node.clone(),
            ..Default::default()
        };
        match named.iter().find(|n| &n.node_name == node) {
            Some(n) => {
                drive.driver = n.drv.clone();
                drive.size = n.image.virtual_size;
                drive.read_only = n.ro;
                drive.filename = n.image.filename.clone();
            }
            None => {
                missing.insert(
                    format!("node {node}"),
                    "not among QEMU's block nodes".into(),
                );
            }
        }
        if let Some(b) = blocks
            .iter()
            .find(|b| b.inserted.as_ref().is_some_and(|i| &i.node_name == node))
        {
            drive.device = Some(b.device.clone()).filter(|d| !d.is_empty());
            drive.qdev = b.qdev.clone().filter(|q| !q.is_empty());
            drive.removable = b.removable;
            drive.device_id = drive.qdev.as_deref().and_then(device_id);
            if let Some(id) = &drive.device_id {
                match qmp.qom_type(&format!("/machine/peripheral/{id}")).await {
                    Ok(t) => drive.device_type = Some(t),
                    Err(e) => {
                        missing.insert(format!("device type of {id}"), e.to_string());
                    }
                }
            }
        }
        drive.exports = exports
            .iter()
            .filter(|e| &e.node_name == node && !e.shutting_down)
            .map(|e| SavedExport {
                id: e.id.clone(),
                kind: e.kind.clone(),
            })
            .collect();
        drives.push(drive);
    }
    SavedQemuVm {
        provider: PROVIDER.into(),
        host: host.to_string(),
        name: vm.name.clone().unwrap_or_default(),
        uuid: vm.uuid.clone(),
        drives,
        missing,
    }
}

/// Collects the layout of `nodes` and saves it as the run's VM metadata;
/// its id, or `None` (with a warning) when it could not be saved: the
/// disks are backed up all the same.
pub(crate) async fn save_layout(
    qmp: &Qmp,
    repo: &Arc<Repository>,
    host: &str,
    vm: &VmIdentity,
    nodes: &[String],
) -> Option<String> {
    let layout = collect(qmp, host, vm, nodes).await;
    let key = vm
        .uuid
        .clone()
        .or_else(|| vm.name.clone())
        .unwrap_or_default();
    let json = match serde_json::to_value(&layout) {
        Ok(json) => json,
        Err(e) => {
            warn!(vm = %key, error = %e, "could not encode the VM's drive layout");
            return None;
        }
    };
    let metadata = VmMetadata {
        vm_uuid: key.clone(),
        time: jiff::Timestamp::now(),
        json,
    };
    let repo = repo.clone();
    match tokio::task::spawn_blocking(move || repo.save_vm_metadata(&metadata)).await {
        Ok(Ok(id)) => Some(id),
        Ok(Err(e)) => {
            warn!(vm = %key, error = %e, "could not save the VM's drive layout; its restore points go without it");
            None
        }
        Err(e) => {
            warn!(vm = %key, error = %e, "saving the VM's drive layout failed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_come_from_peripheral_paths() {
        assert_eq!(
            device_id("/machine/peripheral/virtio-disk0/virtio-backend").as_deref(),
            Some("virtio-disk0")
        );
        assert_eq!(
            device_id("/machine/peripheral/disk1").as_deref(),
            Some("disk1")
        );
        // Devices without an id live under peripheral-anon: no id to give.
        assert_eq!(device_id("/machine/peripheral-anon/device[0]"), None);
    }

    #[test]
    fn a_layout_without_device_fields_still_reads() {
        let v = serde_json::json!({"provider": "qemu", "host": "h", "drives": [{"node": "a"}]});
        let saved: SavedQemuVm = serde_json::from_value(v).unwrap();
        assert_eq!(saved.drives[0].node, "a");
        assert!(saved.drives[0].exports.is_empty());
    }
}
