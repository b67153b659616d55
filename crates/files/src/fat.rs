//! FAT12/16/32 through `fatfs` (used read-only: the device refuses
//! writes, and access times are not updated). Names are the long (VFAT)
//! names where there are any; lookups are case-insensitive, as FAT is.
//! FAT has no owners or permission bits: files come out 0644, directories
//! 0755, read-only files 0444. Its times are local times of an unknown
//! zone; they are taken as UTC.

use std::io::Read;

use fatfs::{Dir, DirEntry, FatType, FileSystem as Fat, FsOptions};

use crate::entry::{CHUNK, Entry, FileSystem, FsError, FsResult, Kind, Sink, Time};
use crate::view::Slice;

pub(crate) struct FatFs {
    fs: Fat<Slice>,
}

impl FatFs {
    pub(crate) fn mount(slice: Slice) -> FsResult<FatFs> {
        let fs = Fat::new(slice, FsOptions::new().update_accessed_date(false))
            .map_err(|e| FsError::Reader(e.to_string()))?;
        Ok(FatFs { fs })
    }
}

fn reader(e: std::io::Error) -> FsError {
    FsError::Reader(e.to_string())
}

/// Days from 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn time(date: fatfs::Date, t: Option<fatfs::Time>) -> Time {
    // Damaged fields give odd dates, never a panic: the arithmetic is on i64.
    let days = days_from_civil(
        i64::from(date.year),
        i64::from(date.month.clamp(1, 12)),
        i64::from(date.day.clamp(1, 31)),
    );
    let (h, m, s, ms) = t.map_or((0, 0, 0, 0), |t| (t.hour, t.min, t.sec, t.millis));
    Time {
        secs: days * 86_400 + i64::from(h) * 3600 + i64::from(m) * 60 + i64::from(s),
        nanos: u32::from(ms.min(999)) * 1_000_000,
    }
}

fn entry(e: &DirEntry<'_, Slice>) -> Entry {
    let kind = if e.is_dir() { Kind::Dir } else { Kind::File };
    let mut out = Entry::new(
        e.file_name().into_bytes(),
        kind,
        if e.is_dir() { 0 } else { e.len() },
    );
    out.mode = Some(match kind {
        Kind::Dir => 0o755,
        _ if e.attributes().contains(fatfs::FileAttributes::READ_ONLY) => 0o444,
        _ => 0o644,
    });
    let modified = e.modified();
    out.mtime = Some(time(modified.date, Some(modified.time)));
    out.atime = Some(time(e.accessed(), None));
    out
}

impl FatFs {
    /// The entry named `name` in `dir`: an exact match first, else one
    /// that differs only in case.
    fn find<'a>(dir: &Dir<'a, Slice>, name: &[u8]) -> FsResult<DirEntry<'a, Slice>> {
        let wanted = std::str::from_utf8(name).map_err(|_| FsError::NotFound)?;
        let mut folded = None;
        for item in dir.iter() {
            let item = item.map_err(reader)?;
            let found = item.file_name();
            if found == wanted {
                return Ok(item);
            }
            if folded.is_none() && found.to_lowercase() == wanted.to_lowercase() {
                folded = Some(item);
            }
        }
        folded.ok_or(FsError::NotFound)
    }

    /// The entry at `path` (not the root).
    fn walk(&self, path: &[Vec<u8>]) -> FsResult<DirEntry<'_, Slice>> {
        let mut dir = self.fs.root_dir();
        let mut found = None;
        for (i, name) in path.iter().enumerate() {
            if i > 0 {
                let parent: &DirEntry<'_, Slice> = found.as_ref().ok_or(FsError::NotFound)?;
                if !parent.is_dir() {
                    return Err(FsError::NotADirectory);
                }
                dir = parent.to_dir();
            }
            found = Some(Self::find(&dir, name)?);
        }
        found.ok_or(FsError::NotFound)
    }

    fn dir(&self, path: &[Vec<u8>]) -> FsResult<Dir<'_, Slice>> {
        if path.is_empty() {
            return Ok(self.fs.root_dir());
        }
        let e = self.walk(path)?;
        if !e.is_dir() {
            return Err(FsError::NotADirectory);
        }
        Ok(e.to_dir())
    }
}

impl FileSystem for FatFs {
    fn name(&self) -> &'static str {
        match self.fs.fat_type() {
            FatType::Fat12 => "FAT12",
            FatType::Fat16 => "FAT16",
            FatType::Fat32 => "FAT32",
        }
    }

    fn stat(&mut self, path: &[Vec<u8>]) -> FsResult<Entry> {
        if path.is_empty() {
            let mut e = Entry::new(b"/".to_vec(), Kind::Dir, 0);
            e.mode = Some(0o755);
            return Ok(e);
        }
        Ok(entry(&self.walk(path)?))
    }

    fn list(&mut self, path: &[Vec<u8>]) -> FsResult<Vec<Entry>> {
        let dir = self.dir(path)?;
        let mut out = Vec::new();
        for item in dir.iter() {
            let item = item.map_err(reader)?;
            let name = item.file_name();
            if name == "." || name == ".." {
                continue;
            }
            out.push(entry(&item));
        }
        Ok(out)
    }

    fn read_link(&mut self, _path: &[Vec<u8>]) -> FsResult<Vec<u8>> {
        Err(FsError::Reader("FAT has no symbolic links".into()))
    }

    fn read(&mut self, path: &[Vec<u8>], sink: &mut Sink<'_>) -> FsResult<()> {
        let e = self.walk(path)?;
        if e.is_dir() {
            return Err(FsError::Reader("a directory, not a file".into()));
        }
        let mut file = e.to_file();
        let mut left = e.len();
        let mut buf = vec![0u8; CHUNK];
        while left > 0 {
            let want = (buf.len() as u64).min(left) as usize;
            let n = file.read(&mut buf[..want]).map_err(reader)?;
            if n == 0 {
                return Err(FsError::Reader(format!(
                    "the file's clusters end {left} bytes before its length"
                )));
            }
            sink(&buf[..n]).map_err(FsError::Sink)?;
            left -= n as u64;
        }
        Ok(())
    }
}
