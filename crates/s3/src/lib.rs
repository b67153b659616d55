//! Where a repository lives: a local directory, or S3-compatible object
//! storage (AWS S3, Ceph RGW, MinIO, Garage) given as
//! `s3://BUCKET/PREFIX?endpoint=URL&region=R&path_style=true`.
//!
//! [`open`] and [`init`] take either; every front end (the command line,
//! the daemon) opens repositories through them.
//!
//! # An S3 repository
//! - **Files**: the repository's files become objects under the prefix,
//!   in the local layout ([`S3Backend`]); packs go up as multipart uploads,
//!   invisible until complete and resumed when parts fail (only the failed
//!   parts are sent again, [`ResumePolicy`]), and every write is checked
//!   by its size afterwards. The commit protocol is the local one: packs, then the
//!   manifest.
//! - **Catalogue**: a local cache (`CBTVAULT_CACHE_DIR`, else
//!   `~/.cache/cbtvault`, one directory per repository id), made from the
//!   bucket when missing and brought up to date at each open: manifests and
//!   packs another host (or an earlier run) wrote are indexed, so any host
//!   with the credentials can list and restore. Beside it the repo crate
//!   keeps the block maps' nodes (`nodes.sqlite`, each checked against its
//!   id when used), so an incremental does not read its parent's map one
//!   request per node.
//! - **Credentials**: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (and
//!   `AWS_SESSION_TOKEN`), or a profile of the shared credentials file —
//!   never the command line.
//! - **Locks**: the kernel locks in the cache directory keep the processes
//!   of one host apart; lock objects in the bucket (`locks/NAME.json`,
//!   created with a conditional PUT, `If-None-Match: *`) keep hosts apart
//!   and tell gc what runs, so several hosts back up into one bucket at
//!   once and gc runs beside them (the repo crate's Locking section).
//!
//! # Crates used
//! `object_store` (the Apache Arrow project's object-store client: S3
//! signing, multipart uploads, retries with backoff on timeouts, dropped
//! connections and 5xx answers — 503 SlowDown included — which is what a
//! hand-written client would have to get right), `tokio` (its runtime),
//! `url` (parsing the location), and for the Content-MD5 that S3 Object
//! Lock asks of every upload (`content_md5.rs`) RustCrypto's `md-5`,
//! `http-body-util` (reading a request's body) and `async-trait`
//! (object_store's connector trait is one).

mod backend;
mod content_md5;
mod error;
mod location;
mod open;

pub use backend::{ResumePolicy, S3Backend};
pub use error::{Error, Result};
pub use location::{Credentials, S3Location};
pub use open::{cache_root, init, open, open_with_key};
