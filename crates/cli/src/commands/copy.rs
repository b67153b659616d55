//! `cbtvault copy`: restore points into another repository (off-site).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cbtvault_engine::Progress;

use crate::cli::Global;
use crate::output::{self, outln};

pub fn copy(
    g: &Global,
    from: &Path,
    from_key: &super::keys::SourceKey,
    to: &Path,
    disk: Option<&str>,
    ids: &[String],
) -> Result<ExitCode> {
    let source = super::open_with_key(from, &|| super::keys::source_secret(from_key))
        .with_context(|| format!("the source, {}", from.display()))?;
    let target = super::open(to).with_context(|| format!("the target, {}", to.display()))?;
    let mut points = Vec::new();
    if ids.is_empty() {
        points = source
            .catalogue()
            .restore_points(disk)
            .context("listing the source's restore points")?;
    } else {
        for id in ids {
            let point = super::resolve(&source, id)?;
            if disk.is_some_and(|d| d != point.manifest.disk) {
                anyhow::bail!(
                    "restore point {} is of disk {:?}, not --disk {:?}",
                    point.id,
                    point.manifest.disk,
                    disk.unwrap_or_default()
                );
            }
            points.push(point);
        }
    }
    // What the points stored when they were made: about what travels to
    // a target that has none of it.
    let estimate = points.iter().map(|p| p.manifest.stats.bytes_stored).sum();
    let bar = output::Bar::new(g);
    bar.start("copy", estimate);
    let report = target
        .copy_from(&source, &points, &|bytes| bar.advance(bytes))
        .with_context(|| format!("copying into {}", to.display()));
    bar.finish();
    let report = report?;
    if g.json {
        output::print_json(&serde_json::to_value(&report)?);
    } else if !g.quiet {
        print_copied(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_copied(report: &cbtvault_repo::CopyReport) {
    for id in &report.copied {
        // Across keys a restore point gets an id of the target's.
        match report.target_ids.get(id) {
            Some(there) => outln!("copied {id} as {there}"),
            None => outln!("copied {id}"),
        }
    }
    outln!(
        "{} restore points copied, {} already there; {} blobs sent ({}), {} already there",
        report.copied.len(),
        report.present.len(),
        report.blobs_sent,
        output::bytes(report.bytes_sent),
        report.blobs_present
    );
}

/// `backup --config F --job J` of a copy job: what the daemon runs on the
/// job's schedule, once.
pub fn copy_job(g: &Global, repo: &Path, spec: &cbtvault_runner::CopySpec) -> Result<ExitCode> {
    let source = super::open(repo).with_context(|| format!("the source, {}", repo.display()))?;
    let report = cbtvault_runner::run_copy(spec, &source, &output::Bar::new(g))?;
    if g.json {
        output::print_json(&serde_json::to_value(&report)?);
    } else if !g.quiet {
        print_copied(&report.copy);
        if report.skipped > 0 {
            outln!(
                "{} restore points not sent: the job's retention would not keep them at {}",
                report.skipped,
                report.to
            );
        }
        if let Some(why) = &report.retention_skipped {
            outln!("retention not applied: {why}");
        }
        for (disk, n) in &report.forgotten {
            outln!("forgot {n} restore points of {disk} at {}", report.to);
        }
    }
    Ok(ExitCode::SUCCESS)
}
