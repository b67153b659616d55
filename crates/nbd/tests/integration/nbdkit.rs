//! nbdkit tests (to come).
