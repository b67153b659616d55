//! Object references and the records of the classes a backup needs.
//!
//! References are opaque strings (`OpaqueRef:<uuid>` in practice, with
//! `OpaqueRef:NULL` for "none"); each class has its own type so a VM
//! reference cannot be passed where a VDI is expected.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::Result;
use crate::value::{Fields, Value};

/// The null reference.
pub const NULL_REF: &str = "OpaqueRef:NULL";

macro_rules! reference {
    ($(#[$doc:meta])* $name:ident, $class:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The XAPI class name.
            pub const CLASS: &'static str = $class;

            /// Wraps a reference string as XAPI returned it.
            pub fn new(r: impl Into<String>) -> Self {
                $name(r.into())
            }

            /// `OpaqueRef:NULL`.
            pub fn null() -> Self {
                $name(NULL_REF.to_owned())
            }

            /// Whether this is the null reference (or empty).
            pub fn is_null(&self) -> bool {
                self.0.is_empty() || self.0 == NULL_REF
            }

            /// The reference string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", $class, self.0)
            }
        }

        impl From<&$name> for Value {
            fn from(r: &$name) -> Value {
                Value::String(r.0.clone())
            }
        }
    };
}

reference!(
    /// A session: the first parameter of every call. Do not log it where
    /// others can read the log while the session lives: it is a credential.
    SessionRef, "session"
);
reference!(/// A virtual disk image.
    VdiRef, "VDI");
reference!(/// A virtual machine (also snapshots, templates and dom0).
    VmRef, "VM");
reference!(/// A virtual block device: the link between a VM and a VDI.
    VbdRef, "VBD");
reference!(/// A storage repository.
    SrRef, "SR");
reference!(/// A virtual network interface: the link between a VM and a network.
    VifRef, "VIF");
reference!(/// A network.
    NetworkRef, "network");
reference!(/// An asynchronous task.
    TaskRef, "task");
reference!(/// A physical host.
    HostRef, "host");
reference!(/// The pool.
    PoolRef, "pool");

/// `vdi_type`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum VdiType {
    /// `system`.
    System,
    /// `user`.
    User,
    /// `ephemeral`.
    Ephemeral,
    /// `suspend`.
    Suspend,
    /// `crashdump`.
    Crashdump,
    /// `cbt_metadata`: a snapshot whose data was destroyed, keeping only
    /// its changed-block log.
    CbtMetadata,
    /// Any other type (`ha_statefile`, `metadata`, `redo_log`, `rrd`, …).
    Other(String),
}

impl VdiType {
    /// Parses XAPI's name.
    pub fn parse(s: &str) -> Self {
        match s {
            "system" => VdiType::System,
            "user" => VdiType::User,
            "ephemeral" => VdiType::Ephemeral,
            "suspend" => VdiType::Suspend,
            "crashdump" => VdiType::Crashdump,
            "cbt_metadata" => VdiType::CbtMetadata,
            other => VdiType::Other(other.to_owned()),
        }
    }

    /// XAPI's name.
    pub fn as_str(&self) -> &str {
        match self {
            VdiType::System => "system",
            VdiType::User => "user",
            VdiType::Ephemeral => "ephemeral",
            VdiType::Suspend => "suspend",
            VdiType::Crashdump => "crashdump",
            VdiType::CbtMetadata => "cbt_metadata",
            VdiType::Other(s) => s,
        }
    }
}

fn refs<T>(v: Vec<String>, make: fn(String) -> T) -> Vec<T> {
    v.into_iter().map(make).collect()
}

/// A VDI record (the fields a backup uses; see the VDI class reference).
#[derive(Clone, Debug, PartialEq)]
pub struct VdiRecord {
    /// Permanent identifier.
    pub uuid: String,
    /// Name.
    pub name_label: String,
    /// Description.
    pub name_description: String,
    /// Its storage repository.
    pub sr: SrRef,
    /// Its block devices.
    pub vbds: Vec<VbdRef>,
    /// Size presented to the guest, in bytes.
    pub virtual_size: u64,
    /// Space used on the SR, in bytes.
    pub physical_utilisation: u64,
    /// Type (`user`, `system`, `cbt_metadata`, …).
    pub vdi_type: VdiType,
    /// May be attached to several VMs.
    pub sharable: bool,
    /// May only be attached read-only.
    pub read_only: bool,
    /// Managed by XAPI.
    pub managed: bool,
    /// The SR scan no longer finds it.
    pub missing: bool,
    /// Is a snapshot.
    pub is_a_snapshot: bool,
    /// The VDI this is a snapshot of (null if none).
    pub snapshot_of: VdiRef,
    /// Snapshots of this VDI.
    pub snapshots: Vec<VdiRef>,
    /// When the snapshot was taken (XAPI datetime text).
    pub snapshot_time: String,
    /// Changed blocks are tracked.
    pub cbt_enabled: bool,
    /// `persist` or `reset`.
    pub on_boot: String,
    /// SM location.
    pub location: String,
    /// Free-form configuration.
    pub other_config: BTreeMap<String, String>,
    /// SM configuration.
    pub sm_config: BTreeMap<String, String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Operations allowed now (advisory).
    pub allowed_operations: Vec<String>,
}

impl VdiRecord {
    /// Decodes a `VDI.get_record` result.
    pub fn from_value(v: &Value) -> Result<Self> {
        let f = Fields::of("VDI", v)?;
        Ok(VdiRecord {
            uuid: f.string("uuid")?,
            name_label: f.string("name_label")?,
            name_description: f.string("name_description")?,
            sr: SrRef(f.string("SR")?),
            vbds: refs(f.strings("VBDs")?, VbdRef),
            virtual_size: f.size("virtual_size")?,
            physical_utilisation: f.size("physical_utilisation")?,
            vdi_type: VdiType::parse(&f.string("type")?),
            sharable: f.bool("sharable")?,
            read_only: f.bool("read_only")?,
            managed: f.bool("managed")?,
            missing: f.bool("missing")?,
            is_a_snapshot: f.bool("is_a_snapshot")?,
            snapshot_of: VdiRef(f.string("snapshot_of")?),
            snapshots: refs(f.strings("snapshots")?, VdiRef),
            snapshot_time: f.string("snapshot_time")?,
            cbt_enabled: f.bool("cbt_enabled")?,
            on_boot: f.string("on_boot")?,
            location: f.string("location")?,
            other_config: f.map("other_config")?,
            sm_config: f.map("sm_config")?,
            tags: f.strings("tags")?,
            allowed_operations: f.strings("allowed_operations")?,
        })
    }
}

/// A VM record (the fields a backup uses).
#[derive(Clone, Debug, PartialEq)]
pub struct VmRecord {
    /// Permanent identifier.
    pub uuid: String,
    /// Name.
    pub name_label: String,
    /// Description.
    pub name_description: String,
    /// `Halted`, `Running`, `Paused` or `Suspended`.
    pub power_state: String,
    /// Is a snapshot.
    pub is_a_snapshot: bool,
    /// Is a template.
    pub is_a_template: bool,
    /// Is a control domain (dom0).
    pub is_control_domain: bool,
    /// The VM this is a snapshot of (null if none).
    pub snapshot_of: VmRef,
    /// Snapshots of this VM.
    pub snapshots: Vec<VmRef>,
    /// When the snapshot was taken.
    pub snapshot_time: String,
    /// Its block devices.
    pub vbds: Vec<VbdRef>,
    /// Host it runs on (null if halted).
    pub resident_on: HostRef,
    /// Free-form configuration.
    pub other_config: BTreeMap<String, String>,
    /// Operations blocked by an administrator, with the reason.
    pub blocked_operations: BTreeMap<String, String>,
    /// Tags.
    pub tags: Vec<String>,
}

impl VmRecord {
    /// Decodes a `VM.get_record` result.
    pub fn from_value(v: &Value) -> Result<Self> {
        let f = Fields::of("VM", v)?;
        Ok(VmRecord {
            uuid: f.string("uuid")?,
            name_label: f.string("name_label")?,
            name_description: f.string("name_description")?,
            power_state: f.string("power_state")?,
            is_a_snapshot: f.bool("is_a_snapshot")?,
            is_a_template: f.bool("is_a_template")?,
            is_control_domain: f.bool("is_control_domain")?,
            snapshot_of: VmRef(f.string("snapshot_of")?),
            snapshots: refs(f.strings("snapshots")?, VmRef),
            snapshot_time: f.string("snapshot_time")?,
            vbds: refs(f.strings("VBDs")?, VbdRef),
            resident_on: HostRef(f.string("resident_on")?),
            other_config: f.map("other_config")?,
            blocked_operations: f.map("blocked_operations")?,
            tags: f.strings("tags")?,
        })
    }
}

/// A VBD record.
#[derive(Clone, Debug, PartialEq)]
pub struct VbdRecord {
    /// Permanent identifier.
    pub uuid: String,
    /// The VM.
    pub vm: VmRef,
    /// The VDI (null for an empty CD drive).
    pub vdi: VdiRef,
    /// Device name in the guest, e.g. `xvda`.
    pub device: String,
    /// Position, e.g. `0`.
    pub userdevice: String,
    /// `RO` or `RW`.
    pub mode: String,
    /// `Disk`, `CD` or `Floppy`.
    pub vbd_type: String,
    /// Boot from it.
    pub bootable: bool,
    /// No medium (CD drives).
    pub empty: bool,
    /// Plugged into a running VM now.
    pub currently_attached: bool,
    /// Free-form configuration.
    pub other_config: BTreeMap<String, String>,
}

impl VbdRecord {
    /// Decodes a `VBD.get_record` result.
    pub fn from_value(v: &Value) -> Result<Self> {
        let f = Fields::of("VBD", v)?;
        Ok(VbdRecord {
            uuid: f.string("uuid")?,
            vm: VmRef(f.string("VM")?),
            vdi: VdiRef(f.string("VDI")?),
            device: f.string("device")?,
            userdevice: f.string("userdevice")?,
            mode: f.string("mode")?,
            vbd_type: f.string("type")?,
            bootable: f.bool("bootable")?,
            empty: f.bool("empty")?,
            currently_attached: f.bool("currently_attached")?,
            other_config: f.map("other_config")?,
        })
    }
}

/// An SR record.
#[derive(Clone, Debug, PartialEq)]
pub struct SrRecord {
    /// Permanent identifier.
    pub uuid: String,
    /// Name.
    pub name_label: String,
    /// Description.
    pub name_description: String,
    /// Driver type (`ext`, `lvm`, `nfs`, …).
    pub sr_type: String,
    /// Content type (`user`, `iso`, …).
    pub content_type: String,
    /// Shared between hosts.
    pub shared: bool,
    /// Its VDIs.
    pub vdis: Vec<VdiRef>,
    /// Size in bytes.
    pub physical_size: u64,
    /// Used bytes.
    pub physical_utilisation: u64,
    /// Free-form configuration.
    pub other_config: BTreeMap<String, String>,
}

impl SrRecord {
    /// Decodes an `SR.get_record` result.
    pub fn from_value(v: &Value) -> Result<Self> {
        let f = Fields::of("SR", v)?;
        Ok(SrRecord {
            uuid: f.string("uuid")?,
            name_label: f.string("name_label")?,
            name_description: f.string("name_description")?,
            sr_type: f.string("type")?,
            content_type: f.string("content_type")?,
            shared: f.bool("shared")?,
            vdis: refs(f.strings("VDIs")?, VdiRef),
            physical_size: f.size("physical_size")?,
            physical_utilisation: f.size("physical_utilisation")?,
            other_config: f.map("other_config")?,
        })
    }
}

/// `task_status_type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskStatus {
    /// Still running.
    Pending,
    /// Finished; `result` holds the value.
    Success,
    /// Failed; `error_info` holds `[CODE, param…]`.
    Failure,
    /// Being cancelled.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Unknown status text.
    Other(String),
}

/// A task record.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskRecord {
    /// Permanent identifier.
    pub uuid: String,
    /// The call it runs, e.g. `Async.VDI.snapshot`.
    pub name_label: String,
    /// Status.
    pub status: TaskStatus,
    /// 0.0 to 1.0.
    pub progress: f64,
    /// On success: the result as an XML-RPC `<value>` fragment.
    pub result: String,
    /// On failure: `[CODE, param…]`.
    pub error_info: Vec<String>,
}

impl TaskRecord {
    /// Decodes a `task.get_record` result.
    pub fn from_value(v: &Value) -> Result<Self> {
        let f = Fields::of("task", v)?;
        let status = match f.string("status")?.as_str() {
            "pending" => TaskStatus::Pending,
            "success" => TaskStatus::Success,
            "failure" => TaskStatus::Failure,
            "cancelling" => TaskStatus::Cancelling,
            "cancelled" => TaskStatus::Cancelled,
            other => TaskStatus::Other(other.to_owned()),
        };
        Ok(TaskRecord {
            uuid: f.string("uuid")?,
            name_label: f.string("name_label")?,
            status,
            progress: f.float("progress")?,
            result: f.string("result")?,
            error_info: f.strings("error_info")?,
        })
    }
}

/// One way to reach a VDI over NBD (`vdi_nbd_server_info`).
#[derive(Clone, PartialEq, Eq)]
pub struct NbdInfo {
    /// `/<vdi-uuid>?session_id=<session ref>`: valid while that session is.
    pub exportname: String,
    /// IP address of the host's NBD network interface.
    pub address: String,
    /// TCP port (10809 on a real host).
    pub port: u16,
    /// PEM of the host's TLS certificate, to pin.
    pub cert: String,
    /// Name to verify the certificate against.
    pub subject: String,
}

impl fmt::Debug for NbdInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The export name embeds a live session reference.
        let export = self
            .exportname
            .split_once("?session_id=")
            .map_or(self.exportname.as_str(), |(path, _)| path);
        f.debug_struct("NbdInfo")
            .field("exportname", &format!("{export}?session_id=<redacted>"))
            .field("address", &self.address)
            .field("port", &self.port)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl NbdInfo {
    /// Decodes one element of a `VDI.get_nbd_info` result.
    pub fn from_value(v: &Value) -> Result<Self> {
        let f = Fields::of("vdi_nbd_server_info", v)?;
        let port = f.int("port")?;
        Ok(NbdInfo {
            exportname: f.string("exportname")?,
            address: f.string("address")?,
            port: u16::try_from(port).map_err(|_| crate::Error::Decode {
                field: "vdi_nbd_server_info.port".into(),
                detail: format!("{port} is not a TCP port"),
            })?,
            cert: f.string("cert")?,
            subject: f.string("subject")?,
        })
    }
}

/// The export name xapi-nbd expects for `vdi_uuid` under `session`
/// (what `VDI.get_nbd_info` returns for the caller's session). Useful after
/// a re-login, when earlier export names carry a dead session.
pub fn nbd_export_name(vdi_uuid: &str, session: &SessionRef) -> String {
    format!("/{vdi_uuid}?session_id={}", session.as_str())
}

/// Arguments of `VDI.create`, e.g. to restore into a pool.
#[derive(Clone, Debug, PartialEq)]
pub struct VdiCreate {
    /// Name.
    pub name_label: String,
    /// Description.
    pub name_description: String,
    /// SR to create it in.
    pub sr: SrRef,
    /// Size in bytes.
    pub virtual_size: u64,
    /// Type (normally `user`).
    pub vdi_type: VdiType,
    /// May be shared.
    pub sharable: bool,
    /// Read-only.
    pub read_only: bool,
    /// Free-form configuration.
    pub other_config: BTreeMap<String, String>,
    /// SM configuration.
    pub sm_config: BTreeMap<String, String>,
    /// Tags.
    pub tags: Vec<String>,
}

impl VdiCreate {
    /// A `user` VDI of `virtual_size` bytes named `name_label` in `sr`.
    pub fn new(name_label: impl Into<String>, sr: SrRef, virtual_size: u64) -> Self {
        VdiCreate {
            name_label: name_label.into(),
            name_description: String::new(),
            sr,
            virtual_size,
            vdi_type: VdiType::User,
            sharable: false,
            read_only: false,
            other_config: BTreeMap::new(),
            sm_config: BTreeMap::new(),
            tags: Vec::new(),
        }
    }

    /// The record XAPI expects.
    pub fn to_value(&self) -> Value {
        let size = i64::try_from(self.virtual_size).unwrap_or(i64::MAX);
        Value::Struct(BTreeMap::from([
            ("name_label".to_owned(), Value::from(&self.name_label)),
            (
                "name_description".to_owned(),
                Value::from(&self.name_description),
            ),
            ("SR".to_owned(), Value::from(&self.sr)),
            ("virtual_size".to_owned(), Value::Int(size)),
            ("type".to_owned(), Value::from(self.vdi_type.as_str())),
            ("sharable".to_owned(), Value::Bool(self.sharable)),
            ("read_only".to_owned(), Value::Bool(self.read_only)),
            ("other_config".to_owned(), Value::from(&self.other_config)),
            ("xenstore_data".to_owned(), Value::Struct(BTreeMap::new())),
            ("sm_config".to_owned(), Value::from(&self.sm_config)),
            (
                "tags".to_owned(),
                Value::Array(self.tags.iter().map(Value::from).collect()),
            ),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs() {
        assert!(VdiRef::null().is_null());
        assert!(VdiRef::new("").is_null());
        assert!(!VdiRef::new("OpaqueRef:1").is_null());
        assert_eq!(
            format!("{:?}", VdiRef::new("OpaqueRef:1")),
            "VDI(OpaqueRef:1)"
        );
    }

    #[test]
    fn nbd_info_debug_hides_the_session() {
        let info = NbdInfo {
            exportname: "/u?session_id=OpaqueRef:secret".into(),
            address: "127.0.0.1".into(),
            port: 10809,
            cert: String::new(),
            subject: "h".into(),
        };
        let text = format!("{info:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("/u?session_id=<redacted>"));
    }

    #[test]
    fn vdi_type_round_trips() {
        for t in ["user", "system", "cbt_metadata", "rrd"] {
            assert_eq!(VdiType::parse(t).as_str(), t);
        }
    }
}
