//! The crate's one error type.

/// What went wrong reading files out of a restore point. Messages name
/// the path, the partition and the file system; the front end adds the
/// restore point where the error does not carry it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The repository could not give what was asked (opening a reader,
    /// a node of the block map).
    #[error("reading the repository")]
    Repo(#[source] Box<cbtvault_repo::Error>),
    /// A block of the restore point is damaged or missing: the disk bytes
    /// there cannot be trusted, so nothing is made of them.
    #[error("the block at disk offset {offset} of restore point {restore_point} cannot be read")]
    DamagedBlock {
        restore_point: String,
        offset: u64,
        #[source]
        source: Box<cbtvault_repo::Error>,
    },
    /// The path names nothing in the file system.
    #[error("{path}: no such file or directory in restore point {restore_point}")]
    NotFound { path: String, restore_point: String },
    /// The disk has a partition table and the path does not start with a
    /// partition it holds.
    #[error("{path}: restore point {restore_point} has no partition {name:?} ({available})")]
    NoPartition {
        path: String,
        name: String,
        restore_point: String,
        available: String,
    },
    /// A path component below something that is not a directory.
    #[error("{path}: not a directory")]
    NotADirectory { path: String },
    /// A file system (or partition content) this crate cannot read.
    #[error("{place}: {found}, which cannot be read file by file")]
    Unsupported { place: String, found: String },
    /// The file system reader found the metadata inconsistent.
    #[error("{place}: damaged {fs} file system at {path}: {detail}")]
    Corrupt {
        place: String,
        fs: &'static str,
        path: String,
        detail: String,
    },
    /// The partition table is inconsistent.
    #[error("damaged partition table ({table}): {detail}")]
    BadPartitionTable { table: &'static str, detail: String },
    /// A reader went on reading far past what the operation can need: a
    /// loop in damaged metadata. Stopped instead of hanging.
    #[error(
        "{place}: gave up reading {fs} metadata at {path} after {read} bytes; a loop in damaged metadata?"
    )]
    ReadBudget {
        place: String,
        fs: &'static str,
        path: String,
        read: u64,
    },
    /// A third-party reader panicked on damaged data; caught so that one
    /// bad file system costs an error, not the process.
    #[error("{place}: the {fs} reader failed on damaged data at {path}: {detail}")]
    ReaderPanicked {
        place: String,
        fs: &'static str,
        path: String,
        detail: String,
    },
    /// A name in the file system that cannot be written safely (empty,
    /// `.`/`..`, or holding `/` or NUL): refused rather than written
    /// outside the destination.
    #[error("{path}: refusing the unsafe file name {name:?}")]
    UnsafeName { path: String, name: String },
    /// Writing what was read failed.
    #[error("writing {path}")]
    Output {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The destination already holds this name; nothing is overwritten.
    #[error("{path} exists already; choose an empty destination")]
    Exists { path: std::path::PathBuf },
}

impl From<cbtvault_repo::Error> for Error {
    fn from(e: cbtvault_repo::Error) -> Error {
        Error::Repo(Box::new(e))
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
