//! Opening and creating a repository wherever it lives.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cbtvault_repo::{Backend, FileKind, InitOptions, KeyPrompt, Repository};

use crate::backend::S3Backend;
use crate::error::{Error, Result};
use crate::location::{Credentials, S3Location};

/// The S3 location `path` names, if it names one.
fn s3_location(path: &Path) -> Option<Result<S3Location>> {
    let text = path.to_str()?;
    S3Location::is_s3(text).then(|| S3Location::parse(text))
}

/// Opens the repository at `path`: a directory, or `s3://BUCKET/PREFIX`
/// (its catalogue then lives in a local cache, built from the bucket when
/// missing and brought up to date at each open).
pub fn open(path: &Path) -> Result<Repository> {
    open_with_key(path, None)
}

/// [`open`], asking `key` for the secret when the repository is encrypted
/// (without it an encrypted repository opens locked: structure only).
pub fn open_with_key(path: &Path, key: Option<KeyPrompt<'_>>) -> Result<Repository> {
    let Some(location) = s3_location(path) else {
        return Ok(Repository::open_keyed(path, key)?);
    };
    let location = location?;
    let backend = S3Backend::connect(&location, &Credentials::from_environment()?)?;
    let raw = match backend.read(FileKind::Config, cbtvault_repo::CONFIG_FILE) {
        Ok(raw) => raw,
        Err(cbtvault_repo::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Err(cbtvault_repo::Error::NotARepository {
                path: location.display().into(),
            }
            .into());
        }
        Err(e) => return Err(e.into()),
    };
    let id = serde_json::from_slice::<serde_json::Value>(&raw)
        .ok()
        .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_string))
        .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| Error::Location {
            location: location.display(),
            why: "its cbtvault.json has no repository id".into(),
        })?;
    let cache = cache_root()?.join(id);
    Ok(Repository::open_cached_with_key(
        &cache,
        Arc::new(backend),
        key,
    )?)
}

/// Creates a repository at `path`: a new or empty directory, or an S3
/// location that holds no repository yet.
pub fn init(path: &Path, options: &InitOptions) -> Result<Repository> {
    let Some(location) = s3_location(path) else {
        return Ok(Repository::init(path, options)?);
    };
    let location = location?;
    let backend = S3Backend::connect(&location, &Credentials::from_environment()?)?;
    let root = cache_root()?;
    std::fs::create_dir_all(&root).map_err(|e| cbtvault_repo::Error::Io {
        path: root.clone(),
        source: e,
    })?;
    // The cache is named by the repository's id, known only once made.
    let scratch = tempfile_dir(&root)?;
    let made = Repository::init_with(&scratch, Arc::new(backend), options);
    let _ = std::fs::remove_dir_all(&scratch);
    drop(made?);
    // A new encrypted repository opens with the secret it was made with.
    let secret = options.encryption.clone();
    match secret {
        Some(secret) => open_with_key(path, Some(&|| Ok(secret.clone()))),
        None => open(path),
    }
}

fn tempfile_dir(root: &Path) -> Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = root.join(format!("new-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| cbtvault_repo::Error::Io {
        path: dir.clone(),
        source: e,
    })?;
    Ok(dir)
}

/// Where the catalogues of remote repositories are cached:
/// `CBTVAULT_CACHE_DIR`, else `$XDG_CACHE_HOME/cbtvault`, else
/// `~/.cache/cbtvault`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CBTVAULT_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(Path::new(&dir).join("cbtvault"));
    }
    std::env::var_os("HOME")
        .map(|home| Path::new(&home).join(".cache/cbtvault"))
        .ok_or(Error::NoCacheDir)
}
