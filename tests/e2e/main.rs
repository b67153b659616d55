//! End-to-end tests of the `cbtvault` binary on real files: every command,
//! incrementals from changed-block bitmaps, corruption, crashes and
//! concurrency. Each test works in its own temporary directory.

mod alerts;
mod append_only;
mod commands;
mod common;
mod concurrency;
mod copy_job;
mod corruption;
mod crash;
mod daemon;
mod daemon_qemu;
mod encrypt;
mod files;
mod incremental;
mod integrity;
mod jobs_locks;
mod nbd;
mod qemu;
mod restore_vm;
mod restore_vm_qemu;
mod resume;
mod rollback;
mod runner;
mod s3;
mod s3_nodes;
mod serve_load;
mod sources;
mod ux;
mod vm_points;
mod vmware;
mod writers;
mod xen;
mod xen_faithful;
