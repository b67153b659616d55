//! The crate's one error type.

/// What went wrong reaching a repository's store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{location}: {why}")]
    Location { location: String, why: String },

    #[error("no S3 credentials: {why}")]
    NoCredentials { why: String },

    #[error("{location}: {what}: {source}")]
    Store {
        location: String,
        what: String,
        #[source]
        source: Box<object_store::Error>,
    },

    #[error("cannot start the S3 client's runtime: {0}")]
    Runtime(#[source] std::io::Error),

    #[error("no cache directory for the repository's catalogue: set CBTVAULT_CACHE_DIR (or HOME)")]
    NoCacheDir,

    #[error(transparent)]
    Repo(#[from] cbtvault_repo::Error),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
