//! `daemon`, `run`, `runs` and `status`: the daemon lives in
//! `cbtvault-daemon`; this parses, calls and prints.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use cbtvault_config::Config;
use serde_json::json;

use crate::cli::Global;
use crate::failure;
use crate::output::{self, outln};

/// `cbtvault daemon --config FILE`.
pub fn daemon(config: &Path) -> Result<ExitCode> {
    let rt = super::runtime()?;
    rt.block_on(cbtvault_daemon::run(config))
        .context("the daemon stopped")?;
    Ok(ExitCode::SUCCESS)
}

/// `cbtvault run JOB --config FILE`.
pub fn run_now(g: &Global, config: &Path, job: &str) -> Result<ExitCode> {
    let config = Config::load(config)?;
    // A typo is caught here, with the jobs listed, before asking anyone.
    if config.job(job).is_err() && !config.maintenance.iter().any(|m| m.name == job) {
        let names: Vec<String> = config
            .jobs
            .iter()
            .map(|j| j.name.clone())
            .chain(config.maintenance.iter().map(|m| m.name.clone()))
            .collect();
        return Err(failure::usage_error(format!(
            "no job or maintenance task named {job:?} in the configuration ({})",
            super::listing("names", &names)
        )));
    }
    let rt = super::runtime()?;
    let (status, answer) = rt.block_on(cbtvault_daemon::ask_to_run(&config, job))?;
    if g.json {
        output::print_json(&answer);
    }
    match status {
        202 => {
            if !g.json && !g.quiet {
                outln!("job {job} started (`cbtvault runs --job {job}` shows how it ends)");
            }
            Ok(ExitCode::SUCCESS)
        }
        409 => Err(failure::tagged(
            failure::kind::LOCKED,
            format!("job {job:?} is running now; its next run can be asked for once it ends"),
        )),
        _ => bail!(
            "the daemon at {} answered {status}: {}",
            config.daemon.listen,
            answer
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("no reason given")
        ),
    }
}

/// `cbtvault runs [--job J]`.
pub fn runs(g: &Global, repo: &Path, job: Option<&str>, limit: usize) -> Result<ExitCode> {
    let repo = super::open(repo)?;
    let rows = repo.catalogue().job_runs(job, limit)?;
    if g.json {
        let list: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "id": r.id,
                    "job": r.job,
                    "started": r.started,
                    "finished": r.finished,
                    "outcome": r.outcome,
                    "disks_ok": r.disks_ok,
                    "disks_failed": r.disks_failed,
                    "report": serde_json::from_str::<serde_json::Value>(&r.report)
                        .unwrap_or(serde_json::Value::Null),
                })
            })
            .collect();
        output::print_json(&json!(list));
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        if !g.quiet {
            outln!("no job runs recorded (the daemon records one per run)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<20} {:<25} {:>8} {:<10} {:>4} {:>6}",
        "JOB",
        "STARTED",
        "TOOK",
        "OUTCOME",
        "OK",
        "FAILED"
    );
    for r in &rows {
        let took = match (
            r.started.parse::<jiff::Timestamp>(),
            r.finished.parse::<jiff::Timestamp>(),
        ) {
            (Ok(a), Ok(b)) => format!("{}s", b.duration_since(a).as_secs()),
            _ => "?".into(),
        };
        let started = r
            .started
            .parse::<jiff::Timestamp>()
            .map(super::local_time)
            .unwrap_or_else(|_| r.started.clone());
        outln!(
            "{:<20} {:<25} {:>8} {:<10} {:>4} {:>6}",
            r.job,
            started,
            took,
            r.outcome,
            r.disks_ok,
            r.disks_failed
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `cbtvault status --config FILE`.
pub fn status(g: &Global, config: &Path) -> Result<ExitCode> {
    let config = Config::load(config)?;
    let repo = super::open(&config.repository.path)?;
    let value = cbtvault_daemon::status::status(&config, &repo, None)?;
    if g.json {
        output::print_json(&value);
        return Ok(ExitCode::SUCCESS);
    }
    let at = |v: &serde_json::Value| {
        v.as_str()
            .and_then(|s| s.parse::<jiff::Timestamp>().ok())
            .map(super::local_time)
            .unwrap_or_else(|| "-".into())
    };
    for job in value["jobs"].as_array().into_iter().flatten() {
        outln!(
            "job {}: next run {}",
            job["job"].as_str().unwrap_or("?"),
            at(&job["next_run"])
        );
        match job.get("last_run").filter(|l| !l.is_null()) {
            None => outln!("  no run recorded"),
            Some(last) => {
                outln!(
                    "  last run {}: {}{}",
                    at(&last["started"]),
                    last["outcome"].as_str().unwrap_or("?"),
                    last["error"]
                        .as_str()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                );
                for d in last["disks"].as_array().into_iter().flatten() {
                    outln!(
                        "    {}: {}{}",
                        d["label"].as_str().unwrap_or("?"),
                        d["status"].as_str().unwrap_or("?"),
                        d["reason"]
                            .as_str()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    let r = &value["repository"];
    outln!(
        "repository {}: {} restore points, {} bytes",
        r["path"].as_str().unwrap_or("?"),
        r["restore_points"],
        r["size_bytes"]
    );
    Ok(ExitCode::SUCCESS)
}
