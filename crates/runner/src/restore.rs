//! Restoring a restore point into a XenServer pool as a new VDI.

use std::sync::Arc;

use cbtvault_config::Pool;
use cbtvault_repo::{Repository, RestorePointRow};
use cbtvault_xenapi::{Client, SrRef, VdiRef};

use crate::error::{Error, Result};

/// Where a restore into a pool went.
#[derive(Clone, Debug)]
pub struct PoolRestore {
    /// The new VDI's uuid.
    pub vdi: String,
    /// Bytes uploaded (the whole disk: XAPI's `/import_raw_vdi` takes every
    /// byte).
    pub bytes: u64,
}

/// Maps a XenAPI failure to the runner's error for `pool`, saying what was
/// being done.
pub(crate) fn xapi(pool: &str, what: &str) -> impl FnOnce(cbtvault_xenapi::Error) -> Error {
    let (pool, what) = (pool.to_string(), what.to_string());
    move |source| Error::Xapi {
        pool,
        what,
        source: source.into(),
    }
}

/// Creates a VDI labelled `label` on `sr` and uploads restore point `rp`
/// into it (XAPI's `/import_raw_vdi`). A failed upload destroys the new
/// VDI, so no half-written disk stays in the pool.
pub(crate) async fn upload_new_vdi(
    client: &Client,
    pool: &str,
    repo: &Arc<Repository>,
    rp: &RestorePointRow,
    sr: &SrRef,
    label: &str,
) -> Result<VdiRef> {
    let size = rp.manifest.virtual_size;
    let vdi = client
        .vdi()
        .create(&cbtvault_xenapi::VdiCreate::new(label, sr.clone(), size))
        .await
        .map_err(xapi(pool, &format!("creating VDI {label:?}")))?;
    let reader = cbtvault_engine::serve::restore_point_reader(repo.clone(), rp);
    if let Err(e) = client.import_raw_vdi(&vdi, reader, size).await {
        let _ = client.vdi().destroy(&vdi).await;
        return Err(xapi(
            pool,
            &format!("uploading the disk into VDI {label:?}"),
        )(e));
    }
    Ok(vdi)
}

/// Uploads restore point `rp` into a new VDI on SR `sr_uuid` of `pool`
/// (XAPI's `/import_raw_vdi`). A failed upload destroys the new VDI, so no
/// half-written disk stays in the pool.
pub async fn restore_to_pool(
    pool: &Pool,
    repo: Arc<Repository>,
    rp: &RestorePointRow,
    sr_uuid: &str,
) -> Result<PoolRestore> {
    let client = crate::login::login(pool).await?;
    let name = pool.name.as_str();
    let result = async {
        let sr = client
            .sr()
            .get_by_uuid(sr_uuid)
            .await
            .map_err(xapi(name, &format!("looking up SR {sr_uuid}")))?;
        let label = format!("restore of {} ({})", rp.manifest.disk, rp.manifest.time);
        let vdi = upload_new_vdi(&client, name, &repo, rp, &sr, &label).await?;
        let uuid = client
            .vdi()
            .get_uuid(&vdi)
            .await
            .map_err(xapi(name, "reading the new VDI's uuid"))?;
        Ok(PoolRestore {
            vdi: uuid,
            bytes: rp.manifest.virtual_size,
        })
    }
    .await;
    let _ = client.logout().await;
    result
}

/// What a VDI rollback did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VdiRollback {
    /// The VDI rolled.
    pub vdi: String,
    /// The restore point the VDI was taken to hold (before its CBT
    /// changes), if one was known.
    pub target_state: Option<String>,
    /// `block-maps+changed-blocks` (a sparse VHD upload) or `full` (every
    /// byte, raw).
    pub method: &'static str,
    /// Why CBT could not tell which blocks to write, when it fell back to
    /// a full upload.
    pub fallback: Option<String>,
    /// Blocks of the disk compared (from the block maps and CBT).
    pub blocks_compared: u64,
    /// Blocks uploaded.
    pub blocks_written: u64,
    /// Bytes of the upload's body.
    pub bytes_uploaded: u64,
    pub duration_ms: u64,
}

/// Rolls the existing VDI `vdi_uuid` of `pool` to restore point `rp`,
/// writing only the blocks that differ (`restore --only-changed --to
/// xapi --vdi`).
///
/// The VDI is taken to hold `holds` (by default the newest restore point
/// of that VDI in `repo`) plus what its CBT reports written since that
/// restore point's snapshot: `VDI.list_changed_blocks(snapshot, VDI)`,
/// which works after the snapshot's `data_destroy` (it keeps its CBT log
/// as a `cbt_metadata` VDI). The blocks the block maps differ in plus
/// those are checked in the repository, then uploaded as a sparse VHD
/// (`/import_raw_vdi?format=vhd`). When CBT cannot tell (disabled, the
/// snapshot gone, no restore point of the VDI, another size), every byte
/// is uploaded raw instead, with a warning naming why.
pub async fn rollback_vdi(
    pool: &Pool,
    repo: Arc<Repository>,
    rp: &RestorePointRow,
    vdi_uuid: &str,
    holds: Option<RestorePointRow>,
) -> Result<VdiRollback> {
    let client = crate::login::login(pool).await?;
    let result = rollback_vdi_with(&client, pool.name.as_str(), repo, rp, vdi_uuid, holds).await;
    let _ = client.logout().await;
    result
}

async fn rollback_vdi_with(
    client: &Client,
    name: &str,
    repo: Arc<Repository>,
    rp: &RestorePointRow,
    vdi_uuid: &str,
    holds: Option<RestorePointRow>,
) -> Result<VdiRollback> {
    let started = std::time::Instant::now();
    let size = rp.manifest.virtual_size;
    let blocks = size.div_ceil(cbtvault_repo::BLOCK_SIZE);
    let vdi = client
        .vdi()
        .get_by_uuid(vdi_uuid)
        .await
        .map_err(xapi(name, &format!("looking up VDI {vdi_uuid}")))?;
    let record = client
        .vdi()
        .get_record(&vdi)
        .await
        .map_err(xapi(name, &format!("reading VDI {vdi_uuid}")))?;
    if record.virtual_size != size {
        return Err(Error::VdiRollback {
            vdi: vdi_uuid.to_string(),
            what: format!(
                "it is {} bytes and restore point {} is {size}: a rollback keeps the disk's size (resize the VDI first, or restore into a new VDI)",
                record.virtual_size, rp.id
            ),
        });
    }
    if record.is_a_snapshot || record.vdi_type == cbtvault_xenapi::VdiType::CbtMetadata {
        return Err(Error::VdiRollback {
            vdi: vdi_uuid.to_string(),
            what: "it is a snapshot or CBT metadata, not a disk to roll back".into(),
        });
    }
    let holds = match holds {
        Some(h) => Some(h),
        None => {
            let suffix = format!("/vdi/{vdi_uuid}");
            let repo = repo.clone();
            tokio::task::spawn_blocking(move || -> Result<Option<RestorePointRow>> {
                Ok(repo
                    .catalogue()
                    .restore_points(None)?
                    .into_iter()
                    .filter(|p| {
                        p.manifest.source.provider == "xenserver"
                            && p.manifest.source.location.ends_with(&suffix)
                    })
                    .max_by_key(|p| p.manifest.time))
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??
        }
    };
    // Plan: the blocks to write, or why they cannot be known.
    let mut in_use = false;
    let plan: std::result::Result<std::collections::BTreeSet<u64>, String> = async {
        let holds = holds
            .as_ref()
            .ok_or_else(|| format!("the repository has no restore point of VDI {vdi_uuid}"))?;
        if !record.cbt_enabled {
            return Err(format!("CBT is disabled on VDI {vdi_uuid}"));
        }
        let snapshot = holds.manifest.source.snapshot.as_deref().ok_or_else(|| {
            format!(
                "restore point {} names no snapshot to compare with",
                holds.id
            )
        })?;
        let snap = client.vdi().get_by_uuid(snapshot).await.map_err(|e| {
            format!(
                "snapshot {snapshot} of restore point {} is gone: {e}",
                holds.id
            )
        })?;
        let changed = match client.vdi().list_changed_blocks(&snap, &vdi).await {
            Ok(c) => c,
            Err(cbtvault_xenapi::Error::Xapi(cbtvault_xenapi::XapiError::VdiInUse { .. })) => {
                in_use = true;
                return Err("in use".into());
            }
            Err(e) => {
                return Err(format!(
                    "VDI.list_changed_blocks({snapshot}, {vdi_uuid}): {e}"
                ));
            }
        };
        let (repo, rp, holds) = (repo.clone(), rp.clone(), holds.clone());
        tokio::task::spawn_blocking(move || {
            cbtvault_engine::vdi_rollback_blocks(&repo, &rp, &holds, &changed)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
    }
    .await;
    if in_use {
        // Written under a running guest, the disk would be neither state.
        return Err(Error::VdiRollback {
            vdi: vdi_uuid.to_string(),
            what: "it is in use (attached to a running VM): shut the VM down or unplug the disk, then roll it back".into(),
        });
    }
    match plan {
        Ok(grains) => {
            // Every block is checked before the VDI is touched.
            cbtvault_engine::check_blocks(repo.clone(), rp, &grains).await?;
            let count = grains.len() as u64;
            let (reader, len) = cbtvault_engine::restore_point_vhd(repo, rp, grains)?;
            client.import_vhd(&vdi, reader, len).await.map_err(xapi(
                name,
                &format!("uploading the changed blocks into VDI {vdi_uuid}"),
            ))?;
            Ok(VdiRollback {
                vdi: vdi_uuid.to_string(),
                target_state: holds.map(|h| h.id),
                method: "block-maps+changed-blocks",
                fallback: None,
                blocks_compared: blocks,
                blocks_written: count,
                bytes_uploaded: len,
                duration_ms: started.elapsed().as_millis() as u64,
            })
        }
        Err(why) => {
            tracing::warn!(
                "changed-block tracking cannot tell which blocks of VDI {vdi_uuid} to write ({why}); uploading the whole disk"
            );
            let reader = cbtvault_engine::serve::restore_point_reader(repo, rp);
            client
                .import_raw_vdi(&vdi, reader, size)
                .await
                .map_err(xapi(
                    name,
                    &format!("uploading the disk into VDI {vdi_uuid}"),
                ))?;
            Ok(VdiRollback {
                vdi: vdi_uuid.to_string(),
                target_state: holds.map(|h| h.id),
                method: "full",
                fallback: Some(why),
                blocks_compared: 0,
                blocks_written: blocks,
                bytes_uploaded: size,
                duration_ms: started.elapsed().as_millis() as u64,
            })
        }
    }
}
