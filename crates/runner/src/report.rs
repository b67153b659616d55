//! What a run did, per disk.

use std::sync::Arc;

use cbtvault_engine::{BackupOutcome, Progress, ProgressFactory};
use cbtvault_repo::BackupMode;

use crate::alerts::Alert;
use crate::error::Error;

/// One disk's result in a job run.
#[derive(Debug)]
pub struct DiskReport {
    /// What was backed up, in the user's words (`VDI UUID (VM UUID)`,
    /// `QEMU node NODE`).
    pub label: String,
    /// Tries made (1 unless the disk was retried).
    pub attempts: u32,
    /// The committed restore point, or why there is none.
    pub outcome: Result<BackupOutcome, Error>,
    /// What retention did after the backup: restore points forgotten, or
    /// why it could not run. `None` when the job keeps everything.
    pub retention: Option<Result<usize, Error>>,
    /// What the backup found that someone should look at (a churn jump, a
    /// failed CBT audit), whether or not it succeeded.
    pub alerts: Vec<Alert>,
}

/// How a disk's backup went, in one word and a reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskStatus {
    /// An incremental: only the changed blocks were read.
    Ok,
    /// The whole disk was read, and why.
    Full(String),
    /// No restore point, and why.
    Failed(String),
}

impl DiskReport {
    /// The outcome as the status line says it.
    pub fn status(&self) -> DiskStatus {
        match &self.outcome {
            Ok(o) => match &o.manifest.mode {
                BackupMode::Full { reason } => DiskStatus::Full(
                    reason
                        .clone()
                        .unwrap_or_else(|| "no changed-block source".into()),
                ),
                BackupMode::Incremental { .. } => DiskStatus::Ok,
            },
            Err(e) => DiskStatus::Failed(e.to_string()),
        }
    }
}

/// A job run's result.
#[derive(Debug)]
pub struct JobReport {
    pub job: String,
    pub started: jiff::Timestamp,
    pub finished: jiff::Timestamp,
    pub disks: Vec<DiskReport>,
}

impl JobReport {
    /// The disks that have no new restore point.
    pub fn failed(&self) -> impl Iterator<Item = &DiskReport> {
        self.disks.iter().filter(|d| d.outcome.is_err())
    }
}

/// Where a run's progress goes: one [`Progress`] per disk (the engine's
/// [`ProgressFactory`]), so a front end can draw a line for each and a
/// total, and word of each disk once it is done.
pub trait Observer: ProgressFactory {
    /// A disk is done (after its retries).
    fn disk_done(&self, _report: &DiskReport) {}
}

/// An observer that draws nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

impl ProgressFactory for Silent {
    fn disk(&self, _disk: &str) -> Arc<dyn Progress> {
        Arc::new(cbtvault_engine::NoProgress)
    }
}

impl Observer for Silent {}
