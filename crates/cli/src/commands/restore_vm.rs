//! `restore-vm VM[@DATE|ID] --config F (--sr SR | --to DIR)`: a whole VM
//! back into a pool, or a QEMU VM's images and drive layout into a
//! directory. The command finds the restore points of one VM-level run,
//! words the runner's refusals in terms of its flags and prints; the
//! runner plans, checks and makes ([`cbtvault_runner::restore_vm`],
//! [`cbtvault_runner::plan_qemu_vm_restore`]). With `--dry-run` only the
//! plan is made and printed.

use std::process::ExitCode;

use anyhow::{Result, bail};
use cbtvault_config::Config;
use cbtvault_repo::{Repository, RestorePointRow};
use cbtvault_runner::{
    ImageFormat, QemuVmRestoreRequest, VmRestorePlan, VmRestoreRefusal, VmRestoreRequest,
};
use serde_json::json;

use crate::cli::{Global, ImageFormatArg, RestoreVmArgs};
use crate::failure::{self, usage};
use crate::output::{self, outln};

/// The restore points of the VM-level run `spec` names: `VM`, `VM@DATE`
/// or the id of one of its restore points. All restore points naming the
/// same saved VM metadata are one run.
fn run_points(repo: &Repository, spec: &str) -> Result<Vec<RestorePointRow>> {
    let found = match super::points::resolve_all(repo, spec) {
        Ok(found) => found,
        // A bare VM name or uuid: its newest run.
        Err(e) if !spec.contains('@') => {
            super::points::resolve_all(repo, &format!("{spec}@latest")).map_err(|_| {
                if spec.chars().all(|c| c.is_ascii_hexdigit()) {
                    e
                } else {
                    failure::tagged(
                        failure::kind::NOT_FOUND,
                        format!(
                            "no VM named {spec:?} has restore points in this repository (`cbtvault list` shows the VMs and ids)"
                        ),
                    )
                }
            })?
        }
        Err(e) => return Err(e),
    };
    let Some(newest) = found.iter().max_by_key(|rp| rp.manifest.time).cloned() else {
        bail!(failure::tagged(
            failure::kind::NOT_FOUND,
            format!("{spec:?} names no restore point")
        ));
    };
    let Some(vm) = newest.manifest.source.vm.clone() else {
        bail!(failure::tagged(
            failure::kind::NOT_FOUND,
            format!(
                "restore point {} (disk {}) was not taken as part of a VM: restore the disk with `cbtvault restore {} --to xapi`",
                output::short(&newest.id),
                newest.manifest.disk,
                output::short(&newest.id)
            )
        ));
    };
    let Some(metadata) = vm.metadata else {
        // The runner words this refusal; it needs only the one point.
        return Ok(vec![newest]);
    };
    let mut points: Vec<RestorePointRow> = repo
        .catalogue()
        .restore_points(None)?
        .into_iter()
        .filter(|rp| {
            rp.manifest
                .source
                .vm
                .as_ref()
                .is_some_and(|v| v.metadata.as_deref() == Some(metadata.as_str()))
        })
        .collect();
    points.sort_by_key(|rp| {
        rp.manifest
            .source
            .vm
            .as_ref()
            .and_then(|v| v.device.clone())
            .unwrap_or_default()
    });
    Ok(points)
}

/// `OLD=NEW` pairs.
fn network_map(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((old, new)) if !old.is_empty() && !new.is_empty() => {
                Ok((old.to_string(), new.to_string()))
            }
            _ => Err(usage!(
                "--network-map {p:?}: give OLD=NEW (the backed-up VM's network = the pool's network, each a name, uuid or bridge)"
            )),
        })
        .collect()
}

/// The runner's refusal in the command's words; `nothing` says what was
/// not done ("nothing was created").
pub(super) fn wording(e: cbtvault_runner::Error, nothing: &str) -> anyhow::Error {
    let refusal = match &e {
        cbtvault_runner::Error::VmRestore { refusal, .. } => refusal.clone(),
        _ => return e.into(),
    };
    let (kind, hint) = match refusal {
        VmRestoreRefusal::NoMetadata => (
            failure::kind::NOT_FOUND,
            "; restore its disks one by one with `cbtvault restore ID --to xapi`".to_string(),
        ),
        VmRestoreRefusal::NetworkUnmapped { network } => (
            failure::kind::USAGE,
            format!("; give --network-map {network:?}=NETWORK"),
        ),
        VmRestoreRefusal::NetworkNotInPool { .. } => (
            failure::kind::NOT_FOUND,
            "; fix the NEW side of --network-map".to_string(),
        ),
        VmRestoreRefusal::MappingUnused { .. } => (
            failure::kind::USAGE,
            "; fix the OLD side of --network-map".to_string(),
        ),
        VmRestoreRefusal::SrFull => (
            failure::kind::REMOTE,
            "; free space there or give another --sr".to_string(),
        ),
        VmRestoreRefusal::UnknownSr => (
            failure::kind::NOT_FOUND,
            "; give an SR of the pool with --sr".to_string(),
        ),
        VmRestoreRefusal::WrongHypervisor => (failure::kind::USAGE, String::new()),
        VmRestoreRefusal::TargetNotEmpty => (
            failure::kind::USAGE,
            "; give a new or empty directory with --to".to_string(),
        ),
        VmRestoreRefusal::TargetUnusable => (
            failure::kind::USAGE,
            "; give another directory with --to".to_string(),
        ),
        _ => (failure::kind::REMOTE, String::new()),
    };
    failure::tagged(kind, format!("{e}{hint}; {nothing}"))
}

pub fn restore_vm(g: &Global, args: &RestoreVmArgs) -> Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let repo_path = args
        .repo
        .clone()
        .unwrap_or_else(|| config.repository.path.clone());
    let repo = super::open(&repo_path)?;
    let points = run_points(&repo, &args.vm)?;
    let _lock = repo.lock_shared()?;
    let qemu = cbtvault_runner::is_qemu_vm(&repo, &points)?;
    match (&args.to, &args.sr) {
        (Some(dir), _) if qemu => super::restore_vm_qemu::restore(g, args, &repo, &points, dir),
        (Some(_), _) => bail!(usage!(
            "VM {:?} was backed up from a XenServer pool: restore it into a pool with --sr SR instead of --to; nothing was written",
            args.vm
        )),
        (None, Some(_)) if qemu => bail!(usage!(
            "VM {:?} was backed up from QEMU: restore its images and drive layout into a directory with --to DIR instead of --sr; nothing was created",
            args.vm
        )),
        (None, Some(_)) => {
            let pool = super::jobs::config_pool(&config, &args.config, args.pool.as_deref())?;
            cbtvault_runner::client_options(&pool)?;
            xen(g, args, &repo, &points, &pool)
        }
        (None, None) => bail!(usage!(
            "give --sr SR (a XenServer VM) or --to DIR (a QEMU VM)"
        )),
    }
}

pub(super) fn format(f: ImageFormatArg) -> ImageFormat {
    match f {
        ImageFormatArg::Raw => ImageFormat::Raw,
        ImageFormatArg::Qcow2 => ImageFormat::Qcow2,
    }
}

/// `QemuVmRestoreRequest` from the flags.
pub(super) fn qemu_request(args: &RestoreVmArgs, dir: &std::path::Path) -> QemuVmRestoreRequest {
    QemuVmRestoreRequest {
        dir: dir.to_path_buf(),
        format: format(args.format),
    }
}

fn xen(
    g: &Global,
    args: &RestoreVmArgs,
    repo: &std::sync::Arc<Repository>,
    points: &[RestorePointRow],
    pool: &cbtvault_config::Pool,
) -> Result<ExitCode> {
    let sr = args.sr.clone().unwrap_or_default();
    let request = VmRestoreRequest {
        sr_uuid: sr.clone(),
        name: args.name.clone(),
        network_map: network_map(&args.network_map)?,
        new_macs: args.new_macs,
        start: args.start,
    };
    let rt = super::runtime()?;
    if args.dry_run {
        let plan = rt
            .block_on(cbtvault_runner::plan_vm_restore_in_pool(
                pool,
                repo.clone(),
                points,
                &request,
            ))
            .map_err(|e| wording(e, "nothing was created"))?;
        print_xen_plan(g, &plan, &pool.name, &sr);
        return Ok(ExitCode::SUCCESS);
    }
    let started = std::time::Instant::now();
    let done = rt
        .block_on(cbtvault_runner::restore_vm(
            pool,
            repo.clone(),
            points,
            &request,
        ))
        .map_err(|e| wording(e, "nothing was created"))?;
    if g.json {
        output::print_json(&json!({
            "vm": done.vm,
            "name": done.name,
            "pool": pool.name,
            "sr": sr,
            "started": done.started,
            "power_state": if done.started { "Running" } else { "Halted" },
            "disks": done.disks.iter().map(|d| json!({
                "device": d.device, "vdi": d.vdi, "name_label": d.label,
                "restore_point": d.restore_point, "bytes": d.bytes,
            })).collect::<Vec<_>>(),
            "vifs": done.vifs.iter().map(|v| json!({
                "device": v.device, "mac": v.mac, "network": v.network,
            })).collect::<Vec<_>>(),
            "notes": done.notes,
            "duration_ms": started.elapsed().as_millis() as u64,
        }));
    } else if !g.quiet {
        outln!(
            "restored VM {:?} as {} ({}) in pool {:?}",
            done.name,
            done.vm,
            if done.started { "running" } else { "halted" },
            pool.name
        );
        for d in &done.disks {
            outln!(
                "  disk {} ← {}: VDI {} {:?}",
                d.device,
                output::short(&d.restore_point),
                d.vdi,
                d.label
            );
        }
        for v in &done.vifs {
            outln!("  VIF {} MAC {} on network {}", v.device, v.mac, v.network);
        }
        for n in &done.notes {
            outln!("  note: {n}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A pool restore's plan (`--dry-run`).
fn print_xen_plan(g: &Global, plan: &VmRestorePlan, pool: &str, sr: &str) {
    if g.json {
        output::print_json(&json!({
            "dry_run": true,
            "source": {"vm": plan.source_uuid, "name": plan.source_name, "time": plan.time},
            "name": plan.name,
            "pool": pool,
            "sr": sr,
            "vcpus": plan.vcpus,
            "memory": plan.memory,
            "start": plan.start,
            "disks": plan.disks.iter().map(|d| json!({
                "device": d.device, "name_label": d.label, "bytes": d.size,
                "bootable": d.bootable, "mode": d.mode, "restore_point": d.restore_point.id,
            })).collect::<Vec<_>>(),
            "drives": plan.drives.iter().map(|d| json!({
                "device": d.device, "type": d.kind, "bootable": d.bootable,
            })).collect::<Vec<_>>(),
            "vifs": plan.vifs.iter().map(|v| json!({
                "device": v.device, "mac": v.mac, "mtu": v.mtu,
                "from_network": v.from_network,
                "network": v.network_uuid, "network_name": v.network_name,
            })).collect::<Vec<_>>(),
            "notes": plan.notes,
        }));
        return;
    }
    if g.quiet {
        return;
    }
    outln!(
        "would restore VM {:?} ({}, run of {}) as {:?} into pool {pool:?}, SR {sr}: {} vCPUs, {} memory, {}",
        plan.source_name,
        plan.source_uuid,
        plan.time,
        plan.name,
        plan.vcpus,
        output::bytes(u64::try_from(plan.memory).unwrap_or_default()),
        if plan.start { "started" } else { "left halted" }
    );
    for d in &plan.disks {
        outln!(
            "  disk {} ← {}: new VDI {:?}, {}{}",
            d.device,
            output::short(&d.restore_point.id),
            d.label,
            output::bytes(d.size),
            if d.bootable { ", bootable" } else { "" }
        );
    }
    for d in &plan.drives {
        outln!("  {} drive at {} (empty)", d.kind, d.device);
    }
    for v in &plan.vifs {
        outln!(
            "  VIF {} MAC {}: network {} → {:?} ({})",
            v.device,
            if v.mac.is_empty() { "new" } else { &v.mac },
            v.from_network,
            v.network_name,
            v.network_uuid
        );
    }
    for n in &plan.notes {
        outln!("  note: {n}");
    }
    outln!("dry run: nothing was created");
}
