//! Restoring a restore point into a XenServer pool as a new VDI.

use std::sync::Arc;

use cbtvault_config::Pool;
use cbtvault_repo::{Repository, RestorePointRow};

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
    let xapi = |what: &str| {
        let (pool, what) = (pool.name.clone(), what.to_string());
        move |source: cbtvault_xenapi::Error| Error::Xapi {
            pool,
            what,
            source: source.into(),
        }
    };
    let result = async {
        let sr = client
            .sr()
            .get_by_uuid(sr_uuid)
            .await
            .map_err(xapi(&format!("looking up SR {sr_uuid}")))?;
        let size = rp.manifest.virtual_size;
        let label = format!("restore of {} ({})", rp.manifest.disk, rp.manifest.time);
        let vdi = client
            .vdi()
            .create(&cbtvault_xenapi::VdiCreate::new(label, sr, size))
            .await
            .map_err(xapi("creating the VDI"))?;
        let reader = cbtvault_engine::serve::restore_point_reader(repo.clone(), rp);
        if let Err(e) = client.import_raw_vdi(&vdi, reader, size).await {
            let _ = client.vdi().destroy(&vdi).await;
            return Err(xapi("uploading the disk")(e));
        }
        let uuid = client
            .vdi()
            .get_uuid(&vdi)
            .await
            .map_err(xapi("reading the new VDI's uuid"))?;
        Ok(PoolRestore {
            vdi: uuid,
            bytes: size,
        })
    }
    .await;
    let _ = client.logout().await;
    result
}
