//! `VDI.*` operations with xapi's checks, in xapi's order
//! (`xapi_vdi.ml` `check_operation_error`, then the operation), and the
//! storage manager's CBT behaviour (`cbt.rs`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cbtvault_xenapi::{NULL_REF, Value, XapiError};

use crate::cbt::ChainError;
use crate::certs::SUBJECT;
use crate::model::{Db, VdiRec, new_ref, new_uuid, now_datetime};
use crate::sim::{Sim, internal, new_vdi};
use crate::store::Store;

const CBT_METADATA: &str = "cbt_metadata";
/// Largest VDI (16 TiB, the limit of XenServer's QCOW2 SRs). Beyond it a
/// client could make the simulator allocate a changed-block bitmap of
/// terabytes.
const MAX_VDI_SIZE: u64 = 16 << 40;

/// What the storage manager answers for a size it cannot make.
fn invalid_size(detail: &str) -> XapiError {
    XapiError::SrBackendFailure {
        code: 79,
        status: String::new(),
        stdout: format!("VDI Invalid size [opterr={detail}]"),
        stderr: String::new(),
    }
}

fn check_size(size: u64) -> Result<(), XapiError> {
    if size > MAX_VDI_SIZE {
        return Err(invalid_size("VDI size must be at most 16 TiB"));
    }
    Ok(())
}

pub(crate) fn handle_invalid(class: &str, r: &str) -> XapiError {
    XapiError::HandleInvalid {
        class: class.into(),
        handle: r.into(),
    }
}

pub(crate) fn vdi<'a>(db: &'a Db, r: &str) -> Result<&'a VdiRec, XapiError> {
    db.vdis.get(r).ok_or_else(|| handle_invalid("VDI", r))
}

fn vdi_mut<'a>(db: &'a mut Db, r: &str) -> Result<&'a mut VdiRec, XapiError> {
    db.vdis.get_mut(r).ok_or_else(|| handle_invalid("VDI", r))
}

/// `VDI_INCOMPATIBLE_TYPE [vdi, "cbt_metadata"]` for operations refused on
/// `cbt_metadata` VDIs.
pub(crate) fn refuse_cbt_metadata(v: &VdiRec, r: &str) -> Result<(), XapiError> {
    if v.vdi_type == CBT_METADATA {
        return Err(XapiError::VdiIncompatibleType {
            vdi: r.into(),
            vdi_type: CBT_METADATA.into(),
        });
    }
    Ok(())
}

/// `VDI_NOT_MANAGED [vdi]`, xapi's first check for a VDI its SR does not
/// manage (`xapi_vdi.ml` `check_operation_error`).
pub(crate) fn refuse_unmanaged(v: &VdiRec, r: &str) -> Result<(), XapiError> {
    if !v.managed {
        return Err(XapiError::Other {
            code: "VDI_NOT_MANAGED".into(),
            params: vec![r.into()],
        });
    }
    Ok(())
}

/// `SR_OPERATION_NOT_SUPPORTED [sr]` if the VDI's SR has no CBT
/// (`VDI_CONFIG_CBT` missing from the driver's features).
fn refuse_without_cbt(db: &Db, v: &VdiRec) -> Result<(), XapiError> {
    let cbt = db
        .srs
        .get(&v.sr)
        .and_then(|sr| crate::sr::kind(&sr.sr_type))
        .is_none_or(|k| k.cbt);
    if !cbt {
        return Err(XapiError::SrOperationNotSupported { sr: v.sr.clone() });
    }
    Ok(())
}

/// The SR's type, for sizes.
fn sr_type_of<'a>(db: &'a Db, sr: &str) -> &'a str {
    db.srs.get(sr).map_or("ext", |s| s.sr_type.as_str())
}

fn in_use(r: &str, op: &str) -> XapiError {
    XapiError::VdiInUse {
        vdi: r.into(),
        operation: op.into(),
    }
}

fn not_allowed(reason: String) -> XapiError {
    XapiError::OperationNotAllowed { reason }
}

fn changed_blocks_error(opterr: &str) -> XapiError {
    XapiError::SrBackendFailure {
        code: 460,
        status: String::new(),
        stdout: format!("Failed to calculate changed blocks for given VDIs. [opterr={opterr}]"),
        stderr: String::new(),
    }
}

/// Snapshots VDI `r` inside an open database: copies the data, moves the
/// CBT log, returns the new reference.
pub(crate) fn snapshot_in(db: &mut Db, store: &Store, r: &str) -> Result<String, XapiError> {
    let src = vdi(db, r)?.clone();
    refuse_unmanaged(&src, r)?;
    refuse_cbt_metadata(&src, r)?;
    if src.sharable {
        return Err(XapiError::Other {
            code: "VDI_IS_SHARABLE".into(),
            params: vec![r.into()],
        });
    }
    if src.on_boot == "reset" {
        return Err(XapiError::Other {
            code: "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION".into(),
            params: vec![],
        });
    }
    let uuid = new_uuid();
    if src.has_data {
        store.copy_sparse(&src.uuid, &uuid).map_err(internal)?;
    } else {
        store.create(&uuid, src.virtual_size).map_err(internal)?;
    }
    // The snapshot takes over the source's log, a snapshot's too (sm
    // `_cbt_snapshot`; FileSR marks the new VDI cbt_enabled).
    let cbt = src.cbt_enabled && db.cbt.snapshot(&src.uuid, &uuid);
    let snap = VdiRec {
        uuid: uuid.clone(),
        is_a_snapshot: true,
        snapshot_of: r.into(),
        snapshot_time: now_datetime(),
        cbt_enabled: cbt,
        physical_utilisation: store.allocated(&uuid),
        tags: Vec::new(),
        ..src
    };
    let snap_ref = new_ref();
    db.vdis.insert(snap_ref.clone(), snap);
    Ok(snap_ref)
}

/// A new VDI holding a copy of `r`'s data on SR `sr`: a plain disk (no
/// snapshot, no CBT, no tags), sized as that SR makes sizes.
fn duplicate_in(db: &mut Db, store: &Store, r: &str, sr: &str) -> Result<String, XapiError> {
    let src = vdi(db, r)?.clone();
    refuse_unmanaged(&src, r)?;
    refuse_cbt_metadata(&src, r)?;
    if !db.srs.contains_key(sr) {
        return Err(handle_invalid("SR", sr));
    }
    let size = crate::sr::round_size(sr_type_of(db, sr), src.virtual_size);
    let uuid = new_uuid();
    store.copy_sparse(&src.uuid, &uuid).map_err(internal)?;
    store.resize(&uuid, size).map_err(internal)?;
    let mut copy = new_vdi(sr, &src.name_label, size);
    copy.uuid = uuid.clone();
    copy.physical_utilisation = store.allocated(&uuid);
    copy.name_description = src.name_description;
    copy.vdi_type = src.vdi_type;
    copy.other_config = src.other_config;
    let copy_ref = new_ref();
    db.vdis.insert(copy_ref.clone(), copy);
    Ok(copy_ref)
}

/// `SR_BACKEND_FAILURE_44 ["", "There is insufficient space", ""]`, what
/// the storage manager answers when an SR cannot hold a new VDI (xapi's
/// own `SR_FULL` is not what `VDI.create` returns). The simulator counts
/// the SR as thick: the VDIs' virtual sizes against its `physical_size`.
fn check_space(db: &crate::model::Db, sr: &str, size: u64) -> Result<(), XapiError> {
    let capacity = db.srs.get(sr).map_or(0, |s| s.physical_size);
    let allocated: u64 = db
        .vdis
        .values()
        .filter(|v| v.sr == sr && v.has_data)
        .map(|v| v.virtual_size)
        .sum();
    if allocated.saturating_add(size) > capacity {
        return Err(XapiError::SrBackendFailure {
            code: 44,
            status: String::new(),
            stdout: "There is insufficient space".into(),
            stderr: String::new(),
        });
    }
    Ok(())
}

impl Sim {
    /// `VDI.clone(vdi, driver_params)`: a new VDI with the same data on
    /// the same SR (allowed while attached).
    pub(crate) fn vdi_clone(&self, r: &str) -> Result<Value, XapiError> {
        self.mutate(|db, store| {
            let sr = vdi(db, r)?.sr.clone();
            duplicate_in(db, store, r, &sr).map(Value::String)
        })
    }

    /// `VDI.copy(vdi, sr)`: refused while a read-write VBD is attached.
    pub(crate) fn vdi_copy(&self, r: &str, sr: &str) -> Result<Value, XapiError> {
        self.mutate(|db, store| {
            let v = vdi(db, r)?;
            refuse_unmanaged(v, r)?;
            if db.vdi_attached_rw(r) {
                return Err(in_use(r, "copy"));
            }
            duplicate_in(db, store, r, sr).map(Value::String)
        })
    }

    /// `VDI.snapshot`.
    pub(crate) fn vdi_snapshot(&self, r: &str) -> Result<Value, XapiError> {
        self.mutate(|db, store| snapshot_in(db, store, r).map(Value::String))
    }

    /// The checks of `enable_cbt` and `disable_cbt`, in xapi's order, then
    /// the storage manager's refusal of RAW VDIs.
    fn check_cbt_change(&self, db: &Db, r: &str) -> Result<(), XapiError> {
        let v = vdi(db, r)?;
        refuse_unmanaged(v, r)?;
        refuse_cbt_metadata(v, r)?;
        if v.is_a_snapshot {
            return Err(not_allowed(format!("VDI is a snapshot: {r}")));
        }
        if v.vdi_type != "user" && v.vdi_type != "system" {
            return Err(XapiError::VdiIncompatibleType {
                vdi: r.into(),
                vdi_type: v.vdi_type.clone(),
            });
        }
        if v.on_boot == "reset" {
            return Err(XapiError::Other {
                code: "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION".into(),
                params: vec![],
            });
        }
        refuse_without_cbt(db, v)
    }

    /// sm's `configure_blocktracking` on a RAW VDI: error 66, `VDIType`.
    fn refuse_raw(v: &VdiRec) -> Result<(), XapiError> {
        if v.is_raw() {
            return Err(XapiError::SrBackendFailure {
                code: 66,
                status: String::new(),
                stdout: "VDI type not supported [opterr=Raw VDI or snapshot not permitted]".into(),
                stderr: String::new(),
            });
        }
        Ok(())
    }

    /// `VDI.enable_cbt` (idempotent).
    pub(crate) fn vdi_enable_cbt(&self, r: &str) -> Result<Value, XapiError> {
        self.mutate(|db, _| {
            self.check_cbt_change(db, r)?;
            if !db.pool.cbt_licensed {
                return Err(XapiError::LicenceRestriction {
                    feature: "CBT".into(),
                });
            }
            Self::refuse_raw(vdi(db, r)?)?;
            let v = vdi_mut(db, r)?;
            if !v.cbt_enabled {
                v.cbt_enabled = true;
                let (uuid, size) = (v.uuid.clone(), v.virtual_size);
                db.cbt.enable(&uuid, size);
            }
            Ok(Value::from(""))
        })
    }

    /// `VDI.disable_cbt` (idempotent): deletes the leaf log, cutting the chain.
    pub(crate) fn vdi_disable_cbt(&self, r: &str) -> Result<Value, XapiError> {
        self.mutate(|db, _| {
            self.check_cbt_change(db, r)?;
            let v = vdi_mut(db, r)?;
            if v.cbt_enabled {
                v.cbt_enabled = false;
                let uuid = v.uuid.clone();
                db.cbt.disable(&uuid);
            }
            Ok(Value::from(""))
        })
    }

    /// `VDI.list_changed_blocks`.
    pub(crate) fn vdi_list_changed_blocks(&self, from: &str, to: &str) -> Result<Value, XapiError> {
        let db = self.db();
        let f = vdi(&db, from)?;
        let t = vdi(&db, to)?;
        // Only vdi_to goes through the operation check.
        refuse_unmanaged(t, to)?;
        if db.vdi_attached(to) {
            return Err(in_use(to, "list_changed_blocks"));
        }
        refuse_without_cbt(&db, t)?;
        match db.cbt.changed_blocks(&f.uuid, &t.uuid) {
            Ok(map) => Ok(Value::String(map.to_xenapi_base64())),
            Err(ChainError::Same) => Err(changed_blocks_error("Source and target VDI are same")),
            Err(ChainError::Unrelated) => {
                Err(changed_blocks_error("Source and target VDI are unrelated"))
            }
            Err(ChainError::Inconsistent) => Err(XapiError::SrBackendFailure {
                code: 459,
                status: String::new(),
                stdout: "Changed block tracking log is in an inconsistent state. \
                         [opterr=Inconsistent bitmaps]"
                    .into(),
                stderr: String::new(),
            }),
        }
    }

    /// `VDI.get_nbd_info`, for the caller's `session`.
    pub(crate) fn vdi_get_nbd_info(&self, session: &str, r: &str) -> Result<Value, XapiError> {
        let db = self.db();
        let v = vdi(&db, r)?;
        refuse_cbt_metadata(v, r)?;
        let Some(port) = self.nbd_port() else {
            return Ok(Value::Array(vec![]));
        };
        let info = BTreeMap::from([
            (
                "exportname".to_owned(),
                Value::String(format!("/{}?session_id={session}", v.uuid)),
            ),
            ("address".to_owned(), Value::from("127.0.0.1")),
            ("port".to_owned(), Value::Int(i64::from(port))),
            ("cert".to_owned(), Value::from(self.certificate_pem())),
            ("subject".to_owned(), Value::from(SUBJECT)),
        ]);
        Ok(Value::Array(vec![Value::Struct(info)]))
    }

    /// `VDI.destroy`: refused while attached; coalesces the CBT log into
    /// its child.
    pub(crate) fn vdi_destroy(&self, r: &str) -> Result<Value, XapiError> {
        self.mutate(|db, store| {
            let v = vdi(db, r)?.clone();
            if db.vdi_attached(r) {
                return Err(in_use(r, "destroy"));
            }
            db.cbt.destroy(&v.uuid);
            store.remove(&v.uuid).map_err(internal)?;
            db.vbds.retain(|_, b| b.vdi != r);
            db.vdis.remove(r);
            Ok(Value::from(""))
        })
    }

    /// `VDI.data_destroy`: preconditions, idempotence, the tentative
    /// `cbt_metadata` type while waiting (up to the configured timeout,
    /// xapi's 4 s) for the VDI's VBDs to go, `VDI_IN_USE` and the old type
    /// back if they do not.
    pub(crate) async fn vdi_data_destroy(&self, r: &str) -> Result<Value, XapiError> {
        let old_type = {
            let sim = self.clone();
            let r = r.to_owned();
            tokio::task::spawn_blocking(move || {
                sim.mutate(|db, _| {
                    let v = vdi(db, &r)?;
                    if !v.is_a_snapshot {
                        return Err(not_allowed(format!("VDI is not a snapshot: {r}")));
                    }
                    if !v.cbt_enabled {
                        return Err(XapiError::VdiNoCbtMetadata { vdi: r.clone() });
                    }
                    if v.vdi_type == CBT_METADATA {
                        return Ok(None);
                    }
                    let old = v.vdi_type.clone();
                    vdi_mut(db, &r)?.vdi_type = CBT_METADATA.into();
                    Ok(Some(old))
                })
            })
            .await
            .map_err(internal)??
        };
        let Some(old_type) = old_type else {
            // Already cbt_metadata: a no-op.
            return Ok(Value::from(""));
        };
        let fault = {
            let mut faults = self.faults();
            let fault = faults.data_destroy_in_use > 0;
            faults.data_destroy_in_use = faults.data_destroy_in_use.saturating_sub(1);
            fault
        };
        let timeout = self.config().data_destroy_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = fault || !self.db().vbds_of_vdi(r).is_empty();
            if !remaining || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20).min(timeout)).await;
        }
        let sim = self.clone();
        let r = r.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut db = sim.db();
            let uuid = vdi(&db, &r)?.uuid.clone();
            let outcome = if fault || !db.vbds_of_vdi(&r).is_empty() {
                vdi_mut(&mut db, &r)?.vdi_type = old_type;
                Err(in_use(&r, "data_destroy"))
            } else {
                sim.store().remove(&uuid).map_err(internal)?;
                let v = vdi_mut(&mut db, &r)?;
                v.has_data = false;
                v.physical_utilisation = 0;
                Ok(Value::from(""))
            };
            sim.save(&db)?;
            outcome
        })
        .await
        .map_err(internal)?
    }

    /// `VDI.create`.
    pub(crate) fn vdi_create(&self, args: &Value) -> Result<Value, XapiError> {
        let field_error = |f: &str| XapiError::Other {
            code: "FIELD_TYPE_ERROR".into(),
            params: vec![f.into()],
        };
        let rec = args.as_struct().ok_or_else(|| field_error("args"))?;
        let get = |k: &str| rec.get(k);
        let sr = get("SR")
            .and_then(Value::as_str)
            .ok_or_else(|| field_error("SR"))?
            .to_owned();
        let size = get("virtual_size")
            .and_then(Value::as_i64)
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(|| field_error("virtual_size"))?;
        let vdi_type = get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| field_error("type"))?
            .to_owned();
        let string = |k: &str| {
            get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
        let smap = |k: &str| -> BTreeMap<String, String> {
            get(k)
                .and_then(Value::as_struct)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                        .collect()
                })
                .unwrap_or_default()
        };
        if vdi_type == CBT_METADATA {
            return Err(XapiError::VdiIncompatibleType {
                vdi: String::new(),
                vdi_type: CBT_METADATA.into(),
            });
        }
        self.mutate(|db, store| {
            if !db.srs.contains_key(&sr) {
                return Err(handle_invalid("SR", &sr));
            }
            check_size(size)?;
            // The size the SR makes (VHD: whole 2 MiB blocks).
            let size = crate::sr::round_size(sr_type_of(db, &sr), size);
            check_space(db, &sr, size)?;
            let mut v = new_vdi(&sr, &string("name_label"), size);
            v.name_description = string("name_description");
            v.vdi_type = vdi_type.clone();
            v.sharable = flag("sharable");
            v.read_only = flag("read_only");
            v.other_config = smap("other_config");
            v.sm_config = smap("sm_config");
            v.xenstore_data = smap("xenstore_data");
            v.tags = get("tags")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            store.create(&v.uuid, size).map_err(internal)?;
            let r = new_ref();
            db.vdis.insert(r.clone(), v);
            Ok(Value::String(r))
        })
    }

    /// `VDI.resize` (`online`: `VDI.resize_online`, allowed while attached).
    pub(crate) fn vdi_resize(&self, r: &str, size: u64, online: bool) -> Result<Value, XapiError> {
        self.mutate(|db, store| {
            let v = vdi(db, r)?.clone();
            let op = if online { "resize_online" } else { "resize" };
            if !online && db.vdi_attached(r) {
                return Err(in_use(r, op));
            }
            refuse_cbt_metadata(&v, r)?;
            check_size(size)?;
            let size = crate::sr::round_size(sr_type_of(db, &v.sr), size);
            if size < v.virtual_size {
                return Err(invalid_size("shrinking not allowed"));
            }
            store.resize(&v.uuid, size).map_err(internal)?;
            db.cbt.resize(&v.uuid, size);
            vdi_mut(db, r)?.virtual_size = size;
            Ok(Value::from(""))
        })
    }

    /// A guest write of `data` at `offset` of VDI `r`: lands in the file and
    /// marks, in the leaf's CBT log, every 64 KiB block it touches (as
    /// tapdisk does).
    pub(crate) fn vdi_write(&self, r: &str, offset: u64, data: &[u8]) -> Result<(), XapiError> {
        self.vdi_write_many(r, [(offset, data.to_vec())])
    }

    /// Several guest writes in one database transaction (one save).
    pub(crate) fn vdi_write_many(
        &self,
        r: &str,
        writes: impl IntoIterator<Item = (u64, Vec<u8>)>,
    ) -> Result<(), XapiError> {
        self.guest_write(r, writes, true)
    }

    /// Guest writes; `tracked: false` keeps them out of the CBT log (the
    /// `fault_cbt_bypass` fault).
    pub(crate) fn guest_write(
        &self,
        r: &str,
        writes: impl IntoIterator<Item = (u64, Vec<u8>)>,
        tracked: bool,
    ) -> Result<(), XapiError> {
        self.mutate(|db, store| {
            let v = vdi(db, r)?.clone();
            refuse_cbt_metadata(&v, r)?;
            if v.is_a_snapshot {
                return Err(not_allowed(format!("VDI is a snapshot: {r}")));
            }
            for (offset, data) in writes {
                let end = offset.checked_add(data.len() as u64);
                if end.is_none_or(|e| e > v.virtual_size) {
                    return Err(not_allowed(format!(
                        "write of {} bytes at {offset} is past the end of {r} ({} bytes)",
                        data.len(),
                        v.virtual_size
                    )));
                }
                store.write_at(&v.uuid, offset, &data).map_err(internal)?;
                if v.cbt_enabled && tracked {
                    db.cbt.mark_write(&v.uuid, offset, data.len() as u64);
                }
            }
            vdi_mut(db, r)?.physical_utilisation = store.allocated(&v.uuid);
            Ok(())
        })
    }

    /// `add_to_other_config`, `remove_from_other_config`,
    /// `set_other_config`, `set_name_label`, `set_name_description` of VDIs
    /// and VMs.
    pub(crate) fn set_field(
        &self,
        class: &str,
        r: &str,
        op: &str,
        args: &[Value],
    ) -> Result<Value, XapiError> {
        let text = |i: usize| {
            args.get(i)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        self.mutate(|db, _| {
            let (other_config, name_label, name_description) = match class {
                "VDI" => {
                    let v = vdi_mut(db, r)?;
                    (
                        &mut v.other_config,
                        &mut v.name_label,
                        &mut v.name_description,
                    )
                }
                _ => {
                    let v = db.vms.get_mut(r).ok_or_else(|| handle_invalid("VM", r))?;
                    (
                        &mut v.other_config,
                        &mut v.name_label,
                        &mut v.name_description,
                    )
                }
            };
            match op {
                "add_to_other_config" => {
                    let key = text(0);
                    if other_config.contains_key(&key) {
                        return Err(XapiError::Other {
                            code: "MAP_DUPLICATE_KEY".into(),
                            params: vec![class.into(), "other_config".into(), r.into(), key],
                        });
                    }
                    other_config.insert(key, text(1));
                }
                "remove_from_other_config" => {
                    other_config.remove(&text(0));
                }
                "set_other_config" => {
                    *other_config = args
                        .first()
                        .and_then(Value::as_struct)
                        .map(|m| {
                            m.iter()
                                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                                .collect()
                        })
                        .unwrap_or_default();
                }
                "set_name_label" => *name_label = text(0),
                "set_name_description" => *name_description = text(0),
                _ => return Err(internal(format!("unknown setter {op}"))),
            }
            Ok(Value::from(""))
        })
    }
}

/// The reference of VDI `uuid`, or `UUID_INVALID`.
pub(crate) fn vdi_ref_by_uuid(db: &Db, uuid: &str) -> Result<String, XapiError> {
    db.vdi_ref_by_uuid(uuid).ok_or_else(|| XapiError::Other {
        code: "UUID_INVALID".into(),
        params: vec!["VDI".into(), uuid.into()],
    })
}

/// Whether `r` is the null reference.
pub(crate) fn is_null(r: &str) -> bool {
    r.is_empty() || r == NULL_REF
}
