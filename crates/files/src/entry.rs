//! What a listing shows, and the interface every file system reader
//! implements.

use serde::Serialize;

/// One name in a directory listing (or a partition at the top of a
/// partitioned disk).
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// The name, as UTF-8 (bytes that are not are shown as U+FFFD; see
    /// `raw_name`).
    pub name: String,
    /// The name's bytes as the file system stores them (ext4 names are
    /// bytes, FAT and NTFS names UTF-16 turned into UTF-8).
    #[serde(skip)]
    pub raw_name: Vec<u8>,
    pub kind: Kind,
    /// Bytes (a file's length; a partition's size; a symlink's target length).
    pub size: u64,
    /// Permission bits (`0o7777`), where the file system has them.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Last modification, where the file system records it.
    pub mtime: Option<Time>,
    /// Last access, where the file system records it.
    pub atime: Option<Time>,
    /// A symlink's target; a partition's file system.
    pub detail: Option<String>,
}

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Partition,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl Kind {
    /// One letter, as `ls -l` shows it.
    pub fn letter(self) -> char {
        match self {
            Kind::File => '-',
            Kind::Dir => 'd',
            Kind::Symlink => 'l',
            Kind::Partition => 'P',
            Kind::Fifo => 'p',
            Kind::Socket => 's',
            Kind::CharDevice => 'c',
            Kind::BlockDevice => 'b',
        }
    }
}

/// A point in time: seconds and nanoseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

impl Entry {
    pub(crate) fn new(raw_name: Vec<u8>, kind: Kind, size: u64) -> Entry {
        Entry {
            name: String::from_utf8_lossy(&raw_name).into_owned(),
            raw_name,
            kind,
            size,
            mode: None,
            uid: None,
            gid: None,
            mtime: None,
            atime: None,
            detail: None,
        }
    }
}

/// Why a file system reader failed.
#[derive(Debug)]
pub(crate) enum FsError {
    NotFound,
    NotADirectory,
    /// The reader's own complaint (damaged metadata, or a read that failed
    /// below it: the view knows which).
    Reader(String),
    /// Writing what was read failed (the caller's sink).
    Sink(std::io::Error),
}

pub(crate) type FsResult<T> = std::result::Result<T, FsError>;

/// Receives a file's bytes in order.
pub(crate) type Sink<'a> = dyn FnMut(&[u8]) -> std::io::Result<()> + 'a;

/// A mounted file system, read by path. A path is its components (names
/// as bytes), the root being the empty path.
pub(crate) trait FileSystem {
    /// The file system's name: `ext4`, `NTFS`, `FAT32`...
    fn name(&self) -> &'static str;
    /// The entry `path` names (not following a final symlink); its `name`
    /// is the last component.
    fn stat(&mut self, path: &[Vec<u8>]) -> FsResult<Entry>;
    /// The entries of directory `path`, without `.` and `..`.
    fn list(&mut self, path: &[Vec<u8>]) -> FsResult<Vec<Entry>>;
    /// Symlink `path`'s target.
    fn read_link(&mut self, path: &[Vec<u8>]) -> FsResult<Vec<u8>>;
    /// Regular file `path`'s content, in order, into `sink`.
    fn read(&mut self, path: &[Vec<u8>], sink: &mut Sink<'_>) -> FsResult<()>;
}

/// Bytes read per call when streaming a file.
pub(crate) const CHUNK: usize = 256 * 1024;

/// A path's components as a string, for messages: `/a/b`.
pub(crate) fn show(path: &[Vec<u8>]) -> String {
    let mut s = String::new();
    for c in path {
        s.push('/');
        s.push_str(&String::from_utf8_lossy(c));
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}
