//! Connecting to QEMU and preparing a backup: checkpoint checks, the
//! fleece image, the atomic transaction, snapshot-access and the export.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cbtvault_qmp::{Action, Address, BlockNode, DirtyBitmap, Qmp, VersionInfo};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

use crate::error::{Context, Error, Result};
use crate::names::{CheckpointName, JobName, Names};

/// Bitmap granularity: one bit per 64 KiB block, cbtvault's block size.
pub const GRANULARITY: u32 = 64 * 1024;
/// How long a QEMU job or export deletion may take.
pub(crate) const JOB_TIMEOUT: Duration = Duration::from_secs(30);
/// The file name of the NBD socket this crate starts when QEMU has none.
pub const NBD_SOCKET_NAME: &str = "cbtv-nbd.sock";

/// Where things go; everything has a default.
#[derive(Debug, Clone, Default)]
pub struct DiskOptions {
    /// Directory for fleece images (and the NBD socket, see below). QEMU
    /// writes there and this process deletes from there. Default: the
    /// directory of the QMP unix socket; the system temporary directory
    /// for QMP over TCP.
    pub work_dir: Option<PathBuf>,
    /// The unix socket of QEMU's NBD server. If QEMU runs none, one is
    /// started there (and stopped again when its last export goes). If it
    /// runs one, it must listen here. Default: `work_dir/cbtv-nbd.sock`.
    pub nbd_socket: Option<PathBuf>,
    /// QMP connection settings.
    pub qmp: cbtvault_qmp::Options,
}

/// What a backup reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupKind {
    /// No earlier checkpoint was given: read every allocated block
    /// (`base:allocation`).
    Full,
    /// A checkpoint was given but cannot be trusted (the reason says why;
    /// it has been removed): read every allocated block.
    NeedsFull { reason: String },
    /// Read only the blocks the export's dirty-bitmap context marks dirty:
    /// those written since checkpoint `since`.
    Incremental {
        since: CheckpointName,
        dirty_bitmap_context: String,
    },
}

/// A point-in-time view of the disk, exported read-only over NBD, and the
/// checkpoint that starts at the same instant. Hand it back to
/// [`QemuDisk::commit`] or [`QemuDisk::abort`].
#[derive(Debug)]
#[must_use = "an export must be committed or aborted, or QEMU keeps the fleece running"]
pub struct BackupExport {
    pub(crate) kind: BackupKind,
    pub(crate) nbd_socket: PathBuf,
    pub(crate) size: u64,
    pub(crate) checkpoint: CheckpointName,
    pub(crate) names: Names,
    pub(crate) job: JobName,
    pub(crate) started_nbd_server: bool,
}

impl BackupExport {
    pub fn kind(&self) -> &BackupKind {
        &self.kind
    }

    /// The unix socket of QEMU's NBD server.
    pub fn nbd_socket(&self) -> &Path {
        &self.nbd_socket
    }

    /// The NBD export name.
    pub fn export_name(&self) -> &str {
        &self.names.export
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The new checkpoint: after [`QemuDisk::commit`], pass it as
    /// `previous` to the next [`QemuDisk::prepare`].
    pub fn checkpoint(&self) -> &CheckpointName {
        &self.checkpoint
    }

    /// The checkpoint this backup is incremental to, if it is.
    pub fn since(&self) -> Option<&CheckpointName> {
        match &self.kind {
            BackupKind::Incremental { since, .. } => Some(since),
            _ => None,
        }
    }

    /// The NBD meta context of the changed blocks (`qemu:dirty-bitmap:NAME`,
    /// bit 0 = dirty), for an incremental backup.
    pub fn dirty_bitmap_context(&self) -> Option<&str> {
        match &self.kind {
            BackupKind::Incremental {
                dirty_bitmap_context,
                ..
            } => Some(dirty_bitmap_context),
            _ => None,
        }
    }

    /// The export as an NBD URI (`nbd+unix:///NAME?socket=PATH`), as
    /// nbdinfo, nbdcopy and qemu-img take it.
    pub fn nbd_uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.names.export,
            self.nbd_socket.display()
        )
    }

    /// The fleece image holding the old data of blocks written meanwhile.
    pub fn fleece_path(&self) -> &Path {
        &self.names.fleece_path
    }

    /// The job name given to [`QemuDisk::prepare`].
    pub fn job(&self) -> &str {
        self.job.as_str()
    }
}

/// State of a checkpoint as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointState {
    /// Present and usable.
    Present { recording: bool, dirty_bytes: u64 },
    /// Loaded from an image that was not closed cleanly: unusable.
    Inconsistent,
    /// Not on the node (never created, removed, or lost with a killed QEMU).
    Missing,
}

/// One disk (a block node) in a running QEMU or qemu-storage-daemon.
#[derive(Debug)]
pub struct QemuDisk {
    pub(crate) qmp: Arc<Qmp>,
    pub(crate) node: String,
    pub(crate) work_dir: PathBuf,
    pub(crate) nbd_socket: PathBuf,
    version: VersionInfo,
}

impl QemuDisk {
    /// Connects to the QMP unix socket with default options and checks
    /// that QEMU can do this and that `node_name` exists.
    pub async fn connect(qmp_socket: impl AsRef<Path>, node_name: &str) -> Result<Self> {
        let address = Address::Unix(qmp_socket.as_ref().to_owned());
        Self::connect_with(address, node_name, DiskOptions::default()).await
    }

    /// [`QemuDisk::connect`] with any address and options.
    pub async fn connect_with(
        address: Address,
        node_name: &str,
        options: DiskOptions,
    ) -> Result<Self> {
        let default_dir = match &address {
            Address::Unix(path) => path.parent().map(Path::to_owned),
            Address::Tcp(_) => None,
        };
        let qmp = Qmp::connect_with(address.clone(), options.qmp.clone())
            .await
            .context(|| format!("connecting to QMP at {address}"))?;
        let options = DiskOptions {
            work_dir: options.work_dir.or(default_dir),
            ..options
        };
        Self::from_qmp(Arc::new(qmp), node_name, options).await
    }

    /// Uses an open QMP connection, which may be shared: a QEMU monitor
    /// serves one client at a time, so several disks of one QEMU must
    /// share one connection. `options.work_dir` defaults to the system
    /// temporary directory here.
    pub async fn from_qmp(qmp: Arc<Qmp>, node_name: &str, options: DiskOptions) -> Result<Self> {
        let version = qmp
            .query_version()
            .await
            .context(|| "query-version".into())?;
        let schema = qmp
            .query_qmp_schema()
            .await
            .context(|| "query-qmp-schema".into())?;
        let missing = missing_drivers(&schema, &["copy-before-write", "snapshot-access"]);
        if !missing.is_empty() {
            return Err(Error::Unsupported {
                qmp: qmp.address().to_owned(),
                version: version.to_string(),
                missing: format!("the block drivers {}", missing.join(", ")),
            });
        }
        let work_dir = options
            .work_dir
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or_else(std::env::temp_dir);
        let nbd_socket = options
            .nbd_socket
            .unwrap_or_else(|| work_dir.join(NBD_SOCKET_NAME));
        let disk = Self {
            qmp,
            node: node_name.to_owned(),
            work_dir,
            nbd_socket,
            version,
        };
        disk.node_info().await?;
        Ok(disk)
    }

    /// The QMP connection (for diagnostics, tests, and sharing).
    pub fn qmp(&self) -> &Arc<Qmp> {
        &self.qmp
    }

    /// The block node backed up.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// QEMU's version.
    pub fn version(&self) -> &VersionInfo {
        &self.version
    }

    /// The disk's size in bytes.
    pub async fn size(&self) -> Result<u64> {
        Ok(self.node_info().await?.image.virtual_size)
    }

    /// The named dirty bitmaps on the node.
    pub async fn checkpoints(&self) -> Result<Vec<DirtyBitmap>> {
        let mut bitmaps = self.node_info().await?.dirty_bitmaps;
        bitmaps.retain(|b| !b.name.is_empty());
        Ok(bitmaps)
    }

    /// What QEMU says about checkpoint `name`.
    pub async fn checkpoint_state(&self, name: &CheckpointName) -> Result<CheckpointState> {
        let bitmaps = self.checkpoints().await?;
        Ok(match bitmaps.iter().find(|b| b.name == name.as_str()) {
            None => CheckpointState::Missing,
            Some(b) if b.inconsistent => CheckpointState::Inconsistent,
            Some(b) => CheckpointState::Present {
                recording: b.recording,
                dirty_bytes: b.count,
            },
        })
    }

    pub(crate) async fn node_info(&self) -> Result<BlockNode> {
        let nodes = self
            .qmp
            .query_named_block_nodes()
            .await
            .context(|| "query-named-block-nodes".into())?;
        let names: Vec<&str> = nodes
            .iter()
            .map(|n| n.node_name.as_str())
            .filter(|n| !n.starts_with('#'))
            .collect();
        let available = names.join(", ");
        nodes
            .into_iter()
            .find(|n| n.node_name == self.node)
            .ok_or_else(|| Error::NoSuchNode {
                qmp: self.qmp.address().to_owned(),
                node: self.node.clone(),
                available,
            })
    }

    /// Takes the point-in-time view and starts the next checkpoint, in one
    /// QMP transaction: adds checkpoint bitmap `cbtv-<job>-<millis>`,
    /// freezes `previous` (for an incremental) and starts fleecing; then
    /// puts a snapshot-access node on the fleecing filter and exports it
    /// read-only over NBD, with `previous` attached as a dirty-bitmap
    /// context.
    ///
    /// `job` (1 to 20 of `A-Za-z0-9_.-`) names the backups of this disk
    /// into one repository; at most one may run at a time. If `previous`
    /// is missing or inconsistent the backup is full
    /// ([`BackupKind::NeedsFull`]). On error, everything this call created
    /// is removed again.
    pub async fn prepare(
        &self,
        job: &str,
        previous: Option<&CheckpointName>,
    ) -> Result<BackupExport> {
        let job = JobName::new(job)?;
        let names = Names::new(&job, &self.work_dir);
        let leftovers = self.find_leftovers(&names).await?;
        if !leftovers.is_empty() {
            return Err(Error::Leftovers {
                job: job.to_string(),
                items: leftovers,
            });
        }
        let node = self.node_info().await?;
        let (base, kind) = self
            .settle_checkpoints(&job, &node.dirty_bitmaps, previous)
            .await?;
        let checkpoint = CheckpointName::generate(&job, |name| {
            node.dirty_bitmaps.iter().any(|b| b.name == name)
        });
        let started_nbd_server = self.ensure_nbd_server().await?;
        let export = BackupExport {
            kind,
            nbd_socket: self.nbd_socket.clone(),
            size: node.image.virtual_size,
            checkpoint,
            names,
            job,
            started_nbd_server,
        };
        tracing::info!(job = %export.job, node = %self.node, kind = ?export.kind, checkpoint = %export.checkpoint, "preparing QEMU backup");
        match self.build(&export, base.as_ref()).await {
            Ok(()) => Ok(export),
            Err(error) => {
                tracing::warn!(job = %export.job, %error, "preparing failed; undoing");
                if let Err(undo) = self.abort(export).await {
                    tracing::warn!(error = %undo, "undoing a failed prepare failed too; cleanup_leftovers removes the rest");
                }
                Err(error)
            }
        }
    }

    /// Makes `previous` a usable base, or decides on a full backup, and
    /// removes this job's other checkpoints (see the crate documentation).
    async fn settle_checkpoints(
        &self,
        job: &JobName,
        bitmaps: &[DirtyBitmap],
        previous: Option<&CheckpointName>,
    ) -> Result<(Option<CheckpointName>, BackupKind)> {
        // Collected up front: no iterator adapter lives across an await,
        // which keeps this future Send.
        let others: Vec<&DirtyBitmap> = bitmaps
            .iter()
            .filter(|b| {
                job.owns_bitmap(&b.name)
                    && Some(b.name.as_str()) != previous.map(CheckpointName::as_str)
            })
            .collect();
        let mut other_names: Vec<&str> = others.iter().map(|b| b.name.as_str()).collect();
        let Some(previous) = previous else {
            self.remove_bitmaps(&other_names).await?;
            return Ok((None, BackupKind::Full));
        };
        let needs_full = |reason: String| Ok((None, BackupKind::NeedsFull { reason }));
        let Some(bitmap) = bitmaps.iter().find(|b| b.name == previous.as_str()) else {
            self.remove_bitmaps(&other_names).await?;
            return needs_full(format!(
                "checkpoint {previous}, where the last backup ended, is not on node {}: QEMU may have been stopped uncleanly before it saved the bitmap, or another tool (or an older cbtvault backing this node up into another repository) removed it",
                self.node
            ));
        };
        if bitmap.inconsistent {
            other_names.push(previous.as_str());
            self.remove_bitmaps(&other_names).await?;
            return needs_full(format!(
                "checkpoint {previous} is inconsistent: QEMU was killed while it had the image open, so the bitmap may have missed writes"
            ));
        }
        if bitmap.busy {
            return Err(Error::CheckpointBusy {
                name: previous.to_string(),
                node: self.node.clone(),
            });
        }
        if !bitmap.recording {
            // An earlier run froze `previous` and was interrupted before it
            // committed or aborted; the writes since then are in the
            // checkpoint(s) it started.
            let newer: Vec<&str> = others
                .iter()
                .filter(|b| b.recording && !b.inconsistent && !b.busy)
                .map(|b| b.name.as_str())
                .collect();
            if newer.is_empty() {
                other_names.push(previous.as_str());
                self.remove_bitmaps(&other_names).await?;
                return needs_full(format!(
                    "checkpoint {previous} stopped recording and no later checkpoint covers the writes since"
                ));
            }
            tracing::info!(checkpoint = %previous, merged = ?newer, "repairing a checkpoint left frozen by an interrupted backup");
            self.qmp
                .transaction(&[
                    Action::bitmap_merge(&self.node, previous.as_str(), &newer),
                    Action::bitmap_enable(&self.node, previous.as_str()),
                ])
                .await
                .context(|| format!("merging {newer:?} back into checkpoint {previous}"))?;
        }
        self.remove_bitmaps(&other_names).await?;
        let dirty_bitmap_context = format!("qemu:dirty-bitmap:{previous}");
        Ok((
            Some(previous.clone()),
            BackupKind::Incremental {
                since: previous.clone(),
                dirty_bitmap_context,
            },
        ))
    }

    pub(crate) async fn remove_bitmaps(&self, names: &[&str]) -> Result<()> {
        for &name in names {
            tracing::info!(node = %self.node, bitmap = name, "removing checkpoint");
            self.qmp
                .block_dirty_bitmap_remove(&self.node, name)
                .await
                .context(|| format!("removing checkpoint {name} from node {}", self.node))?;
        }
        Ok(())
    }

    /// Starts QEMU's NBD server on our socket, or checks that the one
    /// running listens there. Returns whether it was started now.
    async fn ensure_nbd_server(&self) -> Result<bool> {
        match self.qmp.nbd_server_start_unix(&self.nbd_socket).await {
            Ok(()) => return Ok(true),
            Err(error) if error.desc().is_some_and(|d| d.contains("already running")) => {}
            Err(error) => {
                return Err(Error::Qmp {
                    step: format!(
                        "starting QEMU's NBD server on {}",
                        self.nbd_socket.display()
                    ),
                    source: error,
                });
            }
        }
        // Some server runs; it must be the one at our socket.
        let probe = async {
            let mut stream = UnixStream::connect(&self.nbd_socket).await?;
            let mut magic = [0u8; 8];
            stream.read_exact(&mut magic).await?;
            Ok::<_, std::io::Error>(&magic == b"NBDMAGIC")
        };
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(true)) => Ok(false),
            _ => Err(Error::NbdServerElsewhere {
                path: self.nbd_socket.clone(),
            }),
        }
    }

    /// The QEMU side of [`QemuDisk::prepare`], in order.
    async fn build(&self, export: &BackupExport, base: Option<&CheckpointName>) -> Result<()> {
        let n = &export.names;
        let node = self.node.as_str();
        let fleece_path = &n.fleece_path;
        self.qmp
            .blockdev_create(
                &n.create_file_job,
                json!({"driver": "file", "filename": fleece_path, "size": 0}),
                JOB_TIMEOUT,
            )
            .await
            .context(|| format!("creating the fleece image {}", fleece_path.display()))?;
        self.qmp
            .blockdev_add(
                json!({"driver": "file", "node-name": n.fleece_file, "filename": fleece_path}),
            )
            .await
            .context(|| format!("opening the fleece image {}", fleece_path.display()))?;
        self.qmp
            .blockdev_create(
                &n.create_qcow2_job,
                json!({"driver": "qcow2", "file": n.fleece_file, "size": export.size}),
                JOB_TIMEOUT,
            )
            .await
            .context(|| {
                format!(
                    "formatting the fleece image {} as qcow2",
                    fleece_path.display()
                )
            })?;
        self.qmp
            .blockdev_add(json!({"driver": "qcow2", "node-name": n.fleece, "file": n.fleece_file, "discard": "unmap"}))
            .await
            .context(|| format!("adding the fleece node {}", n.fleece))?;

        // The point in time: new checkpoint, frozen base and copy-before-write
        // all at once.
        let mut actions = vec![Action::bitmap_add(
            node,
            export.checkpoint.as_str(),
            GRANULARITY,
            true,
        )];
        if let Some(base) = base {
            actions.push(Action::bitmap_disable(node, base.as_str()));
        }
        actions.push(Action::blockdev_backup(
            &n.backup_job,
            node,
            &n.fleece,
            "none",
            Some(&n.cbw),
        ));
        self.qmp
            .transaction(&actions)
            .await
            .context(|| format!("starting the point-in-time view of node {node} (transaction)"))?;

        self.qmp
            .blockdev_add(json!({"driver": "snapshot-access", "node-name": n.snap, "file": n.cbw}))
            .await
            .context(|| format!("adding the snapshot-access node {}", n.snap))?;
        let mut options = json!({
            "type": "nbd", "id": n.export, "node-name": n.snap, "name": n.export, "writable": false,
        });
        if let (Some(base), Some(object)) = (base, options.as_object_mut()) {
            object.insert(
                "bitmaps".into(),
                json!([{"node": node, "name": base.as_str()}]),
            );
        }
        self.qmp
            .block_export_add(options)
            .await
            .context(|| format!("exporting {} over NBD as {}", n.snap, n.export))?;
        Ok(())
    }
}

/// Which of `drivers` the schema's `BlockdevDriver` enum lacks. The enum is
/// recognised by its members (schema type names are masked); older QEMU
/// lists `values`, newer lists `members`.
fn missing_drivers<'a>(schema: &Value, drivers: &[&'a str]) -> Vec<&'a str> {
    let enum_values = |entry: &Value| -> Vec<String> {
        let strings = entry.get("values").and_then(Value::as_array).map(|values| {
            values
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        });
        let members = entry
            .get("members")
            .and_then(Value::as_array)
            .map(|members| {
                members
                    .iter()
                    .filter_map(|m| m.get("name").and_then(Value::as_str))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            });
        strings.or(members).unwrap_or_default()
    };
    let entries = schema.as_array().map(Vec::as_slice).unwrap_or_default();
    let block_drivers = entries
        .iter()
        .filter(|e| e.get("meta-type").and_then(Value::as_str) == Some("enum"))
        .map(enum_values)
        .find(|values| {
            ["qcow2", "raw", "file", "null-co"]
                .iter()
                .all(|d| values.iter().any(|v| v == d))
        });
    match block_drivers {
        None => drivers.to_vec(),
        Some(values) => drivers
            .iter()
            .copied()
            .filter(|d| !values.iter().any(|v| v == d))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_drivers_are_found_in_old_and_new_schemas() {
        let new = json!([{"meta-type": "enum", "name": "7", "members": [
            {"name": "file"}, {"name": "qcow2"}, {"name": "raw"}, {"name": "null-co"}, {"name": "snapshot-access"}]}]);
        assert_eq!(
            missing_drivers(&new, &["snapshot-access", "copy-before-write"]),
            ["copy-before-write"]
        );
        let old = json!([{"meta-type": "enum", "name": "7", "values": ["file", "qcow2", "raw", "null-co"]},
            {"meta-type": "command", "name": "x"}]);
        assert_eq!(
            missing_drivers(&old, &["snapshot-access"]),
            ["snapshot-access"]
        );
        assert_eq!(
            missing_drivers(&json!({}), &["snapshot-access"]),
            ["snapshot-access"]
        );
    }
}
