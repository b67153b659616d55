//! [`S3Backend`]: the repository's files as objects.
//!
//! Keys mirror the local layout under the location's prefix:
//! `cbtvault.json`, `packs/XY/NAME.pack`, `manifests/NAME.json`,
//! `vms/NAME.json`, `journal/NAME.json`, `keys/ID.json`, `locks/NAME.json`
//! (lock objects), `gc/NAME.json` (gc records), and `damaged/…` for what
//! repair sets aside — so a local repository copied into a bucket as it is (say
//! with `aws s3 sync`) opens as an S3 repository, and back.
//!
//! An object is visible only once whole: a PUT, or for packs (larger than
//! one part) a multipart upload whose parts are sent side by side and
//! which becomes visible at its completion. Every write is checked
//! afterwards (its size, by HEAD), so a store that acknowledged less than
//! it was given is caught before a manifest refers to it. The client
//! retries each request on timeouts, dropped connections and 5xx answers
//! (503 SlowDown included) with exponential backoff for up to three
//! minutes.
//!
//! # Resuming an interrupted upload
//! A part can still fail after those retries: the store kept answering
//! 5xx, or answered what object_store does not retry (S3's `400
//! RequestTimeout` when it found a part's body too slow). The upload is
//! then resumed, not restarted: it keeps its upload id and every part the
//! store accepted (their ETags and checksums), and sends again only the
//! parts that failed, in up to [`ResumePolicy::rounds`] further rounds
//! with a backoff between them; each round is logged (a warning naming
//! the object, the upload id and the parts sent again). A completion that
//! failed is sent again the same way; one whose answer was lost after the
//! store completed it finds the object there, of its size (packs are
//! named by their content, so an object of that name is that pack). An
//! upload the store no longer knows (aborted by someone else) starts
//! afresh, still within the rounds. Only when the rounds are spent, or
//! the store refuses for good (no permission, no such bucket), is the
//! upload aborted, so that no parts are left to pay for, and the write
//! fails.
//!
//! A killed process resumes nothing here: its upload id dies with it.
//! The packs it completed are not sent again — the next backup indexes
//! them before it deduplicates (`cbtvault_repo`'s `heal.rs`), and a backup
//! stopped rather than killed suspends so that the next run reads only
//! what it lacks (`resume.rs`) — but the parts of the upload that was in
//! flight stay in the bucket, invisible and billed, until the bucket's
//! lifecycle rule for incomplete multipart uploads
//! (`AbortIncompleteMultipartUpload`, see docs/cli.md) removes them.
//! [`Backend::list_partial`] cannot report them: object_store offers no
//! ListMultipartUploads call, and this crate does not sign requests of
//! its own.
//!
//! Lock objects are created with a conditional PUT (`If-None-Match: *`,
//! object_store's `PutMode::Create`): of two hosts, the store lets one
//! create it and answers the other 412. A create whose answer was lost and
//! that was retried meets its own object: it reads it back and compares.
//! A store that ignores the header lets the last writer win; the lock then
//! degrades to "read back and back off" (see the repo crate's `lease.rs`).
//!
//! The repository is synchronous; object_store is async. The backend owns
//! a small runtime and waits for each request on the calling thread (a
//! repository thread, never an executor's), so it may be called from
//! anywhere, including from within another runtime's blocking threads.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cbtvault_repo::{Backend, FileKind};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
};

use crate::error::{Error, Result};
use crate::location::{Credentials, S3Location};

/// Objects larger than this go up as a multipart upload of parts this big.
const PART_SIZE: usize = 8 << 20;

/// How a multipart upload whose parts failed after the client's own
/// retries is resumed (see the module's docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumePolicy {
    /// Rounds of sending the failed parts again before giving up.
    pub rounds: u32,
    /// The wait before the first round; it doubles with each round.
    pub first_backoff: Duration,
    /// The longest wait between two rounds.
    pub max_backoff: Duration,
}

impl Default for ResumePolicy {
    /// Five rounds, 1 s before the first, doubling: a store that keeps
    /// failing a part after the client's retries gets about half a minute
    /// more before the upload is given up.
    fn default() -> Self {
        ResumePolicy {
            rounds: 5,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(16),
        }
    }
}

impl ResumePolicy {
    /// The wait before round `round` (1-based).
    fn backoff(&self, round: u32) -> Duration {
        let factor = 1u32 << round.saturating_sub(1).min(16);
        self.first_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// A repository's files in an S3 bucket.
pub struct S3Backend {
    location: S3Location,
    store: Arc<AmazonS3>,
    runtime: tokio::runtime::Runtime,
    resume: ResumePolicy,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Backend")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl S3Backend {
    /// A client of `location` with `credentials`. Nothing is sent yet.
    pub fn connect(location: &S3Location, credentials: &Credentials) -> Result<S3Backend> {
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(&location.region)
            .with_access_key_id(&credentials.access_key_id)
            .with_secret_access_key(&credentials.secret_access_key)
            .with_virtual_hosted_style_request(!location.path_style)
            // Every upload (and part) carries its SHA-256, which the store
            // checks before accepting it (a body damaged on the way is
            // refused, not stored) ...
            .with_checksum_algorithm(object_store::aws::Checksum::SHA256)
            // ... and its Content-MD5, which Object Lock asks for by name.
            .with_http_connector(crate::content_md5::ContentMd5Connector)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(15),
                    base: 2.0,
                },
                max_retries: 10,
                retry_timeout: Duration::from_secs(180),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(120))
                    .with_allow_http(
                        location
                            .endpoint
                            .as_deref()
                            .is_some_and(|e| e.starts_with("http://")),
                    ),
            );
        if let Some(endpoint) = &location.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(token) = &credentials.session_token {
            builder = builder.with_token(token);
        }
        let store = builder.build().map_err(|source| Error::Store {
            location: location.display(),
            what: "configuring the S3 client".into(),
            source: Box::new(source),
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cbtvault-s3")
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        Ok(S3Backend {
            location: location.clone(),
            store: Arc::new(store),
            runtime,
            resume: ResumePolicy::default(),
        })
    }

    /// Changes how interrupted multipart uploads are resumed (tests, and
    /// stores known to need longer).
    pub fn set_resume_policy(&mut self, resume: ResumePolicy) {
        self.resume = resume;
    }

    /// The location this backend reaches.
    pub fn location(&self) -> &S3Location {
        &self.location
    }

    /// Runs `f(store)` on the backend's runtime and waits for it here.
    fn run<T, F, Fut>(&self, f: F) -> std::result::Result<T, object_store::Error>
    where
        T: Send + 'static,
        F: FnOnce(Arc<AmazonS3>) -> Fut,
        Fut: Future<Output = std::result::Result<T, object_store::Error>> + Send + 'static,
    {
        let task = self.runtime.spawn(f(self.store.clone()));
        match futures::executor::block_on(task) {
            Ok(result) => result,
            Err(e) => Err(object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            }),
        }
    }

    fn key_text(&self, kind: FileKind, name: &str) -> String {
        let file = match kind {
            FileKind::Config => name.to_string(),
            FileKind::Pack => format!("packs/{}/{name}.pack", name.get(..2).unwrap_or("__")),
            FileKind::Manifest => format!("manifests/{name}.json"),
            FileKind::VmMetadata => format!("vms/{name}.json"),
            FileKind::Journal => format!("journal/{name}.json"),
            FileKind::Key => format!("keys/{name}.json"),
            FileKind::Lock => format!("locks/{name}.json"),
            FileKind::Gc => format!("gc/{name}.json"),
        };
        self.under_prefix(&file)
    }

    fn under_prefix(&self, rest: &str) -> String {
        if self.location.prefix.is_empty() {
            rest.to_string()
        } else {
            format!("{}/{rest}", self.location.prefix)
        }
    }

    fn key(&self, kind: FileKind, name: &str) -> Key {
        Key::from(self.key_text(kind, name))
    }

    /// The repository's error for a failed request on `key`.
    fn error(&self, key: &str, e: object_store::Error) -> cbtvault_repo::Error {
        let kind = match &e {
            object_store::Error::NotFound { .. } => std::io::ErrorKind::NotFound,
            _ => std::io::ErrorKind::Other,
        };
        cbtvault_repo::Error::Io {
            path: format!("s3://{}/{key}", self.location.bucket).into(),
            source: std::io::Error::new(kind, e),
        }
    }

    fn put(&self, key: &str, data: Bytes) -> std::result::Result<(), object_store::Error> {
        let path = Key::from(key);
        let resume = self.resume;
        self.run(move |store| async move {
            if data.len() <= PART_SIZE {
                store.put(&path, PutPayload::from(data)).await?;
                return Ok(());
            }
            put_multipart(&store, &path, &data, resume).await
        })
    }

    /// Puts `data` and checks the store holds all of it.
    fn put_checked(&self, kind: FileKind, name: &str, data: Bytes) -> cbtvault_repo::Result<()> {
        let key = self.key_text(kind, name);
        let len = data.len();
        self.put(&key, data).map_err(|e| self.error(&key, e))?;
        // A store that acknowledged less than it was given is caught here,
        // before anything refers to the object.
        let size = self.size(kind, name)?;
        if size != len as u64 {
            return Err(cbtvault_repo::Error::Io {
                path: format!("s3://{}/{key}", self.location.bucket).into(),
                source: std::io::Error::other(format!(
                    "the store holds {size} bytes after {len} were written"
                )),
            });
        }
        Ok(())
    }
}

/// Uploads `data` to `path` in parts of [`PART_SIZE`], sent side by side;
/// parts that fail are sent again, alone, in up to `resume.rounds` rounds
/// (see the module's docs). The upload is aborted only when giving up.
async fn put_multipart(
    store: &AmazonS3,
    path: &Key,
    data: &Bytes,
    resume: ResumePolicy,
) -> std::result::Result<(), object_store::Error> {
    let count = data.len().div_ceil(PART_SIZE);
    let part = |i: usize| data.slice(i * PART_SIZE..((i + 1) * PART_SIZE).min(data.len()));
    let mut id = store.create_multipart(path).await?;
    let mut parts: Vec<Option<PartId>> = vec![None; count];
    let mut round = 0;
    loop {
        let missing: Vec<usize> = (0..count).filter(|&i| parts[i].is_none()).collect();
        let sent = futures::future::join_all(
            missing
                .iter()
                .map(|&i| store.put_part(path, &id, i, PutPayload::from(part(i)))),
        )
        .await;
        let mut failed = Vec::new();
        let mut error = None;
        for (i, result) in missing.into_iter().zip(sent) {
            match result {
                Ok(accepted) => parts[i] = Some(accepted),
                Err(e) => {
                    failed.push(i + 1);
                    error = Some(e);
                }
            }
        }
        let error = match error {
            Some(e) => e,
            None => {
                let accepted: Vec<PartId> = parts.iter().flatten().cloned().collect();
                match store.complete_multipart(path, &id, accepted).await {
                    Ok(_) => {
                        if round > 0 {
                            tracing::info!(key = %path, upload = %id, rounds = round, "multipart upload completed after resuming");
                        }
                        return Ok(());
                    }
                    Err(e) => {
                        // Completed by an earlier try whose answer was
                        // lost: the object is there, of its size.
                        if completed(store, path, data.len()).await {
                            tracing::info!(key = %path, upload = %id, error = %e, "the store had completed the multipart upload already");
                            // Or held the pack already (named by content):
                            // either way no parts are left behind.
                            let _ = store.abort_multipart(path, &id).await;
                            return Ok(());
                        }
                        e
                    }
                }
            }
        };
        round += 1;
        if round > resume.rounds || !resumable(&error) {
            tracing::error!(key = %path, upload = %id, failed_parts = ?failed, rounds = round - 1, %error, "giving up a multipart upload: aborting it");
            if let Err(e) = store.abort_multipart(path, &id).await {
                tracing::warn!(key = %path, upload = %id, error = %e, "the multipart upload was not aborted; the bucket's lifecycle rule for incomplete uploads removes its parts");
            }
            return Err(error);
        }
        let wait = resume.backoff(round);
        if matches!(error, object_store::Error::NotFound { .. }) {
            // The store no longer knows the upload (aborted meanwhile):
            // its parts are gone, start afresh.
            tracing::warn!(key = %path, upload = %id, round, of = resume.rounds, wait = ?wait, %error, "the multipart upload is gone: starting it again");
            tokio::time::sleep(wait).await;
            id = store.create_multipart(path).await?;
            parts = vec![None; count];
            continue;
        }
        let kept = parts.iter().flatten().count();
        if failed.is_empty() {
            tracing::warn!(key = %path, upload = %id, round, of = resume.rounds, wait = ?wait, %error, "resuming a multipart upload: every part is in, completing it again");
        } else {
            tracing::warn!(
                key = %path, upload = %id, round, of = resume.rounds, wait = ?wait,
                failed_parts = ?failed, kept_parts = kept, of_parts = count, %error,
                "resuming a multipart upload: sending again only the parts that failed"
            );
        }
        tokio::time::sleep(wait).await;
    }
}

/// True when `path` holds an object of `size` bytes.
async fn completed(store: &AmazonS3, path: &Key, size: usize) -> bool {
    store
        .head(path)
        .await
        .is_ok_and(|meta| meta.size == size as u64)
}

/// False for the errors no later round can mend.
fn resumable(e: &object_store::Error) -> bool {
    !matches!(
        e,
        object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::NotImplemented
            | object_store::Error::NotSupported { .. }
            | object_store::Error::InvalidPath { .. }
            | object_store::Error::UnknownConfigurationKey { .. }
    )
}

impl Backend for S3Backend {
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> cbtvault_repo::Result<()> {
        self.put_checked(kind, name, Bytes::copy_from_slice(data))
    }

    /// Sends the buffer itself (a pack: no second copy in memory), and
    /// hands it back once every clone the upload made is gone.
    fn write_owned(
        &self,
        kind: FileKind,
        name: &str,
        data: Vec<u8>,
    ) -> cbtvault_repo::Result<Vec<u8>> {
        let data = Bytes::from(data);
        self.put_checked(kind, name, data.clone())?;
        Ok(data
            .try_into_mut()
            .map(|mut b| {
                b.clear();
                Vec::from(b)
            })
            .unwrap_or_default())
    }

    fn read(&self, kind: FileKind, name: &str) -> cbtvault_repo::Result<Vec<u8>> {
        let key = self.key(kind, name);
        let text = key.to_string();
        self.run(move |store| async move { store.get(&key).await?.bytes().await })
            .map(|b| b.to_vec())
            .map_err(|e| self.error(&text, e))
    }

    fn read_at(
        &self,
        kind: FileKind,
        name: &str,
        offset: u64,
        len: usize,
    ) -> cbtvault_repo::Result<Vec<u8>> {
        let key = self.key(kind, name);
        let text = key.to_string();
        let end = offset.saturating_add(len as u64);
        let data = self
            .run(move |store| async move { store.get_range(&key, offset..end).await })
            .map_err(|e| self.error(&text, e))?;
        if data.len() != len {
            return Err(cbtvault_repo::Error::Io {
                path: format!("s3://{}/{text}", self.location.bucket).into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("object too short for {len} bytes at offset {offset}"),
                ),
            });
        }
        Ok(data.to_vec())
    }

    fn size(&self, kind: FileKind, name: &str) -> cbtvault_repo::Result<u64> {
        let key = self.key(kind, name);
        let text = key.to_string();
        self.run(move |store| async move { store.head(&key).await })
            .map(|meta| meta.size)
            .map_err(|e| self.error(&text, e))
    }

    fn list(&self, kind: FileKind) -> cbtvault_repo::Result<Vec<String>> {
        Ok(self.list_dated(kind)?.into_iter().map(|(n, _)| n).collect())
    }

    fn list_dated(
        &self,
        kind: FileKind,
    ) -> cbtvault_repo::Result<Vec<(String, Option<jiff::Timestamp>)>> {
        let (dir, suffix) = match kind {
            FileKind::Config => {
                let key = self.key_text(kind, cbtvault_repo::CONFIG_FILE);
                let path = Key::from(key.clone());
                return match self.run(move |store| async move { store.head(&path).await }) {
                    Ok(_) => Ok(vec![(cbtvault_repo::CONFIG_FILE.to_string(), None)]),
                    Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
                    Err(e) => Err(self.error(&key, e)),
                };
            }
            FileKind::Pack => ("packs", ".pack"),
            FileKind::Manifest => ("manifests", ".json"),
            FileKind::VmMetadata => ("vms", ".json"),
            FileKind::Journal => ("journal", ".json"),
            FileKind::Key => ("keys", ".json"),
            FileKind::Lock => ("locks", ".json"),
            FileKind::Gc => ("gc", ".json"),
        };
        let prefix = Key::from(self.under_prefix(dir));
        let text = prefix.to_string();
        let metas = self
            .run(move |store| async move {
                use futures::TryStreamExt;
                store.list(Some(&prefix)).try_collect::<Vec<_>>().await
            })
            .map_err(|e| self.error(&text, e))?;
        let mut names: Vec<(String, Option<jiff::Timestamp>)> = metas
            .into_iter()
            .filter_map(|m| {
                let time =
                    jiff::Timestamp::from_millisecond(m.last_modified.timestamp_millis()).ok();
                m.location
                    .filename()
                    .and_then(|f| f.strip_suffix(suffix))
                    .map(|n| (n.to_string(), time))
            })
            .collect();
        names.sort();
        Ok(names)
    }

    fn create(&self, kind: FileKind, name: &str, data: &[u8]) -> cbtvault_repo::Result<bool> {
        let path = self.key(kind, name);
        let text = path.to_string();
        let payload = Bytes::copy_from_slice(data);
        let put = self.run(move |store| async move {
            let options = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            store
                .put_opts(&path, PutPayload::from(payload), options)
                .await
        });
        match put {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => {
                // Ours, when a retry met the object its first try made.
                match self.read(kind, name) {
                    Ok(existing) => Ok(existing == data),
                    Err(_) => Ok(false),
                }
            }
            Err(e) => Err(self.error(&text, e)),
        }
    }

    fn replace(&self, kind: FileKind, name: &str, data: &[u8]) -> cbtvault_repo::Result<()> {
        let key = self.key_text(kind, name);
        self.put(&key, Bytes::copy_from_slice(data))
            .map_err(|e| self.error(&key, e))
    }

    fn remove(&self, kind: FileKind, name: &str) -> cbtvault_repo::Result<()> {
        let key = self.key(kind, name);
        let text = key.to_string();
        match self.run(move |store| async move { store.delete(&key).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(&text, e)),
        }
    }

    /// Uploads in progress are invisible; one that fails is resumed, and
    /// aborted when given up. What a killed process leaves (the parts of
    /// its upload in flight) is removed by the bucket's lifecycle rule for
    /// incomplete multipart uploads (docs/cli.md), not listed here:
    /// object_store offers no ListMultipartUploads.
    fn list_partial(&self) -> cbtvault_repo::Result<Vec<String>> {
        Ok(Vec::new())
    }

    fn remove_partial(&self) -> cbtvault_repo::Result<usize> {
        Ok(0)
    }

    fn locate(&self, kind: FileKind, name: &str) -> String {
        format!(
            "s3://{}/{}",
            self.location.bucket,
            self.key_text(kind, name)
        )
    }

    fn set_aside(&self, kind: FileKind, name: &str) -> cbtvault_repo::Result<String> {
        let from = self.key(kind, name);
        let file = from.filename().unwrap_or(name).to_string();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let to = Key::from(self.under_prefix(&format!("damaged/{stamp}-{file}")));
        let (text_from, text_to) = (from.to_string(), to.to_string());
        self.run(move |store| async move {
            store.copy(&from, &to).await?;
            store.delete(&from).await
        })
        .map_err(|e| self.error(&text_from, e))?;
        Ok(format!("s3://{}/{text_to}", self.location.bucket))
    }
}
