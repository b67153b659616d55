//! A XenServer (XAPI) simulator for cbtvault's tests: a library that
//! starts a simulated pool master in-process, and the `xapi-sim` binary.
//!
//! # What it serves
//! On one `127.0.0.1` port, plain HTTP and HTTPS (the first byte of a
//! connection tells them apart; the certificate is generated once and kept
//! in the state directory): XML-RPC at `POST /` and `/RPC2`, JSON-RPC at
//! `POST /jsonrpc` (can be turned off to imitate old hosts), and `PUT
//! /import_raw_vdi` (`format=raw`, or `format=vhd`: a sparse VHD whose
//! marked sectors alone are written onto the existing VDI). The XenAPI subset is what a CBT backup and a restore
//! use: sessions (`login_with_password`, `logout`, xapi's per-originator
//! limits, idle expiry), the implicit getters of `VDI`, `VM`, `VBD`, `VIF`,
//! `SR`, `PBD`, `network`, `host`, `pool`, `task` and `session`, `VDI.snapshot`,
//! `enable_cbt`, `disable_cbt`, `list_changed_blocks`, `get_nbd_info`,
//! `data_destroy`, `destroy`, `create`, `resize`, `clone`, `copy`,
//! other_config edits, `VM.snapshot`, `VM.checkpoint`, `VM.destroy`,
//! `VBD.create/plug/unplug/destroy`, and what a whole-VM restore makes:
//! `VM.create/start/hard_shutdown/clean_shutdown`, `VIF.create/destroy`,
//! `network.create/destroy`, `event.from` (a network has the NBD
//! purpose when the NBD server runs), and `Async.*` forms with tasks. The
//! semantics follow xen-api's `xapi_vdi.ml` and the storage manager's CBT
//! code as summarised in `shared/specs/xenapi.md`: the checks and their
//! order, the error codes and parameters, the CBT log chain ([`cbt`]),
//! `data_destroy`'s tentative type and 4-second wait. It is a server, so
//! hostile calls get an answer, never a panic: VDIs are at most 16 TiB
//! (larger sizes get `SR_BACKEND_FAILURE_79`, and their CBT bitmaps stay at
//! most 32 MiB), `sim.read` returns at most 64 MiB.
//!
//! # Fidelity to xapi
//! What it models, and where that comes from (xen-api `ocaml/xapi/…`, the
//! storage manager `xapi-project/sm`, `shared/specs/xenapi.md`):
//! * call handling as the generated server (`gen_server.ml`): unknown
//!   method, then `MESSAGE_PARAMETER_COUNT_MISMATCH [method, expected,
//!   received]` counted without the session (a call with no parameter
//!   reads `-1`), then `SESSION_INVALID`; `Async.*` forms fail those at
//!   once, not in a task, and those of a method without async mode (such
//!   as `VDI.get_nbd_info`) fail with `["Fault", "No async mode for this
//!   operation (rpc: …)"]` (`server_helpers.ml`); trailing parameters
//!   with datamodel defaults may be left out (`VDI.snapshot`'s
//!   `driver_params`, `VM.snapshot`'s `ignore_vdis`,
//!   `login_with_password`'s version and originator);
//! * logins (`xapi_session.ml`): `SESSION_AUTHENTICATION_FAILED [user,
//!   "Authentication failure"]` after [`SimConfig::auth_failure_delay`]
//!   (xapi: 5 s, [`XAPI_AUTH_FAILURE_DELAY`]; the binary waits that long by
//!   default, the library not unless asked, so tests stay fast); per-
//!   originator session limits and idle expiry (`xapi_globs.ml`);
//! * VDI checks and their order (`xapi_vdi.ml` `check_operation_error`):
//!   `VDI_NOT_MANAGED`, `VDI_INCOMPATIBLE_TYPE` on `cbt_metadata`,
//!   `VDI_IN_USE` for what an attached VBD blocks (only `snapshot`,
//!   `clone`, `resize_online` and the CBT operations run live; `copy` with
//!   read-only VBDs only), `SR_OPERATION_NOT_SUPPORTED` where the SR has
//!   no CBT, `LICENCE_RESTRICTION` for an unlicensed pool;
//!   `allowed_operations` as `update_allowed_operations` fills it, without
//!   the CBT operations (CA-260245);
//! * the storage manager: CBT logs and their chain (`VDI.py`
//!   `_cbt_snapshot`, a snapshot of a CBT snapshot included), error 460 for
//!   broken chains, error 66 for CBT on a RAW VDI, error 79 for sizes, and
//!   SR types ([`sr`]) with their sizes (VHD: rounded up to 2 MiB,
//!   `vhdutil.validate_and_round_vhd_size`);
//! * `data_destroy`'s tentative type and 4-second wait, and xapi-nbd's
//!   export names, TLS and 16-connection limit ([`nbd`]);
//! * guests (`datamodel_vm.ml`, `datamodel_vif.ml`, `xapi_vif_helpers.ml`):
//!   VM records carry CPUs, memory, boot, platform and HA settings and
//!   their VIFs; `VM.create` makes a halted VM (its memory and VCPU fields
//!   required, `MEMORY_CONSTRAINT_VIOLATION` when the four memory limits
//!   are out of order), `VM.start` needs `Halted` and `VM.destroy` a
//!   non-running VM (`VM_BAD_POWER_STATE [vm, expected, actual]`),
//!   `VBD.create`/`VIF.create` refuse a position the VM uses
//!   (`DEVICE_ALREADY_EXISTS`), `VIF.create` a malformed MAC
//!   (`MAC_INVALID`) and makes one when none is given; a VM snapshot keeps
//!   the VM's VIFs; `network.destroy` is refused while VIFs use it
//!   (`NETWORK_CONTAINS_VIF`);
//! * a full SR: `VDI.create` beyond the SR's `physical_size` (counted
//!   thick: the virtual sizes of its VDIs with data) fails as the storage
//!   manager answers it, `SR_BACKEND_FAILURE_44 ["", "There is insufficient
//!   space", ""]` (xapi's `SR_FULL` is not what `VDI.create` returns); new
//!   pools' SRs hold 64 TiB, `sim.set_sr_size` changes it;
//! * tasks whose result is an XML-RPC fragment (`taskHelper.ml`), 200 kept,
//!   and `event.from` for them, the way real clients wait (`xapi_event.ml`).
//!
//! What it does not model: RBAC and external authentication, pools of more
//! than one host (`HOST_IS_SLAVE`), `current_operations` and
//! `OTHER_OPERATION_IN_PROGRESS`, storage migration, events of classes
//! other than `task` (`event.from` reports tasks only), a checkpoint's
//! memory image, VHD's 2 TiB size limit, and the exact text of sm's error
//! 66 (its code and parameter count are sm's; the words are ours). `dummy`
//! and `nocbt` SR types are the simulator's stand-ins for "a driver that
//! keeps sizes exact" and "a driver without CBT". The codecs are the client
//! crate's own; `crates/xenapi/tests/integration/codec.rs` checks it
//! against Python's `xmlrpc` so a shared mistake cannot hide.
//!
//! # State
//! `state.json` (the database, written atomically after every change),
//! `vdis/<uuid>.img` (sparse data files; a snapshot keeps its own until
//! `data_destroy` or `destroy`) and `host-cert.pem`/`host-key.pem`.
//! Sessions and tasks live in memory: a restart invalidates sessions, as
//! a host restart does.
//!
//! # Control and faults
//! [`control`] lists the `sim.*` RPCs and the matching [`Sim`] methods:
//! guest writes marking CBT exactly as tapdisk does, plugging, resizing,
//! and the faults (CBT silently disabled, guest writes that bypass the CBT
//! log, session expiry, NBD disconnect
//! after N bytes, `VDI_IN_USE` on the next `data_destroy`, slow answers,
//! an `/import_raw_vdi` upload broken after N bytes),
//! and the states of a real pool that rule CBT out or change logins (an
//! SR's type, the licence, unmanaged and RAW VDIs, a new password).
//!
//! # NBD
//! [`nbd`] has the xapi-nbd logic (export-name authentication, the
//! 16-connection limit, the dom0 VBD that makes the VDI "in use") and
//! [`VdiReader`], the data of an export. [`Simulator`] serves them with
//! `cbtvault_nbd::server` in its xapi-nbd mode (EXPORT_NAME only, TLS
//! required with the host certificate, read-only, 16 connections) on
//! [`SimConfig::nbd_listen`], and `VDI.get_nbd_info` announces that port
//! (no NBD server: an empty list, as for a pool without an NBD network).
//!
//! # Crates used
//! `cbtvault-nbd` (the NBD server), `futures` and `bytes` (its export
//! trait), `cbtvault-xenapi` (the XML-RPC/JSON-RPC codecs and the typed
//! XAPI errors, so both sides agree on one vocabulary), `cbtvault-blockmap`
//! (the CBT bitmaps and their base64 form), `hyper`, `hyper-util`,
//! `http-body-util` and `http` (the HTTP/1.1 server), `tokio` and
//! `tokio-util` (sockets, timers, blocking pool, graceful shutdown),
//! `rustls`, `tokio-rustls`, `rustls-pki-types` and `rcgen` (TLS and the
//! generated host certificate), `serde`/`serde_json` (the state file),
//! `rand`/`rand_chacha` (reproducible seeded churn), `base64` (`sim.*`
//! data), `jiff` (XAPI datetimes), `url` (query strings), `libc`
//! (SEEK_DATA/SEEK_HOLE for sparse snapshot copies), `thiserror`,
//! `tracing`; the binary adds `clap`, `anyhow` and `tracing-subscriber`.

pub mod cbt;
mod certs;
pub mod control;
mod dispatch;
mod error;
mod events;
mod guest;
mod http;
mod model;
pub mod nbd;
mod nbd_server;
mod sessions;
mod sim;
pub mod sr;
mod store;
mod tasks;
mod vdi;
mod vm;
mod vm_model;

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use certs::SUBJECT as CERT_SUBJECT;
pub use control::{VdiSummary, VmSummary};
pub use error::{Error, Result};
pub use nbd::{NbdExport, NbdRefusal, VdiReader};
pub use sessions::SessionLimits;
pub use sim::{Faults, PoolSpec, Sim, SimConfig, XAPI_AUTH_FAILURE_DELAY};
pub use sr::SR_TYPES;

/// A running simulator: the pool and its HTTP(S) endpoint.
pub struct Simulator {
    sim: Sim,
    addr: SocketAddr,
    nbd_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Opens (or creates) the pool in `config.state_dir` and serves it on a
    /// free port of 127.0.0.1.
    pub async fn start(config: SimConfig) -> Result<Simulator> {
        Self::start_on(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// As [`Simulator::start`], on `listen`.
    pub async fn start_on(config: SimConfig, listen: SocketAddr) -> Result<Simulator> {
        let sim = tokio::task::spawn_blocking(move || Sim::open(config))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| Error::Listen {
                addr: listen.to_string(),
                source,
            })?;
        let addr = listener.local_addr()?;
        let tls = sim.inner.cert.server_config()?;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(http::serve(
            listener,
            sim.clone(),
            tls,
            shutdown.clone(),
            tracker.clone(),
        ));
        tracing::info!("xapi-sim serving http://{addr} and https://{addr}");
        let nbd_addr = match sim.config().nbd_listen {
            Some(listen) => {
                Some(nbd_server::start(&sim, listen, shutdown.clone(), &tracker).await?)
            }
            None => None,
        };
        Ok(Simulator {
            sim,
            addr,
            nbd_addr,
            shutdown,
            tracker,
        })
    }

    /// The pool, for direct control from tests.
    pub fn sim(&self) -> &Sim {
        &self.sim
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The NBD server's address, if one runs.
    pub fn nbd_addr(&self) -> Option<SocketAddr> {
        self.nbd_addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `https://127.0.0.1:PORT` (same port).
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// PEM of the host certificate, to pin.
    pub fn certificate_pem(&self) -> &str {
        self.sim.certificate_pem()
    }

    /// A token cancelled when the simulator shuts down (to tie other
    /// servers, such as an NBD server, to its lifetime).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The tracker of the simulator's tasks (for servers added beside it).
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Stops accepting, lets open connections finish their current
    /// request, and waits for everything to end.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
