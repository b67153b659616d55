//! The simulator's error type. Simulated vSphere faults are not errors of
//! the simulator: they are [`crate::fault::SimFault`] answers.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("state {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("saved state {path} is unreadable")]
    StateFormat {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },

    #[error("certificate: {0}")]
    Certificate(String),

    /// A control call named something that does not exist or was refused.
    #[error("{0}")]
    Control(String),

    #[error("I/O")]
    Io(#[from] std::io::Error),
}
