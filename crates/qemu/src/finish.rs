//! Ending a backup: commit, abort, and removing what a killed run left.
//!
//! The teardown is driven by what QEMU reports, not by what this process
//! remembers, so it is idempotent and also serves for leftovers.

use cbtvault_qmp::{Action, JobStatus};

use crate::disk::{BackupExport, JOB_TIMEOUT, QemuDisk};
use crate::error::{Context, Error, Result};
use crate::names::{CheckpointName, JobName, Names};

impl QemuDisk {
    /// The backup succeeded (and its restore point is durably recorded
    /// with [`BackupExport::checkpoint`]): removes the export and the
    /// fleecing, then the old checkpoint. The new checkpoint keeps
    /// recording; pass it as `previous` next time.
    ///
    /// The export is removed even if NBD clients are still connected.
    pub async fn commit(&self, export: BackupExport) -> Result<()> {
        tracing::info!(job = %export.job, checkpoint = %export.checkpoint, "committing QEMU backup");
        let torn_down = self.teardown(&export.names).await.map(drop);
        let bitmaps = match export.since() {
            Some(old) if self.has_bitmap(old).await? => self.remove_bitmaps(&[old.as_str()]).await,
            _ => Ok(()),
        };
        let server = self.stop_own_nbd_server(&export).await;
        torn_down.and(bitmaps).and(server)
    }

    /// The backup failed: removes the export and the fleecing, and folds
    /// the new checkpoint's changes back into the old one (merge, then
    /// re-enable, atomically) before removing the new one. No write is
    /// lost, and the `previous` the caller already holds stays the right
    /// base for the next incremental. After a first backup the new
    /// checkpoint is simply removed.
    pub async fn abort(&self, export: BackupExport) -> Result<()> {
        tracing::info!(job = %export.job, checkpoint = %export.checkpoint, "aborting QEMU backup");
        let torn_down = self.teardown(&export.names).await.map(drop);
        let bitmaps = self
            .undo_checkpoint(export.since(), &export.checkpoint)
            .await;
        let server = self.stop_own_nbd_server(&export).await;
        torn_down.and(bitmaps).and(server)
    }

    /// Removes the export, nodes, jobs and fleece image a killed earlier
    /// run of `job` left in QEMU, and returns what was found. Only call it
    /// when no backup of `job` is running. Checkpoints are not touched
    /// here: the next [`QemuDisk::prepare`] settles them, because only it
    /// knows which one the caller trusts.
    pub async fn cleanup_leftovers(&self, job: &str) -> Result<Vec<String>> {
        let job = JobName::new(job)?;
        let names = Names::new(&job, &self.work_dir);
        let removed = self.teardown(&names).await?;
        if !removed.is_empty() {
            tracing::info!(%job, ?removed, "removed leftovers of an earlier backup");
        }
        Ok(removed)
    }

    /// What of `names` exists in QEMU now.
    pub(crate) async fn find_leftovers(&self, names: &Names) -> Result<Vec<String>> {
        let mut found = Vec::new();
        let exports = self
            .qmp
            .query_block_exports()
            .await
            .context(|| "query-block-exports".into())?;
        if exports.iter().any(|e| e.id == names.export) {
            found.push(format!("export {}", names.export));
        }
        let nodes = self
            .qmp
            .query_named_block_nodes()
            .await
            .context(|| "query-named-block-nodes".into())?;
        for node in names.nodes() {
            if nodes.iter().any(|n| n.node_name == node) {
                found.push(format!("node {node}"));
            }
        }
        let jobs = self
            .qmp
            .query_jobs()
            .await
            .context(|| "query-jobs".into())?;
        for job in names.jobs() {
            if jobs.iter().any(|j| j.id == job) {
                found.push(format!("job {job}"));
            }
        }
        Ok(found)
    }

    /// Removes everything in `names` that exists, in the safe order:
    /// export, snapshot-access node, jobs (the backup job takes its
    /// copy-before-write filter with it), fleece nodes, fleece file. Goes
    /// on after a failed step and returns the first error.
    async fn teardown(&self, names: &Names) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let mut first_error = None;
        let mut note = |result: Result<()>, what: String, removed: &mut Vec<String>| match result {
            Ok(()) => removed.push(what),
            Err(error) => {
                tracing::warn!(%error, "cleanup step failed");
                first_error.get_or_insert(error);
            }
        };

        let exports = self
            .qmp
            .query_block_exports()
            .await
            .context(|| "query-block-exports".into())?;
        if exports.iter().any(|e| e.id == names.export) {
            let result = self
                .qmp
                .block_export_del(&names.export, true, JOB_TIMEOUT)
                .await
                .context(|| format!("removing the NBD export {}", names.export));
            note(result, format!("export {}", names.export), &mut removed);
        }
        if self.node_exists(&names.snap).await? {
            let result = self.delete_node(&names.snap).await;
            note(result, format!("node {}", names.snap), &mut removed);
        }
        let jobs = self
            .qmp
            .query_jobs()
            .await
            .context(|| "query-jobs".into())?;
        for job in names.jobs() {
            if let Some(info) = jobs.iter().find(|j| j.id == job) {
                let result = self
                    .end_job(job, info.status, job == names.backup_job)
                    .await;
                note(result, format!("job {job}"), &mut removed);
            }
        }
        for node in [&names.cbw, &names.fleece, &names.fleece_file] {
            if self.node_exists(node).await? {
                let result = self.delete_node(node).await;
                note(result, format!("node {node}"), &mut removed);
            }
        }
        match std::fs::remove_file(&names.fleece_path) {
            Ok(()) => removed.push(format!("file {}", names.fleece_path.display())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => note(
                Err(Error::Io {
                    path: names.fleece_path.clone(),
                    source,
                }),
                String::new(),
                &mut removed,
            ),
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(removed),
        }
    }

    async fn node_exists(&self, node: &str) -> Result<bool> {
        let nodes = self
            .qmp
            .query_named_block_nodes()
            .await
            .context(|| "query-named-block-nodes".into())?;
        Ok(nodes.iter().any(|n| n.node_name == node))
    }

    async fn delete_node(&self, node: &str) -> Result<()> {
        self.qmp
            .blockdev_del(node)
            .await
            .context(|| format!("removing block node {node}"))
    }

    /// Cancels (or, once concluded, dismisses) a job and waits until QEMU
    /// has forgotten it.
    async fn end_job(&self, id: &str, status: JobStatus, is_block_job: bool) -> Result<()> {
        let step = || format!("ending job {id}");
        if status != JobStatus::Concluded {
            // block-job-cancel is the normal end of a sync=none backup.
            let cancelled = if is_block_job {
                self.qmp.block_job_cancel(id, true).await
            } else {
                self.qmp.job_cancel(id).await
            };
            cancelled.context(step)?;
        }
        let job = self
            .qmp
            .wait_job(id, &[JobStatus::Concluded], JOB_TIMEOUT)
            .await
            .context(step)?;
        if job.is_some() {
            self.qmp.job_dismiss(id).await.context(step)?;
            self.qmp
                .wait_job_gone(id, JOB_TIMEOUT)
                .await
                .context(step)?;
        }
        Ok(())
    }

    async fn has_bitmap(&self, name: &CheckpointName) -> Result<bool> {
        Ok(self
            .checkpoints()
            .await?
            .iter()
            .any(|b| b.name == name.as_str()))
    }

    /// Gives `old` back the writes recorded in `new` and removes `new`.
    async fn undo_checkpoint(
        &self,
        old: Option<&CheckpointName>,
        new: &CheckpointName,
    ) -> Result<()> {
        let bitmaps = self.checkpoints().await?;
        if !bitmaps.iter().any(|b| b.name == new.as_str()) {
            return Ok(());
        }
        let usable_old = old.filter(|old| {
            bitmaps
                .iter()
                .any(|b| b.name == old.as_str() && !b.inconsistent)
        });
        if let Some(old) = usable_old {
            // Atomic, so no write falls between the merge and recording.
            self.qmp
                .transaction(&[
                    Action::bitmap_merge(&self.node, old.as_str(), &[new.as_str()]),
                    Action::bitmap_enable(&self.node, old.as_str()),
                ])
                .await
                .context(|| format!("merging checkpoint {new} back into {old}"))?;
        }
        self.remove_bitmaps(&[new.as_str()]).await
    }

    /// Stops the NBD server if this backup started it and no export is
    /// left on it.
    async fn stop_own_nbd_server(&self, export: &BackupExport) -> Result<()> {
        if !export.started_nbd_server {
            return Ok(());
        }
        let exports = self
            .qmp
            .query_block_exports()
            .await
            .context(|| "query-block-exports".into())?;
        if exports.iter().any(|e| e.kind == "nbd") {
            return Ok(());
        }
        self.qmp
            .nbd_server_stop()
            .await
            .context(|| "stopping the NBD server this backup started".into())?;
        match std::fs::remove_file(&export.nbd_socket) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
                path: export.nbd_socket.clone(),
                source: error,
            }),
            _ => Ok(()),
        }
    }
}
