//! Integration tests of the NBD crate: one test binary whose modules live
//! in `tests/integration/`. Every external server (qemu-nbd, nbdkit) is
//! started by the test itself on a unix socket in a temporary directory or
//! on a free 127.0.0.1 port, and killed when the test ends; a test whose
//! binary is missing prints why it is skipped. `fuzz` and `fuzz_server`
//! play hostile peers (recorded sessions, mutated or random) against the
//! client and the server; `watch` gives them a per-thread allocation and
//! panic record, `mutate` the scripts and their mutations; `load` puts our
//! server under hostile clients beside a well-behaved one.

mod integration {
    mod common;
    mod fuzz;
    mod fuzz_server;
    mod hostile;
    mod load;
    mod mutate;
    mod nbdkit;
    mod qemu;
    mod server;
    mod tls;
    mod watch;
}
