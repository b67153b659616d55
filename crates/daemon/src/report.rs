//! A job run as JSON: what the history keeps, the webhook sends and
//! `/status` shows.

use cbtvault_repo::JobRunRow;
use cbtvault_runner::{DiskStatus, JobReport};
use serde_json::{Value, json};

/// How a run ended, in one word.
pub fn outcome(report: &JobReport, cancelled: bool) -> &'static str {
    let failed = report.failed().count();
    if cancelled && failed > 0 {
        "cancelled"
    } else if failed == 0 {
        "ok"
    } else if failed < report.disks.len() {
        "partial"
    } else {
        "failed"
    }
}

/// The run's report: per disk, its status, restore point and figures.
pub fn to_json(report: &JobReport, outcome: &str) -> Value {
    let disks: Vec<Value> = report
        .disks
        .iter()
        .map(|d| {
            let (status, reason) = match d.status() {
                DiskStatus::Ok => ("ok", None),
                DiskStatus::Full(why) => ("full", Some(why)),
                DiskStatus::Failed(why) => ("failed", Some(why)),
            };
            let mut v = json!({
                "label": d.label,
                "status": status,
                "reason": reason,
                "attempts": d.attempts,
            });
            if let Ok(o) = &d.outcome {
                let s = &o.manifest.stats;
                v["disk"] = json!(o.manifest.disk);
                v["restore_point"] = json!(o.restore_point);
                v["time"] = json!(o.manifest.time.to_string());
                v["bytes_read"] = json!(s.bytes_read);
                v["bytes_stored"] = json!(s.bytes_stored);
                v["blocks_read"] = json!(s.blocks_read);
                v["blocks_total"] = json!(s.blocks_total);
                v["duration_ms"] = json!(s.duration_ms);
            }
            if let Some(r) = &d.retention {
                v["retention"] = match r {
                    Ok(n) => json!({ "forgotten": n }),
                    Err(e) => json!({ "error": e.to_string() }),
                };
            }
            v
        })
        .collect();
    json!({
        "job": report.job,
        "started": report.started.to_string(),
        "finished": report.finished.to_string(),
        "outcome": outcome,
        "disks_ok": report.disks.len() - report.failed().count(),
        "disks_failed": report.failed().count(),
        "disks": disks,
    })
}

/// The history row of a run.
pub fn to_row(report: &JobReport, outcome: &str) -> JobRunRow {
    let failed = report.failed().count();
    JobRunRow {
        id: 0,
        job: report.job.clone(),
        started: report.started.to_string(),
        finished: report.finished.to_string(),
        outcome: outcome.into(),
        disks_ok: u32::try_from(report.disks.len() - failed).unwrap_or(u32::MAX),
        disks_failed: u32::try_from(failed).unwrap_or(u32::MAX),
        report: to_json(report, outcome).to_string(),
    }
}

/// The history row of a run that could not start (its lock was held, the
/// pool refused the login): no disk was tried.
pub fn failed_to_start(job: &str, started: jiff::Timestamp, reason: &str) -> JobRunRow {
    let finished = jiff::Timestamp::now();
    JobRunRow {
        id: 0,
        job: job.into(),
        started: started.to_string(),
        finished: finished.to_string(),
        outcome: "failed".into(),
        disks_ok: 0,
        disks_failed: 0,
        report: json!({
            "job": job,
            "started": started.to_string(),
            "finished": finished.to_string(),
            "outcome": "failed",
            "error": reason,
            "disks_ok": 0,
            "disks_failed": 0,
            "disks": [],
        })
        .to_string(),
    }
}

/// An error and its causes on one line.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}
