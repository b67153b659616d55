//! The simulator's error type (XAPI failures of simulated calls are
//! [`cbtvault_xenapi::XapiError`]s, carried by [`Error::Xapi`] when they
//! reach the Rust control API).

use std::path::PathBuf;

/// Result of the simulator's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong running the simulator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The state directory or a file in it could not be used.
    #[error("state {path}: {source}")]
    State {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The saved state could not be parsed.
    #[error("saved state {path} is unreadable: {source}")]
    StateFormat {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },

    /// A listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The host certificate could not be made or loaded.
    #[error("host certificate: {0}")]
    Certificate(String),

    /// A simulated XAPI call failed.
    #[error("XenAPI error {0}")]
    Xapi(#[from] cbtvault_xenapi::XapiError),

    /// Other I/O.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}
