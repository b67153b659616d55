//! Looking after a repository: init, list, show, diff, verify, forget, gc, repair.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cbtvault_engine::Progress;
use cbtvault_repo::{BLOCK_SIZE, ForgetSelection, GcOptions, InitOptions, KeepPolicy};
use serde_json::json;

use crate::cli::{ForgetArgs, Global};
use crate::failure::{self, usage};
use crate::output::{self, Bar, errln, outln};

pub fn init(
    g: &Global,
    path: &Path,
    level: i32,
    pack_mib: u64,
    append_only: bool,
    encrypt: bool,
) -> Result<ExitCode> {
    if !(1..=1024).contains(&pack_mib) {
        bail!(usage!("--pack-size-mib {pack_mib} is outside 1..=1024"));
    }
    let encryption = if encrypt {
        Some(super::keys::secret_for_init()?)
    } else {
        None
    };
    let options = InitOptions {
        compression_level: level,
        pack_size: pack_mib << 20,
        append_only,
        encryption,
        ..InitOptions::default()
    };
    let repo = match cbtvault_s3::init(path, &options) {
        Ok(repo) => repo,
        Err(cbtvault_s3::Error::Repo(e)) => {
            Err(e).with_context(|| format!("creating repository {}", path.display()))?
        }
        Err(e) => Err(e).with_context(|| format!("creating repository {}", path.display()))?,
    };
    if g.json {
        output::print_json(&json!({ "repository": path, "config": repo.config() }));
    } else if !g.quiet {
        outln!(
            "created {}{}repository {} (id {})",
            if repo.config().append_only {
                "append-only "
            } else {
                ""
            },
            if repo.is_encrypted() {
                "encrypted "
            } else {
                ""
            },
            path.display(),
            repo.config().id
        );
        if repo.is_encrypted() {
            outln!(
                "keep the passphrase or key file safe: without one of them nothing in it can be read"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn show(g: &Global, path: &Path, id: &str) -> Result<ExitCode> {
    let repo = super::open(path)?;
    let rp = super::resolve(&repo, id)?;
    if g.json {
        output::print_json(&output::restore_point_json(&rp));
    } else if !g.quiet {
        outln!("{}", output::restore_point_text(&rp));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn diff(g: &Global, path: &Path, a: &str, b: &str) -> Result<ExitCode> {
    let repo = super::open(path)?;
    let (ra, rb) = (super::resolve(&repo, a)?, super::resolve(&repo, b)?);
    let runs: Vec<(u64, u64)> = repo
        .diff(&ra, &rb)
        .context("comparing block maps")?
        .into_iter()
        .map(|r| (r.start, r.end - r.start))
        .collect();
    let blocks: u64 = runs.iter().map(|r| r.1).sum();
    if g.json {
        output::print_json(&json!({
            "a": ra.id, "b": rb.id, "block_size": BLOCK_SIZE, "blocks_differ": blocks,
            "extents": runs.iter().map(|(f, n)| json!({"offset": f * BLOCK_SIZE, "length": n * BLOCK_SIZE})).collect::<Vec<_>>(),
        }));
    } else if !g.quiet {
        for (first, count) in &runs {
            outln!(
                "blocks {first}..{} (offset {} length {})",
                first + count,
                first * BLOCK_SIZE,
                count * BLOCK_SIZE
            );
        }
        outln!(
            "{blocks} blocks differ ({})",
            output::bytes(blocks * BLOCK_SIZE)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify(g: &Global, path: &Path, check: cbtvault_repo::DataCheck) -> Result<ExitCode> {
    let repo = super::open(path)?;
    let bar = Bar::new(g);
    let total: u64 = repo
        .catalogue()
        .packs()?
        .iter()
        .filter(|p| check.includes(&p.0))
        .map(|p| p.1)
        .sum();
    let read_data = check != cbtvault_repo::DataCheck::None;
    if read_data {
        bar.start("verify", total);
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let report = repo.verify_data(check, threads, &|n| bar.advance(n))?;
    bar.finish();
    if g.json {
        output::print_json(&serde_json::to_value(&report)?);
    } else if !g.quiet || !report.is_ok() {
        for p in &report.problems {
            errln!("problem: {}: {}", p.object, p.problem);
        }
        for w in &report.warnings {
            errln!("warning: {}: {}", w.object, w.problem);
        }
        for d in &report.damaged {
            let shown: Vec<String> = d.offsets.iter().take(8).map(u64::to_string).collect();
            errln!(
                "damaged: restore point {} of disk {:?}: {} blocks at offsets {}{}",
                d.restore_point,
                d.disk,
                d.blocks_lost,
                shown.join(", "),
                if d.blocks_lost > 8 { ", ..." } else { "" }
            );
        }
        if report.quarantined > 0 {
            errln!(
                "{} damaged blobs are quarantined: the next backup that reads the same data stores them again and heals the restore points that use them",
                report.quarantined
            );
        }
        if !g.quiet {
            outln!(
                "{}: {} restore points, {} packs{}{}",
                if report.is_ok() { "ok" } else { "FAILED" },
                report.restore_points,
                report.packs,
                if check == cbtvault_repo::DataCheck::All {
                    format!(
                        ", {} blobs ({}) re-hashed",
                        report.blobs_read,
                        output::bytes(report.bytes_read)
                    )
                } else if read_data {
                    format!(
                        ", {} blobs ({}) re-hashed in {} of them (subset {}: a full check is --read-data)",
                        report.blobs_read,
                        output::bytes(report.bytes_read),
                        report.packs_read,
                        report.data_checked
                    )
                } else {
                    String::new()
                },
                if report.partial_files > 0 {
                    format!(
                        ", {} partial files of running or interrupted writes",
                        report.partial_files
                    )
                } else {
                    String::new()
                },
            );
        }
    }
    if report.is_ok() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(failure::tagged(
            failure::kind::DAMAGED,
            format!(
                "verify found {} problems; {} restore points are damaged",
                report.problems.len(),
                report.damaged.len()
            ),
        ))
    }
}

pub fn forget(g: &Global, args: ForgetArgs) -> Result<ExitCode> {
    let repo = super::open(&args.repo.repo)?;
    let policy = KeepPolicy {
        last: args.keep_last,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
    };
    if policy.is_empty() && args.ids.is_empty() {
        bail!(usage!(
            "give restore point ids or a --keep-* policy; forget never removes everything by default"
        ));
    }
    if !policy.is_empty() && !args.ids.is_empty() {
        bail!(usage!(
            "give either restore point ids or a --keep-* policy, not both"
        ));
    }
    let selection = if args.ids.is_empty() {
        ForgetSelection::Policy {
            policy,
            disk: args.disk.clone(),
        }
    } else {
        // Resolved here for the messages that say what to give instead.
        let mut ids = Vec::new();
        for id in &args.ids {
            ids.push(super::resolve(&repo, id)?.id);
        }
        ForgetSelection::Ids(ids)
    };
    let plan = repo.forget_plan(&selection, args.allow_forget_last)?;
    let protected: Vec<_> = plan.kept_as_last().collect();
    if !protected.is_empty() && !g.quiet && !g.json {
        for d in &protected {
            errln!(
                "cbtvault: keeping {} ({}): it is the last restore point of disk {:?}; add --allow-forget-last to forget it too",
                output::short(&d.id),
                d.time.strftime("%Y-%m-%d %H:%M:%S"),
                d.disk
            );
        }
    }
    let removed = plan.forgotten().count();
    if !args.dry_run {
        repo.forget(&plan).context("forgetting restore points")?;
    }
    if g.json {
        output::print_json(&json!({ "dry_run": args.dry_run, "decisions": plan.decisions }));
    } else if !g.quiet {
        for d in &plan.decisions {
            let what = if d.keep {
                format!("keep ({})", d.reasons.join(", "))
            } else {
                "forget".into()
            };
            outln!(
                "{}  {:<16}  {}  {}",
                output::short(&d.id),
                d.disk,
                d.time.strftime("%Y-%m-%d %H:%M:%S"),
                what
            );
        }
        outln!(
            "{} {removed} restore points; run `cbtvault gc` to free their space",
            if args.dry_run {
                "would forget"
            } else {
                "forgot"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn gc(g: &Global, path: &Path, wait: u64, options: GcOptions) -> Result<ExitCode> {
    let dry_run = options.dry_run;
    let repo = super::open(path)?;
    let report = repo.collect_garbage(options, Duration::from_secs(wait))?;
    if g.json {
        output::print_json(&serde_json::to_value(&report)?);
    } else if !g.quiet {
        for e in &report.estimates {
            outln!(
                "with --max-unused {:>3}%: {} packs rewritten ({} copied), {} freed",
                (e.max_unused * 100.0).round(),
                e.packs_rewritten,
                output::bytes(e.bytes_rewritten),
                output::bytes(e.bytes_freed)
            );
        }
        outln!(
            "{}{} packs deleted, {} rewritten into {} ({} copied), {} blobs removed, {} freed; unused space {} -> {} of {} live; {} live blobs; {} partial files cleared, {} stray packs indexed{}",
            if dry_run { "dry run: " } else { "" },
            report.packs_deleted,
            report.packs_rewritten,
            report.packs_written,
            output::bytes(report.bytes_rewritten),
            report.blobs_removed,
            output::bytes(report.bytes_freed),
            output::bytes(report.bytes_unused_before),
            output::bytes(report.bytes_unused_after),
            output::bytes(report.bytes_live),
            report.blobs_live,
            report.partial_files_removed,
            report.packs_indexed,
            if report.blobs_quarantined > 0 {
                format!("; {} damaged blobs quarantined", report.blobs_quarantined)
            } else {
                String::new()
            }
        );
        if !dry_run {
            outln!(
                "{} packs condemned; swept {} packs ({}) of {} gc records{}",
                report.packs_condemned,
                report.packs_swept,
                output::bytes(report.bytes_swept),
                report.records_swept,
                if report.packs_waiting > 0 {
                    format!(
                        "; {} condemned packs wait for operations that ran when they were condemned (a later gc deletes them)",
                        report.packs_waiting
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn repair(g: &Global, path: &Path, wait: u64) -> Result<ExitCode> {
    let report = cbtvault_repo::repair_keyed(
        path,
        Duration::from_secs(wait),
        Some(&super::keys::secret_to_open),
    )
    .with_context(|| format!("repairing {}", path.display()))?;
    if g.json {
        output::print_json(&serde_json::to_value(&report)?);
    } else if !g.quiet {
        for s in &report.skipped {
            errln!("skipped: {s}");
        }
        for s in &report.set_aside {
            errln!("set aside: {s}");
        }
        outln!(
            "catalogue rebuilt: {} packs ({} blobs, {} packs salvaged from a damaged index), {} restore points ({} manifests written back); {} damaged blobs quarantined",
            report.packs_indexed,
            report.blobs_indexed,
            report.packs_salvaged,
            report.restore_points,
            report.manifests_restored,
            report.blobs_quarantined
        );
    }
    Ok(ExitCode::SUCCESS)
}
