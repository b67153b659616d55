//! Reading blobs back (always checked against their id) and writing new
//! ones into packs.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::Arc;

use crate::BlobId;
use crate::backend::{Backend, FileKind};
use crate::catalogue::{BlobLocation, Catalogue};
use crate::error::{Error, Result};
use crate::pack::{self, BlobKind, Compression, PackBuilder, PackEntry};
use crate::tree::{NodeSink, NodeStore};

/// Reads blobs for one thread (it owns a catalogue connection and a
/// decompression context).
pub struct BlobReader {
    backend: Arc<dyn Backend>,
    catalogue: Catalogue,
    decompressor: RefCell<Option<zstd::bulk::Decompressor<'static>>>,
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader")
            .field("catalogue", &self.catalogue)
            .finish()
    }
}

impl BlobReader {
    pub(crate) fn new(backend: Arc<dyn Backend>, catalogue: Catalogue) -> Self {
        BlobReader {
            backend,
            catalogue,
            decompressor: RefCell::new(None),
        }
    }

    /// Decodes with this reader's decompression context.
    fn decode(&self, pack: &str, entry: &PackEntry, stored: &[u8]) -> Result<Vec<u8>> {
        let mut slot = self.decompressor.borrow_mut();
        if slot.is_none() {
            *slot = zstd::bulk::Decompressor::new().ok();
        }
        match slot.as_mut() {
            Some(d) => pack::decode_blob_with(d, pack, entry, stored),
            None => pack::decode_blob(pack, entry, stored),
        }
    }

    /// Where `id` is stored.
    pub fn locate(&self, id: &BlobId) -> Result<BlobLocation> {
        self.catalogue
            .locate(id)?
            .ok_or(Error::MissingBlob { id: *id })
    }

    /// Reads one blob and checks it against its id.
    pub fn read(&self, id: &BlobId) -> Result<Vec<u8>> {
        let loc = self.locate(id)?;
        let stored = self.backend.read_at(
            FileKind::Pack,
            &loc.pack,
            loc.entry.offset,
            loc.entry.stored_len as usize,
        )?;
        self.decode(&loc.pack, &loc.entry, &stored)
    }

    /// Reads many blobs, coalescing neighbours in the same pack into one
    /// read. Results come back in the order asked; a damaged blob gives an
    /// error in its own slot without failing the others.
    pub fn read_many(&self, ids: &[BlobId]) -> Result<Vec<Result<Vec<u8>>>> {
        let mut located = Vec::with_capacity(ids.len());
        for (slot, id) in ids.iter().enumerate() {
            located.push((slot, self.locate(id)?));
        }
        located.sort_by(|a, b| (&a.1.pack, a.1.entry.offset).cmp(&(&b.1.pack, b.1.entry.offset)));
        let mut out: Vec<Option<Result<Vec<u8>>>> = (0..ids.len()).map(|_| None).collect();
        let mut i = 0;
        while i < located.len() {
            // Extend the run while blobs are contiguous (or nearly) in one pack.
            let start = located[i].1.entry.offset;
            let mut end = start + u64::from(located[i].1.entry.stored_len);
            let mut j = i + 1;
            while j < located.len()
                && located[j].1.pack == located[i].1.pack
                && located[j].1.entry.offset <= end + 64 * 1024
                && located[j].1.entry.offset + u64::from(located[j].1.entry.stored_len) - start
                    <= 8 << 20
            {
                end = end.max(located[j].1.entry.offset + u64::from(located[j].1.entry.stored_len));
                j += 1;
            }
            let pack_name = &located[i].1.pack;
            match self
                .backend
                .read_at(FileKind::Pack, pack_name, start, (end - start) as usize)
            {
                Ok(buf) => {
                    for (slot, loc) in &located[i..j] {
                        let from = (loc.entry.offset - start) as usize;
                        let stored = &buf[from..from + loc.entry.stored_len as usize];
                        out[*slot] = Some(self.decode(pack_name, &loc.entry, stored));
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for (slot, loc) in &located[i..j] {
                        out[*slot] = Some(Err(Error::CorruptBlob {
                            id: loc.entry.id,
                            pack: pack_name.clone(),
                            offset: loc.entry.offset,
                            what: format!("cannot read: {msg}"),
                        }));
                    }
                }
            }
            i = j;
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::InvalidArgument("blob not read".into()))))
            .collect())
    }

    /// The catalogue connection.
    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }
}

impl NodeStore for BlobReader {
    fn load_node(&self, id: &BlobId) -> Result<Vec<u8>> {
        self.read(id)
    }
}

/// Statistics of a [`PackWriter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Blobs added.
    pub blobs: u64,
    /// Their uncompressed size.
    pub raw_bytes: u64,
    /// Their stored size.
    pub stored_bytes: u64,
    /// Packs written.
    pub packs: u64,
}

/// Appends new blobs to packs. A pack becomes durable and indexed when it
/// reaches the target size or on [`PackWriter::flush`]; until then its blobs
/// are only in memory, and a crash loses them (and no restore point can
/// reference them, because commit happens after flush).
pub struct PackWriter {
    backend: Arc<dyn Backend>,
    catalogue: Catalogue,
    builder: PackBuilder,
    pending: HashSet<BlobId>,
    target: usize,
    compressor: zstd::bulk::Compressor<'static>,
    stats: WriteStats,
}

impl std::fmt::Debug for PackWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackWriter")
            .field("stats", &self.stats)
            .finish()
    }
}

impl PackWriter {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        catalogue: Catalogue,
        target: usize,
        level: i32,
    ) -> Result<Self> {
        let compressor = zstd::bulk::Compressor::new(level)
            .map_err(|e| Error::InvalidArgument(format!("zstd level {level}: {e}")))?;
        Ok(PackWriter {
            backend,
            catalogue,
            builder: PackBuilder::with_capacity(target + target / 8),
            pending: HashSet::new(),
            target,
            compressor,
            stats: WriteStats::default(),
        })
    }

    /// True when `id` is stored or waiting in the open pack.
    pub fn contains(&self, id: &BlobId) -> Result<bool> {
        Ok(self.pending.contains(id) || self.catalogue.contains(id)?)
    }

    /// True when `id` is waiting in the open pack.
    pub fn is_pending(&self, id: &BlobId) -> bool {
        self.pending.contains(id)
    }

    /// Adds a blob whose stored form was prepared by the caller (so that
    /// compression can run on other threads). Returns false, and stores
    /// nothing, when the blob is already in the open pack.
    pub fn add_stored(
        &mut self,
        id: BlobId,
        kind: BlobKind,
        compression: Compression,
        raw_len: u32,
        stored: &[u8],
    ) -> Result<bool> {
        if !self.pending.insert(id) {
            return Ok(false);
        }
        self.builder.push(id, kind, compression, raw_len, stored);
        self.stats.blobs += 1;
        self.stats.raw_bytes += u64::from(raw_len);
        self.stats.stored_bytes += stored.len() as u64;
        if self.builder.data_len() >= self.target {
            self.flush()?;
        }
        Ok(true)
    }

    /// Compresses and adds a blob unless it is stored already.
    pub fn add(&mut self, kind: BlobKind, content: &[u8]) -> Result<BlobId> {
        let id = BlobId::of(content);
        if !self.contains(&id)? {
            let (compression, stored) = pack::encode_blob(&mut self.compressor, content);
            self.add_stored(id, kind, compression, content.len() as u32, &stored)?;
        }
        Ok(id)
    }

    /// Writes the open pack durably and indexes it.
    pub fn flush(&mut self) -> Result<()> {
        if self.builder.is_empty() {
            return Ok(());
        }
        let builder = std::mem::replace(
            &mut self.builder,
            PackBuilder::with_capacity(self.target + self.target / 8),
        );
        let pack = builder.finish();
        self.backend
            .write(FileKind::Pack, &pack.name, &pack.bytes)?;
        self.catalogue
            .insert_pack(&pack.name, pack.bytes.len() as u64, &pack.entries)?;
        tracing::debug!(pack = %pack.name, blobs = pack.entries.len(), bytes = pack.bytes.len(), "pack written");
        self.pending.clear();
        self.stats.packs += 1;
        Ok(())
    }

    /// What was written so far.
    pub fn stats(&self) -> WriteStats {
        self.stats
    }

    /// Entries of the open pack (for tests).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

impl NodeSink for PackWriter {
    fn store_node(&mut self, id: BlobId, bytes: Vec<u8>) -> Result<()> {
        if !self.contains(&id)? {
            let (compression, stored) = pack::encode_blob(&mut self.compressor, &bytes);
            self.add_stored(id, BlobKind::Node, compression, bytes.len() as u32, &stored)?;
        }
        Ok(())
    }
}
