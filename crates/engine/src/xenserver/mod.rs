//! XenServer / XCP-ng disks as [`Provider`]s: [`XenVdi`] backs up one VDI
//! from its own snapshot, [`XenVm`] every disk of a VM from one consistent
//! VM snapshot. The XenServer steps (reaping, CBT, snapshots, changed
//! blocks, NBD access, `data_destroy`) are in `cbtvault-xen`; here they
//! meet the repository: disk names and locks, the previous restore point
//! as the base, the crash journal kept in the repository, and the check of
//! a committed-but-unfinished base before it is finished.
//!
//! Any failure before the commit destroys the new snapshot; its
//! changed-block log is merged into the disk's, so nothing is lost and the
//! previous base still works (see ARCHITECTURE.md for the invariants).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cbtvault_repo::{Repository, RestorePointRow, Resumable, SourceInfo, VmInfo};
use cbtvault_xen::{Capture, Previous, VdiBackup, XenChanges};
use cbtvault_xenapi::{Client, VdiRef};
use tokio_util::sync::CancellationToken;

mod vm;

pub use cbtvault_xen::{Journal, NoteKind};
pub use cbtvault_xen::{TAG_JOB, disk_name, former_disk_name, pool_uuid};
pub use vm::{XenVm, backup_vm, save_vm_metadata};

use crate::backup::{BackupOptions, BackupOutcome, Changes, DiskLocks};
use crate::error::{BoxError, Error, Result};
use crate::nbd::NbdSource;
use crate::progress::Progress;
use crate::provider::{DriveContext, PreparedDisk, Provider, SharedProgress, drive};
use crate::rename::DiskName;

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

    fn xen(&self) -> cbtvault_xen::XenOptions {
        cbtvault_xen::XenOptions {
            job: self.job.clone(),
            nbd_connections: self.nbd_connections,
            data_destroy_tries: self.data_destroy_tries,
            data_destroy_backoff: self.data_destroy_backoff,
        }
    }

    fn drive_context(
        &self,
        parallel: usize,
        progress: Arc<dyn Progress>,
        cancel: CancellationToken,
    ) -> DriveContext {
        let mut ctx = DriveContext::new(
            self.backup.clone(),
            Arc::new(SharedProgress(progress)),
            cancel,
        );
        ctx.verify_samples = self.verify_samples;
        ctx.parallel = parallel;
        ctx
    }
}

/// A XenServer step's error, naming the disk or VM it concerned.
pub(crate) fn from_xen(e: cbtvault_xen::Error) -> Error {
    let (disk, what, source) = e.into_parts();
    Error::Source { disk, what, source }
}

fn xapi(disk: &str, what: &str) -> impl FnOnce(cbtvault_xenapi::Error) -> Error {
    let (disk, what) = (disk.to_string(), what.to_string());
    move |e| Error::Source {
        disk,
        what,
        source: Some(Box::new(e)),
    }
}

/// The crash journal, kept in the repository's `journal/` beside the
/// catalogue (kinds `xen-snapshot` and `xen-vm-snapshot`, the known
/// snapshots as a JSON list in the note's detail), which `repair` never
/// touches; notes earlier versions kept as catalogue runs are still read.
pub struct RepoJournal(pub Arc<Repository>);

impl Journal for RepoJournal {
    fn note(&self, kind: NoteKind, subject: &str, known: &[String]) -> Result<i64, BoxError> {
        let detail = serde_json::to_string(known)?;
        Ok(self.0.journal_note(kind.as_str(), subject, &detail)?)
    }

    fn unfinished(
        &self,
        kind: NoteKind,
        subject: &str,
    ) -> Result<Vec<(i64, Vec<String>)>, BoxError> {
        let notes = self.0.journal_unfinished(kind.as_str(), subject)?;
        // A note that cannot be read lists nothing: every untagged
        // snapshot is then taken for that run's.
        Ok(notes
            .into_iter()
            .map(|(id, detail)| (id, serde_json::from_str(&detail).unwrap_or_default()))
            .collect())
    }

    fn close(&self, note: i64, _status: &str) -> Result<(), BoxError> {
        Ok(self.0.journal_close(note)?)
    }
}

/// One VDI ready to be snapshotted, with its place in the repository.
pub(crate) struct XenDisk {
    name: DiskName,
    locks: Arc<DiskLocks>,
    backup: VdiBackup,
    /// What an interrupted run of this disk kept, when it builds on the
    /// same restore point as this run.
    resumable: Option<Resumable>,
}

/// Locks the disk, finds its last restore point, and has `cbtvault-xen`
/// reap and prepare the VDI. A base committed but never `data_destroy`ed
/// is checked against its restore point and finished here.
pub(crate) async fn prepare_disk(
    client: &Client,
    repo: &Arc<Repository>,
    pool: &str,
    vdi_uuid: &str,
    options: &XenOptions,
) -> Result<XenDisk> {
    let name = DiskName {
        name: disk_name(pool, vdi_uuid),
        former: Some(former_disk_name(vdi_uuid)),
    };
    let disk = name.name.clone();
    // Held across the hypervisor steps too: no two runs reap each other.
    let locks = crate::backup::lock_disk(repo, &disk).await?;
    // Restore points under the former name are this VDI's whatever the
    // pool's address was then.
    let suffix = format!("/vdi/{vdi_uuid}");
    let latest = crate::rename::latest(repo, &name, move |m| {
        m.source.provider == "xenserver" && m.source.location.ends_with(&suffix)
    })
    .await?;
    let previous = latest.as_ref().map(|rp| Previous {
        snapshot: rp.manifest.source.snapshot.clone(),
        size: rp.manifest.virtual_size,
    });
    let resumable = {
        let (repo, disk) = (repo.clone(), disk.clone());
        tokio::task::spawn_blocking(move || repo.resumable(&disk))
            .await
            .map_err(|e| Error::Internal(format!("reading the resume record: {e}")))??
            .filter(|r| r.parent == latest.as_ref().map(|rp| rp.id.clone()))
    };
    let journal = RepoJournal(repo.clone());
    let mut backup = VdiBackup::prepare(
        client,
        &disk,
        vdi_uuid,
        previous.as_ref(),
        resumable.as_ref().map(|r| r.snapshot.as_str()),
        &options.xen(),
        &journal,
    )
    .await
    .map_err(from_xen)?;
    if let (Some(base), Some(rp)) = (backup.unfinished_base().cloned(), &latest) {
        // Committed but killed before its data_destroy: check, then finish.
        check_snapshot(client, repo, &disk, &base, rp, options).await?;
        backup.finish_unfinished_base(client).await;
    }
    Ok(XenDisk {
        name,
        locks,
        backup,
        resumable,
    })
}

/// Re-reads a sample of `committed` from `snapshot` over NBD.
async fn check_snapshot(
    client: &Client,
    repo: &Arc<Repository>,
    disk: &str,
    snapshot: &VdiRef,
    committed: &RestorePointRow,
    options: &XenOptions,
) -> Result<()> {
    let nbd = cbtvault_xen::connect_nbd(client, disk, snapshot, options.nbd_connections)
        .await
        .map_err(from_xen)?;
    let result = crate::nbd::verify_sample(
        &nbd,
        repo,
        &committed.id,
        &committed.manifest,
        options.verify_samples,
        None,
    )
    .await;
    nbd.disconnect().await;
    result
}

/// A snapshot VDI to read.
pub struct XenView {
    disk: String,
    snapshot: VdiRef,
    info: SourceInfo,
    size: u64,
}

impl XenDisk {
    /// The prepared disk for `capture`, a fresh snapshot of it.
    fn prepared(
        &self,
        capture: Capture,
        options: &XenOptions,
        vm: Option<VmInfo>,
    ) -> PreparedDisk<XenView> {
        let changes = match capture.changes {
            XenChanges::Blocks(map) => Changes::Blocks {
                map,
                origin: "xenapi-cbt".into(),
            },
            XenChanges::Full(reason) => Changes::Full { reason },
        };
        PreparedDisk {
            disk: self.name.name.clone(),
            id: capture.vdi_uuid.clone(),
            locks: self.locks.clone(),
            changes,
            time: jiff::Timestamp::now(),
            connections: options.nbd_connections.max(1),
            vm: vm.clone(),
            resume: None,
            // Without CBT the snapshot is destroyed whole: nothing could
            // say later what changed since it.
            suspend_as: self.backup.cbt().then(|| capture.snapshot_uuid.clone()),
            view: XenView {
                disk: self.name.name.clone(),
                snapshot: capture.snapshot,
                info: SourceInfo {
                    provider: "xenserver".into(),
                    location: format!("{}/vdi/{}", options.pool, capture.vdi_uuid),
                    snapshot: Some(capture.snapshot_uuid),
                    details: BTreeMap::from([
                        ("vdi_name".to_string(), capture.name_label),
                        ("job".to_string(), options.job.clone()),
                    ]),
                    vm,
                },
                size: capture.virtual_size,
            },
        }
    }

    /// What the interrupted run kept, applied to `capture`: asks XenServer
    /// what changed between that run's snapshot and this one.
    async fn resume(
        &mut self,
        client: &Client,
        capture: &Capture,
    ) -> Option<cbtvault_repo::Resume> {
        let record = self.resumable.take()?;
        if record.size != capture.virtual_size {
            tracing::info!("the disk changed size since the interrupted run; not resuming it");
            return None;
        }
        let changed = self
            .backup
            .changed_since_resume(client, &capture.snapshot, capture.virtual_size)
            .await?;
        Some(record.resume(&changed))
    }

    /// Commits or aborts this disk's snapshot. An aborted snapshot whose
    /// blocks the repository kept for the next run (a resume record names
    /// it) keeps its changed-block log for that run.
    async fn finish(
        &self,
        client: &Client,
        repo: Option<&Arc<Repository>>,
        view: &XenView,
        committed: bool,
        options: &XenOptions,
    ) -> Result<()> {
        let options = options.xen();
        if committed {
            return self
                .backup
                .commit(client, &view.snapshot, &options)
                .await
                .map_err(from_xen);
        }
        let kept = match repo {
            Some(repo) => {
                let (repo, disk) = (repo.clone(), self.name.name.clone());
                tokio::task::spawn_blocking(move || repo.resumable(&disk))
                    .await
                    .ok()
                    .and_then(|r| r.ok().flatten())
                    .is_some_and(|r| Some(&r.snapshot) == view.info.snapshot.as_ref())
            }
            None => false,
        };
        if kept {
            self.backup.suspend(client, &view.snapshot, &options).await;
        } else {
            self.backup.abort(client, &view.snapshot, &options).await;
        }
        Ok(())
    }
}

/// Opens NBD on a snapshot VDI, sized as XAPI says.
async fn open_view(client: &Client, view: &XenView, options: &XenOptions) -> Result<NbdSource> {
    let nbd =
        cbtvault_xen::connect_nbd(client, &view.disk, &view.snapshot, options.nbd_connections)
            .await
            .map_err(from_xen)?;
    // The VDI's size, not the export's (whole sectors, see `with_size`).
    match NbdSource::from_client(nbd.clone(), view.info.clone()).with_size(view.size) {
        Ok(s) => Ok(s),
        Err(e) => {
            nbd.disconnect().await;
            Err(e)
        }
    }
}

/// One VDI from its own snapshot.
pub struct XenVdi<'a> {
    client: &'a Client,
    vdi_uuid: String,
    options: XenOptions,
    disk: Option<XenDisk>,
    /// The repository, once prepared (to find what an aborted read kept).
    repo: Option<Arc<Repository>>,
    /// The VM metadata saved by this VM-level run, if the VDI is one of a
    /// VM's disks backed up one by one.
    vm_metadata: Option<String>,
}

impl<'a> XenVdi<'a> {
    /// Records `id`, the VM metadata this run saved, with the restore point.
    pub fn with_vm_metadata(mut self, id: Option<String>) -> Self {
        self.vm_metadata = id;
        self
    }

    pub fn new(client: &'a Client, vdi_uuid: &str, options: &XenOptions) -> Self {
        XenVdi {
            client,
            vm_metadata: None,
            vdi_uuid: vdi_uuid.to_string(),
            options: options.clone(),
            disk: None,
            repo: None,
        }
    }
}

/// The VM a VDI is plugged into, if any (best effort: only for the record).
async fn vm_of_vdi(client: &Client, vdi: &VdiRef, pool: &str) -> Option<VmInfo> {
    let record = client.vdi().get_record(vdi).await.ok()?;
    for vbd in &record.vbds {
        let Ok(v) = client.vbd().get_record(vbd).await else {
            continue;
        };
        let Ok(vm) = client.vm().get_record(&v.vm).await else {
            continue;
        };
        if vm.is_control_domain || !v.vbd_type.eq_ignore_ascii_case("disk") {
            continue;
        }
        return Some(VmInfo {
            uuid: vm.uuid,
            name: vm.name_label,
            host: pool.to_string(),
            disk_label: Some(record.name_label).filter(|l| !l.is_empty()),
            device: Some(v.userdevice),
            metadata: None,
        });
    }
    None
}

impl Provider for XenVdi<'_> {
    type View = XenView;

    fn label(&self) -> String {
        format!("VDI {}", self.vdi_uuid)
    }

    async fn prepare(&mut self, repo: &Arc<Repository>) -> Result<Vec<PreparedDisk<XenView>>> {
        let client = self.client;
        let pool = pool_uuid(client).await.map_err(xapi(
            &former_disk_name(&self.vdi_uuid),
            "reading the pool's uuid",
        ))?;
        let mut disk = prepare_disk(client, repo, &pool, &self.vdi_uuid, &self.options).await?;
        self.repo = Some(repo.clone());
        let journal = RepoJournal(repo.clone());
        let capture = disk
            .backup
            .snapshot(client, &self.options.xen(), &journal)
            .await
            .map_err(from_xen)?;
        let vm = vm_of_vdi(client, disk.backup.vdi(), &pool)
            .await
            .map(|vm| VmInfo {
                metadata: self.vm_metadata.clone(),
                ..vm
            });
        let resume = disk.resume(client, &capture).await;
        let mut prepared = disk.prepared(capture, &self.options, vm);
        prepared.resume = resume;
        self.disk = Some(disk);
        Ok(vec![prepared])
    }

    async fn open(&self, view: &XenView) -> Result<NbdSource> {
        open_view(self.client, view, &self.options).await
    }

    async fn finish(
        &mut self,
        outcomes: Vec<(XenView, Option<RestorePointRow>)>,
    ) -> Vec<Result<()>> {
        // Taken: the disk's locks go when finish is done.
        let disk = self.disk.take();
        let mut out = Vec::new();
        for (view, committed) in outcomes {
            out.push(match &disk {
                Some(d) => {
                    d.finish(
                        self.client,
                        self.repo.as_ref(),
                        &view,
                        committed.is_some(),
                        &self.options,
                    )
                    .await
                }
                None => Err(Error::Internal("finish before prepare".into())),
            });
        }
        out
    }
}

/// Backs up one VDI from its own snapshot (see [`XenVdi`]).
pub async fn backup_vdi(
    xapi_client: &Client,
    repo: Arc<Repository>,
    vdi_uuid: &str,
    options: &XenOptions,
    progress: Arc<dyn Progress>,
    cancel: CancellationToken,
) -> Result<BackupOutcome> {
    let mut provider = XenVdi::new(xapi_client, vdi_uuid, options);
    let ctx = options.drive_context(1, progress, cancel);
    let runs = drive(&mut provider, repo, &ctx).await?;
    runs.into_iter()
        .next()
        .map(|r| r.outcome)
        .unwrap_or_else(|| Err(Error::Internal("a VDI backup prepared no disk".into())))
}
