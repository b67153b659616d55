//! The xapi-nbd side of the simulator: what a connection asking for an
//! export name gets, independent of the NBD wire protocol.
//!
//! [`Sim::open_nbd_export`] does what xapi-nbd does per connection: parse
//! `/<vdi-uuid>?session_id=<ref>`, check the session is logged in, find
//! the VDI, refuse `cbt_metadata` VDIs (their VBD cannot be created), hold
//! the per-host limit of 16 connections, and attach the VDI to dom0 with a
//! fresh read-only VBD for the life of the connection, which is what makes
//! `list_changed_blocks`, `destroy` and `data_destroy` see the VDI in use.
//! Dropping the [`NbdExport`] unplugs and destroys that VBD.
//!
//! [`VdiReader`] reads a VDI or snapshot (size and positional reads), the
//! backend of an NBD export; the "disconnect after N bytes" fault makes
//! its reads fail past that point, which the NBD server turns into a hard
//! disconnect as xapi-nbd does on a backend error.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::{VbdRec, new_ref, new_uuid};
use crate::sim::Sim;
use crate::store::read_full_at;

/// Reads one VDI: a size and positional reads. Cheap to clone; the file
/// stays readable even if the VDI is destroyed meanwhile.
#[derive(Clone)]
pub struct VdiReader {
    file: Arc<File>,
    size: u64,
    /// Bytes left before the injected disconnect.
    budget: Option<Arc<AtomicU64>>,
}

impl fmt::Debug for VdiReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VdiReader")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl VdiReader {
    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fills `buf` from `offset`. Reads past the end are an error
    /// (`InvalidInput`); after an injected disconnect every read fails
    /// with `ConnectionAborted`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "read of {} bytes at {offset} past the end ({})",
                    buf.len(),
                    self.size
                ),
            ));
        }
        if let Some(budget) = &self.budget {
            let want = buf.len() as u64;
            let granted = budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    left.checked_sub(want)
                })
                .is_ok();
            if !granted {
                budget.store(0, Ordering::SeqCst);
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "injected fault: NBD connection dropped",
                ));
            }
        }
        read_full_at(&self.file, offset, buf)
    }

    /// [`VdiReader::read_at`] on a blocking thread.
    pub async fn read_at_async(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        let reader = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            reader.read_at(&mut buf, offset).map(|()| buf)
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// Why an export name was refused (the connection is then closed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NbdRefusal {
    /// Not `/<uuid>?session_id=<ref>`.
    #[error("malformed export name {0:?}")]
    BadName(String),
    /// No `session_id` parameter.
    #[error("No session_id parameter provided")]
    NoSession,
    /// The session is not logged in.
    #[error("session is invalid")]
    SessionInvalid,
    /// No VDI with that UUID.
    #[error("no VDI with UUID {0}")]
    NoSuchVdi(String),
    /// A `cbt_metadata` VDI has no data to export.
    #[error("VDI_INCOMPATIBLE_TYPE: VDI {0} is cbt_metadata")]
    IncompatibleType(String),
    /// 16 connections are open already.
    #[error("Server busy: already at maximum {0} connections")]
    Busy(usize),
}

/// An open export: the reader, attached to dom0 until dropped.
pub struct NbdExport {
    /// The data.
    pub reader: VdiReader,
    /// UUID of the VDI.
    pub vdi_uuid: String,
    sim: Sim,
    vbd: String,
}

impl fmt::Debug for NbdExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdExport")
            .field("vdi_uuid", &self.vdi_uuid)
            .field("size", &self.reader.size)
            .finish_non_exhaustive()
    }
}

impl Drop for NbdExport {
    fn drop(&mut self) {
        let vbd = self.vbd.clone();
        let result = self.sim.mutate(|db, _| {
            db.vbds.remove(&vbd);
            Ok(())
        });
        if let Err(e) = result {
            tracing::warn!("could not detach NBD VBD {vbd}: {e}");
        }
        self.sim
            .inner
            .nbd_connections
            .fetch_sub(1, Ordering::SeqCst);
    }
}

/// Splits `/<uuid>?session_id=<ref>`.
fn parse_export_name(name: &str) -> Result<(String, Option<String>), NbdRefusal> {
    let (path, query) = name.split_once('?').unwrap_or((name, ""));
    let uuid = path.trim_start_matches('/');
    if uuid.is_empty() || uuid.contains('/') {
        return Err(NbdRefusal::BadName(name.to_owned()));
    }
    let session = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "session_id")
        .map(|(_, v)| v.into_owned());
    Ok((uuid.to_owned(), session))
}

impl Sim {
    /// Opens the export `name` as xapi-nbd would (see the module docs).
    pub fn open_nbd_export(&self, name: &str) -> Result<NbdExport, NbdRefusal> {
        let (uuid, session) = parse_export_name(name)?;
        let session = session.ok_or(NbdRefusal::NoSession)?;
        if self.sessions().check(&session).is_err() {
            return Err(NbdRefusal::SessionInvalid);
        }
        let limit = self.config().nbd_connection_limit;
        let counted = self
            .inner
            .nbd_connections
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        if !counted {
            return Err(NbdRefusal::Busy(limit));
        }
        let open = self.inner.nbd_connections.load(Ordering::SeqCst);
        self.inner
            .nbd_connections_peak
            .fetch_max(open, Ordering::SeqCst);
        let release = || {
            self.inner.nbd_connections.fetch_sub(1, Ordering::SeqCst);
        };
        let attached = self.mutate(|db, store| {
            let Some(vdi_ref) = db.vdi_ref_by_uuid(&uuid) else {
                return Ok(Err(NbdRefusal::NoSuchVdi(uuid.clone())));
            };
            let v = &db.vdis[&vdi_ref];
            if v.vdi_type == "cbt_metadata" || !v.has_data {
                return Ok(Err(NbdRefusal::IncompatibleType(uuid.clone())));
            }
            let size = v.virtual_size;
            let file = store.open_read(&uuid).map_err(crate::sim::internal)?;
            let dom0 = db.dom0_ref().unwrap_or_default();
            let vbd = new_ref();
            db.vbds.insert(
                vbd.clone(),
                VbdRec {
                    uuid: new_uuid(),
                    vm: dom0,
                    vdi: vdi_ref,
                    device: String::new(),
                    userdevice: "autodetect".into(),
                    mode: "RO".into(),
                    vbd_type: "Disk".into(),
                    bootable: false,
                    currently_attached: true,
                    other_config: BTreeMap::new(),
                    nbd: true,
                    empty: false,
                },
            );
            Ok(Ok((vbd, file, size)))
        });
        let (vbd, file, size) = match attached {
            Ok(Ok(x)) => x,
            Ok(Err(refusal)) => {
                release();
                return Err(refusal);
            }
            Err(e) => {
                release();
                tracing::warn!("NBD attach of {uuid} failed: {e}");
                return Err(NbdRefusal::NoSuchVdi(uuid));
            }
        };
        let budget = {
            let mut faults = self.faults();
            let broken = match &mut faults.nbd_break_one_vdi {
                Some((bytes, chosen @ None)) => {
                    *chosen = Some(uuid.clone());
                    Some(*bytes)
                }
                Some((bytes, Some(chosen))) if *chosen == uuid => Some(*bytes),
                Some(_) => {
                    faults.nbd_break_one_vdi = None;
                    None
                }
                None => None,
            };
            broken
                .or_else(|| faults.nbd_disconnect_after.take())
                .map(|n| Arc::new(AtomicU64::new(n)))
        };
        Ok(NbdExport {
            reader: VdiReader {
                file: Arc::new(file),
                size,
                budget,
            },
            vdi_uuid: uuid,
            sim: self.clone(),
            vbd,
        })
    }

    /// A reader of VDI `vdi_uuid` for tests, without attaching it.
    pub fn vdi_reader(&self, vdi_uuid: &str) -> crate::Result<VdiReader> {
        let (size, has_data) = {
            let db = self.db();
            let r = crate::vdi::vdi_ref_by_uuid(&db, vdi_uuid)?;
            let v = &db.vdis[&r];
            (v.virtual_size, v.has_data)
        };
        if !has_data {
            return Err(cbtvault_xenapi::XapiError::VdiIncompatibleType {
                vdi: vdi_uuid.into(),
                vdi_type: "cbt_metadata".into(),
            }
            .into());
        }
        let file = self.store().open_read(vdi_uuid)?;
        Ok(VdiReader {
            file: Arc::new(file),
            size,
            budget: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names() {
        assert_eq!(
            parse_export_name("/abc?session_id=OpaqueRef:1").unwrap(),
            ("abc".into(), Some("OpaqueRef:1".into()))
        );
        assert_eq!(parse_export_name("/abc").unwrap(), ("abc".into(), None));
        assert!(parse_export_name("/").is_err());
        assert!(parse_export_name("/a/b?session_id=x").is_err());
    }
}
