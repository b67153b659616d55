//! The simulator's state: configuration, the database with its
//! persistence, sessions, tasks, faults, VDI files and the certificate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cbtvault_blockmap::{BLOCK_SIZE, block_count};
use cbtvault_xenapi::XapiError;
use rand::SeedableRng;
use rand::seq::index::sample;

use crate::cbt::CbtLogs;
use crate::certs::HostCert;
use crate::error::{Error, Result};
use crate::model::{
    Db, EPOCH, HostRec, PoolRec, SrRec, VbdRec, VdiRec, VifRec, VmRec, new_ref, new_uuid,
};
use crate::sessions::{SessionLimits, Sessions};
use crate::store::{Store, block_content, block_len};
use crate::tasks::Tasks;

/// The pool made on first start.
#[derive(Clone, Debug)]
pub struct PoolSpec {
    /// Number of guest VMs (`vm-0`, `vm-1`, …), all running.
    pub vms: usize,
    /// Disks per VM.
    pub disks_per_vm: usize,
    /// Virtual size of each disk, in bytes (rounded up to 2 MiB, as the
    /// pool's `ext` SR makes sizes).
    pub disk_size: u64,
    /// 64 KiB blocks of each disk filled with data at creation (before
    /// any CBT log exists, so they are in no bitmap).
    pub initial_blocks: u64,
}

impl Default for PoolSpec {
    fn default() -> Self {
        PoolSpec {
            vms: 2,
            disks_per_vm: 1,
            disk_size: 64 << 20,
            initial_blocks: 16,
        }
    }
}

/// How the simulator behaves.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Where the database (`state.json`), VDI files and certificate live.
    pub state_dir: PathBuf,
    /// The user that may log in.
    pub username: String,
    /// Its password.
    pub password: String,
    /// Serve JSON-RPC at `/jsonrpc` (false imitates a host without it).
    pub jsonrpc: bool,
    /// How long `VDI.data_destroy` waits for VBDs to go (xapi: 4 s).
    pub data_destroy_timeout: Duration,
    /// Session limits.
    pub session_limits: SessionLimits,
    /// The pool made on first start.
    pub pool: PoolSpec,
    /// Connections xapi-nbd accepts at once on a host (16).
    pub nbd_connection_limit: usize,
    /// Where the NBD server listens (xapi-nbd: port 10809); `None` runs
    /// none. [`SimConfig::new`] picks a free port of 127.0.0.1.
    pub nbd_listen: Option<std::net::SocketAddr>,
    /// How long a refused login waits before `SESSION_AUTHENTICATION_FAILED`
    /// (xapi: [`XAPI_AUTH_FAILURE_DELAY`], against password guessing).
    /// [`SimConfig::new`] sets none, so tests of wrong passwords stay fast;
    /// the `xapi-sim` binary waits as xapi does unless told otherwise.
    pub auth_failure_delay: Duration,
}

/// The delay xapi puts before every `SESSION_AUTHENTICATION_FAILED`
/// (`xapi_session.ml`, `thread_delay_and_raise_error`: 5 s).
pub const XAPI_AUTH_FAILURE_DELAY: Duration = Duration::from_secs(5);

impl SimConfig {
    /// XAPI's behaviour with user `root` and `password`, state in `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>, password: impl Into<String>) -> Self {
        SimConfig {
            state_dir: state_dir.into(),
            username: "root".into(),
            password: password.into(),
            jsonrpc: true,
            data_destroy_timeout: Duration::from_secs(4),
            session_limits: SessionLimits::default(),
            pool: PoolSpec::default(),
            nbd_connection_limit: 16,
            nbd_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            auth_failure_delay: Duration::ZERO,
        }
    }
}

/// Pending fault injections.
#[derive(Debug, Default)]
pub struct Faults {
    /// The next NBD connection fails its reads after this many bytes.
    pub nbd_disconnect_after: Option<u64>,
    /// Every NBD connection to the next VDI exported fails its reads after
    /// this many bytes (the VDI is chosen at its first connection); later
    /// VDIs are served whole. A backup of that snapshot fails however
    /// often it reconnects; a retry from a new snapshot succeeds.
    pub nbd_break_one_vdi: Option<(u64, Option<String>)>,
    /// This many next `data_destroy` calls wait and fail with `VDI_IN_USE`.
    pub data_destroy_in_use: u32,
    /// Delay of the next API calls, and how many (`None`: all).
    pub slow: Option<(Duration, Option<u32>)>,
    /// `/import_raw_vdi`: after this many uploads succeed, the next one
    /// fails once this many bytes of it are written.
    pub import_break: Option<(u32, u64)>,
}

pub(crate) struct Inner {
    pub config: SimConfig,
    pub db: Mutex<Db>,
    pub sessions: Mutex<Sessions>,
    pub tasks: Mutex<Tasks>,
    pub faults: Mutex<Faults>,
    pub store: Store,
    pub cert: HostCert,
    pub nbd_port: Mutex<Option<u16>>,
    pub nbd_connections: AtomicUsize,
    /// The most NBD connections that were open at once.
    pub nbd_connections_peak: AtomicUsize,
    /// The last `/import_raw_vdi` upload: body bytes received, and sectors
    /// written (for `format=vhd`; a raw upload counts every 512 bytes).
    pub last_import: Mutex<(u64, u64)>,
    /// The password that logs in now (`sim.set_password` changes it).
    pub password: Mutex<String>,
    /// Logins tried, and of them refused.
    pub logins: AtomicU64,
    pub failed_logins: AtomicU64,
    /// Recent events for `event.from`, and the bell its waiters hear.
    pub events: Mutex<crate::events::EventLog>,
    pub event_bell: tokio::sync::Notify,
    state_file: PathBuf,
}

/// A handle on the simulated pool. Cheap to clone.
#[derive(Clone)]
pub struct Sim {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("state_dir", &self.inner.config.state_dir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `INTERNAL_ERROR [msg]`, what xapi reports for unexpected failures.
pub(crate) fn internal(msg: impl std::fmt::Display) -> XapiError {
    XapiError::Other {
        code: "INTERNAL_ERROR".into(),
        params: vec![msg.to_string()],
    }
}

impl Sim {
    /// Opens the state in `config.state_dir`, making a new pool there if it
    /// holds none.
    pub fn open(config: SimConfig) -> Result<Sim> {
        let dir = config.state_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| Error::State {
            path: dir.clone(),
            source,
        })?;
        let store = Store::open(&dir).map_err(|source| Error::State {
            path: dir.join("vdis"),
            source,
        })?;
        let cert = HostCert::load_or_create(&dir)?;
        let state_file = dir.join("state.json");
        let db = if state_file.exists() {
            let text = std::fs::read(&state_file).map_err(|source| Error::State {
                path: state_file.clone(),
                source,
            })?;
            let mut db: Db =
                serde_json::from_slice(&text).map_err(|source| Error::StateFormat {
                    path: state_file.clone(),
                    source,
                })?;
            // NBD connections did not survive the restart.
            db.vbds.retain(|_, b| !b.nbd);
            db.complete();
            db
        } else {
            new_pool(&config.pool, &store)?
        };
        let sim = Sim {
            inner: Arc::new(Inner {
                sessions: Mutex::new(Sessions::new(config.session_limits)),
                password: Mutex::new(config.password.clone()),
                logins: AtomicU64::new(0),
                failed_logins: AtomicU64::new(0),
                events: Mutex::new(crate::events::EventLog::default()),
                event_bell: tokio::sync::Notify::new(),
                config,
                db: Mutex::new(db),
                tasks: Mutex::new(Tasks::default()),
                faults: Mutex::new(Faults::default()),
                store,
                cert,
                nbd_port: Mutex::new(None),
                nbd_connections: AtomicUsize::new(0),
                nbd_connections_peak: AtomicUsize::new(0),
                last_import: Mutex::new((0, 0)),
                state_file,
            }),
        };
        {
            let db = sim.db();
            sim.save(&db).map_err(Error::Xapi)?;
        }
        Ok(sim)
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.inner.config.state_dir
    }

    /// Path of the host certificate file (PEM) in the state directory.
    pub fn certificate_path(&self) -> PathBuf {
        HostCert::cert_path(&self.inner.config.state_dir)
    }

    /// PEM of the host certificate (HTTPS and NBD).
    pub fn certificate_pem(&self) -> &str {
        &self.inner.cert.cert_pem
    }

    pub(crate) fn db(&self) -> MutexGuard<'_, Db> {
        lock(&self.inner.db)
    }

    pub(crate) fn sessions(&self) -> MutexGuard<'_, Sessions> {
        lock(&self.inner.sessions)
    }

    pub(crate) fn tasks(&self) -> MutexGuard<'_, Tasks> {
        lock(&self.inner.tasks)
    }

    pub(crate) fn events(&self) -> MutexGuard<'_, crate::events::EventLog> {
        lock(&self.inner.events)
    }

    pub(crate) fn password(&self) -> MutexGuard<'_, String> {
        lock(&self.inner.password)
    }

    pub(crate) fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.inner.faults)
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Writes the database to `state.json` atomically (temporary file,
    /// fsync, rename).
    pub(crate) fn save(&self, db: &Db) -> Result<(), XapiError> {
        use std::io::Write as _;
        let tmp = self.inner.state_file.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(db).map_err(internal)?;
        let mut f = std::fs::File::create(&tmp).map_err(internal)?;
        f.write_all(&text).map_err(internal)?;
        f.sync_all().map_err(internal)?;
        std::fs::rename(&tmp, &self.inner.state_file).map_err(internal)?;
        Ok(())
    }

    /// Runs `f` on the locked database and saves it if `f` succeeds.
    pub(crate) fn mutate<T>(
        &self,
        f: impl FnOnce(&mut Db, &Store) -> Result<T, XapiError>,
    ) -> Result<T, XapiError> {
        let mut db = self.db();
        let out = f(&mut db, &self.inner.store)?;
        self.save(&db)?;
        Ok(out)
    }

    /// The NBD port announced by `VDI.get_nbd_info` (none: the pool has no
    /// NBD network, and the call returns an empty list).
    pub fn set_nbd_port(&self, port: Option<u16>) {
        *lock(&self.inner.nbd_port) = port;
    }

    pub(crate) fn nbd_port(&self) -> Option<u16> {
        *lock(&self.inner.nbd_port)
    }
}

/// Makes the first-start pool: a host, an `ext` SR, dom0, and `spec.vms`
/// running VMs with plugged, CBT-capable (not yet enabled) disks.
fn new_pool(spec: &PoolSpec, store: &Store) -> Result<Db> {
    // The first SR is `ext` (sim.set_sr_type changes it later).
    let disk_size = crate::sr::round_size("ext", spec.disk_size);
    let host_ref = new_ref();
    let sr_ref = new_ref();
    let mut db = Db {
        pool_ref: new_ref(),
        pool: PoolRec {
            uuid: new_uuid(),
            name_label: "xapi-sim pool".into(),
            other_config: BTreeMap::new(),
            cbt_licensed: true,
        },
        host_ref,
        host: HostRec {
            uuid: new_uuid(),
            hostname: "xapi-sim".into(),
            address: "127.0.0.1".into(),
        },
        srs: BTreeMap::from([(
            sr_ref.clone(),
            SrRec {
                uuid: new_uuid(),
                name_label: "Local storage".into(),
                sr_type: "ext".into(),
                // Room for the 16 TiB VDIs xapi allows, and their
                // snapshots (`sim.set_sr_size` makes it small).
                physical_size: 64 << 40,
                other_config: BTreeMap::new(),
            },
        )]),
        vms: BTreeMap::new(),
        vbds: BTreeMap::new(),
        vdis: BTreeMap::new(),
        cbt: CbtLogs::default(),
        pbds: BTreeMap::new(),
        networks: BTreeMap::new(),
        vifs: BTreeMap::new(),
    };
    db.complete();
    db.vms
        .insert(new_ref(), vm_rec("Control domain on host: xapi-sim", true));
    for i in 0..spec.vms {
        let vm_ref = new_ref();
        db.vms
            .insert(vm_ref.clone(), vm_rec(&format!("vm-{i}"), false));
        for d in 0..spec.disks_per_vm {
            let vdi = new_vdi(&sr_ref, &format!("vm-{i} disk {d}"), disk_size);
            store.create(&vdi.uuid, disk_size)?;
            let blocks = block_count(disk_size);
            let n = spec.initial_blocks.min(blocks);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64((i * 1000 + d) as u64);
            let seed = (i * 1000 + d) as u64;
            for b in sample(&mut rng, blocks as usize, n as usize).into_iter() {
                let b = b as u64;
                let data = block_content(seed, b, block_len(disk_size, b));
                store.write_at(&vdi.uuid, b * BLOCK_SIZE, &data)?;
            }
            let vdi_ref = new_ref();
            let mut vdi = vdi;
            vdi.physical_utilisation = store.allocated(&vdi.uuid);
            db.vdis.insert(vdi_ref.clone(), vdi);
            db.vbds.insert(
                new_ref(),
                VbdRec {
                    uuid: new_uuid(),
                    vm: vm_ref.clone(),
                    vdi: vdi_ref,
                    device: format!("xvd{}", (b'a' + (d % 26) as u8) as char),
                    userdevice: d.to_string(),
                    mode: "RW".into(),
                    vbd_type: "Disk".into(),
                    bootable: d == 0,
                    currently_attached: true,
                    other_config: BTreeMap::new(),
                    nbd: false,
                    empty: false,
                },
            );
        }
        let network = db.networks.keys().next().cloned().unwrap_or_default();
        db.vifs.insert(
            new_ref(),
            VifRec {
                uuid: new_uuid(),
                vm: vm_ref.clone(),
                network,
                device: "0".into(),
                mac: crate::vm::random_mac(),
                mac_autogenerated: true,
                mtu: 1500,
                currently_attached: true,
                locking_mode: "network_default".into(),
                qos_algorithm_type: String::new(),
                qos_algorithm_params: BTreeMap::new(),
                other_config: BTreeMap::new(),
            },
        );
    }
    Ok(db)
}

fn vm_rec(name: &str, dom0: bool) -> VmRec {
    VmRec {
        uuid: new_uuid(),
        name_label: name.into(),
        name_description: String::new(),
        power_state: "Running".into(),
        is_control_domain: dom0,
        is_a_snapshot: false,
        snapshot_of: cbtvault_xenapi::NULL_REF.into(),
        snapshot_time: EPOCH.into(),
        other_config: BTreeMap::new(),
        blocked_operations: BTreeMap::new(),
        tags: Vec::new(),
        config: Default::default(),
    }
}

/// A fresh `user` VDI record (no data file yet).
pub(crate) fn new_vdi(sr: &str, name: &str, size: u64) -> VdiRec {
    VdiRec {
        uuid: new_uuid(),
        name_label: name.into(),
        name_description: String::new(),
        sr: sr.into(),
        virtual_size: size,
        vdi_type: "user".into(),
        sharable: false,
        read_only: false,
        is_a_snapshot: false,
        snapshot_of: cbtvault_xenapi::NULL_REF.into(),
        snapshot_time: EPOCH.into(),
        cbt_enabled: false,
        on_boot: "persist".into(),
        other_config: BTreeMap::new(),
        sm_config: BTreeMap::new(),
        xenstore_data: BTreeMap::new(),
        tags: Vec::new(),
        has_data: true,
        physical_utilisation: 0,
        managed: true,
    }
}
