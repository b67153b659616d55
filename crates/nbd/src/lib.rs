//! NBD (Network Block Device) for cbtvault: a client that reads virtual
//! disks and their change maps from QEMU, nbdkit and XenServer, and a
//! server that exports disks (restore points, simulators) to any NBD client.
//!
//! # Client
//! [`Client::connect`] negotiates fixed newstyle: STARTTLS first when TLS is
//! configured (a server forgets all earlier negotiation at STARTTLS), then
//! extended headers or else structured replies, then `SET_META_CONTEXT`
//! (`base:allocation`, `qemu:dirty-bitmap:NAME`, …), then `NBD_OPT_GO`
//! asking for block sizes, which are obeyed (32 MiB maximum payload when the
//! server gives none). A server that refuses GO with `NBD_REP_ERR_UNSUP` –
//! XenServer's xapi-nbd – is spoken to with `NBD_OPT_EXPORT_NAME`: simple
//! replies, 512-byte aligned reads, and the connection written off after any
//! error reply because xapi-nbd closes it. [`BASE_ALLOCATION`] and
//! [`dirty_bitmap_context`] name the meta contexts, and
//! [`StatusExtent::is_zero`] and [`StatusExtent::is_dirty`] read their
//! flags, so no caller spells either.
//!
//! Each connection has a writer task and a reader task; requests from any
//! number of tasks are pipelined, matched by cookie, within a window of
//! requests in flight per connection. Several connections are opened only
//! if the server sets `CAN_MULTI_CONN`. Every reply is checked against the
//! request it names (magic, cookie, chunk ranges, overlap, completeness), so
//! a lying server yields a typed [`Error::Protocol`], never a panic and
//! never wrong data. A length the peer announces is only a claim: chunk
//! payloads, option replies and the server's WRITE data go into buffers
//! that grow as the bytes arrive, and a chunk that cannot belong to its
//! request is refused on its header. Transport failures and timeouts fail the connection;
//! the request is re-issued on a fresh connection (a new handshake) with
//! bounded retries and exponential backoff.
//!
//! # Server
//! [`server::Server`] serves [`server::Export`]s over TCP or unix sockets,
//! optionally with TLS: LIST, INFO/GO with block sizes, structured replies,
//! `base:allocation`, CAN_MULTI_CONN, and graceful shutdown through a
//! `CancellationToken`. Limits, all in [`server::ServerConfig`], hold
//! whatever clients do: memory per connection (requests and bytes between
//! reading a request and writing its reply: a client that does not read
//! replies stops being read, and what it queued is dropped when it goes)
//! and in total (a byte budget across connections); a handshake timeout
//! and an idle timeout; connections per peer and in total, where a
//! newcomer over a limit replaces the connection that waited longest on
//! its own client (in the handshake, idle, or not reading replies). Its
//! [`server::Mode::Minimal`] imitates xapi-nbd (EXPORT_NAME only, TLS
//! required, no NO_ZEROES, 512-byte alignment, close after an error, a
//! connection limit, an authenticating export-name hook) so the fallback
//! path can be tested without a XenServer.
//!
//! # Modules
//! [`proto`] holds the wire constants and pure encoders/decoders (fuzzed
//! with proptest, as are whole client and server sessions against hostile
//! peers in `tests/integration/fuzz*.rs`); `claimed` reads announced
//! payloads; `handshake` the client negotiation; `conn` one pipelined
//! connection; `options` what [`ConnectOptions`] holds; `client` the
//! connection pool, request splitting and retry; [`server`]
//! the server; [`tls`] rustls configuration including certificate pinning;
//! `uri` parsing of `nbd://` URIs.
//!
//! # Crates used
//! `tokio` (async sockets, tasks, timers, semaphores for the request
//! window), `tokio-util` (`CancellationToken` and `TaskTracker` for server
//! shutdown), `bytes` (reference-counted buffers: a read is assembled in
//! place and handed on without copying), `futures` (bounded concurrent
//! streams of split requests), `rustls` with the `ring` provider and
//! `tokio-rustls` (TLS in pure Rust, no system OpenSSL to match, and a
//! custom verifier for pinned certificates), `rustls-pki-types` (PEM
//! parsing), `url` (URI syntax), `thiserror` (the error enum), `tracing`
//! (diagnostics).

mod claimed;
mod client;
mod conn;
pub mod error;
mod handshake;
mod options;
pub mod proto;
pub mod server;
pub mod tls;
mod uri;

pub use client::{Address, Client, ConnectOptions, StatusExtent};
pub use error::{BoxError, Error, Result};
pub use options::{BASE_ALLOCATION, dirty_bitmap_context, dirty_bitmap_name};
pub use tls::{Pem, TlsOptions, TlsTrust};
pub use uri::DEFAULT_PORT;
