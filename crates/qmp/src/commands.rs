//! Typed helpers for the commands an incremental backup uses, and job and
//! export waiting built on queries plus events.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::client::Qmp;
use crate::error::{Error, ErrorClass, Result};
use crate::types::{
    BlockExportInfo, BlockInfo, BlockJobInfo, BlockNode, JobInfo, JobStatus, NameInfo, UuidInfo,
    VersionInfo, VmIdentity,
};

/// One action of a QMP `transaction` (qapi/transaction.json): `type` and
/// `data`. The constructors cover the bitmap and backup actions; anything
/// else can be built with [`Action::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub kind: String,
    pub data: Value,
}

impl Action {
    pub fn new(kind: impl Into<String>, data: Value) -> Self {
        Self {
            kind: kind.into(),
            data,
        }
    }

    /// `block-dirty-bitmap-add`, enabled.
    pub fn bitmap_add(node: &str, name: &str, granularity: u32, persistent: bool) -> Self {
        Self::new(
            "block-dirty-bitmap-add",
            json!({"node": node, "name": name, "granularity": granularity, "persistent": persistent}),
        )
    }

    /// `block-dirty-bitmap-disable`: stop recording (freeze).
    pub fn bitmap_disable(node: &str, name: &str) -> Self {
        Self::new(
            "block-dirty-bitmap-disable",
            json!({"node": node, "name": name}),
        )
    }

    /// `block-dirty-bitmap-enable`: record again.
    pub fn bitmap_enable(node: &str, name: &str) -> Self {
        Self::new(
            "block-dirty-bitmap-enable",
            json!({"node": node, "name": name}),
        )
    }

    /// `block-dirty-bitmap-merge`: `target |= sources` (all on `node`).
    pub fn bitmap_merge(node: &str, target: &str, sources: &[&str]) -> Self {
        Self::new(
            "block-dirty-bitmap-merge",
            json!({"node": node, "target": target, "bitmaps": sources}),
        )
    }

    /// `blockdev-backup`. With `sync: "none"` and a `filter_node_name` this
    /// starts fleecing: the copy-before-write filter keeps old data of
    /// `device` in `target` from this instant on.
    pub fn blockdev_backup(
        job_id: &str,
        device: &str,
        target: &str,
        sync: &str,
        filter_node_name: Option<&str>,
    ) -> Self {
        let mut data = json!({"job-id": job_id, "device": device, "target": target, "sync": sync});
        if let (Some(filter), Some(object)) = (filter_node_name, data.as_object_mut()) {
            object.insert("filter-node-name".into(), filter.into());
        }
        Self::new("blockdev-backup", data)
    }
}

impl Qmp {
    /// `query-version`.
    pub async fn query_version(&self) -> Result<VersionInfo> {
        self.execute_as("query-version", Value::Null).await
    }

    /// The VM's name and uuid (`query-name`, `query-uuid`), as `-name` and
    /// `-uuid` set them. `None` from a qemu-storage-daemon, which runs no
    /// VM and has neither command; an empty name or the all-zero uuid
    /// (never set) is left out.
    pub async fn query_vm_identity(&self) -> Result<Option<VmIdentity>> {
        let name: NameInfo = match self.execute_as("query-name", Value::Null).await {
            Ok(n) => n,
            Err(Error::Command {
                class: ErrorClass::CommandNotFound,
                ..
            }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let uuid: UuidInfo = self.execute_as("query-uuid", Value::Null).await?;
        let uuid = (uuid.uuid != "00000000-0000-0000-0000-000000000000").then_some(uuid.uuid);
        let name = name.name.filter(|n| !n.is_empty());
        Ok((name.is_some() || uuid.is_some()).then_some(VmIdentity { name, uuid }))
    }

    /// `query-named-block-nodes` with `flat: true`: every node once.
    pub async fn query_named_block_nodes(&self) -> Result<Vec<BlockNode>> {
        self.execute_as("query-named-block-nodes", json!({"flat": true}))
            .await
    }

    /// `query-block`: the guest's drives (none in a qemu-storage-daemon).
    pub async fn query_block(&self) -> Result<Vec<BlockInfo>> {
        self.execute_as("query-block", Value::Null).await
    }

    /// The QOM type of the object at `path` (`qom-get` of its `type`
    /// property, which every object has): `virtio-blk-pci`, `ide-hd`, ….
    pub async fn qom_type(&self, path: &str) -> Result<String> {
        self.execute_as("qom-get", json!({"path": path, "property": "type"}))
            .await
    }

    /// `query-block-exports`.
    pub async fn query_block_exports(&self) -> Result<Vec<BlockExportInfo>> {
        self.execute_as("query-block-exports", Value::Null).await
    }

    /// `query-jobs`: every job, block jobs and others (such as
    /// `blockdev-create`).
    pub async fn query_jobs(&self) -> Result<Vec<JobInfo>> {
        self.execute_as("query-jobs", Value::Null).await
    }

    /// `query-block-jobs`.
    pub async fn query_block_jobs(&self) -> Result<Vec<BlockJobInfo>> {
        self.execute_as("query-block-jobs", Value::Null).await
    }

    /// `query-qmp-schema`, undecoded.
    pub async fn query_qmp_schema(&self) -> Result<Value> {
        self.execute("query-qmp-schema", Value::Null).await
    }

    /// `transaction`: all actions happen atomically, or none.
    pub async fn transaction(&self, actions: &[Action]) -> Result<()> {
        let actions: Vec<Value> = actions
            .iter()
            .map(|a| json!({"type": a.kind, "data": a.data}))
            .collect();
        self.execute("transaction", json!({"actions": actions}))
            .await?;
        Ok(())
    }

    /// `block-dirty-bitmap-add` outside a transaction.
    pub async fn block_dirty_bitmap_add(
        &self,
        node: &str,
        name: &str,
        granularity: u32,
        persistent: bool,
    ) -> Result<()> {
        self.run(Action::bitmap_add(node, name, granularity, persistent))
            .await
    }

    /// `block-dirty-bitmap-remove`.
    pub async fn block_dirty_bitmap_remove(&self, node: &str, name: &str) -> Result<()> {
        self.execute(
            "block-dirty-bitmap-remove",
            json!({"node": node, "name": name}),
        )
        .await?;
        Ok(())
    }

    /// `block-dirty-bitmap-merge` outside a transaction.
    pub async fn block_dirty_bitmap_merge(
        &self,
        node: &str,
        target: &str,
        sources: &[&str],
    ) -> Result<()> {
        self.run(Action::bitmap_merge(node, target, sources)).await
    }

    /// `block-dirty-bitmap-enable` outside a transaction.
    pub async fn block_dirty_bitmap_enable(&self, node: &str, name: &str) -> Result<()> {
        self.run(Action::bitmap_enable(node, name)).await
    }

    /// `block-dirty-bitmap-disable` outside a transaction.
    pub async fn block_dirty_bitmap_disable(&self, node: &str, name: &str) -> Result<()> {
        self.run(Action::bitmap_disable(node, name)).await
    }

    /// Runs a transaction action as the command of the same name.
    async fn run(&self, action: Action) -> Result<()> {
        self.execute(&action.kind, action.data).await?;
        Ok(())
    }

    /// `blockdev-add` with the given options (an object of `BlockdevOptions`).
    pub async fn blockdev_add(&self, options: Value) -> Result<()> {
        self.execute("blockdev-add", options).await?;
        Ok(())
    }

    /// `blockdev-del`.
    pub async fn blockdev_del(&self, node_name: &str) -> Result<()> {
        self.execute("blockdev-del", json!({"node-name": node_name}))
            .await?;
        Ok(())
    }

    /// Runs `blockdev-create` as job `job_id` to its end, dismisses it,
    /// and fails with the job's error if it had one.
    pub async fn blockdev_create(
        &self,
        job_id: &str,
        options: Value,
        timeout: Duration,
    ) -> Result<()> {
        self.execute(
            "blockdev-create",
            json!({"job-id": job_id, "options": options}),
        )
        .await?;
        let end = self
            .wait_job(job_id, &[JobStatus::Concluded], timeout)
            .await?;
        let Some(job) = end else {
            // Gone already: auto-dismissed, so it cannot be inspected.
            return Ok(());
        };
        self.job_dismiss(job_id).await?;
        match job.error {
            None => Ok(()),
            Some(desc) => Err(Error::Command {
                command: "blockdev-create".into(),
                class: crate::ErrorClass::GenericError,
                desc,
            }),
        }
    }

    /// `block-export-add` with the given options (`BlockExportOptions`).
    pub async fn block_export_add(&self, options: Value) -> Result<()> {
        self.execute("block-export-add", options).await?;
        Ok(())
    }

    /// `block-export-del` and waits until the export is really gone
    /// (deletion is asynchronous). `hard` drops connected clients instead
    /// of failing while there are any.
    pub async fn block_export_del(&self, id: &str, hard: bool, timeout: Duration) -> Result<()> {
        let is_ours = |e: &crate::Event| e.data_str("id") == Some(id);
        self.discard_events("BLOCK_EXPORT_DELETED", is_ours);
        let mode = if hard { "hard" } else { "safe" };
        self.execute("block-export-del", json!({"id": id, "mode": mode}))
            .await?;
        let deadline = Instant::now() + timeout;
        loop {
            if !self.query_block_exports().await?.iter().any(|e| e.id == id) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            self.wait_event("BLOCK_EXPORT_DELETED", is_ours, left)
                .await?;
        }
    }

    /// `nbd-server-start` on a unix socket.
    pub async fn nbd_server_start_unix(&self, path: &Path) -> Result<()> {
        let addr = json!({"type": "unix", "data": {"path": path}});
        self.execute("nbd-server-start", json!({"addr": addr}))
            .await?;
        Ok(())
    }

    /// `nbd-server-stop`.
    pub async fn nbd_server_stop(&self) -> Result<()> {
        self.execute("nbd-server-stop", Value::Null).await?;
        Ok(())
    }

    /// `job-dismiss`: forget a concluded job.
    pub async fn job_dismiss(&self, id: &str) -> Result<()> {
        self.execute("job-dismiss", json!({"id": id})).await?;
        Ok(())
    }

    /// `job-cancel`.
    pub async fn job_cancel(&self, id: &str) -> Result<()> {
        self.execute("job-cancel", json!({"id": id})).await?;
        Ok(())
    }

    /// `block-job-cancel`. For a `sync: none` backup this is the normal
    /// end; `force` also cancels a paused job.
    pub async fn block_job_cancel(&self, device: &str, force: bool) -> Result<()> {
        self.execute(
            "block-job-cancel",
            json!({"device": device, "force": force}),
        )
        .await?;
        Ok(())
    }

    /// `human-monitor-command`: an HMP command line, its output as text.
    pub async fn human_monitor_command(&self, command_line: &str) -> Result<String> {
        self.execute_as(
            "human-monitor-command",
            json!({"command-line": command_line}),
        )
        .await
    }

    /// Waits until job `id` is in one of `statuses` and returns it, or
    /// returns `None` once it no longer exists. The state is queried, and
    /// `JOB_STATUS_CHANGE` events only wake the wait, so stale events of an
    /// earlier job with the same id cannot mislead it.
    pub async fn wait_job(
        &self,
        id: &str,
        statuses: &[JobStatus],
        timeout: Duration,
    ) -> Result<Option<JobInfo>> {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.query_jobs().await?.into_iter().find(|j| j.id == id);
            match job {
                None => return Ok(None),
                Some(job) if statuses.contains(&job.status) => return Ok(Some(job)),
                Some(_) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            self.wait_event("JOB_STATUS_CHANGE", |e| e.data_str("id") == Some(id), left)
                .await
                .map_err(|error| match error {
                    Error::Timeout {
                        address,
                        after: _,
                        what: _,
                    } => Error::Timeout {
                        address,
                        what: format!("job {id} to reach {statuses:?}"),
                        after: timeout,
                    },
                    other => other,
                })?;
        }
    }

    /// Waits until job `id` no longer exists.
    pub async fn wait_job_gone(&self, id: &str, timeout: Duration) -> Result<()> {
        // An empty status list only returns once the job is gone.
        self.wait_job(id, &[], timeout).await.map(drop)
    }
}
