//! The client against the simulator (crates/xapi-sim), over JSON-RPC and
//! XML-RPC: wire formats, sessions, typed errors, the CBT chain semantics
//! of the specification, and raw VDI import. Each test starts its own
//! simulator on a free 127.0.0.1 port with a temporary state directory.

mod integration {
    mod cbt;
    mod codec;
    mod common;
    mod errors;
    mod import;
    mod session;
    mod transport;
}
