//! Watching one fuzz case: see `cbtvault-testkit` (shared by the fuzz
//! tests of the nbd, qmp and xenapi crates).

pub use cbtvault_testkit::{runtime, watch};
