//! `restore-vm VM --config F --to DIR [--format raw|qcow2] [--dry-run]`:
//! a QEMU VM's images and recorded drive layout into a directory
//! ([`cbtvault_runner::plan_qemu_vm_restore`] checks, then
//! [`cbtvault_runner::apply_qemu_vm_restore`] writes, removing what it
//! wrote if it fails).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use cbtvault_repo::{Repository, RestorePointRow};
use cbtvault_runner::QemuVmRestorePlan;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::restore_vm::{qemu_request, wording};
use crate::cli::{Global, RestoreVmArgs};
use crate::failure;
use crate::output::{self, outln};

pub fn restore(
    g: &Global,
    args: &RestoreVmArgs,
    repo: &Arc<Repository>,
    points: &[RestorePointRow],
    dir: &Path,
) -> Result<ExitCode> {
    let request = qemu_request(args, dir);
    let plan = cbtvault_runner::plan_qemu_vm_restore(repo, points, &request)
        .map_err(|e| wording(e, "nothing was written"))?;
    if args.dry_run {
        print_plan(g, &plan);
        return Ok(ExitCode::SUCCESS);
    }
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let started = std::time::Instant::now();
    let done =
        cbtvault_runner::apply_qemu_vm_restore(repo, &plan, workers, &CancellationToken::new())
            .map_err(|e| match e {
                e @ cbtvault_runner::Error::VmRestoreLeftovers { .. } => {
                    failure::tagged(failure::kind::REMOTE, e.to_string())
                }
                e => anyhow::Error::from(e).context(format!(
                    "restoring VM {:?} into {} failed; what it wrote was removed",
                    plan.source_name,
                    dir.display()
                )),
            })?;
    if g.json {
        output::print_json(&json!({
            "vm": plan.source_uuid,
            "name": plan.source_name,
            "host": plan.host,
            "dir": done.dir,
            "format": plan.format.as_str(),
            "images": done.images.iter().map(|i| json!({
                "node": i.node, "path": i.path, "bytes": i.bytes,
                "restore_point": i.restore_point,
            })).collect::<Vec<_>>(),
            "layout": done.layout,
            "qemu_storage_daemon_args": done.qsd_args,
            "qemu_args": done.qemu_args,
            "notes": done.notes,
            "duration_ms": started.elapsed().as_millis() as u64,
        }));
    } else if !g.quiet {
        outln!(
            "restored VM {:?} (QEMU host {:?}, run of {}) into {}: {} {} images",
            plan.source_name,
            plan.host,
            plan.time,
            done.dir.display(),
            done.images.len(),
            plan.format.as_str()
        );
        for i in &done.images {
            outln!(
                "  node {} ← {}: {}",
                i.node,
                output::short(&i.restore_point),
                i.path.display()
            );
        }
        outln!("  layout: {}", done.layout.display());
        outln!(
            "  start: qemu-storage-daemon $(cat {}) … or qemu-system-… $(cat {}) …",
            done.qsd_args.display(),
            done.qemu_args.display()
        );
        for n in &done.notes {
            outln!("  note: {n}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A directory restore's plan (`--dry-run`).
fn print_plan(g: &Global, plan: &QemuVmRestorePlan) {
    if g.json {
        output::print_json(&json!({
            "dry_run": true,
            "source": {"vm": plan.source_uuid, "name": plan.source_name, "host": plan.host, "time": plan.time},
            "dir": plan.dir,
            "creates_dir": plan.creates_dir,
            "format": plan.format.as_str(),
            "images": plan.images.iter().map(|i| json!({
                "node": i.node, "path": i.path, "bytes": i.size, "place": i.place,
                "restore_point": i.restore_point.id,
            })).collect::<Vec<_>>(),
            "notes": plan.notes,
        }));
        return;
    }
    if g.quiet {
        return;
    }
    outln!(
        "would restore VM {:?} (QEMU host {:?}, run of {}) into {}{}: {} {} images",
        plan.source_name,
        plan.host,
        plan.time,
        plan.dir.display(),
        if plan.creates_dir { " (made)" } else { "" },
        plan.images.len(),
        plan.format.as_str()
    );
    for i in &plan.images {
        outln!(
            "  node {} ← {}: {}, {}{}",
            i.node,
            output::short(&i.restore_point.id),
            i.path.display(),
            output::bytes(i.size),
            if i.place.is_empty() {
                String::new()
            } else {
                format!(" ({})", i.place)
            }
        );
    }
    for n in &plan.notes {
        outln!("  note: {n}");
    }
    outln!("dry run: nothing was written");
}
