//! The simulator's shared state and its control surface: what a guest, a
//! storage admin, or a failing vCenter would do to the inventory.
//!
//! # Locking
//! One mutex guards the inventory, sessions, tasks and injected faults
//! together: every API call takes it once, changes what it changes, saves
//! the state and lets go; no lock is held across I/O other than the small
//! image writes of a guest write or a snapshot's freeze. NBD reads open
//! their image file under the lock and read it without.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::cbt::QueryShape;
use crate::error::{Error, Result};
use crate::fault::SimFault;
use crate::model::{Dirs, State};
use crate::store;

/// A simulated task: run when created, shown `running` until `ready_at`.
pub(crate) struct Task {
    pub name: String,
    pub entity: Value,
    pub queued: String,
    pub ready_at: Instant,
    pub outcome: Result<Option<Value>, SimFault>,
}

pub(crate) struct Session {
    pub user: String,
    pub last_active: Instant,
}

/// Faults the tests ask for.
#[derive(Default)]
pub(crate) struct Faults {
    /// Sessions end after this many more authenticated calls.
    pub expire_after_calls: Option<u32>,
    /// The next task of this method ends in `error` with this fault.
    pub fail_task: Option<(String, SimFault)>,
    /// The next changed-areas query answers this fault.
    pub fail_query: Option<SimFault>,
    /// Every answer waits this long.
    pub slow: Duration,
    /// NBD reads fail once this many more bytes were served.
    pub nbd_fail_after: Option<u64>,
    /// Queries answered (for tests that count pages).
    pub queries: u64,
}

pub(crate) struct World {
    pub state: State,
    pub sessions: HashMap<String, Session>,
    pub tasks: BTreeMap<String, Task>,
    pub faults: Faults,
    pub next_task: u64,
}

/// How the simulator behaves.
#[derive(Clone, Debug)]
pub(crate) struct Behaviour {
    pub user: String,
    pub password: String,
    pub shape: QueryShape,
    pub task_delay: Duration,
    pub session_idle: Duration,
}

/// A handle on the simulator; clones share it.
#[derive(Clone)]
pub struct Sim {
    pub(crate) world: Arc<Mutex<World>>,
    pub(crate) dirs: Dirs,
    pub(crate) behaviour: Arc<Mutex<Behaviour>>,
    pub(crate) nbd_port: Arc<Mutex<Option<u16>>>,
}

fn control(e: SimFault) -> Error {
    Error::Control(format!("{}: {}", e.type_name, e.message))
}

impl Sim {
    pub(crate) fn lock(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn behaviour(&self) -> Behaviour {
        self.behaviour
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The NBD server's port, once it listens.
    pub fn nbd_port(&self) -> Option<u16> {
        *self.nbd_port.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn save(&self, w: &World) -> Result<()> {
        w.state.save(&self.dirs.root)
    }

    /// VM moIds and names.
    pub fn vms(&self) -> Vec<(String, String)> {
        self.lock()
            .state
            .vms
            .iter()
            .map(|(id, vm)| (id.clone(), vm.name.clone()))
            .collect()
    }

    /// FCD ids, names and datastores.
    pub fn fcds(&self) -> Vec<(String, String, String)> {
        self.lock()
            .state
            .fcds
            .iter()
            .map(|(id, f)| (id.clone(), f.name.clone(), f.datastore.clone()))
            .collect()
    }

    /// Snapshots of `vm`: moId and name.
    pub fn snapshots(&self, vm: &str) -> Vec<(String, String)> {
        let w = self.lock();
        let Some(v) = w.state.vms.get(vm) else {
            return Vec::new();
        };
        v.snapshots
            .iter()
            .filter_map(|s| Some((s.clone(), w.state.snapshots.get(s)?.name.clone())))
            .collect()
    }

    /// Snapshot ids of FCD `id`.
    pub fn fcd_snapshots(&self, id: &str) -> Vec<String> {
        self.lock()
            .state
            .fcds
            .get(id)
            .map(|f| f.snapshots.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn image_of(&self, vm: &str, key: i32) -> Result<String> {
        let w = self.lock();
        let v = w.state.vm(vm).map_err(control)?;
        v.disks
            .iter()
            .find(|d| d.key == key)
            .map(|d| d.image.clone())
            .ok_or_else(|| Error::Control(format!("{vm} has no disk {key}")))
    }

    /// The guest writes `data` at `offset` of disk `key` of `vm`.
    pub fn write(&self, vm: &str, key: i32, offset: u64, data: &[u8]) -> Result<()> {
        let mut w = self.lock();
        let v = w.state.vm_mut(vm).map_err(control)?;
        let d = v
            .disks
            .iter_mut()
            .find(|d| d.key == key)
            .ok_or_else(|| Error::Control(format!("{vm} has no disk {key}")))?;
        if offset.saturating_add(data.len() as u64) > d.capacity {
            return Err(Error::Control("write past the end of the disk".into()));
        }
        store::write(&self.dirs.image(&d.image), offset, data)?;
        d.cbt.write(offset, data.len() as u64);
        self.save(&w)
    }

    /// The guest writes `data` at `offset` of FCD `id`.
    pub fn write_fcd(&self, id: &str, offset: u64, data: &[u8]) -> Result<()> {
        let mut w = self.lock();
        let f = w
            .state
            .fcds
            .get_mut(id)
            .ok_or_else(|| Error::Control(format!("no FCD {id}")))?;
        if offset.saturating_add(data.len() as u64) > f.capacity {
            return Err(Error::Control("write past the end of the disk".into()));
        }
        store::write(&self.dirs.image(&f.image), offset, data)?;
        f.cbt.write(offset, data.len() as u64);
        self.save(&w)
    }

    /// `count` random writes of 1 byte to 3 blocks at any alignment;
    /// returns them as `(offset, len)`.
    pub fn churn(&self, vm: &str, key: i32, count: usize, seed: u64) -> Result<Vec<(u64, u64)>> {
        let capacity = self.disk_capacity(vm, key)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut writes = Vec::new();
        for _ in 0..count {
            let len = rng.gen_range(1..=3 * 65536u64).min(capacity);
            let offset = rng.gen_range(0..=capacity - len);
            let data: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            self.write(vm, key, offset, &data)?;
            writes.push((offset, len));
        }
        Ok(writes)
    }

    pub fn disk_capacity(&self, vm: &str, key: i32) -> Result<u64> {
        let w = self.lock();
        let v = w.state.vm(vm).map_err(control)?;
        v.disks
            .iter()
            .find(|d| d.key == key)
            .map(|d| d.capacity)
            .ok_or_else(|| Error::Control(format!("{vm} has no disk {key}")))
    }

    /// The running disk's image file (sparse), for digests that skip holes.
    pub fn disk_path(&self, vm: &str, key: i32) -> Result<std::path::PathBuf> {
        Ok(self.dirs.image(&self.image_of(vm, key)?))
    }

    /// The running disk's bytes.
    pub fn disk_bytes(&self, vm: &str, key: i32) -> Result<Vec<u8>> {
        let image = self.image_of(vm, key)?;
        let size = self.disk_capacity(vm, key)?;
        store::read(&self.dirs.image(&image), 0, size as usize)
    }

    /// An FCD's bytes.
    pub fn fcd_bytes(&self, id: &str) -> Result<Vec<u8>> {
        let (image, size) = {
            let w = self.lock();
            let f = w
                .state
                .fcds
                .get(id)
                .ok_or_else(|| Error::Control(format!("no FCD {id}")))?;
            (f.image.clone(), f.capacity)
        };
        store::read(&self.dirs.image(&image), 0, size as usize)
    }

    /// Grows disk `key` of `vm` (vSphere never shrinks).
    pub fn resize(&self, vm: &str, key: i32, size: u64) -> Result<()> {
        let mut w = self.lock();
        let v = w.state.vm_mut(vm).map_err(control)?;
        let d = v
            .disks
            .iter_mut()
            .find(|d| d.key == key)
            .ok_or_else(|| Error::Control(format!("{vm} has no disk {key}")))?;
        if size < d.capacity {
            return Err(Error::Control("vSphere does not shrink disks".into()));
        }
        store::create(&self.dirs.image(&d.image), size)?;
        d.capacity = size;
        self.save(&w)
    }

    /// CBT reset on every disk of `vm` (storage migration, the KB2139574
    /// procedure, a crash): a new epoch, older changeIds refused.
    pub fn reset_cbt(&self, vm: &str) -> Result<()> {
        let mut w = self.lock();
        let v = w.state.vm_mut(vm).map_err(control)?;
        for d in &mut v.disks {
            if d.cbt.active {
                d.cbt.reset();
            }
        }
        self.save(&w)
    }

    /// Every session ends now.
    pub fn expire_sessions(&self) {
        self.lock().sessions.clear();
    }

    /// Sessions end after `calls` more authenticated calls.
    pub fn expire_sessions_after(&self, calls: u32) {
        self.lock().faults.expire_after_calls = Some(calls);
    }

    /// The next task of `method` fails with `fault` (`SnapshotFault`,
    /// `FileFault`...).
    pub fn fail_next_task(&self, method: &str, fault: &str) {
        self.lock().faults.fail_task = Some((
            method.to_owned(),
            SimFault::new(fault, format!("simulated {fault} in {method}")),
        ));
    }

    /// The next changed-areas query answers `FileFault` (files not accessible).
    pub fn fail_next_query(&self) {
        self.lock().faults.fail_query = Some(SimFault::file_fault("[datastore1] (simulated)"));
    }

    /// Every answer waits `delay`.
    pub fn set_slow(&self, delay: Duration) {
        self.lock().faults.slow = delay;
    }

    /// NBD reads fail after `bytes` more bytes (a dropped data path).
    pub fn fail_nbd_after(&self, bytes: u64) {
        self.lock().faults.nbd_fail_after = Some(bytes);
    }

    /// Clears every injected fault.
    pub fn clear_faults(&self) {
        let mut w = self.lock();
        let queries = w.faults.queries;
        w.faults = Faults {
            queries,
            ..Faults::default()
        };
    }

    /// Changed-areas queries answered so far.
    pub fn queries(&self) -> u64 {
        self.lock().faults.queries
    }

    /// Most extents per answer from now on.
    pub fn set_page_extents(&self, n: usize) {
        self.behaviour
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shape
            .page_extents = n.max(1);
    }

    /// Rounds answers out to `bytes` (false positives on purpose).
    pub fn set_granularity(&self, bytes: u64) {
        self.behaviour
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shape
            .granularity = bytes;
    }

    /// Turns CBT support off for `vm` (old virtual hardware).
    pub fn set_cbt_supported(&self, vm: &str, supported: bool) -> Result<()> {
        let mut w = self.lock();
        w.state.vm_mut(vm).map_err(control)?.cbt_supported = supported;
        self.save(&w)
    }
}
