//! The simulated pool's database: the objects XAPI keeps (pool, host, SR,
//! VMs, VBDs, VDIs) and the CBT logs the storage manager keeps beside
//! them, with their XAPI record form. Persisted as JSON in the state
//! directory.

use std::collections::BTreeMap;

use cbtvault_xenapi::{NULL_REF, Value};
use serde::{Deserialize, Serialize};

use crate::cbt::CbtLogs;
pub use crate::vm_model::{VifRec, VmConfig};

/// A fresh random (version 4) UUID.
pub fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A fresh reference, `OpaqueRef:<uuid>` as XAPI makes them.
pub fn new_ref() -> String {
    format!("OpaqueRef:{}", new_uuid())
}

/// XAPI's datetime text for now (`20240131T12:00:00Z`).
pub fn now_datetime() -> String {
    jiff::Timestamp::now()
        .strftime("%Y%m%dT%H:%M:%SZ")
        .to_string()
}

/// The datetime XAPI shows for "never".
pub const EPOCH: &str = "19700101T00:00:00Z";

pub(crate) fn s(v: &str) -> Value {
    Value::from(v)
}

pub(crate) fn refs(v: impl IntoIterator<Item = String>) -> Value {
    Value::Array(v.into_iter().map(Value::String).collect())
}

pub(crate) fn map(m: &BTreeMap<String, String>) -> Value {
    Value::from(m)
}

fn int(v: u64) -> Value {
    Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
}

pub(crate) fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Struct(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

/// The pool.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PoolRec {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name_label: String,
    /// Free-form configuration.
    pub other_config: BTreeMap<String, String>,
    /// Whether the CBT feature is licensed (`LICENCE_RESTRICTION` if not).
    pub cbt_licensed: bool,
}

/// The single host (the pool master).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostRec {
    /// UUID.
    pub uuid: String,
    /// Name and host name.
    pub hostname: String,
    /// Management address.
    pub address: String,
}

/// A storage repository.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SrRec {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name_label: String,
    /// SM type (see [`crate::sr`]: `ext`, file-based VHD, CBT-capable).
    pub sr_type: String,
    /// Capacity in bytes.
    pub physical_size: u64,
    /// Free-form configuration.
    pub other_config: BTreeMap<String, String>,
}

/// A VM, a VM snapshot, or the control domain.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmRec {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name_label: String,
    /// Description.
    pub name_description: String,
    /// `Running`, `Halted`, …
    pub power_state: String,
    /// Is the control domain.
    pub is_control_domain: bool,
    /// Is a snapshot.
    pub is_a_snapshot: bool,
    /// Source VM of a snapshot.
    pub snapshot_of: String,
    /// When the snapshot was taken.
    pub snapshot_time: String,
    /// Free-form configuration.
    pub other_config: BTreeMap<String, String>,
    /// Blocked operations.
    pub blocked_operations: BTreeMap<String, String>,
    /// Tags.
    pub tags: Vec<String>,
    /// CPUs, memory, boot and platform settings (states saved before they
    /// were modelled get the defaults).
    #[serde(default)]
    pub config: VmConfig,
}

/// A VBD.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VbdRec {
    /// UUID.
    pub uuid: String,
    /// VM reference.
    pub vm: String,
    /// VDI reference.
    pub vdi: String,
    /// Device name.
    pub device: String,
    /// Position.
    pub userdevice: String,
    /// `RO` or `RW`.
    pub mode: String,
    /// `Disk`.
    pub vbd_type: String,
    /// Bootable.
    pub bootable: bool,
    /// Plugged.
    pub currently_attached: bool,
    /// Free-form configuration.
    pub other_config: BTreeMap<String, String>,
    /// Made by an NBD connection (dom0, read-only): gone when it closes
    /// and never persisted across restarts.
    #[serde(default)]
    pub nbd: bool,
    /// No medium (a CD drive without a disc; the VDI is null).
    #[serde(default)]
    pub empty: bool,
}

/// A VDI.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VdiRec {
    /// UUID (also the name of its data file and CBT log).
    pub uuid: String,
    /// Name.
    pub name_label: String,
    /// Description.
    pub name_description: String,
    /// SR reference.
    pub sr: String,
    /// Size presented to the guest.
    pub virtual_size: u64,
    /// `user`, `system`, `cbt_metadata`, …
    pub vdi_type: String,
    /// Sharable.
    pub sharable: bool,
    /// Read-only.
    pub read_only: bool,
    /// Is a snapshot.
    pub is_a_snapshot: bool,
    /// Source VDI of a snapshot (a reference, possibly dangling).
    pub snapshot_of: String,
    /// When the snapshot was taken.
    pub snapshot_time: String,
    /// Changed blocks are tracked.
    pub cbt_enabled: bool,
    /// `persist` or `reset`.
    pub on_boot: String,
    /// Free-form configuration.
    pub other_config: BTreeMap<String, String>,
    /// SM configuration.
    pub sm_config: BTreeMap<String, String>,
    /// Xenstore data.
    pub xenstore_data: BTreeMap<String, String>,
    /// Tags.
    pub tags: Vec<String>,
    /// The data file exists (false after `data_destroy`).
    pub has_data: bool,
    /// Allocated bytes of the data file, refreshed on writes.
    pub physical_utilisation: u64,
    /// Managed by its SR (`false`: xapi refuses operations with
    /// `VDI_NOT_MANAGED`).
    #[serde(default = "yes")]
    pub managed: bool,
}

fn yes() -> bool {
    true
}

impl VdiRec {
    /// A RAW VDI (sm_config `type=raw` on an LVM SR): no VHD, so no CBT.
    pub fn is_raw(&self) -> bool {
        self.sm_config.get("type").is_some_and(|t| t == "raw")
    }
}

/// Everything persisted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Db {
    /// Pool reference.
    pub pool_ref: String,
    /// The pool.
    pub pool: PoolRec,
    /// Host reference.
    pub host_ref: String,
    /// The host.
    pub host: HostRec,
    /// SRs by reference.
    pub srs: BTreeMap<String, SrRec>,
    /// VMs by reference.
    pub vms: BTreeMap<String, VmRec>,
    /// VBDs by reference.
    pub vbds: BTreeMap<String, VbdRec>,
    /// VDIs by reference.
    pub vdis: BTreeMap<String, VdiRec>,
    /// CBT logs by VDI UUID.
    pub cbt: CbtLogs,
    /// PBDs (one per SR, plugged on the host) by reference.
    #[serde(default)]
    pub pbds: BTreeMap<String, PbdRec>,
    /// Networks by reference.
    #[serde(default)]
    pub networks: BTreeMap<String, NetworkRec>,
    /// VIFs by reference.
    #[serde(default)]
    pub vifs: BTreeMap<String, VifRec>,
}

/// A PBD: an SR plugged on the host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PbdRec {
    /// UUID.
    pub uuid: String,
    /// SR reference.
    pub sr: String,
}

/// A network.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetworkRec {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name_label: String,
    /// Bridge.
    pub bridge: String,
}

impl Db {
    /// Gives every SR a PBD and the pool a network, as a pool always has
    /// (states saved before they were modelled have none).
    pub fn complete(&mut self) {
        for sr in self.srs.keys() {
            if !self.pbds.values().any(|p| &p.sr == sr) {
                self.pbds.insert(
                    new_ref(),
                    PbdRec {
                        uuid: new_uuid(),
                        sr: sr.clone(),
                    },
                );
            }
        }
        if self.networks.is_empty() {
            self.networks.insert(
                new_ref(),
                NetworkRec {
                    uuid: new_uuid(),
                    name_label: "Pool-wide network associated with eth0".into(),
                    bridge: "xenbr0".into(),
                },
            );
        }
    }

    /// The record of PBD `r`.
    pub fn pbd_value(&self, r: &str) -> Option<Value> {
        let p = self.pbds.get(r)?;
        Some(record(vec![
            ("uuid", s(&p.uuid)),
            ("host", s(&self.host_ref)),
            ("SR", s(&p.sr)),
            ("device_config", Value::Struct(BTreeMap::new())),
            ("currently_attached", Value::Bool(true)),
            ("other_config", Value::Struct(BTreeMap::new())),
        ]))
    }

    /// The record of network `r`; `nbd`: it carries the NBD purpose.
    pub fn network_value(&self, r: &str, nbd: bool) -> Option<Value> {
        let n = self.networks.get(r)?;
        let purpose = if nbd { vec!["nbd".to_owned()] } else { vec![] };
        Some(record(vec![
            ("uuid", s(&n.uuid)),
            ("name_label", s(&n.name_label)),
            ("name_description", s("")),
            ("bridge", s(&n.bridge)),
            ("MTU", Value::Int(1500)),
            ("VIFs", refs(self.vifs_where(|v| v.network == r))),
            ("PIFs", refs([])),
            ("managed", Value::Bool(true)),
            ("purpose", refs(purpose)),
            ("other_config", Value::Struct(BTreeMap::new())),
            ("tags", refs([])),
        ]))
    }

    /// Reference of the VDI with `uuid`.
    pub fn vdi_ref_by_uuid(&self, uuid: &str) -> Option<String> {
        self.vdis
            .iter()
            .find(|(_, v)| v.uuid == uuid)
            .map(|(r, _)| r.clone())
    }

    /// Reference of the control domain.
    pub fn dom0_ref(&self) -> Option<String> {
        self.vms
            .iter()
            .find(|(_, v)| v.is_control_domain)
            .map(|(r, _)| r.clone())
    }

    /// VBD references of a VDI.
    pub fn vbds_of_vdi(&self, vdi: &str) -> Vec<String> {
        self.vbds
            .iter()
            .filter(|(_, b)| b.vdi == vdi)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// VBD references of a VM.
    pub fn vbds_of_vm(&self, vm: &str) -> Vec<String> {
        self.vbds
            .iter()
            .filter(|(_, b)| b.vm == vm)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Whether `vdi` has a plugged VBD to a VM that is not a snapshot
    /// (the `VDI_IN_USE` condition; dom0 and so NBD connections count).
    pub fn vdi_attached(&self, vdi: &str) -> bool {
        self.vbds.values().any(|b| {
            b.vdi == vdi
                && b.currently_attached
                && self.vms.get(&b.vm).is_none_or(|vm| !vm.is_a_snapshot)
        })
    }

    /// Whether `vdi` has a plugged read-write VBD to a VM that is not a
    /// snapshot (what blocks `copy`).
    pub fn vdi_attached_rw(&self, vdi: &str) -> bool {
        self.vbds.values().any(|b| {
            b.vdi == vdi
                && b.currently_attached
                && b.mode == "RW"
                && self.vms.get(&b.vm).is_none_or(|vm| !vm.is_a_snapshot)
        })
    }

    /// `allowed_operations` of VDI `r`, as xapi's
    /// `update_allowed_operations` computes it (`xapi_vdi.ml`): the
    /// operations `check_operation_error` lets through, except the CBT ones
    /// (`enable_cbt`, `disable_cbt`, `data_destroy`, `list_changed_blocks`),
    /// which xapi never lists (CA-260245). Only `snapshot`, `clone` and
    /// `resize_online` may run while a VBD is attached; `copy` only while
    /// no read-write one is.
    fn vdi_allowed_operations(&self, r: &str, v: &VdiRec) -> Vec<&'static str> {
        if v.vdi_type == "cbt_metadata" {
            // `allowed_for_cbt_metadata_vdi`, CBT operations removed.
            return if self.vdi_attached(r) {
                vec![]
            } else {
                vec!["destroy", "forget"]
            };
        }
        let mut ops = vec!["snapshot", "clone", "resize_online"];
        if !self.vdi_attached_rw(r) {
            ops.push("copy");
        }
        if !self.vdi_attached(r) {
            ops.extend(["resize", "destroy", "forget"]);
        }
        ops
    }

    /// The record of VDI `r` as `VDI.get_record` returns it.
    pub fn vdi_value(&self, r: &str) -> Option<Value> {
        let v = self.vdis.get(r)?;
        let snapshots = self
            .vdis
            .iter()
            .filter(|(_, o)| o.snapshot_of == r)
            .map(|(sr, _)| sr.clone());
        let ops = self.vdi_allowed_operations(r, v);
        Some(record(vec![
            ("uuid", s(&v.uuid)),
            ("name_label", s(&v.name_label)),
            ("name_description", s(&v.name_description)),
            (
                "allowed_operations",
                refs(ops.into_iter().map(str::to_owned)),
            ),
            ("current_operations", Value::Struct(BTreeMap::new())),
            ("SR", s(&v.sr)),
            ("VBDs", refs(self.vbds_of_vdi(r))),
            ("crash_dumps", refs([])),
            ("virtual_size", int(v.virtual_size)),
            ("physical_utilisation", int(v.physical_utilisation)),
            ("type", s(&v.vdi_type)),
            ("sharable", Value::Bool(v.sharable)),
            ("read_only", Value::Bool(v.read_only)),
            ("other_config", map(&v.other_config)),
            ("storage_lock", Value::Bool(false)),
            ("location", s(&v.uuid)),
            ("managed", Value::Bool(v.managed)),
            ("missing", Value::Bool(false)),
            ("parent", s(NULL_REF)),
            ("xenstore_data", map(&v.xenstore_data)),
            ("sm_config", map(&v.sm_config)),
            ("is_a_snapshot", Value::Bool(v.is_a_snapshot)),
            ("snapshot_of", s(&v.snapshot_of)),
            ("snapshots", refs(snapshots)),
            ("snapshot_time", Value::DateTime(v.snapshot_time.clone())),
            ("tags", refs(v.tags.iter().cloned())),
            ("allow_caching", Value::Bool(false)),
            ("on_boot", s(&v.on_boot)),
            ("metadata_of_pool", s(NULL_REF)),
            ("metadata_latest", Value::Bool(false)),
            ("is_tools_iso", Value::Bool(false)),
            ("cbt_enabled", Value::Bool(v.cbt_enabled)),
        ]))
    }

    /// The record of VM `r`.
    pub fn vm_value(&self, r: &str) -> Option<Value> {
        let v = self.vms.get(r)?;
        let snapshots = self
            .vms
            .iter()
            .filter(|(_, o)| o.snapshot_of == r)
            .map(|(sr, _)| sr.clone());
        let running = v.power_state == "Running";
        let ops: Vec<String> = if v.is_a_snapshot || !running {
            vec!["destroy".into(), "clone".into(), "copy".into()]
        } else {
            vec![
                "snapshot".into(),
                "checkpoint".into(),
                "clean_shutdown".into(),
            ]
        };
        let c = &v.config;
        Some(record(vec![
            ("uuid", s(&v.uuid)),
            ("name_label", s(&v.name_label)),
            ("name_description", s(&v.name_description)),
            ("allowed_operations", refs(ops)),
            ("current_operations", Value::Struct(BTreeMap::new())),
            ("power_state", s(&v.power_state)),
            ("user_version", Value::Int(c.user_version)),
            ("is_a_template", Value::Bool(c.is_a_template)),
            ("is_default_template", Value::Bool(false)),
            ("suspend_VDI", s(NULL_REF)),
            (
                "resident_on",
                s(if running { &self.host_ref } else { NULL_REF }),
            ),
            ("affinity", s(NULL_REF)),
            ("is_control_domain", Value::Bool(v.is_control_domain)),
            ("domid", Value::Int(if running { 1 } else { -1 })),
            ("is_a_snapshot", Value::Bool(v.is_a_snapshot)),
            ("snapshot_of", s(&v.snapshot_of)),
            ("snapshots", refs(snapshots)),
            ("snapshot_time", Value::DateTime(v.snapshot_time.clone())),
            ("VBDs", refs(self.vbds_of_vm(r))),
            ("VIFs", refs(self.vifs_where(|f| f.vm == r))),
            ("other_config", map(&v.other_config)),
            ("blocked_operations", map(&v.blocked_operations)),
            ("tags", refs(v.tags.iter().cloned())),
            ("memory_overhead", Value::Int(0)),
            ("memory_target", Value::Int(0)),
            ("memory_static_max", Value::Int(c.memory_static_max)),
            ("memory_dynamic_max", Value::Int(c.memory_dynamic_max)),
            ("memory_dynamic_min", Value::Int(c.memory_dynamic_min)),
            ("memory_static_min", Value::Int(c.memory_static_min)),
            ("VCPUs_params", map(&c.vcpus_params)),
            ("VCPUs_max", Value::Int(c.vcpus_max)),
            ("VCPUs_at_startup", Value::Int(c.vcpus_at_startup)),
            ("actions_after_shutdown", s(&c.actions_after_shutdown)),
            ("actions_after_reboot", s(&c.actions_after_reboot)),
            ("actions_after_crash", s(&c.actions_after_crash)),
            ("consoles", refs([])),
            ("crash_dumps", refs([])),
            ("VTPMs", refs([])),
            ("PV_bootloader", s(&c.pv_bootloader)),
            ("PV_kernel", s(&c.pv_kernel)),
            ("PV_ramdisk", s(&c.pv_ramdisk)),
            ("PV_args", s(&c.pv_args)),
            ("PV_bootloader_args", s(&c.pv_bootloader_args)),
            ("PV_legacy_args", s(&c.pv_legacy_args)),
            ("HVM_boot_policy", s(&c.hvm_boot_policy)),
            ("HVM_boot_params", map(&c.hvm_boot_params)),
            (
                "HVM_shadow_multiplier",
                Value::Double(c.hvm_shadow_multiplier),
            ),
            ("platform", map(&c.platform)),
            ("PCI_bus", s(&c.pci_bus)),
            ("recommendations", s(&c.recommendations)),
            ("xenstore_data", map(&c.xenstore_data)),
            ("ha_always_run", Value::Bool(c.ha_always_run)),
            ("ha_restart_priority", s(&c.ha_restart_priority)),
            ("last_boot_CPU_flags", Value::Struct(BTreeMap::new())),
            ("last_booted_record", s("")),
            ("metrics", s(NULL_REF)),
            ("guest_metrics", s(NULL_REF)),
            (
                "hardware_platform_version",
                Value::Int(c.hardware_platform_version),
            ),
            ("has_vendor_device", Value::Bool(c.has_vendor_device)),
            ("domain_type", s(&c.domain_type)),
        ]))
    }

    /// The record of VBD `r`.
    pub fn vbd_value(&self, r: &str) -> Option<Value> {
        let b = self.vbds.get(r)?;
        Some(record(vec![
            ("uuid", s(&b.uuid)),
            ("allowed_operations", refs([])),
            ("current_operations", Value::Struct(BTreeMap::new())),
            ("VM", s(&b.vm)),
            ("VDI", s(&b.vdi)),
            ("device", s(&b.device)),
            ("userdevice", s(&b.userdevice)),
            ("bootable", Value::Bool(b.bootable)),
            ("mode", s(&b.mode)),
            ("type", s(&b.vbd_type)),
            ("unpluggable", Value::Bool(true)),
            ("storage_lock", Value::Bool(false)),
            ("empty", Value::Bool(b.empty)),
            ("other_config", map(&b.other_config)),
            ("currently_attached", Value::Bool(b.currently_attached)),
            ("status_code", Value::Int(0)),
            ("status_detail", s("")),
            ("runtime_properties", Value::Struct(BTreeMap::new())),
        ]))
    }

    /// The record of SR `r`.
    pub fn sr_value(&self, r: &str) -> Option<Value> {
        let sr = self.srs.get(r)?;
        let vdis: Vec<String> = self
            .vdis
            .iter()
            .filter(|(_, v)| v.sr == r)
            .map(|(vr, _)| vr.clone())
            .collect();
        let (used, allocated) = self
            .vdis
            .values()
            .filter(|v| v.sr == r)
            .fold((0u64, 0u64), |(u, a), v| {
                (u + v.physical_utilisation, a + v.virtual_size)
            });
        Some(record(vec![
            ("uuid", s(&sr.uuid)),
            ("name_label", s(&sr.name_label)),
            ("name_description", s("")),
            ("allowed_operations", refs([])),
            ("current_operations", Value::Struct(BTreeMap::new())),
            ("VDIs", refs(vdis)),
            (
                "PBDs",
                refs(
                    self.pbds
                        .iter()
                        .filter(|(_, p)| p.sr == r)
                        .map(|(pr, _)| pr.clone()),
                ),
            ),
            ("virtual_allocation", int(allocated)),
            ("physical_utilisation", int(used)),
            ("physical_size", int(sr.physical_size)),
            ("type", s(&sr.sr_type)),
            ("content_type", s("user")),
            ("shared", Value::Bool(false)),
            ("other_config", map(&sr.other_config)),
            ("tags", refs([])),
            ("sm_config", Value::Struct(BTreeMap::new())),
            ("is_tools_sr", Value::Bool(false)),
            ("clustered", Value::Bool(false)),
        ]))
    }

    /// The host record.
    pub fn host_value(&self, r: &str) -> Option<Value> {
        (r == self.host_ref).then(|| {
            record(vec![
                ("uuid", s(&self.host.uuid)),
                ("name_label", s(&self.host.hostname)),
                ("name_description", s("simulated XenServer host")),
                ("hostname", s(&self.host.hostname)),
                ("address", s(&self.host.address)),
                ("API_version_major", Value::Int(2)),
                ("API_version_minor", Value::Int(21)),
                ("API_version_vendor", s("XenSource")),
                ("enabled", Value::Bool(true)),
                (
                    "software_version",
                    Value::string_map([("product_brand", "xapi-sim"), ("xapi", "24.0")]),
                ),
                ("other_config", Value::Struct(BTreeMap::new())),
            ])
        })
    }

    /// The pool record.
    pub fn pool_value(&self, r: &str) -> Option<Value> {
        (r == self.pool_ref).then(|| {
            let default_sr = self.srs.keys().next().cloned().unwrap_or(NULL_REF.into());
            record(vec![
                ("uuid", s(&self.pool.uuid)),
                ("name_label", s(&self.pool.name_label)),
                ("name_description", s("")),
                ("master", s(&self.host_ref)),
                ("default_SR", s(&default_sr)),
                ("other_config", map(&self.pool.other_config)),
            ])
        })
    }
}
