//! Backups of hypervisor disks: XenServer VDIs (one-off with --xapi, or a
//! job from --config) and QEMU block nodes (qmp:SOCKET, or a job).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cbtvault_config::{Config, JobKind, PasswordSource, Retention};
use cbtvault_engine::qemu::QemuOptions;
use cbtvault_engine::xenserver::{self, XenOptions};
use cbtvault_engine::{BackupOutcome, DiskName, Progress};
use cbtvault_repo::Repository;
use cbtvault_xenapi::{Client, ClientOptions, Password, TlsTrust, TransportChoice};
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cli::{BackupArgs, Global, XapiLogin};
use crate::failure::{self, usage};
use crate::output::{self, Bar, errln, outln};

/// One disk's result in a multi-disk run.
struct DiskResult {
    label: String,
    outcome: Result<BackupOutcome>,
}

/// A pool to log in to.
struct PoolPlan {
    options: ClientOptions,
    nbd_connections: usize,
}

/// What a XenServer or QEMU run does.
enum Plan {
    Xen {
        pool: Box<PoolPlan>,
        vms: Vec<String>,
        vdis: Vec<String>,
        /// All disks of a VM from one VM snapshot.
        consistent: bool,
    },
    Qemu {
        /// The host's name in the configuration: part of each disk's name.
        host: String,
        socket: PathBuf,
        nbd_socket: Option<PathBuf>,
        nodes: Vec<String>,
    },
}

struct Run {
    job: String,
    repo: PathBuf,
    parallel: usize,
    retention: Option<Retention>,
    plan: Plan,
}

fn password(source: PasswordSource) -> Result<Password> {
    Ok(match source {
        PasswordSource::File(f) => Password::from_file(&f)?,
        PasswordSource::Env(v) => Password::from_env(&v)?,
    })
}

fn trust(ca: Option<&Path>, pin: Option<&Path>, insecure: bool) -> Result<Option<TlsTrust>> {
    Ok(match (ca, pin, insecure) {
        (Some(ca), _, _) => Some(TlsTrust::ca_file(ca)?),
        (None, Some(pin), _) => Some(TlsTrust::pinned_file(pin)?),
        (None, None, true) => {
            tracing::warn!("--insecure: the pool's certificate is not checked");
            Some(TlsTrust::InsecureAcceptAny)
        }
        (None, None, false) => None,
    })
}

/// The run the command line describes.
fn plan(args: &BackupArgs) -> Result<Run> {
    if let Some(path) = &args.config {
        let config = Config::load(path)?;
        let name = args.job.as_deref().unwrap_or_default();
        let job = config
            .job(name)
            .with_context(|| path.display().to_string())?;
        let plan = match &job.kind {
            JobKind::Xenserver {
                pool,
                vms,
                vdis,
                consistent_vm_snapshot,
            } => {
                let p = config.pool(pool).context("the job's pool")?;
                let mut options =
                    ClientOptions::new(&p.url, p.username.clone(), password(p.password_source())?)?;
                let opt_in = format!("set allow_insecure_http = true in pool {:?}", p.name);
                super::check_xapi_scheme(&options, p.allow_insecure_http, &opt_in)?;
                options.tls = trust(p.ca.as_deref(), p.pin.as_deref(), p.insecure)?;
                options.transport = match p.transport {
                    cbtvault_config::Transport::Auto => TransportChoice::Auto,
                    cbtvault_config::Transport::JsonRpc => TransportChoice::JsonRpc,
                    cbtvault_config::Transport::XmlRpc => TransportChoice::XmlRpc,
                };
                Plan::Xen {
                    pool: Box::new(PoolPlan {
                        options,
                        nbd_connections: p.nbd_connections,
                    }),
                    vms: vms.clone(),
                    vdis: vdis.clone(),
                    consistent: *consistent_vm_snapshot,
                }
            }
            JobKind::Qemu { host, nodes } => {
                let h = config.qemu_host(host).context("the job's QEMU host")?;
                Plan::Qemu {
                    host: h.name.clone(),
                    socket: h.qmp_socket.clone(),
                    nbd_socket: h.nbd_socket.clone(),
                    nodes: nodes.clone(),
                }
            }
        };
        return Ok(Run {
            job: job.name.clone(),
            repo: args
                .repo
                .clone()
                .unwrap_or_else(|| config.repository.path.clone()),
            parallel: job.parallel,
            retention: job.retention,
            plan,
        });
    }
    let x = &args.xen;
    let Some(repo) = &args.repo else {
        bail!(usage!("give --repo and --xapi (or --config with --job)"));
    };
    if x.vdi.is_empty() && x.vm.is_empty() {
        bail!(usage!("give --vdi UUID or --vm UUID (repeatable)"));
    }
    let options = login_options(&x.login)?;
    Ok(Run {
        job: "adhoc".into(),
        repo: repo.clone(),
        parallel: x.parallel,
        retention: None,
        plan: Plan::Xen {
            pool: Box::new(PoolPlan {
                options,
                nbd_connections: args.connections.max(1),
            }),
            vms: x.vm.clone(),
            vdis: x.vdi.clone(),
            consistent: x.vm_snapshot,
        },
    })
}

/// Client options from `--xapi` and its companions.
pub fn login_options(login: &XapiLogin) -> Result<ClientOptions> {
    let Some(url) = &login.xapi else {
        bail!(usage!("give --xapi https://HOST"));
    };
    let source = match (&login.password_file, &login.password_env) {
        (Some(f), _) => PasswordSource::File(f.clone()),
        (None, Some(v)) => PasswordSource::Env(v.clone()),
        (None, None) => {
            bail!(usage!(
                "give --password-file FILE or --password-env VAR (never the password itself)"
            ))
        }
    };
    let mut options = ClientOptions::new(url, login.username.clone(), password(source)?)?;
    super::check_xapi_scheme(
        &options,
        login.allow_insecure_http,
        "pass --allow-insecure-http",
    )?;
    options.tls = trust(login.ca.as_deref(), login.pin.as_deref(), login.insecure)?;
    Ok(options)
}

/// `backup --xapi ...` or `backup --config FILE --job NAME`.
pub fn backup(g: &Global, args: &BackupArgs) -> Result<ExitCode> {
    let run = plan(args)?;
    let repo = super::open(&run.repo)?;
    let _job_lock = match args.config {
        Some(_) => Some(lock_job(&repo, &run.job)?),
        None => None,
    };
    let options = super::data::backup_options(args);
    let rt = super::runtime()?;
    let cancel = CancellationToken::new();
    let progress: Arc<dyn Progress> = Arc::new(Bar::new(g));
    let results = rt.block_on(async {
        let watch = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                watch.cancel();
            }
        });
        match &run.plan {
            Plan::Xen {
                pool,
                vms,
                vdis,
                consistent,
            } => {
                let targets = XenTargets {
                    vms,
                    vdis,
                    consistent: *consistent,
                };
                run_xen(&run, pool, targets, repo.clone(), options, progress, cancel).await
            }
            Plan::Qemu {
                host,
                socket,
                nbd_socket,
                nodes,
            } => {
                let host = QemuHostPlan {
                    name: host,
                    socket,
                    nbd_socket: nbd_socket.as_deref(),
                };
                run_qemu(
                    &run.job,
                    host,
                    nodes,
                    run.parallel,
                    repo.clone(),
                    options,
                    progress,
                    cancel,
                )
                .await
            }
        }
    })?;
    report(g, &repo, results, run.retention)
}

/// One run of a job at a time: a second one is refused at once, before it
/// touches the hypervisor (it would otherwise reap the snapshots of the run
/// in progress). The lock is the kernel's, so a killed run leaves none.
fn lock_job(repo: &Repository, job: &str) -> Result<cbtvault_repo::Lock> {
    match repo.lock_job(job) {
        Ok(lock) => Ok(lock),
        Err(cbtvault_repo::Error::Locked { .. }) => bail!(
            "job {job:?} is already running in another cbtvault process; this run stops without touching anything (run it again when that one has finished)"
        ),
        Err(e) => Err(e).with_context(|| format!("locking job {job:?}")),
    }
}

/// `backup --source qmp:SOCKET --node NODE --disk NAME`.
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
    let repo = super::open(repo)?;
    let options = QemuOptions {
        job: cbtvault_engine::qemu::job_name("cbtv", &repo, disk),
        disk: DiskName::new(disk),
        verify_samples: 16,
        backup: super::data::backup_options(args),
    };
    let rt = super::runtime()?;
    let progress: Arc<dyn Progress> = Arc::new(Bar::new(g));
    let outcome = rt.block_on(async {
        let disk_options = cbtvault_qemu::DiskOptions {
            nbd_socket: args.nbd_socket.clone(),
            ..Default::default()
        };
        let qemu =
            cbtvault_qemu::QemuDisk::connect_with(socket.to_path_buf().into(), node, disk_options)
                .await?;
        Ok::<_, anyhow::Error>(
            cbtvault_engine::qemu::backup_node(
                &qemu,
                repo.clone(),
                &options,
                progress,
                CancellationToken::new(),
            )
            .await?,
        )
    });
    let outcome = outcome
        .map_err(|e| failure::with_hint(e, "--nbd-socket PATH"))
        .with_context(|| format!("backup of QEMU node {node:?} ({disk:?}) failed"))?;
    super::data::print_outcome(g, outcome);
    Ok(ExitCode::SUCCESS)
}

/// Which disks of a pool to back up.
struct XenTargets<'a> {
    vms: &'a [String],
    vdis: &'a [String],
    consistent: bool,
}

async fn run_xen(
    run: &Run,
    pool: &PoolPlan,
    targets_in: XenTargets<'_>,
    repo: Arc<Repository>,
    backup: cbtvault_engine::BackupOptions,
    progress: Arc<dyn Progress>,
    cancel: CancellationToken,
) -> Result<Vec<DiskResult>> {
    let client = Client::connect(pool.options.clone())
        .await
        .with_context(|| format!("logging in to {}", pool.options.url))?;
    let mut options = XenOptions::new(&run.job, pool.options.url.to_string());
    options.nbd_connections = pool.nbd_connections;
    options.backup = backup;
    let mut results = Vec::new();
    if targets_in.consistent {
        for vm in targets_in.vms {
            match xenserver::backup_vm(
                &client,
                repo.clone(),
                vm,
                &options,
                run.parallel,
                progress.clone(),
                cancel.clone(),
            )
            .await
            {
                Ok(disks) => results.extend(disks.into_iter().map(|(uuid, outcome)| DiskResult {
                    label: format!("VDI {uuid} (VM {vm})"),
                    outcome: outcome.map_err(anyhow::Error::from),
                })),
                Err(e) => results.push(DiskResult {
                    label: format!("VM {vm}"),
                    outcome: Err(e.into()),
                }),
            }
        }
    }
    let vms: &[String] = if targets_in.consistent {
        &[]
    } else {
        targets_in.vms
    };
    let mut targets: Vec<String> = targets_in.vdis.to_vec();
    for vm in vms {
        for uuid in vm_disks(&client, vm)
            .await
            .with_context(|| format!("listing the disks of VM {vm}"))?
        {
            if !targets.contains(&uuid) {
                targets.push(uuid);
            }
        }
    }
    let singles: Vec<DiskResult> = futures::stream::iter(targets)
        .map(|uuid| {
            let (client, repo, options, progress, cancel) = (
                &client,
                repo.clone(),
                &options,
                progress.clone(),
                cancel.clone(),
            );
            async move {
                let outcome =
                    xenserver::backup_vdi(client, repo, &uuid, options, progress, cancel).await;
                DiskResult {
                    label: format!("VDI {uuid}"),
                    outcome: outcome.map_err(anyhow::Error::from),
                }
            }
        })
        .buffer_unordered(run.parallel.max(1))
        .collect::<Vec<_>>()
        .await;
    results.extend(singles);
    if let Err(e) = client.logout().await {
        tracing::warn!(error = %e, "logout failed");
    }
    Ok(results)
}

/// The uuids of a VM's disks (not CD drives, not empty drives).
async fn vm_disks(client: &Client, vm_uuid: &str) -> Result<Vec<String>> {
    let vm = client.vm().get_by_uuid(vm_uuid).await?;
    let record = client.vm().get_record(&vm).await?;
    let mut out = Vec::new();
    for vbd in &record.vbds {
        let v = client.vbd().get_record(vbd).await?;
        if v.vbd_type.eq_ignore_ascii_case("disk") && !v.empty && !v.vdi.is_null() {
            out.push(client.vdi().get_uuid(&v.vdi).await?);
        }
    }
    Ok(out)
}

/// Where a QEMU host's sockets are.
struct QemuHostPlan<'a> {
    name: &'a str,
    socket: &'a Path,
    nbd_socket: Option<&'a Path>,
}

#[allow(clippy::too_many_arguments)]
async fn run_qemu(
    job: &str,
    host: QemuHostPlan<'_>,
    nodes: &[String],
    parallel: usize,
    repo: Arc<Repository>,
    backup: cbtvault_engine::BackupOptions,
    progress: Arc<dyn Progress>,
    cancel: CancellationToken,
) -> Result<Vec<DiskResult>> {
    // A QEMU monitor serves one client at a time: the nodes share it.
    let qmp = Arc::new(
        cbtvault_qemu::Qmp::connect(host.socket)
            .await
            .with_context(|| format!("connecting to QMP at {}", host.socket.display()))?,
    );
    let results = futures::stream::iter(nodes.iter())
        .map(|node| {
            let (qmp, repo, progress, cancel, backup) = (
                qmp.clone(),
                repo.clone(),
                progress.clone(),
                cancel.clone(),
                backup.clone(),
            );
            let nbd_socket = host.nbd_socket.map(Path::to_path_buf);
            let host_name = host.name;
            async move {
                // Node names repeat across hosts (`drive0`): the host is
                // part of the disk's identity.
                let disk_name = format!("qemu-{host_name}/{node}");
                let options = QemuOptions {
                    // Short (it names QEMU objects), and this repository's
                    // and disk's own.
                    job: cbtvault_engine::qemu::job_name(job, &repo, &disk_name),
                    disk: DiskName {
                        name: disk_name,
                        former: Some(format!("qemu-{node}")),
                    },
                    verify_samples: 16,
                    backup,
                };
                let outcome = async {
                    let disk_options = cbtvault_qemu::DiskOptions {
                        nbd_socket: nbd_socket.clone(),
                        ..Default::default()
                    };
                    let disk = cbtvault_qemu::QemuDisk::from_qmp(qmp, node, disk_options).await?;
                    Ok::<_, anyhow::Error>(
                        cbtvault_engine::qemu::backup_node(&disk, repo, &options, progress, cancel)
                            .await?,
                    )
                }
                .await;
                DiskResult {
                    label: format!("node {node}"),
                    outcome: outcome.map_err(|e| {
                        failure::with_hint(
                            e,
                            "nbd_socket in the [[qemu]] host of the configuration",
                        )
                    }),
                }
            }
        })
        .buffer_unordered(parallel.max(1))
        .collect::<Vec<_>>()
        .await;
    Ok(results)
}

/// Prints one line per disk (or, with --json, the array of restore points
/// committed), applies retention to the disks that succeeded, and fails if
/// any disk failed.
fn report(
    g: &Global,
    repo: &Repository,
    results: Vec<DiskResult>,
    retention: Option<Retention>,
) -> Result<ExitCode> {
    let total = results.len();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for r in results {
        match r.outcome {
            Ok(o) => {
                let s = &o.manifest.stats;
                if !g.quiet && !g.json {
                    outln!(
                        "{}: restore point {} ({}), read {} in {} blocks, stored {} new",
                        r.label,
                        output::short(&o.restore_point),
                        output::mode(&o.manifest.mode),
                        output::bytes(s.bytes_read),
                        s.blocks_read,
                        output::bytes(s.bytes_stored)
                    );
                }
                if let Some(keep) = retention {
                    apply_retention(repo, &o.manifest.disk, keep)?;
                }
                rows.push(output::restore_point_json(
                    &cbtvault_repo::RestorePointRow {
                        id: o.restore_point,
                        manifest: o.manifest,
                    },
                ));
            }
            Err(e) => {
                if !g.json {
                    errln!("cbtvault: error: {}: {}", r.label, failure::message(&e));
                }
                failed.push((r.label, e));
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

fn apply_retention(repo: &Repository, disk: &str, keep: Retention) -> Result<()> {
    let policy = cbtvault_repo::KeepPolicy {
        last: keep.keep_last,
        daily: keep.keep_daily,
        weekly: keep.keep_weekly,
        monthly: keep.keep_monthly,
    };
    if policy.is_empty() {
        return Ok(());
    }
    let selection = cbtvault_repo::ForgetSelection::Policy {
        policy,
        disk: Some(disk.to_string()),
    };
    let plan = repo.forget_plan(&selection, false)?;
    repo.forget(&plan)
        .with_context(|| format!("applying the retention policy to disk {disk:?}"))?;
    Ok(())
}

/// `restore ID --to xapi --sr UUID --xapi ...`: a new VDI in the pool,
/// uploaded through XAPI's `/import_raw_vdi`.
pub fn restore_to_xapi(
    g: &Global,
    repo: &Path,
    id: &str,
    login: &XapiLogin,
    sr: Option<&str>,
) -> Result<ExitCode> {
    let Some(sr_uuid) = sr else {
        bail!(usage!("--to xapi needs --sr UUID"));
    };
    let options = login_options(login)?;
    let repo = super::open(repo)?;
    let rp = super::resolve(&repo, id)?;
    let _lock = repo.lock_shared()?;
    let rt = super::runtime()?;
    let started = std::time::Instant::now();
    let url = options.url.clone();
    let vdi_uuid = rt.block_on(async {
        let client = Client::connect(options)
            .await
            .with_context(|| format!("logging in to {url}"))?;
        let result = async {
            let sr = client
                .sr()
                .get_by_uuid(sr_uuid)
                .await
                .context("looking up the SR")?;
            let size = rp.manifest.virtual_size;
            let label = format!("restore of {} ({})", rp.manifest.disk, rp.manifest.time);
            let vdi = client
                .vdi()
                .create(&cbtvault_xenapi::VdiCreate::new(label, sr, size))
                .await
                .context("creating the VDI")?;
            let reader = cbtvault_engine::serve::restore_point_reader(repo.clone(), &rp);
            if let Err(e) = client.import_raw_vdi(&vdi, reader, size).await {
                // Leave no half-written disk in the pool.
                let _ = client.vdi().destroy(&vdi).await;
                return Err(anyhow::Error::from(e).context("uploading the disk"));
            }
            Ok(client.vdi().get_uuid(&vdi).await?)
        }
        .await;
        let _ = client.logout().await;
        result
    })?;
    if g.json {
        // The `restore --json` schema; the upload writes every block.
        let size = rp.manifest.virtual_size;
        output::print_json(&json!({
            "restore_point": rp.id, "disk": rp.manifest.disk, "to": "xapi",
            "vdi": vdi_uuid, "sr": sr_uuid,
            "stats": {
                "blocks_written": size.div_ceil(cbtvault_repo::BLOCK_SIZE),
                "bytes_written": size,
                "blocks_zero": 0,
                "duration_ms": started.elapsed().as_millis() as u64,
            },
        }));
    } else if !g.quiet {
        outln!(
            "restored {} into new VDI {vdi_uuid} on SR {sr_uuid}",
            output::short(&rp.id)
        );
    }
    Ok(ExitCode::SUCCESS)
}
