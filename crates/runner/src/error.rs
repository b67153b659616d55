//! The runner's error type.

use std::path::PathBuf;

/// What can stop a job, or one disk of it. Messages name the job, pool,
/// host or disk; causes are kept as sources.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Config(#[from] cbtvault_config::Error),

    /// A plain-HTTP address that was not allowed: the password and the
    /// session would cross the network in clear. (The front end says how
    /// to allow it: a configuration key or a flag.)
    #[error(
        "pool {pool:?}: refusing {url}: plain HTTP would send the XenServer password and session in clear to anyone on the network; use https:// with a pinned certificate or a CA"
    )]
    PlainHttp { pool: String, url: String },

    #[error("pool {pool:?}: reading the password")]
    Password {
        pool: String,
        #[source]
        source: BoxError,
    },

    #[error("pool {pool:?}: the address")]
    PoolUrl {
        pool: String,
        #[source]
        source: BoxError,
    },

    #[error("pool {pool:?}: the TLS trust setting")]
    Trust {
        pool: String,
        #[source]
        source: BoxError,
    },

    #[error("logging in to {url}")]
    Login {
        url: String,
        #[source]
        source: BoxError,
    },

    #[error("pool {pool:?}: {what}")]
    Xapi {
        pool: String,
        what: String,
        #[source]
        source: BoxError,
    },

    #[error("connecting to QMP at {}", socket.display())]
    Qmp {
        socket: PathBuf,
        #[source]
        source: BoxError,
    },

    #[error("vcenter {vcenter:?}: {what}")]
    Vcenter {
        vcenter: String,
        what: String,
        #[source]
        source: BoxError,
    },

    #[error("QEMU node {node:?}")]
    Qemu {
        node: String,
        #[source]
        source: BoxError,
    },

    #[error(
        "job {job:?} is already running in another cbtvault process; this run stops without touching anything (run it again when that one has finished)"
    )]
    JobRunning { job: String },

    #[error("copy job {job:?}: opening the target repository {}", to.display())]
    CopyTarget {
        job: String,
        to: PathBuf,
        #[source]
        source: BoxError,
    },

    #[error(
        "copy job {job:?}: the repository has no disk {disk:?} (`cbtvault list` shows its disks; fix the job's disks)"
    )]
    CopyUnknownDisk { job: String, disk: String },

    /// A backup was asked of a copy job, or a copy of a backup job.
    #[error("job {job:?} is a {kind} job")]
    WrongKind { job: String, kind: &'static str },

    /// `cleanup` is for QEMU jobs: a XenServer job's next run reaps what
    /// an interrupted one left.
    #[error("job {job:?} is not a QEMU job: XenServer leftovers are reaped by the job's next run")]
    NotQemu { job: String },

    /// A whole-VM restore that cannot be done as asked; nothing was
    /// created in the pool.
    #[error("restoring VM {vm:?}: {what}")]
    VmRestore {
        vm: String,
        what: String,
        refusal: VmRestoreRefusal,
    },

    /// A whole-VM restore failed after creating objects, and removing
    /// some of them failed too: they are named.
    #[error(
        "restoring VM {vm:?} failed, and these objects it created could not be removed: {left}"
    )]
    VmRestoreLeftovers {
        vm: String,
        left: String,
        #[source]
        source: Box<Error>,
    },

    /// Writing a restored VM's image or layout file failed (what it wrote
    /// is removed again).
    #[error("restoring VM {vm:?}: writing {}: {what}", path.display())]
    VmImage {
        vm: String,
        path: std::path::PathBuf,
        what: String,
    },

    #[error(transparent)]
    Engine(#[from] cbtvault_engine::Error),

    #[error(transparent)]
    Repo(#[from] cbtvault_repo::Error),

    /// A VDI that cannot be rolled back as asked.
    #[error("VDI {vdi}: {what}")]
    VdiRollback { vdi: String, what: String },

    #[error("internal error: {0}")]
    Internal(String),
}

/// Why a whole-VM restore was refused before anything was created (a
/// front end words the remedy in its own terms).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmRestoreRefusal {
    /// The restore point has no saved VM metadata.
    NoMetadata,
    /// A VIF's network is not in the pool and no mapping names it.
    NetworkUnmapped { network: String },
    /// A mapping leads to a network the pool does not have.
    NetworkNotInPool { network: String },
    /// A mapping names a network none of the VM's VIFs is on.
    MappingUnused { network: String },
    /// The SR has too little free space for the disks.
    SrFull,
    /// The SR does not exist in the pool.
    UnknownSr,
    /// The saved metadata cannot rebuild this VM.
    BadMetadata,
    /// The VM was backed up from another kind of hypervisor than the
    /// restore targets (a QEMU VM into a pool, or the other way round).
    WrongHypervisor,
    /// The target directory holds files already.
    TargetNotEmpty,
    /// The target directory cannot be used (not a directory, no parent,
    /// a tool missing).
    TargetUnusable,
}

/// A cause kept whole (XenAPI, QMP and QEMU errors are large; boxed, an
/// `Error` stays small, and its cause still downcasts to its type).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether trying again later may succeed: a dropped connection, a
    /// timeout, a busy or restarting server. Never a refused password, a
    /// lock held by another run, a cancelled run or a damaged repository.
    /// The engine judges the causes ([`cbtvault_engine::is_retryable_cause`]).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Engine(e) => e.is_retryable(),
            Error::Login { source, .. }
            | Error::Xapi { source, .. }
            | Error::Qmp { source, .. }
            | Error::Vcenter { source, .. }
            | Error::Qemu { source, .. } => cbtvault_engine::is_retryable_cause(source.as_ref()),
            _ => false,
        }
    }
}
