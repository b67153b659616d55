//! One lifecycle for every hypervisor, and the one function that drives it.
//!
//! A [`Provider`] backs up one *capture*: one VDI, the disks of one VM
//! snapshot, or one QEMU node. [`drive`] runs it:
//!
//! 1. [`Provider::prepare`]: take the disks' locks, clean up what an
//!    interrupted run left, make a point-in-time view of each disk, and say
//!    per disk which blocks changed — or that the read is full, and why;
//! 2. per disk (up to [`DriveContext::parallel`] at once, each holding its
//!    NBD connections' worth of every [`Slots`] limit): [`Provider::open`]
//!    the view, [`backup()`](crate::backup()) it, and open it again to check
//!    a sample of the committed restore point against the view — and, for
//!    an incremental, to audit a sample of the blocks the change source
//!    reported unchanged ([`crate::audit`]: a mismatch fails the disk,
//!    forgets its restore point and makes its next backup a full);
//! 3. one [`Provider::finish`] with every disk's committed and checked
//!    restore point — commit: the irreversible steps — or `None` — abort:
//!    nothing lost, the previous base kept. The provider orders steps that
//!    concern the whole capture (a snapshot VM goes before any VDI's
//!    `data_destroy`).
//!
//! Cancellation skips to `finish` with `None` for every disk not yet
//! committed; that `finish` is bounded by [`DriveContext::abort_timeout`],
//! and what it could not clean up is logged for the next run to reap. A
//! `prepare` still running gets the same bound after the cancellation.

use std::sync::Arc;
use std::time::Duration;

use cbtvault_repo::{Repository, RestorePointRow, Resume, VmInfo};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, warn};

use crate::backup::{BackupJob, BackupOptions, BackupOutcome, Changes, DiskLocks, Parent};
use crate::error::{Error, Result};
use crate::nbd::NbdSource;
use crate::progress::Progress;

/// One disk of a capture, ready to be read.
pub struct PreparedDisk<V> {
    /// The disk's name in the repository.
    pub disk: String,
    /// The hypervisor's name for it (VDI uuid, QEMU node).
    pub id: String,
    /// Held from prepare until finish is done.
    pub locks: Arc<DiskLocks>,
    /// What to read.
    pub changes: Changes,
    /// The instant of the point-in-time view.
    pub time: jiff::Timestamp,
    /// NBD connections a read opens (permits taken of each [`Slots`] limit).
    pub connections: usize,
    /// The VM the disk belongs to, when known.
    pub vm: Option<VmInfo>,
    /// What an interrupted backup of the disk kept, applied to this view
    /// (see [`BackupJob::resume`]).
    pub resume: Option<Resume>,
    /// The view's name for a resume record, when the provider can later
    /// say what changed since this view (see [`BackupJob::suspend_as`]).
    pub suspend_as: Option<String>,
    /// The provider's handle on the view.
    pub view: V,
}

/// A hypervisor's side of a backup; see the module documentation.
pub trait Provider: Send + Sync {
    /// A point-in-time view of one disk.
    type View: Send + Sync + 'static;

    /// What the capture is, for logs and per-disk results (`VDI UUID`).
    fn label(&self) -> String;

    /// Locks, cleans up, makes the views and says what changed. On error
    /// nothing is left behind (or it is logged for the next run to reap).
    fn prepare(
        &mut self,
        repo: &Arc<Repository>,
    ) -> impl Future<Output = Result<Vec<PreparedDisk<Self::View>>>> + Send;

    /// A source on `view`: called to read, and again for the check before
    /// the irreversible steps.
    fn open(&self, view: &Self::View) -> impl Future<Output = Result<NbdSource>> + Send;

    /// Commits (`Some`: the disk's restore point, committed and checked)
    /// or aborts (`None`) every disk of the capture; one result per disk,
    /// in order. Called once; the provider lets go of every lock it holds.
    fn finish(
        &mut self,
        outcomes: Vec<(Self::View, Option<RestorePointRow>)>,
    ) -> impl Future<Output = Vec<Result<()>>> + Send;
}

/// Makes the progress sink of each disk.
pub trait ProgressFactory: Send + Sync {
    fn disk(&self, disk: &str) -> Arc<dyn Progress>;
}

/// Every disk reports to the same sink.
pub struct SharedProgress(pub Arc<dyn Progress>);

impl ProgressFactory for SharedProgress {
    fn disk(&self, _disk: &str) -> Arc<dyn Progress> {
        self.0.clone()
    }
}

/// A limit on NBD connections or on disks (per job, per pool or host,
/// overall); clones share it.
#[derive(Clone, Debug)]
pub struct Limit {
    semaphore: Arc<Semaphore>,
    size: usize,
    /// A disk takes one permit per NBD connection (else one per disk).
    per_connection: bool,
}

impl Limit {
    /// At most `size` NBD connections at once (at least one).
    pub fn new(size: usize) -> Limit {
        let size = size.clamp(1, Semaphore::MAX_PERMITS);
        Limit {
            semaphore: Arc::new(Semaphore::new(size)),
            size,
            per_connection: true,
        }
    }

    /// At most `size` disks at once, however many connections each opens.
    pub fn disks(size: usize) -> Limit {
        Limit {
            per_connection: false,
            ..Limit::new(size)
        }
    }

    /// Permits free now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }
}

/// The limits a disk's read must fit in: it holds as many permits of each
/// as it opens NBD connections (at most the limit's size, so a disk wider
/// than a limit still runs, alone), taken in list order so that two
/// readers never hold each other's permits crosswise.
#[derive(Clone, Debug, Default)]
pub struct Slots(pub Vec<Limit>);

impl Slots {
    /// No limit.
    pub fn none() -> Slots {
        Slots(Vec::new())
    }

    /// Takes the permits of `n` connections, or stops on `cancel`.
    pub async fn acquire(
        &self,
        n: usize,
        cancel: &CancellationToken,
    ) -> Result<Vec<OwnedSemaphorePermit>> {
        let mut held = Vec::with_capacity(self.0.len());
        for limit in &self.0 {
            let per_disk = if limit.per_connection { n } else { 1 };
            let want = u32::try_from(per_disk.clamp(1, limit.size)).unwrap_or(u32::MAX);
            tokio::select! {
                permit = limit.semaphore.clone().acquire_many_owned(want) => match permit {
                    Ok(p) => held.push(p),
                    Err(_) => return Err(Error::Internal("a connection limit was closed".into())),
                },
                () = cancel.cancelled() => return Err(Error::Cancelled),
            }
        }
        Ok(held)
    }
}

/// How [`drive`] runs a capture.
#[derive(Clone)]
pub struct DriveContext {
    pub backup: BackupOptions,
    /// Blocks re-read from the view before the irreversible steps.
    pub verify_samples: usize,
    /// Blocks the change source reported unchanged that an incremental
    /// re-reads from the view to check the report (0: none); see
    /// [`crate::audit`].
    pub audit_samples: usize,
    /// Disks of one capture read at once.
    pub parallel: usize,
    pub slots: Slots,
    pub progress: Arc<dyn ProgressFactory>,
    pub cancel: CancellationToken,
    /// How long the abort after a cancellation may take.
    pub abort_timeout: Duration,
}

impl DriveContext {
    /// One disk at a time, no limits, 16 samples checked and 16 audited, a
    /// minute to abort.
    pub fn new(
        backup: BackupOptions,
        progress: Arc<dyn ProgressFactory>,
        cancel: CancellationToken,
    ) -> DriveContext {
        DriveContext {
            backup,
            verify_samples: 16,
            audit_samples: 16,
            parallel: 1,
            slots: Slots::none(),
            progress,
            cancel,
            abort_timeout: Duration::from_secs(60),
        }
    }
}

/// What became of one disk of a capture.
#[derive(Debug)]
pub struct DiskRun {
    /// The disk's name in the repository.
    pub disk: String,
    /// The hypervisor's name for it.
    pub id: String,
    pub vm: Option<VmInfo>,
    /// Why the read was full, when it was.
    pub full_reason: Option<String>,
    pub outcome: Result<BackupOutcome>,
}

/// Backs up every disk of `provider`'s capture; see the module
/// documentation. An error is the capture's (prepare failed, nothing was
/// read); each disk's own outcome is in its [`DiskRun`].
pub async fn drive<P: Provider>(
    provider: &mut P,
    repo: Arc<Repository>,
    ctx: &DriveContext,
) -> Result<Vec<DiskRun>> {
    let span = tracing::info_span!("capture", what = %provider.label());
    async move {
        // Preparing may wait on the hypervisor (a quiesced snapshot, a
        // long task); after a cancellation it gets the abort's bound, then
        // is dropped and the next run reaps what it left.
        let cancelled_long_ago = async {
            ctx.cancel.cancelled().await;
            tokio::time::sleep(ctx.abort_timeout).await;
        };
        let mut prepared = tokio::select! {
            prepared = provider.prepare(&repo) => prepared?,
            () = cancelled_long_ago => {
                warn!(
                    seconds = ctx.abort_timeout.as_secs(),
                    "preparing took too long after the cancellation; the next run reaps what it left"
                );
                return Err(Error::Cancelled);
            }
        };
        // A failed CBT audit asked for this backup to be full.
        let mut audits = Vec::with_capacity(prepared.len());
        for d in &mut prepared {
            let pending = crate::audit::pending(&repo, &d.disk).await;
            if let Some(p) = &pending {
                d.changes = Changes::Full {
                    reason: Some(p.reason.clone()),
                };
                // The change source failed its audit: what it says changed
                // since an interrupted run is no ground to keep blocks.
                d.resume = None;
            }
            audits.push(pending.map(|p| p.notes));
        }
        let reads: Vec<Result<BackupOutcome>> = {
            let shared: &P = provider;
            futures::stream::iter(prepared.iter())
                .map(|d| read_disk(shared, &repo, ctx, d))
                .buffered(ctx.parallel.max(1))
                .collect()
                .await
        };
        let mut runs = Vec::with_capacity(prepared.len());
        let mut outcomes = Vec::with_capacity(prepared.len());
        let mut locks = Vec::with_capacity(prepared.len());
        for (d, read) in prepared.into_iter().zip(reads) {
            let committed = read.as_ref().ok().map(|o| RestorePointRow {
                id: o.restore_point.clone(),
                manifest: o.manifest.clone(),
            });
            outcomes.push((d.view, committed));
            locks.push(d.locks);
            runs.push(DiskRun {
                full_reason: match &d.changes {
                    Changes::Full { reason } => reason.clone(),
                    Changes::Blocks { .. } => None,
                },
                disk: d.disk,
                id: d.id,
                vm: d.vm,
                outcome: read,
            });
        }
        let finished = if ctx.cancel.is_cancelled() {
            match tokio::time::timeout(ctx.abort_timeout, provider.finish(outcomes)).await {
                Ok(f) => f,
                Err(_) => {
                    warn!(
                        seconds = ctx.abort_timeout.as_secs(),
                        "cleaning up after the cancellation took too long; the next run reaps what is left"
                    );
                    Vec::new()
                }
            }
        } else {
            provider.finish(outcomes).await
        };
        for (run, step) in runs.iter_mut().zip(finished) {
            if let (Ok(_), Err(e)) = (&run.outcome, step) {
                run.outcome = Err(e);
            }
        }
        for (run, notes) in runs.iter().zip(audits) {
            if let (Ok(_), Some(notes)) = (&run.outcome, notes) {
                crate::audit::close(&repo, &run.disk, notes).await;
            }
        }
        // The disks stay locked until the hypervisor side is finished.
        drop(locks);
        Ok(runs)
    }
    .instrument(span)
    .await
}

/// Reads one disk, commits its restore point and checks it against the view.
async fn read_disk<P: Provider>(
    provider: &P,
    repo: &Arc<Repository>,
    ctx: &DriveContext,
    d: &PreparedDisk<P::View>,
) -> Result<BackupOutcome> {
    if ctx.cancel.is_cancelled() {
        return Err(Error::Cancelled);
    }
    let _permits = ctx.slots.acquire(d.connections, &ctx.cancel).await?;
    let source = provider.open(&d.view).await?;
    let client = source.client().clone();
    // What the check samples: the blocks just read.
    let focus = match &d.changes {
        Changes::Blocks { map, .. } => Some(map.clone()),
        Changes::Full { .. } => None,
    };
    let job = BackupJob {
        disk: d.disk.clone(),
        changes: d.changes.clone(),
        parent: Parent::Latest,
        time: Some(d.time),
        options: ctx.backup.clone(),
        held: Some(d.locks.clone()),
        resume: d.resume.clone(),
        suspend_as: d.suspend_as.clone(),
    };
    let progress = ctx.progress.disk(&d.disk);
    let outcome = crate::backup::backup(
        repo.clone(),
        Arc::new(source),
        job,
        progress,
        ctx.cancel.clone(),
    )
    .await;
    client.disconnect().await;
    let outcome = outcome?;
    let check = provider.open(&d.view).await?;
    let checked = check_view(check.client(), repo, ctx, &outcome, focus.as_ref()).await;
    check.client().disconnect().await;
    match checked? {
        differ if differ.is_empty() => Ok(outcome),
        differ => Err(crate::audit::failed(repo, &d.disk, &outcome.restore_point, differ).await),
    }
}

/// Checks a sample of the blocks just read, then audits a sample of those
/// the change source reported unchanged (`changed`, for an incremental);
/// returns the offsets the audit found different.
async fn check_view(
    nbd: &cbtvault_nbd::Client,
    repo: &Arc<Repository>,
    ctx: &DriveContext,
    outcome: &BackupOutcome,
    changed: Option<&cbtvault_blockmap::BlockMap>,
) -> Result<Vec<u64>> {
    crate::nbd::verify_sample(
        nbd,
        repo,
        &outcome.restore_point,
        &outcome.manifest,
        ctx.verify_samples,
        changed,
    )
    .await?;
    match changed {
        Some(map) if ctx.audit_samples > 0 => {
            crate::audit::audit_unchanged(
                nbd,
                repo,
                &outcome.restore_point,
                &outcome.manifest,
                map,
                ctx.audit_samples,
            )
            .await
        }
        _ => Ok(Vec::new()),
    }
}
