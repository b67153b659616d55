//! hostile tests (to come).
