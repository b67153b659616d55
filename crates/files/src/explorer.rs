//! [`Explorer`]: a restore point's partitions and file systems by path.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;
use std::sync::Arc;

use cbtvault_repo::{Repository, RestorePointRow};

use crate::entry::{Entry, FileSystem, FsError, FsResult, Kind};
use crate::error::{Error, Result};
use crate::ext4::Ext4Fs;
use crate::fat::FatFs;
use crate::ntfs::NtfsFs;
use crate::table::{FsKind, Layout, Partition, probe, read_layout};
use crate::view::{DiskView, Slice};

/// How an [`Explorer`] reads.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// 64 KiB blocks kept in memory.
    pub cache_blocks: usize,
    /// Bytes a reader may read for one operation, beyond the file it
    /// reads (twice its size); past it the operation fails as a loop.
    pub read_budget: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            cache_blocks: 256,
            read_budget: 1 << 30,
        }
    }
}

/// The partition a path is in and its path within the file system.
pub(crate) struct Located {
    /// The partition's name; empty for a disk without a partition table.
    pub(crate) part: String,
    pub(crate) path: Vec<Vec<u8>>,
}

/// A restore point's file systems, read by path: `files ls` and
/// `files get`. Single-threaded; holds the repository's shared lock.
pub struct Explorer {
    view: Rc<DiskView>,
    layout: Layout,
    mounted: HashMap<String, Box<dyn FileSystem>>,
    options: Options,
}

impl Explorer {
    /// Opens `rp` and reads its partition table.
    pub fn open(
        repo: &Arc<Repository>,
        rp: &RestorePointRow,
        options: Options,
    ) -> Result<Explorer> {
        Self::with_view(DiskView::open(repo, rp, options.cache_blocks)?, options)
    }

    /// An explorer over a raw disk image in memory, named `label` in
    /// messages: for testing and fuzzing the readers without a
    /// repository. Not the way to read a restore point.
    #[doc(hidden)]
    pub fn open_image(image: Vec<u8>, label: &str, options: Options) -> Result<Explorer> {
        let view = DiskView::in_memory(image, label.to_string(), options.cache_blocks);
        Self::with_view(view, options)
    }

    fn with_view(view: DiskView, options: Options) -> Result<Explorer> {
        let view = Rc::new(view);
        view.set_budget(options.read_budget);
        let disk = Slice::new(view.clone(), 0, view.size());
        let layout = guarded(&view, || read_layout(&disk), "the partition table")?;
        Ok(Explorer {
            view,
            layout,
            mounted: HashMap::new(),
            options,
        })
    }

    /// The disk's partitions (empty without a partition table).
    pub fn partitions(&self) -> &[Partition] {
        match &self.layout {
            Layout::Whole => &[],
            Layout::Table(parts) => parts,
        }
    }

    /// Blocks fetched from the repository so far.
    pub fn blocks_fetched(&self) -> u64 {
        self.view.fetched()
    }

    /// The entries of directory `path` (`/`, `p1/etc`...), sorted by name;
    /// on a partitioned disk, `/` lists the partitions.
    pub fn list(&mut self, path: &str) -> Result<Vec<Entry>> {
        let at = self.locate(path)?;
        let mut entries = match at {
            None => self.list_partitions(),
            Some(at) => {
                let budget = self.options.read_budget;
                self.run(&at, path, budget, |fs, p| fs.list(p))?
            }
        };
        entries.sort_by(|a, b| a.raw_name.cmp(&b.raw_name));
        Ok(entries)
    }

    /// What `path` names (not following a final symlink).
    pub fn stat(&mut self, path: &str) -> Result<Entry> {
        match self.locate(path)? {
            None => Ok(Entry::new(b"/".to_vec(), Kind::Dir, self.view.size())),
            Some(at) => {
                let budget = self.options.read_budget;
                self.run(&at, path, budget, |fs, p| fs.stat(p))
            }
        }
    }

    fn list_partitions(&mut self) -> Vec<Entry> {
        let parts = self.partitions().to_vec();
        parts
            .into_iter()
            .map(|p| {
                let mut e = Entry::new(p.name.clone().into_bytes(), Kind::Partition, p.size);
                let found = match self.mount(&p.name) {
                    Ok(fs) => fs.name().to_string(),
                    Err(Error::Unsupported { found, .. }) => found,
                    Err(e) => format!("unreadable: {e}"),
                };
                e.detail = Some(format!("{} {} at {}: {found}", p.table, p.kind, p.start));
                e
            })
            .collect()
    }

    /// Splits a user's path into partition and file system path; `None`
    /// for the top of a partitioned disk.
    pub(crate) fn locate(&self, path: &str) -> Result<Option<Located>> {
        let mut parts: Vec<Vec<u8>> = Vec::new();
        for c in path.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                name => parts.push(name.as_bytes().to_vec()),
            }
        }
        match &self.layout {
            Layout::Whole => Ok(Some(Located {
                part: String::new(),
                path: parts,
            })),
            Layout::Table(table) => {
                if parts.is_empty() {
                    return Ok(None);
                }
                let name = String::from_utf8_lossy(&parts.remove(0)).into_owned();
                if !table.iter().any(|p| p.name == name) {
                    let names: Vec<&str> = table.iter().map(|p| p.name.as_str()).collect();
                    return Err(Error::NoPartition {
                        path: path.to_string(),
                        name,
                        restore_point: self.view.restore_point().to_string(),
                        available: if names.is_empty() {
                            "its partition table is empty".into()
                        } else {
                            format!("it has {}", names.join(", "))
                        },
                    });
                }
                Ok(Some(Located {
                    part: name,
                    path: parts,
                }))
            }
        }
    }

    /// How messages name a partition: `partition p1 of restore point X`.
    fn place(&self, part: &str) -> String {
        let rp = self.view.restore_point();
        if part.is_empty() {
            format!("restore point {rp}")
        } else {
            format!("partition {part} of restore point {rp}")
        }
    }

    /// The file system in `part` (mounted on first use).
    fn mount(&mut self, part: &str) -> Result<&mut Box<dyn FileSystem>> {
        if !self.mounted.contains_key(part) {
            let slice = match self.partitions().iter().find(|p| p.name == part) {
                Some(p) => Slice::new(self.view.clone(), p.start, p.size),
                None => Slice::new(self.view.clone(), 0, self.view.size()),
            };
            let place = self.place(part);
            self.view.set_budget(self.options.read_budget);
            let kind = probe(&slice).map_err(|found| match self.view.take_failure() {
                // Its first bytes are damaged in the repository: say so, not
                // that the partition holds something unknown.
                Some(crate::view::Failure::Damaged { offset, source }) => Error::DamagedBlock {
                    restore_point: self.view.restore_point().to_string(),
                    offset,
                    source,
                },
                _ => Error::Unsupported {
                    place: place.clone(),
                    found,
                },
            })?;
            let (name, mounted): (&'static str, FsResult<Box<dyn FileSystem>>) = {
                let attempt = catch_unwind(AssertUnwindSafe(|| match kind {
                    FsKind::Ext => Ext4Fs::mount(slice).map(|f| Box::new(f) as Box<dyn FileSystem>),
                    FsKind::Ntfs => {
                        NtfsFs::mount(slice).map(|f| Box::new(f) as Box<dyn FileSystem>)
                    }
                    FsKind::Fat => FatFs::mount(slice).map(|f| Box::new(f) as Box<dyn FileSystem>),
                }));
                let name = match kind {
                    FsKind::Ext => "ext4",
                    FsKind::Ntfs => "NTFS",
                    FsKind::Fat => "FAT",
                };
                match attempt {
                    Ok(m) => (name, m),
                    Err(panic) => {
                        return Err(Error::ReaderPanicked {
                            place,
                            fs: name,
                            path: "its superblock".into(),
                            detail: panic_text(&panic),
                        });
                    }
                }
            };
            let fs = mounted.map_err(|e| self.fs_error(e, &place, name, "/", "/"))?;
            self.mounted.insert(part.to_string(), fs);
        }
        self.mounted.get_mut(part).ok_or_else(|| Error::NotFound {
            path: part.to_string(),
            restore_point: self.view.restore_point().to_string(),
        })
    }

    /// Runs `f` on the file system `at` is in, with `budget` bytes to
    /// read, turning its failures (and panics) into errors that name the
    /// place and path. `shown` is the path as the user gave it.
    pub(crate) fn run<T>(
        &mut self,
        at: &Located,
        shown: &str,
        budget: u64,
        f: impl FnOnce(&mut dyn FileSystem, &[Vec<u8>]) -> FsResult<T>,
    ) -> Result<T> {
        let place = self.place(&at.part);
        self.mount(&at.part)?;
        self.view.set_budget(budget);
        let fs = self.mount(&at.part)?;
        let name = fs.name();
        let outcome = catch_unwind(AssertUnwindSafe(|| f(fs.as_mut(), &at.path)));
        match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.fs_error(e, &place, name, shown, &crate::entry::show(&at.path))),
            Err(panic) => {
                // Its state is unknown now: mount afresh next time.
                self.mounted.remove(&at.part);
                Err(Error::ReaderPanicked {
                    place,
                    fs: name,
                    path: crate::entry::show(&at.path),
                    detail: panic_text(&panic),
                })
            }
        }
    }

    fn fs_error(
        &self,
        e: FsError,
        place: &str,
        fs: &'static str,
        shown: &str,
        path: &str,
    ) -> Error {
        match e {
            FsError::NotFound => Error::NotFound {
                path: shown.to_string(),
                restore_point: self.view.restore_point().to_string(),
            },
            FsError::NotADirectory => Error::NotADirectory {
                path: shown.to_string(),
            },
            FsError::Reader(detail) => self.view.explain(place, fs, path, detail),
            FsError::Sink(source) => Error::Output {
                path: std::path::PathBuf::from(shown),
                source,
            },
        }
    }

    /// Bytes read since the explorer was opened.
    pub(crate) fn total_read(&self) -> u64 {
        self.view.total_read()
    }

    pub(crate) fn options(&self) -> Options {
        self.options
    }
}

/// Runs `f` (reading the partition table) with panics caught.
fn guarded<T>(view: &DiskView, f: impl FnOnce() -> Result<T>, what: &str) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| match (view.take_failure(), e) {
            (Some(crate::view::Failure::Damaged { offset, source }), _) => Error::DamagedBlock {
                restore_point: view.restore_point().to_string(),
                offset,
                source,
            },
            (_, e) => e,
        }),
        Err(panic) => Err(Error::BadPartitionTable {
            table: "MBR/GPT",
            detail: format!("the reader of {what} failed: {}", panic_text(&panic)),
        }),
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}
