//! Backing up a XenServer / XCP-ng VDI with changed-block tracking.
//!
//! Per disk and run (see ARCHITECTURE.md for the invariants this keeps):
//! 1. reap what an interrupted run left (tagged snapshots holding data);
//! 2. make sure CBT is on (the first backup after enabling is full); where
//!    the pool cannot track the VDI (SR, licence, RAW format) every run is
//!    a full read with the reason, and step 7 destroys the snapshot;
//! 3. `VDI.snapshot`, tagged in `other_config` with the job and the source;
//! 4. `VDI.list_changed_blocks(previous snapshot, new snapshot)` before
//!    opening NBD; a broken chain (error 460, a vanished or shrunk base)
//!    falls back to a full read that still stores only new blocks;
//! 5. read the blocks over NBD (TLS, the host's certificate pinned) and
//!    commit the restore point durably;
//! 6. verify before destroy: re-read a sample of the blocks from the
//!    snapshot and compare them with what the repository holds;
//! 7. `VDI.data_destroy` the new snapshot (retrying `VDI_IN_USE`), then
//!    destroy the previous `cbt_metadata` base.
//!
//! Any failure before the commit destroys the new snapshot at once; its
//! changed-block log is merged into the disk's, so nothing is lost and the
//! previous base still works.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cbtvault_blockmap::BlockMap;
use cbtvault_nbd::{Client as NbdClient, ConnectOptions, TlsOptions};
use cbtvault_repo::{Repository, RestorePointRow, SourceInfo};

mod vm;

use cbtvault_xenapi::{Client, NbdInfo, VdiRef, VdiType, XapiError};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};
pub use vm::backup_vm;

use crate::backup::{BackupJob, BackupOptions, BackupOutcome, Changes, DiskLocks, Parent};
use crate::error::{Error, Result};
use crate::nbd::NbdSource;
use crate::progress::Progress;
use crate::rename::DiskName;

/// `other_config` key naming the job that made a snapshot.
pub const TAG_JOB: &str = "cbtvault-job";
/// The run kind that records a snapshot being taken, so that a snapshot
/// whose run died before tagging it is still found.
const SNAPSHOT_RUN: &str = "xen-snapshot";

/// How to back up VDIs.
#[derive(Clone, Debug)]
pub struct XenOptions {
    /// The job's name, for tags and logs.
    pub job: String,
    /// The pool's address, recorded in manifests.
    pub pool: String,
    /// NBD connections per disk.
    pub nbd_connections: usize,
    /// Blocks re-read from the snapshot before it is destroyed.
    pub verify_samples: usize,
    /// Tries of `data_destroy` while the VDI is still in use.
    pub data_destroy_tries: u32,
    /// First pause between those tries (doubling).
    pub data_destroy_backoff: Duration,
    pub backup: BackupOptions,
}

impl XenOptions {
    /// Defaults for `job` on `pool`.
    pub fn new(job: impl Into<String>, pool: impl Into<String>) -> Self {
        XenOptions {
            job: job.into(),
            pool: pool.into(),
            nbd_connections: 1,
            verify_samples: 16,
            data_destroy_tries: 6,
            data_destroy_backoff: Duration::from_secs(1),
            backup: BackupOptions::default(),
        }
    }
}

fn xapi(disk: &str, what: &str) -> impl FnOnce(cbtvault_xenapi::Error) -> Error {
    let (disk, what) = (disk.to_string(), what.to_string());
    move |e| Error::Source {
        disk,
        what,
        source: Some(Box::new(e)),
    }
}

fn is_missing(e: &cbtvault_xenapi::Error) -> bool {
    e.xapi()
        .is_some_and(|x| matches!(x, XapiError::HandleInvalid { .. }) || x.code() == "UUID_INVALID")
}

/// The repository's name for a VDI's disk: `xen-POOL/VDI`, with the
/// pool's uuid, so that VDIs of two pools never share a disk (a replicated
/// SR brings its VDI uuids along), and the name survives a new pool master.
pub fn disk_name(pool_uuid: &str, vdi_uuid: &str) -> String {
    format!("xen-{pool_uuid}/{vdi_uuid}")
}

/// The name earlier versions gave a VDI's disk (see [`crate::rename`]).
pub fn former_disk_name(vdi_uuid: &str) -> String {
    format!("xen-{vdi_uuid}")
}

/// The pool's uuid (a XAPI host belongs to exactly one pool).
pub async fn pool_uuid(
    xapi_client: &Client,
) -> std::result::Result<String, cbtvault_xenapi::Error> {
    let refs = xapi_client.call("pool.get_all", vec![]).await?;
    let pool = refs
        .as_array()
        .and_then(|a| a.first())
        .and_then(|v| v.as_str())
        .ok_or_else(|| cbtvault_xenapi::Error::Decode {
            field: "pool.get_all".into(),
            detail: format!("expected a list of one pool reference, got {refs:?}"),
        })?
        .to_string();
    let uuid = xapi_client
        .call(
            "pool.get_uuid",
            vec![cbtvault_xenapi::Value::from(pool.as_str())],
        )
        .await?;
    uuid.as_str()
        .map(str::to_string)
        .ok_or_else(|| cbtvault_xenapi::Error::Decode {
            field: "pool.get_uuid".into(),
            detail: format!("expected a string, got {uuid:?}"),
        })
}

/// A disk ready to be snapshotted: locked, reaped, CBT on, base found.
pub(crate) struct Prepared {
    disk: String,
    vdi: VdiRef,
    locks: Arc<DiskLocks>,
    latest: Option<RestorePointRow>,
    base: Option<VdiRef>,
    full_reason: Option<String>,
    /// Changed-block tracking works on this VDI. Without it (an SR or a
    /// licence without CBT, a RAW VDI) every run reads the disk whole and
    /// destroys its snapshot instead of keeping its metadata.
    cbt: bool,
    /// The VDI's snapshots before this run takes one.
    known: Vec<String>,
}

/// Why changed-block tracking cannot be enabled on a VDI, in the user's
/// words, when the pool says it never will be: the disk is then backed up
/// whole every time. `None` for any other failure.
fn cbt_unavailable(e: &cbtvault_xenapi::Error) -> Option<String> {
    Some(match e.xapi()? {
        XapiError::SrOperationNotSupported { .. } => {
            "its SR does not support changed-block tracking (SR_OPERATION_NOT_SUPPORTED)".into()
        }
        XapiError::LicenceRestriction { .. } => {
            "the pool's licence does not include changed-block tracking (LICENCE_RESTRICTION)"
                .into()
        }
        XapiError::SrBackendFailure { code: 66, .. } => {
            "it is a RAW VDI, which has no changed-block tracking (SR_BACKEND_FAILURE_66)".into()
        }
        _ => return None,
    })
}

/// Steps 1 and 2 for one VDI, and the base of the incremental.
pub(crate) async fn prepare(
    xapi_client: &Client,
    repo: &Arc<Repository>,
    vdi_uuid: &str,
    options: &XenOptions,
) -> Result<Prepared> {
    let pool = pool_uuid(xapi_client)
        .await
        .map_err(xapi(&former_disk_name(vdi_uuid), "reading the pool's uuid"))?;
    let name = DiskName {
        name: disk_name(&pool, vdi_uuid),
        former: Some(former_disk_name(vdi_uuid)),
    };
    let disk = name.name.clone();
    // Held across the hypervisor steps too: no two runs reap each other.
    let locks = crate::backup::lock_disk(repo, &disk).await?;
    let vdis = xapi_client.vdi();
    let vdi = vdis
        .get_by_uuid(vdi_uuid)
        .await
        .map_err(xapi(&disk, "looking up the VDI"))?;
    // Restore points under the former name are this VDI's whatever the
    // pool's address was then.
    let suffix = format!("/vdi/{vdi_uuid}");
    let latest = crate::rename::latest(repo, &name, move |m| {
        m.source.provider == "xenserver" && m.source.location.ends_with(&suffix)
    })
    .await?;
    let base_uuid = latest
        .as_ref()
        .and_then(|rp| rp.manifest.source.snapshot.clone());
    reap(
        xapi_client,
        repo.clone(),
        &disk,
        &vdi,
        latest.as_ref(),
        options,
    )
    .await?;
    // Read after reaping: it lists the snapshots that remain.
    let record = vdis
        .get_record(&vdi)
        .await
        .map_err(xapi(&disk, "reading the VDI record"))?;
    let mut full_reason = None;
    let mut cbt = true;
    if !record.cbt_enabled {
        match vdis.enable_cbt(&vdi).await {
            Ok(()) => {
                full_reason = Some(if latest.is_some() {
                    "changed-block tracking was off (disabled or lost); re-enabled".to_string()
                } else {
                    "changed-block tracking was just enabled".to_string()
                });
            }
            Err(e) => match cbt_unavailable(&e) {
                Some(why) => {
                    warn!(reason = %why, "no changed-block tracking; reading the whole disk");
                    cbt = false;
                    full_reason = Some(format!(
                        "changed-block tracking cannot be enabled: {why}; every backup of this \
                         disk reads it whole"
                    ));
                }
                None => return Err(xapi(&disk, "enabling changed-block tracking")(e)),
            },
        }
    }
    let base = match (&base_uuid, &full_reason) {
        (Some(uuid), None) => match vdis.get_by_uuid(uuid).await {
            Ok(r) => Some(r),
            Err(e) if is_missing(&e) => {
                full_reason = Some(format!("the previous snapshot {uuid} is gone"));
                None
            }
            Err(e) => return Err(xapi(&disk, "looking up the previous snapshot")(e)),
        },
        _ => None,
    };
    if latest.is_none() && full_reason.is_none() {
        full_reason = Some("first backup of this disk".into());
    }
    Ok(Prepared {
        disk,
        vdi,
        locks,
        latest,
        base,
        full_reason,
        cbt,
        known: record
            .snapshots
            .iter()
            .map(|r| r.as_str().to_string())
            .collect(),
    })
}

impl Prepared {
    /// Notes the snapshots that exist, so that one this run makes can be
    /// told apart if the run dies before tagging it. Returns the note's run.
    pub(crate) fn note_intent(&self, repo: &Repository) -> Result<i64> {
        let cat = repo.catalogue();
        let run = cat.start_run(SNAPSHOT_RUN, Some(&self.disk))?;
        cat.set_run_detail(run, &serde_json::to_string(&self.known).unwrap_or_default())?;
        Ok(run)
    }

    /// Steps 4 to 7 on `snapshot`, a fresh tagged snapshot of this disk.
    /// With `own_snapshot` false the snapshot belongs to a VM snapshot: the
    /// caller destroys that VM first, then finishes or destroys the VDI.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn back_up(
        &self,
        xapi_client: &Client,
        repo: &Arc<Repository>,
        snapshot: &VdiRef,
        options: &XenOptions,
        progress: Arc<dyn Progress>,
        cancel: CancellationToken,
        own_snapshot: bool,
    ) -> Result<BackupOutcome> {
        let result = back_up_snapshot(
            xapi_client,
            repo,
            &self.disk,
            &self.vdi,
            snapshot,
            self.base.as_ref(),
            self.full_reason.clone(),
            self.latest.as_ref().map(|l| l.manifest.virtual_size),
            options,
            progress,
            cancel,
            self.locks.clone(),
        )
        .await;
        match result {
            Ok(outcome) if own_snapshot => {
                self.finish(xapi_client, snapshot, options).await?;
                Ok(outcome)
            }
            Ok(outcome) => Ok(outcome),
            Err(e) if !own_snapshot => Err(e),
            Err(e) => {
                // Nothing was committed: the snapshot goes now, its CBT log
                // merging into the disk's, so the previous base stays valid.
                if let Err(d) = xapi_client.vdi().destroy(snapshot).await {
                    warn!(error = %d, snapshot = %snapshot.as_str(), "could not destroy the snapshot of a failed run; the next run reaps it");
                }
                Err(e)
            }
        }
    }

    /// Step 7: the irreversible steps, after commit and verification.
    pub(crate) async fn finish(
        &self,
        xapi_client: &Client,
        snapshot: &VdiRef,
        options: &XenOptions,
    ) -> Result<()> {
        if !self.cbt {
            // Nothing to keep: without CBT a snapshot's metadata is no base.
            // The NBD connection's dom0 VBD may linger a moment, as for
            // data_destroy.
            let mut pause = options.data_destroy_backoff;
            let tries = options.data_destroy_tries.max(1);
            for attempt in 1..=tries {
                match xapi_client.vdi().destroy(snapshot).await {
                    Ok(()) => break,
                    Err(e)
                        if matches!(e.xapi(), Some(XapiError::VdiInUse { .. }))
                            && attempt < tries =>
                    {
                        warn!(attempt, "snapshot still in use; retrying VDI.destroy");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(30));
                    }
                    Err(e) => {
                        return Err(xapi(&self.disk, "VDI.destroy of the new snapshot")(e));
                    }
                }
            }
            return Ok(());
        }
        finish(
            xapi_client,
            &self.disk,
            snapshot,
            self.base.as_ref(),
            options,
        )
        .await
    }
}

/// Backs up one VDI; see the module documentation for the steps.
pub async fn backup_vdi(
    xapi_client: &Client,
    repo: Arc<Repository>,
    vdi_uuid: &str,
    options: &XenOptions,
    progress: Arc<dyn Progress>,
    cancel: CancellationToken,
) -> Result<BackupOutcome> {
    let span = tracing::info_span!("vdi", job = %options.job, vdi = %vdi_uuid);
    async move {
        let prepared = prepare(xapi_client, &repo, vdi_uuid, options).await?;
        let disk = &prepared.disk;
        let vdis = xapi_client.vdi();
        let intent = prepared.note_intent(&repo)?;
        let snapshot = vdis.snapshot(&prepared.vdi, &BTreeMap::new()).await;
        let tagged = match &snapshot {
            Ok(snap) => vdis.add_to_other_config(snap, TAG_JOB, &options.job).await,
            Err(_) => Ok(()),
        };
        repo.catalogue().finish_run(intent, "done", None, "")?;
        let snapshot = snapshot.map_err(xapi(disk, "taking a snapshot"))?;
        if let Err(e) = tagged {
            let _ = vdis.destroy(&snapshot).await;
            return Err(xapi(disk, "tagging the snapshot")(e));
        }
        prepared
            .back_up(
                xapi_client,
                &repo,
                &snapshot,
                options,
                progress,
                cancel,
                true,
            )
            .await
    }
    .instrument(span)
    .await
}

#[allow(clippy::too_many_arguments)]
async fn back_up_snapshot(
    xapi_client: &Client,
    repo: &Arc<Repository>,
    disk: &str,
    vdi: &VdiRef,
    snapshot: &VdiRef,
    base: Option<&VdiRef>,
    mut full_reason: Option<String>,
    previous_size: Option<u64>,
    options: &XenOptions,
    progress: Arc<dyn Progress>,
    cancel: CancellationToken,
    locks: Arc<crate::backup::DiskLocks>,
) -> Result<BackupOutcome> {
    let vdis = xapi_client.vdi();
    let source_uuid = vdis
        .get_uuid(vdi)
        .await
        .map_err(xapi(disk, "reading the VDI uuid"))?;
    let snap = vdis
        .get_record(snapshot)
        .await
        .map_err(xapi(disk, "reading the snapshot"))?;
    if let Some(prev) = previous_size
        && snap.virtual_size < prev
        && full_reason.is_none()
    {
        full_reason = Some(format!(
            "the disk shrank from {prev} to {} bytes",
            snap.virtual_size
        ));
    }

    // Changed blocks come before NBD: xapi refuses them while vdi_to is in use.
    let changes = match (base, full_reason) {
        (Some(base), None) => match vdis.list_changed_blocks(base, snapshot).await {
            Ok(text) => match BlockMap::from_xenapi_base64(&text, snap.virtual_size) {
                Ok(map) => Changes::Blocks {
                    map,
                    origin: "xenapi-cbt".into(),
                },
                Err(e) => Changes::Full {
                    reason: Some(format!(
                        "VDI.list_changed_blocks returned an unusable bitmap: {e}"
                    )),
                },
            },
            Err(e)
                if matches!(
                    e.xapi(),
                    Some(XapiError::SrBackendFailure { code: 460, .. })
                ) =>
            {
                Changes::Full {
                    reason: Some(format!("the changed-block chain is broken: {e}")),
                }
            }
            Err(e) => return Err(xapi(disk, "VDI.list_changed_blocks")(e)),
        },
        (_, reason) => Changes::Full { reason },
    };
    if let Changes::Full { reason: Some(r) } = &changes {
        info!(reason = %r, "full backup");
    }

    let nbd = connect_nbd(xapi_client, disk, snapshot, options).await?;
    let source = NbdSource::from_client(
        nbd.clone(),
        SourceInfo {
            provider: "xenserver".into(),
            location: format!("{}/vdi/{source_uuid}", options.pool),
            snapshot: Some(snap.uuid.clone()),
            details: BTreeMap::from([
                ("vdi_name".to_string(), snap.name_label.clone()),
                ("job".to_string(), options.job.clone()),
            ]),
            ..Default::default()
        },
    )
    // The VDI's size, not the export's (whole sectors, see `with_size`).
    .with_size(snap.virtual_size);
    let source = match source {
        Ok(s) => s,
        Err(e) => {
            nbd.disconnect().await;
            return Err(e);
        }
    };
    let time = jiff::Timestamp::now();
    // What the check before data_destroy samples: the blocks just read.
    let focus = match &changes {
        Changes::Blocks { map, .. } => Some(map.clone()),
        Changes::Full { .. } => None,
    };
    let job = BackupJob {
        disk: disk.to_string(),
        changes,
        parent: Parent::Latest,
        time: Some(time),
        options: options.backup.clone(),
        held: Some(locks),
    };
    let outcome =
        crate::backup::backup(repo.clone(), Arc::new(source), job, progress, cancel).await;
    nbd.disconnect().await;
    let outcome = outcome?;
    verify_sample(
        xapi_client,
        repo,
        disk,
        snapshot,
        &RestorePointRow {
            id: outcome.restore_point.clone(),
            manifest: outcome.manifest.clone(),
        },
        options,
        focus.as_ref(),
    )
    .await?;
    Ok(outcome)
}

/// Opens NBD to `vdi` with the address and pinned certificate XAPI gives.
async fn connect_nbd(
    xapi_client: &Client,
    disk: &str,
    vdi: &VdiRef,
    options: &XenOptions,
) -> Result<NbdClient> {
    let infos = xapi_client
        .vdi()
        .get_nbd_info(vdi)
        .await
        .map_err(xapi(disk, "VDI.get_nbd_info"))?;
    let mut last = None;
    for info in &infos {
        match NbdClient::connect(&nbd_options(info, options)).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                warn!(address = %info.address, error = %e, "NBD host unreachable; trying the next");
                last = Some(e);
            }
        }
    }
    Err(Error::Source {
        disk: disk.to_string(),
        what: if infos.is_empty() {
            "VDI.get_nbd_info returned no NBD host: give a pool network the nbd purpose".into()
        } else {
            "no NBD host accepted the connection".into()
        },
        source: last.map(|e| Box::new(e) as crate::error::BoxError),
    })
}

fn nbd_options(info: &NbdInfo, options: &XenOptions) -> ConnectOptions {
    let mut o = ConnectOptions::tcp(info.address.clone(), info.port, info.exportname.clone())
        .with_tls(TlsOptions::pinned_pem(info.cert.clone()).with_server_name(info.subject.clone()));
    // xapi-nbd allows 16 connections per host and no multi-conn flag, so
    // parallelism comes from requests in flight.
    o.connections = options.nbd_connections.max(1);
    // xapi-nbd closes the connection after any error reply: a read that
    // failed that way is worth one more try on a new connection.
    o.server_error_retries = 3;
    o
}

/// Re-reads a sample of the blocks from the snapshot and checks that the
/// repository holds exactly them: the last look before data_destroy.
async fn verify_sample(
    xapi_client: &Client,
    repo: &Arc<Repository>,
    disk: &str,
    snapshot: &VdiRef,
    committed: &RestorePointRow,
    options: &XenOptions,
    focus: Option<&BlockMap>,
) -> Result<()> {
    let nbd = connect_nbd(xapi_client, disk, snapshot, options).await?;
    let result = crate::nbd::verify_sample(
        &nbd,
        repo,
        &committed.id,
        &committed.manifest,
        options.verify_samples,
        focus,
    )
    .await;
    nbd.disconnect().await;
    result
}

/// The irreversible steps, after commit and verification.
async fn finish(
    xapi_client: &Client,
    disk: &str,
    snapshot: &VdiRef,
    base: Option<&VdiRef>,
    options: &XenOptions,
) -> Result<()> {
    let vdis = xapi_client.vdi();
    let mut pause = options.data_destroy_backoff;
    for attempt in 1..=options.data_destroy_tries.max(1) {
        match vdis.data_destroy(snapshot).await {
            Ok(()) => break,
            Err(e)
                if matches!(e.xapi(), Some(XapiError::VdiInUse { .. }))
                    && attempt < options.data_destroy_tries =>
            {
                warn!(attempt, "snapshot still in use; retrying data_destroy");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(xapi(disk, "VDI.data_destroy of the new snapshot")(e)),
        }
    }
    if let Some(base) = base
        && base != snapshot
        && let Err(e) = vdis.destroy(base).await
    {
        // A leftover cbt_metadata VDI costs no data; the next run reaps it.
        warn!(error = %e, "could not destroy the previous base");
    }
    Ok(())
}

/// Cleans up after interrupted runs of this job on this VDI: snapshots
/// still holding data are destroyed (their logs merge into the disk's),
/// except the current base, whose restore point is committed: it only
/// missed its data_destroy, which happens now, after a check. Stale
/// cbt_metadata bases are destroyed. A snapshot whose run died before
/// tagging it is found through the run's note of the snapshots before it.
async fn reap(
    xapi_client: &Client,
    repo: Arc<Repository>,
    disk: &str,
    vdi: &VdiRef,
    latest: Option<&cbtvault_repo::RestorePointRow>,
    options: &XenOptions,
) -> Result<()> {
    let base_uuid = latest.and_then(|rp| rp.manifest.source.snapshot.as_deref());
    let vdis = xapi_client.vdi();
    let all = vdis
        .get_all_records()
        .await
        .map_err(xapi(disk, "listing VDIs"))?;
    let mut doomed: Vec<(VdiRef, String, bool, bool)> = Vec::new();
    for (r, rec) in &all {
        if rec.snapshot_of == *vdi && rec.other_config.get(TAG_JOB) == Some(&options.job) {
            doomed.push((
                r.clone(),
                rec.uuid.clone(),
                rec.vdi_type == VdiType::CbtMetadata,
                rec.cbt_enabled,
            ));
        }
    }
    let unfinished = repo.catalogue().unfinished_runs(SNAPSHOT_RUN, disk)?;
    for (run, detail) in unfinished {
        let known: Vec<String> = serde_json::from_str(&detail).unwrap_or_default();
        // The earliest untagged snapshot made after the note is that run's.
        let orphan = all
            .iter()
            .filter(|(r, rec)| {
                rec.snapshot_of == *vdi
                    && !rec.other_config.contains_key(TAG_JOB)
                    && !known.iter().any(|k| k == r.as_str())
            })
            .min_by(|a, b| a.1.snapshot_time.cmp(&b.1.snapshot_time));
        if let Some((r, rec)) = orphan {
            doomed.push((
                r.clone(),
                rec.uuid.clone(),
                rec.vdi_type == VdiType::CbtMetadata,
                rec.cbt_enabled,
            ));
        }
        repo.catalogue().finish_run(run, "reaped", None, "")?;
    }
    for (r, uuid, is_metadata, cbt_enabled) in doomed {
        let is_base = base_uuid == Some(uuid.as_str());
        let step = match (latest, is_metadata) {
            (Some(_), true) if is_base => continue,
            // Committed but killed before its data_destroy: check, then finish.
            // A snapshot without CBT is no base: it just goes.
            (Some(rp), false) if is_base && cbt_enabled => {
                verify_sample(xapi_client, &repo, disk, &r, rp, options, None).await?;
                vdis.data_destroy(&r).await
            }
            _ => vdis.destroy(&r).await,
        };
        match step {
            Ok(()) => {
                info!(snapshot = %uuid, base = is_base, "reaped a snapshot left by an interrupted run")
            }
            Err(e) => warn!(snapshot = %uuid, error = %e, "could not reap a leftover snapshot"),
        }
    }
    Ok(())
}
