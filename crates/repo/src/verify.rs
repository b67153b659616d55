//! Checking a repository: its structure always, and with `read_data` every
//! stored byte, reporting the restore points and disk offsets that damage
//! affects.
//!
//! The contract: the report is clean (`is_ok`) if and only if every
//! restore point restores byte-exact. So verify judges what a restore
//! reads — the catalogue's location of each blob, every block-map node,
//! and each block's length at its place in the disk — and reports as
//! warnings, not failures, damage that costs no restore point (a damaged
//! pack index whose blobs are intact, a quarantined blob nothing uses).
//! Damaged blobs it finds are quarantined, so the next backup that meets
//! the same content heals every restore point that uses them.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use serde::Serialize;

use crate::BlobId;
use crate::backend::FileKind;
use crate::catalogue::RestorePointRow;
use crate::error::{Error, Result};
use crate::manifest::{self, Manifest};
use crate::pack::{self, PackEntry};
use crate::repository::{BLOCK_SIZE, Repository};
use crate::store::BlobReader;
use crate::tree::{self, FANOUT, TreeShape};

/// One thing wrong.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    /// What is concerned: `pack NAME`, `restore point ID`, `blob ID`,
    /// `manifest NAME`.
    pub object: String,
    /// What is wrong with it.
    pub problem: String,
}

/// A restore point that cannot be restored whole.
#[derive(Clone, Debug, Serialize)]
pub struct Damage {
    pub restore_point: String,
    pub disk: String,
    /// Byte offsets in the disk of the blocks that cannot be read back
    /// (the first [`MAX_OFFSETS`]; `ranges` has them all).
    pub offsets: Vec<u64>,
    /// The same as `[start, end)` byte ranges.
    pub ranges: Vec<[u64; 2]>,
    /// Blocks that cannot be read back.
    pub blocks_lost: u64,
}

/// The most block offsets listed per damaged restore point.
pub const MAX_OFFSETS: usize = 4096;

/// What verify found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub restore_points: usize,
    pub packs: usize,
    pub blobs_read: u64,
    pub bytes_read: u64,
    /// Partial writes present (normal while a backup runs; gc clears them).
    pub partial_files: usize,
    /// Blobs in quarantine, waiting for a backup to store them again.
    pub quarantined: usize,
    /// Damage that makes some restore point unrestorable, or a restore
    /// point that cannot be listed.
    pub problems: Vec<Problem>,
    /// Damage that costs no restore point.
    pub warnings: Vec<Problem>,
    pub damaged: Vec<Damage>,
}

impl VerifyReport {
    /// True when every restore point restores byte-exact.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty() && self.damaged.is_empty()
    }

    fn problem(&mut self, object: String, problem: String) {
        self.problems.push(Problem { object, problem });
    }

    fn warning(&mut self, object: String, problem: String) {
        self.warnings.push(Problem { object, problem });
    }
}

/// Progress callback: bytes just checked.
pub type OnProgress<'a> = &'a (dyn Fn(u64) + Sync);

impl Repository {
    /// Checks the repository. With `read_data`, re-reads and re-hashes
    /// every blob a restore could read, on `threads` threads. Takes the
    /// shared repository lock: no gc or repair runs meanwhile.
    pub fn verify(
        &self,
        read_data: bool,
        threads: usize,
        progress: OnProgress<'_>,
    ) -> Result<VerifyReport> {
        let _lock = self.lock_shared()?;
        verify(self, read_data, threads, progress)
    }
}

/// [`Repository::verify`], for a caller that holds a repository lock.
pub(crate) fn verify(
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
    // A note that cannot be read costs no restore point, but a snapshot a
    // killed run left may then go unnoticed by the next run.
    for note in repo.journal_unreadable()? {
        report.warning(
            note,
            "crash-journal note cannot be read; the next run may not recognise a snapshot an interrupted run left (look for untagged snapshots, then delete the file)".into(),
        );
    }
    // Blobs a restore could not read, with why.
    let mut bad: HashMap<BlobId, String> = HashMap::new();

    if read_data {
        let damage = repo
            .catalogue()
            .quick_check()
            .unwrap_or_else(|e| vec![e.to_string()]);
        if !damage.is_empty() {
            report.problem(
                "catalogue".into(),
                format!(
                    "damaged ({}); `cbtvault repair` rebuilds it from the packs and manifests",
                    damage.join("; ")
                ),
            );
        }
    }
    check_manifests(repo, &mut report)?;
    for (object, problem) in crate::vm::check(repo)? {
        report.problem(object, problem);
    }

    // Packs: present, and their index intact and agreeing with the catalogue.
    let packs = repo.catalogue().packs()?;
    report.packs = packs.len();
    let on_storage: HashSet<String> = backend.list(FileKind::Pack)?.into_iter().collect();
    let mut to_read: Vec<(String, Vec<PackEntry>)> = Vec::new();
    for (name, _) in &packs {
        let entries = repo.catalogue().blobs_in_pack(name)?;
        if !on_storage.contains(name) {
            let why = "its pack file is missing from storage".to_string();
            for e in &entries {
                bad.insert(e.id, why.clone());
            }
            report.problem(format!("pack {name}"), "missing from storage".into());
            if !repo.is_read_only() {
                repo.catalogue().quarantine_pack(name, &why)?;
            }
            continue;
        }
        match pack::read_index(backend.as_ref(), name) {
            Ok(index) => {
                let in_index: HashSet<_> =
                    index.iter().map(|e| (e.id, e.offset, e.stored_len)).collect();
                if entries
                    .iter()
                    .any(|e| !in_index.contains(&(e.id, e.offset, e.stored_len)))
                {
                    report.warning(
                        format!("pack {name}"),
                        "its index disagrees with the catalogue; `cbtvault repair` rebuilds the catalogue".into(),
                    );
                }
            }
            Err(e) => report.warning(
                format!("pack {name}"),
                format!("{e}; its blobs are still readable through the catalogue, and gc rewrites the pack"),
            ),
        }
        to_read.push((name.clone(), entries));
    }

    if read_data {
        for (id, location, what) in read_all(repo, to_read, threads, progress, &mut report) {
            if !repo.is_read_only() {
                repo.catalogue()
                    .quarantine(&id, &location.0, location.1, &what)?;
            }
            report.problem(
                format!("blob {id}"),
                format!("pack {}, offset {}: {what}", location.0, location.1),
            );
            bad.insert(id, what);
        }
    }

    // Restore points: every node readable and of the right shape, every
    // block stored, readable and of the right length for its place.
    let reader = repo.reader()?;
    let quarantined = repo.catalogue().quarantined()?;
    report.quarantined = quarantined.len();
    let points = repo.catalogue().restore_points(None)?;
    report.restore_points = points.len();
    let mut walk = PointWalk {
        reader: &reader,
        bad: &bad,
        clean: HashSet::new(),
        reported: HashSet::new(),
        shape: tree::TreeShape { blocks: 0 },
        size: 0,
        damaged: Vec::new(),
        problems: Vec::new(),
    };
    for rp in &points {
        walk.start(rp);
        walk.subtree(rp.manifest.tree().shape.depth(), 0, rp.manifest.root)?;
        for (object, problem) in walk.problems.drain(..) {
            report.problem(object, problem);
        }
        if !walk.damaged.is_empty() {
            let ranges = std::mem::take(&mut walk.damaged);
            report.damaged.push(Damage {
                restore_point: rp.id.clone(),
                disk: rp.manifest.disk.clone(),
                offsets: ranges
                    .iter()
                    .flat_map(|r| r.clone())
                    .take(MAX_OFFSETS)
                    .map(|b| b * BLOCK_SIZE)
                    .collect(),
                blocks_lost: ranges.iter().map(|r| r.end - r.start).sum(),
                ranges: ranges
                    .iter()
                    .map(|r| {
                        [
                            r.start * BLOCK_SIZE,
                            (r.end * BLOCK_SIZE).min(rp.manifest.virtual_size),
                        ]
                    })
                    .collect(),
            });
        }
    }
    for q in quarantined
        .iter()
        .filter(|q| !walk.reported.contains(&q.id))
    {
        report.warning(
            format!("blob {}", q.id),
            format!("quarantined ({}); no restore point uses it", q.reason),
        );
    }
    Ok(report)
}

/// Manifests: every file on storage readable and valid, and every restore
/// point the catalogue knew still has one.
fn check_manifests(repo: &Repository, report: &mut VerifyReport) -> Result<()> {
    // What `list` shows (rows whose manifest copy matches their id).
    let known: HashSet<String> = repo
        .catalogue()
        .restore_points(None)?
        .into_iter()
        .map(|rp| rp.id)
        .collect();
    for name in repo.backend().list(FileKind::Manifest)? {
        let loaded = repo.load_manifest(&name);
        match loaded {
            Err(e) => report.problem(
                format!("manifest {name}"),
                format!("{}; `cbtvault repair` sets it aside", strip_name(&e, &name)),
            ),
            Ok(_) if !known.contains(&name) => report.problem(
                format!("manifest {name}"),
                "its restore point is not listed by the catalogue; `cbtvault repair` rebuilds the catalogue".into(),
            ),
            Ok(_) => {}
        }
    }
    let lost_points = repo.catalogue().lost_restore_points()?;
    for lost in lost_points {
        // The catalogue's copy names the restore point by its own hash, even
        // when the row's id column is what got damaged.
        let derived = Manifest::from_json(lost.manifest.as_bytes())
            .map(|m| manifest::encode(&m).0)
            .ok();
        let object = match &derived {
            Some(id) if *id != lost.id => format!(
                "restore point {id} (the catalogue's record of it, under {:?}, is damaged)",
                lost.id
            ),
            _ => format!("restore point {}", lost.id),
        };
        report.problem(
            object,
            format!(
                "of disk {:?}: its manifest vanished without forget (noticed {}); `cbtvault repair` restores it from the catalogue's copy",
                lost.disk, lost.noticed
            ),
        );
    }
    Ok(())
}

/// The message of a manifest error without the repeated name.
fn strip_name(e: &Error, name: &str) -> String {
    let text = e.to_string();
    text.strip_prefix(&format!("manifest {name}: "))
        .map(str::to_string)
        .unwrap_or(text)
}

/// A blob that failed, where, and why.
type Failure = (BlobId, (String, u64), String);

/// Re-reads every blob the catalogue places in each pack, packs spread
/// over threads.
fn read_all(
    repo: &Repository,
    packs: Vec<(String, Vec<PackEntry>)>,
    threads: usize,
    progress: OnProgress<'_>,
    report: &mut VerifyReport,
) -> Vec<Failure> {
    let backend = repo.backend();
    let queue = Mutex::new(packs.into_iter());
    let found: Mutex<Vec<Failure>> = Mutex::new(Vec::new());
    let counts = Mutex::new((0u64, 0u64));
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                    let Some((name, entries)) = next else { break };
                    let size = backend.size(FileKind::Pack, &name).unwrap_or(0);
                    let whole = backend
                        .read_at(FileKind::Pack, &name, 0, size as usize)
                        .map_err(|e| e.to_string());
                    let mut local = Vec::new();
                    for e in &entries {
                        let outcome = whole.as_ref().map_err(Clone::clone).and_then(|buf| {
                            let stored = usize::try_from(e.offset)
                                .ok()
                                .and_then(|from| {
                                    buf.get(from..from.checked_add(e.stored_len as usize)?)
                                })
                                .ok_or_else(|| "outside the pack file (truncated?)".to_string())?;
                            pack::decode_blob(&name, e, stored)
                                .map(|_| ())
                                .map_err(|err| match err {
                                    Error::CorruptBlob { what, .. } => what,
                                    other => other.to_string(),
                                })
                        });
                        if let Err(what) = outcome {
                            local.push((e.id, (name.clone(), e.offset), what));
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
    found.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// Walks restore points' block maps as a restore would read them. Subtrees
/// found clean are not walked again (keyed by id and, for the subtree
/// holding a disk's last block, that block's length, which differs between
/// disks of different sizes).
struct PointWalk<'a> {
    reader: &'a BlobReader,
    bad: &'a HashMap<BlobId, String>,
    clean: HashSet<(BlobId, u64)>,
    /// Blobs already named in a problem.
    reported: HashSet<BlobId>,
    shape: TreeShape,
    size: u64,
    /// Blocks of the current restore point that cannot be restored, in
    /// ascending, merged ranges.
    damaged: Vec<std::ops::Range<u64>>,
    problems: Vec<(String, String)>,
}

impl PointWalk<'_> {
    fn start(&mut self, rp: &RestorePointRow) {
        self.shape = rp.manifest.tree().shape;
        self.size = rp.manifest.virtual_size;
        self.damaged.clear();
    }

    /// Length of the disk's last block when `[start, end)` holds it, else
    /// a full block: part of the key under which a subtree is clean.
    fn tail_key(&self, start: u64, end: u64) -> u64 {
        if end == self.shape.blocks && start < end {
            self.size - (end - 1) * BLOCK_SIZE
        } else {
            BLOCK_SIZE
        }
    }

    fn lose(&mut self, id: BlobId, blocks: std::ops::Range<u64>, why: String) {
        match self.damaged.last_mut() {
            Some(last) if last.end == blocks.start => last.end = blocks.end,
            _ => self.damaged.push(blocks),
        }
        if self.reported.insert(id) {
            self.problems.push((format!("blob {id}"), why));
        }
    }

    fn subtree(&mut self, level: u32, index: u64, id: BlobId) -> Result<()> {
        if id.is_zero() {
            return Ok(());
        }
        let span = TreeShape::span(level);
        let start = index.saturating_mul(span);
        let end = start.saturating_add(span).min(self.shape.blocks);
        let key = (id, self.tail_key(start, end));
        if self.clean.contains(&key) {
            return Ok(());
        }
        if let Some(why) = self.bad.get(&id) {
            let why = why.clone();
            self.lose(id, start..end, why);
            return Ok(());
        }
        if level == 0 {
            let expected = self.tail_key(start, end);
            match self.reader.locate(&id) {
                Ok(loc) if u64::from(loc.entry.raw_len) != expected => self.lose(
                    id,
                    start..end,
                    format!(
                        "block {start} holds {} bytes where {expected} belong (a block map that disagrees with the disk size)",
                        loc.entry.raw_len
                    ),
                ),
                Ok(_) => {
                    self.clean.insert(key);
                }
                Err(e @ (Error::Quarantined { .. } | Error::MissingBlob { .. })) => {
                    self.lose(id, start..end, e.to_string())
                }
                Err(e) => return Err(e),
            }
            return Ok(());
        }
        let children = self.reader.read(&id).and_then(|bytes| {
            tree::decode_node(&id, &bytes, level, self.shape.children_of(level, index))
        });
        let children = match children {
            Ok(children) => children,
            Err(e @ Error::Catalogue { .. }) => return Err(e),
            Err(e) => {
                self.lose(id, start..end, format!("block-map node unreadable: {e}"));
                return Ok(());
            }
        };
        let before = self.damaged.len();
        for (slot, child) in children.into_iter().enumerate() {
            self.subtree(level - 1, index * FANOUT + slot as u64, child)?;
        }
        if self.damaged.len() == before {
            self.clean.insert(key);
        }
        Ok(())
    }
}
