//! Rebuilding the catalogue from packs and manifests alone.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::backend::{Backend, FileKind, LocalBackend, sync_dir};
use crate::catalogue::{CATALOGUE_FILE, Catalogue};
use crate::error::{Error, Result};
use crate::lock::{self, LockMode};
use crate::manifest::Manifest;
use crate::pack;
use crate::repository::{CONFIG_FILE, Repository};

/// What repair did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepairReport {
    pub packs_indexed: usize,
    pub blobs_indexed: u64,
    pub restore_points: usize,
    pub partial_files_removed: usize,
    /// Files that could not be read and were left out (name: reason).
    pub skipped: Vec<String>,
}

/// Rebuilds the catalogue of the repository at `path` (which need not
/// have a working catalogue) and swaps it in. Takes the exclusive lock.
pub fn repair(path: &Path, wait: Duration) -> Result<RepairReport> {
    if !path.join(CONFIG_FILE).is_file() {
        return Err(Error::NotARepository { path: path.into() });
    }
    let _lock = lock::acquire(
        &path.join("locks").join("repository.lock"),
        "the repository",
        LockMode::Exclusive,
        wait,
    )?;
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(path));
    let mut report = RepairReport {
        partial_files_removed: backend.remove_partial()?,
        ..Default::default()
    };
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
            match pack::read_index(backend.as_ref(), &name) {
                Ok(entries) => {
                    let size = backend.size(FileKind::Pack, &name)?;
                    cat.insert_pack(&name, size, &entries)?;
                    report.packs_indexed += 1;
                    report.blobs_indexed += entries.len() as u64;
                }
                Err(e) => report.skipped.push(format!("pack {name}: {e}")),
            }
        }
        for id in backend.list(FileKind::Manifest)? {
            let bytes = backend.read(FileKind::Manifest, &id)?;
            let parsed = if hex::encode(blake3::hash(&bytes).as_bytes()) != id {
                Err("content does not match its id".to_string())
            } else {
                serde_json::from_slice::<Manifest>(&bytes).map_err(|e| e.to_string())
            };
            match parsed {
                Ok(manifest) => {
                    cat.insert_restore_point(&id, &manifest)?;
                    report.restore_points += 1;
                }
                Err(e) => report.skipped.push(format!("manifest {id}: {e}")),
            }
        }
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
    Repository::open(path)?;
    Ok(report)
}
