//! How a failed command is reported: one line of text, or under `--json`
//! one JSON object, both on stderr, with a stable `kind` for scripts
//! (documented in docs/cli.md).

use std::fmt;

use serde_json::{Value, json};

/// The error kinds `--json` reports. Stable: kinds may be added, none
/// renamed.
pub mod kind {
    /// The arguments or options cannot work as given.
    pub const USAGE: &str = "usage";
    /// A restore point, disk, job, node or file that does not exist.
    pub const NOT_FOUND: &str = "not-found";
    /// A restore point prefix that matches several.
    pub const AMBIGUOUS: &str = "ambiguous";
    /// The configuration file cannot be used.
    pub const CONFIG: &str = "config";
    /// Another cbtvault process holds what this one needs.
    pub const LOCKED: &str = "locked";
    /// Stored data failed its checks (verify, restore, a corrupt file).
    pub const DAMAGED: &str = "damaged";
    /// A certificate was refused, or TLS could not be set up.
    pub const TLS: &str = "tls";
    /// The hypervisor refused the user name or password.
    pub const AUTHENTICATION: &str = "authentication";
    /// A server could not be reached, or the connection broke.
    pub const CONNECTION: &str = "connection";
    /// The hypervisor or NBD server refused or failed an operation.
    pub const REMOTE: &str = "remote";
    /// A local file or device could not be read or written.
    pub const IO: &str = "io";
    /// Stopped by ctrl-c or a signal.
    pub const INTERRUPTED: &str = "interrupted";
    /// Some disks of a multi-disk backup failed (the others committed).
    pub const PARTIAL: &str = "partial";
    /// Anything else.
    pub const OTHER: &str = "other";
}

/// An error raised by the CLI itself, with its kind.
#[derive(Debug)]
pub struct Tagged {
    kind: &'static str,
    message: String,
}

impl fmt::Display for Tagged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Tagged {}

/// An error of `kind` saying `message`.
pub fn tagged(kind: &'static str, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Tagged {
        kind,
        message: message.into(),
    })
}

/// The arguments cannot work as given.
pub fn usage_error(message: impl Into<String>) -> anyhow::Error {
    tagged(kind::USAGE, message)
}

/// `usage!("...", args)`: a usage error with a formatted message.
macro_rules! usage {
    ($($arg:tt)*) => {
        $crate::failure::usage_error(format!($($arg)*))
    };
}
pub(crate) use usage;

/// Some disks of a run failed; each has already been reported on its own.
#[derive(Debug)]
pub struct DisksFailed {
    pub total: usize,
    /// The disk's label and what went wrong.
    pub failed: Vec<(String, anyhow::Error)>,
}

impl fmt::Display for DisksFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {} disks failed", self.failed.len(), self.total)
    }
}

impl std::error::Error for DisksFailed {}

/// `e` with what the user can do about it, in the CLI's words, when a
/// library error says only what is wrong. `nbd_socket` says how this run
/// names QEMU's NBD socket (a flag, or a configuration key).
pub fn with_hint(e: anyhow::Error, nbd_socket: &str) -> anyhow::Error {
    let elsewhere = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<cbtvault_qemu::Error>(),
            Some(cbtvault_qemu::Error::NbdServerElsewhere { .. })
        )
    });
    if elsewhere {
        tagged(
            kind_of(&e),
            format!("{} (give it with {nbd_socket})", message(&e)),
        )
    } else {
        e
    }
}

/// The kind of `e`: that of the outermost cause whose type says.
pub fn kind_of(e: &anyhow::Error) -> &'static str {
    for cause in e.chain() {
        if let Some(k) = classify(cause) {
            return k;
        }
    }
    kind::OTHER
}

fn classify(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use kind::*;
    if let Some(t) = e.downcast_ref::<Tagged>() {
        return Some(t.kind);
    }
    if e.is::<DisksFailed>() {
        return Some(PARTIAL);
    }
    if let Some(e) = e.downcast_ref::<cbtvault_repo::Error>() {
        return Some(repo_kind(e));
    }
    if let Some(e) = e.downcast_ref::<cbtvault_runner::Error>() {
        use cbtvault_runner::Error as E;
        return match e {
            // Transparent wrappers: the wrapped error is not in the chain.
            E::Engine(inner) => classify(inner),
            E::Repo(inner) => Some(repo_kind(inner)),
            E::Config(inner) => classify(inner),
            E::JobRunning { .. } => Some(LOCKED),
            E::PlainHttp { .. } => Some(USAGE),
            // The source (XenAPI, QMP, QEMU) says more.
            _ => None,
        };
    }
    if let Some(e) = e.downcast_ref::<cbtvault_engine::Error>() {
        use cbtvault_engine::Error as E;
        return match e {
            E::Repo(r) => Some(repo_kind(r)),
            E::Cancelled => Some(INTERRUPTED),
            E::DamagedBlock { .. } => Some(DAMAGED),
            E::NoParent { .. } | E::MapMismatch { .. } => Some(USAGE),
            // The source or target's own error says more.
            _ => None,
        };
    }
    if let Some(e) = e.downcast_ref::<cbtvault_files::Error>() {
        use cbtvault_files::Error as E;
        return Some(match e {
            E::Repo(r) => repo_kind(r),
            E::NotFound { .. } | E::NoPartition { .. } => NOT_FOUND,
            E::NotADirectory { .. } | E::Unsupported { .. } | E::Exists { .. } => USAGE,
            E::Output { .. } => IO,
            _ => DAMAGED,
        });
    }
    if e.is::<cbtvault_config::Error>() {
        return Some(match e.downcast_ref::<cbtvault_config::Error>() {
            Some(cbtvault_config::Error::UnknownJob { .. }) => NOT_FOUND,
            _ => CONFIG,
        });
    }
    if let Some(e) = e.downcast_ref::<cbtvault_xenapi::Error>() {
        use cbtvault_xenapi::{Error as E, XapiError as X};
        return Some(match e {
            E::Xapi(X::SessionAuthenticationFailed { .. }) => AUTHENTICATION,
            E::Xapi(X::HandleInvalid { .. } | X::VdiMissing { .. }) => NOT_FOUND,
            E::PinMismatch { .. } => TLS,
            E::Connect { .. } | E::Http { .. } | E::Timeout { .. } => CONNECTION,
            E::Password { .. } | E::Config(_) => CONFIG,
            _ => REMOTE,
        });
    }
    if let Some(e) = e.downcast_ref::<cbtvault_nbd::Error>() {
        use cbtvault_nbd::Error as E;
        return Some(match e {
            E::Tls { .. } | E::TlsConfig { .. } | E::TlsRequired { .. } => TLS,
            E::PinMismatch { .. } => TLS,
            E::Connect { .. } | E::Io { .. } | E::Timeout { .. } | E::Closed { .. } => CONNECTION,
            E::UnknownExport { .. } => NOT_FOUND,
            E::Uri { .. } | E::InvalidRequest(_) => USAGE,
            _ => REMOTE,
        });
    }
    if let Some(e) = e.downcast_ref::<cbtvault_qemu::Error>() {
        use cbtvault_qemu::Error as E;
        return Some(match e {
            E::NoSuchNode { .. } => NOT_FOUND,
            E::NbdServerElsewhere { .. } | E::InvalidName { .. } => USAGE,
            E::Io { .. } => IO,
            _ => REMOTE,
        });
    }
    if let Some(e) = e.downcast_ref::<std::io::Error>() {
        return Some(match e.kind() {
            std::io::ErrorKind::NotFound => NOT_FOUND,
            _ => IO,
        });
    }
    None
}

fn repo_kind(e: &cbtvault_repo::Error) -> &'static str {
    use cbtvault_repo::Error as E;
    use kind::*;
    match e {
        E::NotARepository { .. } | E::UnknownRestorePoint(_) | E::UnknownDisk(_) => NOT_FOUND,
        E::AmbiguousRestorePoint { .. } => AMBIGUOUS,
        E::AlreadyExists { .. } | E::NotEmpty { .. } | E::InvalidArgument(_) => USAGE,
        E::Locked { .. } => LOCKED,
        E::WrongKey { .. } | E::KeyRequired { .. } => AUTHENTICATION,
        E::LastKeySlot | E::NotEncrypted { .. } => USAGE,
        E::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => NOT_FOUND,
        E::Io { .. } => IO,
        _ => DAMAGED,
    }
}

/// The one-line text form: the error and each cause that adds something.
pub fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        // A message that already quotes its cause would repeat it.
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The `--json` form: `{"error": {"kind", "message", ...}}`; a multi-disk
/// failure adds `disks: [{disk, kind, message}]`.
pub fn json(e: &anyhow::Error) -> Value {
    let mut error = json!({ "kind": kind_of(e), "message": message(e) });
    if let Some(d) = e.downcast_ref::<DisksFailed>() {
        error["disks"] = d
            .failed
            .iter()
            .map(|(disk, e)| json!({ "disk": disk, "kind": kind_of(e), "message": message(e) }))
            .collect();
    }
    json!({ "error": error })
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::*;

    #[test]
    fn a_cause_quoted_by_its_context_is_printed_once() {
        let inner = std::io::Error::other("disk full");
        let e = anyhow::Error::new(inner)
            .context("writing x: disk full")
            .context("backup failed");
        assert_eq!(message(&e), "backup failed: writing x: disk full");
    }

    #[test]
    fn kinds_come_from_the_outermost_typed_cause() {
        let e = Err::<(), _>(cbtvault_repo::Error::UnknownRestorePoint("abcd".into()))
            .context("show")
            .unwrap_err();
        assert_eq!(kind_of(&e), kind::NOT_FOUND);
        assert_eq!(json(&e)["error"]["kind"], "not-found");
        assert_eq!(kind_of(&usage_error("give --disk")), kind::USAGE);
        assert_eq!(kind_of(&anyhow::anyhow!("plain")), kind::OTHER);
        let e = anyhow::Error::new(DisksFailed {
            total: 2,
            failed: vec![("VDI x".into(), usage_error("bad"))],
        });
        let v = json(&e);
        assert_eq!(v["error"]["kind"], "partial");
        assert_eq!(v["error"]["message"], "1 of 2 disks failed");
        assert_eq!(v["error"]["disks"][0]["kind"], "usage");
    }
}
