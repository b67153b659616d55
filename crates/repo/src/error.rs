//! The repository's error type.

use std::path::PathBuf;

use crate::BlobId;

/// Everything that can go wrong in the repository. Messages name the file,
/// pack, blob or restore point concerned; the cause is in `source()`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: not a cbtvault repository (no {file}); create one with `cbtvault init`", file = crate::repository::CONFIG_FILE)]
    NotARepository { path: PathBuf },

    #[error("{path}: a cbtvault repository already exists here")]
    AlreadyExists { path: PathBuf },

    #[error("{path}: the directory is not empty; choose an empty or new directory")]
    NotEmpty { path: PathBuf },

    #[error(
        "repository format version {found} is not supported by this build (it reads version {supported}); use a newer cbtvault"
    )]
    UnsupportedVersion { found: u32, supported: u32 },

    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("catalogue {path}; `cbtvault repair` rebuilds it from the packs and manifests")]
    Catalogue {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    #[error(
        "catalogue {path} is damaged ({what}); `cbtvault repair` rebuilds it from the packs and manifests"
    )]
    DamagedCatalogue { path: PathBuf, what: String },

    #[error("{path}: invalid repository configuration")]
    Config {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("pack {pack}: {what}")]
    CorruptPack { pack: String, what: String },

    #[error("blob {id} (pack {pack}, offset {offset}): {what}")]
    CorruptBlob {
        id: BlobId,
        pack: String,
        offset: u64,
        what: String,
    },

    #[error("blob {id} is not in the catalogue; run `cbtvault verify` and `cbtvault repair`")]
    MissingBlob { id: BlobId },

    #[error("block-map node {id}: {what}")]
    CorruptNode { id: BlobId, what: String },

    #[error("manifest {name}: {what}")]
    Manifest { name: String, what: String },

    #[error("VM metadata {id}: {what}")]
    VmMetadata { id: String, what: String },

    #[error(
        "blob {id} was found damaged ({reason}) and is quarantined; the next backup that reads the same data stores it again and heals every restore point that uses it"
    )]
    Quarantined { id: BlobId, reason: String },

    #[error("{path}: the repository is read-only here; {what} needs write access")]
    ReadOnly { path: PathBuf, what: String },

    #[error(
        "{path}: the repository is append-only (chosen at init): {what} is refused, so that nothing that backs up into it can erase its history"
    )]
    AppendOnly { path: PathBuf, what: String },

    #[error("no restore point matches {0:?}; `cbtvault list` shows them")]
    UnknownRestorePoint(String),

    #[error("{prefix:?} matches {count} restore points; give more characters")]
    AmbiguousRestorePoint { prefix: String, count: usize },

    #[error("no disk named {0:?} in this repository")]
    UnknownDisk(String),

    #[error(
        "{what} is locked by another cbtvault process ({holder}); wait for it to finish or retry later"
    )]
    Locked { what: String, holder: String },

    #[error(
        "this process lost its lock object {name} (no heartbeat reached the repository before it expired, or another process took it over): {what} was not committed; run it again"
    )]
    LockLost { name: String, what: String },

    #[error("a retention policy with no rule would forget every restore point")]
    EmptyRetentionPolicy,

    #[error("the repository is encrypted and was opened without its key: {what} needs it")]
    KeyRequired { what: String },

    #[error(
        "wrong {kind}: it opens none of the repository's {tried} key slot(s) of that kind{}",
        if unreadable.is_empty() { String::new() } else { format!(" (unreadable slots: {unreadable})") }
    )]
    WrongKey {
        kind: &'static str,
        tried: usize,
        unreadable: String,
    },

    #[error("key slot {slot}: {what}")]
    KeySlot { slot: String, what: String },

    #[error("refusing to remove the last key slot: nobody could open the repository again")]
    LastKeySlot,

    #[error("{what} is only for encrypted repositories; this one is not")]
    NotEncrypted { what: String },

    #[error("{0}")]
    InvalidArgument(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
