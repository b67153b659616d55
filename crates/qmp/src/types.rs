//! Typed forms of the QMP data backup needs. Fields QEMU may omit in some
//! versions default instead of failing, so an older or newer QEMU still
//! decodes.

use std::fmt;

use serde::Deserialize;
use serde_json::{Map, Value};

/// The greeting QEMU sends on connect.
#[derive(Debug, Clone, Deserialize)]
pub struct Greeting {
    pub version: VersionInfo,
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// `query-version`, also part of the greeting.
#[derive(Debug, Clone, Deserialize)]
pub struct VersionInfo {
    pub qemu: Version,
    #[serde(default)]
    pub package: String,
}

impl fmt::Display for VersionInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.qemu)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package.trim())?;
        }
        Ok(())
    }
}

/// A QEMU version number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// An asynchronous event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event's name, such as `JOB_STATUS_CHANGE`.
    pub name: String,
    /// Its `data` member (`Value::Null` if absent).
    pub data: Value,
    /// When QEMU emitted it: seconds and microseconds since the epoch.
    pub timestamp: Option<(i64, i64)>,
}

impl Event {
    pub(crate) fn from_object(mut object: Map<String, Value>) -> Option<Self> {
        let name = match object.remove("event")? {
            Value::String(name) => name,
            _ => return None,
        };
        let timestamp = object.get("timestamp").and_then(|t| {
            Some((
                t.get("seconds")?.as_i64()?,
                t.get("microseconds")?.as_i64()?,
            ))
        });
        Some(Self {
            name,
            data: object.remove("data").unwrap_or(Value::Null),
            timestamp,
        })
    }

    /// A string member of `data`, such as the `id` of a job event.
    pub fn data_str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }
}

/// A job's state (qapi `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
    /// A state this client does not know.
    #[serde(other)]
    Unknown,
}

/// One entry of `query-jobs`.
#[derive(Debug, Clone, Deserialize)]
pub struct JobInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub status: JobStatus,
    #[serde(rename = "current-progress", default)]
    pub current_progress: u64,
    #[serde(rename = "total-progress", default)]
    pub total_progress: u64,
    /// Set when the job failed (or was cancelled, for some job types).
    #[serde(default)]
    pub error: Option<String>,
}

/// One entry of `query-block-jobs`.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockJobInfo {
    /// The job id (QEMU calls it `device` for historic reasons).
    pub device: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub len: u64,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub ready: bool,
    pub status: JobStatus,
    #[serde(default)]
    pub error: Option<String>,
}

/// One node of `query-named-block-nodes` (only what backup needs).
#[derive(Debug, Clone, Deserialize)]
pub struct BlockNode {
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// The driver: `qcow2`, `raw`, `file`, `copy-before-write`, ...
    pub drv: String,
    #[serde(default)]
    pub ro: bool,
    #[serde(default)]
    pub file: String,
    pub image: ImageInfo,
    #[serde(rename = "dirty-bitmaps", default)]
    pub dirty_bitmaps: Vec<DirtyBitmap>,
}

/// The image part of a [`BlockNode`].
#[derive(Debug, Clone, Deserialize)]
pub struct ImageInfo {
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(default)]
    pub filename: String,
    #[serde(default)]
    pub format: String,
}

/// A dirty bitmap as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DirtyBitmap {
    /// Empty for QEMU's internal, anonymous bitmaps (such as the one a
    /// copy-before-write filter keeps).
    #[serde(default)]
    pub name: String,
    /// Whether it records writes (false once disabled).
    #[serde(default)]
    pub recording: bool,
    /// Whether it is stored in the image on a clean close.
    #[serde(default)]
    pub persistent: bool,
    /// In use by an export or job: cannot be changed now.
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub granularity: u64,
    /// Dirty bytes.
    #[serde(default)]
    pub count: u64,
    /// Loaded from an image that was not closed cleanly: unusable.
    #[serde(default)]
    pub inconsistent: bool,
}

/// One entry of `query-block-exports`.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockExportInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(rename = "node-name")]
    pub node_name: String,
    #[serde(rename = "shutting-down", default)]
    pub shutting_down: bool,
}

/// One block device of `query-block`: a guest drive (its BlockBackend)
/// and the node inserted in it. A qemu-storage-daemon has none.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockInfo {
    /// The BlockBackend's name (`-drive id=`); empty for a `-blockdev`
    /// attached with `-device drive=NODE`.
    #[serde(default)]
    pub device: String,
    /// The guest device's QOM path (`/machine/peripheral/ID/…`), if any.
    #[serde(default)]
    pub qdev: Option<String>,
    #[serde(default)]
    pub removable: bool,
    #[serde(default)]
    pub inserted: Option<InsertedNode>,
}

/// The medium of a [`BlockInfo`].
#[derive(Debug, Clone, Deserialize)]
pub struct InsertedNode {
    #[serde(rename = "node-name", default)]
    pub node_name: String,
    #[serde(default)]
    pub drv: String,
    #[serde(default)]
    pub ro: bool,
}

/// A VM's identity as QEMU knows it (`-name`, `-uuid`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmIdentity {
    pub name: Option<String>,
    pub uuid: Option<String>,
}

/// The reply of `query-name`.
#[derive(Debug, Deserialize)]
pub(crate) struct NameInfo {
    #[serde(default)]
    pub name: Option<String>,
}

/// The reply of `query-uuid`.
#[derive(Debug, Deserialize)]
pub(crate) struct UuidInfo {
    #[serde(rename = "UUID")]
    pub uuid: String,
}
