//! Which VM a restore point came from, and the VM's saved metadata.
//!
//! A restore point's manifest may carry a [`VmInfo`]: the VM's identity
//! and the disk's place in it, so that restore points can be found by VM
//! and a whole VM rebuilt later. A VM-level run saves the VM's metadata
//! once ([`Repository::save_vm_metadata`]): an opaque JSON document (the
//! VM record, its VBDs, VIFs and networks, as the provider collected
//! them; for QEMU, each drive's node, driver, size, guest device and
//! exports) in a file `vms/ID.json` whose BLAKE3 is its id, written durably
//! like a manifest and before any manifest names it. The catalogue indexes
//! these files (`vm_metadata`) and can be rebuilt from them; verify checks
//! each file against its id; repair sets damaged ones aside. gc never
//! deletes them.

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, FileKind};
use crate::catalogue::Catalogue;
use crate::crypto::{Crypto, OpenError, Sealed};
use crate::error::{Error, Result};
use crate::manifest::is_restore_point_id;
use crate::repository::Repository;

/// The VM metadata format this build writes.
pub const VM_METADATA_FORMAT: u32 = 1;

/// The largest VM metadata file read, in bytes (a VM with many devices
/// has a few tens of KiB).
pub const MAX_VM_METADATA_LEN: usize = 16 << 20;

/// The VM a disk belonged to when it was backed up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub uuid: String,
    pub name: String,
    /// Where the VM ran: the pool's uuid (XenServer) or the QEMU host's
    /// configured name.
    pub host: String,
    /// The disk's own name label on the hypervisor (a VDI's name_label),
    /// if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_label: Option<String>,
    /// The disk's device position in the VM (a VBD's userdevice "0", "1",
    /// …; a QEMU device id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The id of the VM metadata saved by the same run, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
}

impl VmInfo {
    /// True when `name_or_uuid` names this VM (its uuid, or its name).
    pub fn is_named(&self, name_or_uuid: &str) -> bool {
        self.uuid.eq_ignore_ascii_case(name_or_uuid) || self.name == name_or_uuid
    }
}

/// A VM's metadata as one run saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmMetadata {
    pub vm_uuid: String,
    /// When the provider read it.
    pub time: jiff::Timestamp,
    /// What the provider collected, kept as it is.
    pub json: serde_json::Value,
}

/// A saved VM metadata document as the catalogue lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmMetadataRow {
    pub id: String,
    pub vm_uuid: String,
    pub time: jiff::Timestamp,
}

/// The file's layout: the format number first, so that a later format is
/// refused rather than misread.
#[derive(Serialize, Deserialize)]
struct VmMetadataFile {
    format: u32,
    vm_uuid: String,
    time: jiff::Timestamp,
    metadata: serde_json::Value,
}

/// Serialises VM metadata, computes its id (keyed in an encrypted
/// repository) and seals it: the file to write.
fn encode(m: &VmMetadata, crypto: &Crypto) -> Result<(String, Vec<u8>)> {
    let file = VmMetadataFile {
        format: VM_METADATA_FORMAT,
        vm_uuid: m.vm_uuid.clone(),
        time: m.time,
        metadata: m.json.clone(),
    };
    // Serialising a JSON value and plain fields to a Vec cannot fail.
    let mut bytes = serde_json::to_vec_pretty(&file).unwrap_or_default();
    if bytes.len() > MAX_VM_METADATA_LEN {
        // Refused by the caller; not worth sealing.
        return Ok((crypto.hex_id(&bytes)?, bytes));
    }
    let id = crypto.hex_id(&bytes)?;
    crypto.seal(Sealed::VmMetadata, id.as_bytes(), &mut bytes)?;
    Ok((id, bytes))
}

/// Checks a file read from storage: its name is its id, its content
/// hashes to it, and it parses.
fn decode(
    id: &str,
    bytes: &[u8],
    crypto: &Crypto,
) -> Result<std::result::Result<VmMetadata, String>> {
    Ok(match open(id, bytes, crypto)? {
        Ok(plain) => parse(&plain),
        Err(why) => Err(why),
    })
}

/// Opens a file and checks it against its id; the JSON it holds.
fn open(id: &str, bytes: &[u8], crypto: &Crypto) -> Result<std::result::Result<Vec<u8>, String>> {
    if !is_restore_point_id(id) {
        return Ok(Err("its name is not an id (64 hex digits)".into()));
    }
    if bytes.len() > MAX_VM_METADATA_LEN {
        return Ok(Err(format!("{} bytes, too large", bytes.len())));
    }
    let plain = match crypto.open(Sealed::VmMetadata, id.as_bytes(), bytes) {
        Ok(plain) => plain,
        Err(OpenError::Key(e)) => return Err(e),
        Err(OpenError::Damaged(what)) => {
            return Ok(Err(format!("cannot be opened ({what})")));
        }
    };
    if crypto.hex_id(&plain)? != id {
        return Ok(Err(
            "content does not match its id (the file is damaged)".into()
        ));
    }
    Ok(Ok(plain))
}

fn parse(bytes: &[u8]) -> std::result::Result<VmMetadata, String> {
    let file: VmMetadataFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if file.format != VM_METADATA_FORMAT {
        return Err(format!(
            "format {} is not supported (this build reads format {VM_METADATA_FORMAT})",
            file.format
        ));
    }
    validate_uuid(&file.vm_uuid)?;
    Ok(VmMetadata {
        vm_uuid: file.vm_uuid,
        time: file.time,
        json: file.metadata,
    })
}

fn validate_uuid(uuid: &str) -> std::result::Result<(), String> {
    if uuid.is_empty() || uuid.len() > 255 || uuid.chars().any(char::is_control) {
        return Err(format!(
            "VM uuid {uuid:?} is empty, too long or holds control characters"
        ));
    }
    Ok(())
}

impl Repository {
    /// Saves a VM's metadata durably and returns its id, to be named in
    /// the [`VmInfo::metadata`] of the restore points of the same run.
    /// Saving the same document twice gives the same id and one file.
    pub fn save_vm_metadata(&self, metadata: &VmMetadata) -> Result<String> {
        self.require_writable("saving VM metadata")?;
        // Like a backup: beside other writers, never beside repair, which
        // replaces the catalogue this indexes into.
        let _lock = self.lock_shared()?;
        let (id, bytes) = encode(metadata, &self.crypto)?;
        let bad = |what: String| Error::VmMetadata {
            id: id.clone(),
            what,
        };
        validate_uuid(&metadata.vm_uuid).map_err(bad)?;
        if bytes.len() > MAX_VM_METADATA_LEN {
            return Err(bad(format!(
                "{} bytes, more than the {MAX_VM_METADATA_LEN} a repository keeps",
                bytes.len()
            )));
        }
        // Durable before any manifest can name it: write fsyncs the file
        // and its directory.
        self.backend().write(FileKind::VmMetadata, &id, &bytes)?;
        if let Err(e) = self
            .catalogue()
            .insert_vm_metadata(&id, &metadata.vm_uuid, metadata.time)
        {
            // The file is what counts; listing indexes it again.
            tracing::warn!(vm_metadata = %id, error = %e, "saved, but not yet indexed");
        }
        Ok(id)
    }

    /// Reads saved VM metadata, checked against its id.
    pub fn vm_metadata(&self, id: &str) -> Result<VmMetadata> {
        if !is_restore_point_id(id) {
            return Err(Error::VmMetadata {
                id: id.to_string(),
                what: "not a VM metadata id (64 hex digits)".into(),
            });
        }
        let bytes = self.backend().read(FileKind::VmMetadata, id)?;
        decode(id, &bytes, &self.crypto)?.map_err(|what| Error::VmMetadata {
            id: id.to_string(),
            what,
        })
    }

    /// The VM metadata saved for `vm_uuid` (every VM's when `None`),
    /// oldest first. Files the catalogue does not know yet (a crash after
    /// writing one) are indexed first.
    pub fn vm_metadata_list(&self, vm_uuid: Option<&str>) -> Result<Vec<VmMetadataRow>> {
        let known: std::collections::HashSet<String> = self
            .catalogue()
            .vm_metadata_rows(None)?
            .into_iter()
            .map(|r| r.id)
            .collect();
        for id in self.backend().list(FileKind::VmMetadata)? {
            if known.contains(&id) {
                continue;
            }
            match self.vm_metadata(&id) {
                Ok(m) => self
                    .catalogue()
                    .insert_vm_metadata(&id, &m.vm_uuid, m.time)?,
                // Verify reports it; it costs only itself.
                Err(e) => tracing::warn!(vm_metadata = %id, error = %e, "left out"),
            }
        }
        self.catalogue().vm_metadata_rows(vm_uuid)
    }
}

/// Saved VM metadata that no restore point refers to and that is older
/// than `grace` (gc removes it).
pub(crate) fn unreferenced(repo: &Repository, grace: std::time::Duration) -> Result<Vec<String>> {
    let referenced: std::collections::HashSet<String> = repo
        .catalogue()
        .restore_points(None)?
        .into_iter()
        .filter_map(|rp| rp.manifest.source.vm.and_then(|vm| vm.metadata))
        .collect();
    let cutoff = jiff::Timestamp::now()
        .checked_sub(jiff::SignedDuration::try_from(grace).unwrap_or(jiff::SignedDuration::ZERO))
        .unwrap_or(jiff::Timestamp::MIN);
    Ok(repo
        .vm_metadata_list(None)?
        .into_iter()
        .filter(|row| row.time < cutoff && !referenced.contains(&row.id))
        .map(|row| row.id)
        .collect())
}

/// Verify's part: every file matches its id and is indexed, and every
/// restore point that names VM metadata finds it. Returns (object,
/// problem) pairs.
pub(crate) fn check(repo: &Repository) -> Result<Vec<(String, String)>> {
    let mut problems = Vec::new();
    let indexed: std::collections::HashSet<String> = repo
        .catalogue()
        .vm_metadata_rows(None)?
        .into_iter()
        .map(|r| r.id)
        .collect();
    let on_storage: std::collections::HashSet<String> = repo
        .backend()
        .list(FileKind::VmMetadata)?
        .into_iter()
        .collect();
    for id in &on_storage {
        match repo.vm_metadata(id) {
            // Without the key only its presence can be checked.
            Err(Error::KeyRequired { .. }) if indexed.contains(id) => {}
            Err(Error::KeyRequired { .. }) => problems.push((
                format!("VM metadata {id}"),
                "not in the catalogue; `cbtvault repair` rebuilds the catalogue".into(),
            )),
            Err(e) => problems.push((
                format!("VM metadata {id}"),
                format!("{}; `cbtvault repair` sets it aside", strip_id(&e, id)),
            )),
            Ok(_) if !indexed.contains(id) => problems.push((
                format!("VM metadata {id}"),
                "not in the catalogue; `cbtvault repair` rebuilds the catalogue".into(),
            )),
            Ok(_) => {}
        }
    }
    for rp in repo.catalogue().restore_points(None)? {
        if let Some(id) = rp
            .manifest
            .source
            .vm
            .as_ref()
            .and_then(|vm| vm.metadata.as_ref())
            && !on_storage.contains(id)
        {
            problems.push((
                format!("restore point {}", rp.id),
                format!("the VM metadata it names ({id}) is missing; the disk still restores, the VM's configuration cannot be rebuilt from it"),
            ));
        }
    }
    Ok(problems)
}

fn strip_id(e: &Error, id: &str) -> String {
    let text = e.to_string();
    text.strip_prefix(&format!("VM metadata {id}: "))
        .map(str::to_string)
        .unwrap_or(text)
}

/// Repair's part: indexes every valid file into the new catalogue and
/// sets the others aside. Returns what was set aside, in words.
pub(crate) fn rebuild(
    backend: &dyn Backend,
    crypto: &Crypto,
    cat: &mut Catalogue,
) -> Result<Vec<String>> {
    let mut set_aside = Vec::new();
    for id in backend.list(FileKind::VmMetadata)? {
        let parsed = match backend.read(FileKind::VmMetadata, &id) {
            Ok(bytes) => decode(&id, &bytes, crypto)?,
            Err(e) => Err(e.to_string()),
        };
        match parsed {
            Ok(m) => cat.insert_vm_metadata(&id, &m.vm_uuid, m.time)?,
            Err(why) => {
                let done = crate::repair::set_aside(backend, FileKind::VmMetadata, &id)?;
                tracing::warn!(vm_metadata = %id, %why, set_aside = %done, "unreadable VM metadata");
                set_aside.push(format!("VM metadata {id}: {why}; {done}"));
            }
        }
    }
    Ok(set_aside)
}
