//! server tests (to come).
