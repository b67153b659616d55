//! The QMP client's error type.

use std::fmt;
use std::time::Duration;

/// Everything that can go wrong talking QMP. Messages name the peer and
/// the command or event concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket could not be opened.
    #[error("cannot connect to the QMP monitor at {address}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },

    /// The peer answered, but not with a QMP greeting (or not with QMP at
    /// all): the path or port points at something else.
    #[error("{address} is not a QMP monitor: {detail}")]
    NotQmp { address: String, detail: String },

    /// QEMU executed the command and reported an error.
    #[error("QMP command {command} failed: {desc} ({class})")]
    Command {
        command: String,
        class: ErrorClass,
        desc: String,
    },

    /// The connection is gone (QEMU quit or was killed, or the socket
    /// failed); no further command can be sent on it.
    #[error("QMP connection to {address} closed: {reason}")]
    Closed { address: String, reason: String },

    /// Nothing arrived in time. For a command, QEMU may still execute it
    /// later; the reply, if any, is then discarded.
    #[error("timed out after {after:?} waiting for {what} from {address}")]
    Timeout {
        address: String,
        what: String,
        after: Duration,
    },

    /// A reply arrived but does not have the shape this client expects.
    #[error("unexpected reply to {command} from {address}")]
    Decode {
        address: String,
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The QMP error class, if this is an error QEMU reported for a command.
    pub fn class(&self) -> Option<&ErrorClass> {
        match self {
            Error::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// QEMU's description, if this is an error QEMU reported for a command.
    pub fn desc(&self) -> Option<&str> {
        match self {
            Error::Command { desc, .. } => Some(desc),
            _ => None,
        }
    }

    /// Whether QEMU reported that the object named in the command does not
    /// exist (QEMU mostly uses `GenericError` with a "not found"-style
    /// description for this, so the text is checked too).
    pub fn is_not_found(&self) -> bool {
        match self {
            Error::Command { class, desc, .. } => {
                *class == ErrorClass::DeviceNotFound || {
                    let d = desc.to_ascii_lowercase();
                    d.contains("not found") || d.contains("cannot find") || d.contains("no such")
                }
            }
            _ => false,
        }
    }
}

/// The `class` of a QMP error reply (qapi/error.json). QEMU reports nearly
/// everything as `GenericError`; the others are kept for compatibility.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KvmMissingCap,
    /// A class this client does not know.
    Other(String),
}

impl ErrorClass {
    /// Maps QEMU's class name.
    pub fn from_name(name: &str) -> Self {
        match name {
            "GenericError" => Self::GenericError,
            "CommandNotFound" => Self::CommandNotFound,
            "DeviceNotActive" => Self::DeviceNotActive,
            "DeviceNotFound" => Self::DeviceNotFound,
            "KVMMissingCap" => Self::KvmMissingCap,
            other => Self::Other(other.to_owned()),
        }
    }

    /// QEMU's name for the class.
    pub fn name(&self) -> &str {
        match self {
            Self::GenericError => "GenericError",
            Self::CommandNotFound => "CommandNotFound",
            Self::DeviceNotActive => "DeviceNotActive",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::KvmMissingCap => "KVMMissingCap",
            Self::Other(name) => name,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
