//! Reading blobs back (always checked against their id) and writing new
//! ones into packs.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::BlobId;
use crate::backend::{Backend, FileKind};
use crate::catalogue::{BlobLocation, Catalogue};
use crate::crypto::Crypto;
use crate::error::{Error, Result};
use crate::node_cache::NodeCache;
use crate::pack::{self, BlobKind, Compression, FinishedPack, PackBuilder, PackEntry};
use crate::tree::{NodeSink, NodeStore};

/// Reads blobs for one thread (it owns a catalogue connection and a
/// decompression context).
pub struct BlobReader {
    backend: Arc<dyn Backend>,
    crypto: Arc<Crypto>,
    catalogue: Catalogue,
    decompressor: RefCell<Option<zstd::bulk::Decompressor<'static>>>,
    /// Block-map nodes kept on this host (remote repositories only).
    nodes: Option<NodeCache>,
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader")
            .field("catalogue", &self.catalogue)
            .finish()
    }
}

impl BlobReader {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        crypto: Arc<Crypto>,
        catalogue: Catalogue,
    ) -> Self {
        BlobReader {
            backend,
            crypto,
            catalogue,
            decompressor: RefCell::new(None),
            nodes: None,
        }
    }

    /// Reads block-map nodes through `cache` when one is given.
    pub(crate) fn with_node_cache(mut self, cache: Option<NodeCache>) -> Self {
        self.nodes = cache;
        self
    }

    /// Decodes with this reader's decompression context.
    fn decode(&self, pack: &str, entry: &PackEntry, stored: &[u8]) -> Result<Vec<u8>> {
        self.with_decompressor(pack, entry, |d| {
            pack::decode_blob_with(d, &self.crypto, pack, entry, stored)
        })
    }

    /// Runs `f` with this reader's decompression context, made on first use.
    fn with_decompressor<T>(
        &self,
        pack: &str,
        entry: &PackEntry,
        f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> Result<T>,
    ) -> Result<T> {
        let mut slot = self.decompressor.borrow_mut();
        if slot.is_none() {
            *slot = Some(
                zstd::bulk::Decompressor::new().map_err(|e| Error::CorruptBlob {
                    id: entry.id,
                    pack: pack.to_string(),
                    offset: entry.offset,
                    what: format!("{TRANSIENT}: cannot set up zstd: {e}"),
                })?,
            );
        }
        match slot.as_mut() {
            Some(d) => f(d),
            None => Err(Error::InvalidArgument("no decompression context".into())),
        }
    }

    /// Where `id` is stored.
    pub fn locate(&self, id: &BlobId) -> Result<BlobLocation> {
        match self.catalogue.locate(id)? {
            Some(loc) => Ok(loc),
            None => Err(self.absent(id)),
        }
    }

    /// Why a blob has no location: quarantined, or never stored.
    fn absent(&self, id: &BlobId) -> Error {
        let reason = self.catalogue.quarantined_reason(id).ok().flatten();
        match reason {
            Some(reason) => Error::Quarantined { id: *id, reason },
            None => Error::MissingBlob { id: *id },
        }
    }

    /// Reads one blob and checks it against its id. A blob found damaged
    /// is quarantined (see [`Catalogue::quarantine`]).
    pub fn read(&self, id: &BlobId) -> Result<Vec<u8>> {
        let loc = self.locate(id)?;
        let read = self
            .backend
            .read_at(
                FileKind::Pack,
                &loc.pack,
                loc.entry.offset,
                loc.entry.stored_len as usize,
            )
            .map_err(|e| unreadable(&loc, e))
            .and_then(|stored| self.decode(&loc.pack, &loc.entry, &stored));
        if let Err(e) = &read {
            self.quarantine_if_damaged(&loc, e);
        }
        read
    }

    /// Reads blobs in their stored form (compressed or not, as in their
    /// pack) after checking each content against its id, coalescing
    /// neighbours in a pack into one read (one request on object storage):
    /// for copying them into another repository without compressing them
    /// again. Each slot fails on its own.
    pub(crate) fn read_stored_many(&self, ids: &[BlobId]) -> Result<Vec<Result<StoredBlob>>> {
        let mut stored: Vec<Option<StoredBlob>> = vec![None; ids.len()];
        let results = self.read_coalesced(ids, |slot, loc, bytes| {
            self.decode(&loc.pack, &loc.entry, bytes)?;
            stored[slot] = Some((loc.entry, bytes.to_vec()));
            Ok(())
        })?;
        Ok(results
            .into_iter()
            .zip(stored)
            .map(|(result, s)| {
                result
                    .and_then(|()| s.ok_or_else(|| Error::InvalidArgument("blob not read".into())))
            })
            .collect())
    }

    /// Quarantines the blob at `loc` when `error` shows its stored copy is
    /// damaged or gone (not for errors that may pass, such as EIO).
    fn quarantine_if_damaged(&self, loc: &BlobLocation, error: &Error) {
        let damaged = match error {
            Error::CorruptBlob { what, .. } => !what.starts_with(TRANSIENT),
            _ => false,
        };
        if damaged
            && let Err(e) = self.catalogue.quarantine(
                &loc.entry.id,
                &loc.pack,
                loc.entry.offset,
                &error.to_string(),
            )
        {
            tracing::warn!(blob = %loc.entry.id, error = %e, "could not quarantine a damaged blob");
        }
    }

    /// Reads many blobs, coalescing neighbours in the same pack into one
    /// read. Results come back in the order asked; a damaged blob gives an
    /// error in its own slot without failing the others.
    pub fn read_many(&self, ids: &[BlobId]) -> Result<Vec<Result<Vec<u8>>>> {
        let mut contents: Vec<Option<Vec<u8>>> = vec![None; ids.len()];
        let results = self.read_coalesced(ids, |slot, loc, stored| {
            contents[slot] = Some(self.decode(&loc.pack, &loc.entry, stored)?);
            Ok(())
        })?;
        Ok(results
            .into_iter()
            .zip(contents)
            .map(|(result, content)| {
                result.and_then(|()| {
                    content.ok_or_else(|| Error::InvalidArgument("blob not read".into()))
                })
            })
            .collect())
    }

    /// [`BlobReader::read_many`] into buffers of the caller: each blob's
    /// content is decoded (and checked) straight into its buffer, which
    /// must be the blob's length.
    pub fn read_many_into(&self, wanted: &mut [(BlobId, &mut [u8])]) -> Result<Vec<Result<()>>> {
        let ids: Vec<BlobId> = wanted.iter().map(|(id, _)| *id).collect();
        self.read_coalesced(&ids, |slot, loc, stored| {
            let out = &mut *wanted[slot].1;
            self.with_decompressor(&loc.pack, &loc.entry, |d| {
                pack::decode_blob_into(d, &self.crypto, &loc.pack, &loc.entry, stored, out)
            })
        })
    }

    /// Reads the stored forms of `ids`, one read per run of neighbours in
    /// a pack, and gives each to `decode(slot, location, stored)`; returns
    /// each slot's outcome (a blob without a location, or damaged, fails
    /// its own slot, and a damaged one is quarantined).
    fn read_coalesced(
        &self,
        ids: &[BlobId],
        mut decode: impl FnMut(usize, &BlobLocation, &[u8]) -> Result<()>,
    ) -> Result<Vec<Result<()>>> {
        let mut out: Vec<Option<Result<()>>> = (0..ids.len()).map(|_| None).collect();
        let mut located = Vec::with_capacity(ids.len());
        for (slot, id) in ids.iter().enumerate() {
            // A blob missing from the catalogue fails only its own slot, so
            // the caller names the right block.
            match self.catalogue.locate(id)? {
                Some(loc) => located.push((slot, loc)),
                None => out[slot] = Some(Err(self.absent(id))),
            }
        }
        located.sort_by(|a, b| (&a.1.pack, a.1.entry.offset).cmp(&(&b.1.pack, b.1.entry.offset)));
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
            let buf =
                self.backend
                    .read_at(FileKind::Pack, pack_name, start, (end - start) as usize);
            for (slot, loc) in &located[i..j] {
                let result = match &buf {
                    Ok(buf) => {
                        let from = (loc.entry.offset - start) as usize;
                        match buf.get(from..from + loc.entry.stored_len as usize) {
                            Some(stored) => decode(*slot, loc, stored),
                            None => Err(Error::InvalidArgument("blob outside its read".into())),
                        }
                    }
                    Err(e) => Err(unreadable(loc, clone_io(e))),
                };
                if let Err(e) = &result {
                    self.quarantine_if_damaged(loc, e);
                }
                out[*slot] = Some(result);
            }
            i = j;
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::InvalidArgument("blob not read".into()))))
            .collect())
    }

    /// The id `content` has in this repository (keyed when encrypted):
    /// to compare a disk's blocks with a restore point's.
    pub fn blob_id(&self, content: &[u8]) -> Result<BlobId> {
        self.crypto.blob_id(content)
    }

    /// The catalogue connection.
    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }
}

/// Prefix of the message of a read error that may pass (not quarantined).
/// A blob's pack entry and its bytes as stored there.
pub(crate) type StoredBlob = (PackEntry, Vec<u8>);

const TRANSIENT: &str = "cannot read (may pass)";

/// A failed read of a blob's stored bytes, as a [`Error::CorruptBlob`]: a
/// missing or truncated pack means the copy is gone; other I/O errors
/// (EIO, a network file system hiccup) may pass and are marked so.
fn unreadable(loc: &BlobLocation, e: Error) -> Error {
    let gone = matches!(&e, Error::Io { source, .. }
        if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof));
    Error::CorruptBlob {
        id: loc.entry.id,
        pack: loc.pack.clone(),
        offset: loc.entry.offset,
        what: if gone {
            format!("its pack is missing or truncated: {e}")
        } else {
            format!("{TRANSIENT}: {e}")
        },
    }
}

/// An error seen by several blobs of one coalesced read.
fn clone_io(e: &Error) -> Error {
    match e {
        Error::Io { path, source } => Error::Io {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        other => Error::InvalidArgument(other.to_string()),
    }
}

impl NodeStore for BlobReader {
    fn load_node(&self, id: &BlobId) -> Result<Vec<u8>> {
        let Some(cache) = &self.nodes else {
            return self.read(id);
        };
        if let Some(bytes) = cache.get(id, |b| self.crypto.hash(b).ok()) {
            return Ok(bytes);
        }
        let bytes = self.read(id)?;
        cache.put(id, &bytes);
        Ok(bytes)
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

/// Appends new blobs to packs. A full pack is handed to a background
/// thread that writes it durably and indexes it while new blobs keep
/// arriving (at most one pack waits, so memory stays bounded);
/// [`PackWriter::flush`] writes the open pack and waits until every pack is
/// durable and indexed. Until then blobs may be only in memory and a crash
/// loses them — but no restore point can reference them, because commit
/// happens after flush.
pub struct PackWriter {
    backend: Arc<dyn Backend>,
    crypto: Arc<Crypto>,
    catalogue: Catalogue,
    builder: PackBuilder,
    /// Blobs in the open pack.
    pending: HashSet<BlobId>,
    /// Blobs in packs the flusher has not indexed yet.
    in_flight: Arc<Mutex<HashSet<BlobId>>>,
    flusher: Option<Flusher>,
    /// The buffer of the last pack the flusher wrote, for the next pack:
    /// two buffers take turns instead of fresh pages per pack.
    spare: Arc<Mutex<Option<Vec<u8>>>>,
    /// Opens the flusher's own catalogue connection.
    open_catalogue: Arc<dyn Fn() -> Result<Catalogue> + Send + Sync>,
    target: usize,
    compressor: zstd::bulk::Compressor<'static>,
    stats: WriteStats,
    /// Where the nodes it writes are kept too (remote repositories only).
    nodes: Option<NodeCache>,
}

/// The background thread that makes packs durable.
struct Flusher {
    tx: std::sync::mpsc::SyncSender<FinishedPack>,
    thread: std::thread::JoinHandle<Result<()>>,
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
        crypto: Arc<Crypto>,
        catalogue: Catalogue,
        open_catalogue: Arc<dyn Fn() -> Result<Catalogue> + Send + Sync>,
        target: usize,
        level: i32,
    ) -> Result<Self> {
        let compressor = zstd::bulk::Compressor::new(level)
            .map_err(|e| Error::InvalidArgument(format!("zstd level {level}: {e}")))?;
        Ok(PackWriter {
            backend,
            crypto,
            catalogue,
            builder: PackBuilder::with_capacity(target + target / 8),
            pending: HashSet::new(),
            in_flight: Arc::new(Mutex::new(HashSet::new())),
            flusher: None,
            spare: Arc::new(Mutex::new(None)),
            open_catalogue,
            target,
            compressor,
            stats: WriteStats::default(),
            nodes: None,
        })
    }

    /// Keeps the block-map nodes it writes in `cache` when one is given.
    pub(crate) fn with_node_cache(mut self, cache: Option<NodeCache>) -> Self {
        self.nodes = cache;
        self
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<BlobId>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when `id` is stored, being stored, or waiting in the open pack.
    pub fn contains(&self, id: &BlobId) -> Result<bool> {
        Ok(self.pending.contains(id)
            || self.in_flight().contains(id)
            || self.catalogue.contains(id)?)
    }

    /// True when `id` is waiting in the open pack.
    pub fn is_pending(&self, id: &BlobId) -> bool {
        self.pending.contains(id)
    }

    /// Adds a blob whose stored form was prepared by the caller (so that
    /// compression can run on other threads). Returns false, and stores
    /// nothing, when the blob is already on its way into a pack.
    pub fn add_stored(
        &mut self,
        id: BlobId,
        kind: BlobKind,
        compression: Compression,
        raw_len: u32,
        stored: &[u8],
    ) -> Result<bool> {
        if self.pending.contains(&id) || self.in_flight().contains(&id) {
            return Ok(false);
        }
        self.pending.insert(id);
        self.builder.push(id, kind, compression, raw_len, stored);
        self.stats.blobs += 1;
        self.stats.raw_bytes += u64::from(raw_len);
        self.stats.stored_bytes += stored.len() as u64;
        if self.builder.data_len() >= self.target {
            self.hand_over()?;
        }
        Ok(true)
    }

    /// Compresses and adds a blob unless it is stored already.
    pub fn add(&mut self, kind: BlobKind, content: &[u8]) -> Result<BlobId> {
        let id = self.crypto.blob_id(content)?;
        if !self.contains(&id)? {
            let (compression, stored) =
                pack::encode_blob(&mut self.compressor, &self.crypto, kind, &id, content)?;
            self.add_stored(id, kind, compression, content.len() as u32, &stored)?;
        }
        Ok(id)
    }

    /// Finishes the open pack and gives it to the flusher.
    fn hand_over(&mut self) -> Result<()> {
        if self.builder.is_empty() {
            return Ok(());
        }
        let builder = std::mem::replace(&mut self.builder, PackBuilder::with_capacity(0));
        let pack = builder.finish();
        self.in_flight().extend(pack.entries.iter().map(|e| e.id));
        self.pending.clear();
        self.stats.packs += 1;
        if self.flusher.is_none() {
            self.flusher = Some(self.start_flusher()?);
        }
        let sent = self.flusher.as_ref().map(|f| f.tx.send(pack));
        if !matches!(sent, Some(Ok(()))) {
            // The flusher stopped: its error says why.
            return self.join_flusher().and(Err(Error::InvalidArgument(
                "the pack flusher stopped".into(),
            )));
        }
        // The flusher took this pack only after writing the previous one,
        // whose buffer now waits in `spare`.
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.builder = match spare {
            Some(buffer) => PackBuilder::reusing(buffer),
            None => PackBuilder::with_capacity(self.target + self.target / 8),
        };
        Ok(())
    }

    fn start_flusher(&self) -> Result<Flusher> {
        let catalogue = (self.open_catalogue)()?;
        let backend = self.backend.clone();
        let in_flight = self.in_flight.clone();
        let spare = self.spare.clone();
        // A rendezvous: the next pack is handed over only once the previous
        // one is written, so at most two full packs are in memory (one
        // being written, one filled), whatever the disk.
        let (tx, rx) = std::sync::mpsc::sync_channel::<FinishedPack>(0);
        let thread = std::thread::Builder::new()
            .name("cbtvault-packs".into())
            .spawn(move || -> Result<()> {
                let mut catalogue = catalogue;
                for pack in rx {
                    let len = pack.bytes.len();
                    let buffer = backend.write_owned(FileKind::Pack, &pack.name, pack.bytes)?;
                    catalogue.insert_pack(&pack.name, len as u64, &pack.entries)?;
                    tracing::debug!(pack = %pack.name, blobs = pack.entries.len(), bytes = len, "pack written");
                    let mut set = in_flight.lock().unwrap_or_else(|e| e.into_inner());
                    for e in &pack.entries {
                        set.remove(&e.id);
                    }
                    drop(set);
                    *spare.lock().unwrap_or_else(|e| e.into_inner()) = Some(buffer);
                }
                Ok(())
            })
            .map_err(|e| Error::Io {
                path: "pack flusher thread".into(),
                source: e,
            })?;
        Ok(Flusher { tx, thread })
    }

    fn join_flusher(&mut self) -> Result<()> {
        match self.flusher.take() {
            None => Ok(()),
            Some(Flusher { tx, thread }) => {
                drop(tx);
                thread.join().unwrap_or_else(|_| {
                    Err(Error::InvalidArgument("the pack flusher panicked".into()))
                })
            }
        }
    }

    /// Writes the open pack and waits until every pack is durable and
    /// indexed.
    pub fn flush(&mut self) -> Result<()> {
        let handed = self.hand_over();
        let joined = self.join_flusher();
        handed.and(joined)
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

impl Drop for PackWriter {
    fn drop(&mut self) {
        // Finish what was handed over; an error was or will be reported by flush.
        let _ = self.join_flusher();
    }
}

impl NodeSink for PackWriter {
    fn store_node(&mut self, bytes: Vec<u8>) -> Result<BlobId> {
        let id = self.add(BlobKind::Node, &bytes)?;
        if let Some(cache) = &self.nodes {
            cache.put(&id, &bytes);
        }
        Ok(id)
    }
}
