//! Integration tests of the repository crate: one test binary whose
//! modules live in `tests/integration/`.

mod integration {
    mod common;
    mod copy_keys;
    mod damage;
    mod encryption;
    mod forget;
    mod fuzz;
    mod hosts;
    mod maintenance;
    mod repository;
    mod tree;
    mod vm;
    mod writer;
    mod writers;
}
