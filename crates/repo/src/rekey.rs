//! Copies between repositories whose blobs are not interchangeable: an
//! unencrypted one and an encrypted one, or two encrypted with different
//! master keys (`copy.rs` sends blobs as stored when the keys match).
//!
//! A blob's id is its content's hash under the repository's id function
//! (keyed BLAKE3 in an encrypted repository), and a stored blob is sealed
//! with the repository's key, so nothing can travel as it is. Each source
//! block is read, opened and checked against its source id; its id under
//! the target's function is computed; it is compressed and sealed as the
//! target stores blocks, and written only when the target lacks that id.
//! The block map is rebuilt bottom-up with the target's ids (a node names
//! its children's ids, so every node changes), then, once every pack is
//! durable and what was sent has been read back and checked against its
//! target id, the manifest is written: the commit, as for any copy.
//!
//! **The restore point gets a new id.** An id is the hash, under the
//! target's id function, of the manifest, and the manifest names the root
//! of the block map, whose id is the target's too: the same restore point
//! cannot have the same id in both repositories. The mapping is kept in
//! the copy's manifest (`source.details.copied_from` = `SOURCE-REPO-ID:ID`,
//! sealed with it), so a later copy knows the point is there
//! ([`Repository::copies_of`]) and a copy job's retention counts it once;
//! [`CopyReport::target_ids`] reports it. The manifest's `parent` becomes
//! the parent's id in the target when the parent was copied, else none;
//! VM metadata is copied and named by its new id.
//!
//! **Incremental.** Which target blob holds the content of which source
//! blob is kept in the target's catalogue (`copy_map`, by source
//! repository), so the next night's copy reads from the source only the
//! blocks never mapped: blocks whose mapping names a blob the target still
//! stores ([`Catalogue::contains`]: indexed, not condemned, not
//! quarantined) are taken without reading them. A mapping whose blob is
//! gone (gc, quarantine) is ignored and the block read again, so the map
//! can never make a restore point name a missing blob. Block-map nodes are
//! read (they are 1/2048 of the data) and rebuilt for every restore point,
//! each subtree once per run. A copy that stops half-way keeps its map
//! rows and its durable packs: run again, it reads and sends only the rest.

use std::collections::HashMap;

use crate::BlobId;
use crate::catalogue::{Catalogue, RestorePointRow};
use crate::copy::CopyReport;
use crate::error::{Error, Result};
use crate::pack::{self, BlobKind};
use crate::repository::Repository;
use crate::store::{BlobReader, PackWriter};
use crate::tree::{FANOUT, NodeStore, TreeShape, decode_node, encode_node};

/// The `source.details` key naming the restore point a copy across keys
/// was made from.
pub const COPIED_FROM: &str = "copied_from";

/// Blobs read back from the target at once.
const READ_BACK_BATCH: usize = 256;

impl Repository {
    /// The restore points of this repository that are copies across keys
    /// of restore points of `from`: source id → id here. Read from the
    /// manifests (`source.details.copied_from`), so it survives a
    /// rebuilt catalogue. A copy in the other direction counts too: a
    /// restore point of `from` that was copied from one here maps to it.
    pub fn copies_of(&self, from: &Repository) -> Result<HashMap<String, String>> {
        let mut out = HashMap::new();
        let here = self.catalogue().restore_points(None)?;
        let prefix = format!("{}:", from.config().id);
        for point in &here {
            if let Some(source) = point
                .manifest
                .source
                .details
                .get(COPIED_FROM)
                .and_then(|c| c.strip_prefix(&prefix))
            {
                out.insert(source.to_string(), point.id.clone());
            }
        }
        let ids: std::collections::HashSet<&str> = here.iter().map(|p| p.id.as_str()).collect();
        let back = format!("{}:", self.config().id);
        for point in from.catalogue().restore_points(None)? {
            if let Some(original) = point
                .manifest
                .source
                .details
                .get(COPIED_FROM)
                .and_then(|c| c.strip_prefix(&back))
                && ids.contains(original)
            {
                out.entry(point.id.clone())
                    .or_insert_with(|| original.to_string());
            }
        }
        Ok(out)
    }
}

/// One copy across keys: the state kept from one restore point to the
/// next.
pub(crate) struct Rekey<'a> {
    from: &'a Repository,
    to: &'a Repository,
    reader: &'a BlobReader,
    /// The target's catalogue: the copy map, and presence.
    catalogue: Catalogue,
    compressor: zstd::bulk::Compressor<'static>,
    /// Source nodes rebuilt in this run (their subtrees are complete in
    /// the target): source id → target id.
    nodes: HashMap<BlobId, BlobId>,
    /// Source restore point → its copy's id: parents are named by it.
    pub(crate) points: HashMap<String, String>,
}

/// What one restore point's copy writes.
struct Pass<'r, 'a> {
    rekey: &'r mut Rekey<'a>,
    packs: PackWriter,
    /// Target blobs sent, to read back.
    sent: Vec<BlobId>,
    report: &'r mut CopyReport,
    progress: &'r dyn Fn(u64),
    /// The restore point, for messages.
    what: String,
}

impl<'a> Rekey<'a> {
    pub(crate) fn new(
        to: &'a Repository,
        from: &'a Repository,
        reader: &'a BlobReader,
        points: HashMap<String, String>,
    ) -> Result<Self> {
        let level = to.config().compression_level;
        let compressor = zstd::bulk::Compressor::new(level)
            .map_err(|e| Error::InvalidArgument(format!("zstd level {level}: {e}")))?;
        Ok(Rekey {
            from,
            to,
            reader,
            catalogue: to.open_catalogue()?,
            compressor,
            nodes: HashMap::new(),
            points,
        })
    }

    /// The copy map's key of source blob `id`: hashed with the target's
    /// id function (see `catalogue/copy_map.rs`).
    fn map_key(&self, id: &BlobId) -> Result<[u8; 32]> {
        let source = self.from.config().id.as_bytes();
        let mut buf = Vec::with_capacity(24 + source.len() + 32);
        buf.extend_from_slice(b"cbtvault copy map\0");
        buf.extend_from_slice(source);
        buf.push(0);
        buf.extend_from_slice(&id.0);
        self.to.crypto().hash(&buf)
    }

    /// Copies one restore point; returns its id in the target.
    pub(crate) fn copy_one(
        &mut self,
        point: &RestorePointRow,
        report: &mut CopyReport,
        progress: &dyn Fn(u64),
    ) -> Result<String> {
        let to = self.to;
        let tree = point.manifest.tree();
        let mut pass = Pass {
            packs: to.pack_writer(None)?,
            rekey: self,
            sent: Vec::new(),
            report,
            progress,
            what: format!(
                "restore point {} (disk {:?})",
                point.id, point.manifest.disk
            ),
        };
        let root = pass.subtree(&tree.shape, tree.shape.depth(), 0, tree.root)?;
        let Pass {
            mut packs, sent, ..
        } = pass;
        packs.flush()?;
        // What was written is read back, each blob checked against its
        // target id, before the manifest makes it a restore point.
        let check = to.reader()?;
        for batch in sent.chunks(READ_BACK_BATCH) {
            for read in check.read_many(batch)? {
                read?;
            }
        }
        let mut manifest = point.manifest.clone();
        manifest.root = root;
        manifest.parent = manifest
            .parent
            .as_ref()
            .and_then(|p| self.points.get(p).cloned());
        manifest.source.details.insert(
            COPIED_FROM.into(),
            format!("{}:{}", self.from.config().id, point.id),
        );
        if let Some(vm) = manifest.source.vm.as_mut()
            && let Some(metadata) = vm.metadata.take()
        {
            // Its id is the target's hash of it: saved again, named anew.
            match self.from.vm_metadata(&metadata) {
                Ok(m) => vm.metadata = Some(to.save_vm_metadata(&m)?),
                Err(e) => {
                    tracing::warn!(metadata = %metadata, error = %e, "the VM metadata of a copied restore point cannot be read; copied without it");
                }
            }
        }
        let id = to.commit(&manifest)?;
        self.points.insert(point.id.clone(), id.clone());
        Ok(id)
    }
}

impl Pass<'_, '_> {
    /// Rebuilds source subtree `(level, index)` with id `src` in the
    /// target; returns its target id.
    fn subtree(
        &mut self,
        shape: &TreeShape,
        level: u32,
        index: u64,
        src: BlobId,
    ) -> Result<BlobId> {
        if src.is_zero() {
            return Ok(BlobId::ZERO);
        }
        if let Some(done) = self.rekey.nodes.get(&src) {
            return Ok(*done);
        }
        let children = self
            .rekey
            .reader
            .load_node(&src)
            .and_then(|bytes| decode_node(&src, &bytes, level, shape.children_of(level, index)))
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "{}: a block-map node cannot be read from the source: {e}",
                    self.what
                ))
            })?;
        let targets = if level <= 1 {
            self.blocks(index * FANOUT, &children)?
        } else {
            let mut targets = Vec::with_capacity(children.len());
            for (slot, child) in children.iter().enumerate() {
                targets.push(self.subtree(
                    shape,
                    level - 1,
                    index * FANOUT + slot as u64,
                    *child,
                )?);
            }
            targets
        };
        let id = if targets.iter().all(BlobId::is_zero) {
            BlobId::ZERO
        } else {
            let node = encode_node(level, &targets);
            let id = self.rekey.to.blob_id(&node)?;
            self.store(BlobKind::Node, id, &node)?;
            id
        };
        self.rekey.nodes.insert(src, id);
        Ok(id)
    }

    /// The target ids of the blocks `ids` (starting at block `first`):
    /// from the copy map when the blob it names is still stored, else read
    /// from the source, checked, re-ided and sent when the target lacks it.
    fn blocks(&mut self, first: u64, ids: &[BlobId]) -> Result<Vec<BlobId>> {
        let source = self.rekey.from.config().id.clone();
        let mut out = vec![BlobId::ZERO; ids.len()];
        // Blocks to read, each content once: (slot, map key), and the
        // slots that repeat one of them.
        let mut unknown: Vec<(usize, [u8; 32])> = Vec::new();
        let mut first_of: HashMap<BlobId, usize> = HashMap::new();
        let mut repeats = Vec::new();
        for (slot, id) in ids.iter().enumerate() {
            if id.is_zero() {
                continue;
            }
            if let Some(&earlier) = first_of.get(id) {
                repeats.push((slot, earlier));
                continue;
            }
            let key = self.rekey.map_key(id)?;
            match self.rekey.catalogue.copy_map_get(&source, &key)? {
                Some(target) if self.packs.contains(&target)? => {
                    out[slot] = target;
                    self.report.blobs_present += 1;
                }
                _ => {
                    first_of.insert(*id, slot);
                    unknown.push((slot, key));
                }
            }
        }
        let wanted: Vec<BlobId> = unknown.iter().map(|(slot, _)| ids[*slot]).collect();
        let reads = if wanted.is_empty() {
            Vec::new()
        } else {
            self.rekey.reader.read_many(&wanted)?
        };
        let mut contents = Vec::with_capacity(unknown.len());
        let mut learnt = Vec::with_capacity(unknown.len());
        for ((slot, key), read) in unknown.into_iter().zip(reads) {
            let content = read.map_err(|e| {
                Error::InvalidArgument(format!(
                    "{}: block {} cannot be read from the source: {e}",
                    self.what,
                    first + slot as u64
                ))
            })?;
            self.report.blobs_read += 1;
            let target = self.rekey.to.blob_id(&content)?;
            out[slot] = target;
            learnt.push((key, target));
            contents.push((target, content));
        }
        // Recorded before anything is sent, so that a copy stopped while
        // sending knows what it read; only a hint until the packs are
        // durable, as presence is checked before any row is used.
        self.rekey.catalogue.copy_map_put(&source, &learnt)?;
        for (target, content) in contents {
            self.store(BlobKind::Data, target, &content)?;
        }
        for (slot, earlier) in repeats {
            out[slot] = out[earlier];
        }
        Ok(out)
    }

    /// Writes `content` under target id `id` unless the target has it.
    fn store(&mut self, kind: BlobKind, id: BlobId, content: &[u8]) -> Result<()> {
        if self.packs.contains(&id)? {
            self.report.blobs_present += 1;
            return Ok(());
        }
        let raw_len = u32::try_from(content.len())
            .map_err(|_| Error::InvalidArgument(format!("blob {id}: {} bytes", content.len())))?;
        let (compression, stored) = pack::encode_blob(
            &mut self.rekey.compressor,
            self.rekey.to.crypto(),
            kind,
            &id,
            content,
        )?;
        if self
            .packs
            .add_stored(id, kind, compression, raw_len, &stored)?
        {
            self.sent.push(id);
            self.report.blobs_sent += 1;
            self.report.bytes_sent += stored.len() as u64;
            (self.progress)(stored.len() as u64);
        }
        Ok(())
    }
}
