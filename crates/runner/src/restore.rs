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
