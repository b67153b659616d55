//! tls tests (to come).
