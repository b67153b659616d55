//! cbtvault's test support, for tests and benchmarks only (never linked
//! into the `cbtvault` binary):
//!
//! - [`synth`]: disk images with a realistic mix of content, written to
//!   files, and churn that reports the map a changed-block tracker would.
//! - [`MemDisk`]: a disk in memory that counts how often each block is
//!   read, can be told to fail a read at an offset, and records which
//!   blocks the guest changed — the oracle for the engine's own tests
//!   (which wrap it as a `DiskSource`; this crate does not depend on the
//!   engine, so the tests see one copy of its types).
//! - With the feature `watch`: [`watch()`] reports the largest allocation
//!   and the panics of one fuzz case. The feature installs a global
//!   allocator, so only the fuzz tests enable it.

mod memdisk;
pub mod synth;
#[cfg(feature = "watch")]
mod watch;

pub use memdisk::{MemDisk, ReadFailed};
#[cfg(feature = "watch")]
pub use watch::{Tracking, Watched, runtime, watch};
