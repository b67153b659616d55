//! Garbage collection: delete blobs no restore point references, and
//! rewrite packs that are mostly dead.
//!
//! gc holds the exclusive repository lock, so no backup runs beside it
//! (see the locking table in the crate docs). Crash safety comes from the
//! order of its steps: new packs are written durably first, then one
//! catalogue transaction moves every live blob to its new pack and drops
//! the old packs, and only then are old pack files deleted. A crash before
//! the transaction leaves unindexed new packs (indexed and then dropped as
//! duplicates by the next gc); a crash after it leaves unindexed old packs
//! (likewise).

use std::collections::HashSet;

use crate::BlobId;
use crate::backend::FileKind;
use crate::error::{Error, Result};
use crate::pack::{self, PackBuilder, PackEntry};
use crate::repository::Repository;
use crate::tree::{self, Visitor};

/// Options for [`collect_garbage`].
#[derive(Clone, Copy, Debug)]
pub struct GcOptions {
    /// A pack whose live bytes are below this fraction of its size is
    /// rewritten.
    pub repack_below: f64,
    /// Report what would be done without changing anything.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            repack_below: 0.5,
            dry_run: false,
        }
    }
}

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
    /// Packs rewritten because they were mostly dead.
    pub packs_rewritten: usize,
    /// New packs written by the rewrite.
    pub packs_written: usize,
    /// Blobs no longer stored.
    pub blobs_removed: u64,
    /// Storage freed, in bytes.
    pub bytes_freed: u64,
    /// Live blobs found damaged while being copied, and quarantined.
    pub blobs_quarantined: u64,
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
    for rp in repo.catalogue().restore_points(None)? {
        tree::walk(&rp.manifest.tree(), &reader, &mut Mark(&mut live)).map_err(|e| {
            Error::InvalidArgument(format!(
                "restore point {} (disk {:?}): its block map cannot be read ({e}), so gc cannot tell which blobs it uses and deletes nothing; the next backup of the disk heals it if the data is still there, or `cbtvault forget` the restore point",
                rp.id, rp.manifest.disk
            ))
        })?;
    }
    Ok(live)
}

/// Runs gc. The caller holds the exclusive lock.
pub fn collect_garbage(repo: &Repository, options: GcOptions) -> Result<GcReport> {
    let backend = repo.backend().clone();
    let mut report = GcReport::default();
    if options.dry_run {
        report.partial_files_removed = backend.list_partial()?.len();
    } else {
        report.partial_files_removed = backend.remove_partial()?;
        report.packs_indexed = index_unknown_packs(repo)?;
        repo.quarantine_missing_packs()?;
    }
    let live = live_blobs(repo)?;
    report.blobs_live = live.len() as u64;

    let packs = repo.catalogue().packs()?;
    let mut dead_packs = Vec::new();
    let mut rewrites: Vec<(String, Vec<PackEntry>)> = Vec::new();
    for (name, size) in &packs {
        let entries = repo.catalogue().blobs_in_pack(name)?;
        let (keep, drop): (Vec<_>, Vec<_>) =
            entries.into_iter().partition(|e| live.contains(&e.id));
        // Bytes the catalogue no longer places here (dead blobs, superseded
        // or quarantined copies) count as dead.
        let live_bytes: u64 = keep.iter().map(|e| u64::from(e.stored_len)).sum();
        let mostly_dead =
            !drop.is_empty() && (live_bytes as f64) < options.repack_below * (*size as f64);
        if keep.is_empty() {
            dead_packs.push(name.clone());
            report.blobs_removed += drop.len() as u64;
            report.bytes_freed += size;
        } else if mostly_dead || pack::read_index(backend.as_ref(), name).is_err() {
            // A damaged index is rewritten too: the catalogue still knows
            // its blobs, and a fresh pack gives them a sound index again.
            report.blobs_removed += drop.len() as u64;
            report.bytes_freed += size.saturating_sub(live_bytes);
            rewrites.push((name.clone(), keep));
        }
    }
    report.packs_deleted = dead_packs.len();
    report.packs_rewritten = rewrites.len();
    if options.dry_run {
        return Ok(report);
    }

    // Copy live blobs out of mostly-dead packs, byte for byte (no
    // recompression), after checking each against its id.
    let mut added = Vec::new();
    let mut builder = PackBuilder::with_capacity(repo.config().pack_size as usize);
    let write =
        |builder: PackBuilder, added: &mut Vec<(String, u64, Vec<PackEntry>)>| -> Result<()> {
            let pack = builder.finish();
            backend.write(FileKind::Pack, &pack.name, &pack.bytes)?;
            added.push((pack.name, pack.bytes.len() as u64, pack.entries));
            Ok(())
        };
    for (name, keep) in &rewrites {
        for e in keep {
            let copied = backend
                .read_at(FileKind::Pack, name, e.offset, e.stored_len as usize)
                .and_then(|stored| pack::decode_blob(name, e, &stored).map(|_| stored));
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

    let mut gone = dead_packs;
    gone.extend(rewrites.into_iter().map(|(name, _)| name));
    repo.catalogue().replace_packs(&gone, &added)?;
    // A rewritten pack can have the very name of an old one (same blobs at
    // the same offsets): that file now holds live blobs and must stay.
    for name in gone
        .iter()
        .filter(|name| !added.iter().any(|(new, _, _)| new == *name))
    {
        backend.remove(FileKind::Pack, name)?;
    }
    tracing::info!(?report, "gc finished");
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
    let mut count = 0;
    for name in backend.list(FileKind::Pack)? {
        if known.contains(&name) {
            continue;
        }
        match pack::read_index(backend.as_ref(), &name) {
            Ok(entries) => {
                let size = backend.size(FileKind::Pack, &name)?;
                repo.catalogue().insert_pack(&name, size, &entries)?;
                count += 1;
            }
            Err(e) => tracing::warn!(pack = %name, error = %e, "unreadable pack left in place"),
        }
    }
    Ok(count)
}
