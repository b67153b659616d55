//! The simulator end to end: its NBD side read with cbtvault's NBD client,
//! the raw wire format, persistence across restarts, the `xapi-sim`
//! binary and its control commands, and the official Python SDK
//! (`pip install XenAPI`) against it. Each test starts its own simulator on
//! a free 127.0.0.1 port with a temporary state directory.

mod integration {
    mod binary;
    mod common;
    mod faithful;
    mod nbd;
    mod persistence;
    mod python;
    mod wire;
}
