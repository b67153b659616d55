//! The control surface: what a test does to the pool that a XenAPI client
//! cannot (guest writes, plugging disks, faults). Available as `sim.*`
//! RPCs (session first, like every call; refs as elsewhere) and as
//! methods of [`Sim`] taking UUIDs.
//!
//! | RPC | parameters | result |
//! |---|---|---|
//! | `sim.write_blocks` | VDI, block indexes, seed | `""` |
//! | `sim.churn` | VDI, count, seed | the blocks written |
//! | `sim.write` | VDI, offset, base64 data | `""` |
//! | `sim.read` | VDI, offset, length | base64 data |
//! | `sim.plug` / `sim.unplug` | VDI, VM / VDI | VBD / `""` |
//! | `sim.resize` | VDI, size | `""` |
//! | `sim.fault_cbt_disable` | VDI | `""` |
//! | `sim.fault_cbt_bypass` | VDI, offset, base64 data | `""` (a guest write the CBT log misses) |
//! | `sim.expire_sessions` | – | number expired |
//! | `sim.fault_nbd_disconnect` | bytes | `""` |
//! | `sim.fault_nbd_break_one_vdi` | bytes | `""` |
//! | `sim.fault_data_destroy_in_use` | – | `""` |
//! | `sim.fault_slow` | delay in ms, calls (0: all) | `""` |
//! | `sim.clear_faults` | – | `""` |
//! | `sim.nbd_connections` | – | open NBD connections |
//! | `sim.set_password` | password | `""` (sessions stay) |
//! | `sim.login_attempts` | – | `[tried, refused]` since start |
//! | `sim.set_sr_type` | SR, type ([`crate::SR_TYPES`]) | `""` |
//! | `sim.set_licensed` | CBT licensed (bool) | `""` |
//! | `sim.set_managed` | VDI, managed (bool) | `""` |
//! | `sim.set_raw` | VDI | `""` (a RAW VDI, CBT off) |
//! | `sim.set_sr_size` | SR, bytes | `""` (`VDI.create` beyond it: `SR_BACKEND_FAILURE_44`) |
//! | `sim.fault_import_break` | uploads, bytes | `""` (after that many uploads, the next breaks after the bytes) |

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use cbtvault_blockmap::{BLOCK_SIZE, block_count};
use cbtvault_xenapi::{Value, XapiError};
use rand::SeedableRng;
use rand::seq::index::sample;

use crate::dispatch::{arity, int, text};
use crate::error::Result;
use crate::sim::{Sim, internal};
use crate::store::{block_content, block_len};
use crate::vdi::{handle_invalid, vdi, vdi_ref_by_uuid};

/// Most bytes one `sim.read` call returns (the reply is base64 in one
/// XML or JSON document).
const MAX_READ: usize = 64 << 20;

/// A VDI as listed by [`Sim::vdis`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VdiSummary {
    /// Reference.
    pub r#ref: String,
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name_label: String,
    /// Type.
    pub vdi_type: String,
    /// Size.
    pub virtual_size: u64,
    /// Snapshot.
    pub is_a_snapshot: bool,
    /// CBT enabled.
    pub cbt_enabled: bool,
    /// Has a CBT log.
    pub has_cbt_log: bool,
    /// UUIDs of the VMs with a VBD to it.
    pub vms: Vec<String>,
}

/// A VM as listed by [`Sim::vms`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSummary {
    /// Reference.
    pub r#ref: String,
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name_label: String,
    /// Snapshot.
    pub is_a_snapshot: bool,
    /// Control domain.
    pub is_control_domain: bool,
    /// UUIDs of its VDIs, by VBD position.
    pub vdis: Vec<String>,
}

pub(crate) async fn run(
    sim: &Sim,
    _session: &str,
    op: &str,
    args: Vec<Value>,
) -> Result<Value, XapiError> {
    let method = format!("sim.{op}");
    let sim = sim.clone();
    let op = op.to_owned();
    tokio::task::spawn_blocking(move || run_blocking(&sim, &method, &op, &args))
        .await
        .map_err(internal)?
}

fn run_blocking(sim: &Sim, method: &str, op: &str, args: &[Value]) -> Result<Value, XapiError> {
    let a = |n: usize| arity(method, args, n);
    let empty = || Ok(Value::from(""));
    let uint = |i: usize| {
        u64::try_from(int(args, i)?).map_err(|_| XapiError::Other {
            code: "FIELD_TYPE_ERROR".into(),
            params: vec![format!("parameter {}", i + 2)],
        })
    };
    match op {
        "write_blocks" => {
            a(3)?;
            let blocks = args[1]
                .as_array()
                .ok_or_else(|| XapiError::Other {
                    code: "FIELD_TYPE_ERROR".into(),
                    params: vec!["blocks".into()],
                })?
                .iter()
                .map(|b| b.as_i64().and_then(|i| u64::try_from(i).ok()))
                .collect::<Option<Vec<u64>>>()
                .ok_or_else(|| XapiError::Other {
                    code: "FIELD_TYPE_ERROR".into(),
                    params: vec!["blocks".into()],
                })?;
            write_blocks(sim, &text(args, 0)?, &blocks, uint(2)?)?;
            empty()
        }
        "churn" => {
            a(3)?;
            let blocks = churn(sim, &text(args, 0)?, uint(1)?, uint(2)?)?;
            Ok(Value::Array(
                blocks.into_iter().map(|b| Value::Int(b as i64)).collect(),
            ))
        }
        "write" => {
            a(3)?;
            let data = STANDARD
                .decode(text(args, 2)?.trim())
                .map_err(|e| internal(format!("bad base64: {e}")))?;
            sim.vdi_write(&text(args, 0)?, uint(1)?, &data)?;
            empty()
        }
        "fault_cbt_bypass" => {
            a(3)?;
            let data = STANDARD
                .decode(text(args, 2)?.trim())
                .map_err(|e| internal(format!("bad base64: {e}")))?;
            sim.guest_write(&text(args, 0)?, [(uint(1)?, data)], false)?;
            empty()
        }
        "read" => {
            a(3)?;
            let len = usize::try_from(uint(2)?).map_err(internal)?;
            if len > MAX_READ {
                return Err(XapiError::OperationNotAllowed {
                    reason: format!("read of {len} bytes: one call returns at most {MAX_READ}"),
                });
            }
            let data = read(sim, &text(args, 0)?, uint(1)?, len)?;
            Ok(Value::String(STANDARD.encode(data)))
        }
        "plug" => {
            a(2)?;
            sim.plug_vdi(&text(args, 0)?, &text(args, 1)?)
                .map(Value::String)
        }
        "unplug" => {
            a(1)?;
            sim.unplug_vdi(&text(args, 0)?)?;
            empty()
        }
        "resize" => {
            a(2)?;
            sim.vdi_resize(&text(args, 0)?, uint(1)?, true)
        }
        "fault_cbt_disable" => {
            a(1)?;
            cbt_auto_disable(sim, &text(args, 0)?)?;
            empty()
        }
        "expire_sessions" => {
            a(0)?;
            Ok(Value::Int(sim.sessions().expire_all() as i64))
        }
        "fault_nbd_disconnect" => {
            a(1)?;
            sim.faults().nbd_disconnect_after = Some(uint(0)?);
            empty()
        }
        "fault_nbd_break_one_vdi" => {
            a(1)?;
            sim.fault_nbd_break_one_vdi(uint(0)?);
            empty()
        }
        "fault_data_destroy_in_use" => {
            a(0)?;
            sim.faults().data_destroy_in_use += 1;
            empty()
        }
        "fault_slow" => {
            a(2)?;
            let calls = u32::try_from(uint(1)?).unwrap_or(u32::MAX);
            sim.fault_slow(
                Duration::from_millis(uint(0)?),
                (calls > 0).then_some(calls),
            );
            empty()
        }
        "clear_faults" => {
            a(0)?;
            sim.clear_faults();
            empty()
        }
        "nbd_connections" => {
            a(0)?;
            Ok(Value::Int(
                sim.inner.nbd_connections.load(Ordering::SeqCst) as i64
            ))
        }
        "set_sr_type" => {
            a(2)?;
            set_sr_type(sim, &text(args, 0)?, &text(args, 1)?)?;
            empty()
        }
        "set_licensed" => {
            a(1)?;
            sim.set_cbt_licensed(flag(args, 0)?)
                .map_err(|e| internal(e.to_string()))?;
            empty()
        }
        "set_managed" => {
            a(2)?;
            set_vdi(sim, &text(args, 0)?, |v| {
                v.managed = flag(args, 1).unwrap_or(true)
            })?;
            empty()
        }
        "set_raw" => {
            a(1)?;
            make_raw(sim, &text(args, 0)?)?;
            empty()
        }
        "set_password" => {
            a(1)?;
            sim.set_password(&text(args, 0)?);
            empty()
        }
        "set_sr_size" => {
            a(2)?;
            let (sr, size) = (text(args, 0)?, uint(1)?);
            sim.mutate(|db, _| {
                let rec = db
                    .srs
                    .get_mut(&sr)
                    .ok_or_else(|| handle_invalid("SR", &sr))?;
                rec.physical_size = size;
                Ok(())
            })?;
            empty()
        }
        "fault_import_break" => {
            a(2)?;
            let (uploads, bytes) = (uint(0)?, uint(1)?);
            sim.faults().import_break = Some((u32::try_from(uploads).unwrap_or(u32::MAX), bytes));
            empty()
        }
        "login_attempts" => {
            a(0)?;
            let (tried, refused) = sim.login_attempts();
            Ok(Value::Array(vec![
                Value::Int(tried as i64),
                Value::Int(refused as i64),
            ]))
        }
        _ => Err(XapiError::MessageMethodUnknown {
            method: method.into(),
        }),
    }
}

fn flag(args: &[Value], i: usize) -> Result<bool, XapiError> {
    args.get(i)
        .and_then(Value::as_bool)
        .ok_or_else(|| XapiError::Other {
            code: "FIELD_TYPE_ERROR".into(),
            params: vec![format!("parameter {}", i + 1)],
        })
}

fn set_sr_type(sim: &Sim, sr: &str, sr_type: &str) -> Result<(), XapiError> {
    if crate::sr::kind(sr_type).is_none() {
        return Err(XapiError::OperationNotAllowed {
            reason: format!(
                "unknown SR type {sr_type:?}; the simulator models {}",
                crate::sr::SR_TYPES.join(", ")
            ),
        });
    }
    sim.mutate(|db, _| {
        let rec = db.srs.get_mut(sr).ok_or_else(|| handle_invalid("SR", sr))?;
        rec.sr_type = sr_type.into();
        Ok(())
    })
}

fn set_vdi(sim: &Sim, r: &str, f: impl FnOnce(&mut crate::model::VdiRec)) -> Result<(), XapiError> {
    sim.mutate(|db, _| {
        f(db.vdis.get_mut(r).ok_or_else(|| handle_invalid("VDI", r))?);
        Ok(())
    })
}

/// A RAW VDI, as an LVM SR makes with `sm_config:type=raw`: no VHD, so
/// no CBT log (one that existed goes).
fn make_raw(sim: &Sim, r: &str) -> Result<(), XapiError> {
    sim.mutate(|db, _| {
        let v = db.vdis.get_mut(r).ok_or_else(|| handle_invalid("VDI", r))?;
        v.sm_config.insert("type".into(), "raw".into());
        v.cbt_enabled = false;
        let uuid = v.uuid.clone();
        db.cbt.disable(&uuid);
        Ok(())
    })
}

fn write_blocks(sim: &Sim, r: &str, blocks: &[u64], seed: u64) -> Result<(), XapiError> {
    let size = vdi(&sim.db(), r)?.virtual_size;
    if let Some(b) = blocks.iter().find(|&&b| b >= block_count(size)) {
        return Err(XapiError::OperationNotAllowed {
            reason: format!("block {b} is past the end of {r}"),
        });
    }
    sim.vdi_write_many(
        r,
        blocks
            .iter()
            .map(|&b| (b * BLOCK_SIZE, block_content(seed, b, block_len(size, b)))),
    )
}

fn churn(sim: &Sim, r: &str, count: u64, seed: u64) -> Result<Vec<u64>, XapiError> {
    let blocks = block_count(vdi(&sim.db(), r)?.virtual_size);
    let count = count.min(blocks);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut chosen: Vec<u64> = sample(&mut rng, blocks as usize, count as usize)
        .into_iter()
        .map(|b| b as u64)
        .collect();
    chosen.sort_unstable();
    write_blocks(sim, r, &chosen, seed)?;
    Ok(chosen)
}

fn read(sim: &Sim, r: &str, offset: u64, len: usize) -> Result<Vec<u8>, XapiError> {
    let (uuid, has_data, size) = {
        let db = sim.db();
        let v = vdi(&db, r)?;
        (v.uuid.clone(), v.has_data, v.virtual_size)
    };
    if !has_data {
        return Err(XapiError::VdiIncompatibleType {
            vdi: r.into(),
            vdi_type: "cbt_metadata".into(),
        });
    }
    let len = len.min(size.saturating_sub(offset) as usize);
    let mut buf = vec![0u8; len];
    sim.store()
        .read_at(&uuid, offset, &mut buf)
        .map_err(internal)?;
    Ok(buf)
}

/// The storage manager disabling CBT by itself (an inconsistent log after
/// a crash, a failed log resize): the log is deleted and `cbt_enabled`
/// cleared without any call from a client.
fn cbt_auto_disable(sim: &Sim, r: &str) -> Result<(), XapiError> {
    sim.mutate(|db, _| {
        let uuid = vdi(db, r)?.uuid.clone();
        db.cbt.disable(&uuid);
        if let Some(v) = db.vdis.get_mut(r) {
            v.cbt_enabled = false;
        }
        tracing::info!("fault: CBT silently disabled on VDI {uuid}");
        Ok(())
    })
}

impl Sim {
    /// Reference of the VDI with `uuid`.
    pub fn vdi_ref(&self, uuid: &str) -> Result<String> {
        Ok(vdi_ref_by_uuid(&self.db(), uuid)?)
    }

    fn vm_ref(&self, uuid: &str) -> Result<String> {
        let db = self.db();
        Ok(db
            .vms
            .iter()
            .find(|(_, v)| v.uuid == uuid)
            .map(|(r, _)| r.clone())
            .ok_or_else(|| handle_invalid("VM", uuid))?)
    }

    /// Writes seeded pseudo-random data into whole `blocks` of a VDI, as a
    /// guest would, marking them in its CBT log.
    pub fn write_blocks(&self, vdi_uuid: &str, blocks: &[u64], seed: u64) -> Result<()> {
        Ok(write_blocks(self, &self.vdi_ref(vdi_uuid)?, blocks, seed)?)
    }

    /// Writes `count` distinct blocks chosen at random from `seed`;
    /// returns them, ascending.
    pub fn churn(&self, vdi_uuid: &str, count: u64, seed: u64) -> Result<Vec<u64>> {
        Ok(churn(self, &self.vdi_ref(vdi_uuid)?, count, seed)?)
    }

    /// Writes `data` at `offset` of a VDI, marking every block it touches.
    pub fn write(&self, vdi_uuid: &str, offset: u64, data: &[u8]) -> Result<()> {
        Ok(self.vdi_write(&self.vdi_ref(vdi_uuid)?, offset, data)?)
    }

    /// Reads `len` bytes at `offset` of a VDI (or snapshot with data).
    pub fn read(&self, vdi_uuid: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        Ok(read(self, &self.vdi_ref(vdi_uuid)?, offset, len)?)
    }

    /// Plugs a VDI into a running VM.
    pub fn plug(&self, vdi_uuid: &str, vm_uuid: &str) -> Result<()> {
        let vm = self.vm_ref(vm_uuid)?;
        self.plug_vdi(&self.vdi_ref(vdi_uuid)?, &vm)?;
        Ok(())
    }

    /// Unplugs a VDI from every guest VM.
    pub fn unplug(&self, vdi_uuid: &str) -> Result<()> {
        Ok(self.unplug_vdi(&self.vdi_ref(vdi_uuid)?)?)
    }

    /// Grows a VDI (online); its CBT log is zero-extended.
    pub fn resize(&self, vdi_uuid: &str, size: u64) -> Result<()> {
        self.vdi_resize(&self.vdi_ref(vdi_uuid)?, size, true)?;
        Ok(())
    }

    /// Fault: the storage manager silently disables CBT on a VDI.
    pub fn fault_cbt_disable(&self, vdi_uuid: &str) -> Result<()> {
        Ok(cbt_auto_disable(self, &self.vdi_ref(vdi_uuid)?)?)
    }

    /// Fault: a guest write of `data` at `offset` that the VDI's CBT log
    /// misses (as a storage manager that under-reports changes would), so
    /// `VDI.list_changed_blocks` leaves its blocks out.
    pub fn fault_cbt_bypass(&self, vdi_uuid: &str, offset: u64, data: &[u8]) -> Result<()> {
        Ok(self.guest_write(&self.vdi_ref(vdi_uuid)?, [(offset, data.to_vec())], false)?)
    }

    /// Fault: every session expires. Returns how many there were.
    pub fn expire_sessions(&self) -> usize {
        self.sessions().expire_all()
    }

    /// Fault: the next NBD connection breaks after `bytes` bytes of reads.
    pub fn fault_nbd_disconnect_after(&self, bytes: u64) {
        self.faults().nbd_disconnect_after = Some(bytes);
    }

    /// Fault: every NBD connection to the next VDI exported breaks after
    /// `bytes` bytes of reads, however often the client reconnects; the
    /// VDI exported after it is served whole again.
    pub fn fault_nbd_break_one_vdi(&self, bytes: u64) {
        self.faults().nbd_break_one_vdi = Some((bytes, None));
    }

    /// Fault: the next `VDI.data_destroy` waits its timeout and fails with
    /// `VDI_IN_USE`, as when a dom0 VBD lingers.
    pub fn fault_data_destroy_in_use(&self) {
        self.faults().data_destroy_in_use += 1;
    }

    /// Fault: the next `calls` API calls (all if `None`) answer `delay` late.
    pub fn fault_slow(&self, delay: Duration, calls: Option<u32>) {
        self.faults().slow = (!delay.is_zero()).then_some((delay, calls));
    }

    /// Clears every pending fault.
    pub fn clear_faults(&self) {
        *self.faults() = crate::sim::Faults::default();
    }

    /// Open NBD connections.
    pub fn nbd_connections(&self) -> usize {
        self.inner.nbd_connections.load(Ordering::SeqCst)
    }

    /// The most NBD connections that were open at once since the start.
    pub fn nbd_connections_peak(&self) -> usize {
        self.inner.nbd_connections_peak.load(Ordering::SeqCst)
    }

    /// The last `/import_raw_vdi` upload that finished (or failed): body
    /// bytes received, and 512-byte sectors written to the VDI.
    pub fn last_import(&self) -> (u64, u64) {
        *self
            .inner
            .last_import
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the SR holding VDI `vdi_uuid` of type `sr_type` (one of
    /// [`crate::SR_TYPES`]): `nocbt` has no changed-block tracking,
    /// `dummy` keeps sizes exact.
    pub fn set_sr_type_of(&self, vdi_uuid: &str, sr_type: &str) -> Result<()> {
        let r = self.vdi_ref(vdi_uuid)?;
        let sr = vdi(&self.db(), &r)?.sr.clone();
        Ok(set_sr_type(self, &sr, sr_type)?)
    }

    /// Whether the pool's licence allows CBT (`LICENCE_RESTRICTION` from
    /// `VDI.enable_cbt` if not).
    pub fn set_cbt_licensed(&self, licensed: bool) -> Result<()> {
        Ok(self.mutate(|db, _| {
            db.pool.cbt_licensed = licensed;
            Ok(())
        })?)
    }

    /// Marks a VDI managed or not (`VDI_NOT_MANAGED` if not).
    pub fn set_managed(&self, vdi_uuid: &str, managed: bool) -> Result<()> {
        Ok(set_vdi(self, &self.vdi_ref(vdi_uuid)?, |v| {
            v.managed = managed
        })?)
    }

    /// Makes a VDI RAW (`SR_BACKEND_FAILURE_66` from `VDI.enable_cbt`).
    pub fn set_raw(&self, vdi_uuid: &str) -> Result<()> {
        Ok(make_raw(self, &self.vdi_ref(vdi_uuid)?)?)
    }

    /// Sets the capacity of the SR with `sr_uuid` (`VDI.create` beyond it
    /// fails as a full SR does).
    pub fn set_sr_size(&self, sr_uuid: &str, size: u64) -> Result<()> {
        Ok(self.mutate(|db, _| {
            let rec = db
                .srs
                .values_mut()
                .find(|s| s.uuid == sr_uuid)
                .ok_or_else(|| handle_invalid("SR", sr_uuid))?;
            rec.physical_size = size;
            Ok(())
        })?)
    }

    /// Fault: after `uploads` successful `/import_raw_vdi` uploads, the
    /// next one fails once `bytes` bytes of it are written.
    pub fn fault_import_break(&self, uploads: u32, bytes: u64) {
        self.faults().import_break = Some((uploads, bytes));
    }

    /// Changes the password that logs in (live sessions stay valid), as
    /// an administrator changing root's password does.
    pub fn set_password(&self, password: &str) {
        *self.password() = password.to_owned();
    }

    /// Logins tried since start, and how many of them were refused.
    pub fn login_attempts(&self) -> (u64, u64) {
        (
            self.inner.logins.load(Ordering::SeqCst),
            self.inner.failed_logins.load(Ordering::SeqCst),
        )
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        self.sessions().count()
    }

    /// All VDIs.
    pub fn vdis(&self) -> Vec<VdiSummary> {
        let db = self.db();
        db.vdis
            .iter()
            .map(|(r, v)| VdiSummary {
                r#ref: r.clone(),
                uuid: v.uuid.clone(),
                name_label: v.name_label.clone(),
                vdi_type: v.vdi_type.clone(),
                virtual_size: v.virtual_size,
                is_a_snapshot: v.is_a_snapshot,
                cbt_enabled: v.cbt_enabled,
                has_cbt_log: db.cbt.has(&v.uuid),
                vms: db
                    .vbds
                    .values()
                    .filter(|b| &b.vdi == r)
                    .filter_map(|b| db.vms.get(&b.vm).map(|m| m.uuid.clone()))
                    .collect(),
            })
            .collect()
    }

    /// All VMs (guests, snapshots and dom0).
    pub fn vms(&self) -> Vec<VmSummary> {
        let db = self.db();
        db.vms
            .iter()
            .map(|(r, m)| {
                let mut vbds: Vec<_> = db.vbds.values().filter(|b| &b.vm == r && !b.nbd).collect();
                vbds.sort_by(|a, b| a.userdevice.cmp(&b.userdevice));
                VmSummary {
                    r#ref: r.clone(),
                    uuid: m.uuid.clone(),
                    name_label: m.name_label.clone(),
                    is_a_snapshot: m.is_a_snapshot,
                    is_control_domain: m.is_control_domain,
                    vdis: vbds
                        .iter()
                        .filter_map(|b| db.vdis.get(&b.vdi).map(|v| v.uuid.clone()))
                        .collect(),
                }
            })
            .collect()
    }
}
