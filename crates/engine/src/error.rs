//! The engine's error type.

/// An error from a source or target, as its implementation reports it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What can stop a backup, restore or check. Messages name the disk,
/// restore point and offsets concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Repo(#[from] cbtvault_repo::Error),

    #[error("disk {disk:?}: reading {len} bytes at offset {offset} from the source failed")]
    SourceRead {
        disk: String,
        offset: u64,
        len: usize,
        #[source]
        source: BoxError,
    },

    #[error(
        "disk {disk:?}: the source returned {got} bytes at offset {offset} where {expected} were asked"
    )]
    ShortRead {
        disk: String,
        offset: u64,
        expected: usize,
        got: usize,
    },

    #[error("disk {disk:?}: {what}")]
    Source {
        disk: String,
        what: String,
        #[source]
        source: Option<BoxError>,
    },

    #[error(
        "disk {disk:?}: the changed-block map covers {map_blocks} blocks but the disk ({size} bytes) has {disk_blocks}"
    )]
    MapMismatch {
        disk: String,
        map_blocks: u64,
        disk_blocks: u64,
        size: u64,
    },

    #[error(
        "disk {disk:?} has no restore point to take unchanged blocks from; run a full backup first"
    )]
    NoParent { disk: String },

    #[error(
        "disk {disk:?}, restore point {restore_point}: block at offset {offset} cannot be read back"
    )]
    DamagedBlock {
        disk: String,
        restore_point: String,
        offset: u64,
        #[source]
        source: Box<cbtvault_repo::Error>,
    },

    #[error("writing to the target at offset {offset}")]
    TargetWrite {
        offset: u64,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    Target(String),

    #[error("cancelled")]
    Cancelled,

    #[error("internal error: {0}")]
    Internal(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
