//! NTFS through the `ntfs` crate (read-only, `forbid(unsafe_code)`, its
//! own validation of every structure). Names are the Win32 names (the
//! DOS 8.3 aliases are left out of listings); lookups are
//! case-insensitive through the volume's `$UpCase` table, as Windows does.
//! The metadata files (`$MFT`, `$Bitmap`, ..., records below 24) are not
//! listed. NTFS keeps Windows ACLs, not Unix modes: files come out 0644
//! (0444 when read-only), directories 0755; reparse points (symlinks,
//! junctions) are shown as what they are attached to and not followed.

use std::io::Read;

use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileNamespace};
use ntfs::{Ntfs, NtfsFile, NtfsTime};

use crate::entry::{CHUNK, Entry, FileSystem, FsError, FsResult, Kind, Sink, Time};
use crate::view::Slice;

/// The root directory's MFT record.
const ROOT: u64 = 5;
/// Records below this are the volume's metadata files.
const FIRST_USER_RECORD: u64 = 24;

pub(crate) struct NtfsFs {
    ntfs: Ntfs,
    fs: Slice,
}

fn reader(e: ntfs::NtfsError) -> FsError {
    FsError::Reader(e.to_string())
}

impl NtfsFs {
    pub(crate) fn mount(mut fs: Slice) -> FsResult<NtfsFs> {
        let mut ntfs = Ntfs::new(&mut fs).map_err(reader)?;
        // Name lookups compare through it.
        ntfs.read_upcase_table(&mut fs).map_err(reader)?;
        Ok(NtfsFs { ntfs, fs })
    }

    /// The MFT record `path` names.
    fn lookup(&mut self, path: &[Vec<u8>]) -> FsResult<u64> {
        let mut record = ROOT;
        for name in path {
            let name = std::str::from_utf8(name).map_err(|_| FsError::NotFound)?;
            let file = self.ntfs.file(&mut self.fs, record).map_err(reader)?;
            if !file.is_directory() {
                return Err(FsError::NotADirectory);
            }
            let index = file.directory_index(&mut self.fs).map_err(reader)?;
            let mut finder = index.finder();
            let found = NtfsFileNameIndex::find(&mut finder, &self.ntfs, &mut self.fs, name)
                .ok_or(FsError::NotFound)?
                .map_err(reader)?;
            record = found.file_reference().file_record_number();
            if record < FIRST_USER_RECORD {
                return Err(FsError::NotFound);
            }
        }
        Ok(record)
    }

    fn entry(&mut self, name: Vec<u8>, record: u64) -> FsResult<Entry> {
        let file = self.ntfs.file(&mut self.fs, record).map_err(reader)?;
        let info = file.info().map_err(reader)?;
        let dir = file.is_directory();
        let size = if dir {
            0
        } else {
            data_len(&file, &mut self.fs)?
        };
        let mut e = Entry::new(name, if dir { Kind::Dir } else { Kind::File }, size);
        let read_only = info
            .file_attributes()
            .contains(NtfsFileAttributeFlags::READ_ONLY);
        e.mode = Some(match (dir, read_only) {
            (true, _) => 0o755,
            (false, true) => 0o444,
            (false, false) => 0o644,
        });
        e.mtime = Some(time(info.modification_time()));
        e.atime = Some(time(info.access_time()));
        Ok(e)
    }
}

/// The length of the file's unnamed data stream (0 if it has none).
fn data_len(file: &NtfsFile<'_>, fs: &mut Slice) -> FsResult<u64> {
    match file.data(fs, "") {
        None => Ok(0),
        Some(item) => {
            let item = item.map_err(reader)?;
            let attribute = item.to_attribute().map_err(reader)?;
            Ok(attribute.value_length())
        }
    }
}

/// NTFS counts 100 ns intervals since 1601-01-01 UTC.
fn time(t: NtfsTime) -> Time {
    const UNIX_EPOCH: i64 = 11_644_473_600;
    let ts = t.nt_timestamp();
    Time {
        secs: (ts / 10_000_000) as i64 - UNIX_EPOCH,
        nanos: (ts % 10_000_000) as u32 * 100,
    }
}

impl FileSystem for NtfsFs {
    fn name(&self) -> &'static str {
        "NTFS"
    }

    fn stat(&mut self, path: &[Vec<u8>]) -> FsResult<Entry> {
        let record = self.lookup(path)?;
        let name = path.last().cloned().unwrap_or_else(|| b"/".to_vec());
        self.entry(name, record)
    }

    fn list(&mut self, path: &[Vec<u8>]) -> FsResult<Vec<Entry>> {
        let record = self.lookup(path)?;
        let mut found = Vec::new();
        {
            let file = self.ntfs.file(&mut self.fs, record).map_err(reader)?;
            if !file.is_directory() {
                return Err(FsError::NotADirectory);
            }
            let index = file.directory_index(&mut self.fs).map_err(reader)?;
            let mut entries = index.entries();
            while let Some(item) = entries.next(&mut self.fs) {
                let item = item.map_err(reader)?;
                let Some(key) = item.key() else { continue };
                let key = key.map_err(reader)?;
                if key.namespace() == NtfsFileNamespace::Dos {
                    continue;
                }
                let child = item.file_reference().file_record_number();
                if child < FIRST_USER_RECORD {
                    continue;
                }
                found.push((key.name().to_string_lossy().into_bytes(), child));
            }
        }
        found
            .into_iter()
            .map(|(name, child)| self.entry(name, child))
            .collect()
    }

    fn read_link(&mut self, _path: &[Vec<u8>]) -> FsResult<Vec<u8>> {
        Err(FsError::Reader(
            "NTFS reparse points are not followed".into(),
        ))
    }

    fn read(&mut self, path: &[Vec<u8>], sink: &mut Sink<'_>) -> FsResult<()> {
        let record = self.lookup(path)?;
        let file = self.ntfs.file(&mut self.fs, record).map_err(reader)?;
        if file.is_directory() {
            return Err(FsError::Reader("a directory, not a file".into()));
        }
        let Some(item) = file.data(&mut self.fs, "") else {
            return Ok(());
        };
        let item = item.map_err(reader)?;
        let attribute = item.to_attribute().map_err(reader)?;
        let value = attribute.value(&mut self.fs).map_err(reader)?;
        let mut left = value.len();
        let mut data = value.attach(&mut self.fs);
        let mut buf = vec![0u8; CHUNK];
        while left > 0 {
            let want = (buf.len() as u64).min(left) as usize;
            let n = data
                .read(&mut buf[..want])
                .map_err(|e| FsError::Reader(e.to_string()))?;
            if n == 0 {
                return Err(FsError::Reader(format!(
                    "the data stream ends {left} bytes before its length"
                )));
            }
            sink(&buf[..n]).map_err(FsError::Sink)?;
            left -= n as u64;
        }
        Ok(())
    }
}
