//! Writing a restore point: [`Repository::begin_backup`] gives a
//! [`BackupWriter`] that takes a disk's blocks in order and commits them;
//! [`Repository::block_encoder`] gives the [`BlockEncoder`]s that turn
//! blocks into what the writer takes, on as many threads as the caller
//! likes.
//!
//! The writer owns everything a restore point is made of — the pack writer,
//! the block map under construction, the manifest and the run recorded in
//! the catalogue — so a caller cannot commit a restore point whose packs
//! are not durable, nor leave a run marked running: [`BackupWriter::finish`]
//! flushes, writes the manifest (the commit), indexes it and closes the run
//! as `ok`; [`BackupWriter::fail`], or dropping the writer, closes it as
//! `failed` and leaves only packs no restore point references (gc removes
//! them).

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cbtvault_blockmap::BlockMap;

use crate::BlobId;
use crate::catalogue::{Catalogue, RestorePointRow};
use crate::crypto::Crypto;
use crate::error::{Error, Result};
use crate::id::is_all_zero;
use crate::manifest::{BackupMode, BackupStats, MANIFEST_FORMAT, Manifest, SourceInfo};
use crate::pack::{self, BlobKind, Compression};
use crate::repository::{BACKUP_RUN, BLOCK_SIZE, Repository};
use crate::resume::Resume;
use crate::store::{BlobReader, PackWriter};
use crate::tree::{Cursor, FANOUT, Tree, TreeBuilder};

/// What a backup is about to write.
#[derive(Clone, Debug)]
pub struct BackupSpec<'a> {
    /// The disk's name in the repository.
    pub disk: &'a str,
    /// Size of the disk in bytes.
    pub size: u64,
    /// The restore point an incremental builds on: blocks never pushed are
    /// taken from it. `None` for a full, whose unpushed blocks are zero.
    pub parent: Option<&'a RestorePointRow>,
    /// Where the data comes from (recorded in the manifest).
    pub source: SourceInfo,
    /// When the source was captured.
    pub time: jiff::Timestamp,
    /// How the blocks were chosen (recorded in the manifest).
    pub mode: BackupMode,
    /// zstd level of the block-map nodes; the repository's default when
    /// `None` (blocks are compressed by the [`BlockEncoder`]).
    pub compression_level: Option<i32>,
    /// What an interrupted backup of the disk kept (see [`crate::resume`]):
    /// blocks not pushed come from its block map instead of the parent's.
    /// Its parent and size must be the spec's.
    pub resume: Option<&'a Resume>,
}

/// What the caller read from the source, for the manifest's statistics.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadStats {
    /// Blocks read from the source.
    pub blocks_read: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// How long the backup took.
    pub duration: Duration,
}

/// One block, made ready for [`BackupWriter::push`] by a [`BlockEncoder`].
#[derive(Debug)]
pub enum EncodedBlock {
    /// All zeros: never stored.
    Zero,
    /// Stored already.
    Known(BlobId),
    /// New content, hashed and compressed.
    New(NewBlock),
}

/// A block that is not stored yet, in the form it will be stored.
#[derive(Debug)]
pub struct NewBlock {
    id: BlobId,
    compression: Compression,
    raw_len: u32,
    stored: Vec<u8>,
}

impl EncodedBlock {
    /// The block's id ([`BlobId::ZERO`] for a zero block).
    pub fn id(&self) -> BlobId {
        match self {
            EncodedBlock::Zero => BlobId::ZERO,
            EncodedBlock::Known(id) => *id,
            EncodedBlock::New(new) => new.id,
        }
    }
}

/// Turns disk blocks into [`EncodedBlock`]s: the zero check, the id (BLAKE3,
/// keyed in an encrypted repository), the lookup of the id in the
/// catalogue, and zstd then sealing for new blocks.
///
/// Cheap to clone, and each clone is for one thread: it opens its own
/// catalogue connection and compression context when first used.
#[derive(Debug)]
pub struct BlockEncoder {
    catalogue_path: Arc<PathBuf>,
    crypto: Arc<Crypto>,
    level: i32,
    state: Option<EncoderState>,
}

struct EncoderState {
    catalogue: Catalogue,
    compressor: zstd::bulk::Compressor<'static>,
}

impl std::fmt::Debug for EncoderState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncoderState")
            .field("catalogue", &self.catalogue)
            .finish()
    }
}

impl Clone for BlockEncoder {
    fn clone(&self) -> Self {
        BlockEncoder {
            catalogue_path: self.catalogue_path.clone(),
            crypto: self.crypto.clone(),
            level: self.level,
            state: None,
        }
    }
}

impl BlockEncoder {
    fn state(&mut self) -> Result<&mut EncoderState> {
        if self.state.is_none() {
            let level = self.level;
            let compressor = zstd::bulk::Compressor::new(level)
                .map_err(|e| Error::InvalidArgument(format!("zstd level {level}: {e}")))?;
            let catalogue = Catalogue::open(&self.catalogue_path, false)?;
            self.state = Some(EncoderState {
                catalogue,
                compressor,
            });
        }
        match self.state.as_mut() {
            Some(state) => Ok(state),
            None => Err(Error::InvalidArgument("block encoder not set up".into())),
        }
    }

    /// Encodes one block (at most 64 KiB; only a disk's last block may be
    /// shorter).
    pub fn encode(&mut self, content: &[u8]) -> Result<EncodedBlock> {
        if content.len() as u64 > BLOCK_SIZE {
            return Err(Error::InvalidArgument(format!(
                "a block of {} bytes (blocks are at most {BLOCK_SIZE})",
                content.len()
            )));
        }
        if is_all_zero(content) {
            return Ok(EncodedBlock::Zero);
        }
        let id = self.crypto.blob_id(content)?;
        let crypto = self.crypto.clone();
        let state = self.state()?;
        if state.catalogue.contains(&id)? {
            return Ok(EncodedBlock::Known(id));
        }
        let (compression, stored) =
            pack::encode_blob(&mut state.compressor, &crypto, BlobKind::Data, &id, content)?;
        Ok(EncodedBlock::New(NewBlock {
            id,
            compression,
            raw_len: content.len() as u32,
            stored,
        }))
    }
}

/// A restore point being written. Blocks are pushed in ascending order;
/// blocks not pushed come from the parent (whole subtrees at a time), or
/// are zero without one.
pub struct BackupWriter {
    repo: Arc<Repository>,
    disk: String,
    size: u64,
    time: jiff::Timestamp,
    source: SourceInfo,
    mode: BackupMode,
    /// The parent's id, block map and size.
    parent: Option<(String, Tree, u64)>,
    /// The run in the catalogue; `None` once closed.
    run: Option<i64>,
    packs: PackWriter,
    /// `None` once finished.
    tree: Option<TreeBuilder<'static, Box<BlobReader>>>,
    /// The base of the block map: the parent's, or a resume record's.
    base: Option<Tree>,
    /// Blocks whose content in the block map is the source's: those pushed
    /// and those a resume kept (what a suspend records as done).
    done: BlockMap,
    /// Blocks whose content may differ from the parent's (a superset of
    /// `done`; see [`crate::resume`]).
    touched: BlockMap,
    stats: BackupStats,
}

impl std::fmt::Debug for BackupWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupWriter")
            .field("disk", &self.disk)
            .field("size", &self.size)
            .field("run", &self.run)
            .field("stats", &self.stats)
            .finish()
    }
}

// The engine moves writers and encoders to its own threads.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<BackupWriter>();
    send::<BlockEncoder>();
};

impl Repository {
    /// Starts writing a restore point of `spec.disk`. The caller holds the
    /// disk's lock and the shared repository lock (see the locking table):
    /// runs of the disk still marked running are closed as `interrupted`,
    /// and a new run is recorded. The catalogue is refreshed from the
    /// store first ([`Repository::refresh_packs`]: packs other hosts wrote,
    /// packs gc condemned or deleted), after the caller's operation lock
    /// object exists, so that nothing deduplicates against a pack gc may
    /// delete without gc waiting for this backup (see `condemn.rs`); the
    /// parent's manifest must still be in the store then.
    pub fn begin_backup(self: &Arc<Self>, spec: BackupSpec<'_>) -> Result<BackupWriter> {
        self.require_writable("a backup")?;
        self.refresh_packs()?;
        if let Some(parent) = spec.parent {
            // Forgotten meanwhile (on another host): its blocks may be
            // condemned, and this backup would build on them unseen.
            self.backend()
                .size(crate::backend::FileKind::Manifest, &parent.id)
                .map_err(|e| {
                    Error::InvalidArgument(format!(
                        "disk {:?}: the parent restore point {} is no longer in the repository ({e}); run the backup again",
                        spec.disk, parent.id
                    ))
                })?;
        }
        let packs = self.pack_writer(spec.compression_level)?;
        let parent = spec
            .parent
            .map(|p| (p.id.clone(), p.manifest.tree(), p.manifest.virtual_size));
        let blocks = spec.size.div_ceil(BLOCK_SIZE);
        let (mut done, mut touched) = (BlockMap::empty(blocks), BlockMap::empty(blocks));
        let mut base = parent.as_ref().map(|(_, tree, size)| (*tree, *size));
        if let Some(resume) = spec.resume {
            let from = resume.record();
            if !self.all_stored(&from.tree) {
                // gc (on another host, after this disk's last run died)
                // condemned or deleted what the record kept: building on
                // it would commit blocks a sweep deletes.
                self.discard_resumable(spec.disk)?;
                return Err(Error::InvalidArgument(format!(
                    "disk {:?}: gc condemned blocks the interrupted backup had stored, so it cannot be resumed; its resume record is discarded: run the backup again",
                    spec.disk
                )));
            }
            let parent_id = parent.as_ref().map(|(id, _, _)| id.as_str());
            if from.disk != spec.disk
                || from.parent.as_deref() != parent_id
                || from.size != spec.size
            {
                return Err(Error::InvalidArgument(format!(
                    "disk {:?}: the resume record (disk {:?}, parent {:?}, {} bytes) does not fit this backup (parent {parent_id:?}, {} bytes)",
                    spec.disk, from.disk, from.parent, from.size, spec.size
                )));
            }
            done = resume.kept.clone();
            touched = from.touched.clone();
            // The record's map holds the parent's blocks wherever it was
            // not touched, and has the new size already.
            base = Some((from.tree, spec.size));
        }
        let base_tree = base.map(|(tree, _)| tree);
        let base = match base {
            Some((tree, size)) => Some((Cursor::with_store(tree, Box::new(self.reader()?)), size)),
            None => None,
        };
        let tree = TreeBuilder::for_disk_with(spec.size, base);
        let run = {
            let cat = self.catalogue();
            // The caller holds the disk's lock: a run of it still marked
            // running died without saying so.
            let stale = cat.close_stale_runs(BACKUP_RUN, spec.disk)?;
            if stale > 0 {
                tracing::info!(
                    runs = stale,
                    "closed runs of this disk that were interrupted"
                );
            }
            cat.start_run(BACKUP_RUN, Some(spec.disk))?
        };
        Ok(BackupWriter {
            repo: self.clone(),
            disk: spec.disk.to_string(),
            size: spec.size,
            time: spec.time,
            source: spec.source,
            mode: spec.mode,
            parent,
            run: Some(run),
            packs,
            tree: Some(tree),
            base: base_tree,
            done,
            touched,
            stats: BackupStats::default(),
        })
    }

    /// True when every blob of `tree` is stored in a pack no gc condemned.
    fn all_stored(&self, tree: &crate::tree::Tree) -> bool {
        struct Check<'a>(&'a crate::catalogue::Catalogue, bool);
        impl crate::tree::Visitor for Check<'_> {
            fn node(&mut self, _level: u32, _index: u64, id: &BlobId) -> Result<bool> {
                self.1 &= self.0.contains(id)?;
                Ok(self.1)
            }
            fn leaf(&mut self, _first: u64, ids: &[BlobId]) -> Result<()> {
                for id in ids.iter().filter(|id| !id.is_zero()) {
                    self.1 &= self.0.contains(id)?;
                }
                Ok(())
            }
        }
        let (Ok(reader), Ok(cat)) = (self.reader(), self.open_catalogue()) else {
            return false;
        };
        let mut check = Check(&cat, true);
        crate::tree::walk(tree, &reader, &mut check).is_ok() && check.1
    }

    /// An encoder of blocks for [`BackupWriter::push`], compressing at
    /// `level` (the repository's default when `None`).
    pub fn block_encoder(&self, level: Option<i32>) -> Result<BlockEncoder> {
        let mut encoder = BlockEncoder {
            catalogue_path: Arc::new(self.catalogue_path().to_path_buf()),
            crypto: self.crypto().clone(),
            level: level.unwrap_or(self.config().compression_level),
            state: None,
        };
        // A bad level or an unopenable catalogue is reported now, not by
        // the first block.
        encoder.state()?;
        Ok(encoder)
    }
}

impl BackupWriter {
    /// Blocks that must be read although the changed-block source did not
    /// mark them: the last block of the parent and of the new disk when the
    /// size changed (their lengths differ, so the parent's copy cannot
    /// serve), and blocks whose stored copy is quarantined or gone
    /// (reading them again heals the repository instead of carrying the
    /// damage forward). Empty for a full.
    pub fn blocks_to_reread(&self) -> Result<Vec<Range<u64>>> {
        let (Some((_, _, parent_size)), Some(tree)) = (&self.parent, &self.base) else {
            return Ok(Vec::new());
        };
        let (size, parent_size) = (self.size, *parent_size);
        let blocks = size.div_ceil(BLOCK_SIZE);
        let mut extra = Vec::new();
        if parent_size != size {
            for tail in [size, parent_size] {
                if !tail.is_multiple_of(BLOCK_SIZE) && tail / BLOCK_SIZE < blocks {
                    extra.push(tail / BLOCK_SIZE..tail / BLOCK_SIZE + 1);
                }
            }
            tracing::info!(
                parent_size,
                size,
                "the disk changed size; its last blocks are read again"
            );
        }
        let heal: Vec<_> = self
            .repo
            .blocks_to_heal(tree)?
            .into_iter()
            .map(|r| r.start.min(blocks)..r.end.min(blocks))
            .filter(|r| !r.is_empty())
            .collect();
        if !heal.is_empty() {
            let count: u64 = heal.iter().map(|r| r.end - r.start).sum();
            tracing::warn!(
                blocks = count,
                "the parent restore point uses damaged blocks; reading them again to heal the repository"
            );
        }
        extra.extend(heal);
        Ok(extra)
    }

    /// Sets block `index` of the disk. Blocks come in ascending order; the
    /// ones skipped come from the parent (or are zero).
    pub fn push(&mut self, index: u64, block: EncodedBlock) -> Result<()> {
        let id = match block {
            EncodedBlock::Zero => {
                self.stats.blocks_zero += 1;
                BlobId::ZERO
            }
            EncodedBlock::Known(id) => {
                self.stats.blocks_dedup += 1;
                id
            }
            EncodedBlock::New(new) => {
                // Another thread may have encoded the same content: the
                // pack writer stores it once.
                let raw_len = new.raw_len;
                if self.packs.add_stored(
                    new.id,
                    BlobKind::Data,
                    new.compression,
                    raw_len,
                    &new.stored,
                )? {
                    self.stats.blocks_new += 1;
                    self.stats.bytes_new += u64::from(raw_len);
                    self.stats.bytes_stored += new.stored.len() as u64;
                } else {
                    self.stats.blocks_dedup += 1;
                }
                new.id
            }
        };
        if index < self.done.block_count() {
            self.done.set(index);
            self.touched.set(index);
        }
        match self.tree.as_mut() {
            Some(tree) => tree.push(index, id, &mut self.packs),
            None => Err(Error::InvalidArgument(format!(
                "disk {:?}: block {index} pushed after the backup finished",
                self.disk
            ))),
        }
    }

    /// Commits the restore point: takes the remaining blocks from the
    /// parent, writes every pack durably, then the manifest (the commit),
    /// then its catalogue row, and closes the run as `ok`. Returns the new
    /// restore point's id and manifest. On error nothing becomes visible
    /// and the run is closed as `failed`.
    pub fn finish(mut self, read: ReadStats) -> Result<(String, Manifest)> {
        let result = self.commit(read);
        match &result {
            Ok((id, _)) => {
                self.close("ok", Some(id), "");
                // Bookkeeping as well: a record left behind is only
                // ignored by the next run and dropped by gc.
                if let Err(e) = self.repo.discard_resumable(&self.disk) {
                    tracing::warn!(error = %e, "could not drop the disk's resume record");
                }
            }
            Err(e) => self.close("failed", None, &e.to_string()),
        }
        result
    }

    /// Gives up for now but keeps what was read, for the next backup of
    /// the disk to resume (see [`crate::resume`]): the block map so far
    /// (blocks not pushed from the base) and its packs are made durable,
    /// then recorded with `snapshot`, the provider's name for the view the
    /// blocks came from. The run is closed as `failed` with `why`. Returns
    /// the blocks kept; with none, nothing is recorded.
    pub fn suspend(mut self, snapshot: &str, why: &str) -> Result<u64> {
        let kept = self.done.count_set();
        let result = if kept == 0 {
            Ok(0)
        } else {
            self.keep_for_resume(snapshot).map(|()| kept)
        };
        let detail = match &result {
            Ok(0) => why.to_string(),
            Ok(n) => format!("{why} ({n} blocks kept for the next run to resume)"),
            Err(e) => format!("{why} (the blocks read could not be kept: {e})"),
        };
        self.close("failed", None, &detail);
        result
    }

    fn keep_for_resume(&mut self, snapshot: &str) -> Result<()> {
        let tree = self.tree.take().ok_or_else(|| {
            Error::InvalidArgument(format!("disk {:?}: the backup finished twice", self.disk))
        })?;
        let (tree, _) = tree.finish(&mut self.packs)?;
        self.packs.flush()?;
        let parent = self.parent.as_ref().map(|(id, _, _)| id.as_str());
        self.repo.record_resumable(
            &self.disk,
            parent,
            self.size,
            snapshot,
            &tree,
            &self.done,
            &self.touched,
        )
    }

    /// Gives up: the run is closed as `failed` with `why`, and the packs
    /// written so far stay unreferenced until gc.
    pub fn fail(mut self, why: &str) {
        self.close("failed", None, why);
    }

    fn commit(&mut self, read: ReadStats) -> Result<(String, Manifest)> {
        let tree = self.tree.take().ok_or_else(|| {
            Error::InvalidArgument(format!("disk {:?}: the backup finished twice", self.disk))
        })?;
        let (tree, _) = tree.finish(&mut self.packs)?;
        self.packs.flush()?;
        let mut stats = self.stats;
        stats.nodes_new = self.packs.stats().blobs - stats.blocks_new;
        stats.blocks_total = tree.shape.blocks;
        stats.blocks_read = read.blocks_read;
        stats.bytes_read = read.bytes_read;
        stats.duration_ms = read.duration.as_millis() as u64;
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            disk: self.disk.clone(),
            source: self.source.clone(),
            time: self.time,
            virtual_size: self.size,
            block_size: BLOCK_SIZE,
            root: tree.root,
            fanout: FANOUT,
            parent: self.parent.as_ref().map(|(id, _, _)| id.clone()),
            mode: self.mode.clone(),
            stats,
        };
        let id = self.repo.commit(&manifest)?;
        Ok((id, manifest))
    }

    /// Records the run's end. Bookkeeping: a failure here must not turn a
    /// committed backup into a reported failure.
    fn close(&mut self, status: &str, restore_point: Option<&str>, detail: &str) {
        if let Some(run) = self.run.take()
            && let Err(e) = self
                .repo
                .catalogue()
                .finish_run(run, status, restore_point, detail)
        {
            tracing::warn!(error = %e, "could not record the run's end");
        }
    }
}

impl Drop for BackupWriter {
    fn drop(&mut self) {
        self.close("failed", None, "the backup stopped before its commit");
    }
}
