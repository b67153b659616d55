//! `restore-vm VM[@DATE|ID] --config F --sr SR`: a whole VM back into a
//! pool. The command finds the restore points of one VM-level run and
//! words the runner's refusals in terms of its flags; the runner plans,
//! checks and makes ([`cbtvault_runner::restore_vm`]).

use std::process::ExitCode;

use anyhow::{Result, bail};
use cbtvault_config::Config;
use cbtvault_repo::{Repository, RestorePointRow};
use cbtvault_runner::{VmRestoreRefusal, VmRestoreRequest};
use serde_json::json;

use crate::cli::{Global, RestoreVmArgs};
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
            super::points::resolve_all(repo, &format!("{spec}@latest")).map_err(|_| e)?
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

/// The runner's refusal in the command's words.
fn wording(e: cbtvault_runner::Error) -> anyhow::Error {
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
        _ => (failure::kind::REMOTE, String::new()),
    };
    failure::tagged(kind, format!("{e}{hint}; nothing was created"))
}

pub fn restore_vm(g: &Global, args: &RestoreVmArgs) -> Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let pool = super::jobs::config_pool(&config, &args.config, args.pool.as_deref())?;
    let request = VmRestoreRequest {
        sr_uuid: args.sr.clone(),
        name: args.name.clone(),
        network_map: network_map(&args.network_map)?,
        new_macs: args.new_macs,
        start: args.start,
    };
    cbtvault_runner::client_options(&pool)?;
    let repo_path = args
        .repo
        .clone()
        .unwrap_or_else(|| config.repository.path.clone());
    let repo = super::open(&repo_path)?;
    let points = run_points(&repo, &args.vm)?;
    let _lock = repo.lock_shared()?;
    let rt = super::runtime()?;
    let started = std::time::Instant::now();
    let done = rt
        .block_on(cbtvault_runner::restore_vm(
            &pool,
            repo.clone(),
            &points,
            &request,
        ))
        .map_err(wording)?;
    if g.json {
        output::print_json(&json!({
            "vm": done.vm,
            "name": done.name,
            "pool": pool.name,
            "sr": args.sr,
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
