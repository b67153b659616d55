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

/// Which packs a data check re-reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DataCheck {
    /// None: structure only.
    None,
    /// Every pack: verify passes exactly when every restore point restores.
    All,
    /// Part `n` of `m` (1-based): a pack is in part `n` when the first 8
    /// bytes of its name, read as a number, are `n - 1` modulo `m`. Parts
    /// 1 to `m` cover every pack once, so a verify job that rotates `n`
    /// re-reads the whole repository over `m` runs.
    Part { n: u32, m: u32 },
    /// About this fraction (0 to 1) of the packs, the same ones each time
    /// for a given fraction (those whose name's first 8 bytes fall below it).
    Fraction(f64),
}

impl DataCheck {
    /// `n/m` or `P%`, as `verify --read-data-subset` takes it.
    pub fn parse(text: &str) -> std::result::Result<DataCheck, String> {
        let t = text.trim();
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(DataCheck::Fraction(p / 100.0)),
                _ => Err(format!(
                    "{text:?}: a percentage must be more than 0 and at most 100"
                )),
            };
        }
        let parsed = t.split_once('/').and_then(|(n, m)| {
            Some((n.trim().parse::<u32>().ok()?, m.trim().parse::<u32>().ok()?))
        });
        match parsed {
            Some((n, m)) if m >= 1 && (1..=m).contains(&n) => Ok(DataCheck::Part { n, m }),
            _ => Err(format!(
                "{text:?} is not a subset: give n/m (1 <= n <= m) or a percentage such as 10%"
            )),
        }
    }

    /// Whether the data of pack `name` is re-read.
    pub fn includes(&self, name: &str) -> bool {
        let key = name
            .get(..16)
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or(0);
        match *self {
            DataCheck::None => false,
            DataCheck::All => true,
            DataCheck::Part { n, m } => key % u64::from(m) == u64::from(n - 1),
            DataCheck::Fraction(f) => (key as f64) < f * (u64::MAX as f64),
        }
    }
}

impl std::fmt::Display for DataCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataCheck::None => f.write_str("none"),
            DataCheck::All => f.write_str("all"),
            DataCheck::Part { n, m } => write!(f, "{n}/{m}"),
            DataCheck::Fraction(x) => write!(f, "{}%", x * 100.0),
        }
    }
}

/// What verify found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Which packs' data was re-read: `all`, `none`, or a subset (`2/7`,
    /// `10%`). Only `all` proves every restore point restores.
    pub data_checked: String,
    /// Packs whose data was re-read.
    pub packs_read: usize,
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
        let check = if read_data {
            DataCheck::All
        } else {
            DataCheck::None
        };
        self.verify_data(check, threads, progress)
    }

    /// [`Repository::verify`] re-reading the data of the packs `check`
    /// selects (a rotating part, or a fraction), as verify jobs do so that
    /// the whole repository is re-read over several runs.
    pub fn verify_data(
        &self,
        check: DataCheck,
        threads: usize,
        progress: OnProgress<'_>,
    ) -> Result<VerifyReport> {
        let _lock = self.lock_shared()?;
        verify(self, check, threads, progress)
    }
}

/// [`Repository::verify`], for a caller that holds a repository lock.
pub(crate) fn verify(
    repo: &Repository,
    check: DataCheck,
    threads: usize,
    progress: OnProgress<'_>,
) -> Result<VerifyReport> {
    let read_data = check != DataCheck::None;
    if read_data && repo.crypto().is_locked() {
        return Err(Error::KeyRequired {
            what: "verifying the data (it opens every blob)".into(),
        });
    }
    let backend = repo.backend().clone();
    let mut report = VerifyReport {
        partial_files: backend.list_partial()?.len(),
        data_checked: check.to_string(),
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
    // Packs gc condemned (a record now, or one already swept): such a pack
    // missing from storage was deleted by a gc killed mid-sweep, not lost;
    // the next gc finishes the sweep.
    let mut condemned = repo.catalogue().condemned_packs()?;
    for (_, record) in crate::condemn::load(backend.as_ref())? {
        condemned.extend(record.packs);
    }
    for (name, _) in &packs {
        let entries = repo.catalogue().blobs_in_pack(name)?;
        if !on_storage.contains(name) && condemned.contains(name) {
            if !repo.is_read_only() {
                repo.catalogue().drop_pack(name)?;
            }
            report.packs -= 1;
            continue;
        }
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
        to_read.retain(|(name, _)| check.includes(name));
        report.packs_read = to_read.len();
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

    if repo.crypto().is_locked() {
        // Nodes cannot be opened: the structure is all that was checked.
        report.restore_points = repo.catalogue().restore_point_ids()?.len();
        report.warning(
            "restore points".into(),
            "not walked: the repository is encrypted and verify was given no key, so only its structure (packs, indices, files, catalogue) was checked".into(),
        );
        return Ok(report);
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
            // Without the key a manifest is only checked to be indexed.
            Err(Error::KeyRequired { .. }) if known.contains(&name) => {}
            Err(Error::KeyRequired { .. }) => report.problem(
                format!("manifest {name}"),
                "its restore point is not listed by the catalogue (a keyed open indexes it)".into(),
            ),
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
            .ok()
            .and_then(|m| manifest::id_of(&m, repo.crypto()).ok());
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
                            pack::decode_blob(repo.crypto(), &name, e, stored)
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

#[cfg(test)]
mod data_check_tests {
    use super::DataCheck;

    #[test]
    fn parts_cover_every_pack_exactly_once() {
        let names: Vec<String> = (0..500u64)
            .map(|i| hex::encode(blake3::hash(&i.to_le_bytes()).as_bytes()))
            .collect();
        let m = 7;
        for name in &names {
            let parts = (1..=m)
                .filter(|n| DataCheck::Part { n: *n, m }.includes(name))
                .count();
            assert_eq!(parts, 1, "{name}");
        }
        let tenth = names
            .iter()
            .filter(|n| DataCheck::Fraction(0.1).includes(n))
            .count();
        assert!((20..=80).contains(&tenth), "{tenth} of 500 in 10%");
    }

    #[test]
    fn subsets_are_parsed_or_refused_with_the_forms_to_use() {
        assert_eq!(DataCheck::parse("2/7"), Ok(DataCheck::Part { n: 2, m: 7 }));
        assert_eq!(DataCheck::parse("10%"), Ok(DataCheck::Fraction(0.1)));
        for bad in ["0/7", "8/7", "1/0", "0%", "101%", "x", ""] {
            let e = DataCheck::parse(bad).unwrap_err();
            assert!(e.contains("n/m") || e.contains("percentage"), "{bad}: {e}");
        }
    }
}
