//! `VM.*` and `VBD.*` operations: VM snapshots (every disk at once, with
//! a halted snapshot VM whose VBDs lead to the VDI snapshots), destroying
//! VMs and snapshot VMs (VBDs go, VDIs stay), and plugging disks.

use std::collections::BTreeMap;

use cbtvault_xenapi::{Value, XapiError};

use crate::model::{Db, VbdRec, VmRec, new_ref, new_uuid, now_datetime};
use crate::sim::Sim;
use crate::vdi::{handle_invalid, is_null, refuse_cbt_metadata, snapshot_in, vdi};

fn vm<'a>(db: &'a Db, r: &str) -> Result<&'a VmRec, XapiError> {
    db.vms.get(r).ok_or_else(|| handle_invalid("VM", r))
}

fn bad_power_state(vm: &str, expected: &str, actual: &str) -> XapiError {
    XapiError::VmBadPowerState {
        vm: vm.into(),
        expected: expected.into(),
        actual: actual.to_lowercase(),
    }
}

impl Sim {
    /// `VM.snapshot(vm, new_name, ignore_vdis)`: the VDIs in `ignore` are
    /// left out (no snapshot, no VBD in the snapshot VM).
    pub(crate) fn vm_snapshot(
        &self,
        r: &str,
        new_name: &str,
        ignore: &[String],
    ) -> Result<Value, XapiError> {
        self.mutate(|db, store| {
            let source = vm(db, r)?.clone();
            if source.is_control_domain || source.is_a_snapshot {
                return Err(XapiError::OperationNotAllowed {
                    reason: format!("VM {r} cannot be snapshotted"),
                });
            }
            let snap_vm = new_ref();
            let mut vbds = Vec::new();
            for vbd_ref in db.vbds_of_vm(r) {
                let vbd = db.vbds[&vbd_ref].clone();
                if vbd.vbd_type != "Disk" || is_null(&vbd.vdi) || ignore.contains(&vbd.vdi) {
                    continue;
                }
                let snap_vdi = snapshot_in(db, store, &vbd.vdi)?;
                vbds.push(VbdRec {
                    uuid: new_uuid(),
                    vm: snap_vm.clone(),
                    vdi: snap_vdi,
                    currently_attached: false,
                    nbd: false,
                    ..vbd
                });
            }
            for vbd in vbds {
                db.vbds.insert(new_ref(), vbd);
            }
            db.vms.insert(
                snap_vm.clone(),
                VmRec {
                    uuid: new_uuid(),
                    name_label: new_name.into(),
                    power_state: "Halted".into(),
                    is_a_snapshot: true,
                    snapshot_of: r.into(),
                    snapshot_time: now_datetime(),
                    blocked_operations: BTreeMap::new(),
                    ..source
                },
            );
            Ok(Value::String(snap_vm))
        })
    }

    /// `VM.checkpoint(vm, new_name)`: a snapshot of a running VM with its
    /// memory; the simulator has no memory image, so it is a snapshot whose
    /// VM is `Suspended`.
    pub(crate) fn vm_checkpoint(&self, r: &str, new_name: &str) -> Result<Value, XapiError> {
        {
            let db = self.db();
            let v = vm(&db, r)?;
            if v.power_state != "Running" {
                return Err(bad_power_state(r, "running", &v.power_state));
            }
        }
        let snap = self.vm_snapshot(r, new_name, &[])?;
        self.mutate(|db, _| {
            let s = snap.as_str().unwrap_or_default();
            if let Some(v) = db.vms.get_mut(s) {
                v.power_state = "Suspended".into();
            }
            Ok(snap.clone())
        })
    }

    /// `VM.destroy`: halted VMs and snapshots only; their VBDs go, their
    /// VDIs stay.
    pub(crate) fn vm_destroy(&self, r: &str) -> Result<Value, XapiError> {
        self.mutate(|db, _| {
            let v = vm(db, r)?;
            if v.is_control_domain {
                return Err(XapiError::OperationNotAllowed {
                    reason: "the control domain cannot be destroyed".into(),
                });
            }
            if !v.is_a_snapshot && v.power_state != "Halted" {
                return Err(bad_power_state(r, "halted", &v.power_state));
            }
            db.vbds.retain(|_, b| b.vm != r);
            db.vms.remove(r);
            Ok(Value::from(""))
        })
    }

    /// `VBD.create(record)`: refuses `cbt_metadata` VDIs.
    pub(crate) fn vbd_create(&self, args: &Value) -> Result<Value, XapiError> {
        let rec = args.as_struct().ok_or_else(|| XapiError::Other {
            code: "FIELD_TYPE_ERROR".into(),
            params: vec!["args".into()],
        })?;
        let text = |k: &str| {
            rec.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let (vm_ref, vdi_ref) = (text("VM"), text("VDI"));
        self.mutate(|db, _| {
            vm(db, &vm_ref)?;
            let v = vdi(db, &vdi_ref)?;
            refuse_cbt_metadata(v, &vdi_ref)?;
            let r = new_ref();
            let mode = text("mode");
            db.vbds.insert(
                r.clone(),
                VbdRec {
                    uuid: new_uuid(),
                    vm: vm_ref.clone(),
                    vdi: vdi_ref.clone(),
                    device: String::new(),
                    userdevice: text("userdevice"),
                    mode: if mode.is_empty() { "RW".into() } else { mode },
                    vbd_type: "Disk".into(),
                    bootable: rec
                        .get("bootable")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    currently_attached: false,
                    other_config: BTreeMap::new(),
                    nbd: false,
                },
            );
            Ok(Value::String(r))
        })
    }

    /// `VBD.plug` / `VBD.unplug`.
    pub(crate) fn vbd_set_plugged(&self, r: &str, plugged: bool) -> Result<Value, XapiError> {
        self.mutate(|db, _| {
            let b = db
                .vbds
                .get(r)
                .ok_or_else(|| handle_invalid("VBD", r))?
                .clone();
            let v = vm(db, &b.vm)?;
            if plugged && v.power_state != "Running" {
                return Err(bad_power_state(&b.vm, "running", &v.power_state));
            }
            if plugged && b.currently_attached {
                return Err(XapiError::Other {
                    code: "DEVICE_ALREADY_ATTACHED".into(),
                    params: vec![r.into()],
                });
            }
            if !plugged && !b.currently_attached {
                return Err(XapiError::Other {
                    code: "DEVICE_ALREADY_DETACHED".into(),
                    params: vec![r.into()],
                });
            }
            if let Some(b) = db.vbds.get_mut(r) {
                b.currently_attached = plugged;
            }
            Ok(Value::from(""))
        })
    }

    /// `VBD.destroy`: refused while plugged.
    pub(crate) fn vbd_destroy(&self, r: &str) -> Result<Value, XapiError> {
        self.mutate(|db, _| {
            let b = db.vbds.get(r).ok_or_else(|| handle_invalid("VBD", r))?;
            if b.currently_attached {
                return Err(XapiError::OperationNotAllowed {
                    reason: format!("VBD {r} is currently attached"),
                });
            }
            db.vbds.remove(r);
            Ok(Value::from(""))
        })
    }

    /// Plugs VDI `vdi` into VM `vm`: reuses an unplugged VBD between them
    /// or creates one. Returns the VBD.
    pub(crate) fn plug_vdi(&self, vdi_ref: &str, vm_ref: &str) -> Result<String, XapiError> {
        self.mutate(|db, _| {
            let v = vdi(db, vdi_ref)?;
            refuse_cbt_metadata(v, vdi_ref)?;
            let m = vm(db, vm_ref)?;
            if m.power_state != "Running" {
                return Err(bad_power_state(vm_ref, "running", &m.power_state));
            }
            let existing = db
                .vbds
                .iter()
                .find(|(_, b)| b.vdi == vdi_ref && b.vm == vm_ref && !b.nbd)
                .map(|(r, _)| r.clone());
            let r = existing.unwrap_or_else(|| {
                let r = new_ref();
                let n = db.vbds_of_vm(vm_ref).len();
                db.vbds.insert(
                    r.clone(),
                    VbdRec {
                        uuid: new_uuid(),
                        vm: vm_ref.into(),
                        vdi: vdi_ref.into(),
                        device: format!("xvd{}", (b'a' + (n % 26) as u8) as char),
                        userdevice: n.to_string(),
                        mode: "RW".into(),
                        vbd_type: "Disk".into(),
                        bootable: false,
                        currently_attached: false,
                        other_config: BTreeMap::new(),
                        nbd: false,
                    },
                );
                r
            });
            if let Some(b) = db.vbds.get_mut(&r) {
                b.currently_attached = true;
            }
            Ok(r)
        })
    }

    /// Unplugs every guest VBD of `vdi` (NBD attachments are left alone).
    pub(crate) fn unplug_vdi(&self, vdi_ref: &str) -> Result<(), XapiError> {
        self.mutate(|db, _| {
            vdi(db, vdi_ref)?;
            for b in db.vbds.values_mut() {
                if b.vdi == vdi_ref && !b.nbd {
                    b.currently_attached = false;
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn power_state_is_lowercased_in_errors() {
        let e = super::bad_power_state("r", "halted", "Running");
        assert_eq!(e.params(), ["r", "halted", "running"]);
    }
}
