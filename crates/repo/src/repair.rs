//! Rebuilding the catalogue from packs and manifests, salvaging all that
//! can be salvaged.
//!
//! Repair must never make a restorable restore point unrestorable. So:
//! - every blob is re-hashed, and a blob is indexed exactly when its bytes
//!   still match its id — found through the pack's own index or, when that
//!   index is damaged, through the old catalogue's record of the pack;
//!   blobs that fail are quarantined, so the next backup heals them;
//! - a manifest that cannot be read is set aside (in `damaged/`), never
//!   deleted, and named in the report;
//! - a restore point whose manifest vanished is written back from the old
//!   catalogue's copy when that copy still hashes to its id;
//! - the old catalogue's run history and quarantine are carried over.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backend::{Backend, FileKind, LocalBackend, sync_dir};
use crate::catalogue::{CATALOGUE_FILE, Catalogue};
use crate::crypto::Crypto;
use crate::encryption::{KeyPrompt, Unlock, read_config};
use crate::error::{Error, Result};
use crate::lease::{self, Lease, LockTtl, Owner};
use crate::lock::{self, LockMode};
use crate::manifest::{self, Manifest};
use crate::pack::{self, PackEntry};
use crate::repository::{CONFIG_FILE, Repository};

/// What repair did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepairReport {
    pub packs_indexed: usize,
    pub blobs_indexed: u64,
    pub restore_points: usize,
    pub partial_files_removed: usize,
    /// Blobs whose bytes no longer match their id: left out and
    /// quarantined.
    pub blobs_quarantined: u64,
    /// Packs whose own index was damaged, indexed from the old catalogue.
    pub packs_salvaged: usize,
    /// Restore points whose vanished manifest was written back.
    pub manifests_restored: usize,
    /// Files moved to `damaged/` (name: where it went and why).
    pub set_aside: Vec<String>,
    /// Files that could not be used and were left out (name: reason).
    pub skipped: Vec<String>,
}

/// What the old catalogue knew, if it could be opened.
#[derive(Default)]
struct OldKnowledge {
    /// Blobs per pack.
    packs: HashMap<String, Vec<PackEntry>>,
    /// Restore points with their manifest text (as the catalogue kept it).
    manifests: BTreeMap<String, String>,
    /// Restore points being forgotten.
    forgetting: HashSet<String>,
}

fn old_knowledge(path: &Path) -> Option<OldKnowledge> {
    let cat = Catalogue::open(&path.join(CATALOGUE_FILE), false)
        .inspect_err(|e| tracing::warn!(error = %e, "the old catalogue cannot be opened; repairing from the files alone"))
        .ok()?;
    let mut old = OldKnowledge::default();
    for (name, _) in cat.packs().ok()? {
        if let Ok(entries) = cat.blobs_in_pack(&name) {
            old.packs.insert(name, entries);
        }
    }
    if let Ok(rows) = cat.restore_point_rows_raw() {
        old.manifests.extend(rows);
    }
    if let Ok(lost) = cat.lost_restore_points() {
        old.manifests
            .extend(lost.into_iter().map(|l| (l.id, l.manifest)));
    }
    old.forgetting = cat.forgetting().unwrap_or_default().into_iter().collect();
    Some(old)
}

/// Rebuilds the catalogue of the repository at `path` (which need not
/// have a working catalogue) and swaps it in. Takes the exclusive lock.
/// An encrypted repository needs its key: see [`repair_keyed`].
pub fn repair(path: &Path, wait: Duration) -> Result<RepairReport> {
    repair_keyed(path, wait, None)
}

/// [`repair`], asking `key` for the secret of an encrypted repository:
/// every blob and manifest is opened and checked against its id, so
/// repair refuses to run without it (it would set every one aside).
pub fn repair_keyed(
    path: &Path,
    wait: Duration,
    key: Option<KeyPrompt<'_>>,
) -> Result<RepairReport> {
    if !path.join(CONFIG_FILE).is_file() {
        return Err(Error::NotARepository { path: path.into() });
    }
    let config = read_config(path, &LocalBackend::new(path))?;
    let unlock = match key {
        Some(key) => Unlock::Prompt(key),
        None => Unlock::None,
    };
    let (crypto, _) = unlock.crypto(&config, &LocalBackend::new(path))?;
    if crypto.is_locked() {
        return Err(Error::KeyRequired {
            what: "repair (it opens every blob and manifest to check it)".into(),
        });
    }
    let master = match &crypto {
        Crypto::Keyed(keys) => Some(keys.master().clone()),
        _ => None,
    };
    let _lock = lock::acquire(
        &path.join("locks").join("repository.lock"),
        "the repository",
        LockMode::Exclusive,
        wait,
    )?;
    let mut backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(path));
    let _everywhere = lock_everywhere(&backend, wait)?;
    if is_append_only(backend.as_ref()) {
        // Damaged files stay where they are (see `set_aside`).
        backend = Arc::new(crate::append_only::AppendOnlyBackend::new(backend));
    }
    let mut report = RepairReport {
        partial_files_removed: backend.remove_partial()?,
        ..Default::default()
    };
    let old = old_knowledge(path).unwrap_or_default();
    let fresh = path.join(format!("{CATALOGUE_FILE}.rebuild"));
    for suffix in ["", "-wal", "-shm"] {
        let p = path.join(format!("{CATALOGUE_FILE}.rebuild{suffix}"));
        if p.exists() {
            std::fs::remove_file(&p).map_err(Error::io(&p))?;
        }
    }
    {
        let mut cat = Catalogue::open(&fresh, true)?;
        for name in backend.list(FileKind::Pack)? {
            index_pack(
                backend.as_ref(),
                &crypto,
                &mut cat,
                &name,
                &old,
                &mut report,
            )?;
        }
        rebuild_restore_points(backend.as_ref(), &crypto, &mut cat, &old, &mut report)?;
        report
            .set_aside
            .extend(crate::vm::rebuild(backend.as_ref(), &crypto, &mut cat)?);
        carry_over(&cat, path);
        // Fold the WAL into the main file so that one rename moves it all.
        cat.checkpoint()?;
    }
    let live = path.join(CATALOGUE_FILE);
    for suffix in ["-wal", "-shm"] {
        let p = path.join(format!("{CATALOGUE_FILE}{suffix}"));
        if p.exists() {
            std::fs::remove_file(&p).map_err(Error::io(&p))?;
        }
    }
    std::fs::rename(&fresh, &live).map_err(Error::io(&live))?;
    sync_dir(path)?;
    // Opening checks the result.
    let unlock = match master {
        Some(master) => Unlock::Master(master),
        None => Unlock::None,
    };
    Repository::open_inner(path, backend, unlock)?;
    tracing::info!(?report, "repair finished");
    Ok(report)
}

/// The lock object repair holds: `locks/repair.json`.
pub(crate) const REPAIR_LOCK: &str = "repair";

/// Takes lock object [`REPAIR_LOCK`] (exclusive, every host), then waits
/// up to `wait` until no other process on any host holds a lock object:
/// repair replaces the catalogue, clears partial files and sets damaged
/// files aside, which another host's backup, gc or repair must not meet
/// half-way (this host's processes are kept out by the kernel lock).
/// Operations that start meanwhile see the object and refuse
/// ([`refuse_beside_repair`]).
fn lock_everywhere(backend: &Arc<dyn Backend>, wait: Duration) -> Result<Lease> {
    let deadline = Instant::now() + wait;
    let lease = lease::acquire(
        backend,
        REPAIR_LOCK,
        "repair",
        "a repair of the repository",
        wait,
        LockTtl::default(),
    )
    .map_err(|e| match e {
        Error::Locked { holder, .. } => Error::Locked {
            what: "the repository".into(),
            holder,
        },
        e => e,
    })?;
    loop {
        let others = lease::live(backend.as_ref())?;
        let Some((_, holder)) = others.iter().find(|(name, _)| name != REPAIR_LOCK) else {
            return Ok(lease);
        };
        if Instant::now() >= deadline {
            return Err(Error::Locked {
                what: "the repository (repair needs it alone)".into(),
                holder: holder.describe(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Refuses an operation while a repair runs on another host (on this
/// host the kernel lock keeps them apart): called once the operation's
/// own lock object exists, so that of the two, one sees the other.
pub(crate) fn refuse_beside_repair(backend: &dyn Backend) -> Result<()> {
    match lease::read(backend, REPAIR_LOCK)? {
        Some(repair)
            if repair
                .stale(&Owner::current(), jiff::Timestamp::now())
                .is_none() =>
        {
            Err(Error::Locked {
                what: "the repository".into(),
                holder: repair.describe(),
            })
        }
        _ => Ok(()),
    }
}

/// Indexes the blobs of pack `name` whose bytes still match their id.
fn index_pack(
    backend: &dyn Backend,
    crypto: &Crypto,
    cat: &mut Catalogue,
    name: &str,
    old: &OldKnowledge,
    report: &mut RepairReport,
) -> Result<()> {
    let size = backend.size(FileKind::Pack, name)?;
    let bytes = match backend.read_at(FileKind::Pack, name, 0, size as usize) {
        Ok(bytes) => bytes,
        Err(e) => {
            report.skipped.push(format!("pack {name}: {e}"));
            return Ok(());
        }
    };
    let mut candidates: Vec<PackEntry> = match pack::read_index(backend, name) {
        Ok(entries) => entries,
        Err(e) => {
            // The blobs' own frames, and what the old catalogue knew.
            let mut known = pack::scan_blobs(name, &bytes, crypto);
            let framed = known.len();
            let have: HashSet<_> = known.iter().map(|e| (e.id, e.offset)).collect();
            if let Some(listed) = old.packs.get(name) {
                known.extend(listed.iter().filter(|e| !have.contains(&(e.id, e.offset))));
            }
            tracing::warn!(pack = %name, error = %e, framed, salvaged = known.len(), "pack index damaged");
            report.skipped.push(format!(
                "pack {name}: {e}; {} blobs found by their frames or the old catalogue are salvaged",
                known.len()
            ));
            if !known.is_empty() {
                report.packs_salvaged += 1;
            }
            known
        }
    };
    // The old catalogue may know blobs the index lost, or the reverse.
    if let Some(known) = old.packs.get(name) {
        let have: HashSet<_> = candidates.iter().map(|e| (e.id, e.offset)).collect();
        let extra: Vec<_> = known
            .iter()
            .filter(|e| !have.contains(&(e.id, e.offset)))
            .copied()
            .collect();
        candidates.extend(extra);
    }
    let mut good = Vec::with_capacity(candidates.len());
    for e in candidates {
        let stored = usize::try_from(e.offset)
            .ok()
            .and_then(|from| bytes.get(from..from.checked_add(e.stored_len as usize)?));
        let checked = match stored {
            Some(stored) => pack::decode_blob(crypto, name, &e, stored).map(|_| ()),
            None => Err(Error::CorruptBlob {
                id: e.id,
                pack: name.to_string(),
                offset: e.offset,
                what: "outside the pack file".into(),
            }),
        };
        match checked {
            Ok(()) => good.push(e),
            Err(err) => {
                report.blobs_quarantined += 1;
                cat.quarantine_record(&e.id, name, e.offset, &err.to_string())?;
            }
        }
    }
    if good.is_empty() {
        report
            .skipped
            .push(format!("pack {name}: no blob in it could be salvaged"));
        return Ok(());
    }
    cat.insert_pack(name, size, &good)?;
    report.packs_indexed += 1;
    report.blobs_indexed += good.len() as u64;
    Ok(())
}

/// Indexes every valid manifest, sets aside the others, and writes back
/// manifests that vanished without forget.
fn rebuild_restore_points(
    backend: &dyn Backend,
    crypto: &Crypto,
    cat: &mut Catalogue,
    old: &OldKnowledge,
    report: &mut RepairReport,
) -> Result<()> {
    let on_storage: HashSet<String> = backend.list(FileKind::Manifest)?.into_iter().collect();
    let mut indexed = HashSet::new();
    for id in &on_storage {
        let parsed = match backend.read(FileKind::Manifest, id) {
            Err(e) => Err(e.to_string()),
            Ok(_) if !manifest::is_restore_point_id(id) => {
                Err("its name is not a restore point id".to_string())
            }
            Ok(bytes) => {
                manifest::open(id, &bytes, crypto)?.and_then(|json| Manifest::from_json(&json))
            }
        };
        match parsed {
            Ok(manifest) => {
                cat.insert_restore_point(id, &manifest)?;
                report.restore_points += 1;
                indexed.insert(id.clone());
            }
            Err(why) => {
                let done = set_aside(backend, FileKind::Manifest, id)?;
                tracing::warn!(manifest = %id, %why, set_aside = %done, "unreadable manifest");
                report
                    .set_aside
                    .push(format!("manifest {id}: {why}; {done}"));
            }
        }
    }
    for (row_id, json) in &old.manifests {
        // The catalogue keeps the manifest as compact JSON; the file is the
        // pretty form, whose hash is the id. The id is taken from that
        // hash, so a damaged id column does not lose the restore point.
        let restored = Manifest::from_json(json.as_bytes()).ok().and_then(|m| {
            let (id, bytes) = manifest::encode(&m, crypto).ok()?;
            Some((id, m, bytes))
        });
        let Some((id, m, bytes)) = restored else {
            if !indexed.contains(row_id) && !old.forgetting.contains(row_id) {
                report.skipped.push(format!(
                    "restore point {row_id}: its manifest vanished and the catalogue's copy of it is damaged"
                ));
            }
            continue;
        };
        if indexed.contains(&id) || old.forgetting.contains(&id) || old.forgetting.contains(row_id)
        {
            continue;
        }
        backend.write(FileKind::Manifest, &id, &bytes)?;
        cat.insert_restore_point(&id, &m)?;
        indexed.insert(id.clone());
        report.restore_points += 1;
        report.manifests_restored += 1;
        tracing::warn!(restore_point = %id, "vanished manifest written back from the catalogue");
    }
    Ok(())
}

/// Copies the run history and quarantine of the old catalogue, when it can
/// be read (best effort: neither is needed to restore anything).
fn carry_over(cat: &Catalogue, repo: &Path) {
    let old = repo.join(CATALOGUE_FILE);
    if !old.exists() {
        return;
    }
    if let Err(e) = cat.copy_history_from(&old) {
        tracing::warn!(error = %e, "the old catalogue's run history could not be carried over");
    }
    // Hints only (a copy checks presence before using a row): without them
    // the next copy across keys reads every block once more.
    if let Err(e) = cat.copy_map_from(&old) {
        tracing::info!(error = %e, "the old catalogue's copy map could not be carried over");
    }
}

/// True when the repository's configuration says append-only (read as
/// loosely as possible: repair runs on damaged repositories).
fn is_append_only(backend: &dyn Backend) -> bool {
    backend
        .read(FileKind::Config, CONFIG_FILE)
        .ok()
        .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
        .and_then(|config| config.get("append_only").and_then(|a| a.as_bool()))
        .unwrap_or(false)
}

/// Moves a damaged file aside and says where; an append-only repository
/// keeps it in place (it is reported, and left out of the catalogue).
pub(crate) fn set_aside(backend: &dyn Backend, kind: FileKind, name: &str) -> Result<String> {
    match backend.set_aside(kind, name) {
        Ok(to) => Ok(format!("moved to {to}")),
        Err(Error::AppendOnly { .. }) => Ok(format!(
            "left in place at {} (the repository is append-only)",
            backend.locate(kind, name)
        )),
        Err(e) => Err(e),
    }
}
