//! Garbage collection: delete blobs no restore point references, and
//! rewrite packs so that the unused bytes left stay within a bound of the
//! live ones ([`GcOptions::max_unused`], like restic's `--max-unused`):
//! scattered churn leaves a little dead data in every pack, and a
//! "rewrite when mostly dead" rule never reclaims it. Packs that free the
//! most per byte copied go first, and a run copies at most
//! [`GcOptions::max_repack`] bytes. [`plan`] decides, [`apply`] acts; a dry
//! run is the plan alone, with estimates for other settings.
//!
//! gc runs beside backups, restores and other hosts (see the locking table
//! in the crate docs and `condemn.rs`): packs it would delete, and packs it
//! rewrites, are condemned first — a gc record in the repository — and
//! deleted by a sweep once every operation that ran when they were
//! condemned has ended; packs newer than the oldest running operation are
//! left alone. One gc runs at a time (lock object `gc`). Crash safety
//! comes from the order of its steps: the record first, then new packs
//! written durably, then one catalogue transaction moves every live blob
//! to its new pack, and only the sweep deletes old pack files. A crash
//! before the transaction leaves unindexed new packs (indexed by the next
//! refresh, their blobs duplicates); a crash in the sweep leaves the
//! record, and the next gc sweeps the rest.

use std::collections::HashSet;

use crate::BlobId;
use crate::backend::FileKind;
use crate::error::{Error, Result};
use crate::pack::{self, PackBuilder, PackEntry};
use crate::repository::Repository;
use crate::tree::{self, Visitor};

/// Options for [`Repository::collect_garbage`].
#[derive(Clone, Copy, Debug)]
pub struct GcOptions {
    /// Unused bytes allowed to stay in packs that still hold live blobs, as
    /// a fraction of the live bytes (restic's `--max-unused`). Packs are
    /// rewritten, those that free the most per byte copied first, until the
    /// unused bytes left are within it. 0 rewrites every pack with any
    /// unused byte.
    pub max_unused: f64,
    /// At most this many live bytes are copied by one run (bounded I/O for
    /// a nightly run); the rest waits for the next run.
    pub max_repack: Option<u64>,
    /// Report what would be done without changing anything.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            max_unused: DEFAULT_MAX_UNUSED,
            max_repack: None,
            dry_run: false,
        }
    }
}

/// The default of [`GcOptions::max_unused`]: a repository stays within
/// about 10% of its live size.
pub const DEFAULT_MAX_UNUSED: f64 = 0.10;

/// What gc did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GcReport {
    /// Partial files of interrupted writes removed.
    pub partial_files_removed: usize,
    /// Pack files found on storage but not in the catalogue, now indexed.
    pub packs_indexed: usize,
    /// Blobs referenced by some restore point.
    pub blobs_live: u64,
    /// Packs deleted because nothing in them was referenced.
    pub packs_deleted: usize,
    /// Packs rewritten to drop their unused bytes.
    pub packs_rewritten: usize,
    /// New packs written by the rewrite.
    pub packs_written: usize,
    /// Blobs no longer stored.
    pub blobs_removed: u64,
    /// Storage freed, in bytes.
    pub bytes_freed: u64,
    /// Live bytes copied into new packs.
    pub bytes_rewritten: u64,
    /// Bytes of packs in use by live blobs (their data, frames and index).
    pub bytes_live: u64,
    /// Unused bytes in packs before and after this run.
    pub bytes_unused_before: u64,
    pub bytes_unused_after: u64,
    /// Live blobs found damaged while being copied, and quarantined.
    pub blobs_quarantined: u64,
    /// Packs condemned by this run (those deleted or rewritten above):
    /// deleted by a sweep, at once when no other operation ran.
    pub packs_condemned: usize,
    /// Condemned pack files deleted by this run's sweeps (this run's and
    /// earlier runs' records), and their bytes.
    pub packs_swept: usize,
    pub bytes_swept: u64,
    /// gc records swept (and removed) by this run.
    pub records_swept: usize,
    /// Condemned packs still waiting for operations that ran when they
    /// were condemned (a later gc sweeps them).
    pub packs_waiting: usize,
    /// Saved VM metadata no restore point refers to any more, removed (or,
    /// in a dry run, that would be).
    pub vm_metadata_removed: usize,
    /// With `dry_run`: what other `max_unused` settings would do.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub estimates: Vec<GcEstimate>,
}

/// What one `max_unused` setting would free (dry run).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct GcEstimate {
    pub max_unused: f64,
    pub packs_rewritten: usize,
    pub bytes_rewritten: u64,
    pub bytes_freed: u64,
}

/// How one pack is used.
#[derive(Clone, Debug)]
struct PackUse {
    name: String,
    size: u64,
    keep: Vec<PackEntry>,
    dropped: u64,
    /// Bytes the live blobs take (data, frame, index entry).
    live: u64,
    index_damaged: bool,
}

impl PackUse {
    fn unused(&self) -> u64 {
        self.size
            .saturating_sub(self.live + pack::TRAILER_LEN as u64)
    }
}

/// What gc will do: packs to delete and to rewrite (plan, then apply).
#[derive(Clone, Debug)]
pub struct GcPlan {
    delete: Vec<PackUse>,
    rewrite: Vec<PackUse>,
    /// The report as planned; apply fills in what happened.
    pub report: GcReport,
}

/// Chooses the packs to rewrite: every pack whose index is damaged, then
/// the others by unused bytes per live byte copied, until the unused bytes
/// left are within `max_unused` of the live bytes (and at most
/// `max_repack` live bytes are copied).
fn choose(packs: &[PackUse], max_unused: f64, max_repack: Option<u64>) -> (Vec<usize>, u64, u64) {
    let live_total: u64 = packs.iter().map(|p| p.live).sum();
    let mut unused: u64 = packs.iter().map(PackUse::unused).sum();
    let allowed = (max_unused.max(0.0) * live_total as f64) as u64;
    let mut order: Vec<usize> = (0..packs.len())
        .filter(|i| packs[*i].unused() > 0)
        .collect();
    order.sort_by(|a, b| {
        let gain = |p: &PackUse| p.unused() as f64 / (p.live.max(1)) as f64;
        gain(&packs[*b]).total_cmp(&gain(&packs[*a]))
    });
    let mut chosen: Vec<usize> = (0..packs.len())
        .filter(|i| packs[*i].index_damaged)
        .collect();
    let mut copied: u64 = chosen.iter().map(|i| packs[*i].live).sum();
    unused -= chosen.iter().map(|i| packs[*i].unused()).sum::<u64>();
    for i in order {
        if unused <= allowed {
            break;
        }
        if chosen.contains(&i) {
            continue;
        }
        if max_repack.is_some_and(|max| copied + packs[i].live > max) {
            continue;
        }
        chosen.push(i);
        copied += packs[i].live;
        unused -= packs[i].unused();
    }
    (chosen, copied, unused)
}

/// Plans a gc: what is live, which packs go, which are rewritten — among
/// the packs older than `cutoff` that no gc condemned yet.
pub fn plan(repo: &Repository, options: &GcOptions, cutoff: jiff::Timestamp) -> Result<GcPlan> {
    let backend = repo.backend().clone();
    let live = live_blobs(repo)?;
    let condemned = repo.catalogue().condemned_packs()?;
    let young: HashSet<String> = backend
        .list_dated(FileKind::Pack)?
        .into_iter()
        .filter(|(_, time)| time.is_some_and(|t| t >= cutoff))
        .map(|(name, _)| name)
        .collect();
    let mut report = GcReport {
        blobs_live: live.len() as u64,
        ..Default::default()
    };
    let mut delete = Vec::new();
    let mut in_use = Vec::new();
    // Bound first: the guard of a `for` expression lives for the whole
    // loop, and the loop takes the catalogue again.
    let packs = repo.catalogue().packs()?;
    for (name, size) in packs {
        if condemned.contains(&name) || young.contains(&name) {
            continue;
        }
        let entries = repo.catalogue().blobs_in_pack(&name)?;
        let (keep, drop): (Vec<_>, Vec<_>) =
            entries.into_iter().partition(|e| live.contains(&e.id));
        let live_bytes = keep
            .iter()
            .map(|e| u64::from(e.stored_len) + (pack::HEADER_LEN + pack::ENTRY_LEN) as u64)
            .sum();
        let usage = PackUse {
            index_damaged: !keep.is_empty() && pack::read_index(backend.as_ref(), &name).is_err(),
            name,
            size,
            keep,
            dropped: drop.len() as u64,
            live: live_bytes,
        };
        if usage.keep.is_empty() {
            report.bytes_unused_before += usage.size;
            delete.push(usage);
        } else {
            report.bytes_unused_before += usage.unused();
            in_use.push(usage);
        }
    }
    report.bytes_live = in_use.iter().map(|p| p.live).sum();
    let (chosen, copied, unused_after) = choose(&in_use, options.max_unused, options.max_repack);
    if options.dry_run {
        for max_unused in [0.0, 0.05, 0.10, 0.20, 0.50] {
            let (c, bytes, _) = choose(&in_use, max_unused, options.max_repack);
            report.estimates.push(GcEstimate {
                max_unused,
                packs_rewritten: c.len(),
                bytes_rewritten: bytes,
                bytes_freed: delete.iter().map(|p| p.size).sum::<u64>()
                    + c.iter().map(|i| in_use[*i].unused()).sum::<u64>(),
            });
        }
    }
    let rewrite: Vec<PackUse> = chosen.iter().map(|i| in_use[*i].clone()).collect();
    report.packs_deleted = delete.len();
    report.packs_rewritten = rewrite.len();
    report.bytes_rewritten = copied;
    report.bytes_unused_after = unused_after;
    report.blobs_removed = delete.iter().chain(&rewrite).map(|p| p.dropped).sum();
    report.bytes_freed = delete.iter().map(|p| p.size).sum::<u64>()
        + rewrite.iter().map(PackUse::unused).sum::<u64>();
    Ok(GcPlan {
        delete,
        rewrite,
        report,
    })
}

impl Repository {
    /// Runs gc: [`plan`], then (unless a dry run, whose report is the plan)
    /// [`apply`]. Takes the exclusive repository lock itself, waiting up to
    /// `wait` for running backups and other commands to finish.
    pub fn collect_garbage(
        &self,
        options: GcOptions,
        wait: std::time::Duration,
    ) -> Result<GcReport> {
        self.require_writable("gc")?;
        if !options.dry_run {
            self.require_removals("gc")?;
        }
        if self.crypto().is_locked() {
            return Err(crate::error::Error::KeyRequired {
                what: "gc (it walks every block map)".into(),
            });
        }
        // Repair on this host waits; backups and other hosts do not.
        let _local = self.lock_local_shared(wait)?;
        let _gc = crate::lease::acquire(self.backend(), "gc", "gc", "gc", wait, self.lock_ttl())?;
        crate::repair::refuse_beside_repair(self.backend().as_ref())?;
        collect_garbage(self, options)
    }
}

/// Every blob (node or block) referenced by a restore point.
pub fn live_blobs(repo: &Repository) -> Result<HashSet<BlobId>> {
    struct Mark<'a>(&'a mut HashSet<BlobId>);
    impl Visitor for Mark<'_> {
        fn node(&mut self, _level: u32, _index: u64, id: &BlobId) -> Result<bool> {
            // A node seen before was fully marked then: shared subtrees are
            // walked once however many restore points share them.
            Ok(self.0.insert(*id))
        }
        fn leaf(&mut self, _first: u64, ids: &[BlobId]) -> Result<()> {
            self.0.extend(ids.iter().filter(|id| !id.is_zero()));
            Ok(())
        }
    }
    let reader = repo.reader()?;
    let mut live = HashSet::new();
    // What interrupted backups kept for their next run is live too.
    for tree in repo.resume_roots()? {
        if let Err(e) = tree::walk(&tree, &reader, &mut Mark(&mut live)) {
            tracing::warn!(error = %e, "the block map of a resume record cannot be read; its blocks are not kept");
        }
    }
    let points = repo.catalogue().restore_points(None)?;
    for rp in points {
        tree::walk(&rp.manifest.tree(), &reader, &mut Mark(&mut live)).map_err(|e| {
            Error::InvalidArgument(format!(
                "restore point {} (disk {:?}): its block map cannot be read ({e}), so gc cannot tell which blobs it uses and deletes nothing; the next backup of the disk heals it if the data is still there, or `cbtvault forget` the restore point",
                rp.id, rp.manifest.disk
            ))
        })?;
    }
    Ok(live)
}

/// How old unreferenced VM metadata must be before gc removes it: a run
/// saves a VM's metadata before it commits the restore points that refer
/// to it, and gc may run in between.
const VM_METADATA_GRACE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Runs gc: sweeps ripe records, then plans and condemns (see
/// `condemn.rs`), then sweeps what it condemned if nothing else ran. The
/// caller holds the `gc` lock object ([`Repository::collect_garbage`]
/// takes it).
pub(crate) fn collect_garbage(repo: &Repository, options: GcOptions) -> Result<GcReport> {
    let backend = repo.backend().clone();
    let start = jiff::Timestamp::now();
    let mut swept = GcReport::default();
    let (partial, indexed) = if options.dry_run {
        (backend.list_partial()?.len(), 0)
    } else {
        let partial = backend.remove_partial()?;
        repo.expire_resumable(crate::resume::RESUMABLE_MAX_AGE)?;
        let refreshed = repo.refresh_packs()?;
        crate::condemn::sweep(repo, &mut swept)?;
        (partial, refreshed.indexed)
    };
    let cutoff = crate::condemn::cutoff(backend.as_ref(), start)?;
    let plan = plan(repo, &options, cutoff)?;
    let mut report = if options.dry_run {
        plan.report
    } else {
        let mut report = apply(repo, plan)?;
        report.packs_waiting = 0;
        crate::condemn::sweep(repo, &mut report)?;
        report
    };
    report.packs_swept += swept.packs_swept;
    report.bytes_swept += swept.bytes_swept;
    report.records_swept += swept.records_swept;
    report.partial_files_removed = partial;
    report.packs_indexed = indexed;
    let unused = crate::vm::unreferenced(repo, VM_METADATA_GRACE)?;
    report.vm_metadata_removed = unused.len();
    if !options.dry_run {
        for id in &unused {
            backend.remove(FileKind::VmMetadata, id)?;
            repo.catalogue().remove_vm_metadata(id)?;
        }
    }
    tracing::info!(?report, "gc finished");
    Ok(report)
}

/// Carries out a plan: the packs to delete and to rewrite are condemned
/// (a gc record, before anything else); live blobs of the packs to
/// rewrite are copied into new packs, byte for byte (no recompression)
/// after checking each against its id; then one catalogue transaction
/// moves them to the new packs. The old files go in a sweep.
pub fn apply(repo: &Repository, plan: GcPlan) -> Result<GcReport> {
    let backend = repo.backend().clone();
    let GcPlan {
        delete,
        rewrite,
        mut report,
    } = plan;
    let gone: Vec<String> = delete
        .iter()
        .chain(&rewrite)
        .map(|p| p.name.clone())
        .collect();
    report.packs_condemned = gone.len();
    crate::condemn::condemn(repo, gone)?;
    let mut added = Vec::new();
    let mut builder = PackBuilder::with_capacity(repo.config().pack_size as usize);
    let write =
        |builder: PackBuilder, added: &mut Vec<(String, u64, Vec<PackEntry>)>| -> Result<()> {
            let pack = builder.finish();
            backend.write(FileKind::Pack, &pack.name, &pack.bytes)?;
            added.push((pack.name, pack.bytes.len() as u64, pack.entries));
            Ok(())
        };
    for p in &rewrite {
        let name = &p.name;
        for e in &p.keep {
            let copied = backend
                .read_at(FileKind::Pack, name, e.offset, e.stored_len as usize)
                .and_then(|stored| {
                    pack::decode_blob(repo.crypto(), name, e, &stored).map(|_| stored)
                });
            let stored = match copied {
                Ok(stored) => stored,
                Err(err) => {
                    // Damaged already: quarantined (not copied), so the next
                    // backup that meets the content stores it again.
                    repo.catalogue()
                        .quarantine(&e.id, name, e.offset, &err.to_string())?;
                    report.blobs_quarantined += 1;
                    continue;
                }
            };
            builder.push(e.id, e.kind, e.compression, e.raw_len, &stored);
            if builder.data_len() as u64 >= repo.config().pack_size {
                write(std::mem::take(&mut builder), &mut added)?;
            }
        }
    }
    if !builder.is_empty() {
        write(builder, &mut added)?;
    }
    report.packs_written = added.len();
    // The new packs take over the live blobs; the old ones keep only dead
    // rows until the sweep deletes them. (A rewritten pack can have the
    // very name of an old one — same blobs at the same offsets: the sweep
    // finds live blobs in it and keeps it.)
    repo.catalogue().replace_packs(&[], &added)?;
    Ok(report)
}

/// Indexes pack files the catalogue does not know (a crash between writing
/// a pack and indexing it). Their blobs keep any location already indexed.
pub fn index_unknown_packs(repo: &Repository) -> Result<usize> {
    let backend = repo.backend();
    let known: HashSet<String> = repo
        .catalogue()
        .packs()?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    // A pack repair left out (every blob of it damaged or stored
    // elsewhere) still has an intact index: its quarantined copies must not
    // come back through it, or a backup would deduplicate against damage.
    let damaged: HashSet<(String, u64)> = repo
        .catalogue()
        .quarantined()?
        .into_iter()
        .map(|q| (q.pack, q.offset))
        .collect();
    let mut count = 0;
    for name in backend.list(FileKind::Pack)? {
        if known.contains(&name) {
            continue;
        }
        match pack::read_index(backend.as_ref(), &name) {
            Ok(entries) => {
                let size = backend.size(FileKind::Pack, &name)?;
                let sound: Vec<_> = entries
                    .into_iter()
                    .filter(|e| !damaged.contains(&(name.clone(), e.offset)))
                    .collect();
                repo.catalogue().insert_pack(&name, size, &sound)?;
                count += 1;
            }
            Err(e) => tracing::warn!(pack = %name, error = %e, "unreadable pack left in place"),
        }
    }
    Ok(count)
}
