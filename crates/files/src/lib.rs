//! Single files out of a restore point, without restoring the disk: the
//! partition table and file systems are read straight from the
//! repository, fetching only the blocks they touch.
//!
//! # Design
//! - **The disk as bytes** (`view`): a restore point's block map gives the
//!   id of the 64 KiB block under any offset; the block is read from its
//!   pack and checked against its id, and a small LRU cache (16 MiB by
//!   default) keeps the metadata blocks readers return to. A zero block
//!   is never fetched. The repository's shared lock is held while an
//!   [`Explorer`] is open, so gc cannot take a block away.
//! - **Partitions** (`table`): MBR (primary, extended and logical) and
//!   GPT; a disk without a table is one file system. Partitions are
//!   named `p1`, `p2`... as Linux names them.
//! - **File systems**: recognised by their signatures, then read by a
//!   reader behind one small internal trait (stat, list, read link, read
//!   file). ext2/3/4, NTFS and FAT12/16/32 are read; XFS, exFAT, LVM,
//!   LUKS and swap are recognised and refused with a message that says
//!   what was found.
//! - **Writing out** (`extract`): regular files (all-zero stretches left
//!   as holes, so sparse files stay sparse), directories, symlinks;
//!   permission bits, access and modification times, and the owner when
//!   running as root; names are bytes, so non-UTF-8 and non-ASCII names
//!   arrive as they were. Devices, FIFOs and sockets are listed as
//!   skipped. Nothing existing is overwritten, and a name that could
//!   escape the destination (`..`, `/`, NUL) is refused.
//!
//! # Damaged and hostile file systems
//! Readers run on data nobody vouches for. Every operation gets a read
//! budget (1 GiB plus twice the size of the file being read, by default):
//! a reader sent round a loop by damaged metadata is stopped with
//! [`Error::ReadBudget`] rather than hanging. A panic inside a third-party
//! reader is caught and becomes [`Error::ReaderPanicked`] naming the
//! file system and path (the reader is remounted next time). GPT headers
//! that announce absurd entry counts are refused before `gptman`
//! allocates for them. A damaged repository block is
//! [`Error::DamagedBlock`], never mistaken for a damaged file system.
//! The crate's fuzz test (`tests/fuzz.rs`) mutates real images and checks
//! all of this.
//!
//! # Crates used and why
//! - `ext4-view`: a maintained, pure-Rust, read-only ext2/3/4 reader
//!   (extents, htree directories, journal replay in memory), no unsafe.
//! - `ntfs`: the maintained pure-Rust NTFS reader (`forbid(unsafe_code)`).
//! - `fatfs`: the pure-Rust FAT12/16/32 implementation, used read-only
//!   (without `chrono`: times are converted here).
//! - `mbrman` and `gptman`: MBR with logical partitions, and GPT with its
//!   CRCs and backup header, from the same maintained project.
//! - `lru`: the block cache.
//! - No maintained pure-Rust XFS reader exists (the crates that exist
//!   are unmaintained FUSE experiments), so XFS is recognised and refused.

mod entry;
mod error;
mod explorer;
mod ext4;
mod extract;
mod fat;
mod ntfs;
mod table;
mod view;

pub use entry::{Entry, Kind, Time};
pub use error::{Error, Result};
pub use explorer::{Explorer, Options};
pub use extract::GetReport;
pub use table::Partition;
