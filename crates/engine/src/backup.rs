//! The backup pipeline.
//!
//! ```text
//!  reader (async)          workers (N threads)            writer (1 thread)
//!  source.read_at ──────▶  BlockEncoder: zero   ────────▶ reorder by sequence,
//!  `inflight` reads,       check, BLAKE3, dedup           BackupWriter::push
//!  in block order          lookup, zstd                   (packs, block map)
//! ```
//! The repository owns what a restore point is made of (compression, packs,
//! the block map, the manifest, the runs table: [`Repository::begin_backup`]);
//! this module owns the concurrency. Every channel is bounded, so memory is
//! bounded by `(inflight + 4·workers) · read_size` plus the open pack and
//! one pack being written, whatever the size of the disk. The writer keeps
//! block order for the block map, which streams out as it goes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use cbtvault_blockmap::{BLOCK_SIZE, BlockMap, block_count};
use cbtvault_repo::{
    BackupMode, BackupSpec, BackupWriter, BlockEncoder, EncodedBlock, Manifest, ReadStats,
    Repository, Resume,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::source::DiskSource;
use crate::throttle::Throttle;

/// Which blocks to read.
#[derive(Clone, Debug)]
pub enum Changes {
    /// Every block that may hold data; unchanged content still deduplicates
    /// against everything stored.
    Full {
        /// Why a full was taken (recorded in the manifest).
        reason: Option<String>,
    },
    /// Only the marked blocks; the others come from the parent.
    Blocks {
        /// One bit per block of the disk.
        map: BlockMap,
        /// Where the map came from (`bitmap-file`, `xenapi-cbt`, ...).
        origin: String,
    },
}

/// Which restore point an incremental builds on.
#[derive(Clone, Debug, Default)]
pub enum Parent {
    /// The disk's newest restore point.
    #[default]
    Latest,
    /// A given restore point (id or unique prefix).
    Id(String),
}

/// Tuning of the pipeline.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// zstd level; the repository's default when `None`.
    pub compression_level: Option<i32>,
    /// Largest read request, in bytes (a multiple of 64 KiB).
    pub read_size: usize,
    /// Read requests in flight.
    pub inflight: usize,
    /// Hashing and compression threads.
    pub workers: usize,
    /// A bandwidth limit shared with other backups (the disks of a job);
    /// reads wait on it before they are issued.
    pub throttle: Option<Arc<Throttle>>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            compression_level: None,
            // Requests of about a MiB keep buffers small enough for the
            // allocator to reuse (bigger ones fault fresh pages every time),
            // and 16 of them keep a network source busy.
            read_size: 1 << 20,
            inflight: 16,
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            throttle: None,
        }
    }
}

/// A backup to run.
#[derive(Clone, Debug)]
pub struct BackupJob {
    /// The disk's name in the repository.
    pub disk: String,
    pub changes: Changes,
    pub parent: Parent,
    /// When the source was captured; now if `None`.
    pub time: Option<jiff::Timestamp>,
    pub options: BackupOptions,
    /// The locks, when the caller took them already (a provider that must
    /// hold them around hypervisor steps too); `None`: the backup takes them.
    pub held: Option<Arc<DiskLocks>>,
    /// What an interrupted backup of the disk kept, applied to this
    /// source: its kept blocks are not read. Ignored (with a warning) when
    /// it does not fit the backup.
    pub resume: Option<Resume>,
    /// The provider's name for the source's point-in-time view, when a
    /// later run can ask what changed since it: a backup whose reads fail
    /// or are cancelled then keeps what it read for that run to resume
    /// (see [`BackupWriter::suspend`]).
    pub suspend_as: Option<String>,
}

/// The shared repository lock and a disk's exclusive lock, held together.
#[derive(Debug)]
pub struct DiskLocks {
    _repo: cbtvault_repo::Lock,
    _disk: cbtvault_repo::Lock,
}

/// Takes the locks a backup of `disk` needs (see the locking table).
pub async fn lock_disk(repo: &Arc<Repository>, disk: &str) -> Result<Arc<DiskLocks>> {
    let (repo, disk) = (repo.clone(), disk.to_string());
    blocking(move || {
        Ok(Arc::new(DiskLocks {
            _repo: repo.lock_shared()?,
            _disk: repo.lock_disk(&disk)?,
        }))
    })
    .await
}

/// A committed backup.
#[derive(Clone, Debug)]
pub struct BackupOutcome {
    /// The new restore point's id.
    pub restore_point: String,
    pub manifest: Manifest,
}

/// A chunk of consecutive blocks read from the source.
struct Chunk {
    seq: u64,
    first_block: u64,
    data: Bytes,
}

struct Processed {
    seq: u64,
    first_block: u64,
    blocks: Vec<EncodedBlock>,
}

/// Backs up `source` into `repo`. Nothing becomes visible unless the whole
/// backup succeeds; a failed or cancelled backup leaves only unreferenced
/// packs, which gc removes.
pub async fn backup<S: DiskSource>(
    repo: Arc<Repository>,
    source: Arc<S>,
    job: BackupJob,
    progress: Arc<dyn Progress>,
    cancel: CancellationToken,
) -> Result<BackupOutcome> {
    let span = tracing::info_span!("backup", disk = %job.disk);
    async move {
        let started = Instant::now();
        let time = job.time.unwrap_or_else(jiff::Timestamp::now);
        let _locks = match &job.held {
            Some(held) => held.clone(),
            None => lock_disk(&repo, &job.disk).await?,
        };
        let size = source.size();
        crate::nbd::check_disk_size(&job.disk, size)?;
        let blocks = block_count(size);

        let parent = match &job.changes {
            Changes::Full { .. } => None,
            Changes::Blocks { map, .. } => {
                if map.block_count() != blocks {
                    return Err(Error::MapMismatch {
                        disk: job.disk.clone(),
                        map_blocks: map.block_count(),
                        disk_blocks: blocks,
                        size,
                    });
                }
                let repo = repo.clone();
                let (disk, choice) = (job.disk.clone(), job.parent.clone());
                let found = blocking(move || {
                    Ok(match choice {
                        Parent::Latest => repo.latest(&disk)?,
                        Parent::Id(id) => Some(repo.resolve(&id)?),
                    })
                })
                .await?;
                let parent = found.ok_or_else(|| Error::NoParent { disk: job.disk.clone() })?;
                if parent.manifest.disk != job.disk {
                    return Err(Error::Source {
                        disk: job.disk.clone(),
                        what: format!(
                            "parent restore point {} belongs to disk {:?}",
                            parent.id, parent.manifest.disk
                        ),
                        source: None,
                    });
                }
                Some(parent)
            }
        };

        let mut to_read = match &job.changes {
            Changes::Blocks { map, .. } => map.clone(),
            Changes::Full { .. } => match source.allocated().await {
                Ok(Some(map)) if map.block_count() == blocks => map,
                Ok(_) => BlockMap::full(blocks),
                Err(e) => {
                    tracing::warn!(error = %e, "allocation map unavailable; reading every block");
                    BlockMap::full(blocks)
                }
            },
        };
        let mode = match &job.changes {
            Changes::Full { reason } => BackupMode::Full { reason: reason.clone() },
            Changes::Blocks { map, origin } => BackupMode::Incremental {
                changes: origin.clone(),
                changed_blocks: map.count_set(),
            },
        };
        let level = job.options.compression_level;
        let (writer, encoder, extra, resumed) = {
            let repo = repo.clone();
            let disk = job.disk.clone();
            let info = source.info();
            let parent = parent.clone();
            let resume = job.resume.clone();
            blocking(move || {
                let spec = |resume| BackupSpec {
                    disk: &disk,
                    size,
                    parent: parent.as_ref(),
                    source: with_resume(info.clone(), resume),
                    time,
                    mode: mode.clone(),
                    compression_level: level,
                    resume,
                };
                let (writer, resumed) = match repo.begin_backup(spec(resume.as_ref())) {
                    Ok(w) => (w, resume),
                    Err(e) if resume.is_some() => {
                        tracing::warn!(error = %e, "the interrupted backup's record cannot be resumed; reading everything the change source names");
                        repo.discard_resumable(&disk)?;
                        (repo.begin_backup(spec(None))?, None)
                    }
                    Err(e) => return Err(e.into()),
                };
                let extra = writer.blocks_to_reread()?;
                let encoder = repo.block_encoder(level)?;
                Ok((writer, encoder, extra, resumed))
            })
            .await?
        };
        if let Some(resume) = &resumed {
            to_read.difference_with(&resume.kept);
            to_read.union_with(&resume.reread);
            tracing::info!(
                kept = resume.kept.count_set(),
                reread = resume.reread.count_set(),
                snapshot = %resume.record().snapshot,
                "resuming an interrupted backup"
            );
        }
        for range in extra {
            to_read.set_range(range);
        }
        let read_blocks = (job.options.read_size as u64 / BLOCK_SIZE).max(1);
        progress.start("backup", to_read.count_set() * BLOCK_SIZE);
        tracing::info!(size, blocks, to_read = to_read.count_set(), parent = ?parent.as_ref().map(|p| &p.id), "starting");

        let workers = job.options.workers.max(1);
        let (chunk_tx, chunk_rx) = flume::bounded::<Chunk>(workers * 2);
        let (done_tx, done_rx) = flume::bounded::<Result<Processed>>(workers * 2);

        let mut worker_handles = Vec::new();
        for _ in 0..workers {
            let (rx, tx, encoder) = (chunk_rx.clone(), done_tx.clone(), encoder.clone());
            worker_handles.push(std::thread::spawn(move || worker(encoder, size, rx, tx)));
        }
        drop((chunk_rx, done_tx, encoder));

        let writer = {
            let disk = job.disk.clone();
            let span = tracing::Span::current();
            std::thread::spawn(move || {
                let _g = span.enter();
                let mut writer = writer;
                let written = write_stage(&mut writer, &disk, done_rx);
                (writer, written)
            })
        };

        let reader = ReadStage {
            source: &*source,
            disk: &job.disk,
            size,
            read_blocks,
            inflight: job.options.inflight,
            throttle: job.options.throttle.as_deref(),
            progress: &*progress,
            cancel: &cancel,
        };
        let read_stats = reader.run(&to_read, chunk_tx).await;
        let (writer, written) = tokio::task::spawn_blocking(move || writer.join())
            .await
            .map_err(|e| Error::Internal(format!("writer task: {e}")))?
            .map_err(|_| Error::Internal("writer thread panicked".into()))?;
        for h in worker_handles {
            let _ = h.join();
        }
        progress.finish();
        let read_failed = read_stats.is_err();
        let outcome = (|| {
            let (blocks_read, bytes_read) = read_stats?;
            written?;
            Ok::<_, Error>(ReadStats {
                blocks_read,
                bytes_read,
                duration: started.elapsed(),
            })
        })();
        match outcome {
            Ok(read) => {
                let (id, manifest) = blocking(move || Ok(writer.finish(read)?)).await?;
                tracing::info!(restore_point = %id, bytes_read = manifest.stats.bytes_read, bytes_stored = manifest.stats.bytes_stored, "committed");
                Ok(BackupOutcome { restore_point: id, manifest })
            }
            Err(e) => {
                let detail = e.to_string();
                // Blocks read before a source failure (or a stop) are as
                // good as any: kept for the next run when it can resume.
                let suspend_as = job.suspend_as.clone().filter(|_| read_failed);
                let _ = blocking(move || {
                    match suspend_as {
                        Some(view) => match writer.suspend(&view, &detail) {
                            Ok(0) => {}
                            Ok(kept) => tracing::info!(kept, "kept the blocks read for the next run to resume"),
                            Err(e) => tracing::warn!(error = %e, "could not keep the blocks read for the next run"),
                        },
                        None => writer.fail(&detail),
                    }
                    Ok(())
                })
                .await;
                Err(e)
            }
        }
    }
    .instrument(span)
    .await
}

/// What the manifest records of a resumed backup: the view it resumed
/// and how many blocks it kept from it.
fn with_resume(
    mut info: cbtvault_repo::SourceInfo,
    resume: Option<&Resume>,
) -> cbtvault_repo::SourceInfo {
    if let Some(r) = resume {
        info.details
            .insert("resumed_from".into(), r.record().snapshot.clone());
        info.details
            .insert("resumed_blocks".into(), r.kept.count_set().to_string());
    }
    info
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task: {e}")))?
}

/// What the reader needs: the source and how to pace reads from it.
struct ReadStage<'a, S> {
    source: &'a S,
    disk: &'a str,
    size: u64,
    /// Blocks per read request at most.
    read_blocks: u64,
    inflight: usize,
    throttle: Option<&'a Throttle>,
    progress: &'a dyn Progress,
    cancel: &'a CancellationToken,
}

impl<S: DiskSource> ReadStage<'_, S> {
    /// Reads the marked blocks in order, `inflight` requests at a time.
    async fn run(&self, to_read: &BlockMap, tx: flume::Sender<Chunk>) -> Result<(u64, u64)> {
        let ReadStage {
            source,
            disk,
            size,
            read_blocks,
            inflight,
            throttle,
            progress,
            cancel,
        } = *self;
        let requests = to_read.runs(read_blocks).map(|run| {
            let offset = run.start * BLOCK_SIZE;
            let len = (run.end * BLOCK_SIZE).min(size) - offset;
            (run.start, offset, len as usize)
        });
        let mut reads = futures::stream::iter(requests)
            .map(|(first_block, offset, len)| async move {
                if let Some(throttle) = throttle {
                    throttle.take(len as u64).await;
                }
                let data =
                    source
                        .read_at(offset, len)
                        .await
                        .map_err(|source| Error::SourceRead {
                            disk: disk.to_string(),
                            offset,
                            len,
                            source,
                        })?;
                if data.len() != len {
                    return Err(Error::ShortRead {
                        disk: disk.to_string(),
                        offset,
                        expected: len,
                        got: data.len(),
                    });
                }
                Ok((first_block, data))
            })
            .buffered(inflight.max(1));
        let (mut blocks, mut bytes, mut seq) = (0u64, 0u64, 0u64);
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return Err(Error::Cancelled),
                next = reads.next() => next,
            };
            let Some(read) = next else { break };
            let (first_block, data) = read?;
            bytes += data.len() as u64;
            blocks += (data.len() as u64).div_ceil(BLOCK_SIZE);
            progress.advance(data.len() as u64);
            if tx
                .send_async(Chunk {
                    seq,
                    first_block,
                    data,
                })
                .await
                .is_err()
            {
                // The writer stopped; its error is the one to report.
                break;
            }
            seq += 1;
        }
        Ok((blocks, bytes))
    }
}

/// Hashes, deduplicates and compresses chunks.
fn worker(
    mut encoder: BlockEncoder,
    size: u64,
    rx: flume::Receiver<Chunk>,
    tx: flume::Sender<Result<Processed>>,
) {
    for chunk in rx.iter() {
        let result = (|| -> Result<Processed> {
            let mut blocks = Vec::with_capacity(chunk.data.len().div_ceil(BLOCK_SIZE as usize));
            for (i, content) in chunk.data.chunks(BLOCK_SIZE as usize).enumerate() {
                let offset = (chunk.first_block + i as u64) * BLOCK_SIZE;
                debug_assert!(content.len() as u64 == BLOCK_SIZE.min(size - offset));
                blocks.push(encoder.encode(content)?);
            }
            Ok(Processed {
                seq: chunk.seq,
                first_block: chunk.first_block,
                blocks,
            })
        })();
        if tx.send(result).is_err() {
            return;
        }
    }
}

/// Puts processed chunks back in order and hands their blocks to the
/// repository's writer, which stores new ones and builds the block map.
fn write_stage(
    writer: &mut BackupWriter,
    disk: &str,
    rx: flume::Receiver<Result<Processed>>,
) -> Result<()> {
    let mut waiting = BTreeMap::new();
    let mut next_seq = 0u64;
    for processed in rx.iter() {
        let processed = processed?;
        waiting.insert(processed.seq, processed);
        while let Some(p) = waiting.remove(&next_seq) {
            next_seq += 1;
            for (i, block) in p.blocks.into_iter().enumerate() {
                writer.push(p.first_block + i as u64, block)?;
            }
        }
    }
    if !waiting.is_empty() {
        // The reader stopped early (an error or cancellation it reports).
        return Err(Error::Internal(format!(
            "disk {disk:?}: {} chunks never arrived in order",
            waiting.len()
        )));
    }
    Ok(())
}
