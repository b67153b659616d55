//! The crate's error type.
//!
//! Errors are `Clone` (non-`Clone` causes are kept behind an [`Arc`]) because
//! one broken connection fails every request in flight on it, and each of
//! those requests gets its own copy of the reason.

use std::sync::Arc;
use std::time::Duration;

/// A boxed error, as returned by [`crate::server::Export`] implementations.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking NBD. Messages name the peer
/// (`peer` is the address, e.g. `127.0.0.1:10809` or a socket path) and the
/// request concerned; the underlying cause is in `source()`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The TCP or unix-socket connection could not be made.
    #[error("{peer}: cannot connect")]
    Connect {
        peer: String,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// A read or write on an established connection failed (reset, EOF,
    /// broken pipe) while `during` was in progress.
    #[error("{peer}: connection failed during {during}")]
    Io {
        peer: String,
        during: String,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The TLS handshake failed: wrong CA, name mismatch, or the peer does
    /// not speak TLS (the cause says which).
    #[error("{peer}: TLS handshake failed")]
    Tls {
        peer: String,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The server presented a certificate other than the pinned one.
    #[error("{}", .mismatch.describe(.peer))]
    PinMismatch {
        peer: String,
        mismatch: cbtvault_tls_pin::PinMismatch,
    },

    /// A certificate, key or CA file could not be loaded or used.
    #[error("TLS configuration: {what}")]
    TlsConfig {
        what: String,
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },

    /// The peer broke the handshake rules (bad magic, unexpected reply,
    /// malformed option data).
    #[error("{peer}: NBD handshake: {what}")]
    Handshake { peer: String, what: String },

    /// The server answered an option request with an error reply.
    #[error("{peer}: the server refused {option} with {reply}{}", message_suffix(.message))]
    OptionRefused {
        peer: String,
        option: &'static str,
        reply: &'static str,
        message: String,
    },

    /// The server requires TLS and none was configured.
    #[error(
        "{peer}: the server requires TLS; connect with nbds:// or configure a CA or pinned certificate"
    )]
    TlsRequired { peer: String },

    /// The server does not know the export.
    #[error("{peer}: the server has no export named {export:?}")]
    UnknownExport { peer: String, export: String },

    /// The server broke the transmission rules; the connection is dropped and
    /// nothing it sent for the request concerned is handed on.
    #[error("{peer}: protocol violation: {what}")]
    Protocol { peer: String, what: String },

    /// The server answered a request with an error.
    #[error("{peer}: {command} at offset {offset}, length {length}: server error {errno} ({}){}", errno_name(*.errno), message_suffix(.message))]
    Server {
        peer: String,
        command: &'static str,
        offset: u64,
        length: u64,
        errno: u32,
        message: String,
    },

    /// No reply came within the per-request timeout.
    #[error("{peer}: {command} at offset {offset}, length {length}: no reply within {after:?}")]
    Timeout {
        peer: String,
        command: &'static str,
        offset: u64,
        length: u64,
        after: Duration,
    },

    /// The connection went away (after an earlier failure, or after
    /// `disconnect`).
    #[error("{peer}: connection closed: {why}")]
    Closed { peer: String, why: String },

    /// The request itself is not valid for this export (out of range,
    /// read-only export, unknown meta context).
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// The export or server lacks a feature the request needs.
    #[error("{peer}: not supported by the server: {what}")]
    Unsupported { peer: String, what: String },

    /// An `nbd://` URI could not be parsed.
    #[error("NBD URI {uri:?}: {what}")]
    Uri { uri: String, what: String },

    /// The server side could not bind or accept.
    #[error("NBD server: {what}")]
    Serve {
        what: String,
        #[source]
        source: Arc<std::io::Error>,
    },
}

impl Error {
    /// Whether retrying on a fresh connection may help: transport failures
    /// and timeouts are; TLS failures, protocol violations and server error
    /// replies are not.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. } | Error::Io { .. } | Error::Timeout { .. } | Error::Closed { .. }
        )
    }

    /// The NBD errno if the server answered the request with an error.
    pub fn server_errno(&self) -> Option<u32> {
        match self {
            Error::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    pub(crate) fn io(peer: &str, during: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            peer: peer.to_owned(),
            during: during.into(),
            source: Arc::new(source),
        }
    }

    pub(crate) fn tls(peer: &str, source: std::io::Error) -> Self {
        if let Some(mismatch) = cbtvault_tls_pin::PinMismatch::find(&source) {
            return Error::PinMismatch {
                peer: peer.to_owned(),
                mismatch: mismatch.clone(),
            };
        }
        Error::Tls {
            peer: peer.to_owned(),
            source: Arc::new(source),
        }
    }

    pub(crate) fn protocol(peer: &str, what: impl Into<String>) -> Self {
        Error::Protocol {
            peer: peer.to_owned(),
            what: what.into(),
        }
    }

    pub(crate) fn handshake(peer: &str, what: impl Into<String>) -> Self {
        Error::Handshake {
            peer: peer.to_owned(),
            what: what.into(),
        }
    }
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// The symbolic name of an NBD error number.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        crate::proto::EPERM => "EPERM",
        crate::proto::EIO => "EIO",
        crate::proto::ENOMEM => "ENOMEM",
        crate::proto::EINVAL => "EINVAL",
        crate::proto::ENOSPC => "ENOSPC",
        crate::proto::EOVERFLOW => "EOVERFLOW",
        crate::proto::ENOTSUP => "ENOTSUP",
        crate::proto::ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}
