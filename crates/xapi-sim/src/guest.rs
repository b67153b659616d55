//! Making and running guests: `VM.create`, `VM.start`, `VM.hard_shutdown`
//! and `VM.clean_shutdown`, `VIF.create` and `VIF.destroy`,
//! `network.create` and `network.destroy`. Fields follow
//! xapi's datamodel (`datamodel_vm.ml`, `datamodel_vif.ml`); fields a
//! record leaves out take the datamodel's defaults (the simulator's
//! [`VmConfig`] defaults for the settings xapi requires).

use cbtvault_xenapi::{NULL_REF, Value, XapiError};

use crate::model::{VifRec, VmConfig, VmRec, new_ref, new_uuid};
use crate::sim::Sim;
use crate::vdi::handle_invalid;
use crate::vm::{bad_power_state, field_type, random_mac, string_map, vm};

/// `MEMORY_CONSTRAINT_VIOLATION [constraint]`: xapi's check that
/// `static_min ≤ dynamic_min ≤ dynamic_max ≤ static_max`.
fn check_memory(c: &VmConfig) -> Result<(), XapiError> {
    let ok = 0 < c.memory_static_min
        && c.memory_static_min <= c.memory_dynamic_min
        && c.memory_dynamic_min <= c.memory_dynamic_max
        && c.memory_dynamic_max <= c.memory_static_max;
    if ok {
        return Ok(());
    }
    Err(XapiError::Other {
        code: "MEMORY_CONSTRAINT_VIOLATION".into(),
        params: vec![
            "Memory limits must satisfy: static_min <= dynamic_min <= dynamic_max <= static_max"
                .into(),
        ],
    })
}

fn check_vcpus(c: &VmConfig) -> Result<(), XapiError> {
    let invalid = |field: &str, v: i64| XapiError::Other {
        code: "INVALID_VALUE".into(),
        params: vec![field.into(), v.to_string()],
    };
    if c.vcpus_max < 1 {
        return Err(invalid("VCPUs_max", c.vcpus_max));
    }
    if c.vcpus_at_startup < 1 || c.vcpus_at_startup > c.vcpus_max {
        return Err(invalid("VCPUs_at_startup", c.vcpus_at_startup));
    }
    Ok(())
}

/// `MAC_INVALID [mac]` unless `mac` is six colon-separated hex octets.
fn check_mac(mac: &str) -> Result<(), XapiError> {
    let octets: Vec<&str> = mac.split(':').collect();
    let ok = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(XapiError::Other {
            code: "MAC_INVALID".into(),
            params: vec![mac.into()],
        })
    }
}

impl Sim {
    /// `VM.create(record)`: a halted VM. The memory and VCPU fields are
    /// required (`FIELD_TYPE_ERROR` naming the field when missing or not
    /// an int), and checked as xapi does.
    pub(crate) fn vm_create(&self, args: &Value) -> Result<Value, XapiError> {
        let rec = args.as_struct().ok_or_else(|| field_type("args"))?;
        let text = |k: &str, default: &str| {
            rec.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| default.to_owned())
        };
        let int = |k: &str| -> Result<i64, XapiError> {
            rec.get(k)
                .and_then(Value::as_i64)
                .ok_or_else(|| field_type(k))
        };
        let flag = |k: &str, default: bool| rec.get(k).and_then(Value::as_bool).unwrap_or(default);
        let d = VmConfig::default();
        let config = VmConfig {
            user_version: rec.get("user_version").and_then(Value::as_i64).unwrap_or(1),
            vcpus_max: int("VCPUs_max")?,
            vcpus_at_startup: int("VCPUs_at_startup")?,
            vcpus_params: string_map(rec.get("VCPUs_params")),
            memory_static_max: int("memory_static_max")?,
            memory_dynamic_max: int("memory_dynamic_max")?,
            memory_dynamic_min: int("memory_dynamic_min")?,
            memory_static_min: int("memory_static_min")?,
            actions_after_shutdown: text("actions_after_shutdown", &d.actions_after_shutdown),
            actions_after_reboot: text("actions_after_reboot", &d.actions_after_reboot),
            actions_after_crash: text("actions_after_crash", &d.actions_after_crash),
            pv_bootloader: text("PV_bootloader", ""),
            pv_kernel: text("PV_kernel", ""),
            pv_ramdisk: text("PV_ramdisk", ""),
            pv_args: text("PV_args", ""),
            pv_bootloader_args: text("PV_bootloader_args", ""),
            pv_legacy_args: text("PV_legacy_args", ""),
            hvm_boot_policy: text("HVM_boot_policy", ""),
            hvm_boot_params: string_map(rec.get("HVM_boot_params")),
            hvm_shadow_multiplier: rec
                .get("HVM_shadow_multiplier")
                .and_then(Value::as_f64)
                .unwrap_or(1.0),
            platform: string_map(rec.get("platform")),
            pci_bus: text("PCI_bus", ""),
            recommendations: text("recommendations", ""),
            xenstore_data: string_map(rec.get("xenstore_data")),
            ha_always_run: flag("ha_always_run", false),
            ha_restart_priority: text("ha_restart_priority", ""),
            is_a_template: flag("is_a_template", false),
            hardware_platform_version: rec
                .get("hardware_platform_version")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            has_vendor_device: flag("has_vendor_device", false),
            domain_type: text("domain_type", "unspecified"),
        };
        check_memory(&config)?;
        check_vcpus(&config)?;
        let tags = rec
            .get("tags")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let record = VmRec {
            uuid: new_uuid(),
            name_label: text("name_label", ""),
            name_description: text("name_description", ""),
            power_state: "Halted".into(),
            is_control_domain: false,
            is_a_snapshot: false,
            snapshot_of: NULL_REF.into(),
            snapshot_time: crate::model::EPOCH.into(),
            other_config: string_map(rec.get("other_config")),
            blocked_operations: string_map(rec.get("blocked_operations")),
            tags,
            config,
        };
        self.mutate(|db, _| {
            let r = new_ref();
            db.vms.insert(r.clone(), record);
            Ok(Value::String(r))
        })
    }

    /// `VM.start(vm, start_paused, force)`: a halted VM runs; its disks
    /// and network interfaces are plugged.
    pub(crate) fn vm_start(&self, r: &str) -> Result<Value, XapiError> {
        self.mutate(|db, _| {
            let v = vm(db, r)?;
            if v.is_a_snapshot || v.config.is_a_template || v.is_control_domain {
                return Err(XapiError::OperationNotAllowed {
                    reason: format!("VM {r} is a snapshot, a template or the control domain"),
                });
            }
            if v.power_state != "Halted" {
                return Err(bad_power_state(r, "halted", &v.power_state));
            }
            for b in db.vbds.values_mut().filter(|b| b.vm == r && !b.empty) {
                b.currently_attached = true;
            }
            for f in db.vifs.values_mut().filter(|f| f.vm == r) {
                f.currently_attached = true;
            }
            if let Some(v) = db.vms.get_mut(r) {
                v.power_state = "Running".into();
            }
            Ok(Value::from(""))
        })
    }

    /// `VM.hard_shutdown` / `VM.clean_shutdown`: a running VM halts; its
    /// devices are unplugged.
    pub(crate) fn vm_shutdown(&self, r: &str) -> Result<Value, XapiError> {
        self.mutate(|db, _| {
            let v = vm(db, r)?;
            if v.power_state != "Running" {
                return Err(bad_power_state(r, "running", &v.power_state));
            }
            for b in db.vbds.values_mut().filter(|b| b.vm == r && !b.nbd) {
                b.currently_attached = false;
            }
            for f in db.vifs.values_mut().filter(|f| f.vm == r) {
                f.currently_attached = false;
            }
            if let Some(v) = db.vms.get_mut(r) {
                v.power_state = "Halted".into();
            }
            Ok(Value::from(""))
        })
    }

    /// `VIF.create(record)`: `device` must be free in the VM
    /// (`DEVICE_ALREADY_EXISTS`), `MAC` well formed (`MAC_INVALID`) or
    /// empty (the pool makes one). Made unplugged.
    pub(crate) fn vif_create(&self, args: &Value) -> Result<Value, XapiError> {
        let rec = args.as_struct().ok_or_else(|| field_type("args"))?;
        let text = |k: &str| {
            rec.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let (vm_ref, network, device, mac) =
            (text("VM"), text("network"), text("device"), text("MAC"));
        let autogenerated = mac.is_empty();
        let mac = if autogenerated {
            random_mac()
        } else {
            check_mac(&mac)?;
            mac.to_ascii_lowercase()
        };
        let locking_mode = match text("locking_mode").as_str() {
            "" => "network_default".to_owned(),
            m @ ("network_default" | "locked" | "unlocked" | "disabled") => m.to_owned(),
            _ => return Err(field_type("locking_mode")),
        };
        self.mutate(|db, _| {
            vm(db, &vm_ref)?;
            if !db.networks.contains_key(&network) {
                return Err(handle_invalid("network", &network));
            }
            if device.is_empty() || !device.chars().all(|c| c.is_ascii_digit()) {
                return Err(XapiError::Other {
                    code: "INVALID_DEVICE".into(),
                    params: vec![device.clone()],
                });
            }
            if db
                .vifs
                .values()
                .any(|f| f.vm == vm_ref && f.device == device)
            {
                return Err(XapiError::Other {
                    code: "DEVICE_ALREADY_EXISTS".into(),
                    params: vec![device.clone()],
                });
            }
            let r = new_ref();
            db.vifs.insert(
                r.clone(),
                VifRec {
                    uuid: new_uuid(),
                    vm: vm_ref.clone(),
                    network: network.clone(),
                    device: device.clone(),
                    mac: mac.clone(),
                    mac_autogenerated: autogenerated,
                    mtu: rec.get("MTU").and_then(Value::as_i64).unwrap_or(1500),
                    currently_attached: false,
                    locking_mode: locking_mode.clone(),
                    qos_algorithm_type: text("qos_algorithm_type"),
                    qos_algorithm_params: string_map(rec.get("qos_algorithm_params")),
                    other_config: string_map(rec.get("other_config")),
                },
            );
            Ok(Value::String(r))
        })
    }

    /// `network.create(record)`: a network with a bridge of its own
    /// (`xapi<N>`, as xapi names private networks).
    pub(crate) fn network_create(&self, args: &Value) -> Result<Value, XapiError> {
        let rec = args.as_struct().ok_or_else(|| field_type("args"))?;
        let name = rec
            .get("name_label")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        self.mutate(|db, _| {
            let n = (0..)
                .find(|n| !db.networks.values().any(|x| x.bridge == format!("xapi{n}")))
                .unwrap_or(0);
            let r = new_ref();
            db.networks.insert(
                r.clone(),
                crate::model::NetworkRec {
                    uuid: new_uuid(),
                    name_label: name.clone(),
                    bridge: format!("xapi{n}"),
                },
            );
            Ok(Value::String(r))
        })
    }

    /// `network.destroy`: refused while VIFs use it
    /// (`NETWORK_CONTAINS_VIF [vifs]`).
    pub(crate) fn network_destroy(&self, r: &str) -> Result<Value, XapiError> {
        self.mutate(|db, _| {
            if !db.networks.contains_key(r) {
                return Err(handle_invalid("network", r));
            }
            let vifs = db.vifs_where(|v| v.network == r);
            if !vifs.is_empty() {
                return Err(XapiError::Other {
                    code: "NETWORK_CONTAINS_VIF".into(),
                    params: vifs,
                });
            }
            db.networks.remove(r);
            Ok(Value::from(""))
        })
    }

    /// `VIF.destroy`: refused while plugged.
    pub(crate) fn vif_destroy(&self, r: &str) -> Result<Value, XapiError> {
        self.mutate(|db, _| {
            let f = db.vifs.get(r).ok_or_else(|| handle_invalid("VIF", r))?;
            if f.currently_attached {
                return Err(XapiError::OperationNotAllowed {
                    reason: format!("VIF {r} is currently attached"),
                });
            }
            db.vifs.remove(r);
            Ok(Value::from(""))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_checked() {
        assert!(check_mac("aa:bb:cc:dd:ee:0f").is_ok());
        assert!(check_mac(&random_mac()).is_ok());
        for bad in ["", "aa:bb:cc:dd:ee", "aa:bb:cc:dd:ee:gg", "aabbccddeeff"] {
            assert_eq!(check_mac(bad).unwrap_err().code(), "MAC_INVALID");
        }
    }

    #[test]
    fn memory_order_is_checked() {
        let mut c = VmConfig::default();
        assert!(check_memory(&c).is_ok());
        c.memory_dynamic_min = c.memory_static_max + 1;
        assert_eq!(
            check_memory(&c).unwrap_err().code(),
            "MEMORY_CONSTRAINT_VIOLATION"
        );
    }
}
