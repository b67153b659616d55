//! Where repository files live: the storage [`Backend`] trait and its local
//! and in-memory implementations.
//!
//! A backend stores immutable, named files of a few kinds ([`FileKind`]). `write` is atomic
//! and durable: once it returns the whole file is there and survives a crash,
//! and a crash during it leaves at most a partial file that
//! [`Backend::remove_partial`] can clear. Nothing else is ever rewritten in
//! place, which is what keeps every backend (an object store later) simple —
//! except the coordination objects ([`FileKind::Lock`], [`FileKind::Gc`]),
//! which carry no guest data: created with [`Backend::create`] (a
//! conditional write where the store offers one) and renewed with
//! [`Backend::replace`] (see `lease.rs`, `condemn.rs`).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The kinds of file a repository holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileKind {
    /// The repository configuration (one file).
    Config,
    /// A pack of blobs.
    Pack,
    /// A restore point's manifest.
    Manifest,
    /// A VM's saved metadata (see [`crate::vm`]).
    VmMetadata,
    /// A crash-journal note (see [`crate::journal`]).
    Journal,
    /// A key slot of an encrypted repository (see [`crate::key`]).
    Key,
    /// A lock object: who runs what, with a heartbeat and an expiry (see
    /// `lease.rs`). Not history: removable in an append-only repository.
    Lock,
    /// A gc record: packs condemned by a gc and when (see `condemn.rs`).
    Gc,
}

/// True when `e` says the file does not exist.
pub(crate) fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == ErrorKind::NotFound)
}

/// Storage for repository files.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Stores a whole file atomically and durably, replacing none: writing a
    /// name that exists is allowed only with identical content.
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()>;
    /// [`Backend::write`] of a buffer the caller gives up, handed back
    /// after the write for reuse (packs: two buffers take turns). A
    /// backend that must own what it sends (object storage) takes it
    /// without a copy; it may hand back an empty buffer.
    fn write_owned(&self, kind: FileKind, name: &str, data: Vec<u8>) -> Result<Vec<u8>> {
        self.write(kind, name, &data)?;
        Ok(data)
    }
    /// Reads a whole file.
    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>>;
    /// Reads `len` bytes at `offset`; a short file is an error.
    fn read_at(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// The size of a file.
    fn size(&self, kind: FileKind, name: &str) -> Result<u64>;
    /// Names of all complete files of a kind, sorted.
    fn list(&self, kind: FileKind) -> Result<Vec<String>>;
    /// Removes a file durably; removing a missing file is not an error.
    fn remove(&self, kind: FileKind, name: &str) -> Result<()>;
    /// Stores a whole file only if no file of that name exists: true when
    /// this call created it, false when one was there already. A store
    /// that offers it does this in one conditional write (`link` on a
    /// file system, `If-None-Match: *` on S3). This default checks, then
    /// writes: two callers in the same instant may both succeed, which is
    /// why lock objects read themselves back after creating (`lease.rs`).
    fn create(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<bool> {
        match self.size(kind, name) {
            Ok(_) => return Ok(false),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
        self.write(kind, name, data)?;
        Ok(true)
    }
    /// Replaces a file's content: only for lock objects' heartbeats and
    /// gc records, never for data.
    fn replace(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        self.write(kind, name, data)
    }
    /// [`Backend::list`] with each file's last modification time, when the
    /// store keeps one (gc leaves files younger than the oldest running
    /// operation alone; a file without a time is judged by the other rules
    /// alone).
    fn list_dated(&self, kind: FileKind) -> Result<Vec<(String, Option<jiff::Timestamp>)>> {
        Ok(self.list(kind)?.into_iter().map(|n| (n, None)).collect())
    }
    /// Names of partial writes left by interrupted processes.
    fn list_partial(&self) -> Result<Vec<String>>;
    /// Removes partial writes whose writer is gone (a process of this host
    /// that died, or a file untouched for [`PARTIAL_MAX_AGE`]), so that it
    /// is safe beside running backups.
    fn remove_partial(&self) -> Result<usize>;
    /// A human-readable location of a file, for messages.
    fn locate(&self, kind: FileKind, name: &str) -> String;
    /// Moves a damaged file out of the way without deleting it (repair),
    /// so that it is no longer listed; returns where it went.
    fn set_aside(&self, kind: FileKind, name: &str) -> Result<String>;
}

/// A partial write of another host (a shared directory) untouched this
/// long is abandoned.
pub const PARTIAL_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A backend on a local (or mounted) file system.
///
/// Layout: `cbtvault.json`, `packs/XY/NAME.pack` (XY = first two characters of
/// NAME, to keep directories small), `manifests/NAME.json`, `vms/NAME.json` (VM metadata), `journal/NAME.json` (crash-journal notes), `keys/ID.json` (key slots), `locks/NAME.json` (lock objects, beside the kernel lock files `locks/NAME.lock`), `gc/NAME.json` (gc records), and `tmp/` for
/// writes in progress (`NAME.HOST-PID.N.tmp`). Writes go to `tmp/`, are fsynced, renamed into place,
/// and the target directory is fsynced, so a file is either whole or absent.
#[derive(Debug)]
pub struct LocalBackend {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl LocalBackend {
    /// A backend rooted at `root` (which must exist).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalBackend { root: root.into() }
    }

    /// Creates the directory skeleton.
    pub fn create_layout(&self) -> Result<()> {
        set_private(&self.root, 0o700)?;
        for dir in ["packs", "manifests", "vms", "tmp", "locks"] {
            create_private_dir(&self.root.join(dir))?;
        }
        sync_dir(&self.root)
    }

    fn path(&self, kind: FileKind, name: &str) -> PathBuf {
        match kind {
            FileKind::Config => self.root.join(name),
            FileKind::Pack => self
                .root
                .join("packs")
                .join(name.get(..2).unwrap_or("__"))
                .join(format!("{name}.pack")),
            FileKind::Manifest => self.root.join("manifests").join(format!("{name}.json")),
            FileKind::VmMetadata => self.root.join("vms").join(format!("{name}.json")),
            FileKind::Journal => self.root.join("journal").join(format!("{name}.json")),
            FileKind::Key => self.root.join("keys").join(format!("{name}.json")),
            FileKind::Lock => self.root.join("locks").join(format!("{name}.json")),
            FileKind::Gc => self.root.join("gc").join(format!("{name}.json")),
        }
    }

    /// Writes `data` durably to a new file in `tmp/` for a write of
    /// `name` (its name says which process of which host writes it), and
    /// makes sure `target`'s directory exists.
    fn write_tmp(&self, target: &Path, name: &str, data: &[u8]) -> Result<PathBuf> {
        let dir = target.parent().unwrap_or(&self.root).to_path_buf();
        if !dir.exists() {
            create_private_dir(&dir)?;
            sync_dir(dir.parent().unwrap_or(&self.root))?;
        }
        let tmp = self.root.join("tmp").join(format!(
            "{name}.{}-{}.{}.tmp",
            crate::lease::host_key(),
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(Error::io(&tmp))?;
        if let Err(e) = file.write_all(data).and_then(|()| file.sync_all()) {
            // A full disk must not leave the partial file behind for gc.
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(&tmp)(e));
        }
        Ok(tmp)
    }

    /// True when partial file `name` in `tmp/` belongs to no running
    /// writer: a dead process of this host, or untouched for
    /// [`PARTIAL_MAX_AGE`] (another host's, in a shared directory).
    fn is_abandoned(&self, name: &str) -> bool {
        let path = self.root.join("tmp").join(name);
        let old = fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age >= PARTIAL_MAX_AGE);
        // NAME.HOST-PID.N.tmp, or NAME.PID.N.tmp from earlier versions.
        let mut parts = name.rsplitn(4, '.');
        let (_tmp, _n, writer) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
        let (host, pid) = match writer.split_once('-') {
            Some((host, pid)) => (host.to_string(), pid),
            None => (crate::lease::host_key(), writer),
        };
        let Ok(pid) = pid.parse::<u32>() else {
            return old;
        };
        if host == crate::lease::host_key() {
            old || !crate::lease::process_alive(pid, 0)
        } else {
            old
        }
    }
}

/// Sets `path`'s permission bits to `mode`.
pub(crate) fn set_private(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(Error::io(path))
}

/// fsync a directory so that a rename or unlink in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir))
}

impl Backend for LocalBackend {
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        let target = self.path(kind, name);
        let tmp = self.write_tmp(&target, name, data)?;
        if let Err(e) = fs::rename(&tmp, &target) {
            // A failed rename must not leave the partial file behind.
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(&target)(e));
        }
        sync_dir(target.parent().unwrap_or(&self.root))
    }

    /// `link(2)` fails when the target exists: one atomic create-if-absent,
    /// on every POSIX file system (NFS included).
    fn create(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<bool> {
        let target = self.path(kind, name);
        let tmp = self.write_tmp(&target, name, data)?;
        let linked = fs::hard_link(&tmp, &target);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                sync_dir(target.parent().unwrap_or(&self.root))?;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::io(&target)(e)),
        }
    }

    fn list_dated(&self, kind: FileKind) -> Result<Vec<(String, Option<jiff::Timestamp>)>> {
        Ok(self
            .list(kind)?
            .into_iter()
            .map(|name| {
                let time = fs::metadata(self.path(kind, &name))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| jiff::Timestamp::try_from(t).ok());
                (name, time)
            })
            .collect())
    }

    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        let path = self.path(kind, name);
        fs::read(&path).map_err(Error::io(&path))
    }

    fn read_at(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let path = self.path(kind, name);
        let mut file = File::open(&path).map_err(Error::io(&path))?;
        // Read into spare capacity (no zeroing first: the bytes are
        // overwritten at once, and this is the hot path of every restore).
        let mut buf = Vec::with_capacity(len);
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| (&mut file).take(len as u64).read_to_end(&mut buf))
            .map_err(Error::io(&path))?;
        if buf.len() < len {
            return Err(Error::Io {
                path,
                source: std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("file too short for {len} bytes at offset {offset}"),
                ),
            });
        }
        Ok(buf)
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        let path = self.path(kind, name);
        Ok(fs::metadata(&path).map_err(Error::io(&path))?.len())
    }

    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        let mut names = Vec::new();
        match kind {
            FileKind::Config => {
                if self.root.join(crate::repository::CONFIG_FILE).exists() {
                    names.push(crate::repository::CONFIG_FILE.to_string());
                }
            }
            FileKind::Manifest => list_suffix(&self.root.join("manifests"), ".json", &mut names)?,
            // Missing in repositories made before VM metadata: none yet.
            FileKind::VmMetadata => list_suffix(&self.root.join("vms"), ".json", &mut names)?,
            FileKind::Journal => list_suffix(&self.root.join("journal"), ".json", &mut names)?,
            FileKind::Key => list_suffix(&self.root.join("keys"), ".json", &mut names)?,
            FileKind::Lock => list_suffix(&self.root.join("locks"), ".json", &mut names)?,
            FileKind::Gc => list_suffix(&self.root.join("gc"), ".json", &mut names)?,
            FileKind::Pack => {
                let packs = self.root.join("packs");
                for entry in fs::read_dir(&packs).map_err(Error::io(&packs))? {
                    let entry = entry.map_err(Error::io(&packs))?;
                    if entry.file_type().map_err(Error::io(entry.path()))?.is_dir() {
                        list_suffix(&entry.path(), ".pack", &mut names)?;
                    }
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        let path = self.path(kind, name);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().unwrap_or(&self.root)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path)(e)),
        }
    }

    fn list_partial(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        list_suffix(&self.root.join("tmp"), ".tmp", &mut names)?;
        Ok(names
            .into_iter()
            .map(|n| format!("{n}.tmp"))
            .filter(|n| self.is_abandoned(n))
            .collect())
    }

    fn remove_partial(&self) -> Result<usize> {
        let tmp = self.root.join("tmp");
        let names = self.list_partial()?;
        for name in &names {
            let path = tmp.join(name);
            fs::remove_file(&path).map_err(Error::io(&path))?;
        }
        if !names.is_empty() {
            sync_dir(&tmp)?;
        }
        Ok(names.len())
    }

    fn locate(&self, kind: FileKind, name: &str) -> String {
        self.path(kind, name).display().to_string()
    }

    fn set_aside(&self, kind: FileKind, name: &str) -> Result<String> {
        let from = self.path(kind, name);
        let dir = self.root.join("damaged");
        create_private_dir(&dir)?;
        let file_name = from
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| name.to_string());
        let to = dir.join(format!(
            "{file_name}.{}",
            jiff::Timestamp::now().as_second()
        ));
        fs::rename(&from, &to).map_err(Error::io(&from))?;
        sync_dir(from.parent().unwrap_or(&self.root))?;
        sync_dir(&dir)?;
        Ok(to.display().to_string())
    }
}

/// Creates `dir` (and its parents) readable by the owner only: repository
/// files hold guest data, whatever the umask.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(dir))
}

fn list_suffix(dir: &Path, suffix: &str, out: &mut Vec<String>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(Error::io(dir))?;
        if let Some(stem) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(suffix))
        {
            out.push(stem.to_string());
        }
    }
    Ok(())
}

/// A backend in memory, for tests and for trying things out. Partial writes
/// cannot happen in it.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    files: Mutex<BTreeMap<(FileKind, String), Vec<u8>>>,
    aside: Mutex<Vec<(FileKind, String, Vec<u8>)>>,
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// Flips one byte of a stored file: lets tests play bit rot.
    pub fn corrupt(&self, kind: FileKind, name: &str, offset: usize) -> bool {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        match files
            .get_mut(&(kind, name.to_string()))
            .and_then(|f| f.get_mut(offset))
        {
            Some(byte) => {
                *byte ^= 0xff;
                true
            }
            None => false,
        }
    }

    fn missing(&self, kind: FileKind, name: &str) -> Error {
        Error::Io {
            path: self.locate(kind, name).into(),
            source: std::io::Error::from(ErrorKind::NotFound),
        }
    }
}

impl Backend for MemoryBackend {
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files.insert((kind, name.to_string()), data.to_vec());
        Ok(())
    }

    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files
            .get(&(kind, name.to_string()))
            .cloned()
            .ok_or_else(|| self.missing(kind, name))
    }

    fn read_at(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let file = files
            .get(&(kind, name.to_string()))
            .ok_or_else(|| self.missing(kind, name))?;
        usize::try_from(offset)
            .ok()
            .and_then(|start| file.get(start..start.checked_add(len)?))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Error::Io {
                path: self.locate(kind, name).into(),
                source: std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("file too short for {len} bytes at offset {offset}"),
                ),
            })
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files
            .get(&(kind, name.to_string()))
            .map(|f| f.len() as u64)
            .ok_or_else(|| self.missing(kind, name))
    }

    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        Ok(files
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n.clone())
            .collect())
    }

    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files.remove(&(kind, name.to_string()));
        Ok(())
    }

    fn create(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<bool> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        match files.entry((kind, name.to_string())) {
            std::collections::btree_map::Entry::Occupied(_) => Ok(false),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(data.to_vec());
                Ok(true)
            }
        }
    }

    fn list_partial(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    fn remove_partial(&self) -> Result<usize> {
        Ok(0)
    }

    fn locate(&self, kind: FileKind, name: &str) -> String {
        format!("memory:{kind:?}/{name}")
    }

    fn set_aside(&self, kind: FileKind, name: &str) -> Result<String> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let data = files
            .remove(&(kind, name.to_string()))
            .ok_or_else(|| self.missing(kind, name))?;
        self.aside
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((kind, name.to_string(), data));
        Ok(format!("memory:damaged/{kind:?}/{name}"))
    }
}
