//! A QEMU/KVM block node as a [`Provider`]: [`QemuNode`].
//!
//! The QEMU side (one atomic `transaction` that starts a checkpoint bitmap
//! and a fleecing point-in-time view, exported over NBD) is in
//! `cbtvault-qemu`. Here: find the checkpoint the last restore point ends
//! at, clean up after an interrupted run, and read the dirty blocks from
//! the view's `qemu:dirty-bitmap:` context. [`crate::provider::drive`]
//! reads the view — only the dirty blocks for an incremental, every
//! allocated block otherwise —, commits the restore point and checks a
//! sample against the view; only then does QEMU drop the previous
//! checkpoint. On any failure the export is aborted, which merges the new
//! checkpoint back into the old one and so keeps every change for the next
//! run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use cbtvault_nbd::ConnectOptions;
use cbtvault_qemu::{BackupExport, BackupKind, CheckpointName, QemuDisk};
use cbtvault_repo::{Repository, RestorePointRow, SourceInfo, VmInfo};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backup::{BackupOptions, BackupOutcome, Changes};
use crate::error::{Error, Result};
use crate::nbd::NbdSource;
use crate::progress::Progress;
use crate::provider::{DriveContext, PreparedDisk, Provider, SharedProgress, drive};
use crate::rename::DiskName;

/// How to back up a QEMU node.
#[derive(Clone, Debug)]
pub struct QemuOptions {
    /// The job name (1-20 characters: it names QEMU objects).
    pub job: String,
    /// The disk's name in the repository (for a job, `qemu-HOST/NODE`,
    /// formerly `qemu-NODE`).
    pub disk: DiskName,
    /// Blocks re-read from the view before the old checkpoint goes.
    pub verify_samples: usize,
    pub backup: BackupOptions,
    /// The VM the node belongs to, recorded with its restore points.
    pub vm: Option<VmInfo>,
}

/// The QEMU job name for backups of `disk` into `repo`: a readable
/// `prefix` (cut to 10 characters) and 8 hex digits of the repository's id
/// and the disk's name. Checkpoints are named after the job, and a job
/// removes only its own: so two repositories, or two disk names, backing up
/// one node never take each other's checkpoint away.
pub fn job_name(prefix: &str, repo: &Repository, disk: &str) -> String {
    let key = blake3::hash(format!("{}\0{disk}", repo.config().id).as_bytes());
    let prefix: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        .take(10)
        .collect();
    let prefix = if prefix.is_empty() {
        "cbtv".into()
    } else {
        prefix
    };
    format!("{prefix}-{}", &key.to_hex()[..8])
}

fn qemu(disk: &str, what: &str) -> impl FnOnce(cbtvault_qemu::Error) -> Error {
    let (disk, what) = (disk.to_string(), what.to_string());
    move |e| Error::Source {
        disk,
        what,
        source: Some(Box::new(e)),
    }
}

/// Where a restore point of this node came from, as its manifest says.
fn location(qemu_disk: &QemuDisk) -> String {
    format!("{} node {}", qemu_disk.qmp().address(), qemu_disk.node())
}

/// One node of a QEMU (or qemu-storage-daemon).
pub struct QemuNode<'a> {
    qemu_disk: &'a QemuDisk,
    options: QemuOptions,
    export: Option<BackupExport>,
}

/// The fleecing export of a node.
pub struct QemuView {
    socket: PathBuf,
    export_name: String,
    info: SourceInfo,
}

impl<'a> QemuNode<'a> {
    pub fn new(qemu_disk: &'a QemuDisk, options: &QemuOptions) -> Self {
        QemuNode {
            qemu_disk,
            options: options.clone(),
            export: None,
        }
    }

    /// The blocks to read from `export`.
    async fn changes(&self, export: &BackupExport, had_previous: bool) -> Result<Changes> {
        Ok(match export.kind() {
            BackupKind::Incremental {
                dirty_bitmap_context,
                ..
            } => {
                let bitmap = cbtvault_nbd::dirty_bitmap_name(dirty_bitmap_context)
                    .unwrap_or(dirty_bitmap_context);
                let mut connect =
                    ConnectOptions::unix(export.nbd_socket().to_path_buf(), export.export_name());
                connect.meta_contexts.push(dirty_bitmap_context.clone());
                let source =
                    NbdSource::connect(connect, format!("qemu node {}", self.qemu_disk.node()))
                        .await?;
                let map = source.dirty_blocks(bitmap).await;
                source.client().disconnect().await;
                Changes::Blocks {
                    map: map?,
                    origin: format!("qemu-dirty-bitmap:{bitmap}"),
                }
            }
            BackupKind::NeedsFull { reason } => Changes::Full {
                reason: Some(reason.clone()),
            },
            BackupKind::Full => Changes::Full {
                reason: had_previous
                    .then(|| "the previous restore point has no QEMU checkpoint".into()),
            },
        })
    }
}

impl Provider for QemuNode<'_> {
    type View = QemuView;

    fn label(&self) -> String {
        format!("QEMU node {}", self.qemu_disk.node())
    }

    async fn prepare(&mut self, repo: &Arc<Repository>) -> Result<Vec<PreparedDisk<QemuView>>> {
        let qemu_disk = self.qemu_disk;
        let options = &self.options;
        let disk = options.disk.name.clone();
        // Taken before cleaning up: a second run must not take apart the
        // export of a run still reading it.
        let locks = crate::backup::lock_disk(repo, &disk).await?;
        // Only this host's restore points under a former name are ours.
        let here = location(qemu_disk);
        let latest = crate::rename::latest(repo, &options.disk, move |m| {
            m.source.provider == "qemu" && m.source.location == here
        })
        .await?;
        // The checkpoint the latest restore point ends at, if it is ours.
        let previous = latest
            .as_ref()
            .filter(|rp| rp.manifest.source.provider == "qemu")
            .and_then(|rp| rp.manifest.source.snapshot.as_deref())
            .and_then(|name| name.parse::<CheckpointName>().ok());
        let removed = qemu_disk
            .cleanup_leftovers(&options.job)
            .await
            .map_err(qemu(&disk, "cleaning up after an interrupted run"))?;
        if !removed.is_empty() {
            info!(?removed, "cleaned up after an interrupted run");
        }
        let export = qemu_disk
            .prepare(&options.job, previous.as_ref())
            .await
            .map_err(qemu(&disk, "starting the point-in-time view"))?;
        let time = jiff::Timestamp::now();
        let changes = match self.changes(&export, previous.is_some()).await {
            Ok(c) => c,
            Err(e) => {
                abort(qemu_disk, export).await;
                return Err(e);
            }
        };
        let view = QemuView {
            socket: export.nbd_socket().to_path_buf(),
            export_name: export.export_name().to_string(),
            info: SourceInfo {
                provider: "qemu".into(),
                location: location(qemu_disk),
                snapshot: Some(export.checkpoint().to_string()),
                details: BTreeMap::from([("job".to_string(), options.job.clone())]),
                vm: options.vm.clone(),
            },
        };
        self.export = Some(export);
        Ok(vec![PreparedDisk {
            disk,
            id: qemu_disk.node().to_string(),
            locks,
            changes,
            time,
            connections: 1,
            vm: options.vm.clone(),
            // A QEMU checkpoint's bitmap is merged back on abort: nothing
            // could say later what changed since this view.
            resume: None,
            suspend_as: None,
            view,
        }])
    }

    async fn open(&self, view: &QemuView) -> Result<NbdSource> {
        let connect = ConnectOptions::unix(view.socket.clone(), view.export_name.clone());
        let mut source =
            NbdSource::connect(connect, format!("qemu node {}", self.qemu_disk.node())).await?;
        source.set_info(view.info.clone());
        Ok(source)
    }

    async fn finish(
        &mut self,
        outcomes: Vec<(QemuView, Option<RestorePointRow>)>,
    ) -> Vec<Result<()>> {
        let mut out = Vec::new();
        for (_, committed) in outcomes {
            let Some(export) = self.export.take() else {
                out.push(Err(Error::Internal("finish before prepare".into())));
                continue;
            };
            out.push(if committed.is_some() {
                self.qemu_disk.commit(export).await.map_err(qemu(
                    &self.options.disk.name,
                    "retiring the previous checkpoint",
                ))
            } else {
                abort(self.qemu_disk, export).await;
                Ok(())
            });
        }
        out
    }
}

/// Aborts `export`, keeping every change for the next run.
async fn abort(qemu_disk: &QemuDisk, export: BackupExport) {
    if let Err(a) = qemu_disk.abort(export).await {
        warn!(error = %a, "could not abort the QEMU backup cleanly; the next run cleans up");
    }
}

/// Backs up `node` of the QEMU behind `qemu_disk` (see [`QemuNode`]).
pub async fn backup_node(
    qemu_disk: &QemuDisk,
    repo: Arc<Repository>,
    options: &QemuOptions,
    progress: Arc<dyn Progress>,
    cancel: CancellationToken,
) -> Result<BackupOutcome> {
    let mut provider = QemuNode::new(qemu_disk, options);
    let mut ctx = DriveContext::new(
        options.backup.clone(),
        Arc::new(SharedProgress(progress)),
        cancel,
    );
    ctx.verify_samples = options.verify_samples;
    let runs = drive(&mut provider, repo, &ctx).await?;
    runs.into_iter()
        .next()
        .map(|r| r.outcome)
        .unwrap_or_else(|| Err(Error::Internal("a QEMU backup prepared no disk".into())))
}
