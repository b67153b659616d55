//! Checking a repository: its structure always, and with `read_data` every
//! stored byte, reporting the restore points and disk offsets that damage
//! affects.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use serde::Serialize;

use crate::BlobId;
use crate::backend::FileKind;
use crate::error::Result;
use crate::pack;
use crate::repository::{BLOCK_SIZE, Repository};
use crate::tree::{self, Visitor};

/// One thing wrong.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    /// What is concerned: `pack NAME`, `restore point ID`, `blob ID`.
    pub object: String,
    /// What is wrong with it.
    pub problem: String,
}

/// A restore point that cannot be restored whole.
#[derive(Clone, Debug, Serialize)]
pub struct Damage {
    pub restore_point: String,
    pub disk: String,
    /// Byte offsets in the disk of the blocks that cannot be read back.
    pub offsets: Vec<u64>,
}

/// What verify found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub restore_points: usize,
    pub packs: usize,
    pub blobs_read: u64,
    pub bytes_read: u64,
    /// Partial writes present (normal while a backup runs; gc clears them).
    pub partial_files: usize,
    pub problems: Vec<Problem>,
    pub damaged: Vec<Damage>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty() && self.damaged.is_empty()
    }
}

/// Progress callback: bytes just checked.
pub type OnProgress<'a> = &'a (dyn Fn(u64) + Sync);

/// Checks the repository. With `read_data`, re-reads and re-hashes every
/// blob of every pack, on `threads` threads.
pub fn verify(
    repo: &Repository,
    read_data: bool,
    threads: usize,
    progress: OnProgress<'_>,
) -> Result<VerifyReport> {
    let backend = repo.backend().clone();
    let mut report = VerifyReport {
        partial_files: backend.list_partial()?.len(),
        ..Default::default()
    };
    let mut bad: HashSet<BlobId> = HashSet::new();
    let problem = |report: &mut VerifyReport, object: String, what: String| {
        report.problems.push(Problem {
            object,
            problem: what,
        });
    };

    // Packs: present, index intact, and agreeing with the catalogue.
    let packs = repo.catalogue().packs()?;
    report.packs = packs.len();
    let on_storage: HashSet<String> = backend.list(FileKind::Pack)?.into_iter().collect();
    let mut readable = Vec::new();
    for (name, _) in &packs {
        if !on_storage.contains(name) {
            problem(
                &mut report,
                format!("pack {name}"),
                "missing from storage".into(),
            );
            bad.extend(repo.catalogue().blobs_in_pack(name)?.iter().map(|e| e.id));
            continue;
        }
        match pack::read_index(backend.as_ref(), name) {
            Ok(entries) => {
                let in_pack: HashSet<_> = entries
                    .iter()
                    .map(|e| (e.id, e.offset, e.stored_len))
                    .collect();
                for e in repo.catalogue().blobs_in_pack(name)? {
                    if !in_pack.contains(&(e.id, e.offset, e.stored_len)) {
                        problem(
                            &mut report,
                            format!("blob {}", e.id),
                            format!(
                                "catalogue places it in pack {name}, whose index disagrees; run `cbtvault repair`"
                            ),
                        );
                        bad.insert(e.id);
                    }
                }
                readable.push((name.clone(), entries));
            }
            Err(e) => {
                problem(&mut report, format!("pack {name}"), e.to_string());
                bad.extend(repo.catalogue().blobs_in_pack(name)?.iter().map(|e| e.id));
            }
        }
    }

    // Data: every blob re-hashed, packs spread over threads.
    if read_data {
        let queue = Mutex::new(readable.into_iter());
        let found: Mutex<Vec<(BlobId, String)>> = Mutex::new(Vec::new());
        let counts = Mutex::new((0u64, 0u64));
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| {
                    loop {
                        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                        let Some((name, entries)) = next else { break };
                        let size = backend.size(FileKind::Pack, &name).unwrap_or(0);
                        let whole = backend.read_at(FileKind::Pack, &name, 0, size as usize);
                        let mut local = Vec::new();
                        for e in &entries {
                            let outcome =
                                whole.as_ref().map_err(|e| e.to_string()).and_then(|buf| {
                                    let stored = buf
                                        .get(
                                            e.offset as usize
                                                ..(e.offset + u64::from(e.stored_len)) as usize,
                                        )
                                        .ok_or_else(|| "outside the pack".to_string())?;
                                    pack::decode_blob(&name, e, stored)
                                        .map(|_| ())
                                        .map_err(|e| e.to_string())
                                });
                            if let Err(what) = outcome {
                                local.push((e.id, what));
                            }
                        }
                        {
                            let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                            c.0 += entries.len() as u64;
                            c.1 += size;
                        }
                        progress(size);
                        found
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend(local);
                    }
                });
            }
        });
        let (blobs, bytes) = counts.into_inner().unwrap_or_else(|e| e.into_inner());
        report.blobs_read = blobs;
        report.bytes_read = bytes;
        for (id, what) in found.into_inner().unwrap_or_else(|e| e.into_inner()) {
            problem(&mut report, format!("blob {id}"), what);
            bad.insert(id);
        }
    }

    // Restore points: manifest intact, every node readable, every block
    // indexed. Shared subtrees are checked once.
    let reader = repo.reader()?;
    let points = repo.catalogue().restore_points(None)?;
    report.restore_points = points.len();
    let mut seen = HashSet::new();
    for rp in &points {
        if let Err(e) = repo.load_manifest(&rp.id) {
            problem(
                &mut report,
                format!("restore point {}", rp.id),
                e.to_string(),
            );
        }
        struct Check<'a> {
            seen: &'a mut HashSet<BlobId>,
            reader: &'a crate::store::BlobReader,
            missing: Vec<BlobId>,
        }
        impl Visitor for Check<'_> {
            fn node(&mut self, _l: u32, _i: u64, id: &BlobId) -> Result<bool> {
                Ok(self.seen.insert(*id))
            }
            fn leaf(&mut self, _first: u64, ids: &[BlobId]) -> Result<()> {
                for id in ids.iter().filter(|id| !id.is_zero()) {
                    if self.seen.insert(*id) && self.reader.catalogue().locate(id)?.is_none() {
                        self.missing.push(*id);
                    }
                }
                Ok(())
            }
        }
        let mut check = Check {
            seen: &mut seen,
            reader: &reader,
            missing: Vec::new(),
        };
        if let Err(e) = tree::walk(&rp.manifest.tree(), &reader, &mut check) {
            problem(
                &mut report,
                format!("restore point {}", rp.id),
                format!("block map unreadable: {e}"),
            );
        }
        for id in check.missing {
            problem(
                &mut report,
                format!("blob {id}"),
                "referenced but not stored".into(),
            );
            bad.insert(id);
        }
    }

    if !bad.is_empty() {
        report.damaged = locate_damage(repo, &points, &bad)?;
    }
    Ok(report)
}

/// Finds where damaged blobs are used.
fn locate_damage(
    repo: &Repository,
    points: &[crate::catalogue::RestorePointRow],
    bad: &HashSet<BlobId>,
) -> Result<Vec<Damage>> {
    struct Find<'a> {
        bad: &'a HashSet<BlobId>,
        blocks: BTreeMap<u64, ()>,
        shape: tree::TreeShape,
    }
    impl Visitor for Find<'_> {
        fn node(&mut self, level: u32, index: u64, id: &BlobId) -> Result<bool> {
            if self.bad.contains(id) {
                // A damaged node loses every block below it.
                let span = tree::TreeShape::span(level);
                let end = ((index + 1) * span).min(self.shape.blocks);
                for b in index * span..end {
                    self.blocks.insert(b, ());
                }
                return Ok(false);
            }
            Ok(true)
        }
        fn leaf(&mut self, first: u64, ids: &[BlobId]) -> Result<()> {
            for (i, id) in ids.iter().enumerate() {
                if self.bad.contains(id) {
                    self.blocks.insert(first + i as u64, ());
                }
            }
            Ok(())
        }
    }
    let reader = repo.reader()?;
    let mut out = Vec::new();
    for rp in points {
        let tree = rp.manifest.tree();
        let mut find = Find {
            bad,
            blocks: BTreeMap::new(),
            shape: tree.shape,
        };
        let walked = tree::walk(&tree, &reader, &mut find);
        if walked.is_err() && find.blocks.is_empty() {
            find.blocks.insert(0, ());
        }
        if !find.blocks.is_empty() {
            out.push(Damage {
                restore_point: rp.id.clone(),
                disk: rp.manifest.disk.clone(),
                offsets: find.blocks.keys().map(|b| b * BLOCK_SIZE).collect(),
            });
        }
    }
    Ok(out)
}
