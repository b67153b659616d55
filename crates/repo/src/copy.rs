//! Copying restore points into another repository (an off-site copy):
//! only the blobs the target lacks travel, each checked against its id
//! when read from the source and again when read back from the target;
//! then the manifest is written, which commits the copy.
//!
//! Between repositories whose blobs are interchangeable (both
//! unencrypted, or one master key) blobs travel in their stored form (no
//! second compression) and the restore point keeps its id. Between any
//! other pair (unencrypted and encrypted, two keys) each block is opened,
//! re-ided, sealed for the target and the block map rebuilt: `rekey.rs`,
//! where the restore point gets a new id, recorded in its manifest.
//!
//! A copy that stops half-way leaves packs the target indexes but no
//! manifest refers to: the next copy finds those blobs present and sends
//! only the rest (resumable by construction); gc removes them otherwise.
//!
//! Locks: the source's shared lock (no gc there meanwhile), the target's
//! shared lock and the disk's lock, as a backup of that disk takes; the
//! target's catalogue is refreshed from its store after its lock is taken
//! and before anything is deduplicated, as a backup does.

use std::collections::{BTreeMap, HashSet};

use crate::BlobId;
use crate::catalogue::RestorePointRow;
use crate::error::{Error, Result};
use crate::repository::Repository;
use crate::store::{BlobReader, PackWriter};
use crate::tree::{NodeStore, Visitor, walk};

/// Blobs read back from the target at once (neighbours in a pack are one
/// read).
const READ_BACK_BATCH: usize = 256;

/// What a copy did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CopyReport {
    /// Restore points written to the target.
    pub copied: Vec<String>,
    /// Restore points the target had already.
    pub present: Vec<String>,
    /// Blobs (blocks and block-map nodes) sent.
    pub blobs_sent: u64,
    /// Their stored bytes.
    pub bytes_sent: u64,
    /// Blobs the target had already.
    pub blobs_present: u64,
    /// Blobs read from the source: every blob sent, for a copy between
    /// repositories with one key; every block not known from an earlier
    /// copy, for a copy across keys (`rekey.rs`).
    pub blobs_read: u64,
    /// For a copy across keys, the id in the target of each restore point
    /// copied or present (source id → target id); empty otherwise, as
    /// restore points keep their ids.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub target_ids: BTreeMap<String, String>,
}

impl Repository {
    /// Copies `points` of `from` into this repository, oldest first;
    /// `progress` is called with the stored bytes of each blob sent.
    pub fn copy_from(
        &self,
        from: &Repository,
        points: &[RestorePointRow],
        progress: &dyn Fn(u64),
    ) -> Result<CopyReport> {
        if from.config().id == self.config().id {
            return Err(Error::InvalidArgument(
                "the source and the target are the same repository".into(),
            ));
        }
        self.require_writable("a copy")?;
        for (side, repo) in [("the source", from), ("the target", self)] {
            if repo.crypto().is_locked() {
                return Err(Error::KeyRequired {
                    what: format!("a copy ({side}, repository {})", repo.config().id),
                });
            }
        }
        // Blobs travel as stored only between repositories whose objects
        // are interchangeable (both unencrypted, or one master key).
        let rekey = from.crypto().fingerprint()? != self.crypto().fingerprint()?;
        let _source_lock = from.lock_shared()?;
        let _target_lock = self.lock_shared()?;
        // After the operation lock object exists and before any blob is
        // taken as present (see `condemn.rs`).
        self.refresh_packs()?;
        let mut points = points.to_vec();
        points.sort_by_key(|p| p.manifest.time);
        let reader = from.reader()?;
        let mut report = CopyReport::default();
        if rekey {
            let copies = self.copies_of(from)?;
            let mut rekey = crate::rekey::Rekey::new(self, from, &reader, copies)?;
            for point in &points {
                if let Some(id) = rekey.points.get(&point.id) {
                    report.target_ids.insert(point.id.clone(), id.clone());
                    report.present.push(point.id.clone());
                    continue;
                }
                let _disk = self.lock_disk(&point.manifest.disk)?;
                let id = rekey.copy_one(point, &mut report, progress)?;
                report.target_ids.insert(point.id.clone(), id);
                report.copied.push(point.id.clone());
            }
            return Ok(report);
        }
        let present: HashSet<String> = self.catalogue().restore_point_ids()?.into_iter().collect();
        for point in &points {
            if present.contains(&point.id) {
                report.present.push(point.id.clone());
                continue;
            }
            let _disk = self.lock_disk(&point.manifest.disk)?;
            self.copy_one(from, &reader, point, &mut report, progress)?;
            report.copied.push(point.id.clone());
        }
        Ok(report)
    }

    fn copy_one(
        &self,
        from: &Repository,
        reader: &BlobReader,
        point: &RestorePointRow,
        report: &mut CopyReport,
        progress: &dyn Fn(u64),
    ) -> Result<()> {
        let mut sender = Sender {
            reader,
            packs: self.pack_writer(None)?,
            seen: HashSet::new(),
            sent: Vec::new(),
            report,
            progress,
        };
        let tree = point.manifest.tree();
        // Every node, the root included, is reported to the visitor.
        walk(&tree, reader as &dyn NodeStore, &mut sender).map_err(|e| {
            Error::InvalidArgument(format!(
                "restore point {} (disk {:?}) cannot be read from the source: {e}",
                point.id, point.manifest.disk
            ))
        })?;
        let Sender {
            mut packs, sent, ..
        } = sender;
        packs.flush()?;
        // What was written is read back, each blob checked against its id,
        // before the manifest makes it a restore point.
        let check = self.reader()?;
        for batch in sent.chunks(READ_BACK_BATCH) {
            for read in check.read_many(batch)? {
                read?;
            }
        }
        if let Some(vm) = point
            .manifest
            .source
            .vm
            .as_ref()
            .and_then(|v| v.metadata.as_ref())
            && self.vm_metadata(vm).is_err()
        {
            match from.vm_metadata(vm) {
                Ok(metadata) => {
                    self.save_vm_metadata(&metadata)?;
                }
                Err(e) => {
                    tracing::warn!(metadata = %vm, error = %e, "the VM metadata of a copied restore point cannot be read; copied without it");
                }
            }
        }
        let id = self.commit(&point.manifest)?;
        if id != point.id {
            return Err(Error::Manifest {
                name: point.id.clone(),
                what: format!("its copy has another id ({id})"),
            });
        }
        Ok(())
    }
}

/// Walks a restore point's block map and sends what the target lacks.
struct Sender<'a> {
    reader: &'a BlobReader,
    packs: PackWriter,
    /// Blobs handled in this copy: shared subtrees are walked once.
    seen: HashSet<BlobId>,
    /// Blobs sent, to read back.
    sent: Vec<BlobId>,
    report: &'a mut CopyReport,
    progress: &'a dyn Fn(u64),
}

impl Sender<'_> {
    /// Sends those of `ids` the target lacks, read from the source in one
    /// coalesced batch.
    fn send(&mut self, ids: &[BlobId]) -> Result<()> {
        let mut wanted = Vec::with_capacity(ids.len());
        for id in ids {
            if id.is_zero() || !self.seen.insert(*id) {
                continue;
            }
            if self.packs.contains(id)? {
                self.report.blobs_present += 1;
            } else {
                wanted.push(*id);
            }
        }
        for (id, read) in wanted.iter().zip(self.reader.read_stored_many(&wanted)?) {
            let (entry, stored) = read?;
            self.packs
                .add_stored(*id, entry.kind, entry.compression, entry.raw_len, &stored)?;
            self.sent.push(*id);
            self.report.blobs_read += 1;
            self.report.blobs_sent += 1;
            self.report.bytes_sent += stored.len() as u64;
            (self.progress)(stored.len() as u64);
        }
        Ok(())
    }
}

impl Visitor for Sender<'_> {
    fn node(&mut self, _level: u32, _index: u64, id: &BlobId) -> Result<bool> {
        // A node the target holds may still lack children (a copy that
        // stopped half-way), so its subtree is walked all the same; only a
        // subtree seen in this copy is not.
        let first = !self.seen.contains(id);
        self.send(std::slice::from_ref(id))?;
        Ok(first)
    }

    fn leaf(&mut self, _first: u64, ids: &[BlobId]) -> Result<()> {
        self.send(ids)
    }
}
