//! Backing up a QEMU/KVM block node from a persistent dirty bitmap.
//!
//! The QEMU side (one atomic `transaction` that starts a checkpoint bitmap
//! and a fleecing point-in-time view, exported over NBD) is in
//! `cbtvault-qemu`. Here: read the view — only the dirty blocks for an
//! incremental, every allocated block otherwise —, commit the restore
//! point, check a sample against the view, and only then let QEMU drop the
//! previous checkpoint. On any failure the export is aborted, which keeps
//! every change for the next run.

use std::collections::BTreeMap;
use std::sync::Arc;

use cbtvault_nbd::ConnectOptions;
use cbtvault_qemu::{BackupKind, CheckpointName, QemuDisk};
use cbtvault_repo::{Repository, SourceInfo};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::backup::{BackupJob, BackupOptions, BackupOutcome, Changes, Parent};
use crate::error::{Error, Result};
use crate::nbd::NbdSource;
use crate::progress::Progress;
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

/// Backs up `node` of the QEMU behind `qemu_disk`.
pub async fn backup_node(
    qemu_disk: &QemuDisk,
    repo: Arc<Repository>,
    options: &QemuOptions,
    progress: Arc<dyn Progress>,
    cancel: CancellationToken,
) -> Result<BackupOutcome> {
    let disk = options.disk.name.clone();
    let span = tracing::info_span!("qemu", job = %options.job, node = %qemu_disk.node());
    async move {
        // Taken before cleaning up: a second run must not take apart the
        // export of a run still reading it.
        let locks = crate::backup::lock_disk(&repo, &disk).await?;
        // Only this host's restore points under a former name are ours.
        let here = location(qemu_disk);
        let latest = crate::rename::latest(&repo, &options.disk, move |m| {
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
        match read_export(qemu_disk, &repo, &export, previous.is_some(), options, progress, cancel, locks).await {
            Ok(outcome) => {
                qemu_disk
                    .commit(export)
                    .await
                    .map_err(qemu(&disk, "retiring the previous checkpoint"))?;
                Ok(outcome)
            }
            Err(e) => {
                if let Err(a) = qemu_disk.abort(export).await {
                    warn!(error = %a, "could not abort the QEMU backup cleanly; the next run cleans up");
                }
                Err(e)
            }
        }
    }
    .instrument(span)
    .await
}

/// Where a restore point of this node came from, as its manifest says.
fn location(qemu_disk: &QemuDisk) -> String {
    format!("{} node {}", qemu_disk.qmp().address(), qemu_disk.node())
}

#[allow(clippy::too_many_arguments)]
async fn read_export(
    qemu_disk: &QemuDisk,
    repo: &Arc<Repository>,
    export: &cbtvault_qemu::BackupExport,
    had_previous: bool,
    options: &QemuOptions,
    progress: Arc<dyn Progress>,
    cancel: CancellationToken,
    locks: Arc<crate::backup::DiskLocks>,
) -> Result<BackupOutcome> {
    let disk = &options.disk.name;
    let mut connect = ConnectOptions::unix(export.nbd_socket().to_path_buf(), export.export_name());
    if let Some(context) = export.dirty_bitmap_context() {
        connect.meta_contexts.push(context.to_string());
    }
    let mut source = NbdSource::connect(connect, format!("qemu node {}", qemu_disk.node())).await?;
    source.set_info(SourceInfo {
        provider: "qemu".into(),
        location: location(qemu_disk),
        snapshot: Some(export.checkpoint().to_string()),
        details: BTreeMap::from([("job".to_string(), options.job.clone())]),
        ..Default::default()
    });
    let changes = match export.kind() {
        BackupKind::Incremental {
            dirty_bitmap_context,
            ..
        } => {
            let bitmap = dirty_bitmap_context
                .strip_prefix("qemu:dirty-bitmap:")
                .unwrap_or(dirty_bitmap_context);
            Changes::Blocks {
                map: source.dirty_blocks(bitmap).await?,
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
    };
    let client = source.client().clone();
    let focus = match &changes {
        Changes::Blocks { map, .. } => Some(map.clone()),
        Changes::Full { .. } => None,
    };
    let job = BackupJob {
        disk: disk.clone(),
        changes,
        parent: Parent::Latest,
        time: Some(jiff::Timestamp::now()),
        options: options.backup.clone(),
        held: Some(locks),
    };
    let outcome =
        crate::backup::backup(repo.clone(), Arc::new(source), job, progress, cancel).await;
    let checked = match &outcome {
        Ok(o) => {
            crate::nbd::verify_sample(
                &client,
                repo,
                &o.restore_point,
                &o.manifest,
                options.verify_samples,
                focus.as_ref(),
            )
            .await
        }
        Err(_) => Ok(()),
    };
    client.disconnect().await;
    let outcome = outcome?;
    checked?;
    Ok(outcome)
}
