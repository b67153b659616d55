//! Making guests: `VM.create` from a saved VM record, `VM.start`,
//! `VM.hard_shutdown`, `VBD.create`/`destroy`, `VIF.create`/`destroy`
//! and the `network` records a VIF is placed on.

use std::collections::BTreeMap;

use crate::client::Client;
use crate::error::Result;
use crate::types::{NetworkRef, VbdRef, VdiRef, VifRef, VmRef};
use crate::value::{Fields, Value, expect_string};

/// How a field of a `VM.create` record is typed.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Float,
    Bool,
    Map,
    Set,
}

/// The fields of a VM record that `VM.create` takes and that mean the
/// same in another pool (xapi's `datamodel_vm.ml`): not references to
/// objects of the old pool (`affinity`, `appliance`, `suspend_SR`, …),
/// not run-time state.
const CREATE_FIELDS: &[(&str, Kind)] = &[
    ("name_label", Kind::Str),
    ("name_description", Kind::Str),
    ("user_version", Kind::Int),
    ("is_a_template", Kind::Bool),
    ("memory_static_max", Kind::Int),
    ("memory_dynamic_max", Kind::Int),
    ("memory_dynamic_min", Kind::Int),
    ("memory_static_min", Kind::Int),
    ("VCPUs_params", Kind::Map),
    ("VCPUs_max", Kind::Int),
    ("VCPUs_at_startup", Kind::Int),
    ("actions_after_shutdown", Kind::Str),
    ("actions_after_reboot", Kind::Str),
    ("actions_after_crash", Kind::Str),
    ("PV_bootloader", Kind::Str),
    ("PV_kernel", Kind::Str),
    ("PV_ramdisk", Kind::Str),
    ("PV_args", Kind::Str),
    ("PV_bootloader_args", Kind::Str),
    ("PV_legacy_args", Kind::Str),
    ("HVM_boot_policy", Kind::Str),
    ("HVM_boot_params", Kind::Map),
    ("HVM_shadow_multiplier", Kind::Float),
    ("platform", Kind::Map),
    ("PCI_bus", Kind::Str),
    ("other_config", Kind::Map),
    ("recommendations", Kind::Str),
    ("xenstore_data", Kind::Map),
    ("ha_always_run", Kind::Bool),
    ("ha_restart_priority", Kind::Str),
    ("tags", Kind::Set),
    ("blocked_operations", Kind::Map),
    ("hardware_platform_version", Kind::Int),
    ("has_vendor_device", Kind::Bool),
    ("domain_type", Kind::Str),
    ("NVRAM", Kind::Map),
];

/// The fields `VM.create` needs whatever else is left out.
pub const VM_REQUIRED_FIELDS: &[&str] = &[
    "memory_static_max",
    "memory_dynamic_max",
    "memory_dynamic_min",
    "memory_static_min",
    "VCPUs_max",
    "VCPUs_at_startup",
];

/// Coerces `v` to `kind` (an XML-RPC int arrives as a digit string);
/// `None` if it is not of that kind.
fn coerce(v: &Value, kind: Kind) -> Option<Value> {
    Some(match kind {
        Kind::Str => Value::String(v.as_str()?.to_owned()),
        Kind::Int => Value::Int(v.as_i64()?),
        Kind::Float => Value::Double(v.as_f64()?),
        Kind::Bool => Value::Bool(v.as_bool()?),
        Kind::Map => Value::Struct(
            v.as_struct()?
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), Value::from(s))))
                .collect(),
        ),
        Kind::Set => Value::Array(
            v.as_array()?
                .iter()
                .filter_map(|s| s.as_str().map(Value::from))
                .collect(),
        ),
    })
}

/// A `VM.create` record.
#[derive(Clone, Debug, PartialEq)]
pub struct VmCreate {
    fields: BTreeMap<String, Value>,
}

impl VmCreate {
    /// The create-able fields of a VM record as `VM.get_record` gave it;
    /// fields missing or of the wrong type are left out (the pool's
    /// defaults apply). Returns the record and the names of the
    /// [`VM_REQUIRED_FIELDS`] it lacks.
    pub fn from_record(record: &Value) -> (VmCreate, Vec<&'static str>) {
        let empty = BTreeMap::new();
        let rec = record.as_struct().unwrap_or(&empty);
        let fields: BTreeMap<String, Value> = CREATE_FIELDS
            .iter()
            .filter_map(|(name, kind)| {
                let v = coerce(rec.get(*name)?, *kind)?;
                Some(((*name).to_owned(), v))
            })
            .collect();
        let missing = VM_REQUIRED_FIELDS
            .iter()
            .copied()
            .filter(|f| !fields.contains_key(*f))
            .collect();
        (VmCreate { fields }, missing)
    }

    /// Sets a field.
    pub fn set(&mut self, name: &str, value: impl Into<Value>) {
        self.fields.insert(name.to_owned(), value.into());
    }

    /// A field.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.get(name)
    }

    /// Adds `key` to the record's `other_config`.
    pub fn add_other_config(&mut self, key: &str, value: &str) {
        let entry = self
            .fields
            .entry("other_config".to_owned())
            .or_insert_with(|| Value::Struct(BTreeMap::new()));
        if let Value::Struct(m) = entry {
            m.insert(key.to_owned(), Value::from(value));
        }
    }

    /// Removes `key` from the record's `other_config`.
    pub fn remove_other_config(&mut self, key: &str) {
        if let Some(Value::Struct(m)) = self.fields.get_mut("other_config") {
            m.remove(key);
        }
    }

    /// The record XAPI expects.
    pub fn to_value(&self) -> Value {
        Value::Struct(self.fields.clone())
    }
}

/// A `VBD.create` record.
#[derive(Clone, Debug, PartialEq)]
pub struct VbdCreate {
    /// The VM.
    pub vm: VmRef,
    /// The VDI (null for an empty drive).
    pub vdi: VdiRef,
    /// Position (`0`, `1`, …).
    pub userdevice: String,
    /// Boot from it.
    pub bootable: bool,
    /// `RW` or `RO`.
    pub mode: String,
    /// `Disk`, `CD` or `Floppy`.
    pub vbd_type: String,
    /// No medium (a CD drive without a disc).
    pub empty: bool,
    /// Free-form configuration.
    pub other_config: BTreeMap<String, String>,
}

impl VbdCreate {
    /// The record XAPI expects.
    pub fn to_value(&self) -> Value {
        Value::Struct(BTreeMap::from([
            ("VM".to_owned(), Value::from(&self.vm)),
            ("VDI".to_owned(), Value::from(&self.vdi)),
            ("userdevice".to_owned(), Value::from(&self.userdevice)),
            ("bootable".to_owned(), Value::Bool(self.bootable)),
            ("mode".to_owned(), Value::from(&self.mode)),
            ("type".to_owned(), Value::from(&self.vbd_type)),
            ("empty".to_owned(), Value::Bool(self.empty)),
            ("unpluggable".to_owned(), Value::Bool(true)),
            ("other_config".to_owned(), Value::from(&self.other_config)),
            ("qos_algorithm_type".to_owned(), Value::from("")),
            (
                "qos_algorithm_params".to_owned(),
                Value::Struct(BTreeMap::new()),
            ),
        ]))
    }
}

/// A `VIF.create` record.
#[derive(Clone, Debug, PartialEq)]
pub struct VifCreate {
    /// The VM.
    pub vm: VmRef,
    /// The network.
    pub network: NetworkRef,
    /// Order in the VM (`0`, `1`, …).
    pub device: String,
    /// MAC address; empty: the pool makes one.
    pub mac: String,
    /// MTU.
    pub mtu: i64,
    /// Free-form configuration.
    pub other_config: BTreeMap<String, String>,
    /// `network_default`, `locked`, `unlocked` or `disabled`.
    pub locking_mode: String,
}

impl VifCreate {
    /// The record XAPI expects.
    pub fn to_value(&self) -> Value {
        Value::Struct(BTreeMap::from([
            ("VM".to_owned(), Value::from(&self.vm)),
            ("network".to_owned(), Value::from(&self.network)),
            ("device".to_owned(), Value::from(&self.device)),
            ("MAC".to_owned(), Value::from(&self.mac)),
            ("MTU".to_owned(), Value::Int(self.mtu)),
            ("other_config".to_owned(), Value::from(&self.other_config)),
            ("locking_mode".to_owned(), Value::from(&self.locking_mode)),
            ("qos_algorithm_type".to_owned(), Value::from("")),
            (
                "qos_algorithm_params".to_owned(),
                Value::Struct(BTreeMap::new()),
            ),
        ]))
    }
}

/// A VIF record.
#[derive(Clone, Debug, PartialEq)]
pub struct VifRecord {
    /// Permanent identifier.
    pub uuid: String,
    /// The VM.
    pub vm: VmRef,
    /// The network.
    pub network: NetworkRef,
    /// Order in the VM.
    pub device: String,
    /// MAC address.
    pub mac: String,
    /// MTU.
    pub mtu: i64,
    /// Plugged into a running VM now.
    pub currently_attached: bool,
}

impl VifRecord {
    /// Decodes a `VIF.get_record` result.
    pub fn from_value(v: &Value) -> Result<Self> {
        let f = Fields::of("VIF", v)?;
        Ok(VifRecord {
            uuid: f.string("uuid")?,
            vm: VmRef::new(f.string("VM")?),
            network: NetworkRef::new(f.string("network")?),
            device: f.string("device")?,
            mac: f.string("MAC")?,
            mtu: f.int("MTU")?,
            currently_attached: f.bool("currently_attached")?,
        })
    }
}

/// A network record.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkRecord {
    /// Permanent identifier.
    pub uuid: String,
    /// Name.
    pub name_label: String,
    /// The bridge on the hosts (`xenbr0`).
    pub bridge: String,
}

impl NetworkRecord {
    /// Decodes a `network.get_record` result.
    pub fn from_value(v: &Value) -> Result<Self> {
        let f = Fields::of("network", v)?;
        Ok(NetworkRecord {
            uuid: f.string("uuid")?,
            name_label: f.string("name_label")?,
            bridge: f.string("bridge")?,
        })
    }
}

impl Client {
    /// VIF calls.
    pub fn vif(&self) -> VifApi<'_> {
        VifApi(self)
    }

    /// network calls.
    pub fn network(&self) -> NetworkApi<'_> {
        NetworkApi(self)
    }
}

impl crate::api::VmApi<'_> {
    /// `VM.create` (asynchronous): a halted VM with no devices.
    pub async fn create(&self, record: &VmCreate) -> Result<VmRef> {
        let v = self
            .client()
            .call_async("VM.create", vec![record.to_value()])
            .await?;
        Ok(VmRef::new(expect_string("VM.create", v)?))
    }

    /// `VM.start(vm, start_paused, force)` (asynchronous).
    pub async fn start(&self, vm: &VmRef, start_paused: bool, force: bool) -> Result<()> {
        self.client()
            .call_async(
                "VM.start",
                vec![vm.into(), Value::Bool(start_paused), Value::Bool(force)],
            )
            .await
            .map(drop)
    }

    /// `VM.hard_shutdown` (asynchronous).
    pub async fn hard_shutdown(&self, vm: &VmRef) -> Result<()> {
        self.client()
            .call_async("VM.hard_shutdown", vec![vm.into()])
            .await
            .map(drop)
    }
}

impl crate::api::VbdApi<'_> {
    /// `VBD.create` (asynchronous): made unplugged.
    pub async fn create(&self, record: &VbdCreate) -> Result<VbdRef> {
        let v = self
            .client()
            .call_async("VBD.create", vec![record.to_value()])
            .await?;
        Ok(VbdRef::new(expect_string("VBD.create", v)?))
    }

    /// `VBD.destroy` (asynchronous).
    pub async fn destroy(&self, vbd: &VbdRef) -> Result<()> {
        self.client()
            .call_async("VBD.destroy", vec![vbd.into()])
            .await
            .map(drop)
    }
}

/// `VIF.*`.
pub struct VifApi<'a>(&'a Client);

impl VifApi<'_> {
    /// `VIF.get_record`.
    pub async fn get_record(&self, vif: &VifRef) -> Result<VifRecord> {
        VifRecord::from_value(&self.0.call("VIF.get_record", vec![vif.into()]).await?)
    }

    /// `VIF.get_all_records`.
    pub async fn get_all_records(&self) -> Result<BTreeMap<VifRef, VifRecord>> {
        let v = self.0.call("VIF.get_all_records", vec![]).await?;
        let map = crate::value::expect_struct("VIF.get_all_records", v)?;
        map.into_iter()
            .map(|(r, v)| Ok((VifRef::new(r), VifRecord::from_value(&v)?)))
            .collect()
    }

    /// `VIF.create` (asynchronous): made unplugged.
    pub async fn create(&self, record: &VifCreate) -> Result<VifRef> {
        let v = self
            .0
            .call_async("VIF.create", vec![record.to_value()])
            .await?;
        Ok(VifRef::new(expect_string("VIF.create", v)?))
    }

    /// `VIF.destroy` (asynchronous).
    pub async fn destroy(&self, vif: &VifRef) -> Result<()> {
        self.0
            .call_async("VIF.destroy", vec![vif.into()])
            .await
            .map(drop)
    }
}

/// `network.*`.
pub struct NetworkApi<'a>(&'a Client);

impl NetworkApi<'_> {
    /// `network.get_record`.
    pub async fn get_record(&self, network: &NetworkRef) -> Result<NetworkRecord> {
        NetworkRecord::from_value(
            &self
                .0
                .call("network.get_record", vec![network.into()])
                .await?,
        )
    }

    /// `network.get_by_uuid`.
    pub async fn get_by_uuid(&self, uuid: &str) -> Result<NetworkRef> {
        let v = self
            .0
            .call("network.get_by_uuid", vec![Value::from(uuid)])
            .await?;
        Ok(NetworkRef::new(expect_string("network.get_by_uuid", v)?))
    }

    /// `network.get_all_records`.
    pub async fn get_all_records(&self) -> Result<BTreeMap<NetworkRef, NetworkRecord>> {
        let v = self.0.call("network.get_all_records", vec![]).await?;
        let map = crate::value::expect_struct("network.get_all_records", v)?;
        map.into_iter()
            .map(|(r, v)| Ok((NetworkRef::new(r), NetworkRecord::from_value(&v)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_record_keeps_only_create_fields_with_their_types() {
        let saved = Value::Struct(BTreeMap::from([
            ("name_label".to_owned(), Value::from("web")),
            ("memory_static_max".to_owned(), Value::from("2147483648")),
            ("VCPUs_max".to_owned(), Value::Int(2)),
            ("power_state".to_owned(), Value::from("Running")),
            ("affinity".to_owned(), Value::from("OpaqueRef:host")),
            ("HVM_shadow_multiplier".to_owned(), Value::Double(1.0)),
        ]));
        let (create, missing) = VmCreate::from_record(&saved);
        assert_eq!(
            create.get("memory_static_max"),
            Some(&Value::Int(2147483648))
        );
        assert!(create.get("power_state").is_none());
        assert!(create.get("affinity").is_none());
        assert!(missing.contains(&"VCPUs_at_startup"));
        assert!(!missing.contains(&"VCPUs_max"));
    }
}
