//! One VDI's backup steps: prepare (reap, CBT, base), snapshot, changed
//! blocks, NBD access, and commit or abort.

use std::collections::BTreeMap;
use std::time::Duration;

use cbtvault_blockmap::BlockMap;
use cbtvault_nbd::{Client as NbdClient, ConnectOptions, TlsOptions};
use cbtvault_xenapi::{Client, NbdInfo, VdiRef, VdiType, XapiError};
use tracing::{info, warn};

use crate::error::{Error, Result, journal_error, xapi};
use crate::journal::{Journal, NoteKind};

/// `other_config` key naming the job that made a snapshot.
pub const TAG_JOB: &str = "cbtvault-job";

/// How to back up VDIs.
#[derive(Clone, Debug)]
pub struct XenOptions {
    /// The job's name: snapshots are tagged with it, and a job reaps only
    /// its own leftovers.
    pub job: String,
    /// NBD connections per disk.
    pub nbd_connections: usize,
    /// Tries of `data_destroy` (or `destroy`) while the VDI is still in use.
    pub data_destroy_tries: u32,
    /// First pause between those tries (doubling, at most 30 s).
    pub data_destroy_backoff: Duration,
}

impl XenOptions {
    /// Defaults for `job`.
    pub fn new(job: impl Into<String>) -> Self {
        XenOptions {
            job: job.into(),
            nbd_connections: 1,
            data_destroy_tries: 6,
            data_destroy_backoff: Duration::from_secs(1),
        }
    }
}

/// What the repository says about the disk's last backup.
#[derive(Clone, Debug, Default)]
pub struct Previous {
    /// The uuid of the snapshot it was taken from (the CBT base).
    pub snapshot: Option<String>,
    /// The disk's size then.
    pub size: u64,
}

/// The repository's name for a VDI's disk: `xen-POOL/VDI`, with the
/// pool's uuid, so that VDIs of two pools never share a disk (a replicated
/// SR brings its VDI uuids along), and the name survives a new pool master.
pub fn disk_name(pool_uuid: &str, vdi_uuid: &str) -> String {
    format!("xen-{pool_uuid}/{vdi_uuid}")
}

/// The name earlier versions gave a VDI's disk.
pub fn former_disk_name(vdi_uuid: &str) -> String {
    format!("xen-{vdi_uuid}")
}

/// The pool's uuid (a XAPI host belongs to exactly one pool).
pub async fn pool_uuid(client: &Client) -> std::result::Result<String, cbtvault_xenapi::Error> {
    let refs = client.call("pool.get_all", vec![]).await?;
    let pool = refs
        .as_array()
        .and_then(|a| a.first())
        .and_then(|v| v.as_str())
        .ok_or_else(|| cbtvault_xenapi::Error::Decode {
            field: "pool.get_all".into(),
            detail: format!("expected a list of one pool reference, got {refs:?}"),
        })?
        .to_string();
    let uuid = client
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

pub(crate) fn is_missing(e: &cbtvault_xenapi::Error) -> bool {
    e.xapi()
        .is_some_and(|x| matches!(x, XapiError::HandleInvalid { .. }) || x.code() == "UUID_INVALID")
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

/// Which blocks of a snapshot to read.
#[derive(Clone, Debug)]
pub enum XenChanges {
    /// Those `VDI.list_changed_blocks` marked since the base.
    Blocks(BlockMap),
    /// All of them, and why (no reason: the caller's own, e.g. none given).
    Full(Option<String>),
}

/// A fresh, tagged snapshot of a disk, with what to read from it.
#[derive(Clone, Debug)]
pub struct Capture {
    pub snapshot: VdiRef,
    /// The snapshot's uuid (recorded as the next run's base).
    pub snapshot_uuid: String,
    /// The VDI's uuid and name label.
    pub vdi_uuid: String,
    pub name_label: String,
    /// The VDI's size at the snapshot.
    pub virtual_size: u64,
    pub changes: XenChanges,
}

/// A VDI ready to be snapshotted: leftovers reaped, CBT on, base found.
/// The caller holds the disk's lock from [`VdiBackup::prepare`] until
/// [`VdiBackup::commit`] or [`VdiBackup::abort`] is done.
#[derive(Debug)]
pub struct VdiBackup {
    subject: String,
    vdi: VdiRef,
    vdi_uuid: String,
    base: Option<VdiRef>,
    full_reason: Option<String>,
    previous_size: Option<u64>,
    /// Changed-block tracking works on this VDI. Without it (an SR or a
    /// licence without CBT, a RAW VDI) every run reads the disk whole and
    /// destroys its snapshot instead of keeping its metadata.
    cbt: bool,
    /// The VDI's snapshots before this run takes one.
    known: Vec<String>,
    /// The base snapshot, committed but still holding data: its run died
    /// before its data_destroy.
    unfinished_base: Option<VdiRef>,
    /// The snapshot an interrupted run kept for this one to resume from.
    resume: Option<VdiRef>,
}

impl VdiBackup {
    /// Reaps what an interrupted run of this job left on VDI `vdi_uuid`,
    /// makes sure CBT is on, and finds the base of the incremental.
    /// `subject` is the disk's name in errors and in the journal; `resume`
    /// the uuid of a snapshot an interrupted run read part of and kept (as
    /// CBT metadata) for this run to resume from (see
    /// [`VdiBackup::changed_since_resume`]): reaping spares it.
    pub async fn prepare(
        client: &Client,
        subject: &str,
        vdi_uuid: &str,
        previous: Option<&Previous>,
        resume: Option<&str>,
        options: &XenOptions,
        journal: &dyn Journal,
    ) -> Result<VdiBackup> {
        let vdis = client.vdi();
        let vdi = vdis
            .get_by_uuid(vdi_uuid)
            .await
            .map_err(xapi(subject, "looking up the VDI"))?;
        let base_uuid = previous.and_then(|p| p.snapshot.clone());
        let kept = Kept {
            base: base_uuid.as_deref(),
            has_previous: previous.is_some(),
            resume,
        };
        let (unfinished_base, resume) =
            reap(client, subject, &vdi, &kept, options, journal).await?;
        // Read after reaping: it lists the snapshots that remain.
        let record = vdis
            .get_record(&vdi)
            .await
            .map_err(xapi(subject, "reading the VDI record"))?;
        let mut full_reason = None;
        let mut cbt = true;
        if !record.cbt_enabled {
            match vdis.enable_cbt(&vdi).await {
                Ok(()) => {
                    full_reason = Some(if previous.is_some() {
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
                    None => return Err(xapi(subject, "enabling changed-block tracking")(e)),
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
                Err(e) => return Err(xapi(subject, "looking up the previous snapshot")(e)),
            },
            _ => None,
        };
        if previous.is_none() && full_reason.is_none() {
            full_reason = Some("first backup of this disk".into());
        }
        Ok(VdiBackup {
            subject: subject.to_string(),
            vdi,
            vdi_uuid: vdi_uuid.to_string(),
            base,
            full_reason,
            previous_size: previous.map(|p| p.size),
            cbt,
            known: record
                .snapshots
                .iter()
                .map(|r| r.as_str().to_string())
                .collect(),
            unfinished_base,
            resume,
        })
    }

    /// The blocks that changed between the snapshot an interrupted run
    /// kept (see [`Previous::resume`]) and `snapshot`, a fresh one of
    /// `size` bytes; `None` (logged) when there is no such snapshot or
    /// XenServer cannot say, and the run reads what it would have read
    /// anyway. Called before NBD is opened, like [`VdiBackup::changes`].
    pub async fn changed_since_resume(
        &self,
        client: &Client,
        snapshot: &VdiRef,
        size: u64,
    ) -> Option<BlockMap> {
        let kept = self.resume.as_ref()?;
        let text = match client.vdi().list_changed_blocks(kept, snapshot).await {
            Ok(text) => text,
            Err(e) => {
                warn!(error = %e, "cannot tell what changed since the interrupted run; not resuming it");
                return None;
            }
        };
        match BlockMap::from_xenapi_base64(&text, size) {
            Ok(map) => Some(map),
            Err(e) => {
                warn!(error = %e, "VDI.list_changed_blocks since the interrupted run returned an unusable bitmap; not resuming it");
                None
            }
        }
    }
    /// The disk's name, as given to [`VdiBackup::prepare`].
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The VDI.
    pub fn vdi(&self) -> &VdiRef {
        &self.vdi
    }

    /// The VDI's uuid.
    pub fn vdi_uuid(&self) -> &str {
        &self.vdi_uuid
    }

    /// Whether changed-block tracking works on this VDI.
    pub fn cbt(&self) -> bool {
        self.cbt
    }

    /// The previous run's snapshot, committed but killed before its
    /// `data_destroy`: the caller checks it against the repository (see
    /// [`connect_nbd`]) and then calls [`VdiBackup::finish_unfinished_base`].
    pub fn unfinished_base(&self) -> Option<&VdiRef> {
        self.unfinished_base.as_ref()
    }

    /// `data_destroy` of the [`VdiBackup::unfinished_base`], once checked.
    /// A failure is logged: the next run tries again.
    pub async fn finish_unfinished_base(&mut self, client: &Client) {
        if let Some(r) = self.unfinished_base.take() {
            match client.vdi().data_destroy(&r).await {
                Ok(()) => {
                    info!(snapshot = %r.as_str(), base = true, "reaped a snapshot left by an interrupted run")
                }
                Err(e) => {
                    warn!(snapshot = %r.as_str(), error = %e, "could not reap a leftover snapshot")
                }
            }
        }
    }

    pub(crate) fn note(&self, journal: &dyn Journal) -> Result<i64> {
        journal
            .note(NoteKind::VdiSnapshot, &self.subject, &self.known)
            .map_err(crate::error::journal_error(
                &self.subject,
                "noting the snapshot about to be taken",
            ))
    }

    pub(crate) fn close(&self, journal: &dyn Journal, note: i64) -> Result<()> {
        journal
            .close(note, "done")
            .map_err(crate::error::journal_error(
                &self.subject,
                "closing the snapshot's note",
            ))
    }

    /// `VDI.snapshot`, tagged with the job, noted in `journal` first, then
    /// the changed blocks since the base.
    pub async fn snapshot(
        &self,
        client: &Client,
        options: &XenOptions,
        journal: &dyn Journal,
    ) -> Result<Capture> {
        let vdis = client.vdi();
        let note = self.note(journal)?;
        let snapshot = vdis.snapshot(&self.vdi, &BTreeMap::new()).await;
        let tagged = match &snapshot {
            Ok(snap) => vdis.add_to_other_config(snap, TAG_JOB, &options.job).await,
            Err(_) => Ok(()),
        };
        self.close(journal, note)?;
        let snapshot = snapshot.map_err(xapi(&self.subject, "taking a snapshot"))?;
        if let Err(e) = tagged {
            let _ = vdis.destroy(&snapshot).await;
            return Err(xapi(&self.subject, "tagging the snapshot")(e));
        }
        match self.changes(client, &snapshot).await {
            Ok(c) => Ok(c),
            Err(e) => {
                self.abort(client, &snapshot, options).await;
                Err(e)
            }
        }
    }

    /// What to read from `snapshot`, a fresh tagged snapshot of this VDI.
    /// Called before NBD is opened: xapi refuses changed blocks while the
    /// snapshot is in use.
    pub async fn changes(&self, client: &Client, snapshot: &VdiRef) -> Result<Capture> {
        let subject = &self.subject;
        let vdis = client.vdi();
        let snap = vdis
            .get_record(snapshot)
            .await
            .map_err(xapi(subject, "reading the snapshot"))?;
        let mut full_reason = self.full_reason.clone();
        if let Some(prev) = self.previous_size
            && snap.virtual_size < prev
            && full_reason.is_none()
        {
            full_reason = Some(format!(
                "the disk shrank from {prev} to {} bytes",
                snap.virtual_size
            ));
        }
        let changes = match (&self.base, full_reason) {
            (Some(base), None) => match vdis.list_changed_blocks(base, snapshot).await {
                Ok(text) => match BlockMap::from_xenapi_base64(&text, snap.virtual_size) {
                    Ok(map) => XenChanges::Blocks(map),
                    Err(e) => XenChanges::Full(Some(format!(
                        "VDI.list_changed_blocks returned an unusable bitmap: {e}"
                    ))),
                },
                Err(e)
                    if matches!(
                        e.xapi(),
                        Some(XapiError::SrBackendFailure { code: 460, .. })
                    ) =>
                {
                    XenChanges::Full(Some(format!("the changed-block chain is broken: {e}")))
                }
                Err(e) => return Err(xapi(subject, "VDI.list_changed_blocks")(e)),
            },
            (_, reason) => XenChanges::Full(reason),
        };
        if let XenChanges::Full(Some(r)) = &changes {
            info!(reason = %r, "full backup");
        }
        Ok(Capture {
            snapshot: snapshot.clone(),
            snapshot_uuid: snap.uuid,
            vdi_uuid: self.vdi_uuid.clone(),
            name_label: snap.name_label,
            virtual_size: snap.virtual_size,
            changes,
        })
    }

    /// The irreversible steps, once the restore point of `snapshot` is
    /// committed and checked: `data_destroy` of the snapshot (retrying
    /// `VDI_IN_USE`), then `destroy` of the previous base. Without CBT the
    /// snapshot is destroyed whole: its metadata would be no base.
    pub async fn commit(
        &self,
        client: &Client,
        snapshot: &VdiRef,
        options: &XenOptions,
    ) -> Result<()> {
        let vdis = client.vdi();
        if !self.cbt {
            return retry_in_use(options, "VDI.destroy", || vdis.destroy(snapshot))
                .await
                .map_err(xapi(&self.subject, "VDI.destroy of the new snapshot"));
        }
        retry_in_use(options, "VDI.data_destroy", || vdis.data_destroy(snapshot))
            .await
            .map_err(xapi(&self.subject, "VDI.data_destroy of the new snapshot"))?;
        if let Some(base) = &self.base
            && base != snapshot
            && let Err(e) = vdis.destroy(base).await
        {
            // A leftover cbt_metadata VDI costs no data; the next run reaps it.
            warn!(error = %e, "could not destroy the previous base");
        }
        self.drop_resume(client, snapshot).await;
        Ok(())
    }

    /// Destroys the snapshot kept for resuming, once it no longer is.
    async fn drop_resume(&self, client: &Client, snapshot: &VdiRef) {
        if let Some(kept) = &self.resume
            && kept != snapshot
            && Some(kept) != self.base.as_ref()
            && let Err(e) = client.vdi().destroy(kept).await
        {
            warn!(error = %e, "could not destroy the snapshot kept for resuming; the next run reaps it");
        }
    }

    /// Nothing was committed, but the repository kept what was read from
    /// `snapshot` for the next run to resume: the snapshot's data goes
    /// (`data_destroy`, retrying `VDI_IN_USE`) and its changed-block log
    /// stays, for that run to ask what changed since. The previous base
    /// stays valid. A failure is logged: the next run finishes the step.
    pub async fn suspend(&self, client: &Client, snapshot: &VdiRef, options: &XenOptions) {
        if !self.cbt {
            return self.abort(client, snapshot, options).await;
        }
        let vdis = client.vdi();
        match retry_in_use(options, "VDI.data_destroy", || vdis.data_destroy(snapshot)).await {
            Ok(()) => self.drop_resume(client, snapshot).await,
            Err(e) => {
                warn!(error = %e, snapshot = %snapshot.as_str(), "could not data_destroy the snapshot of an interrupted run; the next run does");
            }
        }
    }

    /// Nothing was committed: the snapshot goes now, its changed-block log
    /// merging into the disk's, so the previous base stays valid. A failure
    /// is logged: the next run reaps the snapshot.
    pub async fn abort(&self, client: &Client, snapshot: &VdiRef, options: &XenOptions) {
        // The NBD connection's dom0 VBD may linger a moment after the
        // disconnect (VDI_IN_USE), as for data_destroy: retried alike, so
        // that a stopped run leaves no snapshot holding data.
        let vdis = client.vdi();
        if let Err(d) = retry_in_use(options, "VDI.destroy", || vdis.destroy(snapshot)).await {
            warn!(error = %d, snapshot = %snapshot.as_str(), "could not destroy the snapshot of a failed run; the next run reaps it");
        }
    }
}

/// Calls `step` until it succeeds, retrying `VDI_IN_USE` (the NBD
/// connection's dom0 VBD may linger a moment after the disconnect).
async fn retry_in_use<F, Fut>(
    options: &XenOptions,
    what: &str,
    mut step: F,
) -> std::result::Result<(), cbtvault_xenapi::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<(), cbtvault_xenapi::Error>>,
{
    let mut pause = options.data_destroy_backoff;
    let tries = options.data_destroy_tries.max(1);
    let mut attempt = 1;
    loop {
        match step().await {
            Err(e) if matches!(e.xapi(), Some(XapiError::VdiInUse { .. })) && attempt < tries => {
                warn!(attempt, "snapshot still in use; retrying {what}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(30));
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// NBD connect options for each host that serves `vdi`, with the address
/// and pinned certificate XAPI gives.
pub async fn nbd_connect_options(
    client: &Client,
    subject: &str,
    vdi: &VdiRef,
    connections: usize,
) -> Result<Vec<ConnectOptions>> {
    let infos = client
        .vdi()
        .get_nbd_info(vdi)
        .await
        .map_err(xapi(subject, "VDI.get_nbd_info"))?;
    Ok(infos.iter().map(|i| nbd_options(i, connections)).collect())
}

fn nbd_options(info: &NbdInfo, connections: usize) -> ConnectOptions {
    let mut o = ConnectOptions::tcp(info.address.clone(), info.port, info.exportname.clone())
        .with_tls(TlsOptions::pinned_pem(info.cert.clone()).with_server_name(info.subject.clone()));
    // xapi-nbd allows 16 connections per host and sets no multi-conn
    // flag; a snapshot never changes, so several connections are safe.
    o.connections = connections.max(1);
    o.immutable = true;
    // xapi-nbd closes the connection after any error reply: a read that
    // failed that way is worth one more try on a new connection.
    o.server_error_retries = 3;
    o
}

/// Opens NBD to `vdi` on the first host that accepts.
pub async fn connect_nbd(
    client: &Client,
    subject: &str,
    vdi: &VdiRef,
    connections: usize,
) -> Result<NbdClient> {
    let options = nbd_connect_options(client, subject, vdi, connections).await?;
    let mut last = None;
    for o in &options {
        match NbdClient::connect(o).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                warn!(address = ?o.address, error = %e, "NBD host unreachable; trying the next");
                last = Some(e);
            }
        }
    }
    Err(Error::Nbd {
        subject: subject.to_string(),
        what: if options.is_empty() {
            "VDI.get_nbd_info returned no NBD host: give a pool network the nbd purpose".into()
        } else {
            "no NBD host accepted the connection".into()
        },
        source: last.map(Box::new),
    })
}

/// Cleans up after interrupted runs of this job on this VDI: snapshots
/// still holding data are destroyed (their logs merge into the disk's),
/// except the current base, whose restore point is committed: it only
/// missed its data_destroy, which the caller does after a check (returned).
/// Stale cbt_metadata bases are destroyed. A snapshot whose run died before
/// tagging it is found through the run's note of the snapshots before it.
/// The snapshots of a job that reaping keeps.
struct Kept<'a> {
    /// The base of the next incremental.
    base: Option<&'a str>,
    /// Whether the disk has a restore point at all.
    has_previous: bool,
    /// The snapshot an interrupted run kept for resuming.
    resume: Option<&'a str>,
}

/// Returns the base if it still holds data (see
/// [`VdiBackup::unfinished_base`]) and the snapshot kept for resuming.
async fn reap(
    client: &Client,
    subject: &str,
    vdi: &VdiRef,
    kept: &Kept<'_>,
    options: &XenOptions,
    journal: &dyn Journal,
) -> Result<(Option<VdiRef>, Option<VdiRef>)> {
    let (base_uuid, has_previous) = (kept.base, kept.has_previous);
    let vdis = client.vdi();
    let all = vdis
        .get_all_records()
        .await
        .map_err(xapi(subject, "listing VDIs"))?;
    let mut doomed: Vec<(VdiRef, String, bool, bool)> = Vec::new();
    let entry = |r: &VdiRef, rec: &cbtvault_xenapi::VdiRecord| {
        (
            r.clone(),
            rec.uuid.clone(),
            rec.vdi_type == VdiType::CbtMetadata,
            rec.cbt_enabled,
        )
    };
    for (r, rec) in &all {
        if rec.snapshot_of == *vdi && rec.other_config.get(TAG_JOB) == Some(&options.job) {
            doomed.push(entry(r, rec));
        }
    }
    let unfinished = journal
        .unfinished(NoteKind::VdiSnapshot, subject)
        .map_err(journal_err(subject))?;
    for (note, known) in unfinished {
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
            doomed.push(entry(r, rec));
        }
        journal.close(note, "reaped").map_err(journal_error(
            subject,
            "closing a note of an interrupted run",
        ))?;
    }
    let (mut unfinished_base, mut resume) = (None, None);
    for (r, uuid, is_metadata, cbt_enabled) in doomed {
        let is_base = base_uuid == Some(uuid.as_str());
        if kept.resume == Some(uuid.as_str()) && !is_base && cbt_enabled {
            // Its changed-block log is what the resume needs; its data,
            // if the interrupted run could not remove it, goes now.
            if is_metadata {
                resume = Some(r);
            } else {
                match vdis.data_destroy(&r).await {
                    Ok(()) => resume = Some(r),
                    Err(e) => {
                        warn!(snapshot = %uuid, error = %e, "could not data_destroy the snapshot kept for resuming; destroying it");
                        if let Err(e) = vdis.destroy(&r).await {
                            warn!(snapshot = %uuid, error = %e, "could not reap a leftover snapshot");
                        }
                    }
                }
            }
            continue;
        }
        let step = match (has_previous, is_metadata) {
            (true, true) if is_base => continue,
            // Committed but killed before its data_destroy: the caller
            // checks, then finishes. A snapshot without CBT is no base: it
            // just goes.
            (true, false) if is_base && cbt_enabled => {
                unfinished_base = Some(r);
                continue;
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
    Ok((unfinished_base, resume))
}

fn journal_err(subject: &str) -> impl FnOnce(crate::error::BoxError) -> Error {
    journal_error(subject, "reading the notes of interrupted runs")
}
