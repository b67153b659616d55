//! ext2/3/4 through `ext4-view` (read-only, no unsafe code, fuzzed
//! upstream; it replays the journal in memory).

use ext4_view::{Ext4, Ext4Error, FileType, Metadata, Path};

use crate::entry::{CHUNK, Entry, FileSystem, FsError, FsResult, Kind, Sink, Time};
use crate::view::Slice;

pub(crate) struct Ext4Fs {
    fs: Ext4,
}

impl Ext4Fs {
    pub(crate) fn mount(slice: Slice) -> FsResult<Ext4Fs> {
        Ok(Ext4Fs {
            fs: Ext4::load(Box::new(slice)).map_err(fail)?,
        })
    }
}

fn fail(e: Ext4Error) -> FsError {
    match e {
        Ext4Error::NotFound => FsError::NotFound,
        Ext4Error::NotADirectory => FsError::NotADirectory,
        other => FsError::Reader(other.to_string()),
    }
}

/// `/a/b` as ext4-view wants it; a name it cannot take (a NUL byte, more
/// than 255 bytes) names nothing there.
fn joined(path: &[Vec<u8>]) -> Vec<u8> {
    let mut p = vec![b'/'];
    for (i, c) in path.iter().enumerate() {
        if i > 0 {
            p.push(b'/');
        }
        p.extend_from_slice(c);
    }
    p
}

fn with_path<T>(path: &[Vec<u8>], f: impl FnOnce(Path<'_>) -> FsResult<T>) -> FsResult<T> {
    let bytes = joined(path);
    let p = Path::try_from(bytes.as_slice()).map_err(|_| FsError::NotFound)?;
    f(p)
}

fn time(t: ext4_view::Timestamp) -> Time {
    Time {
        secs: t.seconds(),
        nanos: t.nanoseconds(),
    }
}

fn entry(name: Vec<u8>, m: &Metadata) -> Entry {
    let kind = match m.file_type() {
        FileType::Regular => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        FileType::Fifo => Kind::Fifo,
        FileType::Socket => Kind::Socket,
        FileType::CharacterDevice => Kind::CharDevice,
        FileType::BlockDevice => Kind::BlockDevice,
    };
    let mut e = Entry::new(name, kind, m.len());
    e.mode = Some(u32::from(m.mode()));
    e.uid = Some(m.uid());
    e.gid = Some(m.gid());
    e.mtime = Some(time(m.modified()));
    e.atime = Some(time(m.accessed()));
    e
}

impl FileSystem for Ext4Fs {
    fn name(&self) -> &'static str {
        "ext4"
    }

    fn stat(&mut self, path: &[Vec<u8>]) -> FsResult<Entry> {
        let name = path.last().cloned().unwrap_or_else(|| b"/".to_vec());
        let mut e = with_path(path, |p| {
            self.fs
                .symlink_metadata(p)
                .map(|m| entry(name, &m))
                .map_err(fail)
        })?;
        if e.kind == Kind::Symlink {
            e.detail = Some(String::from_utf8_lossy(&self.read_link(path)?).into_owned());
        }
        Ok(e)
    }

    fn list(&mut self, path: &[Vec<u8>]) -> FsResult<Vec<Entry>> {
        let dir = with_path(path, |p| self.fs.read_dir(p).map_err(fail))?;
        let mut out = Vec::new();
        for item in dir {
            let item = item.map_err(fail)?;
            let name = item.file_name().as_ref().to_vec();
            if name == b"." || name == b".." {
                continue;
            }
            let mut e = entry(name, &item.metadata().map_err(fail)?);
            if e.kind == Kind::Symlink {
                let mut child = path.to_vec();
                child.push(e.raw_name.clone());
                e.detail = Some(String::from_utf8_lossy(&self.read_link(&child)?).into_owned());
            }
            out.push(e);
        }
        Ok(out)
    }

    fn read_link(&mut self, path: &[Vec<u8>]) -> FsResult<Vec<u8>> {
        with_path(path, |p| {
            self.fs
                .read_link(p)
                .map(|t| t.as_ref().to_vec())
                .map_err(fail)
        })
    }

    fn read(&mut self, path: &[Vec<u8>], sink: &mut Sink<'_>) -> FsResult<()> {
        let mut file = with_path(path, |p| self.fs.open(p).map_err(fail))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = file.read_bytes(&mut buf).map_err(fail)?;
            if n == 0 {
                return Ok(());
            }
            sink(&buf[..n]).map_err(FsError::Sink)?;
        }
    }
}
