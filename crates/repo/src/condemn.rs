//! gc beside running backups: condemn first, sweep later.
//!
//! gc holds no lock that backups wait for. Instead, like Proxmox Backup
//! Server's two phases, it deletes in two steps with a safety margin:
//!
//! 1. **Condemn.** gc marks every blob reachable from a manifest (and from
//!    this host's resume records), and picks packs with nothing live in
//!    them, or whose live blobs it copies into new packs, among the packs
//!    *older than the oldest running operation* (their times from the
//!    store's listing, less [`CLOCK_MARGIN`] for clocks that disagree, and
//!    never newer than gc's own start): packs that running backups write
//!    are never touched. It writes a **gc record** (`gc/NAME.json`,
//!    [`GcRecord`]) naming those packs *before* it writes the new packs,
//!    then lists the operation lock objects in force (`lease.rs`) into
//!    the record's `waiting_for`.
//! 2. **Sweep.** A record is ripe once no operation it waits for still
//!    runs (ended, or stale: a dead process of this host at once, another
//!    host's after its expiry). Then gc marks again — after the waited-for
//!    backups committed, so their manifests count — and deletes each
//!    condemned pack that still has no live blob indexed in it, and the
//!    record. A run sweeps what is ripe, then condemns; what it condemned
//!    is swept at once when nothing ran (no other operation at all), else
//!    by a later run.
//!
//! Why nothing live is lost: every host refreshes its catalogue (the
//! condemned set, packs gone and new) after it registers its operation
//! and before a backup starts deduplicating (`heal.rs`), and a blob whose
//! indexed copy is in a condemned pack is not "stored" for deduplication
//! (the `condemned` table): so a backup that started after a record was
//! visible stores such blocks again, and one that started before is in
//! `waiting_for`, and the sweep waits for it and then sees its manifest.
//! A live blob's new copy is indexed in preference to a condemned one, so
//! a host that reads it after the sweep finds the new copy; a host that
//! missed the record finds it when the old pack vanishes (`heal.rs`).
//! Readers (restore, verify, diff) register operations too, so a pack
//! they may read is not deleted under them.
//!
//! Crashes: a gc killed before `waiting_for` is written leaves a record
//! without it; the next gc fills it in with the operations running then
//! (every backup that started before the record was visible and still
//! runs is among them). A gc killed mid-sweep leaves the record and some
//! packs; the next gc sweeps the rest. Its `gc` lock object goes stale
//! with its process, so the next run never hangs.
//!
//! Duplicates: two hosts that store one block at once keep two copies; the
//! catalogue indexes one, the other is unused space in its pack, and the
//! pack rewrite (`--max-unused`) drops it like any unused blob.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::BlobId;
use crate::backend::{Backend, FileKind, is_not_found};
use crate::error::Result;
use crate::gc::GcReport;
use crate::lease::{self, Owner};
use crate::repository::Repository;

/// The gc-record format this build writes and reads.
pub const GC_RECORD_FORMAT: u32 = 1;

/// Packs written less than this before the oldest running operation
/// started (by the store's clock against the hosts') are left alone too.
pub const CLOCK_MARGIN: jiff::SignedDuration = jiff::SignedDuration::from_secs(300);

/// A gc record: packs condemned by one gc run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRecord {
    pub format: u32,
    /// When it was written.
    pub written: jiff::Timestamp,
    /// The gc that wrote it.
    pub by: Owner,
    /// The condemned packs.
    pub packs: Vec<String>,
    /// The operation lock objects in force once the record was visible:
    /// the sweep waits until none of them runs. `None`: the gc died before
    /// listing them; the next gc does.
    pub waiting_for: Option<Vec<String>>,
}

/// The gc records in the repository; an unreadable one is skipped with a
/// warning (its packs are then neither avoided nor swept: safe).
pub fn load(backend: &dyn Backend) -> Result<Vec<(String, GcRecord)>> {
    let mut out = Vec::new();
    for name in backend.list(FileKind::Gc)? {
        let bytes = match backend.read(FileKind::Gc, &name) {
            Ok(bytes) => bytes,
            Err(e) if is_not_found(&e) => continue,
            Err(e) => return Err(e),
        };
        match serde_json::from_slice::<GcRecord>(&bytes) {
            Ok(r) if r.format == GC_RECORD_FORMAT => out.push((name, r)),
            Ok(r) => {
                tracing::warn!(record = %name, format = r.format, "gc record of an unknown format skipped")
            }
            Err(e) => tracing::warn!(record = %name, error = %e, "unreadable gc record skipped"),
        }
    }
    Ok(out)
}

fn to_json(record: &GcRecord) -> Vec<u8> {
    serde_json::to_vec_pretty(record).unwrap_or_default()
}

/// The names of the operation lock objects in force.
fn running_operations(backend: &dyn Backend) -> Result<Vec<(String, jiff::Timestamp)>> {
    Ok(lease::live(backend)?
        .into_iter()
        .filter(|(_, r)| r.kind == "operation")
        .map(|(name, r)| (name, r.started))
        .collect())
}

/// The time before which packs may be condemned: gc's start, or the start
/// of the oldest running operation less [`CLOCK_MARGIN`].
pub fn cutoff(backend: &dyn Backend, gc_start: jiff::Timestamp) -> Result<jiff::Timestamp> {
    let oldest = running_operations(backend)?
        .into_iter()
        .map(|(_, started)| started)
        .min();
    Ok(match oldest {
        Some(t) => gc_start.min(t - CLOCK_MARGIN),
        None => gc_start,
    })
}

/// Writes a record condemning `packs`, then lists the operations it waits
/// for; marks the packs condemned in this host's catalogue. Returns the
/// record's name.
pub fn condemn(repo: &Repository, packs: Vec<String>) -> Result<Option<String>> {
    if packs.is_empty() {
        return Ok(None);
    }
    let backend = repo.backend();
    let written = jiff::Timestamp::now();
    let name = format!(
        "{}-{}",
        written.as_millisecond(),
        hex::encode(rand::random::<[u8; 6]>())
    );
    let mut record = GcRecord {
        format: GC_RECORD_FORMAT,
        written,
        by: Owner::current(),
        packs,
        waiting_for: None,
    };
    backend.write(FileKind::Gc, &name, &to_json(&record))?;
    let mut cat = repo.catalogue();
    let mut condemned: Vec<(String, String)> = cat
        .condemned_packs()?
        .into_iter()
        .map(|p| (p, String::new()))
        .collect();
    condemned.extend(record.packs.iter().map(|p| (p.clone(), name.clone())));
    cat.set_condemned(&condemned)?;
    drop(cat);
    record.waiting_for = Some(
        running_operations(backend.as_ref())?
            .into_iter()
            .map(|(n, _)| n)
            .collect(),
    );
    backend.replace(FileKind::Gc, &name, &to_json(&record))?;
    tracing::info!(record = %name, packs = record.packs.len(), waiting_for = ?record.waiting_for, "packs condemned");
    Ok(Some(name))
}

/// Sweeps the ripe gc records: marks what is live now, deletes each
/// condemned pack with no live blob indexed in it, then the record.
/// Counts into `report`.
pub fn sweep(repo: &Repository, report: &mut GcReport) -> Result<()> {
    let backend = repo.backend().clone();
    let records = load(backend.as_ref())?;
    if records.is_empty() {
        return Ok(());
    }
    let running: HashSet<String> = running_operations(backend.as_ref())?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut ripe = Vec::new();
    for (name, mut record) in records {
        let waiting = match &record.waiting_for {
            Some(w) => w.clone(),
            None => {
                // Its gc died before listing them: every backup that began
                // before the record was visible and still runs is here.
                let w: Vec<String> = running.iter().cloned().collect();
                record.waiting_for = Some(w.clone());
                backend.replace(FileKind::Gc, &name, &to_json(&record))?;
                w
            }
        };
        let busy: Vec<&String> = waiting.iter().filter(|w| running.contains(*w)).collect();
        if busy.is_empty() {
            ripe.push((name, record));
        } else {
            tracing::info!(record = %name, waiting_for = ?busy, "condemned packs wait for operations that ran when they were condemned");
            report.packs_waiting += record.packs.len();
        }
    }
    if ripe.is_empty() {
        return Ok(());
    }
    // Mark again, now that every operation the ripe records waited for has
    // ended: what they committed is in the manifests.
    let unreadable = repo.reindex_manifests()?;
    if unreadable > 0 {
        tracing::warn!(
            manifests = unreadable,
            "manifests cannot be read, so what they reference is unknown: nothing is swept (`cbtvault verify` names them)"
        );
        report.packs_waiting += ripe.iter().map(|(_, r)| r.packs.len()).sum::<usize>();
        return Ok(());
    }
    let live: HashSet<BlobId> = crate::gc::live_blobs(repo)?;
    for (name, record) in ripe {
        for pack in &record.packs {
            let located = repo.catalogue().blobs_in_pack(pack)?;
            if let Some(e) = located.iter().find(|e| live.contains(&e.id)) {
                tracing::info!(%pack, blob = %e.id, "a condemned pack is in use again; kept");
                continue;
            }
            let size = match backend.size(FileKind::Pack, pack) {
                Ok(size) => size,
                // Deleted already (a gc killed mid-sweep).
                Err(e) if is_not_found(&e) => {
                    repo.catalogue().drop_pack(pack)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            backend.remove(FileKind::Pack, pack)?;
            repo.catalogue().drop_pack(pack)?;
            report.packs_swept += 1;
            report.bytes_swept += size;
        }
        backend.remove(FileKind::Gc, &name)?;
        report.records_swept += 1;
    }
    let remaining: Vec<(String, String)> = load(backend.as_ref())?
        .into_iter()
        .flat_map(|(name, r)| r.packs.into_iter().map(move |p| (p, name.clone())))
        .collect();
    repo.catalogue().set_condemned(&remaining)?;
    Ok(())
}
