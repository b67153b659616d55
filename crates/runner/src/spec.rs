//! What a job is: its disks, limits, retries and retention, from the
//! configuration file or from the command line.

use std::path::PathBuf;
use std::time::Duration;

use cbtvault_config::{Config, FcdRef, JobKind, Pool, QemuHost, Retention, Vcenter};
use cbtvault_engine::BackupOptions;

use crate::error::{Error, Result};

/// A job to run.
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// The job's name: tags its snapshots and names its QEMU checkpoints.
    pub name: String,
    /// The repository it backs up into.
    pub repo: PathBuf,
    pub target: Target,
    /// Disks of this job backed up at once.
    pub parallel: usize,
    /// Further tries of a disk that failed for a reason that may pass.
    pub retries: u32,
    /// Blocks reported unchanged that each incremental re-reads to check
    /// the hypervisor's report (the CBT audit; 0: none).
    pub audit_samples: usize,
    /// The pause before the first retry; it doubles after each.
    pub retry_delay: Duration,
    /// Most bytes per second the job reads, all its disks together.
    pub bandwidth: Option<u64>,
    /// What to keep of each disk after it is backed up.
    pub retention: Option<Retention>,
    /// Tuning of each disk's pipeline.
    pub backup: BackupOptions,
    /// One run of the job at a time (a configured job; one-off runs from
    /// the command line have no name to lock).
    pub exclusive: bool,
}

/// Which disks, where.
#[derive(Clone, Debug)]
pub enum Target {
    /// Disks of a XenServer pool: every disk of each VM, and single VDIs.
    Xen {
        pool: Pool,
        vms: Vec<String>,
        vdis: Vec<String>,
        /// All disks of a VM from one `VM.snapshot`.
        consistent: bool,
    },
    /// Block nodes of a QEMU host.
    Qemu {
        host: QemuHost,
        nodes: Vec<QemuNode>,
    },
    /// VMs (by moref, every disk from one VM snapshot) and First Class
    /// Disks of a vCenter.
    Vmware {
        vcenter: Vcenter,
        vms: Vec<String>,
        fcds: Vec<FcdRef>,
    },
}

/// A QEMU block node to back up.
#[derive(Clone, Debug)]
pub struct QemuNode {
    pub node: String,
    /// The disk's name in the repository; by default `qemu-HOST/NODE`.
    pub disk: Option<String>,
}

impl QemuNode {
    /// The node's disk in the repository: `qemu-HOST/NODE` (formerly
    /// `qemu-NODE`), unless a name was given.
    pub fn disk_name(&self, host: &str) -> cbtvault_engine::DiskName {
        match &self.disk {
            Some(name) => cbtvault_engine::DiskName::new(name),
            None => cbtvault_engine::DiskName {
                name: format!("qemu-{host}/{}", self.node),
                former: Some(format!("qemu-{}", self.node)),
            },
        }
    }
}

impl JobSpec {
    /// Job `name` of `config`.
    pub fn from_config(config: &Config, name: &str) -> Result<JobSpec> {
        let job = config.job(name)?;
        let target = match &job.kind {
            JobKind::Xenserver {
                pool,
                vms,
                vdis,
                consistent_vm_snapshot,
            } => Target::Xen {
                // Validation guarantees the pool exists.
                pool: config
                    .pool(pool)
                    .cloned()
                    .ok_or_else(|| unknown(name, "pool", pool))?,
                vms: vms.clone(),
                vdis: vdis.clone(),
                consistent: *consistent_vm_snapshot,
            },
            JobKind::Qemu { host, nodes } => Target::Qemu {
                host: config
                    .qemu_host(host)
                    .cloned()
                    .ok_or_else(|| unknown(name, "qemu host", host))?,
                nodes: nodes
                    .iter()
                    .map(|n| QemuNode {
                        node: n.clone(),
                        disk: None,
                    })
                    .collect(),
            },
            JobKind::Copy { .. } => {
                return Err(Error::WrongKind {
                    job: name.into(),
                    kind: "copy",
                });
            }
            JobKind::Vmware { vcenter, vms, fcds } => Target::Vmware {
                vcenter: config
                    .vcenter(vcenter)
                    .cloned()
                    .ok_or_else(|| unknown(name, "vcenter", vcenter))?,
                vms: vms.clone(),
                fcds: fcds.clone(),
            },
        };
        let backup = BackupOptions {
            compression_level: config.repository.compression_level,
            ..BackupOptions::default()
        };
        Ok(JobSpec {
            name: job.name.clone(),
            repo: config.repository.path.clone(),
            target,
            parallel: job.parallel.max(1),
            retries: job.retries,
            audit_samples: job.audit_samples,
            retry_delay: job.retry_delay(),
            bandwidth: job.bandwidth_bytes(),
            retention: job.retention,
            backup,
            exclusive: true,
        })
    }

    /// A one-off run (no retries, no retention, no job lock).
    pub fn one_off(name: impl Into<String>, repo: PathBuf, target: Target) -> JobSpec {
        JobSpec {
            name: name.into(),
            repo,
            target,
            parallel: 2,
            retries: 0,
            audit_samples: 16,
            retry_delay: Duration::from_secs(30),
            bandwidth: None,
            retention: None,
            backup: BackupOptions::default(),
            exclusive: false,
        }
    }
}

fn unknown(job: &str, what: &str, name: &str) -> crate::error::Error {
    crate::error::Error::Config(cbtvault_config::Error::Invalid {
        path: PathBuf::new(),
        what: format!("job {job:?}: no {what} named {name:?}"),
    })
}
