//! The cbtvault repository: where disk blocks, block maps and restore
//! points are kept.
//!
//! # Data model
//! A disk is a sequence of 64 KiB blocks. A block is stored once, under its
//! id, the BLAKE3-256 of its content ([`BlobId`]), whichever disk or restore
//! point it came from; all-zero blocks are never stored. Blocks are zstd
//! compressed (or kept raw when that does not shrink them) and appended to
//! **packs** of about 32 MiB, each ending with a checksummed index of its
//! blobs ([`pack`]). A restore point's **block map** is a Merkle tree over
//! the block ids whose nodes are stored as blobs too ([`tree`]); an
//! incremental writes only the nodes above the blocks it changed, yet every
//! restore point has a complete tree of its own. A **manifest** per restore
//! point (JSON, [`manifest`]) names the disk, source, time, size, tree
//! root, parent and statistics; its BLAKE3 is the restore point's id.
//! The SQLite **catalogue** ([`catalogue`]) indexes all of it and can be
//! rebuilt from packs and manifests alone ([`repair`]). The byte-level
//! layouts are in `docs/formats.md`.
//!
//! # Commit protocol
//! 1. New blobs go to packs; a pack is written to a temporary file, fsynced,
//!    renamed into place and its directory fsynced, then indexed.
//! 2. Only when every pack a restore point references is durable is its
//!    manifest written the same way. That write is the commit: the restore
//!    point exists from then on, and its catalogue row follows (a crash in
//!    between is healed by [`Repository::open`], which reconciles the
//!    catalogue with the manifests).
//! 3. Reads check every blob against its id, so damage is reported, never
//!    restored.
//!
//! # Damage and healing
//! Nothing read from storage is trusted: manifests are validated field by
//! field ([`Manifest::from_json`]), catalogue rows must hash to their id,
//! every blob is checked against its id. A blob found damaged is
//! quarantined in the catalogue; the next backup that meets the same
//! content stores it again, and every restore point that used it restores
//! again ([`Repository::blocks_to_heal`] makes an incremental re-read what
//! its parent lost). [`verify`] passes exactly when every restore point
//! restores; [`repair`] rebuilds the catalogue salvaging every blob whose
//! bytes still match (packs frame each blob, so a damaged index loses
//! nothing), and sets damaged manifests aside rather than deleting them.
//! A repository on read-only media is read through a private copy of its
//! catalogue.
//!
//! # Garbage collection
//! `forget` removes manifests; [`gc`] walks every remaining block map
//! (shared subtrees once), deletes packs with nothing referenced, and
//! rewrites packs until the unused bytes left are within `--max-unused` of
//! the live ones (most freed per byte copied first; new packs first, then
//! one catalogue transaction, then deletion of the old files). It plans,
//! then applies: a dry run is the plan.
//!
//! # Locking
//! Processes coordinate with kernel file locks in `locks/`, which vanish
//! with their holder, so a killed process never leaves a stale lock.
//!
//! | operation            | repository lock | disk lock | safe beside                     | because |
//! |----------------------|-----------------|-----------|---------------------------------|---------|
//! | backup               | shared          | exclusive | backups of other disks, restore, verify, list, diff, forget | packs are write-once, named by content; SQLite serialises index writes; two backups of one disk are refused by the disk lock |
//! | restore, diff, show  | shared          | –         | everything but gc and repair    | they only read committed restore points, whose blobs only gc deletes |
//! | verify               | shared          | –         | everything but gc and repair    | read-only; partial files of running backups are reported, not judged |
//! | forget               | shared          | –         | backup, restore, verify         | it only removes manifests; blobs stay until gc, and every tree is complete, so a running backup whose parent is forgotten still has its base |
//! | gc                   | exclusive       | –         | nothing (waits or fails "locked") | it deletes blobs: no backup may be choosing to reuse one at the same time |
//! | repair               | exclusive       | –         | nothing                         | it replaces the catalogue |
//!
//! Locks are taken in one order: job lock, repository lock, VM lock, disk
//! lock, then the catalogue mutex ([`Repository::catalogue`]), which is
//! held only for one call and never across another that takes it (see
//! ARCHITECTURE.md). Job, VM and disk locks are tried once, never queued.
//! | list                 | none            | –         | everything                      | a SQLite read transaction sees a consistent catalogue |
//!
//! # Storage backends
//! Files live behind the [`Backend`] trait: write-once, atomic, durable
//! named files. [`LocalBackend`] is the file system; [`MemoryBackend`] is for
//! tests. An object store only needs the same five operations.
//!
//! # Crates used
//! `blake3` (fast, SIMD and tree-hashing, the ids), `zstd` (compression with
//! a reusable context per thread), `rusqlite` with bundled SQLite (no
//! system library to match), `zerocopy` (on-disk structs whose sizes are
//! checked at compile time), `jiff` (correct RFC 3339 time handling).

pub mod backend;
pub mod catalogue;
pub mod error;
pub mod forget;
pub mod gc;
mod heal;
mod id;
mod lock;
pub mod manifest;
pub mod pack;
pub mod repair;
mod repository;
pub mod store;
pub mod tree;
pub mod verify;
mod writer;

pub use backend::{Backend, FileKind, LocalBackend, MemoryBackend};
pub use catalogue::{Catalogue, LostRestorePoint, QuarantinedBlob, RestorePointRow, RunRow};
pub use error::{Error, Result};
pub use id::{BlobId, is_all_zero};
pub use lock::Lock;
pub use manifest::{BackupMode, BackupStats, Manifest, SourceInfo};
pub use repository::{
    BACKUP_RUN, BLOCK_SIZE, CONFIG_FILE, Config, FORMAT_VERSION, InitOptions, Repository,
};
pub use store::{BlobReader, PackWriter};
pub use tree::{Tree, TreeBuilder, TreeShape};
pub use writer::{BackupSpec, BackupWriter, BlockEncoder, EncodedBlock, NewBlock, ReadStats};
