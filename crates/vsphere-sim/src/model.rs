//! The simulated inventory: VMs with disks, their snapshots, First Class
//! Disks on datastores, and what each disk's tracking knows. Kept in
//! `STATE/state.json` (rewritten whole, through a temporary file, after
//! every change); disk bytes live in sparse images beside it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cbt::Cbt;
use crate::error::{Error, Result};
use crate::fault::SimFault;
use crate::store;

/// A VM's virtual disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Disk {
    pub key: i32,
    /// `[datastore1] web/web.vmdk`
    pub base_file: String,
    /// Snapshots taken: the running disk is then `web-00000K.vmdk`.
    pub delta: u32,
    /// Image file name in the state directory.
    pub image: String,
    pub capacity: u64,
    pub object_id: String,
    pub cbt: Cbt,
}

impl Disk {
    /// The running disk's file: the head of its delta chain.
    pub fn file_name(&self) -> String {
        if self.delta == 0 {
            return self.base_file.clone();
        }
        let stem = self.base_file.trim_end_matches(".vmdk");
        format!("{stem}-{:06}.vmdk", self.delta)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Vm {
    pub name: String,
    pub uuid: String,
    pub powered_on: bool,
    /// Virtual hardware 7 or later.
    pub cbt_supported: bool,
    /// `config.changeTrackingEnabled` (effective per disk at the next stun).
    pub cbt_enabled: bool,
    pub disks: Vec<Disk>,
    /// Snapshot moIds, oldest first (a chain: each the child of the last).
    pub snapshots: Vec<String>,
}

/// One disk frozen in a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapDisk {
    pub key: i32,
    pub image: String,
    pub capacity: u64,
    pub file_name: String,
    pub change_id: Option<String>,
    pub generation: u64,
    pub object_id: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub vm: String,
    pub name: String,
    pub description: String,
    pub created: String,
    pub quiesced: bool,
    pub disks: Vec<SnapDisk>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FcdSnap {
    pub description: String,
    pub image: String,
    pub capacity: u64,
    pub change_id: Option<String>,
    pub generation: u64,
    pub created: String,
}

/// A First Class Disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FcdDisk {
    pub name: String,
    pub datastore: String,
    pub capacity: u64,
    pub image: String,
    /// The `enableChangedBlockTracking` control flag.
    pub cbt_flag: bool,
    pub cbt: Cbt,
    pub snapshots: BTreeMap<String, FcdSnap>,
}

/// Everything that survives a restart.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub next: u64,
    pub vms: BTreeMap<String, Vm>,
    pub snapshots: BTreeMap<String, Snapshot>,
    pub fcds: BTreeMap<String, FcdDisk>,
    /// moId → name.
    pub datastores: BTreeMap<String, String>,
}

const STATE_FILE: &str = "state.json";

impl State {
    pub fn load(dir: &Path) -> Result<Option<State>> {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| Error::StateFormat { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::State { path, source }),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join("state.json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| Error::StateFormat {
            path: path.clone(),
            source,
        })?;
        let io = |source| Error::State {
            path: path.clone(),
            source,
        };
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    pub fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    pub fn vm(&self, vm: &str) -> Result<&Vm, SimFault> {
        self.vms
            .get(vm)
            .ok_or_else(|| SimFault::object_not_found("VirtualMachine", vm))
    }

    pub fn vm_mut(&mut self, vm: &str) -> Result<&mut Vm, SimFault> {
        self.vms
            .get_mut(vm)
            .ok_or_else(|| SimFault::object_not_found("VirtualMachine", vm))
    }

    pub fn fcd_mut(&mut self, id: &str, datastore: &str) -> Result<&mut FcdDisk, SimFault> {
        if !self.datastores.contains_key(datastore) {
            return Err(SimFault::invalid_datastore(datastore));
        }
        match self.fcds.get_mut(id) {
            Some(f) if f.datastore == datastore => Ok(f),
            Some(_) => Err(SimFault::not_found(&format!("disk {id} on {datastore}"))),
            None => Err(SimFault::not_found(&format!("disk {id}"))),
        }
    }

    /// The name of a datastore, for `[name] path` file names.
    pub fn datastore_name(&self, ds: &str) -> String {
        self.datastores
            .get(ds)
            .cloned()
            .unwrap_or_else(|| ds.to_owned())
    }
}

/// What a new simulated VM has.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub name: String,
    /// Disk sizes in bytes.
    pub disks: Vec<u64>,
    pub powered_on: bool,
    pub cbt_supported: bool,
    /// CBT already on (as after an earlier backup product).
    pub cbt_enabled: bool,
}

/// What a new simulated FCD has.
#[derive(Clone, Debug)]
pub struct FcdSpec {
    pub name: String,
    pub size: u64,
}

/// The paths of the state directory.
#[derive(Clone, Debug)]
pub struct Dirs {
    pub root: PathBuf,
}

impl Dirs {
    pub fn image(&self, name: &str) -> PathBuf {
        self.root.join("images").join(name)
    }
}

fn uuid_like(n: u64, salt: u64) -> String {
    let h = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (h >> 32) as u32,
        (h >> 16) as u16,
        (h & 0xfff) as u16,
        ((h >> 20) & 0xfff) as u16,
        h & 0xffff_ffff_ffff
    )
}

/// Builds the first inventory: one datastore, the VMs and FCDs asked for.
pub fn seed(dirs: &Dirs, vms: &[VmSpec], fcds: &[FcdSpec]) -> Result<State> {
    std::fs::create_dir_all(dirs.root.join("images")).map_err(|source| Error::State {
        path: dirs.root.clone(),
        source,
    })?;
    let mut s = State::default();
    s.datastores
        .insert("datastore-11".into(), "datastore1".into());
    for spec in vms {
        let id = format!("vm-{}", s.next_id() + 40);
        let mut disks = Vec::new();
        for (i, &size) in spec.disks.iter().enumerate() {
            let key = 2000 + i as i32;
            let image = format!("{id}-{key}.img");
            store::create(&dirs.image(&image), size)?;
            let suffix = if i == 0 {
                String::new()
            } else {
                format!("_{i}")
            };
            let mut cbt = Cbt::default();
            if spec.cbt_enabled {
                cbt.reset();
            }
            disks.push(Disk {
                key,
                base_file: format!("[datastore1] {0}/{0}{suffix}.vmdk", spec.name),
                delta: 0,
                image,
                capacity: size,
                object_id: format!("{}-{key}", s.next),
                cbt,
            });
        }
        s.vms.insert(
            id,
            Vm {
                name: spec.name.clone(),
                uuid: uuid_like(s.next, 0x5a5a),
                powered_on: spec.powered_on,
                cbt_supported: spec.cbt_supported,
                cbt_enabled: spec.cbt_enabled,
                disks,
                snapshots: Vec::new(),
            },
        );
    }
    for spec in fcds {
        let n = s.next_id();
        let id = uuid_like(n, 0xfcd);
        let image = format!("fcd-{id}.img");
        store::create(&dirs.image(&image), spec.size)?;
        s.fcds.insert(
            id,
            FcdDisk {
                name: spec.name.clone(),
                datastore: "datastore-11".into(),
                capacity: spec.size,
                image,
                cbt_flag: false,
                cbt: Cbt::default(),
                snapshots: BTreeMap::new(),
            },
        );
    }
    Ok(s)
}

pub fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// A FCD snapshot id (vcsim makes UUIDs too).
pub fn fcd_snapshot_id(n: u64) -> String {
    uuid_like(n, 0x5a)
}
