//! The engine's error type.

/// An error from a source or target, as its implementation reports it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What can stop a backup, restore or check. Messages name the disk,
/// restore point and offsets concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Repo(#[from] cbtvault_repo::Error),

    #[error("disk {disk:?}: reading {len} bytes at offset {offset} from the source failed")]
    SourceRead {
        disk: String,
        offset: u64,
        len: usize,
        #[source]
        source: BoxError,
    },

    #[error(
        "disk {disk:?}: the source returned {got} bytes at offset {offset} where {expected} were asked"
    )]
    ShortRead {
        disk: String,
        offset: u64,
        expected: usize,
        got: usize,
    },

    #[error("disk {disk:?}: {what}")]
    Source {
        disk: String,
        what: String,
        #[source]
        source: Option<BoxError>,
    },

    #[error(
        "disk {disk:?}: the changed-block map covers {map_blocks} blocks but the disk ({size} bytes) has {disk_blocks}"
    )]
    MapMismatch {
        disk: String,
        map_blocks: u64,
        disk_blocks: u64,
        size: u64,
    },

    #[error(
        "disk {disk:?} has no restore point to take unchanged blocks from; run a full backup first"
    )]
    NoParent { disk: String },

    #[error(
        "disk {disk:?}, restore point {restore_point}: block at offset {offset} cannot be read back"
    )]
    DamagedBlock {
        disk: String,
        restore_point: String,
        offset: u64,
        #[source]
        source: Box<cbtvault_repo::Error>,
    },

    /// The CBT audit found blocks the hypervisor reported unchanged that
    /// differ from the restore point built on that report: changed-block
    /// tracking missed writes, so incrementals of this disk cannot be
    /// trusted until a full (which the next run takes) re-reads it.
    #[error(
        "disk {disk:?}: changed-block tracking missed writes: {} block(s) the hypervisor reported unchanged differ from the snapshot (offsets {}); restore point {restore_point} {}; the next backup of this disk reads it whole",
        .offsets.len(),
        crate::audit::offsets_text(.offsets),
        if *.forgotten { "was forgotten" } else { "cannot be trusted: forget it" }
    )]
    CbtAudit {
        disk: String,
        restore_point: String,
        /// Byte offsets of the blocks that differ (the first few).
        offsets: Vec<u64>,
        /// Whether the untrustworthy restore point was removed.
        forgotten: bool,
    },

    #[error("writing to the target at offset {offset}")]
    TargetWrite {
        offset: u64,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    Target(String),

    #[error("cancelled")]
    Cancelled,

    #[error("internal error: {0}")]
    Internal(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the same backup may succeed if tried again later: a dropped
    /// connection, an NBD or XAPI timeout, a busy host. Not a cancellation,
    /// a lock held by another run, a bad setting, a damaged repository or
    /// refused credentials: those fail the same way again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::SourceRead { source, .. }
            | Error::Source {
                source: Some(source),
                ..
            } => is_retryable_cause(source.as_ref()),
            Error::Repo(_)
            | Error::Source { source: None, .. }
            | Error::ShortRead { .. }
            | Error::MapMismatch { .. }
            | Error::NoParent { .. }
            | Error::DamagedBlock { .. }
            | Error::CbtAudit { .. }
            | Error::TargetWrite { .. }
            | Error::Target(_)
            | Error::Cancelled
            | Error::Internal(_) => false,
        }
    }
}

/// Whether a failure with cause `e` may pass if tried again (from a new
/// snapshot): the first cause in the chain that a protocol crate can judge
/// decides. Callers whose own errors wrap protocol errors (the runner's
/// login, QMP connection) judge them here too.
pub fn is_retryable_cause(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(e) = e.downcast_ref::<cbtvault_nbd::Error>() {
            // A server's read error (EIO) may be a passing storage hiccup:
            // a new snapshot is worth the bounded retries.
            return e.is_transport() || e.server_errno().is_some();
        }
        if let Some(e) = e.downcast_ref::<cbtvault_xenapi::Error>() {
            return e.is_retryable();
        }
        if let Some(e) = e.downcast_ref::<cbtvault_xen::Error>() {
            return e.is_retryable();
        }
        if let Some(e) = e.downcast_ref::<cbtvault_vsphere::Error>() {
            return e.is_retryable();
        }
        if let Some(e) = e.downcast_ref::<cbtvault_qmp::Error>() {
            return matches!(
                e,
                cbtvault_qmp::Error::Connect { .. }
                    | cbtvault_qmp::Error::Closed { .. }
                    | cbtvault_qmp::Error::Timeout { .. }
            );
        }
        if let Some(e) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return matches!(
                e.kind(),
                K::ConnectionReset
                    | K::ConnectionAborted
                    | K::BrokenPipe
                    | K::TimedOut
                    | K::UnexpectedEof
            );
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(cause: BoxError) -> Error {
        Error::Source {
            disk: "d0".into(),
            what: "reading".into(),
            source: Some(cause),
        }
    }

    #[test]
    fn transport_drops_and_busy_hosts_are_retryable() {
        let dropped = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(source(Box::new(dropped)).is_retryable());
        let busy = cbtvault_xenapi::Error::Xapi(cbtvault_xenapi::XapiError::VdiInUse {
            vdi: "OpaqueRef:1".into(),
            operation: "data_destroy".into(),
        });
        assert!(source(Box::new(busy)).is_retryable());
        let timeout = cbtvault_xenapi::Error::Timeout {
            what: "VDI.snapshot".into(),
            after: std::time::Duration::from_secs(1),
        };
        assert!(source(Box::new(timeout)).is_retryable());
        // Wrapped by the XenServer crate, still judged by its cause.
        let wrapped = cbtvault_xen::Error::Xapi {
            subject: "d0".into(),
            what: "VDI.snapshot".into(),
            source: Box::new(cbtvault_xenapi::Error::Connect {
                endpoint: "pool:443".into(),
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            }),
        };
        assert!(source(Box::new(wrapped)).is_retryable());
        // A read the NBD server failed (EIO): a new snapshot may read.
        let eio = cbtvault_nbd::Error::Server {
            peer: "host:10809".into(),
            command: "NBD_CMD_READ",
            offset: 0,
            length: 65536,
            errno: 5,
            message: String::new(),
        };
        assert!(source(Box::new(eio)).is_retryable());
    }

    #[test]
    fn what_fails_again_is_not_retryable() {
        assert!(!Error::Cancelled.is_retryable());
        let locked = cbtvault_repo::Error::Locked {
            what: "disk d0".into(),
            holder: "pid 1".into(),
        };
        assert!(!Error::Repo(locked).is_retryable());
        let refused =
            cbtvault_xenapi::Error::Xapi(cbtvault_xenapi::XapiError::SessionAuthenticationFailed {
                user: "root".into(),
                message: "bad password".into(),
            });
        assert!(!source(Box::new(refused)).is_retryable());
        let config = cbtvault_xenapi::Error::Config("no such file".into());
        assert!(!source(Box::new(config)).is_retryable());
        assert!(!Error::NoParent { disk: "d0".into() }.is_retryable());
        let damaged = std::io::Error::from(std::io::ErrorKind::InvalidData);
        assert!(!source(Box::new(damaged)).is_retryable());
    }
}
