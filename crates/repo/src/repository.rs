//! Opening, creating and committing to a repository.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, FileKind, LocalBackend};
use crate::catalogue::{CATALOGUE_FILE, Catalogue, RestorePointRow};
use crate::crypto::{Crypto, MasterKey};
use crate::encryption::{KeyPrompt, Unlock, read_config};
use crate::error::{Error, Result};
use crate::key::{KdfParams, Secret};
use crate::lock::{self, Lock, LockMode};
use crate::manifest::{self, Manifest};
use crate::store::{BlobReader, PackWriter};

/// Name of the configuration file at the repository's root.
pub const CONFIG_FILE: &str = "cbtvault.json";
/// The repository format this build writes. Version 2 frames each blob
/// in a pack (pack version 2) and added catalogue tables; a version 1
/// repository is upgraded when opened for writing — its packs stay as they
/// are (readable, salvageable through the catalogue), new and rewritten
/// packs are framed — so that older builds refuse it rather than misread
/// it.
pub const FORMAT_VERSION: u32 = 2;
/// The format of an encrypted repository: version 2 with every blob,
/// manifest, VM metadata file and journal note sealed, keyed ids and key
/// slots in `keys/` (see [`crate::crypto`], [`crate::key`]). Its own
/// number, so that a build that knows no encryption refuses it rather
/// than writing plaintext into it; unencrypted repositories stay at 2.
pub const ENCRYPTED_FORMAT_VERSION: u32 = 3;
/// Block size of every disk in a repository: the changed-block maps'
/// block ([`cbtvault_blockmap::BLOCK_SIZE`]) is the one definition.
pub use cbtvault_blockmap::BLOCK_SIZE;
// The on-disk format (config, manifests, pack blob sizes) records 64 KiB:
// a different block map block would be a new repository format.
const _: () = assert!(BLOCK_SIZE == 64 * 1024);
/// The kind of run a backup records in the catalogue.
pub const BACKUP_RUN: &str = "backup";
/// Default target size of a pack for new repositories (each records its
/// own). 16 MiB, as restic's default: a backup holds the open pack and one
/// being written in memory, and at 32 MiB those two alone took a full
/// backup's peak RSS past its 128 MiB budget; fsyncs per byte stay few.
pub const DEFAULT_PACK_SIZE: u64 = 16 * 1024 * 1024;

/// The repository's configuration, written once by `init`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// A random id, to tell repositories apart.
    pub id: String,
    /// [`BLOCK_SIZE`].
    pub block_size: u64,
    /// [`crate::tree::FANOUT`].
    pub tree_fanout: u64,
    /// Default zstd level for new blocks.
    pub compression_level: i32,
    /// Target size of pack files in bytes.
    pub pack_size: u64,
    /// When the repository was created.
    pub created: jiff::Timestamp,
    /// Backups and copies only: nothing that removes history (see
    /// [`Repository::require_removals`]). Chosen at `init`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub append_only: bool,
    /// Present exactly when the repository is encrypted (written only
    /// then, so an unencrypted repository's file is unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionConfig>,
}

/// How an encrypted repository is sealed: recorded so that a later build
/// can tell, and refuse what it does not know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionConfig {
    /// `xchacha20-poly1305`.
    pub cipher: String,
    /// `blake3-keyed`.
    pub ids: String,
    /// Where the key slots are: `keys/`.
    pub key_slots: String,
    /// [`crate::key::KEY_SLOT_FORMAT`].
    pub key_slot_format: u32,
}

impl EncryptionConfig {
    pub(crate) fn current() -> EncryptionConfig {
        EncryptionConfig {
            cipher: "xchacha20-poly1305".into(),
            ids: "blake3-keyed".into(),
            key_slots: "keys/".into(),
            key_slot_format: crate::key::KEY_SLOT_FORMAT,
        }
    }
}

/// Options for [`Repository::init`].
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub compression_level: i32,
    pub pack_size: u64,
    pub append_only: bool,
    /// Encrypts the repository, with a first key slot for this secret.
    pub encryption: Option<Secret>,
    /// Argon2id's cost for that slot.
    pub kdf: KdfParams,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            compression_level: 3,
            pack_size: DEFAULT_PACK_SIZE,
            append_only: false,
            encryption: None,
            kdf: KdfParams::default(),
        }
    }
}

/// An open repository.
#[derive(Debug)]
pub struct Repository {
    root: PathBuf,
    backend: Arc<dyn Backend>,
    config: Config,
    /// Seals and ids objects (the identity for an unencrypted repository).
    pub(crate) crypto: Arc<Crypto>,
    /// The key slot this process unlocked with, if any.
    pub(crate) unlocked_slot: Option<String>,
    catalogue: Mutex<Catalogue>,
    /// Where this process's catalogue connections open: the repository's
    /// own file, or a private copy when the repository is read-only.
    catalogue_path: PathBuf,
    /// The private copy's directory, removed when the repository closes.
    _private_copy: Option<tempfile::TempDir>,
    read_only: bool,
    /// Manifests that could not be read when the repository was opened
    /// (name, why): each costs only its own restore point.
    unreadable_manifests: Vec<(String, String)>,
    /// How long lock objects live without a heartbeat.
    lock_ttl: crate::lease::LockTtl,
    /// Where block-map nodes are cached, for a repository whose files are
    /// remote (see `node_cache.rs`).
    node_cache_dir: Option<PathBuf>,
}

/// True when the repository's files cannot be changed by this process
/// (read-only media or no write permission).
fn is_read_only(root: &Path) -> bool {
    match std::fs::OpenOptions::new()
        .write(true)
        .open(root.join(CATALOGUE_FILE))
    {
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
        ),
    }
}

/// Copies the catalogue (and its WAL) of a read-only repository into a
/// private directory, where SQLite can keep its WAL index and where the
/// catalogue can be brought in line with the manifests.
fn private_catalogue(root: &Path) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::Builder::new()
        .prefix("cbtvault-catalogue-")
        .tempdir()
        .map_err(Error::io(std::env::temp_dir()))?;
    for suffix in ["", "-wal"] {
        let from = root.join(format!("{CATALOGUE_FILE}{suffix}"));
        let to = dir.path().join(format!("{CATALOGUE_FILE}{suffix}"));
        match std::fs::copy(&from, &to) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !suffix.is_empty() => {}
            Err(e) => return Err(Error::io(&from)(e)),
        }
    }
    let path = dir.path().join(CATALOGUE_FILE);
    Ok((dir, path))
}

impl Repository {
    /// Creates a repository in `path` (a new or empty directory).
    pub fn init(path: &Path, options: &InitOptions) -> Result<Repository> {
        if path.join(CONFIG_FILE).exists() {
            return Err(Error::AlreadyExists { path: path.into() });
        }
        std::fs::create_dir_all(path).map_err(Error::io(path))?;
        if std::fs::read_dir(path)
            .map_err(Error::io(path))?
            .next()
            .is_some()
        {
            return Err(Error::NotEmpty { path: path.into() });
        }
        let backend = LocalBackend::new(path);
        backend.create_layout()?;
        Self::init_with(path, Arc::new(backend), options)
    }

    /// Creates a repository whose files live in `backend` (which holds no
    /// repository yet), with its catalogue and locks in the local
    /// directory `local`.
    pub fn init_with(
        local: &Path,
        backend: Arc<dyn Backend>,
        options: &InitOptions,
    ) -> Result<Repository> {
        if !(1..=22).contains(&options.compression_level) {
            return Err(Error::InvalidArgument(format!(
                "compression level {} is outside zstd's 1..=22",
                options.compression_level
            )));
        }
        if !backend.list(FileKind::Config)?.is_empty() {
            return Err(Error::AlreadyExists {
                path: backend.locate(FileKind::Config, CONFIG_FILE).into(),
            });
        }
        let master = options.encryption.as_ref().map(|_| MasterKey::random());
        let config = Config {
            format_version: if master.is_some() {
                ENCRYPTED_FORMAT_VERSION
            } else {
                FORMAT_VERSION
            },
            id: hex::encode(
                &blake3::hash(
                    format!("{:?}{}", jiff::Timestamp::now(), std::process::id()).as_bytes(),
                )
                .as_bytes()[..16],
            ),
            block_size: BLOCK_SIZE,
            tree_fanout: crate::tree::FANOUT,
            compression_level: options.compression_level,
            pack_size: options.pack_size,
            created: jiff::Timestamp::now(),
            append_only: options.append_only,
            encryption: master.as_ref().map(|_| EncryptionConfig::current()),
        };
        if let (Some(master), Some(secret)) = (&master, &options.encryption) {
            crate::key::add_slot(backend.as_ref(), &config.id, master, secret, options.kdf)?;
        }
        std::fs::create_dir_all(local.join("locks")).map_err(Error::io(local))?;
        Catalogue::open(&local.join(CATALOGUE_FILE), true)?;
        let json = serde_json::to_vec_pretty(&config).unwrap_or_default();
        // The config goes last: a store without it is not a repository.
        backend.write(FileKind::Config, CONFIG_FILE, &json)?;
        let unlock = match master {
            Some(master) => Unlock::Master(master),
            None => Unlock::None,
        };
        Self::open_inner(local, backend, unlock)
    }

    /// Opens a repository whose files live in a remote `backend`, keeping
    /// a cache of its catalogue (and the locks) in the local directory
    /// `local`: the catalogue is made when missing and brought up to date
    /// with what the store holds (packs and manifests other hosts or
    /// earlier runs wrote), so any host with access can list and restore.
    pub fn open_cached(local: &Path, backend: Arc<dyn Backend>) -> Result<Repository> {
        Self::open_cached_with_key(local, backend, None)
    }

    /// [`Repository::open_cached`] of an encrypted repository: `key` is
    /// asked for the secret (only when the repository is encrypted).
    pub fn open_cached_with_key(
        local: &Path,
        backend: Arc<dyn Backend>,
        key: Option<KeyPrompt<'_>>,
    ) -> Result<Repository> {
        std::fs::create_dir_all(local.join("locks")).map_err(Error::io(local))?;
        let catalogue = local.join(CATALOGUE_FILE);
        if !catalogue.exists() {
            tracing::info!(cache = %local.display(), "no local catalogue for this repository yet: building it from the store");
            Catalogue::open(&catalogue, true)?;
        }
        let mut repo = Self::open_with_key(local, backend, key)?;
        repo.node_cache_dir = Some(local.to_path_buf());
        repo.refresh_packs()?;
        Ok(repo)
    }

    /// Opens the repository in `path` on the local file system. An
    /// encrypted one opens without its key: its structure can be
    /// checked, nothing can be read or written ([`Error::KeyRequired`]).
    pub fn open(path: &Path) -> Result<Repository> {
        Self::open_keyed(path, None)
    }

    /// [`Repository::open`], asking `key` for the secret when the
    /// repository is encrypted.
    pub fn open_keyed(path: &Path, key: Option<KeyPrompt<'_>>) -> Result<Repository> {
        if !path.join(CONFIG_FILE).is_file() {
            return Err(Error::NotARepository { path: path.into() });
        }
        Self::open_with_key(path, Arc::new(LocalBackend::new(path)), key)
    }

    /// Opens a repository whose files live in `backend`, keeping the
    /// catalogue and locks in the local directory `path`.
    pub fn open_with(path: &Path, backend: Arc<dyn Backend>) -> Result<Repository> {
        Self::open_with_key(path, backend, None)
    }

    /// [`Repository::open_with`], asking `key` for the secret when the
    /// repository is encrypted.
    pub fn open_with_key(
        path: &Path,
        backend: Arc<dyn Backend>,
        key: Option<KeyPrompt<'_>>,
    ) -> Result<Repository> {
        let unlock = match key {
            Some(key) => Unlock::Prompt(key),
            None => Unlock::None,
        };
        Self::open_inner(path, backend, unlock)
    }

    pub(crate) fn open_inner(
        path: &Path,
        backend: Arc<dyn Backend>,
        unlock: Unlock<'_>,
    ) -> Result<Repository> {
        let config = read_config(path, backend.as_ref())?;
        let (crypto, unlocked_slot) = unlock.crypto(&config, backend.as_ref())?;
        let crypto = Arc::new(crypto);
        let mut config = config;
        let read_only = is_read_only(path);
        if config.format_version < FORMAT_VERSION && !read_only {
            tracing::info!(
                from = config.format_version,
                to = FORMAT_VERSION,
                "upgrading the repository format"
            );
            config.format_version = FORMAT_VERSION;
            let json = serde_json::to_vec_pretty(&config).unwrap_or_default();
            backend.write(FileKind::Config, CONFIG_FILE, &json)?;
        }
        let (private_copy, catalogue_path) = if read_only {
            tracing::info!(repository = %path.display(), "read-only repository: using a private copy of its catalogue");
            let (dir, file) = private_catalogue(path)?;
            (Some(dir), file)
        } else {
            (None, path.join(CATALOGUE_FILE))
        };
        let catalogue = Catalogue::open(&catalogue_path, false)?.with_crypto(crypto.clone());
        let backend: Arc<dyn Backend> = if config.append_only {
            Arc::new(crate::append_only::AppendOnlyBackend::new(backend))
        } else {
            backend
        };
        let mut repo = Repository {
            root: path.to_path_buf(),
            backend,
            config,
            crypto,
            unlocked_slot,
            catalogue: Mutex::new(catalogue),
            catalogue_path,
            _private_copy: private_copy,
            read_only,
            unreadable_manifests: Vec::new(),
            lock_ttl: crate::lease::LockTtl::default(),
            node_cache_dir: None,
        };
        repo.unreadable_manifests = repo.reconcile()?;
        // Bookkeeping only: a failure here must not keep a repository from
        // opening (the next backup of the disk closes its stale runs too).
        if !repo.read_only
            && let Err(e) = repo.close_interrupted_runs()
        {
            tracing::warn!(error = %e, "could not close runs whose process died");
        }
        Ok(repo)
    }

    /// Closes backup runs still marked running whose disk nobody holds: the
    /// process that ran them died (the disk lock is a kernel lock, gone with
    /// its holder), so they are `interrupted`, not running.
    fn close_interrupted_runs(&self) -> Result<()> {
        let disks = self.catalogue().disks_with_running(BACKUP_RUN)?;
        for disk in disks {
            if let Ok(_held) = self.lock_disk(&disk) {
                let closed = self.catalogue().close_stale_runs(BACKUP_RUN, &disk)?;
                tracing::info!(%disk, runs = closed, "closed backup runs whose process died");
            }
        }
        Ok(())
    }

    /// Brings the catalogue's restore points in line with the manifests,
    /// which are authoritative: a crash between writing a manifest and
    /// indexing it (or the reverse for forget) is healed here. A manifest
    /// that vanished without forget is kept aside as lost, for verify to
    /// report; a manifest that cannot be read is left out and returned, so
    /// that it costs only its own restore point.
    fn reconcile(&self) -> Result<Vec<(String, String)>> {
        let on_disk = self.backend.list(FileKind::Manifest)?;
        let mut cat = self.catalogue();
        let known: HashSet<String> = cat.restore_point_ids()?.into_iter().collect();
        let forgetting: HashSet<String> = cat.forgetting()?.into_iter().collect();
        let present: HashSet<&String> = on_disk.iter().collect();
        for id in known.iter().filter(|id| !present.contains(id)) {
            if forgetting.contains(id) {
                tracing::info!(restore_point = %id, "finishing an interrupted forget");
                cat.remove_restore_point(id)?;
            } else {
                tracing::warn!(restore_point = %id, "the manifest vanished without forget; `cbtvault verify` reports it and `cbtvault repair` restores it");
                cat.mark_lost(id)?;
            }
        }
        let mut unreadable = Vec::new();
        for id in on_disk.iter().filter(|id| !known.contains(*id)) {
            match self.load_manifest(id) {
                // Without the key it stays unindexed, for a keyed open.
                Err(Error::KeyRequired { .. }) => {}
                Ok(manifest) => {
                    tracing::info!(restore_point = %id, "indexing a committed manifest");
                    cat.insert_restore_point(id, &manifest)?;
                    cat.clear_lost(id)?;
                }
                Err(e) => {
                    tracing::warn!(manifest = %id, error = %e, "manifest left out; `cbtvault verify` reports it");
                    unreadable.push((id.clone(), e.to_string()));
                }
            }
        }
        for id in forgetting.iter().filter(|id| present.contains(id)) {
            // A forget that died before removing the manifest: it never happened.
            cat.remove_forget_mark(id)?;
        }
        Ok(unreadable)
    }

    /// Brings this host's catalogue up to date with the store: packs and
    /// manifests other hosts wrote, packs gc condemned or deleted. Opening
    /// a cached repository and starting a backup do it themselves; a
    /// long-running process calls it before listing or restoring.
    pub fn refresh(&self) -> Result<()> {
        self.refresh_packs()?;
        self.reindex_manifests()?;
        Ok(())
    }

    /// Indexes manifests other hosts committed (or forgot) since this
    /// repository was opened; returns how many cannot be read.
    pub(crate) fn reindex_manifests(&self) -> Result<usize> {
        Ok(self.reconcile()?.len())
    }

    /// Manifests that could not be read when the repository was opened
    /// (name and reason); their restore points are not listed.
    pub fn unreadable_manifests(&self) -> &[(String, String)] {
        &self.unreadable_manifests
    }

    /// True when this process cannot change the repository (read-only
    /// media or permissions): reading commands work, and nothing that
    /// would write is attempted.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Refuses an operation that writes, on a read-only repository.
    pub fn require_writable(&self, what: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.root.clone(),
                what: what.to_string(),
            });
        }
        Ok(())
    }

    /// The repository's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Its configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where its files live.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The shared catalogue connection.
    pub fn catalogue(&self) -> MutexGuard<'_, Catalogue> {
        self.catalogue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where this process's catalogue connections open.
    pub(crate) fn catalogue_path(&self) -> &Path {
        &self.catalogue_path
    }

    /// A new connection to the catalogue, for another thread.
    pub fn open_catalogue(&self) -> Result<Catalogue> {
        Ok(Catalogue::open(&self.catalogue_path, false)?.with_crypto(self.crypto.clone()))
    }

    /// A reader of blobs, for one thread.
    pub fn reader(&self) -> Result<BlobReader> {
        Ok(BlobReader::new(
            self.backend.clone(),
            self.crypto.clone(),
            self.open_catalogue()?,
        )
        .with_node_cache(self.node_cache()))
    }

    /// A connection to this host's node cache, for a remote repository.
    fn node_cache(&self) -> Option<crate::node_cache::NodeCache> {
        self.node_cache_dir
            .as_deref()
            .and_then(crate::node_cache::NodeCache::open)
    }

    /// A writer of new packs, for one thread.
    pub fn pack_writer(&self, compression_level: Option<i32>) -> Result<PackWriter> {
        self.require_writable("a backup")?;
        let path = self.catalogue_path.clone();
        // Nothing is written that could not be read back.
        self.crypto.hash(b"")?;
        PackWriter::new(
            self.backend.clone(),
            self.crypto.clone(),
            self.open_catalogue()?,
            Arc::new(move || Catalogue::open(&path, false)),
            self.config.pack_size as usize,
            compression_level.unwrap_or(self.config.compression_level),
        )
        .map(|w| w.with_node_cache(self.node_cache()))
    }

    /// The shared repository lock: held by every operation that reads or
    /// adds data (backup, restore, verify, diff, forget). Beside the
    /// kernel lock it registers an operation lock object, which tells gc on
    /// any host that this operation runs and since when (see `condemn.rs`).
    pub fn lock_shared(&self) -> Result<Lock> {
        let lock = lock::acquire(
            &self.lock_path("repository"),
            "the repository",
            LockMode::Shared,
            Duration::from_secs(5),
        )?;
        if self.read_only {
            return Ok(lock);
        }
        let what = std::env::args()
            .nth(1)
            .map(|command| format!("cbtvault {command}"))
            .unwrap_or_else(|| "a cbtvault operation".into());
        let lease = crate::lease::register(&self.backend, &what, self.lock_ttl)?;
        crate::repair::refuse_beside_repair(self.backend.as_ref())?;
        Ok(lock.with_lease(Some(lease)))
    }

    /// The kernel lock alone, shared: gc, which keeps repair on this host
    /// out but must not count as an operation it waits for itself.
    pub(crate) fn lock_local_shared(&self, wait: Duration) -> Result<Lock> {
        lock::acquire(
            &self.lock_path("repository"),
            "the repository",
            LockMode::Shared,
            wait,
        )
    }

    /// The exclusive repository lock: repair, which replaces this host's
    /// catalogue. It keeps this host's processes out (a kernel lock);
    /// gc no longer takes it (see the locking table).
    pub fn lock_exclusive(&self, wait: Duration) -> Result<Lock> {
        lock::acquire(
            &self.lock_path("repository"),
            "the repository",
            LockMode::Exclusive,
            wait,
        )
    }

    /// The per-disk lock: one backup of a disk at a time, on any host (a
    /// kernel lock for this host, and lock object `disk-KEY` for all).
    pub fn lock_disk(&self, disk: &str) -> Result<Lock> {
        let key = hex::encode(&blake3::hash(disk.as_bytes()).as_bytes()[..8]);
        let what = format!("disk {disk:?}");
        let lock = lock::acquire(
            &self.lock_path(&format!("disk-{key}")),
            &what,
            LockMode::Exclusive,
            Duration::ZERO,
        )?;
        if self.read_only {
            return Ok(lock);
        }
        let lease = crate::lease::acquire(
            &self.backend,
            &format!("disk-{key}"),
            "disk",
            &format!("a backup of {what}"),
            Duration::ZERO,
            self.lock_ttl,
        )
        .map_err(|e| match e {
            Error::Locked { holder, .. } => Error::Locked { what, holder },
            e => e,
        })?;
        Ok(lock.with_lease(Some(lease)))
    }

    /// How long this repository's lock objects live without a heartbeat.
    pub fn lock_ttl(&self) -> crate::lease::LockTtl {
        self.lock_ttl
    }

    /// Changes it (tests, and hosts whose store answers slowly).
    pub fn set_lock_ttl(&mut self, ttl: crate::lease::LockTtl) {
        self.lock_ttl = ttl;
    }

    /// The per-job lock: one run of a configured job at a time (a second
    /// one would reap the snapshots of the run in progress).
    pub fn lock_job(&self, job: &str) -> Result<Lock> {
        self.lock_named("job", job, &format!("job {job:?}"))
    }

    /// The per-VM lock: one backup of a VM from one VM snapshot at a time.
    pub fn lock_vm(&self, vm: &str) -> Result<Lock> {
        self.lock_named("vm", vm, &format!("VM {vm:?}"))
    }

    pub(crate) fn lock_named(&self, kind: &str, name: &str, what: &str) -> Result<Lock> {
        let key = hex::encode(&blake3::hash(name.as_bytes()).as_bytes()[..8]);
        lock::acquire(
            &self.lock_path(&format!("{kind}-{key}")),
            what,
            LockMode::Exclusive,
            Duration::ZERO,
        )
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        if self.read_only {
            // Nothing can change a read-only repository: the lock is only
            // this process's, beside its private catalogue.
            if let Some(dir) = &self._private_copy {
                return dir.path().join(format!("{name}.lock"));
            }
        }
        self.root.join("locks").join(format!("{name}.lock"))
    }

    /// Makes a restore point visible. Every pack it references must already
    /// be durable and indexed (the [`PackWriter`] guarantees that once
    /// flushed). The manifest is written durably first; the catalogue row
    /// follows.
    pub fn commit(&self, manifest: &Manifest) -> Result<String> {
        self.require_writable("a backup")?;
        // A lock object lost means gc on another host may have judged this
        // process gone: what it wrote may already be condemned.
        if let Some(name) = crate::lease::lost() {
            return Err(Error::LockLost {
                name,
                what: format!("the restore point of disk {:?}", manifest.disk),
            });
        }
        manifest.validate().map_err(|what| Error::Manifest {
            name: manifest.disk.clone(),
            what: format!("refusing to commit: {what}"),
        })?;
        let (id, bytes) = manifest::encode(manifest, &self.crypto)?;
        self.backend.write(FileKind::Manifest, &id, &bytes)?;
        // The manifest is the commit: an error indexing it is healed by the
        // next open, and must not report the backup as failed.
        if let Err(e) = self.catalogue().insert_restore_point(&id, manifest) {
            tracing::warn!(restore_point = %id, error = %e, "committed, but not yet indexed; the next command indexes it");
        }
        Ok(id)
    }

    /// Registers restore point `old` under disk name `disk` too: a new
    /// restore point with the same block map (nothing is copied), whose
    /// source records where it came from (`renamed_from`). For a disk
    /// that was stored under another name.
    pub fn register_renamed(&self, old: &RestorePointRow, disk: &str) -> Result<RestorePointRow> {
        let mut manifest = old.manifest.clone();
        manifest.format = manifest::MANIFEST_FORMAT;
        manifest.source.details.insert(
            "renamed_from".into(),
            format!("{}@{}", old.manifest.disk, old.id),
        );
        manifest.disk = disk.to_string();
        let id = self.commit(&manifest)?;
        Ok(RestorePointRow { id, manifest })
    }

    /// Reads a manifest from its file and checks it: its name is its id,
    /// its content hashes to that id, and every field is valid.
    pub fn load_manifest(&self, id: &str) -> Result<Manifest> {
        let bad = |what: String| Error::Manifest {
            name: id.to_string(),
            what,
        };
        if !manifest::is_restore_point_id(id) {
            return Err(bad(
                "not a manifest (its name is not a restore point id)".into()
            ));
        }
        let bytes = self.backend.read(FileKind::Manifest, id)?;
        if bytes.len() > manifest::MAX_MANIFEST_LEN {
            return Err(bad(format!(
                "{} bytes, too large for a manifest",
                bytes.len()
            )));
        }
        let json = manifest::open(id, &bytes, &self.crypto)?.map_err(bad)?;
        Manifest::from_json(&json).map_err(bad)
    }

    /// Finds a restore point by id or unique id prefix, or `DISK@latest`.
    pub fn resolve(&self, spec: &str) -> Result<RestorePointRow> {
        if let Some(disk) = spec.strip_suffix("@latest") {
            return self
                .latest(disk)?
                .ok_or_else(|| Error::UnknownRestorePoint(spec.to_string()));
        }
        if !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::UnknownRestorePoint(spec.to_string()));
        }
        if spec.len() < 4 {
            return Err(Error::InvalidArgument(format!(
                "restore point prefix {spec:?} is too short: give at least 4 characters"
            )));
        }
        let spec = spec.to_ascii_lowercase();
        let ids = self.catalogue().match_prefix(&spec)?;
        match ids.as_slice() {
            [] => Err(Error::UnknownRestorePoint(spec)),
            [id] => Ok(RestorePointRow {
                id: id.clone(),
                manifest: self.load_manifest(id)?,
            }),
            _ => Err(Error::AmbiguousRestorePoint {
                prefix: spec,
                count: ids.len(),
            }),
        }
    }

    /// The blocks whose content differs between restore points `a` and
    /// `b`, as coalesced block ranges (blocks past the end of the smaller
    /// disk count as zero). Shared subtrees are skipped, so this reads
    /// only the nodes above changed blocks. Takes the shared repository
    /// lock, so that gc cannot delete a node meanwhile.
    pub fn diff(&self, a: &RestorePointRow, b: &RestorePointRow) -> Result<Vec<Range<u64>>> {
        let _lock = self.lock_shared()?;
        let reader = self.reader()?;
        let mut runs: Vec<Range<u64>> = Vec::new();
        crate::tree::diff(
            &a.manifest.tree(),
            &b.manifest.tree(),
            &reader,
            &mut |first, count| match runs.last_mut() {
                Some(last) if last.end == first => last.end += count,
                _ => runs.push(first..first + count),
            },
        )?;
        Ok(runs)
    }

    /// The newest restore point of `disk`.
    pub fn latest(&self, disk: &str) -> Result<Option<RestorePointRow>> {
        Ok(self.catalogue().restore_points(Some(disk))?.pop())
    }

    /// Removes a restore point: marks it as being forgotten, removes its
    /// manifest (that is what makes it invisible), then its catalogue row.
    /// Its data stays until `gc`. Callers go through a plan
    /// ([`Repository::forget_plan`], [`Repository::forget`]), which keeps
    /// each disk's last restore point unless told otherwise.
    pub(crate) fn forget_one(&self, id: &str) -> Result<()> {
        self.catalogue().mark_forgetting(id)?;
        self.backend.remove(FileKind::Manifest, id)?;
        self.catalogue().remove_restore_point(id)
    }
}
