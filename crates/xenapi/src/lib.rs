//! A XenAPI (XAPI) client for the XenServer / XCP-ng path of cbtvault:
//! sessions, the VM/VBD/VDI/SR records a backup reads, snapshots,
//! making guests for a whole-VM restore ([`guest`]: `VM.create` from a
//! saved record, VBDs, VIFs, networks),
//! changed-block tracking (`enable_cbt`, `list_changed_blocks`,
//! `data_destroy`), NBD access details, and raw VDI upload for restores.
//!
//! # Wire formats
//! JSON-RPC 2.0 at `POST /jsonrpc` by default; XML-RPC at `POST /` when
//! the host has no JSON-RPC endpoint or when asked for
//! ([`TransportChoice`]). XAPI's 64-bit `int` is a JSON number on the
//! first and a string of decimal digits on the second; [`Value`] hides
//! the difference. XAPI failures are not protocol faults but a reply
//! carrying `[CODE, param…]`; they become a typed [`XapiError`] with
//! [`XapiError::is_retryable`]. Both codecs ([`rpc`]) are public because
//! the simulator crate serves them.
//!
//! # Sessions
//! [`Client::connect`] logs in once with
//! `session.login_with_password(user, password, "1.1", originator)`; the
//! originator keeps the session out of the pool-wide anonymous eviction.
//! The one session is used by every call and clone of the client. When a
//! call fails with `SESSION_INVALID` (expired, evicted, host restarted)
//! the client logs in again, once for all concurrent callers, and retries
//! that call once. [`Client::session`] always gives the current session,
//! which NBD export names must carry ([`nbd_export_name`]).
//! [`Client::logout`] ends it.
//!
//! # Long calls
//! Snapshots, CBT changes, changed-block listing, destroys and creation go
//! through `Async.*`: the client waits for the task in `event.from`, as
//! xapi's own clients do (a host without it is polled, 50 ms doubling to
//! 1 s), decodes the task's XML-RPC result fragment, and destroys the task.
//!
//! # Secrets and TLS
//! [`Password`] is read from a file or an environment variable and is
//! redacted in `Debug`; nothing in this crate logs call parameters, and
//! [`NbdInfo`]'s `Debug` hides the session in the export name. HTTPS
//! trusts a pinned pool certificate or a CA ([`TlsTrust`]); trusting any
//! certificate needs [`TlsTrust::InsecureAcceptAny`] and logs a warning.
//!
//! # Crates used
//! `hyper` with `hyper-util` and `http-body-util` (an HTTP/1.1 client at
//! the connection level: a handful of kept-alive connections to one pool
//! master and a streamed `PUT` body, without a general-purpose client),
//! `tokio` (sockets, timers), `tokio-util` (`ReaderStream` turns the upload
//! source into a body), `futures` (stream adapters), `rustls` with `ring`,
//! `tokio-rustls` and `rustls-pki-types` (TLS in pure Rust with a custom
//! verifier for certificate pinning, PEM parsing), `quick-xml` (a
//! streaming XML tokenizer for XML-RPC; the XML-RPC mapping on top is ours
//! because XAPI's conventions — untyped strings, ints as strings, no
//! faults — are not those of generic XML-RPC crates), `serde_json`
//! (JSON-RPC), `url` (URL parsing and query encoding), `bytes`, `http`,
//! `thiserror` (the error enum), `tracing` (logs).

mod api;
mod client;
pub mod error;
pub mod guest;
mod http;
pub mod rpc;
mod tls;
pub mod types;
pub mod value;
pub mod vhd;

pub use api::{SrApi, TaskApi, VbdApi, VdiApi, VmApi};
pub use cbtvault_tls_pin::{Password, PasswordError};
pub use client::{Client, ClientOptions, TransportChoice};
pub use error::{Error, Result, XapiError};
pub use guest::{
    NetworkApi, NetworkRecord, VM_REQUIRED_FIELDS, VbdCreate, VifApi, VifCreate, VifRecord,
    VmCreate,
};
pub use rpc::{Response, Transport};
pub use tls::TlsTrust;
pub use types::{
    HostRef, NULL_REF, NbdInfo, NetworkRef, PoolRef, SessionRef, SrRecord, SrRef, TaskRecord,
    TaskRef, TaskStatus, VbdRecord, VbdRef, VdiCreate, VdiRecord, VdiRef, VdiType, VifRef,
    VmRecord, VmRef, nbd_export_name,
};
pub use value::Value;
