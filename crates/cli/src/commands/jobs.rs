//! Backups of hypervisor disks (a job from --config, or one-off with --xapi
//! or qmp:SOCKET) and restores into a pool: the arguments become a
//! [`JobSpec`], `cbtvault-runner` runs it, and this prints the report.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cbtvault_config::{Config, Pool, QemuHost};
use cbtvault_runner::{JobReport, JobSpec, Runner, Target};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cli::{BackupArgs, CleanupArgs, Global, XapiLogin};
use crate::failure::{self, usage};
use crate::output::{self, errln, outln};
use crate::progress::Bars;

/// How the user named the pool: the words an error uses to say what to
/// change.
#[derive(Clone, Copy)]
enum Named {
    Flags,
    Config,
}

/// `backup --xapi ...` or `backup --config FILE --job NAME`.
pub fn backup(g: &Global, args: &BackupArgs) -> Result<ExitCode> {
    let (spec, limits, named) = match &args.config {
        Some(path) => {
            let config = Config::load(path)?;
            let job = args.job.as_deref().unwrap_or_default();
            if let Some(copy) = cbtvault_runner::CopySpec::from_config(&config, job)
                .with_context(|| path.display().to_string())?
            {
                let repo = args.repo.as_ref().unwrap_or(&config.repository.path);
                return super::copy::copy_job(g, repo, &copy);
            }
            let mut spec =
                JobSpec::from_config(&config, job).with_context(|| path.display().to_string())?;
            if let Some(repo) = &args.repo {
                spec.repo = repo.clone();
            }
            spec.backup = tuning(args, spec.backup.compression_level);
            (spec, config.limits, Named::Config)
        }
        None if args.vmware.vcenter.is_some() => {
            let Some(repo) = &args.repo else {
                bail!(usage!("give --repo and --vcenter (or --config with --job)"));
            };
            let target = vmware_from_flags(args)?;
            let mut spec = JobSpec::one_off("adhoc", repo.clone(), target);
            spec.parallel = args.xen.parallel.max(1);
            spec.backup = tuning(args, None);
            (spec, Default::default(), Named::Flags)
        }
        None => {
            let x = &args.xen;
            let Some(repo) = &args.repo else {
                bail!(usage!("give --repo and --xapi (or --config with --job)"));
            };
            if x.vdi.is_empty() && x.vm.is_empty() {
                bail!(usage!("give --vdi UUID or --vm UUID (repeatable)"));
            }
            let pool = pool_from_flags(&x.login, args.connections)?;
            let target = Target::Xen {
                pool,
                vms: x.vm.clone(),
                vdis: x.vdi.clone(),
                consistent: x.vm_snapshot,
            };
            let mut spec = JobSpec::one_off("adhoc", repo.clone(), target);
            spec.parallel = x.parallel.max(1);
            spec.backup = tuning(args, None);
            (spec, Default::default(), Named::Flags)
        }
    };
    let report = run(g, &spec, &limits, named)?;
    print_report(g, report)
}

/// `backup --source qmp:SOCKET --node NODE --disk NAME`: one disk, printed
/// as a single backup is.
pub fn backup_qemu_once(
    g: &Global,
    args: &BackupArgs,
    repo: &Path,
    disk: &str,
    socket: &Path,
) -> Result<ExitCode> {
    let Some(node) = &args.node else {
        bail!(usage!("--source qmp:SOCKET needs --node NODE"));
    };
    let host = QemuHost {
        name: "local".into(),
        qmp_socket: socket.to_path_buf(),
        nbd_socket: args.nbd_socket.clone(),
        max_disks: 1,
        vm: None,
    };
    let target = Target::Qemu {
        host,
        nodes: vec![cbtvault_runner::QemuNode {
            node: node.clone(),
            disk: Some(disk.to_string()),
        }],
    };
    // The QEMU job name is made from this prefix, the repository and the disk.
    let mut spec = JobSpec::one_off("cbtv", repo.to_path_buf(), target);
    spec.backup = tuning(args, None);
    let mut report = run(g, &spec, &Default::default(), Named::Flags)
        .with_context(|| format!("backup of QEMU node {node:?} ({disk:?}) failed"))?;
    let Some(only) = report.disks.pop() else {
        bail!("backup of QEMU node {node:?} ({disk:?}) produced no result");
    };
    let outcome = only
        .outcome
        .map_err(|e| failure::with_hint(e.into(), "--nbd-socket PATH"))
        .with_context(|| format!("backup of QEMU node {node:?} ({disk:?}) failed"))?;
    super::data::print_outcome(g, outcome);
    Ok(ExitCode::SUCCESS)
}

/// The pipeline's tuning from the flags; `compression_level` is the job's
/// when no flag gives one.
fn tuning(args: &BackupArgs, compression_level: Option<i32>) -> cbtvault_engine::BackupOptions {
    let mut options = super::data::backup_options(args);
    options.compression_level = options.compression_level.or(compression_level);
    options
}

/// Runs `spec` with progress bars, stopping cleanly on ctrl-c.
fn run(
    g: &Global,
    spec: &JobSpec,
    limits: &cbtvault_config::Limits,
    named: Named,
) -> Result<JobReport> {
    let repo = super::open(&spec.repo)?;
    let rt = super::runtime()?;
    let cancel = CancellationToken::new();
    let bars = Arc::new(Bars::new(g));
    let runner = Runner::new(limits);
    let report = rt.block_on(async {
        let watch = cancel.clone();
        tokio::spawn(async move {
            // ctrl-c, or SIGTERM from systemd or kill: the same clean stop.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let terminated = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminated => {}
            }
            tracing::warn!(
                "interrupted; stopping the backups (snapshots taken are removed, nothing partial is committed)"
            );
            watch.cancel();
        });
        runner.run(spec, repo, bars.clone(), cancel).await
    });
    bars.clear();
    report.map_err(|e| wording(e, named))
}

/// A runner error in the words of how the user named the pool.
fn wording(e: cbtvault_runner::Error, named: Named) -> anyhow::Error {
    match (&e, named) {
        (cbtvault_runner::Error::PlainHttp { pool, .. }, Named::Config) => failure::tagged(
            failure::kind::CONFIG,
            format!(
                "{e}, or set allow_insecure_http = true in pool {pool:?} if this network is trusted"
            ),
        ),
        (cbtvault_runner::Error::PlainHttp { .. }, Named::Flags) => failure::usage_error(format!(
            "{e}, or pass --allow-insecure-http if this network is trusted"
        )),
        _ => e.into(),
    }
}

/// The pool `--xapi` and its companions describe.
fn pool_from_flags(login: &XapiLogin, nbd_connections: usize) -> Result<Pool> {
    let Some(url) = &login.xapi else {
        bail!(usage!("give --xapi https://HOST"));
    };
    if login.password_file.is_none() && login.password_env.is_none() {
        bail!(usage!(
            "give --password-file FILE or --password-env VAR (never the password itself)"
        ));
    }
    let connections = nbd_connections.clamp(1, 16);
    Ok(Pool {
        name: url.clone(),
        url: url.clone(),
        username: login.username.clone(),
        password_file: login.password_file.clone(),
        password_env: login.password_env.clone(),
        ca: login.ca.clone(),
        pin: login.pin.clone(),
        insecure: login.insecure,
        allow_insecure_http: login.allow_insecure_http,
        transport: Default::default(),
        nbd_connections: connections,
        max_nbd_connections: 16,
    })
}

/// `backup --vcenter URL --vm MOREF | --fcd ID --datastore DS`.
fn vmware_from_flags(args: &BackupArgs) -> Result<Target> {
    let login = &args.xen.login;
    let (Some(url), v) = (&args.vmware.vcenter, &args.vmware) else {
        bail!(usage!("give --vcenter https://HOST"));
    };
    if args.xen.vm.is_empty() && v.fcd.is_empty() {
        bail!(usage!(
            "give --vm MOREF or --fcd ID with --datastore (repeatable)"
        ));
    }
    if login.password_file.is_none() && login.password_env.is_none() {
        bail!(usage!(
            "give --password-file FILE or --password-env VAR (never the password itself)"
        ));
    }
    if login.ca.is_none() && login.pin.is_none() && !login.insecure {
        bail!(usage!(
            "give --pin FILE or --ca FILE (or --insecure for a lab)"
        ));
    }
    let Some(nbd_uri) = &v.nbd_uri else {
        bail!(usage!(
            "give --nbd-uri: where the snapshots' disks are served over NBD (see docs/vmware.md)"
        ));
    };
    // The disks are named after the host, not its port.
    let authority = url
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap_or(url);
    let host = authority
        .rsplit_once(':')
        .filter(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(authority, |(h, _)| h)
        .to_string();
    let vcenter = cbtvault_config::Vcenter {
        name: host,
        url: url.clone(),
        username: login.username.clone(),
        password_file: login.password_file.clone(),
        password_env: login.password_env.clone(),
        ca: login.ca.clone(),
        pin: login.pin.clone(),
        insecure: login.insecure,
        nbd_uri: nbd_uri.clone(),
        quiesce: false,
        max_disks: 4,
    };
    let datastore = v.datastore.clone().unwrap_or_default();
    Ok(Target::Vmware {
        vcenter,
        vms: args.xen.vm.clone(),
        fcds: v
            .fcd
            .iter()
            .map(|id| cbtvault_config::FcdRef {
                id: id.clone(),
                datastore: datastore.clone(),
            })
            .collect(),
    })
}

/// Prints one line per disk (or, with --json, the array of restore points
/// committed), and fails if any disk failed.
fn print_report(g: &Global, report: JobReport) -> Result<ExitCode> {
    let total = report.disks.len();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for disk in report.disks {
        let retried = match disk.attempts {
            1 => String::new(),
            n => format!(" after {n} tries"),
        };
        // A failed disk's error says what its alert would.
        let alerts: String = disk
            .alerts
            .iter()
            .map(|a| format!("; ALERT: {a}"))
            .collect();
        match disk.outcome {
            Ok(o) => {
                let s = &o.manifest.stats;
                if !g.quiet && !g.json {
                    outln!(
                        "{}: restore point {} ({}), read {} in {} blocks, stored {} new{retried}{alerts}",
                        disk.label,
                        output::short(&o.restore_point),
                        output::mode(&o.manifest.mode),
                        output::bytes(s.bytes_read),
                        s.blocks_read,
                        output::bytes(s.bytes_stored)
                    );
                } else if g.quiet {
                    for a in &disk.alerts {
                        errln!("cbtvault: alert: {}: {a}", disk.label);
                    }
                }
                if let Some(Err(e)) = &disk.retention {
                    errln!(
                        "cbtvault: warning: {}: retention did not run: {}",
                        disk.label,
                        failure::message(&anyhow::anyhow!("{e}"))
                    );
                }
                let mut row = output::restore_point_json(&cbtvault_repo::RestorePointRow {
                    id: o.restore_point,
                    manifest: o.manifest,
                });
                if let (false, Some(object)) = (disk.alerts.is_empty(), row.as_object_mut()) {
                    object.insert("alerts".into(), json!(disk.alerts));
                }
                rows.push(row);
            }
            Err(e) => {
                let e = anyhow::Error::from(e);
                let e =
                    failure::with_hint(e, "nbd_socket in the [[qemu]] host of the configuration");
                if !g.json {
                    errln!(
                        "cbtvault: error: {}: {}{retried}",
                        disk.label,
                        failure::message(&e)
                    );
                }
                failed.push((disk.label, e));
            }
        }
    }
    if g.json {
        output::print_json(&serde_json::Value::Array(rows));
    }
    if !failed.is_empty() {
        return Err(failure::DisksFailed { total, failed }.into());
    }
    Ok(ExitCode::SUCCESS)
}

/// Where `restore --to xapi` uploads: a pool from `--xapi` flags, or from
/// `--config` (the pool `--pool` names, or its only one).
pub struct PoolChoice<'a> {
    pub login: &'a XapiLogin,
    pub config: Option<&'a PathBuf>,
    pub pool: Option<&'a str>,
}

/// The pool `name` names in the configuration at `path`, or its only one.
pub fn config_pool(config: &Config, path: &Path, name: Option<&str>) -> Result<Pool> {
    let names = || {
        config
            .pools
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (name, config.pools.as_slice()) {
        (Some(name), _) => config.pool(name).cloned().ok_or_else(|| {
            failure::tagged(
                failure::kind::NOT_FOUND,
                format!(
                    "{}: no pool named {name:?} (pools: {})",
                    path.display(),
                    names()
                ),
            )
        }),
        (None, [only]) => Ok(only.clone()),
        (None, pools) => Err(usage!(
            "{} has {} pools; name one with --pool ({})",
            path.display(),
            pools.len(),
            names()
        )),
    }
}

/// `restore ID --to xapi --sr UUID (--xapi ... | --config F [--pool NAME])`:
/// a new VDI in the pool, uploaded through XAPI's `/import_raw_vdi`.
pub fn restore_to_xapi(
    g: &Global,
    repo: &Path,
    id: &str,
    choice: PoolChoice<'_>,
    sr: Option<&str>,
) -> Result<ExitCode> {
    let Some(sr_uuid) = sr else {
        bail!(usage!("--to xapi needs --sr UUID"));
    };
    let (pool, named) = match choice.config {
        Some(path) => {
            let config = Config::load(path)?;
            let pool = config_pool(&config, path, choice.pool)?;
            (pool, Named::Config)
        }
        None => (pool_from_flags(choice.login, 1)?, Named::Flags),
    };
    // Refused settings (plain HTTP, an unreadable password) before anything else.
    cbtvault_runner::client_options(&pool).map_err(|e| wording(e, named))?;
    let repo = super::open(repo)?;
    let rp = super::resolve(&repo, id)?;
    let _lock = repo.lock_shared()?;
    let rt = super::runtime()?;
    let started = std::time::Instant::now();
    let restored = rt
        .block_on(cbtvault_runner::restore_to_pool(
            &pool,
            repo.clone(),
            &rp,
            sr_uuid,
        ))
        .map_err(|e| wording(e, named))?;
    if g.json {
        // The `restore --json` schema; the upload writes every block.
        output::print_json(&json!({
            "restore_point": rp.id, "disk": rp.manifest.disk, "to": "xapi",
            "vdi": restored.vdi, "sr": sr_uuid,
            "stats": {
                "blocks_written": restored.bytes.div_ceil(cbtvault_repo::BLOCK_SIZE),
                "bytes_written": restored.bytes,
                "blocks_zero": 0,
                "duration_ms": started.elapsed().as_millis() as u64,
            },
        }));
    } else if !g.quiet {
        outln!(
            "restored {} into new VDI {} on SR {sr_uuid}",
            output::short(&rp.id),
            restored.vdi
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `restore ID --to xapi --only-changed --vdi UUID [--target-state ID2]
/// (--xapi ... | --config F [--pool NAME])`: the existing VDI rolled to
/// the restore point, uploading only the blocks that differ.
pub fn rollback_xapi(
    g: &Global,
    repo: &Path,
    id: &str,
    choice: PoolChoice<'_>,
    vdi: &str,
    target_state: Option<&str>,
) -> Result<ExitCode> {
    let (pool, named) = match choice.config {
        Some(path) => {
            let config = Config::load(path)?;
            let pool = config_pool(&config, path, choice.pool)?;
            (pool, Named::Config)
        }
        None => (pool_from_flags(choice.login, 1)?, Named::Flags),
    };
    cbtvault_runner::client_options(&pool).map_err(|e| wording(e, named))?;
    let repo = super::open(repo)?;
    let rp = super::resolve(&repo, id)?;
    let holds = match target_state {
        Some(spec) => Some(super::resolve(&repo, spec).context("--target-state")?),
        None => None,
    };
    let _lock = repo.lock_shared()?;
    let rt = super::runtime()?;
    let stats = rt
        .block_on(cbtvault_runner::rollback_vdi(
            &pool,
            repo.clone(),
            &rp,
            vdi,
            holds,
        ))
        .map_err(|e| wording(e, named))
        .with_context(|| {
            format!(
                "rollback of VDI {vdi} to {} failed; it may hold a mix of both states now: run it again",
                output::short(&rp.id)
            )
        })?;
    if let Some(why) = &stats.fallback
        && !g.json
    {
        eprintln!("warning: uploading the whole disk: {why}");
    }
    if g.json {
        output::print_json(&json!({
            "restore_point": rp.id, "disk": rp.manifest.disk, "to": "xapi",
            "vdi": vdi, "only_changed": true, "target_state": stats.target_state,
            "stats": {
                "method": stats.method,
                "fallback": stats.fallback,
                "blocks_compared": stats.blocks_compared,
                "blocks_written": stats.blocks_written,
                "bytes_uploaded": stats.bytes_uploaded,
                "duration_ms": stats.duration_ms,
            },
        }));
    } else if !g.quiet {
        outln!(
            "rolled VDI {vdi} to {} of disk {:?}: {} of {} blocks written (compared by {}), {} uploaded, {:.1} s",
            output::short(&rp.id),
            rp.manifest.disk,
            stats.blocks_written,
            stats.blocks_compared.max(stats.blocks_written),
            stats.method,
            output::bytes(stats.bytes_uploaded),
            stats.duration_ms as f64 / 1000.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `cleanup --config F --job J`, or `cleanup --repo R --disk D --source
/// qmp:SOCKET --node N`: what killed QEMU backups left, removed.
pub fn cleanup(g: &Global, args: &CleanupArgs) -> Result<ExitCode> {
    let spec = match (&args.config, &args.source) {
        (Some(path), _) => {
            let config = Config::load(path)?;
            let mut spec = JobSpec::from_config(&config, args.job.as_deref().unwrap_or_default())
                .with_context(|| path.display().to_string())?;
            if let Some(repo) = &args.repo {
                spec.repo = repo.clone();
            }
            spec
        }
        (None, Some(source)) => {
            let (Some(repo), Some(disk), Some(node)) = (&args.repo, &args.disk, &args.node) else {
                bail!(usage!(
                    "give --repo, --disk and --node with --source qmp:SOCKET"
                ));
            };
            let Some(socket) = source.strip_prefix("qmp:") else {
                bail!(usage!(
                    "--source takes qmp:SOCKET here, as given to `backup`"
                ));
            };
            let target = Target::Qemu {
                host: QemuHost {
                    name: "local".into(),
                    qmp_socket: PathBuf::from(socket),
                    nbd_socket: args.nbd_socket.clone(),
                    max_disks: 1,
                    vm: None,
                },
                nodes: vec![cbtvault_runner::QemuNode {
                    node: node.clone(),
                    disk: Some(disk.clone()),
                }],
            };
            // The prefix `backup --source qmp:` uses for its QEMU job names.
            JobSpec::one_off("cbtv", repo.clone(), target)
        }
        (None, None) => bail!(usage!(
            "give --config FILE --job NAME, or --repo, --disk, --source qmp:SOCKET and --node"
        )),
    };
    let repo = super::open(&spec.repo)?;
    let rt = super::runtime()?;
    let cleaned = rt
        .block_on(cbtvault_runner::cleanup(&spec, repo))
        .map_err(anyhow::Error::from)?;
    if g.json {
        output::print_json(&serde_json::Value::Array(
            cleaned
                .iter()
                .map(|c| json!({ "node": c.node, "disk": c.disk, "removed": c.removed }))
                .collect(),
        ));
    } else if !g.quiet {
        for c in &cleaned {
            if c.removed.is_empty() {
                outln!("node {}: nothing left behind", c.node);
            } else {
                outln!("node {}: removed {}", c.node, c.removed.join(", "));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
