//! `VM.*` and `VBD.*` operations: VM snapshots (every disk at once, with
//! a halted snapshot VM whose VBDs lead to the VDI snapshots), destroying
//! VMs and snapshot VMs (VBDs go, VDIs stay), and plugging disks.

use std::collections::BTreeMap;

use cbtvault_xenapi::{Value, XapiError};

use crate::model::{Db, VbdRec, VifRec, VmRec, new_ref, new_uuid, now_datetime};
use crate::sim::Sim;
use crate::vdi::{handle_invalid, is_null, refuse_cbt_metadata, snapshot_in, vdi};

pub(crate) fn vm<'a>(db: &'a Db, r: &str) -> Result<&'a VmRec, XapiError> {
    db.vms.get(r).ok_or_else(|| handle_invalid("VM", r))
}

pub(crate) fn field_type(field: &str) -> XapiError {
    XapiError::Other {
        code: "FIELD_TYPE_ERROR".into(),
        params: vec![field.into()],
    }
}

/// A `(string → string) map` field of a record (absent: empty).
pub(crate) fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_struct)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// A random locally administered unicast MAC, as xapi makes them.
pub(crate) fn random_mac() -> String {
    let mut b: [u8; 6] = rand::random();
    b[0] = (b[0] & 0xfc) | 0x02;
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub(crate) fn bad_power_state(vm: &str, expected: &str, actual: &str) -> XapiError {
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
            // The snapshot keeps the VM's network interfaces, unplugged.
            let vifs: Vec<VifRec> = db
                .vifs
                .values()
                .filter(|v| v.vm == r)
                .map(|v| VifRec {
                    uuid: new_uuid(),
                    vm: snap_vm.clone(),
                    currently_attached: false,
                    ..v.clone()
                })
                .collect();
            for vif in vifs {
                db.vifs.insert(new_ref(), vif);
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
            db.vifs.retain(|_, v| v.vm != r);
            db.vms.remove(r);
            Ok(Value::from(""))
        })
    }

    /// `VBD.create(record)`: refuses `cbt_metadata` VDIs and a position
    /// the VM already uses (`DEVICE_ALREADY_EXISTS`); an `empty` CD drive
    /// takes the null VDI. The VBD is made unplugged, as xapi does.
    pub(crate) fn vbd_create(&self, args: &Value) -> Result<Value, XapiError> {
        let rec = args.as_struct().ok_or_else(|| field_type("args"))?;
        let text = |k: &str| {
            rec.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let flag = |k: &str| rec.get(k).and_then(Value::as_bool).unwrap_or(false);
        let (vm_ref, vdi_ref) = (text("VM"), text("VDI"));
        let vbd_type = match text("type").to_ascii_lowercase().as_str() {
            "" | "disk" => "Disk",
            "cd" => "CD",
            "floppy" => "Floppy",
            _ => return Err(field_type("type")),
        };
        let mode = match text("mode").to_ascii_uppercase().as_str() {
            "" | "RW" => "RW",
            "RO" => "RO",
            _ => return Err(field_type("mode")),
        };
        let empty = flag("empty");
        let userdevice = text("userdevice");
        self.mutate(|db, _| {
            vm(db, &vm_ref)?;
            if empty {
                if vbd_type == "Disk" {
                    return Err(XapiError::Other {
                        code: "VBD_NOT_REMOVABLE_MEDIA".into(),
                        params: vec![String::new()],
                    });
                }
            } else {
                let v = vdi(db, &vdi_ref)?;
                refuse_cbt_metadata(v, &vdi_ref)?;
            }
            let taken = db.vbds.values().any(|b| {
                b.vm == vm_ref && !b.nbd && !userdevice.is_empty() && b.userdevice == userdevice
            });
            if taken {
                return Err(XapiError::Other {
                    code: "DEVICE_ALREADY_EXISTS".into(),
                    params: vec![userdevice.clone()],
                });
            }
            let r = new_ref();
            db.vbds.insert(
                r.clone(),
                VbdRec {
                    uuid: new_uuid(),
                    vm: vm_ref.clone(),
                    vdi: if empty {
                        cbtvault_xenapi::NULL_REF.into()
                    } else {
                        vdi_ref.clone()
                    },
                    device: String::new(),
                    userdevice: userdevice.clone(),
                    mode: mode.into(),
                    vbd_type: vbd_type.into(),
                    bootable: flag("bootable"),
                    currently_attached: false,
                    other_config: string_map(rec.get("other_config")),
                    nbd: false,
                    empty,
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
                        empty: false,
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
