//! `files get`: writing files, directories and symlinks out of a restore
//! point into a local directory, as faithfully as the destination allows.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::entry::{Entry, Kind, Time};
use crate::error::{Error, Result};
use crate::explorer::{Explorer, Located};

/// What `get` wrote.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GetReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file content (holes included).
    pub bytes: u64,
    /// What was not written (devices, FIFOs, sockets), with why.
    pub skipped: Vec<String>,
    /// Blocks fetched from the repository.
    pub blocks_fetched: u64,
}

/// Directories nested deeper than this are taken for a loop in damaged
/// metadata (a directory that contains itself); real trees are far
/// shallower, and the recursion must stay within the stack.
const MAX_DEPTH: usize = 128;

/// Where a `get` is, to bound it as a whole: a directory loop can fan out
/// without ever going deeper than [`MAX_DEPTH`].
struct Walk {
    depth: usize,
    started_at: u64,
}

/// Stretches of zeros at least this long are left as holes.
const HOLE: usize = 4096;

fn out(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Output {
        path: path.to_path_buf(),
        source,
    }
}

impl Explorer {
    /// Writes each of `paths` (files, directories with everything below,
    /// symlinks) into directory `to` under its own name: a partition
    /// (`p1`) as a directory of that name, the root of a disk without a
    /// partition table (`/`) as `to` itself.
    pub fn get(&mut self, paths: &[String], to: &Path) -> Result<GetReport> {
        std::fs::create_dir_all(to).map_err(out(to))?;
        let mut report = GetReport::default();
        let walk = Walk {
            depth: 0,
            started_at: self.total_read(),
        };
        for path in paths {
            let Some(at) = self.locate(path)? else {
                // The top of a partitioned disk: every partition.
                for p in self.partitions().to_vec() {
                    self.get_one(&p.name, to, &walk, &mut report)?;
                }
                continue;
            };
            let shown = path.clone();
            let entry = self.run(&at, &shown, self.options().read_budget, |fs, p| fs.stat(p))?;
            let dest = if at.path.is_empty() && at.part.is_empty() {
                to.to_path_buf()
            } else if at.path.is_empty() {
                to.join(&at.part)
            } else {
                to.join(safe_name(&shown, &entry.raw_name)?)
            };
            self.write_entry(&at, &shown, &entry, &dest, &walk, &mut report)?;
        }
        report.blocks_fetched = self.blocks_fetched();
        Ok(report)
    }

    fn get_one(
        &mut self,
        path: &str,
        to: &Path,
        walk: &Walk,
        report: &mut GetReport,
    ) -> Result<()> {
        let dest = to.join(path);
        let Some(at) = self.locate(path)? else {
            return Ok(());
        };
        let entry = self.run(&at, path, self.options().read_budget, |fs, p| fs.stat(p))?;
        self.write_entry(&at, path, &entry, &dest, walk, report)
    }

    fn write_entry(
        &mut self,
        at: &Located,
        shown: &str,
        entry: &Entry,
        dest: &Path,
        walk: &Walk,
        report: &mut GetReport,
    ) -> Result<()> {
        // Metadata read so far against what the files written can explain.
        let read = self.total_read().saturating_sub(walk.started_at);
        let allowed = (self.options().read_budget.saturating_mul(4))
            .saturating_add(report.bytes.saturating_mul(2));
        if walk.depth > MAX_DEPTH || read > allowed {
            return Err(Error::ReadBudget {
                place: format!("{shown} ({} levels deep)", walk.depth),
                fs: "file system",
                path: shown.to_string(),
                read,
            });
        }
        let deeper = Walk {
            depth: walk.depth + 1,
            started_at: walk.started_at,
        };
        match entry.kind {
            Kind::File => {
                self.write_file(at, shown, entry, dest)?;
                report.files += 1;
                report.bytes += entry.size;
            }
            Kind::Dir => {
                // Only the top (DIR itself, or a partition's directory) may
                // exist already, as a real directory. Below it every
                // directory is new: one that exists means two entries of
                // one name (damaged or hostile metadata), and merging into
                // it could follow a symlink written a moment ago.
                let top = walk.depth == 0 && at.path.is_empty();
                let is_dir = dest.symlink_metadata().is_ok_and(|m| m.is_dir());
                if !(top && is_dir) {
                    std::fs::create_dir(dest).map_err(|e| exists_or(dest, e))?;
                }
                report.dirs += 1;
                let budget = self.options().read_budget;
                let children = self.run(at, shown, budget, |fs, p| fs.list(p))?;
                for child in children {
                    let name = safe_name(shown, &child.raw_name)?;
                    let mut sub = at.path.clone();
                    sub.push(child.raw_name.clone());
                    let sub = Located {
                        part: at.part.clone(),
                        path: sub,
                    };
                    let child_shown = format!("{}/{}", shown.trim_end_matches('/'), child.name);
                    self.write_entry(
                        &sub,
                        &child_shown,
                        &child,
                        &dest.join(name),
                        &deeper,
                        report,
                    )?;
                }
            }
            Kind::Symlink => {
                let budget = self.options().read_budget;
                let target = self.run(at, shown, budget, |fs, p| fs.read_link(p))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), dest)
                    .map_err(|e| exists_or(dest, e))?;
                report.symlinks += 1;
            }
            other => {
                report
                    .skipped
                    .push(format!("{shown}: a {other:?} is not written"));
                return Ok(());
            }
        }
        apply_metadata(entry, dest)
    }

    fn write_file(&mut self, at: &Located, shown: &str, entry: &Entry, dest: &Path) -> Result<()> {
        // 0600 until done: the file's own mode may forbid writing it.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(|e| exists_or(dest, e))?;
        let budget = self
            .options()
            .read_budget
            .saturating_add(entry.size.saturating_mul(2));
        let mut written = 0u64;
        let mut sink_error: Option<std::io::Error> = None;
        let result = self.run(at, shown, budget, |fs, p| {
            fs.read(p, &mut |chunk: &[u8]| {
                write_sparse(&mut file, chunk).inspect_err(|e| {
                    sink_error = Some(std::io::Error::new(e.kind(), e.to_string()));
                })?;
                written += chunk.len() as u64;
                Ok(())
            })
        });
        if let Some(e) = sink_error {
            return Err(out(dest)(e));
        }
        result?;
        // Holes at the end are made by the length.
        file.set_len(written).map_err(out(dest))?;
        if written != entry.size {
            return Err(Error::Corrupt {
                place: shown.to_string(),
                fs: "file",
                path: shown.to_string(),
                detail: format!("read {written} bytes of a file of {}", entry.size),
            });
        }
        Ok(())
    }
}

/// Writes `chunk` at the file's position, leaving all-zero 4 KiB pieces
/// as holes (seeking over them).
fn write_sparse(file: &mut File, chunk: &[u8]) -> std::io::Result<()> {
    for piece in chunk.chunks(HOLE) {
        if piece.len() == HOLE && piece.iter().all(|&b| b == 0) {
            file.seek(SeekFrom::Current(HOLE as i64))?;
        } else {
            file.write_all(piece)?;
        }
    }
    Ok(())
}

fn exists_or(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::AlreadyExists {
        Error::Exists {
            path: path.to_path_buf(),
        }
    } else {
        out(path)(e)
    }
}

/// `name` as a single path component, or an error if it could climb out
/// of the destination or is not one name.
fn safe_name(shown: &str, name: &[u8]) -> Result<PathBuf> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::UnsafeName {
            path: shown.to_string(),
            name: String::from_utf8_lossy(name).into_owned(),
        });
    }
    Ok(PathBuf::from(OsStr::from_bytes(name)))
}

/// Mode, owner (as root only) and times, without following a symlink.
fn apply_metadata(entry: &Entry, dest: &Path) -> Result<()> {
    let c_path =
        std::ffi::CString::new(dest.as_os_str().as_bytes()).map_err(|_| Error::Output {
            path: dest.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"),
        })?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0
        && let (Some(uid), Some(gid)) = (entry.uid, entry.gid)
    {
        // SAFETY: a valid NUL-terminated path; lchown does not follow symlinks.
        if unsafe { libc::lchown(c_path.as_ptr(), uid, gid) } != 0 {
            return Err(out(dest)(std::io::Error::last_os_error()));
        }
    }
    if entry.kind != Kind::Symlink
        && let Some(mode) = entry.mode
    {
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(out(dest))?;
    }
    let ts = |t: Option<Time>| match t {
        Some(t) => libc::timespec {
            tv_sec: t.secs as libc::time_t,
            tv_nsec: i64::from(t.nanos.min(999_999_999)) as _,
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    };
    let times = [ts(entry.atime.or(entry.mtime)), ts(entry.mtime)];
    // SAFETY: a valid path and a two-element array, as utimensat wants.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(out(dest)(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::safe_name;

    #[test]
    fn names_that_could_leave_the_destination_are_refused() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/etc", b"a\0b"] {
            assert!(safe_name("/x", bad).is_err(), "{bad:?}");
        }
        for good in [
            &b"a"[..],
            b"...",
            b"\xff\xfe",
            "grüße".as_bytes(),
            b".hidden",
        ] {
            assert!(safe_name("/x", good).is_ok(), "{good:?}");
        }
    }
}
