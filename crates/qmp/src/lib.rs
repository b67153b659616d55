//! An async client for QMP, the QEMU Machine Protocol, as spoken by QEMU
//! and qemu-storage-daemon (QSD) on a unix socket or TCP.
//!
//! # Protocol
//! QMP is one JSON object per line in each direction. On connect QEMU
//! sends a greeting (`{"QMP": {"version": ..., "capabilities": [...]}}`);
//! the client must send `qmp_capabilities` before any other command.
//! Each command may carry an `id`, which QEMU copies into its reply
//! (`{"return": ...}` or `{"error": {"class", "desc"}}`). Asynchronous
//! events (`{"event", "data", "timestamp"}`) arrive at any moment,
//! interleaved with replies: a `block-job-cancel` reply, for example, is
//! typically preceded by the job's `BLOCK_JOB_CANCELLED` event.
//!
//! # Design
//! [`Qmp::connect`] reads the greeting (with a time limit, so a socket
//! that is not QMP gives [`Error::NotQmp`] or [`Error::Timeout`], never a
//! hang), then starts two tasks:
//! - a **reader** that parses each line and either completes the waiting
//!   command whose id it carries, or appends the event to a bounded buffer
//!   and wakes whoever waits for events;
//! - a **writer** that writes whole lines from a queue, so a command
//!   future dropped half-way can never leave half a message on the wire.
//!
//! Every command gets a fresh numeric id, so commands may be issued
//! concurrently from several tasks through `&Qmp`. Events stay buffered
//! until claimed: [`Qmp::wait_event`] returns the first buffered or future
//! event with a given name that satisfies a predicate, so an event that
//! arrived before the reply of the command that caused it is not lost.
//! When the connection ends, every waiter gets [`Error::Closed`] with the
//! reason.
//!
//! Waiting for a job or an export deletion ([`Qmp::wait_job`],
//! [`Qmp::block_export_del`]) checks the real state with a query and uses
//! the events only as wake-ups, so a stale event of an earlier object
//! with the same id cannot end the wait early.
//!
//! Errors QEMU reports keep their QMP class and description
//! ([`Error::Command`]). The typed helpers in this crate cover what an
//! incremental backup needs (bitmaps, transactions, fleecing, NBD
//! exports, jobs); [`Qmp::execute`] runs anything else.
//!
//! This crate depends on no other cbtvault crate.
//!
//! # Crates used
//! `tokio` (the async runtime, sockets and timers the rest of cbtvault
//! uses), `serde`/`serde_json` (QMP is JSON; typed replies are decoded
//! with derived `Deserialize`), `thiserror` (the error enum), `tracing`
//! (debug logs of every command and event, off unless asked for).

mod client;
mod commands;
mod error;
mod types;

pub use client::{Address, Options, Qmp};
pub use commands::Action;
pub use error::{Error, ErrorClass, Result};
pub use types::{
    BlockExportInfo, BlockInfo, BlockJobInfo, BlockNode, DirtyBitmap, Event, Greeting, ImageInfo,
    InsertedNode, JobInfo, JobStatus, Version, VersionInfo, VmIdentity,
};
