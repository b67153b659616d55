//! The engine's side of the in-memory test disk: a [`DiskSource`] over a
//! [`MemDisk`] (which counts reads and can fail them), a [`DiskTarget`]
//! in memory, and a repository whose files live in a `MemoryBackend`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cbtvault_engine::error::BoxError;
use cbtvault_engine::{
    BackupJob, BackupOptions, BackupOutcome, Changes, DiskSource, DiskTarget, NoProgress, Parent,
};
use cbtvault_repo::{
    Backend, CONFIG_FILE, FileKind, InitOptions, MemoryBackend, Repository, SourceInfo,
};
use cbtvault_testkit::MemDisk;
use tokio_util::sync::CancellationToken;

/// A disk source reading a [`MemDisk`]; optionally cancels `cancel` once
/// `cancel_after` reads have been served, as a user pressing Ctrl-C
/// part-way through would.
pub struct MemSource {
    pub disk: MemDisk,
    pub cancel_after: Option<(u64, CancellationToken)>,
    served: AtomicU64,
}

impl MemSource {
    pub fn new(disk: &MemDisk) -> Arc<MemSource> {
        Arc::new(MemSource {
            disk: disk.clone(),
            cancel_after: None,
            served: AtomicU64::new(0),
        })
    }

    pub fn cancelling(disk: &MemDisk, after: u64, cancel: CancellationToken) -> Arc<MemSource> {
        Arc::new(MemSource {
            disk: disk.clone(),
            cancel_after: Some((after, cancel)),
            served: AtomicU64::new(0),
        })
    }
}

impl DiskSource for MemSource {
    fn info(&self) -> SourceInfo {
        SourceInfo {
            provider: "memory".into(),
            location: "memory:test".into(),
            ..SourceInfo::default()
        }
    }

    fn size(&self) -> u64 {
        self.disk.size()
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, BoxError> {
        let served = self.served.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some((after, cancel)) = &self.cancel_after
            && served >= *after
        {
            cancel.cancel();
        }
        Ok(Bytes::from(self.disk.read(offset, len)?))
    }
}

/// A restore target in memory.
pub struct MemTarget(pub Mutex<Vec<u8>>);

impl MemTarget {
    pub fn new(size: u64) -> MemTarget {
        MemTarget(Mutex::new(vec![0; size as usize]))
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl DiskTarget for MemTarget {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut bytes = self.0.lock().unwrap();
        let end = offset as usize + data.len();
        bytes
            .get_mut(offset as usize..end)
            .ok_or_else(|| std::io::Error::other("write past the end"))?
            .copy_from_slice(data);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.write_at(offset, &vec![0; len as usize])
    }

    fn is_zeroed(&self) -> bool {
        true
    }

    fn finish(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A repository whose packs and manifests live in memory; only its
/// catalogue and locks are in the returned temporary directory.
pub fn memory_repo() -> (tempfile::TempDir, Arc<MemoryBackend>, Arc<Repository>) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let local = Repository::init(dir.path(), &InitOptions::default()).expect("init");
    let config = local
        .backend()
        .read(FileKind::Config, CONFIG_FILE)
        .expect("config");
    drop(local);
    let memory = Arc::new(MemoryBackend::new());
    memory
        .write(FileKind::Config, CONFIG_FILE, &config)
        .expect("config in memory");
    let repo = Repository::open_with(dir.path(), memory.clone()).expect("open on memory");
    (dir, memory, Arc::new(repo))
}

/// Small reads, so that an error's offset is the block that failed.
pub fn options() -> BackupOptions {
    BackupOptions {
        read_size: 64 * 1024,
        inflight: 4,
        workers: 2,
        ..BackupOptions::default()
    }
}

pub fn job(disk: &str, changes: Changes) -> BackupJob {
    BackupJob {
        disk: disk.into(),
        changes,
        parent: Parent::Latest,
        time: None,
        options: options(),
        held: None,
        resume: None,
        suspend_as: None,
    }
}

pub fn full() -> Changes {
    Changes::Full { reason: None }
}

pub async fn back_up(
    repo: &Arc<Repository>,
    source: Arc<MemSource>,
    job: BackupJob,
    cancel: CancellationToken,
) -> cbtvault_engine::Result<BackupOutcome> {
    cbtvault_engine::backup(repo.clone(), source, job, Arc::new(NoProgress), cancel).await
}

/// Restores `id` into memory.
pub fn restored(repo: &Repository, id: &str) -> Vec<u8> {
    let rp = repo.resolve(id).expect("restore point");
    let target = MemTarget::new(rp.manifest.virtual_size);
    cbtvault_engine::restore(
        repo,
        &rp,
        &target,
        2,
        &NoProgress,
        &CancellationToken::new(),
    )
    .expect("restore");
    target.bytes()
}

/// What a user sees of a repository: its restore points and manifests.
pub fn visible(repo: &Repository, memory: &MemoryBackend) -> (usize, usize) {
    (
        repo.catalogue().restore_points(None).expect("list").len(),
        memory.list(FileKind::Manifest).expect("manifests").len(),
    )
}
