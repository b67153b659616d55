//! What `cbtvault status` and `/status` show: per job (and maintenance
//! task) its schedule, next run, whether it runs now and its last run per
//! disk; the repository's size. One function for both, so they cannot drift apart.

use cbtvault_config::Config;
use cbtvault_repo::Repository;
use jiff::Timestamp;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::schedule::Plan;

/// What only a running daemon knows of a job.
#[derive(Clone, Debug, Default)]
pub struct Live {
    /// When the current run started, if one is going.
    pub running_since: Option<Timestamp>,
    /// The next scheduled run, as the daemon has planned it (with its
    /// random delay not yet drawn).
    pub next: Option<Timestamp>,
    /// The running run's disks: phase, bytes done of total, ETA.
    pub disks: Vec<Value>,
}

/// The status as JSON. `live` is `None` outside the daemon: the next runs
/// are then computed from the schedules, and whether a job runs now is
/// unknown (`null`).
pub fn status(
    config: &Config,
    repo: &Repository,
    live: Option<&dyn Fn(&str) -> Live>,
) -> Result<Value> {
    let wrap = |source| Error::Repository {
        path: config.repository.path.clone(),
        source,
    };
    let cat = repo.catalogue();
    let now = Timestamp::now();
    let mut jobs = Vec::new();
    let entries = config
        .jobs
        .iter()
        .map(|j| (&j.name, j.schedule.as_ref(), "backup"))
        .chain(config.maintenance.iter().map(|m| {
            let task = match m.task {
                cbtvault_config::Task::Gc => "gc",
                cbtvault_config::Task::Verify => "verify",
            };
            (&m.name, Some(&m.schedule), task)
        }));
    for (name, schedule, task) in entries {
        let plan = schedule.map(|s| Plan::new(name, s)).transpose()?;
        let (next, running, disks) = match live {
            Some(f) => {
                let l = f(name);
                (
                    l.next,
                    json!(l.running_since.map(|t| t.to_string())),
                    json!(l.disks),
                )
            }
            None => (
                plan.as_ref().and_then(|p| p.next_after(now)),
                Value::Null,
                Value::Null,
            ),
        };
        let last = cat.last_job_run(name).map_err(wrap)?;
        let last = last.map(|r| {
            let report: Value = serde_json::from_str(&r.report).unwrap_or(Value::Null);
            json!({
                "started": r.started,
                "finished": r.finished,
                "outcome": r.outcome,
                "disks_ok": r.disks_ok,
                "disks_failed": r.disks_failed,
                "error": report.get("error"),
                "disks": report.get("disks").cloned().unwrap_or(json!([])),
            })
        });
        jobs.push(json!({
            "job": name,
            "task": task,
            "schedule": plan.as_ref().map(|p| p.pattern()),
            "time_zone": plan.as_ref().map(|p| p.time_zone()),
            "next_run": next.map(|t| t.to_string()),
            "running_since": running,
            "running_disks": disks,
            "last_run": last,
        }));
    }
    let size: u64 = cat.packs().map_err(wrap)?.iter().map(|(_, s)| s).sum();
    let points = cat.restore_point_ids().map_err(wrap)?.len();
    Ok(json!({
        "jobs": jobs,
        "repository": {
            "path": config.repository.path,
            "size_bytes": size,
            "restore_points": points,
        },
    }))
}

/// Bytes of packs in the repository.
pub fn repository_size(repo: &Repository) -> Option<u64> {
    let packs = repo.catalogue().packs().ok()?;
    Some(packs.iter().map(|(_, s)| s).sum())
}
