//! A copy job (`kind = "copy"`): restore points of the configured
//! repository copied into another one — off-site, often `s3://` — then the
//! job's retention applied there.
//!
//! Retention decides what travels, not only what stays: for each disk the
//! policy is applied to the restore points of the source and of the target
//! together, and only those it keeps are copied. Otherwise a point the
//! target forgot last night would be copied again tonight, forgotten again,
//! and so on for ever. The copy itself is [`Repository::copy_from`]: only
//! blobs the target lacks travel, each checked against its id when read and
//! read back from the target before the manifest commits, so a run killed
//! half-way leaves the target consistent and the next run sends only what
//! is still missing. Between repositories with different keys a restore
//! point gets a new id at the target ([`Repository::copies_of`] maps it
//! back), so retention counts each point once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use cbtvault_config::{Config, JobKind, Retention};
use cbtvault_engine::Progress;
use cbtvault_repo::{CopyReport, KeepPolicy, Repository, RestorePointRow};
use serde::Serialize;

use crate::error::{Error, Result};

/// A copy job from the configuration.
#[derive(Clone, Debug)]
pub struct CopySpec {
    pub name: String,
    /// The target repository.
    pub to: PathBuf,
    /// The disks copied; every disk of the source when empty.
    pub disks: Vec<String>,
    pub retention: Option<Retention>,
}

impl CopySpec {
    /// Job `name` of `config` if it is a copy job, `None` if it is another
    /// kind.
    pub fn from_config(config: &Config, name: &str) -> Result<Option<CopySpec>> {
        let job = config.job(name)?;
        Ok(match &job.kind {
            JobKind::Copy { to, disks } => Some(CopySpec {
                name: job.name.clone(),
                to: to.clone(),
                disks: disks.clone(),
                retention: job.retention,
            }),
            _ => None,
        })
    }

    fn policy(&self) -> KeepPolicy {
        let keep = self.retention.unwrap_or_default();
        KeepPolicy {
            last: keep.keep_last,
            daily: keep.keep_daily,
            weekly: keep.keep_weekly,
            monthly: keep.keep_monthly,
        }
    }
}

/// What a copy job did.
#[derive(Clone, Debug, Serialize)]
pub struct CopyJobReport {
    pub job: String,
    /// The target, as configured.
    pub to: String,
    pub started: jiff::Timestamp,
    pub finished: jiff::Timestamp,
    /// Restore points of the source that retention would not keep on the
    /// target, so not sent.
    pub skipped: usize,
    pub copy: CopyReport,
    /// Restore points forgotten on the target, per disk.
    pub forgotten: BTreeMap<String, usize>,
    /// Why the job's retention forgot nothing at the target although it
    /// has one (an append-only target).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_skipped: Option<String>,
}

/// Runs copy job `spec` from `source`; `progress` hears of the stored
/// bytes sent (its total: what the points stored when they were made, the
/// most a target that has none of them needs). Blocking: call it from a
/// blocking thread. One run of the job at a time (the job's lock, in the
/// source).
pub fn run_copy(
    spec: &CopySpec,
    source: &Arc<Repository>,
    progress: &dyn Progress,
) -> Result<CopyJobReport> {
    let started = jiff::Timestamp::now();
    let _job = match source.lock_job(&spec.name) {
        Ok(lock) => lock,
        Err(cbtvault_repo::Error::Locked { .. }) => {
            return Err(Error::JobRunning {
                job: spec.name.clone(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let target = cbtvault_s3::open(&spec.to).map_err(|source| Error::CopyTarget {
        job: spec.name.clone(),
        to: spec.to.clone(),
        source: Box::new(source),
    })?;
    let disks: Vec<String> = if spec.disks.is_empty() {
        source.catalogue().disks()?
    } else {
        let known: BTreeSet<String> = source.catalogue().disks()?.into_iter().collect();
        if let Some(missing) = spec.disks.iter().find(|d| !known.contains(*d)) {
            return Err(Error::CopyUnknownDisk {
                job: spec.name.clone(),
                disk: missing.clone(),
            });
        }
        spec.disks.clone()
    };
    let policy = spec.policy();
    // A copy across keys has an id of the target's: it counts as the
    // source's restore point it was made from.
    let copies: BTreeMap<String, String> = target
        .copies_of(source)?
        .into_iter()
        .map(|(from, there)| (there, from))
        .collect();
    let (mut points, mut skipped) = (Vec::new(), 0);
    for disk in &disks {
        let mut here = source.catalogue().restore_points(Some(disk))?;
        let mut there = target.catalogue().restore_points(Some(disk))?;
        for point in &mut there {
            if let Some(from) = copies.get(&point.id) {
                point.id = from.clone();
            }
        }
        let kept = policy.kept(&union(&here, &there));
        let before = here.len();
        here.retain(|p| kept.contains(&p.id));
        skipped += before - here.len();
        points.extend(here);
    }
    progress.start(
        "copy",
        points.iter().map(|p| p.manifest.stats.bytes_stored).sum(),
    );
    let copy = target.copy_from(source, &points, &|bytes| progress.advance(bytes));
    progress.finish();
    let copy = copy?;
    let mut forgotten = BTreeMap::new();
    let retention_skipped = match target.require_removals("the copy job's retention") {
        Err(e) if !policy.is_empty() => {
            tracing::warn!(job = %spec.name, error = %e, "retention not applied at the target");
            Some(e.to_string())
        }
        _ => None,
    };
    if !policy.is_empty() && retention_skipped.is_none() {
        for disk in &disks {
            let selection = cbtvault_repo::ForgetSelection::Policy {
                policy,
                disk: Some(disk.clone()),
            };
            let plan = target.forget_plan(&selection, false)?;
            let n = target.forget(&plan)?;
            if n > 0 {
                forgotten.insert(disk.clone(), n);
            }
        }
    }
    Ok(CopyJobReport {
        job: spec.name.clone(),
        to: spec.to.display().to_string(),
        started,
        finished: jiff::Timestamp::now(),
        skipped,
        copy,
        forgotten,
        retention_skipped,
    })
}

/// One disk's restore points in the source and the target, each once.
fn union(a: &[RestorePointRow], b: &[RestorePointRow]) -> Vec<RestorePointRow> {
    let mut seen = BTreeSet::new();
    a.iter()
        .chain(b)
        .filter(|p| seen.insert(p.id.clone()))
        .cloned()
        .collect()
}
