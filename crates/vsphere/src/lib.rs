//! A vSphere client for cbtvault's VMware path, over the vSphere JSON API
//! (VI/JSON, vCenter 8.0 U1 and later): sessions, the managed objects a
//! backup touches, changed-block tracking for VM disks and First Class
//! Disks, and the paging of changed areas into a 64 KiB block map.
//! Protocol only: it knows nothing of the repository or the engine.
//!
//! # Wire format
//! Every call is `POST /sdk/vim25/{release}/{moType}/{moId}/{Method}` with
//! the method's parameters as a JSON object, or `GET …/{moType}/{moId}/{property}`.
//! Data objects carry `_typeName`; a managed object reference is
//! `{"_typeName":"ManagedObjectReference","type":…,"value":…}`. Answers
//! are `200` + JSON, `204` for nothing, `500` + a fault object
//! (`{"_typeName":"FileFault",…}`), decoded into [`Fault`] inside
//! [`Error::Fault`]. Anything else is [`Error::HttpStatus`].
//!
//! # Sessions
//! [`Client::connect`] reads `ServiceInstance/ServiceInstance/content`
//! (no session needed) for the session manager's and the storage object
//! manager's moIds, then logs in; the token comes back in the
//! `vmware-api-session-id` header and goes out in it on every call. A call
//! answered `NotAuthenticated` (expired or dropped session) logs in again —
//! once for all concurrent callers — and is sent once more. That is safe
//! even for `*_Task` methods: the server refused them before starting
//! anything. A call lost in transport is not retried here, since whether a
//! task started is unknown; callers list snapshots before making another.
//!
//! # Tasks
//! `*_Task` methods return a Task reference; [`Client::run_task`] polls
//! `Task/{id}/info` (50 ms doubling to 1 s, bounded by
//! [`ClientOptions::task_timeout`]) until `success` (its `result`) or
//! `error` (its fault, as [`Error::Task`]).
//!
//! # Changed blocks
//! [`changed_blocks`] calls a query page by page from offset 0, each next
//! call from `startOffset + length`, until the disk is covered; extents
//! (byte ranges at any alignment, clipped to their page) are widened to
//! the 64 KiB blocks they touch ([`mark`]).
//!
//! # Secrets and TLS
//! [`Password`] comes from a file or an environment variable and is
//! redacted in `Debug`; call bodies are never logged. HTTPS trusts a
//! pinned certificate or a CA ([`TlsTrust`], shared with the other
//! clients); trusting anyone must be asked for and logs a warning.
//!
//! # Crates used
//! `hyper` with `hyper-util` and `http-body-util` (an HTTP/1.1 client at
//! the connection level: a few kept-alive connections to one vCenter),
//! `tokio` (sockets, timers, the re-login mutex), `rustls`, `tokio-rustls`
//! and `rustls-pki-types` (TLS in pure Rust, certificate pinning through
//! `cbtvault-tls-pin`), `serde` and `serde_json` (the JSON API), `url`,
//! `bytes`, `http`, `thiserror` (the error enum), `tracing` (logs),
//! `cbtvault-blockmap` (the block map the changed areas become).

mod api;
mod changes;
mod client;
mod error;
mod http;
mod types;

pub use cbtvault_tls_pin::TlsTrust;
pub use cbtvault_tls_pin::{Password, PasswordError};
pub use changes::{ChangedAreas, changed_blocks, mark};
pub use client::{Client, ClientOptions, DEFAULT_RELEASE};
pub use error::{Error, Fault, Result};
pub use types::{
    DiskChangeExtent, DiskChangeInfo, Fcd, FcdSnapshot, MoRef, SnapshotInfo, VirtualDisk, VmConfig,
};

/// The session header of the JSON API (the simulator serves it).
pub const SESSION_HEADER: &str = http::SESSION_HEADER;
