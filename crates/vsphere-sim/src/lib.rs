//! A vSphere simulator for cbtvault's tests and demo: the vSphere JSON API
//! (VI/JSON) calls a changed-block backup makes, answered as the API
//! reference says, with the disks' bytes behind them served over NBD.
//! No public simulator has these calls (govmomi's vcsim speaks SOAP and has
//! no `QueryChangedDiskAreas`), hence this one.
//!
//! # What it serves
//! HTTPS with a self-signed certificate (made on first start, kept in the
//! state directory: pin it), and:
//! - `GET /sdk/vim25/{release}/ServiceInstance/ServiceInstance/content`
//!   (no session) and `POST …/SessionManager/SessionManager/Login`
//!   (answers `UserSession` and the `vmware-api-session-id` header),
//!   `Logout` (204). Every other call without a live session answers
//!   `500 NotAuthenticated{object, privilegeId}`.
//! - `VirtualMachine/{vm}`: properties `config` (disks with key,
//!   `capacityInBytes`, `backing.fileName`, `backing.changeId`,
//!   `diskObjectId`), `capability`, `runtime`, `snapshot` (the tree),
//!   `name`; methods `ReconfigVM_Task` (`changeTrackingEnabled`),
//!   `CreateSnapshot_Task`/`CreateSnapshotEx_Task`, `QueryChangedDiskAreas`.
//! - `VirtualMachineSnapshot/{s}`: `config` (the disks at that point, the
//!   older file names), `RemoveSnapshot_Task`.
//! - `Task/{t}/info`: `running` for at least `task_delay`, then `success`
//!   with `result` or `error` with a `LocalizedMethodFault`.
//! - `VcenterVStorageObjectManager/VStorageObjectManager/…`:
//!   `RetrieveVStorageObject`, `Set`/`ClearVStorageObjectControlFlags`,
//!   `VStorageObjectCreateSnapshot_Task`, `RetrieveSnapshotInfo`,
//!   `RetrieveSnapshotDetails` (`changedBlockTrackingId`),
//!   `VstorageObjectVCenterQueryChangedDiskAreas`, `DeleteSnapshot_Task`,
//!   `ExtendDisk_Task`.
//! - NBD (read-only; TLS required when started with it; holes of the
//!   image reported as `base:allocation` holes, as VDDK 6.7+ does) of every
//!   snapshot's disk, export `{snapshot}/{deviceKey}` or
//!   `fcd/{id}/{snapshotId}`; `GET /sim/nbd/{export}` gives its URI.
//! - `/sim/…`: the control surface of the binary (inventory, churn,
//!   resize, CBT reset, session expiry, faults); tests in-process call
//!   [`Sim`]'s methods.
//!
//! # Changed-block tracking
//! Per disk: an epoch (new at every reset), a generation, the log of guest
//! writes and an allocation log ([`cbt`](crate::cbt) module docs). A
//! snapshot's changeId is VMware's form, `52 2d … 7b-77 4c … 7b/N`.
//! `QueryChangedDiskAreas(snapshot, deviceKey, startOffset, changeId)`
//! answers the writes since `changeId` up to the snapshot, clipped,
//! sorted and merged, optionally rounded out to a granularity (false
//! positives on purpose), at most `page_extents` per answer with `length`
//! ending at the last one, else reaching the disk's end; `"*"` answers the
//! allocated areas. A bad changeId: `InvalidArgument(changeId)`; another
//! epoch or a future one: `FileFault` keyed
//! `vim.hostd.vmsvc.cbt.cannotGetChanges`; tracking off:
//! `FileFault` `…cbt.noTrack` (for an FCD: `InvalidState`).
//! CBT switched on in a running VM's config takes effect at the next stun
//! (a snapshot create or remove); in a powered-off VM at once.
//!
//! # State and locking
//! `STATE/state.json` (the inventory, rewritten through a temporary file
//! after each call) and `STATE/images/` (sparse disk images; a snapshot
//! copies only non-zero 64 KiB pieces). Sessions and tasks are in memory
//! only, as on a restarted vCenter. One mutex guards everything (see
//! `sim`); NBD reads happen outside it on an open file handle, so a
//! snapshot removed while exported still reads.
//!
//! # Choices the reference does not settle (unverified, ours)
//! - Unknown paths and unknown releases answer 404; unknown moIds
//!   `500 ManagedObjectNotFound{obj}`, unknown methods `500 MethodNotFound`
//!   (vcsim's SOAP answers).
//! - An unset property (`snapshot` with no snapshots) answers 204.
//! - The moId of the storage object manager is `VStorageObjectManager`
//!   (vcsim's); clients must read it from the service content anyway.
//! - Extents never straddle a page: they are clipped to it.
//! - `"*"` works on any simulated datastore (real ones need VMFS).
//! - The running disk's `backing.changeId` is the last snapshot's
//!   generation; a snapshot bumps it. Whether vSphere's sequence moves
//!   like this is unverified; clients must treat the id as opaque.
//! - `SetVStorageObjectControlFlags` takes effect at once (whether an
//!   attached FCD needs a stun is unverified).
//! - Task faults are injected on request only; tasks never overlap, so
//!   `TaskInProgress` is not simulated.
//! - An "NBD drop" is a read answered with an error, not a cut TCP stream.
//!
//! # Crates used
//! `hyper` with `hyper-util` and `http-body-util` (the HTTP/1.1 server),
//! `tokio`, `tokio-util` (shutdown, task tracking), `rustls` with
//! `tokio-rustls` and `rustls-pki-types` (TLS), `rcgen` (the self-signed
//! certificate), `cbtvault-nbd` (the NBD server), `serde` and `serde_json`
//! (the JSON API and the saved state), `rand` and `rand_chacha` (epochs,
//! tokens, seeded churn), `hex` (changeIds), `jiff` (timestamps),
//! `libc` (`SEEK_DATA`/`SEEK_HOLE` for allocation), `thiserror`; the binary adds `clap`, `anyhow` and `tracing-subscriber`.

mod api;
mod cbt;
mod certs;
mod error;
mod fault;
mod http;
mod model;
mod nbd;
mod sim;
mod store;
mod vm;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use cbt::{fmt_epoch, parse_change_id};
pub use error::{Error, Result};
pub use model::{FcdSpec, VmSpec};
pub use sim::Sim;

/// How to start a simulator.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The state directory (created if missing; reused if it holds a state).
    pub state: PathBuf,
    pub user: String,
    pub password: String,
    /// The inventory made on first start.
    pub vms: Vec<VmSpec>,
    pub fcds: Vec<FcdSpec>,
    /// Most extents per changed-areas answer (vSphere: about 2000).
    pub page_extents: usize,
    /// Round changed areas out to this many bytes (0: exact).
    pub granularity: u64,
    /// How long a task stays `running`.
    pub task_delay: Duration,
    /// Idle time after which a session ends.
    pub session_idle: Duration,
    /// Serve NBD with TLS required (the server's certificate).
    pub nbd_tls: bool,
    pub listen: SocketAddr,
    pub nbd_listen: SocketAddr,
}

impl SimConfig {
    /// One powered-on VM `web` with one 8 MiB disk, CBT off; loopback
    /// ports chosen by the system.
    pub fn new(state: impl Into<PathBuf>, password: impl Into<String>) -> SimConfig {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        SimConfig {
            state: state.into(),
            user: "administrator@vsphere.local".into(),
            password: password.into(),
            vms: vec![VmSpec {
                name: "web".into(),
                disks: vec![8 << 20],
                powered_on: true,
                cbt_supported: true,
                cbt_enabled: false,
            }],
            fcds: Vec::new(),
            page_extents: 2000,
            granularity: 0,
            task_delay: Duration::from_millis(30),
            session_idle: Duration::from_secs(1800),
            nbd_tls: false,
            listen: any,
            nbd_listen: any,
        }
    }
}

/// A running simulator.
pub struct Simulator {
    sim: Sim,
    addr: SocketAddr,
    nbd_addr: SocketAddr,
    cert_pem: String,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Simulator {
    /// Loads or makes the state, then serves HTTPS and NBD.
    pub async fn start(config: SimConfig) -> Result<Simulator> {
        let dirs = model::Dirs {
            root: config.state.clone(),
        };
        std::fs::create_dir_all(dirs.root.join("images")).map_err(|source| Error::State {
            path: dirs.root.clone(),
            source,
        })?;
        let state = match model::State::load(&dirs.root)? {
            Some(s) => s,
            None => {
                let s = model::seed(&dirs, &config.vms, &config.fcds)?;
                s.save(&dirs.root)?;
                s
            }
        };
        let cert = certs::HostCert::load_or_create(&dirs.root)?;
        let tls = cert.server_config()?;
        let sim = Sim {
            world: Arc::new(Mutex::new(sim::World {
                state,
                sessions: Default::default(),
                tasks: Default::default(),
                faults: Default::default(),
                next_task: 0,
            })),
            dirs,
            behaviour: Arc::new(Mutex::new(sim::Behaviour {
                user: config.user.clone(),
                password: config.password.clone(),
                shape: cbt::QueryShape {
                    page_extents: config.page_extents.max(1),
                    granularity: config.granularity,
                },
                task_delay: config.task_delay,
                session_idle: config.session_idle,
            })),
            nbd_port: Arc::new(Mutex::new(None)),
        };
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let nbd_addr = nbd::start(
            &sim,
            config.nbd_listen,
            config.nbd_tls.then(|| tls.clone()),
            shutdown.clone(),
            &tracker,
        )
        .await?;
        *sim.nbd_port.lock().unwrap_or_else(|e| e.into_inner()) = Some(nbd_addr.port());
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Listen {
                addr: config.listen.to_string(),
                source,
            })?;
        let addr = listener.local_addr()?;
        tracker.spawn(http::serve(
            listener,
            sim.clone(),
            tls,
            shutdown.clone(),
            tracker.clone(),
        ));
        Ok(Simulator {
            sim,
            addr,
            nbd_addr,
            cert_pem: cert.cert_pem,
            shutdown,
            tracker,
        })
    }

    pub fn sim(&self) -> &Sim {
        &self.sim
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn nbd_addr(&self) -> SocketAddr {
        self.nbd_addr
    }

    /// The NBD URI template cbtvault reads snapshots through
    /// (`nbd_uri` of a `[[vcenter]]`): `nbd://127.0.0.1:PORT/{export}`, the
    /// export being `{snapshot}/{disk_key}` or `fcd/{fcd}/{snapshot}`.
    pub fn nbd_uri_template(&self) -> String {
        format!("nbd://{}/{{export}}", self.nbd_addr)
    }

    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Stops serving and waits for open connections (a few seconds at most).
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
    }
}
