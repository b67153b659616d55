//! The daemon's errors.

use std::path::PathBuf;

/// What stops the daemon from starting, or a request from being answered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Config(#[from] cbtvault_config::Error),
    #[error("job {job:?}: {what}")]
    Schedule { job: String, what: String },
    #[error("repository {}", path.display())]
    OpenRepository {
        path: PathBuf,
        #[source]
        source: Box<cbtvault_s3::Error>,
    },
    #[error("repository {}", path.display())]
    Repository {
        path: PathBuf,
        #[source]
        source: cbtvault_repo::Error,
    },
    #[error("cannot listen on {addr} (set [daemon] listen in the configuration to a free address)")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: {what}")]
    Http { url: String, what: String },
    #[error("no daemon answers at {addr} (is `cbtvault daemon` running with this configuration?)")]
    NoDaemon {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Runner(#[from] cbtvault_runner::Error),
    #[error("installing the signal handlers")]
    Signals(#[source] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
