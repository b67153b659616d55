//! The cbtvault repository: where disk blocks, block maps and restore
//! points are kept.
//!
//! # Data model
//! A disk is a sequence of 64 KiB blocks ([`BLOCK_SIZE`], the block maps'
//! block, `cbtvault_blockmap::BLOCK_SIZE`; the format records 64 KiB and a
//! compile-time check ties the two). A block is stored once, under its id,
//! the BLAKE3-256 of its content ([`BlobId`]; keyed in an encrypted
//! repository), whichever disk or restore
//! point it came from; all-zero blocks are never stored. Blocks are zstd
//! compressed (or kept raw when that does not shrink them) and appended to
//! **packs** of about 16 MiB (the repository's `pack_size`), each ending
//! with a checksummed index of its blobs. A restore point's **block map** is a Merkle tree over the block
//! ids whose nodes are stored as blobs too ([`Tree`]); an incremental
//! writes only the nodes above the blocks it changed, yet every restore
//! point has a complete tree of its own. A **manifest** per restore point
//! (JSON, [`Manifest`]) names the disk, source, time, size, tree root,
//! parent and statistics; its BLAKE3 is the restore point's id. The SQLite
//! **catalogue** ([`Catalogue`]) indexes all of it and can be rebuilt from
//! packs and manifests alone ([`repair()`]). The byte-level layouts are in
//! `docs/formats.md`.
//!
//! Beside them: **VM metadata** ([`VmMetadata`], `vms/`), saved by a
//! VM-level run and named by its restore points' [`VmInfo`], so that a
//! whole VM can be rebuilt; and the **crash journal**
//! ([`Repository::journal_note`], `journal/`), notes a hypervisor provider
//! writes before a step a crash could leave half-done, kept beside the
//! catalogue so that `repair` never loses them.
//!
//! # The API
//! Every module is private; this page lists what callers use.
//! - Writing: [`Repository::begin_backup`] gives a [`BackupWriter`] that
//!   owns a restore point in the making — its packs, block map, manifest
//!   and the run recorded in the catalogue. [`Repository::block_encoder`]
//!   gives [`BlockEncoder`]s (one per thread) that turn a block into an
//!   [`EncodedBlock`]: zero, already stored, or new and compressed. The
//!   caller pushes them in block order and calls [`BackupWriter::finish`]
//!   (the commit protocol below, run closed as `ok`) or
//!   [`BackupWriter::fail`] (dropping the writer does the same: run closed
//!   as `failed`, only unreferenced packs left).
//!   [`BackupWriter::blocks_to_reread`] names what an incremental must read
//!   beyond the changed blocks (tails after a resize, damaged blocks).
//! - Reading: [`Repository::resolve`], [`Repository::reader`],
//!   [`Cursor`], [`walk`], [`Repository::diff`].
//! - Copying: [`Repository::copy_from`] into another repository, with
//!   one key (blobs as stored, ids kept) or across keys (re-encoded, new
//!   ids, [`Repository::copies_of`] maps them back).
//! - Looking after: [`Repository::forget_plan`] then
//!   [`Repository::forget`]; [`Repository::collect_garbage`] (plan, then
//!   apply unless a dry run); [`Repository::verify`]; [`repair()`]. Each
//!   takes the lock it needs itself (table below); callers take none.
//!   Errors say what went wrong in the library's terms (a typed variant
//!   such as [`Error::EmptyRetentionPolicy`]); front ends word the fix in
//!   their own flags.
//!
//! # Commit protocol
//! 1. New blobs go to packs; a pack is written to a temporary file, fsynced,
//!    renamed into place and its directory fsynced, then indexed.
//! 2. Only when every pack a restore point references is durable is its
//!    manifest written the same way. That write is the commit: the restore
//!    point exists from then on, and its catalogue row follows (a crash in
//!    between is healed by [`Repository::open`], which reconciles the
//!    catalogue with the manifests). [`BackupWriter::finish`] runs these
//!    steps.
//! 3. Reads check every blob against its id, so damage is reported, never
//!    restored.
//!
//! # Damage and healing
//! Nothing read from storage is trusted: manifests are validated field by
//! field ([`Manifest::from_json`]), catalogue rows must hash to their id,
//! every blob is checked against its id. A blob found damaged is
//! quarantined in the catalogue; the next backup that meets the same
//! content stores it again, and every restore point that used it restores
//! again ([`BackupWriter::blocks_to_reread`] makes an incremental re-read
//! what its parent lost). [`Repository::verify`] passes exactly when every
//! restore point restores; [`repair()`] rebuilds the catalogue salvaging
//! every blob whose bytes still match (packs frame each blob, so a damaged
//! index loses nothing), and sets damaged manifests aside rather than
//! deleting them. A repository on read-only media is read through a
//! private copy of its catalogue.
//!
//! # Forget and garbage collection
//! Forget removes manifests: [`Repository::forget_plan`] decides (a
//! retention policy or named restore points; each disk's last restore point
//! is kept unless the plan allows it to go) and [`Repository::forget`]
//! applies the plan, so a dry run shows exactly what a real run does.
//! [`Repository::collect_garbage`] walks every remaining block map (shared
//! subtrees once), condemns packs with nothing referenced, and rewrites
//! packs until the unused bytes left are within
//! [`GcOptions::max_unused`] of the live ones (most freed per byte copied
//! first; a gc record condemning the old packs first, then the new packs,
//! then one catalogue transaction, and the old files go in a sweep once
//! every operation that ran when they were condemned has ended — see
//! Locking and `condemn.rs`). It plans, then applies: a dry run is the
//! plan. It also removes VM metadata that no restore point names once it is a day
//! old (a run saves it before committing the restore points that name it).
//!
//! # Append-only repositories
//! Chosen at init ([`InitOptions::append_only`]): backups and copies only.
//! forget, gc and repair's setting aside ask
//! [`Repository::require_removals`], and the backend is wrapped so that no
//! pack, manifest or VM metadata file can be removed or moved whatever
//! asks (`append_only.rs`).
//!
//! # Locking
//! Two layers. **Kernel file locks** in `locks/` (of the local cache
//! directory for an S3 repository) keep the processes of one host apart
//! and vanish with their holder. **Lock objects** in the repository itself
//! (`locks/NAME.json`, `lease.rs`; format in `docs/formats.md`) show every
//! host who holds what: an owner (host, boot id, pid and its start time),
//! a heartbeat renewed every minute and an expiry five minutes on. One of
//! a dead process of the same host is stale at once, one of another host
//! once expired; either is taken over, so a killed process never makes the
//! next run hang. Exclusive ones are created with a conditional write
//! ([`Backend::create`]: `link` on a directory, `If-None-Match: *` on S3)
//! and read back. A holder whose lock object was lost (taken over, or no
//! heartbeat before its expiry) commits nothing ([`Error::LockLost`]).
//! The repository takes what each operation needs itself, except a
//! backup's locks, taken by its caller (who holds them around hypervisor
//! steps too) before [`Repository::begin_backup`].
//!
//! | operation            | this host (kernel)      | all hosts (lock object) | safe beside                     | because |
//! |----------------------|-------------------------|-------------------------|---------------------------------|---------|
//! | backup               | repository shared, disk exclusive | `op-TOKEN`, `disk-KEY` (exclusive) | everything but repair; a backup of the same disk anywhere is refused | packs are write-once, named by content; the catalogue is refreshed (condemned packs, other hosts' packs) after `op-` exists and before any dedup decision, and blobs in condemned packs are stored again |
//! | restore, diff, show  | repository shared       | `op-TOKEN`              | everything but repair | they read committed restore points; gc deletes a pack only after every operation that ran when it was condemned ended |
//! | verify               | repository shared       | `op-TOKEN`              | everything but repair | read-only; partial files of running backups are reported, not judged |
//! | forget               | repository shared       | `op-TOKEN`              | backup, restore, verify, gc     | it only removes manifests; every tree is complete, so a running backup whose parent is forgotten still has its base — a backup checks its parent's manifest after registering, and gc waits for it |
//! | gc                   | repository shared       | `gc` (exclusive)        | backups, restores, verify, forget on any host; one gc at a time | it condemns (a gc record), and sweeps only what is still unreferenced once every operation listed when it condemned has ended (`condemn.rs`); packs newer than the oldest running operation are never touched |
//! | repair               | repository exclusive    | `repair` (exclusive), once no other lock object is live | nothing, on any host | it replaces the catalogue, clears partial files and sets damaged files aside; an operation or gc that starts while it runs finds `repair` after creating its own lock object and refuses (of the two, one sees the other) |
//! | key add/remove/passwd | `keys` exclusive       | `keys` (exclusive)      | everything but another key change, on any host | only key slots change; tried once, never queued |
//! | list                 | none                    | –                       | everything                      | a SQLite read transaction sees a consistent catalogue |
//!
//! Locks are taken in one order: job lock, repository lock, VM lock, disk
//! lock, then the catalogue mutex ([`Repository::catalogue`]), which is
//! held only for one call and never across another that takes it (see
//! ARCHITECTURE.md). Job, VM, disk and key-slot locks are tried once,
//! never queued. Job and VM locks are kernel locks only: jobs and VMs
//! belong to one host's configuration.
//!
//! # Encryption at rest
//! Chosen at init ([`InitOptions::encryption`]). Every encode and decode
//! path goes through one [`Crypto`] per repository: `Plain` (the identity,
//! an unencrypted repository: plain BLAKE3 ids, nothing sealed), `Keyed`
//! (ids are BLAKE3 keyed with the master key's id half, so they reveal
//! nothing about content yet deduplicate within the repository; blobs,
//! nodes, manifests, VM metadata and journal notes are sealed with
//! XChaCha20-Poly1305, a random 24-byte nonce each, the associated data
//! binding each to its kind and id or name), or `Locked` (an encrypted
//! repository opened without its key: structure only; anything that needs
//! the key fails with [`Error::KeyRequired`]). Blocks are compressed, then
//! sealed in place. The master key is wrapped by key slots (`keys/`,
//! Argon2id per passphrase or key file), added, removed and changed
//! without rewriting data ([`Repository::key_add`],
//! [`Repository::key_remove`], [`Repository::key_passwd`]); a front end
//! passes a [`KeyPrompt`] when opening, asked only for an encrypted
//! repository. Pack framing and indices stay in the clear, so verify checks
//! structure without the key; the catalogue, a local index, is not
//! encrypted (it holds no block content). Copies between repositories
//! with one master key send blobs as stored; any other pair is re-encoded
//! block by block, and the copy gets a new restore point id (`rekey.rs`,
//! `docs/formats.md`).
//!
//! | operation | lock | with the key | without it |
//! |-----------|------|--------------|------------|
//! | key add / remove / passwd | `keys` lock and lock object (exclusive, tried once) | yes | refused |
//! | key list | none | – | allowed |
//! | verify | shared | everything | structure only |
//! | repair | exclusive | yes | refused before it touches anything |
//!
//! # Storage backends
//! Files live behind the [`Backend`] trait: write-once, atomic, durable
//! named files, plus a conditional create and an in-place replace for
//! lock objects and gc records, which carry no guest data (never sealed,
//! and removable in an append-only repository). [`LocalBackend`] is the
//! file system; [`MemoryBackend`] is for tests; `cbtvault-s3` is S3.
//!
//! # Crates used
//! `blake3` (fast, SIMD and tree-hashing, the ids), `zstd` (compression with
//! a reusable context per thread), `rusqlite` with bundled SQLite (no
//! system library to match), `zerocopy` (on-disk structs whose sizes are
//! checked at compile time), `jiff` (correct RFC 3339 time handling).
//! For encryption, RustCrypto's `chacha20poly1305` (XChaCha20-Poly1305: an
//! AEAD whose 192-bit nonces may be random, sealing in place with
//! `encrypt_in_place_detached`, so no extra copy of a block), `argon2`
//! (Argon2id, the memory-hard key derivation for passphrases), `zeroize`
//! (key material wiped on drop), `rand`'s `OsRng` (keys, salts, nonces)
//! and `base64` (key slots are JSON).

mod append_only;
mod backend;
mod catalogue;
mod condemn;
mod copy;
mod crypto;
mod encryption;
mod error;
mod forget;
mod gc;
mod heal;
mod id;
mod journal;
mod key;
mod lease;
mod lock;
mod manifest;
mod node_cache;
mod pack;
mod rekey;
mod repair;
mod repository;
mod resume;
mod store;
mod tree;
mod verify;
mod vm;
mod writer;

pub use backend::{Backend, FileKind, LocalBackend, MemoryBackend};
pub use catalogue::{
    BlobLocation, Catalogue, JobRunRow, LostRestorePoint, QuarantinedBlob, RestorePointRow, RunRow,
};
pub use copy::CopyReport;
pub use crypto::Crypto;
pub use encryption::KeyPrompt;
pub use error::{Error, Result};
pub use forget::{Decision, ForgetPlan, ForgetSelection, KeepPolicy};
pub use gc::{DEFAULT_MAX_UNUSED, GcEstimate, GcOptions, GcReport};
pub use id::{BlobId, is_all_zero};
pub use key::{KEY_SLOT_FORMAT, KdfParams, KeySlot, Secret, SecretKind};
pub use lease::{LOCK_FORMAT, Lease, LockRecord, LockTtl, Owner};
pub use lock::Lock;
pub use manifest::{BackupMode, BackupStats, MAX_VIRTUAL_SIZE, Manifest, SourceInfo};
pub use rekey::COPIED_FROM;
pub use repair::{RepairReport, repair, repair_keyed};
pub use repository::{
    BACKUP_RUN, BLOCK_SIZE, CONFIG_FILE, Config, DEFAULT_PACK_SIZE, ENCRYPTED_FORMAT_VERSION,
    EncryptionConfig, FORMAT_VERSION, InitOptions, Repository,
};
pub use resume::{RESUMABLE_MAX_AGE, Resumable, Resume};
pub use store::{BlobReader, PackWriter, WriteStats};
pub use tree::{Cursor, FANOUT, NodeStore, Tree, TreeShape, Visitor, decode_node, walk};
pub use verify::{Damage, DataCheck, OnProgress, Problem, VerifyReport};
pub use vm::{MAX_VM_METADATA_LEN, VM_METADATA_FORMAT, VmInfo, VmMetadata, VmMetadataRow};
pub use writer::{BackupSpec, BackupWriter, BlockEncoder, EncodedBlock, NewBlock, ReadStats};

/// Internals that the crate's own tests and benchmarks exercise directly
/// (the pack, node and manifest formats fed random input, block maps built
/// node by node, packs written blob by blob): not part of the API.
#[doc(hidden)]
pub mod testing {
    pub mod manifest {
        pub use crate::manifest::*;
    }
    pub mod pack {
        pub use crate::pack::*;
    }
    pub mod tree {
        pub use crate::tree::*;
    }
}
