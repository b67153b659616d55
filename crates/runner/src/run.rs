//! Running a job: log in, plan its captures, run them within the limits,
//! retry what may pass, apply retention, report per disk.

use std::sync::Arc;
use std::time::Duration;

use cbtvault_engine::qemu::{QemuNode as QemuProvider, QemuOptions};
use cbtvault_engine::vmware::{NbdAccess, VmwareFcd, VmwareOptions, VmwareVm};
use cbtvault_engine::xenserver::{XenOptions, XenVdi, XenVm};
use cbtvault_engine::{BackupOutcome, DiskRun, DriveContext, Throttle, drive};
use cbtvault_repo::{Repository, VmInfo};
use cbtvault_xenapi::Client;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::error::{BoxError, Error, Result};
use crate::limits::{JobLimits, Limits, PlaceLimit};
use crate::report::{DiskReport, JobReport, Observer};
use crate::spec::{JobSpec, QemuNode, Target};

/// The longest pause between two tries of a disk.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(600);
/// How long a cancelled capture may take to leave the hypervisor clean.
const ABORT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs jobs. A process has one; its limits hold across every job it runs.
#[derive(Debug)]
pub struct Runner {
    limits: Arc<Limits>,
}

/// What one capture is: the unit the hypervisor snapshots at once.
#[derive(Clone, Debug)]
enum Capture {
    /// One VDI on its own; `vm` when it is one of a VM's disks, with the
    /// VM metadata this run saved.
    XenVdi {
        uuid: String,
        vm: Option<String>,
        metadata: Option<String>,
    },
    /// Every disk of a VM from one `VM.snapshot`.
    XenVm { uuid: String },
    /// One QEMU block node.
    QemuNode(QemuNode),
    /// Every disk of a VMware VM from one VM snapshot.
    VmwareVm { vm: String },
    /// One First Class Disk.
    VmwareFcd { id: String, datastore: String },
}

impl Capture {
    fn label(&self) -> String {
        match self {
            Capture::XenVdi { uuid, vm: None, .. } => format!("VDI {uuid}"),
            Capture::XenVdi {
                uuid, vm: Some(vm), ..
            } => format!("VDI {uuid} (VM {vm})"),
            Capture::XenVm { uuid } => format!("VM {uuid}"),
            Capture::QemuNode(n) => format!("node {}", n.node),
            Capture::VmwareVm { vm } => format!("VMware VM {vm}"),
            Capture::VmwareFcd { id, .. } => format!("FCD {id}"),
        }
    }
}

/// What a job's captures share: the logged-in hypervisor, options, limits.
struct JobContext<'a> {
    spec: &'a JobSpec,
    repo: Arc<Repository>,
    limits: JobLimits,
    observer: Arc<dyn Observer>,
    cancel: CancellationToken,
    hypervisor: Hypervisor,
    /// The job's bandwidth limit, shared by its disks.
    throttle: Option<Arc<Throttle>>,
}

enum Hypervisor {
    Xen {
        client: Client,
        options: XenOptions,
    },
    Qemu {
        qmp: Arc<cbtvault_qemu::Qmp>,
        host: String,
        work_dir: Option<std::path::PathBuf>,
        nbd_socket: Option<std::path::PathBuf>,
        /// The VM QEMU runs, when it runs one (a storage daemon does not,
        /// unless the configuration names it).
        vm: Option<cbtvault_qmp::VmIdentity>,
        /// The id of the VM's saved drive layout.
        metadata: Option<String>,
    },
    Vmware {
        client: cbtvault_vsphere::Client,
        options: VmwareOptions,
    },
}

/// One try of one capture: per disk, its label and result; or a failure
/// before any disk was read.
type Attempt = Result<Vec<Tried>>;

/// One disk's result of a try, and the capture that would try it again.
struct Tried {
    label: String,
    outcome: Result<BackupOutcome, Error>,
    /// A disk of a consistent VM snapshot is tried again alone, since its
    /// siblings are committed; any other capture again as it was.
    again: Capture,
}

impl Runner {
    /// A runner with the configuration's limits across jobs.
    pub fn new(limits: &cbtvault_config::Limits) -> Runner {
        Runner {
            limits: Arc::new(Limits::new(limits.disks)),
        }
    }

    /// Runs `spec` into `repo`. Fails only when the job cannot start (its
    /// lock is held, the pool refuses the login, QMP is unreachable); a
    /// disk that fails is reported in its [`DiskReport`] and never stops the
    /// others.
    pub async fn run(
        &self,
        spec: &JobSpec,
        repo: Arc<Repository>,
        observer: Arc<dyn Observer>,
        cancel: CancellationToken,
    ) -> Result<JobReport> {
        let span = tracing::info_span!("job", job = %spec.name);
        async move {
            let started = jiff::Timestamp::now();
            let _job_lock = if spec.exclusive {
                Some(lock_job(&repo, &spec.name).await?)
            } else {
                None
            };
            let (hypervisor, limits, captures, mut disks) = self.connect(spec, &repo).await?;
            let ctx = JobContext {
                spec,
                repo,
                limits,
                observer,
                cancel,
                hypervisor,
                throttle: spec.bandwidth.map(|b| Arc::new(Throttle::new(b))),
            };
            let runs = captures.iter().map(|c| ctx.run_capture(c));
            for reports in futures::future::join_all(runs).await {
                disks.extend(reports);
            }
            if let Hypervisor::Xen { client, .. } = &ctx.hypervisor
                && let Err(e) = client.logout().await
            {
                warn!(error = %e, "logout failed");
            }
            if let Hypervisor::Vmware { client, .. } = &ctx.hypervisor
                && let Err(e) = client.logout().await
            {
                warn!(error = %e, "logout failed");
            }
            Ok(JobReport {
                job: spec.name.clone(),
                started,
                finished: jiff::Timestamp::now(),
                disks,
            })
        }
        .instrument(span)
        .await
    }

    /// Connects to the job's hypervisor and plans its captures. A VM
    /// backed up disk by disk has its metadata saved once here; VMs whose
    /// disks cannot be listed are reported as failed.
    async fn connect(
        &self,
        spec: &JobSpec,
        repo: &Arc<Repository>,
    ) -> Result<(Hypervisor, JobLimits, Vec<Capture>, Vec<DiskReport>)> {
        let mut failed = Vec::new();
        match &spec.target {
            Target::Xen {
                pool,
                vms,
                vdis,
                consistent,
            } => {
                let client = crate::login::login(pool).await?;
                let mut options = XenOptions::new(&spec.name, pool.url.clone());
                options.nbd_connections = pool.nbd_connections;
                options.backup = spec.backup.clone();
                let limits = JobLimits::new(
                    &self.limits,
                    spec.parallel,
                    (
                        &format!("pool:{}", pool.name),
                        PlaceLimit::Connections(pool.max_nbd_connections),
                    ),
                );
                let mut captures: Vec<Capture> = vdis
                    .iter()
                    .map(|uuid| Capture::XenVdi {
                        uuid: uuid.clone(),
                        vm: None,
                        metadata: None,
                    })
                    .collect();
                for vm in vms {
                    if *consistent {
                        captures.push(Capture::XenVm { uuid: vm.clone() });
                        continue;
                    }
                    match cbtvault_xen::vm_disks(&client, vm).await {
                        Ok(disks) => {
                            let metadata =
                                cbtvault_engine::xenserver::save_vm_metadata(&client, repo, vm)
                                    .await;
                            for d in disks {
                                let known = captures.iter().any(
                                    |c| matches!(c, Capture::XenVdi { uuid, .. } if *uuid == d.vdi_uuid),
                                );
                                if !known {
                                    captures.push(Capture::XenVdi {
                                        uuid: d.vdi_uuid,
                                        vm: Some(vm.clone()),
                                        metadata: metadata.clone(),
                                    });
                                }
                            }
                        }
                        Err(source) => failed.push(DiskReport {
                            label: format!("VM {vm}"),
                            attempts: 1,
                            outcome: Err(Error::Xapi {
                                pool: pool.name.clone(),
                                what: format!("listing the disks of VM {vm}"),
                                source: source.into(),
                            }),
                            retention: None,
                            alerts: Vec::new(),
                        }),
                    }
                }
                info!(captures = captures.len(), "planned");
                Ok((
                    Hypervisor::Xen { client, options },
                    limits,
                    captures,
                    failed,
                ))
            }
            Target::Vmware { vcenter, vms, fcds } => {
                let client = crate::login::vcenter(vcenter).await?;
                let options = VmwareOptions {
                    job: spec.name.clone(),
                    server: vcenter.name.clone(),
                    nbd: NbdAccess {
                        template: vcenter.nbd_uri.clone(),
                    },
                    quiesce: vcenter.quiesce,
                };
                let limits = JobLimits::new(
                    &self.limits,
                    spec.parallel,
                    (
                        &format!("vcenter:{}", vcenter.name),
                        PlaceLimit::Disks(vcenter.max_disks),
                    ),
                );
                let (vms, unknown) = vmware_vms(&client, &vcenter.name, vms).await;
                failed.extend(unknown);
                let mut captures: Vec<Capture> =
                    vms.into_iter().map(|vm| Capture::VmwareVm { vm }).collect();
                captures.extend(fcds.iter().map(|f| Capture::VmwareFcd {
                    id: f.id.clone(),
                    datastore: f.datastore.clone(),
                }));
                info!(captures = captures.len(), "planned");
                Ok((
                    Hypervisor::Vmware { client, options },
                    limits,
                    captures,
                    failed,
                ))
            }
            Target::Qemu { host, nodes } => {
                let qmp = cbtvault_qemu::Qmp::connect(host.qmp_socket.as_path())
                    .await
                    .map_err(|source| Error::Qmp {
                        socket: host.qmp_socket.clone(),
                        source: source.into(),
                    })?;
                // Recorded with the restore points when QEMU runs a VM, or
                // when the configuration names the VM a storage daemon serves.
                let vm = match qmp.query_vm_identity().await {
                    Ok(vm) => vm,
                    Err(e) => {
                        warn!(error = %e, "could not ask QEMU which VM it runs");
                        None
                    }
                }
                .or_else(|| {
                    host.vm.clone().map(|name| cbtvault_qmp::VmIdentity {
                        name: Some(name),
                        uuid: None,
                    })
                });
                // The VM's drive layout, once for the run: a whole-VM
                // restore puts each image back in its place.
                let metadata = match &vm {
                    Some(vm) => {
                        let names: Vec<String> = nodes.iter().map(|n| n.node.clone()).collect();
                        crate::qemu_layout::save_layout(&qmp, repo, &host.name, vm, &names).await
                    }
                    None => None,
                };
                let limits = JobLimits::new(
                    &self.limits,
                    spec.parallel,
                    (
                        &format!("qemu:{}", host.name),
                        PlaceLimit::Disks(host.max_disks),
                    ),
                );
                let captures = nodes.iter().cloned().map(Capture::QemuNode).collect();
                Ok((
                    Hypervisor::Qemu {
                        qmp: Arc::new(qmp),
                        host: host.name.clone(),
                        work_dir: host.qmp_socket.parent().map(|p| p.to_path_buf()),
                        nbd_socket: host.nbd_socket.clone(),
                        vm,
                        metadata,
                    },
                    limits,
                    captures,
                    failed,
                ))
            }
        }
    }
}

impl JobContext<'_> {
    /// Runs one capture with its retries; a consistent VM's disks that
    /// failed for a reason that may pass are retried alone (each from its
    /// own snapshot), since their siblings are committed already.
    async fn run_capture(&self, capture: &Capture) -> Vec<DiskReport> {
        let mut reports = Vec::new();
        let mut todo = vec![(capture.clone(), 1u32)];
        let mut delay = self.spec.retry_delay;
        while let Some((capture, attempt)) = todo.pop() {
            let results = self.attempt(&capture).await;
            let results = match results {
                Ok(disks) => disks,
                Err(e) => vec![Tried {
                    label: capture.label(),
                    outcome: Err(e),
                    again: capture.clone(),
                }],
            };
            let mut retry = Vec::new();
            for Tried {
                label,
                outcome,
                again,
            } in results
            {
                let may_retry = matches!(&outcome, Err(e) if e.is_retryable())
                    && attempt <= self.spec.retries
                    && !self.cancel.is_cancelled();
                if may_retry {
                    if let Err(e) = &outcome {
                        warn!(disk = %label, attempt, error = %e, retry_in = ?delay, "backup failed; trying again");
                    }
                    // A capture retried whole (a VMware VM) comes back
                    // once per failed disk: it is tried again once.
                    if !retry.iter().any(|c: &Capture| c.label() == again.label()) {
                        retry.push(again);
                    }
                    continue;
                }
                // Before retention, which may forget some of the history.
                let alerts = match &outcome {
                    Ok(o) => crate::alerts::of_outcome(&self.repo, o).await,
                    Err(e) => crate::alerts::of_error(e),
                };
                for alert in &alerts {
                    warn!(disk = %label, %alert, "alert");
                }
                let retention = match (&outcome, self.spec.retention) {
                    (Ok(o), Some(keep)) => {
                        Some(crate::retention::apply(&self.repo, &o.manifest.disk, keep).await)
                    }
                    _ => None,
                };
                let report = DiskReport {
                    label,
                    attempts: attempt,
                    outcome,
                    retention,
                    alerts,
                };
                self.observer.disk_done(&report);
                reports.push(report);
            }
            if retry.is_empty() {
                continue;
            }
            tokio::select! {
                _ = self.cancel.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_RETRY_DELAY);
            todo.extend(retry.into_iter().map(|again| (again, attempt + 1)));
        }
        reports
    }

    /// One try of `capture`, within the limits.
    async fn attempt(&self, capture: &Capture) -> Attempt {
        let _capture = tokio::select! {
            _ = self.cancel.cancelled() => return Err(cbtvault_engine::Error::Cancelled.into()),
            permit = self.limits.start_capture() => permit,
        };
        let mut backup = self.spec.backup.clone();
        backup.throttle = self.throttle.clone();
        let ctx = DriveContext {
            backup,
            verify_samples: 16,
            audit_samples: self.spec.audit_samples,
            parallel: self.spec.parallel,
            slots: self.limits.slots.clone(),
            progress: self.observer.clone(),
            cancel: self.cancel.clone(),
            abort_timeout: ABORT_TIMEOUT,
        };
        let repo = self.repo.clone();
        let runs = match (&self.hypervisor, capture) {
            (Hypervisor::Xen { client, options }, Capture::XenVdi { uuid, metadata, .. }) => {
                let mut provider =
                    XenVdi::new(client, uuid, options).with_vm_metadata(metadata.clone());
                drive(&mut provider, repo, &ctx).await?
            }
            (Hypervisor::Xen { client, options }, Capture::XenVm { uuid }) => {
                let mut provider = XenVm::new(client, uuid, options);
                drive(&mut provider, repo, &ctx).await?
            }
            (
                Hypervisor::Qemu {
                    qmp,
                    host,
                    work_dir,
                    nbd_socket,
                    vm,
                    metadata,
                },
                Capture::QemuNode(node),
            ) => {
                // Node names repeat across hosts (`drive0`): the host is
                // part of the disk's identity.
                let disk = node.disk_name(host);
                let options = QemuOptions {
                    // Short (it names QEMU objects), and this repository's
                    // and disk's own.
                    job: cbtvault_engine::qemu::job_name(&self.spec.name, &repo, &disk.name),
                    disk,
                    verify_samples: 16,
                    backup: ctx.backup.clone(),
                    vm: vm.as_ref().map(|vm| VmInfo {
                        uuid: vm.uuid.clone().unwrap_or_default(),
                        name: vm.name.clone().unwrap_or_default(),
                        host: host.clone(),
                        disk_label: None,
                        device: Some(node.node.clone()),
                        metadata: metadata.clone(),
                    }),
                };
                let disk_options = cbtvault_qemu::DiskOptions {
                    work_dir: work_dir.clone(),
                    nbd_socket: nbd_socket.clone(),
                    ..Default::default()
                };
                let qemu = cbtvault_qemu::QemuDisk::from_qmp(qmp.clone(), &node.node, disk_options)
                    .await
                    .map_err(|source| Error::Qemu {
                        node: node.node.clone(),
                        source: source.into(),
                    })?;
                let mut provider = QemuProvider::new(&qemu, &options);
                drive(&mut provider, repo, &ctx).await?
            }
            (Hypervisor::Vmware { client, options }, Capture::VmwareVm { vm }) => {
                let mut provider = VmwareVm::new(client, vm, options);
                drive(&mut provider, repo, &ctx).await?
            }
            (Hypervisor::Vmware { client, options }, Capture::VmwareFcd { id, datastore }) => {
                let mut provider = VmwareFcd::new(client, id, datastore, options);
                drive(&mut provider, repo, &ctx).await?
            }
            _ => {
                return Err(Error::Internal(format!(
                    "{capture} does not belong to this job's hypervisor"
                )));
            }
        };
        Ok(runs
            .into_iter()
            .map(|run| Tried {
                label: disk_label(capture, &run),
                again: match capture {
                    Capture::XenVm { uuid } => Capture::XenVdi {
                        uuid: run.id.clone(),
                        vm: Some(uuid.clone()),
                        metadata: run.vm.as_ref().and_then(|vm| vm.metadata.clone()),
                    },
                    other => other.clone(),
                },
                outcome: run.outcome.map_err(Error::from),
            })
            .collect())
    }
}

/// How a disk is named in reports: `VDI UUID`, `VDI UUID (VM UUID)`,
/// `node NODE`.
fn disk_label(capture: &Capture, run: &DiskRun) -> String {
    match capture {
        Capture::XenVm { uuid } => format!("VDI {} (VM {uuid})", run.id),
        Capture::QemuNode(n) => format!("node {}", n.node),
        Capture::VmwareVm { vm } => format!("VMware disk {} (VM {vm})", run.id),
        other => other.label(),
    }
}

impl std::fmt::Display for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

/// The morefs of `vms`: a moref (`vm-42`, or a number on ESXi) as given,
/// a name looked up in one listing of the inventory. A name that matches
/// no VM, or several, is reported as a failed VM.
async fn vmware_vms(
    client: &cbtvault_vsphere::Client,
    vcenter: &str,
    vms: &[String],
) -> (Vec<String>, Vec<DiskReport>) {
    let is_moref = |v: &str| {
        let digits = v.strip_prefix("vm-").unwrap_or(v);
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
    };
    let mut morefs = Vec::new();
    let mut failed = Vec::new();
    let mut inventory = None;
    for vm in vms {
        if is_moref(vm) {
            morefs.push(vm.clone());
            continue;
        }
        if inventory.is_none() {
            inventory = Some(client.vm_names().await);
        }
        let found: std::result::Result<String, BoxError> = match inventory.as_ref() {
            Some(Ok(list)) => {
                let ids: Vec<&String> = list
                    .iter()
                    .filter(|(_, n)| n == vm)
                    .map(|(id, _)| id)
                    .collect();
                match ids[..] {
                    [id] => Ok(id.clone()),
                    [] => Err("no VM has this name".into()),
                    _ => Err(format!("{} VMs have this name; name it by moref", ids.len()).into()),
                }
            }
            Some(Err(e)) => Err(format!("listing the VMs: {e}").into()),
            None => Err("listing the VMs".into()),
        };
        match found {
            Ok(id) => {
                if !morefs.contains(&id) {
                    morefs.push(id);
                }
            }
            Err(source) => failed.push(DiskReport {
                label: format!("VMware VM {vm:?}"),
                attempts: 1,
                outcome: Err(Error::Vcenter {
                    vcenter: vcenter.to_owned(),
                    what: format!("finding VM {vm:?}"),
                    source,
                }),
                retention: None,
                alerts: Vec::new(),
            }),
        }
    }
    (morefs, failed)
}

/// One run of a job at a time: a second one is refused at once, before it
/// touches the hypervisor (it would otherwise reap the snapshots of the run
/// in progress). The lock is the kernel's, so a killed run leaves none.
async fn lock_job(repo: &Arc<Repository>, job: &str) -> Result<cbtvault_repo::Lock> {
    let (repo, job) = (repo.clone(), job.to_string());
    tokio::task::spawn_blocking(move || match repo.lock_job(&job) {
        Ok(lock) => Ok(lock),
        Err(cbtvault_repo::Error::Locked { .. }) => Err(Error::JobRunning { job }),
        Err(e) => Err(e.into()),
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
}
