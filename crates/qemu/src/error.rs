//! The QEMU provider's error type.

use std::path::PathBuf;

/// Everything that can go wrong preparing, committing or aborting a QEMU
/// backup. Messages say what was being done; QEMU's own words are in the
/// source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A QMP command failed, or the connection did.
    #[error("{step}")]
    Qmp {
        step: String,
        #[source]
        source: cbtvault_qmp::Error,
    },

    #[error("QEMU at {qmp} has no block node {node:?} (nodes: {available})")]
    NoSuchNode {
        qmp: String,
        node: String,
        available: String,
    },

    #[error(
        "QEMU {version} at {qmp} lacks {missing}; pull-mode backup with snapshot-access needs QEMU 7.0 or newer"
    )]
    Unsupported {
        qmp: String,
        version: String,
        missing: String,
    },

    #[error("invalid {kind} name {name:?}: {why}")]
    InvalidName {
        kind: &'static str,
        name: String,
        why: String,
    },

    #[error(
        "backup job {job}: QEMU still has {items:?} from an earlier run; another backup of this job may be running, or an earlier one was killed: then call cleanup_leftovers"
    )]
    Leftovers { job: String, items: Vec<String> },

    #[error(
        "checkpoint {name} on node {node} is in use by an export or job not made by this backup"
    )]
    CheckpointBusy { name: String, node: String },

    /// QEMU's one NBD server runs, but not at the socket this backup was
    /// told to use; the caller should say how its user names that socket.
    #[error(
        "QEMU already runs an NBD server, but not on {path}; back up through the unix socket that server listens on"
    )]
    NbdServerElsewhere { path: PathBuf },

    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds what was being done to a QMP error.
pub(crate) trait Context<T> {
    fn context(self, step: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for Result<T, cbtvault_qmp::Error> {
    fn context(self, step: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Qmp {
            step: step(),
            source,
        })
    }
}
