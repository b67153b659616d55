//! Backups that stop half-way and resume: a backup interrupted after some
//! of its blocks were read (a stop of the daemon, a connection that stayed
//! down past the retries) keeps them, so that the next run reads only what
//! it still lacks instead of starting over.
//!
//! [`BackupWriter::suspend`](crate::BackupWriter::suspend) finishes the
//! block map in the making — blocks not yet read come from the parent, or
//! are zero — writes its packs durably, and records a [`Resumable`]: the
//! tree's root, the parent, the disk's size, the provider's name for the
//! point-in-time view the blocks came from (a snapshot), and two maps:
//! - `done`: blocks whose content in the tree is the view's;
//! - `touched`: blocks whose content in the tree may differ from the
//!   parent's (a superset of `done`: a block a resumed run was about to
//!   read again still holds an older view's content).
//!
//! The next run asks its change source what changed between that view and
//! its own (XenServer keeps a snapshot's changed-block log after
//! `data_destroy`), and [`Resumable::resume`] turns the answer into the
//! blocks it may keep (done, unchanged since) and the ones it must read
//! although its own change source did not name them (touched, not kept).
//! Every block that is neither kept nor read then comes from the tree,
//! which holds the parent's content there, so the restore point is exactly
//! the new view.
//!
//! # Format and lifetime
//! A record is a crash-journal note (kind `backup-resume`, subject the
//! disk; see [`crate::journal`]) whose detail is JSON:
//! `{format, parent, size, snapshot, root, done, touched, time}`, with the
//! maps in XenAPI's bitmap encoding (base64, MSB first). A disk has at most
//! one: a suspend replaces it and a commit removes it. gc keeps the blobs
//! of every record and drops records older than [`RESUMABLE_MAX_AGE`]. A record that cannot be read or does not fit
//! its disk is skipped with a warning: the next run reads everything its
//! change source names, as it would have without it.

use cbtvault_blockmap::BlockMap;
use serde::{Deserialize, Serialize};

use crate::BlobId;
use crate::error::Result;
use crate::repository::{BLOCK_SIZE, Repository};
use crate::tree::{Tree, TreeShape};

/// The journal kind of resume records.
pub(crate) const RESUME_KIND: &str = "backup-resume";

/// Records older than this are dropped by gc (with the blobs only they
/// kept): a run that has not come back in two weeks starts over.
pub const RESUMABLE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(14 * 24 * 3600);

const RESUME_FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Record {
    format: u32,
    parent: Option<String>,
    size: u64,
    snapshot: String,
    root: String,
    done: String,
    touched: String,
    time: jiff::Timestamp,
}

/// What an interrupted backup of a disk kept; see the module documentation.
#[derive(Clone, Debug)]
pub struct Resumable {
    /// The disk's name in the repository.
    pub disk: String,
    /// The restore point the interrupted backup built on (`None`: a full).
    pub parent: Option<String>,
    /// The disk's size then, in bytes.
    pub size: u64,
    /// The provider's name for the view the blocks were read from.
    pub snapshot: String,
    /// Blocks whose content in the tree is the view's.
    pub done: BlockMap,
    pub(crate) touched: BlockMap,
    pub(crate) tree: Tree,
    /// When the backup was interrupted.
    pub time: jiff::Timestamp,
}

/// A [`Resumable`] applied to a new view: what [`BackupSpec::resume`]
/// (crate::BackupSpec::resume) takes.
#[derive(Clone, Debug)]
pub struct Resume {
    pub(crate) from: Resumable,
    /// Blocks the new backup takes from the record instead of reading.
    pub kept: BlockMap,
    /// Blocks the new backup must read although its change source may not
    /// name them (the record holds an older view's content there).
    pub reread: BlockMap,
}

impl Resumable {
    /// The record applied to a new view of the disk, given the blocks that
    /// changed between the record's view and the new one.
    pub fn resume(self, changed_since: &BlockMap) -> Resume {
        let mut kept = self.done.clone();
        kept.difference_with(changed_since);
        let mut reread = self.touched.clone();
        reread.difference_with(&kept);
        Resume {
            from: self,
            kept,
            reread,
        }
    }
}

impl Resume {
    /// The record this resumes.
    pub fn record(&self) -> &Resumable {
        &self.from
    }
}

impl Repository {
    /// The disk's resume record, if a backup of it was interrupted after
    /// keeping some blocks (see the module documentation). The caller
    /// holds the disk's lock.
    pub fn resumable(&self, disk: &str) -> Result<Option<Resumable>> {
        let mut notes = self.journal_unfinished(RESUME_KIND, disk)?;
        let Some((note, detail)) = notes.pop() else {
            return Ok(None);
        };
        match parse(disk, &detail) {
            Ok(r) => Ok(Some(r)),
            Err(why) => {
                tracing::warn!(disk, note, %why, "a resume record cannot be used; the next backup reads everything its change source names");
                Ok(None)
            }
        }
    }

    /// Drops the disk's resume records (the blobs only they kept go at the
    /// next gc). The caller holds the disk's lock.
    pub fn discard_resumable(&self, disk: &str) -> Result<()> {
        for (note, _) in self.journal_unfinished(RESUME_KIND, disk)? {
            self.journal_close(note)?;
        }
        Ok(())
    }

    /// The block maps of every resume record, for gc to keep.
    pub(crate) fn resume_roots(&self) -> Result<Vec<Tree>> {
        let mut roots = Vec::new();
        for (note, disk, detail) in self.journal_of_kind(RESUME_KIND)? {
            match parse(&disk, &detail) {
                Ok(r) => roots.push(r.tree),
                // Its blobs are not kept: a resume would ignore it anyway.
                Err(why) => tracing::warn!(disk, note, %why, "a resume record cannot be read"),
            }
        }
        Ok(roots)
    }

    /// Drops the resume records older than `max_age`; returns how many.
    /// For gc, which holds the exclusive lock.
    pub(crate) fn expire_resumable(&self, max_age: std::time::Duration) -> Result<usize> {
        let now = jiff::Timestamp::now();
        let mut dropped = 0;
        for (note, disk, detail) in self.journal_of_kind(RESUME_KIND)? {
            if let Ok(r) = parse(&disk, &detail)
                && now.duration_since(r.time).unsigned_abs() > max_age
            {
                tracing::info!(disk, since = %r.time, "dropping a resume record too old to use");
                self.journal_close(note)?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Records what a suspended backup kept, replacing the disk's earlier
    /// records; the tree's blobs are durable already.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record_resumable(
        &self,
        disk: &str,
        parent: Option<&str>,
        size: u64,
        snapshot: &str,
        tree: &Tree,
        done: &BlockMap,
        touched: &BlockMap,
    ) -> Result<()> {
        let record = Record {
            format: RESUME_FORMAT,
            parent: parent.map(str::to_string),
            size,
            snapshot: snapshot.to_string(),
            root: tree.root.to_hex(),
            done: done.to_xenapi_base64(),
            touched: touched.to_xenapi_base64(),
            time: jiff::Timestamp::now(),
        };
        let detail = serde_json::to_string(&record).map_err(|e| {
            crate::error::Error::InvalidArgument(format!("a resume record of {disk:?}: {e}"))
        })?;
        let earlier = self.journal_unfinished(RESUME_KIND, disk)?;
        self.journal_note(RESUME_KIND, disk, &detail)?;
        for (note, _) in earlier {
            self.journal_close(note)?;
        }
        Ok(())
    }
}

/// Reads and checks a record; the error says why it cannot be used.
fn parse(disk: &str, detail: &str) -> std::result::Result<Resumable, String> {
    let r: Record = serde_json::from_str(detail).map_err(|e| e.to_string())?;
    if r.format != RESUME_FORMAT {
        return Err(format!("format {} is not {RESUME_FORMAT}", r.format));
    }
    if r.size == 0 || r.size > crate::MAX_VIRTUAL_SIZE {
        return Err(format!("a disk size of {} bytes", r.size));
    }
    let root: BlobId = r.root.parse().map_err(|e| format!("root: {e}"))?;
    let map = |text: &str, what: &str| {
        BlockMap::from_xenapi_base64(text, r.size).map_err(|e| format!("{what}: {e}"))
    };
    let done = map(&r.done, "done")?;
    let mut touched = map(&r.touched, "touched")?;
    // `touched` is a superset of `done` by construction; a record that says
    // otherwise is made so rather than trusted.
    touched.union_with(&done);
    Ok(Resumable {
        disk: disk.to_string(),
        parent: r.parent,
        size: r.size,
        snapshot: r.snapshot,
        done,
        touched,
        tree: Tree {
            root,
            shape: TreeShape {
                blocks: r.size.div_ceil(BLOCK_SIZE),
            },
        },
        time: r.time,
    })
}
