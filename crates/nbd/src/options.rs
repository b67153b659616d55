//! Connection options and the types the client hands out.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::proto;
use crate::tls::TlsOptions;

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// How to connect. Build with [`ConnectOptions::new`], [`ConnectOptions::tcp`],
/// [`ConnectOptions::unix`] or [`ConnectOptions::from_uri`], then adjust.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectOptions {
    pub address: Address,
    /// Export name; empty for the server's default export.
    pub export: String,
    /// `None` for plaintext.
    pub tls: Option<TlsOptions>,
    /// Meta contexts to select, e.g. `base:allocation`,
    /// `qemu:dirty-bitmap:NAME`.
    pub meta_contexts: Vec<String>,
    /// Connections to open; more than one only if the server sets
    /// CAN_MULTI_CONN or the export is [`immutable`](Self::immutable).
    /// Default 1.
    pub connections: usize,
    /// The caller knows the export never changes while it is read (a
    /// hypervisor's snapshot), so several connections see the same bytes
    /// even where the server does not promise multi-conn consistency
    /// (xapi-nbd never does). Default false.
    pub immutable: bool,
    /// Requests in flight per connection. Default 16.
    pub inflight: usize,
    /// Per-request timeout; a request without a reply by then fails the
    /// connection (and is retried). Default 60 s.
    pub request_timeout: Option<Duration>,
    /// Time allowed to connect and negotiate. Default 30 s.
    pub connect_timeout: Duration,
    /// Reconnects per request after transport failures. Default 3.
    pub retries: u32,
    /// First backoff between retries, doubled each time (at most 5 s).
    /// Default 100 ms.
    pub retry_backoff: Duration,
    /// Retries of a request the server answered with an error (e.g. EIO).
    /// Default 0: server errors are reported at once.
    pub server_error_retries: u32,
    /// Ask for extended headers (64-bit lengths). Default true.
    pub extended_headers: bool,
}

impl ConnectOptions {
    /// Defaults for the given address and export.
    pub fn new(address: Address, export: impl Into<String>) -> Self {
        ConnectOptions {
            address,
            export: export.into(),
            tls: None,
            meta_contexts: Vec::new(),
            connections: 1,
            immutable: false,
            inflight: 16,
            request_timeout: Some(Duration::from_secs(60)),
            connect_timeout: Duration::from_secs(30),
            retries: 3,
            retry_backoff: Duration::from_millis(100),
            server_error_retries: 0,
            extended_headers: true,
        }
    }

    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> Self {
        Self::new(
            Address::Tcp {
                host: host.into(),
                port,
            },
            export,
        )
    }

    pub fn unix(path: impl Into<PathBuf>, export: impl Into<String>) -> Self {
        Self::new(Address::Unix(path.into()), export)
    }

    pub fn with_tls(mut self, tls: TlsOptions) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn with_meta_context(mut self, name: impl Into<String>) -> Self {
        self.meta_contexts.push(name.into());
        self
    }

    pub fn with_connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }

    pub fn with_inflight(mut self, n: usize) -> Self {
        self.inflight = n;
        self
    }

    pub fn with_request_timeout(mut self, t: Option<Duration>) -> Self {
        self.request_timeout = t;
        self
    }

    pub fn with_retries(mut self, retries: u32, backoff: Duration) -> Self {
        self.retries = retries;
        self.retry_backoff = backoff;
        self
    }

    pub fn with_server_error_retries(mut self, n: u32) -> Self {
        self.server_error_retries = n;
        self
    }
}

/// One extent of a block-status answer. The meaning of `flags` depends on
/// the context: for `base:allocation` bit 0 is HOLE and bit 1 ZERO, for
/// `qemu:dirty-bitmap:NAME` bit 0 is DIRTY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub offset: u64,
    pub length: u64,
    pub flags: u64,
}

impl StatusExtent {
    /// `base:allocation`: unallocated.
    pub const HOLE: u64 = proto::STATE_HOLE as u64;
    /// `base:allocation`: reads as zeros.
    pub const ZERO: u64 = proto::STATE_ZERO as u64;
    /// `qemu:dirty-bitmap:NAME`: changed.
    pub const DIRTY: u64 = proto::STATE_DIRTY as u64;

    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// In a `base:allocation` answer: the extent reads as zeros.
    pub fn is_zero(&self) -> bool {
        self.flags & Self::ZERO != 0
    }

    /// In a `qemu:dirty-bitmap:NAME` answer: the extent changed.
    pub fn is_dirty(&self) -> bool {
        self.flags & Self::DIRTY != 0
    }
}

/// The meta context that tells where a disk holds data.
pub const BASE_ALLOCATION: &str = proto::BASE_ALLOCATION;

/// The prefix of QEMU's dirty-bitmap meta contexts.
const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// The meta context of QEMU dirty bitmap `bitmap`.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("{DIRTY_BITMAP_PREFIX}{bitmap}")
}

/// The bitmap a `qemu:dirty-bitmap:NAME` context names, if it is one.
pub fn dirty_bitmap_name(context: &str) -> Option<&str> {
    context.strip_prefix(DIRTY_BITMAP_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_bitmap_contexts_round_trip() {
        let c = dirty_bitmap_context("cbtv-job-1");
        assert_eq!(c, "qemu:dirty-bitmap:cbtv-job-1");
        assert_eq!(dirty_bitmap_name(&c), Some("cbtv-job-1"));
        assert_eq!(dirty_bitmap_name(BASE_ALLOCATION), None);
    }

    #[test]
    fn flags_read_by_name() {
        let e = |flags| StatusExtent {
            offset: 0,
            length: 1,
            flags,
        };
        assert!(e(StatusExtent::DIRTY).is_dirty());
        assert!(!e(0).is_dirty());
        assert!(e(StatusExtent::ZERO | StatusExtent::HOLE).is_zero());
        assert!(!e(StatusExtent::HOLE).is_zero());
    }
}
